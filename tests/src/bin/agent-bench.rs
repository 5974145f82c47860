//! VM agent benchmark: the release `isthmus-vm-agent` in VM namespaces of the two-network
//! topology (the same harness as the end-to-end tests: registry in this process, capture
//! on, as an operator runs the agent), measured four ways.
//!
//! 1. **Idle memory.** A catalog of `--services` ServiceEntries (each selecting one
//!    WorkloadEntry in the VM's network, so the agent's routing table holds that many
//!    destinations and its DNS proxy that many names, every VIP in its nftables set) plus
//!    the VM's WorkloadGroup; and, for comparison, a catalog holding only the group. The
//!    agent starts (after one unmeasured enrolment, so every start is a normal restart with
//!    the certificate in its state directory), becomes ready (`/healthz/ready`), idles
//!    `--idle` seconds, and `VmRSS`, `VmHWM`, `RssAnon`, `RssFile` and `Threads` are read
//!    from `/proc/<pid>/status`. Only then is `/config_dump` read, to confirm the number of
//!    destinations and names (the RSS once it has rendered that dump is shown too: a dump
//!    of a large catalog is itself an allocation). Besides the default (one worker, one
//!    malloc arena), three variants show what the figure is made of: `--worker-threads 2`,
//!    glibc's `MALLOC_ARENA_MAX=2`, and both. Each variant is started `--mem-rounds`
//!    times; medians are printed.
//! 2. **Start to READY.** With `NOTIFY_SOCKET` pointing at a datagram socket this process
//!    binds, the time from spawning the agent to its `READY=1`, `--starts` times each: (a)
//!    a restart (certificate and catalog snapshot in the state directory, registry up), (b)
//!    a first start (empty state directory, a fresh bootstrap token from a new onboarding
//!    each time, so the time includes key generation and the certificate request). Both
//!    catalogs. The agent's supervisor says READY once certificate, catalog and captured
//!    addresses are in place; it also runs a self-check every 5 s (or half the watchdog
//!    timeout when that is shorter), so both cases are run again with
//!    `WATCHDOG_USEC=400000` (a check every 0.2 s): equal times mean READY does not wait
//!    for that check (an agent that did would show its period). The time to the first
//!    notification of any kind is printed too. The spawn goes through `ip netns exec`, whose
//!    own cost (`ip netns exec <vm> true`) is printed beside.
//! 3. **CPU per request.** Four VMs in network A, each with its agent: the client VM
//!    (10.10.0.7), the server VM (10.10.0.8), a second server VM (10.10.0.9) whose agent
//!    runs with `--tunnel-port 0`, and a third (10.10.0.10) whose agent takes HTTP/2
//!    tunnels alone (`--tunnel-transports h2`); each server group's app port 8080 is
//!    captured inbound.
//!    Each server is this binary in server mode (a fixed-size echo: `--size`-byte request,
//!    same-size reply), listening on 8080 and on 7070, a port outside the group's (not
//!    captured). The client, this binary in client mode in the client VM, makes
//!    `--requests` sequential requests (a) through the mesh to the first server's service
//!    VIP (from the client VM's DNS, that is its agent's), captured into the client agent's
//!    outbound, a stream of the pooled QUIC tunnel between the two agents (the race's
//!    winner), the server agent's tunnel listener, the app (`quic`); (b) the same to the
//!    third server, over a pooled HTTP/2 tunnel (`hbone`); (c) the same to the second
//!    server, whose agent takes no tunnels: an mTLS connection of its own per connection,
//!    captured into that agent's inbound (`mtls`); (d) through two HAProxy processes in
//!    plain TCP mode, one thread each, in place of the agents: the client VM's on its
//!    loopback, the server VM's on its address, then the first server's 7070 (`haproxy`:
//!    no TLS, no capture, so what any two user-space proxies on the path cost at least);
//!    (e) directly to the first server's 7070 (`direct`). Two modes: a new TCP connection
//!    per request (connect, request, reply, close; the mtls path makes an mTLS connection
//!    of its own between the agents for each, which resumes the session of the one before
//!    it) and all requests on one persistent connection. Per run: each agent's CPU, the
//!    server's, the client's (over its timed loop), wall time and each request's latency
//!    (p50/p99).
//!    `--rounds` rounds, the paths taking turns; medians are printed, every round too.
//! 4. **Idle memory with tunnels warm.** `--peers` VMs in network A (10.10.0.20 on), each
//!    with its agent and the echo server behind it, one service each, and the client VM.
//!    The client's agent starts (with `--tunnel-transports quic`, then `h2`), becomes ready
//!    and idles `--idle` seconds: its memory without a tunnel. Then the client binary makes
//!    ten requests on new connections to each peer's service, so the agent holds one pooled
//!    tunnel to each (checked in `/debug/tunnels`), well within the tunnels' idle timeout;
//!    after `--idle` seconds more its memory is read again, tunnels still open. Both
//!    readings per start, `--mem-rounds` starts per transport, medians.
//!
//! CPU time is each process's CPU-time clock (`clock_getcpuclockid`: user + system time of
//! all its threads, the figure `/proc/<pid>/stat` gives in clock ticks, in nanoseconds),
//! read before and after each run (after a short settle, so closing is counted). Kernel
//! work done in softirq context on another process's time is not attributed; "others" is
//! what the rest of the machine used during a run (from `/proc/stat`, less the processes
//! measured and this one), printed so a disturbed round shows. No pinning: the four
//! processes of the mesh path share the cores as they would on a VM. The agents log at
//! `--agent-log` (their default, `info`), into files.
//!
//! Run (as root, with `ip`, `nft` and `haproxy`; about ten minutes with the defaults):
//! `cargo build --release -p isthmus-vm-agent -p isthmus-tests && target/release/agent-bench
//! [--services 1000] [--idle 5] [--mem-rounds 3] [--starts 5] [--requests 1000]
//! [--rounds 3] [--size 64] [--peers 10] [--agent-log info] [--only memory,requests,bulk,tunnels]`
//!
//! Everything runs in namespaces this process creates and removes (traffic never leaves
//! them or loopback). The agent binary is the one next to this one.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use isthmus_proto::model::{NodeKind, ViewResource};
use isthmus_tests::bench::{
    clock_ticks, cpu_model, cpu_ns_of, median, until_stopped, virtualized, Args, Flag,
};
use isthmus_tests::harness::agent::{group_yaml, Vm};
use isthmus_tests::harness::dns::have;
use isthmus_tests::harness::mesh::{yaml, Mesh};
use isthmus_tests::harness::netns::{ChildGuard, Net};
use isthmus_tests::harness::process::ServerProcess;
use isthmus_tests::node;
use nix::sys::signal::Signal;
use nix::time::{clock_gettime, ClockId};

/// The memory VM's group, service account and app port.
const MEM_GROUP: &str = "web";
const APP_PORT: u16 = 8080;
/// Every service's port in the catalog.
const SVC_PORT: u16 = 9080;
/// A port outside the server group's ports: not captured inbound.
const DIRECT_PORT: u16 = 7070;
/// The client VM's group port (nothing listens there).
const CLIENT_APP_PORT: u16 = 8081;
const MEM_VM: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 7);
const CLIENT_VM: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 7);
const SERVER_VM: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 8);
/// The second server VM, whose agent takes no tunnels (`--tunnel-port 0`).
const MTLS_SERVER_VM: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 9);
/// The third server VM, whose agent takes HTTP/2 tunnels alone (`--tunnel-transports h2`),
/// so the client's race to it is won by HTTP/2.
const H2_SERVER_VM: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 10);
/// Time for the processes to finish closing before their CPU is read again.
const SETTLE: Duration = Duration::from_millis(300);
/// Bounds every wait for the agent (ready, READY=1, exit).
const WAIT: Duration = Duration::from_secs(60);

const ABOUT: &str = "VM agent benchmark: the release isthmus-vm-agent in VM namespaces (as \
    root), measured four ways: idle memory and start to READY, CPU per request and bulk \
    transfers, idle memory with tunnels warm.";

const FLAGS: &[Flag] = &[
    Flag::value("--services", "1000", "ServiceEntries in the large catalog"),
    Flag::value(
        "--idle",
        "5",
        "seconds an agent idles before its memory is read",
    ),
    Flag::value(
        "--mem-rounds",
        "3",
        "starts of each memory variant and transport",
    ),
    Flag::value("--starts", "5", "starts timed to READY=1, per case"),
    Flag::value("--requests", "1000", "requests per run, sequential"),
    Flag::value(
        "--rounds",
        "3",
        "rounds of the requests and bulk runs, paths taking turns",
    ),
    Flag::value("--size", "64", "bytes of each request, and of its echo"),
    Flag::value(
        "--peers",
        "10",
        "peer VMs the client's agent keeps tunnels to, 1 to 200",
    ),
    Flag::value("--bulk-mib", "256", "MiB each way of a bulk run"),
    Flag::value("--agent-log", "info", "the agents' RUST_LOG"),
    Flag::value(
        "--only",
        "all",
        "the parts to run: all, or memory, requests, bulk, tunnels joined by commas",
    ),
    Flag::value(
        "--role",
        "bench",
        "bench, or the echo server or client it starts",
    )
    .internal(),
    Flag::value("--addr", "", "client: the address to send requests to").internal(),
    Flag::value("--mode", "new", "client: new, persistent or bulk").internal(),
    Flag::value("--warmup", "0", "client: unmeasured requests first").internal(),
    Flag::value("--bytes", "0", "client: bytes each way of a bulk run").internal(),
    Flag::value(
        "--listen",
        "",
        "server: addresses to echo on, joined by commas",
    )
    .internal(),
];

