//! Registry benchmark: fan-out latency of one endpoint change to N subscribers, time for a
//! new subscriber to receive a full snapshot of a large catalog, memory at that size, and
//! CA certificates issued per second.
//!
//! Run: `cargo run --release -p isthmus-tests --bin registry-fanout-bench -- [--subscribers 100,1000]
//! [--services 10000] [--endpoints-per-service 10] [--cert-seconds 5]`
//!
//! The registry runs in this process on loopback, next to its subscribers: on a 2-core
//! machine the clients compete with the registry for CPU, so the figures are conservative.

use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_proto::certs;
use isthmus_proto::model::{NodeKind, ViewResource};
use isthmus_proto::subscription::Subscription;
use isthmus_tests::bench::{
    check_nofile, fan_out, percentile, rss_of, until_stopped, Args, Flag, RemoteRegistry,
};
use isthmus_tests::harness::process::ServerProcess;
use isthmus_tests::{node, TestRegistry, NETWORK};

const ABOUT: &str = "Registry benchmark: fan-out latency of one endpoint change to N \
    subscribers, time for a new subscriber to receive a full snapshot of a large catalog, memory \
    at that size, and CA certificates issued per second.";

const FLAGS: &[Flag] = &[
    Flag::value(
        "--subscribers",
        "100,1000",
        "subscribers of each fan-out phase, joined by commas",
    ),
    Flag::value("--rounds", "10", "endpoint changes per fan-out phase"),
    Flag::value(
        "--services",
        "10000",
        "services in the snapshot phase's catalog",
    ),
    Flag::value(
        "--endpoints-per-service",
        "10",
        "endpoints of each of those services",
    ),
    Flag::value(
        "--cert-seconds",
        "5",
        "seconds of certificate requests in the CA phase",
    ),
    Flag::value(
        "--phase",
        "",
        "runs one phase in this process: fanout:<subscribers>, snapshot or ca",
    )
    .internal(),
];

/// The flags' values, all read before the first phase starts, so that a bad one stops the
/// run at once rather than after the phases before the one that reads it.
struct Opts {
    subscribers: Vec<usize>,
    rounds: usize,
    services: usize,
    per_service: usize,
    cert_seconds: u64,
}

