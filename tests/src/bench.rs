//! What the benchmark drivers (`src/bin/*-bench.rs`) share: their flags, the machine they
//! describe, the kernel's clock tick, medians and percentiles, a process's memory, and the
//! registry benchmarks' Watch fan-out machinery (subscribers that each wait for a series of
//! changes, and a registry in another process to subscribe to).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use isthmus_proto::certs;
use isthmus_proto::identity::SpiffeId;
use isthmus_proto::model::{
    Address, NodeKind, OwnedResource, Resource, Service, ServicePort, ServiceView, ViewResource,
    Workload,
};
use isthmus_proto::subscription::Subscription;
use tokio::sync::{mpsc, Barrier};

use crate::{node, TestRegistry, NETWORK};

/// Clock ticks per second, the unit of `/proc/<pid>/stat` and `/proc/stat` (asked once).
pub fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// The median (the mean of the middle two for an even count; 0 for none).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The CPU's model name, for the report's header.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Whether this runs under a hypervisor (its CPU flags say so).
pub fn virtualized() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|t| {
            t.lines()
                .any(|l| l.starts_with("flags") && l.contains(" hypervisor"))
        })
        .unwrap_or(false)
}

/// The release program `name` built beside this benchmark driver (`package` is what
/// builds it); an error saying how to build it when it is missing.
pub fn sibling_binary(name: &str, package: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: build it with cargo build --release -p {package}",
        path.display()
    );
    Ok(path)
}

/// Runs a benchmark's work until it ends or the operator stops it (Ctrl-C, SIGTERM, a
/// `timeout`): then the work is dropped where it stands, so that what it set up (network
/// namespaces, the programs it started, temporary directories) is torn down as at the end
/// of a run, and the benchmark ends with an error that says it was stopped. Without this
/// the signal ended the process at once and all of that stayed behind.
pub async fn until_stopped<T>(
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::select! {
        r = work => r,
        () = isthmus_proto::drain::os_signal() => {
            anyhow::bail!("stopped by a signal; what the run had set up was torn down")
        }
    }
}

/// The value after `name` on the command line, or `default` (benchmark drivers' flags).
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

/// The `p` quantile (0..=1) of sorted durations, nearest rank (0 for none).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

/// A process's resident memory (`VmRSS`), MB; 0 when it cannot be read.
pub fn rss_of(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// A process's CPU time so far (user + system), from `/proc/<pid>/stat`.
pub fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name (which may hold spaces and parentheses) comes field 3, the
    // state; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    let ticks: u64 = fields.iter().sum();
    Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64)
}

/// Subscribers waiting for a series of changes, one task each: round `r` is reached by a
/// subscriber when `reached(subscription, r)` holds on its view; each then reports
/// `(r, when)` once. The tasks start together when the caller passes the returned barrier
/// (so none misses the first change); [`round_latencies`] collects one round.
pub fn await_rounds<F>(
    subs: Vec<Subscription>,
    rounds: usize,
    reached: F,
) -> (Arc<Barrier>, mpsc::UnboundedReceiver<(usize, Instant)>)
where
    F: Fn(&Subscription, usize) -> bool + Clone + Send + 'static,
{
    let barrier = Arc::new(Barrier::new(subs.len() + 1));
    let (tx, rx) = mpsc::unbounded_channel::<(usize, Instant)>();
    for mut s in subs {
        let tx = tx.clone();
        let barrier = barrier.clone();
        let reached = reached.clone();
        tokio::spawn(async move {
            barrier.wait().await;
            for round in 0..rounds {
                while !reached(&s, round) {
                    if s.next().await.is_err() {
                        return;
                    }
                }
                let _ = tx.send((round, Instant::now()));
            }
        });
    }
    (barrier, rx)
}

/// How long each of `subscribers` took, from `start`, to report `round` (each within 60 s).
pub async fn round_latencies(
    rx: &mut mpsc::UnboundedReceiver<(usize, Instant)>,
    subscribers: usize,
    round: usize,
    start: Instant,
) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        let (r, at) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("fan-out within 60s")
            .expect("subscriber alive");
        assert_eq!(r, round);
        latencies.push(at - start);
    }
    latencies
}

/// Credentials and channels for a registry in another process, from its CA directory
/// (as [`crate::TestRegistry::config`] lays it out) and its gRPC address.
pub struct RemoteRegistry {
    pub dir: std::path::PathBuf,
    pub grpc: std::net::SocketAddr,
}

impl RemoteRegistry {
    fn bundle(&self) -> isthmus_proto::tls::TrustBundle {
        isthmus_proto::tls::TrustBundle::from_pem_file(
            &self.dir.join("ca").join("root-cert.pem"),
            crate::TRUST_DOMAIN,
        )
        .expect("bundle")
    }

    pub async fn channel(
        &self,
        creds: Option<&isthmus_proto::tls::Credentials>,
    ) -> anyhow::Result<tonic::transport::Channel> {
        use isthmus_proto::tls;
        let cfg = tls::client_config(
            creds,
            &self.bundle(),
            tls::ServerIdentity::TrustDomain,
            &[tls::ALPN_H2],
        )?;
        Ok(isthmus_proto::grpc::connect(&self.grpc.to_string(), Arc::new(cfg)).await?)
    }

