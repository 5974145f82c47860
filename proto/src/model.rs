//! The catalog model: plain Rust types converted once from protobuf at the edge, so that
//! code outside this crate never handles generated types.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

pub mod labels;
pub mod traffic;

use crate::identity::SpiffeId;
use crate::pb;
pub use labels::{LabelLookup, Labels};
pub use traffic::{
    DestinationRule, L4Route, LoadBalancer, OutlierPolicy, PolicyBox, RouteDestination, Subset,
    TrafficPolicy, VirtualService,
};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{field}: {value} is not a valid port (1-65535)")]
    BadPort { field: String, value: u32 },
    #[error("{field}: {why}")]
    Invalid { field: String, why: String },
    #[error("resource has no kind")]
    MissingKind,
}

fn port(field: impl Into<String>, v: u32) -> Result<u16, ModelError> {
    match u16::try_from(v) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(ModelError::BadPort {
            field: field.into(),
            value: v,
        }),
    }
}

pub(crate) fn port_or_zero(field: impl Into<String>, v: u32) -> Result<u16, ModelError> {
    if v == 0 {
        Ok(0)
    } else {
        port(field, v)
    }
}

/// Where a workload (or a view endpoint) is reached, parsed once where it enters the
/// process, so no consumer re-parses a string and silently drops what does not parse: an IP
/// address; a DNS name (an endpoint of a `resolution: DNS` ServiceEntry, resolved by whoever
/// connects); or none (a WorkloadGroup's template, before a VM registers an address).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Address {
    #[default]
    None,
    Ip(IpAddr),
    Dns(String),
}

impl Address {
    /// Reads the wire form: empty, an IP address, or a DNS name.
    pub fn parse(s: &str) -> Result<Address, String> {
        if s.is_empty() {
            return Ok(Address::None);
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Address::Ip(ip));
        }
        if is_dns_name(s) {
            return Ok(Address::Dns(s.to_ascii_lowercase()));
        }
        Err(format!("{s:?} is neither an IP address nor a DNS name"))
    }

    /// The IP address, for consumers that connect or answer by address only.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Address::Ip(ip) => Some(*ip),
            _ => None,
        }
    }

    pub fn is_none(&self) -> bool {
        matches!(self, Address::None)
    }
}

impl From<IpAddr> for Address {
    fn from(ip: IpAddr) -> Self {
        Address::Ip(ip)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::None => Ok(()),
            Address::Ip(ip) => write!(f, "{ip}"),
            Address::Dns(name) => f.write_str(name),
        }
    }
}

/// Compares with the wire form (`""`, `"10.0.0.1"`, `"db.example.com"`).
impl PartialEq<&str> for Address {
    fn eq(&self, other: &&str) -> bool {
        match self {
            Address::None => other.is_empty(),
            Address::Ip(ip) => other.parse::<IpAddr>().is_ok_and(|o| o == *ip),
            Address::Dns(name) => name.eq_ignore_ascii_case(other),
        }
    }
}

