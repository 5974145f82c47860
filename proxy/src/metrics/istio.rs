//! Istio's standard TCP metrics, beside the core's own: `istio_tcp_connections_opened_total`,
//! `istio_tcp_connections_closed_total`, `istio_tcp_received_bytes_total` and
//! `istio_tcp_sent_bytes_total`, with Istio's label names and values, so that the dashboards
//! and the Kiali graph an Istio user already has work on the traffic isthmus carries.
//!
//! It owns the label set ([`IstioLabels`]), how the labels of one end of a connection are
//! read from the catalog and the peer's verified identity ([`Peer`]), the index of the
//! catalog's workloads by address that the route follower keeps current ([`Catalog`]), and
//! the per-connection report ([`TcpReport`]).
//!
//! What Istio defines, and isthmus does:
//!
//! - `reporter` is `source` for the program on the client's side of a connection (the VM
//!   agent's outbound; the east-west gateway, which Istio's gateways report as too) and
//!   `destination` for the server's side (the VM agent's inbound).
//! - Received bytes are the bytes of the request (from the connecting side towards the
//!   server), sent bytes those of the response, at every reporter; both count as the relay
//!   moves them, not only when the connection ends.
//! - A connection is counted opened once its destination (outbound, gateway) or its peer
//!   (inbound) is known, and closed when it ends; both with the same labels, so opened minus
//!   closed is what is open now. A connection refused before that (not TLS, no SNI, an
//!   unknown service) is not an Istio connection and is counted only in the core's
//!   `connections_refused`.
//! - A value nobody knows is `unknown`, except a canonical revision, which is `latest` (as
//!   Istio's sidecars write it).
//!
//! Beside Istio's four, one family of isthmus's own, `isthmus_tcp_connections_opened_total`
//! ([`TransitLabels`]): each connection a source reports (the VM agent's outbound, the
//! gateway) that reached an endpoint, counted when Istio's `opened` is, under the edge's
//! workloads, namespaces, clusters and service as Istio's labels name them, plus what
//! Istio's label set has no room for: the network of each end and the `transport` that
//! carried it (`direct` to the endpoint; `sni-gateway`, SNI passthrough through the
//! destination network's east-west gateway; `tunnel` is kept for the gateways' tunnels).
//! It is a family of its own rather than a label on Istio's: Istio's dashboards and
//! Kiali match Istio's series by Istio's label names, and a label they do not know would
//! split every series they read; nor can the transport be derived from Istio's labels (an
//! `unknown` destination workload is a remote network's, or one the catalog does not
//! know). Bytes stay in Istio's families, where the relay counts them as it goes: the
//! graph (`isthmusctl graph`) joins the two on the edge's labels.
//!
//! Bounded cardinality: every label value comes from the catalog (service hostnames, names
//! and namespaces; workload labels and clusters) or from a SPIFFE identity the TLS layer
//! verified against the mesh's roots, never from what an unauthenticated client sends. A
//! connecting peer's catalog labels are used only when both its address and its verified
//! identity match a catalog workload; the endpoint a proxy connected to is the one its
//! routing table chose, named by its uid in the same view (and, where the proxy verified
//! the server, only if the server proved the catalog's identity); the SNI a client sends
//! only picks among services the catalog already says the local workload serves.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use arc_swap::ArcSwap;
use isthmus_proto::model::{EndpointKind, LabelLookup, ServiceView, ViewEndpoint, ViewResource};
use isthmus_proto::subscription::LocalView;
use isthmus_proto::SpiffeId;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::relay::Meter;

/// The metric prefix Istio's standard metrics have.
pub const PREFIX: &str = "istio";
/// The prefix of isthmus's own family beside Istio's ([`TransitLabels`]).
pub const TRANSIT_PREFIX: &str = "isthmus";
/// Istio's value for a label nobody knows.
pub const UNKNOWN: &str = "unknown";
/// Istio's canonical revision of a workload without a revision label, or of one it knows
/// nothing about.
pub const LATEST: &str = "latest";

