use super::*;
use crate::store::EmbeddedStore;
use isthmus_proto::model::ServiceAddress;

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
}

fn want(hosts: &[(&str, bool)]) -> BTreeMap<String, bool> {
    hosts.iter().map(|(h, w)| (h.to_string(), *w)).collect()
}

/// Plans and applies, as ingest does once the plan is stored.
fn run(table: &mut VipTable, hosts: &[(&str, bool)], now: SystemTime) -> VipPlan {
    let plan = table.plan(&want(hosts), now);
    for c in &plan.changes {
        table.apply(c).unwrap();
    }
    plan
}

fn tiny(v4_prefix: u8, v6_prefix: u8) -> VipPools {
    VipPools {
        ipv4: Pool::ipv4(IPV4_POOL.0, v4_prefix),
        ipv6: Pool::ipv6(IPV6_POOL.0, v6_prefix),
    }
}

#[test]
fn same_hostname_same_vips_in_any_table() {
    let mut a = VipTable::default();
    let mut b = VipTable::default();
    run(&mut a, &[("other.example", true)], t(0));
    run(&mut a, &[("web.shop.svc.cluster.local", true)], t(0));
    run(&mut b, &[("web.shop.svc.cluster.local", true)], t(5));
    let x = a.active("web.shop.svc.cluster.local").unwrap();
    let y = b.active("web.shop.svc.cluster.local").unwrap();
    assert_eq!((x.ipv4, x.ipv6), (y.ipv4, y.ipv6));
    let o = x.ipv4.octets();
    assert_eq!(&o[..2], &[240, 240]);
    assert_ne!(x.ipv4, Ipv4Addr::new(240, 240, 0, 0));
    assert_ne!(x.ipv4, Ipv4Addr::new(240, 240, 255, 255));
    assert_eq!(&x.ipv6.segments()[..3], &[0x2001, 2, 0]);
    assert_ne!(x.ipv6, IPV6_POOL.0);
    assert_eq!(x.addresses(), vec![x.ipv4.to_string(), x.ipv6.to_string()]);
    // Different hostnames start at different places.
    assert_ne!(
        a.active("other.example").unwrap().ipv4,
        x.ipv4,
        "distinct hostnames get distinct VIPs"
    );
}

#[test]
fn a_taken_start_probes_to_the_next_free_address() {
    // 6 usable IPv4 addresses: find a hostname whose start collides with h0's.
    let pools = tiny(29, 125);
    let mut table = VipTable::new(pools);
    run(&mut table, &[("h0", true)], t(0));
    let first = table.active("h0").unwrap().clone();
    let twin = (1..200)
        .map(|i| format!("h{i}"))
        .find(|h| {
            VipTable::new(pools).plan(&want(&[(h, true)]), t(0)).changes
                == vec![VipChange::Put(Allocation {
                    hostname: h.clone(),
                    ..first.clone()
                })]
        })
        .expect("some hostname starts where h0 does in a pool of 6");
    run(&mut table, &[(&twin, true)], t(0));
    let second = table.active(&twin).unwrap();
    let next = |a: Ipv4Addr| {
        let n = u32::from(a) + 1;
        // Wrap past the broadcast address to the first usable one.
        if n & 7 == 7 {
            Ipv4Addr::from((n & !7) + 1)
        } else {
            Ipv4Addr::from(n)
        }
    };
    assert_eq!(second.ipv4, next(first.ipv4));
    assert_ne!(second.ipv6, first.ipv6);
}

#[test]
fn addresses_in_one_plan_are_distinct_and_exhaustion_is_named() {
    // 2 usable IPv4 addresses (.1 and .2), never .0 or .3.
    let mut table = VipTable::new(tiny(30, 120));
    let plan = run(&mut table, &[("a", true), ("b", true), ("c", true)], t(0));
    assert_eq!(plan.changes.len(), 2);
    assert_eq!(plan.failures.len(), 1);
    let err = plan.failures[0].to_string();
    assert!(
        matches!(
            &plan.failures[0],
            VipError::PoolExhausted { hostname, family: Family::Ipv4, size: 2, .. } if hostname == "c"
        ),
        "{err}"
    );
    assert!(
        err.contains("240.240.0.0/30") && err.contains("IPv4"),
        "{err}"
    );
    let mut v4: Vec<_> = table.iter().map(|a| a.ipv4).collect();
    v4.sort();
    assert_eq!(
        v4,
        vec![Ipv4Addr::new(240, 240, 0, 1), Ipv4Addr::new(240, 240, 0, 2)]
    );
    assert!(table.active("c").is_none());
    // Nothing changes for hostnames that already have what they want.
    assert!(table
        .plan(&want(&[("a", true), ("b", true)]), t(1))
        .changes
        .is_empty());
}

