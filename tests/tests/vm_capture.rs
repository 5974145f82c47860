//! The VM agent's traffic capture with real nftables rules, inside network namespace A of a
//! topology (the VM), with namespace B standing in for the rest of the network:
//!
//! - outbound TCP to a mesh address lands on the outbound port with its original
//!   destination readable, unless the socket carries the agent's mark or the port is
//!   excluded; replacing the destinations (thousands at once) takes effect; IPv6 too;
//! - inbound TCP from B to an app port goes through prerouting to the inbound port, where
//!   `AppTarget::OriginalPort` finds the app's port, and a connection made straight to the
//!   inbound port is refused as a loop;
//! - DNS (UDP and TCP) to the resolvers of the plan reaches the DNS proxy port, unless
//!   marked, also for a stub resolver on loopback; the DNS proxy's forwarder with the mark
//!   reaches the real resolver;
//! - `check` notices a removed table or a flushed chain; `cleanup` removes the table and is
//!   idempotent.
//!
//! Traffic that is not redirected is *seen arriving* where it was going (a listener in B
//! holding the mesh address, a listener for the excluded port), so "not redirected" is
//! asserted positively, without waiting for something not to happen.
//!
//! Skipped without root and `ip` (failing instead when CI=true); needs `nft`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use isthmus_dns::cache::{Cache, CacheLimits};
use isthmus_dns::forwarder::{Forwarder, UpstreamMode};
use isthmus_dns::metrics::Metrics;
use isthmus_dns::names::{Locale, NameTable};
use isthmus_dns::server::{Resolver, Transport};
use isthmus_proto::subscription::LocalView;
use isthmus_proxy::inbound::AppTarget;
use isthmus_proxy::original_dst::original_destination;
use isthmus_proxy::upstream::connect_tcp;
use isthmus_tests::harness::netns::{block_on_in, Net, Netns, Topology};
use isthmus_vm_agent::capture::{self, CaptureError, CapturePlan, DEFAULT_MARK};
use nix::sys::socket::{setsockopt, sockopt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::runtime::Runtime;
use tokio::time::timeout;

/// Bounds every step that should take milliseconds.
const WAIT: Duration = Duration::from_secs(5);
/// A mesh service address (a VIP), from the reserved 240.0.0.0/4 so it is nobody's.
const VIP: Ipv4Addr = Ipv4Addr::new(240, 240, 0, 1);
const VIP_NET: &str = "240.240.0.0/16";
/// The app's port on the VM, captured inbound.
const APP_PORT: u16 = 8080;
/// A port excluded both ways (SSH).
const SSH: u16 = 22;

fn plan() -> CapturePlan {
    CapturePlan {
        outbound_port: 15001,
        inbound_port: 15006,
        dns_port: 15053,
        mark: DEFAULT_MARK,
        inbound_ports: vec![APP_PORT],
        exclude_inbound_ports: vec![SSH],
        exclude_outbound_ports: vec![SSH],
        dns_servers: vec![],
        exempt_uid: None,
        inbound_all: false,
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes VIPs routable from A, towards B, and gives B the address [`VIP`], so that a
/// connection that is *not* redirected arrives at a listener in B.
///
/// A locally generated packet is routed before the nat output hook sees it: without a
/// route (these namespaces have no default route) `connect` fails with "network
/// unreachable" and the redirect rule never runs. On a real VM the default route covers
/// VIPs.
fn route_vips_to_b(topo: &Topology) {
    let via = topo.gateway_addr(Net::B).to_string();
    ip(&["-n", topo.a.name(), "route", "add", VIP_NET, "via", &via]);
    topo.b.add_ip(IpAddr::V4(VIP));
}

/// Runs a capture function in `ns`: `nft` runs in the namespace of the calling thread.
fn in_ns<T: Send>(ns: &Netns, f: impl FnOnce() -> Result<T, CaptureError> + Send) -> T {
    ns.run(f).unwrap_or_else(|e| panic!("{e}"))
}

/// `nft args` in `ns`, its stdout.
fn nft_in(ns: &Netns, args: &[&str]) -> String {
    let out = ns.command("nft").args(args).output().expect("running nft");
    assert!(out.status.success(), "nft {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One accepted connection, as the listener saw it.
#[derive(Debug)]
struct Seen {
    peer: SocketAddr,
    local: SocketAddr,
    original: io::Result<SocketAddr>,
    /// What `AppTarget::OriginalPort { host: 127.0.0.1 }` makes of the connection.
    app: io::Result<SocketAddr>,
}

/// Listens on `addr` on `rt` and reports every accepted connection.
fn watch_tcp(rt: &Runtime, addr: SocketAddr) -> mpsc::Receiver<Seen> {
    let listener = block_on_in(rt, async move { TcpListener::bind(addr).await })
        .unwrap_or_else(|e| panic!("binding {addr}: {e}"));
    let (tx, rx) = mpsc::channel();
    let target = AppTarget::OriginalPort {
        host: Ipv4Addr::LOCALHOST.into(),
    };
    rt.spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let seen = Seen {
                peer,
                local: stream.local_addr().unwrap(),
                original: original_destination(&stream),
                app: target.resolve(&stream),
            };
            if tx.send(seen).is_err() {
                return;
            }
            // Held until the client is done with it (the test's clients close first).
            tokio::spawn(async move {
                let mut stream = stream;
                let mut buf = [0u8; 64];
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    rx
}

/// Listens for datagrams on `addr` on `rt`, reports each (sender, bytes) and answers
/// `answer` when given.
fn watch_udp(
    rt: &Runtime,
    addr: SocketAddr,
    answer: Option<&'static [u8]>,
) -> mpsc::Receiver<(SocketAddr, Vec<u8>)> {
    let socket = block_on_in(rt, async move { UdpSocket::bind(addr).await })
        .unwrap_or_else(|e| panic!("binding {addr}: {e}"));
    let (tx, rx) = mpsc::channel();
    rt.spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            if let Some(answer) = answer {
                let _ = socket.send_to(answer, from).await;
            }
            if tx.send((from, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    });
    rx
}

fn next<T>(rx: &mpsc::Receiver<T>, what: &str) -> T {
    rx.recv_timeout(WAIT)
        .unwrap_or_else(|e| panic!("{what}: nothing within {WAIT:?} ({e})"))
}

/// Connects from `rt`'s namespace, with `mark` on the socket if given; the stream is kept
/// open by the caller.
fn connect_from(rt: &Runtime, dst: SocketAddr, mark: Option<u32>) -> TcpStream {
    block_on_in(rt, async move {
        timeout(WAIT, connect_tcp(dst, mark))
            .await
            .unwrap_or_else(|_| panic!("connecting to {dst} timed out"))
            .unwrap_or_else(|e| panic!("connecting to {dst}: {e}"))
    })
}

#[test]
fn outbound_mesh_traffic_is_redirected_unless_marked_or_excluded() {
    let Some(topo) = Topology::create("vm_capture_outbound") else {
        return;
    };
    let (a, b) = (topo.netns(Net::A), topo.netns(Net::B));
    route_vips_to_b(&topo);
    let plan = plan();
    in_ns(a, || capture::install(&plan));
    in_ns(a, || capture::set_destinations(&[VIP], &[]));
    let (rt_a, rt_b) = (a.runtime(), b.runtime());
    let proxy = watch_tcp(&rt_a, (Ipv4Addr::LOCALHOST, plan.outbound_port).into());
    let real = watch_tcp(&rt_b, (VIP, 80).into());
    let real_ssh = watch_tcp(&rt_b, (VIP, SSH).into());
    let vip80: SocketAddr = (VIP, 80).into();
    let mut open = Vec::new();

    // (a) The app's connection lands on the outbound port; the client still believes it
    // talks to the VIP, and the proxy reads where it was going.
    let app = connect_from(&rt_a, vip80, None);
    assert_eq!(app.peer_addr().unwrap(), vip80);
    let seen = next(&proxy, "the outbound port");
    assert_eq!(seen.peer, app.local_addr().unwrap());
    assert_eq!(seen.local, (Ipv4Addr::LOCALHOST, plan.outbound_port).into());
    assert_eq!(seen.original.unwrap(), vip80);
    open.push(app);

    // (b) The agent's own connection (marked) goes where it was going: to B.
    let agent = connect_from(&rt_a, vip80, Some(plan.mark));
    let seen = next(&real, "the real VIP holder in B");
    assert_eq!(seen.peer, agent.local_addr().unwrap());
    assert!(
        proxy.try_recv().is_err(),
        "a marked connection was redirected"
    );
    open.push(agent);

    // (c) An excluded port is not captured, even to a mesh address.
    let ssh = connect_from(&rt_a, (VIP, SSH).into(), None);
    let seen = next(&real_ssh, "SSH in B");
    assert_eq!(seen.peer, ssh.local_addr().unwrap());
    assert!(proxy.try_recv().is_err(), "an excluded port was redirected");
    open.push(ssh);

    // New destinations replace the old: the VIP is no longer captured, its neighbour is.
    let neighbour = Ipv4Addr::new(240, 240, 0, 2);
    let other: SocketAddr = (neighbour, 443).into();
    in_ns(a, || capture::set_destinations(&[neighbour], &[]));
    let c = connect_from(&rt_a, vip80, None);
    assert_eq!(
        next(&real, "B, after the VIP left the set").peer,
        c.local_addr().unwrap()
    );
    open.push(c);
    let c = connect_from(&rt_a, other, None);
    assert_eq!(next(&proxy, "the outbound port").original.unwrap(), other);
    open.push(c);

    // Thousands of addresses in one replacement.
    let mut many: Vec<Ipv4Addr> = (0..5000u32)
        .map(|i| Ipv4Addr::from(0x0a40_0000 + i))
        .collect();
    many.push(VIP);
    in_ns(a, || capture::set_destinations(&many, &[]));
    let listed = nft_in(a, &["list", "set", "inet", "isthmus", "mesh4"]);
    assert!(
        listed.contains("10.64.19.135"),
        "the last of 5000 is in the set"
    );
    let c = connect_from(&rt_a, vip80, None);
    assert_eq!(next(&proxy, "the outbound port").original.unwrap(), vip80);
    open.push(c);

    // IPv6: redirected to ::1, the original destination read with IP6T_SO_ORIGINAL_DST.
    if std::path::Path::new("/proc/sys/net/ipv6").exists() {
        let vip6: Ipv6Addr = "fd00:240::1".parse().unwrap();
        a.add_ip("fd00:a::5".parse().unwrap());
        ip(&[
            "-n",
            a.name(),
            "-6",
            "route",
            "add",
            "fd00:240::/64",
            "dev",
            "wl0",
        ]);
        in_ns(a, || capture::set_destinations(&[], &[vip6]));
        let proxy6 = watch_tcp(&rt_a, (Ipv6Addr::LOCALHOST, plan.outbound_port).into());
        let dst: SocketAddr = (vip6, 80).into();
        let c = connect_from(&rt_a, dst, None);
        let seen = next(&proxy6, "the outbound port on ::1");
        assert_eq!(seen.peer, c.local_addr().unwrap());
        assert_eq!(seen.original.unwrap(), dst);
        open.push(c);
    } else {
        eprintln!("no IPv6 in this kernel: the IPv6 part is skipped");
    }

    drop(open);
    rt_a.shutdown_background();
    rt_b.shutdown_background();
}

/// Prerouting, for real: B connects to A's address on the app's port, as a peer in the
/// mesh would, and the connection reaches the inbound port instead of the app.
#[test]
fn inbound_app_ports_are_redirected_through_prerouting() {
    let Some(topo) = Topology::create("vm_capture_inbound") else {
        return;
    };
    let (a, b) = (topo.netns(Net::A), topo.netns(Net::B));
    let vm = topo.gateway_addr(Net::A);
    let plan = plan();
    in_ns(a, || capture::install(&plan));
    let (rt_a, rt_b) = (a.runtime(), b.runtime());
    // The inbound listener is on the wildcard address: prerouting's REDIRECT sends to the
    // address of the interface the packet came in on.
    let inbound = watch_tcp(&rt_a, (Ipv4Addr::UNSPECIFIED, plan.inbound_port).into());
    let app = watch_tcp(&rt_a, (Ipv4Addr::UNSPECIFIED, APP_PORT).into());
    let sshd = watch_tcp(&rt_a, (Ipv4Addr::UNSPECIFIED, SSH).into());
    let other = watch_tcp(&rt_a, (Ipv4Addr::UNSPECIFIED, 9090).into());
    let mut open = Vec::new();

    let to_app: SocketAddr = (vm, APP_PORT).into();
    let c = connect_from(&rt_b, to_app, None);
    let seen = next(&inbound, "the inbound port");
    assert_eq!(seen.peer, c.local_addr().unwrap());
    assert_eq!(seen.local.port(), plan.inbound_port);
    assert_eq!(seen.original.unwrap(), to_app);
    assert_eq!(
        seen.app.unwrap(),
        (Ipv4Addr::LOCALHOST, APP_PORT).into(),
        "OriginalPort finds the app's port"
    );
    open.push(c);

    // Excluded and uncaptured ports reach their listeners directly.
    for (port, rx) in [(SSH, &sshd), (9090, &other)] {
        let c = connect_from(&rt_b, (vm, port).into(), None);
        let seen = next(rx, &format!("the listener on {port}"));
        assert_eq!(seen.peer, c.local_addr().unwrap());
        open.push(c);
    }
    // The VM talking to its own app port stays on loopback, uncaptured.
    let c = connect_from(&rt_a, to_app, None);
    assert_eq!(
        next(&app, "the app, from the VM itself").peer,
        c.local_addr().unwrap()
    );
    open.push(c);
    assert!(
        inbound.try_recv().is_err(),
        "only B's app connection was redirected"
    );

    // Straight to the inbound port, nothing redirected: OriginalPort refuses to loop.
    for (rt, from) in [(&rt_b, "B"), (&rt_a, "the VM")] {
        let c = connect_from(rt, (vm, plan.inbound_port).into(), None);
        let seen = next(&inbound, "the inbound port, directly");
        assert_eq!(seen.original.unwrap(), seen.local, "from {from}");
        let err = seen.app.unwrap_err();
        assert_eq!(
            err.kind(),
            io::ErrorKind::InvalidInput,
            "from {from}: {err}"
        );
        assert!(err.to_string().contains("would loop"), "{err}");
        open.push(c);
    }

    drop(open);
    rt_a.shutdown_background();
    rt_b.shutdown_background();
}

/// A DNS query for `example.org. A`, ID 0x4242, recursion desired.
const QUERY: &[u8] = &[
    0x42, 0x42, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 3,
    b'o', b'r', b'g', 0, 0, 1, 0, 1,
];

/// `query` turned into an empty NOERROR answer (its records, such as EDNS, echoed),
/// truncated (TC) if asked.
fn answer_to(query: &[u8], truncated: bool) -> Vec<u8> {
    let mut a = query.to_vec();
    a[2] = 0x80 | (query[2] & 0x01) | if truncated { 0x02 } else { 0 };
    a[3] = 0x80;
    a
}

/// A resolver with an empty mesh name table that forwards everything to `upstream`.
fn forwarding_resolver(upstream: SocketAddr, mark: Option<u32>) -> Resolver {
    let metrics = Arc::new(Metrics::register(
        &mut prometheus_client::registry::Registry::default(),
    ));
    let locale = Locale {
        network: "network-a".into(),
        cluster: "cluster-a".into(),
        namespace: "default".into(),
        cluster_domain: "cluster.local".into(),
        ipv6: true,
    };
    let names = NameTable::build(&LocalView::default(), &locale, true);
    Resolver::new(
        Arc::new(arc_swap::ArcSwap::from_pointee(names)),
        Cache::new(CacheLimits {
            max_entries: 16,
            max_ttl: Duration::from_secs(60),
            max_negative_ttl: Duration::from_secs(60),
        }),
        Forwarder::new(
            vec![upstream],
            UpstreamMode::Sequential,
            WAIT,
            metrics.clone(),
        )
        .with_socket_mark(mark),
        metrics,
        16,
        Duration::from_secs(30),
        1232,
        "cluster.local",
    )
}

/// A resolver in a test runtime's namespace at `addr`: over UDP it answers truncated, so
/// that a forwarder retries over TCP, where it answers in full. Reports "udp" or "tcp" for
/// each query answered.
fn fake_resolver(rt: &Runtime, addr: SocketAddr) -> mpsc::Receiver<&'static str> {
    let (udp, tcp) = block_on_in(rt, async move {
        (
            UdpSocket::bind(addr).await.unwrap(),
            TcpListener::bind(addr).await.unwrap(),
        )
    });
    let (tx, rx) = mpsc::channel();
    let tx_tcp = tx.clone();
    rt.spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            let _ = udp.send_to(&answer_to(&buf[..n], true), from).await;
            let _ = tx.send("udp");
        }
    });
    rt.spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            let Ok(len) = s.read_u16().await else {
                continue;
            };
            let mut q = vec![0u8; usize::from(len)];
            if s.read_exact(&mut q).await.is_err() {
                continue;
            }
            let a = answer_to(&q, false);
            let mut out = (a.len() as u16).to_be_bytes().to_vec();
            out.extend_from_slice(&a);
            let _ = s.write_all(&out).await;
            let _ = tx_tcp.send("tcp");
        }
    });
    rx
}

