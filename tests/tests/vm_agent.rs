//! The VM agent end to end: the real `isthmus-vm-agent` binary in a VM namespace behind
//! network A of the two-network mesh (registry in this process, east-west gateways in the
//! network namespaces), with the sample app behind it. Onboarding, calls both ways through
//! the gateways with capture on, DNS, the probe (HTTP, and gRPC health) and the lease,
//! restarts, a registry outage, cleanup, sd_notify, and bad bundles.
//!
//! As root these always run (and in CI they must: they fail if namespaces cannot be made);
//! elsewhere they skip with a message.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use isthmus_proto::model::{Health, NodeKind};
use isthmus_proto::subscription::{LocalView, Subscription};
use isthmus_proxy::outbound::OutboundTarget;
use isthmus_tests::harness::agent::{web_vm_catalog, Vm};
use isthmus_tests::harness::mesh::{host, id, on, yaml, Mesh, APP_PORT, SVC_PORT};
use isthmus_tests::harness::netns::{ChildGuard, Net};
use isthmus_tests::harness::vm::{endpoint, until, until_keeping};
use isthmus_tests::{eventually, metric, node};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 7);
const WAIT: Duration = Duration::from_secs(30);

/// A Watch of network A's view, as a workload there sees it.
async fn watch_a(m: &Mesh) -> Subscription {
    let creds = m.reg.credentials("shop", "watcher").await.unwrap();
    let mut sub = m
        .reg
        .subscribe(&creds, &node("watcher", NodeKind::Workload, "network-a"))
        .await
        .unwrap();
    sub.next().await.unwrap();
    sub
}

fn vm_health(view: &LocalView) -> Option<Health> {
    endpoint(view, &host("web"), &VM_IP.to_string()).map(|e| e.health)
}

/// An HTTP GET through `stream`; returns the whole response.
async fn http_over<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
) -> anyhow::Result<String> {
    s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// A minimal DNS server for the VM's network: answers every A query with `answer`, and
/// records who asked.
async fn fake_resolver(
    bind: SocketAddr,
    answer: Ipv4Addr,
) -> tokio::sync::mpsc::Receiver<SocketAddr> {
    let sock = UdpSocket::bind(bind).await.expect("bind the fake resolver");
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let _ = tx.try_send(from);
            // The header and the question, without the EDNS record that may follow.
            let Some(qname_end) = buf[12..n].iter().position(|b| *b == 0) else {
                continue;
            };
            let question_end = 12 + qname_end + 1 + 4;
            if question_end > n {
                continue;
            }
            let mut resp = buf[..question_end].to_vec();
            resp[2] = 0x81; // QR, RD
            resp[3] = 0x80; // RA, NOERROR
            resp[6..8].copy_from_slice(&1u16.to_be_bytes()); // one answer
            resp[8..12].copy_from_slice(&[0, 0, 0, 0]); // no authority, no additional
            resp.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
            resp.extend_from_slice(&answer.octets());
            let _ = sock.send_to(&resp, from).await;
        }
    });
    rx
}

/// The mesh with gateways in A and B, reviews in B, and the web VM in A running the sample
/// app and its agent (capture on). Returns once the agent is ready and registered.
struct Scene {
    vm: Vm,
    agent: Option<ChildGuard>,
    _app: ChildGuard,
    _reviews: isthmus_tests::harness::mesh::Workload,
    _gateways: Vec<isthmus_gateway::GatewayHandle>,
    m: Mesh,
}

impl Scene {
    async fn start(name: &str, probe: bool, grace: Duration) -> Option<Scene> {
        Self::start_with(name, probe, |cfg| cfg.vm_grace = grace).await
    }

    async fn start_with(
        name: &str,
        probe: bool,
        adjust: impl FnOnce(&mut isthmus_registry::app::RegistryConfig),
    ) -> Option<Scene> {
        let m = Mesh::start_with(name, &web_vm_catalog(probe), adjust).await?;
        let gateways = vec![m.gateway(Net::A).await, m.gateway(Net::B).await];
        let reviews = m
            .workload(
                Net::B,
                "10.10.0.5",
                "reviews-b1",
                "reviews",
                Default::default(),
            )
            .await;
        let vm = Vm::create(&m, Net::A, "web", VM_IP, "web", "web");
        let healthy = vm.dir.join("healthy");
        std::fs::write(&healthy, "").unwrap();
        let app = vm.start_app(&m, APP_PORT, Some(&healthy));
        let agent = vm.start_agent(&m, &[], &[]);
        vm.wait_ready().await;
        Some(Scene {
            vm,
            agent: Some(agent),
            _app: app,
            _reviews: reviews,
            _gateways: gateways,
            m,
        })
    }

