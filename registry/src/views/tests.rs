use super::*;
use crate::catalog::tests::{svc, wl};
use isthmus_proto::model::{Gateway, Locality, Resource};

fn net(id: &str, gws: &[&str]) -> OwnedResource {
    OwnedResource {
        origin: "test".into(),
        resource: std::sync::Arc::new(Resource::Network(Network {
            id: id.into(),
            gateways: gws
                .iter()
                .map(|a| Gateway {
                    address: a.parse().unwrap(),
                    sni_port: 15443,
                    tunnel_port: 15008,
                    locality: Locality::default(),
                })
                .collect(),
            cidrs: vec![],
        })),
    }
}

fn service_entry(view: &View, host: &str) -> ServiceView {
    let st = view.state.read().unwrap();
    let pbv = st
        .entries
        .get(&service_view_key(host))
        .expect("service in view")
        .decode();
    match ViewResource::try_from(pbv).unwrap() {
        ViewResource::Service(s) => (*s).clone(),
        _ => panic!("not a service"),
    }
}

/// 3 local endpoints + 6 remote behind 2 gateways -> 3 entries of weight 1 and 2 gateway
/// entries of weight 3 each.
fn split_horizon_catalog() -> Views {
    let views = Views::default();
    let mut up = vec![
        net("net-a", &["192.0.2.10"]),
        net("net-b", &["198.51.100.10", "198.51.100.11"]),
        svc("web.shop", "shop", "c", "web"),
    ];
    for i in 0..3 {
        up.push(wl(
            &format!("a{i}"),
            "shop",
            "web",
            &format!("10.0.0.{i}"),
            "net-a",
        ));
    }
    for i in 0..6 {
        // Same addresses as in net-a: overlapping pod CIDRs are allowed.
        up.push(wl(
            &format!("b{i}"),
            "shop",
            "web",
            &format!("10.0.0.{i}"),
            "net-b",
        ));
    }
    views.apply(up, vec![], vec![]);
    views
}

#[test]
fn split_horizon_weights() {
    let views = split_horizon_catalog();
    let a = views.view(&ViewKey {
        network: "net-a".into(),
        gateway: false,
        namespace: None,
        cluster: None,
        export: false,
    });
    let sv = service_entry(&a, "web.shop");
    let local: Vec<_> = sv
        .endpoints
        .iter()
        .filter(|e| e.kind == EndpointKind::Workload)
        .collect();
    let gws: Vec<_> = sv
        .endpoints
        .iter()
        .filter(|e| e.kind == EndpointKind::Gateway)
        .collect();
    assert_eq!(local.len(), 3);
    assert!(local.iter().all(|e| e.weight == 1 && e.network == "net-a"));
    assert_eq!(gws.len(), 2);
    assert_eq!(
        gws.iter()
            .map(|e| (e.address.to_string(), e.weight))
            .collect::<Vec<_>>(),
        vec![
            ("198.51.100.10".to_string(), 3),
            ("198.51.100.11".to_string(), 3)
        ]
    );
    assert!(gws
        .iter()
        .all(|g| g.ports.get(&80) == Some(&15443) && g.tunnel_port == 15008));
    assert_eq!(
        gws[0].identities.len(),
        1,
        "identities behind the gateway are carried for end-to-end verification"
    );
    // Local entries keep their own target ports.
    assert_eq!(local[0].ports.get(&80), Some(&8080));

    // From net-b: 6 local, one gateway entry of weight 3 for net-a.
    let b = views.view(&ViewKey {
        network: "net-b".into(),
        gateway: false,
        namespace: None,
        cluster: None,
        export: false,
    });
    let sv = service_entry(&b, "web.shop");
    assert_eq!(
        sv.endpoints
            .iter()
            .filter(|e| e.kind == EndpointKind::Workload)
            .count(),
        6
    );
    let gws: Vec<_> = sv
        .endpoints
        .iter()
        .filter(|e| e.kind == EndpointKind::Gateway)
        .map(|e| (e.address.to_string(), e.weight))
        .collect();
    assert_eq!(gws, vec![("192.0.2.10".to_string(), 3)]);
}

#[test]
fn gateway_view_has_only_local_endpoints() {
    let views = split_horizon_catalog();
    let g = views.view(&ViewKey {
        network: "net-b".into(),
        gateway: true,
        namespace: None,
        cluster: None,
        export: false,
    });
    let sv = service_entry(&g, "web.shop");
    assert_eq!(sv.endpoints.len(), 6);
    assert!(sv
        .endpoints
        .iter()
        .all(|e| e.kind == EndpointKind::Workload && e.network == "net-b"));
}

