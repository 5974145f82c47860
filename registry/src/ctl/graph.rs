//! `isthmusctl graph`: who talks to whom, read from the proxies' own `/metrics` (the VM
//! agents', the east-west gateways'), printed as a table grouped by network and cluster, as
//! Graphviz DOT, or as SVG rendered by Graphviz's `dot`.
//!
//! What it reads: Istio's standard TCP metrics (`istio_tcp_connections_opened_total`,
//! `istio_tcp_received_bytes_total`, `istio_tcp_sent_bytes_total`) of the series a source
//! reports (`reporter="source"`: a caller's outbound, a gateway), isthmus's
//! `isthmus_tcp_connections_opened_total` beside them for the networks of both ends and the
//! transport (`direct`, `sni-gateway`, `hbone`, `hbone-gateway`, `quic`, `quic-gateway`), joined on the edge's workload and service labels,
//! and each proxy's `isthmus_<program>_connections_refused_total` by reason. Destinations
//! report only the connections their authorization denied (`response_flags="DENY"`),
//! counted on the destination workload: a connection is drawn once, from its source.
//!
//! The graph has workloads and services as nodes: a caller's edge goes to the service it
//! called, in the network the connection landed in, and from the service to the workload
//! that answered when the reporter knows it (through a remote gateway only that gateway
//! does). One scrape gives totals since each proxy started; `--interval` scrapes twice and
//! gives rates.
//!
//! The proxies are named by URL, not found in the catalog: the catalog holds each network's
//! gateway SNI and tunnel addresses but no metrics port, and a workload's address is private
//! to its network (reachable from outside only through the gateway's data path), so an
//! address derived from it would not be one this command can reach.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use isthmus_proto::config::parse_duration;

use super::clusters::grid;
use super::http;

/// The port a proxy serves `/metrics` on when a URL names none (Istio's merged-metrics
/// port, the gateway's and the VM agent's default).
pub const DEFAULT_METRICS_PORT: u16 = 15020;
/// The path when a URL names none.
pub const DEFAULT_METRICS_PATH: &str = "/metrics";
/// How long one scrape may take, connect to last byte.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest `/metrics` answer read.
const MAX_BODY: u64 = 64 << 20;

/// Istio's value for a label nobody knows.
const UNKNOWN: &str = "unknown";
const OPENED: &str = "istio_tcp_connections_opened_total";
/// Bytes from the caller towards the server.
const REQUEST_BYTES: &str = "istio_tcp_received_bytes_total";
/// Bytes from the server back to the caller.
const RESPONSE_BYTES: &str = "istio_tcp_sent_bytes_total";
const TRANSITS: &str = "isthmus_tcp_connections_opened_total";

#[derive(Debug, Args)]
pub(super) struct GraphArgs {
    /// Each proxy's metrics endpoint (a VM agent's or a gateway's), comma-separated or the
    /// flag repeated: http://HOST[:PORT][/PATH], port 15020 and /metrics by default. They are
    /// not discovered from the catalog (it holds no metrics ports, and workload addresses are
    /// private to their network): name every proxy to draw, reachable from here.
    #[arg(long, value_delimiter = ',', required = true)]
    metrics: Vec<String>,
    /// text (a table grouped by network and cluster), dot (Graphviz) or svg (rendered by
    /// Graphviz's `dot`, which must be installed).
    #[arg(long, short, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Scrape twice this far apart and show rates per second (e.g. 10s); without it, the
    /// totals since each proxy started.
    #[arg(long, value_parser = parse_duration)]
    interval: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Dot,
    Svg,
}

pub(super) async fn show(args: GraphArgs) -> anyhow::Result<()> {
    if args.interval.is_some_and(|i| i.is_zero()) {
        bail!("--interval 0: rates need two scrapes some time apart (e.g. 10s)");
    }
    let urls = args
        .metrics
        .iter()
        .map(|u| MetricsUrl::parse(u).with_context(|| format!("--metrics {u:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let scraped = scrape_all(&urls, args.interval).await;
    let failed: Vec<&Scraped> = scraped.iter().filter(|s| s.counts.is_err()).collect();
    if failed.len() == scraped.len() {
        let causes: Vec<String> = failed.iter().map(|s| s.describe_error()).collect();
        bail!(
            "no proxy's metrics could be read:\n  {}",
            causes.join("\n  ")
        );
    }
    for s in &failed {
        eprintln!("isthmusctl graph: left out {}", s.describe_error());
    }
    let graph = Graph::build(&scraped, args.interval.is_some());
    match args.output {
        Output::Text => print!("{}", graph.text()),
        Output::Dot => print!("{}", graph.dot()),
        Output::Svg => print!("{}", render_svg(&graph.dot())?),
    }
    Ok(())
}

// ---- Fetching ----

/// A `/metrics` URL, checked: where to connect and what to ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsUrl {
    /// As the user wrote it (how errors and the graph name the proxy).
    pub url: String,
    /// `host:port`, as a socket connects to it.
    pub authority: String,
    pub path: String,
}

impl MetricsUrl {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let s = s.trim();
        let rest = match s.split_once("://") {
            Some(("http", rest)) => rest,
            Some(("https", _)) => bail!(
                "https is not supported: the proxies serve /metrics in plain HTTP (port {DEFAULT_METRICS_PORT})"
            ),
            Some((scheme, _)) => bail!("{scheme}:// is not an HTTP URL"),
            None => s,
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, DEFAULT_METRICS_PATH),
        };
        if authority.is_empty() {
            bail!("no host");
        }
        let has_port = match authority.rfind(']') {
            // [v6] or [v6]:port
            Some(end) => authority[end..].contains(':'),
            None => authority.contains(':'),
        };
        let authority = if has_port {
            let port = authority.rsplit(':').next().unwrap_or_default();
            port.parse::<u16>()
                .with_context(|| format!("{port:?} is not a port"))?;
            authority.to_string()
        } else {
            format!("{authority}:{DEFAULT_METRICS_PORT}")
        };
        Ok(Self {
            url: s.to_string(),
            authority,
            path: path.to_string(),
        })
    }
}

