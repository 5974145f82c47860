//! Manifests: YAML documents in Istio's shape (`ServiceEntry`, `WorkloadEntry`,
//! `WorkloadGroup`) and the isthmus `Network` kind, turned into catalog resources.
//!
//! Reading happens in two passes per document. The first is structural: serde with
//! `deny_unknown_fields`, through `serde_path_to_error` so every type error and unknown field
//! names its path. The second checks values (ports, names, labels, addresses, Istio's rules
//! across fields) and converts. Both passes report everything they find; the second runs only
//! on documents whose structure is sound, because values guessed around a structural error
//! produce follow-on errors that point the operator at the wrong line.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use isthmus_proto::identity::{validate_dns_label, SpiffeId};
use isthmus_proto::model::{
    Gateway, Health, Locality, Network, Origin, Probe, ProbeAction, Resolution, Resource, Scope,
    Service, ServiceAddress, ServicePort, Workload, WorkloadGroup,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_path_to_error::Segment;
use serde_yaml_ng::Value;

use super::{ResourceError, SourceDefaults};

/// Istio's API versions for its networking kinds; a manifest ports over unchanged.
const ISTIO_API_VERSIONS: &[&str] = &[
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];
/// isthmus' own API version, accepted for every kind.
const ISTHMUS_API_VERSION: &str = "isthmus.io/v1alpha1";

/// Kubernetes puts an object without a namespace in `default`; so do we.
const DEFAULT_NAMESPACE: &str = "default";
/// Kubernetes runs a pod without a service account as `default`; so do we.
const DEFAULT_SERVICE_ACCOUNT: &str = "default";
const DEFAULT_WEIGHT: u32 = 1;
/// Istio's east-west gateway port for AUTO_PASSTHROUGH.
const DEFAULT_SNI_PORT: u16 = 15443;
/// Istio's HBONE port, which our tunnel takes over.
const DEFAULT_TUNNEL_PORT: u16 = 15008;
const DEFAULT_PROBE_PERIOD_SECONDS: u32 = 5;
const DEFAULT_PROBE_TIMEOUT_SECONDS: u32 = 1;
const DEFAULT_PROBE_SUCCESS_THRESHOLD: u32 = 1;
const DEFAULT_PROBE_FAILURE_THRESHOLD: u32 = 3;
const DEFAULT_PROBE_PATH: &str = "/";

/// Istio's port protocols that isthmus knows how to route.
const PROTOCOLS: &[&str] = &[
    "HTTP", "HTTPS", "HTTP2", "GRPC", "TCP", "TLS", "MONGO", "REDIS", "MYSQL",
];

const LABEL_NETWORK: &str = "topology.istio.io/network";
const LABEL_REGION: &str = "topology.kubernetes.io/region";
const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
const LABEL_SUBZONE: &str = "topology.istio.io/subzone";

/// How many structural errors one section may report before we stop looking; each one costs a
/// re-run of the deserializer, and an operator will not read more than this at once.
const MAX_STRUCTURE_ERRORS: usize = 32;

/// A resource and where it was defined, so a later conflict can point at the definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Located {
    /// Shared with the effective set and the catalog.
    pub resource: Arc<Resource>,
    /// `None` for resources that came from the store rather than from a file.
    pub document: Option<usize>,
    pub field: String,
}

/// Parses every document of one file. Stops at the first YAML syntax error: after one, the
/// parser's idea of where the next document starts cannot be trusted (and serde_yaml_ng can
/// panic when asked to continue).
pub(crate) fn parse(
    path: &Path,
    text: &str,
    defaults: &SourceDefaults,
) -> Result<Vec<Located>, Vec<ResourceError>> {
    let mut problems = Problems {
        file: path.to_path_buf(),
        document: None,
        errors: Vec::new(),
    };
    let mut out: Vec<Located> = Vec::new();
    let mut seen: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for (i, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let number = i + 1;
        problems.document = Some(number);
        let value = match Value::deserialize(document) {
            Ok(v) => v,
            Err(e) => {
                let mut message = format!("invalid YAML: {e}");
                // Some errors (duplicate keys) know their line but do not print it.
                if let (Some(at), false) = (e.location(), message.contains(" at line ")) {
                    message += &format!(" at line {} column {}", at.line(), at.column());
                }
                problems.add("", message);
                break;
            }
        };
        for (resource, field) in parse_document(value, defaults, &mut problems) {
            let key = resource.key();
            if let Some((first_doc, first_field)) = seen.get(&key) {
                problems.add(
                    field,
                    format!("{key} is already defined in document {first_doc} ({first_field})"),
                );
                continue;
            }
            seen.insert(key, (number, field.clone()));
            out.push(Located {
                resource: Arc::new(resource),
                document: Some(number),
                field,
            });
        }
    }
    if problems.errors.is_empty() {
        Ok(out)
    } else {
        Err(problems.errors)
    }
}

/// Collects every problem of one file.
struct Problems {
    file: PathBuf,
    document: Option<usize>,
    errors: Vec<ResourceError>,
}

impl Problems {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ResourceError {
            file: self.file.clone(),
            document: self.document,
            field: field.into(),
            message: message.into(),
        });
    }

    fn check(&mut self, field: impl Into<String>, result: Result<(), String>) -> bool {
        match result {
            Ok(()) => true,
            Err(message) => {
                self.add(field, message);
                false
            }
        }
    }
}

