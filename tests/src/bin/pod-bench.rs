//! Pod sidecar benchmark: the release `isthmus-vm-agent` as a pod's sidecar beside the same
//! binary as a VM's agent, started and measured the same way, side by side in one run.
//!
//! The scene is the pod end-to-end test's: a real kube-apiserver, the registry in this
//! process watching it (with the shipped roles) and serving the injection webhook, a Pod
//! created through the webhook, its init container's `capture-init` run once in the pod's
//! network namespace, and a VM namespace in the same network with its onboarding bundle.
//! Per round, for each of the two:
//!
//! - **first start**: an empty state directory; the sidecar gets a fresh bound token from
//!   the TokenRequest API (its certificate needs a TokenReview at the CA), the VM a fresh
//!   bootstrap token (a new onboarding);
//! - **restart**: the certificate (and catalog snapshot) kept from the run before.
//!
//! "Start to ready" is the time from spawning the process to the first 200 from its
//! `/healthz/ready` (polled every 5 ms over the namespace's loopback, as a readiness probe
//! would see it, only faster); the spawn goes through `ip netns exec` (and, for the
//! sidecar, `setpriv` to uid 1337). "Idle RSS" is `VmRSS` after `--idle` seconds of
//! idling once ready. Medians over `--rounds` rounds, every round printed.
//!
//! Run (as root, with `ip`, `nft`, `setpriv`, and Go for the API server):
//! `cargo build --release -p isthmus-vm-agent -p isthmus-tests && target/release/pod-bench
//! [--rounds 5] [--idle 3]`. Everything runs in namespaces this process creates and
//! removes, and on loopback.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use isthmus_registry::app::LocalCluster;
use isthmus_tests::bench::{median, rss_of, until_stopped, Args, Flag};
use isthmus_tests::harness::agent::{group_yaml, Vm, HEALTH};
use isthmus_tests::harness::kube::{self, KubeApi};
use isthmus_tests::harness::mesh::{on, yaml, Mesh, APP_PORT, SVC_PORT};
use isthmus_tests::harness::netns::{ChildGuard, Net};
use isthmus_tests::harness::pod::{self, Mounts};
use isthmus_tests::http_get;
use nix::sys::signal::Signal;

const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 8);
const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 9);
const WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(5);

const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: shop, labels: {app: web}}\nspec:\n  serviceAccountName: web\n  containers:\n  - name: app\n    image: example/web:1\n    ports: [{name: http, containerPort: 8080}]\n";

const ABOUT: &str = "Pod sidecar benchmark: the release isthmus-vm-agent as a pod's sidecar \
    beside the same binary as a VM's agent (as root), side by side: start to ready (first \
    start and restart) and idle memory.";

const FLAGS: &[Flag] = &[
    Flag::value(
        "--rounds",
        "5",
        "rounds, each a first start and a restart of both",
    ),
    Flag::value(
        "--idle",
        "3",
        "seconds each idles, once ready, before its memory is read",
    ),
];

