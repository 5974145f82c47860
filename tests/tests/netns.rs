//! The network-namespace topology: gateways reach each other across the wan, workload
//! addresses do not, A and B may hold the same workload address, the root namespace is
//! reachable at the host address, runtimes and `run` really execute inside the namespace,
//! VMs behind a network reach what their network reaches (masqueraded on the wan) and
//! nothing of another network but its gateway, and dropping a topology (also while
//! unwinding) kills its processes and removes every namespace, interface and
//! `/etc/netns` directory it created.
//!
//! Skipped without root and `ip` (and `nft` for VMs), failing instead when CI=true. No
//! traffic leaves the topology's namespaces and the root namespace's end of its veth.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use isthmus_tests::harness::netns::{block_on_in, owned_by, ChildGuard, Net, Netns, Topology};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);
const WORKLOAD: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 5);

/// (device, inode) of a namespace file: equal for the same namespace.
fn ns_id(path: impl AsRef<Path>) -> (u64, u64) {
    let m = std::fs::metadata(path.as_ref())
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.as_ref().display()));
    (m.dev(), m.ino())
}

fn this_thread_ns() -> (u64, u64) {
    ns_id("/proc/thread-self/ns/net")
}

/// Accepts one connection, writes `answer` and returns the peer's address.
async fn serve_once(listener: tokio::net::TcpListener, answer: &'static [u8]) -> SocketAddr {
    let (mut s, peer) = timeout(WAIT, listener.accept())
        .await
        .expect("no connection within the bound")
        .expect("accept");
    s.write_all(answer).await.expect("write");
    peer
}

/// Connects, reads until EOF, returns what was read.
async fn fetch(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
    let mut s = timeout(WAIT, tokio::net::TcpStream::connect(addr)).await??;
    let mut buf = Vec::new();
    timeout(WAIT, s.read_to_end(&mut buf)).await??;
    Ok(buf)
}

/// Interface names in the root namespace.
fn root_links() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link");
    assert!(out.status.success(), "ip -o link show: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

fn netns_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Nothing named after `index` remains: no namespace istN<letter>*, no root interface
/// istN*, no /etc/netns/istN* directory.
fn assert_gone(index: u8) {
    let list = netns_list();
    let names = [
        format!("ist{index}a"),
        format!("ist{index}b"),
        format!("ist{index}w"),
    ];
    for name in &names {
        assert!(
            !list.split_whitespace().any(|w| w == name),
            "namespace {name} still exists:\n{list}"
        );
    }
    let owned = |dir: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| owned_by(index, n))
                    .collect()
            })
            .unwrap_or_default()
    };
    let left = owned("/var/run/netns");
    assert!(left.is_empty(), "namespaces {left:?} still exist:\n{list}");
    let left = owned("/etc/netns");
    assert!(left.is_empty(), "/etc/netns still has {left:?}");
    let left: Vec<String> = root_links()
        .into_iter()
        .filter(|n| owned_by(index, n))
        .collect();
    assert!(left.is_empty(), "root namespace still has {left:?}");
}