fn main() -> anyhow::Result<()> {
    let args = Args::from_env(ABOUT, FLAGS)?;
    match args.get::<String>("--role")?.as_str() {
        "server" => return server_main(&args),
        "client" => return client_main(&args),
        "bench" => {}
        other => anyhow::bail!("unknown --role {other:?}"),
    }
    let opts = Opts {
        services: args.get("--services")?,
        idle: Duration::from_secs_f64(args.get("--idle")?),
        mem_rounds: args.get("--mem-rounds")?,
        starts: args.get("--starts")?,
        requests: args.get("--requests")?,
        rounds: args.get("--rounds")?,
        size: args.get("--size")?,
        peers: args.get("--peers")?,
        bulk_mib: args.get("--bulk-mib")?,
        agent_log: args.get("--agent-log")?,
        only: args.get("--only")?,
    };
    anyhow::ensure!(
        opts.only == "all"
            || opts
                .only
                .split(',')
                .all(|p| ["memory", "requests", "bulk", "tunnels"].contains(&p)),
        "--only {:?}: expected memory, requests, bulk or tunnels, or several joined by commas",
        opts.only
    );
    anyhow::ensure!(opts.bulk_mib >= 1, "--bulk-mib must be at least 1");
    anyhow::ensure!(
        (1..=200).contains(&opts.peers),
        "--peers must be between 1 and 200"
    );
    anyhow::ensure!(opts.services >= 1, "--services must be at least 1");
    anyhow::ensure!(opts.mem_rounds >= 1, "--mem-rounds must be at least 1");
    anyhow::ensure!(opts.starts >= 1, "--starts must be at least 1");
    anyhow::ensure!(opts.requests >= 1, "--requests must be at least 1");
    anyhow::ensure!(opts.rounds >= 1, "--rounds must be at least 1");
    anyhow::ensure!(opts.size >= 1, "--size must be at least 1");
    for p in ["ip", "nft", "getent"] {
        anyhow::ensure!(have(p), "{p} is not installed");
    }
    if opts.runs("requests") || opts.runs("bulk") {
        anyhow::ensure!(
            have("haproxy"),
            "haproxy is not installed (the requests and bulk runs measure two HAProxy hops beside the mesh)"
        );
    }
    let exe = std::env::current_exe()?;
    let agent = isthmus_tests::bench::sibling_binary("isthmus-vm-agent", "isthmus-vm-agent")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(until_stopped(run(&opts, &exe, &agent)))
}

struct Opts {
    services: usize,
    idle: Duration,
    mem_rounds: usize,
    starts: usize,
    requests: usize,
    rounds: usize,
    size: usize,
    /// Peer VMs the client's agent holds tunnels to in the fourth part.
    peers: usize,
    /// MiB each way of a bulk run.
    bulk_mib: usize,
    agent_log: String,
    /// `all`, or the parts to run, joined by commas: `memory` (the first two), `requests`
    /// (the third's requests), `bulk` (its bulk transfers), `tunnels` (the fourth).
    only: String,
}

impl Opts {
    fn runs(&self, part: &str) -> bool {
        self.only == "all" || self.only.split(',').any(|p| p == part)
    }
}

async fn run(opts: &Opts, exe: &Path, agent: &Path) -> anyhow::Result<()> {
    print_context(opts, agent);

    let mut memory: Vec<MemRow> = Vec::new();
    let mut ready: Vec<ReadyRow> = Vec::new();
    let catalogs = [
        (
            format!("{} services", thousands(opts.services)),
            opts.services,
        ),
        ("group only".to_string(), 0),
    ];
    for (label, n) in catalogs.iter().filter(|_| opts.runs("memory")) {
        eprintln!("memory and start-up with a catalog of {label}");
        let (m, rows, r) = memory_and_ready(opts, agent, label, *n).await?;
        memory.extend(rows);
        ready.extend(r);
        drop(m);
    }
    if opts.runs("memory") {
        print_memory(opts, &memory);
        print_ready(opts, &ready);
    }

    let mut rounds: Rounds = Default::default();
    let mut bulk: BulkRounds = Default::default();
    if opts.runs("requests") || opts.runs("bulk") {
        eprintln!("requests and bulk transfers through the mesh and direct");
        (rounds, bulk) = requests(opts, exe, agent).await?;
    }
    if opts.runs("requests") {
        print_requests(opts, &rounds);
    }
    if opts.runs("bulk") {
        print_bulk(opts, &bulk);
    }
    let mut warm = Vec::new();
    if opts.runs("tunnels") {
        eprintln!("idle memory with tunnels warm to {} peers", opts.peers);
        warm = warm_tunnels(opts, exe, agent).await?;
        print_warm(opts, &warm);
    }
    print_summary(opts, &memory, &ready, &rounds, &bulk, &warm);
    Ok(())
}

// ---- Context ----

fn print_context(opts: &Opts, agent: &Path) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "# VM agent benchmark: {cores} cores ({}{}, kernel {}), {} MiB of memory, {} clock ticks/s",
        cpu_model(),
        if virtualized() { ", virtualized" } else { "" },
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        mem_total_mib(),
        clock_ticks(),
    );
    println!(
        "# agent: {} ({:.1} MiB on disk), run as an operator does: capture nftables (the default), RUST_LOG={}, --worker-threads 1 (the default) unless a row says otherwise; glibc {}",
        first_line(agent, &["--version"]),
        std::fs::metadata(agent).map_or(0.0, |m| m.len() as f64 / 1048576.0),
        opts.agent_log,
        glibc_version(),
    );
    println!(
        "# memory: catalogs of {} ServiceEntries (one WorkloadEntry each) and of the VM's group only; {} starts per variant, {:.0} s idle before reading /proc/<pid>/status",
        thousands(opts.services),
        opts.mem_rounds,
        opts.idle.as_secs_f64()
    );
    println!(
        "# start to READY=1: {} starts per case; requests: {} sequential {}-byte requests with {}-byte replies per run, {} rounds",
        opts.starts, opts.requests, opts.size, opts.size, opts.rounds
    );
}

fn mem_total_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| status_field(&t, "MemTotal:"))
        .map_or(0, |kb| kb / 1024)
}

fn glibc_version() -> String {
    let line = first_line(Path::new("ldd"), &["--version"]);
    line.rsplit(' ').next().unwrap_or("?").to_string()
}

