//! DNS benchmark: `dnsperf` against isthmus-dns, unbound (`local-data`) and dnsmasq (a
//! hosts file), one after the other in one run, in four scenarios:
//!
//! - the same 1,000 mesh names (names each server owns), at maximum throughput;
//! - 1,000 cached forwarded names (under `fwd.test.`, owned by none of them): each server
//!   forwards them to one common upstream (another unbound with its own `local-data`) and
//!   caches the answers; every cache is warmed with one pass over the names first, so the
//!   measurement is of cache hits, and the upstream's CPU during it is printed to show that;
//! - both name sets again at a fixed 20,000 queries per second (`dnsperf -Q`), for average
//!   and maximum latency at equal load rather than at saturation;
//! - a flood from another address: dnsperf in a network namespace sends mesh names far over
//!   the per-client rate limit (10,000/s for isthmus-dns by default; unbound given the same
//!   `ip-ratelimit`) while a client on loopback asks one name at a time, as `dig` does; its
//!   latency is printed quiet and during the flood (needs root; skipped otherwise, or with
//!   `--flood-seconds 0`).
//!
//! Each server is pinned to one core with `taskset` and dnsperf (and the upstream) to
//! another, so the servers are compared on equal CPU; the figures are ratios measured side
//! by side, not absolutes. The maximum latency is a single worst sample and is noisy.
//!
//! Run: `cargo build --release -p isthmus-dns -p isthmus-tests && target/release/dns-bench
//! [--names 1000] [--seconds 10] [--rate 20000] [--server-cpu 1] [--client-cpu 0]
//! [--flood-seconds 10] [--flood-rate 50000]`
//!
//! Needs `dnsperf`, `unbound`, `dnsmasq` and `taskset` (Debian: dnsperf, unbound, dnsmasq,
//! util-linux). isthmus-dns runs as its own process (the binary next to this one), fed by a
//! registry in this process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use isthmus_tests::bench::{output_unless_stopped, stop_on_signal, stopped, Args, Flag};
use isthmus_tests::harness::dns::{a_query, dig_at, free_port, have};
use isthmus_tests::harness::netns::{Net, Topology};
use isthmus_tests::harness::process::ServerProcess;
use isthmus_tests::{yaml, TestRegistry, TRUST_DOMAIN};

fn name(i: usize) -> String {
    format!("svc-{i}.bench.svc.cluster.local")
}

fn address(i: usize) -> String {
    format!("10.100.{}.{}", i / 250, i % 250 + 1)
}

/// A name none of the measured servers owns: the upstream answers it.
fn fwd_name(i: usize) -> String {
    format!("name-{i}.fwd.test")
}

fn fwd_address(i: usize) -> String {
    format!("10.200.{}.{}", i / 250, i % 250 + 1)
}

/// Long enough that no cached answer expires during the run.
const FWD_TTL: u32 = 3600;

/// A server process, stopped by its PID when dropped.
struct Server {
    label: &'static str,
    child: ServerProcess,
    addr: SocketAddr,
}

fn pinned(cpu: &str, program: &str) -> Command {
    let mut c = Command::new("taskset");
    c.args(["-c", cpu, program]);
    c.stdin(Stdio::null()).stdout(Stdio::null());
    c
}

