//! A VM on network A calls a service on network B through B's east-west gateway, over the
//! agent's pooled tunnel to the gateway's tunnel port: QUIC first (it wins the race), then,
//! once UDP to the tunnel port is dropped on the way, HTTP/2, without a single failed call
//! (the silent QUIC tunnel is closed and the stream dialled again); and again after the
//! gateway, a real `isthmus-gateway` process in B's namespace, is SIGKILLed and started
//! again on the same addresses.
//!
//! As root this always runs (and in CI it must: it fails if namespaces cannot be made);
//! elsewhere it skips with a message.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use isthmus_tests::eventually;
use isthmus_tests::harness::agent::{web_vm_catalog, Vm};
use isthmus_tests::harness::mesh::{
    echo, gateway_credentials, host, network, on, read_line, Mesh, APP_PORT, SNI_PORT, SVC_PORT,
};
use isthmus_tests::harness::netns::{ChildGuard, Net};
use isthmus_tests::harness::process::workspace_binary;
use isthmus_tests::harness::registry::{http_get, metric_sum, CLUSTER, TRUST_DOMAIN};
use nix::sys::signal::Signal;
use tokio::net::TcpStream;

const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 7);
/// Bound of every wait for setup (a process to become ready, a name to resolve).
const WAIT: Duration = Duration::from_secs(60);
/// Calls of the QUIC phase, and again of the phase with UDP dropped.
const CALLS: u64 = 10;
/// Calls in a row after the gateway's restart, after the first one.
const AFTER_RESTART: u64 = 5;
/// How long the first call after the restarted gateway is ready may be retried.
const FIRST_CALL_RETRY: Duration = Duration::from_secs(5);
/// What the workload behind B's gateway greets with.
const GREETING: &str = "reviews-b1";
/// The tunnel port of B's gateway, TCP (HTTP/2) and UDP (QUIC).
const TUNNEL_PORT: u16 = 15008;
/// The nftables table in the VM that drops its UDP to the tunnel port.
const DROP_TABLE: &str = "inet quic-drop";

/// B's east-west gateway as a process of the real binary inside B's namespace, with the
/// addresses it keeps across restarts and a log appended across them.
struct GatewayB {
    gw: IpAddr,
    cert_dir: PathBuf,
    log: PathBuf,
    child: Option<ChildGuard>,
}

impl GatewayB {
    fn health(&self) -> SocketAddr {
        SocketAddr::new(self.gw, 15021)
    }

