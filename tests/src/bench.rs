//! What the benchmark drivers (`src/bin/*-bench.rs`) share: the reader of their command
//! lines ([`Args`], with `--help`), the machine they describe, the kernel's clock tick,
//! medians and percentiles, a process's memory, and the registry benchmarks' Watch fan-out
//! machinery (subscribers that each wait for a series of changes, and a registry in another
//! process to subscribe to).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use anyhow::Context;
use isthmus_proto::certs;
use isthmus_proto::identity::SpiffeId;
use isthmus_proto::model::{
    Address, NodeKind, OwnedResource, Resource, Service, ServicePort, ServiceView, ViewResource,
    Workload,
};
use isthmus_proto::subscription::Subscription;
use tokio::sync::{mpsc, Barrier};

use crate::{node, TestRegistry, NETWORK};

/// Clock ticks per second, the unit of `/proc/<pid>/stat` and `/proc/stat` (asked once).
pub fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// The median (the mean of the middle two for an even count; 0 for none).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The CPU's model name, for the report's header.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Whether this runs under a hypervisor (its CPU flags say so).
pub fn virtualized() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|t| {
            t.lines()
                .any(|l| l.starts_with("flags") && l.contains(" hypervisor"))
        })
        .unwrap_or(false)
}

/// The release program `name` built beside this benchmark driver (`package` is what
/// builds it); an error saying how to build it when it is missing.
pub fn sibling_binary(name: &str, package: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: build it with cargo build --release -p {package}",
        path.display()
    );
    Ok(path)
}

/// Runs a benchmark's work until it ends or the operator stops it (Ctrl-C, SIGTERM, a
/// `timeout`): then the work is dropped where it stands, so that what it set up (network
/// namespaces, the programs it started, temporary directories) is torn down as at the end
/// of a run, and the benchmark ends with an error that says it was stopped. Without this
/// the signal ended the process at once and all of that stayed behind.
pub async fn until_stopped<T>(
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::select! {
        r = work => r,
        () = isthmus_proto::drain::os_signal() => anyhow::bail!(STOPPED_BY_A_SIGNAL),
    }
}

/// How a benchmark stopped by the operator ends.
const STOPPED_BY_A_SIGNAL: &str = "stopped by a signal; what the run had set up was torn down";

/// Set once a signal came, for a benchmark driven from synchronous code.
static STOPPED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// The commands [`output_unless_stopped`] is waiting for: a signal ends them.
static WAITED_FOR: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// [`until_stopped`] for a benchmark driven from synchronous code, which no future can drop
/// where it stands. From this call on, SIGTERM and SIGINT no longer end the process: they
/// end the commands it waits for through [`output_unless_stopped`] and make [`stopped`] an
/// error, so the driver returns at its next step and drops what it set up, as at the end of
/// a run.
pub fn stop_on_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The handlers are in place before this returns.
    let (mut term, mut int) = rt.block_on(async {
        anyhow::Ok((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        ))
    })?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            });
            STOPPED.store(true, std::sync::atomic::Ordering::SeqCst);
            let waited_for = WAITED_FOR
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            waited_for.iter().for_each(|&pid| terminate(pid));
        })?;
    Ok(())
}

/// SIGTERM to a command this process started and has not reaped.
fn terminate(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
}

/// An error once a signal came (see [`stop_on_signal`]).
pub fn stopped() -> anyhow::Result<()> {
    if STOPPED.load(std::sync::atomic::Ordering::SeqCst) {
        anyhow::bail!(STOPPED_BY_A_SIGNAL);
    }
    Ok(())
}

/// `cmd.output()` (no input, output and errors captured), ended early by a signal (see
/// [`stop_on_signal`]), after which this is an error.
pub fn output_unless_stopped(
    cmd: &mut std::process::Command,
) -> anyhow::Result<std::process::Output> {
    use std::process::Stdio;
    stopped()?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = {
        // Spawned and listed under the lock, which the signal's thread takes after setting
        // the flag: either it finds this command listed, or the check below sees the flag.
        let mut waited_for = WAITED_FOR
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let child = cmd.spawn()?;
        waited_for.push(child.id());
        child
    };
    let pid = child.id();
    if STOPPED.load(std::sync::atomic::Ordering::SeqCst) {
        terminate(pid);
    }
    let out = child.wait_with_output();
    WAITED_FOR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .retain(|&p| p != pid);
    stopped()?;
    Ok(out?)
}

