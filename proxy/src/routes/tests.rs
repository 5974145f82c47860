use std::collections::BTreeMap;

use isthmus_proto::model::{Service, ServicePort, ViewEndpoint};
use isthmus_proto::TrustDomain;

use super::*;

fn id(sa: &str) -> SpiffeId {
    SpiffeId::workload(&TrustDomain::new("cluster.local").unwrap(), "shop", sa).unwrap()
}

fn endpoint(kind: EndpointKind, addr: &str, port: u16, version: &str) -> ViewEndpoint {
    let mut labels = BTreeMap::new();
    if !version.is_empty() {
        labels.insert("version".to_string(), version.to_string());
    }
    ViewEndpoint {
        kind,
        address: isthmus_proto::model::Address::parse(addr).unwrap(),
        ports: [(9080, port)].into_iter().collect(),
        network: if kind == EndpointKind::Gateway {
            "network-b".into()
        } else {
            "network-a".into()
        },
        cluster: String::new(),
        locality: Locality::default(),
        identities: vec![id(if version.is_empty() { "gw" } else { "reviews" })],
        weight: 1,
        health: Health::Healthy,
        labels: labels.into(),
        uid: format!("{addr}:{port}"),
        tunnel_port: 0,
        stale_since_ms: 0,
        subset_weights: Default::default(),
    }
}

fn view(endpoints: Vec<ViewEndpoint>, scope: Scope) -> LocalView {
    let service = Service {
        hostname: "reviews.shop.svc.cluster.local".into(),
        namespace: "shop".into(),
        name: "reviews".into(),
        ports: vec![ServicePort {
            name: "http".into(),
            number: 9080,
            protocol: "TCP".into(),
            target_port: 0,
        }],
        allocated_addresses: vec!["240.240.0.7".into()],
        scope,
        ..Default::default()
    };
    let sv = ServiceView {
        service,
        endpoints,
        ..Default::default()
    };
    let mut resources = std::collections::BTreeMap::new();
    resources.insert(
        "svc/reviews.shop.svc.cluster.local".to_string(),
        ViewResource::Service(Arc::new(sv)),
    );
    LocalView {
        version: "v.1".into(),
        resources,
    }
}

const HOST: &str = "reviews.shop.svc.cluster.local";

/// The proxy's defaults, with an endpoint ejected at its first failed connect.
fn ejecting_at_the_first_failure() -> RouteOptions {
    RouteOptions {
        outlier: OutlierConfig {
            consecutive_failures: 1,
            ..Default::default()
        },
        ..Default::default()
    }
}

#[test]
fn a_service_labelled_off_the_tunnels_has_no_tunnel_port_on_its_targets() {
    let mut ep = endpoint(EndpointKind::Workload, "10.0.0.1", 8080, "v1");
    ep.tunnel_port = 15008;
    let tunnel_ports = |label: Option<&str>| {
        let mut v = view(vec![ep.clone()], Scope::Mesh);
        if let Some(ViewResource::Service(sv)) = v.resources.values_mut().next() {
            let sv = Arc::make_mut(sv);
            if let Some(value) = label {
                sv.service
                    .labels
                    .insert(TUNNEL_LABEL.to_string(), value.to_string());
            }
        }
        let t = RouteTable::build(&v, &RouteTable::default(), &RouteOptions::default());
        let d = t.lookup(HOST, 9080, "").unwrap();
        d.targets()
            .iter()
            .map(|t| t.tunnel_port)
            .collect::<Vec<_>>()
    };
    assert_eq!(tunnel_ports(None), [15008]);
    assert_eq!(tunnel_ports(Some("true")), [15008]);
    assert_eq!(tunnel_ports(Some("false")), [0]);
    // Not a boolean: reported, and the tunnels stay on.
    assert_eq!(tunnel_ports(Some("no")), [15008]);
}

#[test]
fn lookup_names_what_is_missing() {
    let v = view(
        vec![endpoint(EndpointKind::Workload, "10.0.0.1", 8080, "v1")],
        Scope::Mesh,
    );
    let t = RouteTable::build(&v, &RouteTable::default(), &RouteOptions::default());
    assert!(t.lookup(HOST, 9080, "").is_ok());
    assert!(t.lookup(HOST, 9080, "v1").is_ok());
    assert_eq!(
        t.lookup("ratings.shop.svc.cluster.local", 9080, "")
            .unwrap_err()
            .reason(),
        "unknown_service"
    );
    assert_eq!(
        t.lookup(HOST, 9081, "").unwrap_err().reason(),
        "unknown_port"
    );
    assert_eq!(
        t.lookup(HOST, 9080, "v9").unwrap_err().reason(),
        "unknown_subset"
    );
    assert_eq!(
        t.hostname_of("240.240.0.7".parse().unwrap()),
        Some(HOST),
        "an allocated VIP leads to its service"
    );
}