/// Waits until `pid` is `sleep` inside `ns` (`ip netns exec` has entered it and exec'd).
fn wait_sleeping_in(pid: u32, ns: &Netns, mut exited: impl FnMut() -> bool) {
    let proc_dir = format!("/proc/{pid}");
    let want = ns_id(ns.path());
    let deadline = Instant::now() + WAIT;
    loop {
        let comm = std::fs::read_to_string(format!("{proc_dir}/comm")).unwrap_or_default();
        let in_ns = std::fs::metadata(format!("{proc_dir}/ns/net")).map(|m| (m.dev(), m.ino()));
        if comm.trim() == "sleep" && in_ns.ok() == Some(want) {
            return;
        }
        assert!(!exited(), "sleep in {} exited at once", ns.name());
        assert!(
            Instant::now() < deadline,
            "pid {pid} did not become `sleep` in {} (comm {comm:?})",
            ns.name()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts `sleep 60` in B with [`Topology::spawn`], waiting until it runs there.
fn sleep_in_b(topo: &Topology) -> ChildGuard {
    let mut cmd = topo.b.command("sleep");
    cmd.arg("60").stdin(Stdio::null());
    let child = topo.spawn(cmd).expect("spawn sleep");
    wait_sleeping_in(child.pid(), &topo.b, || child.try_wait().is_some());
    child
}

fn is_sleep(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
}

fn assert_killed(child: &ChildGuard) {
    use std::os::unix::process::ExitStatusExt;
    let status = child
        .wait_timeout(WAIT)
        .expect("the child was not killed by the topology's drop");
    assert_eq!(status.signal(), Some(9), "{status:?}");
}

#[test]
fn gateway_addresses_reach_each_other_across_the_wan() {
    let Some(topo) = Topology::create("gateway_addresses_reach_each_other_across_the_wan") else {
        return;
    };
    let (rt_a, rt_b) = (topo.a.runtime(), topo.b.runtime());
    let gw_b = topo.gateway_addr(Net::B);
    let listener = block_on_in(&rt_b, async move {
        tokio::net::TcpListener::bind((gw_b, 0))
            .await
            .expect("bind B's gateway address in B")
    });
    let addr = listener.local_addr().unwrap();
    let server = rt_b.spawn(serve_once(listener, b"from-b"));
    let got = block_on_in(&rt_a, fetch(addr)).expect("A reaches B's gateway address");
    assert_eq!(got, b"from-b");
    // Routed straight over the wan bridge, no address translation on the way.
    let peer = block_on_in(&rt_b, server).unwrap();
    assert_eq!(peer.ip(), IpAddr::V4(topo.gateway_addr(Net::A)));

    // The same with std sockets, through `run`.
    let listener = topo
        .b
        .run(move || TcpListener::bind((gw_b, 0)).expect("bind in B"));
    let addr = listener.local_addr().unwrap();
    let sent = topo.a.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, WAIT).expect("connect from A");
        s.write_all(b"hello").unwrap();
        s.local_addr().unwrap()
    });
    let (mut s, peer) = listener.accept().expect("accept in B");
    assert_eq!(peer, sent);
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0; 5];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");

    drop((rt_a, rt_b));
}

#[test]
fn workload_address_of_b_is_unreachable_from_a() {
    let Some(topo) = Topology::create("workload_address_of_b_is_unreachable_from_a") else {
        return;
    };
    topo.b.add_ip(WORKLOAD.into());
    let (rt_a, rt_b) = (topo.a.runtime(), topo.b.runtime());
    let listener = block_on_in(&rt_b, async {
        tokio::net::TcpListener::bind((WORKLOAD, 0))
            .await
            .expect("bind the workload address in B")
    });
    let addr = listener.local_addr().unwrap();
    let server = rt_b.spawn(serve_once(listener, b"from-b"));

    // A has no route to 10.10.0.0/24 (nor a default route): the connect fails at once. The
    // bound only keeps a regression from hanging the test.
    let err = block_on_in(&rt_a, async move {
        timeout(WAIT, tokio::net::TcpStream::connect(addr)).await
    })
    .expect("connect from A to B's workload address neither failed nor succeeded in time")
    .expect_err("A reached a workload address of B");
    assert_eq!(err.kind(), std::io::ErrorKind::NetworkUnreachable, "{err}");
    // The same for the root namespace would leave the machine by its default route, so it
    // is not tried.

    // The listener is there: B itself reaches it.
    assert_eq!(block_on_in(&rt_b, fetch(addr)).unwrap(), b"from-b");
    block_on_in(&rt_b, server).unwrap();
    drop((rt_a, rt_b));
}

#[test]
fn overlapping_workload_addresses_stay_in_their_network() {
    let Some(topo) = Topology::create("overlapping_workload_addresses_stay_in_their_network")
    else {
        return;
    };
    topo.a.add_ip(WORKLOAD.into());
    topo.b.add_ip(WORKLOAD.into());
    let (rt_a, rt_b) = (topo.a.runtime(), topo.b.runtime());
    let bind = |rt: &tokio::runtime::Runtime, port: u16| {
        block_on_in(rt, async move {
            tokio::net::TcpListener::bind((WORKLOAD, port))
                .await
                .expect("bind the workload address")
        })
    };
    let listener_a = bind(&rt_a, 0);
    let addr = listener_a.local_addr().unwrap();
    // The same address and port in B: a separate stack, so no conflict.
    let listener_b = bind(&rt_b, addr.port());
    let server_a = rt_a.spawn(serve_once(listener_a, b"from-a"));
    let server_b = rt_b.spawn(serve_once(listener_b, b"from-b"));

    assert_eq!(block_on_in(&rt_a, fetch(addr)).unwrap(), b"from-a");
    assert_eq!(block_on_in(&rt_b, fetch(addr)).unwrap(), b"from-b");
    block_on_in(&rt_a, server_a).unwrap();
    block_on_in(&rt_b, server_b).unwrap();
    drop((rt_a, rt_b));
}