/// One flag of a benchmark driver, for [`Args`]; each driver lists its flags in a table.
#[derive(Debug, Clone, Copy)]
pub struct Flag {
    /// The flag as typed: `--rounds`.
    pub name: &'static str,
    /// The value when the flag is not given (`""`: none, the driver says what it needs);
    /// `None` for a switch, which takes no value.
    pub default: Option<&'static str>,
    /// What it sets, in one line, for `--help`.
    pub help: &'static str,
    /// Given only by the driver to its own child processes: `--help` lists these apart.
    pub internal: bool,
}

impl Flag {
    /// A flag followed by its value, `default` when it is not given.
    pub const fn value(name: &'static str, default: &'static str, help: &'static str) -> Self {
        Self {
            name,
            default: Some(default),
            help,
            internal: false,
        }
    }

    /// A switch: given or not, it takes no value.
    pub const fn switch(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            default: None,
            help,
            internal: false,
        }
    }

    /// The same flag, one only the driver itself gives (to its own child processes).
    pub const fn internal(self) -> Self {
        Self {
            internal: true,
            ..self
        }
    }
}

/// What a command line asks for: a run with these flags, or the usage.
#[derive(Debug)]
pub enum Parsed {
    Run(Args),
    Help,
}

/// Every error about the command line ends so: the reader of it learns where the flags are.
const SEE_HELP: &str = " (see --help)";

/// A driver's command line, checked against its table of [`Flag`]s: every flag known and
/// given once, every value present, nothing else. Values are read by name
/// ([`Args::get`]), so that a value that does not parse is reported with its flag.
#[derive(Debug)]
pub struct Args {
    flags: &'static [Flag],
    /// The flags given, with their values (`None` for a switch).
    given: BTreeMap<&'static str, Option<String>>,
    line: Vec<String>,
}

impl Args {
    /// This process's command line. `--help` (or `-h`) prints the usage, `about` (what the
    /// driver measures, in one line) and `flags`, and exits at once, before the driver sets
    /// anything up; anything `flags` does not allow is an error.
    pub fn from_env(about: &str, flags: &'static [Flag]) -> anyhow::Result<Self> {
        let mut line = std::env::args();
        let program = program_name(line.next());
        match Self::parse(flags, line)? {
            Parsed::Run(args) => Ok(args),
            Parsed::Help => {
                print!("{}", usage(&program, about, flags));
                std::process::exit(0)
            }
        }
    }

    /// `line` (the arguments after the program's name) checked against `flags`.
    pub fn parse(
        flags: &'static [Flag],
        line: impl IntoIterator<Item = String>,
    ) -> anyhow::Result<Parsed> {
        let line: Vec<String> = line.into_iter().collect();
        // Asked for anywhere, help wins over a mistake elsewhere: it never starts a run.
        if line.iter().any(|a| a == "--help" || a == "-h") {
            return Ok(Parsed::Help);
        }
        let mut given = BTreeMap::new();
        let mut rest = line.iter();
        while let Some(token) = rest.next() {
            let (name, inline) = match token.split_once('=') {
                Some((name, value)) if token.starts_with("--") => (name, Some(value)),
                _ => (token.as_str(), None),
            };
            let flag = lookup(flags, name)?;
            let value = match (flag.default, inline) {
                (None, None) => None,
                (None, Some(_)) => anyhow::bail!("{name} takes no value{SEE_HELP}"),
                (Some(_), Some(value)) => Some(value.to_string()),
                (Some(_), None) => Some(
                    rest.next()
                        .filter(|v| !v.starts_with("--"))
                        .with_context(|| format!("{name} needs a value{SEE_HELP}"))?
                        .clone(),
                ),
            };
            anyhow::ensure!(
                given.insert(flag.name, value).is_none(),
                "{name} is given twice{SEE_HELP}"
            );
        }
        Ok(Parsed::Run(Self { flags, given, line }))
    }