#[test]
fn gateway_reach_keeps_local_workloads_and_maps_ports() {
    let v = view(
        vec![
            endpoint(EndpointKind::Workload, "10.0.0.1", 8080, "v1"),
            endpoint(EndpointKind::Workload, "10.0.0.2", 8081, "v2"),
            endpoint(EndpointKind::Gateway, "198.51.100.10", 15443, ""),
        ],
        Scope::Mesh,
    );
    let local = RouteOptions {
        reach: Reach::LocalWorkloads,
        ..Default::default()
    };
    let t = RouteTable::build(&v, &RouteTable::default(), &local);
    let all: Vec<SocketAddr> = t
        .lookup(HOST, 9080, "")
        .unwrap()
        .targets()
        .iter()
        .map(|t| t.addr)
        .collect();
    assert_eq!(
        all,
        vec![
            "10.0.0.1:8080".parse().unwrap(),
            "10.0.0.2:8081".parse().unwrap()
        ]
    );
    let v2 = t.lookup(HOST, 9080, "v2").unwrap().targets();
    assert_eq!(v2.len(), 1);
    assert_eq!(v2[0].addr, "10.0.0.2:8081".parse().unwrap());

    // A workload's outbound also goes through the remote gateway, for every subset.
    let mesh = RouteTable::build(&v, &RouteTable::default(), &RouteOptions::default());
    let v2 = mesh.lookup(HOST, 9080, "v2").unwrap().targets();
    assert_eq!(v2.len(), 2);
    assert!(v2.iter().any(|t| t.via_gateway && t.addr.port() == 15443));
}

#[test]
fn unhealthy_endpoints_are_not_targets_and_scope_is_kept() {
    let mut sick = endpoint(EndpointKind::Workload, "10.0.0.2", 8080, "v1");
    sick.health = Health::Unhealthy;
    let v = view(
        vec![
            endpoint(EndpointKind::Workload, "10.0.0.1", 8080, "v1"),
            sick,
        ],
        Scope::ClusterLocal,
    );
    let t = RouteTable::build(&v, &RouteTable::default(), &RouteOptions::default());
    let d = t.lookup(HOST, 9080, "").unwrap();
    assert_eq!(d.targets().len(), 1);
    assert!(!d.exported());
    assert_eq!(d.identities(), vec![id("reviews")]);
}

#[test]
fn only_a_definition_for_every_namespace_is_exported() {
    let mut v = view(
        vec![endpoint(EndpointKind::Workload, "10.0.0.1", 8080, "")],
        Scope::Mesh,
    );
    let t = RouteTable::build(&v, &RouteTable::default(), &RouteOptions::default());
    assert!(t.lookup(HOST, 9080, "").unwrap().exported());
    // Exported to shop only: a gateway cannot tell a caller's namespace from its SNI key.
    if let Some(ViewResource::Service(sv)) = v.resources.values_mut().next() {
        Arc::make_mut(sv).service.export_to =
            isthmus_proto::model::ExportTo::Namespaces(["shop".to_string()].into());
    }
    let t = RouteTable::build(&v, &RouteTable::default(), &RouteOptions::default());
    let d = t.lookup(HOST, 9080, "").unwrap();
    assert!(!d.exported());
    assert_eq!(d.targets().len(), 1, "still routed on its own network");
}

