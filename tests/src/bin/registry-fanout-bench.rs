//! Registry benchmark: fan-out latency of one endpoint change to N subscribers, time for a
//! new subscriber to receive a full snapshot of a large catalog, memory at that size, and
//! CA certificates issued per second.
//!
//! Run: `cargo run --release -p isthmus-tests --bin registry-fanout-bench -- [--subscribers 100,1000]
//! [--services 10000] [--endpoints-per-service 10] [--cert-seconds 5]`
//!
//! The registry runs in this process on loopback, next to its subscribers: on a 2-core
//! machine the clients compete with the registry for CPU, so the figures are conservative.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_proto::certs;
use isthmus_proto::identity::SpiffeId;
use isthmus_proto::model::{
    NodeKind, OwnedResource, Resource, Service, ServicePort, ServiceView, ViewResource, Workload,
};
use isthmus_proto::subscription::Subscription;
use isthmus_tests::{node, TestRegistry, NETWORK};
use tokio::sync::Barrier;

const ORIGIN: &str = "bench:";

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn service(i: usize) -> OwnedResource {
    OwnedResource {
        origin: ORIGIN.into(),
        resource: Resource::Service(Service {
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
        }),
    }
}

fn workload(svc: usize, j: usize, network: &str) -> OwnedResource {
    OwnedResource {
        origin: ORIGIN.into(),
        resource: Resource::Workload(Workload {
            uid: format!("cluster-a/bench/svc-{svc}-{j}"),
            name: format!("svc-{svc}-{j}"),
            namespace: "bench".into(),
            address: format!("10.{}.{}.{}", svc / 250 % 250, svc % 250, j + 1),
            network: network.into(),
            cluster: "cluster-a".into(),
            identity: Some(
                SpiffeId::parse(&format!("spiffe://cluster.local/ns/bench/sa/svc-{svc}")).unwrap(),
            ),
            labels: [("app".to_string(), format!("svc-{svc}"))].into(),
            ports: BTreeMap::new(),
            weight: 1,
            ..Default::default()
        }),
    }
}

fn endpoints_of(sub: &Subscription, hostname: &str) -> usize {
    match sub.view.resources.get(&format!("svc/{hostname}")) {
        Some(ViewResource::Service(sv)) => {
            let sv: &ServiceView = sv;
            sv.endpoints.len()
        }
        _ => 0,
    }
}

async fn fan_out(reg: &TestRegistry, subscribers: usize, rounds: usize) -> Vec<Duration> {
    let creds = reg.credentials("bench", "client").await.unwrap();
    let ingest = reg.handle().ingest.clone();
    let base: Vec<OwnedResource> = std::iter::once(service(0))
        .chain((0..3).map(|j| workload(0, j, NETWORK)))
        .collect();
    ingest.replace_origin(ORIGIN, base.clone()).await.unwrap();
    let hostname = "svc-0.bench.svc.cluster.local".to_string();

    let mut subs = Vec::new();
    for i in 0..subscribers {
        let mut s = reg
            .subscribe(
                &creds,
                &node(&format!("bench-{i}"), NodeKind::Workload, NETWORK),
            )
            .await
            .unwrap();
        s.next().await.unwrap();
        subs.push(s);
    }
    let barrier = Arc::new(Barrier::new(subscribers + 1));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    for mut s in subs {
        let tx = tx.clone();
        let barrier = barrier.clone();
        let hostname = hostname.clone();
        tokio::spawn(async move {
            barrier.wait().await;
            for round in 0..rounds {
                let want = if round % 2 == 0 { 4 } else { 3 };
                while endpoints_of(&s, &hostname) != want {
                    if s.next().await.is_err() {
                        return;
                    }
                }
                let _ = tx.send((round, Instant::now()));
            }
        });
    }
    drop(tx);
    barrier.wait().await;
    let mut latencies = Vec::new();
    for round in 0..rounds {
        let mut set = base.clone();
        if round % 2 == 0 {
            set.push(workload(0, 3, NETWORK));
        }
        let start = Instant::now();
        ingest.replace_origin(ORIGIN, set).await.unwrap();
        for _ in 0..subscribers {
            let (r, at) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                .await
                .expect("fan-out within 60s")
                .expect("subscriber alive");
            assert_eq!(r, round);
            latencies.push(at - start);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    latencies.sort();
    latencies
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    raise_nofile();
    let subscriber_counts: Vec<usize> = arg("--subscribers", "100,1000")
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let services: usize = arg("--services", "10000").parse()?;
    let per_service: usize = arg("--endpoints-per-service", "10").parse()?;
    let cert_seconds: u64 = arg("--cert-seconds", "5").parse()?;
    let rounds: usize = arg("--rounds", "10").parse()?;

    println!(
        "# registry benchmark ({} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    for n in subscriber_counts {
        let reg = TestRegistry::start(&[]).await?;
        let lat = fan_out(&reg, n, rounds).await;
        println!(
            "fan-out: {n} subscribers x {rounds} changes: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            percentile(&lat, 0.5).as_secs_f64() * 1e3,
            percentile(&lat, 0.99).as_secs_f64() * 1e3,
            lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3
        );
        drop(reg);
    }

    let reg = TestRegistry::start(&[]).await?;
    let rss_before = rss_mb();
    let mut all = Vec::with_capacity(services * (per_service + 1));
    for i in 0..services {
        all.push(service(i));
        for j in 0..per_service {
            // Every other service also has endpoints in a second network.
            let net = if j % 2 == 1 && i % 2 == 0 {
                "network-b"
            } else {
                NETWORK
            };
            all.push(workload(i, j, net));
        }
    }
    let t = Instant::now();
    reg.handle().ingest.replace_origin(ORIGIN, all).await?;
    let load = t.elapsed();
    let creds = reg.credentials("bench", "client").await?;
    let t = Instant::now();
    let mut sub = reg
        .subscribe(&creds, &node("snap", NodeKind::Workload, NETWORK))
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
        "catalog: {services} services / {} endpoints ingested (store + views) in {:.2} s",
        services * per_service,
        load.as_secs_f64()
    );
    println!("snapshot: new subscriber received {} services / {eps} view endpoints in {} parts in {:.0} ms", sub.view.resources.len(), u.parts, snap.as_secs_f64() * 1e3);
    drop(sub);
    tokio::time::sleep(Duration::from_millis(200)).await;
    println!(
        "memory: process RSS {:.0} MB with the catalog loaded ({:.0} MB before loading)",
        rss_mb(),
        rss_before
    );
    drop(reg);

    // CA throughput: renewals over mTLS from 8 concurrent clients.
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
    println!("ca: {:.0} certificates/s (8 concurrent clients, key + CSR generated client-side in the same process)", total as f64 / cert_seconds as f64);
    Ok(())
}

/// 1,000 subscribers need 2,000 descriptors in one process (both ends of each connection).
fn raise_nofile() {
    #[cfg(target_os = "linux")]
    {
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
            if let Some(line) = limits.lines().find(|l| l.starts_with("Max open files")) {
                let soft: u64 = line
                    .split_whitespace()
                    .nth(3)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if soft < 8192 {
                    eprintln!("note: open-file limit is {soft}; run with `ulimit -n 65536` for 1,000 subscribers");
                }
            }
        }
    }
}
