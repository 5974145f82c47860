//! Kubernetes source benchmark: real API servers as clusters A, B, C, each holding many
//! Services with one EndpointSlice each (created through the API), watched by the real
//! `isthmus-registry` binary in a process of its own. Measures the time to the first sync of
//! every cluster, the registry's memory, and how long one endpoint's readiness flip takes
//! to reach every one of many Watch subscribers; then runs registry-fanout-bench's
//! static-source fan-out with as many subscribers, to compare.
//!
//! Run: `cargo build --release -p isthmus-registry -p isthmus-tests --bin isthmus-registry
//! --bin kube-bench --bin registry-fanout-bench`, then
//! `target/release/kube-bench [--quick] [--clusters 3] [--services 2000] [--endpoints 10]
//! [--subscribers 1000] [--flips 5] [--pods 10] [--parallel 16]`.
//!
//! Every cluster has the same Services in namespace `bench` (namespace sameness: one
//! service, the union of the clusters' endpoints), all on the registry's network. In
//! cluster A the first Service's endpoints point at `--pods` real pods (`targetRef`), so
//! its flips go through the pod path: the pod's status is written first, as a kubelet
//! would, then its slice's endpoint condition, as the EndpointSlice controller would (there
//! is no controller here). The second Service's endpoints have no pods: its flips are a
//! slice write alone. A flip's latency runs from the first write's start until a
//! subscriber's view shows it, so it includes the API server's write and watch delivery.
//! The subscribers share the machine's cores with the API servers, etcd and the registry:
//! the figures are conservative.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use isthmus_proto::model::{service_view_key, Health, NodeKind, ViewResource};
use isthmus_proto::subscription::Subscription;
use isthmus_tests::bench::{
    await_rounds, check_nofile, cpu_of, percentile, round_latencies, rss_of, until_stopped, Args,
    Flag, RemoteRegistry,
};
use isthmus_tests::harness::kube::KubeApi;
use isthmus_tests::harness::process::ServerProcess;
use isthmus_tests::{http_get, node, TestRegistry, CLUSTER, NETWORK};
use serde_json::{json, Value};

const NS: &str = "bench";

const ABOUT: &str = "Kubernetes source benchmark: real API servers as clusters, watched by the \
    release isthmus-registry: time to first sync, memory, and how long a readiness flip takes \
    to reach many Watch subscribers, beside the static source's fan-out.";

const FLAGS: &[Flag] = &[
    Flag::switch(
        "--quick",
        "lower defaults for a run of a minute or two: 200 services, 100 subscribers, 3 flips",
    ),
    Flag::value("--clusters", "3", "API servers, one per cluster, 1 to 26"),
    Flag::value(
        "--services",
        "2000",
        "Services per cluster, 2 to 6000; 200 with --quick",
    ),
    Flag::value(
        "--endpoints",
        "10",
        "endpoints of each Service's slice, 1 to 25",
    ),
    Flag::value(
        "--subscribers",
        "1000",
        "Watch subscribers; 100 with --quick",
    ),
    Flag::value(
        "--flips",
        "5",
        "flips each way per kind of Service; 3 with --quick",
    ),
    Flag::value(
        "--pods",
        "10",
        "real pods behind the first Service in cluster A",
    ),
    Flag::value(
        "--parallel",
        "16",
        "API requests in flight while populating a cluster",
    ),
];

/// The sizes, from the flags (`--quick` lowers the defaults to a run of a minute or two).
#[derive(Debug, Clone)]
struct Opts {
    clusters: usize,
    services: usize,
    endpoints: usize,
    subscribers: usize,
    flips: usize,
    pods: usize,
    parallel: usize,
}

