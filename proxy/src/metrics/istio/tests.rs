use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use isthmus_proto::model::{
    Address, Health, Locality, Service as CatalogService, ServiceView, ViewEndpoint,
};
use isthmus_proto::TrustDomain;
use prometheus_client::encoding::text::encode;

use super::*;

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::workload(&TrustDomain::new("cluster.local").unwrap(), ns, sa).unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn endpoint(kind: EndpointKind, ip: &str, uid: &str, sa: &str, l: &[(&str, &str)]) -> ViewEndpoint {
    ViewEndpoint {
        kind,
        address: Address::parse(ip).unwrap(),
        ports: [(9080, 8080)].into_iter().collect(),
        network: "network-a".into(),
        cluster: "cluster-a".into(),
        locality: Locality::default(),
        identities: vec![id("shop", sa)],
        weight: 1,
        health: Health::Healthy,
        labels: labels(l).into(),
        uid: uid.into(),
        tunnel_port: 0,
        stale_since_ms: 0,
        subset_weights: Default::default(),
    }
}

/// A view entry for `<name>.shop.svc.cluster.local` with `endpoints` (also used by the
/// inbound's tests).
pub(crate) fn service_view(name: &str, endpoints: Vec<ViewEndpoint>) -> (String, ViewResource) {
    let hostname = format!("{name}.shop.svc.cluster.local");
    let service = CatalogService {
        hostname: hostname.clone(),
        namespace: "shop".into(),
        name: name.into(),
        ..Default::default()
    };
    (
        format!("svc/{hostname}"),
        ViewResource::Service(Arc::new(ServiceView {
            service,
            endpoints,
            ..Default::default()
        })),
    )
}

fn view(services: Vec<(String, ViewResource)>) -> LocalView {
    LocalView {
        version: "v.1".into(),
        resources: services.into_iter().collect(),
    }
}

fn svc(name: &str) -> Service {
    Service {
        hostname: format!("{name}.shop.svc.cluster.local"),
        name: name.into(),
        namespace: "shop".into(),
    }
}

#[test]
fn canonical_service_and_revision_follow_istios_label_order() {
    let all = labels(&[
        ("service.istio.io/canonical-name", "cn"),
        ("app.kubernetes.io/name", "k8s-name"),
        ("app", "app"),
        ("service.istio.io/canonical-revision", "cr"),
        ("app.kubernetes.io/version", "k8s-version"),
        ("version", "v1"),
    ]);
    let p = Peer::from_labels(None, &all, "c1", None);
    assert_eq!(p.canonical_service.as_deref(), Some("cn"));
    assert_eq!(p.canonical_revision.as_deref(), Some("cr"));
    // `*_app` and `*_version` read `app` and `version` first, as Istio does.
    assert_eq!(p.app.as_deref(), Some("app"));
    assert_eq!(p.version.as_deref(), Some("v1"));
    assert_eq!(p.cluster.as_deref(), Some("c1"));

    let k8s = labels(&[
        ("app.kubernetes.io/name", "k8s-name"),
        ("app.kubernetes.io/version", "2.0"),
    ]);
    let p = Peer::from_labels(None, &k8s, "", None);
    assert_eq!(p.canonical_service.as_deref(), Some("k8s-name"));
    assert_eq!(p.canonical_revision.as_deref(), Some("2.0"));
    assert_eq!(p.app.as_deref(), Some("k8s-name"));
    assert_eq!(p.version.as_deref(), Some("2.0"));
    assert_eq!(p.cluster, None, "an empty cluster is unknown");
}

#[test]
fn a_known_workload_without_revision_labels_is_latest_and_without_app_unknown() {
    let p = Peer::from_labels(Some("web"), &BTreeMap::new(), "c1", None);
    assert_eq!(p.workload.as_deref(), Some("web"));
    assert_eq!(
        p.canonical_service.as_deref(),
        Some("web"),
        "falls back to the workload name"
    );
    assert_eq!(p.canonical_revision.as_deref(), Some(LATEST));
    assert_eq!(p.app, None);
    assert_eq!(p.version, None);
}

#[test]
fn the_workload_name_is_the_given_name_then_istios_label_then_the_canonical_service() {
    let l = labels(&[(WORKLOAD_NAME_LABEL, "reviews-v1"), ("app", "reviews")]);
    assert_eq!(
        Peer::from_labels(Some("group"), &l, "", None)
            .workload
            .as_deref(),
        Some("group")
    );
    assert_eq!(
        Peer::from_labels(None, &l, "", None).workload.as_deref(),
        Some("reviews-v1")
    );
    let l = labels(&[("app", "reviews")]);
    assert_eq!(
        Peer::from_labels(None, &l, "", None).workload.as_deref(),
        Some("reviews")
    );
    assert_eq!(
        Peer::from_labels(None, &BTreeMap::new(), "", None).workload,
        None
    );
}