    /// The value of `name`, given or its default, as a `T`; an error names the flag and
    /// the text (`--requests "1o0": invalid digit found in string`).
    pub fn get<T>(&self, name: &str) -> anyhow::Result<T>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        self.get_or(name, self.default(name))
    }

    /// As [`Args::get`], with `default` in place of the table's: for a default that
    /// depends on another flag.
    pub fn get_or<T>(&self, name: &str, default: &str) -> anyhow::Result<T>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        parse_value(name, self.given(name).unwrap_or(default))
    }

    /// As [`Args::get`], for a list joined by commas (`--subscribers 100,1000`); an error
    /// names the flag and the item.
    pub fn get_list<T>(&self, name: &str) -> anyhow::Result<Vec<T>>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        let text = self.given(name).unwrap_or(self.default(name));
        text.split(',')
            .map(|item| parse_value(name, item))
            .collect()
    }

    /// The value given for `name`, if it was given.
    pub fn given(&self, name: &str) -> Option<&str> {
        self.flag(name);
        self.given.get(name).and_then(|v| v.as_deref())
    }

    /// Whether the switch `name` was given.
    pub fn switch(&self, name: &str) -> bool {
        assert!(
            self.flag(name).default.is_none(),
            "{name} takes a value: it is no switch"
        );
        self.given.contains_key(name)
    }

    /// The arguments as they were given, for a child process of the same driver.
    pub fn line(&self) -> &[String] {
        &self.line
    }

    /// The table's default of `name`, a flag with a value.
    fn default(&self, name: &str) -> &'static str {
        self.flag(name)
            .default
            .unwrap_or_else(|| panic!("{name} is a switch: it has no value"))
    }

    /// `name`'s entry in the table: a name not in it is a mistake in the driver.
    fn flag(&self, name: &str) -> &Flag {
        self.flags
            .iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("{name} is not in the driver's table of flags"))
    }
}

/// `text`, the value of flag `name`, as a `T`; an error names both.
fn parse_value<T>(name: &str, text: &str) -> anyhow::Result<T>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    text.parse()
        .map_err(|e| anyhow::anyhow!("{name} {text:?}: {e}{SEE_HELP}"))
}

/// The flag `token` names; an error for a stray value or an unknown flag (with the flag
/// it most likely misspells).
fn lookup(flags: &'static [Flag], token: &str) -> anyhow::Result<&'static Flag> {
    anyhow::ensure!(
        token.starts_with('-'),
        "stray argument {token:?}: every value follows its flag{SEE_HELP}"
    );
    flags
        .iter()
        .find(|f| f.name == token)
        .ok_or_else(|| match nearest(flags, token) {
            Some(near) => anyhow::anyhow!("unknown flag {token}: did you mean {near}?{SEE_HELP}"),
            None => anyhow::anyhow!("unknown flag {token}{SEE_HELP}"),
        })
}

/// The flag `token` is a typo of: the closest within two edits, if any.
fn nearest(flags: &[Flag], token: &str) -> Option<&'static str> {
    flags
        .iter()
        .map(|f| (edits(f.name, token), f.name))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, name)| name)
}

/// The edit distance from `a` to `b`: letters inserted, removed or replaced.
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    // Distances from a's prefix so far to each prefix of b, one row at a time.
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(above + 1)
                .min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The name the driver was started as, for its usage (`argv[0]` without its directory).
fn program_name(argv0: Option<String>) -> String {
    argv0
        .as_deref()
        .map(std::path::Path::new)
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bench".into())
}

/// What `--help` prints: what the driver measures, how it is called, and its flags with
/// their defaults; those it gives its own child processes come last, apart.
fn usage(program: &str, about: &str, flags: &[Flag]) -> String {
    use std::fmt::Write as _;
    const HELP: Flag = Flag::switch("-h, --help", "print this help and exit");
    let width = flags
        .iter()
        .map(|f| f.name.len())
        .fold(HELP.name.len(), usize::max);
    let entry = |out: &mut String, f: &Flag| {
        let default = match f.default {
            Some(d) if !d.is_empty() => format!(" (default {d})"),
            _ => String::new(),
        };
        let _ = writeln!(out, "  {:width$}  {}{default}", f.name, f.help);
    };
    let switches = flags.iter().any(|f| f.default.is_none() && !f.internal);
    let form = if switches {
        "[--flag value | --switch]..."
    } else {
        "[--flag value]..."
    };
    let mut out = format!(
        "{}\n\nUsage: {program} {form}\n\nFlags:\n",
        wrap(&format!("{program}: {about}"), 80)
    );
    for f in flags.iter().filter(|f| !f.internal) {
        entry(&mut out, f);
    }
    entry(&mut out, &HELP);
    if flags.iter().any(|f| f.internal) {
        out.push_str("\nGiven by the benchmark to its own child processes:\n");
        for f in flags.iter().filter(|f| f.internal) {
            entry(&mut out, f);
        }
    }
    out
}

