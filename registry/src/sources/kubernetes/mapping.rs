//! From a cluster's objects to catalog resources, as istiod maps them: a Service becomes a
//! Service of hostname `name.ns.svc.<domain>` with that cluster's ClusterIP as its address in
//! that cluster, and each address of its EndpointSlices one Workload, named after the pod
//! behind it (identity from the pod's service account, labels from the pod, locality from
//! its node, network from the pod, its namespace or the cluster, tunnel port from Istio
//! ambient's mark on the pod). Pure functions of the objects, so that the watchers only
//! decide *when* to map, never *how*.

use std::collections::BTreeMap;
use std::net::IpAddr;

use isthmus_proto::identity::TrustDomain;
use isthmus_proto::model::{
    Address, ExportTo, Health, Labels, Locality, Origin, Resolution, Resource, Scope, Service,
    ServiceAddress, ServicePort, Workload,
};
use isthmus_proto::SpiffeId;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The label and annotation names the mapping reads (Kubernetes' and Istio's own).
pub mod labels {
    /// On a pod or a namespace (or the cluster's system namespace): the workload's network.
    pub const NETWORK: &str = "topology.istio.io/network";
    pub const REGION: &str = "topology.kubernetes.io/region";
    pub const ZONE: &str = "topology.kubernetes.io/zone";
    pub const SUBZONE: &str = "topology.istio.io/subzone";
    /// On an EndpointSlice: the Service it belongs to.
    pub const SERVICE_NAME: &str = "kubernetes.io/service-name";
    /// On a Service: the namespaces that see it (Istio's annotation, comma-separated).
    pub const EXPORT_TO: &str = "networking.istio.io/exportTo";
    /// On a Service: `"true"` keeps it inside its cluster (as a cluster-local host would).
    pub const CLUSTER_LOCAL: &str = "networking.isthmus.io/cluster-local";
    pub use crate::sources::AMBIENT_REDIRECTION;
}

pub use crate::sources::{tunnel_port_of, AMBIENT_REDIRECTION_ENABLED, HBONE_PORT};

/// What the mapping of one cluster needs besides its objects.
#[derive(Debug, Clone)]
pub struct ClusterContext {
    pub cluster: String,
    /// The cluster's network, used where neither the pod nor its namespace names one.
    pub network: String,
    /// The cluster's DNS domain (`cluster.local`).
    pub domain: String,
    pub trust_domain: TrustDomain,
    /// Host patterns kept inside their cluster (`*.kube-system.svc.cluster.local`).
    pub cluster_local_hosts: Vec<String>,
    /// Unix milliseconds since which the cluster's API server has been out of reach (0
    /// while it is current); written into every workload.
    pub stale_since_ms: i64,
}

/// What a Service's mapping looks up beyond the Service and its slices.
pub trait Lookup {
    fn pod(&self, namespace: &str, name: &str) -> Option<std::sync::Arc<Pod>>;
    fn node(&self, name: &str) -> Option<std::sync::Arc<Node>>;
    fn namespace(&self, name: &str) -> Option<std::sync::Arc<Namespace>>;
}

/// The hostname of a Kubernetes Service in a cluster with DNS domain `domain`.
pub fn hostname(name: &str, namespace: &str, domain: &str) -> String {
    format!("{name}.{namespace}.svc.{domain}")
}

/// Whether `host` matches a cluster-local pattern: exact, or `*.suffix`.
pub fn matches_host(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix),
        None => pattern == host,
    }
}

/// The Service and its endpoints, or nothing for a Service the mesh does not carry.
pub fn map_service(
    ctx: &ClusterContext,
    svc: &KubeService,
    slices: &[std::sync::Arc<EndpointSlice>],
    lookup: &dyn Lookup,
) -> Vec<Resource> {
    let Some(service) = service(ctx, svc) else {
        return Vec::new();
    };
    let publish_not_ready = svc
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false);
    let mut workloads: BTreeMap<String, Workload> = BTreeMap::new();
    for slice in slices {
        for w in slice_workloads(ctx, &service, slice, publish_not_ready, lookup) {
            // An address listed by two slices (a slice being replaced) counts once.
            workloads.entry(w.name.clone()).or_insert(w);
        }
    }
    let mut out = vec![Resource::Service(service)];
    out.extend(workloads.into_values().map(Resource::Workload));
    out
}

