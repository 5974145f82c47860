//! SNI passthrough benchmark: the same mTLS client and TLS backend on loopback, connected
//! directly (the baseline) and through isthmus-gateway, HAProxy and nginx, one after the
//! other in one run. Each proxy reads the ClientHello, routes on its SNI key
//! (`outbound_.9080_._.bench.bench.svc.cluster.local`) and relays the ciphertext; none of
//! them terminates TLS, so encryption and decryption are the client's and the backend's
//! work, and what a proxy costs is reading, routing and copying bytes.
//!
//! Figures, per proxy and for the direct baseline, each measured in every one of `--rounds`
//! rounds (the paths take turns, each round starting with the next one) and reported as the
//! median over the rounds, with every round printed too:
//!
//! - single-stream throughput: one connection sends `--bulk-mib` MiB to the backend, which
//!   acknowledges the last byte; Gbit/s, and the proxy's CPU seconds per GB (10^9 bytes of
//!   application data; the ciphertext relayed is ~0.1% more);
//! - new connections: `--connections` connections, `--concurrency` at a time, each a full
//!   mTLS handshake (no session resumption) and one `--ping-size` byte echo; connections/s
//!   and the proxy's CPU µs per connection;
//! - added latency: `--pings` echoes of `--ping-size` bytes on one established connection
//!   (after 1,000 unmeasured ones); round-trip p50/p99, what each proxy adds to the direct
//!   p50/p99, and the proxy's CPU per round trip.
//!
//! Proxy CPU is the proxy process's CPU-time clock (`clock_getcpuclockid`: user + system
//! time of all its threads, to the nanosecond; clock ticks from `/proc/<pid>/stat` where it
//! cannot be read), read before and after each measurement (after a short settle, so that
//! closing the connections is counted). It is the figure that compares the proxies on equal
//! terms; throughput and connections/s are also limited by the client's core.
//!
//! Pinning: every proxy runs on `--proxy-cpu` (taskset), measured one at a time while the
//! others idle; the client, the backend and the registry run in this process, which pins
//! itself to `--client-cpu` (sched_setaffinity before any thread starts, so every thread it
//! creates inherits it) and drives them all from one current-thread runtime. The registry
//! is idle while anything is measured. isthmus-gateway's multi-thread runtime sizes itself
//! from its affinity, so on one core it has one worker, like HAProxy with `nbthread 1` and
//! nginx with one worker process. isthmus-gateway runs as its own process with its default
//! configuration, including one access-log line per connection (`--gateway-log` sets its
//! RUST_LOG; the log goes to a file); the HAProxy and nginx configurations have no access
//! log.
//!
//! Every proxy relays a half-close, as a mesh gateway must (TLS 1.3 lets each side end its
//! half on its own, and a protocol may send a FIN and then wait for its answer): when one
//! side's FIN arrives it is passed on, and the other direction carries on until its own FIN.
//! isthmus-gateway and HAProxy always do; nginx does with `proxy_half_close on`, which its
//! configuration here sets (nginx's default closes both sides at the first FIN, so it would
//! read, write and shut down less per connection than a proxy that keeps TLS's close intact).
//!
//! The two cores must be otherwise idle: the output shows the CPU every other process used
//! (from /proc/stat) in each phase, and a warning, with the process that used most, for
//! every phase where it was above 5% of a core; the median over the rounds keeps one
//! disturbed round from moving the result. Loopback, pinning and a virtual machine's
//! cross-core wake-ups make the absolute figures specific to the machine; the ratios
//! measured side by side are the result.
//!
//! Run: `cargo build --release -p isthmus-gateway -p isthmus-tests &&
//! target/release/gateway-bench [--rounds 3] [--bulk-mib 1024] [--connections 3000]
//! [--concurrency 4] [--pings 10000] [--ping-size 64] [--proxy-cpu 1] [--client-cpu 0]
//! [--gateway-log info]` (about a minute and a half with the defaults)
//!
//! Needs `haproxy`, `nginx` with the stream module (Debian: libnginx-mod-stream) and
//! `taskset` (util-linux), and at least two cores.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use isthmus_proto::identity::{SpiffeId, TrustDomain};
use isthmus_proto::sni::SniKey;
use isthmus_proto::tls::{self, ClientAuth, ServerIdentity};
use isthmus_tests::bench::{
    clock_ticks, cpu_model, cpu_ns_of, median, until_stopped, virtualized, Args, Flag,
};
use isthmus_tests::harness::dns::{free_port, have};
use isthmus_tests::harness::mesh::{self, yaml};
use isthmus_tests::harness::process::ServerProcess;
use isthmus_tests::{http_get, TestRegistry, CLUSTER, NETWORK, TRUST_DOMAIN};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const SERVICE: &str = "bench";
const NAMESPACE: &str = "bench";
const SERVICE_PORT: u16 = 9080;
/// First byte of a connection: the backend echoes what it reads.
const ECHO: u8 = b'E';
/// First byte of a connection: an 8-byte little-endian length follows, then that many bytes,
/// which the backend reads and acknowledges with one byte (the bulk figure does not depend
/// on how a proxy ends a connection).
const SINK: u8 = b'S';
const ACK: u8 = b'K';
/// Time for a proxy to finish closing connections before its CPU is read again.
const SETTLE: Duration = Duration::from_millis(300);