// ---- documents and kinds -------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ServiceEntry,
    WorkloadEntry,
    WorkloadGroup,
    Network,
}

impl Kind {
    const ALL: [Kind; 4] = [
        Kind::ServiceEntry,
        Kind::WorkloadEntry,
        Kind::WorkloadGroup,
        Kind::Network,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::ServiceEntry => "ServiceEntry",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::WorkloadGroup => "WorkloadGroup",
            Kind::Network => "Network",
        }
    }

    fn accepts(self, api_version: &str) -> bool {
        api_version == ISTHMUS_API_VERSION
            || (self != Kind::Network && ISTIO_API_VERSIONS.contains(&api_version))
    }

    fn api_versions(self) -> String {
        if self == Kind::Network {
            ISTHMUS_API_VERSION.to_string()
        } else {
            format!(
                "{}, or {ISTHMUS_API_VERSION}",
                ISTIO_API_VERSIONS.join(", ")
            )
        }
    }
}

fn kind_names() -> String {
    Kind::ALL.map(Kind::name).join(", ")
}

/// One document: its envelope is checked by hand (so a wrong `kind` does not hide a wrong
/// `metadata`), then `metadata` and `spec` go through serde separately.
fn parse_document(
    mut value: Value,
    defaults: &SourceDefaults,
    p: &mut Problems,
) -> Vec<(Resource, String)> {
    if value.is_null() {
        return Vec::new();
    }
    if let Err(e) = value.apply_merge() {
        p.add("", format!("invalid YAML merge key (<<): {e}"));
        return Vec::new();
    }
    let Value::Mapping(map) = value else {
        p.add(
            "",
            format!(
                "a resource is a mapping with apiVersion, kind, metadata and spec; found {}",
                describe(&value)
            ),
        );
        return Vec::new();
    };
    let before = p.errors.len();
    let (mut api_version, mut kind, mut metadata, mut spec) = (None, None, None, None);
    for (key, v) in map {
        match key.as_str() {
            Some("apiVersion") => api_version = Some(v),
            Some("kind") => kind = Some(v),
            Some("metadata") => metadata = Some(v),
            Some("spec") => spec = Some(v),
            Some(other) => p.add(
                other,
                "unknown field; a resource has only apiVersion, kind, metadata and spec",
            ),
            None => p.add("", format!("unknown field {}", describe(&key))),
        }
    }

    let kind = match kind {
        None | Some(Value::Null) => {
            p.add("kind", format!("is required (one of {})", kind_names()));
            None
        }
        Some(Value::String(k)) => match Kind::ALL.into_iter().find(|c| c.name() == k) {
            Some(kind) => Some(kind),
            None => {
                p.add(
                    "kind",
                    format!(
                        "{k:?} is not a kind this source reads; use one of {}",
                        kind_names()
                    ),
                );
                None
            }
        },
        Some(other) => {
            p.add(
                "kind",
                format!("must be a string; found {}", describe(&other)),
            );
            None
        }
    };
    match (api_version, kind) {
        (None | Some(Value::Null), _) => p.add("apiVersion", "is required"),
        (Some(Value::String(v)), Some(kind)) if !kind.accepts(&v) => p.add(
            "apiVersion",
            format!(
                "{v:?} is not an API version of {}; use {}",
                kind.name(),
                kind.api_versions()
            ),
        ),
        (Some(Value::String(_)), _) => {}
        (Some(other), _) => p.add(
            "apiVersion",
            format!("must be a string; found {}", describe(&other)),
        ),
    }
    let Some(kind) = kind else {
        return Vec::new();
    };

    let structure_before = p.errors.len();
    let metadata: Option<RawMetadata> = section(p, "metadata", metadata, false);
    let required = kind != Kind::Network;
    let built = match kind {
        Kind::ServiceEntry => {
            section::<ServiceEntrySpec>(p, "spec", spec, required).map(Spec::ServiceEntry)
        }
        Kind::WorkloadEntry => {
            section::<WorkloadEntrySpec>(p, "spec", spec, required).map(Spec::WorkloadEntry)
        }
        Kind::WorkloadGroup => {
            section::<WorkloadGroupSpec>(p, "spec", spec, required).map(Spec::WorkloadGroup)
        }
        Kind::Network => section::<NetworkSpec>(p, "spec", spec, required).map(Spec::Network),
    };
    let (Some(metadata), Some(spec)) = (metadata, built) else {
        return Vec::new();
    };
    if p.errors.len() > structure_before {
        return Vec::new();
    }

    let meta = check_metadata(kind, metadata, p);
    let resources = match spec {
        Spec::ServiceEntry(spec) => service_entry(&meta, spec, defaults, p),
        Spec::WorkloadEntry(spec) => workload_entry(&meta, spec, defaults, p),
        Spec::WorkloadGroup(spec) => workload_group(&meta, spec, defaults, p),
        Spec::Network(spec) => network(&meta, spec, p),
    };
    if p.errors.len() > before {
        // Resources built around an error would only produce duplicate-key noise.
        return Vec::new();
    }
    resources
}

enum Spec {
    ServiceEntry(ServiceEntrySpec),
    WorkloadEntry(WorkloadEntrySpec),
    WorkloadGroup(WorkloadGroupSpec),
    Network(NetworkSpec),
}

