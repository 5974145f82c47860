//! DNS benchmark: `dnsperf` against isthmus-dns, unbound (`local-data`) and dnsmasq (a
//! hosts file), each serving the same 1,000 mesh names, one after the other in one run.
//! Each server is pinned to one core with `taskset` and dnsperf to another, so the servers
//! are compared on equal CPU; the figures are ratios measured side by side, not absolutes.
//!
//! Run: `cargo build --release -p isthmus-dns -p isthmus-tests && target/release/dns-bench
//! [--names 1000] [--seconds 10] [--server-cpu 1] [--client-cpu 0]`
//!
//! Needs `dnsperf`, `unbound`, `dnsmasq` and `taskset` (Debian: dnsperf, unbound, dnsmasq,
//! util-linux). isthmus-dns runs as its own process (the binary next to this one), fed by a
//! registry in this process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use isthmus_tests::dns::{dig_at, free_port, have};
use isthmus_tests::{yaml, TestRegistry, TRUST_DOMAIN};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn name(i: usize) -> String {
    format!("svc-{i}.bench.svc.cluster.local")
}

fn address(i: usize) -> String {
    format!("10.100.{}.{}", i / 250, i % 250 + 1)
}

/// A server process, stopped by its PID when dropped.
struct Server {
    label: &'static str,
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

struct Perf {
    qps: f64,
    avg_latency: f64,
    lost: String,
    /// Server CPU time per answered query: meaningful even when dnsperf, not the server, is
    /// the bottleneck (on two cores it usually is).
    cpu_per_query: Duration,
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

fn measure(server: &Server, queries: &Path, seconds: u64, cpu: &str) -> anyhow::Result<Perf> {
    let before = cpu_time(server.child.id())?;
    let mut perf = dnsperf(server.addr, queries, seconds, cpu)?;
    let after = cpu_time(server.child.id())?;
    let used = after.saturating_sub(before);
    let answered = perf.qps * seconds as f64;
    if answered > 0.0 {
        perf.cpu_per_query = used.div_f64(answered);
    }
    Ok(perf)
}

fn dnsperf(addr: SocketAddr, queries: &Path, seconds: u64, cpu: &str) -> anyhow::Result<Perf> {
    let out = Command::new("taskset")
        .args(["-c", cpu, "dnsperf", "-s"])
        .arg(addr.ip().to_string())
        .arg("-p")
        .arg(addr.port().to_string())
        .arg("-d")
        .arg(queries)
        .args(["-l", &seconds.to_string(), "-c", "4", "-q", "256"])
        .output()
        .context("running dnsperf")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |label: &str| -> Option<String> {
        text.lines()
            .find(|l| l.trim_start().starts_with(label))
            .map(|l| l.trim_start()[label.len()..].trim().to_string())
    };
    let qps = field("Queries per second:")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no QPS in dnsperf output:\n{text}"))?;
    let avg_latency = field("Average Latency (s):")
        .and_then(|v| v.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0.0);
    let lost = field("Queries lost:").unwrap_or_default();
    Ok(Perf {
        qps,
        avg_latency,
        lost,
        cpu_per_query: Duration::ZERO,
    })
}

fn exe_dir() -> anyhow::Result<PathBuf> {
    Ok(std::env::current_exe()?
        .parent()
        .context("no executable directory")?
        .to_path_buf())
}

fn main() -> anyhow::Result<()> {
    let names: usize = arg("--names", "1000").parse()?;
    let seconds: u64 = arg("--seconds", "10").parse()?;
    let server_cpu = arg("--server-cpu", "1");
    let client_cpu = arg("--client-cpu", "0");
    for p in ["dnsperf", "unbound", "dnsmasq", "taskset", "dig"] {
        anyhow::ensure!(have(p), "{p} is not installed");
    }
    let isthmus_bin = exe_dir()?.join("isthmus-dns");
    anyhow::ensure!(
        isthmus_bin.is_file(),
        "{} is missing: build it with cargo build --release -p isthmus-dns",
        isthmus_bin.display()
    );
    let dir = tempfile::tempdir()?;
    let queries = dir.path().join("queries.txt");
    std::fs::write(
        &queries,
        (0..names)
            .map(|i| format!("{} A\n", name(i)))
            .collect::<String>(),
    )?;
    let probe = name(names - 1);

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

    println!(
        "# DNS benchmark: {names} mesh names, A queries, {seconds}s each, servers on cpu {server_cpu}, dnsperf on cpu {client_cpu} ({} cores in all)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let mut results: Vec<(&'static str, Perf)> = Vec::new();

    // isthmus-dns.
    {
        let port = free_port();
        let mut c = pinned(&server_cpu, isthmus_bin.to_str().context("path")?);
        c.args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-addr", &format!("127.0.0.1:{}", free_port())])
            .args(["--registry", &reg.grpc_addr().to_string()])
            .arg("--root")
            .arg(cert_dir.join("root-cert.pem"))
            .arg("--cert-dir")
            .arg(&cert_dir)
            .args(["--trust-domain", TRUST_DOMAIN])
            .args(["--network", isthmus_tests::NETWORK])
            .args(["--cluster", isthmus_tests::CLUSTER])
            .args(["--upstream", &format!("127.0.0.1:{}", free_port())])
            .args(["--udp-workers", "1"])
            .env("RUST_LOG", "warn");
        let mut s = Server {
            label: "isthmus-dns",
            child: c.spawn().context("starting isthmus-dns")?,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        wait_answering(&mut s, &probe)?;
        results.push(("isthmus-dns", measure(&s, &queries, seconds, &client_cpu)?));
    }

    // unbound with local-data.
    {
        let port = free_port();
        let mut conf = format!(
            "server:\n  interface: 127.0.0.1@{port}\n  port: {port}\n  do-daemonize: no\n  chroot: \"\"\n  username: \"\"\n  directory: \"{d}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"{d}/unbound.log\"\n  verbosity: 0\n  do-ip6: no\n  num-threads: 1\n  access-control: 127.0.0.0/8 allow\n  module-config: \"iterator\"\n  local-zone: \".\" static\n  local-zone: \"cluster.local.\" static\n",
            d = dir.path().display()
        );
        for i in 0..names {
            conf.push_str(&format!(
                "  local-data: '{}. 30 IN A {}'\n",
                name(i),
                address(i)
            ));
        }
        conf.push_str("remote-control:\n  control-enable: no\n");
        let path = dir.path().join("unbound.conf");
        std::fs::write(&path, conf)?;
        let mut c = pinned(&server_cpu, "unbound");
        c.arg("-d").arg("-c").arg(&path);
        let mut s = Server {
            label: "unbound",
            child: c.spawn().context("starting unbound")?,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        wait_answering(&mut s, &probe)?;
        results.push(("unbound", measure(&s, &queries, seconds, &client_cpu)?));
    }

    // dnsmasq with a hosts file.
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
        .arg(format!("--addn-hosts={}", hosts.display()));
        let mut s = Server {
            label: "dnsmasq",
            child: c.spawn().context("starting dnsmasq")?,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        wait_answering(&mut s, &probe)?;
        results.push(("dnsmasq", measure(&s, &queries, seconds, &client_cpu)?));
    }

    println!(
        "{:<12} {:>10} {:>14} {:>14} {:>16}",
        "server", "QPS", "avg latency", "CPU/query", "lost"
    );
    for (label, p) in &results {
        println!(
            "{label:<12} {:>10.0} {:>11.3} ms {:>11.2} µs {:>16}",
            p.qps,
            p.avg_latency * 1000.0,
            p.cpu_per_query.as_secs_f64() * 1e6,
            p.lost
        );
    }
    let isthmus = &results[0].1;
    for (label, p) in &results[1..] {
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
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
    let (lo, hi) = results.iter().fold((f64::MAX, 0.0f64), |(lo, hi), (_, p)| {
        (lo.min(p.qps), hi.max(p.qps))
    });
    if hi > 0.0 && lo / hi > 0.9 {
        println!(
            "note: every server answered within 10% of the same rate, so dnsperf's core was the limit; compare CPU per query"
        );
    }
    rt.block_on(async {
        let mut reg = reg;
        reg.stop().await;
    });
    Ok(())
}