#[test]
fn a_rebuild_keeps_the_destination_and_its_state() {
    let v = view(
        vec![
            endpoint(EndpointKind::Workload, "10.0.0.1", 8080, ""),
            endpoint(EndpointKind::Workload, "10.0.0.2", 8080, ""),
        ],
        Scope::Mesh,
    );
    let opts = ejecting_at_the_first_failure();
    let t1 = RouteTable::build(&v, &RouteTable::default(), &opts);
    let d1 = t1.lookup(HOST, 9080, "").unwrap();
    let now = Instant::now();
    assert!(matches!(
        d1.on_connect_failed("10.0.0.1:8080", now),
        Some(FailureOutcome::Ejected(_))
    ));
    d1.on_connected("10.0.0.2:8080");

    let t2 = RouteTable::build(&v, &t1, &opts);
    let d2 = t2.lookup(HOST, 9080, "").unwrap();
    assert!(Arc::ptr_eq(&d1, &d2), "the same destination object");
    for _ in 0..10 {
        assert_eq!(
            d2.pick(now, &[]).unwrap().uid,
            "10.0.0.2:8080",
            "the ejection survived the rebuild"
        );
    }
    let dump = t2.dump();
    assert_eq!(dump[0].endpoints.iter().filter(|e| e.ejected).count(), 1);
    assert_eq!(dump[0].endpoints.iter().map(|e| e.active).sum::<u32>(), 1);
}

#[test]
fn destinations_are_built_on_first_use_and_kept_while_the_view_names_them() {
    let v = view(
        vec![
            endpoint(EndpointKind::Workload, "10.0.0.1", 8080, "v1"),
            endpoint(EndpointKind::Workload, "10.0.0.2", 8080, "v2"),
        ],
        Scope::Mesh,
    );
    let opts = RouteOptions::default();
    let t1 = RouteTable::build(&v, &RouteTable::default(), &opts);
    assert_eq!(t1.len(), 3, "the port with every endpoint, v1 and v2");
    assert_eq!(t1.built_len(), 0, "nothing is built before it is used");

    // A dump shows every destination without building one.
    let dump = t1.dump();
    let keys: Vec<String> = dump.iter().map(|d| d.key.to_string()).collect();
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert!(dump
        .iter()
        .all(|d| d.endpoints.len() == 1 || d.key.subset.is_empty()));
    assert_eq!(t1.built_len(), 0);

    // A lookup builds one, and the next lookup finds the same object.
    let v1 = t1.lookup(HOST, 9080, "v1").unwrap();
    assert_eq!(v1.targets().len(), 1);
    assert!(Arc::ptr_eq(&v1, &t1.lookup(HOST, 9080, "v1").unwrap()));
    assert_eq!(t1.built_len(), 1);
    // A lookup that finds nothing builds nothing.
    assert!(t1.lookup(HOST, 9080, "v9").is_err());
    assert_eq!(t1.built_len(), 1);

    // A rebuild carries the built one over, updated; it does not build the others.
    let mut moved = view(
        vec![
            endpoint(EndpointKind::Workload, "10.0.0.1", 8080, "v1"),
            endpoint(EndpointKind::Workload, "10.0.0.3", 8080, "v1"),
        ],
        Scope::Mesh,
    );
    moved.version = "v.2".into();
    let t2 = RouteTable::build(&moved, &t1, &opts);
    assert_eq!(t2.built_len(), 1);
    assert_eq!(t2.len(), 2, "v2 is gone");
    let again = t2.lookup(HOST, 9080, "v1").unwrap();
    assert!(Arc::ptr_eq(&v1, &again), "the same destination object");
    assert_eq!(again.targets().len(), 2, "updated in place");

    // A subset the view no longer names is not carried over.
    t2.lookup(HOST, 9080, "").unwrap();
    let only_v2 = view(
        vec![endpoint(EndpointKind::Workload, "10.0.0.2", 8080, "v2")],
        Scope::Mesh,
    );
    let t3 = RouteTable::build(&only_v2, &t2, &opts);
    assert_eq!(
        t3.built_len(),
        1,
        "the port's destination stays, v1's does not"
    );
    assert_eq!(
        t3.lookup(HOST, 9080, "v1").unwrap_err().reason(),
        "unknown_subset"
    );
    let empty = LocalView {
        version: "v.4".into(),
        resources: Default::default(),
    };
    let t4 = RouteTable::build(&empty, &t3, &opts);
    assert_eq!(
        (t4.len(), t4.built_len()),
        (0, 0),
        "the service left the view"
    );
}

#[test]
fn tried_endpoints_are_skipped() {
    let v = view(
        vec![
            endpoint(EndpointKind::Workload, "10.0.0.1", 8080, ""),
            endpoint(EndpointKind::Workload, "10.0.0.2", 8080, ""),
        ],
        Scope::Mesh,
    );
    let t = RouteTable::build(&v, &RouteTable::default(), &RouteOptions::default());
    let d = t.lookup(HOST, 9080, "").unwrap();
    let now = Instant::now();
    let first = d.pick(now, &[]).unwrap();
    let second = d.pick(now, std::slice::from_ref(&first)).unwrap();
    assert_ne!(first.uid, second.uid);
    assert!(d.pick(now, &[first.clone(), second.clone()]).is_none());
}

