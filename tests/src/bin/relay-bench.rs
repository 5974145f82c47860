//! Relay benchmark: how fast, and at what CPU cost, the gateway's byte relay moves bytes
//! between two TCP sockets on loopback, for each way of relaying:
//!
//! - `direct`: no relay, the sender connected straight to the sink (the baseline);
//! - `splice`: `isthmus_proxy::relay::relay_tcp_metered` (`splice(2)` through a pipe per
//!   direction), what the gateway's SNI passthrough and every other TCP-to-TCP path use;
//! - `copy`: `isthmus_proxy::relay::relay_metered`, the generic copy loop (buffers 8 → 256 KiB)
//!   that paths with TLS inside the process use;
//! - `tokio-64k`: `tokio::io::copy_bidirectional_with_sizes` with 64 KiB buffers, for
//!   reference.
//!
//! Both of ours count into live byte counters as they go, as the listeners' do.
//!
//! Throughput: a sender thread writes `--gib` GiB through the relay to a sink thread (blocking
//! std sockets, 256 KiB writes and reads). The relay runs alone in its own thread on a
//! current-thread tokio runtime, so its CPU time is that thread's: read from
//! `/proc/thread-self/schedstat` (nanoseconds, user + system, including the softirq work the
//! kernel does in that thread's context). Figures: Gbit/s (10^9 bits) from the first byte
//! sent to the last received; CPU seconds per GB (10^9 bytes) of the relay thread, of the
//! sender and sink, of all three, and of the whole machine (every busy CPU tick in
//! `/proc/stat` during the run: this includes kernel threads such as `ksoftirqd` that finish
//! network work deferred from the three, and anything else running, so it means something
//! only on an otherwise idle machine — the share outside this process is printed per run);
//! how busy the relay's core was.
//!
//! By default (`--pin`, on machines with two or more CPUs) the relay runs on CPU 1 and the
//! sender and sink on CPU 0, so the relay's core is its own and runs vary less. Read the CPU
//! figures with loopback in mind: a send on loopback runs the receiver's TCP input in the
//! sender's thread, and the same pages travel from the sender to the sink; so work moves
//! between the three threads depending on the relay (with `splice` the sink and the sender
//! pay more, for pages the relay passed on without touching), and only part of it is what a
//! gateway between two other machines would pay. On a small machine the endpoints, not the
//! relay, usually bound throughput: compare the relay's CPU per GB and its core's load.
//!
//! Latency: `--pings` round trips of 64 bytes (after 1,000 unmeasured) between a client and
//! an echo server through the relay, `TCP_NODELAY` everywhere; p50 and p99 in microseconds.
//! With `--pin` all three threads share CPU 0 for this, so that a round trip costs what the
//! relay does rather than cross-core wake-ups (expensive in a virtual machine).
//!
//! Each measurement runs `--runs` times, the relays interleaved so that drift in the machine
//! spreads over all of them; the summary gives medians. CPU used by other processes during
//! the runs is printed, since it skews everything. Everything is on 127.0.0.1 and bounded: a
//! run that stalls fails after 60 s, the whole benchmark after `--max-seconds`.
//!
//! Run: `cargo run --release -p isthmus-tests --bin relay-bench -- [--gib 1] [--runs 9]
//! [--pings 20000] [--ways direct,splice,copy,tokio-64k] [--pin true] [--max-seconds 900]`

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use isthmus_proxy::relay::{
    relay_metered, relay_tcp_metered, LiveBytes, RelayMethod, RelayOutcome, Transferred,
};
use isthmus_tests::bench::{clock_ticks, median, Args, Flag};
use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;

const CHUNK: usize = 256 << 10;
const STALL: Duration = Duration::from_secs(60);
const PING: usize = 64;
const WARMUP_PINGS: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Direct,
    Splice,
    Copy,
    Tokio64k,
}

const WAYS: [Way; 4] = [Way::Direct, Way::Splice, Way::Copy, Way::Tokio64k];

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Direct => "direct",
            Way::Splice => "splice",
            Way::Copy => "copy",
            Way::Tokio64k => "tokio-64k",
        }
    }
}