#[test]
fn unhealthy_remote_endpoints_do_not_count_and_gatewayless_networks_contribute_nothing() {
    let views = split_horizon_catalog();
    let a = views.view(&ViewKey {
        network: "net-a".into(),
        gateway: false,
        namespace: None,
        cluster: None,
        export: false,
    });
    // Two of net-b's endpoints go unhealthy: 4 left -> 2 + 2.
    let mut ups = Vec::new();
    for i in 0..2 {
        let mut r = wl(
            &format!("b{i}"),
            "shop",
            "web",
            &format!("10.0.0.{i}"),
            "net-b",
        );
        if let Resource::Workload(w) = std::sync::Arc::make_mut(&mut r.resource) {
            w.health = Health::Unhealthy;
        }
        ups.push(r);
    }
    // A third network with endpoints but no gateway.
    ups.push(wl("c0", "shop", "web", "10.9.0.1", "net-c"));
    views.apply(ups, vec![], vec![]);
    let sv = service_entry(&a, "web.shop");
    let gws: Vec<_> = sv
        .endpoints
        .iter()
        .filter(|e| e.kind == EndpointKind::Gateway)
        .map(|e| (e.network.as_str(), e.weight))
        .collect();
    assert_eq!(gws, vec![("net-b", 2), ("net-b", 2)]);
    assert!(!sv
        .endpoints
        .iter()
        .any(|e| e.network == "net-c" || e.address == "10.9.0.1"));
    // Removing net-b's Network resource (its gateways) removes its entries.
    views.apply(vec![], vec!["Network//net-b".into()], vec![]);
    let sv = service_entry(&a, "web.shop");
    assert!(sv
        .endpoints
        .iter()
        .all(|e| e.kind == EndpointKind::Workload));
}

#[test]
fn versions_history_and_catchup() {
    let views = split_horizon_catalog();
    let a = views.view(&ViewKey {
        network: "net-a".into(),
        gateway: false,
        namespace: None,
        cluster: None,
        export: false,
    });
    let s0 = a.seq();
    // A no-op change publishes nothing.
    views.apply(
        vec![wl("a0", "shop", "web", "10.0.0.0", "net-a")],
        vec![],
        vec![],
    );
    assert_eq!(a.seq(), s0);
    views.apply(
        vec![wl("a9", "shop", "web", "10.0.0.9", "net-a")],
        vec![],
        vec![],
    );
    views.apply(vec![svc("db.shop", "shop", "c", "db")], vec![], vec![]);
    assert_eq!(a.seq(), s0 + 2);
    match a.catchup(&Resume::at(s0)) {
        Catchup::Delta {
            seq,
            upserts,
            removals,
            ..
        } => {
            assert_eq!(seq, s0 + 2);
            let keys: Vec<_> = upserts.iter().map(|u| u.decode().key).collect();
            assert_eq!(keys, vec!["svc/db.shop", "svc/web.shop"]);
            assert!(removals.is_empty());
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        a.catchup(&Resume::at(s0 + 2)),
        Catchup::UpToDate { .. }
    ));
    assert!(
        matches!(a.catchup(&Resume::at(s0 + 5)), Catchup::Snapshot { .. }),
        "a version from the future"
    );
    assert!(matches!(
        a.catchup(&Resume::default()),
        Catchup::Snapshot { .. }
    ));
    let v = a.version();
    assert_eq!(a.parse_version(&v).seq, Some(s0 + 2));
    assert_eq!(a.parse_version("other.7").seq, None);
    assert_eq!(
        a.parse_version(&v.replacen(&a.id, "0123456789ab", 1)).seq,
        None,
        "another view's sequence numbers mean nothing here"
    );
}

#[test]
fn equal_content_has_an_equal_digest_whatever_the_history() {
    // Two registries reach the same catalog by different paths.
    let one = split_horizon_catalog();
    let two = Views::default();
    let key = ViewKey {
        network: "net-a".into(),
        gateway: false,
        namespace: None,
        cluster: None,
        export: false,
    };
    let v2 = two.view(&key);
    two.apply(vec![svc("db.shop", "shop", "c", "db")], vec![], vec![]);
    let one_v = one.view(&key);
    two.apply(vec![], vec!["Service/c/shop/db.shop/db".into()], vec![]);
    let mut up = vec![svc("web.shop", "shop", "c", "web")];
    for i in (0..3).rev() {
        up.push(wl(
            &format!("a{i}"),
            "shop",
            "web",
            &format!("10.0.0.{i}"),
            "net-a",
        ));
    }
    for i in 0..6 {
        up.push(wl(
            &format!("b{i}"),
            "shop",
            "web",
            &format!("10.0.0.{i}"),
            "net-b",
        ));
    }
    up.push(net("net-b", &["198.51.100.10", "198.51.100.11"]));
    up.push(net("net-a", &["192.0.2.10"]));
    two.apply(up, vec![], vec![]);
    let d1 = one_v.state.read().unwrap().digest;
    let d2 = v2.state.read().unwrap().digest;
    assert_ne!(d1, [0; 16]);
    assert_eq!(d1, d2);
    // A subscriber of the first, resuming on the second: nothing to resend.
    let resume = v2.parse_version(&one_v.version());
    assert_eq!(resume.seq, None);
    assert!(matches!(v2.catchup(&resume), Catchup::UpToDate { .. }));
    // One change later the digests part.
    two.apply(
        vec![wl("a9", "shop", "web", "10.0.0.9", "net-a")],
        vec![],
        vec![],
    );
    assert!(matches!(v2.catchup(&resume), Catchup::Snapshot { .. }));
}

