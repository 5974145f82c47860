//! VIP allocation end to end: a ServiceEntry without addresses gets an IPv4 and an IPv6 VIP
//! that subscribers see, distinct per service, stable across restarts and across a delete
//! and re-add within the grace period; a service that opts out or has addresses gets none.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use isthmus_proto::model::{service_view_key, NodeKind, ViewResource};
use isthmus_proto::subscription::{LocalView, Subscription};
use isthmus_registry::vips::Allocation;
use isthmus_tests::{host, http_get, metric, node, yaml, TestRegistry, NETWORK};
use serde_json::Value;

const STEP: Duration = Duration::from_secs(20);

/// The allocated addresses of `hostname` in a subscriber's view; None if it has no entry.
fn vips_in(view: &LocalView, hostname: &str) -> Option<Vec<String>> {
    match view.resources.get(&service_view_key(hostname)) {
        Some(ViewResource::Service(sv)) => Some(sv.service.allocated_addresses.clone()),
        _ => None,
    }
}

/// Receives updates until `pred` holds on the view.
async fn until(sub: &mut Subscription, pred: impl Fn(&LocalView) -> bool) {
    while !pred(&sub.view) {
        tokio::time::timeout(STEP, sub.next())
            .await
            .expect("update in time")
            .expect("stream open");
    }
}

async fn subscriber(reg: &TestRegistry) -> Subscription {
    let creds = reg.credentials("shop", "web").await.unwrap();
    let mut sub = reg
        .subscribe(&creds, &node("web", NodeKind::Workload, NETWORK))
        .await
        .unwrap();
    sub.next().await.unwrap();
    sub
}

/// Waits for `hostname`'s entry to carry a VIP pair and checks it is one from each pool.
async fn vip_pair(sub: &mut Subscription, hostname: &str) -> (Ipv4Addr, Ipv6Addr) {
    until(sub, |v| vips_in(v, hostname).is_some_and(|a| !a.is_empty())).await;
    let addrs = vips_in(&sub.view, hostname).unwrap();
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    let v4: Ipv4Addr = addrs[0].parse().expect("IPv4 first");
    let v6: Ipv6Addr = addrs[1].parse().expect("IPv6 second");
    assert_eq!(&v4.octets()[..2], &[240, 240], "{v4} in 240.240.0.0/16");
    assert_ne!(v4, Ipv4Addr::new(240, 240, 0, 0));
    assert_ne!(v4, Ipv4Addr::new(240, 240, 255, 255));
    assert_eq!(&v6.segments()[..3], &[0x2001, 2, 0], "{v6} in 2001:2::/48");
    assert_ne!(v6, Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0));
    (v4, v6)
}

fn allocation(reg: &TestRegistry, hostname: &str) -> Option<Allocation> {
    reg.handle().views.with_vips(|t| t.get(hostname).cloned())
}

fn remove_resource(reg: &TestRegistry, name: &str) {
    std::fs::remove_file(reg.resources_dir().join(name)).unwrap();
}

fn service_with_labels(name: &str, ns: &str, port: u32, labels: &str) -> String {
    yaml::service(name, ns, port).replacen(
        &format!("  namespace: {ns}\n"),
        &format!("  namespace: {ns}\n  labels:\n{labels}"),
        1,
    )
}

#[tokio::test]
async fn service_entry_without_addresses_gets_a_vip_pair_subscribers_see() {
    let reg = TestRegistry::start(&[("reviews.yaml", &yaml::service("reviews", "shop", 9080))])
        .await
        .unwrap();
    let hostname = host("reviews", "shop");
    let mut sub = subscriber(&reg).await;
    let (v4, v6) = vip_pair(&mut sub, &hostname).await;

    let alloc = allocation(&reg, &hostname).expect("in the allocation table");
    assert_eq!((alloc.ipv4, alloc.ipv6), (v4, v6));
    assert!(alloc.is_active());
    // The Service resource the source owns is as the source wrote it.
    reg.handle().views.with_catalog(|c| {
        assert!(c.service_defs(&hostname)[0].allocated_addresses.is_empty());
    });

    let metrics = reg.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "isthmus_registry_vips_allocated{state=\"active\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    let (status, body) = http_get(reg.admin_addr(), "/debug/vips").await.unwrap();
    assert_eq!(status, 200);
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["allocations"][0]["hostname"], hostname.as_str());
    assert_eq!(json["allocations"][0]["ipv4"], v4.to_string());
    assert_eq!(json["allocations"][0]["state"], "active");
    let (_, body) = http_get(
        reg.admin_addr(),
        &format!("/debug/catalog?network={NETWORK}"),
    )
    .await
    .unwrap();
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        json["services"][0]["allocatedAddresses"],
        serde_json::json!([v4.to_string(), v6.to_string()])
    );
}