#[test]
fn the_namespace_and_principal_come_from_the_identity() {
    let who = id("shop", "web");
    let p = Peer::from_identity(&who);
    assert_eq!(p.namespace.as_deref(), Some("shop"));
    assert_eq!(p.principal, Some(who.clone()));
    assert_eq!(p.workload, None);
    let p = Peer::from_labels(None, &labels(&[("app", "web")]), "", Some(&who));
    assert_eq!(p.namespace.as_deref(), Some("shop"));
    assert_eq!(p.without_principal().principal, None);
}

fn mesh_view() -> LocalView {
    view(vec![
        service_view(
            "reviews",
            vec![
                endpoint(
                    EndpointKind::Workload,
                    "10.0.0.5",
                    "reviews-1",
                    "reviews",
                    &[("app", "reviews"), ("version", "v2")],
                ),
                endpoint(
                    EndpointKind::Gateway,
                    "192.0.2.1",
                    "gw",
                    "gw",
                    &[("app", "gw")],
                ),
            ],
        ),
        service_view(
            "stats",
            vec![endpoint(
                EndpointKind::Workload,
                "10.0.0.5",
                "reviews-1",
                "reviews",
                &[("app", "reviews"), ("version", "v2")],
            )],
        ),
    ])
}

#[test]
fn a_peer_gets_the_catalogs_labels_only_when_address_and_identity_match() {
    let c = Catalog::build(&mesh_view());
    let ip: IpAddr = "10.0.0.5".parse().unwrap();
    let reviews = id("shop", "reviews");
    let p = c.peer(ip, Some(&reviews));
    assert_eq!(p.workload.as_deref(), Some("reviews"));
    assert_eq!(p.app.as_deref(), Some("reviews"));
    assert_eq!(p.version.as_deref(), Some("v2"));
    assert_eq!(p.canonical_revision.as_deref(), Some("v2"));
    assert_eq!(p.cluster.as_deref(), Some("cluster-a"));
    assert_eq!(p.principal, Some(reviews.clone()));

    // Another identity at the same address: only what the identity says.
    let other = id("billing", "payer");
    assert_eq!(c.peer(ip, Some(&other)), Peer::from_identity(&other));
    // An address the catalog has no workload at.
    let elsewhere: IpAddr = "10.0.0.99".parse().unwrap();
    assert_eq!(
        c.peer(elsewhere, Some(&reviews)),
        Peer::from_identity(&reviews)
    );
    assert_eq!(c.peer(elsewhere, None), Peer::default());
    // A gateway stands for a remote network: it is no workload.
    let gw: IpAddr = "192.0.2.1".parse().unwrap();
    assert_eq!(c.peer(gw, None), Peer::default());
}

#[test]
fn the_service_is_the_one_the_client_named_only_if_the_workload_serves_it() {
    let c = Catalog::build(&mesh_view());
    let ip: IpAddr = "10.0.0.5".parse().unwrap();
    assert_eq!(
        c.service_at(ip, Some("stats.shop.svc.cluster.local")),
        Some(svc("stats"))
    );
    // A name the workload does not serve picks nothing new: the first it serves.
    assert_eq!(
        c.service_at(ip, Some("attacker.example.com")),
        Some(svc("reviews"))
    );
    assert_eq!(c.service_at(ip, None), Some(svc("reviews")));
    assert_eq!(c.service_at("10.0.0.99".parse().unwrap(), None), None);
}

#[test]
fn unknown_ends_are_unknown_and_the_service_falls_back_to_the_canonical_service() {
    let dest = Peer::from_labels(
        Some("ratings"),
        &labels(&[("app", "ratings")]),
        "",
        Some(&id("shop", "ratings")),
    );
    let l = IstioLabels::new(&Traffic {
        reporter: Reporter::destination,
        source: &Peer::default(),
        destination: &dest,
        service: None,
        security: SecurityPolicy::none,
        flags: ResponseFlags::None,
    });
    assert_eq!(l.source_workload, UNKNOWN);
    assert_eq!(l.source_principal, UNKNOWN);
    assert_eq!(
        l.source_canonical_revision, LATEST,
        "as Istio's sidecars write it"
    );
    assert_eq!(l.destination_service, "ratings");
    assert_eq!(l.destination_service_name, "ratings");
    assert_eq!(l.destination_service_namespace, "shop");
    assert_eq!(
        l.destination_principal,
        "spiffe://cluster.local/ns/shop/sa/ratings"
    );
    assert_eq!(l.destination_cluster, UNKNOWN);
    let l = l.with_flags(ResponseFlags::Denied);
    assert_eq!(l.response_flags, ResponseFlags::Denied);
}