#[test]
fn history_is_bounded_and_old_resumes_get_a_snapshot() {
    let views = Views::new(4);
    let a = views.view(&ViewKey {
        network: "net-a".into(),
        gateway: false,
        namespace: None,
        cluster: None,
        export: false,
    });
    views.apply(vec![svc("web.shop", "shop", "c", "web")], vec![], vec![]);
    for i in 0..10 {
        views.apply(
            vec![wl(&format!("w{i}"), "shop", "web", "10.0.0.1", "net-a")],
            vec![],
            vec![],
        );
    }
    let (len, seq) = {
        let st = a.state.read().unwrap();
        (st.history.len(), st.seq)
    };
    assert_eq!(len, 4);
    assert!(matches!(
        a.catchup(&Resume::at(1)),
        Catchup::Snapshot { .. }
    ));
    assert!(matches!(
        a.catchup(&Resume::at(seq - 4)),
        Catchup::Delta { .. }
    ));
    assert!(matches!(
        a.catchup(&Resume::at(seq - 5)),
        Catchup::Snapshot { .. }
    ));
}

#[test]
fn removed_service_is_a_removal() {
    let views = split_horizon_catalog();
    let a = views.view(&ViewKey {
        network: "net-a".into(),
        gateway: false,
        namespace: None,
        cluster: None,
        export: false,
    });
    let s0 = a.seq();
    views.apply(vec![], vec!["Service/c/shop/web.shop/web".into()], vec![]);
    match a.catchup(&Resume::at(s0)) {
        Catchup::Delta {
            removals, upserts, ..
        } => {
            assert_eq!(removals, vec!["svc/web.shop".to_string()]);
            assert!(upserts.is_empty());
        }
        other => panic!("{other:?}"),
    }
}

/// What ingest does: plan the VIPs the catalog's hostnames want, then apply both together.
fn apply_with_vips(views: &Views, upserts: Vec<OwnedResource>) {
    let plan = views.with_catalog_and_vips(|_, vips| {
        let wants =
            crate::vips::wants_by_hostname(upserts.iter().filter_map(|r| match &*r.resource {
                Resource::Service(s) => Some(s),
                _ => None,
            }));
        vips.plan(&wants, std::time::SystemTime::now())
    });
    assert!(plan.failures.is_empty(), "{:?}", plan.failures);
    views.apply(upserts, vec![], plan.changes);
}

fn with_service(r: OwnedResource, f: impl FnOnce(&mut Service)) -> OwnedResource {
    let mut r = r;
    if let Resource::Service(s) = Arc::make_mut(&mut r.resource) {
        f(s);
    }
    r
}

#[test]
fn service_entry_carries_its_allocated_vips_in_every_view() {
    let views = split_horizon_catalog();
    let keys = [
        ViewKey {
            network: "net-a".into(),
            gateway: false,
            namespace: None,
            cluster: None,
            export: false,
        },
        ViewKey {
            network: "net-b".into(),
            gateway: true,
            namespace: None,
            cluster: None,
            export: false,
        },
    ];
    let before: Vec<_> = keys.iter().map(|k| views.view(k)).collect();
    apply_with_vips(&views, vec![svc("web.shop", "shop", "c", "web")]);
    // A view built after the allocation carries it too.
    let late = views.view(&ViewKey {
        network: "net-c".into(),
        gateway: false,
        namespace: None,
        cluster: None,
        export: false,
    });
    let alloc = views
        .with_vips(|v| v.active("web.shop").cloned())
        .expect("allocated");
    for view in before.iter().chain([&late]) {
        let sv = service_entry(view, "web.shop");
        assert_eq!(sv.service.allocated_addresses, alloc.addresses());
        let v4: std::net::Ipv4Addr = sv.service.allocated_addresses[0].parse().unwrap();
        let v6: std::net::Ipv6Addr = sv.service.allocated_addresses[1].parse().unwrap();
        assert_eq!(&v4.octets()[..2], &[240, 240]);
        assert_eq!(&v6.segments()[..3], &[0x2001, 2, 0]);
    }
    // The catalog's resource stays as the source wrote it.
    views.with_catalog(|c| {
        assert!(c.service_defs("web.shop")[0].allocated_addresses.is_empty());
    });

    // Released: the entry loses it, though the table keeps it for the grace period.
    let plan = views.with_vips(|v| {
        v.plan(
            &[("web.shop".to_string(), false)].into(),
            std::time::SystemTime::now(),
        )
    });
    views.apply(vec![], vec![], plan.changes);
    assert!(service_entry(&before[0], "web.shop")
        .service
        .allocated_addresses
        .is_empty());
    assert!(views.with_vips(|v| v.get("web.shop").is_some()));
}