/// `text` in lines of at most `width` columns, broken between words (a longer word stays
/// whole on its own line).
fn wrap(text: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line_len = 0;
    for word in text.split_whitespace() {
        if line_len > 0 && line_len + 1 + word.len() > width {
            out.push('\n');
            line_len = 0;
        } else if line_len > 0 {
            out.push(' ');
            line_len += 1;
        }
        out.push_str(word);
        line_len += word.len();
    }
    out
}

/// The `p` quantile (0..=1) of sorted durations, nearest rank (0 for none).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

/// A process's resident memory (`VmRSS`), MB; 0 when it cannot be read.
pub fn rss_of(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// A process's CPU time so far (user + system), from `/proc/<pid>/stat`.
pub fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name (which may hold spaces and parentheses) comes field 3, the
    // state; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    let ticks: u64 = fields.iter().sum();
    Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64)
}

/// A process's CPU time so far (user + system, all its threads, ended ones included) to the
/// nanosecond: its CPU-time clock (`clock_getcpuclockid`). Where that clock cannot be read,
/// [`cpu_of`]'s clock ticks.
pub fn cpu_ns_of(pid: u32) -> Duration {
    let clock = nix::time::clock_getcpuclockid(nix::unistd::Pid::from_raw(pid as i32))
        .and_then(nix::time::clock_gettime);
    clock.map_or_else(|_| cpu_of(pid), Duration::from)
}

/// Subscribers waiting for a series of changes, one task each: round `r` is reached by a
/// subscriber when `reached(subscription, r)` holds on its view; each then reports
/// `(r, when)` once. The tasks start together when the caller passes the returned barrier
/// (so none misses the first change); [`round_latencies`] collects one round.
pub fn await_rounds<F>(
    subs: Vec<Subscription>,
    rounds: usize,
    reached: F,
) -> (Arc<Barrier>, mpsc::UnboundedReceiver<(usize, Instant)>)
where
    F: Fn(&Subscription, usize) -> bool + Clone + Send + 'static,
{
    let barrier = Arc::new(Barrier::new(subs.len() + 1));
    let (tx, rx) = mpsc::unbounded_channel::<(usize, Instant)>();
    for mut s in subs {
        let tx = tx.clone();
        let barrier = barrier.clone();
        let reached = reached.clone();
        tokio::spawn(async move {
            barrier.wait().await;
            for round in 0..rounds {
                while !reached(&s, round) {
                    if s.next().await.is_err() {
                        return;
                    }
                }
                let _ = tx.send((round, Instant::now()));
            }
        });
    }
    (barrier, rx)
}

/// How long each of `subscribers` took, from `start`, to report `round` (each within 60 s).
pub async fn round_latencies(
    rx: &mut mpsc::UnboundedReceiver<(usize, Instant)>,
    subscribers: usize,
    round: usize,
    start: Instant,
) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        let (r, at) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("fan-out within 60s")
            .expect("subscriber alive");
        assert_eq!(r, round);
        latencies.push(at - start);
    }
    latencies
}

/// Credentials and channels for a registry in another process, from its CA directory
/// (as [`crate::TestRegistry::config`] lays it out) and its gRPC address.
pub struct RemoteRegistry {
    pub dir: std::path::PathBuf,
    pub grpc: std::net::SocketAddr,
}

impl RemoteRegistry {
    fn bundle(&self) -> isthmus_proto::tls::TrustBundle {
        isthmus_proto::tls::TrustBundle::from_pem_file(
            &self.dir.join("ca").join("root-cert.pem"),
            crate::TRUST_DOMAIN,
        )
        .expect("bundle")
    }