/// The exposition as Prometheus scrapes it: Istio's metric names, label names and values.
#[test]
fn the_exposition_has_istios_names_labels_and_values() {
    let mut registry = Registry::default();
    let m = IstioMetrics::register(&mut registry);
    let source = Peer::from_labels(
        Some("web"),
        &labels(&[("app", "web"), ("version", "v1")]),
        "cluster-a",
        Some(&id("shop", "web")),
    );
    let destination = Peer::from_identity(&id("shop", "reviews"));
    let base = IstioLabels::new(&Traffic {
        reporter: Reporter::source,
        source: &source,
        destination: &destination,
        service: Some(&svc("reviews")),
        security: SecurityPolicy::unknown,
        flags: ResponseFlags::None,
    });
    let report = m.open(base.clone());
    report
        .meter()
        .client_to_upstream
        .fetch_add(11, Ordering::Relaxed);
    report
        .meter()
        .upstream_to_client
        .fetch_add(700, Ordering::Relaxed);
    report.add_received(4);
    drop(report);
    m.refused(base.with_flags(ResponseFlags::ConnectFailed));

    let mut text = String::new();
    encode(&mut text, &registry).unwrap();
    let series = |name: &str, flags: &str| {
        format!(
            "{name}{{reporter=\"source\",source_workload=\"web\",source_canonical_service=\"web\",\
             source_canonical_revision=\"v1\",source_workload_namespace=\"shop\",\
             source_principal=\"spiffe://cluster.local/ns/shop/sa/web\",source_app=\"web\",\
             source_version=\"v1\",source_cluster=\"cluster-a\",\
             destination_service=\"reviews.shop.svc.cluster.local\",\
             destination_service_namespace=\"shop\",destination_service_name=\"reviews\",\
             destination_workload=\"unknown\",destination_canonical_service=\"unknown\",\
             destination_canonical_revision=\"latest\",destination_workload_namespace=\"shop\",\
             destination_principal=\"spiffe://cluster.local/ns/shop/sa/reviews\",\
             destination_app=\"unknown\",destination_version=\"unknown\",\
             destination_cluster=\"unknown\",request_protocol=\"tcp\",response_flags=\"{flags}\",\
             connection_security_policy=\"unknown\"}}"
        )
    };
    for line in [
        format!("{} 1", series("istio_tcp_connections_opened_total", "-")),
        format!("{} 1", series("istio_tcp_connections_closed_total", "-")),
        format!("{} 15", series("istio_tcp_received_bytes_total", "-")),
        format!("{} 700", series("istio_tcp_sent_bytes_total", "-")),
        format!(
            "{} 1",
            series("istio_tcp_connections_opened_total", "CONNECT")
        ),
        format!(
            "{} 1",
            series("istio_tcp_connections_closed_total", "CONNECT")
        ),
    ] {
        assert!(text.contains(&line), "missing {line}\nin\n{text}");
    }
}

#[test]
fn a_report_counts_the_close_when_it_is_dropped() {
    let m = IstioMetrics::default();
    let l = IstioLabels::new(&Traffic {
        reporter: Reporter::destination,
        source: &Peer::default(),
        destination: &Peer::default(),
        service: None,
        security: SecurityPolicy::mutual_tls,
        flags: ResponseFlags::None,
    });
    let report = m.open(l.clone());
    assert_eq!(m.opened.get_or_create(&l).get(), 1);
    assert_eq!(m.closed.get_or_create(&l).get(), 0, "open until dropped");
    drop(report);
    assert_eq!(m.closed.get_or_create(&l).get(), 1);
}

#[test]
fn an_endpoint_the_table_chose_is_found_by_uid_even_beside_others_at_its_address() {
    let v = view(vec![
        service_view(
            "reviews",
            vec![endpoint(
                EndpointKind::Workload,
                "10.0.0.5",
                "r-1",
                "reviews",
                &[("app", "reviews")],
            )],
        ),
        service_view(
            "internal",
            vec![endpoint(
                EndpointKind::Workload,
                "10.0.0.5",
                "i-1",
                "internal",
                &[("app", "internal")],
            )],
        ),
    ]);
    let c = Catalog::build(&v);
    let ip: IpAddr = "10.0.0.5".parse().unwrap();
    // By address alone the two disagree: nobody.
    assert_eq!(c.peer(ip, None), Peer::default());
    assert_eq!(c.endpoint("r-1", None).workload.as_deref(), Some("reviews"));
    assert_eq!(
        c.endpoint("i-1", None).workload.as_deref(),
        Some("internal")
    );
    let reviews = id("shop", "reviews");
    let p = c.endpoint("r-1", Some(&reviews));
    assert_eq!(
        (p.app.as_deref(), p.principal.as_ref()),
        (Some("reviews"), Some(&reviews))
    );
    // The server proved another identity than the catalog's: only what it proved.
    let other = id("shop", "intruder");
    assert_eq!(c.endpoint("r-1", Some(&other)), Peer::from_identity(&other));
    assert_eq!(c.endpoint("gone", None), Peer::default());
}