/// The first line a command prints (stdout, else stderr).
fn first_line(program: &Path, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default()
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ---- CPU ----

fn own_cpu() -> Duration {
    clock_gettime(ClockId::CLOCK_PROCESS_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

/// Busy time of all CPUs together, from /proc/stat.
fn machine_busy() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return Duration::ZERO;
    };
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return Duration::ZERO;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    Duration::from_secs_f64(busy as f64 / clock_ticks() as f64)
}

// ---- Agents ----

/// The agent in `vm`, as [`Vm::start_agent`] starts it, from `bin`.
fn start_agent(
    m: &Mesh,
    vm: &Vm,
    bin: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<ChildGuard> {
    let cmd = vm.agent_command(bin, args, env);
    m.topo.spawn(cmd).context("starting the agent")
}

/// SIGTERM, and waits for the agent to exit.
fn stop(vm: &Vm, agent: ChildGuard) -> anyhow::Result<()> {
    let _ = agent.signal(Signal::SIGTERM);
    let status = agent
        .wait_timeout(WAIT)
        .with_context(|| format!("the agent in {} did not stop\n{}", vm.name, log_tail(vm)))?;
    anyhow::ensure!(
        status.success(),
        "the agent in {} exited with {status}\n{}",
        vm.name,
        log_tail(vm)
    );
    Ok(())
}

fn log_tail(vm: &Vm) -> String {
    let text = vm.log();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Waits until the registry's view of network A holds both networks and `n` services with
/// an endpoint: the whole catalog is in, so an agent starting now gets it all at once.
async fn wait_catalog(m: &Mesh, n: usize) -> anyhow::Result<()> {
    let creds = m.reg.credentials("shop", "watcher").await?;
    let mut sub = m
        .reg
        .subscribe(&creds, &node("watcher", NodeKind::Workload, "network-a"))
        .await?;
    let complete = |sub: &isthmus_proto::subscription::Subscription| {
        let (mut networks, mut services) = (0, 0);
        for r in sub.view.resources.values() {
            match r {
                ViewResource::Network(_) => networks += 1,
                ViewResource::Service(sv) if !sv.endpoints.is_empty() => services += 1,
                ViewResource::Service(_) => {}
            }
        }
        networks >= 2 && services >= n
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while !complete(&sub) {
        tokio::time::timeout_at(deadline, sub.next())
            .await
            .context("the registry never held the whole catalog")??;
    }
    Ok(())
}

// ---- 1 and 2: memory and start-up ----

fn mem_catalog(n: usize) -> Vec<String> {
    let mut docs = vec![group_yaml(MEM_GROUP, MEM_GROUP, MEM_GROUP, APP_PORT, false)];
    for i in 0..n {
        let name = format!("svc-{i}");
        docs.push(yaml::service(&name, "bench", SVC_PORT));
        docs.push(yaml::workload(
            &format!("{name}-1"),
            "bench",
            &name,
            &format!("10.20.{}.{}", i / 250, i % 250 + 1),
            APP_PORT,
            "network-a",
        ));
    }
    docs
}

/// A row of the memory table: the agent with extra arguments and environment.
struct Variant {
    label: &'static str,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
}

const VARIANTS: [Variant; 4] = [
    Variant {
        label: "default",
        args: &[],
        env: &[],
    },
    Variant {
        label: "--worker-threads 2",
        args: &["--worker-threads", "2"],
        env: &[],
    },
    Variant {
        label: "MALLOC_ARENA_MAX=2",
        args: &[],
        env: &[("MALLOC_ARENA_MAX", "2")],
    },
    Variant {
        label: "both",
        args: &["--worker-threads", "2"],
        env: &[("MALLOC_ARENA_MAX", "2")],
    },
];

/// One idle agent's memory, in kB, from /proc/<pid>/status.
#[derive(Clone, Default)]
struct MemSample {
    rss: u64,
    hwm: u64,
    anon: u64,
    file: u64,
    /// Private_Dirty (smaps_rollup): pages only this process holds and that cannot simply be
    /// dropped (heap, stacks, written data).
    dirty: u64,
    threads: u64,
    /// Rss by mapping (the file's name, `[heap]`, `[anon]`…), largest first.
    by_mapping: Vec<(String, u64)>,
    /// VmRSS once `/config_dump` has been rendered.
    rss_after_dump: u64,
    destinations: usize,
    names: usize,
}

struct MemRow {
    catalog: String,
    variant: &'static str,
    sample: MemSample,
}

struct ReadyRow {
    catalog: String,
    case: &'static str,
    times: Vec<Duration>,
    /// Spawn to the agent's first notification of any kind (its supervisor running).
    first: Vec<Duration>,
    /// `ip netns exec <vm> true`, the launcher's own share of each spawn.
    launcher: Vec<Duration>,
}

fn status_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l[name.len()..].split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn proc_status(pid: u32) -> anyhow::Result<MemSample> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let f = |name| status_field(&text, name).unwrap_or(0);
    Ok(MemSample {
        rss: f("VmRSS:"),
        hwm: f("VmHWM:"),
        anon: f("RssAnon:"),
        file: f("RssFile:"),
        dirty: status_field(&rollup, "Private_Dirty:").unwrap_or(0),
        threads: f("Threads:"),
        by_mapping: rss_by_mapping(pid),
        ..MemSample::default()
    })
}

/// Rss (kB) of `pid` grouped by what is mapped, from /proc/<pid>/smaps, largest first.
fn rss_by_mapping(pid: u32) -> Vec<(String, u64)> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return Vec::new();
    };
    let mut sums: std::collections::BTreeMap<String, u64> = Default::default();
    let mut current = String::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            // address perms offset dev inode [pathname]
            current = match words.nth(4) {
                Some(path) if path.starts_with('/') => {
                    path.rsplit('/').next().unwrap_or(path).to_string()
                }
                Some(other) => other.to_string(),
                None => "[anon]".to_string(),
            };
        } else if first == "Rss:" {
            let kb: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            *sums.entry(current.clone()).or_default() += kb;
        }
    }
    let mut v: Vec<(String, u64)> = sums.into_iter().filter(|(_, kb)| *kb > 0).collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v
}

async fn memory_and_ready(
    opts: &Opts,
    bin: &Path,
    label: &str,
    n: usize,
) -> anyhow::Result<(Mesh, Vec<MemRow>, Vec<ReadyRow>)> {
    let m = Mesh::start_with(&format!("agent-bench-{n}"), &mem_catalog(n), |cfg| {
        // Nothing changes once the catalog is in: the registry stays idle.
        cfg.resource_poll = Duration::from_millis(500);
    })
    .await
    .context("network namespaces are unavailable (run as root with iproute2)")?;
    wait_catalog(&m, n).await?;
    let vm = Vm::create(&m, Net::A, "mem", MEM_VM, MEM_GROUP, MEM_GROUP);
    let log_env = ("RUST_LOG", opts.agent_log.as_str());

    // Enrolment, unmeasured: every measured start below finds its certificate.
    let agent = start_agent(&m, &vm, bin, &[], &[log_env])?;
    vm.wait_ready().await;
    stop(&vm, agent)?;

    let mut rows = Vec::new();
    for round in 0..opts.mem_rounds {
        for Variant {
            label: variant,
            args,
            env,
        } in VARIANTS
        {
            let mut env = env.to_vec();
            env.push(log_env);
            let agent = start_agent(&m, &vm, bin, args, &env)?;
            vm.wait_ready().await;
            tokio::time::sleep(opts.idle).await;
            let mut s = proc_status(agent.pid())?;
            let dump = vm.admin("/config_dump").await;
            s.destinations = dump["destinations"].as_array().map_or(0, Vec::len);
            s.names = dump["name_table"]["names"].as_array().map_or(0, Vec::len);
            s.rss_after_dump = proc_status(agent.pid())?.rss;
            stop(&vm, agent)?;
            anyhow::ensure!(
                s.destinations >= n && s.names >= n,
                "{label}, {variant}: the agent held {} destinations and {} names, not {n}",
                s.destinations,
                s.names
            );
            eprintln!(
                "  memory round {}/{}: {variant}: {} kB",
                round + 1,
                opts.mem_rounds,
                s.rss
            );
            rows.push(MemRow {
                catalog: label.to_string(),
                variant,
                sample: s,
            });
        }
    }

    let notify = NotifySocket::bind(&vm.dir)?;
    let mut ready = Vec::new();
    // The last two show whether READY waits for the agent's periodic self-check (every
    // min(5 s, watchdog / 2)): a short watchdog makes that check frequent.
    let cases = [
        ("restart", false, None),
        ("first start", true, None),
        ("restart, 0.2 s check", false, Some("400000")),
        ("first, 0.2 s check", true, Some("400000")),
    ];
    for (case, enrol, watchdog) in cases {
        let mut times = Vec::new();
        let mut first = Vec::new();
        let mut launcher = Vec::new();
        for _ in 0..opts.starts {
            if enrol {
                match std::fs::remove_dir_all(vm.state_dir()) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(e).context("emptying the state directory")
                    }
                    _ => {}
                }
                vm.onboard(&m, Duration::from_secs(600));
            }
            notify.drain();
            let mut env = vec![log_env, ("NOTIFY_SOCKET", notify.path_str()?)];
            if let Some(usec) = watchdog {
                env.push(("WATCHDOG_USEC", usec));
            }
            let started = Instant::now();
            let agent = start_agent(&m, &vm, bin, &[], &env)?;
            let got = tokio::task::block_in_place(|| notify.wait_ready(&agent, started, WAIT));
            let (at_first, at_ready) =
                got.with_context(|| format!("{label}, {case}: no READY=1\n{}", log_tail(&vm)))?;
            times.push(at_ready);
            first.push(at_first);
            stop(&vm, agent)?;
            launcher.push(tokio::task::block_in_place(|| launcher_cost(&vm))?);
        }
        eprintln!(
            "  start to READY, {case}: median {:.0} ms",
            median_d(&times).as_secs_f64() * 1000.0
        );
        ready.push(ReadyRow {
            catalog: label.to_string(),
            case,
            times,
            first,
            launcher,
        });
    }
    drop(vm);
    Ok((m, rows, ready))
}

/// How long `ip netns exec <vm> true` takes: the part of a spawn that is not the agent.
fn launcher_cost(vm: &Vm) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let status = vm
        .ns
        .command("true")
        .stdin(Stdio::null())
        .status()
        .context("ip netns exec")?;
    anyhow::ensure!(
        status.success(),
        "ip netns exec {} true failed",
        vm.ns.name()
    );
    Ok(started.elapsed())
}

/// The datagram socket standing in for systemd's.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).context("binding the notify socket")?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(Self { sock, path })
    }

    fn path_str(&self) -> anyhow::Result<&str> {
        self.path.to_str().context("the notify socket path")
    }

    /// Discards what earlier agents sent (STOPPING=1 and the like).
    fn drain(&self) {
        let mut buf = [0u8; 4096];
        while self.sock.recv(&mut buf).is_ok() {}
    }

    /// Waits for a READY=1 line: the times from `started` to the first notification and to
    /// READY=1; None if `agent` exits first or `limit` passes.
    fn wait_ready(
        &self,
        agent: &ChildGuard,
        started: Instant,
        limit: Duration,
    ) -> Option<(Duration, Duration)> {
        let mut first = None;
        let mut buf = [0u8; 4096];
        while started.elapsed() < limit {
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let at = started.elapsed();
                    let first = *first.get_or_insert(at);
                    if String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .any(|l| l == "READY=1")
                    {
                        return Some((first, at));
                    }
                }
                Err(_) => {
                    if agent.try_wait().is_some() {
                        return None;
                    }
                }
            }
        }
        None
    }
}

// ---- 3: requests ----

/// One run of the client: (mesh or direct) × (mode).
#[derive(Clone, Default)]
struct Run {
    wall: Duration,
    client_cpu: Duration,
    server_cpu: Duration,
    client_agent_cpu: Duration,
    server_agent_cpu: Duration,
    p50: Duration,
    p99: Duration,
    /// The rest of the machine, in cores.
    others: f64,
}