#[test]
fn ipv6_pool_skips_its_network_address() {
    let mut table = VipTable::new(tiny(24, 127));
    run(&mut table, &[("a", true)], t(0));
    assert_eq!(
        table.active("a").unwrap().ipv6,
        "2001:2::1".parse::<Ipv6Addr>().unwrap()
    );
    let plan = run(&mut table, &[("b", true)], t(0));
    assert!(matches!(
        plan.failures[..],
        [VipError::PoolExhausted {
            family: Family::Ipv6,
            ..
        }]
    ));
}

#[test]
fn released_vips_are_kept_through_the_grace_period_then_reused() {
    let grace = DEFAULT_VIP_GRACE;
    let mut table = VipTable::new(tiny(30, 126));
    run(&mut table, &[("a", true), ("b", true)], t(0));
    let a = table.active("a").unwrap().clone();
    assert_eq!(table.counts(), (2, 0));

    // Released: no longer active, but its addresses are still held.
    let plan = run(&mut table, &[("a", false)], t(10));
    assert_eq!(
        plan.changes,
        vec![VipChange::Put(Allocation {
            released_at: Some(t(10)),
            ..a.clone()
        })]
    );
    assert!(table.active("a").is_none());
    assert_eq!(table.counts(), (1, 1));
    let plan = run(&mut table, &[("c", true)], t(20));
    assert!(
        matches!(plan.failures[..], [VipError::PoolExhausted { .. }]),
        "a released address is not given to another hostname: {plan:?}"
    );
    // Releasing again changes nothing (the release time stays the first one).
    assert!(run(&mut table, &[("a", false)], t(30)).changes.is_empty());

    // Back within the grace period: the same VIPs.
    run(&mut table, &[("a", true)], t(grace.as_secs() - 1));
    assert_eq!(table.active("a"), Some(&a));

    // Released again and past the grace period: freed, and reused by another hostname.
    let at = t(grace.as_secs());
    run(&mut table, &[("a", false)], at);
    assert!(table
        .expired(at + grace - Duration::from_secs(1), grace)
        .is_empty());
    let expired = table.expired(at + grace, grace);
    assert_eq!(expired, vec![VipChange::Free("a".into())]);
    for c in &expired {
        table.apply(c).unwrap();
    }
    assert!(table.get("a").is_none());
    run(&mut table, &[("c", true)], at + grace);
    assert_eq!(table.active("c").unwrap().ipv4, a.ipv4);
}

#[test]
fn the_table_never_holds_an_address_twice() {
    let mut table = VipTable::default();
    run(&mut table, &[("a", true)], t(0));
    let a = table.active("a").unwrap().clone();
    let err = table
        .apply(&VipChange::Put(Allocation {
            hostname: "b".into(),
            ..a.clone()
        }))
        .unwrap_err();
    assert!(
        matches!(&err, VipError::Conflict { holder, .. } if holder == "a"),
        "{err}"
    );
    assert!(table.get("b").is_none());
}

#[test]
fn opt_out_label_and_own_addresses_want_no_vip() {
    let plain = Service {
        hostname: "web".into(),
        ..Default::default()
    };
    assert!(wants_vip(&[&plain]));
    assert!(!wants_vip(&[]));
    let mut opted_out = plain.clone();
    opted_out
        .labels
        .insert(VIP_LABEL.into(), VIP_LABEL_NONE.into());
    assert!(!wants_vip(&[&opted_out]));
    assert!(!wants_vip(&[&plain, &opted_out]));
    let mut other_value = plain.clone();
    other_value.labels.insert(VIP_LABEL.into(), "auto".into());
    assert!(wants_vip(&[&other_value]));
    let mut own = plain.clone();
    own.addresses.push(ServiceAddress {
        cluster: String::new(),
        address: "10.96.0.10".into(),
    });
    assert!(!wants_vip(&[&own]));
    let wants = wants_by_hostname([&plain, &own].into_iter());
    assert_eq!(wants, want(&[("web", false)]));
}