impl Opts {
    fn parse(args: &Args) -> anyhow::Result<Self> {
        // `--quick` lowers three defaults; the table holds the others.
        let quick = args.switch("--quick");
        let sized = |name: &str, quick_default: &str| {
            if quick {
                args.get_or(name, quick_default)
            } else {
                args.get(name)
            }
        };
        let opts = Self {
            clusters: args.get("--clusters")?,
            services: sized("--services", "200")?,
            endpoints: args.get("--endpoints")?,
            subscribers: sized("--subscribers", "100")?,
            flips: sized("--flips", "3")?,
            pods: args.get("--pods")?,
            parallel: args.get("--parallel")?,
        };
        anyhow::ensure!(
            (1..=26).contains(&opts.clusters) && opts.services >= 2 && opts.services <= 6000,
            "--clusters 1..=26 and --services 2..=6000"
        );
        anyhow::ensure!((1..=25).contains(&opts.endpoints), "--endpoints 1..=25");
        Ok(opts)
    }
}

fn cluster_name(c: usize) -> String {
    format!("cluster-{}", (b'a' + c as u8) as char)
}

fn host(svc: usize) -> String {
    format!("svc-{svc}.{NS}.svc.cluster.local")
}

/// Endpoint `j` of Service `svc` in cluster `c`: unique across clusters.
fn address(c: usize, svc: usize, j: usize) -> IpAddr {
    IpAddr::from([
        10,
        (100 + c) as u8,
        (svc / 25) as u8,
        ((svc % 25) * 10 + j + 1) as u8,
    ])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> anyhow::Result<()> {
    let opts = Opts::parse(&Args::from_env(ABOUT, FLAGS)?)?;
    check_nofile();
    println!(
        "# Kubernetes source benchmark: {} clusters x {} services x {} endpoints, {} subscribers, {} flips each way ({} cores shared by the API servers, etcd, the registry and the subscribers)",
        opts.clusters,
        opts.services,
        opts.endpoints,
        opts.subscribers,
        opts.flips,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(until_stopped(run(&opts)))?;
    drop(rt);
    static_fan_out(&opts)
}

async fn run(opts: &Opts) -> anyhow::Result<()> {
    let registry_bin = std::env::current_exe()?.with_file_name("isthmus-registry");
    anyhow::ensure!(
        registry_bin.exists(),
        "{} not found: run `cargo build --release -p isthmus-registry` first",
        registry_bin.display()
    );
    let t = Instant::now();
    let mut apis = Vec::new();
    for c in 0..opts.clusters {
        apis.push(KubeApi::start(&cluster_name(c)).await?);
    }
    println!(
        "clusters: {} API servers (etcd + kube-apiserver, watch cache on, CRDs installed) started in {:.1} s",
        opts.clusters,
        t.elapsed().as_secs_f64()
    );
    for (c, api) in apis.iter().enumerate() {
        populate(api, c, opts).await?;
    }
    let dir = tempfile::tempdir()?;
    let registry = Registry::start(&registry_bin, &apis, dir.path()).await?;
    registry.wait_synced(&apis, opts).await?;
    let subs = subscribe_all(&registry, opts).await?;
    flips(&apis[0], &registry, subs, opts).await?;
    println!(
        "memory: isthmus-registry RSS {:.0} MB after the flips",
        rss_of(registry.pid())
    );
    Ok(())
}

/// Cluster `c`'s objects: namespace `bench`, then its Services and EndpointSlices (and in
/// cluster A the pods behind Service 0) by parallel POSTs; prints how long that took.
async fn populate(api: &KubeApi, c: usize, opts: &Opts) -> anyhow::Result<()> {
    api.create_namespace(NS, &[]).await?;
    let pods = if c == 0 {
        opts.pods.min(opts.endpoints)
    } else {
        0
    };
    let t = Instant::now();
    let pod_objects = (0..pods)
        .map(|j| {
            let pod = json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("svc-0-{j}"), "namespace": NS, "labels": {"app": "svc-0"}},
                "spec": {"serviceAccountName": "default",
                    "containers": [{"name": "app", "image": "registry.example/app:1"}]}});
            (format!("/api/v1/namespaces/{NS}/pods"), pod.to_string())
        })
        .collect();
    api.create_all(pod_objects, opts.parallel).await?;
    for j in 0..pods {
        api.set_pod_status(NS, &format!("svc-0-{j}"), address(c, 0, j), true)
            .await?;
    }
    let pods_took = t.elapsed();
    let t = Instant::now();
    let services = (0..opts.services)
        .map(|i| {
            let svc = json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": format!("svc-{i}"), "namespace": NS},
                "spec": {"selector": {"app": format!("svc-{i}")},
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}});
            (format!("/api/v1/namespaces/{NS}/services"), svc.to_string())
        })
        .collect();
    api.create_all(services, opts.parallel).await?;
    let services_took = t.elapsed();
    let t = Instant::now();
    let slices = (0..opts.services)
        .map(|i| {
            let path = format!("/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices");
            (path, slice(c, i, opts.endpoints, pods).to_string())
        })
        .collect();
    api.create_all(slices, opts.parallel).await?;
    println!(
        "{}: {} Services in {:.1} s ({:.0}/s), {} EndpointSlices x {} endpoints in {:.1} s ({:.0}/s){} ({} POSTs in flight)",
        api.name(),
        opts.services,
        services_took.as_secs_f64(),
        opts.services as f64 / services_took.as_secs_f64(),
        opts.services,
        opts.endpoints,
        t.elapsed().as_secs_f64(),
        opts.services as f64 / t.elapsed().as_secs_f64(),
        if pods > 0 {
            format!(", {pods} pods created and made ready in {:.1} s", pods_took.as_secs_f64())
        } else {
            String::new()
        },
        opts.parallel
    );
    Ok(())
}

