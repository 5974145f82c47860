//! The reconnecting Watch client: it keeps serving its last view while the registry is
//! down, resumes without a full resend when the registry comes back with the same catalog
//! (even after a restart, by content digest), and catches up when it does not.

use std::sync::Arc;
use std::time::Duration;

use isthmus_proto::drain;
use isthmus_proto::model::{service_view_key, NodeKind, ViewResource};
use isthmus_proto::subscription::{SyncState, WatchClient, WatchOptions};
use isthmus_proto::tls::{self, ServerIdentity};
use isthmus_tests::{host, node, yaml, TestRegistry, NETWORK};
use tokio::sync::watch;

fn endpoints(state: &SyncState) -> Option<usize> {
    match state
        .view
        .resources
        .get(&service_view_key(&host("reviews", "shop")))
    {
        Some(ViewResource::Service(sv)) => Some(sv.endpoints.len()),
        _ => None,
    }
}

async fn wait_for(
    rx: &mut watch::Receiver<Arc<SyncState>>,
    what: &str,
    pred: impl Fn(&SyncState) -> bool,
) -> Arc<SyncState> {
    let got = tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| pred(s)))
        .await
        .map(|r| r.map(|s| s.clone()));
    match got {
        Ok(Ok(s)) => s,
        _ => panic!("timed out waiting for: {what}; state: {:?}", rx.borrow()),
    }
}

fn workloads(n: usize) -> String {
    yaml::docs(
        &(0..n)
            .map(|i| {
                yaml::workload(
                    &format!("r-{i}"),
                    "shop",
                    "reviews",
                    &format!("10.0.0.{}", i + 1),
                    NETWORK,
                )
            })
            .collect::<Vec<_>>(),
    )
}

#[tokio::test]
async fn serves_the_last_view_through_outages_and_resumes_without_resend() {
    let mut reg = TestRegistry::start(&[
        ("reviews.yaml", &yaml::service("reviews", "shop", 9080)),
        ("w.yaml", &workloads(1)),
    ])
    .await
    .unwrap();
    // Keep the same ports across restarts, as a real registry would.
    reg.cfg.grpc_addr = reg.grpc_addr();
    reg.cfg.admin_addr = reg.admin_addr();
    let creds = reg.credentials("shop", "web").await.unwrap();
    let cfg = Arc::new(
        tls::client_config(
            Some(&creds),
            &reg.bundle(),
            ServerIdentity::TrustDomain,
            &[tls::ALPN_H2],
        )
        .unwrap(),
    );
    let addr = reg.grpc_addr().to_string();
    let client = WatchClient::new(
        move || {
            let cfg = cfg.clone();
            let addr = addr.clone();
            async move { isthmus_proto::grpc::connect(&addr, cfg).await }
        },
        node("gw", NodeKind::Workload, NETWORK),
        None,
        WatchOptions {
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_millis(400),
        },
    );
    let mut rx = client.state();
    let (trigger, shutdown) = drain::channel();
    let task = tokio::spawn(client.run(shutdown));

    wait_for(&mut rx, "first snapshot", |s| endpoints(s) == Some(1)).await;

    // Registry down: the view stays.
    reg.stop().await;
    let s = wait_for(&mut rx, "disconnect noticed", |s| !s.connected).await;
    assert_eq!(
        endpoints(&s),
        Some(1),
        "the last view is kept while the registry is away"
    );

    // Back with the same catalog: resumed by digest, no second snapshot.
    reg.restart().await.unwrap();
    let s = wait_for(&mut rx, "reconnected", |s| s.connected).await;
    assert_eq!(
        s.snapshots, 1,
        "no full resend after a restart with the same catalog"
    );
    assert_eq!(s.resumes, 1);

    // A change while connected arrives as a delta.
    reg.write_resource("w.yaml", &workloads(2));
    let s = wait_for(&mut rx, "delta applied", |s| endpoints(s) == Some(2)).await;
    assert_eq!(s.snapshots, 1);

    // Down, changed, back: the client catches up (a snapshot now, since the content moved
    // and the new registry has no history of it).
    reg.stop().await;
    wait_for(&mut rx, "disconnect noticed", |s| !s.connected).await;
    std::fs::write(reg.resources_dir().join("w.yaml"), workloads(3)).unwrap();
    reg.restart().await.unwrap();
    let s = wait_for(&mut rx, "caught up", |s| {
        s.connected && endpoints(s) == Some(3)
    })
    .await;
    assert_eq!(s.snapshots, 2);

    trigger.fire();
    task.await.unwrap();
    reg.stop().await;
}