/// Where the threads run: the relay on `relay`, the sender, the sink and the ping client and
/// echo server on `endpoints`; `None` leaves it to the scheduler.
#[derive(Debug, Clone, Copy)]
struct Pinning(Option<(usize, usize)>);

impl Pinning {
    fn relay(self) -> anyhow::Result<()> {
        self.pin(|(relay, _)| relay)
    }

    fn endpoint(self) -> anyhow::Result<()> {
        self.pin(|(_, endpoints)| endpoints)
    }

    /// The relay on the endpoints' CPU.
    fn together(self) -> Pinning {
        Pinning(self.0.map(|(_, endpoints)| (endpoints, endpoints)))
    }

    fn pin(self, which: impl Fn((usize, usize)) -> usize) -> anyhow::Result<()> {
        if let Some(cpus) = self.0 {
            let mut set = CpuSet::new();
            set.set(which(cpus))?;
            // Pid 0: the calling thread.
            sched_setaffinity(Pid::from_raw(0), &set)?;
        }
        Ok(())
    }
}

/// CPU time of the calling thread so far.
fn thread_cpu() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat")?;
    let ns: u64 = stat
        .split_whitespace()
        .next()
        .context("empty schedstat")?
        .parse()?;
    Ok(Duration::from_nanos(ns))
}

/// Busy and total clock ticks of the whole machine, and the ticks this process used.
fn ticks() -> anyhow::Result<(u64, u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .context("empty /proc/stat")?
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal ...; guest time is inside user.
    let total: u64 = cpu.iter().take(8).sum();
    let idle = cpu.get(3).copied().unwrap_or(0) + cpu.get(4).copied().unwrap_or(0);
    let own = std::fs::read_to_string("/proc/self/stat")?;
    let fields: Vec<&str> = own
        .rsplit_once(')')
        .context("bad /proc/self/stat")?
        .1
        .split_whitespace()
        .collect();
    let mine = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok((total - idle, total, mine))
}

/// The share of the machine's CPU time spent outside this process between two `ticks()`:
/// other programs, and kernel threads (such as `ksoftirqd`) doing network work deferred from
/// this one.
fn outside_share(
    (busy0, total0, mine0): (u64, u64, u64),
    (busy1, total1, mine1): (u64, u64, u64),
) -> f64 {
    let outside = (busy1 - busy0).saturating_sub(mine1 - mine0);
    outside as f64 / (total1 - total0).max(1) as f64
}

fn nodelay_timeouts(s: &TcpStream) -> anyhow::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(STALL))?;
    s.set_write_timeout(Some(STALL))?;
    Ok(())
}

/// A relay of one connection, in its own thread: accepts on a listener, connects to
/// `target`, relays, and reports what it moved and the CPU time of the relay alone.
struct Relay {
    addr: SocketAddr,
    thread: JoinHandle<anyhow::Result<(Transferred, Duration)>>,
}

impl Relay {
    fn start(way: Way, target: SocketAddr, pinning: Pinning) -> anyhow::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let thread = thread::Builder::new().name("relay".into()).spawn(move || {
            pinning.relay()?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                listener.set_nonblocking(true)?;
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let (client, _) = listener.accept().await?;
                let upstream = tokio::net::TcpStream::connect(target).await?;
                client.set_nodelay(true)?;
                upstream.set_nodelay(true)?;
                let live = LiveBytes::default();
                let start = thread_cpu()?;
                let outcome = match way {
                    Way::Direct => unreachable!("no relay"),
                    Way::Splice => relay_tcp_metered(client, upstream, live.meter()).await,
                    Way::Copy => relay_metered(client, upstream, live.meter()).await,
                    Way::Tokio64k => tokio_copy(client, upstream).await,
                };
                let cpu = thread_cpu()? - start;
                Ok((outcome.into_result()?, cpu))
            })
        })?;
        Ok(Relay { addr, thread })
    }

    fn finish(self) -> anyhow::Result<(Transferred, Duration)> {
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("relay thread panicked"))?
    }
}