/// A proxy process, stopped by its PID when dropped.
struct Proxy {
    label: &'static str,
    child: ServerProcess,
    addr: SocketAddr,
    log: PathBuf,
}

impl Proxy {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// `taskset -c <cpu> <program>`: taskset execs the program, so the child's PID is the
/// proxy's. Output goes to `log`.
fn pinned(cpu: &str, program: &Path, log: &Path) -> anyhow::Result<Command> {
    let out = std::fs::File::create(log)?;
    let mut c = Command::new("taskset");
    c.arg("-c").arg(cpu).arg(program);
    c.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
    Ok(c)
}

/// CPU time (user + system) a process has used, from /proc.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("bad /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    let hz = clock_ticks();
    Ok(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// The proxy's CPU, to the nanosecond, if there is a proxy (none for the direct baseline).
fn proxy_cpu(pid: Option<u32>) -> anyhow::Result<Option<Duration>> {
    Ok(pid.map(cpu_ns_of))
}

fn cpu_delta(before: Option<Duration>, after: Option<Duration>) -> Option<Duration> {
    Some(after?.saturating_sub(before?))
}

/// Pins this thread, and so every thread started after it, to `cpu`.
fn pin_self(cpu: usize) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

/// The client's side: its TLS config, the name it sends, and the message sizes.
struct Client {
    connector: TlsConnector,
    server_name: ServerName<'static>,
    ping_size: usize,
}

type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

impl Client {
    async fn connect(&self, addr: SocketAddr) -> anyhow::Result<ClientStream> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let tls = tokio::time::timeout(
            Duration::from_secs(10),
            self.connector.connect(self.server_name.clone(), tcp),
        )
        .await
        .context("handshake timed out")??;
        Ok(tls)
    }

    /// One echo of `msg` (whose first byte is [`ECHO`] on a new connection).
    async fn ping(&self, s: &mut ClientStream, msg: &[u8], back: &mut [u8]) -> anyhow::Result<()> {
        s.write_all(msg).await?;
        s.flush().await?;
        s.read_exact(back).await?;
        anyhow::ensure!(back == msg, "the echo differs from what was sent");
        Ok(())
    }

    fn message(&self) -> Vec<u8> {
        let mut m: Vec<u8> = (0..self.ping_size).map(|i| (i % 251) as u8).collect();
        m[0] = ECHO;
        m
    }

    /// A new connection, one echo, and a close: the client sends its close_notify and FIN
    /// and closes without waiting for the backend's, as most clients do. So the backend's
    /// close, relayed by the proxy, meets a closed socket and the client's kernel answers
    /// with a reset (no TIME_WAIT on that leg); the proxy's leg to the backend closes with
    /// a FIN each way. Waiting for the backend's close instead changed no ratio between the
    /// proxies beyond the noise of the runs.
    async fn one_call(&self, addr: SocketAddr) -> anyhow::Result<()> {
        let mut s = self.connect(addr).await?;
        let msg = self.message();
        let mut back = vec![0u8; msg.len()];
        self.ping(&mut s, &msg, &mut back).await?;
        let _ = s.shutdown().await;
        Ok(())
    }
}

/// The TLS backend: requires a client certificate, then echoes or sinks (see [`ECHO`],
/// [`SINK`]).
async fn backend(listener: TcpListener, acceptor: TlsAcceptor) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            // Out of file descriptors and the like: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            if let Ok(tls) = acceptor.accept(tcp).await {
                let _ = serve(tls).await;
            }
        });
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = s.read(&mut buf).await?;
    if n == 0 {
        return Ok(());
    }
    if buf[0] == SINK {
        while n < 9 {
            match s.read(&mut buf[n..]).await? {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                got => n += got,
            }
        }
        let len = u64::from_le_bytes(buf[1..9].try_into().expect("8 bytes"));
        let mut left = len.saturating_sub(n as u64 - 9);
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let got = s.read(&mut buf[..want]).await?;
            if got == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            left -= got as u64;
        }
        s.write_all(&[ACK]).await?;
        s.flush().await?;
    } else {
        // Echo: each read goes back as it came (one record for one small message).
        while n > 0 {
            s.write_all(&buf[..n]).await?;
            s.flush().await?;
            n = s.read(&mut buf).await?;
        }
    }
    let _ = s.shutdown().await;
    Ok(())
}