impl Run {
    fn agents(&self) -> Duration {
        self.client_agent_cpu + self.server_agent_cpu
    }

    fn total(&self) -> Duration {
        self.client_cpu + self.server_cpu + self.agents()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    NewConnection,
    Persistent,
    /// One connection carrying `--bulk-mib` each way at once (the server echoes as it reads).
    Bulk,
}

impl Mode {
    fn arg(self) -> &'static str {
        match self {
            Mode::NewConnection => "new",
            Mode::Persistent => "persistent",
            Mode::Bulk => "bulk",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Mode::NewConnection => "a new TCP connection per request",
            Mode::Persistent => "one persistent connection",
            Mode::Bulk => "bulk both ways on one connection",
        }
    }
}

const MODES: [Mode; 2] = [Mode::NewConnection, Mode::Persistent];
/// The mesh over the pooled QUIC tunnel between the agents, over the pooled HTTP/2 tunnel
/// (to the server whose agent takes HTTP/2 alone), with an mTLS connection per connection
/// (to the server whose agent takes no tunnels); two plain-TCP HAProxy hops in place of the
/// two agents (no TLS, no capture: what any pair of user-space proxies costs at least); and
/// no proxy.
const PATHS: [&str; 5] = ["quic", "hbone", "mtls", "haproxy", "direct"];
const QUIC: usize = 0;
const HBONE: usize = 1;
const MTLS: usize = 2;
const HAPROXY: usize = 3;
const DIRECT: usize = 4;
/// Where the client VM's HAProxy listens (on its loopback) and the server VM's (on its
/// address): ports outside every group's, so nothing captures them.
const HAPROXY_CLIENT_PORT: u16 = 7001;
const HAPROXY_SERVER_PORT: u16 = 7002;

/// Every run, by path and mode: `runs[path][mode]` holds one [`Run`] per round.
type Rounds = [[Vec<Run>; 2]; 5];
/// Per path, the bulk runs.
type BulkRounds = [Vec<Run>; 5];

/// A HAProxy forwarding TCP from `bind` to `to`, one thread, no logging, in `vm`.
fn haproxy_in(
    m: &Mesh,
    vm: &Vm,
    dir: &Path,
    bind: SocketAddr,
    to: SocketAddr,
) -> anyhow::Result<ChildGuard> {
    let conf = dir.join(format!("haproxy-{}.cfg", bind.port()));
    std::fs::write(
        &conf,
        format!(
            "global\n  nbthread 1\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
             timeout client 60s\n  timeout server 60s\nfrontend in\n  bind {bind}\n  \
             default_backend out\nbackend out\n  server app {to}\n"
        ),
    )?;
    let mut cmd = vm.ns.command("haproxy");
    cmd.arg("-db")
        .arg("-f")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    m.topo.spawn(cmd).context("starting haproxy")
}

fn req_catalog() -> Vec<String> {
    vec![
        group_yaml("client", "client", "client", CLIENT_APP_PORT, false),
        group_yaml("echo", "echo", "echo", APP_PORT, false),
        group_yaml("echo-mtls", "echo-mtls", "echo-mtls", APP_PORT, false),
        group_yaml("echo-h2", "echo-h2", "echo-h2", APP_PORT, false),
        yaml::service("echo", "shop", SVC_PORT),
        yaml::service("echo-mtls", "shop", SVC_PORT),
        yaml::service("echo-h2", "shop", SVC_PORT),
    ]
}

struct Scene<'a> {
    exe: &'a Path,
    client: &'a Vm,
    opts: &'a Opts,
}

/// One path: where the client connects, and the client agent's, server agent's and
/// server's processes.
struct PathUnder {
    addr: SocketAddr,
    pids: [u32; 3],
}