#[test]
fn opted_out_service_has_no_vip_in_its_entry() {
    let views = Views::default();
    let a = views.view(&ViewKey {
        network: "net-a".into(),
        gateway: false,
        namespace: None,
        cluster: None,
        export: false,
    });
    apply_with_vips(
        &views,
        vec![with_service(svc("web.shop", "shop", "c", "web"), |s| {
            s.labels.insert(
                crate::vips::VIP_LABEL.into(),
                crate::vips::VIP_LABEL_NONE.into(),
            );
        })],
    );
    assert!(service_entry(&a, "web.shop")
        .service
        .allocated_addresses
        .is_empty());
    assert!(views.with_vips(|v| v.is_empty()));
}

#[test]
fn service_with_its_own_addresses_has_no_vip_in_its_entry() {
    let views = Views::default();
    let a = views.view(&ViewKey {
        network: "net-a".into(),
        gateway: false,
        namespace: None,
        cluster: None,
        export: false,
    });
    let own = with_service(svc("web.shop", "shop", "c", "web"), |s| {
        s.addresses.push(isthmus_proto::model::ServiceAddress {
            cluster: String::new(),
            address: "10.96.0.10".into(),
        });
    });
    apply_with_vips(&views, vec![own]);
    let sv = service_entry(&a, "web.shop");
    assert!(sv.service.allocated_addresses.is_empty());
    assert_eq!(sv.service.addresses.len(), 1);
    assert!(views.with_vips(|v| v.is_empty()));

    // Even with an allocation in the table (say, from before the addresses were added),
    // an entry whose definitions carry addresses shows none.
    let plan = views.with_vips(|v| {
        v.plan(
            &[("web.shop".to_string(), true)].into(),
            std::time::SystemTime::now(),
        )
    });
    views.apply(vec![], vec![], plan.changes);
    assert!(views.with_vips(|v| v.active("web.shop").is_some()));
    assert!(service_entry(&a, "web.shop")
        .service
        .allocated_addresses
        .is_empty());
}

fn ns_view(views: &Views, network: &str, ns: &str) -> Arc<View> {
    views.view(&ViewKey::workload(network, Some(ns.into())))
}

fn has_entry(view: &View, host: &str) -> bool {
    view.state
        .read()
        .unwrap()
        .entries
        .contains_key(&service_view_key(host))
}

fn exported(r: OwnedResource, to: &[&str]) -> OwnedResource {
    with_service(r, |s| {
        s.export_to = ExportTo::from_wire(
            &to.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
            &s.namespace.clone(),
        )
    })
}

/// The addresses of the workload endpoints of `host` in `view`.
fn workload_addresses(view: &View, host: &str) -> Vec<String> {
    service_entry(view, host)
        .endpoints
        .iter()
        .filter(|e| e.kind == EndpointKind::Workload)
        .map(|e| e.address.to_string())
        .collect()
}

/// `db.example.com` defined in shop (endpoint 10.0.0.1) and books (10.0.0.2), both on
/// net-a, with the given exportTo lists.
fn db_in_two_namespaces(shop: &[&str], books: &[&str]) -> Views {
    let views = Views::default();
    apply_with_vips(
        &views,
        vec![
            net("net-a", &["192.0.2.10"]),
            exported(svc("db.example.com", "shop", "c", "db"), shop),
            exported(svc("db.example.com", "books", "c", "db"), books),
            wl("s1", "shop", "db", "10.0.0.1", "net-a"),
            wl("b1", "books", "db", "10.0.0.2", "net-a"),
        ],
    );
    views
}

#[test]
fn same_hostname_in_two_namespaces_each_namespace_sees_its_own() {
    let views = db_in_two_namespaces(&[], &[]);
    let host = "db.example.com";
    assert_eq!(
        workload_addresses(&ns_view(&views, "net-a", "shop"), host),
        ["10.0.0.1"]
    );
    assert_eq!(
        workload_addresses(&ns_view(&views, "net-a", "books"), host),
        ["10.0.0.2"]
    );
    // A third namespace sees both: the first by name, the same in every registry.
    assert_eq!(
        workload_addresses(&ns_view(&views, "net-a", "web"), host),
        ["10.0.0.2"]
    );
    let gw = views.view(&ViewKey::gateway("net-a"));
    assert_eq!(workload_addresses(&gw, host), ["10.0.0.2"]);
    // One VIP for the hostname, in both namespaces' entries; each proxy routes it to the
    // definition its namespace sees.
    let shop = service_entry(&ns_view(&views, "net-a", "shop"), host);
    let books = service_entry(&ns_view(&views, "net-a", "books"), host);
    assert_eq!(shop.service.namespace, "shop");
    assert_eq!(books.service.namespace, "books");
    assert_eq!(shop.service.allocated_addresses.len(), 2);
    assert_eq!(
        shop.service.allocated_addresses,
        books.service.allocated_addresses
    );

    // Removing shop's definition hands shop the other namespace's.
    views.apply(
        vec![],
        vec!["Service/c/shop/db.example.com/db".into()],
        vec![],
    );
    assert_eq!(
        workload_addresses(&ns_view(&views, "net-a", "shop"), host),
        ["10.0.0.2"]
    );
}