async fn tokio_copy(
    mut client: tokio::net::TcpStream,
    mut upstream: tokio::net::TcpStream,
) -> RelayOutcome {
    match tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, 64 << 10, 64 << 10)
        .await
    {
        Ok((client_to_upstream, upstream_to_client)) => RelayOutcome {
            transferred: Transferred {
                client_to_upstream,
                upstream_to_client,
            },
            error: None,
            method: RelayMethod::Copy,
        },
        Err(e) => RelayOutcome {
            transferred: Transferred::default(),
            error: Some(e),
            method: RelayMethod::Copy,
        },
    }
}

/// Starts a relay of `way` in front of `target`, or none for `direct`; returns the address to
/// connect to.
fn front(
    way: Way,
    target: SocketAddr,
    pinning: Pinning,
) -> anyhow::Result<(SocketAddr, Option<Relay>)> {
    if way == Way::Direct {
        return Ok((target, None));
    }
    let relay = Relay::start(way, target, pinning)?;
    Ok((relay.addr, Some(relay)))
}

struct Throughput {
    gbit_per_s: f64,
    relay_cpu_per_gb: f64,
    sender_cpu_per_gb: f64,
    sink_cpu_per_gb: f64,
    all_cpu_per_gb: f64,
    /// Everything busy on the machine during the run, per GB (set by the caller).
    machine_cpu_per_gb: f64,
    /// The relay thread's CPU time over the run's duration.
    relay_load: f64,
}

fn throughput(way: Way, bytes: u64, pinning: Pinning) -> anyhow::Result<Throughput> {
    let sink_listener = TcpListener::bind("127.0.0.1:0")?;
    let sink_addr = sink_listener.local_addr()?;
    let sink = thread::Builder::new().name("sink".into()).spawn(
        move || -> anyhow::Result<(u64, Instant, Duration)> {
            pinning.endpoint()?;
            let (mut s, _) = sink_listener.accept()?;
            nodelay_timeouts(&s)?;
            let start = thread_cpu()?;
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            let end = Instant::now();
            Ok((total, end, thread_cpu()? - start))
        },
    )?;
    let (addr, relay) = front(way, sink_addr, pinning)?;

    let sender = thread::Builder::new().name("sender".into()).spawn(
        move || -> anyhow::Result<(Instant, Duration)> {
            pinning.endpoint()?;
            let mut s = TcpStream::connect(addr)?;
            nodelay_timeouts(&s)?;
            let cpu = thread_cpu()?;
            let buf = vec![0x5au8; CHUNK];
            let started = Instant::now();
            let mut left = bytes;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                s.write_all(&buf[..n])?;
                left -= n as u64;
            }
            s.shutdown(Shutdown::Write)?;
            // Until the relay (or the sink) closes its side: the whole transfer is done.
            let mut rest = Vec::new();
            s.read_to_end(&mut rest)?;
            Ok((started, thread_cpu()? - cpu))
        },
    )?;

    let (started, sender_cpu) = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    let (received, ended, sink_cpu) = sink
        .join()
        .map_err(|_| anyhow::anyhow!("sink panicked"))??;
    if received != bytes {
        bail!(
            "{}: the sink received {received} of {bytes} bytes",
            way.name()
        );
    }
    let relay_cpu = match relay {
        Some(relay) => {
            let (moved, cpu) = relay.finish()?;
            if moved.client_to_upstream != bytes {
                bail!("{}: relay reports {moved:?}", way.name());
            }
            cpu
        }
        None => Duration::ZERO,
    };
    let seconds = (ended - started).as_secs_f64();
    let gb = bytes as f64 / 1e9;
    Ok(Throughput {
        gbit_per_s: bytes as f64 * 8.0 / 1e9 / seconds,
        relay_cpu_per_gb: relay_cpu.as_secs_f64() / gb,
        sender_cpu_per_gb: sender_cpu.as_secs_f64() / gb,
        sink_cpu_per_gb: sink_cpu.as_secs_f64() / gb,
        all_cpu_per_gb: (relay_cpu + sender_cpu + sink_cpu).as_secs_f64() / gb,
        relay_load: relay_cpu.as_secs_f64() / seconds,
        machine_cpu_per_gb: 0.0,
    })
}