fn wait_answering(server: &mut Server, probe: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        stopped()?;
        if let Some(status) = server.child.try_wait()? {
            anyhow::bail!("{} exited at start: {status}", server.label);
        }
        if let Ok(d) = dig_at(server.addr, &[probe, "A", "+time=1", "+tries=1"]) {
            if !d.answers.is_empty() {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("{} did not answer {probe} within 30s", server.label)
}

#[derive(Clone, Default)]
struct Perf {
    qps: f64,
    avg_latency: f64,
    max_latency: f64,
    lost: String,
    /// dnsperf's "Response codes" line, to show that every answer was the expected one.
    rcodes: String,
    /// Server CPU time per answered query: meaningful even when dnsperf, not the server, is
    /// the bottleneck (on two cores it usually is).
    cpu_per_query: Duration,
}

impl Perf {
    fn all_noerror(&self) -> bool {
        self.rcodes.starts_with("NOERROR") && !self.rcodes.contains(',')
    }
}

/// CPU time (user + system) a process has used, from /proc.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("bad /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    let hz: u64 = String::from_utf8(Command::new("getconf").arg("CLK_TCK").output()?.stdout)?
        .trim()
        .parse()
        .unwrap_or(100);
    Ok(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// How dnsperf sends: as fast as the outstanding-query window allows, or at a fixed rate.
#[derive(Clone, Copy)]
enum Load {
    Max,
    Rate(u64),
}

fn measure(
    server: &Server,
    queries: &Path,
    seconds: u64,
    cpu: &str,
    load: Load,
) -> anyhow::Result<Perf> {
    let before = cpu_time(server.child.id())?;
    let mut perf = dnsperf(server.addr, queries, cpu, &dnsperf_args(seconds, load))?;
    let after = cpu_time(server.child.id())?;
    let used = after.saturating_sub(before);
    let answered = perf.qps * seconds as f64;
    if answered > 0.0 {
        perf.cpu_per_query = used.div_f64(answered);
    }
    Ok(perf)
}

fn dnsperf_args(seconds: u64, load: Load) -> Vec<String> {
    let mut a: Vec<String> = ["-l", &seconds.to_string(), "-c", "4", "-q", "256"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if let Load::Rate(qps) = load {
        a.extend(["-Q".to_string(), qps.to_string()]);
    }
    a
}

/// One unhurried pass over the forwarded names, so that every server's cache holds them all
/// before it is measured; then the last name is checked to be answered.
fn warm(server: &mut Server, queries: &Path, cpu: &str, probe: &str) -> anyhow::Result<()> {
    let args: Vec<String> = ["-n", "1", "-Q", "2000", "-l", "30", "-c", "1", "-q", "64"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let p = dnsperf(server.addr, queries, cpu, &args)?;
    if !p.lost.starts_with("0 ") || !p.all_noerror() {
        // A query lost while warming is simply not cached yet: a second pass fills it in.
        let p2 = dnsperf(server.addr, queries, cpu, &args)?;
        anyhow::ensure!(
            p2.lost.starts_with("0 ") && p2.all_noerror(),
            "{}: warming the cache failed (lost {}, response codes {})",
            server.label,
            p2.lost,
            p2.rcodes
        );
    }
    wait_answering(server, probe)
}

fn dnsperf(addr: SocketAddr, queries: &Path, cpu: &str, args: &[String]) -> anyhow::Result<Perf> {
    let out = output_unless_stopped(
        Command::new("taskset")
            .args(["-c", cpu, "dnsperf", "-s"])
            .arg(addr.ip().to_string())
            .arg("-p")
            .arg(addr.port().to_string())
            .arg("-d")
            .arg(queries)
            .args(args),
    )
    .context("running dnsperf")?;
    parse_dnsperf(&String::from_utf8_lossy(&out.stdout))
}

/// dnsperf's summary: rate, latency, lost queries and response codes.
fn parse_dnsperf(text: &str) -> anyhow::Result<Perf> {
    let field = |label: &str| -> Option<String> {
        text.lines()
            .find(|l| l.trim_start().starts_with(label))
            .map(|l| l.trim_start()[label.len()..].trim().to_string())
    };
    let qps = field("Queries per second:")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no QPS in dnsperf output:\n{text}"))?;
    // "0.000123 (min 0.000010, max 0.001234)"
    let latency = field("Average Latency (s):").unwrap_or_default();
    let avg_latency = latency
        .split_whitespace()
        .next()
        .and_then(|x| x.parse().ok())
        .unwrap_or(0.0);
    let max_latency = latency
        .split_once("max ")
        .and_then(|(_, m)| m.trim_end_matches(')').trim().parse().ok())
        .unwrap_or(0.0);
    let lost = field("Queries lost:").unwrap_or_default();
    let rcodes = field("Response codes:").unwrap_or_default();
    Ok(Perf {
        qps,
        avg_latency,
        max_latency,
        lost,
        rcodes,
        cpu_per_query: Duration::ZERO,
    })
}

/// One server's figures in every scenario.
#[derive(Default)]
struct Runs {
    mesh_max: Perf,
    fwd_max: Perf,
    mesh_rate: Perf,
    fwd_rate: Perf,
    /// CPU the upstream used while this server's cached forwarded names were measured: near
    /// zero when the answers came from the server's cache.
    upstream_cpu: Duration,
}

struct Bench<'a> {
    mesh: &'a Path,
    fwd: &'a Path,
    fwd_probe: &'a str,
    seconds: u64,
    rate: u64,
    client_cpu: &'a str,
    upstream: &'a Server,
}

impl Bench<'_> {
    fn run(&self, server: &mut Server) -> anyhow::Result<Runs> {
        warm(server, self.fwd, self.client_cpu, self.fwd_probe)?;
        let m = |s: &Server, q: &Path, load| measure(s, q, self.seconds, self.client_cpu, load);
        let mut r = Runs {
            mesh_max: m(server, self.mesh, Load::Max)?,
            ..Runs::default()
        };
        let up = cpu_time(self.upstream.child.id())?;
        r.fwd_max = m(server, self.fwd, Load::Max)?;
        r.upstream_cpu += cpu_time(self.upstream.child.id())?.saturating_sub(up);
        r.mesh_rate = m(server, self.mesh, Load::Rate(self.rate))?;
        let up = cpu_time(self.upstream.child.id())?;
        r.fwd_rate = m(server, self.fwd, Load::Rate(self.rate))?;
        r.upstream_cpu += cpu_time(self.upstream.child.id())?.saturating_sub(up);
        Ok(r)
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

fn print_max(title: &str, results: &[(&str, Runs)], pick: fn(&Runs) -> &Perf) {
    println!("\n## {title}: maximum throughput");
    println!(
        "{:<12} {:>10} {:>14} {:>14} {:>16} {:>12}",
        "server", "QPS", "avg latency", "CPU/query", "lost", "answers"
    );
    for (label, r) in results {
        let p = pick(r);
        println!(
            "{label:<12} {:>10.0} {:>11.3} ms {:>11.2} µs {:>16} {:>12}",
            p.qps,
            p.avg_latency * 1000.0,
            p.cpu_per_query.as_secs_f64() * 1e6,
            p.lost,
            if p.all_noerror() {
                "NOERROR"
            } else {
                &p.rcodes
            }
        );
    }
    let isthmus = pick(&results[0].1);
    for (label, r) in &results[1..] {
        let p = pick(r);
        println!(
            "isthmus-dns / {label}: QPS x{:.2}, average latency x{:.2}, CPU per query x{:.2}",
            ratio(isthmus.qps, p.qps),
            ratio(isthmus.avg_latency, p.avg_latency),
            ratio(
                isthmus.cpu_per_query.as_secs_f64(),
                p.cpu_per_query.as_secs_f64()
            ),
        );
    }
    let (lo, hi) = results.iter().fold((f64::MAX, 0.0f64), |(lo, hi), (_, r)| {
        (lo.min(pick(r).qps), hi.max(pick(r).qps))
    });
    if hi > 0.0 && lo / hi > 0.9 {
        println!(
            "note: every server answered within 10% of the same rate, so dnsperf's core was the limit; compare CPU per query"
        );
    }
    println!("note: lost here is mostly the queries still outstanding when dnsperf's time limit stops the run");
}

fn print_rate(title: &str, rate: u64, results: &[(&str, Runs)], pick: fn(&Runs) -> &Perf) {
    println!("\n## {title}: fixed rate {rate} QPS");
    println!(
        "{:<12} {:>10} {:>14} {:>14} {:>14} {:>16} {:>12}",
        "server", "QPS", "avg latency", "max latency", "CPU/query", "lost", "answers"
    );
    for (label, r) in results {
        let p = pick(r);
        println!(
            "{label:<12} {:>10.0} {:>11.3} ms {:>11.3} ms {:>11.2} µs {:>16} {:>12}",
            p.qps,
            p.avg_latency * 1000.0,
            p.max_latency * 1000.0,
            p.cpu_per_query.as_secs_f64() * 1e6,
            p.lost,
            if p.all_noerror() {
                "NOERROR"
            } else {
                &p.rcodes
            }
        );
    }
    let isthmus = pick(&results[0].1);
    for (label, r) in &results[1..] {
        let p = pick(r);
        println!(
            "isthmus-dns / {label}: average latency x{:.2}, max latency x{:.2}, CPU per query x{:.2}",
            ratio(isthmus.avg_latency, p.avg_latency),
            ratio(isthmus.max_latency, p.max_latency),
            ratio(
                isthmus.cpu_per_query.as_secs_f64(),
                p.cpu_per_query.as_secs_f64()
            ),
        );
    }
    if results
        .iter()
        .any(|(_, r)| pick(r).qps < rate as f64 * 0.95)
    {
        println!("note: a server below 95% of the target rate was saturated; its latency is not at equal load");
    }
}

/// The common part of an unbound configuration: one thread, no daemon, no chroot, logs in
/// the benchmark's directory.
fn unbound_conf(dir: &Path, label: &str, port: u16) -> String {
    format!(
        "server:\n  interface: 127.0.0.1@{port}\n  port: {port}\n  do-daemonize: no\n  chroot: \"\"\n  username: \"\"\n  directory: \"{d}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"{d}/{label}.log\"\n  verbosity: 0\n  do-ip6: no\n  num-threads: 1\n  access-control: 127.0.0.0/8 allow\n  module-config: \"iterator\"\n",
        d = dir.display()
    )
}

fn exe_dir() -> anyhow::Result<PathBuf> {
    Ok(std::env::current_exe()?
        .parent()
        .context("no executable directory")?
        .to_path_buf())
}

const LOOPBACK: [u8; 4] = [127, 0, 0, 1];
const ANY: [u8; 4] = [0, 0, 0, 0];

/// One query at a time from loopback, as `dig` asks, every 10 ms for `how_long`: the time
/// each took, and how many got no answer within a second.
#[derive(Default)]
struct Probe {
    samples: Vec<Duration>,
    lost: usize,
}

impl Probe {
    fn run(addr: SocketAddr, name: &str, how_long: Duration) -> anyhow::Result<Probe> {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        socket.connect(addr)?;
        socket.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut p = Probe::default();
        let mut buf = [0u8; 512];
        let end = Instant::now() + how_long;
        let mut id = 0u16;
        while Instant::now() < end {
            stopped()?;
            id = id.wrapping_add(1);
            let started = Instant::now();
            socket.send(&a_query(id, name))?;
            loop {
                match socket.recv(&mut buf) {
                    Ok(n) if n >= 12 && buf[..2] == id.to_be_bytes() => {
                        p.samples.push(started.elapsed());
                        break;
                    }
                    // A late answer to an earlier query.
                    Ok(_) => continue,
                    Err(_) => {
                        p.lost += 1;
                        break;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        p.samples.sort();
        Ok(p)
    }

    /// The `q`-quantile in milliseconds.
    fn ms(&self, q: f64) -> f64 {
        if self.samples.is_empty() {
            return 0.0;
        }
        let i = ((self.samples.len() - 1) as f64 * q).round() as usize;
        self.samples[i].as_secs_f64() * 1000.0
    }
}

/// What one server did during the flood.
struct FloodRun {
    quiet: Probe,
    during: Probe,
    flooder: Perf,
}

/// `dnsperf` at `rate` QPS of mesh names from network namespace A (198.18.N.10, not
/// loopback, so rate-limited) against `server`, while a loopback client probes it.
fn flood_run(
    server: &Server,
    topo: &Topology,
    queries: &Path,
    seconds: u64,
    rate: u64,
    cpu: &str,
    probe: &str,
) -> anyhow::Result<FloodRun> {
    let quiet = Probe::run(server.addr, probe, Duration::from_secs(2))?;
    let mut cmd = topo.netns(Net::A).command("taskset");
    cmd.args(["-c", cpu, "dnsperf", "-s"])
        .arg(topo.host_addr().to_string())
        .arg("-p")
        .arg(server.addr.port().to_string())
        .arg("-d")
        .arg(queries)
        .args(dnsperf_args(seconds, Load::Rate(rate)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let flooder = topo
        .spawn(cmd)
        .context("starting dnsperf in the namespace")?;
    std::thread::sleep(Duration::from_secs(1));
    stopped()?;
    let during = Probe::run(server.addr, probe, Duration::from_secs(seconds - 2))?;
    flooder
        .wait_timeout(Duration::from_secs(seconds + 10))
        .context("dnsperf did not finish")?;
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut flooder.take_stdout().context("dnsperf's output")?,
        &mut text,
    )?;
    Ok(FloodRun {
        quiet,
        during,
        flooder: parse_dnsperf(&text)?,
    })
}

/// A loopback client's latency while another address floods: isthmus-dns with its default
/// per-client limit beside unbound with the same `ip-ratelimit`.
fn flood(
    servers: &Servers,
    queries: &Path,
    seconds: u64,
    rate: u64,
    cpu: &str,
) -> anyhow::Result<()> {
    let Some(topo) = Topology::create("dns-bench") else {
        println!(
            "
(no flood: network namespaces need root and `ip`)"
        );
        return Ok(());
    };
    let mut runs = Vec::new();
    let s = servers.isthmus(ANY, &[])?;
    runs.push((
        "isthmus-dns",
        flood_run(&s, &topo, queries, seconds, rate, cpu, servers.probe)?,
    ));
    drop(s);
    let s = servers.unbound(
        ANY,
        "  access-control: 198.18.0.0/16 allow\n  ip-ratelimit: 10000\n",
    )?;
    runs.push((
        "unbound",
        flood_run(&s, &topo, queries, seconds, rate, cpu, servers.probe)?,
    ));
    drop(s);
    println!(
        "\n## A loopback client asking one name at a time (as dig does) while {} floods {rate} QPS for {seconds}s",
        topo.netns(Net::A).name()
    );
    println!("limits: isthmus-dns its default (10,000/s per client, burst 20,000; loopback exempt), unbound ip-ratelimit: 10000");
    println!(
        "{:<12} {:>11} {:>11} {:>11} {:>11} {:>11} {:>6} {:>14} {:>20}  flooder's answers",
        "server",
        "quiet p50",
        "quiet p99",
        "flood p50",
        "flood p99",
        "flood max",
        "lost",
        "flooder QPS",
        "flooder lost"
    );
    for (label, r) in &runs {
        println!(
            "{label:<12} {:>8.3} ms {:>8.3} ms {:>8.3} ms {:>8.3} ms {:>8.3} ms {:>6} {:>14.0} {:>20}  {}",
            r.quiet.ms(0.5),
            r.quiet.ms(0.99),
            r.during.ms(0.5),
            r.during.ms(0.99),
            r.during.ms(1.0),
            r.during.lost,
            r.flooder.qps,
            r.flooder.lost,
            r.flooder.rcodes
        );
    }
    let (a, b) = (&runs[0].1.during, &runs[1].1.during);
    println!(
        "isthmus-dns / unbound during the flood: p50 x{:.2}, p99 x{:.2}",
        ratio(a.ms(0.5), b.ms(0.5)),
        ratio(a.ms(0.99), b.ms(0.99))
    );
    Ok(())
}

/// What starting a measured server takes.
struct Servers<'a> {
    dir: &'a Path,
    names: usize,
    cpu: &'a str,
    isthmus_bin: &'a Path,
    registry: SocketAddr,
    cert_dir: &'a Path,
    /// The port of the common upstream on loopback.
    upstream: u16,
    /// A mesh name, asked until the server answers it.
    probe: &'a str,
}

impl Servers<'_> {
    /// isthmus-dns on `listen` (its admin port on loopback), with `extra` flags.
    fn isthmus(&self, listen: [u8; 4], extra: &[&str]) -> anyhow::Result<Server> {
        let port = free_port();
        let mut c = pinned(self.cpu, self.isthmus_bin.to_str().context("path")?);
        c.args([
            "--listen",
            &format!("{}:{port}", std::net::Ipv4Addr::from(listen)),
        ])
        .args(["--admin-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--registry", &self.registry.to_string()])
        .arg("--root")
        .arg(self.cert_dir.join("root-cert.pem"))
        .arg("--cert-dir")
        .arg(self.cert_dir)
        .args(["--trust-domain", TRUST_DOMAIN])
        .args(["--network", isthmus_tests::NETWORK])
        .args(["--cluster", isthmus_tests::CLUSTER])
        .args(["--upstream", &format!("127.0.0.1:{}", self.upstream)])
        .args(["--udp-workers", "1"])
        .args(extra)
        .env("RUST_LOG", "warn");
        let mut s = Server {
            label: "isthmus-dns",
            child: ServerProcess::new(c.spawn().context("starting isthmus-dns")?),
            addr: SocketAddr::from((LOOPBACK, port)),
        };
        wait_answering(&mut s, self.probe)?;
        Ok(s)
    }

    /// unbound with local-data on `listen`, forwarding `fwd.test.` to the upstream, with
    /// `extra` lines in its `server:` section.
    fn unbound(&self, listen: [u8; 4], extra: &str) -> anyhow::Result<Server> {
        let port = free_port();
        let mut conf = unbound_conf(self.dir, "unbound", port).replace(
            "interface: 127.0.0.1@",
            &format!("interface: {}@", std::net::Ipv4Addr::from(listen)),
        );
        // Everything is local except `fwd.test.`, which falls through to the forward zone;
        // the upstream is on loopback, which unbound refuses to query by default.
        conf.push_str("  local-zone: \".\" static\n  local-zone: \"cluster.local.\" static\n  local-zone: \"fwd.test.\" transparent\n  do-not-query-localhost: no\n");
        conf.push_str(extra);
        for i in 0..self.names {
            conf.push_str(&format!(
                "  local-data: '{}. 30 IN A {}'\n",
                name(i),
                address(i)
            ));
        }
        conf.push_str(&format!(
            "forward-zone:\n  name: \"fwd.test.\"\n  forward-addr: 127.0.0.1@{}\nremote-control:\n  control-enable: no\n",
            self.upstream
        ));
        let path = self.dir.join("unbound.conf");
        std::fs::write(&path, conf)?;
        let mut c = pinned(self.cpu, "unbound");
        c.arg("-d").arg("-c").arg(&path);
        let mut s = Server {
            label: "unbound",
            child: ServerProcess::new(c.spawn().context("starting unbound")?),
            addr: SocketAddr::from((LOOPBACK, port)),
        };
        wait_answering(&mut s, self.probe)?;
        Ok(s)
    }
}

const ABOUT: &str = "DNS benchmark: dnsperf against isthmus-dns, unbound and dnsmasq, one \
    after the other, each pinned to one core: mesh names, cached forwarded names, a fixed rate, \
    and a flood from another address.";

const FLAGS: &[Flag] = &[
    Flag::value("--names", "1000", "mesh names, and as many forwarded names"),
    Flag::value("--seconds", "10", "seconds of each measurement"),
    Flag::value(
        "--rate",
        "20000",
        "queries per second of the fixed-rate scenario",
    ),
    Flag::value(
        "--server-cpu",
        "1",
        "the core each server is pinned to, as taskset -c takes it",
    ),
    Flag::value(
        "--client-cpu",
        "0",
        "the core of dnsperf and the upstream, as taskset -c takes it",
    ),
    Flag::value(
        "--flood-seconds",
        "10",
        "seconds of the flood: 0 (no flood) or at least 4",
    ),
    Flag::value("--flood-rate", "50000", "queries per second of the flood"),
];

fn main() -> anyhow::Result<()> {
    let args = Args::from_env(ABOUT, FLAGS)?;
    let names: usize = args.get("--names")?;
    let seconds: u64 = args.get("--seconds")?;
    let rate: u64 = args.get("--rate")?;
    let server_cpu: String = args.get("--server-cpu")?;
    let client_cpu: String = args.get("--client-cpu")?;
    let flood_seconds: u64 = args.get("--flood-seconds")?;
    let flood_rate: u64 = args.get("--flood-rate")?;
    anyhow::ensure!(
        flood_seconds == 0 || flood_seconds >= 4,
        "--flood-seconds must be 0 (no flood) or at least 4"
    );
    for p in ["dnsperf", "unbound", "dnsmasq", "taskset", "dig"] {
        anyhow::ensure!(have(p), "{p} is not installed");
    }
    let isthmus_bin = exe_dir()?.join("isthmus-dns");
    anyhow::ensure!(
        isthmus_bin.is_file(),
        "{} is missing: build it with cargo build --release -p isthmus-dns",
        isthmus_bin.display()
    );
    // Stopped early, the run still ends through its drops: servers, namespaces, directory.
    stop_on_signal()?;
    let dir = tempfile::tempdir()?;
    let queries = dir.path().join("queries.txt");
    std::fs::write(
        &queries,
        (0..names)
            .map(|i| format!("{} A\n", name(i)))
            .collect::<String>(),
    )?;
    let fwd_queries = dir.path().join("fwd-queries.txt");
    std::fs::write(
        &fwd_queries,
        (0..names)
            .map(|i| format!("{} A\n", fwd_name(i)))
            .collect::<String>(),
    )?;
    let probe = name(names - 1);
    let fwd_probe = fwd_name(names - 1);

    // The registry (in this process, on its own runtime thread) and the proxy's credentials.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let catalog = yaml::docs(
        &(0..names)
            .map(|i| {
                format!(
                    "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: svc-{i}\n  namespace: bench\nspec:\n  hosts:\n  - {}\n  addresses:\n  - {}\n  ports:\n  - number: 80\n    name: http\n    protocol: HTTP\n  resolution: STATIC\n",
                    name(i),
                    address(i)
                )
            })
            .collect::<Vec<_>>(),
    );
    let cert_dir = dir.path().join("certs");
    let reg = rt.block_on(async {
        let reg = TestRegistry::start(&[("bench.yaml", &catalog)]).await?;
        reg.credentials_dir("isthmus-system", "isthmus-dns", &cert_dir)
            .await?;
        anyhow::Ok(reg)
    })?;

    // The common upstream for the forwarded names: an unbound that owns `fwd.test.`, on
    // dnsperf's core (it is idle once the caches are warm, which the output shows).
    let upstream = {
        let port = free_port();
        let mut conf = unbound_conf(dir.path(), "upstream", port);
        conf.push_str("  local-zone: \"fwd.test.\" static\n");
        for i in 0..names {
            conf.push_str(&format!(
                "  local-data: '{}. {FWD_TTL} IN A {}'\n",
                fwd_name(i),
                fwd_address(i)
            ));
        }
        conf.push_str("remote-control:\n  control-enable: no\n");
        let path = dir.path().join("upstream.conf");
        std::fs::write(&path, conf)?;
        let mut c = pinned(&client_cpu, "unbound");
        c.arg("-d").arg("-c").arg(&path);
        let mut s = Server {
            label: "upstream unbound",
            child: ServerProcess::new(c.spawn().context("starting the upstream unbound")?),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        wait_answering(&mut s, &fwd_probe)?;
        s
    };
    let up = upstream.addr.port();

    println!(
        "# DNS benchmark: {names} mesh names and {names} cached forwarded names, A queries, {seconds}s each, servers on cpu {server_cpu}, dnsperf and the upstream on cpu {client_cpu} ({} cores in all)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let bench = Bench {
        mesh: &queries,
        fwd: &fwd_queries,
        fwd_probe: &fwd_probe,
        seconds,
        rate,
        client_cpu: &client_cpu,
        upstream: &upstream,
    };
    let mut results: Vec<(&'static str, Runs)> = Vec::new();

    let servers = Servers {
        dir: dir.path(),
        names,
        cpu: &server_cpu,
        isthmus_bin: &isthmus_bin,
        registry: reg.grpc_addr(),
        cert_dir: &cert_dir,
        upstream: up,
        probe: &probe,
    };
    // dnsperf is one client sending far above any application's rate; the peers have no
    // per-client limit by default (unbound's ip-ratelimit is 0), so neither does the
    // server measured beside them.
    let mut s = servers.isthmus(LOOPBACK, &["--client-rate-limit", "0"])?;
    results.push(("isthmus-dns", bench.run(&mut s)?));
    drop(s);

    let mut s = servers.unbound(LOOPBACK, "")?;
    results.push(("unbound", bench.run(&mut s)?));
    drop(s);

    // dnsmasq with a hosts file, forwarding `fwd.test` to the upstream.
    {
        let port = free_port();
        let hosts = dir.path().join("hosts");
        std::fs::write(
            &hosts,
            (0..names)
                .map(|i| format!("{} {}\n", address(i), name(i)))
                .collect::<String>(),
        )?;
        let mut c = pinned(&server_cpu, "dnsmasq");
        c.args([
            "--keep-in-foreground",
            "--conf-file=",
            "--pid-file=",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--user=root",
            "--local-ttl=30",
            "--cache-size=10000",
        ])
        .arg(format!("--port={port}"))
        .arg(format!("--addn-hosts={}", hosts.display()))
        .arg(format!("--server=/fwd.test/127.0.0.1#{up}"));
        let mut s = Server {
            label: "dnsmasq",
            child: ServerProcess::new(c.spawn().context("starting dnsmasq")?),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        wait_answering(&mut s, &probe)?;
        results.push(("dnsmasq", bench.run(&mut s)?));
    }

    print_max("Mesh/local names", &results, |r| &r.mesh_max);
    print_max("Cached forwarded names", &results, |r| &r.fwd_max);
    print_rate("Mesh/local names", rate, &results, |r| &r.mesh_rate);
    print_rate("Cached forwarded names", rate, &results, |r| &r.fwd_rate);
    println!("\nupstream CPU while each server's cached forwarded names were measured (cache misses would show here):");
    for (label, r) in &results {
        println!(
            "  {label:<12} {:.0} ms",
            r.upstream_cpu.as_secs_f64() * 1000.0
        );
    }
    if flood_seconds > 0 {
        flood(&servers, &queries, flood_seconds, flood_rate, &client_cpu)?;
    }
    drop(upstream);
    rt.block_on(async {
        let mut reg = reg;
        reg.stop().await;
    });
    Ok(())
}
