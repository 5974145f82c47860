//! Restart on the same data directory: the catalog and the token state are as they were.

use std::time::Duration;

use isthmus_proto::certs;
use isthmus_proto::identity::SpiffeId;
use isthmus_proto::model::NodeKind;
use isthmus_proto::subscription::Subscription;
use isthmus_tests::{host, node, yaml, TestRegistry, NETWORK};

#[tokio::test]
async fn restart_on_the_same_data_dir_keeps_catalog_and_tokens() {
    let mut reg = TestRegistry::start(&[
        ("nets.yaml", &yaml::network("network-b", &["198.51.100.10"])),
        ("reviews.yaml", &yaml::service("reviews", "shop", 9080)),
        (
            "w.yaml",
            &yaml::docs(&[
                yaml::workload("r-0", "shop", "reviews", "10.0.0.1", NETWORK),
                yaml::workload("r-1", "shop", "reviews", "10.0.0.1", "network-b"),
            ]),
        ),
    ])
    .await
    .unwrap();
    let creds = reg.credentials("shop", "web").await.unwrap();
    let used = reg.token("shop", "db", Duration::from_secs(600));
    let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/db").unwrap();
    let (_, csr) = certs::generate_key_and_csr(&id).unwrap();
    certs::request_certificate(
        reg.channel(None).await.unwrap(),
        csr.clone(),
        Some(used.clone()),
        0,
    )
    .await
    .unwrap();

    let mut sub = reg
        .subscribe(&creds, &node("web", NodeKind::Workload, NETWORK))
        .await
        .unwrap();
    sub.next().await.unwrap();
    let before = sub.view.resources.clone();
    let saved = sub.view.clone();
    drop(sub);

    // Restart without the resources directory: what it serves comes from the store alone.
    reg.stop().await;
    reg.cfg.resources = None;
    reg.restart().await.unwrap();
    let mut sub = reg
        .subscribe(&creds, &node("web", NodeKind::Workload, NETWORK))
        .await
        .unwrap();
    sub.next().await.unwrap();
    assert_eq!(sub.view.resources, before);
    assert!(sub
        .view
        .resources
        .contains_key(&format!("svc/{}", host("reviews", "shop"))));

    // A subscriber that was connected before the restart resumes without a resend: the
    // registry recognises the content digest in its version.
    let mut resumed = Subscription::open(
        reg.channel(Some(&creds)).await.unwrap(),
        &node("web", NodeKind::Workload, NETWORK),
        Some(saved),
    )
    .await
    .unwrap();
    let u = resumed.next().await.unwrap();
    assert!(
        !u.snapshot && u.upserted.is_empty() && u.removed.is_empty(),
        "{u:?}"
    );
    assert_eq!(resumed.view.resources, before);

    let err = certs::request_certificate(reg.channel(None).await.unwrap(), csr, Some(used), 0)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already been used"), "{err}");
    reg.stop().await;
}
