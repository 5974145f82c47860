//! Registry set benchmark (`--store etcd`): three registries on a three-member etcd (Debian's
//! `etcd-server`, started here on loopback) beside one registry on its embedded store.
//!
//! - fan-out: one endpoint change, made through one registry, reaching subscribers spread
//!   over the three (p50/p99), beside the same subscribers on the single registry;
//! - failover: followers of one registry of the set (Watch clients given the whole set; that
//!   registry the release binary in a process of its own) when it is killed: the time until each follows another and is connected again (p50/p99/max),
//!   and how many full snapshots were sent again (nothing changed, so the goal is none);
//! - store costs: certificates issued against bootstrap tokens (each spends its token in the
//!   store) and VM registrations (each writes the catalog) per second, on etcd and embedded.
//!
//! Run: `cargo run --release -p isthmus-tests --bin registry-ha-bench -- [--subscribers 1000]
//! [--rounds 10] [--followers 100] [--seconds 5] [--registrations 300]`
//!
//! Everything runs on this machine: on 2 cores the etcd members, the registries and their
//! clients share them, so the figures are conservative.

use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_proto::certs;
use isthmus_proto::drain;
use isthmus_proto::identity::SpiffeId;
use isthmus_proto::model::NodeKind;
use isthmus_proto::subscription::{WatchClient, WatchOptions};
use isthmus_proto::tls::{self, ServerIdentity};
use isthmus_registry::app::{RegistryConfig, StoreSettings};
use isthmus_registry::store::EtcdConfig;
use isthmus_tests::bench::{check_nofile, fan_out, percentile, until_stopped, Args, Flag};
use isthmus_tests::harness::etcd::EtcdCluster;
use isthmus_tests::harness::process::ServerProcess;
use isthmus_tests::harness::vm::hello;
use isthmus_tests::{node, yaml, TestRegistry, NETWORK};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Three registries of one set on `etcd`, the first reading `resources`.
async fn set_on(
    etcd: &EtcdCluster,
    resources: &[(&str, &str)],
) -> anyhow::Result<Vec<TestRegistry>> {
    let store = StoreSettings::Etcd(EtcdConfig::new(etcd.endpoints()));
    let on_etcd = |cfg: &mut RegistryConfig| cfg.store = store.clone();
    let first = TestRegistry::start_with(resources, on_etcd).await?;
    let mut set = Vec::new();
    for _ in 0..2 {
        set.push(
            TestRegistry::start_peer_of(&first, |cfg| {
                on_etcd(cfg);
                cfg.resources = None;
            })
            .await?,
        );
    }
    set.insert(0, first);
    Ok(set)
}

const ABOUT: &str = "Registry set benchmark: three registries on a three-member etcd beside \
    one registry on its embedded store: fan-out, failover when a registry of the set is \
    killed, and the store's write costs.";

const FLAGS: &[Flag] = &[
    Flag::value("--subscribers", "1000", "Watch subscribers of the fan-out"),
    Flag::value("--rounds", "10", "endpoint changes of the fan-out"),
    Flag::value(
        "--followers",
        "100",
        "Watch clients following the registry that is killed",
    ),
    Flag::value(
        "--seconds",
        "5",
        "seconds of certificate requests per store",
    ),
    Flag::value("--registrations", "300", "VM registrations per store"),
];

/// The flags' values, all read before anything starts, so that a bad one stops the run at
/// once rather than in the part that uses it.
struct Opts {
    subscribers: usize,
    rounds: usize,
    followers: usize,
    seconds: u64,
    registrations: usize,
}

impl Opts {
    fn read(args: &Args) -> anyhow::Result<Self> {
        Ok(Self {
            subscribers: args.get("--subscribers")?,
            rounds: args.get("--rounds")?,
            followers: args.get("--followers")?,
            seconds: args.get("--seconds")?,
            registrations: args.get("--registrations")?,
        })
    }
}

fn main() -> anyhow::Result<()> {
    let opts = Opts::read(&Args::from_env(ABOUT, FLAGS)?)?;
    if std::env::var_os("RUST_LOG").is_some() {
        isthmus_proto::telemetry::init();
    }
    check_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(until_stopped(run(&opts)))
}

async fn run(opts: &Opts) -> anyhow::Result<()> {
    println!(
        "# registry set benchmark ({} cores; etcd, registries and clients share them)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let Some(etcd) = EtcdCluster::start("registry-ha-bench", 3).await else {
        anyhow::bail!("etcd is not installed: apt-get install etcd-server");
    };
    fanout(&etcd, opts).await?;
    failover(&etcd, opts).await?;
    costs(&etcd, opts).await?;
    Ok(())
}

