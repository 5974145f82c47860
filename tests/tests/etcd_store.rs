//! Registries on the etcd store (`--store etcd`), against a real etcd (Debian's
//! `etcd-server`) the tests start: a token spent once across two registries sharing one
//! three-member etcd, a lost member changing nothing, an etcd outage refusing writes by
//! name, reported by `/readyz` and a gauge, then caught up without a restart, and two
//! registries serving one catalog.

use std::sync::Arc;
use std::time::Duration;

use isthmus_proto::model::{service_view_key, NodeKind, ViewResource};
use isthmus_proto::subscription::{LocalView, Subscription};
use isthmus_registry::app::StoreSettings;
use isthmus_registry::store::EtcdConfig;
use isthmus_tests::harness::etcd::EtcdCluster;
use isthmus_tests::harness::vm::{always_for, endpoint, hello, until, until_keeping};
use isthmus_tests::{eventually, host, http_get, metric, node, yaml, TestRegistry, NETWORK};

fn on_etcd(etcd: &EtcdCluster) -> StoreSettings {
    StoreSettings::Etcd(EtcdConfig::new(etcd.endpoints()))
}

/// Another registry of `first`'s set on `etcd`, reading no files of its own: a set of
/// registries reads the same files, or one of them does.
async fn peer_of(first: &TestRegistry, etcd: &EtcdCluster) -> TestRegistry {
    TestRegistry::start_peer_of(first, |cfg| {
        cfg.store = on_etcd(etcd);
        cfg.resources = None;
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_registries_on_one_etcd_spend_a_token_once_and_survive_a_lost_member() {
    let Some(mut etcd) = EtcdCluster::start("etcd_store", 3).await else {
        return;
    };
    let a = TestRegistry::start_with(&[], |cfg| cfg.store = on_etcd(&etcd))
        .await
        .unwrap();
    // The second registry of the set: the same CA files, the same etcd.
    let b = TestRegistry::start_peer_of(&a, |cfg| cfg.store = on_etcd(&etcd))
        .await
        .unwrap();
    let (a, b) = (Arc::new(a), Arc::new(b));

    for round in 0..3 {
        let token = a.token("shop", "web", Duration::from_secs(600));
        let mut tries = Vec::new();
        for i in 0..8 {
            let reg = if i % 2 == 0 { a.clone() } else { b.clone() };
            let token = token.clone();
            tries.push(tokio::spawn(async move { reg.redeem("web", token).await }));
        }
        let mut won = 0;
        for t in tries {
            match t.await.unwrap() {
                Ok(()) => won += 1,
                Err(s) => {
                    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
                    assert!(s.message().contains("already been used"), "{s:?}");
                }
            }
        }
        assert_eq!(
            won, 1,
            "round {round}: one redeemer wins across both registries"
        );
    }

    // One member of three lost: nothing visible changes (enough writes that requests meet
    // the lost member's endpoint).
    etcd.stop_member(0);
    for i in 0..20 {
        let (reg, sa) = if i % 2 == 0 {
            (&a, format!("after-loss-a{i}"))
        } else {
            (&b, format!("after-loss-b{i}"))
        };
        let sa = sa.as_str();
        let token = reg.token("shop", sa, Duration::from_secs(600));
        reg.redeem(sa, token.clone())
            .await
            .expect("a write with one member of three down");
        let again = reg.redeem(sa, token).await.unwrap_err();
        assert_eq!(again.code(), tonic::Code::PermissionDenied, "{again:?}");
        let (status, body) = http_get(reg.admin_addr(), "/readyz").await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    etcd.start_member(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_outage_refuses_writes_by_name_and_recovers_without_restart() {
    let Some(mut etcd) = EtcdCluster::start("etcd_store", 1).await else {
        return;
    };
    let mut reg = TestRegistry::start_with(&[], |cfg| cfg.store = on_etcd(&etcd))
        .await
        .unwrap();
    let spent = reg.token("shop", "before", Duration::from_secs(600));
    reg.redeem("before", spent.clone())
        .await
        .expect("a write with etcd up");
    let (status, _) = http_get(reg.admin_addr(), "/readyz").await.unwrap();
    assert_eq!(status, 200);
    let creds = reg.credentials("shop", "watcher").await.unwrap();
    let watcher = node("watcher", NodeKind::Workload, NETWORK);

    etcd.stop();
    let refusal = eventually(Duration::from_secs(30), || async {
        let token = reg.token("shop", "during", Duration::from_secs(600));
        reg.redeem("during", token).await.err()
    })
    .await
    .expect("a write with etcd down is refused");
    assert_eq!(refusal.code(), tonic::Code::Unavailable, "{refusal:?}");
    let message = refusal.message();
    let endpoint = &etcd.endpoints()[0];
    assert!(
        message.contains(endpoint) && message.contains("writes are refused"),
        "{message}"
    );
    // Reads go on (the registry stays in service); `/readyz` says writes are down.
    let (status, body) = http_get(reg.admin_addr(), "/readyz").await.unwrap();
    println!("refused: {message}\n/readyz: {status} {body}");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("degraded: store writes"), "{body}");
    assert_eq!(
        metric(&reg.metrics().await, "isthmus_registry_store_writable"),
        Some(0.0)
    );
    // The last state is served: a new subscriber gets its snapshot. A resource written
    // meanwhile cannot be stored, so it waits.
    let mut sub = reg.subscribe(&creds, &watcher).await.unwrap();
    assert!(sub.next().await.unwrap().snapshot);
    reg.write_resource("reviews.yaml", &yaml::service("reviews", "shop", 9080));
    assert!(endpoint_count(&sub.view, &host("reviews", "shop")).is_none());

    etcd.start_again().await;
    // Caught up once etcd is back, with no restart.
    until(&mut sub, |v| {
        endpoint_count(v, &host("reviews", "shop")).is_some()
    })
    .await;
    let ready = eventually(Duration::from_secs(30), || async {
        let (status, body) = http_get(reg.admin_addr(), "/readyz").await.ok()?;
        (status == 200 && body.trim() == "ready").then_some(())
    })
    .await;
    assert!(ready.is_some(), "writes back once etcd is");
    assert_eq!(
        metric(&reg.metrics().await, "isthmus_registry_store_writable"),
        Some(1.0)
    );
    let token = reg.token("shop", "after", Duration::from_secs(600));
    reg.redeem("after", token)
        .await
        .expect("a write after etcd is back");
    // Nothing was lost: the token spent before the outage stays spent, also for a registry
    // started anew on the same etcd.
    reg.restart().await.unwrap();
    let again = reg.redeem("before", spent).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::PermissionDenied, "{again:?}");
    reg.stop().await;
}

fn endpoint_count(view: &LocalView, hostname: &str) -> Option<usize> {
    match view.resources.get(&service_view_key(hostname)) {
        Some(ViewResource::Service(sv)) => Some(sv.endpoints.len()),
        _ => None,
    }
}

fn vips_of(view: &LocalView, hostname: &str) -> Option<Vec<String>> {
    match view.resources.get(&service_view_key(hostname)) {
        Some(ViewResource::Service(sv)) => Some(sv.service.allocated_addresses.clone()),
        _ => None,
    }
}

/// Two registries on one etcd serve one catalog: what reaches one (a resource file, a VM
/// registration) reaches the other's subscribers, VIPs included, and a subscriber moving
/// from one to the other resumes without a full resend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_of_registries_on_one_etcd_serves_one_catalog() {
    let Some(etcd) = EtcdCluster::start("etcd_store", 1).await else {
        return;
    };
    let a = TestRegistry::start_with(&[], |cfg| cfg.store = on_etcd(&etcd))
        .await
        .unwrap();
    let b = peer_of(&a, &etcd).await;
    let creds = a.credentials("shop", "web").await.unwrap();
    let web = node("web-1", NodeKind::Workload, NETWORK);
    let mut on_b = b.subscribe(&creds, &web).await.unwrap();
    assert!(on_b.next().await.unwrap().snapshot);

    let reviews = host("reviews", "shop");
    a.write_resource(
        "reviews.yaml",
        &yaml::docs(&[
            yaml::service("reviews", "shop", 9080),
            yaml::workload("r-0", "shop", "reviews", "10.0.0.1", NETWORK),
            yaml::workload("r-1", "shop", "reviews", "10.0.0.2", NETWORK),
        ]),
    );
    until(&mut on_b, |v| endpoint_count(v, &reviews) == Some(2)).await;
    // The VIP A allocated is the one B serves.
    let mut on_a = a.subscribe(&creds, &web).await.unwrap();
    assert!(on_a.next().await.unwrap().snapshot);
    let vips = vips_of(&on_a.view, &reviews).expect("reviews on A");
    assert!(!vips.is_empty(), "reviews has a VIP");
    assert_eq!(vips_of(&on_b.view, &reviews), Some(vips));

    // The same content has the same digest on both: a subscriber of A moving to B resumes
    // without a full resend.
    let digest = |v: &str| v.rsplit('.').next().unwrap().to_string();
    assert_eq!(digest(&on_a.view.version), digest(&on_b.view.version));
    let saved = on_a.view.clone();
    drop(on_a);
    let mut moved = Subscription::open(b.channel(Some(&creds)).await.unwrap(), &web, Some(saved))
        .await
        .unwrap();
    let u = moved.next().await.unwrap();
    assert!(
        !u.snapshot && u.upserted.is_empty() && u.removed.is_empty(),
        "resumed on B without a resend: {u:?}"
    );

    // Removed on A, gone on B.
    std::fs::remove_file(a.resources_dir().join("reviews.yaml")).unwrap();
    until(&mut on_b, |v| endpoint_count(v, &reviews).is_none()).await;
    let m = b.metrics().await;
    assert!(
        metric(
            &m,
            "isthmus_registry_store_changes_followed_total{outcome=\"applied\"}"
        )
        .is_some_and(|n| n >= 2.0),
        "{m}"
    );
    let m = a.metrics().await;
    assert!(
        metric(
            &m,
            "isthmus_registry_store_changes_followed_total{outcome=\"own\"}"
        )
        .is_some_and(|n| n >= 2.0),
        "{m}"
    );
}

/// A VM's registration on a set of registries: seen by all of them; kept when its agent
/// moves to another registry, also after the first one is gone; and gone with the lease of
/// a registry that stopped when its agent did not move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_registration_moves_between_registries_and_goes_with_a_stopped_one() {
    let Some(etcd) = EtcdCluster::start("etcd_store", 1).await else {
        return;
    };
    let grace = Duration::from_secs(3);
    let files = [
        (
            "vm-web.yaml",
            yaml::workload_group("vm-web", "shop", "web", "web", false),
        ),
        ("web.yaml", yaml::service("web", "shop", 80)),
    ];
    let refs: Vec<(&str, &str)> = files.iter().map(|(n, y)| (*n, y.as_str())).collect();
    let mut a = TestRegistry::start_with(&refs, |cfg| {
        cfg.store = on_etcd(&etcd);
        cfg.vm_grace = grace;
    })
    .await
    .unwrap();
    let b = TestRegistry::start_peer_of(&a, |cfg| {
        cfg.store = on_etcd(&etcd);
        cfg.resources = None;
        cfg.vm_grace = grace;
    })
    .await
    .unwrap();
    let watcher = b.credentials("shop", "watcher").await.unwrap();
    let mut on_b = b
        .subscribe(&watcher, &node("watcher", NodeKind::Workload, NETWORK))
        .await
        .unwrap();
    assert!(on_b.next().await.unwrap().snapshot);
    let web = host("web", "shop");
    let has = |address: &'static str| {
        let web = web.clone();
        move |v: &LocalView| endpoint(v, &web, address).is_some()
    };

    let creds = a.credentials("shop", "web").await.unwrap();
    let moving = hello("vm-web", "shop", "10.1.0.5", NETWORK);
    let staying = hello("vm-web", "shop", "10.1.0.6", NETWORK);
    let on_a_1 = a.register_vm(Some(&creds), &moving).await.unwrap();
    let on_a_2 = a.register_vm(Some(&creds), &staying).await.unwrap();
    until(&mut on_b, |v| has("10.1.0.5")(v) && has("10.1.0.6")(v)).await;

    // A stops (as a crash would, it deregisters nothing); the first VM's agent moves to B.
    a.stop().await;
    drop((on_a_1, on_a_2));
    let _on_b_1 = b.register_vm(Some(&creds), &moving).await.unwrap();
    // The VM that did not move goes with A's lease; the one that moved never leaves.
    until_keeping(&mut on_b, has("10.1.0.5"), |v| !has("10.1.0.6")(v)).await;
    always_for(&mut on_b, grace * 2, has("10.1.0.5")).await;
    let (status, body) = http_get(b.admin_addr(), "/readyz").await.unwrap();
    assert_eq!(status, 200, "{body}");
}

/// A Watch client given the whole set (`--registry A,B,C`) follows one registry, says which,
/// and when that one is gone moves to another of the set and resumes there without a full
/// resend; a certificate request given the set reaches whichever answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_the_set_moves_to_another_registry_and_resumes() {
    use isthmus_proto::drain;
    use isthmus_proto::subscription::{RegistrySettings, SyncMetrics, WatchClient, WatchOptions};

    let Some(etcd) = EtcdCluster::start("etcd_store", 3).await else {
        return;
    };
    let mut a = TestRegistry::start_with(
        &[("reviews.yaml", &yaml::service("reviews", "shop", 9080))],
        |cfg| cfg.store = on_etcd(&etcd),
    )
    .await
    .unwrap();
    let b = peer_of(&a, &etcd).await;
    let c = peer_of(&a, &etcd).await;
    let set = [&a, &b, &c]
        .iter()
        .map(|r| r.grpc_addr().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let certs = a.dir.path().join("gw-certs");
    a.credentials_dir("istio-system", "gateway-network-a", &certs)
        .await
        .unwrap();
    let settings = RegistrySettings {
        addr: set.clone(),
        root_cert: a.ca_root(),
        cert_dir: certs,
        trust_domain: "cluster.local".into(),
    };
    let client = WatchClient::over_mtls(
        &settings,
        node("gw", NodeKind::Gateway, NETWORK),
        None,
        WatchOptions {
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_millis(400),
        },
    )
    .unwrap();
    let mut rx = client.state();
    let (_trigger, shutdown) = drain::channel();
    tokio::spawn(client.run(shutdown));
    let reviews = host("reviews", "shop");
    let synced = |s: &isthmus_proto::subscription::SyncState| {
        s.connected && endpoint_count(&s.view, &reviews).is_some()
    };
    let first = rx.wait_for(|s| synced(s)).await.unwrap().clone();
    assert_eq!(
        first.registry,
        Some(a.grpc_addr().to_string()),
        "the first of the set"
    );
    assert_eq!(first.snapshots, 1);
    let metrics = SyncMetrics::default();
    metrics.observe(&first);

    let a_addr = a.grpc_addr().to_string();
    a.stop().await;
    let moved = tokio::time::timeout(
        Duration::from_secs(20),
        rx.wait_for(|s| synced(s) && s.registry != first.registry),
    )
    .await
    .expect("moved to another registry of the set")
    .unwrap()
    .clone();
    let now = moved.registry.clone().unwrap();
    assert!(
        [b.grpc_addr().to_string(), c.grpc_addr().to_string()].contains(&now),
        "{now}"
    );
    assert_eq!(moved.snapshots, 1, "resumed on {now} without a full resend");
    assert!(moved.resumes >= 1);
    assert_eq!(moved.dump()["registry"], now.as_str());
    metrics.observe(&moved);
    let old = metrics
        .registry
        .get_or_create(&isthmus_proto::subscription::RegistryLabels { address: a_addr });
    assert_eq!(old.get(), 0);
    let new = metrics
        .registry
        .get_or_create(&isthmus_proto::subscription::RegistryLabels { address: now });
    assert_eq!(new.get(), 1);

    // A new connection given the set skips the registry that is gone.
    let creds = b.credentials("shop", "web").await.unwrap();
    let channel = settings
        .connect(Some(&creds))
        .await
        .expect("a registry of the set");
    drop(channel);
}