/// The labels Istio reads a workload's canonical service from, first match wins.
pub const CANONICAL_NAME_LABELS: [&str; 3] = [
    "service.istio.io/canonical-name",
    "app.kubernetes.io/name",
    "app",
];
/// The labels Istio reads a workload's canonical revision from, first match wins.
pub const CANONICAL_REVISION_LABELS: [&str; 3] = [
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
];
/// The labels `*_app` is read from (Istio's backward-compatible order: `app` first).
pub const APP_LABELS: [&str; 3] = [
    "app",
    "app.kubernetes.io/name",
    "service.istio.io/canonical-name",
];
/// The labels `*_version` is read from.
pub const VERSION_LABELS: [&str; 3] = [
    "version",
    "app.kubernetes.io/version",
    "service.istio.io/canonical-revision",
];
/// Istio's label naming a workload explicitly (a WorkloadEntry's workload name).
pub const WORKLOAD_NAME_LABEL: &str = "service.istio.io/workload-name";

/// Which side of the connection the reporting program is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reporter {
    /// The client's side: the VM agent's outbound, the east-west gateway.
    source,
    /// The server's side: the VM agent's inbound.
    destination,
}

/// Whether the reporter saw the connection as mTLS. Istio sets it only at the destination;
/// a source reports `unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SecurityPolicy {
    unknown,
    mutual_tls,
    none,
}

/// Why a connection ended early, as Istio's L4 proxy (ztunnel) writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResponseFlags {
    /// `-`: nothing went wrong before the relay.
    None,
    /// `DENY`: refused by the authorization policy.
    Denied,
    /// `CONNECT`: no endpoint (or app) could be connected to.
    ConnectFailed,
    /// `RL`: refused by a quota on the caller's connections (Envoy's local rate limit).
    RateLimited,
    /// `FI`: reset by an injected abort fault.
    FaultAborted,
    /// `DI`: held by an injected delay fault, then relayed.
    FaultDelayed,
}

impl EncodeLabelValue for ResponseFlags {
    fn encode(&self, w: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        w.write_str(match self {
            ResponseFlags::None => "-",
            ResponseFlags::Denied => "DENY",
            ResponseFlags::ConnectFailed => "CONNECT",
            ResponseFlags::RateLimited => "RL",
            ResponseFlags::FaultAborted => "FI",
            ResponseFlags::FaultDelayed => "DI",
        })
    }
}

/// The protocol Istio names for the traffic: isthmus carries TCP only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RequestProtocol {
    tcp,
}

/// How a connection reached its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// `direct`: to the endpoint's own address, in the reporter's network.
    Direct,
    /// `sni-gateway`: to the destination network's east-west gateway, which routes the
    /// still encrypted session on its SNI (TLS passthrough).
    SniGateway,
    /// `hbone`: a stream of a pooled tunnel to the endpoint's proxy.
    Hbone,
    /// `hbone-gateway`: the end-to-end mTLS inside a stream of a pooled tunnel to the
    /// destination network's east-west gateway.
    HboneGateway,
    /// `quic`: a stream of a pooled QUIC tunnel to the endpoint's proxy.
    Quic,
    /// `quic-gateway`: the end-to-end mTLS inside a stream of a pooled QUIC tunnel to the
    /// destination network's east-west gateway.
    QuicGateway,
}

impl Transport {
    pub fn as_str(&self) -> &'static str {
        match self {
            Transport::Direct => "direct",
            Transport::SniGateway => "sni-gateway",
            Transport::Hbone => "hbone",
            Transport::HboneGateway => "hbone-gateway",
            Transport::Quic => "quic",
            Transport::QuicGateway => "quic-gateway",
        }
    }
}

impl EncodeLabelValue for Transport {
    fn encode(&self, w: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        w.write_str(self.as_str())
    }
}

/// Where a connection went, beyond what Istio's labels say: the networks of both ends
/// (empty when not known) and the transport.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Transit {
    pub source_network: String,
    pub destination_network: String,
    pub transport: Transport,
}

/// What a connection is counted under in `isthmus_tcp_connections_opened_total`: the
/// edge as Istio's labels name it (reporter, workloads, namespaces, clusters, service),
/// the networks of both ends and the transport.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TransitLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_cluster: String,
    pub source_network: String,
    pub destination_service: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_cluster: String,
    pub destination_network: String,
    pub transport: Transport,
}