#[test]
fn dns_to_the_resolvers_reaches_the_dns_port_unless_marked() {
    let Some(topo) = Topology::create("vm_capture_dns") else {
        return;
    };
    let (a, b) = (topo.netns(Net::A), topo.netns(Net::B));
    // The VM's resolvers: one across the network (B's address), a stub on loopback (as
    // systemd-resolved's 127.0.0.53), and one that answers (B holds it, routed like a VIP).
    let remote: SocketAddr = (topo.gateway_addr(Net::B), 53).into();
    let stub: SocketAddr = (Ipv4Addr::new(127, 0, 0, 53), 53).into();
    let upstream: SocketAddr = (Ipv4Addr::new(10, 53, 0, 53), 53).into();
    let via = topo.gateway_addr(Net::B).to_string();
    ip(&["-n", a.name(), "route", "add", "10.53.0.53/32", "via", &via]);
    b.add_ip(upstream.ip());
    let plan = CapturePlan {
        dns_servers: vec![remote.ip(), stub.ip(), upstream.ip()],
        ..plan()
    };
    in_ns(a, || capture::install(&plan));
    let (rt_a, rt_b) = (a.runtime(), b.runtime());
    let dns_port: SocketAddr = (Ipv4Addr::LOCALHOST, plan.dns_port).into();
    let proxy_udp = watch_udp(&rt_a, dns_port, Some(b"from the proxy"));
    let proxy_tcp = watch_tcp(&rt_a, dns_port);
    let stub_udp = watch_udp(&rt_a, stub, None);
    let remote_udp = watch_udp(&rt_b, remote, None);
    let remote_tcp = watch_tcp(&rt_b, remote);
    let remote_other = watch_udp(&rt_b, (remote.ip(), 5353).into(), None);
    let answered = fake_resolver(&rt_b, upstream);

    // UDP, unmarked: the proxy gets it and its answer comes back from the resolver's
    // address (conntrack undoes the redirect on the way back).
    for resolver in [remote, stub] {
        let (from, answer) = block_on_in(&rt_a, async move {
            let s = UdpSocket::bind("0.0.0.0:0").await.unwrap();
            s.connect(resolver).await.unwrap();
            s.send(QUERY).await.unwrap();
            let mut buf = [0u8; 64];
            let n = timeout(WAIT, s.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no answer through the redirect to {resolver}"))
                .unwrap();
            (s.peer_addr().unwrap(), buf[..n].to_vec())
        });
        let (_, got) = next(&proxy_udp, &format!("the DNS port, for {resolver}"));
        assert_eq!(got, QUERY);
        assert_eq!(from, resolver);
        assert_eq!(answer, b"from the proxy");
    }
    // UDP, marked: straight to the resolver, remote or stub.
    for (resolver, rx) in [(remote, &remote_udp), (stub, &stub_udp)] {
        block_on_in(&rt_a, async move {
            let s = UdpSocket::bind("0.0.0.0:0").await.unwrap();
            setsockopt(&s, sockopt::Mark, &DEFAULT_MARK).unwrap();
            s.send_to(QUERY, resolver).await.unwrap();
        });
        let (_, got) = next(rx, &format!("{resolver} itself"));
        assert_eq!(got, QUERY);
    }
    assert!(
        proxy_udp.try_recv().is_err(),
        "a marked query was redirected"
    );
    // Another port on a resolver's address is not DNS: not captured.
    block_on_in(&rt_a, async move {
        let s = UdpSocket::bind("0.0.0.0:0").await.unwrap();
        s.send_to(QUERY, (remote.ip(), 5353)).await.unwrap();
    });
    next(&remote_other, "port 5353 on the resolver");

    // TCP, unmarked and marked.
    let c = connect_from(&rt_a, remote, None);
    let seen = next(&proxy_tcp, "the DNS port over TCP");
    assert_eq!(seen.peer, c.local_addr().unwrap());
    assert_eq!(seen.original.unwrap(), remote);
    let m = connect_from(&rt_a, remote, Some(plan.mark));
    assert_eq!(
        next(&remote_tcp, "the resolver over TCP").peer,
        m.local_addr().unwrap()
    );
    drop((c, m));

    // The DNS proxy's forwarder with the agent's mark reaches the real resolver, over UDP
    // and then (the answer being truncated) over TCP, and gets its answer.
    let marked = forwarding_resolver(upstream, Some(plan.mark));
    let answer = block_on_in(&rt_a, async move {
        timeout(WAIT * 2, marked.handle(QUERY, Transport::Udp))
            .await
            .expect("the marked forwarder got no answer in time")
    })
    .expect("an answer");
    assert_eq!(
        answer[..2],
        QUERY[..2],
        "the answer carries the client's ID"
    );
    assert_eq!(answer[3] & 0x0f, 0, "NOERROR");
    assert_eq!(next(&answered, "the resolver, over UDP"), "udp");
    assert_eq!(next(&answered, "the resolver, over TCP"), "tcp");
    // Without the mark, the forwarder's own query would come back to the DNS port.
    let unmarked = forwarding_resolver(upstream, None);
    let pending = rt_a.spawn(async move { unmarked.handle(QUERY, Transport::Udp).await });
    let (_, got) = next(&proxy_udp, "the DNS port, from an unmarked forwarder");
    assert!(
        got.windows(7).any(|w| w == b"example"),
        "the forwarded query: {got:?}"
    );
    pending.abort();
    assert!(answered.try_recv().is_err());

    rt_a.shutdown_background();
    rt_b.shutdown_background();
}

#[test]
fn check_notices_changes_and_cleanup_removes_everything() {
    let Some(topo) = Topology::create("vm_capture_cleanup") else {
        return;
    };
    let (a, b) = (topo.netns(Net::A), topo.netns(Net::B));
    route_vips_to_b(&topo);
    let plan = plan();
    assert!(a
        .run(|| capture::check(&plan))
        .unwrap_err()
        .contains("is gone"));
    assert!(!in_ns(a, capture::installed));
    in_ns(a, || capture::install(&plan));
    // Installing again replaces the table in one transaction.
    in_ns(a, || capture::install(&plan));
    in_ns(a, || capture::set_destinations(&[VIP], &[]));
    assert!(in_ns(a, capture::installed));
    a.run(|| capture::check(&plan)).unwrap();

    // Someone flushes a chain: noticed.
    nft_in(a, &["flush", "chain", "inet", "isthmus", "output"]);
    let why = a.run(|| capture::check(&plan)).unwrap_err();
    assert!(why.contains("chain output has 0 rule(s)"), "{why}");
    in_ns(a, || capture::install(&plan));
    in_ns(a, || capture::set_destinations(&[VIP], &[]));
    a.run(|| capture::check(&plan)).unwrap();

    let rt_a = a.runtime();
    let rt_b = b.runtime();
    let proxy = watch_tcp(&rt_a, (Ipv4Addr::LOCALHOST, plan.outbound_port).into());
    let real = watch_tcp(&rt_b, (VIP, 80).into());
    let c = connect_from(&rt_a, (VIP, 80).into(), None);
    next(&proxy, "the outbound port, before cleanup");
    drop(c);

    assert!(in_ns(a, capture::cleanup), "there was a table to remove");
    let tables = nft_in(a, &["list", "tables"]);
    assert!(!tables.contains("isthmus"), "left: {tables}");
    assert!(!in_ns(a, capture::cleanup), "nothing left to remove");
    assert!(!in_ns(a, capture::installed));
    let why = a.run(|| capture::check(&plan)).unwrap_err();
    assert!(why.contains("is gone"), "{why}");
    let err = a
        .run(|| capture::set_destinations(&[VIP], &[]))
        .unwrap_err();
    assert!(
        err.to_string().contains("is the capture installed"),
        "{err}"
    );

    // Without the table the VIP is reached directly again.
    let c = connect_from(&rt_a, (VIP, 80).into(), None);
    assert_eq!(
        next(&real, "B, after cleanup").peer,
        c.local_addr().unwrap()
    );
    assert!(proxy.try_recv().is_err());
    drop(c);
    rt_a.shutdown_background();
    rt_b.shutdown_background();
}