#[test]
fn targets_are_found_by_uid_in_a_destination_of_few_and_of_many() {
    for n in [2, INDEXED_FROM - 1, INDEXED_FROM, 40] {
        let v = view(
            (0..n)
                .map(|i| endpoint(EndpointKind::Workload, &format!("10.0.1.{i}"), 8080, ""))
                .collect(),
            Scope::Mesh,
        );
        let t = RouteTable::build(&v, &RouteTable::default(), &ejecting_at_the_first_failure());
        let d = t.lookup(HOST, 9080, "").unwrap();
        let now = Instant::now();
        // Every target but the last tried: the last is the only pick left.
        let mut tried = Vec::new();
        for _ in 0..n - 1 {
            tried.push(d.pick(now, &tried).unwrap());
        }
        let last = d.pick(now, &tried).unwrap();
        assert!(tried.iter().all(|t| t.uid != last.uid), "{n} targets");
        tried.push(last);
        assert!(d.pick(now, &tried).is_none(), "{n} targets, all tried");
        // A failure is counted against the target it names, and only that one.
        let failed = tried[n / 2].uid.clone();
        assert!(matches!(
            d.on_connect_failed(&failed, now),
            Some(FailureOutcome::Ejected(_))
        ));
        assert!(d.on_connect_failed("10.9.9.9:8080", now).is_none());
        for _ in 0..2 * n {
            assert_ne!(d.pick(now, &[]).unwrap().uid, failed, "{n} targets");
        }
        // No room held beyond the targets themselves.
        let e = d.endpoints.lock().unwrap();
        assert_eq!(e.targets.capacity(), n, "{n} targets");
        assert_eq!(e.by_uid.is_some(), n >= INDEXED_FROM, "{n} targets");
    }
}

#[test]
fn a_services_subject_alt_names_are_accepted_server_identities_beside_its_endpoints() {
    let mut v = view(
        vec![endpoint(EndpointKind::Workload, "10.0.0.1", 8080, "v1")],
        Scope::Mesh,
    );
    let ViewResource::Service(sv) = v.resources.values_mut().next().unwrap() else {
        unreachable!()
    };
    let sv = Arc::get_mut(sv).unwrap();
    sv.service.subject_alt_names = vec![
        id("postgres").to_string(),
        // Not a SPIFFE ID: the registry reports it as not enforced; the proxy skips it.
        "db.example.com".into(),
    ];
    let t = RouteTable::build(&v, &RouteTable::default(), &RouteOptions::default());
    let d = t.lookup(HOST, 9080, "").unwrap();
    assert_eq!(d.identities(), vec![id("postgres"), id("reviews")]);
    // Each endpoint accepts its own identity and the service's names.
    assert_eq!(
        d.targets()[0].identities,
        vec![id("reviews"), id("postgres")]
    );
}

/// `view` with a DestinationRule's subsets v1 and v2 (by `version`) and a route of
/// `weights` to them.
fn routed_view(endpoints: Vec<ViewEndpoint>, weights: [u32; 2]) -> LocalView {
    let mut v = view(endpoints, Scope::Mesh);
    let host = "reviews.shop.svc.cluster.local";
    for r in v.resources.values_mut() {
        if let ViewResource::Service(sv) = r {
            let sv = Arc::make_mut(sv);
            sv.subsets = ["v1", "v2"]
                .iter()
                .map(|s| Subset {
                    name: s.to_string(),
                    labels: [("version".to_string(), s.to_string())].into(),
                    policy: Default::default(),
                })
                .collect();
            sv.routes = vec![L4Route {
                ports: vec![9080],
                destinations: ["v1", "v2"]
                    .iter()
                    .zip(weights)
                    .map(|(s, weight)| isthmus_proto::model::RouteDestination {
                        host: host.into(),
                        subset: s.to_string(),
                        port: 0,
                        weight,
                    })
                    .collect(),
                ..Default::default()
            }];
        }
    }
    v
}