/// The transit family: the edge under Istio's values, the networks and the transport,
/// counted with Istio's `opened` for the same connection; a connection with no transit
/// (the inbound's) is not in it.
#[test]
fn a_connection_with_a_transit_is_counted_by_edge_networks_and_transport() {
    let mut registry = Registry::default();
    let m = IstioMetrics::register(&mut registry);
    let source = Peer::from_labels(Some("web"), &labels(&[]), "cluster-a", None);
    let destination = Peer::from_identity(&id("shop", "reviews"));
    let l = IstioLabels::new(&Traffic {
        reporter: Reporter::source,
        source: &source,
        destination: &destination,
        service: Some(&svc("reviews")),
        security: SecurityPolicy::unknown,
        flags: ResponseFlags::None,
    });
    let via = |transport| Transit {
        source_network: "network-a".into(),
        destination_network: "network-b".into(),
        transport,
    };
    for _ in 0..2 {
        drop(m.open_transit(l.clone(), via(Transport::SniGateway)));
    }
    drop(m.open_transit(
        l.clone(),
        Transit {
            source_network: String::new(),
            ..via(Transport::Direct)
        },
    ));
    drop(m.open(l.clone()));
    assert_eq!(
        m.opened.get_or_create(&l).get(),
        4,
        "Istio's count has them all"
    );

    let mut text = String::new();
    encode(&mut text, &registry).unwrap();
    let series = |source_network: &str, transport: &str| {
        format!(
            "isthmus_tcp_connections_opened_total{{reporter=\"source\",source_workload=\"web\",\
             source_workload_namespace=\"unknown\",source_cluster=\"cluster-a\",\
             source_network=\"{source_network}\",\
             destination_service=\"reviews.shop.svc.cluster.local\",\
             destination_workload=\"unknown\",destination_workload_namespace=\"shop\",\
             destination_cluster=\"unknown\",destination_network=\"network-b\",\
             transport=\"{transport}\"}}"
        )
    };
    for line in [
        format!("{} 2", series("network-a", "sni-gateway")),
        format!("{} 1", series("unknown", "direct")),
    ] {
        assert!(text.contains(&line), "missing {line}\nin\n{text}");
    }
    assert_eq!(
        text.matches("isthmus_tcp_connections_opened_total{")
            .count(),
        2,
        "{text}"
    );
}

/// A call site's connections with the same parts share one label set, built for the first;
/// a change to what labels are read from (here the catalog) has the next one built again,
/// so that no connection is counted under labels of a catalog that is gone.
#[test]
fn memoised_labels_are_built_once_per_parts_and_again_after_the_catalog_changes() {
    let m = IstioMetrics::default();
    let reviews = |app: &str| {
        view(vec![service_view(
            "reviews",
            vec![endpoint(
                EndpointKind::Workload,
                "10.0.0.5",
                "r-1",
                "reviews",
                &[("app", app)],
            )],
        )])
    };
    m.set_catalog(Catalog::build(&reviews("reviews")));
    // The gateway's labels of a connection to `uid`, as its call site builds them.
    let labels_to = |uid: &str| {
        IstioLabels::new(&Traffic {
            reporter: Reporter::source,
            source: &Peer::default(),
            destination: &m.catalog().endpoint(uid, None),
            service: Some(&svc("reviews")),
            security: SecurityPolicy::unknown,
            flags: ResponseFlags::None,
        })
    };
    let built = std::cell::Cell::new(0);
    let open = |uid: &str| {
        m.open_memo("test", &["reviews", uid], || {
            built.set(built.get() + 1);
            (labels_to(uid), None)
        })
    };
    let app_of = |app: &str| {
        let l = labels_to("r-1");
        assert_eq!(l.destination_app, app);
        l
    };
    for _ in 0..3 {
        drop(open("r-1"));
    }
    assert_eq!(built.get(), 1, "built for the first connection only");
    let first = app_of("reviews");
    assert_eq!(m.opened.get_or_create(&first).get(), 3);
    assert_eq!(m.closed.get_or_create(&first).get(), 3);
    // Other parts: another label set.
    drop(open("gone"));
    assert_eq!(built.get(), 2);

    m.set_catalog(Catalog::build(&reviews("reviews-v2")));
    drop(open("r-1"));
    assert_eq!(built.get(), 3, "built again for the new catalog");
    let second = app_of("reviews-v2");
    assert_eq!(m.opened.get_or_create(&second).get(), 1);
    assert_eq!(
        m.opened.get_or_create(&first).get(),
        3,
        "nothing more under the old labels"
    );
}