    pub async fn channel(
        &self,
        creds: Option<&isthmus_proto::tls::Credentials>,
    ) -> anyhow::Result<tonic::transport::Channel> {
        use isthmus_proto::tls;
        let cfg = tls::client_config(
            creds,
            &self.bundle(),
            tls::ServerIdentity::TrustDomain,
            &[tls::ALPN_H2],
        )?;
        Ok(isthmus_proto::grpc::connect(&self.grpc.to_string(), Arc::new(cfg)).await?)
    }

    pub async fn credentials(&self) -> anyhow::Result<isthmus_proto::tls::Credentials> {
        let material = isthmus_registry::ca::CaMaterial::load(
            &self.dir.join("ca").join(crate::CLUSTER),
            None,
        )?;
        let token = isthmus_registry::ca::token::create(
            &material,
            crate::CLUSTER,
            "bench",
            "client",
            Duration::from_secs(600),
            ::time::OffsetDateTime::now_utc(),
        )?;
        let id = SpiffeId::parse("spiffe://cluster.local/ns/bench/sa/client")?;
        let (key, csr) = certs::generate_key_and_csr(&id)?;
        let issued =
            certs::request_certificate(self.channel(None).await?, csr, Some(token), 0).await?;
        Ok(isthmus_proto::tls::Credentials::from_pem(
            &issued.chain_pems.concat(),
            &key,
        )?)
    }
}

/// The origin of what the benchmarks ingest.
pub const ORIGIN: &str = "bench:";

/// Service `svc-<i>.bench.svc.cluster.local`, port 8080.
pub fn service(i: usize) -> OwnedResource {
    OwnedResource {
        origin: ORIGIN.into(),
        resource: std::sync::Arc::new(Resource::Service(Service {
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
        })),
    }
}

/// Endpoint `j` of service `svc` on `network`.
pub fn workload(svc: usize, j: usize, network: &str) -> OwnedResource {
    OwnedResource {
        origin: ORIGIN.into(),
        resource: std::sync::Arc::new(Resource::Workload(Workload {
            uid: format!("cluster-a/bench/svc-{svc}-{j}"),
            name: format!("svc-{svc}-{j}"),
            namespace: "bench".into(),
            address: Address::Ip(std::net::IpAddr::from([
                10,
                (svc / 250 % 250) as u8,
                (svc % 250) as u8,
                (j + 1) as u8,
            ])),
            network: network.into(),
            cluster: "cluster-a".into(),
            identity: Some(
                SpiffeId::parse(&format!("spiffe://cluster.local/ns/bench/sa/svc-{svc}")).unwrap(),
            ),
            labels: [("app".to_string(), format!("svc-{svc}"))].into(),
            ports: BTreeMap::new(),
            weight: 1,
            ..Default::default()
        })),
    }
}

/// How many endpoints `hostname` has in the subscriber's view.
pub fn endpoints_of(sub: &Subscription, hostname: &str) -> usize {
    match sub.view.resources.get(&format!("svc/{hostname}")) {
        Some(ViewResource::Service(sv)) => {
            let sv: &ServiceView = sv;
            sv.endpoints.len()
        }
        _ => 0,
    }
}

