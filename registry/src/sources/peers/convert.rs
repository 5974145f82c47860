//! A peer's exported view entries as catalog resources: a service entry becomes the
//! Service and one Workload per endpoint (named after the endpoint and the service, serving
//! that service by name), a network entry the Network with its gateways.

use std::sync::Arc;

use isthmus_proto::model::{
    EndpointKind, OwnedResource, Resource, Service, ServiceView, ViewEndpoint, ViewResource,
    Workload,
};

/// The catalog resources of one exported entry, marked stale since `stale_since_ms` (0:
/// current) unless the peer already had them stale since earlier.
pub(super) fn resources(
    origin: &str,
    entry: &ViewResource,
    stale_since_ms: i64,
) -> Vec<OwnedResource> {
    match entry {
        ViewResource::Network(n) => {
            vec![OwnedResource::new(origin, Resource::Network((**n).clone()))]
        }
        ViewResource::Service(sv) => service(origin, sv, stale_since_ms),
    }
}

fn service(origin: &str, sv: &ServiceView, stale_since_ms: i64) -> Vec<OwnedResource> {
    let mut svc = sv.service.clone();
    // This registry allocates its own VIPs; the endpoints name the service themselves.
    svc.allocated_addresses.clear();
    svc.selector.clear();
    name_ports(&mut svc);
    let mut out = Vec::with_capacity(sv.endpoints.len() + 1);
    for ep in &sv.endpoints {
        // An export holds workloads only; a gateway entry would be a peer of another kind.
        if ep.kind != EndpointKind::Workload {
            continue;
        }
        out.push(OwnedResource::new(
            origin,
            Resource::Workload(workload(&svc, ep, stale_since_ms)),
        ));
    }
    out.push(OwnedResource::new(origin, Resource::Service(svc)));
    out
}

/// Every port gets a distinct name, by which the workloads map it to their own port.
fn name_ports(svc: &mut Service) {
    let mut seen = std::collections::BTreeSet::new();
    for p in &mut svc.ports {
        if p.name.is_empty() || !seen.insert(p.name.clone()) {
            p.name = format!("port-{}", p.number);
            seen.insert(p.name.clone());
        }
    }
}

fn workload(svc: &Service, ep: &ViewEndpoint, stale_since_ms: i64) -> Workload {
    let identity = ep.identities.first().cloned();
    Workload {
        uid: ep.uid.clone(),
        name: workload_name(&ep.uid, &ep.address.to_string(), &svc.hostname),
        namespace: svc.namespace.clone(),
        address: ep.address.clone(),
        network: ep.network.clone(),
        cluster: ep.cluster.clone(),
        locality: ep.locality.clone(),
        service_account: identity
            .as_ref()
            .and_then(|i| i.service_account())
            .unwrap_or_default()
            .to_string(),
        identity,
        labels: ep.labels.clone(),
        ports: svc
            .ports
            .iter()
            .filter_map(|p| ep.ports.get(&p.number).map(|to| (p.name.clone(), *to)))
            .collect(),
        weight: ep.weight,
        health: ep.health,
        origin: Default::default(),
        last_confirmed_ms: 0,
        stale_since_ms: earliest(ep.stale_since_ms, stale_since_ms),
        services: vec![svc.hostname.clone()],
        tunnel_port: ep.tunnel_port,
    }
}

/// The earlier of two staleness marks, 0 meaning current.
fn earliest(a: i64, b: i64) -> i64 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (a, b) => a.min(b),
    }
}

/// A workload's name: readable (its uid, or its address, and the service) and distinct for
/// every endpoint of every service, whatever characters the peer's uids hold.
fn workload_name(uid: &str, address: &str, hostname: &str) -> String {
    let base = if uid.is_empty() { address } else { uid };
    let readable: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(100)
        .collect();
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{uid}\0{address}\0{hostname}").as_bytes(),
    );
    format!("{readable}-{}", hex::encode(&digest.as_ref()[..4]))
}