impl TransitLabels {
    /// The edge of `istio` (the same values, so the two join), carried as `transit` says.
    pub fn new(istio: &IstioLabels, transit: &Transit) -> Self {
        let network = |n: &str| {
            if n.is_empty() {
                UNKNOWN.to_string()
            } else {
                n.to_string()
            }
        };
        Self {
            reporter: istio.reporter,
            source_workload: istio.source_workload.clone(),
            source_workload_namespace: istio.source_workload_namespace.clone(),
            source_cluster: istio.source_cluster.clone(),
            source_network: network(&transit.source_network),
            destination_service: istio.destination_service.clone(),
            destination_workload: istio.destination_workload.clone(),
            destination_workload_namespace: istio.destination_workload_namespace.clone(),
            destination_cluster: istio.destination_cluster.clone(),
            destination_network: network(&transit.destination_network),
            transport: transit.transport,
        }
    }
}

/// What the labels say about one end of a connection. `None` is written `unknown`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Peer {
    pub workload: Option<String>,
    pub namespace: Option<String>,
    pub principal: Option<SpiffeId>,
    pub app: Option<String>,
    pub version: Option<String>,
    pub canonical_service: Option<String>,
    pub canonical_revision: Option<String>,
    pub cluster: Option<String>,
}

fn first_label(labels: &(impl LabelLookup + ?Sized), keys: &[&str]) -> Option<String> {
    keys.iter()
        .find_map(|k| labels.label(k))
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

impl Peer {
    /// What a verified identity alone says: the principal, and the namespace in its path.
    pub fn from_identity(id: &SpiffeId) -> Self {
        Self {
            namespace: id.namespace().map(str::to_string),
            principal: Some(id.clone()),
            ..Self::default()
        }
    }

    /// A workload the catalog (or the program's own configuration) knows: `name` is its
    /// workload name when known (else the `service.istio.io/workload-name` label, else its
    /// canonical service), the rest read from its labels as Istio reads them. `identity`
    /// gives the principal and the namespace.
    pub fn from_labels(
        name: Option<&str>,
        labels: &(impl LabelLookup + ?Sized),
        cluster: &str,
        identity: Option<&SpiffeId>,
    ) -> Self {
        let explicit = name
            .and_then(non_empty)
            .or_else(|| first_label(labels, &[WORKLOAD_NAME_LABEL]));
        let canonical_service = first_label(labels, &CANONICAL_NAME_LABELS).or(explicit.clone());
        Self {
            workload: explicit.or(canonical_service.clone()),
            namespace: identity.and_then(|i| i.namespace()).map(str::to_string),
            principal: identity.cloned(),
            app: first_label(labels, &APP_LABELS),
            version: first_label(labels, &VERSION_LABELS),
            canonical_service,
            canonical_revision: Some(
                first_label(labels, &CANONICAL_REVISION_LABELS).unwrap_or_else(|| LATEST.into()),
            ),
            cluster: non_empty(cluster),
        }
    }

    /// The same workload, with the principal left out (the reporter did not verify it).
    pub fn without_principal(&self) -> Self {
        Self {
            principal: None,
            ..self.clone()
        }
    }
}

/// The service a connection went to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Service {
    pub hostname: String,
    pub name: String,
    pub namespace: String,
}

/// The program's own workload: what it reports as the source (outbound, gateway) or the
/// destination (inbound), and its address in the catalog, by which the services it serves
/// are found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Local {
    pub peer: Peer,
    pub address: Option<IpAddr>,
}

/// One workload endpoint of the view, pointed at rather than copied: its labels are read
/// when a connection needs them, so the index costs a few words per endpoint.
#[derive(Debug, Clone)]
struct Entry {
    view: Arc<ServiceView>,
    index: usize,
}

impl Entry {
    fn endpoint(&self) -> &ViewEndpoint {
        &self.view.endpoints[self.index]
    }

    fn runs_as(&self, identity: Option<&SpiffeId>) -> bool {
        identity.is_none_or(|id| self.endpoint().identities.contains(id))
    }

    /// Whether `other` describes the same workload as far as the labels go.
    fn same_workload(&self, other: &Entry) -> bool {
        let (a, b) = (self.endpoint(), other.endpoint());
        a.uid == b.uid
            || (a.labels == b.labels && a.cluster == b.cluster && a.identities == b.identities)
    }