impl Opts {
    fn read(args: &Args) -> anyhow::Result<Self> {
        Ok(Self {
            subscribers: args.get_list("--subscribers")?,
            rounds: args.get("--rounds")?,
            services: args.get("--services")?,
            per_service: args.get("--endpoints-per-service")?,
            cert_seconds: args.get("--cert-seconds")?,
        })
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::from_env(ABOUT, FLAGS)?;
    let opts = Opts::read(&args)?;
    // Each phase runs in a process of its own, so that memory figures are not inflated by
    // what an earlier phase left in the allocator.
    if let Some(phase) = args.given("--phase") {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        return rt.block_on(until_stopped(run_phase(phase, &opts)));
    }
    check_nofile();
    println!(
        "# registry benchmark ({} cores; registry and clients share them)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let exe = std::env::current_exe()?;
    let mut phases: Vec<String> = opts
        .subscribers
        .iter()
        .map(|n| format!("fanout:{n}"))
        .collect();
    phases.push("snapshot".into());
    phases.push("ca".into());
    for phase in phases {
        let status = std::process::Command::new(&exe)
            .args(args.line())
            .args(["--phase", &phase])
            .status()?;
        anyhow::ensure!(status.success(), "phase {phase} failed: {status}");
    }
    Ok(())
}

async fn run_phase(phase: &str, opts: &Opts) -> anyhow::Result<()> {
    let rounds = opts.rounds;
    if let Some(n) = phase.strip_prefix("fanout:") {
        let n: usize = n.parse()?;
        let reg = TestRegistry::start(&[]).await?;
        let lat = fan_out(&[&reg], n, rounds).await;
        println!(
            "fan-out: {n} subscribers x {rounds} changes: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            percentile(&lat, 0.5).as_secs_f64() * 1e3,
            percentile(&lat, 0.99).as_secs_f64() * 1e3,
            lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3
        );
        return Ok(());
    }
    match phase {
        "snapshot" => snapshot(opts).await,
        "ca" => ca(opts).await,
        other => anyhow::bail!("unknown phase {other}"),
    }
}

/// A large catalog served by the real `isthmus-registry` binary from resource files, so
/// its memory is measured on its own: the registry process, not this driver.
async fn snapshot(opts: &Opts) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let (services, per_service) = (opts.services, opts.per_service);
    let registry_bin = std::env::current_exe()?.with_file_name("isthmus-registry");
    anyhow::ensure!(
        registry_bin.exists(),
        "{} not found: run `cargo build --release -p isthmus-registry` first",
        registry_bin.display()
    );

    let dir = tempfile::tempdir()?;
    let mut cfg = TestRegistry::config(dir.path());
    let files = 100;
    for f in 0..files {
        let mut text = String::new();
        for i in (f..services).step_by(files) {
            let _ = write!(
                text,
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: svc-{i}\n  namespace: bench\nspec:\n  hosts: [svc-{i}.bench.svc.cluster.local]\n  ports:\n  - {{number: 8080, name: http, protocol: HTTP}}\n  resolution: STATIC\n  workloadSelector:\n    labels: {{app: svc-{i}}}\n---\n"
            );
            for j in 0..per_service {
                let net = if j % 2 == 1 && i % 2 == 0 {
                    "network-b"
                } else {
                    NETWORK
                };
                let _ = write!(
                    text,
                    "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: svc-{i}-{j}\n  namespace: bench\nspec:\n  address: 10.{}.{}.{}\n  network: {net}\n  labels: {{app: svc-{i}}}\n  serviceAccount: svc-{i}\n---\n",
                    i / 250 % 250,
                    i % 250,
                    j + 1
                );
            }
        }
        std::fs::write(
            dir.path()
                .join("resources")
                .join(format!("bench-{f:03}.yaml")),
            text,
        )?;
    }
    std::fs::write(
        dir.path().join("resources").join("networks.yaml"),
        isthmus_tests::yaml::network("network-b", &["198.51.100.10", "198.51.100.11"]),
    )?;
    let grpc = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let admin = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    cfg.grpc_addr = grpc;
    cfg.admin_addr = admin;
    let t = Instant::now();
    let child = ServerProcess::new(
        std::process::Command::new(&registry_bin)
            .args(["--cluster", isthmus_tests::CLUSTER, "--network", NETWORK])
            .arg("--ca-dir")
            .arg(&cfg.ca_dir)
            .arg("--data-dir")
            .arg(&cfg.data_dir)
            .arg("--resources")
            .arg(dir.path().join("resources"))
            .args([
                "--grpc-addr",
                &grpc.to_string(),
                "--admin-addr",
                &admin.to_string(),
            ])
            .env("RUST_LOG", "warn")
            .env("MALLOC_ARENA_MAX", "1")
            .spawn()?,
    );
    let pid = child.id();
    let want = (services * (per_service + 1) + 1) as f64;
    loop {
        if let Ok((_, m)) = isthmus_tests::http_get(admin, "/metrics").await {
            if isthmus_tests::metric(&m, "isthmus_registry_catalog_resources") == Some(want) {
                break;
            }
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(300),
            "the registry did not load the catalog within 300 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "catalog: {services} services / {} endpoints in {files} files parsed, stored and indexed by isthmus-registry in {:.2} s",
        services * per_service,
        t.elapsed().as_secs_f64()
    );
    let idle = rss_of(pid);

    // A client of the registry in this process, as a workload would be.
    let reg = RemoteRegistry {
        dir: dir.path().to_path_buf(),
        grpc,
    };
    let creds = reg.credentials().await?;
    let t = Instant::now();
    let mut sub = Subscription::open(
        reg.channel(Some(&creds)).await?,
        &node("snap", NodeKind::Workload, NETWORK),
        None,
    )
    .await?;
    let u = sub.next().await?;
    let snap = t.elapsed();
    let eps: usize = sub
        .view
        .resources
        .values()
        .map(|r| {
            if let ViewResource::Service(s) = r {
                s.endpoints.len()
            } else {
                0
            }
        })
        .sum();
    println!(
        "snapshot: a new subscriber received {} services / {eps} view endpoints ({} parts) in {:.0} ms (its network's view built on first use)",
        sub.view.resources.len(),
        u.parts,
        snap.as_secs_f64() * 1e3
    );
    let t = Instant::now();
    let mut sub2 = Subscription::open(
        reg.channel(Some(&creds)).await?,
        &node("snap2", NodeKind::Workload, NETWORK),
        None,
    )
    .await?;
    sub2.next().await?;
    println!(
        "snapshot: a second subscriber of the same view received it in {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    println!("memory: isthmus-registry RSS {:.0} MB with the catalog loaded, {:.0} MB with one network view built and two subscribers", idle, rss_of(pid));
    drop(child);
    Ok(())
}

async fn ca(opts: &Opts) -> anyhow::Result<()> {
    let cert_seconds = opts.cert_seconds;
    // Renewals over mTLS from 8 concurrent clients.
    let reg = Arc::new(TestRegistry::start(&[]).await?);
    let creds = reg.credentials("bench", "client").await?;
    let id = creds.identity.clone();
    let deadline = Instant::now() + Duration::from_secs(cert_seconds);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let channel = reg.channel(Some(&creds)).await?;
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let (_, csr) = certs::generate_key_and_csr(&id).unwrap();
                certs::request_certificate(channel.clone(), csr, None, 0)
                    .await
                    .unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    println!("ca: {:.0} certificates/s over gRPC (8 concurrent clients; key and CSR generated client-side in the same process)", total as f64 / cert_seconds as f64);
    Ok(())
}