/// `r` with its workloads marked stale since `since`, if it is a workload not marked yet.
pub(super) fn marked_stale(r: &OwnedResource, since: i64) -> Option<OwnedResource> {
    match &*r.resource {
        Resource::Workload(w) if w.stale_since_ms == 0 => {
            let mut w = w.clone();
            w.stale_since_ms = since;
            Some(OwnedResource {
                origin: r.origin.clone(),
                resource: Arc::new(Resource::Workload(w)),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_proto::model::{Address, Health, ServicePort};

    fn view() -> ServiceView {
        ServiceView {
            service: Service {
                hostname: "ratings.shop.svc.cluster.local".into(),
                namespace: "shop".into(),
                name: "ratings".into(),
                cluster: "cluster-b".into(),
                ports: vec![
                    ServicePort {
                        name: String::new(),
                        number: 80,
                        protocol: "TCP".into(),
                        target_port: 8080,
                    },
                    ServicePort {
                        name: "grpc".into(),
                        number: 90,
                        protocol: "GRPC".into(),
                        target_port: 0,
                    },
                ],
                allocated_addresses: vec!["240.240.0.9".into()],
                ..Default::default()
            },
            endpoints: vec![ViewEndpoint {
                kind: EndpointKind::Workload,
                address: Address::parse("10.1.0.5").unwrap(),
                ports: [(80, 8081), (90, 9090)].into(),
                network: "network-b".into(),
                cluster: "cluster-b".into(),
                locality: Default::default(),
                identities: vec![isthmus_proto::SpiffeId::parse(
                    "spiffe://cluster.local/ns/shop/sa/ratings",
                )
                .unwrap()],
                weight: 3,
                health: Health::Healthy,
                labels: [("version".to_string(), "v2".to_string())].into(),
                uid: "cluster-b/shop/ratings-0".into(),
                tunnel_port: 15008,
                stale_since_ms: 0,
                subset_weights: Default::default(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_service_entry_becomes_a_service_and_a_workload_per_endpoint() {
        let rs = resources("peer:west/", &ViewResource::Service(Arc::new(view())), 0);
        assert_eq!(rs.len(), 2);
        assert!(rs.iter().all(|r| r.origin == "peer:west/"));
        let Resource::Service(s) = &*rs[1].resource else {
            panic!("{rs:?}")
        };
        assert!(s.allocated_addresses.is_empty(), "VIPs are allocated here");
        assert_eq!(s.ports[0].name, "port-80");
        let Resource::Workload(w) = &*rs[0].resource else {
            panic!("{rs:?}")
        };
        assert!(w.serves(s));
        assert_eq!(w.port_for(&s.ports[0]), 8081);
        assert_eq!(w.port_for(&s.ports[1]), 9090);
        assert_eq!(w.network, "network-b");
        assert_eq!(w.service_account, "ratings");
        assert_eq!(w.weight, 3);
        assert_eq!(w.labels["version"], "v2");
        assert_eq!(w.tunnel_port, 15008, "the workload's own tunnel port");
        assert!(
            w.name.starts_with("cluster-b-shop-ratings-0-"),
            "{}",
            w.name
        );
    }

    #[test]
    fn staleness_keeps_the_earliest_mark() {
        let mut v = view();
        v.endpoints[0].stale_since_ms = 500;
        let rs = resources("peer:west/", &ViewResource::Service(Arc::new(v)), 900);
        let Resource::Workload(w) = &*rs[0].resource else {
            panic!()
        };
        assert_eq!(w.stale_since_ms, 500);
        let rs = resources("peer:west/", &ViewResource::Service(Arc::new(view())), 900);
        let Resource::Workload(w) = &*rs[0].resource else {
            panic!()
        };
        assert_eq!(w.stale_since_ms, 900);
        assert!(marked_stale(&rs[0], 1000).is_none(), "already stale");
        assert!(
            marked_stale(&rs[1], 1000).is_none(),
            "services carry no mark"
        );
    }

    #[test]
    fn workload_names_differ_per_service_and_endpoint() {
        let a = workload_name("u/1", "10.0.0.1", "a.example");
        let b = workload_name("u/1", "10.0.0.1", "b.example");
        let c = workload_name("u-1", "10.0.0.1", "a.example");
        assert_ne!(a, b);
        assert_ne!(a, c);
    }
}
