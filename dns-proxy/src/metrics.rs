//! The DNS proxy's metrics, all under `isthmus_dns_`.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use hickory_proto::rr::RecordType;

/// How a query ended; every query is counted once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    /// Answered from the name table (including NOERROR without records for the other family).
    mesh_hit,
    /// Answered from the cache.
    cache_hit,
    /// Answered by an upstream resolver.
    forwarded,
    /// A name in the mesh's service domain that the catalog does not have.
    nxdomain,
    /// No answer could be had (before the first catalog sync, or every upstream failed).
    servfail,
    /// Too many queries waiting on upstreams, or an opcode this proxy does not serve.
    refused,
    /// The query could not be parsed, or asked zero or several questions.
    formerr,
    /// An EDNS version this proxy does not implement (RFC 6891: BADVERS).
    badvers,
}

/// Query types worth a label; everything else is `OTHER` (the label set stays bounded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(clippy::upper_case_acronyms)]
pub enum QueryType {
    A,
    AAAA,
    CNAME,
    HTTPS,
    MX,
    NS,
    PTR,
    SOA,
    SRV,
    SVCB,
    TXT,
    OTHER,
}

impl From<RecordType> for QueryType {
    fn from(t: RecordType) -> Self {
        match t {
            RecordType::A => QueryType::A,
            RecordType::AAAA => QueryType::AAAA,
            RecordType::CNAME => QueryType::CNAME,
            RecordType::HTTPS => QueryType::HTTPS,
            RecordType::MX => QueryType::MX,
            RecordType::NS => QueryType::NS,
            RecordType::PTR => QueryType::PTR,
            RecordType::SOA => QueryType::SOA,
            RecordType::SRV => QueryType::SRV,
            RecordType::SVCB => QueryType::SVCB,
            RecordType::TXT => QueryType::TXT,
            _ => QueryType::OTHER,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct QueryKind {
    pub qtype: QueryType,
    pub outcome: Outcome,
}

/// Why bytes from a client were not a query we could answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum MalformedReason {
    /// Shorter than a DNS header: dropped.
    short,
    /// Larger than the query size limit: dropped (UDP) or the connection closed (TCP).
    oversize,
    /// The response bit was set: dropped, so two resolvers can never loop.
    response,
    /// The header parsed but the rest did not (bad labels, compression loops, garbage):
    /// answered with FORMERR.
    unparseable,
    /// Zero or several questions: answered with FORMERR.
    questions,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct MalformedLabels {
    pub reason: MalformedReason,
}

/// Why work was shed to keep one client from starving the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ShedReason {
    /// The client already holds its share of the upstream slots: REFUSED.
    upstream_client_share,
    /// Every upstream slot is taken: REFUSED.
    upstream_slots_full,
    /// An idle TCP connection closed to make room for a new client, oldest idle first.
    tcp_idle_closed,
    /// Every TCP slot is busy with a query and none is idle: the new connection is closed.
    tcp_slots_full,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ShedLabels {
    pub reason: ShedReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum UpstreamError {
    timeout,
    refused,
    io,
    bad_response,
    servfail,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    pub upstream: String,
    pub reason: UpstreamError,
}

#[derive(Debug)]
pub struct Metrics {
    pub queries: Family<QueryKind, Counter>,
    pub malformed: Family<MalformedLabels, Counter>,
    pub upstream_duration: Family<UpstreamLabels, Histogram, fn() -> Histogram>,
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    pub upstream_tcp_retries: Counter,
    pub upstream_inflight: Gauge,
    pub cache_entries: Gauge,
    pub names: Gauge,
    pub catalog: isthmus_proto::subscription::SyncMetrics,
    pub tcp_connections: Gauge,
    pub rate_limited: Counter,
    pub rate_limited_dropped: Counter,
    pub shed: Family<ShedLabels, Counter>,
}

fn upstream_histogram() -> Histogram {
    // 100 µs to ~6.5 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            queries: Family::default(),
            malformed: Family::default(),
            upstream_duration: Family::new_with_constructor(upstream_histogram),
            upstream_errors: Family::default(),
            upstream_tcp_retries: Counter::default(),
            upstream_inflight: Gauge::default(),
            cache_entries: Gauge::default(),
            names: Gauge::default(),
            catalog: Default::default(),
            tcp_connections: Gauge::default(),
            rate_limited: Counter::default(),
            rate_limited_dropped: Counter::default(),
            shed: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("isthmus_dns");
        r.register(
            "queries",
            "DNS queries by type and outcome",
            m.queries.clone(),
        );
        r.register(
            "malformed_packets",
            "Client packets that were not a valid query, by reason",
            m.malformed.clone(),
        );
        r.register(
            "upstream_duration_seconds",
            "Time an upstream resolver took to answer",
            m.upstream_duration.clone(),
        );
        r.register(
            "upstream_errors",
            "Failed exchanges with an upstream resolver, by reason",
            m.upstream_errors.clone(),
        );
        r.register(
            "upstream_tcp_retries",
            "Truncated upstream answers retried over TCP",
            m.upstream_tcp_retries.clone(),
        );
        r.register(
            "upstream_inflight",
            "Queries waiting on an upstream resolver",
            m.upstream_inflight.clone(),
        );
        r.register(
            "cache_entries",
            "Answers in the cache",
            m.cache_entries.clone(),
        );
        r.register(
            "names",
            "Mesh names in the name table (wildcards count once)",
            m.names.clone(),
        );
        m.catalog.register_into(r);
        r.register(
            "tcp_connections",
            "Open client TCP connections",
            m.tcp_connections.clone(),
        );
        r.register(
            "rate_limited",
            "Queries answered REFUSED (UDP, TCP; the connection is then closed) by the per-client rate limit",
            m.rate_limited.clone(),
        );
        r.register(
            "rate_limited_dropped",
            "Queries dropped without an answer because their client was over the rate limit and over as many refusals again (a flood)",
            m.rate_limited_dropped.clone(),
        );
        r.register(
            "shed",
            "Queries refused or TCP connections closed so that no client starves the others, by reason",
            m.shed.clone(),
        );
        m
    }

    pub fn shed(&self, reason: ShedReason) {
        self.shed.get_or_create(&ShedLabels { reason }).inc();
    }

    pub fn query(&self, qtype: RecordType, outcome: Outcome) {
        self.queries
            .get_or_create(&QueryKind {
                qtype: qtype.into(),
                outcome,
            })
            .inc();
    }

    pub fn malformed(&self, reason: MalformedReason) {
        self.malformed
            .get_or_create(&MalformedLabels { reason })
            .inc();
    }
}