impl Scene<'_> {
    /// The client binary in the client VM, sending `n` requests to `addr` after `warmup`
    /// unmeasured ones; `at_go` runs once the warm-up is done, just before the measured
    /// requests start. Returns what the client reported.
    fn client(
        &self,
        addr: SocketAddr,
        mode: Mode,
        n: usize,
        warmup: usize,
        at_go: impl FnOnce(),
    ) -> anyhow::Result<ClientReport> {
        use std::io::BufRead;
        let mut child = ServerProcess::new(
            self.client
                .ns
                .command(self.exe)
                .args(["--role", "client", "--addr", &addr.to_string()])
                .args(["--mode", mode.arg()])
                .args(["--requests", &n.to_string()])
                .args(["--warmup", &warmup.to_string()])
                .args(["--size", &self.opts.size.to_string()])
                .args(["--bytes", &(self.opts.bulk_mib << 20).to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("running the client")?,
        );
        let mut stdin = child.stdin.take().context("client stdin")?;
        let mut stdout = std::io::BufReader::new(child.stdout.take().context("client stdout")?);
        let mut stderr = child.stderr.take().context("client stderr")?;
        let failed = |mut stderr: std::process::ChildStderr, what: &str| {
            let mut err = String::new();
            let _ = stderr.read_to_string(&mut err);
            anyhow::anyhow!("the client to {addr} {what}: {}", err.trim())
        };
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if line.trim() != "WARM" {
            return Err(failed(stderr, "failed while warming up"));
        }
        at_go();
        stdin.write_all(b"go\n")?;
        stdin.flush()?;
        let mut text = String::new();
        stdout.read_to_string(&mut text)?;
        let status = child.wait()?;
        if !status.success() {
            return Err(failed(stderr, "failed"));
        }
        let _ = stderr.read_to_string(&mut String::new());
        ClientReport::parse(&text)
    }

    /// One measured run.
    fn run(&self, path: &PathUnder, mode: Mode) -> anyhow::Result<Run> {
        let (addr, pids) = (path.addr, path.pids);
        let cpus = || -> anyhow::Result<[Duration; 3]> {
            Ok([cpu_ns_of(pids[0]), cpu_ns_of(pids[1]), cpu_ns_of(pids[2])])
        };
        let mut start = None;
        let r = self.client(
            addr,
            mode,
            self.opts.requests,
            self.opts.requests / 10,
            || start = Some((machine_busy(), own_cpu(), Instant::now(), cpus())),
        )?;
        let (busy0, own0, at, before) = start.context("the client never started")?;
        let before = before?;
        std::thread::sleep(SETTLE);
        let after = cpus()?;
        let (busy, own, wall) = (
            machine_busy().saturating_sub(busy0),
            own_cpu().saturating_sub(own0),
            at.elapsed(),
        );
        let d = |i: usize| after[i].saturating_sub(before[i]);
        let run = Run {
            wall: r.wall,
            client_cpu: r.cpu,
            server_cpu: d(2),
            client_agent_cpu: d(0),
            server_agent_cpu: d(1),
            p50: r.p50,
            p99: r.p99,
            others: 0.0,
        };
        // The client's exit and this process's waiting are in `busy` too.
        let measured = run.total() + own;
        let others = busy.saturating_sub(measured).as_secs_f64() / wall.as_secs_f64();
        Ok(Run { others, ..run })
    }
}

/// Whether `vm`'s agent has recorded a connection in `direction`.
async fn recorded(vm: &Vm, direction: &str) -> bool {
    vm.admin("/debug/connections")
        .await
        .as_array()
        .is_some_and(|a| a.iter().any(|c| c["direction"] == direction))
}

async fn requests(opts: &Opts, exe: &Path, bin: &Path) -> anyhow::Result<(Rounds, BulkRounds)> {
    let m = Mesh::start_with("agent-bench-requests", &req_catalog(), |cfg| {
        cfg.resource_poll = Duration::from_millis(500);
    })
    .await
    .context("network namespaces are unavailable (run as root with iproute2)")?;
    wait_catalog(&m, 0).await?;
    let client = Vm::create(&m, Net::A, "client", CLIENT_VM, "client", "client");
    let server = Vm::create(&m, Net::A, "echo", SERVER_VM, "echo", "echo");
    let mtls_server = Vm::create(
        &m,
        Net::A,
        "echo-mtls",
        MTLS_SERVER_VM,
        "echo-mtls",
        "echo-mtls",
    );
    let h2_server = Vm::create(&m, Net::A, "echo-h2", H2_SERVER_VM, "echo-h2", "echo-h2");
    let app_in = |vm: &Vm| -> anyhow::Result<ChildGuard> {
        let mut app = vm.ns.command(exe);
        app.args(["--role", "server"])
            .args([
                "--listen",
                &format!("0.0.0.0:{APP_PORT},0.0.0.0:{DIRECT_PORT}"),
            ])
            .args(["--size", &opts.size.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        m.topo.spawn(app).context("starting the server")
    };
    let (app, mtls_app, h2_app) = (app_in(&server)?, app_in(&mtls_server)?, app_in(&h2_server)?);
    let log_env = [("RUST_LOG", opts.agent_log.as_str())];
    let server_agent = start_agent(&m, &server, bin, &[], &log_env)?;
    let mtls_agent = start_agent(&m, &mtls_server, bin, &["--tunnel-port", "0"], &log_env)?;
    let h2_agent = start_agent(
        &m,
        &h2_server,
        bin,
        &["--tunnel-transports", "h2"],
        &log_env,
    )?;
    let client_agent = start_agent(&m, &client, bin, &[], &log_env)?;
    server.wait_ready().await;
    mtls_server.wait_ready().await;
    h2_server.wait_ready().await;
    client.wait_ready().await;

    let dir = tempfile::tempdir()?;
    let haproxy_server = haproxy_in(
        &m,
        &server,
        dir.path(),
        SocketAddr::from((SERVER_VM, HAPROXY_SERVER_PORT)),
        SocketAddr::from((Ipv4Addr::LOCALHOST, DIRECT_PORT)),
    )?;
    let haproxy_client = haproxy_in(
        &m,
        &client,
        dir.path(),
        SocketAddr::from((Ipv4Addr::LOCALHOST, HAPROXY_CLIENT_PORT)),
        SocketAddr::from((SERVER_VM, HAPROXY_SERVER_PORT)),
    )?;

    let vip = |name: &str| vip_in(&client, name);
    let client_pid = client_agent.pid();
    let paths = [
        PathUnder {
            addr: vip("echo")?,
            pids: [client_pid, server_agent.pid(), app.pid()],
        },
        PathUnder {
            addr: vip("echo-h2")?,
            pids: [client_pid, h2_agent.pid(), h2_app.pid()],
        },
        PathUnder {
            addr: vip("echo-mtls")?,
            pids: [client_pid, mtls_agent.pid(), mtls_app.pid()],
        },
        PathUnder {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, HAPROXY_CLIENT_PORT)),
            pids: [haproxy_client.pid(), haproxy_server.pid(), app.pid()],
        },
        PathUnder {
            addr: SocketAddr::from((SERVER_VM, DIRECT_PORT)),
            pids: [client_pid, server_agent.pid(), app.pid()],
        },
    ];
    println!(
        "\n# requests: client VM {CLIENT_VM}; quic path: echo.shop.svc.cluster.local = {} (VIP, captured outbound) -> client agent -> a stream of the pooled QUIC tunnel -> server agent at {SERVER_VM} -> 127.0.0.1:{APP_PORT}; hbone path: echo-h2.shop.svc.cluster.local = {} -> client agent -> a stream of the pooled HTTP/2 tunnel -> server agent at {H2_SERVER_VM} (--tunnel-transports h2) -> 127.0.0.1:{APP_PORT}; mtls path: echo-mtls.shop.svc.cluster.local = {} -> client agent -> an mTLS connection of its own -> {MTLS_SERVER_VM}:{APP_PORT} (captured inbound; that agent runs with --tunnel-port 0) -> 127.0.0.1:{APP_PORT}; haproxy path: {} (the client VM's HAProxy) -> {SERVER_VM}:{HAPROXY_SERVER_PORT} (the server VM's) -> 127.0.0.1:{DIRECT_PORT}, plain TCP, one thread each, not captured; direct path: {} (not captured); {} unmeasured requests before each run",
        paths[QUIC].addr,
        paths[HBONE].addr,
        paths[MTLS].addr,
        paths[HAPROXY].addr,
        paths[DIRECT].addr,
        opts.requests / 10
    );

    let scene = Scene {
        exe,
        client: &client,
        opts,
    };
    // The servers register once their agents are up; the client agent then routes to them.
    for path in &paths[..DIRECT] {
        let deadline = Instant::now() + WAIT;
        loop {
            match tokio::task::block_in_place(|| {
                scene.client(path.addr, Mode::NewConnection, 10, 0, || {})
            }) {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => {
                    let logs = [
                        log_tail(&client),
                        log_tail(&server),
                        log_tail(&mtls_server),
                        log_tail(&h2_server),
                    ];
                    let why = format!("the mesh path to {} never worked", path.addr);
                    return Err(e.context(format!("{why}\nagents' logs:\n{}", logs.join("\n"))));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    tokio::task::block_in_place(|| {
        scene.client(paths[DIRECT].addr, Mode::NewConnection, 10, 0, || {})
    })
    .context("the direct path")?;
    // The agents carried the mesh paths' connections, the first over a tunnel.
    anyhow::ensure!(
        recorded(&client, "outbound").await
            && recorded(&server, "inbound").await
            && recorded(&mtls_server, "inbound").await
            && recorded(&h2_server, "inbound").await,
        "the agents did not record the mesh paths' connections"
    );
    let text = client.metrics().await;
    for transport in ["quic", "hbone"] {
        anyhow::ensure!(
            text.contains(&format!(
                "isthmus_vm_agent_tunnel_streams_total{{role=\"client\",transport=\"{transport}\",peer="
            )),
            "the {transport} path took no {transport} tunnel:\n{text}"
        );
    }

    let mut rounds: Rounds = Default::default();
    for round in (0..opts.rounds).filter(|_| opts.runs("requests")) {
        for i in 0..PATHS.len() {
            // Each round starts with another path.
            let p = (round + i) % PATHS.len();
            for (k, mode) in MODES.iter().enumerate() {
                let r = tokio::task::block_in_place(|| scene.run(&paths[p], *mode)).with_context(
                    || format!("{}, {}, round {}", PATHS[p], mode.arg(), round + 1),
                )?;
                eprintln!(
                    "  round {}/{}: {} {}: {:.0} requests/s",
                    round + 1,
                    opts.rounds,
                    PATHS[p],
                    mode.arg(),
                    opts.requests as f64 / r.wall.as_secs_f64()
                );
                rounds[p][k].push(r);
            }
        }
    }
    let mut bulk: BulkRounds = Default::default();
    for round in (0..opts.rounds).filter(|_| opts.runs("bulk")) {
        for i in 0..PATHS.len() {
            let p = (round + i) % PATHS.len();
            let r = tokio::task::block_in_place(|| scene.run(&paths[p], Mode::Bulk))
                .with_context(|| format!("{}, bulk, round {}", PATHS[p], round + 1))?;
            eprintln!(
                "  round {}/{}: {} bulk: {:.0} MB/s each way",
                round + 1,
                opts.rounds,
                PATHS[p],
                (opts.bulk_mib << 20) as f64 / 1e6 / r.wall.as_secs_f64()
            );
            bulk[p].push(r);
        }
    }
    drop(haproxy_client);
    drop(haproxy_server);
    stop(&mtls_server, mtls_agent)?;
    drop(mtls_app);
    drop(mtls_server);
    stop(&h2_server, h2_agent)?;
    drop(h2_app);
    drop(h2_server);
    stop(&client, client_agent)?;
    stop(&server, server_agent)?;
    drop(app);
    drop(client);
    drop(server);
    drop(m);
    Ok((rounds, bulk))
}

/// The service `name`'s VIP and port, as `client` resolves it (through its agent's DNS).
fn vip_in(client: &Vm, name: &str) -> anyhow::Result<SocketAddr> {
    let (ok, out, err) = tokio::task::block_in_place(|| {
        client.sh(&format!("getent ahostsv4 {name}.shop.svc.cluster.local"))
    });
    anyhow::ensure!(ok, "cannot resolve {name} in the client VM: {err}");
    let vip: Ipv4Addr = out
        .split_whitespace()
        .next()
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("no address in {out:?}"))?;
    anyhow::ensure!(vip.octets()[0] == 240, "{vip} is not a mesh VIP: {out}");
    Ok(SocketAddr::from((vip, SVC_PORT)))
}

// ---- 4: idle memory with tunnels warm ----

/// The fourth part's peer `i`: its VM's address and its group (and service) name.
fn warm_peer(i: usize) -> (Ipv4Addr, String) {
    (Ipv4Addr::new(10, 10, 0, 20 + i as u8), format!("peer-{i}"))
}

/// One transport's readings, one per start: the client agent's memory before its first
/// tunnel (`cold`) and with one warm to every peer (`hot`).
struct WarmRow {
    transport: &'static str,
    cold: Vec<MemSample>,
    hot: Vec<MemSample>,
}

impl WarmRow {
    /// The median of each field, before and with the tunnels.
    fn medians(&self) -> (MemSample, MemSample) {
        (median_sample(&self.cold), median_sample(&self.hot))
    }
}

/// The median of each `/proc/<pid>/status` field of `samples`.
fn median_sample(samples: &[MemSample]) -> MemSample {
    let m = |pick: fn(&MemSample) -> u64| {
        median(samples.iter().map(|s| pick(s) as f64).collect()) as u64
    };
    MemSample {
        rss: m(|s| s.rss),
        hwm: m(|s| s.hwm),
        anon: m(|s| s.anon),
        file: m(|s| s.file),
        dirty: m(|s| s.dirty),
        threads: m(|s| s.threads),
        ..MemSample::default()
    }
}

async fn warm_tunnels(opts: &Opts, exe: &Path, bin: &Path) -> anyhow::Result<Vec<WarmRow>> {
    let mut catalog = vec![group_yaml(
        "client",
        "client",
        "client",
        CLIENT_APP_PORT,
        false,
    )];
    for i in 0..opts.peers {
        let (_, name) = warm_peer(i);
        catalog.push(group_yaml(&name, &name, &name, APP_PORT, false));
        catalog.push(yaml::service(&name, "shop", SVC_PORT));
    }
    let m = Mesh::start_with("agent-bench-tunnels", &catalog, |cfg| {
        cfg.resource_poll = Duration::from_millis(500);
    })
    .await
    .context("network namespaces are unavailable (run as root with iproute2)")?;
    wait_catalog(&m, 0).await?;
    let log_env = [("RUST_LOG", opts.agent_log.as_str())];
    let mut peers = Vec::new();
    for i in 0..opts.peers {
        let (ip, name) = warm_peer(i);
        let vm = Vm::create(&m, Net::A, &name, ip, &name, &name);
        let mut app = vm.ns.command(exe);
        app.args([
            "--role",
            "server",
            "--listen",
            &format!("0.0.0.0:{APP_PORT}"),
        ])
        .args(["--size", &opts.size.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
        let app = m.topo.spawn(app).context("starting a peer's server")?;
        let agent = start_agent(&m, &vm, bin, &[], &log_env)?;
        peers.push((vm, app, agent));
    }
    for (vm, _, _) in &peers {
        vm.wait_ready().await;
    }
    let client = Vm::create(&m, Net::A, "client", CLIENT_VM, "client", "client");
    // Enrolment and the peers' endpoints, unmeasured: one request to each over QUIC.
    let agent = start_agent(&m, &client, bin, &[], &log_env)?;
    client.wait_ready().await;
    let scene = Scene {
        exe,
        client: &client,
        opts,
    };
    let mut addrs = Vec::new();
    for i in 0..opts.peers {
        let addr = vip_in(&client, &warm_peer(i).1)?;
        let deadline = Instant::now() + WAIT;
        while let Err(e) =
            tokio::task::block_in_place(|| scene.client(addr, Mode::NewConnection, 1, 0, || {}))
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "peer {i} ({addr}) was never reached: {e:#}\n{}",
                log_tail(&client)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        addrs.push(addr);
    }
    stop(&client, agent)?;

    let mut rows = Vec::new();
    for transport in ["quic", "h2"] {
        let mut row = WarmRow {
            transport,
            cold: Vec::new(),
            hot: Vec::new(),
        };
        for round in 0..opts.mem_rounds {
            let agent = start_agent(
                &m,
                &client,
                bin,
                &["--tunnel-transports", transport],
                &log_env,
            )?;
            client.wait_ready().await;
            tokio::time::sleep(opts.idle).await;
            let cold = proc_status(agent.pid())?;
            for addr in &addrs {
                tokio::task::block_in_place(|| {
                    scene.client(*addr, Mode::NewConnection, 10, 0, || {})
                })
                .with_context(|| format!("{transport}: requests to {addr}"))?;
            }
            tokio::time::sleep(opts.idle).await;
            let hot = proc_status(agent.pid())?;
            let tunnels = client.admin("/debug/tunnels").await;
            let open: Vec<&serde_json::Value> = tunnels["tunnels"]
                .as_array()
                .map(|a| a.iter().collect())
                .unwrap_or_default();
            let wanted = if transport == "h2" { "hbone" } else { "quic" };
            anyhow::ensure!(
                open.len() == opts.peers && open.iter().all(|t| t["transport"] == wanted),
                "{transport}: the client agent held other tunnels than one {wanted} tunnel to each of {} peers: {tunnels:#}",
                opts.peers
            );
            stop(&client, agent)?;
            eprintln!(
                "  tunnels round {}/{}: {transport}: {} kB before, {} kB with {} tunnels",
                round + 1,
                opts.mem_rounds,
                cold.rss,
                hot.rss,
                opts.peers
            );
            row.cold.push(cold);
            row.hot.push(hot);
        }
        rows.push(row);
    }
    for (vm, app, agent) in peers {
        stop(&vm, agent)?;
        drop(app);
        drop(vm);
    }
    drop(client);
    drop(m);
    Ok(rows)
}

fn print_warm(opts: &Opts, rows: &[WarmRow]) {
    println!(
        "\n## Idle memory with tunnels warm: the client agent, median of {} starts, {:.0} s idle before each reading (MiB)",
        opts.mem_rounds,
        opts.idle.as_secs_f64()
    );
    println!(
        "{:<10} {:<22} {:>7} {:>7} {:>8} {:>8} {:>10} {:>7}",
        "transport", "tunnels", "VmRSS", "VmHWM", "RssAnon", "RssFile", "PrivDirty", "Threads"
    );
    for row in rows {
        let (cold, hot) = row.medians();
        for (label, s) in [
            ("none yet".to_string(), cold),
            (format!("1 to each of {} peers", opts.peers), hot),
        ] {
            println!(
                "{:<10} {:<22} {:>7} {:>7} {:>8} {:>8} {:>10} {:>7}",
                row.transport,
                label,
                mib(s.rss as f64),
                mib(s.hwm as f64),
                mib(s.anon as f64),
                mib(s.file as f64),
                mib(s.dirty as f64),
                s.threads
            );
        }
    }
    println!(
        "notes: each peer is a VM with its own agent (default transports) and an echo server; the client's tunnels were opened by ten requests on new connections to each peer's service and were still open (their idle timeout is 60 s) when read; VmHWM is the peak since the agent started"
    );
}

// ---- Client and server roles (run by the benchmark inside the VMs) ----

/// What the client prints: `RESULT wall_ns=… cpu_ns=… p50_ns=… p99_ns=…`.
struct ClientReport {
    wall: Duration,
    cpu: Duration,
    p50: Duration,
    p99: Duration,
}

impl ClientReport {
    fn parse(text: &str) -> anyhow::Result<Self> {
        let line = text
            .lines()
            .find(|l| l.starts_with("RESULT "))
            .with_context(|| format!("no RESULT line in {text:?}"))?;
        let field = |name: &str| -> anyhow::Result<Duration> {
            let v = line
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .with_context(|| format!("no {name} in {line:?}"))?;
            Ok(Duration::from_nanos(v.parse()?))
        };
        Ok(Self {
            wall: field("wall_ns")?,
            cpu: field("cpu_ns")?,
            p50: field("p50_ns")?,
            p99: field("p99_ns")?,
        })
    }
}

/// `--role client`: sequential requests with blocking sockets, one request in flight.
fn client_main(args: &Args) -> anyhow::Result<()> {
    let addr: SocketAddr = args.get("--addr")?;
    let n: usize = args.get("--requests")?;
    let warmup: usize = args.get("--warmup")?;
    let size: usize = args.get("--size")?;
    let mode: String = args.get("--mode")?;
    let bytes: u64 = args.get("--bytes")?;
    let persistent = mode == "persistent";
    let msg: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let mut back = vec![0u8; size];
    let connect = || -> anyhow::Result<TcpStream> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(s)
    };
    let mut exchange = |s: &mut TcpStream| -> anyhow::Result<()> {
        s.write_all(&msg)?;
        s.read_exact(&mut back).context("reading the reply")?;
        anyhow::ensure!(back == msg, "the reply differs from the request");
        Ok(())
    };
    // Tells the benchmark the warm-up is done and waits for its go (it reads the other
    // processes' CPU in between).
    let ready = || -> anyhow::Result<()> {
        println!("WARM");
        std::io::stdout().flush()?;
        let mut go = String::new();
        std::io::stdin().read_line(&mut go)?;
        anyhow::ensure!(go.trim() == "go", "no go from the benchmark");
        Ok(())
    };
    let mut latencies: Vec<Duration> = Vec::with_capacity(n);
    let (wall, cpu) = if mode == "bulk" {
        let s = connect()?;
        ready()?;
        let (t0, c0) = (Instant::now(), own_cpu());
        let echoed = bulk_echo(s, bytes)?;
        anyhow::ensure!(echoed == bytes, "{echoed} bytes echoed of {bytes}");
        latencies.push(t0.elapsed());
        (t0.elapsed(), own_cpu().saturating_sub(c0))
    } else if persistent {
        let mut s = connect()?;
        for _ in 0..warmup {
            exchange(&mut s)?;
        }
        ready()?;
        let (t0, c0) = (Instant::now(), own_cpu());
        for _ in 0..n {
            let t = Instant::now();
            exchange(&mut s)?;
            latencies.push(t.elapsed());
        }
        (t0.elapsed(), own_cpu().saturating_sub(c0))
    } else {
        for _ in 0..warmup {
            exchange(&mut connect()?)?;
        }
        ready()?;
        let (t0, c0) = (Instant::now(), own_cpu());
        for _ in 0..n {
            let t = Instant::now();
            let mut s = connect()?;
            exchange(&mut s)?;
            drop(s);
            latencies.push(t.elapsed());
        }
        (t0.elapsed(), own_cpu().saturating_sub(c0))
    };
    latencies.sort_unstable();
    let pct = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    println!(
        "RESULT wall_ns={} cpu_ns={} p50_ns={} p99_ns={}",
        wall.as_nanos(),
        cpu.as_nanos(),
        pct(50).as_nanos(),
        pct(99).as_nanos()
    );
    Ok(())
}

/// Writes `bytes` on `s` (then its FIN) from one thread while reading the echo on this one
/// until the server's FIN: the bytes that came back.
fn bulk_echo(s: TcpStream, bytes: u64) -> anyhow::Result<u64> {
    const CHUNK: usize = 256 << 10;
    let mut w = s.try_clone()?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let chunk: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            w.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        w.shutdown(std::net::Shutdown::Write)
    });
    let mut r = s;
    r.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    loop {
        let n = r.read(&mut buf).context("reading the echo")?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the writer panicked"))?
        .context("writing")?;
    Ok(got)
}

/// `--role server`: on every `--listen` address, echoes what it reads as it reads it (a
/// `--size`-byte request gets its same-size reply), and ends its side at the client's FIN.
fn server_main(args: &Args) -> anyhow::Result<()> {
    let size: usize = args.get("--size")?;
    let listen: Vec<SocketAddr> = args.get_list("--listen")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for addr in listen {
            let l = tokio::net::TcpListener::bind(addr).await?;
            tokio::spawn(async move {
                loop {
                    let Ok((mut s, _)) = l.accept().await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let _ = s.set_nodelay(true);
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; size.max(64 << 10)];
                        loop {
                            match s.read(&mut buf).await {
                                Ok(0) => break,
                                Ok(n) => {
                                    if s.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                                Err(_) => return,
                            }
                        }
                        let _ = s.shutdown().await;
                    });
                }
            });
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        term.recv().await;
        anyhow::Ok(())
    })
}

// ---- Output ----

fn median_d(v: &[Duration]) -> Duration {
    Duration::from_secs_f64(median(v.iter().map(Duration::as_secs_f64).collect()))
}

fn mib(kb: f64) -> String {
    format!("{:.1}", kb / 1024.0)
}

fn print_memory(opts: &Opts, rows: &[MemRow]) {
    println!(
        "\n## Idle memory: median of {} starts, {:.0} s after ready (MiB; /proc/<pid>/status)",
        opts.mem_rounds,
        opts.idle.as_secs_f64()
    );
    println!(
        "{:<16} {:<20} {:>6} {:>6} {:>7} {:>11} {:>7} {:>8} {:>8} {:>10} {:>7} {:>10}",
        "catalog",
        "variant",
        "dests",
        "names",
        "VmRSS",
        "(min-max)",
        "VmHWM",
        "RssAnon",
        "RssFile",
        "PrivDirty",
        "threads",
        "after dump"
    );
    let mut groups: Vec<(&str, &str)> = Vec::new();
    for r in rows {
        if !groups.contains(&(r.catalog.as_str(), r.variant)) {
            groups.push((r.catalog.as_str(), r.variant));
        }
    }
    let mut default_rss: Vec<(&str, f64)> = Vec::new();
    for (catalog, variant) in groups {
        let s: Vec<&MemSample> = rows
            .iter()
            .filter(|r| r.catalog == catalog && r.variant == variant)
            .map(|r| &r.sample)
            .collect();
        let m = |pick: fn(&MemSample) -> u64| median(s.iter().map(|x| pick(x) as f64).collect());
        let lo = s.iter().map(|x| x.rss).min().unwrap_or(0) as f64;
        let hi = s.iter().map(|x| x.rss).max().unwrap_or(0) as f64;
        println!(
            "{catalog:<16} {variant:<20} {:>6.0} {:>6.0} {:>7} {:>11} {:>7} {:>8} {:>8} {:>10} {:>7.0} {:>10}",
            m(|x| x.destinations as u64),
            m(|x| x.names as u64),
            mib(m(|x| x.rss)),
            format!("{}-{}", mib(lo), mib(hi)),
            mib(m(|x| x.hwm)),
            mib(m(|x| x.anon)),
            mib(m(|x| x.file)),
            mib(m(|x| x.dirty)),
            m(|x| x.threads),
            mib(m(|x| x.rss_after_dump)),
        );
        if variant == "default" {
            default_rss.push((catalog, m(|x| x.rss)));
        }
    }
    if let [(big, b), (small, s)] = default_rss[..] {
        println!(
            "default agent: {} MiB with {big}, {} MiB with the {small}: the catalog adds {} MiB ({:.1} KiB per service); goal <= 12 MiB: x{:.2} of it",
            mib(b),
            mib(s),
            mib(b - s),
            (b - s) / opts.services as f64,
            b / 1024.0 / 12.0
        );
    }
    // The make-up of one start per catalog (the first with the default settings).
    let mut shown: Vec<&str> = Vec::new();
    for r in rows.iter().filter(|r| r.variant == "default") {
        if shown.contains(&r.catalog.as_str()) || r.sample.by_mapping.is_empty() {
            continue;
        }
        shown.push(&r.catalog);
        let top: Vec<String> = r
            .sample
            .by_mapping
            .iter()
            .take(6)
            .map(|(name, kb)| format!("{name} {}", mib(*kb as f64)))
            .collect();
        let rest: u64 = r.sample.by_mapping.iter().skip(6).map(|(_, kb)| kb).sum();
        println!(
            "RSS by mapping, {}, default, first start (MiB): {}, the rest {}",
            r.catalog,
            top.join(", "),
            mib(rest as f64)
        );
    }
    println!(
        "notes: dests/names are what /config_dump showed after the reading (routing-table destinations, DNS names); RssFile is the mapped binary and libraries (clean pages of the page cache, shared and reclaimable), RssAnon the heap and stacks, PrivDirty what only this process holds (smaps_rollup); \"after dump\" is VmRSS once /config_dump has been rendered; 1 MiB = 1,048,576 bytes"
    );
}

fn print_ready(opts: &Opts, rows: &[ReadyRow]) {
    println!(
        "\n## Start to READY=1 (sd_notify): median of {} starts (ms)",
        opts.starts
    );
    println!(
        "{:<16} {:<21} {:>8} {:>8} {:>8} {:>20} {:>14}",
        "catalog", "case", "median", "min", "max", "first notification", "ip netns exec"
    );
    for r in rows {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{:<16} {:<21} {:>8.0} {:>8.0} {:>8.0} {:>20.0} {:>14.1}",
            r.catalog,
            r.case,
            ms(median_d(&r.times)),
            ms(*r.times.iter().min().expect("a start")),
            ms(*r.times.iter().max().expect("a start")),
            ms(median_d(&r.first)),
            ms(median_d(&r.launcher)),
        );
    }
    println!(
        "notes: from spawning `ip netns exec <vm> isthmus-vm-agent run …` to the READY=1 datagram; \"first notification\" is the median time to the agent's first datagram of any kind (its supervisor is running; STATUS=waiting for the first catalog, or READY at once); \"ip netns exec\" is the median of `ip netns exec <vm> true`, the launcher's share; a restart finds its certificate and catalog snapshot in the state directory (registry up); a first start has an empty state directory and a fresh token, so it generates a key, requests its certificate with the token and saves both; READY=1 comes once certificate, catalog and captured addresses are in place; the \"0.2 s check\" cases set WATCHDOG_USEC=400000, which makes the agent's periodic self-check (otherwise every 5 s) run every 0.2 s: if READY waited for that check, they would be faster"
    );
}