#[test]
fn export_to_decides_which_namespaces_see_a_definition() {
    let host = "db.example.com";
    // books keeps its definition to itself: shop and web see only shop's.
    let views = db_in_two_namespaces(&[], &["."]);
    assert_eq!(
        workload_addresses(&ns_view(&views, "net-a", "books"), host),
        ["10.0.0.2"]
    );
    assert_eq!(
        workload_addresses(&ns_view(&views, "net-a", "web"), host),
        ["10.0.0.1"]
    );
    // A definition that names a namespace is preferred there over a public one, as Istio
    // lists services exported to a namespace before public ones.
    let views = db_in_two_namespaces(&["web"], &[]);
    assert_eq!(
        workload_addresses(&ns_view(&views, "net-a", "web"), host),
        ["10.0.0.1"]
    );
    assert_eq!(
        workload_addresses(&ns_view(&views, "net-a", "other"), host),
        ["10.0.0.2"]
    );
    // Not exported to its own namespace: shop sees books' instead.
    assert_eq!(
        workload_addresses(&ns_view(&views, "net-a", "shop"), host),
        ["10.0.0.2"]
    );
    // `~`: nobody sees it, not even its own namespace; and books' is for books only.
    let views = db_in_two_namespaces(&["~"], &["."]);
    assert!(!has_entry(&ns_view(&views, "net-a", "shop"), host));
    assert!(!has_entry(&ns_view(&views, "net-a", "web"), host));
    assert_eq!(
        workload_addresses(&ns_view(&views, "net-a", "books"), host),
        ["10.0.0.2"]
    );
    // The gateway holds books' (exported to someone) but marked as not for every namespace,
    // so it does not route it from other networks.
    let gw = service_entry(&views.view(&ViewKey::gateway("net-a")), host);
    assert_eq!(gw.service.namespace, "books");
    assert!(!gw.service.export_to.is_public());
    // Only `~` everywhere: no view has the hostname.
    let views = db_in_two_namespaces(&["~"], &["~"]);
    assert!(!has_entry(&views.view(&ViewKey::gateway("net-a")), host));
    assert!(!has_entry(&ns_view(&views, "net-a", "books"), host));
}

#[test]
fn a_definition_for_some_namespaces_stays_on_its_network() {
    // web.shop has 3 endpoints on net-a and 6 on net-b (behind its two gateways).
    let views = split_horizon_catalog();
    let a = ns_view(&views, "net-a", "shop");
    let gateways = |v: &View| {
        service_entry(v, "web.shop")
            .endpoints
            .iter()
            .filter(|e| e.kind == EndpointKind::Gateway)
            .count()
    };
    assert_eq!(
        gateways(&a),
        2,
        "public: other networks through their gateways"
    );
    let restricted = exported(svc("web.shop", "shop", "c", "web"), &["."]);
    views.apply(vec![restricted], vec![], vec![]);
    assert_eq!(
        gateways(&a),
        0,
        "only what every namespace may see crosses networks"
    );
    assert_eq!(workload_addresses(&a, "web.shop").len(), 3);
    // Same-network endpoints of every cluster stay: `.` is the namespace, not the cluster.
    assert!(!has_entry(&ns_view(&views, "net-a", "web"), "web.shop"));
}

#[test]
fn a_subscriber_sees_the_namespace_its_certificate_names() {
    let id = SpiffeId::parse("spiffe://td/ns/shop/sa/web").unwrap();
    let node = |kind| Node {
        id: "n".into(),
        kind,
        network: "net-a".into(),
        ..Default::default()
    };
    for kind in [NodeKind::Workload, NodeKind::Vm, NodeKind::Dns] {
        assert_eq!(
            ViewKey::for_subscriber(&node(kind), &id),
            ViewKey::workload("net-a", Some("shop".into()))
        );
    }
    assert_eq!(
        ViewKey::for_subscriber(&node(NodeKind::Gateway), &id),
        ViewKey::gateway("net-a")
    );
    assert_eq!(
        ViewKey::for_subscriber(&node(NodeKind::Ctl), &id),
        ViewKey::workload("net-a", None)
    );
    assert_eq!(
        ViewKey::workload("net-a", Some("shop".into())).to_string(),
        "net-a/workload/shop"
    );
}