/// Why a proxy's metrics could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("cannot connect to {authority}: {source} (is the proxy running, and its metrics port reachable from here?)")]
    Connect {
        authority: String,
        source: std::io::Error,
    },
    #[error("reading the answer: {0}")]
    Read(std::io::Error),
    #[error("no answer within {}s", SCRAPE_TIMEOUT.as_secs())]
    Timeout,
    #[error("not an HTTP answer")]
    NotHttp,
    #[error("answered HTTP {status} (is {path} the proxy's metrics path?)")]
    Status { status: u16, path: String },
    #[error("not Prometheus text: {0}")]
    NotPrometheus(#[from] ParseError),
}

/// The body of a 200 answer to a GET of the proxy's metrics.
async fn fetch(url: &MetricsUrl) -> Result<String, ScrapeError> {
    let (status, body) = http::get(
        &url.authority,
        &url.path,
        "text/plain",
        SCRAPE_TIMEOUT,
        MAX_BODY,
    )
    .await
    .map_err(|e| match e {
        http::GetError::Connect(source) => ScrapeError::Connect {
            authority: url.authority.clone(),
            source,
        },
        http::GetError::Read(e) => ScrapeError::Read(e),
        http::GetError::Timeout(_) => ScrapeError::Timeout,
        http::GetError::NotHttp(_) => ScrapeError::NotHttp,
    })?;
    if status != 200 {
        return Err(ScrapeError::Status {
            status,
            path: url.path.clone(),
        });
    }
    Ok(body)
}

async fn scrape(url: &MetricsUrl) -> Result<Counts, ScrapeError> {
    let body = fetch(url).await?;
    Ok(Counts::from_samples(parse(&body)?))
}

/// One proxy's counters: totals, or rates per second between two scrapes.
#[derive(Debug)]
pub struct Scraped {
    pub url: String,
    pub counts: Result<Counts, ScrapeError>,
}

impl Scraped {
    fn describe_error(&self) -> String {
        match &self.counts {
            Err(e) => format!("{}: {e}", self.url),
            Ok(_) => self.url.clone(),
        }
    }
}

/// Scrapes every URL at once; with `interval`, twice, and gives the rates.
async fn scrape_all(urls: &[MetricsUrl], interval: Option<Duration>) -> Vec<Scraped> {
    let once = || futures_util::future::join_all(urls.iter().map(scrape));
    let first = once().await;
    let Some(interval) = interval else {
        return urls
            .iter()
            .zip(first)
            .map(|(u, counts)| Scraped {
                url: u.url.clone(),
                counts,
            })
            .collect();
    };
    let started = Instant::now();
    tokio::time::sleep(interval).await;
    let second = once().await;
    let elapsed = started.elapsed();
    urls.iter()
        .zip(first.into_iter().zip(second))
        .map(|(u, (a, b))| Scraped {
            url: u.url.clone(),
            counts: match (a, b) {
                (Ok(a), Ok(b)) => Ok(b.rate_since(&a, elapsed)),
                (Err(e), _) | (_, Err(e)) => Err(e),
            },
        })
        .collect()
}

// ---- Prometheus text ----

/// One sample of the exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}: {text:?}")]
pub struct ParseError {
    pub line: usize,
    pub reason: &'static str,
    /// The line, cut short.
    pub text: String,
}

/// The samples of a Prometheus (or OpenMetrics) text exposition; the first line that is
/// neither a comment nor a sample is an error. An empty text is one too: every program
/// describes its metrics even before it counts anything.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut samples = Vec::new();
    let mut described = false;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('#') {
            described = true;
            continue;
        }
        let err = |reason| ParseError {
            line: i + 1,
            reason,
            text: line.chars().take(80).collect(),
        };
        samples.push(parse_sample(line).map_err(err)?);
    }
    if samples.is_empty() && !described {
        return Err(ParseError {
            line: 0,
            reason: "no metrics at all",
            text: String::new(),
        });
    }
    Ok(samples)
}

fn is_name_char(c: char, first: bool) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':' || (!first && c.is_ascii_digit())
}

fn parse_sample(line: &str) -> Result<Sample, &'static str> {
    let end = line
        .char_indices()
        .find(|&(i, c)| !is_name_char(c, i == 0))
        .map_or(line.len(), |(i, _)| i);
    if end == 0 {
        return Err("not a metric name");
    }
    let name = line[..end].to_string();
    let mut rest = &line[end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = parse_labels(after, &mut labels)?;
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("no value")?;
    let value: f64 = value.parse().map_err(|_| "the value is not a number")?;
    // An optional timestamp, then nothing.
    if fields.nth(1).is_some() {
        return Err("more than a value and a timestamp");
    }
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// Reads `name="value",...}` into `labels`; returns what follows the `}`.
fn parse_labels<'a>(
    mut s: &'a str,
    labels: &mut BTreeMap<String, String>,
) -> Result<&'a str, &'static str> {
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Ok(rest);
        }
        let end = s
            .char_indices()
            .find(|&(i, c)| !is_name_char(c, i == 0) || c == ':')
            .map_or(s.len(), |(i, _)| i);
        if end == 0 {
            return Err("not a label name");
        }
        let name = s[..end].to_string();
        s = s[end..]
            .trim_start()
            .strip_prefix('=')
            .ok_or("no = after a label name")?
            .trim_start()
            .strip_prefix('"')
            .ok_or("a label value is not quoted")?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let close = loop {
            match chars.next() {
                None => return Err("a label value is not closed"),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    _ => return Err("a bad escape in a label value"),
                },
                Some((_, c)) => value.push(c),
            }
        };
        labels.insert(name, value);
        s = s[close + 1..].trim_start();
        s = match s.strip_prefix(',') {
            Some(rest) => rest,
            None if s.starts_with('}') => s,
            None => return Err("no , or } after a label"),
        };
    }
}