#[test]
fn a_weighted_route_holds_its_shares_exactly_and_a_remote_subset_goes_to_its_gateway() {
    let mut gw = endpoint(EndpointKind::Gateway, "198.51.100.1", 15443, "");
    gw.subset_weights = [("v2".to_string(), 3)].into();
    let table = RouteTable::build(
        &routed_view(
            vec![endpoint(EndpointKind::Workload, "10.0.0.1", 8080, "v1"), gw],
            [90, 10],
        ),
        &RouteTable::default(),
        &RouteOptions::default(),
    );
    let host = "reviews.shop.svc.cluster.local";
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..1000 {
        let d = table
            .resolve(host, 9080, "", &BTreeMap::new(), None)
            .unwrap();
        *counts.entry(d.key.subset.clone()).or_default() += 1;
    }
    assert_eq!(counts["v1"], 900);
    assert_eq!(counts["v2"], 100);
    // v1 is the local workload only; v2 only behind the gateway, with its subset weight.
    let v1 = table.lookup(host, 9080, "v1").unwrap().targets();
    assert_eq!(v1.len(), 1);
    assert!(!v1[0].via_gateway);
    let v2 = table.lookup(host, 9080, "v2").unwrap().targets();
    assert_eq!(v2.len(), 1);
    assert!(v2[0].via_gateway);
    assert_eq!(v2[0].weight, 3);
    // A named subset is not routed again.
    let d = table
        .resolve(host, 9080, "v1", &BTreeMap::new(), None)
        .unwrap();
    assert_eq!(d.key.subset, "v1");
}

#[test]
fn a_gateway_without_the_subset_behind_it_is_no_target_of_it() {
    let gw = endpoint(EndpointKind::Gateway, "198.51.100.1", 15443, "");
    let table = RouteTable::build(
        &routed_view(
            vec![endpoint(EndpointKind::Workload, "10.0.0.1", 8080, "v1"), gw],
            [0, 100],
        ),
        &RouteTable::default(),
        &RouteOptions::default(),
    );
    let host = "reviews.shop.svc.cluster.local";
    assert!(table.lookup(host, 9080, "v2").unwrap().targets().is_empty());
    // Weight 0 is never chosen.
    for _ in 0..10 {
        let d = table
            .resolve(host, 9080, "", &BTreeMap::new(), None)
            .unwrap();
        assert_eq!(d.key.subset, "v2");
    }
}

#[test]
fn routes_match_the_callers_labels_and_a_missing_destination_is_named() {
    let mut v = routed_view(
        vec![endpoint(EndpointKind::Workload, "10.0.0.1", 8080, "v1")],
        [100, 0],
    );
    for r in v.resources.values_mut() {
        if let ViewResource::Service(sv) = r {
            let sv = Arc::make_mut(sv);
            sv.routes[0].source_labels = [("app".to_string(), "canary".to_string())].into();
            sv.routes[0].destinations[0].host = "nowhere.shop.svc.cluster.local".into();
        }
    }
    let table = RouteTable::build(&v, &RouteTable::default(), &RouteOptions::default());
    let host = "reviews.shop.svc.cluster.local";
    // Not a canary caller: no route, the service itself.
    let d = table
        .resolve(host, 9080, "", &BTreeMap::new(), None)
        .unwrap();
    assert_eq!(d.key.subset, "");
    let canary = [("app".to_string(), "canary".to_string())].into();
    let e = table.resolve(host, 9080, "", &canary, None).unwrap_err();
    assert_eq!(e.reason(), "routed_nowhere");
    assert!(
        e.to_string()
            .contains("nowhere.shop.svc.cluster.local:9080/v1"),
        "{e}"
    );
}

#[test]
fn smooth_weighted_choice_spreads_picks() {
    let c = WeightedChoice::new(vec![5, 1, 1]);
    let picks: Vec<usize> = (0..7).map(|_| c.pick().unwrap()).collect();
    assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
    assert_eq!(WeightedChoice::new(vec![0, 0]).pick(), None);
}

