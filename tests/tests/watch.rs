//! Watch end to end: snapshot then ordered deltas, resume without a full resend, fan-out
//! to many subscribers next to one that never reads, and the split-horizon views.

use std::time::Duration;

use isthmus_proto::model::{service_view_key, EndpointKind, NodeKind, ViewResource};
use isthmus_proto::subscription::{LocalView, Subscription};
use isthmus_tests::{host, metric, node, yaml, TestRegistry, NETWORK};
use serde_json::Value;

const STEP: Duration = Duration::from_secs(20);

/// The sequence number in a version (`<view>.<seq>.<digest>`).
fn seq(version: &str) -> u64 {
    version.split('.').nth(1).unwrap().parse().unwrap()
}

fn endpoint_count(view: &LocalView, hostname: &str) -> Option<usize> {
    match view.resources.get(&service_view_key(hostname)) {
        Some(ViewResource::Service(sv)) => Some(sv.endpoints.len()),
        _ => None,
    }
}

fn workloads(n: usize, prefix: &str, app: &str, network: &str) -> String {
    yaml::docs(
        &(0..n)
            .map(|i| {
                yaml::workload(
                    &format!("{prefix}-{i}"),
                    "shop",
                    app,
                    &format!("10.0.{}.{}", i / 200, i % 200 + 1),
                    network,
                )
            })
            .collect::<Vec<_>>(),
    )
}

/// Receives updates until `pred` holds on the view; returns the versions seen.
async fn until(sub: &mut Subscription, pred: impl Fn(&LocalView) -> bool) -> Vec<String> {
    let mut versions = Vec::new();
    while !pred(&sub.view) {
        let u = tokio::time::timeout(STEP, sub.next())
            .await
            .expect("update in time")
            .expect("stream open");
        versions.push(u.version);
    }
    versions
}

#[tokio::test]
async fn snapshot_then_ordered_deltas() {
    let reg = TestRegistry::start(&[
        ("reviews.yaml", &yaml::service("reviews", "shop", 9080)),
        ("w.yaml", &workloads(1, "r", "reviews", NETWORK)),
    ])
    .await
    .unwrap();
    let creds = reg.credentials("shop", "web").await.unwrap();
    let mut sub = reg
        .subscribe(&creds, &node("web-1", NodeKind::Workload, NETWORK))
        .await
        .unwrap();
    let first = sub.next().await.unwrap();
    assert!(first.snapshot);
    assert_eq!(endpoint_count(&sub.view, &host("reviews", "shop")), Some(1));

    reg.write_resource("w.yaml", &workloads(3, "r", "reviews", NETWORK));
    let delta = tokio::time::timeout(STEP, sub.next())
        .await
        .unwrap()
        .unwrap();
    assert!(!delta.snapshot, "a change arrives as a delta");
    assert_eq!(
        delta.upserted,
        vec![service_view_key(&host("reviews", "shop"))],
        "only the changed service is sent"
    );
    assert!(seq(&delta.version) > seq(&first.version));
    assert_eq!(endpoint_count(&sub.view, &host("reviews", "shop")), Some(3));

    std::fs::remove_file(reg.resources_dir().join("reviews.yaml")).unwrap();
    let versions = until(&mut sub, |v| {
        endpoint_count(v, &host("reviews", "shop")).is_none()
    })
    .await;
    let seqs: Vec<u64> = versions.iter().map(|v| seq(v)).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]) && seqs[0] > seq(&delta.version),
        "versions only grow: {seqs:?}"
    );
}