/// Every figure for one path (direct or through one proxy).
#[derive(Default, Clone)]
struct Figures {
    gbps: f64,
    cpu_per_gb: Option<f64>,
    conns_per_s: f64,
    cpu_per_conn_us: Option<f64>,
    p50_us: f64,
    p99_us: f64,
    cpu_per_rtt_us: Option<f64>,
    /// What the rest of the machine did during each phase: latency, connections, throughput.
    others: [Others; 3],
}

const PHASES: [&str; 3] = ["latency", "connections", "throughput"];

/// The command line.
struct Opts {
    bulk_bytes: u64,
    connections: usize,
    concurrency: usize,
    pings: usize,
    ping_size: usize,
    /// For taskset (so a list such as `1` or `2,3` is accepted).
    proxy_cpu: String,
    client_cpu: usize,
    /// isthmus-gateway's RUST_LOG.
    gateway_log: String,
    rounds: usize,
}

/// Round trips on one established connection.
async fn latency(
    client: &Client,
    addr: SocketAddr,
    pid: Option<u32>,
    pings: usize,
    f: &mut Figures,
) -> anyhow::Result<()> {
    let mut s = client.connect(addr).await?;
    let msg = client.message();
    let mut back = vec![0u8; msg.len()];
    // The first message says "echo"; every later one is echoed as it is.
    for _ in 0..1000.min(pings) {
        client.ping(&mut s, &msg, &mut back).await?;
    }
    let before = proxy_cpu(pid)?;
    let mut rtts: Vec<u64> = Vec::with_capacity(pings);
    for _ in 0..pings {
        let t = Instant::now();
        client.ping(&mut s, &msg, &mut back).await?;
        rtts.push(t.elapsed().as_nanos() as u64);
    }
    let after = proxy_cpu(pid)?;
    let _ = s.shutdown().await;
    rtts.sort_unstable();
    let pct = |p: usize| rtts[(rtts.len() * p / 100).min(rtts.len() - 1)] as f64 / 1000.0;
    f.p50_us = pct(50);
    f.p99_us = pct(99);
    f.cpu_per_rtt_us = cpu_delta(before, after).map(|d| d.as_secs_f64() * 1e6 / pings as f64);
    Ok(())
}

/// New connections, `concurrency` at a time.
async fn connections(
    client: &Arc<Client>,
    addr: SocketAddr,
    pid: Option<u32>,
    opts: &Opts,
    f: &mut Figures,
) -> anyhow::Result<()> {
    let before = proxy_cpu(pid)?;
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let total = opts.connections;
    let tasks: Vec<_> = (0..opts.concurrency.max(1))
        .map(|_| {
            let (client, next) = (client.clone(), next.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    client.one_call(addr).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed();
    tokio::time::sleep(SETTLE).await;
    let after = proxy_cpu(pid)?;
    f.conns_per_s = total as f64 / elapsed.as_secs_f64();
    f.cpu_per_conn_us = cpu_delta(before, after).map(|d| d.as_secs_f64() * 1e6 / total as f64);
    Ok(())
}

/// One connection sending `bytes` to the backend.
async fn throughput(
    client: &Client,
    addr: SocketAddr,
    pid: Option<u32>,
    bytes: u64,
    f: &mut Figures,
) -> anyhow::Result<()> {
    let mut s = client.connect(addr).await?;
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 256) as u8).collect();
    let before = proxy_cpu(pid)?;
    let started = Instant::now();
    let mut header = vec![SINK];
    header.extend_from_slice(&bytes.to_le_bytes());
    s.write_all(&header).await?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    s.flush().await?;
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).await?;
    anyhow::ensure!(
        ack[0] == ACK,
        "the backend did not acknowledge the transfer"
    );
    let elapsed = started.elapsed();
    let _ = s.shutdown().await;
    drop(s);
    tokio::time::sleep(SETTLE).await;
    let after = proxy_cpu(pid)?;
    f.gbps = bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9;
    f.cpu_per_gb = cpu_delta(before, after).map(|d| d.as_secs_f64() / (bytes as f64 / 1e9));
    Ok(())
}

async fn measure(
    client: &Arc<Client>,
    addr: SocketAddr,
    pid: Option<u32>,
    opts: &Opts,
) -> anyhow::Result<Figures> {
    let mut f = Figures::default();
    let w = OthersWatch::start(pid)?;
    latency(client, addr, pid, opts.pings, &mut f)
        .await
        .context("latency")?;
    f.others[0] = w.stop(pid)?;
    let w = OthersWatch::start(pid)?;
    connections(client, addr, pid, opts, &mut f)
        .await
        .context("new connections")?;
    f.others[1] = w.stop(pid)?;
    let w = OthersWatch::start(pid)?;
    throughput(client, addr, pid, opts.bulk_bytes, &mut f)
        .await
        .context("throughput")?;
    f.others[2] = w.stop(pid)?;
    Ok(f)
}