    fn peer(&self) -> Peer {
        let e = self.endpoint();
        // Only a single identity names the workload's principal.
        let identity = match e.identities.as_slice() {
            [one] => Some(one),
            _ => None,
        };
        Peer::from_labels(None, &e.labels, &e.cluster, identity)
    }

    fn service(&self) -> Service {
        let svc = &self.view.service;
        Service {
            hostname: svc.hostname.clone(),
            name: svc.name.clone(),
            namespace: svc.namespace.clone(),
        }
    }
}

/// The catalog's workloads by address and by endpoint uid: where a peer's labels and the
/// local workload's services are looked up. Built from the network view whenever the
/// routing table is; it holds the view's service entries, not copies of them.
///
/// Both indexes are sorted lists searched by halves, not maps of lists: a map of lists
/// cost about 330 bytes per endpoint (a list allocated for each key, with room for four,
/// in each map), these cost 64.
#[derive(Debug, Default)]
pub struct Catalog {
    /// The view's workload endpoints by address, one per service the workload serves
    /// (those at one address in the view's order).
    by_address: Vec<(IpAddr, Entry)>,
    /// The same endpoints by the hash of their uid (the uid is compared on lookup, so no
    /// uid is copied).
    by_uid: Vec<(u64, Entry)>,
}

/// The entries of a sorted index under `key`.
fn under<K: Ord + Copy>(index: &[(K, Entry)], key: K) -> impl Iterator<Item = &Entry> {
    let start = index.partition_point(|(k, _)| *k < key);
    index[start..]
        .iter()
        .take_while(move |(k, _)| *k == key)
        .map(|(_, e)| e)
}

fn uid_hash(uid: &str) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(uid.as_bytes());
    h.finish()
}

impl Catalog {
    /// Every workload endpoint of `view` with an address (gateways stand for a remote
    /// network's workloads and are left out).
    pub fn build(view: &LocalView) -> Self {
        let mut c = Self::default();
        for res in view.resources.values() {
            let ViewResource::Service(sv) = res else {
                continue;
            };
            for (index, e) in sv.endpoints.iter().enumerate() {
                let (EndpointKind::Workload, Some(ip)) = (e.kind, e.address.ip()) else {
                    continue;
                };
                let entry = Entry {
                    view: sv.clone(),
                    index,
                };
                c.by_uid.push((uid_hash(&e.uid), entry.clone()));
                c.by_address.push((ip, entry));
            }
        }
        // Stable sorts: the entries under one key stay in the view's order.
        c.by_address.sort_by_key(|(ip, _)| *ip);
        c.by_address.shrink_to_fit();
        c.by_uid.sort_by_key(|(hash, _)| *hash);
        c.by_uid.shrink_to_fit();
        c
    }

    /// The endpoints of the one workload at `ip` that runs as `identity` (any, when
    /// `None`); none when there is none, or several workloads that disagree.
    fn workload_at(&self, ip: IpAddr, identity: Option<&SpiffeId>) -> Vec<&Entry> {
        let found: Vec<&Entry> = under(&self.by_address, ip)
            .filter(|e| e.runs_as(identity))
            .collect();
        match found.split_first() {
            Some((first, rest)) if rest.iter().all(|e| first.same_workload(e)) => found,
            _ => Vec::new(),
        }
    }

    /// What the labels say about the peer at `ip` whose identity was verified as
    /// `identity`: the catalog's workload there when it runs as that identity, else what
    /// the identity alone says.
    pub fn peer(&self, ip: IpAddr, identity: Option<&SpiffeId>) -> Peer {
        merge(self.workload_at(ip, identity).first().copied(), identity)
    }

    /// What the labels say about the endpoint `uid` (one the routing table chose from the
    /// same view), whose identity was verified as `identity` if the reporter verified one:
    /// its catalog labels, unless it turned out to run as another identity.
    pub fn endpoint(&self, uid: &str, identity: Option<&SpiffeId>) -> Peer {
        let entry = under(&self.by_uid, uid_hash(uid))
            .find(|e| e.endpoint().uid == uid)
            .filter(|e| e.runs_as(identity));
        merge(entry, identity)
    }