impl serde::Serialize for Address {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A DNS name as RFC 1123 has it (labels of letters, digits and hyphens, not starting or
/// ending with a hyphen; `_` allowed as in service labels), at most 253 characters.
fn is_dns_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

fn address_from_pb(field: &str, s: &str) -> Result<Address, ModelError> {
    Address::parse(s).map_err(|why| ModelError::Invalid {
        field: field.to_string(),
        why,
    })
}

fn ip_from_pb(field: &str, s: &str) -> Result<IpAddr, ModelError> {
    s.parse().map_err(|_| ModelError::Invalid {
        field: field.to_string(),
        why: format!("{s:?} is not an IP address"),
    })
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl Locality {
    /// Parses `region/zone/subzone` (any suffix may be missing).
    pub fn parse(s: &str) -> Self {
        let mut it = s.splitn(3, '/');
        Self {
            region: it.next().unwrap_or_default().to_string(),
            zone: it.next().unwrap_or_default().to_string(),
            subzone: it.next().unwrap_or_default().to_string(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.region.is_empty() && self.zone.is_empty() && self.subzone.is_empty()
    }

    /// Checks a locality as every way into the mesh accepts one: at most three parts
    /// (`region/zone/subzone`), none empty, each a Kubernetes label value. The message names
    /// the value and what is wrong with it.
    pub fn check(l: &str) -> Result<(), String> {
        let parts: Vec<&str> = l.split('/').collect();
        if parts.len() > 3 {
            return Err(format!("{l:?} is not a locality: use region/zone/subzone"));
        }
        for part in parts {
            if part.is_empty() {
                return Err(format!(
                    "{l:?} is not a locality: a part is empty (use region/zone/subzone)"
                ));
            }
            if let Err(why) = label_name_chars(part) {
                return Err(format!("{l:?} is not a locality: {part:?}: {why}"));
            }
        }
        Ok(())
    }
}

/// The characters of a Kubernetes label name or value: at most 63, letters, digits, `-`,
/// `_` and `.`, starting and ending with a letter or digit.
pub fn label_name_chars(s: &str) -> Result<(), &'static str> {
    if s.len() > 63 {
        return Err("it is longer than 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("only letters, digits, '-', '_' and '.' are allowed");
    }
    let alnum = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    if !alnum(s.bytes().next()) || !alnum(s.bytes().last()) {
        return Err("it must start and end with a letter or digit");
    }
    Ok(())
}

impl fmt::Display for Locality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts = [&self.region, &self.zone, &self.subzone];
        let n = parts
            .iter()
            .rposition(|p| !p.is_empty())
            .map_or(0, |i| i + 1);
        let s: Vec<&str> = parts[..n].iter().map(|s| s.as_str()).collect();
        f.write_str(&s.join("/"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gateway {
    /// A gateway is dialled by address, never by name.
    pub address: IpAddr,
    pub sni_port: u16,
    pub tunnel_port: u16,
    pub locality: Locality,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub id: String,
    pub gateways: Vec<Gateway>,
    pub cidrs: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub number: u16,
    pub protocol: String,
    /// 0 means "same as number".
    pub target_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resolution {
    #[default]
    Static,
    Dns,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    #[default]
    Mesh,
    ClusterLocal,
}

/// Which namespaces' proxies see a service definition: Istio's `exportTo`, read once where
/// the definition enters the catalog (`.` is written as the definition's own namespace).
/// Visibility decides what a proxy is told, not who may connect (authorization does that).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ExportTo {
    /// `*` (and Istio's default when `exportTo` is absent): every namespace.
    #[default]
    Public,
    /// The namespaces named; never empty.
    Namespaces(BTreeSet<String>),
    /// `~`: no namespace; the definition still serves its endpoints' inbound traffic.
    Nobody,
}

impl ExportTo {
    /// Whether a proxy in `namespace` sees the definition.
    pub fn visible_to(&self, namespace: &str) -> bool {
        match self {
            ExportTo::Public => true,
            ExportTo::Namespaces(names) => names.contains(namespace),
            ExportTo::Nobody => false,
        }
    }

    pub fn is_public(&self) -> bool {
        matches!(self, ExportTo::Public)
    }

    /// What both of two definitions of one namespace export (a definition from each of two
    /// clusters): the union, so neither cluster's choice hides the other's.
    pub fn union(&self, other: &ExportTo) -> ExportTo {
        match (self, other) {
            (ExportTo::Public, _) | (_, ExportTo::Public) => ExportTo::Public,
            (ExportTo::Nobody, x) | (x, ExportTo::Nobody) => x.clone(),
            (ExportTo::Namespaces(a), ExportTo::Namespaces(b)) => {
                ExportTo::Namespaces(a.union(b).cloned().collect())
            }
        }
    }

    /// Reads an `exportTo` list as written in a ServiceEntry of `namespace`, by Istio's
    /// rules: each entry `.`, `*`, `~` or a namespace name; no entry twice (`.` and the own
    /// namespace's name are the same entry); `*` and `~` only alone. Every problem is
    /// reported, each with the entry it is about (None: the list as a whole).
    pub fn parse(values: &[String], namespace: &str) -> Result<ExportTo, Vec<ExportToProblem>> {
        let mut problems = Vec::new();
        // Entry (with `.` read as the namespace) -> how it was first written.
        let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
        for (i, v) in values.iter().enumerate() {
            let entry = |why: String| ExportToProblem {
                index: Some(i),
                why,
            };
            let key = if v == "." { namespace } else { v.as_str() };
            if let Some(first) = seen.insert(key, v) {
                problems.push(entry(if first != v {
                    format!(
                        "\".\" and {namespace:?} (this entry's own namespace) are the same entry"
                    )
                } else {
                    format!("{v:?} is listed twice")
                }));
                continue;
            }
            if !matches!(v.as_str(), "." | "*" | "~") {
                if let Err(e) = crate::identity::validate_dns_label("namespace", v) {
                    problems.push(entry(format!(
                        "{e}; an entry is \".\" (this namespace), \"*\" (every namespace), \"~\" (none) or a namespace name"
                    )));
                }
            }
        }
        if values.len() > 1 {
            let whole = |why: &str| ExportToProblem {
                index: None,
                why: why.into(),
            };
            if seen.contains_key("*") {
                problems.push(whole(
                    "\"*\" (every namespace) cannot be listed with other entries",
                ));
            }
            if seen.contains_key("~") {
                problems.push(whole(
                    "\"~\" (no namespace) cannot be listed with other entries",
                ));
            }
        }
        if problems.is_empty() {
            Ok(ExportTo::from_wire(values, namespace))
        } else {
            Err(problems)
        }
    }

    /// The wire form: empty for every namespace (what a catalog written before visibility
    /// existed holds), `~` for none, else the namespaces.
    pub fn to_wire(&self) -> Vec<String> {
        match self {
            ExportTo::Public => Vec::new(),
            ExportTo::Nobody => vec!["~".into()],
            ExportTo::Namespaces(names) => names.iter().cloned().collect(),
        }
    }

    /// Reads the wire form; `namespace` is the definition's own (what `.` stands for).
    pub fn from_wire(values: &[String], namespace: &str) -> ExportTo {
        if values.is_empty() || values.iter().any(|v| v == "*") {
            return ExportTo::Public;
        }
        let names: BTreeSet<String> = values
            .iter()
            .filter(|v| *v != "~")
            .map(|v| if v == "." { namespace } else { v }.to_string())
            .collect();
        if names.is_empty() {
            ExportTo::Nobody
        } else {
            ExportTo::Namespaces(names)
        }
    }
}

/// What is wrong with an `exportTo` list (see [`ExportTo::parse`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportToProblem {
    /// The entry it is about; None when it is about the list as a whole.
    pub index: Option<usize>,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAddress {
    /// Empty: the same address in every cluster.
    pub cluster: String,
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Service {
    pub hostname: String,
    pub namespace: String,
    pub name: String,
    pub cluster: String,
    pub ports: Vec<ServicePort>,
    pub addresses: Vec<ServiceAddress>,
    /// VIPs the registry allocated for this hostname (see `allocated_addresses` in
    /// `catalog.proto`); filled in view entries only, empty in the resources sources own.
    pub allocated_addresses: Vec<String>,
    /// Identities (SPIFFE IDs) a server of this service may present besides those of its
    /// endpoints: a ServiceEntry's `subjectAltNames`.
    pub subject_alt_names: Vec<String>,
    pub resolution: Resolution,
    pub scope: Scope,
    /// Which namespaces see this definition (Istio's `exportTo`).
    pub export_to: ExportTo,
    pub labels: Labels,
    pub selector: Labels,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Health {
    #[default]
    Healthy,
    Unhealthy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Origin {
    Pod,
    #[default]
    WorkloadEntry,
    Vm,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub address: Address,
    pub network: String,
    pub cluster: String,
    pub locality: Locality,
    pub identity: Option<SpiffeId>,
    pub labels: Labels,
    pub ports: BTreeMap<String, u16>,
    pub weight: u32,
    pub health: Health,
    pub origin: Origin,
    pub last_confirmed_ms: i64,
    /// Unix milliseconds since which this workload's source has been out of touch with it
    /// (0 while current): what it says is the last that source knew.
    pub stale_since_ms: i64,
    pub services: Vec<String>,
    pub service_account: String,
    /// The port on `address` where this workload's proxy accepts tunnels (HBONE, 15008); 0:
    /// none, its ports are reached directly with mTLS.
    pub tunnel_port: u16,
}

impl Workload {
    /// Whether this workload is an endpoint of `svc` (same namespace, and either named
    /// explicitly or matched by the service's selector).
    pub fn serves(&self, svc: &Service) -> bool {
        if self.namespace != svc.namespace {
            return false;
        }
        if self.services.iter().any(|h| h == &svc.hostname) {
            return true;
        }
        !svc.selector.is_empty()
            && svc
                .selector
                .iter()
                .all(|(k, v)| self.labels.get(k) == Some(v))
    }

    /// The port on this workload for a service port: by name, else the target port, else the
    /// service port number.
    pub fn port_for(&self, sp: &ServicePort) -> u16 {
        if let Some(p) = self.ports.get(&sp.name) {
            return *p;
        }
        if sp.target_port != 0 {
            sp.target_port
        } else {
            sp.number
        }
    }

    pub fn effective_weight(&self) -> u32 {
        self.weight.max(1)
    }
}

/// How an `httpGet` probe talks to the app. HTTPS is checked as the kubelet checks it: the
/// handshake must complete, the certificate is not verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HttpScheme {
    #[default]
    Http,
    Https,
}

impl HttpScheme {
    /// The spelling Istio's API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            HttpScheme::Http => "HTTP",
            HttpScheme::Https => "HTTPS",
        }
    }

    /// Istio's spellings: `HTTP`, `HTTPS`, or empty for HTTP. Nothing else (Istio refuses
    /// `https` too).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "" | "HTTP" => Some(HttpScheme::Http),
            "HTTPS" => Some(HttpScheme::Https),
            _ => None,
        }
    }
}

/// One header an `httpGet` probe sends. A `Host` header sets the request's Host, as in
/// Kubernetes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAction {
    HttpGet {
        /// As written in the resource (may carry a query; may lack the leading `/`).
        path: String,
        port: u16,
        /// Where to connect (and the TLS server name when a DNS name); empty: the app's host.
        host: String,
        scheme: HttpScheme,
        headers: Vec<HttpHeader>,
    },
    TcpSocket {
        host: String,
        port: u16,
    },
    Exec {
        command: Vec<String>,
    },
    /// A `grpc.health.v1.Health/Check` call to the app's host; SERVING passes.
    Grpc {
        port: u16,
        service: String,
    },
}

/// A readiness probe with every timing field filled (the registry applies the defaults, see
/// the vm-agent's ARCHITECTURE.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub initial_delay_seconds: u32,
    pub period_seconds: u32,
    pub timeout_seconds: u32,
    pub success_threshold: u32,
    pub failure_threshold: u32,
    pub action: ProbeAction,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkloadGroup {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub template: Workload,
    pub probe: Option<Probe>,
}

/// Anything the registry stores in its catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    Network(Network),
    Service(Service),
    Workload(Workload),
    /// Boxed: a group (a workload template and a probe) is the largest variant and the
    /// rarest, and every resource of a catalog of 100,000 workloads would otherwise be
    /// as large as a group.
    WorkloadGroup(Box<WorkloadGroup>),
    /// Boxed, like a group: rare beside workloads.
    DestinationRule(Box<DestinationRule>),
    VirtualService(Box<VirtualService>),
}

impl Resource {
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::Network(_) => "Network",
            Resource::Service(_) => "Service",
            Resource::Workload(_) => "Workload",
            Resource::WorkloadGroup(_) => "WorkloadGroup",
            Resource::DestinationRule(_) => "DestinationRule",
            Resource::VirtualService(_) => "VirtualService",
        }
    }

    /// A key unique within the catalog: `<kind>/<namespace>/<name>`, workloads with their
    /// cluster first; services are keyed by defining cluster, namespace, hostname and the
    /// resource that defines them, since the same hostname may come from several clusters
    /// (one service), from several resources of one namespace (merged into one service, as
    /// Istio merges ServiceEntries of a host) and from several namespaces (one service each,
    /// as in Istio).
    pub fn key(&self) -> String {
        match self {
            Resource::Network(n) => format!("Network//{}", n.id),
            Resource::Service(s) => service_key(&s.cluster, &s.namespace, &s.hostname, &s.name),
            Resource::Workload(w) => workload_key(&w.cluster, &w.namespace, &w.name),
            Resource::WorkloadGroup(g) => workload_group_key(&g.namespace, &g.name),
            Resource::DestinationRule(d) => format!("DestinationRule/{}/{}", d.namespace, d.name),
            Resource::VirtualService(v) => format!("VirtualService/{}/{}", v.namespace, v.name),
        }
    }
}

/// The catalog key of the Service `hostname` defined in `cluster` and `namespace` by the
/// resource `name` (see [`Resource::key`]).
pub fn service_key(cluster: &str, namespace: &str, hostname: &str, name: &str) -> String {
    format!("Service/{cluster}/{namespace}/{hostname}/{name}")
}

/// The catalog key of the Workload `namespace/name` of `cluster` (see [`Resource::key`]):
/// clusters name their objects independently, so two clusters may each have a `db-0` in the
/// same namespace, and each is its own workload.
pub fn workload_key(cluster: &str, namespace: &str, name: &str) -> String {
    format!("Workload/{cluster}/{namespace}/{name}")
}

/// The catalog key of the WorkloadGroup `namespace/name` (see [`Resource::key`]).
pub fn workload_group_key(namespace: &str, name: &str) -> String {
    format!("WorkloadGroup/{namespace}/{name}")
}

/// A resource with the source that owns it. The resource is shared (a source, the catalog
/// and a diff in progress hold the same allocation), since a large catalog is mostly
/// workloads that no one changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedResource {
    pub origin: String,
    pub resource: Arc<Resource>,
}