/// The catalog Service of a Kubernetes Service; `None` for an ExternalName service (it is a
/// DNS alias, not a set of endpoints).
pub fn service(ctx: &ClusterContext, svc: &KubeService) -> Option<Service> {
    let name = svc.metadata.name.clone()?;
    let namespace = svc.metadata.namespace.clone().unwrap_or_default();
    let spec = svc.spec.clone().unwrap_or_default();
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let hostname = hostname(&name, &namespace, &ctx.domain);
    let annotations = svc.metadata.annotations.clone().unwrap_or_default();
    let cluster_ips: Vec<String> = spec
        .cluster_ips
        .clone()
        .filter(|ips| !ips.is_empty())
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
        .unwrap_or_default()
        .into_iter()
        .filter(|ip| ip.parse::<IpAddr>().is_ok())
        .collect();
    let headless = cluster_ips.is_empty();
    let cluster_local = annotations
        .get(labels::CLUSTER_LOCAL)
        .is_some_and(|v| v == "true")
        || ctx
            .cluster_local_hosts
            .iter()
            .any(|p| matches_host(p, &hostname));
    let export_to = annotations
        .get(labels::EXPORT_TO)
        .map(|v| {
            let values: Vec<String> = v.split(',').map(|s| s.trim().to_string()).collect();
            ExportTo::parse(&values, &namespace).unwrap_or_default()
        })
        .unwrap_or_default();
    Some(Service {
        hostname,
        namespace,
        name,
        cluster: ctx.cluster.clone(),
        ports: spec.ports.unwrap_or_default().iter().map(port).collect(),
        addresses: cluster_ips
            .into_iter()
            .map(|address| ServiceAddress {
                cluster: ctx.cluster.clone(),
                address,
            })
            .collect(),
        allocated_addresses: Vec::new(),
        subject_alt_names: Vec::new(),
        resolution: if headless {
            Resolution::None
        } else {
            Resolution::Static
        },
        scope: if cluster_local {
            Scope::ClusterLocal
        } else {
            Scope::Mesh
        },
        export_to,
        labels: svc.metadata.labels.clone().unwrap_or_default().into(),
        selector: Labels::default(),
    })
}

fn port(p: &k8s_openapi::api::core::v1::ServicePort) -> ServicePort {
    let name = p.name.clone().unwrap_or_default();
    ServicePort {
        protocol: protocol(p.app_protocol.as_deref(), &name, p.protocol.as_deref()),
        number: u16::try_from(p.port).unwrap_or(0),
        target_port: match &p.target_port {
            Some(IntOrString::Int(n)) => u16::try_from(*n).unwrap_or(0),
            _ => 0,
        },
        name,
    }
}

/// A port's protocol as Istio selects it: `appProtocol` first, then the port name's prefix
/// (`http-web`, `grpc`, …), else TCP (UDP ports stay UDP).
pub fn protocol(app_protocol: Option<&str>, name: &str, l4: Option<&str>) -> String {
    if l4 == Some("UDP") {
        return "UDP".into();
    }
    let from = |s: &str| -> Option<&'static str> {
        let s = s.to_ascii_lowercase();
        Some(match s.as_str() {
            "http" | "http1" => "HTTP",
            "http2" | "kubernetes.io/h2c" => "HTTP2",
            "https" => "HTTPS",
            "grpc" => "GRPC",
            "grpc-web" => "GRPC-Web",
            "tls" => "TLS",
            "tcp" => "TCP",
            "mongo" => "Mongo",
            "redis" => "Redis",
            "mysql" => "MySQL",
            "kubernetes.io/ws" | "kubernetes.io/wss" => "HTTP",
            _ => return None,
        })
    };
    if let Some(p) = app_protocol.and_then(from) {
        return p.into();
    }
    let prefix = name.split_once('-').map_or(name, |(p, _)| p);
    from(prefix).unwrap_or("TCP").into()
}

/// The workloads one EndpointSlice gives a Service: one per address.
fn slice_workloads(
    ctx: &ClusterContext,
    service: &Service,
    slice: &EndpointSlice,
    publish_not_ready: bool,
    lookup: &dyn Lookup,
) -> Vec<Workload> {
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return Vec::new();
    }
    let ports: BTreeMap<String, u16> = slice
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p.name.clone().unwrap_or_default(),
                u16::try_from(p.port?).ok()?,
            ))
        })
        .collect();
    let mut out = Vec::new();
    for ep in &slice.endpoints {
        for address in &ep.addresses {
            let Ok(ip) = address.parse::<IpAddr>() else {
                continue;
            };
            out.push(endpoint_workload(
                ctx,
                service,
                ep,
                ip,
                ports.clone(),
                publish_not_ready,
                lookup,
            ));
        }
    }
    out
}