    async fn wait_registered(&self) {
        let ok = eventually(WAIT, || async {
            let dump = self.vm.admin("/config_dump").await;
            (dump["registration"]["connected"] == true).then_some(dump)
        })
        .await;
        assert!(ok.is_some(), "never registered:\n{}", self.vm.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_joins_the_mesh_both_ways_through_the_gateways() {
    let Some(s) = Scene::start("vm-e2e", false, Duration::from_secs(10)).await else {
        return;
    };
    s.wait_registered().await;
    let dump = s.vm.admin("/config_dump").await;
    assert_eq!(dump["identity"]["spiffe_id"], id("web").to_string());
    assert_eq!(dump["registration"]["entry"], "web-10-10-0-7-network-a");

    // B calls the VM by its mesh name: through A's gateway to the VM's inbound.
    let client = s.m.client(Net::B, "ratings").await;
    client.wait_for_targets(&host("web"), SVC_PORT, 1).await;
    let c = client.clone();
    let (response, server) = on(s.m.rt(Net::B), async move {
        let mut up = c
            .outbound
            .connect(&OutboundTarget {
                hostname: host("web"),
                port: SVC_PORT,
                subset: String::new(),
                sni: None,
            })
            .await?;
        let response = http_over(&mut up.stream).await?;
        // A clean TLS close (close_notify), as the agent's own outbound does.
        let _ = up.stream.shutdown().await;
        Ok::<_, anyhow::Error>((response, up.server_identity))
    })
    .await
    .unwrap();
    assert!(response.contains("hello from web"), "{response}");
    assert_eq!(server, Some(id("web")), "the client verified the VM itself");
    let seen = eventually(WAIT, || async {
        let conns = s.vm.admin("/debug/connections").await;
        conns
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["direction"] == "inbound")
            .cloned()
    })
    .await
    .expect("the agent recorded the inbound connection");
    assert_eq!(seen["peer_identity"], id("ratings").to_string(), "{seen}");
    assert_eq!(seen["result"], "ok", "{seen}");

    // The VM's processes call reviews in B by its DNS name, with no change: capture sends
    // the name to the agent's DNS and the connection to its outbound.
    let (ok, vip, err) = s.vm.sh("getent ahostsv4 reviews.shop.svc.cluster.local");
    assert!(
        ok && vip.starts_with("240.240."),
        "{vip} {err}\n{}",
        s.vm.log()
    );
    let (ok, out, err) =
        s.vm.sh("exec bash -c 'exec 3<>/dev/tcp/reviews.shop.svc.cluster.local/9080; head -1 <&3'");
    assert!(
        ok && out.trim() == "reviews-b1",
        "{out} {err}\n{}",
        s.vm.log()
    );
    // Recorded when the connection has closed on both sides.
    let out_conn = eventually(WAIT, || async {
        let conns = s.vm.admin("/debug/connections").await;
        conns
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["direction"] == "outbound")
            .cloned()
    })
    .await
    .expect("an outbound record");
    assert_eq!(out_conn["peer_identity"], id("reviews").to_string());
    // Through B's gateway, over the agent's pooled tunnel to its tunnel port.
    assert_eq!(
        out_conn["endpoint"],
        format!("{}:15008", s.m.topo.gateway_addr(Net::B)),
        "through B's gateway: {out_conn}"
    );

    // Names outside the mesh go to the VM's own resolver: the agent forwards them with
    // its mark, so its own query is not captured again (no loop).
    let resolver: SocketAddr = "10.10.0.53:53".parse().unwrap();
    s.m.topo.netns(Net::A).add_ip(resolver.ip());
    let mut asked = on(s.m.rt(Net::A), async move {
        fake_resolver(resolver, Ipv4Addr::new(192, 0, 2, 53)).await
    })
    .await;
    let (ok, out, err) = s.vm.sh("getent ahostsv4 db.example.internal");
    assert!(
        ok && out.starts_with("192.0.2.53"),
        "{out} {err}\n{}",
        s.vm.log()
    );
    let from = asked.try_recv().expect("the resolver was asked");
    assert_eq!(
        from.ip(),
        std::net::IpAddr::V4(VM_IP),
        "asked by the VM's agent"
    );

    // SSH-style excluded ports stay untouched; app ports are mTLS only.
    let l = on(s.vm.rt(), async {
        tokio::net::TcpListener::bind("0.0.0.0:22").await
    })
    .await
    .unwrap();
    let ssh = s.vm.rt().spawn(async move {
        let (mut c, _) = l.accept().await.unwrap();
        c.write_all(b"ssh-stand-in\n").await.unwrap();
    });
    let greeting = on(s.m.rt(Net::A), async move {
        let mut c = TcpStream::connect((VM_IP, 22)).await?;
        let mut buf = String::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_string(&mut buf)).await??;
        Ok::<_, anyhow::Error>(buf)
    })
    .await
    .unwrap();
    assert_eq!(greeting, "ssh-stand-in\n");
    ssh.await.unwrap();
    let plain = on(s.m.rt(Net::A), async move {
        let mut c = TcpStream::connect((VM_IP, APP_PORT)).await?;
        http_over(&mut c).await
    })
    .await
    .unwrap_or_default();
    assert!(
        !plain.contains("hello from"),
        "plaintext reached the app: {plain}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_and_the_lease_decide_the_vms_place_in_the_views() {
    let Some(mut s) = Scene::start("vm-lease", true, Duration::from_secs(3)).await else {
        return;
    };
    let mut sub = watch_a(&s.m).await;
    let is = |h: Health| move |v: &LocalView| vm_health(v) == Some(h);
    let absent = |v: &LocalView| vm_health(v).is_none();
    until(&mut sub, is(Health::Healthy)).await;

    // The probe fails (the app's /healthz answers 503): unhealthy; it recovers: healthy.
    let healthy_file = s.vm.dir.join("healthy");
    std::fs::remove_file(&healthy_file).unwrap();
    until(&mut sub, is(Health::Unhealthy)).await;
    std::fs::write(&healthy_file, "").unwrap();
    until(&mut sub, is(Health::Healthy)).await;

    // SIGKILL: the stream breaks, the entry waits out the grace period, then goes.
    let agent = s.agent.take().unwrap();
    agent.signal(Signal::SIGKILL).unwrap();
    agent.wait_timeout(WAIT).expect("killed");
    until(&mut sub, is(Health::Unhealthy)).await;
    until(&mut sub, absent).await;
    let expired =
        |text: &str| metric(text, "isthmus_registry_vm_registrations_expired_total").unwrap_or(0.0);
    let expired_before = expired(&s.m.reg.metrics().await);
    assert!(
        expired_before >= 1.0,
        "the entry expired after the grace period"
    );

    // Back: registered again, and healthy once the probe passes.
    let agent = s.vm.start_agent(&s.m, &[], &[]);
    until(&mut sub, is(Health::Healthy)).await;

    // Killed and restarted within the grace period: the entry is taken over, never removed.
    agent.signal(Signal::SIGKILL).unwrap();
    agent.wait_timeout(WAIT).expect("killed");
    let agent = s.vm.start_agent(&s.m, &[], &[]);
    s.vm.wait_ready().await;
    let resumed = eventually(WAIT, || async {
        let d = s.vm.admin("/config_dump").await;
        (d["registration"]["connected"] == true).then_some(d["registration"]["resumed"] == true)
    })
    .await;
    assert_eq!(
        resumed,
        Some(true),
        "the restart took the entry over:\n{}",
        s.vm.log()
    );
    until_keeping(&mut sub, |v| !absent(v), is(Health::Healthy)).await;

    // SIGTERM: deregistered at once, not expired.
    agent.signal(Signal::SIGTERM).unwrap();
    let status = agent.wait_timeout(WAIT).expect("the agent stopped");
    assert!(status.success(), "{status:?}\n{}", s.vm.log());
    until(&mut sub, absent).await;
    assert_eq!(
        expired(&s.m.reg.metrics().await),
        expired_before,
        "removed by the deregistration"
    );
    assert!(s.vm.log().contains("deregistered"), "{}", s.vm.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_renew_with_the_kept_certificate_and_a_spent_token_is_refused() {
    // Leaves of 20 s: the agent renews every ~10 s, with its current certificate.
    let Some(mut s) = Scene::start_with("vm-renew", false, |cfg| {
        cfg.ca_policy.default_ttl = Duration::from_secs(20);
    })
    .await
    else {
        return;
    };
    s.wait_registered().await;
    let token = std::fs::read_to_string(s.vm.bundle_dir().join("token")).unwrap();
    let renewed = |text: &str| {
        metric(
            text,
            "isthmus_vm_agent_certificate_renewals_total{outcome=\"ok\"}",
        )
        .unwrap_or(0.0)
    };
    let twice = eventually(Duration::from_secs(60), || async {
        (renewed(&s.vm.metrics().await) >= 2.0).then_some(())
    })
    .await;
    assert!(twice.is_some(), "no renewals:\n{}", s.vm.log());

    // Restart with no token left: the kept certificate is enough.
    let agent = s.agent.take().unwrap();
    agent.signal(Signal::SIGTERM).unwrap();
    assert!(agent.wait_timeout(WAIT).expect("stopped").success());
    std::fs::remove_file(s.vm.bundle_dir().join("token")).unwrap();
    s.agent = Some(s.vm.start_agent(&s.m, &[], &[]));
    s.vm.wait_ready().await;
    s.wait_registered().await;
    assert!(
        s.vm.log()
            .contains("using the certificate in the state directory"),
        "{}",
        s.vm.log()
    );

    // The spent token again, with an empty state directory: refused, and said why.
    let second = s.vm.dir.join("second");
    let bundle2 = second.join("bundle");
    std::fs::create_dir_all(&bundle2).unwrap();
    for f in ["agent.yaml", "root-cert.pem"] {
        std::fs::copy(s.vm.bundle_dir().join(f), bundle2.join(f)).unwrap();
    }
    std::fs::write(bundle2.join("token"), &token).unwrap();
    let out =
        s.vm.ns
            .command(isthmus_tests::harness::agent::agent_binary())
            .args(["run", "--capture", "none", "--bundle"])
            .arg(&bundle2)
            .arg("--state-dir")
            .arg(second.join("state"))
            .args([
                "--admin-addr",
                "127.0.0.1:15100",
                "--metrics-addr",
                "127.0.0.1:15120",
                "--health-addr",
                "127.0.0.1:15121",
                "--dns-addr",
                "127.0.0.1:15153",
                "--outbound-addr",
                "127.0.0.1:15101",
                "--inbound-addr",
                "0.0.0.0:15106",
            ])
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for want in ["already been used", "token", "onboard it again"] {
        assert!(err.contains(want), "{want:?} missing: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_registry_the_agent_serves_its_snapshot_and_catches_up() {
    let Some(mut s) = Scene::start("vm-snapshot", false, Duration::from_secs(10)).await else {
        return;
    };
    s.wait_registered().await;
    // The agent writes its snapshot at most once a second: wait until it holds the
    // service before taking the registry away.
    let snapshot = s.vm.state_dir().join("catalog.snapshot");
    let reviews = isthmus_proto::model::service_view_key(&host("reviews"));
    let saved = eventually(Duration::from_secs(30), || {
        let view = std::fs::read(&snapshot)
            .ok()
            .and_then(|b| LocalView::decode(b).ok());
        let holds = view.is_some_and(|v| v.resources.contains_key(&reviews));
        async move { holds.then_some(()) }
    })
    .await;
    assert!(saved.is_some(), "no snapshot with reviews:\n{}", s.vm.log());
    let agent = s.agent.take().unwrap();
    agent.signal(Signal::SIGTERM).unwrap();
    assert!(agent.wait_timeout(WAIT).expect("stopped").success());

    // Registry down, agent starts: ready from the snapshot, and the VM's calls work.
    s.m.reg.stop_keeping_port().await;
    s.agent = Some(s.vm.start_agent(&s.m, &[], &[]));
    s.vm.wait_ready().await;
    let dump = s.vm.admin("/config_dump").await;
    assert_eq!(dump["catalog"]["connected"], false, "{}", dump["catalog"]);
    assert_eq!(dump["catalog"]["synced"], true, "{}", dump["catalog"]);
    let (ok, out, err) =
        s.vm.sh("exec bash -c 'exec 3<>/dev/tcp/reviews.shop.svc.cluster.local/9080; head -1 <&3'");
    if !ok {
        eprintln!("DEBUG {:?}", s.vm.sh("ip route; ip -6 route; getent ahosts reviews.shop.svc.cluster.local; nft list ruleset"));
    }
    assert!(
        ok && out.trim() == "reviews-b1",
        "{out} {err}\n{}",
        s.vm.log()
    );

    // A service added while the registry was down appears once it is back.
    s.m.reg
        .write_resource("late.yaml", &yaml::service("ratings", "shop", SVC_PORT));
    s.m.reg.start_again().await.unwrap();
    let caught_up = eventually(Duration::from_secs(60), || async {
        let (ok, out, _) = s.vm.sh("getent ahostsv4 ratings.shop.svc.cluster.local");
        (ok && out.starts_with("240.240.")).then_some(())
    })
    .await;
    assert!(caught_up.is_some(), "never caught up:\n{}", s.vm.log());
    s.wait_registered().await;
    assert_eq!(
        s.vm.admin("/config_dump").await["catalog"]["connected"],
        true
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_leaves_no_rule_behind_even_after_a_sigkill() {
    let Some(mut s) = Scene::start("vm-cleanup", false, Duration::from_secs(10)).await else {
        return;
    };
    assert!(
        s.vm.nft_tables().contains("inet isthmus"),
        "{}",
        s.vm.nft_tables()
    );

    // SIGTERM: the agent removes its rules itself.
    let agent = s.agent.take().unwrap();
    agent.signal(Signal::SIGTERM).unwrap();
    assert!(agent.wait_timeout(WAIT).expect("stopped").success());
    assert!(
        !s.vm.nft_tables().contains("isthmus"),
        "{}",
        s.vm.nft_tables()
    );

    // SIGKILL: the rules stay until `cleanup`, which is idempotent.
    let agent = s.vm.start_agent(&s.m, &[], &[]);
    s.vm.wait_ready().await;
    assert!(s.vm.nft_tables().contains("inet isthmus"));
    agent.signal(Signal::SIGKILL).unwrap();
    agent.wait_timeout(WAIT).expect("killed");
    assert!(s.vm.nft_tables().contains("inet isthmus"));
    let (ok, out) = s.vm.cleanup();
    assert!(ok && out.contains("removed"), "{out}");
    assert!(
        !s.vm.nft_tables().contains("isthmus"),
        "{}",
        s.vm.nft_tables()
    );
    let (ok, out) = s.vm.cleanup();
    assert!(ok && out.contains("no capture rules"), "{out}");
    let (_, rules, _) = s.vm.sh("nft list ruleset");
    assert!(rules.trim().is_empty(), "left behind:\n{rules}");
}

/// Datagrams from the agent on a test notify socket.
struct NotifySocket {
    sock: UnixDatagram,
    pub path: std::path::PathBuf,
}

impl NotifySocket {
    fn bind(dir: &std::path::Path) -> Self {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Self { sock, path }
    }

    /// Every message received during `d`.
    fn during(&self, d: Duration) -> Vec<String> {
        let deadline = std::time::Instant::now() + d;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while std::time::Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        out
    }

    /// Messages until one satisfies `pred` (bounded by `d`); the last is the match.
    fn until(&self, d: Duration, pred: impl Fn(&str) -> bool) -> Option<Vec<String>> {
        let deadline = std::time::Instant::now() + d;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while std::time::Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                let hit = pred(&m);
                out.push(m);
                if hit {
                    return Some(out);
                }
            }
        }
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_after_the_catalog_and_no_watchdog_while_unhealthy() {
    let Some(mut s) = Scene::start("vm-notify", false, Duration::from_secs(10)).await else {
        return;
    };
    // A certificate is kept; the catalog snapshot is not; the registry is down.
    let agent = s.agent.take().unwrap();
    agent.signal(Signal::SIGTERM).unwrap();
    assert!(agent.wait_timeout(WAIT).expect("stopped").success());
    std::fs::remove_file(s.vm.state_dir().join("catalog.snapshot")).unwrap();
    s.m.reg.stop_keeping_port().await;

    let notify = NotifySocket::bind(&s.vm.dir);
    let path = notify.path.to_str().unwrap().to_string();
    s.agent = Some(s.vm.start_agent(
        &s.m,
        &[],
        &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "1000000")],
    ));
    let before = tokio::task::block_in_place(|| notify.during(Duration::from_secs(4)));
    assert!(
        before
            .iter()
            .any(|m| m.contains("STATUS=waiting for the first catalog")),
        "{before:?}\n{}",
        s.vm.log()
    );
    assert!(
        !before.iter().any(|m| m.contains("READY=1")),
        "READY before any catalog: {before:?}"
    );

    s.m.reg.start_again().await.unwrap();
    let ready = tokio::task::block_in_place(|| {
        notify.until(Duration::from_secs(60), |m| m.contains("READY=1"))
    });
    assert!(ready.is_some(), "no READY:\n{}", s.vm.log());
    // READY means an app can resolve a mesh name at once: the DNS proxy's name table is
    // built from the catalog by then (it is built a moment after the routing table).
    let (ok, out, err) = s.vm.sh(&format!("getent ahostsv4 {}", host("reviews")));
    assert!(
        ok && out.starts_with("240.240."),
        "a mesh name right after READY: {out} {err}\n{}",
        s.vm.log()
    );
    let pings = tokio::task::block_in_place(|| notify.during(Duration::from_secs(2)));
    assert!(
        pings.iter().any(|m| m.contains("WATCHDOG=1")),
        "no watchdog pings while healthy: {pings:?}"
    );

    // The data plane breaks (its rules are gone): the pings stop, the reason is told.
    let (ok, _, err) = s.vm.sh("nft delete table inet isthmus");
    assert!(ok, "{err}");
    let told = tokio::task::block_in_place(|| {
        notify.until(Duration::from_secs(10), |m| m.contains("STATUS=unhealthy"))
    });
    assert!(told.is_some(), "no unhealthy STATUS:\n{}", s.vm.log());
    let after = tokio::task::block_in_place(|| notify.during(Duration::from_secs(3)));
    assert!(
        !after.iter().any(|m| m.contains("WATCHDOG=1")),
        "watchdog pings while unhealthy: {after:?}"
    );
    // And STOPPING on the way out.
    let agent = s.agent.take().unwrap();
    agent.signal(Signal::SIGTERM).unwrap();
    agent.wait_timeout(WAIT).expect("stopped");
    let last = tokio::task::block_in_place(|| notify.during(Duration::from_millis(500)));
    assert!(
        last.iter().any(|m| m.contains("STOPPING=1")),
        "no STOPPING: {last:?}"
    );
}

/// Runs the agent on `bundle` against a "registry" that only counts connections; returns
/// (exit success, stderr, connections it received).
async fn run_on_bundle(
    bundle: &std::path::Path,
    state: &std::path::Path,
    registry: tokio::net::TcpListener,
) -> (bool, String, usize) {
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let counter = tokio::spawn(async move {
        while registry.accept().await.is_ok() {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let out = tokio::process::Command::new(isthmus_tests::harness::agent::agent_binary())
        .args([
            "run",
            "--capture",
            "none",
            "--address",
            "192.0.2.7",
            "--bundle",
        ])
        .arg(bundle)
        .arg("--state-dir")
        .arg(state)
        .args([
            "--admin-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--health-addr",
            "127.0.0.1:0",
            "--dns-addr",
            "127.0.0.1:0",
            "--inbound-addr",
            "127.0.0.1:0",
            "--outbound-addr",
            "127.0.0.1:0",
        ])
        .env("RUST_BACKTRACE", "0")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, out)
        .await
        .expect("the agent exits")
        .unwrap();
    // Any connection it made has been accepted by now.
    tokio::time::sleep(Duration::from_millis(200)).await;
    counter.abort();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        accepted.load(std::sync::atomic::Ordering::SeqCst),
    )
}

/// What a case does to a good bundle.
type Spoil = Box<dyn Fn(&std::path::Path)>;

#[tokio::test]
async fn a_bad_bundle_fails_before_the_network_naming_the_file_or_field() {
    use isthmus_proto::bundle::AgentBundle;
    let reg = isthmus_tests::TestRegistry::start(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::read_to_string(reg.ca_root()).unwrap();
    let other_root = isthmus_proto::test_pki::TestCa::new("other.example").root_pem();

    let cases: Vec<(&str, Spoil, Vec<&str>)> = vec![
        (
            "missing root",
            Box::new(|b: &std::path::Path| std::fs::remove_file(b.join("root-cert.pem")).unwrap()),
            vec!["root-cert.pem", "cannot read"],
        ),
        (
            "wrong root",
            Box::new(move |b: &std::path::Path| {
                std::fs::write(b.join("root-cert.pem"), &other_root).unwrap()
            }),
            vec!["root-cert.pem", "trust domain \"other.example\""],
        ),
        (
            "bad field",
            Box::new(|b: &std::path::Path| {
                let text = std::fs::read_to_string(b.join("agent.yaml")).unwrap();
                std::fs::write(
                    b.join("agent.yaml"),
                    text.replace("network: network-a", "network: Network_A"),
                )
                .unwrap()
            }),
            vec!["agent.yaml", "network"],
        ),
        (
            "expired token",
            Box::new(|_: &std::path::Path| std::thread::sleep(Duration::from_millis(2100))),
            vec!["token", "expired"],
        ),
    ];
    for (name, spoil, wants) in cases {
        let registry = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bundle_dir = dir.path().join(name.replace(' ', "-"));
        let ttl = if name == "expired token" { 1 } else { 600 };
        AgentBundle {
            registry: registry.local_addr().unwrap().to_string(),
            trust_domain: "cluster.local".into(),
            cluster: "cluster-a".into(),
            network: "network-a".into(),
            group: "web".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
        }
        .write(
            &bundle_dir,
            &root,
            &reg.token("shop", "web", Duration::from_secs(ttl)),
        )
        .unwrap();
        spoil(&bundle_dir);
        let (ok, err, connections) =
            run_on_bundle(&bundle_dir, &bundle_dir.join("state"), registry).await;
        assert!(!ok, "{name}: the agent started");
        for want in wants {
            assert!(err.contains(want), "{name}: {want:?} missing in: {err}");
        }
        assert_eq!(
            connections, 0,
            "{name}: the agent reached for the network: {err}"
        );
    }
}

/// A grpc.health.v1 server whose answer for every service follows `serving`.
struct Switch(std::sync::Arc<std::sync::atomic::AtomicBool>);

#[tonic::async_trait]
impl isthmus_proto::pb::health::health_server::Health for Switch {
    async fn check(
        &self,
        _: tonic::Request<isthmus_proto::pb::health::HealthCheckRequest>,
    ) -> Result<tonic::Response<isthmus_proto::pb::health::HealthCheckResponse>, tonic::Status>
    {
        use isthmus_proto::pb::health::health_check_response::ServingStatus;
        let status = if self.0.load(std::sync::atomic::Ordering::SeqCst) {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        Ok(tonic::Response::new(
            isthmus_proto::pb::health::HealthCheckResponse {
                status: status.into(),
            },
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_probe_from_the_group_decides_the_vms_health() {
    // The group as an Istio user writes it: a grpc probe with no timing but the period.
    let group = format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {{name: web, namespace: shop}}\nspec:\n  metadata: {{labels: {{app: web}}}}\n  template: {{serviceAccount: web, ports: {{grpc: {APP_PORT}}}}}\n  probe:\n    periodSeconds: 1\n    failureThreshold: 0\n    grpc: {{port: {APP_PORT}, service: shop.Web}}\n"
    );
    let catalog = [group, yaml::service("web", "shop", SVC_PORT)];
    let Some(m) = Mesh::start_with("vm-grpc-probe", &catalog, |_| {}).await else {
        return;
    };
    let vm = Vm::create(&m, Net::A, "web", VM_IP, "web", "web");
    let serving = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let server = tonic::transport::Server::builder()
        .add_service(isthmus_proto::pb::health::health_server::HealthServer::new(
            Switch(serving.clone()),
        ))
        .serve(SocketAddr::from((Ipv4Addr::LOCALHOST, APP_PORT)));
    vm.rt().spawn(server);
    let _agent = vm.start_agent(&m, &[], &[]);
    vm.wait_ready().await;
    let mut sub = watch_a(&m).await;
    let is = |h: Health| move |v: &LocalView| vm_health(v) == Some(h);
    until(&mut sub, is(Health::Healthy)).await;

    // NOT_SERVING: unhealthy at the first failure (failureThreshold 0 is Istio's 1), with
    // the answer as the reason; SERVING again: healthy.
    serving.store(false, std::sync::atomic::Ordering::SeqCst);
    until(&mut sub, is(Health::Unhealthy)).await;
    let dump = vm.admin("/config_dump").await;
    let reason = dump["app_health"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("shop.Web") && reason.contains("NOT_SERVING"),
        "{dump}"
    );
    // The probe the agent runs, with its timing filled in as it reads it.
    let probe = &dump["workload_group"]["probe"];
    assert_eq!(probe["action"]["grpc"]["service"], "shop.Web", "{dump}");
    assert_eq!(probe["failure_threshold"], 1, "{dump}");
    serving.store(true, std::sync::atomic::Ordering::SeqCst);
    until(&mut sub, is(Health::Healthy)).await;
}