impl OwnedResource {
    pub fn new(origin: impl Into<String>, resource: Resource) -> Self {
        Self {
            origin: origin.into(),
            resource: Arc::new(resource),
        }
    }
}

// ---- what subscribers see ------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum NodeKind {
    #[default]
    Workload,
    Gateway,
    Dns,
    Vm,
    Ctl,
    /// Another cluster's registry, importing what this registry exports.
    Peer,
}

impl NodeKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            NodeKind::Workload => "workload",
            NodeKind::Gateway => "gateway",
            NodeKind::Dns => "dns",
            NodeKind::Vm => "vm",
            NodeKind::Ctl => "ctl",
            NodeKind::Peer => "peer",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "workload" => NodeKind::Workload,
            "gateway" => NodeKind::Gateway,
            "dns" => NodeKind::Dns,
            "vm" => NodeKind::Vm,
            "ctl" => NodeKind::Ctl,
            "peer" => NodeKind::Peer,
            _ => return None,
        })
    }
}

/// A subscriber of the Watch service, as it describes itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Node {
    pub id: String,
    pub kind: NodeKind,
    pub network: String,
    pub cluster: String,
    pub locality: Locality,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointKind {
    Workload,
    Gateway,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewEndpoint {
    pub kind: EndpointKind,
    pub address: Address,
    /// Service port number -> port to connect to.
    pub ports: BTreeMap<u16, u16>,
    pub network: String,
    pub cluster: String,
    pub locality: Locality,
    pub identities: Vec<SpiffeId>,
    pub weight: u32,
    pub health: Health,
    pub labels: Labels,
    pub uid: String,
    /// The port that accepts tunnels (HBONE) to this endpoint: a gateway's tunnel port, or a
    /// workload's own; 0: none.
    pub tunnel_port: u16,
    /// Unix milliseconds since which this endpoint has not been confirmed by its source
    /// (0 when current); behind a gateway, the oldest of the endpoints it stands for.
    pub stale_since_ms: i64,
    /// Behind a gateway: the healthy weight of each subset of the service (its
    /// DestinationRule's) there; empty for a workload.
    pub subset_weights: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceView {
    pub service: Service,
    pub endpoints: Vec<ViewEndpoint>,
    /// The subsets of the service's DestinationRule.
    pub subsets: Vec<Subset>,
    /// The `tcp` and `tls` routes of the VirtualServices for this hostname, in order.
    pub routes: Vec<L4Route>,
    /// The traffic policy of the service's DestinationRule (its subsets carry their own).
    pub policy: PolicyBox,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewResource {
    Service(Arc<ServiceView>),
    Network(Arc<Network>),
}

impl ViewResource {
    pub fn key(&self) -> String {
        match self {
            ViewResource::Service(s) => service_view_key(&s.service.hostname),
            ViewResource::Network(n) => network_view_key(&n.id),
        }
    }
}

pub fn service_view_key(hostname: &str) -> String {
    format!("svc/{hostname}")
}

pub fn network_view_key(id: &str) -> String {
    format!("net/{id}")
}

// ---- conversions ---------------------------------------------------------------------------

impl From<&Locality> for pb::Locality {
    fn from(l: &Locality) -> Self {
        Self {
            region: l.region.clone(),
            zone: l.zone.clone(),
            subzone: l.subzone.clone(),
        }
    }
}

impl From<Option<pb::Locality>> for Locality {
    fn from(l: Option<pb::Locality>) -> Self {
        l.map(|l| Locality {
            region: l.region,
            zone: l.zone,
            subzone: l.subzone,
        })
        .unwrap_or_default()
    }
}

impl From<&Network> for pb::Network {
    fn from(n: &Network) -> Self {
        Self {
            id: n.id.clone(),
            gateways: n
                .gateways
                .iter()
                .map(|g| pb::Gateway {
                    address: g.address.to_string(),
                    sni_port: g.sni_port.into(),
                    tunnel_port: g.tunnel_port.into(),
                    locality: Some((&g.locality).into()),
                })
                .collect(),
            cidrs: n.cidrs.clone(),
        }
    }
}

impl TryFrom<pb::Network> for Network {
    type Error = ModelError;
    fn try_from(n: pb::Network) -> Result<Self, ModelError> {
        let gateways = n
            .gateways
            .into_iter()
            .enumerate()
            .map(|(i, g)| {
                Ok(Gateway {
                    address: ip_from_pb(&format!("gateways[{i}].address"), &g.address)?,
                    sni_port: port(format!("gateways[{i}].sni_port"), g.sni_port)?,
                    tunnel_port: port_or_zero(format!("gateways[{i}].tunnel_port"), g.tunnel_port)?,
                    locality: g.locality.into(),
                })
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(Network {
            id: n.id,
            gateways,
            cidrs: n.cidrs,
        })
    }
}

fn resolution_to_pb(r: Resolution) -> pb::Resolution {
    match r {
        Resolution::Static => pb::Resolution::Static,
        Resolution::Dns => pb::Resolution::Dns,
        Resolution::None => pb::Resolution::None,
    }
}

fn scope_to_pb(s: Scope) -> pb::Scope {
    match s {
        Scope::Mesh => pb::Scope::Mesh,
        Scope::ClusterLocal => pb::Scope::ClusterLocal,
    }
}

impl From<&Service> for pb::Service {
    fn from(s: &Service) -> Self {
        Self {
            hostname: s.hostname.clone(),
            namespace: s.namespace.clone(),
            ports: s
                .ports
                .iter()
                .map(|p| pb::ServicePort {
                    name: p.name.clone(),
                    number: p.number.into(),
                    protocol: p.protocol.clone(),
                    target_port: p.target_port.into(),
                })
                .collect(),
            addresses: s
                .addresses
                .iter()
                .map(|a| pb::ServiceAddress {
                    cluster: a.cluster.clone(),
                    address: a.address.clone(),
                })
                .collect(),
            allocated_addresses: s.allocated_addresses.clone(),
            subject_alt_names: s.subject_alt_names.clone(),
            resolution: resolution_to_pb(s.resolution).into(),
            scope: scope_to_pb(s.scope).into(),
            export_to: s.export_to.to_wire(),
            labels: s.labels.clone().into_iter().collect(),
            selector: s.selector.clone().into_iter().collect(),
            cluster: s.cluster.clone(),
            name: s.name.clone(),
        }
    }
}

impl TryFrom<pb::Service> for Service {
    type Error = ModelError;
    fn try_from(s: pb::Service) -> Result<Self, ModelError> {
        let resolution = match s.resolution() {
            pb::Resolution::Dns => Resolution::Dns,
            pb::Resolution::None => Resolution::None,
            _ => Resolution::Static,
        };
        let scope = match s.scope() {
            pb::Scope::ClusterLocal => Scope::ClusterLocal,
            _ => Scope::Mesh,
        };
        let ports = s
            .ports
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                Ok(ServicePort {
                    number: port(format!("ports[{i}].number"), p.number)?,
                    target_port: port_or_zero(format!("ports[{i}].target_port"), p.target_port)?,
                    name: p.name,
                    protocol: p.protocol,
                })
            })
            .collect::<Result<_, ModelError>>()?;
        let export_to = ExportTo::from_wire(&s.export_to, &s.namespace);
        Ok(Service {
            hostname: s.hostname,
            namespace: s.namespace,
            name: s.name,
            cluster: s.cluster,
            ports: tight(ports),
            addresses: tight(
                s.addresses
                    .into_iter()
                    .map(|a| ServiceAddress {
                        cluster: a.cluster,
                        address: a.address,
                    })
                    .collect(),
            ),
            allocated_addresses: tight(s.allocated_addresses),
            subject_alt_names: tight(s.subject_alt_names),
            resolution,
            scope,
            export_to,
            labels: s.labels.into_iter().collect(),
            selector: s.selector.into_iter().collect(),
        })
    }
}

fn health_to_pb(h: Health) -> pb::Health {
    match h {
        Health::Healthy => pb::Health::Healthy,
        Health::Unhealthy => pb::Health::Unhealthy,
    }
}

fn health_from_pb(h: pb::Health) -> Health {
    match h {
        pb::Health::Unhealthy => Health::Unhealthy,
        _ => Health::Healthy,
    }
}

fn identity_from_pb(field: &str, s: &str) -> Result<Option<SpiffeId>, ModelError> {
    if s.is_empty() {
        return Ok(None);
    }
    SpiffeId::parse(s)
        .map(Some)
        .map_err(|e| ModelError::Invalid {
            field: field.to_string(),
            why: e.to_string(),
        })
}

impl From<&Workload> for pb::Workload {
    fn from(w: &Workload) -> Self {
        Self {
            uid: w.uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            address: w.address.to_string(),
            network: w.network.clone(),
            cluster: w.cluster.clone(),
            locality: Some((&w.locality).into()),
            identity: w
                .identity
                .as_ref()
                .map(|i| i.to_string())
                .unwrap_or_default(),
            labels: w.labels.clone().into_iter().collect(),
            ports: w
                .ports
                .iter()
                .map(|(k, v)| (k.clone(), u32::from(*v)))
                .collect(),
            weight: w.weight,
            health: health_to_pb(w.health).into(),
            origin: match w.origin {
                Origin::Pod => pb::Origin::Pod,
                Origin::WorkloadEntry => pb::Origin::WorkloadEntry,
                Origin::Vm => pb::Origin::Vm,
            }
            .into(),
            last_confirmed_ms: w.last_confirmed_ms,
            stale_since_ms: w.stale_since_ms,
            services: w.services.clone(),
            service_account: w.service_account.clone(),
            tunnel_port: w.tunnel_port.into(),
        }
    }
}

impl TryFrom<pb::Workload> for Workload {
    type Error = ModelError;
    fn try_from(w: pb::Workload) -> Result<Self, ModelError> {
        let health = health_from_pb(w.health());
        let origin = match w.origin() {
            pb::Origin::Pod => Origin::Pod,
            pb::Origin::Vm => Origin::Vm,
            _ => Origin::WorkloadEntry,
        };
        let ports = w
            .ports
            .into_iter()
            .map(|(k, v)| Ok((k.clone(), port(format!("ports.{k}"), v)?)))
            .collect::<Result<_, ModelError>>()?;
        Ok(Workload {
            identity: identity_from_pb("identity", &w.identity)?,
            address: address_from_pb("address", &w.address)?,
            tunnel_port: port_or_zero("tunnel_port", w.tunnel_port)?,
            uid: w.uid,
            name: w.name,
            namespace: w.namespace,
            network: w.network,
            cluster: w.cluster,
            locality: w.locality.into(),
            labels: w.labels.into_iter().collect(),
            ports,
            weight: w.weight,
            health,
            origin,
            last_confirmed_ms: w.last_confirmed_ms,
            stale_since_ms: w.stale_since_ms,
            services: w.services,
            service_account: w.service_account,
        })
    }
}

impl From<&ProbeAction> for pb::probe::Action {
    fn from(a: &ProbeAction) -> Self {
        match a {
            ProbeAction::HttpGet {
                path,
                port,
                host,
                scheme,
                headers,
            } => pb::probe::Action::HttpGet(pb::HttpGet {
                path: path.clone(),
                port: (*port).into(),
                host: host.clone(),
                scheme: scheme.as_str().into(),
                http_headers: headers
                    .iter()
                    .map(|h| pb::HttpHeader {
                        name: h.name.clone(),
                        value: h.value.clone(),
                    })
                    .collect(),
            }),
            ProbeAction::TcpSocket { host, port } => pb::probe::Action::TcpSocket(pb::TcpSocket {
                host: host.clone(),
                port: (*port).into(),
            }),
            ProbeAction::Exec { command } => pb::probe::Action::Exec(pb::Exec {
                command: command.clone(),
            }),
            ProbeAction::Grpc { port, service } => pb::probe::Action::Grpc(pb::GrpcHealthCheck {
                port: (*port).into(),
                service: service.clone(),
            }),
        }
    }
}

impl From<&Probe> for pb::Probe {
    fn from(p: &Probe) -> Self {
        Self {
            initial_delay_seconds: p.initial_delay_seconds,
            period_seconds: p.period_seconds,
            timeout_seconds: p.timeout_seconds,
            success_threshold: p.success_threshold,
            failure_threshold: p.failure_threshold,
            action: Some((&p.action).into()),
        }
    }
}

impl TryFrom<pb::probe::Action> for ProbeAction {
    type Error = ModelError;
    fn try_from(a: pb::probe::Action) -> Result<Self, ModelError> {
        Ok(match a {
            pb::probe::Action::HttpGet(h) => ProbeAction::HttpGet {
                port: port("probe.httpGet.port", h.port)?,
                scheme: HttpScheme::parse(&h.scheme).ok_or_else(|| ModelError::Invalid {
                    field: "probe.httpGet.scheme".into(),
                    why: format!("{:?} is not HTTP or HTTPS", h.scheme),
                })?,
                path: h.path,
                host: h.host,
                headers: h
                    .http_headers
                    .into_iter()
                    .map(|h| HttpHeader {
                        name: h.name,
                        value: h.value,
                    })
                    .collect(),
            },
            pb::probe::Action::TcpSocket(t) => ProbeAction::TcpSocket {
                port: port("probe.tcpSocket.port", t.port)?,
                host: t.host,
            },
            pb::probe::Action::Exec(e) => ProbeAction::Exec { command: e.command },
            pb::probe::Action::Grpc(g) => ProbeAction::Grpc {
                port: port("probe.grpc.port", g.port)?,
                service: g.service,
            },
        })
    }
}

impl TryFrom<pb::Probe> for Probe {
    type Error = ModelError;
    fn try_from(p: pb::Probe) -> Result<Self, ModelError> {
        let action = p.action.ok_or_else(|| ModelError::Invalid {
            field: "probe".into(),
            why: "no httpGet, tcpSocket, exec or grpc".into(),
        })?;
        Ok(Probe {
            initial_delay_seconds: p.initial_delay_seconds,
            period_seconds: p.period_seconds,
            timeout_seconds: p.timeout_seconds,
            success_threshold: p.success_threshold,
            failure_threshold: p.failure_threshold,
            action: action.try_into()?,
        })
    }
}

impl From<&WorkloadGroup> for pb::WorkloadGroup {
    fn from(g: &WorkloadGroup) -> Self {
        Self {
            name: g.name.clone(),
            namespace: g.namespace.clone(),
            labels: g.labels.clone().into_iter().collect(),
            template: Some((&g.template).into()),
            probe: g.probe.as_ref().map(Into::into),
        }
    }
}

impl TryFrom<pb::WorkloadGroup> for WorkloadGroup {
    type Error = ModelError;
    fn try_from(g: pb::WorkloadGroup) -> Result<Self, ModelError> {
        Ok(WorkloadGroup {
            name: g.name,
            namespace: g.namespace,
            labels: g.labels.into_iter().collect(),
            template: g
                .template
                .map(Workload::try_from)
                .transpose()?
                .unwrap_or_default(),
            probe: g.probe.map(Probe::try_from).transpose()?,
        })
    }
}

impl From<&OwnedResource> for pb::CatalogResource {
    fn from(r: &OwnedResource) -> Self {
        use pb::catalog_resource::Kind;
        Self {
            origin: r.origin.clone(),
            kind: Some(match r.resource.as_ref() {
                Resource::Network(n) => Kind::Network(n.into()),
                Resource::Service(s) => Kind::Service(s.into()),
                Resource::Workload(w) => Kind::Workload(w.into()),
                Resource::WorkloadGroup(g) => Kind::WorkloadGroup(g.as_ref().into()),
                Resource::DestinationRule(d) => Kind::DestinationRule(d.as_ref().into()),
                Resource::VirtualService(v) => Kind::VirtualService(v.as_ref().into()),
            }),
        }
    }
}

impl TryFrom<pb::CatalogResource> for OwnedResource {
    type Error = ModelError;
    fn try_from(r: pb::CatalogResource) -> Result<Self, ModelError> {
        use pb::catalog_resource::Kind;
        let resource = match r.kind.ok_or(ModelError::MissingKind)? {
            Kind::Network(n) => Resource::Network(n.try_into()?),
            Kind::Service(s) => Resource::Service(s.try_into()?),
            Kind::Workload(w) => Resource::Workload(w.try_into()?),
            Kind::WorkloadGroup(g) => Resource::WorkloadGroup(Box::new(g.try_into()?)),
            Kind::DestinationRule(d) => Resource::DestinationRule(Box::new(d.try_into()?)),
            Kind::VirtualService(v) => Resource::VirtualService(Box::new(v.try_into()?)),
        };
        Ok(OwnedResource::new(r.origin, resource))
    }
}

impl From<&Node> for pb::Node {
    fn from(n: &Node) -> Self {
        Self {
            id: n.id.clone(),
            kind: match n.kind {
                NodeKind::Workload => pb::NodeKind::Workload,
                NodeKind::Gateway => pb::NodeKind::Gateway,
                NodeKind::Dns => pb::NodeKind::Dns,
                NodeKind::Vm => pb::NodeKind::Vm,
                NodeKind::Ctl => pb::NodeKind::Ctl,
                NodeKind::Peer => pb::NodeKind::Peer,
            }
            .into(),
            network: n.network.clone(),
            cluster: n.cluster.clone(),
            locality: Some((&n.locality).into()),
        }
    }
}

impl TryFrom<pb::Node> for Node {
    type Error = ModelError;
    fn try_from(n: pb::Node) -> Result<Self, ModelError> {
        let kind =
            match n.kind() {
                pb::NodeKind::Workload => NodeKind::Workload,
                pb::NodeKind::Gateway => NodeKind::Gateway,
                pb::NodeKind::Dns => NodeKind::Dns,
                pb::NodeKind::Vm => NodeKind::Vm,
                pb::NodeKind::Ctl => NodeKind::Ctl,
                pb::NodeKind::Peer => NodeKind::Peer,
                pb::NodeKind::Unspecified => return Err(ModelError::Invalid {
                    field: "node.kind".into(),
                    why:
                        "a subscriber must name its kind (workload, gateway, dns, vm, ctl or peer)"
                            .into(),
                }),
            };
        if n.network.is_empty() {
            return Err(ModelError::Invalid {
                field: "node.network".into(),
                why: "a subscriber must name its network".into(),
            });
        }
        Ok(Node {
            id: n.id,
            kind,
            network: n.network,
            cluster: n.cluster,
            locality: n.locality.into(),
        })
    }
}

impl From<&ViewEndpoint> for pb::ViewEndpoint {
    fn from(e: &ViewEndpoint) -> Self {
        Self {
            kind: match e.kind {
                EndpointKind::Workload => pb::EndpointKind::Workload,
                EndpointKind::Gateway => pb::EndpointKind::Gateway,
            }
            .into(),
            address: e.address.to_string(),
            ports: e
                .ports
                .iter()
                .map(|(k, v)| (u32::from(*k), u32::from(*v)))
                .collect(),
            network: e.network.clone(),
            cluster: e.cluster.clone(),
            locality: Some((&e.locality).into()),
            identities: e.identities.iter().map(|i| i.to_string()).collect(),
            weight: e.weight,
            health: health_to_pb(e.health).into(),
            labels: e.labels.clone().into_iter().collect(),
            uid: e.uid.clone(),
            tunnel_port: e.tunnel_port.into(),
            subset_weights: e
                .subset_weights
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            stale_since_ms: e.stale_since_ms,
        }
    }
}

/// `v` without spare capacity. A vector decoded from protobuf grew by doubling, and one
/// converted from it in place (`into_iter().map(..).collect()` reuses the allocation) keeps
/// that capacity for as long as the catalog holds it: for a service with one endpoint, room
/// for four.
fn tight<T>(mut v: Vec<T>) -> Vec<T> {
    v.shrink_to_fit();
    v
}

impl TryFrom<pb::ViewEndpoint> for ViewEndpoint {
    type Error = ModelError;
    fn try_from(e: pb::ViewEndpoint) -> Result<Self, ModelError> {
        let kind = match e.kind() {
            pb::EndpointKind::Gateway => EndpointKind::Gateway,
            _ => EndpointKind::Workload,
        };
        let health = health_from_pb(e.health());
        let ports = e
            .ports
            .iter()
            .map(|(k, v)| Ok((port("ports", *k)?, port("ports", *v)?)))
            .collect::<Result<_, ModelError>>()?;
        let identities = e
            .identities
            .iter()
            .map(|i| {
                SpiffeId::parse(i).map_err(|err| ModelError::Invalid {
                    field: "identities".into(),
                    why: err.to_string(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(ViewEndpoint {
            kind,
            address: address_from_pb("address", &e.address)?,
            ports,
            network: e.network,
            cluster: e.cluster,
            locality: e.locality.into(),
            identities,
            weight: e.weight,
            health,
            labels: e.labels.into_iter().collect(),
            uid: e.uid,
            tunnel_port: port_or_zero("tunnel_port", e.tunnel_port)?,
            stale_since_ms: e.stale_since_ms,
            subset_weights: e.subset_weights.into_iter().collect(),
        })
    }
}

impl From<&ServiceView> for pb::ServiceView {
    fn from(v: &ServiceView) -> Self {
        Self {
            service: Some((&v.service).into()),
            endpoints: v.endpoints.iter().map(Into::into).collect(),
            subsets: v.subsets.iter().map(Into::into).collect(),
            routes: v.routes.iter().map(Into::into).collect(),
            policy: (!v.policy.is_empty()).then(|| (&*v.policy).into()),
        }
    }
}

impl From<&ViewResource> for pb::ViewResource {
    fn from(r: &ViewResource) -> Self {
        use pb::view_resource::Resource as R;
        Self {
            key: r.key(),
            resource: Some(match r {
                ViewResource::Service(s) => R::Service(s.as_ref().into()),
                ViewResource::Network(n) => R::Network(n.as_ref().into()),
            }),
        }
    }
}

impl TryFrom<pb::ViewResource> for ViewResource {
    type Error = ModelError;
    fn try_from(r: pb::ViewResource) -> Result<Self, ModelError> {
        use pb::view_resource::Resource as R;
        Ok(match r.resource.ok_or(ModelError::MissingKind)? {
            R::Service(s) => ViewResource::Service(Arc::new(ServiceView {
                service: s.service.ok_or(ModelError::MissingKind)?.try_into()?,
                endpoints: tight(
                    s.endpoints
                        .into_iter()
                        .map(TryInto::try_into)
                        .collect::<Result<_, _>>()?,
                ),
                subsets: s
                    .subsets
                    .into_iter()
                    .map(TryInto::try_into)
                    .collect::<Result<_, _>>()?,
                policy: s
                    .policy
                    .map(TryInto::<TrafficPolicy>::try_into)
                    .transpose()?
                    .unwrap_or_default()
                    .into(),
                routes: s
                    .routes
                    .into_iter()
                    .map(TryInto::try_into)
                    .collect::<Result<_, _>>()?,
            })),
            R::Network(n) => ViewResource::Network(Arc::new(n.try_into()?)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_allocated_addresses_round_trip_through_protobuf() {
        let s = Service {
            hostname: "web.shop.svc.cluster.local".into(),
            allocated_addresses: vec!["240.240.1.2".into(), "2001:2::1:2".into()],
            ..Default::default()
        };
        let p = pb::Service::from(&s);
        assert_eq!(p.allocated_addresses, s.allocated_addresses);
        assert_eq!(Service::try_from(p).unwrap(), s);
    }

    #[test]
    fn export_to_round_trips_through_protobuf_and_reads_istio_forms() {
        let shop = |e: ExportTo| Service {
            hostname: "db.example.com".into(),
            namespace: "shop".into(),
            export_to: e,
            ..Default::default()
        };
        let names = |n: &[&str]| ExportTo::Namespaces(n.iter().map(|s| s.to_string()).collect());
        for e in [ExportTo::Public, ExportTo::Nobody, names(&["shop", "web"])] {
            let s = shop(e);
            assert_eq!(Service::try_from(pb::Service::from(&s)).unwrap(), s);
        }
        // A definition from before visibility existed is visible everywhere, and its bytes
        // are unchanged (no field written), so stored catalogs and view digests stay valid.
        assert!(pb::Service::from(&shop(ExportTo::Public))
            .export_to
            .is_empty());
        let wire = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(ExportTo::from_wire(&wire(&["*"]), "shop"), ExportTo::Public);
        assert_eq!(ExportTo::from_wire(&wire(&["~"]), "shop"), ExportTo::Nobody);
        assert_eq!(
            ExportTo::from_wire(&wire(&[".", "web"]), "shop"),
            names(&["shop", "web"])
        );
        let private = names(&["shop"]);
        assert!(private.visible_to("shop") && !private.visible_to("web"));
        assert!(!ExportTo::Nobody.visible_to("shop"));
        assert_eq!(private.union(&ExportTo::Nobody), private);
        assert_eq!(private.union(&names(&["web"])), names(&["shop", "web"]));
        assert_eq!(private.union(&ExportTo::Public), ExportTo::Public);
    }

    #[test]
    fn export_to_is_validated_as_istio_does() {
        let parse = |v: &[&str]| {
            ExportTo::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "shop")
        };
        let names = |n: &[&str]| ExportTo::Namespaces(n.iter().map(|s| s.to_string()).collect());
        assert_eq!(parse(&[]).unwrap(), ExportTo::Public);
        assert_eq!(parse(&["*"]).unwrap(), ExportTo::Public);
        assert_eq!(parse(&["~"]).unwrap(), ExportTo::Nobody);
        assert_eq!(parse(&["."]).unwrap(), names(&["shop"]));
        assert_eq!(parse(&[".", "web"]).unwrap(), names(&["shop", "web"]));
        let refused = |v: &[&str]| -> Vec<(Option<usize>, String)> {
            parse(v)
                .unwrap_err()
                .into_iter()
                .map(|p| (p.index, p.why))
                .collect()
        };
        let one = |v: &[&str], index: Option<usize>, needle: &str| {
            let got = refused(v);
            assert!(
                got.iter()
                    .any(|(i, why)| *i == index && why.contains(needle)),
                "{v:?}: {got:?}"
            );
        };
        one(&["web", "web"], Some(1), "listed twice");
        one(&[".", "shop"], Some(1), "same entry");
        one(&["shop", "."], Some(1), "same entry");
        one(&["*", "web"], None, "\"*\"");
        one(&["~", "web"], None, "\"~\"");
        one(&["~", "*"], None, "\"~\"");
        one(&["Not_A_Label"], Some(0), "namespace");
        one(&["a.b"], Some(0), "namespace");
        assert_eq!(refused(&["web", "x y"]).len(), 1);
    }

    #[test]
    fn same_hostname_in_two_namespaces_has_two_catalog_keys() {
        let def = |ns: &str| {
            Resource::Service(Service {
                hostname: "db.example.com".into(),
                namespace: ns.into(),
                cluster: "c1".into(),
                ..Default::default()
            })
        };
        assert_eq!(def("shop").key(), "Service/c1/shop/db.example.com/");
        assert_ne!(def("shop").key(), def("web").key());
    }

    #[test]
    fn workload_round_trips_through_protobuf() {
        let w = Workload {
            uid: "u1".into(),
            name: "web-1".into(),
            namespace: "shop".into(),
            address: Address::Ip("10.0.0.1".parse().unwrap()),
            network: "net-a".into(),
            cluster: "c1".into(),
            locality: Locality::parse("eu/eu-1a"),
            identity: Some(SpiffeId::parse("spiffe://td/ns/shop/sa/web").unwrap()),
            labels: [("app".to_string(), "web".to_string())].into(),
            ports: [("http".to_string(), 8080)].into(),
            weight: 2,
            health: Health::Unhealthy,
            origin: Origin::Vm,
            last_confirmed_ms: 42,
            services: vec!["web.shop.svc.cluster.local".into()],
            service_account: "web".into(),
            stale_since_ms: 7,
            tunnel_port: 15008,
        };
        let back = Workload::try_from(pb::Workload::from(&w)).unwrap();
        assert_eq!(back, w);
        assert_eq!(w.locality.to_string(), "eu/eu-1a");
        // A tunnel port that is no port is refused with its field named.
        let mut bad = pb::Workload::from(&w);
        bad.tunnel_port = 70000;
        let err = Workload::try_from(bad).unwrap_err().to_string();
        assert!(err.starts_with("tunnel_port: "), "{err}");
    }

    #[test]
    fn addresses_are_parsed_once_at_the_edge() {
        assert_eq!(Address::parse("").unwrap(), Address::None);
        assert_eq!(
            Address::parse("fd00::7").unwrap(),
            Address::Ip("fd00::7".parse().unwrap())
        );
        assert_eq!(
            Address::parse("DB.Example.com").unwrap(),
            Address::Dns("db.example.com".into())
        );
        assert_eq!(
            Address::parse("10.0.0.1").unwrap().ip(),
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(Address::Dns("db.example.com".into()).ip(), None);
        for bad in ["10.0.0.1:80", "a b", "-x.example.com", "x..y", "10.0.0.1\n"] {
            let err = Address::parse(bad).unwrap_err();
            assert!(
                err.contains("neither an IP address nor a DNS name"),
                "{bad}: {err}"
            );
        }
        // A bad address from the wire is refused with its field named, never dropped later.
        let mut w = pb::Workload::from(&Workload::default());
        w.address = "not an address".into();
        let err = Workload::try_from(w).unwrap_err().to_string();
        assert!(err.starts_with("address: "), "{err}");
        let mut n = pb::Network {
            id: "net-a".into(),
            gateways: vec![pb::Gateway {
                address: "gw.example.com".into(),
                sni_port: 15443,
                ..Default::default()
            }],
            cidrs: vec![],
        };
        let err = Network::try_from(n.clone()).unwrap_err().to_string();
        assert!(
            err.contains("gateways[0].address") && err.contains("not an IP address"),
            "{err}"
        );
        n.gateways[0].address = "198.18.0.10".into();
        assert_eq!(
            Network::try_from(n).unwrap().gateways[0].address,
            "198.18.0.10".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn bad_port_from_the_wire_is_named() {
        let mut p = pb::Service::from(&Service::default());
        p.ports.push(pb::ServicePort {
            name: "http".into(),
            number: 70000,
            protocol: "HTTP".into(),
            target_port: 0,
        });
        let err = Service::try_from(p).unwrap_err().to_string();
        assert!(
            err.contains("ports[0].number") && err.contains("70000"),
            "{err}"
        );
    }

    #[test]
    fn every_probe_action_round_trips_through_protobuf() {
        let actions = [
            ProbeAction::HttpGet {
                path: "/ready?full=1".into(),
                port: 8443,
                host: "app.internal".into(),
                scheme: HttpScheme::Https,
                headers: vec![HttpHeader {
                    name: "Host".into(),
                    value: "web.example.com".into(),
                }],
            },
            ProbeAction::TcpSocket {
                host: String::new(),
                port: 3306,
            },
            ProbeAction::Exec {
                command: vec!["/bin/check".into(), "--quick".into()],
            },
            ProbeAction::Grpc {
                port: 9090,
                service: "shop.Cart".into(),
            },
        ];
        for action in actions {
            let p = Probe {
                initial_delay_seconds: 0,
                period_seconds: 10,
                timeout_seconds: 1,
                success_threshold: 1,
                failure_threshold: 3,
                action,
            };
            assert_eq!(Probe::try_from(pb::Probe::from(&p)).unwrap(), p);
        }
        // A scheme Istio would refuse is refused from the wire too, naming the field.
        let mut wire = pb::HttpGet {
            port: 80,
            scheme: "https".into(),
            ..Default::default()
        };
        let err = ProbeAction::try_from(pb::probe::Action::HttpGet(wire.clone())).unwrap_err();
        assert!(err.to_string().contains("probe.httpGet.scheme"), "{err}");
        wire.scheme = String::new();
        assert!(matches!(
            ProbeAction::try_from(pb::probe::Action::HttpGet(wire)),
            Ok(ProbeAction::HttpGet {
                scheme: HttpScheme::Http,
                ..
            })
        ));
    }
}
