//! `VirtualService`: the `tcp` and `tls` routes of its hosts, for the L4 traffic isthmus
//! carries. Its `http` routes are accepted and reported as not honoured, and so are the
//! match conditions isthmus cannot evaluate yet; routes bound only to ingress gateways are
//! read and left out, since isthmus serves mesh traffic.

use std::collections::BTreeMap;

use isthmus_proto::model::{L4Route, Resource, RouteDestination, VirtualService};
use serde::Deserialize;
use serde_yaml_ng::Value;

use super::defaults::SourceDefaults;
use super::metadata::{nullable, Meta};
use super::problems::{check_labels, port_or_report, Problems};
use super::service_entry::export_to;
use super::traffic::{resolve_host, resolve_hosts, HostContext, NOT_HONOURED};
use crate::validate::{dns_label, istio_subnet};

/// Istio's name for the sidecars' traffic in `gateways`: the only traffic isthmus routes.
const MESH: &str = "mesh";

/// What a route's weights must add up to when it has several destinations (Istio's rule).
const TOTAL_WEIGHT: u32 = 100;

/// What a match condition isthmus does not evaluate amounts to: the match holds without it.
fn condition_not_honoured() -> String {
    format!("{NOT_HONOURED}: the match holds without this condition")
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct VirtualServiceSpec {
    #[serde(deserialize_with = "nullable")]
    hosts: Vec<String>,
    #[serde(deserialize_with = "nullable")]
    gateways: Vec<String>,
    /// Checked only for being a list: isthmus carries TCP, so it reads no HTTP route.
    #[serde(deserialize_with = "nullable")]
    http: Vec<Value>,
    #[serde(deserialize_with = "nullable")]
    tls: Vec<TlsRouteSpec>,
    #[serde(deserialize_with = "nullable")]
    tcp: Vec<TcpRouteSpec>,
    #[serde(deserialize_with = "nullable")]
    export_to: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct TcpRouteSpec {
    #[serde(rename = "match", deserialize_with = "nullable")]
    matches: Vec<L4MatchSpec>,
    #[serde(deserialize_with = "nullable")]
    route: Vec<RouteDestinationSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct TlsRouteSpec {
    #[serde(rename = "match", deserialize_with = "nullable")]
    matches: Vec<TlsMatchSpec>,
    #[serde(deserialize_with = "nullable")]
    route: Vec<RouteDestinationSpec>,
}

/// Istio's L4MatchAttributes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct L4MatchSpec {
    port: Option<u32>,
    #[serde(deserialize_with = "nullable")]
    source_labels: BTreeMap<String, String>,
    #[serde(deserialize_with = "nullable")]
    destination_subnets: Vec<String>,
    source_namespace: Option<String>,
    #[serde(deserialize_with = "nullable")]
    gateways: Vec<String>,
}

/// Istio's TLSMatchAttributes: the L4 attributes and the SNI names. A separate type (rather
/// than a flattened one) so that `sniHosts` in a `tcp` match is the unknown field it is.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct TlsMatchSpec {
    #[serde(deserialize_with = "nullable")]
    sni_hosts: Vec<String>,
    port: Option<u32>,
    #[serde(deserialize_with = "nullable")]
    source_labels: BTreeMap<String, String>,
    #[serde(deserialize_with = "nullable")]
    destination_subnets: Vec<String>,
    source_namespace: Option<String>,
    #[serde(deserialize_with = "nullable")]
    gateways: Vec<String>,
}

impl TlsMatchSpec {
    /// The SNI names, and the rest as an L4 match, so both kinds of match share one check.
    fn split(self) -> (Vec<String>, L4MatchSpec) {
        let l4 = L4MatchSpec {
            port: self.port,
            source_labels: self.source_labels,
            destination_subnets: self.destination_subnets,
            source_namespace: self.source_namespace,
            gateways: self.gateways,
        };
        (self.sni_hosts, l4)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct RouteDestinationSpec {
    destination: Option<DestinationSpec>,
    weight: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct DestinationSpec {
    host: Option<String>,
    subset: Option<String>,
    port: Option<PortSelectorSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct PortSelectorSpec {
    number: Option<u32>,
}

/// What every part of one VirtualService is read against.
struct Context<'a> {
    at: HostContext<'a>,
    /// `spec.hosts` as written (lower case, no trailing dot) and fully qualified: what an
    /// SNI host must be one of.
    sni_names: Vec<String>,
}

pub(super) fn virtual_service(
    meta: &Meta,
    spec: VirtualServiceSpec,
    d: &SourceDefaults,
    p: &mut Problems,
) -> Vec<(Resource, String)> {
    let at = HostContext {
        namespace: &meta.namespace,
        domain: &d.domain,
    };
    let hosts = resolve_hosts("spec.hosts", &spec.hosts, at, p);
    let for_mesh = applies_to_mesh(&spec.gateways, p);
    if !spec.http.is_empty() {
        p.warn(
            "spec.http",
            "isthmus carries TCP; HTTP routes are not honoured (ignored)",
        );
    }
    if spec.http.is_empty() && spec.tls.is_empty() && spec.tcp.is_empty() {
        p.add(
            "spec",
            "one of http, tls or tcp is required (Istio refuses a VirtualService without routes)",
        );
    }
    let mut sni_names: Vec<String> = spec
        .hosts
        .iter()
        .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
        .collect();
    sni_names.extend(hosts.iter().cloned());
    let ctx = Context { at, sni_names };
    // `tls` routes come first, then `tcp`, each in document order. A connection from
    // isthmus' proxies carries no plaintext SNI of the application, so a `tls` route applies
    // only when the caller names an SNI; putting them first lets such a caller reach them
    // before a `tcp` route that matches the same port takes every connection.
    let mut routes = Vec::new();
    for (i, route) in spec.tls.into_iter().enumerate() {
        routes.extend(tls_route(&format!("spec.tls[{i}]"), route, &ctx, p));
    }
    for (i, route) in spec.tcp.into_iter().enumerate() {
        routes.extend(tcp_route(&format!("spec.tcp[{i}]"), route, &ctx, p));
    }
    if !for_mesh {
        routes.clear();
    }
    let export_to = export_to(&spec.export_to, &meta.namespace, p);
    vec![(
        Resource::VirtualService(Box::new(VirtualService {
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            hosts,
            routes,
            export_to,
        })),
        "metadata.name".into(),
    )]
}

/// Whether `spec.gateways` binds the routes to mesh traffic: an empty list does (Istio's
/// default), and so does one that names `mesh`. Ingress gateways in the list are warned
/// about, since isthmus serves no ingress gateway; without `mesh` the VirtualService is
/// still read (and checked) but defines no routes.
fn applies_to_mesh(gateways: &[String], p: &mut Problems) -> bool {
    let (mesh, others) = split_gateways(gateways);
    let Some(listed) = others else {
        return mesh;
    };
    if mesh {
        p.warn(
            "spec.gateways",
            format!(
                "{listed}: routes bound to ingress gateways are not honoured by isthmus \
                 (ignored); the routes apply to mesh traffic only"
            ),
        );
    } else {
        p.warn(
            "spec.gateways",
            format!(
                "{listed}: routes bound to ingress gateways are not honoured by isthmus, and \
                 without \"{MESH}\" in the list this VirtualService applies to no mesh \
                 traffic: it defines no routes"
            ),
        );
    }
    mesh
}

/// One `tcp` route: a route per match entry (Istio ORs them), each to the same
/// destinations; no match at all is one route matching every connection.
fn tcp_route(field: &str, spec: TcpRouteSpec, ctx: &Context<'_>, p: &mut Problems) -> Vec<L4Route> {
    let destinations = destinations(&format!("{field}.route"), spec.route, ctx, p);
    let matches: Vec<Option<L4Route>> = if spec.matches.is_empty() {
        vec![Some(L4Route::default())]
    } else {
        spec.matches
            .into_iter()
            .enumerate()
            .map(|(j, m)| l4_match(&format!("{field}.match[{j}]"), m, p))
            .collect()
    };
    with_destinations(matches, destinations)
}

/// One `tls` route: as a `tcp` route, but every match names the SNI hosts it takes, and
/// there must be a match (Istio's rule: a TLS route is chosen by SNI).
fn tls_route(field: &str, spec: TlsRouteSpec, ctx: &Context<'_>, p: &mut Problems) -> Vec<L4Route> {
    let destinations = destinations(&format!("{field}.route"), spec.route, ctx, p);
    if spec.matches.is_empty() {
        p.add(
            format!("{field}.match"),
            "at least one match with sniHosts is required (Istio chooses a TLS route by SNI)",
        );
    }
    let matches = spec
        .matches
        .into_iter()
        .enumerate()
        .map(|(j, m)| {
            let field = format!("{field}.match[{j}]");
            let (sni_hosts, l4) = m.split();
            let sni_hosts = sni_hosts_of(&field, &sni_hosts, ctx, p);
            l4_match(&field, l4, p).map(|route| L4Route { sni_hosts, ..route })
        })
        .collect();
    with_destinations(matches, destinations)
}

/// The routes of the match entries that apply to mesh traffic, each sent to `destinations`.
fn with_destinations(
    matches: Vec<Option<L4Route>>,
    destinations: Vec<RouteDestination>,
) -> Vec<L4Route> {
    matches
        .into_iter()
        .flatten()
        .map(|route| L4Route {
            destinations: destinations.clone(),
            ..route
        })
        .collect()
}

/// One L4 match entry as a route without destinations, or `None` when the entry applies
/// only at ingress gateways. `port` and `sourceLabels` are honoured; the other conditions
/// are checked and warned about, since the route then matches more than they allow.
fn l4_match(field: &str, spec: L4MatchSpec, p: &mut Problems) -> Option<L4Route> {
    let ports = match spec.port {
        // Istio's 0: no port condition.
        None | Some(0) => Vec::new(),
        Some(n) => port_or_report(p, format!("{field}.port"), n)
            .into_iter()
            .collect(),
    };
    check_labels(p, &format!("{field}.sourceLabels"), &spec.source_labels);
    if !spec.destination_subnets.is_empty() {
        for (k, subnet) in spec.destination_subnets.iter().enumerate() {
            if let Err(e) = istio_subnet(subnet) {
                p.add(format!("{field}.destinationSubnets[{k}]"), e);
            }
        }
        p.warn(
            format!("{field}.destinationSubnets"),
            condition_not_honoured(),
        );
    }
    if let Some(ns) = spec.source_namespace.filter(|ns| !ns.is_empty()) {
        let namespace_field = format!("{field}.sourceNamespace");
        if p.check(&namespace_field, dns_label("namespace", &ns)) {
            p.warn(namespace_field, condition_not_honoured());
        }
    }
    match_applies_to_mesh(&format!("{field}.gateways"), &spec.gateways, p).then(|| L4Route {
        ports,
        source_labels: spec.source_labels,
        ..L4Route::default()
    })
}

/// Whether a match entry's own `gateways` (which, when given, replace the VirtualService's
/// for that entry) include mesh traffic; the ingress gateways in it are warned about.
fn match_applies_to_mesh(field: &str, gateways: &[String], p: &mut Problems) -> bool {
    let (mesh, others) = split_gateways(gateways);
    let Some(listed) = others else {
        return mesh;
    };
    if mesh {
        p.warn(
            field,
            format!("{listed}: matches at ingress gateways are not honoured by isthmus (ignored)"),
        );
    } else {
        p.warn(
            field,
            format!(
                "{listed}: this match applies only at ingress gateways, which isthmus does \
                 not serve; it takes no mesh traffic (ignored)"
            ),
        );
    }
    mesh
}

/// Whether a `gateways` list takes mesh traffic (it is empty, Istio's default, or names
/// `mesh`), and the ingress gateways it names, comma-separated, if any.
fn split_gateways(gateways: &[String]) -> (bool, Option<String>) {
    let others: Vec<&str> = gateways
        .iter()
        .map(String::as_str)
        .filter(|g| *g != MESH)
        .collect();
    let mesh = gateways.is_empty() || others.len() < gateways.len();
    let listed = (!others.is_empty()).then(|| others.join(", "));
    (mesh, listed)
}

/// A TLS match's `sniHosts`: at least one, each lower-cased and kept as written (the SNI a
/// caller sends is matched literally), and each one of the VirtualService's hosts, as
/// Istio requires (written as in `spec.hosts` or fully qualified).
fn sni_hosts_of(field: &str, specs: &[String], ctx: &Context<'_>, p: &mut Problems) -> Vec<String> {
    let field = format!("{field}.sniHosts");
    if specs.is_empty() {
        p.add(&field, "at least one SNI host is required");
    }
    let mut names = Vec::new();
    for (k, sni) in specs.iter().enumerate() {
        let name = sni.trim_end_matches('.').to_ascii_lowercase();
        if !ctx.sni_names.contains(&name) {
            p.add(
                format!("{field}[{k}]"),
                format!(
                    "the SNI host {sni:?} is not one of the VirtualService's hosts ({})",
                    ctx.sni_names.join(", ")
                ),
            );
            continue;
        }
        names.push(name);
    }
    names
}

/// A route's destinations (`field` is its `route`): at least one, each with a host (short
/// names resolved in the VirtualService's namespace), an optional subset and port, and
/// weights by Istio's rule (see [`weights`]).
fn destinations(
    field: &str,
    specs: Vec<RouteDestinationSpec>,
    ctx: &Context<'_>,
    p: &mut Problems,
) -> Vec<RouteDestination> {
    if specs.is_empty() {
        p.add(field, "at least one destination is required");
        return Vec::new();
    }
    let weights = weights(field, &specs, p);
    specs
        .into_iter()
        .zip(weights)
        .enumerate()
        .filter_map(|(j, (spec, weight))| {
            let field = format!("{field}[{j}].destination");
            let Some(destination) = spec.destination else {
                p.add(field, "is required");
                return None;
            };
            destination_of(&field, destination, weight, ctx, p)
        })
        .collect()
}

/// One destination (`field` is its `destination`), or `None` with its problems recorded.
fn destination_of(
    field: &str,
    spec: DestinationSpec,
    weight: u32,
    ctx: &Context<'_>,
    p: &mut Problems,
) -> Option<RouteDestination> {
    let host = resolve_host(&format!("{field}.host"), spec.host.as_deref(), ctx.at, p);
    let subset = spec.subset.unwrap_or_default();
    let subset_ok =
        subset.is_empty() || p.check(format!("{field}.subset"), dns_label("subset name", &subset));
    let port = match spec.port.and_then(|port| port.number) {
        // Istio's 0: the port the connection was made to.
        None | Some(0) => Some(0),
        Some(n) => port_or_report(p, format!("{field}.port.number"), n),
    };
    let (Some(host), true, Some(port)) = (host, subset_ok, port) else {
        return None;
    };
    Some(RouteDestination {
        host,
        subset,
        port,
        weight,
    })
}

/// Each destination's weight, by Istio's rule: a lone destination may leave it out (it
/// takes everything, 100); with several, every weight is given and they sum to 100 (0 is a
/// weight: a destination drained of traffic). Problems are recorded at `field` (the route)
/// or at the weight that is missing.
fn weights(field: &str, specs: &[RouteDestinationSpec], p: &mut Problems) -> Vec<u32> {
    if let [only] = specs {
        if only.weight.is_none() {
            return vec![TOTAL_WEIGHT];
        }
    }
    let mut missing = false;
    for (j, spec) in specs.iter().enumerate() {
        if spec.weight.is_none() {
            missing = true;
            p.add(
                format!("{field}[{j}].weight"),
                format!(
                    "is required when a route has several destinations (their weights must \
                     sum to {TOTAL_WEIGHT})"
                ),
            );
        }
    }
    let weights: Vec<u32> = specs.iter().map(|s| s.weight.unwrap_or(0)).collect();
    let sum: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if !missing && sum != u64::from(TOTAL_WEIGHT) {
        p.add(
            field,
            format!("the weights sum to {sum}; they must sum to {TOTAL_WEIGHT}"),
        );
    }
    weights
}