#[test]
fn allocations_round_trip_through_their_stored_form() {
    let a = Allocation {
        hostname: "web".into(),
        ipv4: Ipv4Addr::new(240, 240, 1, 2),
        ipv6: "2001:2::1:2".parse().unwrap(),
        released_at: Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
    };
    assert_eq!(Allocation::decode("web", &a.encode()).unwrap(), a);
    let active = Allocation {
        released_at: None,
        ..a
    };
    assert_eq!(Allocation::decode("web", &active.encode()).unwrap(), active);
    let err = Allocation::decode("web", b"{\"ipv4\":\"nope\"}").unwrap_err();
    assert!(matches!(err, VipError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("web"), "{err}");
}

#[tokio::test]
async fn stored_allocations_load_back_and_bad_rows_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let mut table = VipTable::default();
    let plan = run(&mut table, &[("a", true), ("b", true)], t(0));
    let w = writes(&plan.changes, &table);
    persist(&store, plan.changes, w).await.unwrap();
    let released = run(&mut table, &[("b", false)], t(1));
    let w = writes(&released.changes, &table);
    persist(&store, released.changes, w).await.unwrap();
    // A row that claims a's addresses, and one that does not decode.
    let mut thief = table.get("a").unwrap().clone();
    thief.hostname = "z".into();
    store.put(Table::Vips, "z", thief.encode()).await.unwrap();
    store
        .put(Table::Vips, "y", b"garbage".to_vec())
        .await
        .unwrap();

    let (loaded, problems) = load(&store, VipPools::default()).await.unwrap();
    assert_eq!(loaded.get("a"), table.get("a"));
    assert_eq!(loaded.get("b"), table.get("b"));
    assert!(loaded.get("b").unwrap().released_at.is_some());
    assert_eq!(loaded.len(), 2);
    assert_eq!(problems.len(), 2, "{problems:?}");
}

#[test]
fn resolution_none_wildcards_and_istios_opt_out_want_no_vip() {
    let plain = Service {
        hostname: "pypi.org".into(),
        namespace: "shop".into(),
        resolution: Resolution::Dns,
        ..Default::default()
    };
    assert!(wants_vip(&[&plain]));
    // NONE: the app's own destination address is kept, so a VIP would only capture its
    // traffic into a destination with no endpoints (Istio allocates none either).
    let none = Service {
        resolution: Resolution::None,
        ..plain.clone()
    };
    assert!(!wants_vip(&[&none]));
    assert!(!wants_vip(&[&plain, &none]), "one cluster's NONE is enough");
    let wildcard = Service {
        hostname: "*.pypi.org".into(),
        ..plain.clone()
    };
    assert!(!wants_vip(&[&wildcard]));
    for (value, wants) in [
        ("false", false),
        ("False", false),
        ("true", true),
        ("", true),
    ] {
        let mut labelled = plain.clone();
        labelled
            .labels
            .insert(ISTIO_AUTOALLOCATE_LABEL.into(), value.into());
        assert_eq!(wants_vip(&[&labelled]), wants, "label value {value:?}");
        assert_eq!(opted_out(&labelled), !wants, "label value {value:?}");
    }
    assert_eq!(
        ISTIO_AUTOALLOCATE_LABEL,
        "networking.istio.io/enable-autoallocate-ip"
    );
}

#[test]
fn a_hostname_wants_a_vip_when_one_namespaces_definitions_do() {
    let shop = Service {
        hostname: "db.example.com".into(),
        namespace: "shop".into(),
        ..Default::default()
    };
    let books_own = Service {
        namespace: "books".into(),
        addresses: vec![ServiceAddress {
            cluster: String::new(),
            address: "10.96.0.10".into(),
        }],
        ..shop.clone()
    };
    // Another namespace's addresses do not stand in for this one's VIP.
    assert!(!wants_vip(&[&shop, &books_own]), "read as one service");
    assert!(hostname_wants_vip(&[&shop, &books_own]));
    assert_eq!(
        wants_by_hostname([&shop, &books_own].into_iter()),
        want(&[("db.example.com", true)])
    );
    assert!(!hostname_wants_vip(&[&books_own]));
    assert!(!hostname_wants_vip(&[]));
}