fn print_requests(opts: &Opts, rounds: &Rounds) {
    type Pick = fn(&Run, f64) -> f64;
    let figures: [(&str, Pick); 11] = [
        ("requests/s", |r, n| n / r.wall.as_secs_f64()),
        ("latency p50 (µs)", |r, _| r.p50.as_secs_f64() * 1e6),
        ("latency p99 (µs)", |r, _| r.p99.as_secs_f64() * 1e6),
        ("client CPU (ms/1k)", |r, n| {
            r.client_cpu.as_secs_f64() * 1e6 / n
        }),
        ("server CPU (ms/1k)", |r, n| {
            r.server_cpu.as_secs_f64() * 1e6 / n
        }),
        ("client agent CPU (ms/1k)", |r, n| {
            r.client_agent_cpu.as_secs_f64() * 1e6 / n
        }),
        ("server agent CPU (ms/1k)", |r, n| {
            r.server_agent_cpu.as_secs_f64() * 1e6 / n
        }),
        ("both agents CPU (ms/1k)", |r, n| {
            r.agents().as_secs_f64() * 1e6 / n
        }),
        ("total CPU (ms/1k)", |r, n| {
            r.total().as_secs_f64() * 1e6 / n
        }),
        ("wall (ms)", |r, _| r.wall.as_secs_f64() * 1000.0),
        ("others (% of a core)", |r, _| r.others * 100.0),
    ];
    let n = opts.requests as f64;
    for (k, mode) in MODES.iter().enumerate() {
        println!(
            "\n## {} sequential requests, {}: median of {} rounds",
            thousands(opts.requests),
            mode.title(),
            opts.rounds
        );
        println!(
            "{:<28} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12} {:>13} {:>12} {:>15} {:>11} {:>11} {:>14}",
            "",
            "quic",
            "hbone",
            "mtls",
            "haproxy",
            "direct",
            "quic/direct",
            "hbone/direct",
            "mtls/direct",
            "haproxy/direct",
            "quic/mtls",
            "quic/hbone",
            "hbone/haproxy"
        );
        for (name, pick) in figures {
            let med = |p: usize| median(rounds[p][k].iter().map(|r| pick(r, n)).collect());
            let (quic, hbone, mtls, relay, direct) =
                (med(QUIC), med(HBONE), med(MTLS), med(HAPROXY), med(DIRECT));
            let ratio = |a: f64, b: f64, agents: bool| {
                if b > 0.0 && !name.starts_with("others") && (agents || !name.contains("agent")) {
                    format!("x{:.2}", a / b)
                } else {
                    "-".to_string()
                }
            };
            println!(
                "{name:<28} {quic:>9.1} {hbone:>9.1} {mtls:>9.1} {relay:>9.1} {direct:>9.1} {:>12} {:>13} {:>12} {:>15} {:>11} {:>11} {:>14}",
                ratio(quic, direct, false),
                ratio(hbone, direct, false),
                ratio(mtls, direct, false),
                ratio(relay, direct, false),
                ratio(quic, mtls, true),
                ratio(quic, hbone, true),
                ratio(hbone, relay, true)
            );
        }
    }

    println!("\n## Every round (CPU in ms per 1,000 requests; latency in µs)");
    println!(
        "{:<8} {:<11} {:>5} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "path",
        "mode",
        "round",
        "req/s",
        "p50",
        "p99",
        "client",
        "server",
        "c-agent",
        "s-agent",
        "total",
        "others%"
    );
    for (p, path) in PATHS.iter().enumerate() {
        for (k, mode) in MODES.iter().enumerate() {
            for (i, r) in rounds[p][k].iter().enumerate() {
                let c = |d: Duration| d.as_secs_f64() * 1e6 / n;
                println!(
                    "{path:<8} {:<11} {:>5} {:>9.0} {:>8.0} {:>8.0} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>7.0}",
                    mode.arg(),
                    i + 1,
                    n / r.wall.as_secs_f64(),
                    r.p50.as_secs_f64() * 1e6,
                    r.p99.as_secs_f64() * 1e6,
                    c(r.client_cpu),
                    c(r.server_cpu),
                    c(r.client_agent_cpu),
                    c(r.server_agent_cpu),
                    c(r.total()),
                    r.others * 100.0
                );
            }
        }
    }
    println!(
        "notes: total = client (its timed loop) + server + both agents; on the haproxy path the two HAProxy processes stand in the agents' columns; on the direct path the agents only idle (their CPU there is their background work). Per request on the mesh paths with new connections: two captured TCP connections on each VM, and between the agents a stream of the one pooled QUIC tunnel (quic) or HTTP/2 tunnel (hbone), or an mTLS connection of its own (mtls: TLS 1.3 between the agents; after the first, each resumes the session before it, a key exchange without certificates). Kernel work done in softirq on other processes' time is not attributed. others = what the rest of the machine used during the measured requests, in % of a core"
    );
    for (p, path) in PATHS.iter().enumerate() {
        for (k, mode) in MODES.iter().enumerate() {
            for (i, r) in rounds[p][k].iter().enumerate() {
                if r.others > 0.15 {
                    println!(
                        "warning: {path} {}, round {}: the rest of the machine used {:.0}% of a core: that round is disturbed",
                        mode.arg(),
                        i + 1,
                        r.others * 100.0
                    );
                }
            }
        }
    }
}