#[test]
fn a_destination_rules_policy_sets_the_limit_timeout_and_ejection_per_port_and_subset() {
    use isthmus_proto::model::OutlierPolicy;
    let mut v = routed_view(
        vec![
            endpoint(EndpointKind::Workload, "10.0.0.1", 8080, "v1"),
            endpoint(EndpointKind::Workload, "10.0.0.2", 8080, "v2"),
        ],
        [50, 50],
    );
    for r in v.resources.values_mut() {
        if let ViewResource::Service(sv) = r {
            let sv = Arc::make_mut(sv);
            sv.policy = TrafficPolicy {
                max_connections: Some(3),
                connect_timeout_ms: Some(250),
                tcp_keepalive: Some(isthmus_proto::traffic::TcpKeepalive {
                    probes: Some(3),
                    ..Default::default()
                }),
                outlier: Some(OutlierPolicy {
                    consecutive_errors: Some(1),
                    base_ejection_ms: Some(60_000),
                    max_ejection_percent: None,
                }),
                ..Default::default()
            }
            .into();
            sv.subsets[1].policy = TrafficPolicy {
                max_connections: Some(1),
                ..Default::default()
            };
        }
    }
    let table = RouteTable::build(&v, &RouteTable::default(), &RouteOptions::default());
    let host = "reviews.shop.svc.cluster.local";
    let all = table.lookup(host, 9080, "").unwrap();
    assert_eq!(all.max_connections(), 3);
    assert_eq!(
        all.connect_timeout(),
        Some(std::time::Duration::from_millis(250))
    );
    assert_eq!(all.tcp_keepalive().and_then(|k| k.probes), Some(3));
    let slots: Vec<Slot> = (0..3).map(|_| all.take_slot().unwrap()).collect();
    assert!(all.take_slot().is_none(), "the fourth is over the limit");
    assert_eq!(all.open_connections(), 3);
    drop(slots);
    assert_eq!(all.open_connections(), 0);
    let v2 = table.lookup(host, 9080, "v2").unwrap();
    assert_eq!(v2.max_connections(), 1, "the subset's own limit");
    assert_eq!(
        v2.connect_timeout(),
        Some(std::time::Duration::from_millis(250))
    );
    // One failed connect ejects (consecutive errors 1).
    let now = Instant::now();
    let t = all.pick(now, &[]).unwrap();
    assert!(matches!(
        all.on_connect_failed(&t.uid, now),
        Some(FailureOutcome::Ejected(_))
    ));
    // Without a rule: the proxy's own settings.
    let plain = RouteTable::build(
        &view(
            vec![endpoint(EndpointKind::Workload, "10.0.0.1", 8080, "v1")],
            Scope::Mesh,
        ),
        &RouteTable::default(),
        &RouteOptions::default(),
    );
    let d = plain.lookup(host, 9080, "").unwrap();
    assert_eq!(d.max_connections(), DEFAULT_MAX_CONNECTIONS_PER_DESTINATION);
    assert_eq!(d.connect_timeout(), None);
}

#[test]
fn a_tls_route_takes_the_server_names_it_lists_before_the_tcp_routes() {
    // The tcp route sends everything to v1; a tls route in front of it sends the canary
    // name to v2.
    let mut v = routed_view(
        vec![
            endpoint(EndpointKind::Workload, "10.0.0.1", 8080, "v1"),
            endpoint(EndpointKind::Workload, "10.0.0.2", 8080, "v2"),
        ],
        [100, 0],
    );
    for r in v.resources.values_mut() {
        if let ViewResource::Service(sv) = r {
            let sv = Arc::make_mut(sv);
            let mut tls = sv.routes[0].clone();
            tls.sni_hosts = vec!["*.canary.example".into()];
            tls.destinations[0].weight = 0;
            tls.destinations[1].weight = 100;
            sv.routes.insert(0, tls);
        }
    }
    let table = RouteTable::build(&v, &RouteTable::default(), &RouteOptions::default());
    let host = "reviews.shop.svc.cluster.local";
    assert!(table.wants_sni(host));
    let none = BTreeMap::new();
    let subset = |sni| {
        table
            .resolve(host, 9080, "", &none, sni)
            .unwrap()
            .key
            .subset
            .clone()
    };
    assert_eq!(subset(Some("api.canary.example")), "v2");
    assert_eq!(subset(Some("api.stable.example")), "v1");
    // Without a name (plaintext, or no SNI), only the tcp routes match.
    assert_eq!(subset(None), "v1");
    // A host without tls routes needs no ClientHello read.
    let plain = RouteTable::build(
        &routed_view(
            vec![endpoint(EndpointKind::Workload, "10.0.0.1", 8080, "v1")],
            [100, 0],
        ),
        &RouteTable::default(),
        &RouteOptions::default(),
    );
    assert!(!plain.wants_sni(host));
}