    pub async fn credentials(&self) -> anyhow::Result<isthmus_proto::tls::Credentials> {
        let material = isthmus_registry::ca::CaMaterial::load(
            &self.dir.join("ca").join(crate::CLUSTER),
            None,
        )?;
        let token = isthmus_registry::ca::token::create(
            &material,
            crate::CLUSTER,
            "bench",
            "client",
            Duration::from_secs(600),
            ::time::OffsetDateTime::now_utc(),
        )?;
        let id = SpiffeId::parse("spiffe://cluster.local/ns/bench/sa/client")?;
        let (key, csr) = certs::generate_key_and_csr(&id)?;
        let issued =
            certs::request_certificate(self.channel(None).await?, csr, Some(token), 0).await?;
        Ok(isthmus_proto::tls::Credentials::from_pem(
            &issued.chain_pems.concat(),
            &key,
        )?)
    }
}

/// The origin of what the benchmarks ingest.
pub const ORIGIN: &str = "bench:";

/// Service `svc-<i>.bench.svc.cluster.local`, port 8080.
pub fn service(i: usize) -> OwnedResource {
    OwnedResource {
        origin: ORIGIN.into(),
        resource: std::sync::Arc::new(Resource::Service(Service {
            hostname: format!("svc-{i}.bench.svc.cluster.local"),
            namespace: "bench".into(),
            name: format!("svc-{i}"),
            cluster: "cluster-a".into(),
            ports: vec![ServicePort {
                name: "http".into(),
                number: 8080,
                protocol: "HTTP".into(),
                target_port: 0,
            }],
            selector: [("app".to_string(), format!("svc-{i}"))].into(),
            ..Default::default()
        })),
    }
}

/// Endpoint `j` of service `svc` on `network`.
pub fn workload(svc: usize, j: usize, network: &str) -> OwnedResource {
    OwnedResource {
        origin: ORIGIN.into(),
        resource: std::sync::Arc::new(Resource::Workload(Workload {
            uid: format!("cluster-a/bench/svc-{svc}-{j}"),
            name: format!("svc-{svc}-{j}"),
            namespace: "bench".into(),
            address: Address::Ip(std::net::IpAddr::from([
                10,
                (svc / 250 % 250) as u8,
                (svc % 250) as u8,
                (j + 1) as u8,
            ])),
            network: network.into(),
            cluster: "cluster-a".into(),
            identity: Some(
                SpiffeId::parse(&format!("spiffe://cluster.local/ns/bench/sa/svc-{svc}")).unwrap(),
            ),
            labels: [("app".to_string(), format!("svc-{svc}"))].into(),
            ports: BTreeMap::new(),
            weight: 1,
            ..Default::default()
        })),
    }
}

/// How many endpoints `hostname` has in the subscriber's view.
pub fn endpoints_of(sub: &Subscription, hostname: &str) -> usize {
    match sub.view.resources.get(&format!("svc/{hostname}")) {
        Some(ViewResource::Service(sv)) => {
            let sv: &ServiceView = sv;
            sv.endpoints.len()
        }
        _ => 0,
    }
}

/// Fan-out latency of one endpoint change (`rounds` of them) to `subscribers` Watch
/// subscribers spread over `regs` in turn (one registry, or a set sharing one store), the
/// change made through the first: sorted, one per subscriber and round.
pub async fn fan_out(regs: &[&TestRegistry], subscribers: usize, rounds: usize) -> Vec<Duration> {
    let creds = regs[0].credentials("bench", "client").await.unwrap();
    let ingest = regs[0].handle().ingest.clone();
    let base: Vec<OwnedResource> = std::iter::once(service(0))
        .chain((0..3).map(|j| workload(0, j, NETWORK)))
        .collect();
    ingest.replace_origin(ORIGIN, base.clone()).await.unwrap();
    let hostname = "svc-0.bench.svc.cluster.local".to_string();

    let mut subs = Vec::new();
    for i in 0..subscribers {
        let mut s = regs[i % regs.len()]
            .subscribe(
                &creds,
                &node(&format!("bench-{i}"), NodeKind::Workload, NETWORK),
            )
            .await
            .unwrap();
        s.next().await.unwrap();
        subs.push(s);
    }
    let (barrier, mut rx) = await_rounds(subs, rounds, move |s, round| {
        let want = if round % 2 == 0 { 4 } else { 3 };
        endpoints_of(s, &hostname) == want
    });
    barrier.wait().await;
    let mut latencies = Vec::new();
    for round in 0..rounds {
        let mut set = base.clone();
        if round % 2 == 0 {
            set.push(workload(0, 3, NETWORK));
        }
        let start = Instant::now();
        ingest.replace_origin(ORIGIN, set).await.unwrap();
        latencies.extend(round_latencies(&mut rx, subscribers, round, start).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    latencies.sort();
    latencies
}

/// 1,000 subscribers need 2,000 descriptors in one process (both ends of each connection).
pub fn check_nofile() {
    #[cfg(target_os = "linux")]
    {
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
            if let Some(line) = limits.lines().find(|l| l.starts_with("Max open files")) {
                let soft: u64 = line
                    .split_whitespace()
                    .nth(3)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if soft < 4096 {
                    eprintln!("note: the open-file limit is {soft}; 1,000 subscribers need about 2,100 (ulimit -n)");
                }
            }
        }
    }
}