    /// The service a connection to the workload at `ip` is for: `wanted` (the hostname the
    /// client named) when the catalog says the workload serves it, else the first the
    /// workload serves.
    pub fn service_at(&self, ip: IpAddr, wanted: Option<&str>) -> Option<Service> {
        let entries = self.workload_at(ip, None);
        wanted
            .and_then(|h| entries.iter().find(|e| e.view.service.hostname == h))
            .or_else(|| {
                entries
                    .iter()
                    .min_by(|a, b| a.view.service.hostname.cmp(&b.view.service.hostname))
            })
            .map(|e| e.service())
    }
}

/// One end: the catalog's workload (if one matched), with the verified identity's
/// namespace and principal over it.
fn merge(entry: Option<&Entry>, identity: Option<&SpiffeId>) -> Peer {
    match (entry, identity) {
        (Some(e), Some(id)) => Peer {
            namespace: id.namespace().map(str::to_string),
            principal: Some(id.clone()),
            ..e.peer()
        },
        (Some(e), None) => e.peer(),
        (None, Some(id)) => Peer::from_identity(id),
        (None, None) => Peer::default(),
    }
}

/// Istio's labels of the standard metrics, in Istio's order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct IstioLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: RequestProtocol,
    pub response_flags: ResponseFlags,
    pub connection_security_policy: SecurityPolicy,
}

fn or_unknown(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| UNKNOWN.to_string())
}

/// Istio writes the revision of an end it knows nothing about as `latest`, not `unknown`.
fn or_latest(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| LATEST.to_string())
}

/// One connection as the labels describe it.
#[derive(Debug, Clone)]
pub struct Traffic<'a> {
    pub reporter: Reporter,
    pub source: &'a Peer,
    pub destination: &'a Peer,
    /// The service, when the reporter knows it; else Istio's fallback, the destination's
    /// canonical service.
    pub service: Option<&'a Service>,
    pub security: SecurityPolicy,
    pub flags: ResponseFlags,
}

impl IstioLabels {
    pub fn new(t: &Traffic<'_>) -> Self {
        let (s, d) = (t.source, t.destination);
        let principal = |p: &Peer| {
            p.principal
                .as_ref()
                .map_or_else(|| UNKNOWN.to_string(), |i| i.to_string())
        };
        let fallback = or_unknown(&d.canonical_service);
        let (service, service_name, service_namespace) = match t.service {
            Some(svc) => (
                svc.hostname.clone(),
                svc.name.clone(),
                svc.namespace.clone(),
            ),
            None => (fallback.clone(), fallback, or_unknown(&d.namespace)),
        };
        Self {
            reporter: t.reporter,
            source_workload: or_unknown(&s.workload),
            source_canonical_service: or_unknown(&s.canonical_service),
            source_canonical_revision: or_latest(&s.canonical_revision),
            source_workload_namespace: or_unknown(&s.namespace),
            source_principal: principal(s),
            source_app: or_unknown(&s.app),
            source_version: or_unknown(&s.version),
            source_cluster: or_unknown(&s.cluster),
            destination_service: service,
            destination_service_namespace: service_namespace,
            destination_service_name: service_name,
            destination_workload: or_unknown(&d.workload),
            destination_canonical_service: or_unknown(&d.canonical_service),
            destination_canonical_revision: or_latest(&d.canonical_revision),
            destination_workload_namespace: or_unknown(&d.namespace),
            destination_principal: principal(d),
            destination_app: or_unknown(&d.app),
            destination_version: or_unknown(&d.version),
            destination_cluster: or_unknown(&d.cluster),
            request_protocol: RequestProtocol::tcp,
            response_flags: t.flags,
            connection_security_policy: t.security,
        }
    }

    /// The same connection, ended with `flags`.
    pub fn with_flags(self, flags: ResponseFlags) -> Self {
        Self {
            response_flags: flags,
            ..self
        }
    }
}