#[test]
fn ipv6_workload_addresses_are_usable_at_once() {
    let Some(topo) = Topology::create("ipv6_workload_addresses_are_usable_at_once") else {
        return;
    };
    let ip: IpAddr = "fd00:10::5".parse().unwrap();
    topo.a.add_ip(ip);
    // No duplicate address detection: bindable right after it is added.
    topo.a.run(move || {
        let listener = TcpListener::bind((ip, 0)).expect("bind the IPv6 workload address");
        let addr = listener.local_addr().unwrap();
        let mut s = TcpStream::connect_timeout(&addr, WAIT).expect("connect within A");
        s.write_all(b"v6").unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        let mut buf = [0; 2];
        accepted.set_read_timeout(Some(WAIT)).unwrap();
        accepted.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"v6");
    });
}

#[test]
fn host_address_reaches_a_root_listener_on_any_address() {
    let Some(topo) = Topology::create("host_address_reaches_a_root_listener_on_any_address") else {
        return;
    };
    // As the registry in a test would listen: in the test process, on all addresses.
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    let addr = SocketAddr::from((topo.host_addr(), listener.local_addr().unwrap().port()));

    let rt_a = topo.a.runtime();
    block_on_in(&rt_a, async move {
        let mut s = timeout(WAIT, tokio::net::TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("A reaches the host address");
        s.write_all(b"from-a").await.unwrap();
    });
    // The connection is in the backlog already; accept does not block.
    let (mut s, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), IpAddr::V4(topo.gateway_addr(Net::A)));
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    assert_eq!(buf, b"from-a");

    // And from B, with a std socket.
    let peer_b = topo.b.run(move || {
        TcpStream::connect_timeout(&addr, WAIT)
            .expect("B reaches the host address")
            .local_addr()
            .unwrap()
    });
    let (_, peer) = listener.accept().unwrap();
    assert_eq!(peer, peer_b);
    assert_eq!(peer.ip(), IpAddr::V4(topo.gateway_addr(Net::B)));
    drop(rt_a);
}

#[test]
fn runtime_and_run_execute_inside_the_namespace() {
    let Some(topo) = Topology::create("runtime_and_run_execute_inside_the_namespace") else {
        return;
    };
    let root = this_thread_ns();
    let a = ns_id(topo.a.path());
    assert_ne!(root, a);

    assert_eq!(topo.a.run(this_thread_ns), a);
    let rt = topo.a.runtime();
    let (task, blocking) = block_on_in(&rt, async {
        let blocking = tokio::task::spawn_blocking(this_thread_ns).await.unwrap();
        (this_thread_ns(), blocking)
    });
    assert_eq!(task, a, "a worker thread is outside the namespace");
    assert_eq!(
        blocking, a,
        "a blocking-pool thread is outside the namespace"
    );
    // `block_on` polls its own future on the calling thread, in the root namespace: why
    // `block_on_in` spawns.
    assert_eq!(rt.block_on(async { this_thread_ns() }), root);
    // Panics come back to the caller.
    let panicked = std::panic::catch_unwind(|| topo.b.run(|| panic!("inside B")));
    assert!(panicked.is_err());
    drop(rt);
}