/// A proxy's samples by name and labels; values are totals, or rates per second.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    series: BTreeMap<(String, BTreeMap<String, String>), f64>,
}

impl Counts {
    pub fn from_samples(samples: Vec<Sample>) -> Self {
        let mut series = BTreeMap::new();
        for s in samples {
            *series.entry((s.name, s.labels)).or_default() += s.value;
        }
        Self { series }
    }

    /// The rates per second from `earlier` to these, `elapsed` apart: a counter that went
    /// down restarted (its proxy did) and counts from zero.
    pub fn rate_since(&self, earlier: &Counts, elapsed: Duration) -> Counts {
        let secs = elapsed.as_secs_f64().max(f64::EPSILON);
        let series = self
            .series
            .iter()
            .map(|(k, &now)| {
                let before = earlier.series.get(k).copied().unwrap_or(0.0);
                let delta = if now >= before { now - before } else { now };
                (k.clone(), delta / secs)
            })
            .collect();
        Counts { series }
    }

    fn named<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = (&'a BTreeMap<String, String>, f64)> + 'a {
        self.series
            .iter()
            .filter(move |((n, _), _)| n == name)
            .map(|((_, l), v)| (l, *v))
    }
}

// ---- The graph ----

/// A node: a workload (a proxy's own, a caller, a server) or a service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Node {
    Workload {
        network: String,
        cluster: String,
        namespace: String,
        name: String,
    },
    Service {
        network: String,
        hostname: String,
    },
}

impl Node {
    fn network(&self) -> &str {
        match self {
            Node::Workload { network, .. } | Node::Service { network, .. } => network,
        }
    }

    fn with_network(&self, net: &str) -> Node {
        let mut n = self.clone();
        match &mut n {
            Node::Workload { network, .. } | Node::Service { network, .. } => {
                *network = net.to_string()
            }
        }
        n
    }

    /// The node without its network: what is compared to place a node seen without one.
    fn placeless(&self) -> Node {
        self.with_network("")
    }

    /// `network/cluster/namespace/name` or `network/hostname`.
    pub fn path(&self) -> String {
        match self {
            Node::Workload {
                network,
                cluster,
                namespace,
                name,
            } => format!("{network}/{cluster}/{namespace}/{name}"),
            Node::Service { network, hostname } => format!("{network}/{hostname}"),
        }
    }

    fn short(&self) -> String {
        match self {
            Node::Workload {
                namespace, name, ..
            } => format!("{namespace}/{name}"),
            Node::Service { hostname, .. } => hostname.clone(),
        }
    }
}

/// What went along one edge: totals, or rates per second.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EdgeStats {
    /// Connections opened, refused ones included.
    pub connections: f64,
    /// Connections that reached no endpoint (`response_flags` other than `-`).
    pub refused: f64,
    /// Bytes from the caller towards the server.
    pub sent: f64,
    /// Bytes from the server back to the caller.
    pub received: f64,
    /// Connections by transport (`direct`, `sni-gateway`, `hbone`, `hbone-gateway`, `quic`, `quic-gateway`); those the proxy gave none for
    /// are in none.
    pub transports: BTreeMap<String, f64>,
}

impl EdgeStats {
    fn add(&mut self, o: &EdgeStats) {
        self.connections += o.connections;
        self.refused += o.refused;
        self.sent += o.sent;
        self.received += o.received;
        for (t, n) in &o.transports {
            *self.transports.entry(t.clone()).or_default() += n;
        }
    }

    fn scaled(&self, share: f64) -> EdgeStats {
        EdgeStats {
            connections: self.connections * share,
            refused: self.refused * share,
            sent: self.sent * share,
            received: self.received * share,
            transports: BTreeMap::new(),
        }
    }

    /// One transport (`direct`, `sni-gateway`, `hbone`, `hbone-gateway`, `quic`, `quic-gateway`), several joined with `+`, or `-` when no proxy said.
    pub fn transport(&self) -> String {
        let t: Vec<&str> = self
            .transports
            .iter()
            .filter(|(_, &n)| n > 0.0)
            .map(|(t, _)| t.as_str())
            .collect();
        if t.is_empty() {
            "-".into()
        } else {
            t.join("+")
        }
    }
}

/// One scraped proxy, as the graph lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Proxy {
    pub url: String,
    /// The workload it reports as, when its metrics say.
    pub reports_as: Option<Node>,
    /// Connections it refused before choosing a service, by `direction/reason`.
    pub refused: BTreeMap<String, f64>,
    /// Why it is not in the graph.
    pub error: Option<String>,
}

/// A cluster's workloads (`Some(cluster)`), or a network's services (`None`).
type Place<'a> = (Option<&'a str>, Vec<&'a Node>);

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Graph {
    pub nodes: BTreeSet<Node>,
    pub edges: BTreeMap<(Node, Node), EdgeStats>,
    /// Connections a destination's authorization denied, by destination workload.
    pub denied: BTreeMap<Node, f64>,
    pub proxies: Vec<Proxy>,
    /// Values are rates per second rather than totals.
    pub rates: bool,
}

/// The labels that name an edge in both Istio's families and the transit family.
const EDGE_LABELS: [&str; 7] = [
    "source_workload",
    "source_workload_namespace",
    "source_cluster",
    "destination_service",
    "destination_workload",
    "destination_workload_namespace",
    "destination_cluster",
];

type EdgeKey = [String; 7];