/// The four counters and the transit family beside them, and what their labels are read
/// from: the program's own workload and network, and the catalog's workloads.
#[derive(Debug, Default)]
pub struct IstioMetrics {
    pub opened: Family<IstioLabels, Counter>,
    pub closed: Family<IstioLabels, Counter>,
    pub received_bytes: Family<IstioLabels, Counter>,
    pub sent_bytes: Family<IstioLabels, Counter>,
    /// `isthmus_tcp_connections_opened_total`: connections by edge, networks and transport.
    pub transits: Family<TransitLabels, Counter>,
    local: ArcSwap<Local>,
    /// The network the program's workload is in (empty: not known).
    network: ArcSwap<String>,
    catalog: ArcSwap<Catalog>,
    /// The counters of each label set (and transit) seen, so that a connection costs one
    /// lookup of its label set instead of one per family.
    handles: RwLock<HashMap<HandlesKey, Arc<Handles>>>,
    /// The counters of the connections a call site described by the few values their labels
    /// follow from ([`open_memo`](Self::open_memo)), under the current generation.
    memo: RwLock<HashMap<u64, MemoBucket>>,
    /// Moves on with every change to what labels are read from (the local workload, its
    /// network, the catalog): a memo of an earlier generation is never found again.
    generation: AtomicU64,
}

/// The memos whose key hashes alike, with their counters.
type MemoBucket = Vec<(Memo, Arc<Handles>)>;

/// What a memoised label set was found by.
#[derive(Debug)]
struct Memo {
    generation: u64,
    site: &'static str,
    parts: Vec<String>,
}

impl Memo {
    fn is(&self, generation: u64, site: &str, parts: &[&str]) -> bool {
        self.generation == generation
            && self.site == site
            && self.parts.len() == parts.len()
            && self.parts.iter().zip(parts).all(|(a, b)| a == b)
    }
}

fn memo_hash(generation: u64, site: &str, parts: &[&str]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (generation, site, parts).hash(&mut h);
    h.finish()
}

type HandlesKey = (IstioLabels, Option<Transit>);

/// Label sets whose counters are kept at hand; past this the cache starts over (the
/// families keep every count).
const MAX_CACHED_LABEL_SETS: usize = 4096;

/// One label set's four counters, and its transit's.
#[derive(Debug)]
struct Handles {
    opened: Counter,
    closed: Counter,
    received: Counter,
    sent: Counter,
    transit: Option<Counter>,
}