#[test]
fn drop_kills_processes_and_removes_namespaces_and_links() {
    let Some(topo) = Topology::create("drop_kills_processes_and_removes_namespaces_and_links")
    else {
        return;
    };
    let index = topo.index;
    assert!(root_links().iter().any(|l| l == topo.host_link()));
    let kept = sleep_in_b(&topo);
    let dropped = sleep_in_b(&topo);
    let dropped_pid = dropped.pid();
    drop(dropped);
    // Reaped, so the PID is free or another process's.
    assert!(
        !is_sleep(dropped_pid),
        "dropping the guard left pid {dropped_pid} running"
    );
    // A process started without `spawn` is not tracked, but it is in B: killed too.
    let mut untracked = topo.b.command("sleep");
    untracked.arg("60").stdin(Stdio::null());
    let mut untracked = untracked.spawn().unwrap();
    wait_sleeping_in(untracked.id(), &topo.b, || {
        untracked.try_wait().unwrap().is_some()
    });

    drop(topo);
    assert_killed(&kept);
    assert_eq!(
        kept.signal(nix::sys::signal::Signal::SIGTERM),
        Err(nix::errno::Errno::ESRCH)
    );
    let deadline = Instant::now() + WAIT;
    while untracked.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "a process left in B survived the drop"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_gone(index);
}

#[test]
fn drop_during_a_panic_removes_everything() {
    let index = Mutex::new(None);
    let child = Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let Some(topo) = Topology::create("drop_during_a_panic_removes_everything") else {
            return;
        };
        *index.lock().unwrap() = Some(topo.index);
        topo.a.add_ip(WORKLOAD.into());
        *child.lock().unwrap() = Some(sleep_in_b(&topo));
        topo.b.set_resolv_conf("nameserver 10.10.0.53\n");
        if isthmus_tests::harness::dns::have("nft") {
            let vm = topo.add_vm(Net::A, "web", WORKLOAD);
            vm.set_resolv_conf("nameserver 10.10.0.53\n");
        }
        let _rt = topo.a.runtime();
        panic!("a test failing with its topology up (expected by this test)");
    });
    let Some(index) = index.into_inner().unwrap() else {
        return; // skipped
    };
    // The test's own panic, not one of the setup.
    let panic = result.expect_err("the closure panics");
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or_default();
    assert!(message.contains("expected by this test"), "{message}");
    assert_killed(child.lock().unwrap().as_ref().unwrap());
    assert_gone(index);
}

/// `net.ipv4.ip_forward` of the namespace the calling thread is in.
fn ip_forward() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .unwrap()
        .trim()
        .to_string()
}

/// Connects from a thread in `ns` to `addr`: the connection's local address, or the error.
fn connect_from(ns: &Netns, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    ns.run(move || {
        let s = TcpStream::connect_timeout(&addr, WAIT)?;
        s.local_addr()
    })
}

/// Accepts the connection just made (it waits in the backlog) and returns its peer.
fn accepted_peer(listener: &TcpListener) -> SocketAddr {
    listener.set_nonblocking(false).unwrap();
    listener.accept().expect("accept").1
}