/// Fan-out latency of one endpoint change (`rounds` of them) to `subscribers` Watch
/// subscribers spread over `regs` in turn (one registry, or a set sharing one store), the
/// change made through the first: sorted, one per subscriber and round.
pub async fn fan_out(regs: &[&TestRegistry], subscribers: usize, rounds: usize) -> Vec<Duration> {
    let creds = regs[0].credentials("bench", "client").await.unwrap();
    let ingest = regs[0].handle().ingest.clone();
    let base: Vec<OwnedResource> = std::iter::once(service(0))
        .chain((0..3).map(|j| workload(0, j, NETWORK)))
        .collect();
    ingest.replace_origin(ORIGIN, base.clone()).await.unwrap();
    let hostname = "svc-0.bench.svc.cluster.local".to_string();

    let mut subs = Vec::new();
    for i in 0..subscribers {
        let mut s = regs[i % regs.len()]
            .subscribe(
                &creds,
                &node(&format!("bench-{i}"), NodeKind::Workload, NETWORK),
            )
            .await
            .unwrap();
        s.next().await.unwrap();
        subs.push(s);
    }
    let (barrier, mut rx) = await_rounds(subs, rounds, move |s, round| {
        let want = if round % 2 == 0 { 4 } else { 3 };
        endpoints_of(s, &hostname) == want
    });
    barrier.wait().await;
    let mut latencies = Vec::new();
    for round in 0..rounds {
        let mut set = base.clone();
        if round % 2 == 0 {
            set.push(workload(0, 3, NETWORK));
        }
        let start = Instant::now();
        ingest.replace_origin(ORIGIN, set).await.unwrap();
        latencies.extend(round_latencies(&mut rx, subscribers, round, start).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    latencies.sort();
    latencies
}

/// 1,000 subscribers need 2,000 descriptors in one process (both ends of each connection).
pub fn check_nofile() {
    #[cfg(target_os = "linux")]
    {
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
            if let Some(line) = limits.lines().find(|l| l.starts_with("Max open files")) {
                let soft: u64 = line
                    .split_whitespace()
                    .nth(3)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if soft < 4096 {
                    eprintln!("note: the open-file limit is {soft}; 1,000 subscribers need about 2,100 (ulimit -n)");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLAGS: &[Flag] = &[
        Flag::value("--rounds", "3", "rounds"),
        Flag::value("--requests", "1000", "requests per round"),
        Flag::value("--only", "all", "parts to run"),
        Flag::switch("--quick", "smaller defaults"),
        Flag::value("--role", "bench", "what this process is").internal(),
        Flag::value("--addr", "", "where the client connects").internal(),
    ];

    fn parse(line: &[&str]) -> anyhow::Result<Parsed> {
        Args::parse(FLAGS, line.iter().map(|a| a.to_string()))
    }

    fn run(line: &[&str]) -> Args {
        match parse(line).unwrap() {
            Parsed::Run(args) => args,
            Parsed::Help => panic!("{line:?} asked for help"),
        }
    }

    fn error(line: &[&str]) -> String {
        match parse(line) {
            Err(e) => e.to_string(),
            Ok(parsed) => panic!("{line:?} was accepted: {parsed:?}"),
        }
    }

    #[test]
    fn defaults_when_nothing_is_given() {
        let args = run(&[]);
        assert_eq!(args.get::<usize>("--rounds").unwrap(), 3);
        assert_eq!(args.get::<String>("--only").unwrap(), "all");
        assert!(!args.switch("--quick"));
        assert_eq!(args.given("--rounds"), None);
    }

    #[test]
    fn given_values_replace_the_defaults() {
        let args = run(&["--rounds", "7", "--only=memory,bulk", "--quick"]);
        assert_eq!(args.get::<usize>("--rounds").unwrap(), 7);
        assert_eq!(args.get::<String>("--only").unwrap(), "memory,bulk");
        assert_eq!(args.get::<usize>("--requests").unwrap(), 1000);
        assert!(args.switch("--quick"));
        assert_eq!(args.given("--rounds"), Some("7"));
    }

    #[test]
    fn a_default_that_depends_on_another_flag() {
        let args = run(&["--quick"]);
        assert_eq!(args.get_or::<usize>("--requests", "100").unwrap(), 100);
        let args = run(&["--quick", "--requests", "5"]);
        assert_eq!(args.get_or::<usize>("--requests", "100").unwrap(), 5);
    }

    #[test]
    fn help_is_asked_for_anywhere_and_wins_over_mistakes() {
        for line in [
            &["--help"][..],
            &["-h"],
            &["--rounds", "3", "--help"],
            &["--bogus", "-h"],
            &["--rounds", "--help"],
        ] {
            assert!(matches!(parse(line), Ok(Parsed::Help)), "{line:?}");
        }
    }

    #[test]
    fn an_unknown_flag_is_refused_by_name() {
        let e = error(&["--bogus", "1"]);
        assert!(e.contains("unknown flag --bogus"), "{e}");
        assert!(e.contains("--help"), "{e}");
    }

    #[test]
    fn a_typo_is_refused_with_the_flag_it_misspells() {
        let e = error(&["--request", "100"]);
        assert!(
            e.contains("unknown flag --request: did you mean --requests?"),
            "{e}"
        );
    }

    #[test]
    fn a_flag_without_its_value_is_refused() {
        let e = error(&["--rounds"]);
        assert!(e.contains("--rounds needs a value"), "{e}");
        let e = error(&["--rounds", "--requests", "5"]);
        assert!(e.contains("--rounds needs a value"), "{e}");
    }

    #[test]
    fn a_switch_takes_no_value() {
        let e = error(&["--quick=yes"]);
        assert!(e.contains("--quick takes no value"), "{e}");
    }

    #[test]
    fn a_flag_given_twice_is_refused() {
        let e = error(&["--rounds", "3", "--rounds=4"]);
        assert!(e.contains("--rounds is given twice"), "{e}");
    }

    #[test]
    fn a_value_that_does_not_parse_names_its_flag() {
        let args = run(&["--requests", "1o0"]);
        let e = args.get::<usize>("--requests").unwrap_err().to_string();
        assert!(
            e.starts_with(r#"--requests "1o0": invalid digit found in string"#),
            "{e}"
        );
        assert!(e.contains("--help"), "{e}");
    }

    #[test]
    fn a_list_is_read_item_by_item() {
        let args = run(&["--only", "1,20,300"]);
        assert_eq!(args.get_list::<usize>("--only").unwrap(), [1, 20, 300]);
        let args = run(&["--only", "1,x"]);
        let e = args.get_list::<usize>("--only").unwrap_err().to_string();
        assert!(e.starts_with(r#"--only "x": invalid digit"#), "{e}");
        let args = run(&[]);
        assert_eq!(args.get_list::<String>("--only").unwrap(), ["all"]);
    }

    #[test]
    fn a_stray_argument_is_refused() {
        let e = error(&["100"]);
        assert!(e.contains(r#"stray argument "100""#), "{e}");
        let e = error(&["--rounds", "3", "4"]);
        assert!(e.contains(r#"stray argument "4""#), "{e}");
    }

    #[test]
    fn internal_flags_are_accepted() {
        let args = run(&["--role", "client", "--addr", "10.0.0.1:80", "--rounds", "2"]);
        assert_eq!(args.get::<String>("--role").unwrap(), "client");
        let addr: std::net::SocketAddr = args.get("--addr").unwrap();
        assert_eq!(addr.port(), 80);
    }

    #[test]
    fn the_line_is_kept_as_given_for_child_processes() {
        let args = run(&["--rounds", "2", "--only=bulk"]);
        assert_eq!(args.line(), ["--rounds", "2", "--only=bulk"]);
    }

    #[test]
    fn usage_lists_the_flags_with_their_defaults_internal_ones_apart() {
        let text = usage("demo-bench", "Demo benchmark: what it measures.", FLAGS);
        assert!(text.starts_with("demo-bench: Demo benchmark: what it measures.\n"));
        assert!(text.contains("Usage: demo-bench [--flag value | --switch]...\n"));
        let (public, internal) = text
            .split_once("Given by the benchmark to its own child processes:")
            .unwrap();
        for f in ["--rounds", "--requests", "--only", "--quick", "--help"] {
            assert!(public.contains(f), "{f} in\n{text}");
        }
        assert!(public.contains("rounds (default 3)"), "{text}");
        assert!(!public.contains("--role"), "{text}");
        assert!(
            internal.contains("--role") && internal.contains("--addr"),
            "{text}"
        );
        // No default to show for a flag whose default is none.
        assert!(internal.contains("where the client connects\n"), "{text}");
    }

    #[test]
    fn usage_has_no_switch_form_without_switches() {
        const VALUES: &[Flag] = &[Flag::value("--rounds", "3", "rounds")];
        let text = usage("demo-bench", "Demo.", VALUES);
        assert!(
            text.contains("Usage: demo-bench [--flag value]...\n"),
            "{text}"
        );
        assert!(!text.contains("Given by the benchmark"), "{text}");
    }

    #[test]
    fn wrap_breaks_between_words() {
        assert_eq!(wrap("aa bb cc dd", 5), "aa bb\ncc dd");
        assert_eq!(wrap("a  b", 80), "a b");
        assert_eq!(wrap("abcdefgh ij", 4), "abcdefgh\nij");
    }

    #[test]
    fn edit_distance() {
        assert_eq!(edits("--requests", "--requests"), 0);
        assert_eq!(edits("--requests", "--request"), 1);
        assert_eq!(edits("--rounds", "--ruonds"), 2);
        assert_eq!(edits("", "abc"), 3);
    }
}
