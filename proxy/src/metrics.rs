//! The proxy core's metrics. The program picks the prefix (`isthmus_gateway_` for the
//! east-west gateway, `isthmus_vm_agent_` for the VM agent); label sets are typed and bounded
//! (service hostnames come from the catalog, reasons and results are enums). Beside them,
//! [`istio`]: Istio's standard TCP metrics under Istio's own names, which the same
//! connections count into.

pub mod istio;

use std::sync::Arc;

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
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TunnelHandshakeLabels {
    pub role: TunnelRole,
    pub transport: &'static str,
    /// `ok`, or why it failed (`connect`, `tls`, `alpn`, `http2`, `timeout`).
    pub result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RaceLabels {
    /// The transport whose tunnel was set up first: `quic` or `hbone`.
    pub winner: &'static str,
}

/// The pooled tunnels between proxies: how many are open, how they were set up, and the
/// streams (proxied connections) they carried. A stream's bytes and result are counted with
/// the other connections (`connections`, `bytes`).
#[derive(Debug, Clone, Default)]
pub struct TunnelMetrics {
    pub open: Family<TunnelLabels, Gauge>,
    pub handshakes: Family<TunnelHandshakeLabels, Counter>,
    pub streams: Family<TunnelLabels, Counter>,
    /// Connections made without a tunnel to a peer that names one, because its tunnel could
    /// not be set up lately.
    pub fallbacks: Family<TunnelLabels, Counter>,
    /// QUIC raced against HTTP/2 for a new tunnel, by winner.
    pub races: Family<RaceLabels, Counter>,
}

impl TunnelMetrics {
    fn register_into(&self, r: &mut Registry) {
        r.register(
            "tunnels_open",
            "Pooled tunnels open now, by role (client, server) and transport",
            self.open.clone(),
        );
        r.register(
            "tunnel_handshakes",
            "Tunnels set up or failed to be, by role, transport and result",
            self.handshakes.clone(),
        );
        r.register(
            "tunnel_streams",
            "Streams (proxied connections) opened over tunnels, by role and transport",
            self.streams.clone(),
        );
        r.register(
            "tunnel_fallbacks",
            "Connections made with mTLS of their own to a peer whose tunnel could not be set up lately, by transport",
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

    /// Counts a connection to `service` as open until the returned guard drops.
    pub fn open(&self, direction: Direction, service: &str) -> OpenConnection {
        let gauge = self
            .connections_open
            .get_or_create(&OpenLabels {
                direction,
                service: service.to_string(),
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
        self.connections
            .get_or_create(&ConnLabels {
                direction,
                service: service.to_string(),
                result,
            })
            .inc();
        for (flow, n) in [
            (Flow::to_upstream, to_upstream),
            (Flow::from_upstream, from_upstream),
        ] {
            if n > 0 {
                self.bytes
                    .get_or_create(&BytesLabels {
                        direction,
                        service: service.to_string(),
                        flow,
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
