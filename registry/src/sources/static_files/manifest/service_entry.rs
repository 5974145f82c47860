//! `ServiceEntry`: one Service per host, and a Workload per inline endpoint, with Istio's
//! rules across fields (resolution, endpoints, workloadSelector, exportTo).

use std::collections::{BTreeMap, BTreeSet};

use isthmus_proto::model::{
    ExportTo, Origin, Resolution, Resource, Scope, Service, ServiceAddress, ServicePort,
};
use serde::Deserialize;

use super::defaults::SourceDefaults;
use super::metadata::{nullable, Meta};
use super::problems::{check_labels, port_or_report, Problems};
use super::workload_entry::{workload, AddressRule, WorkloadContext, WorkloadEntrySpec};
use crate::validate::{check_hostname, dns_label, parse_ip_or_cidr};

/// Istio's port protocols that isthmus knows how to route.
const PROTOCOLS: &[&str] = &[
    "HTTP", "HTTPS", "HTTP2", "GRPC", "TCP", "TLS", "MONGO", "REDIS", "MYSQL",
];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct ServiceEntrySpec {
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

pub(super) fn service_entry(
    meta: &Meta,
    spec: ServiceEntrySpec,
    d: &SourceDefaults,
    p: &mut Problems,
) -> Vec<(Resource, String)> {
    let hosts = hosts(&spec.hosts, p);
    let addresses = addresses(&spec.addresses, p);
    let ports = service_ports(&spec.ports, p);
    let has_selector = spec.workload_selector.is_some();
    let has_endpoints = !spec.endpoints.is_empty();
    let resolution = resolution(spec.resolution.as_deref(), has_endpoints || has_selector, p);
    check_location(spec.location.as_deref(), p);
    let selector = selector(spec.workload_selector, p);
    check_istio_rules(&hosts, resolution, has_endpoints, has_selector, p);
    let export_to = export_to(&spec.export_to, &meta.namespace, p);

    let mut out: Vec<(Resource, String)> = hosts
        .iter()
        .map(|(host, field)| {
            let service = Service {
                hostname: host.clone(),
                namespace: meta.namespace.clone(),
                name: meta.name.clone(),
                cluster: d.cluster.clone(),
                ports: ports.clone(),
                addresses: addresses.clone(),
                // Allocated by the registry, in the views only.
                allocated_addresses: Vec::new(),
                resolution,
                scope: Scope::Mesh,
                export_to: export_to.clone(),
                labels: meta.labels.clone(),
                selector: selector.clone(),
            };
            (Resource::Service(service), field.clone())
        })
        .collect();
    let host_names: Vec<String> = hosts.into_iter().map(|(h, _)| h).collect();
    out.extend(endpoints(
        meta,
        spec.endpoints,
        &host_names,
        &ports,
        resolution,
        d,
        p,
    ));
    out
}

/// The hosts with the field each was written at; at least one, each a valid name, none twice.
fn hosts(specs: &[String], p: &mut Problems) -> Vec<(String, String)> {
    let mut hosts: Vec<(String, String)> = Vec::new();
    if specs.is_empty() {
        p.add("spec.hosts", "at least one host is required");
    }
    for (i, host) in specs.iter().enumerate() {
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
    hosts
}

fn addresses(specs: &[String], p: &mut Problems) -> Vec<ServiceAddress> {
    let mut addresses = Vec::new();
    for (i, a) in specs.iter().enumerate() {
        match parse_ip_or_cidr(a) {
            Ok(address) => addresses.push(ServiceAddress {
                cluster: String::new(),
                address,
            }),
            Err(m) => p.add(format!("spec.addresses[{i}]"), m),
        }
    }
    addresses
}

/// `spec.resolution`; `names_endpoints` when the entry lists endpoints or selects workloads.
fn resolution(spec: Option<&str>, names_endpoints: bool, p: &mut Problems) -> Resolution {
    match spec {
        // Istio's default is NONE, which would make the endpoints the manifest lists
        // unreachable; an entry that names its endpoints means them to be used.
        None if names_endpoints => Resolution::Static,
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
    }
}

fn check_location(location: Option<&str>, p: &mut Problems) {
    if let Some(location) = location {
        if location != "MESH_INTERNAL" && location != "MESH_EXTERNAL" {
            p.add(
                "spec.location",
                format!("{location:?} is not a location; use MESH_INTERNAL or MESH_EXTERNAL"),
            );
        }
    }
}

fn selector(spec: Option<WorkloadSelectorSpec>, p: &mut Problems) -> BTreeMap<String, String> {
    let Some(ws) = spec else {
        return BTreeMap::new();
    };
    if ws.labels.is_empty() {
        // An empty selector would silently select nothing (or, read Kubernetes' way,
        // everything in the namespace): refuse the ambiguity.
        p.add(
            "spec.workloadSelector.labels",
            "at least one label is required",
        );
    }
    check_labels(p, "spec.workloadSelector.labels", &ws.labels);
    ws.labels
}

/// Istio's rules across fields: endpoints or a selector, never both; no endpoints with
/// resolution NONE; no wildcard host to resolve with DNS.
fn check_istio_rules(
    hosts: &[(String, String)],
    resolution: Resolution,
    has_endpoints: bool,
    has_selector: bool,
    p: &mut Problems,
) {
    if has_selector && has_endpoints {
        p.add(
            "spec.endpoints",
            "a ServiceEntry has either endpoints or a workloadSelector, not both (Istio forbids it); \
             move the endpoints into WorkloadEntries with the selector's labels, or drop the selector",
        );
    }
    if resolution == Resolution::None && has_endpoints {
        p.add(
            "spec.resolution",
            "resolution NONE takes no endpoints; use STATIC for IP endpoints or DNS for hostnames",
        );
    }
    if resolution == Resolution::Dns && !has_endpoints && !has_selector {
        for (host, field) in hosts {
            if host.starts_with("*.") {
                p.add(
                    field.clone(),
                    format!("{host:?}: a wildcard host cannot be resolved with DNS when there are no endpoints"),
                );
            }
        }
    }
}

/// `spec.exportTo`: which namespaces see the entry, with Istio's rules for the list (see
/// [`ExportTo::parse`]).
fn export_to(export_to: &[String], namespace: &str, p: &mut Problems) -> ExportTo {
    ExportTo::parse(export_to, namespace).unwrap_or_else(|problems| {
        for e in problems {
            let field = match e.index {
                Some(i) => format!("spec.exportTo[{i}]"),
                None => "spec.exportTo".into(),
            };
            p.add(field, e.why);
        }
        ExportTo::Public
    })
}

/// The inline endpoints, each a workload of every host, named `<entry>-<index>`.
fn endpoints(
    meta: &Meta,
    specs: Vec<WorkloadEntrySpec>,
    host_names: &[String],
    ports: &[ServicePort],
    resolution: Resolution,
    d: &SourceDefaults,
    p: &mut Problems,
) -> Vec<(Resource, String)> {
    let port_names: BTreeSet<&str> = ports.iter().map(|sp| sp.name.as_str()).collect();
    let mut out = Vec::new();
    for (i, endpoint) in specs.into_iter().enumerate() {
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
            services: host_names.to_vec(),
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
