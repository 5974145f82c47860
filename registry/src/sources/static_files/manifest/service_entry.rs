//! `ServiceEntry`: one Service per host, and a Workload per inline endpoint, with Istio's
//! rules across fields (resolution, endpoints, workloadSelector, exportTo).

use std::collections::{BTreeMap, BTreeSet};

use isthmus_proto::identity::SpiffeId;
use isthmus_proto::model::{
    ExportTo, Origin, Resolution, Resource, Scope, Service, ServiceAddress, ServicePort,
};
use serde::Deserialize;

use super::defaults::SourceDefaults;
use super::metadata::{nullable, Meta};
use super::problems::{port_or_report, Problems};
use super::workload_entry::{workload, AddressRule, WorkloadContext, WorkloadEntrySpec};
use crate::validate::{istio_host, istio_port_name, istio_protocol, istio_subnet};

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
    #[serde(deserialize_with = "nullable")]
    subject_alt_names: Vec<String>,
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
    let has_selector = spec.workload_selector.is_some();
    let written = written_resolution(spec.resolution.as_deref(), has_selector, p);
    let hosts = hosts(&spec.hosts, written, p);
    let addresses = addresses(&spec.addresses, written, p);
    let (ports, protocols) = service_ports(&spec.ports, p);
    check_location(spec.location.as_deref(), p);
    let selector = selector(spec.workload_selector, p);
    check_istio_rules(
        &hosts,
        written,
        &protocols,
        &spec.endpoints,
        has_selector,
        p,
    );
    let subject_alt_names = subject_alt_names(spec.subject_alt_names, p);
    let resolution = written.model();
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
                subject_alt_names: subject_alt_names.clone(),
                resolution,
                scope: Scope::Mesh,
                export_to: export_to.clone(),
                labels: (&meta.labels).into(),
                selector: (&selector).into(),
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

/// `spec.resolution` as written, Istio's five values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    None,
    Static,
    Dns,
    DnsRoundRobin,
    DynamicDns,
}

impl Written {
    fn name(self) -> &'static str {
        match self {
            Written::None => "NONE",
            Written::Static => "STATIC",
            Written::Dns => "DNS",
            Written::DnsRoundRobin => "DNS_ROUND_ROBIN",
            Written::DynamicDns => "DYNAMIC_DNS",
        }
    }

    /// How isthmus carries it. DYNAMIC_DNS (Envoy resolving the name each request asks for)
    /// is carried as NONE: the name resolves through the upstream resolver and the
    /// connection goes to the address it returns, which is what DYNAMIC_DNS amounts to for
    /// the L4 traffic isthmus carries.
    fn model(self) -> Resolution {
        match self {
            Written::None | Written::DynamicDns => Resolution::None,
            Written::Static => Resolution::Static,
            Written::Dns | Written::DnsRoundRobin => Resolution::Dns,
        }
    }
}

/// `spec.resolution`. Unset is Istio's default, NONE, except that an entry selecting
/// workloads is read as STATIC (Istio warns that a selector with NONE selects nothing to
/// route to; isthmus routes to the selected workloads, which is what such an entry means).
fn written_resolution(spec: Option<&str>, has_selector: bool, p: &mut Problems) -> Written {
    match spec {
        None | Some("") if has_selector => Written::Static,
        None | Some("") | Some("NONE") => Written::None,
        Some("STATIC") => Written::Static,
        Some("DNS") => Written::Dns,
        Some("DNS_ROUND_ROBIN") => Written::DnsRoundRobin,
        Some("DYNAMIC_DNS") => Written::DynamicDns,
        Some(other) => {
            p.add(
                "spec.resolution",
                format!(
                    "{other:?} is not a resolution; use NONE, STATIC, DNS, DNS_ROUND_ROBIN or DYNAMIC_DNS"
                ),
            );
            Written::Static
        }
    }
}

/// The hosts with the field each was written at; at least one, each valid as Istio checks
/// hosts, lower-cased; a host listed twice is taken once.
fn hosts(specs: &[String], resolution: Written, p: &mut Problems) -> Vec<(String, String)> {
    let mut hosts: Vec<(String, String)> = Vec::new();
    if specs.is_empty() {
        p.add("spec.hosts", "at least one host is required");
    }
    for (i, host) in specs.iter().enumerate() {
        let field = format!("spec.hosts[{i}]");
        let checked = match istio_host(host) {
            Ok(checked) => checked,
            Err(e) => {
                p.add(field, e);
                continue;
            }
        };
        if checked.partial_wildcard && resolution != Written::DynamicDns {
            p.warn(
                &field,
                format!(
                    "{host:?} is a partial wildcard, which Istio warns about; isthmus matches \
                     a wildcard only as a whole first label (\"*.example.com\"), so no name \
                     matches this host"
                ),
            );
        }
        if hosts.iter().any(|(h, _)| *h == checked.name) {
            p.warn(field, format!("{host:?} is listed twice; it is taken once"));
            continue;
        }
        hosts.push((checked.name, field));
    }
    hosts
}