/// Deserializes one section, reporting every structural error in it rather than the first:
/// after each error the offending key is removed and the section deserialized again. Every
/// field of the section types is optional, so removing one never causes another error.
fn section<T: DeserializeOwned + Default>(
    p: &mut Problems,
    name: &str,
    value: Option<Value>,
    required: bool,
) -> Option<T> {
    let mut value = match value {
        None | Some(Value::Null) if required => {
            p.add(name, "is required");
            return None;
        }
        None | Some(Value::Null) => return Some(T::default()),
        Some(v) => v,
    };
    let mut failed = false;
    for _ in 0..MAX_STRUCTURE_ERRORS {
        match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(t) => return (!failed).then_some(t),
            Err(e) => {
                failed = true;
                let path = e.path().to_string();
                let field = if path == "." {
                    name.to_string()
                } else {
                    format!("{name}.{path}")
                };
                p.add(field, e.inner().to_string());
                if !remove_at(&mut value, e.path()) {
                    return None;
                }
            }
        }
    }
    None
}

/// Removes the deepest mapping key on `path`, so the next attempt gets past this error.
fn remove_at(root: &mut Value, path: &serde_path_to_error::Path) -> bool {
    let segments: Vec<&Segment> = path.iter().collect();
    let Some(last_key) = segments
        .iter()
        .rposition(|s| matches!(s, Segment::Map { .. }))
    else {
        return false;
    };
    let mut node = root;
    for segment in &segments[..last_key] {
        let next = match segment {
            Segment::Map { key } => node.get_mut(key.as_str()),
            Segment::Seq { index } => node.get_mut(*index),
            _ => None,
        };
        match next {
            Some(n) => node = n,
            None => return false,
        }
    }
    let Segment::Map { key } = segments[last_key] else {
        return false;
    };
    match node.as_mapping_mut() {
        Some(map) => map.remove(key.as_str()).is_some(),
        None => false,
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

/// Lets `labels:` with nothing after it mean "no labels", as kubectl does.
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

// ---- wire shapes (Istio's field names) -----------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RawMetadata {
    name: Option<String>,
    namespace: Option<String>,
    #[serde(deserialize_with = "nullable")]
    labels: BTreeMap<String, String>,
    /// Accepted so Kubernetes manifests port over; nothing reads them.
    #[serde(deserialize_with = "nullable")]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct ServiceEntrySpec {
    #[serde(deserialize_with = "nullable")]
    hosts: Vec<String>,
    #[serde(deserialize_with = "nullable")]
    addresses: Vec<String>,
    #[serde(deserialize_with = "nullable")]
    ports: Vec<PortSpec>,
    /// MESH_INTERNAL or MESH_EXTERNAL; checked, not modelled (every service gets mTLS).
    location: Option<String>,
    resolution: Option<String>,
    #[serde(deserialize_with = "nullable")]
    endpoints: Vec<WorkloadEntrySpec>,
    workload_selector: Option<WorkloadSelectorSpec>,
    #[serde(deserialize_with = "nullable")]
    export_to: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct PortSpec {
    number: Option<u32>,
    protocol: Option<String>,
    name: Option<String>,
    target_port: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct WorkloadSelectorSpec {
    #[serde(deserialize_with = "nullable")]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct WorkloadEntrySpec {
    address: Option<String>,
    #[serde(deserialize_with = "nullable")]
    ports: BTreeMap<String, u32>,
    #[serde(deserialize_with = "nullable")]
    labels: BTreeMap<String, String>,
    network: Option<String>,
    locality: Option<String>,
    weight: Option<u32>,
    service_account: Option<String>,
}

/// A WorkloadEntry without `address`: a VM brings its own when it registers.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct WorkloadTemplateSpec {
    #[serde(deserialize_with = "nullable")]
    ports: BTreeMap<String, u32>,
    #[serde(deserialize_with = "nullable")]
    labels: BTreeMap<String, String>,
    network: Option<String>,
    locality: Option<String>,
    weight: Option<u32>,
    service_account: Option<String>,
}

impl From<WorkloadTemplateSpec> for WorkloadEntrySpec {
    fn from(t: WorkloadTemplateSpec) -> Self {
        Self {
            address: None,
            ports: t.ports,
            labels: t.labels,
            network: t.network,
            locality: t.locality,
            weight: t.weight,
            service_account: t.service_account,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct WorkloadGroupSpec {
    metadata: Option<GroupMetadataSpec>,
    template: Option<WorkloadTemplateSpec>,
    probe: Option<ProbeSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct GroupMetadataSpec {
    #[serde(deserialize_with = "nullable")]
    labels: BTreeMap<String, String>,
    #[serde(deserialize_with = "nullable")]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct ProbeSpec {
    initial_delay_seconds: Option<u32>,
    period_seconds: Option<u32>,
    timeout_seconds: Option<u32>,
    success_threshold: Option<u32>,
    failure_threshold: Option<u32>,
    http_get: Option<HttpGetSpec>,
    tcp_socket: Option<TcpSocketSpec>,
    exec: Option<ExecSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct HttpGetSpec {
    path: Option<String>,
    port: Option<u32>,
    host: Option<String>,
    scheme: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct TcpSocketSpec {
    host: Option<String>,
    port: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct ExecSpec {
    #[serde(deserialize_with = "nullable")]
    command: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct NetworkSpec {
    #[serde(deserialize_with = "nullable")]
    gateways: Vec<GatewaySpec>,
    #[serde(deserialize_with = "nullable")]
    cidrs: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct GatewaySpec {
    address: Option<String>,
    sni_port: Option<u32>,
    tunnel_port: Option<u32>,
    locality: Option<String>,
}

// ---- conversion ----------------------------------------------------------------------------

/// Checked metadata. Values that failed their check are kept (so later checks still run) but
/// flagged where a later check would otherwise repeat the same complaint.
struct Meta {
    name: String,
    namespace: String,
    namespace_ok: bool,
    labels: BTreeMap<String, String>,
}

fn check_metadata(kind: Kind, raw: RawMetadata, p: &mut Problems) -> Meta {
    let name = match raw.name.filter(|n| !n.is_empty()) {
        None => {
            p.add("metadata.name", "is required");
            String::new()
        }
        Some(name) => {
            let checked = if kind == Kind::Network {
                check_network_id(&name)
            } else {
                check_dns_name("name", &name, false)
            };
            p.check("metadata.name", checked);
            name
        }
    };
    let (namespace, namespace_ok) = if kind == Kind::Network {
        if let Some(ns) = raw.namespace {
            p.add(
                "metadata.namespace",
                format!("{ns:?}: a Network belongs to no namespace; remove metadata.namespace"),
            );
        }
        (String::new(), true)
    } else {
        // Kubernetes reads an empty namespace as the default one.
        let ns = raw
            .namespace
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
        let ok = p.check("metadata.namespace", dns_label("namespace", &ns));
        (ns, ok)
    };
    check_labels(p, "metadata.labels", &raw.labels);
    for key in raw.annotations.keys() {
        p.check(format!("metadata.annotations.{key}"), check_label_key(key));
    }
    Meta {
        name,
        namespace,
        namespace_ok,
        labels: raw.labels,
    }
}

fn service_entry(
    meta: &Meta,
    spec: ServiceEntrySpec,
    d: &SourceDefaults,
    p: &mut Problems,
) -> Vec<(Resource, String)> {
    let mut hosts: Vec<(String, String)> = Vec::new();
    if spec.hosts.is_empty() {
        p.add("spec.hosts", "at least one host is required");
    }
    for (i, host) in spec.hosts.iter().enumerate() {
        let field = format!("spec.hosts[{i}]");
        if !p.check(&field, check_hostname(host, true)) {
            continue;
        }
        if hosts.iter().any(|(h, _)| h == host) {
            p.add(field, format!("{host:?} is listed twice"));
            continue;
        }
        hosts.push((host.clone(), field));
    }

    let mut addresses = Vec::new();
    for (i, a) in spec.addresses.iter().enumerate() {
        match parse_ip_or_cidr(a) {
            Ok(address) => addresses.push(ServiceAddress {
                cluster: String::new(),
                address,
            }),
            Err(m) => p.add(format!("spec.addresses[{i}]"), m),
        }
    }

    let ports = service_ports(&spec.ports, p);

    let has_selector = spec.workload_selector.is_some();
    let resolution = match spec.resolution.as_deref() {
        // Istio's default is NONE, which would make the endpoints the manifest lists
        // unreachable; an entry that names its endpoints means them to be used.
        None if !spec.endpoints.is_empty() || has_selector => Resolution::Static,
        None | Some("NONE") => Resolution::None,
        Some("STATIC") => Resolution::Static,
        Some("DNS" | "DNS_ROUND_ROBIN") => Resolution::Dns,
        Some(other) => {
            p.add(
                "spec.resolution",
                format!("{other:?} is not a resolution; use NONE, STATIC, DNS or DNS_ROUND_ROBIN"),
            );
            Resolution::Static
        }
    };

    if let Some(location) = &spec.location {
        if location != "MESH_INTERNAL" && location != "MESH_EXTERNAL" {
            p.add(
                "spec.location",
                format!("{location:?} is not a location; use MESH_INTERNAL or MESH_EXTERNAL"),
            );
        }
    }

    let mut selector = BTreeMap::new();
    if let Some(ws) = spec.workload_selector {
        if ws.labels.is_empty() {
            // An empty selector would silently select nothing (or, read Kubernetes' way,
            // everything in the namespace): refuse the ambiguity.
            p.add(
                "spec.workloadSelector.labels",
                "at least one label is required",
            );
        }
        check_labels(p, "spec.workloadSelector.labels", &ws.labels);
        selector = ws.labels;
    }

    if has_selector && !spec.endpoints.is_empty() {
        p.add(
            "spec.endpoints",
            "a ServiceEntry has either endpoints or a workloadSelector, not both (Istio forbids it); \
             move the endpoints into WorkloadEntries with the selector's labels, or drop the selector",
        );
    }
    if resolution == Resolution::None && !spec.endpoints.is_empty() {
        p.add(
            "spec.resolution",
            "resolution NONE takes no endpoints; use STATIC for IP endpoints or DNS for hostnames",
        );
    }
    if resolution == Resolution::Dns && spec.endpoints.is_empty() && !has_selector {
        for (host, field) in &hosts {
            if host.starts_with("*.") {
                p.add(
                    field.clone(),
                    format!("{host:?}: a wildcard host cannot be resolved with DNS when there are no endpoints"),
                );
            }
        }
    }

    let mut scope = Scope::Mesh;
    for (i, e) in spec.export_to.iter().enumerate() {
        if e != "." && e != "*" {
            p.check(format!("spec.exportTo[{i}]"), dns_label("namespace", e));
        }
    }
    if !spec.export_to.is_empty() && spec.export_to.iter().all(|e| e == ".") {
        scope = Scope::ClusterLocal;
    }

    let host_names: Vec<String> = hosts.iter().map(|(h, _)| h.clone()).collect();
    let port_names: BTreeSet<&str> = ports.iter().map(|sp| sp.name.as_str()).collect();
    let mut out = Vec::new();
    for (host, field) in &hosts {
        out.push((
            Resource::Service(Service {
                hostname: host.clone(),
                namespace: meta.namespace.clone(),
                name: meta.name.clone(),
                cluster: d.cluster.clone(),
                ports: ports.clone(),
                addresses: addresses.clone(),
                // Allocated by the registry, in the views only.
                allocated_addresses: Vec::new(),
                resolution,
                scope,
                labels: meta.labels.clone(),
                selector: selector.clone(),
            }),
            field.clone(),
        ));
    }
    for (i, endpoint) in spec.endpoints.into_iter().enumerate() {
        let field = format!("spec.endpoints[{i}]");
        for name in endpoint.ports.keys() {
            if !port_names.contains(name.as_str()) {
                p.add(
                    format!("{field}.ports.{name}"),
                    format!(
                        "{name:?} is not a port name of this entry ({})",
                        describe_ports(&port_names)
                    ),
                );
            }
        }
        let ctx = WorkloadContext {
            field: &field,
            name: format!("{}-{i}", meta.name),
            meta,
            base_labels: None,
            services: host_names.clone(),
            origin: Origin::WorkloadEntry,
            address: if resolution == Resolution::Dns {
                AddressRule::IpOrHostname
            } else {
                AddressRule::Ip
            },
        };
        let workload = workload(&ctx, endpoint, d, p);
        out.push((Resource::Workload(workload), field));
    }
    out
}

fn service_ports(specs: &[PortSpec], p: &mut Problems) -> Vec<ServicePort> {
    let mut ports: Vec<ServicePort> = Vec::new();
    for (i, sp) in specs.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        let number = match sp.number {
            None => {
                p.add(format!("{field}.number"), "is required");
                None
            }
            Some(n) => port_or_report(p, format!("{field}.number"), n),
        };
        let name = match sp.name.as_deref() {
            None | Some("") => {
                p.add(format!("{field}.name"), "is required");
                None
            }
            Some(name) => p
                .check(format!("{field}.name"), dns_label("port name", name))
                .then(|| name.to_string()),
        };
        let protocol = match sp.protocol.as_deref() {
            None | Some("") => {
                p.add(
                    format!("{field}.protocol"),
                    format!("is required (one of {})", PROTOCOLS.join(", ")),
                );
                None
            }
            Some(proto) => {
                let upper = proto.to_ascii_uppercase();
                if PROTOCOLS.contains(&upper.as_str()) {
                    Some(upper)
                } else {
                    p.add(
                        format!("{field}.protocol"),
                        format!(
                            "{proto:?} is not a protocol; use one of {}",
                            PROTOCOLS.join(", ")
                        ),
                    );
                    None
                }
            }
        };
        let target_port = match sp.target_port {
            None => Some(0),
            Some(n) => port_or_report(p, format!("{field}.targetPort"), n),
        };
        let (Some(number), Some(name), Some(protocol), Some(target_port)) =
            (number, name, protocol, target_port)
        else {
            continue;
        };
        if ports.iter().any(|other| other.name == name) {
            p.add(
                format!("{field}.name"),
                format!("{name:?} is used by another port"),
            );
            continue;
        }
        if ports.iter().any(|other| other.number == number) {
            p.add(
                format!("{field}.number"),
                format!("{number} is used by another port"),
            );
            continue;
        }
        ports.push(ServicePort {
            name,
            number,
            protocol,
            target_port,
        });
    }
    ports
}

fn workload_entry(
    meta: &Meta,
    spec: WorkloadEntrySpec,
    d: &SourceDefaults,
    p: &mut Problems,
) -> Vec<(Resource, String)> {
    let ctx = WorkloadContext {
        field: "spec",
        name: meta.name.clone(),
        meta,
        base_labels: Some(("metadata.labels", &meta.labels)),
        services: Vec::new(),
        origin: Origin::WorkloadEntry,
        // A WorkloadEntry does not know its ServiceEntry's resolution; Istio accepts both.
        address: AddressRule::IpOrHostname,
    };
    let w = workload(&ctx, spec, d, p);
    vec![(Resource::Workload(w), "metadata.name".into())]
}

fn workload_group(
    meta: &Meta,
    spec: WorkloadGroupSpec,
    d: &SourceDefaults,
    p: &mut Problems,
) -> Vec<(Resource, String)> {
    let group_meta = spec.metadata.unwrap_or_default();
    check_labels(p, "spec.metadata.labels", &group_meta.labels);
    for key in group_meta.annotations.keys() {
        p.check(
            format!("spec.metadata.annotations.{key}"),
            check_label_key(key),
        );
    }
    let Some(template) = spec.template else {
        p.add("spec.template", "is required");
        return Vec::new();
    };
    let ctx = WorkloadContext {
        field: "spec.template",
        // A VM brings its own name and address when it registers.
        name: String::new(),
        meta,
        base_labels: Some(("spec.metadata.labels", &group_meta.labels)),
        services: Vec::new(),
        origin: Origin::Vm,
        address: AddressRule::Absent,
    };
    let template = workload(&ctx, template.into(), d, p);
    let probe = spec.probe.and_then(|probe| convert_probe(probe, p));
    vec![(
        Resource::WorkloadGroup(WorkloadGroup {
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            labels: meta.labels.clone(),
            template,
            probe,
        }),
        "metadata.name".into(),
    )]
}

fn convert_probe(spec: ProbeSpec, p: &mut Problems) -> Option<Probe> {
    let mut actions = Vec::new();
    if let Some(h) = spec.http_get {
        let port = required_port(p, "spec.probe.httpGet.port", h.port);
        let path = h.path.unwrap_or_else(|| DEFAULT_PROBE_PATH.into());
        if !path.starts_with('/') {
            p.add(
                "spec.probe.httpGet.path",
                format!("{path:?} must start with '/'"),
            );
        }
        let scheme = h
            .scheme
            .unwrap_or_else(|| "HTTP".into())
            .to_ascii_uppercase();
        if scheme != "HTTP" && scheme != "HTTPS" {
            p.add(
                "spec.probe.httpGet.scheme",
                format!("{scheme:?} is not a scheme; use HTTP or HTTPS"),
            );
        }
        let host = h.host.unwrap_or_default();
        check_probe_host(p, "spec.probe.httpGet.host", &host);
        actions.push(port.map(|port| ProbeAction::HttpGet {
            path,
            port,
            host,
            scheme,
        }));
    }
    if let Some(t) = spec.tcp_socket {
        let port = required_port(p, "spec.probe.tcpSocket.port", t.port);
        let host = t.host.unwrap_or_default();
        check_probe_host(p, "spec.probe.tcpSocket.host", &host);
        actions.push(port.map(|port| ProbeAction::TcpSocket { host, port }));
    }
    if let Some(e) = spec.exec {
        if e.command.is_empty() || e.command[0].is_empty() {
            p.add(
                "spec.probe.exec.command",
                "needs at least the program to run",
            );
        }
        actions.push(Some(ProbeAction::Exec { command: e.command }));
    }
    let mut at_least_one = |field: &str, value: Option<u32>, default: u32| -> u32 {
        let v = value.unwrap_or(default);
        if v == 0 {
            p.add(
                format!("spec.probe.{field}"),
                "0 is not allowed; the minimum is 1",
            );
        }
        v
    };
    let period_seconds = at_least_one(
        "periodSeconds",
        spec.period_seconds,
        DEFAULT_PROBE_PERIOD_SECONDS,
    );
    let timeout_seconds = at_least_one(
        "timeoutSeconds",
        spec.timeout_seconds,
        DEFAULT_PROBE_TIMEOUT_SECONDS,
    );
    let success_threshold = at_least_one(
        "successThreshold",
        spec.success_threshold,
        DEFAULT_PROBE_SUCCESS_THRESHOLD,
    );
    let failure_threshold = at_least_one(
        "failureThreshold",
        spec.failure_threshold,
        DEFAULT_PROBE_FAILURE_THRESHOLD,
    );
    if actions.len() != 1 {
        p.add(
            "spec.probe",
            format!(
                "needs exactly one of httpGet, tcpSocket or exec; found {}",
                actions.len()
            ),
        );
        return None;
    }
    Some(Probe {
        initial_delay_seconds: spec.initial_delay_seconds.unwrap_or(0),
        period_seconds,
        timeout_seconds,
        success_threshold,
        failure_threshold,
        action: actions.pop().flatten()?,
    })
}

fn check_probe_host(p: &mut Problems, field: &str, host: &str) {
    if !host.is_empty() && host.parse::<IpAddr>().is_err() {
        p.check(field, check_hostname(host, false));
    }
}

fn network(meta: &Meta, spec: NetworkSpec, p: &mut Problems) -> Vec<(Resource, String)> {
    let mut gateways: Vec<Gateway> = Vec::new();
    for (i, g) in spec.gateways.into_iter().enumerate() {
        let field = format!("spec.gateways[{i}]");
        let address = match g.address.as_deref() {
            None | Some("") => {
                p.add(format!("{field}.address"), "is required");
                None
            }
            Some(a) => match a.parse::<IpAddr>() {
                Ok(ip) => Some(ip.to_string()),
                Err(_) => {
                    p.add(
                        format!("{field}.address"),
                        format!("{a:?} is not an IP address (a gateway is dialled by address, never by name)"),
                    );
                    None
                }
            },
        };
        let sni_port = port_or_report(
            p,
            format!("{field}.sniPort"),
            g.sni_port.unwrap_or(DEFAULT_SNI_PORT.into()),
        );
        let tunnel_port = port_or_report(
            p,
            format!("{field}.tunnelPort"),
            g.tunnel_port.unwrap_or(DEFAULT_TUNNEL_PORT.into()),
        );
        let locality = match g.locality.as_deref() {
            None => Locality::default(),
            Some(l) => {
                p.check(format!("{field}.locality"), check_locality(l));
                Locality::parse(l)
            }
        };
        let (Some(address), Some(sni_port), Some(tunnel_port)) = (address, sni_port, tunnel_port)
        else {
            continue;
        };
        if gateways.iter().any(|other| other.address == address) {
            p.add(
                format!("{field}.address"),
                format!("{address} is listed twice"),
            );
            continue;
        }
        gateways.push(Gateway {
            address,
            sni_port,
            tunnel_port,
            locality,
        });
    }
    let mut cidrs = Vec::new();
    for (i, c) in spec.cidrs.iter().enumerate() {
        match parse_cidr(c) {
            Ok(c) => cidrs.push(c),
            Err(m) => p.add(format!("spec.cidrs[{i}]"), m),
        }
    }
    vec![(
        Resource::Network(Network {
            id: meta.name.clone(),
            gateways,
            cidrs,
        }),
        "metadata.name".into(),
    )]
}

// ---- workloads -----------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AddressRule {
    /// Inline endpoints of a STATIC entry: dialled directly, so an IP.
    Ip,
    /// A WorkloadEntry, or an endpoint of a DNS entry: an IP or a name to resolve.
    IpOrHostname,
    /// A WorkloadGroup template: the VM brings its address.
    Absent,
}

struct WorkloadContext<'a> {
    /// Path of the WorkloadEntry-shaped mapping, e.g. `spec` or `spec.endpoints[2]`.
    field: &'a str,
    name: String,
    meta: &'a Meta,
    /// Labels that apply under the entry's own `labels`, and where they were written.
    base_labels: Option<(&'a str, &'a BTreeMap<String, String>)>,
    services: Vec<String>,
    origin: Origin,
    address: AddressRule,
}

fn workload(
    ctx: &WorkloadContext<'_>,
    spec: WorkloadEntrySpec,
    d: &SourceDefaults,
    p: &mut Problems,
) -> Workload {
    let f = ctx.field;
    let address = match (ctx.address, spec.address.as_deref()) {
        (AddressRule::Absent, _) => String::new(),
        (_, None | Some("")) => {
            p.add(format!("{f}.address"), "is required");
            String::new()
        }
        (rule, Some(a)) => match a.parse::<IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) if rule == AddressRule::IpOrHostname => {
                if check_hostname(a, false).is_err() {
                    p.add(
                        format!("{f}.address"),
                        format!("{a:?} is neither an IP address nor a DNS name"),
                    );
                }
                a.to_string()
            }
            Err(_) => {
                p.add(
                    format!("{f}.address"),
                    format!(
                        "{a:?} is not an IP address; a STATIC ServiceEntry dials its endpoints directly \
                         (use resolution: DNS for hostnames)"
                    ),
                );
                String::new()
            }
        },
    };

    let mut ports = BTreeMap::new();
    for (name, number) in &spec.ports {
        let field = format!("{f}.ports.{name}");
        let name_ok = p.check(&field, dns_label("port name", name));
        if let (true, Some(port)) = (name_ok, port_or_report(p, field, *number)) {
            ports.insert(name.clone(), port);
        }
    }

    // Kubernetes habit puts a workload's labels in metadata, Istio's in spec; selectors and
    // topology labels see both, the entry's own winning.
    check_labels(p, &format!("{f}.labels"), &spec.labels);
    let mut labels: BTreeMap<String, String> =
        ctx.base_labels.map(|(_, l)| l.clone()).unwrap_or_default();
    labels.extend(spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    let label_field = |key: &str| -> String {
        if spec.labels.contains_key(key) {
            format!("{f}.labels.{key}")
        } else {
            let base = ctx
                .base_labels
                .map_or("metadata.labels", |(field, _)| field);
            format!("{base}.{key}")
        }
    };

    let network = match (&spec.network, labels.get(LABEL_NETWORK)) {
        (Some(n), _) => {
            p.check(format!("{f}.network"), check_network_id(n));
            n.clone()
        }
        (None, Some(n)) => {
            p.check(label_field(LABEL_NETWORK), check_network_id(n));
            n.clone()
        }
        (None, None) => d.network.clone(),
    };

    let locality = match &spec.locality {
        Some(l) => {
            p.check(format!("{f}.locality"), check_locality(l));
            Locality::parse(l)
        }
        None => Locality {
            region: labels.get(LABEL_REGION).cloned().unwrap_or_default(),
            zone: labels.get(LABEL_ZONE).cloned().unwrap_or_default(),
            subzone: labels.get(LABEL_SUBZONE).cloned().unwrap_or_default(),
        },
    };

    let service_account = spec
        .service_account
        .filter(|sa| !sa.is_empty())
        .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.into());
    let sa_ok = p.check(
        format!("{f}.serviceAccount"),
        dns_label("service account", &service_account),
    );
    let identity = if sa_ok && ctx.meta.namespace_ok {
        match SpiffeId::workload(&d.trust_domain, &ctx.meta.namespace, &service_account) {
            Ok(id) => Some(id),
            Err(e) => {
                p.add(format!("{f}.serviceAccount"), e.to_string());
                None
            }
        }
    } else {
        None
    };

    let uid = if ctx.name.is_empty() {
        String::new()
    } else {
        format!("{}/{}/{}", d.cluster, ctx.meta.namespace, ctx.name)
    };
    Workload {
        uid,
        name: ctx.name.clone(),
        namespace: ctx.meta.namespace.clone(),
        address,
        network,
        cluster: d.cluster.clone(),
        locality,
        identity,
        labels,
        ports,
        weight: spec.weight.unwrap_or(DEFAULT_WEIGHT),
        health: Health::Healthy,
        origin: ctx.origin,
        last_confirmed_ms: 0,
        services: ctx.services.clone(),
        service_account,
    }
}

// ---- value checks --------------------------------------------------------------------------

fn port(v: u32) -> Result<u16, String> {
    match u16::try_from(v) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("{v} is not a valid port (1-65535)")),
    }
}

fn port_or_report(p: &mut Problems, field: String, v: u32) -> Option<u16> {
    match port(v) {
        Ok(port) => Some(port),
        Err(m) => {
            p.add(field, m);
            None
        }
    }
}

fn required_port(p: &mut Problems, field: &str, v: Option<u32>) -> Option<u16> {
    match v {
        None => {
            p.add(field, "is required");
            None
        }
        Some(v) => port_or_report(p, field.to_string(), v),
    }
}

fn dns_label(what: &'static str, value: &str) -> Result<(), String> {
    validate_dns_label(what, value).map_err(|e| e.to_string())
}

/// Network ids travel as label values (`topology.istio.io/network`) and as object names, so
/// they must be valid as both: a DNS-1123 label.
fn check_network_id(id: &str) -> Result<(), String> {
    dns_label("network", id)
}

/// A DNS name (RFC 1123, lower case), optionally with `*` as the whole first label.
pub(crate) fn check_dns_name(what: &str, name: &str, wildcard_ok: bool) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{what} {name:?} is not a valid DNS name: {why}"));
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 253 {
        return bad("it is longer than 253 characters");
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        let lower = name.to_ascii_lowercase();
        if check_dns_name(what, &lower, wildcard_ok).is_ok() {
            return Err(format!(
                "{what} {name:?} has upper-case letters; names are lower case (did you mean {lower:?}?)"
            ));
        }
    }
    let rest = match name.strip_prefix("*.") {
        Some(rest) if wildcard_ok => rest,
        Some(_) => return bad("a wildcard is not allowed here"),
        None => name,
    };
    if rest.contains('*') {
        return bad("a wildcard is allowed only as the whole first label, as in \"*.example.com\"");
    }
    for label in rest.split('.') {
        if label.is_empty() {
            return bad("it has an empty label (two dots in a row, or a dot at either end)");
        }
        // Each label follows the same rule as a namespace name.
        validate_dns_label("label", label)
            .map_err(|e| format!("{what} {name:?} is not a valid DNS name: {e}"))?;
    }
    Ok(())
}

/// A name to resolve: a DNS name whose last label is not all digits, so that a mistyped IP
/// address (`10.0.0.300`) is not taken for a hostname.
pub(crate) fn check_hostname(name: &str, wildcard_ok: bool) -> Result<(), String> {
    check_dns_name("host", name, wildcard_ok)?;
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!(
            "host {name:?} is not a valid DNS name or IP address (its last label is all digits)"
        ));
    }
    Ok(())
}

/// Kubernetes label syntax: `[prefix/]name`, prefix a DNS subdomain, name 1-63 characters.
pub(crate) fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() || check_dns_name("prefix", prefix, false).is_err() {
            return Err(format!(
                "label key {key:?} is not valid: the prefix before '/' must be a lower-case DNS name"
            ));
        }
    }
    if name.is_empty() {
        return Err(format!("label key {key:?} is not valid: the name is empty"));
    }
    label_name_chars(name).map_err(|why| format!("label key {key:?} is not valid: {why}"))
}

