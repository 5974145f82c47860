//! The proxy core's metrics. The program picks the prefix (`isthmus_gateway_` for the
//! east-west gateway, `isthmus_vm_agent_` for the VM agent); label sets are typed and bounded
//! (service hostnames come from the catalog, reasons and results are enums). Beside them,
//! [`istio`]: Istio's standard TCP metrics under Istio's own names, which the same
//! connections count into.

pub mod istio;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use isthmus_proto::subscription::SyncMetrics;

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    /// SNI passthrough on the east-west gateway.
    passthrough,
    /// mTLS terminated in front of a local app.
    inbound,
    /// A local app's connection, originated as mTLS.
    outbound,
}

impl Direction {
    pub fn as_str(&self) -> &'static str {
        match self {
            Direction::passthrough => "passthrough",
            Direction::inbound => "inbound",
            Direction::outbound => "outbound",
        }
    }
}

/// How a connection to a known destination ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ConnResult {
    /// Relayed until both sides closed.
    ok,
    /// Relayed, then ended by an error (a reset, a broken pipe).
    error,
    /// Closed by the drain deadline.
    drained,
    /// No endpoint could be connected to (all tried, or none available).
    upstream_connect_failed,
    no_healthy_endpoint,
    /// The destination's connection limit was reached.
    connection_limit,
    /// Refused by authorization.
    denied,
    /// Refused by a quota on the caller's connections.
    over_quota,
    /// Reset by an injected abort fault.
    fault_abort,
    /// The mTLS handshake with the peer failed.
    handshake_failed,
}