#[tokio::test]
async fn resume_sends_only_what_changed() {
    let reg = TestRegistry::start(&[
        ("reviews.yaml", &yaml::service("reviews", "shop", 9080)),
        ("ratings.yaml", &yaml::service("ratings", "shop", 9080)),
        ("w.yaml", &workloads(2, "r", "reviews", NETWORK)),
        ("w2.yaml", &workloads(2, "t", "ratings", NETWORK)),
    ])
    .await
    .unwrap();
    let creds = reg.credentials("shop", "web").await.unwrap();
    let n = node("web-1", NodeKind::Workload, NETWORK);
    let mut sub = reg.subscribe(&creds, &n).await.unwrap();
    assert!(sub.next().await.unwrap().snapshot);
    let saved = sub.view.clone();
    drop(sub);

    // Reconnect with nothing changed: confirmed without a resend.
    let mut sub = Subscription::open(
        reg.channel(Some(&creds)).await.unwrap(),
        &n,
        Some(saved.clone()),
    )
    .await
    .unwrap();
    let u = sub.next().await.unwrap();
    assert!(!u.snapshot && u.upserted.is_empty() && u.removed.is_empty());
    assert_eq!(u.version, saved.version);
    drop(sub);

    // Change one service while disconnected; the resume carries just that one.
    reg.write_resource("w.yaml", &workloads(4, "r", "reviews", NETWORK));
    let views = reg.handle().views.clone();
    isthmus_tests::eventually(Duration::from_secs(10), || {
        let views = views.clone();
        async move {
            views.with_catalog(|c| {
                (c.endpoints(&host("reviews", "shop"), "shop").len() == 4).then_some(())
            })
        }
    })
    .await
    .expect("change applied");
    let mut sub = Subscription::open(reg.channel(Some(&creds)).await.unwrap(), &n, Some(saved))
        .await
        .unwrap();
    let u = sub.next().await.unwrap();
    assert!(!u.snapshot, "resumed without a full resend");
    assert_eq!(u.upserted, vec![service_view_key(&host("reviews", "shop"))]);
    assert_eq!(endpoint_count(&sub.view, &host("reviews", "shop")), Some(4));
    assert_eq!(
        endpoint_count(&sub.view, &host("ratings", "shop")),
        Some(2),
        "kept from before the reconnect"
    );

    // A version the registry does not know (e.g. from before its restart) gets a snapshot.
    let bogus = LocalView {
        version: "0123456789ab.3".into(),
        ..Default::default()
    };
    let mut sub = Subscription::open(
        reg.channel(Some(&creds)).await.unwrap(),
        &n,
        Some(bogus.into()),
    )
    .await
    .unwrap();
    assert!(sub.next().await.unwrap().snapshot);
    let m = reg.metrics().await;
    assert_eq!(
        metric(&m, r#"isthmus_registry_pushes_total{type="resume"}"#),
        Some(2.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_to_200_subscribers_next_to_one_that_never_reads() {
    const SUBSCRIBERS: usize = 200;
    const CHANGES: usize = 10;
    const ENDPOINTS: usize = 50;
    let reg = TestRegistry::start(&[
        ("reviews.yaml", &yaml::service("reviews", "shop", 9080)),
        ("w.yaml", &workloads(ENDPOINTS, "r", "reviews", NETWORK)),
    ])
    .await
    .unwrap();
    let creds = reg.credentials("shop", "web").await.unwrap();

    // The stuck subscriber: opens its stream and never reads or acknowledges.
    let stuck = reg
        .subscribe(&creds, &node("stuck", NodeKind::Workload, NETWORK))
        .await
        .unwrap();

    let mut subs = Vec::new();
    for i in 0..SUBSCRIBERS {
        let mut s = reg
            .subscribe(
                &creds,
                &node(&format!("web-{i}"), NodeKind::Workload, NETWORK),
            )
            .await
            .unwrap();
        assert!(s.next().await.unwrap().snapshot);
        subs.push(s);
    }
    let final_count = ENDPOINTS + CHANGES;
    let tasks: Vec<_> = subs
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let versions = until(&mut s, |v| {
                    endpoint_count(v, &host("reviews", "shop")) == Some(final_count)
                })
                .await;
                (versions, s.view.version.clone())
            })
        })
        .collect();
    for c in 1..=CHANGES {
        reg.write_resource("w.yaml", &workloads(ENDPOINTS + c, "r", "reviews", NETWORK));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Every subscriber runs as shop/web in the harness's cluster: the view of namespace
    // shop for that cluster.
    let view = reg.handle().views.view(
        &isthmus_registry::views::ViewKey::workload(NETWORK, Some("shop".into()))
            .in_cluster(isthmus_tests::CLUSTER),
    );
    for t in tasks {
        let (versions, last) = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("every subscriber gets every change")
            .unwrap();
        let seqs: Vec<u64> = versions.iter().map(|v| seq(v)).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "ordered: {seqs:?}");
        assert_eq!(seq(&last), view.seq());
    }

    // The stuck subscriber was sent its snapshot and nothing since: no queue grows for it.
    let (_, body) = isthmus_tests::http_get(reg.admin_addr(), "/debug/subscribers")
        .await
        .unwrap();
    let doc: Value = serde_json::from_str(&body).unwrap();
    let subs = doc["subscribers"].as_array().unwrap();
    let stuck_status = subs
        .iter()
        .find(|s| s["id"] == "stuck")
        .expect("stuck subscriber listed");
    assert_eq!(stuck_status["pushes"], 1, "{stuck_status}");
    assert_eq!(stuck_status["acked_version"], 0, "{stuck_status}");
    assert!(view.seq() >= stuck_status["sent_version"].as_u64().unwrap() + CHANGES as u64 / 2);
    drop(stuck);
}

