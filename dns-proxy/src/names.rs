//! The name table: every mesh hostname this proxy answers for, built from the catalog view
//! it receives, with the addresses a caller on this proxy's network and cluster should use.
//!
//! The table is immutable once built; the server reads it through an `ArcSwap`, so a query
//! never waits for a catalog update and an update never waits for a query.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use isthmus_proto::model::{EndpointKind, Health, Resolution, Service, ServiceView, ViewResource};
use isthmus_proto::subscription::LocalView;
use serde::Serialize;

/// Who is asking, as far as name resolution is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locale {
    pub network: String,
    pub cluster: String,
    /// The namespace short names are relative to.
    pub namespace: String,
    /// The cluster domain, `cluster.local` by default, without a trailing dot.
    pub cluster_domain: String,
    /// Whether mesh names get IPv6 addresses (AAAA). Off on hosts without an IPv6 route:
    /// an app offered an address it cannot reach may try it first and fail.
    pub ipv6: bool,
}

/// The addresses one mesh name resolves to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MeshName {
    /// The service hostname as the catalog spells it (`*.example.com` for a wildcard).
    pub hostname: String,
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
    /// Where the addresses came from: `vip`, `allocated` or `endpoints`.
    pub source: &'static str,
}

/// An immutable snapshot of the mesh names.
#[derive(Debug, Default)]
pub struct NameTable {
    exact: HashMap<Box<str>, Arc<MeshName>>,
    /// `*.example.com` is stored under `example.com`.
    wildcards: HashMap<Box<str>, Arc<MeshName>>,
    /// Suffixes tried, in order, for a name that is not found as asked (Kubernetes search
    /// list: `<ns>.svc.<domain>`, `svc.<domain>`, `<domain>`).
    search: Vec<String>,
    cluster_domain: String,
    /// `svc.<domain>`: names below it belong to the mesh whether or not they exist.
    service_domain: String,
    synced: bool,
    version: String,
}

impl NameTable {
    /// A table with no names that has never seen the catalog: mesh names get SERVFAIL.
    pub fn unsynced(locale: &Locale) -> Self {
        let domain = normalize(&locale.cluster_domain);
        Self {
            search: vec![
                format!("{}.svc.{domain}", normalize(&locale.namespace)),
                format!("svc.{domain}"),
                domain.clone(),
            ],
            service_domain: format!("svc.{domain}"),
            cluster_domain: domain,
            ..Default::default()
        }
    }

    /// Builds the table from a complete view. `synced` is false only for a table built
    /// before the registry has answered.
    pub fn build(view: &LocalView, locale: &Locale, synced: bool) -> Self {
        let mut table = Self::unsynced(locale);
        table.synced = synced;
        table.version = view.version.clone();
        for res in view.resources.values() {
            let ViewResource::Service(sv) = res else {
                continue;
            };
            let Some(name) = mesh_name(sv, locale) else {
                continue;
            };
            let host = normalize(&sv.service.hostname);
            let name = Arc::new(name);
            match host.strip_prefix("*.") {
                Some(parent) => table.wildcards.insert(parent.into(), name),
                None => table.exact.insert(host.into(), name),
            };
        }
        table
    }

    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Looks `name` up (lowercase, no trailing dot): as asked, then under a wildcard, then
    /// with each search suffix.
    pub fn lookup(&self, name: &str) -> Option<&Arc<MeshName>> {
        if let Some(found) = self.lookup_fqdn(name) {
            return Some(found);
        }
        if name.is_empty() || self.in_cluster_domain(name) {
            return None;
        }
        let mut candidate = String::with_capacity(name.len() + 64);
        for suffix in &self.search {
            candidate.clear();
            candidate.push_str(name);
            candidate.push('.');
            candidate.push_str(suffix);
            if let Some(found) = self.lookup_fqdn(&candidate) {
                return Some(found);
            }
        }
        None
    }

    fn lookup_fqdn(&self, name: &str) -> Option<&Arc<MeshName>> {
        if let Some(found) = self.exact.get(name) {
            return Some(found);
        }
        if self.wildcards.is_empty() {
            return None;
        }
        // The most specific wildcard wins: try the longest parent first.
        name.match_indices('.')
            .find_map(|(i, _)| self.wildcards.get(&name[i + 1..]))
    }

    fn in_cluster_domain(&self, name: &str) -> bool {
        is_below(name, &self.cluster_domain)
    }

    /// Whether `name` lies in the mesh's service domain (`*.svc.<domain>`), where this proxy
    /// is the authority: such a name is never sent upstream.
    pub fn is_service_domain(&self, name: &str) -> bool {
        is_below(name, &self.service_domain)
    }

    /// The table as JSON, for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let mut names: Vec<&MeshName> = self
            .exact
            .values()
            .chain(self.wildcards.values())
            .map(|n| n.as_ref())
            .collect();
        names.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        serde_json::json!({
            "synced": self.synced,
            "version": self.version,
            "search": self.search,
            "names": names,
        })
    }
}

fn is_below(name: &str, domain: &str) -> bool {
    name.len() > domain.len()
        && name.ends_with(domain)
        && name.as_bytes()[name.len() - domain.len() - 1] == b'.'
}