async fn fanout(etcd: &EtcdCluster, opts: &Opts) -> anyhow::Result<()> {
    let (n, rounds) = (opts.subscribers, opts.rounds);
    let single = {
        let reg = TestRegistry::start(&[]).await?;
        let lat = fan_out(&[&reg], n, rounds).await;
        drop(reg);
        lat
    };
    let set = set_on(etcd, &[]).await?;
    let refs: Vec<&TestRegistry> = set.iter().collect();
    let spread = fan_out(&refs, n, rounds).await;
    drop(set);
    println!("fan-out of one change to {n} subscribers, {rounds} changes:");
    for (what, lat) in [
        ("one registry, embedded store", &single),
        (
            "three registries on etcd (subscribers spread, change made through one)",
            &spread,
        ),
    ] {
        println!(
            "  {what}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            ms(percentile(lat, 0.5)),
            ms(percentile(lat, 0.99)),
            ms(lat.last().copied().unwrap_or_default())
        );
    }
    println!(
        "  ratio set/single: p50 x{:.2}, p99 x{:.2}",
        ms(percentile(&spread, 0.5)) / ms(percentile(&single, 0.5)),
        ms(percentile(&spread, 0.99)) / ms(percentile(&single, 0.99))
    );
    Ok(())
}

async fn failover(etcd: &EtcdCluster, opts: &Opts) -> anyhow::Result<()> {
    let followers = opts.followers;
    let set = set_on(
        etcd,
        &[("svc.yaml", &yaml::service("reviews", "bench", 9080))],
    )
    .await?;
    // The registry that dies is the release binary in a process of its own, first in the
    // set: its death is a SIGKILL, as a crash or a lost node would be.
    let registry_bin = std::env::current_exe()?.with_file_name("isthmus-registry");
    anyhow::ensure!(
        registry_bin.exists(),
        "{} not found: run `cargo build --release -p isthmus-registry` first",
        registry_bin.display()
    );
    let grpc = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let admin = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut doomed = ServerProcess::new(
        std::process::Command::new(&registry_bin)
            .args(["--cluster", isthmus_tests::CLUSTER, "--network", NETWORK])
            .arg("--ca-dir")
            .arg(set[0].ca_dir())
            .args([
                "--store",
                "etcd",
                "--etcd-endpoints",
                &etcd.endpoints().join(","),
            ])
            .args([
                "--grpc-addr",
                &grpc.to_string(),
                "--admin-addr",
                &admin.to_string(),
            ])
            .env("RUST_LOG", "warn")
            .spawn()?,
    );
    let ready = Instant::now();
    while !matches!(
        isthmus_tests::http_get(admin, "/readyz").await,
        Ok((200, _))
    ) {
        anyhow::ensure!(
            ready.elapsed() < Duration::from_secs(60),
            "the registry process never became ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let addrs = std::iter::once(grpc.to_string())
        .chain(set.iter().map(|r| r.grpc_addr().to_string()))
        .collect::<Vec<_>>()
        .join(",");
    let creds = set[0].credentials("bench", "client").await?;
    let cfg = Arc::new(tls::client_config(
        Some(&creds),
        &set[0].bundle(),
        ServerIdentity::TrustDomain,
        &[tls::ALPN_H2],
    )?);
    let (_stop, shutdown) = drain::channel();
    let mut states = Vec::new();
    for i in 0..followers {
        let (cfg, set) = (cfg.clone(), addrs.clone());
        let client = WatchClient::new(
            move || {
                let (cfg, set) = (cfg.clone(), set.clone());
                async move { isthmus_proto::grpc::connect(&set, cfg).await }
            },
            node(&format!("follower-{i}"), NodeKind::Workload, NETWORK),
            None,
            WatchOptions {
                backoff_min: Duration::from_millis(50),
                backoff_max: Duration::from_secs(1),
            },
        )
        .following(&addrs);
        let mut state = client.state();
        tokio::spawn(client.run(shutdown.clone()));
        // One at a time, as followers that started over time would: a burst of handshakes
        // from one address meets the registry's per-source limit and spills to the next.
        tokio::time::timeout(Duration::from_secs(30), state.wait_for(|s| s.connected)).await??;
        states.push(state);
    }
    // Connected, each to a registry of the set: most to the first, the one that dies (a
    // connect it turned away, its handshake slots full, went to the next).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let connected = states
            .iter()
            .filter(|s| s.borrow().connected && s.borrow().registry.is_some())
            .count();
        if connected == states.len() {
            break;
        }
        if Instant::now() > deadline {
            let errors: std::collections::BTreeSet<String> = states
                .iter()
                .filter_map(|s| s.borrow().last_error.clone())
                .collect();
            anyhow::bail!(
                "only {connected} of {} Watch clients connected within 60 s: {errors:?}",
                states.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = grpc.to_string();
    let mut by_registry = std::collections::BTreeMap::<String, usize>::new();
    for s in &states {
        let registry = s.borrow().registry.clone().unwrap_or_default();
        *by_registry.entry(registry).or_default() += 1;
    }
    println!("failover: followers per registry before the kill (the first, {first}, is killed): {by_registry:?}");
    states.retain(|s| s.borrow().registry.as_deref() == Some(first.as_str()));
    let (total, followers) = (followers, states.len());
    let t0 = Instant::now();
    let mut waits = Vec::new();
    for mut s in states.clone() {
        let first = first.clone();
        waits.push(tokio::spawn(async move {
            let moved = tokio::time::timeout(
                Duration::from_secs(60),
                s.wait_for(|s| {
                    s.connected && s.registry.is_some() && s.registry.as_deref() != Some(&first)
                }),
            )
            .await
            .map(|r| r.map(|s| s.clone()));
            (t0.elapsed(), moved)
        }));
    }
    doomed.kill()?;
    let mut times = Vec::new();
    let (mut snapshots, mut resumes) = (0u64, 0u64);
    for w in waits {
        let (took, moved) = w.await?;
        let Ok(state) = moved else {
            let mut seen = std::collections::BTreeMap::<String, usize>::new();
            for s in &states {
                let s = s.borrow();
                *seen
                    .entry(format!(
                        "{:?} connected={} error={:?}",
                        s.registry, s.connected, s.last_error
                    ))
                    .or_default() += 1;
            }
            anyhow::bail!("followers still on {first} after 60 s: {seen:#?}");
        };
        let state = state?;
        times.push(took);
        snapshots += state.snapshots - 1;
        resumes += state.resumes;
    }
    times.sort();
    println!(
        "failover: {followers} of {total} Watch clients of the set followed the registry killed (SIGKILL); until each follows another and is connected: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; full snapshots sent again: {snapshots}; resumed without a resend: {resumes}",
        ms(percentile(&times, 0.5)),
        ms(percentile(&times, 0.99)),
        ms(times.last().copied().unwrap_or_default())
    );
    Ok(())
}

async fn costs(etcd: &EtcdCluster, opts: &Opts) -> anyhow::Result<()> {
    let (seconds, registrations) = (opts.seconds, opts.registrations);
    let files = [(
        "vm.yaml",
        yaml::docs(&[
            yaml::workload_group("vm-web", "bench", "web", "web", false),
            yaml::service("web", "bench", 80),
        ]),
    )];
    let refs: Vec<(&str, &str)> = files.iter().map(|(n, y)| (*n, y.as_str())).collect();
    let embedded = TestRegistry::start(&refs).await?;
    let on_etcd = set_on(etcd, &refs).await?;
    println!("store costs (8 concurrent clients):");
    for (what, reg) in [("embedded", &embedded), ("etcd", &on_etcd[0])] {
        let certs = certificates(reg, seconds).await?;
        let regs = vm_registrations(reg, registrations).await?;
        println!(
            "  {what}: {certs:.0} certificates/s against bootstrap tokens (each spends its token in the store); {regs:.0} VM registrations/s"
        );
    }
    Ok(())
}

/// Certificates per second, each against a fresh bootstrap token.
async fn certificates(reg: &TestRegistry, seconds: u64) -> anyhow::Result<f64> {
    let id = SpiffeId::parse("spiffe://cluster.local/ns/bench/sa/client")?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let channel = reg.channel(None).await?;
        let (id, material) = (id.clone(), reg.material());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let token = isthmus_registry::ca::token::create(
                    &material,
                    isthmus_tests::CLUSTER,
                    "bench",
                    "client",
                    Duration::from_secs(600),
                    ::time::OffsetDateTime::now_utc(),
                )
                .unwrap();
                let (_, csr) = certs::generate_key_and_csr(&id).unwrap();
                certs::request_certificate(channel.clone(), csr, Some(token), 0)
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
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// VM registrations per second: `n` VMs, 8 at a time, each registering once.
async fn vm_registrations(reg: &TestRegistry, n: usize) -> anyhow::Result<f64> {
    let creds = Arc::new(reg.credentials("bench", "web").await?);
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    let mut held = Vec::new();
    for _ in 0..8 {
        let channel = reg.channel(Some(&creds)).await?;
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut registrars = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= n {
                    return registrars;
                }
                let address = format!("10.{}.{}.{}", 100 + i / 65536, i / 256 % 256, i % 256);
                let vm = hello("vm-web", "bench", &address, NETWORK);
                let r = isthmus_proto::registration::Registrar::register(channel.clone(), &vm)
                    .await
                    .expect("registered");
                registrars.push(r);
            }
        }));
    }
    for t in tasks {
        held.extend(t.await?);
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    drop(held);
    Ok(rate)
}