#[tokio::test]
async fn split_horizon_and_gateway_views_over_watch() {
    let mut files = vec![
        (
            "nets.yaml".to_string(),
            yaml::docs(&[
                yaml::network("network-a", &["192.0.2.10"]),
                yaml::network("network-b", &["198.51.100.10", "198.51.100.11"]),
            ]),
        ),
        (
            "reviews.yaml".to_string(),
            yaml::service("reviews", "shop", 9080),
        ),
        (
            "a.yaml".to_string(),
            workloads(3, "a", "reviews", "network-a"),
        ),
    ];
    // Six endpoints in network-b with the same addresses as network-a's (overlap is fine).
    files.push((
        "b.yaml".to_string(),
        workloads(6, "b", "reviews", "network-b"),
    ));
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let reg = TestRegistry::start(&refs).await.unwrap();
    let creds = reg.credentials("shop", "web").await.unwrap();

    let mut a = reg
        .subscribe(&creds, &node("web-a", NodeKind::Workload, "network-a"))
        .await
        .unwrap();
    a.next().await.unwrap();
    let Some(ViewResource::Service(sv)) = a
        .view
        .resources
        .get(&service_view_key(&host("reviews", "shop")))
    else {
        panic!("reviews in view")
    };
    let mut weights: Vec<(EndpointKind, String, u32)> = sv
        .endpoints
        .iter()
        .map(|e| (e.kind, e.address.to_string(), e.weight))
        .collect();
    weights.sort_by(|x, y| (x.0 as u8, &x.1).cmp(&(y.0 as u8, &y.1)));
    assert_eq!(
        weights,
        vec![
            (EndpointKind::Workload, "10.0.0.1".into(), 1),
            (EndpointKind::Workload, "10.0.0.2".into(), 1),
            (EndpointKind::Workload, "10.0.0.3".into(), 1),
            (EndpointKind::Gateway, "198.51.100.10".into(), 3),
            (EndpointKind::Gateway, "198.51.100.11".into(), 3),
        ]
    );

    let mut gw = reg
        .subscribe(&creds, &node("gw-b", NodeKind::Gateway, "network-b"))
        .await
        .unwrap();
    gw.next().await.unwrap();
    let Some(ViewResource::Service(sv)) = gw
        .view
        .resources
        .get(&service_view_key(&host("reviews", "shop")))
    else {
        panic!("reviews in gateway view")
    };
    assert_eq!(sv.endpoints.len(), 6);
    assert!(
        sv.endpoints
            .iter()
            .all(|e| e.kind == EndpointKind::Workload && e.network == "network-b"),
        "a gateway never sees another gateway"
    );

    // The admin endpoint serves the same view.
    let (status, body) =
        isthmus_tests::http_get(reg.admin_addr(), "/debug/catalog?network=network-a")
            .await
            .unwrap();
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&body).unwrap();
    let eps = doc["services"][0]["endpoints"].as_array().unwrap();
    assert_eq!(
        eps.iter()
            .filter(|e| e["kind"] == "gateway")
            .map(|e| e["weight"].as_u64().unwrap())
            .sum::<u64>(),
        6
    );
    // A network nobody knows is a 404 listing the known ones, not a new view.
    let (status, body) =
        isthmus_tests::http_get(reg.admin_addr(), "/debug/catalog?network=made-up")
            .await
            .unwrap();
    assert_eq!(status, 404);
    assert!(body.contains("network-b"), "{body}");
}

#[tokio::test]
async fn watch_without_a_client_certificate_is_refused() {
    let reg = TestRegistry::start(&[]).await.unwrap();
    let err = Subscription::open(
        reg.channel(None).await.unwrap(),
        &node("anon", NodeKind::Workload, NETWORK),
        None,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("client certificate"), "{err}");
    let creds = reg.credentials("shop", "web").await.unwrap();
    let mut n = node("x", NodeKind::Workload, "");
    n.network.clear();
    let err = match reg.subscribe(&creds, &n).await {
        Err(e) => e.to_string(),
        Ok(mut sub) => sub.next().await.unwrap_err().to_string(),
    };
    assert!(err.contains("node.network"), "{err}");

    // Names are checked as names before anything logs them: a newline and a terminal escape
    // in the network, an id with spaces or of any length, a cluster that is no DNS label.
    let mut bad = [
        node("x", NodeKind::Workload, "net\n\u{1b}[31mred"),
        node("two words", NodeKind::Workload, NETWORK),
        node(&"x".repeat(300), NodeKind::Workload, NETWORK),
        node("x", NodeKind::Workload, NETWORK),
    ];
    bad[3].cluster = "Cluster_A".into();
    for (n, field) in bad.iter().zip(["network", "id", "id", "cluster"]) {
        let err = match reg.subscribe(&creds, n).await {
            Err(e) => e.to_string(),
            Ok(mut sub) => sub.next().await.unwrap_err().to_string(),
        };
        assert!(err.contains(&format!("subscribe.node.{field}")), "{err}");
        assert!(
            !err.contains('\n') && !err.contains('\u{1b}'),
            "escaped: {err:?}"
        );
    }
    let metrics = reg.metrics().await;
    assert!(metrics.contains("bad_subscribe"), "{metrics}");
}