/// Round-trip times in microseconds, sorted.
fn ping_pong(way: Way, pings: usize, pinning: Pinning) -> anyhow::Result<Vec<f64>> {
    let echo_listener = TcpListener::bind("127.0.0.1:0")?;
    let echo_addr = echo_listener.local_addr()?;
    let echo =
        thread::Builder::new()
            .name("echo".into())
            .spawn(move || -> anyhow::Result<()> {
                pinning.endpoint()?;
                let (mut s, _) = echo_listener.accept()?;
                nodelay_timeouts(&s)?;
                let mut buf = [0u8; PING];
                loop {
                    match s.read(&mut buf)? {
                        0 => return Ok(()),
                        n => s.write_all(&buf[..n])?,
                    }
                }
            })?;
    // All on one core: a round trip then costs what the relay does, not the wake-ups of
    // threads on other cores (which in a virtual machine dominate).
    let (addr, relay) = front(way, echo_addr, pinning.together())?;
    let client =
        thread::Builder::new()
            .name("ping".into())
            .spawn(move || -> anyhow::Result<Vec<f64>> {
                pinning.endpoint()?;
                let mut s = TcpStream::connect(addr)?;
                nodelay_timeouts(&s)?;
                let msg = [0x42u8; PING];
                let mut back = [0u8; PING];
                let mut rtts = Vec::with_capacity(pings);
                for i in 0..WARMUP_PINGS + pings {
                    let t = Instant::now();
                    s.write_all(&msg)?;
                    s.read_exact(&mut back)?;
                    if i >= WARMUP_PINGS {
                        rtts.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                }
                s.shutdown(Shutdown::Write)?;
                let mut rest = Vec::new();
                s.read_to_end(&mut rest)?;
                Ok(rtts)
            })?;
    let mut rtts = client
        .join()
        .map_err(|_| anyhow::anyhow!("ping client panicked"))??;
    echo.join()
        .map_err(|_| anyhow::anyhow!("echo panicked"))??;
    if let Some(relay) = relay {
        relay.finish()?;
    }
    rtts.sort_by(f64::total_cmp);
    Ok(rtts)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

const ABOUT: &str = "Relay benchmark: how fast, and at what CPU cost, the gateway's byte relay \
    moves bytes between two TCP sockets on loopback, for each way of relaying, beside a direct \
    connection.";

const FLAGS: &[Flag] = &[
    Flag::value(
        "--gib",
        "1",
        "GiB through the relay per throughput run, at most 64",
    ),
    Flag::value(
        "--runs",
        "9",
        "runs of each measurement, the relays interleaved",
    ),
    Flag::value("--pings", "20000", "64-byte round trips per latency run"),
    Flag::value(
        "--ways",
        "direct,splice,copy,tokio-64k",
        "the ways of relaying to measure, joined by commas",
    ),
    Flag::value(
        "--pin",
        "true",
        "true or false: the relay on CPU 1, the rest on CPU 0, given two CPUs or more",
    ),
    Flag::value(
        "--max-seconds",
        "900",
        "seconds after which the whole benchmark stops",
    ),
];

fn main() -> anyhow::Result<()> {
    let args = Args::from_env(ABOUT, FLAGS)?;
    let gib: f64 = args.get("--gib")?;
    let runs: usize = args.get("--runs")?;
    let pings: usize = args.get("--pings")?;
    let pin: bool = args.get("--pin")?;
    let max_seconds: u64 = args.get("--max-seconds")?;
    let ways: Vec<Way> = args
        .get::<String>("--ways")?
        .split(',')
        .map(|name| {
            WAYS.into_iter()
                .find(|w| w.name() == name)
                .with_context(|| format!("--ways: unknown relay {name:?} (see --help)"))
        })
        .collect::<anyhow::Result<_>>()?;
    if runs == 0 || pings == 0 || !(gib > 0.0 && gib <= 64.0) {
        bail!("--runs and --pings must be positive, --gib in (0, 64]");
    }
    let bytes = (gib * (1u64 << 30) as f64) as u64;
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let pinning = Pinning((pin && cpus >= 2).then_some((1, 0)));
    thread::spawn(move || {
        thread::sleep(Duration::from_secs(max_seconds));
        eprintln!("relay-bench: stopped after {max_seconds} s (--max-seconds)");
        std::process::exit(2);
    });

    println!(
        "{cpus} CPUs; {}",
        match pinning.0 {
            Some((relay, endpoints)) => format!(
                "relay pinned to CPU {relay}, sender, sink, ping client and echo server to \
                 CPU {endpoints}"
            ),
            None => "threads not pinned".to_string(),
        }
    );
    let start = ticks()?;
    let hz = clock_ticks() as f64;

    println!("throughput: {gib} GiB per run, {runs} runs per relay, interleaved");
    let mut results: Vec<Vec<Throughput>> = ways.iter().map(|_| Vec::new()).collect();
    for run in 1..=runs {
        for (i, &way) in ways.iter().enumerate() {
            let before = ticks()?;
            let mut t = throughput(way, bytes, pinning)?;
            let after = ticks()?;
            t.machine_cpu_per_gb = (after.0 - before.0) as f64 / hz / (bytes as f64 / 1e9);
            println!(
                "  run {run} {:<10} {:6.2} Gbit/s  CPU-s/GB: relay {:.3}  sender {:.3}  \
                 sink {:.3}  threads {:.3}  machine {:.3}  relay core {:3.0}% busy  \
                 outside {:2.0}%",
                way.name(),
                t.gbit_per_s,
                t.relay_cpu_per_gb,
                t.sender_cpu_per_gb,
                t.sink_cpu_per_gb,
                t.all_cpu_per_gb,
                t.machine_cpu_per_gb,
                t.relay_load * 100.0,
                outside_share(before, after) * 100.0,
            );
            results[i].push(t);
        }
    }

    println!("ping-pong: {pings} round trips of {PING} bytes per run");
    let mut latencies: Vec<Vec<(f64, f64)>> = ways.iter().map(|_| Vec::new()).collect();
    for run in 1..=runs {
        for (i, &way) in ways.iter().enumerate() {
            let rtts = ping_pong(way, pings, pinning)?;
            let (p50, p99) = (percentile(&rtts, 0.50), percentile(&rtts, 0.99));
            println!(
                "  run {run} {:<10} p50 {p50:6.1} us  p99 {p99:6.1} us",
                way.name()
            );
            latencies[i].push((p50, p99));
        }
    }
    println!(
        "CPU time outside this process (other programs, kernel threads): {:.1}% of the \
         machine's during the runs",
        100.0 * outside_share(start, ticks()?)
    );

    println!();
    println!("medians over {runs} runs (throughput) / {runs} runs (ping-pong):");
    println!(
        "{:<10} {:>7}  {:>28}  {:>10} {:>10} {:>7} {:>7}",
        "relay",
        "Gbit/s",
        "CPU-s/GB relay/threads/mach.",
        "relay core",
        "capacity",
        "p50 us",
        "p99 us"
    );
    for (i, &way) in ways.iter().enumerate() {
        let t = &results[i];
        let l = &latencies[i];
        let relay_cpu = median(t.iter().map(|t| t.relay_cpu_per_gb).collect());
        // What one core running only the relay would move, at this CPU cost per byte.
        let capacity = if relay_cpu > 0.0 {
            format!("{:.0} Gbit/s", 8.0 / relay_cpu)
        } else {
            "-".to_string()
        };
        println!(
            "{:<10} {:>7.2}  {:>12.3} / {:.3} / {:.3}  {:>9.0}% {:>10} {:>7.1} {:>7.1}",
            way.name(),
            median(t.iter().map(|t| t.gbit_per_s).collect()),
            relay_cpu,
            median(t.iter().map(|t| t.all_cpu_per_gb).collect()),
            median(t.iter().map(|t| t.machine_cpu_per_gb).collect()),
            100.0 * median(t.iter().map(|t| t.relay_load).collect()),
            capacity,
            median(l.iter().map(|l| l.0).collect()),
            median(l.iter().map(|l| l.1).collect()),
        );
    }
    Ok(())
}
