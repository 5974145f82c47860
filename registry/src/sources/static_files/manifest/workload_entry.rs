//! `WorkloadEntry`, and the workload conversion it shares with a ServiceEntry's inline
//! endpoints and a WorkloadGroup's template: address, ports, labels, network and locality
//! (from fields or Istio's well-known labels), identity. A WorkloadEntry annotated as captured
//! by Istio ambient's ztunnel (the mark Istio reads on pods and WorkloadEntries alike) accepts
//! tunnels on the HBONE port.

use std::collections::BTreeMap;
use std::net::IpAddr;

use isthmus_proto::identity::{validate_service_account, SpiffeId};
use isthmus_proto::model::{Address, Health, Locality, Origin, Resource, Workload};
use serde::Deserialize;

use super::defaults::SourceDefaults;
use super::metadata::{nullable, Meta};
use super::problems::{check_labels, port_or_report, Problems};
use crate::sources::tunnel_port_of;
use crate::validate::{
    check_hostname, check_locality, check_network_id, dns_label, istio_unix_address,
};

/// Kubernetes runs a pod without a service account as `default`; so do we.
const DEFAULT_SERVICE_ACCOUNT: &str = "default";
const DEFAULT_WEIGHT: u32 = 1;

const LABEL_NETWORK: &str = "topology.istio.io/network";
const LABEL_REGION: &str = "topology.kubernetes.io/region";
const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
const LABEL_SUBZONE: &str = "topology.istio.io/subzone";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct WorkloadEntrySpec {
    pub(super) address: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub(super) ports: BTreeMap<String, u32>,
    #[serde(deserialize_with = "nullable")]
    pub(super) labels: BTreeMap<String, String>,
    pub(super) network: Option<String>,
    pub(super) locality: Option<String>,
    pub(super) weight: Option<u32>,
    pub(super) service_account: Option<String>,
}

pub(super) fn workload_entry(
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
    let tunnel_port = tunnel_port_of(&meta.annotations);
    workload(&ctx, spec, d, p)
        .map(|w| Workload { tunnel_port, ..w })
        .map(|w| (Resource::Workload(w), "metadata.name".to_string()))
        .into_iter()
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AddressRule {
    /// Inline endpoints of a STATIC entry: dialled directly, so an IP (or a UNIX socket).
    Ip,
    /// A WorkloadEntry: an IP, a name to resolve or a UNIX socket.
    IpOrHostname,
    /// An endpoint of a DNS entry: an IP or a name to resolve.
    Dns,
    /// A WorkloadGroup template: the VM brings its address.
    Absent,
}

pub(super) struct WorkloadContext<'a> {
    /// Path of the WorkloadEntry-shaped mapping, e.g. `spec` or `spec.endpoints[2]`.
    pub(super) field: &'a str,
    pub(super) name: String,
    pub(super) meta: &'a Meta,
    /// Labels that apply under the entry's own `labels`, and where they were written.
    pub(super) base_labels: Option<(&'a str, &'a BTreeMap<String, String>)>,
    pub(super) services: Vec<String>,
    pub(super) origin: Origin,
    pub(super) address: AddressRule,
}

/// The workload the entry describes; `None` for a UNIX socket endpoint, which Istio accepts
/// and isthmus cannot route to (reported as a warning).
pub(super) fn workload(
    ctx: &WorkloadContext<'_>,
    spec: WorkloadEntrySpec,
    d: &SourceDefaults,
    p: &mut Problems,
) -> Option<Workload> {
    let f = ctx.field;
    let address = address(f, ctx.address, &spec, p);
    let ports = ports(f, &spec.ports, p);
    let labels = labels(ctx, &spec.labels, p);
    let network = network(ctx, &spec, &labels, d, p);
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
    let (service_account, identity) = identity(ctx, spec.service_account, d, p);
    let uid = if ctx.name.is_empty() {
        String::new()
    } else {
        format!("{}/{}/{}", d.cluster, ctx.meta.namespace, ctx.name)
    };
    Some(Workload {
        uid,
        name: ctx.name.clone(),
        namespace: ctx.meta.namespace.clone(),
        address: Address::None,
        network,
        cluster: d.cluster.clone(),
        locality,
        identity,
        labels: labels.into(),
        ports,
        weight: spec.weight.unwrap_or(DEFAULT_WEIGHT),
        health: Health::Healthy,
        origin: ctx.origin,
        last_confirmed_ms: 0,
        stale_since_ms: 0,
        services: ctx.services.clone(),
        service_account,
        tunnel_port: 0,
    })
    .filter(|_| address.is_some())
    .map(|mut w| {
        w.address = address.unwrap_or_default();
        w
    })
}