impl ConnResult {
    pub fn as_str(&self) -> &'static str {
        match self {
            ConnResult::ok => "ok",
            ConnResult::error => "error",
            ConnResult::drained => "drained",
            ConnResult::upstream_connect_failed => "upstream_connect_failed",
            ConnResult::no_healthy_endpoint => "no_healthy_endpoint",
            ConnResult::connection_limit => "connection_limit",
            ConnResult::denied => "denied",
            ConnResult::over_quota => "over_quota",
            ConnResult::fault_abort => "fault_abort",
            ConnResult::handshake_failed => "handshake_failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ConnLabels {
    pub direction: Direction,
    pub service: String,
    pub result: ConnResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OpenLabels {
    pub direction: Direction,
    pub service: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Flow {
    /// From the connecting side towards the endpoint.
    to_upstream,
    /// From the endpoint back to the connecting side.
    from_upstream,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct BytesLabels {
    pub direction: Direction,
    pub service: String,
    pub flow: Flow,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusalLabels {
    pub direction: Direction,
    pub reason: String,
}

/// A rule of the inbound policy (`quotas[0]`, `faults[1]`) and what it did (`rate` or
/// `concurrent` for a quota; `delay` or `abort` for a fault).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RuleLabels {
    pub rule: String,
    pub kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

/// Which end of a tunnel: the proxy that opened it, or the one that accepted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum TunnelRole {
    client,
    server,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TunnelLabels {
    pub role: TunnelRole,
    /// `hbone` (HTTP/2 over mTLS on TCP) or `quic`.
    pub transport: &'static str,
    /// The peer proxy (see [`TunnelMetrics::peer`]).
    pub peer: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TunnelHandshakeLabels {
    pub role: TunnelRole,
    pub transport: &'static str,
    /// The peer proxy; [`UNKNOWN_PEER`] for a client whose handshake failed before it was
    /// identified.
    pub peer: String,
    /// `ok`, or why it failed (`connect`, `tls`, `alpn`, `http2`, `timeout`).
    pub result: &'static str,
}

/// Which way a tunnel's bytes went, seen from this proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum TunnelFlow {
    sent,
    received,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TunnelBytesLabels {
    pub role: TunnelRole,
    pub transport: &'static str,
    pub peer: String,
    pub flow: TunnelFlow,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RaceLabels {
    /// The transport whose tunnel was set up first: `quic` or `hbone`.
    pub winner: &'static str,
}

/// The `peer` of a server's handshake that failed before the client was identified.
pub const UNKNOWN_PEER: &str = "unknown";
/// The `peer` of every peer past the first [`MAX_PEER_LABELS`].
pub const OTHER_PEERS: &str = "other";
/// Distinct `peer` label values the tunnel metrics take before they count the rest as
/// [`OTHER_PEERS`]: a bound on the series a mesh of many proxies (or a client making up
/// identities) can add.
pub const MAX_PEER_LABELS: usize = 1024;

/// The pooled tunnels between proxies, per peer proxy and transport: how many are open,
/// how they were set up, the streams (proxied connections) they carried and the app's
/// bytes those streams moved. A stream's result is counted with the other connections
/// (`connections`, `bytes`).
///
/// The `peer` label is the peer proxy: its tunnel address (`ip:port`) where this proxy
/// opened the tunnel (role `client`), the client's SPIFFE identity where it accepted it
/// (role `server`).
#[derive(Debug, Clone, Default)]
pub struct TunnelMetrics {
    pub open: Family<TunnelLabels, Gauge>,
    pub handshakes: Family<TunnelHandshakeLabels, Counter>,
    pub streams: Family<TunnelLabels, Counter>,
    /// The app's bytes carried by the tunnels' streams (not the framing, nor TLS or QUIC's
    /// own overhead), counted as they move.
    pub bytes: Family<TunnelBytesLabels, Counter>,
    /// Connections made without a tunnel to a peer that names one, because its tunnel could
    /// not be set up lately.
    pub fallbacks: Family<TunnelLabels, Counter>,
    /// QUIC raced against HTTP/2 for a new tunnel, by winner.
    pub races: Family<RaceLabels, Counter>,
    /// The `peer` label values taken so far.
    peers: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

/// One tunnel's series, looked up once when it is set up rather than per stream.
#[derive(Debug, Clone)]
pub struct TunnelCounters {
    pub open: Gauge,
    pub streams: Counter,
    pub sent: Counter,
    pub received: Counter,
}

impl TunnelMetrics {
    /// The `peer` label for `peer`: itself while fewer than [`MAX_PEER_LABELS`] peers have
    /// been seen (or it is one of them), [`OTHER_PEERS`] after.
    pub fn peer(&self, peer: impl std::fmt::Display) -> String {
        let peer = peer.to_string();
        let mut peers = self.peers.lock().expect("tunnel metrics poisoned");
        if peers.contains(&peer) {
            return peer;
        }
        if peers.len() < MAX_PEER_LABELS {
            peers.insert(peer.clone());
            return peer;
        }
        OTHER_PEERS.to_string()
    }

    /// The series of a tunnel to or from `peer` (a label from [`TunnelMetrics::peer`]).
    pub fn tunnel(&self, role: TunnelRole, transport: &'static str, peer: &str) -> TunnelCounters {
        let labels = TunnelLabels {
            role,
            transport,
            peer: peer.to_string(),
        };
        let bytes = |flow| {
            self.bytes
                .get_or_create(&TunnelBytesLabels {
                    role,
                    transport,
                    peer: peer.to_string(),
                    flow,
                })
                .clone()
        };
        TunnelCounters {
            open: self.open.get_or_create(&labels).clone(),
            streams: self.streams.get_or_create(&labels).clone(),
            sent: bytes(TunnelFlow::sent),
            received: bytes(TunnelFlow::received),
        }
    }

    /// Counts a tunnel set up, or not, with `peer` (a label from [`TunnelMetrics::peer`]).
    pub fn handshake(
        &self,
        role: TunnelRole,
        transport: &'static str,
        peer: &str,
        result: &'static str,
    ) {
        self.handshakes
            .get_or_create(&TunnelHandshakeLabels {
                role,
                transport,
                peer: peer.to_string(),
                result,
            })
            .inc();
    }

    fn register_into(&self, r: &mut Registry) {
        r.register(
            "tunnels_open",
            "Pooled tunnels open now, by role (client, server), transport and peer proxy",
            self.open.clone(),
        );
        r.register(
            "tunnel_handshakes",
            "Tunnels set up or failed to be, by role, transport, peer proxy and result",
            self.handshakes.clone(),
        );
        r.register(
            "tunnel_streams",
            "Streams (proxied connections) opened over tunnels, by role, transport and peer proxy",
            self.streams.clone(),
        );
        r.register(
            "tunnel_bytes",
            "The app's bytes carried over tunnels' streams, by role, transport, peer proxy and flow (sent, received)",
            self.bytes.clone(),
        );
        r.register(
            "tunnel_fallbacks",
            "Connections made with mTLS of their own to a peer whose tunnel could not be set up lately, by transport and peer proxy",
            self.fallbacks.clone(),
        );
        r.register(
            "tunnel_races",
            "New tunnels for which QUIC was raced against HTTP/2, by the transport that won",
            self.races.clone(),
        );
    }
}

#[derive(Debug, Clone)]
pub struct Metrics {
    pub connections: Family<ConnLabels, Counter>,
    pub connections_open: Family<OpenLabels, Gauge>,
    pub bytes: Family<BytesLabels, Counter>,
    pub refused: Family<RefusalLabels, Counter>,
    pub connect_duration: Family<DirectionLabels, Histogram, fn() -> Histogram>,
    pub connect_failures: Family<ServiceLabels, Counter>,
    pub ejections: Family<ServiceLabels, Counter>,
    /// Connections refused by a quota of the inbound policy, by rule and limit.
    pub quota_refusals: Family<RuleLabels, Counter>,
    /// Faults injected by the inbound policy, by rule and kind.
    pub faults: Family<RuleLabels, Counter>,
    pub tunnels: TunnelMetrics,
    pub destinations: Gauge,
    pub draining: Gauge,
    pub catalog: SyncMetrics,
    /// Istio's standard TCP metrics (`istio_tcp_*`), registered without the prefix.
    pub istio: Arc<istio::IstioMetrics>,
    /// Each service's series of `connections`, `connections_open` and `bytes`, by listener.
    services: Arc<[ServiceIndex; DIRECTIONS]>,
}

/// How many [`Direction`]s and [`ConnResult`]s there are: a series past these (a variant
/// added later and not counted here) is found in its family instead.
const DIRECTIONS: usize = 3;
const RESULTS: usize = 10;

/// One listener's services and their series: a connection finds them by the service's
/// name, where looking them up in the families would build (and hash) a label set, and
/// copy the name into it, for each series it counts in.
#[derive(Debug, Default)]
struct ServiceIndex(RwLock<HashMap<String, Arc<ServiceSeries>>>);

/// The series of one service and listener, each made in its family when first counted in
/// (so that a result or flow that never happened has no series, as before).
#[derive(Debug, Default)]
struct ServiceSeries {
    open: OnceLock<Gauge>,
    results: [OnceLock<Counter>; RESULTS],
    /// By [`Flow`].
    bytes: [OnceLock<Counter>; 2],
}

fn connect_histogram() -> Histogram {
    // 50 µs to ~3.3 s.
    Histogram::new(exponential_buckets(0.00005, 2.0, 17))
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            connections: Family::default(),
            connections_open: Family::default(),
            bytes: Family::default(),
            refused: Family::default(),
            connect_duration: Family::new_with_constructor(connect_histogram),
            connect_failures: Family::default(),
            ejections: Family::default(),
            quota_refusals: Family::default(),
            faults: Family::default(),
            tunnels: TunnelMetrics::default(),
            destinations: Gauge::default(),
            draining: Gauge::default(),
            catalog: SyncMetrics::default(),
            istio: Arc::default(),
            services: Arc::default(),
        }
    }
}

impl Metrics {
    /// Registers under `prefix` (e.g. `isthmus_gateway`), and Istio's standard metrics
    /// under Istio's names.
    pub fn register(registry: &mut Registry, prefix: &str) -> Self {
        let m = Self {
            istio: Arc::new(istio::IstioMetrics::register(registry)),
            ..Self::default()
        };
        let r = registry.sub_registry_with_prefix(prefix);
        r.register(
            "connections",
            "Connections to a known service that ended, by listener, service and result",
            m.connections.clone(),
        );
        r.register(
            "connections_open",
            "Connections open now, by listener and service",
            m.connections_open.clone(),
        );
        r.register(
            "bytes",
            "Bytes relayed, by listener, service and flow",
            m.bytes.clone(),
        );
        r.register(
            "connections_refused",
            "Connections closed before a service was chosen (not TLS, no SNI, unknown service, handshake timeout ...), by reason",
            m.refused.clone(),
        );
        r.register(
            "upstream_connect_duration_seconds",
            "Time to establish a TCP connection to an endpoint",
            m.connect_duration.clone(),
        );
        r.register(
            "upstream_connect_failures",
            "Failed connects to an endpoint (each is retried on another endpoint), by service",
            m.connect_failures.clone(),
        );
        r.register(
            "endpoint_ejections",
            "Endpoints ejected by outlier detection after consecutive connect failures, by service",
            m.ejections.clone(),
        );
        r.register(
            "quota_refusals",
            "Inbound connections refused by a quota on the caller's connections, by rule (quotas[i]) and limit (rate, concurrent)",
            m.quota_refusals.clone(),
        );
        r.register(
            "faults_injected",
            "Faults the inbound policy injected, by rule (faults[i]) and kind (delay, abort)",
            m.faults.clone(),
        );
        r.register(
            "destinations",
            "Service ports (and subsets) in the routing table",
            m.destinations.clone(),
        );
        r.register(
            "draining",
            "1 while shutting down: no new connections, open ones finishing",
            m.draining.clone(),
        );
        m.tunnels.register_into(r);
        m.catalog.register_into(r);
        m
    }

    pub fn refuse(&self, direction: Direction, reason: &str) {
        self.refused
            .get_or_create(&RefusalLabels {
                direction,
                reason: reason.to_string(),
            })
            .inc();
    }

    fn series(&self, direction: Direction, service: &str) -> Arc<ServiceSeries> {
        let Some(ServiceIndex(index)) = self.services.get(direction as usize) else {
            return Arc::default();
        };
        if let Some(s) = index.read().expect("service series").get(service) {
            return s.clone();
        }
        index
            .write()
            .expect("service series")
            .entry(service.to_string())
            .or_default()
            .clone()
    }

    /// Counts a connection to `service` as open until the returned guard drops.
    pub fn open(&self, direction: Direction, service: &str) -> OpenConnection {
        let gauge = self
            .series(direction, service)
            .open
            .get_or_init(|| {
                self.connections_open
                    .get_or_create(&OpenLabels {
                        direction,
                        service: service.to_string(),
                    })
                    .clone()
            })
            .clone();
        gauge.inc();
        OpenConnection(gauge)
    }

    /// Counts a finished connection and the bytes it moved.
    pub fn closed(
        &self,
        direction: Direction,
        service: &str,
        result: ConnResult,
        to_upstream: u64,
        from_upstream: u64,
    ) {
        let series = self.series(direction, service);
        let count = || {
            self.connections
                .get_or_create(&ConnLabels {
                    direction,
                    service: service.to_string(),
                    result,
                })
                .clone()
        };
        match series.results.get(result as usize) {
            Some(c) => c.get_or_init(count).inc(),
            None => count().inc(),
        };
        for (flow, n) in [
            (Flow::to_upstream, to_upstream),
            (Flow::from_upstream, from_upstream),
        ] {
            if n > 0 {
                series.bytes[flow as usize]
                    .get_or_init(|| {
                        self.bytes
                            .get_or_create(&BytesLabels {
                                direction,
                                service: service.to_string(),
                                flow,
                            })
                            .clone()
                    })
                    .inc_by(n);
            }
        }
    }
}

/// An open connection in `connections_open`.
#[derive(Debug)]
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_peers_past_the_bound_are_counted_as_other() {
        let m = TunnelMetrics::default();
        for i in 0..MAX_PEER_LABELS {
            assert_eq!(
                m.peer(format!("10.0.{}.{}:15008", i / 256, i % 256)),
                format!("10.0.{}.{}:15008", i / 256, i % 256)
            );
        }
        assert_eq!(m.peer("10.9.9.9:15008"), OTHER_PEERS);
        // A peer seen before the bound keeps its own series.
        assert_eq!(m.peer("10.0.0.7:15008"), "10.0.0.7:15008");
    }

    #[test]
    fn a_tunnels_series_are_its_peers() {
        let m = TunnelMetrics::default();
        let peer = m.peer("10.0.0.1:15008");
        let c = m.tunnel(TunnelRole::client, "quic", &peer);
        c.streams.inc();
        c.sent.inc_by(5);
        let labels = TunnelLabels {
            role: TunnelRole::client,
            transport: "quic",
            peer: peer.clone(),
        };
        assert_eq!(m.streams.get_or_create(&labels).get(), 1);
        let sent = TunnelBytesLabels {
            role: TunnelRole::client,
            transport: "quic",
            peer,
            flow: TunnelFlow::sent,
        };
        assert_eq!(m.bytes.get_or_create(&sent).get(), 5);
    }

    fn exposition(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    #[test]
    fn a_services_series_are_counted_where_the_families_show_them() {
        let mut registry = Registry::default();
        let m = Metrics::register(&mut registry, "t");
        let svc = "a.ns.svc.cluster.local";
        for _ in 0..3 {
            let open = m.open(Direction::passthrough, svc);
            m.closed(Direction::passthrough, svc, ConnResult::ok, 10, 0);
            drop(open);
        }
        let open = m.open(Direction::passthrough, svc);
        m.closed(Direction::inbound, svc, ConnResult::error, 0, 7);
        // A clone counts into the same series.
        m.clone()
            .closed(Direction::passthrough, svc, ConnResult::ok, 1, 0);
        let text = exposition(&registry);
        let has = |line: &str| text.lines().any(|l| l == line);
        assert!(
            has(&format!(
            "t_connections_total{{direction=\"passthrough\",service=\"{svc}\",result=\"ok\"}} 4"
        )),
            "{text}"
        );
        assert!(
            has(&format!(
                "t_connections_total{{direction=\"inbound\",service=\"{svc}\",result=\"error\"}} 1"
            )),
            "{text}"
        );
        assert!(
            has(&format!(
                "t_connections_open{{direction=\"passthrough\",service=\"{svc}\"}} 1"
            )),
            "{text}"
        );
        assert!(
            has(&format!(
            "t_bytes_total{{direction=\"passthrough\",service=\"{svc}\",flow=\"to_upstream\"}} 31"
        )),
            "{text}"
        );
        assert!(
            has(&format!(
                "t_bytes_total{{direction=\"inbound\",service=\"{svc}\",flow=\"from_upstream\"}} 7"
            )),
            "{text}"
        );
        // What never happened has no series.
        assert!(!text.contains("result=\"drained\""), "{text}");
        assert!(
            !text.contains(&format!(
                "direction=\"passthrough\",service=\"{svc}\",flow=\"from_upstream\""
            )),
            "{text}"
        );
        assert!(
            !text.contains("t_connections_open{direction=\"inbound\""),
            "{text}"
        );
        drop(open);
        assert!(exposition(&registry).contains(&format!(
            "t_connections_open{{direction=\"passthrough\",service=\"{svc}\"}} 0"
        )));
    }
}