    fn metrics_addr(&self) -> SocketAddr {
        SocketAddr::new(self.gw, 15020)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Starts the gateway (again), on the same addresses each time.
    fn start(&mut self, m: &Mesh) {
        assert!(self.child.is_none(), "B's gateway is running already");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let addr = |port: u16| SocketAddr::new(self.gw, port).to_string();
        let mut cmd = m
            .topo
            .netns(Net::B)
            .command(workspace_binary("isthmus-gateway", "isthmus-gateway"));
        cmd.args(["--network", network(Net::B), "--cluster", CLUSTER])
            .args(["--registry", &m.registry_set])
            .arg("--root")
            .arg(m.reg.ca_root())
            .arg("--cert-dir")
            .arg(&self.cert_dir)
            .args(["--trust-domain", TRUST_DOMAIN])
            .args(["--sni-addr", &addr(SNI_PORT)])
            .args(["--tunnel-addr", &addr(TUNNEL_PORT)])
            .args(["--metrics-addr", &addr(15020)])
            .args(["--health-addr", &addr(15021)])
            .args(["--admin-addr", "127.0.0.1:15000"])
            .args(["--drain-deadline", "1s"])
            .env("LOG_FORMAT", "plain")
            .env("RUST_LOG", "info,isthmus_proxy=debug,isthmus_gateway=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(m.topo.spawn(cmd).expect("start B's gateway"));
    }

    /// Waits until `/healthz/ready` answers 200 (bounded); panics with the log if the
    /// process exits or never gets there.
    async fn wait_ready(&self, m: &Mesh) {
        let health = self.health();
        let child = self.child.as_ref().expect("B's gateway was started");
        let ready = eventually(WAIT, || async {
            if let Some(status) = child.try_wait() {
                panic!("B's gateway exited: {status}\n{}", self.log());
            }
            let got = on(m.rt(Net::B), async move {
                http_get(health, "/healthz/ready").await
            })
            .await;
            matches!(got, Ok((200, _))).then_some(())
        })
        .await;
        assert!(
            ready.is_some(),
            "B's gateway never became ready:\n{}",
            self.log()
        );
    }

    /// SIGKILL, by the process's own PID, and reaped.
    fn kill(&mut self) {
        let child = self.child.take().expect("B's gateway is running");
        child.signal(Signal::SIGKILL).expect("SIGKILL B's gateway");
        let status = child.wait_timeout(WAIT).expect("B's gateway died");
        assert!(!status.success(), "{status:?}");
    }

    /// The gateway's Prometheus text, from its metrics port on B's wan address.
    async fn metrics(&self, m: &Mesh) -> String {
        let addr = self.metrics_addr();
        on(
            m.rt(Net::B),
            async move { http_get(addr, "/metrics").await },
        )
        .await
        .map(|(_, body)| body)
        .unwrap_or_else(|e| panic!("metrics of B's gateway: {e}\n{}", self.log()))
    }
}

/// Prints the logs of both ends when the test fails.
struct LogsOnFailure {
    gateway: PathBuf,
    agent: PathBuf,
}

impl Drop for LogsOnFailure {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (what, path) in [("B's gateway", &self.gateway), ("the agent", &self.agent)] {
            eprintln!(
                "----- log of {what} ({}) -----\n{}",
                path.display(),
                std::fs::read_to_string(path).unwrap_or_default()
            );
        }
    }
}

/// The service address `vm` resolves the mesh name `reviews` to.
fn vip(vm: &Vm) -> IpAddr {
    let name = host("reviews");
    let deadline = Instant::now() + WAIT;
    loop {
        let (ok, out, _) = vm.sh(&format!("getent ahostsv4 {name}"));
        if let Some(ip) = out.split_whitespace().next().and_then(|s| s.parse().ok()) {
            if ok {
                return ip;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{name} never resolved in {}:\n{}",
            vm.name,
            vm.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One call from inside `vm`, as its app makes it: connect to reviews' service address,
/// read the greeting, echo a line.
async fn call(vm: &Vm, to: SocketAddr, line: String) -> anyhow::Result<()> {
    on(vm.rt(), async move {
        let mut s = TcpStream::connect(to).await?;
        let greeting = read_line(&mut s).await?;
        anyhow::ensure!(greeting == GREETING, "greeted by {greeting:?}");
        let back = echo(&mut s, &line).await?;
        anyhow::ensure!(back == line, "echoed {back:?}");
        Ok(())
    })
    .await
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The packets counted by the rule of `chain` in the VM's drop table: the datagrams it
/// dropped (`out`), or those the gateway's tunnel port sent the VM meanwhile (`in`).
fn counted(vm: &Vm, chain: &str) -> u64 {
    let (_, out, _) = vm.sh(&format!("nft list chain {DROP_TABLE} {chain}"));
    out.split_once("packets ")
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Waits until the agent's capture is final: the app's inbound port (which it learns from
/// its registration) captured, and `vip` among the captured service addresses.
async fn wait_capture_settled(vm: &Vm, vip: IpAddr) {
    let settled = eventually(WAIT, || async {
        let (_, inbound, _) = vm.sh("nft list chain inet isthmus prerouting");
        let (_, services, _) = vm.sh("nft list set inet isthmus mesh4");
        (inbound.contains(&APP_PORT.to_string()) && services.contains(&vip.to_string()))
            .then_some(())
    })
    .await;
    assert!(
        settled.is_some(),
        "the agent's capture never settled:\n{}\n{}",
        vm.nft_tables(),
        vm.log()
    );
}

/// Connections the agent opened through a gateway's tunnel over `transport`.
fn opened(text: &str, transport: &str) -> u64 {
    metric_sum(
        text,
        "isthmus_tcp_connections_opened_total",
        &[("transport", transport)],
    )
}

/// Tunnels set up (result `ok`) as `role` over `transport`, in the metrics of the program
/// whose prefix is `prefix`.
fn handshakes(text: &str, prefix: &str, role: &str, transport: &str) -> u64 {
    metric_sum(
        text,
        &format!("{prefix}_tunnel_handshakes_total"),
        &[("role", role), ("transport", transport), ("result", "ok")],
    )
}

const AGENT: &str = "isthmus_vm_agent";
const GATEWAY: &str = "isthmus_gateway";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_reaches_another_network_over_quic_then_http2_when_udp_is_dropped_and_after_its_gateway_restarts(
) {
    let Some(m) = Mesh::start("tunnel-networks", &web_vm_catalog(false)).await else {
        return;
    };
    let _gateway_a = m.gateway(Net::A).await;
    let _reviews = m
        .workload(Net::B, "10.10.0.5", GREETING, "reviews", Default::default())
        .await;
    let cert_dir = gateway_credentials(&m.reg, network(Net::B), m.dir.path()).await;
    let mut gateway_b = GatewayB {
        gw: m.topo.gateway_addr(Net::B).into(),
        cert_dir,
        log: m.dir.path().join("gateway-b.log"),
        child: None,
    };
    gateway_b.start(&m);
    gateway_b.wait_ready(&m).await;

    let vm = Vm::create(&m, Net::A, "web", VM_IP, "web", "web");
    let _logs = LogsOnFailure {
        gateway: gateway_b.log.clone(),
        agent: vm.log_path(),
    };
    // Default flags; the proxy core's debug lines say what the tunnel pool decided.
    let _agent = vm.start_agent(
        &m,
        &[],
        &[(
            "RUST_LOG",
            "info,isthmus_vm_agent=debug,isthmus_proxy=debug",
        )],
    );
    vm.wait_ready().await;
    let to = SocketAddr::new(vip(&vm), SVC_PORT);
    // Ready comes before the agent has registered; it learns the app's ports from its
    // registration and then installs its rules again, which empties the captured service
    // addresses until it puts them back. The calls here are about the tunnels: they begin
    // once capture is final.
    wait_capture_settled(&vm, to.ip()).await;

    // 1. QUIC. The first call waits for the agent's catalog to route reviews through B's
    // gateway; the rest follow one after another.
    let last_error = std::sync::Mutex::new(String::new());
    let first = eventually(WAIT, || async {
        call(&vm, to, "quic 0".into())
            .await
            .map_err(|e| *last_error.lock().unwrap() = format!("{e:#}"))
            .ok()
    })
    .await;
    assert!(
        first.is_some(),
        "web never reached reviews in B: {}",
        last_error.lock().unwrap()
    );
    for i in 1..CALLS {
        call(&vm, to, format!("quic {i}"))
            .await
            .unwrap_or_else(|e| panic!("call {i} over QUIC: {e:#}"));
    }
    let agent = vm.metrics().await;
    assert_eq!(
        opened(&agent, "quic-gateway"),
        CALLS,
        "every call over the QUIC tunnel to B's gateway:\n{agent}"
    );
    assert_eq!(opened(&agent, "hbone-gateway"), 0, "{agent}");
    assert_eq!(
        handshakes(&agent, AGENT, "client", "quic"),
        1,
        "one QUIC tunnel for every call:\n{agent}"
    );
    assert_eq!(
        metric_sum(
            &agent,
            "isthmus_vm_agent_tunnel_races_total",
            &[("winner", "quic")]
        ),
        1,
        "QUIC won the race:\n{agent}"
    );
    let gateway = gateway_b.metrics(&m).await;
    assert_eq!(
        handshakes(&gateway, GATEWAY, "server", "quic"),
        1,
        "B's gateway accepted the QUIC tunnel:\n{gateway}"
    );

    // 2. UDP to the tunnel port dropped on the VM's way out. Not a restart of the agent:
    // the open QUIC tunnel must be found dead by the calls themselves, and none may fail.
    let (ok, _, err) = vm.sh(&format!(
        "nft add table {DROP_TABLE} && \
         nft 'add chain {DROP_TABLE} out {{ type filter hook output priority 0; policy accept; }}' && \
         nft add rule {DROP_TABLE} out udp dport {TUNNEL_PORT} counter drop && \
         nft 'add chain {DROP_TABLE} in {{ type filter hook input priority 0; policy accept; }}' && \
         nft add rule {DROP_TABLE} in udp sport {TUNNEL_PORT} counter accept"
    ));
    assert!(ok, "adding the drop rule: {err}");
    let mut first_after_drop = None;
    for i in 0..CALLS {
        let heard = counted(&vm, "in");
        let started = Instant::now();
        let result = call(&vm, to, format!("dropped {i}")).await;
        let took = started.elapsed();
        if let Err(e) = result {
            panic!(
                "call {i} with UDP dropped failed after {took:?}: {e:#}\n\
                 datagrams from the gateway's tunnel port during the call: {}; dropped on the \
                 way out since the rule: {}\nagent log (tail):\n{}",
                counted(&vm, "in") - heard,
                counted(&vm, "out"),
                tail(&vm.log(), 60)
            );
        }
        first_after_drop.get_or_insert(took);
    }
    let first_after_drop = first_after_drop.unwrap();
    println!("with UDP dropped, the first call took {first_after_drop:?}");
    assert!(
        counted(&vm, "out") > 0,
        "the rule dropped the QUIC tunnel's packets: {}",
        vm.sh(&format!("nft list table {DROP_TABLE}")).1
    );
    let agent = vm.metrics().await;
    assert_eq!(
        opened(&agent, "hbone-gateway"),
        CALLS,
        "every call with UDP dropped over HTTP/2:\n{agent}"
    );
    assert_eq!(opened(&agent, "quic-gateway"), CALLS, "{agent}");
    assert_eq!(
        handshakes(&agent, AGENT, "client", "hbone"),
        1,
        "one HTTP/2 tunnel for every call:\n{agent}"
    );
    let quic_closed = eventually(WAIT, || async {
        let text = vm.metrics().await;
        (metric_sum(
            &text,
            "isthmus_vm_agent_tunnels_open",
            &[("role", "client"), ("transport", "quic")],
        ) == 0)
            .then_some(text)
    })
    .await;
    assert!(
        quic_closed.is_some(),
        "the silent QUIC tunnel was never closed:\n{}",
        vm.metrics().await
    );
    let (ok, _, err) = vm.sh(&format!("nft delete table {DROP_TABLE}"));
    assert!(ok, "removing the drop rule: {err}");

    // 3. B's gateway SIGKILLed and started again on the same addresses.
    let tunnels_before = handshakes(&agent, AGENT, "client", "hbone");
    let hbone_before = opened(&agent, "hbone-gateway");
    gateway_b.kill();
    gateway_b.start(&m);
    gateway_b.wait_ready(&m).await;
    let ready = Instant::now();
    let mut errors = Vec::new();
    loop {
        match call(&vm, to, "restarted 0".into()).await {
            Ok(()) => break,
            Err(e) => errors.push(format!("after {:?}: {e:#}", ready.elapsed())),
        }
        assert!(
            ready.elapsed() < FIRST_CALL_RETRY,
            "no call succeeded within {FIRST_CALL_RETRY:?} of B's gateway being ready again:\n{}",
            errors.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "after B's gateway restarted, the first call succeeded {:?} after it was ready ({} failed before: {errors:?})",
        ready.elapsed(),
        errors.len()
    );
    for i in 1..=AFTER_RESTART {
        call(&vm, to, format!("restarted {i}"))
            .await
            .unwrap_or_else(|e| panic!("call {i} after the restart: {e:#}"));
    }
    let agent = vm.metrics().await;
    assert!(
        handshakes(&agent, AGENT, "client", "hbone") > tunnels_before,
        "a new tunnel to the restarted gateway:\n{agent}"
    );
    assert!(
        opened(&agent, "hbone-gateway") > hbone_before + AFTER_RESTART,
        "{agent}"
    );
    let gateway = gateway_b.metrics(&m).await;
    assert!(
        handshakes(&gateway, GATEWAY, "server", "hbone") >= 1,
        "the restarted gateway accepted the agent's tunnel:\n{gateway}"
    );
}