/// What the rest of the machine did during a phase: its figures hold only if the two cores
/// were otherwise idle.
#[derive(Default, Clone)]
struct Others {
    /// CPU of every process but this one and the proxy, in cores (from /proc/stat).
    cores: f64,
    /// The other process that used most CPU, and how much (in cores).
    top: Option<(String, f64)>,
    /// Time the hypervisor ran something else, in cores.
    steal: f64,
}

struct OthersWatch {
    at: Instant,
    busy: Duration,
    steal: Duration,
    ours: Duration,
    processes: std::collections::HashMap<u32, (String, Duration)>,
}

impl OthersWatch {
    fn start(proxy: Option<u32>) -> anyhow::Result<Self> {
        let (busy, steal) = machine_cpu()?;
        Ok(Self {
            at: Instant::now(),
            busy,
            steal,
            ours: ours(proxy)?,
            processes: processes(),
        })
    }

    fn stop(&self, proxy: Option<u32>) -> anyhow::Result<Others> {
        let (busy, steal) = machine_cpu()?;
        let ours = ours(proxy)?;
        let wall = self.at.elapsed().as_secs_f64();
        let mut others = busy
            .saturating_sub(self.busy)
            .saturating_sub(ours.saturating_sub(self.ours));
        // Each counter is read to a clock tick, so two ticks of difference are rounding, not
        // load (they would read as several % of a core in a short phase).
        let hz = clock_ticks() as f64;
        if others.as_secs_f64() * hz <= 2.0 {
            others = Duration::ZERO;
        }
        let skip = [Some(std::process::id()), proxy];
        let top = processes()
            .into_iter()
            .filter(|(pid, _)| !skip.contains(&Some(*pid)))
            .map(|(pid, (name, cpu))| {
                let before = self.processes.get(&pid).map_or(Duration::ZERO, |p| p.1);
                (name, cpu.saturating_sub(before))
            })
            .max_by_key(|(_, d)| *d)
            .filter(|(_, d)| !d.is_zero())
            .map(|(name, d)| (name, d.as_secs_f64() / wall));
        Ok(Others {
            cores: others.as_secs_f64() / wall,
            top,
            steal: steal.saturating_sub(self.steal).as_secs_f64() / wall,
        })
    }
}

/// CPU used by this process and the proxy.
fn ours(proxy: Option<u32>) -> anyhow::Result<Duration> {
    Ok(cpu_time(std::process::id())? + proxy_cpu(proxy)?.unwrap_or_default())
}

/// Every process's name and CPU time (kernel threads included: softirq work deferred to
/// ksoftirqd shows here).
fn processes() -> std::collections::HashMap<u32, (String, Duration)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Default::default();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let name = stat.split_once('(')?.1.rsplit_once(')')?.0.to_string();
            Some((pid, (name, cpu_time(pid).ok()?)))
        })
        .collect()
}

/// (busy, steal) of all CPUs together, from /proc/stat.
fn machine_cpu() -> anyhow::Result<(Duration, Duration)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    let busy = at(0) + at(1) + at(2) + at(5) + at(6);
    let hz = clock_ticks() as f64;
    Ok((
        Duration::from_secs_f64(busy as f64 / hz),
        Duration::from_secs_f64(at(7) as f64 / hz),
    ))
}

/// Waits until a call through `proxy` succeeds (it listens and routes), or fails if the
/// process exits or 30 s pass.
async fn wait_routing(proxy: &mut Proxy, client: &Client) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Some(status) = proxy.child.try_wait()? {
            anyhow::bail!(
                "{} exited at start: {status}\n{}",
                proxy.label,
                proxy.log_tail()
            );
        }
        match tokio::time::timeout(Duration::from_secs(5), client.one_call(proxy.addr)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!(
        "{} never routed a call within 30s (last error: {last})\n{}",
        proxy.label,
        proxy.log_tail()
    )
}

/// Waits for the gateway's readiness endpoint to answer 200.
async fn wait_ready(proxy: &mut Proxy, health: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(status) = proxy.child.try_wait()? {
            anyhow::bail!(
                "{} exited at start: {status}\n{}",
                proxy.label,
                proxy.log_tail()
            );
        }
        if let Ok((200, _)) = http_get(health, "/healthz/ready").await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!(
        "{} was not ready within 30s\n{}",
        proxy.label,
        proxy.log_tail()
    )
}