/// Lowercase, without a trailing dot: the form every name in the table has.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// What `sv` resolves to for `locale`, or None when this proxy does not answer for it (a
/// service resolved by DNS or without any address: the upstream resolver owns the name).
pub fn mesh_name(sv: &ServiceView, locale: &Locale) -> Option<MeshName> {
    let svc = &sv.service;
    let (addrs, source) = {
        let vips = cluster_addresses(svc, &locale.cluster);
        if !vips.is_empty() {
            (vips, "vip")
        } else {
            let allocated = allocated_addresses(svc);
            if !allocated.is_empty() {
                (allocated, "allocated")
            } else if svc.resolution == Resolution::Static {
                // Headless: the endpoints themselves, on this network only (another network's
                // workloads are unreachable by address; their gateways are not the service).
                (
                    sv.endpoints
                        .iter()
                        .filter(|e| {
                            e.kind == EndpointKind::Workload
                                && e.network == locale.network
                                && e.health == Health::Healthy
                        })
                        .filter_map(|e| e.address.ip())
                        .collect(),
                    "endpoints",
                )
            } else {
                return None;
            }
        }
    };
    let mut v4: Vec<Ipv4Addr> = Vec::new();
    let mut v6: Vec<Ipv6Addr> = Vec::new();
    for a in addrs {
        match a {
            IpAddr::V4(a) if !v4.contains(&a) => v4.push(a),
            IpAddr::V6(a) if locale.ipv6 && !v6.contains(&a) => v6.push(a),
            _ => {}
        }
    }
    Some(MeshName {
        hostname: svc.hostname.clone(),
        v4,
        v6,
        source,
    })
}

/// The service's addresses for `cluster`: those assigned to that cluster, else those that
/// hold in every cluster. CIDR ranges (a ServiceEntry may list one) are not addresses a name
/// can resolve to and are skipped; a single-host prefix counts as its address.
fn cluster_addresses(svc: &Service, cluster: &str) -> Vec<IpAddr> {
    let parse = |want: &str| -> Vec<IpAddr> {
        svc.addresses
            .iter()
            .filter(|a| a.cluster == want)
            .filter_map(|a| host_address(&a.address))
            .collect()
    };
    let own = parse(cluster);
    if !own.is_empty() || cluster.is_empty() {
        return own;
    }
    parse("")
}

fn host_address(s: &str) -> Option<IpAddr> {
    match s.split_once('/') {
        None => s.parse().ok(),
        Some((ip, len)) => {
            let ip: IpAddr = ip.parse().ok()?;
            let full = if ip.is_ipv4() { "32" } else { "128" };
            (len == full).then_some(ip)
        }
    }
}