#[tokio::test]
async fn two_services_on_the_same_port_get_distinct_vips() {
    let reg = TestRegistry::start(&[
        ("reviews.yaml", &yaml::service("reviews", "shop", 9080)),
        ("ratings.yaml", &yaml::service("ratings", "shop", 9080)),
    ])
    .await
    .unwrap();
    let mut sub = subscriber(&reg).await;
    let a = vip_pair(&mut sub, &host("reviews", "shop")).await;
    let b = vip_pair(&mut sub, &host("ratings", "shop")).await;
    assert_ne!(a.0, b.0);
    assert_ne!(a.1, b.1);
}

#[tokio::test]
async fn vips_are_stored_and_survive_a_restart() {
    let mut reg = TestRegistry::start(&[
        ("reviews.yaml", &yaml::service("reviews", "shop", 9080)),
        ("ratings.yaml", &yaml::service("ratings", "shop", 9080)),
    ])
    .await
    .unwrap();
    let (reviews, ratings) = (host("reviews", "shop"), host("ratings", "shop"));
    let mut sub = subscriber(&reg).await;
    let kept = vip_pair(&mut sub, &reviews).await;
    vip_pair(&mut sub, &ratings).await;
    // ratings goes away before the restart: its allocation is released, not forgotten.
    remove_resource(&reg, "ratings.yaml");
    until(&mut sub, |v| vips_in(v, &ratings).is_none()).await;
    let released = allocation(&reg, &ratings).expect("held through the grace period");
    assert!(released.released_at.is_some());
    drop(sub);

    reg.restart().await.unwrap();
    let mut sub = subscriber(&reg).await;
    assert_eq!(vip_pair(&mut sub, &reviews).await, kept);
    // Only the store can have kept a released allocation and its release time.
    assert_eq!(allocation(&reg, &ratings), Some(released.clone()));
    let metrics = reg.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "isthmus_registry_vips_allocated{state=\"released\"}"
        ),
        Some(1.0),
        "{metrics}"
    );

    // Back after the restart, within the grace period: the same VIPs.
    reg.write_resource("ratings.yaml", &yaml::service("ratings", "shop", 9080));
    assert_eq!(
        vip_pair(&mut sub, &ratings).await,
        (released.ipv4, released.ipv6)
    );
    reg.stop().await;
}

#[tokio::test]
async fn deleted_and_re_added_within_the_grace_period_gets_the_same_vips() {
    let reg = TestRegistry::start(&[("reviews.yaml", &yaml::service("reviews", "shop", 9080))])
        .await
        .unwrap();
    let hostname = host("reviews", "shop");
    let mut sub = subscriber(&reg).await;
    let before = vip_pair(&mut sub, &hostname).await;

    remove_resource(&reg, "reviews.yaml");
    until(&mut sub, |v| vips_in(v, &hostname).is_none()).await;
    let released = allocation(&reg, &hostname).unwrap();
    assert!(!released.is_active());
    assert_eq!((released.ipv4, released.ipv6), before);

    // Another service meanwhile never gets the released addresses.
    reg.write_resource("other.yaml", &yaml::service("other", "shop", 9080));
    let other = vip_pair(&mut sub, &host("other", "shop")).await;
    assert_ne!(other.0, before.0);
    assert_ne!(other.1, before.1);

    reg.write_resource("reviews.yaml", &yaml::service("reviews", "shop", 9080));
    assert_eq!(vip_pair(&mut sub, &hostname).await, before);
    assert!(allocation(&reg, &hostname).unwrap().is_active());
}

#[tokio::test]
async fn opted_out_and_addressed_services_get_no_vip() {
    let opted_out = service_with_labels("legacy", "shop", 8080, "    isthmus.io/vip: none\n");
    let addressed = yaml::service("db", "shop", 5432).replacen(
        "  hosts:\n",
        "  addresses:\n  - 10.96.0.10\n  hosts:\n",
        1,
    );
    let reg = TestRegistry::start(&[
        ("legacy.yaml", &opted_out),
        ("db.yaml", &addressed),
        ("reviews.yaml", &yaml::service("reviews", "shop", 9080)),
    ])
    .await
    .unwrap();
    let mut sub = subscriber(&reg).await;
    // Once a service that does get one has it, the others were seen in the same snapshot.
    vip_pair(&mut sub, &host("reviews", "shop")).await;
    for h in [host("legacy", "shop"), host("db", "shop")] {
        assert_eq!(vips_in(&sub.view, &h), Some(vec![]), "{h}");
        assert_eq!(allocation(&reg, &h), None, "{h}");
    }
    match sub
        .view
        .resources
        .get(&service_view_key(&host("db", "shop")))
    {
        Some(ViewResource::Service(sv)) => assert_eq!(sv.service.addresses.len(), 1),
        other => panic!("{other:?}"),
    }

    // Opting out later releases the VIP it had.
    reg.write_resource(
        "reviews.yaml",
        &service_with_labels("reviews", "shop", 9080, "    isthmus.io/vip: none\n"),
    );
    until(&mut sub, |v| {
        vips_in(v, &host("reviews", "shop")).is_some_and(|a| a.is_empty())
    })
    .await;
    assert!(!allocation(&reg, &host("reviews", "shop"))
        .unwrap()
        .is_active());
}