fn haproxy_conf(port: u16, key: &str, backend: SocketAddr) -> String {
    format!(
        "global\n  nbthread 1\n  maxconn 4096\n\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         frontend sni\n  bind 127.0.0.1:{port}\n  tcp-request inspect-delay 5s\n  tcp-request content accept if {{ req.ssl_hello_type 1 }}\n  use_backend bench if {{ req.ssl_sni -m str {key} }}\n\
         backend bench\n  server b1 {backend}\n"
    )
}

fn nginx_conf(dir: &Path, port: u16, key: &str, backend: SocketAddr) -> String {
    let d = dir.display();
    format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         worker_processes 1;\ndaemon off;\nmaster_process off;\n\
         pid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
         events {{\n  worker_connections 4096;\n}}\n\
         stream {{\n  map_hash_bucket_size 128;\n  map $ssl_preread_server_name $up {{\n    {key} backend;\n  }}\n  upstream backend {{\n    server {backend};\n  }}\n  server {{\n    listen 127.0.0.1:{port};\n    ssl_preread on;\n    proxy_pass $up;\n    proxy_half_close on;\n  }}\n}}\n"
    )
}

fn exe_dir() -> anyhow::Result<PathBuf> {
    Ok(std::env::current_exe()?
        .parent()
        .context("no executable directory")?
        .to_path_buf())
}

/// The first line a command prints (on stdout or stderr), for the versions in the output.
fn first_line(program: &str, args: &[&str]) -> String {
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

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a > 0.0 {
        format!("x{:.2}", a / b)
    } else {
        "-".into()
    }
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.prec$}"))
}