/// The headline figures, each from the tables above.
fn print_bulk(opts: &Opts, bulk: &BulkRounds) {
    let moved = 2.0 * (opts.bulk_mib << 20) as f64 / 1e6;
    println!(
        "\n## Bulk: {} MiB each way at once on one connection, the server echoing as it reads; median of {} rounds",
        opts.bulk_mib, opts.rounds
    );
    println!(
        "{:<8} {:>12} {:>12} {:>12} {:>12} {:>12} {:>16} {:>14}",
        "path",
        "MB/s each",
        "client ag s",
        "server ag s",
        "client s",
        "server s",
        "MB/agent-CPU-s",
        "total CPU s/GB"
    );
    for (p, name) in PATHS.iter().enumerate() {
        let runs = &bulk[p];
        if runs.is_empty() {
            continue;
        }
        let med = |pick: &dyn Fn(&Run) -> f64| median(runs.iter().map(pick).collect());
        let agents = med(&|r| r.agents().as_secs_f64());
        println!(
            "{:<8} {:>12.0} {:>12.3} {:>12.3} {:>12.3} {:>12.3} {:>16} {:>14.3}",
            name,
            med(&|r| moved / 2.0 / r.wall.as_secs_f64()),
            med(&|r| r.client_agent_cpu.as_secs_f64()),
            med(&|r| r.server_agent_cpu.as_secs_f64()),
            med(&|r| r.client_cpu.as_secs_f64()),
            med(&|r| r.server_cpu.as_secs_f64()),
            if p == DIRECT {
                "-".to_string()
            } else {
                format!("{:.0}", moved / agents)
            },
            med(&|r| r.total().as_secs_f64()) / (moved / 1000.0),
        );
    }
    println!(
        "notes: MB moved = both directions ({:.0} MB); MB/agent-CPU-s = that over both agents' CPU (the haproxy path's: both HAProxys'; the direct path passes neither); total = client + server + both agents",
        moved
    );
}