#[test]
fn resolution_none_and_istio_opt_out_have_no_vip_in_their_entry() {
    let views = Views::default();
    let a = views.view(&ViewKey::workload("net-a", None));
    let none = with_service(svc("pypi.org", "shop", "c", "pypi"), |s| {
        s.resolution = isthmus_proto::model::Resolution::None;
        s.selector.clear();
    });
    let istio_out = with_service(svc("db.shop", "shop", "c", "db"), |s| {
        s.labels
            .insert(crate::vips::ISTIO_AUTOALLOCATE_LABEL.into(), "false".into());
    });
    apply_with_vips(&views, vec![none, istio_out]);
    for host in ["pypi.org", "db.shop"] {
        assert!(
            service_entry(&a, host)
                .service
                .allocated_addresses
                .is_empty(),
            "{host}"
        );
    }
    assert!(views.with_vips(|v| v.is_empty()));
}

#[test]
fn two_service_entries_of_one_namespace_for_one_host_are_merged_as_istio_merges_them() {
    let views = Views::default();
    let http = svc("shared.shop", "shop", "c", "shared");
    let tls = with_service(svc("shared.shop", "shop", "c", "shared"), |s| {
        s.name = "shared-tls".into();
        s.ports[0].number = 443;
        s.ports[0].name = "tls".into();
        s.ports[0].protocol = "TLS".into();
    });
    assert_ne!(http.resource.key(), tls.resource.key());
    apply_with_vips(&views, vec![http, tls]);
    let a = views.view(&ViewKey {
        network: "net-a".into(),
        gateway: false,
        namespace: Some("shop".into()),
        cluster: None,
        export: false,
    });
    let merged = service_entry(&a, "shared.shop");
    let ports: Vec<u16> = merged.service.ports.iter().map(|p| p.number).collect();
    assert_eq!(ports, [80, 443]);
    // Removing one entry leaves the other's port.
    views.apply(
        vec![],
        vec!["Service/c/shop/shared.shop/shared-tls".into()],
        vec![],
    );
    let ports: Vec<u16> = service_entry(&a, "shared.shop")
        .service
        .ports
        .iter()
        .map(|p| p.number)
        .collect();
    assert_eq!(ports, [80]);
}

/// `resource` with its cluster (and, for a Service, its scope) changed.
fn in_cluster(r: OwnedResource, cluster: &str, local: bool) -> OwnedResource {
    let resource = match &*r.resource {
        Resource::Service(s) => Resource::Service(Service {
            cluster: cluster.into(),
            scope: if local {
                Scope::ClusterLocal
            } else {
                Scope::Mesh
            },
            ..s.clone()
        }),
        Resource::Workload(w) => Resource::Workload(Workload {
            cluster: cluster.into(),
            name: format!("{}-{cluster}", w.name),
            ..w.clone()
        }),
        other => other.clone(),
    };
    OwnedResource::new(r.origin, resource)
}

#[test]
fn a_cluster_local_service_is_seen_only_by_its_own_cluster_s_subscribers() {
    let views = Views::default();
    views.apply(
        vec![
            in_cluster(svc("dns.sys", "sys", "c", "dns"), "a", true),
            in_cluster(svc("dns.sys", "sys", "c", "dns"), "b", true),
            in_cluster(wl("d", "sys", "dns", "10.0.0.1", "net-a"), "a", false),
            in_cluster(wl("d", "sys", "dns", "10.0.0.2", "net-a"), "b", false),
        ],
        vec![],
        vec![],
    );
    let addresses = |key: ViewKey| -> Option<Vec<String>> {
        let view = views.view(&key);
        let present = view
            .state
            .read()
            .unwrap()
            .entries
            .contains_key(&service_view_key("dns.sys"));
        present.then(|| {
            service_entry(&view, "dns.sys")
                .endpoints
                .iter()
                .map(|e| e.address.to_string())
                .collect()
        })
    };
    let ns = || Some("sys".to_string());
    assert_eq!(
        addresses(ViewKey::workload("net-a", ns()).in_cluster("a")),
        Some(vec!["10.0.0.1".to_string()])
    );
    assert_eq!(
        addresses(ViewKey::workload("net-a", ns()).in_cluster("b")),
        Some(vec!["10.0.0.2".to_string()])
    );
    // A cluster that does not define it does not see it at all.
    assert_eq!(
        addresses(ViewKey::workload("net-a", ns()).in_cluster("c")),
        None
    );
    // An operator's view (no cluster) shows every defining cluster's endpoints.
    assert_eq!(
        addresses(ViewKey::workload("net-a", ns())),
        Some(vec!["10.0.0.1".to_string(), "10.0.0.2".to_string()])
    );
}