/// `spec.addresses`: IPs and CIDRs (host bits allowed, as Istio's prefix parsing allows them);
/// CIDRs only where Istio takes them, with resolution NONE or STATIC.
fn addresses(specs: &[String], resolution: Written, p: &mut Problems) -> Vec<ServiceAddress> {
    let mut addresses = Vec::new();
    for (i, a) in specs.iter().enumerate() {
        match istio_subnet(a) {
            Ok(address) => addresses.push(ServiceAddress {
                cluster: String::new(),
                address,
            }),
            Err(m) => p.add(format!("spec.addresses[{i}]"), m),
        }
    }
    if resolution == Written::DynamicDns && !specs.is_empty() {
        p.add(
            "spec.addresses",
            "resolution DYNAMIC_DNS takes no addresses: the destination is the name the client asks for",
        );
    } else if !matches!(resolution, Written::None | Written::Static)
        && specs.iter().any(|a| a.contains('/'))
    {
        p.add(
            "spec.addresses",
            format!(
                "CIDR addresses are allowed only with resolution NONE or STATIC, not {}",
                resolution.name()
            ),
        );
    }
    addresses
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
        // Istio warns and then applies such an entry to every workload of the namespace;
        // isthmus refuses instead: a selector that lost its labels (a templating slip)
        // would silently make every workload of the namespace an endpoint of this host.
        p.add(
            "spec.workloadSelector.labels",
            "at least one label is required (Istio would select every workload in the \
             namespace; name the labels, or list the endpoints)",
        );
    }
    // Istio refuses only an empty key and wildcards in a selector; a label no workload can
    // carry simply selects nothing.
    for (k, v) in &ws.labels {
        if k.is_empty() || k.contains('*') || v.contains('*') {
            p.add(
                format!("spec.workloadSelector.labels.{k}"),
                format!("{k}={v}: a selector label needs a key and no wildcard"),
            );
        }
    }
    ws.labels
}