fn label<'a>(l: &'a BTreeMap<String, String>, name: &str) -> &'a str {
    l.get(name).map_or(UNKNOWN, String::as_str)
}

fn edge_key(l: &BTreeMap<String, String>) -> EdgeKey {
    EDGE_LABELS.map(|n| label(l, n).to_string())
}

/// One transit series: the networks and the transport of some of an edge's connections.
#[derive(Debug, Clone)]
struct TransitCount {
    source_network: String,
    destination_network: String,
    transport: String,
    connections: f64,
}

impl Graph {
    pub fn build(scraped: &[Scraped], rates: bool) -> Graph {
        let mut g = Graph {
            rates,
            ..Graph::default()
        };
        for s in scraped {
            match &s.counts {
                Ok(c) => {
                    let reports_as = g.add_proxy(c);
                    g.proxies.push(Proxy {
                        url: s.url.clone(),
                        reports_as,
                        refused: refusals(c),
                        error: None,
                    });
                }
                Err(e) => g.proxies.push(Proxy {
                    url: s.url.clone(),
                    reports_as: None,
                    refused: BTreeMap::new(),
                    error: Some(e.to_string()),
                }),
            }
        }
        g.place_unknown_networks();
        g
    }

    /// Adds one proxy's edges; returns the workload it reports as.
    fn add_proxy(&mut self, c: &Counts) -> Option<Node> {
        let source = |l: &BTreeMap<String, String>| label(l, "reporter") == "source";
        let mut edges: BTreeMap<EdgeKey, EdgeStats> = BTreeMap::new();
        for (l, v) in c.named(OPENED).filter(|(l, _)| source(l)) {
            let e = edges.entry(edge_key(l)).or_default();
            e.connections += v;
            if label(l, "response_flags") != "-" {
                e.refused += v;
            }
        }
        for (l, v) in c.named(REQUEST_BYTES).filter(|(l, _)| source(l)) {
            edges.entry(edge_key(l)).or_default().sent += v;
        }
        for (l, v) in c.named(RESPONSE_BYTES).filter(|(l, _)| source(l)) {
            edges.entry(edge_key(l)).or_default().received += v;
        }
        let mut transits: BTreeMap<EdgeKey, Vec<TransitCount>> = BTreeMap::new();
        for (l, v) in c.named(TRANSITS).filter(|(l, _)| source(l)) {
            transits.entry(edge_key(l)).or_default().push(TransitCount {
                source_network: label(l, "source_network").to_string(),
                destination_network: label(l, "destination_network").to_string(),
                transport: label(l, "transport").to_string(),
                connections: v,
            });
        }
        let mut reports_as = None;
        for (key, stats) in edges {
            let t = transits.remove(&key).unwrap_or_default();
            let from = self.add_edge(&key, &stats, &t);
            reports_as.get_or_insert(from);
        }
        // Destinations: the connections their authorization denied.
        for (l, v) in c.named(OPENED) {
            if label(l, "reporter") != "destination" {
                continue;
            }
            let me = Node::Workload {
                network: reports_as
                    .as_ref()
                    .map_or(UNKNOWN, |n: &Node| n.network())
                    .to_string(),
                cluster: label(l, "destination_cluster").into(),
                namespace: label(l, "destination_workload_namespace").into(),
                name: label(l, "destination_workload").into(),
            };
            if label(l, "response_flags") == "DENY" {
                *self.denied.entry(me.clone()).or_default() += v;
            }
            self.nodes.insert(me.clone());
            reports_as.get_or_insert(me);
        }
        reports_as
    }

    /// The edges of one Istio edge key: caller -> service (per destination network the
    /// transit family names), and service -> workload when the workload is known. Returns
    /// the caller.
    fn add_edge(&mut self, key: &EdgeKey, stats: &EdgeStats, transits: &[TransitCount]) -> Node {
        let [src_wl, src_ns, src_cluster, service, dst_wl, dst_ns, dst_cluster] = key.clone();
        let src_network = transits
            .iter()
            .map(|t| t.source_network.as_str())
            .find(|n| *n != UNKNOWN)
            .unwrap_or(UNKNOWN)
            .to_string();
        let from = Node::Workload {
            network: src_network,
            cluster: src_cluster,
            namespace: src_ns,
            name: src_wl,
        };
        self.nodes.insert(from.clone());
        // By destination network: the transit counts are exact; what only Istio's families
        // count (bytes, refusals) is shared in proportion when they name several networks.
        let mut by_network: BTreeMap<&str, BTreeMap<String, f64>> = BTreeMap::new();
        for t in transits {
            *by_network
                .entry(t.destination_network.as_str())
                .or_default()
                .entry(t.transport.clone())
                .or_default() += t.connections;
        }
        if by_network.is_empty() {
            by_network.insert(UNKNOWN, BTreeMap::new());
        }
        let total: f64 = transits.iter().map(|t| t.connections).sum();
        let parts = by_network.len() as f64;
        for (network, transports) in by_network {
            let carried: f64 = transports.values().sum();
            let share = if total > 0.0 {
                carried / total
            } else {
                1.0 / parts
            };
            let edge = EdgeStats {
                transports,
                ..stats.scaled(share)
            };
            let svc = Node::Service {
                network: network.to_string(),
                hostname: service.clone(),
            };
            self.nodes.insert(svc.clone());
            self.edges
                .entry((from.clone(), svc.clone()))
                .or_default()
                .add(&edge);
            if dst_wl != UNKNOWN {
                let to = Node::Workload {
                    network: network.to_string(),
                    cluster: dst_cluster.clone(),
                    namespace: dst_ns.clone(),
                    name: dst_wl.clone(),
                };
                self.nodes.insert(to.clone());
                self.edges.entry((svc, to)).or_default().add(&edge);
            }
        }
        from
    }