#[test]
fn vms_reach_their_network_and_the_host_masqueraded_and_no_other_workload() {
    const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 7);
    const ONLY_IN_B: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 6);
    let name = "vms_reach_their_network_and_the_host_masqueraded_and_no_other_workload";
    let Some(topo) = Topology::create(name) else {
        return;
    };
    if !isthmus_tests::harness::dns::require("nft", "nftables") {
        return;
    }
    let index = topo.index;
    let root_forward = ip_forward();
    topo.a.add_ip(WORKLOAD.into());
    topo.b.add_ip(ONLY_IN_B.into());
    // The same address in both networks, as overlapping VM subnets have.
    let vm_a = topo.add_vm(Net::A, "web", VM_IP);
    let vm_b = topo.add_vm(Net::B, "reviews", VM_IP);
    let vm_a2_ip = Ipv4Addr::new(10, 10, 0, 8);
    let vm_a2 = topo.add_vm(Net::A, "web-2", vm_a2_ip);
    assert_eq!(vm_a.name(), format!("ist{index}a0"));
    assert_eq!(vm_b.name(), format!("ist{index}b0"));
    assert_eq!(vm_a2.name(), format!("ist{index}a1"));

    // Forwarding is on in the networks with VMs only, never in the root namespace.
    assert_eq!(ip_forward(), root_forward);
    assert_eq!(topo.a.run(ip_forward), "1");
    assert_eq!(topo.b.run(ip_forward), "1");
    assert_eq!(topo.wan.run(ip_forward), "0");
    assert_eq!(vm_a.run(ip_forward), "0");

    // The host address, from a listener of this process: the peer is the VM's network
    // (masqueraded), while the VM sees its own address.
    let host = TcpListener::bind((topo.host_addr(), 0)).unwrap();
    let host_addr = host.local_addr().unwrap();
    for (vm, net, ip) in [
        (&vm_a, Net::A, VM_IP),
        (&vm_b, Net::B, VM_IP),
        (&vm_a2, Net::A, vm_a2_ip),
    ] {
        let local = connect_from(vm, host_addr)
            .unwrap_or_else(|e| panic!("{} does not reach the host address: {e}", vm.name()));
        assert_eq!(local.ip(), IpAddr::V4(ip));
        let peer = accepted_peer(&host);
        assert_eq!(
            peer.ip(),
            IpAddr::V4(topo.gateway_addr(net)),
            "{} was not masqueraded to its network's wan address",
            vm.name()
        );
        assert_ne!(peer.ip(), local.ip());
    }

    // Its network's workload and gateway addresses: delivered in the network namespace,
    // no translation.
    let a = topo.a.clone();
    for ip in [WORKLOAD, topo.gateway_addr(Net::A)] {
        let listener = a.run(move || TcpListener::bind((ip, 0)).expect("bind in A"));
        let addr = listener.local_addr().unwrap();
        let local = connect_from(&vm_a, addr)
            .unwrap_or_else(|e| panic!("the VM does not reach {addr} in its network: {e}"));
        assert_eq!(accepted_peer(&listener), local);
        assert_eq!(local.ip(), IpAddr::V4(VM_IP));
    }

    // The other network's gateway: reached over the wan, masqueraded.
    let gw_b = topo.gateway_addr(Net::B);
    let listener = topo
        .b
        .run(move || TcpListener::bind((gw_b, 0)).expect("bind B's gateway address"));
    connect_from(&vm_a, listener.local_addr().unwrap()).expect("the VM reaches B's gateway");
    assert_eq!(
        accepted_peer(&listener).ip(),
        IpAddr::V4(topo.gateway_addr(Net::A))
    );

    // The other network's workloads: unreachable, at once.
    let listener = topo
        .b
        .run(move || TcpListener::bind((ONLY_IN_B, 0)).expect("bind in B"));
    let addr = listener.local_addr().unwrap();
    let started = Instant::now();
    let err = connect_from(&vm_a, addr).expect_err("a VM in A reached a workload of B");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::NetworkUnreachable | std::io::ErrorKind::HostUnreachable
        ),
        "{err}"
    );
    assert!(started.elapsed() < WAIT, "refused only by the timeout");
    // B itself does reach it, and so does its VM.
    assert!(topo
        .b
        .run(move || TcpStream::connect_timeout(&addr, WAIT))
        .is_ok());
    connect_from(&vm_b, addr).expect("B's VM reaches B's workload");

    // The network namespace reaches its VM, from its wan address (the gateway's, as a
    // gateway forwarding to a VM endpoint would).
    let listener = vm_a.run(|| TcpListener::bind((VM_IP, 0)).expect("bind in the VM"));
    let addr = listener.local_addr().unwrap();
    let local = connect_from(&topo.a, addr).expect("A reaches its VM");
    assert_eq!(local.ip(), IpAddr::V4(topo.gateway_addr(Net::A)));
    assert_eq!(accepted_peer(&listener), local);
    // Not from the wan or the other network (no route to VM addresses there).
    assert!(connect_from(&topo.wan, addr).is_err());

    // The masquerade rule lives in the harness's own table of the network namespace.
    let out = topo
        .a
        .command("nft")
        .args(["list", "table", "inet", "isthmus-harness"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("masquerade"));

    // resolv.conf per namespace, for the processes of `command`.
    let text = "nameserver 10.10.0.53\noptions ndots:1\n";
    vm_a.set_resolv_conf(text);
    topo.a.set_resolv_conf("nameserver 10.10.0.54\n");
    let out = vm_a
        .command("cat")
        .arg("/etc/resolv.conf")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), text);
    assert!(vm_a.etc_dir().join("resolv.conf").is_file());
    let mut child = vm_a.command("sleep");
    child.arg("60").stdin(Stdio::null());
    let child = topo.spawn(child).unwrap();
    wait_sleeping_in(child.pid(), &vm_a, || child.try_wait().is_some());

    drop(topo);
    assert_killed(&child);
    assert_gone(index);
    assert_eq!(ip_forward(), root_forward);
}