pub(crate) fn check_label_value(key: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    label_name_chars(value)
        .map_err(|why| format!("label {key:?} has the value {value:?}, which is not valid: {why}"))
}

fn label_name_chars(s: &str) -> Result<(), &'static str> {
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

fn check_labels(p: &mut Problems, field: &str, labels: &BTreeMap<String, String>) {
    for (key, value) in labels {
        let f = format!("{field}.{key}");
        if p.check(&f, check_label_key(key)) {
            p.check(f, check_label_value(key, value));
        }
    }
}

/// `region[/zone[/subzone]]`, each part a label value.
fn check_locality(l: &str) -> Result<(), String> {
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

fn parse_ip_or_cidr(s: &str) -> Result<String, String> {
    if s.contains('/') {
        parse_cidr(s)
    } else {
        s.parse::<IpAddr>()
            .map(|ip| ip.to_string())
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))
    }
}

/// A CIDR in canonical form. Host bits must be zero: `10.1.2.3/8` is nearly always a typo for
/// either an address or `10.0.0.0/8`, and guessing which would route the wrong traffic.
pub(crate) fn parse_cidr(s: &str) -> Result<String, String> {
    let bad = |why: String| Err(format!("{s:?} is not a CIDR: {why}"));
    let Some((addr, len)) = s.split_once('/') else {
        return bad("expected address/prefix-length, as in 10.0.0.0/16".into());
    };
    let Ok(ip) = addr.parse::<IpAddr>() else {
        return bad(format!("{addr:?} is not an IP address"));
    };
    let max: u32 = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len.parse::<u32>() {
        Ok(n) if n <= max && !len.starts_with('+') => n,
        _ => return bad(format!("the prefix length must be 0-{max}")),
    };
    let host_bits_set = match ip {
        IpAddr::V4(v4) => u32::from(v4).checked_shl(len).unwrap_or(0) != 0,
        IpAddr::V6(v6) => u128::from(v6).checked_shl(len).unwrap_or(0) != 0,
    };
    if host_bits_set {
        return bad(format!("the address has bits set beyond the /{len} prefix"));
    }
    Ok(format!("{ip}/{len}"))
}

fn describe_ports(names: &BTreeSet<&str>) -> String {
    if names.is_empty() {
        "it has no ports".into()
    } else {
        format!(
            "its ports: {}",
            names.iter().copied().collect::<Vec<_>>().join(", ")
        )
    }
}