#[test]
fn stale_endpoints_say_since_when_and_a_gateway_carries_the_oldest_behind_it() {
    let views = Views::default();
    let stale = |r: OwnedResource, since: i64| -> OwnedResource {
        let Resource::Workload(w) = &*r.resource else {
            unreachable!()
        };
        OwnedResource::new(
            r.origin.clone(),
            Resource::Workload(Workload {
                stale_since_ms: since,
                ..w.clone()
            }),
        )
    };
    views.apply(
        vec![
            net("net-b", &["198.51.100.10"]),
            svc("web.shop", "shop", "c", "web"),
            stale(wl("a0", "shop", "web", "10.0.0.1", "net-a"), 1_000),
            stale(wl("b0", "shop", "web", "10.1.0.1", "net-b"), 5_000),
            stale(wl("b1", "shop", "web", "10.1.0.2", "net-b"), 3_000),
            wl("b2", "shop", "web", "10.1.0.3", "net-b"),
        ],
        vec![],
        vec![],
    );
    let view = views.view(&ViewKey::workload("net-a", None));
    let sv = service_entry(&view, "web.shop");
    let stale_of = |kind: EndpointKind| {
        sv.endpoints
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| e.stale_since_ms)
    };
    assert_eq!(stale_of(EndpointKind::Workload), Some(1_000));
    assert_eq!(stale_of(EndpointKind::Gateway), Some(3_000));
}

#[test]
fn a_workload_endpoint_carries_the_workloads_own_tunnel_port() {
    let views = Views::default();
    let mut tunneled = wl("a0", "shop", "web", "10.0.0.1", "net-a");
    if let Resource::Workload(w) = Arc::make_mut(&mut tunneled.resource) {
        w.tunnel_port = 15008;
    }
    views.apply(
        vec![
            net("net-b", &["198.51.100.10"]),
            svc("web.shop", "shop", "c", "web"),
            tunneled,
            wl("a1", "shop", "web", "10.0.0.2", "net-a"),
            wl("b0", "shop", "web", "10.1.0.1", "net-b"),
        ],
        vec![],
        vec![],
    );
    let tunnel_ports = |key: ViewKey| -> Vec<(EndpointKind, String, u16)> {
        service_entry(&views.view(&key), "web.shop")
            .endpoints
            .iter()
            .map(|e| (e.kind, e.address.to_string(), e.tunnel_port))
            .collect()
    };
    assert_eq!(
        tunnel_ports(ViewKey::workload("net-a", None)),
        [
            (EndpointKind::Workload, "10.0.0.1".to_string(), 15008),
            (EndpointKind::Workload, "10.0.0.2".to_string(), 0),
            // Behind a gateway: the gateway's tunnel port.
            (EndpointKind::Gateway, "198.51.100.10".to_string(), 15008),
        ]
    );
    // Peers import the workload as it is, tunnel port included.
    assert_eq!(
        tunnel_ports(ViewKey::export()),
        [
            (EndpointKind::Workload, "10.0.0.1".to_string(), 15008),
            (EndpointKind::Workload, "10.0.0.2".to_string(), 0),
            (EndpointKind::Workload, "10.1.0.1".to_string(), 0),
        ]
    );
}

/// A view entry is kept encoded and decodes to the service the view built: its endpoints
/// (found through the selector), without the selector itself, which no subscriber reads.
#[test]
fn entries_are_kept_encoded_and_carry_the_endpoints_not_the_selector() {
    let views = split_horizon_catalog();
    let a = views.view(&ViewKey::workload("net-a", None));
    let st = a.state.read().unwrap();
    let entry = st
        .entries
        .get(&service_view_key("web.shop"))
        .expect("service in view");
    let decoded = entry.decode();
    assert_eq!(entry.encoded_len(), prost::Message::encoded_len(&decoded));
    assert_eq!(Entry::encode(&decoded), *entry);
    drop(st);
    let sv = service_entry(&a, "web.shop");
    assert!(sv.service.selector.is_empty(), "{:?}", sv.service.selector);
    // 3 local endpoints and net-b's two gateways.
    assert_eq!(sv.endpoints.len(), 5);
    let catalog_selector = views.with_catalog(|c| {
        c.service_defs("web.shop")
            .first()
            .map(|s| s.selector.clone())
            .unwrap_or_default()
    });
    assert!(
        !catalog_selector.is_empty(),
        "the catalog keeps the selector"
    );
}

fn from_peer(mut r: OwnedResource) -> OwnedResource {
    r.origin = "peer:west/".into();
    r
}

#[test]
fn the_export_holds_own_services_with_every_endpoint_as_it_is_and_nothing_imported() {
    let views = split_horizon_catalog();
    // Imported from a peer: a service, a workload of an own service, a network.
    let mut imported_wl = wl("p0", "shop", "web", "10.9.0.1", "net-c");
    if let Resource::Workload(w) = Arc::make_mut(&mut imported_wl.resource) {
        w.cluster = "west".into();
    }
    views.apply(
        vec![
            from_peer(svc("ratings.shop", "shop", "west", "ratings")),
            from_peer(wl("r0", "shop", "ratings", "10.9.0.2", "net-c")),
            from_peer(imported_wl),
            from_peer(net("net-c", &["203.0.113.1"])),
            with_service(svc("local.shop", "shop", "c", "local"), |s| {
                s.scope = Scope::ClusterLocal
            }),
            wl("l0", "shop", "local", "10.0.1.1", "net-a"),
        ],
        vec![],
        vec![],
    );
    let export = views.view(&ViewKey::export());
    assert_eq!(export.key.to_string(), "export to peers");
    let st = export.state.read().unwrap();
    let keys: Vec<&String> = st.entries.keys().collect();
    assert_eq!(
        keys,
        ["net/net-a", "net/net-b", "svc/web.shop"],
        "own networks and the own mesh-wide service only"
    );
    drop(st);
    let web = service_entry(&export, "web.shop");
    assert_eq!(web.endpoints.len(), 9, "every own endpoint, none imported");
    assert!(
        web.endpoints
            .iter()
            .all(|e| e.kind == EndpointKind::Workload && e.tunnel_port == 0),
        "workloads without a tunnel port of their own"
    );
    assert_eq!(
        web.endpoints
            .iter()
            .filter(|e| e.network == "net-b")
            .count(),
        6,
        "endpoints of other networks as they are, not behind gateways"
    );
    // The views of this registry's own proxies do hold what was imported.
    let a = views.view(&ViewKey::workload("net-a", None));
    let ratings = service_entry(&a, "ratings.shop");
    assert_eq!(ratings.endpoints.len(), 1);
    assert_eq!(ratings.endpoints[0].kind, EndpointKind::Gateway);
}