fn endpoint_workload(
    ctx: &ClusterContext,
    service: &Service,
    ep: &Endpoint,
    ip: IpAddr,
    ports: BTreeMap<String, u16>,
    publish_not_ready: bool,
    lookup: &dyn Lookup,
) -> Workload {
    let ns = service.namespace.as_str();
    let pod = ep
        .target_ref
        .as_ref()
        .filter(|r| r.kind.as_deref() == Some("Pod"))
        .and_then(|r| lookup.pod(r.namespace.as_deref().unwrap_or(ns), r.name.as_deref()?));
    let pod_meta = pod.as_ref().map(|p| &p.metadata);
    let pod_labels = pod_meta.and_then(|m| m.labels.clone()).unwrap_or_default();
    let tunnel_port = pod_meta
        .and_then(|m| m.annotations.as_ref())
        .map_or(0, tunnel_port_of);
    let service_account = pod
        .as_ref()
        .and_then(|p| p.spec.as_ref()?.service_account_name.clone())
        .unwrap_or_default();
    let identity = (!service_account.is_empty())
        .then(|| SpiffeId::workload(&ctx.trust_domain, ns, &service_account).ok())
        .flatten();
    let member = pod_meta
        .and_then(|m| m.name.clone())
        .unwrap_or_else(|| ip.to_string());
    let node_name = ep.node_name.clone().or_else(|| {
        pod.as_ref()
            .and_then(|p| p.spec.as_ref()?.node_name.clone())
    });
    Workload {
        uid: format!(
            "kubernetes://{}/{ns}/{}/{member}",
            ctx.cluster, service.name
        ),
        name: format!("{}.{member}", service.name),
        namespace: ns.to_string(),
        address: Address::Ip(ip),
        network: network(ctx, ns, &pod_labels, lookup),
        cluster: ctx.cluster.clone(),
        locality: locality(node_name.as_deref(), ep.zone.as_deref(), lookup),
        identity,
        labels: pod_labels.into(),
        ports,
        weight: 1,
        health: health(ep, publish_not_ready),
        origin: if pod.is_some() {
            Origin::Pod
        } else {
            Origin::WorkloadEntry
        },
        last_confirmed_ms: 0,
        services: vec![service.hostname.clone()],
        service_account,
        stale_since_ms: ctx.stale_since_ms,
        tunnel_port,
    }
}

/// Ready endpoints carry traffic. A terminating one that still serves is kept, unhealthy, so
/// that its open connections drain instead of being cut; `publishNotReadyAddresses` makes
/// every endpoint ready, as Kubernetes does.
fn health(ep: &Endpoint, publish_not_ready: bool) -> Health {
    let c = ep.conditions.clone().unwrap_or_default();
    // An unset `ready` means ready (the API's own rule).
    if publish_not_ready || c.ready.unwrap_or(true) {
        Health::Healthy
    } else {
        Health::Unhealthy
    }
}

/// The pod's network label, else its namespace's, else the cluster's.
fn network(
    ctx: &ClusterContext,
    ns: &str,
    pod_labels: &BTreeMap<String, String>,
    lookup: &dyn Lookup,
) -> String {
    if let Some(n) = pod_labels.get(labels::NETWORK).filter(|n| !n.is_empty()) {
        return n.clone();
    }
    namespace_network(ns, lookup).unwrap_or_else(|| ctx.network.clone())
}

/// The network a namespace's label names, if any.
pub fn namespace_network(ns: &str, lookup: &dyn Lookup) -> Option<String> {
    lookup
        .namespace(ns)?
        .metadata
        .labels
        .as_ref()?
        .get(labels::NETWORK)
        .filter(|n| !n.is_empty())
        .cloned()
}

/// Region and zone from the node's well-known labels, subzone from Istio's; the slice's own
/// zone when the node is unknown.
fn locality(node: Option<&str>, zone: Option<&str>, lookup: &dyn Lookup) -> Locality {
    let node = node.and_then(|n| lookup.node(n));
    let labels = node
        .as_ref()
        .and_then(|n| n.metadata.labels.clone())
        .unwrap_or_default();
    let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
    let mut l = Locality {
        region: get(labels::REGION),
        zone: get(labels::ZONE),
        subzone: get(labels::SUBZONE),
    };
    if l.zone.is_empty() {
        l.zone = zone.unwrap_or_default().to_string();
    }
    l
}

#[cfg(test)]
mod tests;