/// Per byte, both agents' CPU on `p`'s bulk runs: MB moved per CPU-second.
fn bulk_rate(opts: &Opts, bulk: &BulkRounds, p: usize) -> f64 {
    let moved = 2.0 * (opts.bulk_mib << 20) as f64 / 1e6;
    median(
        bulk[p]
            .iter()
            .map(|r| moved / r.agents().as_secs_f64())
            .collect(),
    )
}

fn print_summary(
    opts: &Opts,
    memory: &[MemRow],
    ready: &[ReadyRow],
    rounds: &Rounds,
    bulk: &BulkRounds,
    warm: &[WarmRow],
) {
    let rss = |catalog_is_big: bool| {
        let v: Vec<f64> = memory
            .iter()
            .filter(|r| r.variant == "default")
            .filter(|r| r.catalog.ends_with("services") == catalog_is_big)
            .map(|r| r.sample.rss as f64)
            .collect();
        median(v) / 1024.0
    };
    let ready_ms = |case: &str| {
        ready
            .iter()
            .find(|r| r.catalog.ends_with("services") && r.case == case)
            .map_or(0.0, |r| median_d(&r.times).as_secs_f64() * 1000.0)
    };
    let n = opts.requests as f64;
    let med = |p: usize, k: usize, pick: &dyn Fn(&Run) -> f64| {
        median(rounds[p][k].iter().map(pick).collect())
    };
    let per_k = |d: Duration| d.as_secs_f64() * 1e6 / n;
    println!("\n## Summary");
    if opts.runs("bulk") {
        let (q, h, m, r) = (
            bulk_rate(opts, bulk, QUIC),
            bulk_rate(opts, bulk, HBONE),
            bulk_rate(opts, bulk, MTLS),
            bulk_rate(opts, bulk, HAPROXY),
        );
        println!(
            "bulk, MB moved per CPU-second of both agents: quic {q:.0}, hbone {h:.0}, mtls {m:.0} (QUIC costs x{:.2} of HTTP/2 per byte); two plain HAProxy hops {r:.0}",
            h / q
        );
    }
    for row in warm {
        let (cold, hot) = row.medians();
        println!(
            "idle RSS with {} {} tunnels warm: {:.1} MiB, {:.1} MiB before the first (+{:.0} kB a tunnel)",
            opts.peers,
            row.transport,
            hot.rss as f64 / 1024.0,
            cold.rss as f64 / 1024.0,
            (hot.rss as f64 - cold.rss as f64) / opts.peers as f64
        );
    }
    for (k, mode) in MODES.iter().enumerate().filter(|_| opts.runs("requests")) {
        let total = |p| med(p, k, &|r| per_k(r.total()));
        let agents = |p| med(p, k, &|r| per_k(r.agents()));
        let p50 = |p| med(p, k, &|r| r.p50.as_secs_f64() * 1e6);
        let p99 = |p| med(p, k, &|r| r.p99.as_secs_f64() * 1e6);
        let x = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        println!(
            "{}: total CPU per 1,000 requests: quic {:.0} ms (x{:.2} direct), hbone {:.0} ms (x{:.2}), mtls {:.0} ms (x{:.2}), two plain HAProxy hops {:.0} ms (x{:.2}), direct {:.0} ms; both agents: quic {:.0} ms, hbone {:.0} ms, mtls {:.0} ms (quic/hbone x{:.2}); latency p50 {:.0} / {:.0} / {:.0} / {:.0} µs, p99 {:.0} / {:.0} / {:.0} / {:.0} µs (quic / hbone / mtls / direct)",
            mode.title(),
            total(QUIC),
            x(total(QUIC), total(DIRECT)),
            total(HBONE),
            x(total(HBONE), total(DIRECT)),
            total(MTLS),
            x(total(MTLS), total(DIRECT)),
            total(HAPROXY),
            x(total(HAPROXY), total(DIRECT)),
            total(DIRECT),
            agents(QUIC),
            agents(HBONE),
            agents(MTLS),
            x(agents(QUIC), agents(HBONE)),
            p50(QUIC),
            p50(HBONE),
            p50(MTLS),
            p50(DIRECT),
            p99(QUIC),
            p99(HBONE),
            p99(MTLS),
            p99(DIRECT),
        );
    }
    if !opts.runs("memory") {
        return;
    }
    println!(
        "idle RSS: {:.1} MiB with {} services, {:.1} MiB with the group only (goal: 12 MiB)",
        rss(true),
        thousands(opts.services),
        rss(false)
    );
    println!(
        "start to READY=1 with {} services: restart {:.0} ms, first start {:.0} ms; with a check every 0.2 s: {:.0} ms and {:.0} ms",
        thousands(opts.services),
        ready_ms("restart"),
        ready_ms("first start"),
        ready_ms("restart, 0.2 s check"),
        ready_ms("first, 0.2 s check"),
    );
}