#[test]
fn a_peer_subscriber_gets_the_export() {
    let node = Node {
        id: "registry.west".into(),
        kind: NodeKind::Peer,
        network: "net-c".into(),
        ..Default::default()
    };
    let id =
        SpiffeId::parse("spiffe://cluster.local/ns/isthmus-system/sa/isthmus-registry").unwrap();
    assert_eq!(ViewKey::for_subscriber(&node, &id), ViewKey::export());
}

#[test]
fn a_view_carries_its_destination_rule_subsets_routes_and_subset_weights_behind_gateways() {
    use isthmus_proto::model::{
        DestinationRule, L4Route, RouteDestination, Subset, VirtualService,
    };
    let views = split_horizon_catalog();
    // Two of net-b's six endpoints are v2.
    let mut up = Vec::new();
    for i in 0..2 {
        let mut w = wl(
            &format!("b{i}"),
            "shop",
            "web",
            &format!("10.0.0.{i}"),
            "net-b",
        );
        if let Resource::Workload(w) = Arc::make_mut(&mut w.resource) {
            w.labels.insert("version".into(), "v2".into());
        }
        up.push(w);
    }
    let subset = |name: &str| Subset {
        name: name.into(),
        labels: [("version".to_string(), name.to_string())].into(),
        policy: Default::default(),
    };
    let rule = DestinationRule {
        name: "web".into(),
        namespace: "shop".into(),
        host: "web.shop".into(),
        subsets: vec![subset("v1"), subset("v2")],
        policy: Default::default(),
        export_to: ExportTo::Public,
    };
    let route = L4Route {
        ports: vec![80],
        destinations: vec![RouteDestination {
            host: "web.shop".into(),
            subset: "v2".into(),
            port: 0,
            weight: 100,
        }],
        ..Default::default()
    };
    let vs = VirtualService {
        name: "web".into(),
        namespace: "shop".into(),
        hosts: vec!["web.shop".into()],
        routes: vec![route.clone()],
        export_to: ExportTo::Public,
    };
    up.push(OwnedResource::new(
        "test",
        Resource::DestinationRule(Box::new(rule)),
    ));
    up.push(OwnedResource::new(
        "test",
        Resource::VirtualService(Box::new(vs)),
    ));
    let a = views.view(&ViewKey::workload("net-a", Some("shop".into())));
    views.apply(up, vec![], vec![]);
    let sv = service_entry(&a, "web.shop");
    assert_eq!(sv.subsets.len(), 2);
    assert_eq!(sv.routes, [route]);
    let gws: Vec<&ViewEndpoint> = sv
        .endpoints
        .iter()
        .filter(|e| e.kind == EndpointKind::Gateway)
        .collect();
    assert_eq!(gws.len(), 2);
    // 2 of weight 1 behind two gateways: one each; no v1 there.
    for g in &gws {
        assert_eq!(g.subset_weights.get("v2"), Some(&1), "{g:?}");
        assert_eq!(g.subset_weights.get("v1"), None, "{g:?}");
    }
    // A rule exported elsewhere only is not this namespace's.
    let mut hidden = DestinationRule {
        name: "web".into(),
        namespace: "shop".into(),
        host: "web.shop".into(),
        subsets: vec![subset("v3")],
        policy: Default::default(),
        export_to: ExportTo::Nobody,
    };
    views.apply(
        vec![OwnedResource::new(
            "test",
            Resource::DestinationRule(Box::new(hidden.clone())),
        )],
        vec![],
        vec![],
    );
    assert!(service_entry(&a, "web.shop").subsets.is_empty());
    hidden.export_to = ExportTo::Public;
    views.apply(
        vec![OwnedResource::new(
            "test",
            Resource::DestinationRule(Box::new(hidden)),
        )],
        vec![],
        vec![],
    );
    assert_eq!(service_entry(&a, "web.shop").subsets[0].name, "v3");
}