fn main() -> anyhow::Result<()> {
    let args = Args::from_env(ABOUT, FLAGS)?;
    let rounds: usize = args.get("--rounds")?;
    let idle = Duration::from_secs_f64(args.get("--idle")?);
    anyhow::ensure!(rounds >= 1, "--rounds must be at least 1");
    let agent = isthmus_tests::bench::sibling_binary("isthmus-vm-agent", "isthmus-vm-agent")?;
    anyhow::ensure!(
        kube::available(),
        "the Kubernetes API server cannot be built here (Go missing?)"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(until_stopped(run(rounds, idle, &agent)))
}

/// One measured start.
#[derive(Debug, Clone, Copy)]
struct Start {
    ready: Duration,
    rss_mb: f64,
}

#[derive(Default)]
struct Series {
    first: Vec<Start>,
    restart: Vec<Start>,
}

async fn run(rounds: usize, idle: Duration, agent: &Path) -> anyhow::Result<()> {
    let api = KubeApi::start("pod-bench").await?;
    let files = tempfile::tempdir()?;
    let kubeconfig = files.path().join("registry.kubeconfig");
    pod::registry_kubeconfig(&api, &kubeconfig).await?;
    let catalog = [
        group_yaml("vm", "vm", "vm", APP_PORT, false),
        yaml::service("vm", "shop", SVC_PORT),
    ];
    let m = Mesh::start_with("pod-bench", &catalog, |cfg| {
        cfg.kubernetes.local = Some(LocalCluster::Kubeconfig(kubeconfig.clone()));
    })
    .await
    .context("network namespaces are unavailable (run as root with iproute2)")?;
    api.create_namespace("shop", &[("isthmus-injection", "enabled")])
        .await?;
    api.create_service_account("shop", "web").await?;
    let webhook = m
        .reg
        .webhook_addr()
        .context("the registry serves no webhook")?;
    pod::register_webhook(&api, webhook).await?;
    let stored = pod::create_injected(&api, POD, "shop", "web-0", WAIT).await?;
    let root = pod::published_root(&api, "shop", WAIT)
        .await
        .context("the registry never published the root ConfigMap")?;

    let pod_ns = Vm::create_bare(&m, Net::A, "pod", POD_IP, "web-0", "web");
    let mounts = Mounts::new(&pod::pod_token(&api, "shop", "web", "web-0").await?, &root);
    pod::run_init(&pod_ns, &stored, agent).map_err(anyhow::Error::msg)?;
    let vm = Vm::create(&m, Net::A, "vm", VM_IP, "vm", "vm");

    let (mut sidecar, mut vm_agent) = (Series::default(), Series::default());
    for round in 1..=rounds {
        // The sidecar: a new pod's first start, then a restart of its container.
        mounts.empty_state();
        mounts.write_token(&pod::pod_token(&api, "shop", "web", "web-0").await?);
        let spawn = || {
            m.topo
                .spawn(pod::sidecar_command(
                    &m, &pod_ns, &stored, POD_IP, &mounts, agent,
                ))
                .context("starting the sidecar")
        };
        let first = measure(&pod_ns, spawn()?, idle).await?;
        let again = measure(&pod_ns, spawn()?, idle).await?;
        eprintln!(
            "round {round} sidecar: first {:?} ({:.1} MB), restart {:?} ({:.1} MB)",
            first.ready, first.rss_mb, again.ready, again.rss_mb
        );
        sidecar.first.push(first);
        sidecar.restart.push(again);

        // The VM: a new onboarding's first start, then a restart.
        let _ = std::fs::remove_dir_all(vm.state_dir());
        vm.onboard(&m, Duration::from_secs(600));
        let spawn = || {
            m.topo
                .spawn(vm.agent_command(agent, &[], &[]))
                .context("starting the VM agent")
        };
        let first = measure(&vm, spawn()?, idle).await?;
        let again = measure(&vm, spawn()?, idle).await?;
        eprintln!(
            "round {round} VM agent: first {:?} ({:.1} MB), restart {:?} ({:.1} MB)",
            first.ready, first.rss_mb, again.ready, again.rss_mb
        );
        vm_agent.first.push(first);
        vm_agent.restart.push(again);
    }
    report(rounds, idle, &sidecar, &vm_agent);
    Ok(())
}

/// Start to ready and the idle RSS of the process `child` just spawned in `ns`; stops it.
async fn measure(ns: &Vm, child: ChildGuard, idle: Duration) -> anyhow::Result<Start> {
    let spawned = Instant::now();
    let health: SocketAddr = HEALTH.parse()?;
    let ready = on(ns.rt(), async move {
        loop {
            if matches!(http_get(health, "/healthz/ready").await, Ok((200, _))) {
                return Some(spawned.elapsed());
            }
            if spawned.elapsed() > WAIT {
                return None;
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await
    .with_context(|| format!("{} never became ready:\n{}", ns.name, tail(&ns.log())))?;
    tokio::time::sleep(idle).await;
    let rss_mb = rss_of(child.pid());
    let _ = child.signal(Signal::SIGTERM);
    let status = child
        .wait_timeout(WAIT)
        .with_context(|| format!("{} did not stop", ns.name))?;
    anyhow::ensure!(
        status.success(),
        "{} exited with {status}:\n{}",
        ns.name,
        tail(&ns.log())
    );
    Ok(Start { ready, rss_mb })
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn report(rounds: usize, idle: Duration, sidecar: &Series, vm: &Series) {
    let med = |v: &[Start], f: fn(&Start) -> f64| median(v.iter().map(f).collect());
    println!();
    println!(
        "pod sidecar vs VM agent (same binary, release), medians of {rounds} rounds, idle {:?}",
        idle
    );
    println!(
        "{:<34} {:>12} {:>12} {:>10}",
        "", "sidecar", "VM agent", "ratio"
    );
    type Row = (&'static str, fn(&Series) -> &Vec<Start>, fn(&Start) -> f64);
    let rows: [Row; 4] = [
        ("first start to ready (ms)", |s| &s.first, |x| ms(x.ready)),
        ("restart to ready (ms)", |s| &s.restart, |x| ms(x.ready)),
        (
            "idle RSS after first start (MB)",
            |s| &s.first,
            |x| x.rss_mb,
        ),
        ("idle RSS after restart (MB)", |s| &s.restart, |x| x.rss_mb),
    ];
    for (label, series, value) in rows {
        let (a, b) = (med(series(sidecar), value), med(series(vm), value));
        println!(
            "{label:<34} {a:>12.1} {b:>12.1} {:>10.2}",
            if b > 0.0 { a / b } else { 0.0 }
        );
    }
}