/// The address by `rule`, typed (`Address::None` when absent or refused), or `None` for a
/// UNIX socket address. As in Istio, an entry that names its `network` may leave out its
/// address (except an endpoint of a DNS entry, which must name something to resolve): it is
/// then reached only through that network's gateway, from other networks, and that gateway
/// forwards to the workloads it can address.
fn address(
    f: &str,
    rule: AddressRule,
    spec: &WorkloadEntrySpec,
    p: &mut Problems,
) -> Option<Address> {
    let written = spec.address.as_deref().unwrap_or_default();
    let field = format!("{f}.address");
    if rule == AddressRule::Absent {
        return Some(Address::None);
    }
    if let Some(unix) = istio_unix_address(written) {
        match unix {
            Err(e) => p.add(&field, e),
            Ok(_) if rule == AddressRule::Dns => p.add(
                &field,
                format!("{written:?}: a UNIX socket is an endpoint only with resolution STATIC"),
            ),
            Ok(_) => unix_warning(&field, written, p),
        }
        if !spec.ports.is_empty() {
            p.add(
                format!("{f}.ports"),
                format!("a UNIX socket endpoint ({written}) takes no ports"),
            );
        }
        return None;
    }
    if written.is_empty() {
        match &spec.network {
            Some(network) if rule != AddressRule::Dns => p.warn(
                field,
                format!(
                    "is unset with network {network:?}: the workload is reached only through \
                     that network's gateway, from other networks"
                ),
            ),
            _ => p.add(field, "is required"),
        }
        return Some(Address::None);
    }
    if let Ok(ip) = written.parse::<IpAddr>() {
        return Some(Address::Ip(ip));
    }
    let name = written.to_ascii_lowercase();
    let name = name.strip_suffix('.').unwrap_or(&name);
    match rule {
        AddressRule::Ip => p.add(
            field,
            format!(
                "{written:?} is not an IP address; a STATIC ServiceEntry dials its endpoints \
                 directly (use resolution: DNS for hostnames)"
            ),
        ),
        _ if check_hostname(name, false).is_err() => p.add(
            field,
            format!("{written:?} is neither an IP address nor a DNS name"),
        ),
        _ => return Some(Address::Dns(name.to_string())),
    }
    Some(Address::None)
}

fn unix_warning(field: &str, address: &str, p: &mut Problems) {
    p.warn(
        field,
        format!(
            "{address:?} is a UNIX socket, reachable only on its own host: isthmus carries TCP \
             between hosts and networks, so it is not an endpoint in the mesh"
        ),
    );
}

fn ports(f: &str, specs: &BTreeMap<String, u32>, p: &mut Problems) -> BTreeMap<String, u16> {
    let mut ports = BTreeMap::new();
    for (name, number) in specs {
        let field = format!("{f}.ports.{name}");
        let name_ok = p.check(&field, dns_label("port name", name));
        if let (true, Some(port)) = (name_ok, port_or_report(p, field, *number)) {
            ports.insert(name.clone(), port);
        }
    }
    ports
}

/// Kubernetes habit puts a workload's labels in metadata, Istio's in spec; selectors and
/// topology labels see both, the entry's own winning.
fn labels(
    ctx: &WorkloadContext<'_>,
    own: &BTreeMap<String, String>,
    p: &mut Problems,
) -> BTreeMap<String, String> {
    check_labels(p, &format!("{}.labels", ctx.field), own);
    let mut labels: BTreeMap<String, String> =
        ctx.base_labels.map(|(_, l)| l.clone()).unwrap_or_default();
    labels.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
    labels
}

/// The network: the entry's own field, else Istio's network label, else the registry's.
fn network(
    ctx: &WorkloadContext<'_>,
    spec: &WorkloadEntrySpec,
    labels: &BTreeMap<String, String>,
    d: &SourceDefaults,
    p: &mut Problems,
) -> String {
    let f = ctx.field;
    match (&spec.network, labels.get(LABEL_NETWORK)) {
        (Some(n), _) => {
            p.check(format!("{f}.network"), check_network_id(n));
            n.clone()
        }
        (None, Some(n)) => {
            // Named where the label was written: the entry's own labels, or the base ones.
            let field = if spec.labels.contains_key(LABEL_NETWORK) {
                format!("{f}.labels.{LABEL_NETWORK}")
            } else {
                let base = ctx
                    .base_labels
                    .map_or("metadata.labels", |(field, _)| field);
                format!("{base}.{LABEL_NETWORK}")
            };
            p.check(field, check_network_id(n));
            n.clone()
        }
        (None, None) => d.network.clone(),
    }
}

/// The service account (Kubernetes' `default` when unset) and the SPIFFE identity it gives
/// in the entry's namespace, when both are valid.
fn identity(
    ctx: &WorkloadContext<'_>,
    spec: Option<String>,
    d: &SourceDefaults,
    p: &mut Problems,
) -> (String, Option<SpiffeId>) {
    let field = format!("{}.serviceAccount", ctx.field);
    let service_account = spec
        .filter(|sa| !sa.is_empty())
        .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.into());
    let sa_ok = match validate_service_account(&service_account) {
        Ok(()) => true,
        Err(e) => {
            p.add(&field, e.to_string());
            false
        }
    };
    let identity = if sa_ok && ctx.meta.namespace_ok {
        match SpiffeId::workload(&d.trust_domain, &ctx.meta.namespace, &service_account) {
            Ok(id) => Some(id),
            Err(e) => {
                p.add(field, e.to_string());
                None
            }
        }
    } else {
        None
    };
    (service_account, identity)
}