    /// A node seen without a network (a proxy that reports no transit, a destination that
    /// only receives) is the node of the same name in a known network, when exactly one is.
    fn place_unknown_networks(&mut self) {
        let mut known: BTreeMap<Node, BTreeSet<String>> = BTreeMap::new();
        for n in self.nodes.iter().filter(|n| n.network() != UNKNOWN) {
            known
                .entry(n.placeless())
                .or_default()
                .insert(n.network().to_string());
        }
        let place = |n: &Node| -> Node {
            if n.network() != UNKNOWN {
                return n.clone();
            }
            match known.get(&n.placeless()) {
                Some(nets) if nets.len() == 1 => n.with_network(nets.iter().next().unwrap()),
                _ => n.clone(),
            }
        };
        self.nodes = self.nodes.iter().map(place).collect();
        let edges = std::mem::take(&mut self.edges);
        for ((a, b), s) in edges {
            self.edges
                .entry((place(&a), place(&b)))
                .or_default()
                .add(&s);
        }
        self.denied =
            std::mem::take(&mut self.denied)
                .into_iter()
                .fold(BTreeMap::new(), |mut m, (n, v)| {
                    *m.entry(place(&n)).or_default() += v;
                    m
                });
        for p in &mut self.proxies {
            p.reports_as = p.reports_as.as_ref().map(place);
        }
    }

    /// Nodes by network, then cluster; a network's services (`None`) after its clusters,
    /// in no cluster since a service may span several.
    fn grouped(&self) -> Vec<(&str, Vec<Place<'_>>)> {
        let mut g: BTreeMap<&str, BTreeMap<(bool, &str), Vec<&Node>>> = BTreeMap::new();
        for n in &self.nodes {
            let place = match n {
                Node::Workload { cluster, .. } => (false, cluster.as_str()),
                Node::Service { .. } => (true, ""),
            };
            g.entry(n.network())
                .or_default()
                .entry(place)
                .or_default()
                .push(n);
        }
        g.into_iter()
            .map(|(network, places)| {
                let places = places
                    .into_iter()
                    .map(|((service, c), nodes)| ((!service).then_some(c), nodes))
                    .collect();
                (network, places)
            })
            .collect()
    }

    fn number(&self, v: f64) -> String {
        if self.rates {
            format!("{v:.2}")
        } else {
            format!("{}", v.round() as u64)
        }
    }

    fn what(&self) -> &'static str {
        if self.rates {
            "rates per second between two scrapes"
        } else {
            "totals since each proxy started"
        }
    }

    /// Nodes by network and cluster, then the edges and the proxies as tables.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "Who talks to whom ({}).\n", self.what());
        for (network, clusters) in self.grouped() {
            let _ = writeln!(out, "network {network}");
            for (cluster, nodes) in clusters {
                let indent = match cluster {
                    Some(c) => {
                        let _ = writeln!(out, "  cluster {c}");
                        "    "
                    }
                    None => "  ",
                };
                for n in nodes {
                    let kind = match n {
                        Node::Workload { .. } => "workload",
                        Node::Service { .. } => "service",
                    };
                    let denied = match self.denied.get(n) {
                        Some(&d) if d > 0.0 => format!("  denied {}", self.number(d)),
                        _ => String::new(),
                    };
                    let _ = writeln!(out, "{indent}{kind} {}{denied}", n.short());
                }
            }
        }
        let rows: Vec<Vec<String>> = self
            .edges
            .iter()
            .map(|((a, b), s)| {
                vec![
                    a.path(),
                    b.path(),
                    s.transport(),
                    self.number(s.connections),
                    self.number(s.sent),
                    self.number(s.received),
                    self.number(s.refused),
                ]
            })
            .collect();
        let unit = if self.rates { "/S" } else { "" };
        let counted = [
            format!("CONNECTIONS{unit}"),
            format!("SENT B{unit}"),
            format!("RECEIVED B{unit}"),
            format!("REFUSED{unit}"),
        ];
        let mut columns = vec!["FROM", "TO", "TRANSPORT"];
        columns.extend(counted.iter().map(String::as_str));
        let _ = writeln!(out);
        if rows.is_empty() {
            let _ = writeln!(out, "No connections reported.");
        } else {
            out.push_str(&grid(&columns, &rows));
        }
        let rows: Vec<Vec<String>> = self
            .proxies
            .iter()
            .map(|p| {
                let refused = if p.refused.is_empty() {
                    "-".to_string()
                } else {
                    p.refused
                        .iter()
                        .map(|(r, n)| format!("{r}={}", self.number(*n)))
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                match &p.error {
                    Some(_) => vec![p.url.clone(), "unreachable (below)".into(), "-".into()],
                    None => vec![
                        p.url.clone(),
                        p.reports_as.as_ref().map_or_else(|| "-".into(), Node::path),
                        refused,
                    ],
                }
            })
            .collect();
        let _ = writeln!(out);
        out.push_str(&grid(&["PROXY", "REPORTS AS", "REFUSED"], &rows));
        for p in &self.proxies {
            if let Some(e) = &p.error {
                let _ = writeln!(out, "\nunreachable {}: {e}", p.url);
            }
        }
        out
    }

    /// Graphviz DOT: a box per workload, an ellipse per service, grouped in a frame per
    /// network and one per cluster; edges solid when direct, dashed through a gateway, red
    /// when connections were refused.
    pub fn dot(&self) -> String {
        let ids: BTreeMap<&Node, String> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n, format!("n{i}")))
            .collect();
        let mut out = String::new();
        let _ = writeln!(out, "digraph isthmus {{");
        let _ = writeln!(
            out,
            "  graph [rankdir=LR, fontname=\"Helvetica\", labelloc=t, label={}];",
            quote(&format!("isthmus mesh: {}", self.what()))
        );
        let _ = writeln!(out, "  node [fontname=\"Helvetica\", fontsize=10];");
        let _ = writeln!(out, "  edge [fontname=\"Helvetica\", fontsize=9];");
        for (i, (network, clusters)) in self.grouped().into_iter().enumerate() {
            let _ = writeln!(out, "  subgraph cluster_{i} {{");
            let _ = writeln!(out, "    label={};", quote(&format!("network {network}")));
            let _ = writeln!(out, "    style=rounded;");
            for (j, (cluster, nodes)) in clusters.into_iter().enumerate() {
                let indent = match cluster {
                    Some(c) => {
                        let _ = writeln!(out, "    subgraph cluster_{i}_{j} {{");
                        let _ = writeln!(out, "      label={};", quote(&format!("cluster {c}")));
                        let _ = writeln!(out, "      style=dashed;");
                        "      "
                    }
                    None => "    ",
                };
                for n in nodes {
                    let (shape, mut label) = match n {
                        Node::Workload { .. } => ("box", n.short()),
                        Node::Service { .. } => ("ellipse", n.short()),
                    };
                    if let Some(&d) = self.denied.get(n).filter(|d| **d > 0.0) {
                        label.push_str(&format!("\ndenied {}", self.number(d)));
                    }
                    let _ = writeln!(
                        out,
                        "{indent}{} [shape={shape}, label={}];",
                        ids[n],
                        quote(&label)
                    );
                }
                if cluster.is_some() {
                    let _ = writeln!(out, "    }}");
                }
            }
            let _ = writeln!(out, "  }}");
        }
        let unit = if self.rates { "/s" } else { "" };
        for ((a, b), s) in &self.edges {
            let transport = s.transport();
            let style = match transport.as_str() {
                "direct" => "solid",
                "sni-gateway" => "dashed",
                "hbone" | "quic" => "dotted",
                "hbone-gateway" | "quic-gateway" => "dashed",
                _ => "bold",
            };
            let mut label = format!(
                "{transport}\n{} conn{unit}\n{} B{unit} sent, {} B{unit} received",
                self.number(s.connections),
                self.number(s.sent),
                self.number(s.received)
            );
            let color = if s.refused > 0.0 {
                label.push_str(&format!("\n{} refused{unit}", self.number(s.refused)));
                "red"
            } else {
                "black"
            };
            let _ = writeln!(
                out,
                "  {} -> {} [label={}, style={style}, color={color}];",
                ids[a],
                ids[b],
                quote(&label)
            );
        }
        for p in &self.proxies {
            if let Some(e) = &p.error {
                let _ = writeln!(out, "  // left out {}: {}", p.url, e.replace('\n', " "));
            }
        }
        let _ = writeln!(out, "}}");
        out
    }
}