/// Istio's rules across fields: endpoints or a selector, never both; endpoints only with
/// STATIC or DNS resolution (at most one with DNS_ROUND_ROBIN); no wildcard host to resolve
/// with DNS; DYNAMIC_DNS only for wildcard hosts on HTTP and TLS ports; several hosts only on
/// ports whose protocol tells them apart (HTTP or TLS), unless resolution is NONE.
fn check_istio_rules(
    hosts: &[(String, String)],
    resolution: Written,
    protocols: &[Option<&'static str>],
    endpoints: &[WorkloadEntrySpec],
    has_selector: bool,
    p: &mut Problems,
) {
    let has_endpoints = !endpoints.is_empty();
    if has_selector && has_endpoints {
        p.add(
            "spec.endpoints",
            "a ServiceEntry has either endpoints or a workloadSelector, not both (Istio forbids it); \
             move the endpoints into WorkloadEntries with the selector's labels, or drop the selector",
        );
    }
    match resolution {
        Written::None if has_endpoints => p.add(
            "spec.resolution",
            "resolution NONE (Istio's default when resolution is unset) takes no endpoints; \
             use STATIC for IP endpoints or DNS for hostnames",
        ),
        Written::None if has_selector => p.warn(
            "spec.workloadSelector",
            "resolution NONE routes to the address the client dialled, so the selected \
             workloads are not used as endpoints (Istio warns about this too)",
        ),
        Written::DnsRoundRobin if endpoints.len() > 1 => p.add(
            "spec.endpoints",
            "resolution DNS_ROUND_ROBIN takes at most one endpoint; use DNS for several",
        ),
        Written::Dns | Written::DnsRoundRobin if !has_endpoints && !has_selector => {
            for (host, field) in hosts {
                if host.contains('*') {
                    p.add(
                        field.clone(),
                        format!("{host:?}: a wildcard host cannot be resolved with DNS when there are no endpoints"),
                    );
                }
            }
        }
        Written::DynamicDns => check_dynamic_dns(hosts, protocols, has_endpoints, p),
        _ => {}
    }
    let distinguishable = |p: &Option<&str>| {
        matches!(
            p,
            Some("HTTP" | "HTTP2" | "HTTP_PROXY" | "GRPC" | "GRPC-Web" | "HTTPS" | "TLS")
        )
    };
    if resolution != Written::None && hosts.len() > 1 && !protocols.iter().all(distinguishable) {
        p.add(
            "spec.hosts",
            "several hosts need ports whose protocol tells the hosts apart (HTTP or TLS, by \
             Host or SNI); with TCP, UDP or an unset protocol, write one ServiceEntry per host \
             (or use resolution NONE)",
        );
    }
}

fn check_dynamic_dns(
    hosts: &[(String, String)],
    protocols: &[Option<&'static str>],
    has_endpoints: bool,
    p: &mut Problems,
) {
    for (host, field) in hosts {
        if !host.contains('*') {
            p.add(
                field.clone(),
                format!("{host:?}: resolution DYNAMIC_DNS is for wildcard hosts"),
            );
        }
    }
    if has_endpoints {
        p.add(
            "spec.endpoints",
            "resolution DYNAMIC_DNS takes no endpoints: the destination is the name the client asks for",
        );
    }
    for (i, protocol) in protocols.iter().enumerate() {
        if !matches!(protocol, Some("HTTP" | "TLS" | "GRPC" | "HTTP2")) {
            p.add(
                format!("spec.ports[{i}].protocol"),
                "resolution DYNAMIC_DNS takes only HTTP, TLS, GRPC and HTTP2 ports",
            );
        }
    }
}

/// `spec.subjectAltNames`: the identities a server of this entry may present. SPIFFE IDs
/// are added to those isthmus accepts from the entry's endpoints (as Istio adds them to the
/// service's accounts) and returned; isthmus verifies servers by SPIFFE identity, so other
/// names are reported as not enforced.
fn subject_alt_names(names: Vec<String>, p: &mut Problems) -> Vec<String> {
    for (i, name) in names.iter().enumerate() {
        if name.is_empty() {
            p.add(format!("spec.subjectAltNames[{i}]"), "is empty");
        } else if !name.starts_with("spiffe://") {
            p.warn(
                format!("spec.subjectAltNames[{i}]"),
                format!(
                    "{name:?} is not a SPIFFE ID; isthmus verifies a server by its SPIFFE \
                     identity, so this name is not enforced"
                ),
            );
        } else if let Err(e) = SpiffeId::parse(name) {
            p.add(format!("spec.subjectAltNames[{i}]"), e.to_string());
        }
    }
    names
        .into_iter()
        .filter(|n| n.starts_with("spiffe://"))
        .collect()
}

/// `spec.exportTo`: which namespaces see the resource, with Istio's rules for the list (see
/// [`ExportTo::parse`]); every Istio kind that has the field reads it this way.
pub(super) fn export_to(export_to: &[String], namespace: &str, p: &mut Problems) -> ExportTo {
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
        let unix = endpoint
            .address
            .as_deref()
            .is_some_and(|a| a.starts_with("unix://"));
        if unix && ports.len() != 1 {
            p.add(
                format!("{field}.address"),
                format!(
                    "a UNIX socket endpoint needs exactly one port on the entry; it has {}",
                    ports.len()
                ),
            );
        }
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
                AddressRule::Dns
            } else {
                AddressRule::Ip
            },
        };
        if let Some(workload) = workload(&ctx, endpoint, d, p) {
            out.push((Resource::Workload(workload), field));
        }
    }
    out
}

/// The ports, and each one's protocol as written (`None` when unset, which Istio reads as
/// "sniff the protocol"; isthmus carries such a port as TCP, since it works at L4).
fn service_ports(
    specs: &[PortSpec],
    p: &mut Problems,
) -> (Vec<ServicePort>, Vec<Option<&'static str>>) {
    let mut ports: Vec<ServicePort> = Vec::new();
    let mut protocols = Vec::new();
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
                .check(format!("{field}.name"), istio_port_name(name))
                .then(|| name.to_string()),
        };
        let protocol = match sp.protocol.as_deref() {
            None | Some("") => Some(None),
            Some(proto) => match istio_protocol(proto) {
                Ok(known) => Some(Some(known)),
                Err(e) => {
                    p.add(format!("{field}.protocol"), e);
                    None
                }
            },
        };
        let target_port = match sp.target_port {
            None | Some(0) => Some(0),
            Some(n) => port_or_report(p, format!("{field}.targetPort"), n),
        };
        let (Some(number), Some(name), Some(protocol), Some(target_port)) =
            (number, name, protocol, target_port)
        else {
            continue;
        };
        protocols.push(protocol);
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
            protocol: protocol.unwrap_or("TCP").to_ascii_uppercase(),
            target_port,
        });
    }
    (ports, protocols)
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