/// Service `i`'s slice in cluster `c`: `endpoints` ready endpoints, the first `pods` of
/// them pointing at pods `svc-0-<j>` (Service 0 only).
fn slice(c: usize, i: usize, endpoints: usize, pods: usize) -> Value {
    let eps: Vec<Value> = (0..endpoints)
        .map(|j| {
            let mut ep = json!({"addresses": [address(c, i, j).to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false}});
            if i == 0 && j < pods {
                ep["targetRef"] =
                    json!({"kind": "Pod", "namespace": NS, "name": format!("svc-0-{j}")});
            }
            ep
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-{}", cluster_name(c)), "namespace": NS,
            "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps})
}

/// The registry binary watching every cluster: A through `--kubeconfig`, the others
/// through `--remote-kubeconfigs`, all with the shipped reader role.
struct Registry {
    process: ServerProcess,
    started: Instant,
    admin: std::net::SocketAddr,
    remote: RemoteRegistry,
    log: std::path::PathBuf,
}

impl Registry {
    async fn start(bin: &Path, apis: &[KubeApi], dir: &Path) -> anyhow::Result<Self> {
        let cfg = TestRegistry::config(dir);
        let remotes = dir.join("remote-kubeconfigs");
        std::fs::create_dir_all(&remotes)?;
        let local = dir.join("cluster-a.reader.yaml");
        for (c, api) in apis.iter().enumerate() {
            let path = if c == 0 {
                local.clone()
            } else {
                remotes.join(format!("{}.yaml", api.name()))
            };
            api.reader_kubeconfig(&path).await?;
        }
        let grpc = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let admin = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let log = dir.join("registry.log");
        let out = std::fs::File::create(&log)?;
        let started = Instant::now();
        let child = std::process::Command::new(bin)
            .args(["--cluster", CLUSTER, "--network", NETWORK])
            .arg("--ca-dir")
            .arg(&cfg.ca_dir)
            .arg("--data-dir")
            .arg(&cfg.data_dir)
            .arg("--kubeconfig")
            .arg(&local)
            .arg("--remote-kubeconfigs")
            .arg(&remotes)
            .args(["--grpc-addr", &grpc.to_string()])
            .args(["--admin-addr", &admin.to_string()])
            // Not the default 0.0.0.0:15017 a registry with its own cluster serves on.
            .args(["--webhook-addr", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            // As registry-fanout-bench's snapshot phase runs it, so the memory compares.
            .env("MALLOC_ARENA_MAX", "1")
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self {
            process: ServerProcess::new(child),
            started,
            admin,
            remote: RemoteRegistry {
                dir: dir.to_path_buf(),
                grpc,
            },
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.process.id()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The clusters' statuses from `/debug/clusters`.
    async fn clusters(&self) -> Vec<Value> {
        match http_get(self.admin, "/debug/clusters").await {
            Ok((200, body)) => serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["clusters"].as_array().cloned())
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// Waits until `/readyz` is 200 and every cluster says synced, then until the catalog
    /// holds every cluster's resources; prints both times, the memory and the CPU spent.
    async fn wait_synced(&self, apis: &[KubeApi], opts: &Opts) -> anyhow::Result<()> {
        let cpu_before: Vec<Duration> = apis.iter().map(peers_cpu).sum_into();
        let deadline = Duration::from_secs(900);
        let ready = loop {
            let readyz = matches!(http_get(self.admin, "/readyz").await, Ok((200, _)));
            let clusters = self.clusters().await;
            let synced =
                clusters.len() == apis.len() && clusters.iter().all(|c| c["synced"] == true);
            if readyz && synced {
                break self.started.elapsed();
            }
            self.check_alive(deadline)?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let want = opts.services * (opts.endpoints + 1);
        let complete = loop {
            let clusters = self.clusters().await;
            let counts: Vec<usize> = clusters
                .iter()
                .map(|c| c["resources"].as_u64().unwrap_or(0) as usize)
                .collect();
            if counts.len() == apis.len() && counts.iter().all(|n| *n >= want) {
                break self.started.elapsed();
            }
            self.check_alive(deadline)?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        println!(
            "first sync: /readyz 200 and all {} clusters synced {:.2} s after the registry process started; every cluster's {} services + {} endpoints in the catalog at {:.2} s",
            apis.len(),
            ready.as_secs_f64(),
            opts.services,
            opts.services * opts.endpoints,
            complete.as_secs_f64()
        );
        let cpu_after: Vec<Duration> = apis.iter().map(peers_cpu).sum_into();
        println!(
            "first sync CPU: isthmus-registry {:.2} s; the API servers {:.2} s, their etcds {:.2} s (answering the lists and watches)",
            cpu_of(self.pid()).as_secs_f64(),
            (cpu_after[0] - cpu_before[0]).as_secs_f64(),
            (cpu_after[1] - cpu_before[1]).as_secs_f64()
        );
        println!(
            "memory: isthmus-registry RSS {:.0} MB after the first sync ({} resources in its catalog; MALLOC_ARENA_MAX=1 as in registry-fanout-bench)",
            rss_of(self.pid()),
            apis.len() * want
        );
        Ok(())
    }

    fn check_alive(&self, deadline: Duration) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.started.elapsed() < deadline,
            "the registry did not sync within {deadline:?}:\n{}",
            self.log_tail()
        );
        Ok(())
    }
}

/// An API server's and its etcd's CPU time so far.
fn peers_cpu(api: &KubeApi) -> [Duration; 2] {
    let (apiserver, etcd) = api.pids();
    [apiserver.map(cpu_of).unwrap_or_default(), cpu_of(etcd)]
}

trait SumInto {
    fn sum_into(self) -> Vec<Duration>;
}

impl<I: Iterator<Item = [Duration; 2]>> SumInto for I {
    /// Column sums: `[apiservers, etcds]`.
    fn sum_into(self) -> Vec<Duration> {
        self.fold(vec![Duration::ZERO; 2], |mut acc, [a, e]| {
            acc[0] += a;
            acc[1] += e;
            acc
        })
    }
}

/// Connects the subscribers one after another, each on its own connection and receiving the
/// whole view; each then keeps only the two services the flips change (the driver would
/// otherwise hold a full catalog per subscriber).
async fn subscribe_all(reg: &Registry, opts: &Opts) -> anyhow::Result<Vec<Subscription>> {
    let creds = reg.remote.credentials().await?;
    let keep = [service_view_key(&host(0)), service_view_key(&host(1))];
    let t = Instant::now();
    let mut first = Duration::ZERO;
    let mut endpoints = 0;
    let mut subs = Vec::with_capacity(opts.subscribers);
    for i in 0..opts.subscribers {
        let started = Instant::now();
        let mut s = Subscription::open(
            reg.remote.channel(Some(&creds)).await?,
            &node(&format!("bench-{i}"), NodeKind::Workload, NETWORK),
            None,
        )
        .await?;
        s.next().await?;
        if i == 0 {
            first = started.elapsed();
            endpoints = s
                .view
                .resources
                .values()
                .map(|r| match r {
                    ViewResource::Service(sv) => sv.endpoints.len(),
                    _ => 0,
                })
                .sum();
        }
        std::sync::Arc::make_mut(&mut s.view)
            .resources
            .retain(|k, _| keep.contains(k));
        subs.push(s);
    }
    println!(
        "subscribers: {} connected in {:.1} s, each receiving the full view ({endpoints} endpoints; the first in {:.0} ms); isthmus-registry RSS {:.0} MB",
        opts.subscribers,
        t.elapsed().as_secs_f64(),
        ms(first),
        rss_of(reg.pid())
    );
    Ok(subs)
}

/// Whether the view shows endpoint `address` of cluster A in service `svc` as healthy.
fn healthy(s: &Subscription, svc: usize, address: IpAddr) -> bool {
    let a = cluster_name(0);
    match s.view.resources.get(&service_view_key(&host(svc))) {
        Some(ViewResource::Service(sv)) => sv.endpoints.iter().any(|e| {
            e.cluster == a
                && e.address.to_string() == address.to_string()
                && e.health == Health::Healthy
        }),
        _ => false,
    }
}

/// An object as JSON from the API server (as the admin).
async fn get(api: &KubeApi, path: &str) -> anyhow::Result<Value> {
    let r = api.request("GET", path, None).await?;
    anyhow::ensure!(r.status == 200, "GET {path} ({}): {}", r.status, r.body);
    Ok(serde_json::from_str(&r.body)?)
}

async fn put(api: &KubeApi, path: &str, body: &Value) -> anyhow::Result<()> {
    let r = api.request("PUT", path, Some(&body.to_string())).await?;
    anyhow::ensure!(r.status == 200, "PUT {path} ({}): {}", r.status, r.body);
    Ok(())
}

/// One flip of endpoint 0 of Service `svc` in cluster A to `ready`: for Service 0 with
/// pods, the pod's status and then the slice, else the slice alone. Both objects are read
/// first; returns when the first write started, how long the writes took, and how long
/// the read of the slice took (a request's cost without a write: connection, TLS, API).
async fn flip(
    api: &KubeApi,
    svc: usize,
    ready: bool,
    pods: bool,
) -> anyhow::Result<(Instant, Duration, Duration)> {
    let slice_path = format!(
        "/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices/svc-{svc}-{}",
        cluster_name(0)
    );
    let read = Instant::now();
    let mut slice = get(api, &slice_path).await?;
    let read = read.elapsed();
    slice["endpoints"][0]["conditions"] =
        json!({"ready": ready, "serving": ready, "terminating": false});
    let pod_path = format!("/api/v1/namespaces/{NS}/pods/svc-0-0");
    let pod = if pods {
        let mut pod = get(api, &pod_path).await?;
        let status = if ready { "True" } else { "False" };
        pod["status"]["conditions"] = json!([{"type": "Ready", "status": status},
            {"type": "ContainersReady", "status": status}]);
        Some(pod)
    } else {
        None
    };
    let start = Instant::now();
    if let Some(pod) = pod {
        put(api, &format!("{pod_path}/status"), &pod).await?;
    }
    put(api, &slice_path, &slice).await?;
    Ok((start, start.elapsed(), read))
}

/// Flips endpoint 0 of Service 0 (pod-backed) and then of Service 1 (no pods) to not ready
/// and back, `--flips` times each, and prints how long every subscriber took to see each.
async fn flips(
    api: &KubeApi,
    reg: &Registry,
    subs: Vec<Subscription>,
    opts: &Opts,
) -> anyhow::Result<()> {
    let n = subs.len();
    let per_kind = 2 * opts.flips;
    let service_of_round = move |round: usize| usize::from(round >= per_kind);
    // One round more than there are flips, never reached: every subscriber stays connected
    // until the runtime ends, so the first ones done do not close their streams (and free
    // their buffers) while the last flip is still reaching the others.
    let flips = 2 * per_kind;
    let (barrier, mut rx) = await_rounds(subs, flips + 1, move |s, round| {
        let svc = service_of_round(round);
        round < flips && healthy(s, svc, address(0, svc, 0)) == (round % 2 == 1)
    });
    barrier.wait().await;
    let cpu = cpu_of(reg.pid());
    let mut results = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
    let (mut writes, mut reads, mut each) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..2 * per_kind {
        let svc = service_of_round(round);
        let pods = svc == 0 && opts.pods > 0;
        let (start, write, read) = flip(api, svc, round % 2 == 1, pods).await?;
        writes.push(write);
        reads.push(read);
        let (latencies, after_write) = &mut results[svc];
        let round = round_latencies(&mut rx, n, round, start).await;
        after_write.extend(round.iter().map(|d| d.saturating_sub(write)));
        let last = round.iter().max().copied().unwrap_or_default();
        each.push(format!(
            "{:.0}+{:.0}",
            ms(write),
            ms(last.saturating_sub(write))
        ));
        latencies.extend(round);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (svc, (mut latencies, mut after_write)) in results.into_iter().enumerate() {
        latencies.sort();
        after_write.sort();
        let what = if svc == 0 && opts.pods > 0 {
            "a pod's readiness (pod status, then its slice)"
        } else {
            "an endpoint's readiness (slice only, no pod)"
        };
        println!(
            "flip -> {n} subscribers, {what}, {per_kind} flips: from the write's start p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; after the API server answered the write p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            ms(percentile(&latencies, 0.5)),
            ms(percentile(&latencies, 0.99)),
            ms(latencies.last().copied().unwrap_or_default()),
            ms(percentile(&after_write, 0.5)),
            ms(percentile(&after_write, 0.99)),
            ms(after_write.last().copied().unwrap_or_default()),
        );
    }
    println!(
        "each flip in turn, write + until the last subscriber had it (ms): {}",
        each.join(" ")
    );
    writes.sort();
    reads.sort();
    println!(
        "API requests: the flips' writes took median {:.1} ms, max {:.1} ms; a GET of the slice median {:.1} ms (new connection and TLS handshake each)",
        ms(percentile(&writes, 0.5)),
        ms(writes.last().copied().unwrap_or_default()),
        ms(percentile(&reads, 0.5)),
    );
    println!(
        "flips CPU: isthmus-registry {:.2} s for {} flips to {n} subscribers",
        (cpu_of(reg.pid()) - cpu).as_secs_f64(),
        2 * per_kind
    );
    Ok(())
}

/// registry-fanout-bench's static-source fan-out (one endpoint added and removed through
/// the registry's ingest, in process) with as many subscribers and changes, beside the
/// figures above; run after the clusters are gone so it has the machine to itself.
fn static_fan_out(opts: &Opts) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?.with_file_name("registry-fanout-bench");
    let phase = format!("fanout:{}", opts.subscribers);
    let rounds = (4 * opts.flips).to_string();
    if !exe.exists() {
        println!(
            "static source: build registry-fanout-bench next to this binary, or run `registry-fanout-bench --phase {phase} --rounds {rounds}`"
        );
        return Ok(());
    }
    print!("static source (registry-fanout-bench --phase {phase} --rounds {rounds}): ");
    use std::io::Write as _;
    std::io::stdout().flush()?;
    let status = std::process::Command::new(exe)
        .args(["--phase", &phase, "--rounds", &rounds])
        .status()?;
    anyhow::ensure!(status.success(), "registry-fanout-bench failed: {status}");
    Ok(())
}