fn print_table(results: &[(&str, Figures)]) {
    let direct = &results[0].1;
    type Row = (&'static str, fn(&Figures, &Figures) -> String);
    let rows: [Row; 12] = [
        ("throughput, Gbit/s", |f, _| format!("{:.2}", f.gbps)),
        ("  fraction of direct", |f, d| {
            format!("{:.2}", f.gbps / d.gbps.max(f64::MIN_POSITIVE))
        }),
        ("proxy CPU s per GB", |f, _| opt(f.cpu_per_gb, 3)),
        ("new connections/s", |f, _| format!("{:.0}", f.conns_per_s)),
        ("proxy CPU µs per connection", |f, _| {
            opt(f.cpu_per_conn_us, 1)
        }),
        ("round trip p50, µs", |f, _| format!("{:.1}", f.p50_us)),
        ("round trip p99, µs", |f, _| format!("{:.1}", f.p99_us)),
        ("added p50 vs direct, µs", |f, d| {
            format!("{:.1}", f.p50_us - d.p50_us)
        }),
        ("added p99 vs direct, µs", |f, d| {
            format!("{:.1}", f.p99_us - d.p99_us)
        }),
        ("proxy CPU µs per round trip", |f, _| {
            opt(f.cpu_per_rtt_us, 2)
        }),
        ("others' CPU %: lat/conn/bulk", |f, _| {
            f.others
                .iter()
                .map(|o| format!("{:.0}", o.cores * 100.0))
                .collect::<Vec<_>>()
                .join("/")
        }),
        ("steal %: lat/conn/bulk", |f, _| {
            f.others
                .iter()
                .map(|o| format!("{:.0}", o.steal * 100.0))
                .collect::<Vec<_>>()
                .join("/")
        }),
    ];
    print!("{:<30}", "");
    for (label, _) in results {
        print!(" {label:>16}");
    }
    println!();
    for (name, cell) in rows {
        print!("{name:<30}");
        for (_, f) in results {
            print!(" {:>16}", cell(f, direct));
        }
        println!();
    }

    let isthmus = &results[1].1;
    println!();
    print!("{:<30}", "isthmus-gateway / peer");
    for (label, _) in &results[2..] {
        print!(" {label:>16}");
    }
    println!();
    type Ratio = (&'static str, fn(&Figures, &Figures) -> f64);
    let ratios: [Ratio; 9] = [
        ("throughput", |f, _| f.gbps),
        ("proxy CPU per GB", |f, _| f.cpu_per_gb.unwrap_or(0.0)),
        ("new connections/s", |f, _| f.conns_per_s),
        ("proxy CPU per connection", |f, _| {
            f.cpu_per_conn_us.unwrap_or(0.0)
        }),
        ("round trip p50", |f, _| f.p50_us),
        ("round trip p99", |f, _| f.p99_us),
        ("added p50", |f, d| f.p50_us - d.p50_us),
        ("added p99", |f, d| f.p99_us - d.p99_us),
        ("proxy CPU per round trip", |f, _| {
            f.cpu_per_rtt_us.unwrap_or(0.0)
        }),
    ];
    for (name, pick) in ratios {
        print!("{name:<30}");
        for (_, f) in &results[2..] {
            print!(" {:>16}", ratio(pick(isthmus, direct), pick(f, direct)));
        }
        println!();
    }
}

/// Each figure's median over the rounds; for the disturbance, each phase's worst round.
fn summarize(rounds: &[Figures]) -> Figures {
    let m = |pick: fn(&Figures) -> f64| median(rounds.iter().map(pick).collect());
    let mo = |pick: fn(&Figures) -> Option<f64>| {
        let v: Vec<f64> = rounds.iter().filter_map(pick).collect();
        (!v.is_empty()).then(|| median(v))
    };
    let mut others: [Others; 3] = Default::default();
    for (i, o) in others.iter_mut().enumerate() {
        if let Some(worst) = rounds
            .iter()
            .map(|f| &f.others[i])
            .max_by(|a, b| (a.cores + a.steal).total_cmp(&(b.cores + b.steal)))
        {
            *o = worst.clone();
        }
    }
    Figures {
        gbps: m(|f| f.gbps),
        cpu_per_gb: mo(|f| f.cpu_per_gb),
        conns_per_s: m(|f| f.conns_per_s),
        cpu_per_conn_us: mo(|f| f.cpu_per_conn_us),
        p50_us: m(|f| f.p50_us),
        p99_us: m(|f| f.p99_us),
        cpu_per_rtt_us: mo(|f| f.cpu_per_rtt_us),
        others,
    }
}

/// Every round's figures, to show how much they moved.
fn print_rounds(rounds: &[(&str, Vec<Figures>)]) {
    println!("\n## Every round");
    println!(
        "{:<16} {:>5} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>9} {:>14}",
        "path",
        "round",
        "Gbit/s",
        "CPU s/GB",
        "conn/s",
        "CPU µs/c",
        "p50 µs",
        "p99 µs",
        "CPU µs/rt",
        "others' CPU %"
    );
    for (label, r) in rounds {
        for (i, f) in r.iter().enumerate() {
            println!(
                "{label:<16} {:>5} {:>8.2} {:>8} {:>8.0} {:>9} {:>8.1} {:>8.1} {:>9} {:>14}",
                i + 1,
                f.gbps,
                opt(f.cpu_per_gb, 3),
                f.conns_per_s,
                opt(f.cpu_per_conn_us, 1),
                f.p50_us,
                f.p99_us,
                opt(f.cpu_per_rtt_us, 2),
                f.others
                    .iter()
                    .map(|o| format!("{:.0}", o.cores * 100.0))
                    .collect::<Vec<_>>()
                    .join("/")
            );
        }
    }
}

const ABOUT: &str = "SNI passthrough benchmark: one mTLS client and TLS backend on \
    loopback, connected directly and through isthmus-gateway, HAProxy and nginx in turn: \
    throughput, new connections, added latency and each proxy's CPU.";

const FLAGS: &[Flag] = &[
    Flag::value(
        "--rounds",
        "3",
        "rounds, the paths taking turns; medians are reported",
    ),
    Flag::value(
        "--bulk-mib",
        "1024",
        "MiB sent on one connection, for throughput",
    ),
    Flag::value(
        "--connections",
        "3000",
        "new connections, a full mTLS handshake each",
    ),
    Flag::value("--concurrency", "4", "new connections at a time"),
    Flag::value(
        "--pings",
        "10000",
        "echoes on one connection, for the added latency",
    ),
    Flag::value("--ping-size", "64", "bytes of each echo"),
    Flag::value(
        "--proxy-cpu",
        "1",
        "the core every proxy is pinned to, as taskset -c takes it",
    ),
    Flag::value(
        "--client-cpu",
        "0",
        "the core of this process: client, backend and registry",
    ),
    Flag::value("--gateway-log", "info", "isthmus-gateway's RUST_LOG"),
];

fn main() -> anyhow::Result<()> {
    let args = Args::from_env(ABOUT, FLAGS)?;
    let opts = Opts {
        bulk_bytes: args.get::<u64>("--bulk-mib")? * 1024 * 1024,
        connections: args.get("--connections")?,
        concurrency: args.get("--concurrency")?,
        pings: args.get("--pings")?,
        rounds: args.get("--rounds")?,
        ping_size: args.get("--ping-size")?,
        proxy_cpu: args.get("--proxy-cpu")?,
        client_cpu: args.get("--client-cpu")?,
        gateway_log: args.get("--gateway-log")?,
    };
    anyhow::ensure!(opts.ping_size >= 1, "--ping-size must be at least 1");
    anyhow::ensure!(opts.pings >= 1, "--pings must be at least 1");
    anyhow::ensure!(opts.rounds >= 1, "--rounds must be at least 1");
    anyhow::ensure!(opts.connections >= 1, "--connections must be at least 1");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    anyhow::ensure!(
        cores >= 2,
        "needs two cores: one for the proxies, one for the client"
    );
    for p in ["haproxy", "nginx", "taskset", "getconf"] {
        anyhow::ensure!(have(p), "{p} is not installed");
    }
    let nginx_module = Path::new("/usr/lib/nginx/modules/ngx_stream_module.so");
    anyhow::ensure!(
        nginx_module.is_file(),
        "{} is missing (Debian: libnginx-mod-stream)",
        nginx_module.display()
    );
    let gateway_bin = exe_dir()?.join("isthmus-gateway");
    anyhow::ensure!(
        gateway_bin.is_file(),
        "{} is missing: build it with cargo build --release -p isthmus-gateway",
        gateway_bin.display()
    );

    // Before any thread starts: everything this process runs stays on the client's core.
    pin_self(opts.client_cpu)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let rounds = rt.block_on(until_stopped(run(&opts, cores, &gateway_bin)))?;
    let results: Vec<(&str, Figures)> = rounds
        .iter()
        .map(|(label, r)| (*label, summarize(r)))
        .collect();
    println!(
        "\n## Median of {} rounds (others' CPU: the worst round)",
        opts.rounds
    );
    print_table(&results);
    print_rounds(&rounds);
    println!(
        "\nnotes: the client's core does the TLS of both ends (and the direct path's copying), so throughput and connections/s are bounded by it, and a proxy on its own core can beat the direct path; the proxy CPU figures compare the proxies. Ratios above x1 mean isthmus-gateway takes more (CPU, latency) or delivers more (throughput, connections/s). The proxies' CPU is read to the nanosecond, the rest of the machine's at clock-tick resolution. \"others' CPU\" is what the rest of the machine used in each phase (from /proc/stat, less this process and the proxy, 0 when within two clock ticks), in % of a core."
    );
    for (label, r) in &rounds {
        for (round, f) in r.iter().enumerate() {
            for (phase, o) in PHASES.iter().zip(&f.others) {
                if o.cores <= 0.05 && o.steal <= 0.05 {
                    continue;
                }
                let top = o.top.as_ref().map_or(String::new(), |(name, c)| {
                    format!(" (most: {name}, {:.0}%)", c * 100.0)
                });
                println!(
                    "warning: {label}, round {}, {phase}: other processes used {:.0}% of a core{top}, steal {:.0}%: that round is disturbed",
                    round + 1,
                    o.cores * 100.0,
                    o.steal * 100.0
                );
            }
        }
    }
    Ok(())
}

async fn run(
    opts: &Opts,
    cores: usize,
    gateway_bin: &Path,
) -> anyhow::Result<Vec<(&'static str, Vec<Figures>)>> {
    let (ping_size, proxy_cpu, client_cpu) = (opts.ping_size, &opts.proxy_cpu, opts.client_cpu);
    let dir = tempfile::tempdir()?;
    let host = isthmus_tests::host(SERVICE, NAMESPACE);
    let key = SniKey::new(SERVICE_PORT, "", &host).to_string();

    // The backend listens first, so that the catalog can name its port.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let backend_addr = listener.local_addr()?;
    let catalog = [
        yaml::service(SERVICE, NAMESPACE, SERVICE_PORT),
        yaml::workload(
            "bench-1",
            NAMESPACE,
            SERVICE,
            "127.0.0.1",
            backend_addr.port(),
            NETWORK,
        ),
    ]
    .join("---\n");
    // The catalog is in place before the registry starts; nothing changes after, so it
    // polls rarely and stays idle while anything is measured.
    let mut reg = TestRegistry::start_with(&[("bench.yaml", &catalog)], |cfg| {
        cfg.resource_poll = Duration::from_secs(30);
        cfg.ca_reload = Duration::from_secs(300);
    })
    .await?;
    let bundle = reg.bundle();
    let server_creds = reg.credentials(NAMESPACE, "server").await?;
    let client_creds = reg.credentials(NAMESPACE, "client").await?;
    let server_id = SpiffeId::workload(&TrustDomain::new(TRUST_DOMAIN)?, NAMESPACE, "server")?;
    let mut server_cfg = tls::server_config(&server_creds, &bundle, ClientAuth::Required, &[])?;
    // The client never resumes, so session tickets would only be bytes to relay.
    server_cfg.send_tls13_tickets = 0;
    tokio::spawn(backend(listener, TlsAcceptor::from(Arc::new(server_cfg))));
    let mut client_cfg = tls::client_config(
        Some(&client_creds),
        &bundle,
        ServerIdentity::OneOf(vec![server_id]),
        &[],
    )?;
    // Every new connection is a full handshake.
    client_cfg.resumption = rustls::client::Resumption::disabled();
    let client = Arc::new(Client {
        connector: TlsConnector::from(Arc::new(client_cfg)),
        server_name: ServerName::try_from(key.clone())?,
        ping_size,
    });

    println!(
        "# SNI passthrough benchmark: {cores} cores ({}{}, kernel {}); every proxy pinned to cpu {proxy_cpu}, the TLS client and backend (this process) to cpu {client_cpu}",
        cpu_model(),
        if virtualized() { ", virtualized" } else { "" },
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    );
    println!(
        "# {} rounds, the paths taking turns; in each round, per path: {} MiB single stream; {} new connections, {} at a time (full mTLS handshake, ECDSA P-256, no resumption, one {ping_size}-byte echo each); {} round trips of {ping_size} bytes",
        opts.rounds,
        opts.bulk_bytes / (1024 * 1024),
        opts.connections,
        opts.concurrency,
        opts.pings
    );
    println!(
        "# peers: {}; {}; SNI key {key}; proxy CPU from its CPU-time clock",
        first_line("haproxy", &["-v"]),
        first_line("nginx", &["-v"]),
    );

    // Every proxy is started (and checked to route) first; idle, it costs nothing, and the
    // paths then take turns, round after round, so that a passing disturbance hits one
    // round of one path rather than one path entirely.
    let mut paths: Vec<(&'static str, SocketAddr, Option<Proxy>)> = Vec::new();
    client.one_call(backend_addr).await.context("direct call")?;
    paths.push(("direct", backend_addr, None));

    // isthmus-gateway, fed by the registry in this process.
    {
        let cert_dir = mesh::gateway_credentials(&reg, NETWORK, dir.path()).await;
        let port = free_port();
        let health = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = dir.path().join("isthmus-gateway.log");
        let mut c = pinned(proxy_cpu, gateway_bin, &log)?;
        c.args(["--network", NETWORK, "--cluster", CLUSTER])
            .args(["--registry", &reg.grpc_addr().to_string()])
            .arg("--root")
            .arg(reg.ca_root())
            .arg("--cert-dir")
            .arg(&cert_dir)
            .args(["--trust-domain", TRUST_DOMAIN])
            .args(["--sni-addr", &format!("127.0.0.1:{port}")])
            .arg("--no-tunnel")
            .args(["--admin-addr", &format!("127.0.0.1:{}", free_port())])
            .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
            .args(["--health-addr", &health.to_string()])
            .args(["--drain-deadline", "2s"])
            .env("RUST_LOG", &opts.gateway_log)
            .env("LOG_FORMAT", "plain");
        let mut p = Proxy {
            label: "isthmus-gateway",
            child: ServerProcess::new(c.spawn().context("starting isthmus-gateway")?),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
        };
        wait_ready(&mut p, health).await?;
        wait_routing(&mut p, &client).await?;
        paths.push((p.label, p.addr, Some(p)));
    }

    // HAProxy.
    {
        let port = free_port();
        let conf = dir.path().join("haproxy.cfg");
        std::fs::write(&conf, haproxy_conf(port, &key, backend_addr))?;
        let log = dir.path().join("haproxy.log");
        let mut c = pinned(proxy_cpu, Path::new("haproxy"), &log)?;
        c.arg("-db").arg("-f").arg(&conf);
        let mut p = Proxy {
            label: "haproxy",
            child: ServerProcess::new(c.spawn().context("starting haproxy")?),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
        };
        wait_routing(&mut p, &client).await?;
        paths.push((p.label, p.addr, Some(p)));
    }

    // nginx.
    {
        let port = free_port();
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, nginx_conf(dir.path(), port, &key, backend_addr))?;
        let mut c = pinned(proxy_cpu, Path::new("nginx"), &dir.path().join("nginx.log"))?;
        c.arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("nginx-error.log"))
            .arg("-c")
            .arg(&conf);
        let mut p = Proxy {
            label: "nginx",
            child: ServerProcess::new(c.spawn().context("starting nginx")?),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log: dir.path().join("nginx-error.log"),
        };
        wait_routing(&mut p, &client).await?;
        paths.push((p.label, p.addr, Some(p)));
    }

    let mut results: Vec<(&'static str, Vec<Figures>)> = paths
        .iter()
        .map(|(label, _, _)| (*label, Vec::new()))
        .collect();
    for round in 0..opts.rounds {
        for i in 0..paths.len() {
            // Each round starts with the next path, so that none is always first.
            let at = (round + i) % paths.len();
            let (label, addr, proxy) = &paths[at];
            let f = measure(&client, *addr, proxy.as_ref().map(Proxy::pid), opts)
                .await
                .with_context(|| {
                    format!(
                        "{label}, round {}\n{}",
                        round + 1,
                        proxy.as_ref().map(Proxy::log_tail).unwrap_or_default()
                    )
                })?;
            results[at].1.push(f);
            eprintln!("round {}/{}: {label} done", round + 1, opts.rounds);
        }
    }
    drop(paths);
    reg.stop().await;
    Ok(results)
}