/// The VIPs the registry allocated for a service without addresses of its own
/// (240.240.0.0/16, 2001:2::/48): stable, and the same in every view and on every node.
fn allocated_addresses(svc: &Service) -> Vec<IpAddr> {
    svc.allocated_addresses
        .iter()
        .filter_map(|a| host_address(a))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_proto::model::{ServiceAddress, ViewEndpoint};
    use std::collections::BTreeMap;

    fn locale() -> Locale {
        Locale {
            network: "net-a".into(),
            cluster: "c1".into(),
            namespace: "shop".into(),
            cluster_domain: "cluster.local".into(),
            ipv6: true,
        }
    }

    fn service(host: &str, addrs: &[(&str, &str)], resolution: Resolution) -> Service {
        Service {
            hostname: host.into(),
            namespace: "shop".into(),
            addresses: addrs
                .iter()
                .map(|(c, a)| ServiceAddress {
                    cluster: c.to_string(),
                    address: a.to_string(),
                })
                .collect(),
            resolution,
            ..Default::default()
        }
    }

    fn endpoint(addr: &str, network: &str, kind: EndpointKind, health: Health) -> ViewEndpoint {
        ViewEndpoint {
            kind,
            address: isthmus_proto::model::Address::parse(addr).unwrap(),
            ports: BTreeMap::new(),
            network: network.into(),
            cluster: "c1".into(),
            locality: Default::default(),
            identities: vec![],
            weight: 1,
            health,
            labels: Default::default(),
            uid: addr.into(),
            tunnel_port: 0,
            stale_since_ms: 0,
            subset_weights: Default::default(),
        }
    }

    fn view(services: Vec<ServiceView>) -> LocalView {
        LocalView {
            version: "v1".into(),
            resources: services
                .into_iter()
                .map(|sv| {
                    let r = ViewResource::Service(Arc::new(sv));
                    (r.key(), r)
                })
                .collect(),
        }
    }

    fn sv(service: Service, endpoints: Vec<ViewEndpoint>) -> ServiceView {
        ServiceView {
            service,
            endpoints,
            ..Default::default()
        }
    }

    fn table() -> NameTable {
        NameTable::build(
            &view(vec![
                sv(
                    service(
                        "reviews.shop.svc.cluster.local",
                        &[("", "10.96.0.10"), ("c2", "10.97.0.10")],
                        Resolution::Static,
                    ),
                    vec![],
                ),
                sv(
                    service(
                        "ratings.books.svc.cluster.local",
                        &[("c1", "10.96.0.20"), ("", "10.99.0.20"), ("", "fd00::20")],
                        Resolution::Static,
                    ),
                    vec![],
                ),
                sv(
                    service(
                        "*.wild.example.com",
                        &[("", "240.0.0.1")],
                        Resolution::Static,
                    ),
                    vec![],
                ),
                sv(
                    service(
                        "*.deep.wild.example.com",
                        &[("", "240.0.0.2")],
                        Resolution::Static,
                    ),
                    vec![],
                ),
                sv(
                    service("db.shop.svc.cluster.local", &[], Resolution::Static),
                    vec![
                        endpoint("10.0.0.1", "net-a", EndpointKind::Workload, Health::Healthy),
                        endpoint(
                            "10.0.0.2",
                            "net-a",
                            EndpointKind::Workload,
                            Health::Unhealthy,
                        ),
                        endpoint("10.1.0.1", "net-b", EndpointKind::Workload, Health::Healthy),
                        endpoint("192.0.2.1", "net-b", EndpointKind::Gateway, Health::Healthy),
                        endpoint("fd00::1", "net-a", EndpointKind::Workload, Health::Healthy),
                    ],
                ),
                sv(
                    service("api.external.com", &[], Resolution::Dns),
                    vec![endpoint(
                        "api.backend.com",
                        "net-a",
                        EndpointKind::Workload,
                        Health::Healthy,
                    )],
                ),
                sv(
                    service(
                        "range.example.com",
                        &[("", "10.5.0.0/16"), ("", "10.6.0.1/32")],
                        Resolution::Static,
                    ),
                    vec![],
                ),
            ]),
            &locale(),
            true,
        )
    }

    fn v4(t: &NameTable, name: &str) -> Option<Vec<String>> {
        t.lookup(name)
            .map(|n| n.v4.iter().map(|a| a.to_string()).collect())
    }

    #[test]
    fn vip_for_this_cluster_else_the_shared_one() {
        let t = table();
        assert_eq!(
            v4(&t, "reviews.shop.svc.cluster.local").unwrap(),
            ["10.96.0.10"]
        );
        assert_eq!(
            v4(&t, "ratings.books.svc.cluster.local").unwrap(),
            ["10.96.0.20"]
        );
        let r = t.lookup("ratings.books.svc.cluster.local").unwrap();
        assert!(
            r.v6.is_empty(),
            "a cluster-specific address set replaces the shared one"
        );
        assert_eq!(r.source, "vip");
    }

    #[test]
    fn headless_answers_healthy_workloads_on_this_network_only() {
        let t = table();
        let db = t.lookup("db.shop.svc.cluster.local").unwrap();
        assert_eq!(db.v4, vec!["10.0.0.1".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(db.v6, vec!["fd00::1".parse::<Ipv6Addr>().unwrap()]);
        assert_eq!(db.source, "endpoints");
    }

    #[test]
    fn dns_resolved_services_and_cidrs_are_left_to_upstream() {
        let t = table();
        assert!(t.lookup("api.external.com").is_none());
        assert_eq!(v4(&t, "range.example.com").unwrap(), ["10.6.0.1"]);
    }

    #[test]
    fn short_names_follow_kubernetes_search_semantics() {
        let t = table();
        for name in ["reviews", "reviews.shop", "reviews.shop.svc"] {
            assert_eq!(v4(&t, name).unwrap(), ["10.96.0.10"], "{name}");
        }
        // Another namespace needs its name.
        assert!(t.lookup("ratings").is_none());
        assert_eq!(v4(&t, "ratings.books").unwrap(), ["10.96.0.20"]);
        assert_eq!(v4(&t, "ratings.books.svc").unwrap(), ["10.96.0.20"]);
        // A full name in the cluster domain is not expanded again.
        assert!(t.lookup("reviews.cluster.local").is_none());
        assert!(t.lookup("nope").is_none());
    }

    #[test]
    fn wildcards_match_any_depth_most_specific_first() {
        let t = table();
        assert_eq!(v4(&t, "a.wild.example.com").unwrap(), ["240.0.0.1"]);
        assert_eq!(v4(&t, "a.b.c.wild.example.com").unwrap(), ["240.0.0.1"]);
        assert_eq!(v4(&t, "x.deep.wild.example.com").unwrap(), ["240.0.0.2"]);
        assert_eq!(v4(&t, "deep.wild.example.com").unwrap(), ["240.0.0.1"]);
        assert!(
            t.lookup("wild.example.com").is_none(),
            "the wildcard's parent is not matched"
        );
        assert!(t.lookup("xwild.example.com").is_none());
    }

    #[test]
    fn service_domain_and_dump() {
        let t = table();
        assert!(t.is_service_domain("nope.shop.svc.cluster.local"));
        assert!(!t.is_service_domain("svc.cluster.local"));
        assert!(!t.is_service_domain("example.com"));
        let dump = t.dump();
        assert_eq!(dump["synced"], true);
        assert_eq!(dump["names"].as_array().unwrap().len(), t.len());
        assert!(!NameTable::unsynced(&locale()).synced());
    }
}