impl IstioMetrics {
    /// Registers at the root of `registry` (Istio's names carry no program prefix).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix(PREFIX);
        r.register(
            "tcp_connections_opened",
            "TCP connections opened (Istio standard metric)",
            m.opened.clone(),
        );
        r.register(
            "tcp_connections_closed",
            "TCP connections closed (Istio standard metric)",
            m.closed.clone(),
        );
        r.register(
            "tcp_received_bytes",
            "Bytes of the request: from the connecting side towards the server (Istio standard metric)",
            m.received_bytes.clone(),
        );
        r.register(
            "tcp_sent_bytes",
            "Bytes of the response: from the server back to the connecting side (Istio standard metric)",
            m.sent_bytes.clone(),
        );
        registry.sub_registry_with_prefix(TRANSIT_PREFIX).register(
            "tcp_connections_opened",
            "TCP connections opened that reached an endpoint, as istio_tcp_connections_opened_total counts them, by the edge's workloads and service, the networks of both ends and the transport (direct, sni-gateway)",
            m.transits.clone(),
        );
        m
    }

    /// The program's own workload, as it reports itself.
    pub fn local(&self) -> Arc<Local> {
        self.local.load_full()
    }

    pub fn set_local(&self, local: Local) {
        self.local.store(Arc::new(local));
        self.next_generation();
    }

    /// The network the program's workload is in (empty: not known).
    pub fn network(&self) -> Arc<String> {
        self.network.load_full()
    }

    pub fn set_network(&self, network: &str) {
        self.network.store(Arc::new(network.to_string()));
        self.next_generation();
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.load_full()
    }

    /// Called by the route follower with each new view.
    pub fn set_catalog(&self, catalog: Catalog) {
        self.catalog.store(Arc::new(catalog));
        self.next_generation();
    }

    /// After what labels are read from changed (stored first): memos made before are
    /// dropped, and one being made meanwhile, of the earlier generation, is never found.
    fn next_generation(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.memo.write().expect("istio memo").clear();
    }

    /// As [`open`](Self::open) or [`open_transit`](Self::open_transit), for a connection
    /// whose labels and transit `build` makes from the local workload, the catalog and
    /// `parts` alone (the same `build` for every connection of call site `site`): they are
    /// made for the first connection with those parts, and the next ones find their
    /// counters by `site` and `parts`, without a label set being built, copied and hashed
    /// for each.
    pub fn open_memo(
        &self,
        site: &'static str,
        parts: &[&str],
        build: impl FnOnce() -> (IstioLabels, Option<Transit>),
    ) -> TcpReport {
        // Read before `build` loads what the labels are made from, so that labels of an
        // older catalog are never filed under a newer generation.
        let generation = self.generation.load(Ordering::SeqCst);
        let hash = memo_hash(generation, site, parts);
        let found = self
            .memo
            .read()
            .expect("istio memo")
            .get(&hash)
            .and_then(|v| v.iter().find(|(m, _)| m.is(generation, site, parts)))
            .map(|(_, h)| h.clone());
        let handles = match found {
            Some(h) => h,
            None => {
                let handles = self.handles(build());
                let mut memo = self.memo.write().expect("istio memo");
                if memo.len() >= MAX_CACHED_LABEL_SETS {
                    memo.clear();
                }
                memo.entry(hash).or_default().push((
                    Memo {
                        generation,
                        site,
                        parts: parts.iter().map(|p| p.to_string()).collect(),
                    },
                    handles.clone(),
                ));
                handles
            }
        };
        Self::count_open(handles)
    }

    /// Counts a connection opened; the report counts its bytes and its close.
    pub fn open(&self, labels: IstioLabels) -> TcpReport {
        self.open_key((labels, None))
    }

    /// As [`open`](Self::open), for a connection that reached its endpoint as `transit`
    /// says: counted in `isthmus_tcp_connections_opened_total` too.
    pub fn open_transit(&self, labels: IstioLabels, transit: Transit) -> TcpReport {
        self.open_key((labels, Some(transit)))
    }

    fn open_key(&self, key: HandlesKey) -> TcpReport {
        Self::count_open(self.handles(key))
    }

    fn count_open(handles: Arc<Handles>) -> TcpReport {
        handles.opened.inc();
        if let Some(t) = &handles.transit {
            t.inc();
        }
        TcpReport { handles }
    }

    fn handles(&self, key: HandlesKey) -> Arc<Handles> {
        if let Some(h) = self.handles.read().expect("istio handles").get(&key) {
            return h.clone();
        }
        let mut cache = self.handles.write().expect("istio handles");
        if cache.len() >= MAX_CACHED_LABEL_SETS {
            cache.clear();
        }
        cache
            .entry(key)
            .or_insert_with_key(|(l, transit)| {
                Arc::new(Handles {
                    opened: self.opened.get_or_create(l).clone(),
                    closed: self.closed.get_or_create(l).clone(),
                    received: self.received_bytes.get_or_create(l).clone(),
                    sent: self.sent_bytes.get_or_create(l).clone(),
                    transit: transit.as_ref().map(|t| {
                        self.transits
                            .get_or_create(&TransitLabels::new(l, t))
                            .clone()
                    }),
                })
            })
            .clone()
    }

    /// A connection that ended before any byte moved (denied, or nothing to connect to):
    /// opened and closed at once.
    pub fn refused(&self, labels: IstioLabels) {
        drop(self.open(labels));
    }
}

/// One open connection's counters; dropping it counts the connection closed.
#[derive(Debug)]
pub struct TcpReport {
    handles: Arc<Handles>,
}

impl TcpReport {
    /// Where the relay counts as it goes: the client's bytes towards the server are
    /// received, the server's back sent.
    pub fn meter(&self) -> Meter<'_> {
        Meter {
            client_to_upstream: self.handles.received.inner(),
            upstream_to_client: self.handles.sent.inner(),
        }
    }

    /// Bytes moved outside the relay (the ClientHello the gateway read to route).
    pub fn add_received(&self, n: u64) {
        self.handles.received.inc_by(n);
    }
}

impl Drop for TcpReport {
    fn drop(&mut self) {
        self.handles.closed.inc();
    }
}

#[cfg(test)]
pub(crate) mod tests;