/// Connections a proxy refused before choosing a service, by `direction/reason`.
fn refusals(c: &Counts) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for ((name, l), v) in &c.series {
        if name.starts_with("isthmus_") && name.ends_with("_connections_refused_total") {
            let key = format!("{}/{}", label(l, "direction"), label(l, "reason"));
            *out.entry(key).or_default() += v;
        }
    }
    out.retain(|_, v| *v > 0.0);
    out
}

/// A DOT string literal.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The DOT as SVG, rendered by Graphviz's `dot` (layout is Graphviz's job).
fn render_svg(dot: &str) -> anyhow::Result<String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = match Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "--output svg needs Graphviz's `dot` program, which is not installed (not found \
             on PATH): install Graphviz, or use --output dot and render the file elsewhere"
        ),
        Err(e) => return Err(e).context("starting Graphviz's `dot`"),
    };
    let mut stdin = child.stdin.take().context("dot's stdin")?;
    let input = dot.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child
        .wait_with_output()
        .context("running Graphviz's `dot`")?;
    let _ = writer.join();
    if !out.status.success() {
        bail!(
            "Graphviz's `dot` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).context("dot's SVG is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A VM agent in network-a that called ratings in network-b through B's gateway three
    /// times and once found no endpoint, as it exposes it.
    const AGENT: &str = r#"# HELP istio_tcp_connections_opened TCP connections opened (Istio standard metric).
# TYPE istio_tcp_connections_opened counter
istio_tcp_connections_opened_total{reporter="source",source_workload="web",source_canonical_service="web",source_workload_namespace="shop",source_cluster="c1",destination_service="ratings.shop.svc.cluster.local",destination_workload="unknown",destination_workload_namespace="shop",destination_cluster="unknown",response_flags="-"} 3
istio_tcp_connections_opened_total{reporter="source",source_workload="web",source_canonical_service="web",source_workload_namespace="shop",source_cluster="c1",destination_service="ratings.shop.svc.cluster.local",destination_workload="unknown",destination_workload_namespace="unknown",destination_cluster="unknown",response_flags="CONNECT"} 1
# TYPE istio_tcp_received_bytes counter
istio_tcp_received_bytes_total{reporter="source",source_workload="web",source_workload_namespace="shop",source_cluster="c1",destination_service="ratings.shop.svc.cluster.local",destination_workload="unknown",destination_workload_namespace="shop",destination_cluster="unknown",response_flags="-"} 150
# TYPE istio_tcp_sent_bytes counter
istio_tcp_sent_bytes_total{reporter="source",source_workload="web",source_workload_namespace="shop",source_cluster="c1",destination_service="ratings.shop.svc.cluster.local",destination_workload="unknown",destination_workload_namespace="shop",destination_cluster="unknown",response_flags="-"} 2100
# TYPE isthmus_tcp_connections_opened counter
isthmus_tcp_connections_opened_total{reporter="source",source_workload="web",source_workload_namespace="shop",source_cluster="c1",source_network="network-a",destination_service="ratings.shop.svc.cluster.local",destination_workload="unknown",destination_workload_namespace="shop",destination_cluster="unknown",destination_network="network-b",transport="sni-gateway"} 3
# TYPE isthmus_vm_agent_connections_refused counter
isthmus_vm_agent_connections_refused_total{direction="outbound",reason="no_destination"} 2
# EOF
"#;

    /// B's gateway, which routed those three to the ratings workload.
    const GATEWAY: &str = r#"# TYPE istio_tcp_connections_opened counter
istio_tcp_connections_opened_total{reporter="source",source_workload="gateway-b",source_workload_namespace="istio-system",source_cluster="c1",destination_service="ratings.shop.svc.cluster.local",destination_workload="ratings",destination_workload_namespace="shop",destination_cluster="c1",response_flags="-"} 3
isthmus_tcp_connections_opened_total{reporter="source",source_workload="gateway-b",source_workload_namespace="istio-system",source_cluster="c1",source_network="network-b",destination_service="ratings.shop.svc.cluster.local",destination_workload="ratings",destination_workload_namespace="shop",destination_cluster="c1",destination_network="network-b",transport="direct"} 3
# EOF
"#;

    /// The ratings VM: the destination of those three, and it denied one.
    const SERVER: &str = r#"# TYPE istio_tcp_connections_opened counter
istio_tcp_connections_opened_total{reporter="destination",source_workload="unknown",source_workload_namespace="shop",source_cluster="unknown",destination_service="ratings.shop.svc.cluster.local",destination_workload="ratings",destination_workload_namespace="shop",destination_cluster="c1",response_flags="-"} 3
istio_tcp_connections_opened_total{reporter="destination",source_workload="unknown",source_workload_namespace="shop",source_cluster="unknown",destination_service="ratings.shop.svc.cluster.local",destination_workload="ratings",destination_workload_namespace="shop",destination_cluster="c1",response_flags="DENY"} 1
"#;

    fn counts(text: &str) -> Counts {
        Counts::from_samples(parse(text).unwrap())
    }

    fn scraped(url: &str, text: &str) -> Scraped {
        Scraped {
            url: url.into(),
            counts: Ok(counts(text)),
        }
    }

    fn wl(network: &str, ns: &str, name: &str) -> Node {
        Node::Workload {
            network: network.into(),
            cluster: "c1".into(),
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn ratings(network: &str) -> Node {
        Node::Service {
            network: network.into(),
            hostname: "ratings.shop.svc.cluster.local".into(),
        }
    }

    #[test]
    fn samples_are_read_with_labels_escapes_timestamps_and_odd_values() {
        let text = "# HELP x a \"help\"\n\nx_total{a=\"1\",b=\"q\\\"\\\\\\n\", } 2.5 1700000000\ny +Inf\nz{} NaN\nw -3\n";
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s[0].name, "x_total");
        assert_eq!(s[0].labels["a"], "1");
        assert_eq!(s[0].labels["b"], "q\"\\\n");
        assert_eq!(s[0].value, 2.5);
        assert!(s[1].value.is_infinite());
        assert!(s[2].value.is_nan() && s[2].labels.is_empty());
        assert_eq!(s[3].value, -3.0);
    }

    #[test]
    fn what_is_not_prometheus_text_is_refused_naming_the_line() {
        for (text, line, reason) in [
            (
                "<html><body>Not Found</body></html>",
                1,
                "not a metric name",
            ),
            ("{\"metrics\": []}", 1, "not a metric name"),
            (
                "# TYPE a counter\na_total 1\nb{x=1} 2",
                3,
                "a label value is not quoted",
            ),
            ("a{x=\"1\" 2", 1, "no , or } after a label"),
            ("a{x=\"1} 2", 1, "a label value is not closed"),
            ("a one", 1, "the value is not a number"),
            ("a", 1, "no value"),
            ("a 1 2 3", 1, "more than a value and a timestamp"),
            ("", 0, "no metrics at all"),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!((e.line, e.reason), (line, reason), "{text:?}: {e}");
        }
    }

    #[test]
    fn urls_get_the_metrics_port_and_path_by_default_and_https_is_refused() {
        let u = MetricsUrl::parse("http://198.18.0.20:15020/metrics").unwrap();
        assert_eq!(
            (u.authority.as_str(), u.path.as_str()),
            ("198.18.0.20:15020", "/metrics")
        );
        let u = MetricsUrl::parse("10.0.0.7").unwrap();
        assert_eq!(
            (u.authority.as_str(), u.path.as_str()),
            ("10.0.0.7:15020", "/metrics")
        );
        let u = MetricsUrl::parse("http://[::1]/stats/prometheus").unwrap();
        assert_eq!(
            (u.authority.as_str(), u.path.as_str()),
            ("[::1]:15020", "/stats/prometheus")
        );
        let u = MetricsUrl::parse("http://[::1]:9090").unwrap();
        assert_eq!(u.authority, "[::1]:9090");
        for bad in [
            "https://gw:15020/metrics",
            "ftp://x",
            "http://",
            "http://gw:port/metrics",
        ] {
            assert!(MetricsUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rates_are_the_increase_per_second_and_a_restart_counts_from_zero() {
        let a = counts("a_total 10\nb_total 50\n");
        let b = counts("a_total 30\nb_total 5\nc_total 4\n");
        let r = b.rate_since(&a, Duration::from_secs(2));
        let get = |n: &str| r.named(n).next().unwrap().1;
        assert_eq!(
            (get("a_total"), get("b_total"), get("c_total")),
            (10.0, 2.5, 2.0)
        );
    }

    #[test]
    fn the_graph_joins_istio_edges_with_their_transport_across_proxies() {
        let g = Graph::build(
            &[
                scraped("http://a", AGENT),
                scraped("http://gw", GATEWAY),
                scraped("http://b", SERVER),
                Scraped {
                    url: "http://gone".into(),
                    counts: Err(ScrapeError::Timeout),
                },
            ],
            false,
        );
        let web = wl("network-a", "shop", "web");
        let gw = wl("network-b", "istio-system", "gateway-b");
        let rw = wl("network-b", "shop", "ratings");
        // The attempt no endpoint answered reached no network: it is put on the one
        // network's service of that name, as refused, with no transport.
        let across = &g.edges[&(web.clone(), ratings("network-b"))];
        assert_eq!((across.connections, across.refused), (4.0, 1.0));
        assert_eq!((across.sent, across.received), (150.0, 2100.0));
        assert_eq!(across.transports, [("sni-gateway".to_string(), 3.0)].into());
        assert_eq!(across.transport(), "sni-gateway");
        assert!(!g.nodes.contains(&ratings(UNKNOWN)));
        let hop = &g.edges[&(gw.clone(), ratings("network-b"))];
        assert_eq!((hop.connections, hop.transport().as_str()), (3.0, "direct"));
        assert_eq!(
            g.edges[&(ratings("network-b"), rw.clone())].connections,
            3.0
        );
        // The server reports no transit: its node is placed where the gateway saw it.
        assert_eq!(g.denied.get(&rw), Some(&1.0));
        assert!(!g
            .nodes
            .iter()
            .any(|n| n.path() == "unknown/c1/shop/ratings"));
        assert_eq!(g.proxies[0].reports_as.as_ref(), Some(&web));
        assert_eq!(g.proxies[0].refused["outbound/no_destination"], 2.0);
        assert_eq!(g.proxies[1].reports_as.as_ref(), Some(&gw));
        assert_eq!(g.proxies[2].reports_as.as_ref(), Some(&rw));
        assert!(g.proxies[3].error.as_deref().unwrap().contains("no answer"));

        let text = g.text();
        let header = "FROM TO TRANSPORT CONNECTIONS SENT B RECEIVED B REFUSED";
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") == header),
            "{text}"
        );
        let row: Vec<&str> = text
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|c| c.len() > 2 && c[0] == "network-a/c1/shop/web")
            .unwrap_or_else(|| panic!("{text}"));
        assert_eq!(
            row,
            [
                "network-a/c1/shop/web",
                "network-b/ratings.shop.svc.cluster.local",
                "sni-gateway",
                "4",
                "150",
                "2100",
                "1"
            ],
            "{text}"
        );
        assert!(text.contains("network network-b\n  cluster c1\n    workload istio-system/gateway-b\n    workload shop/ratings  denied 1\n  service ratings.shop.svc.cluster.local\n"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>()
                    == ["http://gone", "unreachable", "(below)", "-"]),
            "{text}"
        );
        assert!(
            text.ends_with("\nunreachable http://gone: no answer within 10s\n"),
            "{text}"
        );
    }

    #[test]
    fn dot_groups_nodes_by_network_and_cluster_and_styles_edges_by_transport() {
        let g = Graph::build(
            &[scraped("http://a", AGENT), scraped("http://gw", GATEWAY)],
            false,
        );
        let dot = g.dot();
        assert!(
            dot.starts_with("digraph isthmus {\n") && dot.ends_with("}\n"),
            "{dot}"
        );
        assert_eq!(dot.matches('{').count(), dot.matches('}').count(), "{dot}");
        let id = |label: &str| {
            let line = dot
                .lines()
                .find(|l| l.contains(&format!("label=\"{label}\"")) && l.contains("shape="))
                .unwrap_or_else(|| panic!("no node {label}: {dot}"));
            line.trim().split(' ').next().unwrap().to_string()
        };
        let (web, svc) = (id("shop/web"), id("ratings.shop.svc.cluster.local"));
        assert!(dot.contains(&format!(
            "  {web} -> {svc} [label=\"sni-gateway\\n4 conn\\n150 B sent, 2100 B received\\n1 refused\", style=dashed, color=red];"
        )), "{dot}");
        assert!(
            dot.contains("  subgraph cluster_0 {\n    label=\"network network-a\";"),
            "{dot}"
        );
        assert!(
            dot.contains("    subgraph cluster_1_0 {\n      label=\"cluster c1\";"),
            "{dot}"
        );
        assert!(
            dot.contains("style=solid, color=black"),
            "the gateway's hop is direct: {dot}"
        );
    }

    #[test]
    fn svg_is_graphviz_s_and_without_it_the_error_says_what_is_missing() {
        let dot_installed = std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join("dot").is_file()));
        match render_svg("digraph g { a -> b; }") {
            Ok(svg) => assert!(dot_installed && svg.contains("<svg"), "{svg}"),
            Err(e) => {
                assert!(!dot_installed, "{e:#}");
                let e = e.to_string();
                assert!(e.contains("Graphviz") && e.contains("--output dot"), "{e}");
            }
        }
    }

    #[test]
    fn dot_strings_are_quoted() {
        assert_eq!(quote("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
    }

    #[tokio::test]
    async fn an_unreachable_proxy_and_a_page_that_is_not_metrics_are_named_with_the_cause() {
        // A port nobody listens on: bound, then closed.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = l.local_addr().unwrap();
        drop(l);
        let url = MetricsUrl::parse(&format!("http://{dead}/metrics")).unwrap();
        let e = scrape(&url).await.unwrap_err();
        assert!(matches!(e, ScrapeError::Connect { .. }), "{e}");
        assert!(e.to_string().contains(&dead.to_string()), "{e}");

        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = server.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<html>hi</html>")
                    .await;
            }
        });
        let url = MetricsUrl::parse(&format!("http://{addr}/metrics")).unwrap();
        let e = scrape(&url).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "not Prometheus text: line 1: not a metric name: \"<html>hi</html>\""
        );
    }
}
