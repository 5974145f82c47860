//! Cross-network traffic through east-west gateways in network namespaces: network A,
//! network B and a WAN between them, where only the gateways' addresses cross and workload
//! addresses overlap (10.10.0.5 lives in both). The registry runs in this process on the
//! root namespace's WAN address; gateways and workloads run inside their namespaces (on
//! runtimes whose threads entered them, or as real processes).
//!
//! As root these always run (and in CI they must: they fail if namespaces cannot be made);
//! elsewhere they skip with a message.

use std::net::SocketAddr;
use std::time::Duration;

use isthmus_proxy::authz::{AuthorizationPolicy, Rule};
use isthmus_tests::harness::mesh::{
    self, host, id, on, yaml, Call, Mesh, Workload, APP_PORT, SNI_PORT, SVC_PORT,
};
use isthmus_tests::harness::netns::Net;
use isthmus_tests::harness::process::workspace_binary;
use isthmus_tests::{eventually, http_get, CLUSTER};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_network_calls_are_end_to_end_mtls_routed_by_sni() {
    // B: reviews and ratings on the same service port; A: details on B's reviews address.
    let catalog = vec![
        yaml::service("reviews", "shop", SVC_PORT),
        yaml::service("ratings", "shop", SVC_PORT),
        yaml::service("details", "shop", SVC_PORT),
        yaml::workload(
            "reviews-b1",
            "shop",
            "reviews",
            "10.10.0.5",
            APP_PORT,
            "network-b",
        ),
        yaml::workload(
            "ratings-b1",
            "shop",
            "ratings",
            "10.10.0.6",
            APP_PORT,
            "network-b",
        ),
        yaml::workload(
            "details-a1",
            "shop",
            "details",
            "10.10.0.5",
            APP_PORT,
            "network-a",
        ),
    ];
    let Some(m) = Mesh::start("gw-e2e", &catalog).await else {
        return;
    };
    let _gw_b = m.gateway(Net::B).await;
    // ratings refuses the "intruder" service account; reviews allows only "web".
    let ratings_policy = AuthorizationPolicy {
        allow: vec![],
        deny: vec![Rule {
            principals: vec!["cluster.local/ns/shop/sa/intruder".into()],
            namespaces: vec![],
        }],
    };
    let reviews_policy = AuthorizationPolicy {
        allow: vec![Rule {
            principals: vec!["cluster.local/ns/shop/sa/web".into()],
            namespaces: vec![],
        }],
        deny: vec![],
    };
    let reviews = m
        .workload(Net::B, "10.10.0.5", "reviews-b1", "reviews", reviews_policy)
        .await;
    let ratings = m
        .workload(Net::B, "10.10.0.6", "ratings-b1", "ratings", ratings_policy)
        .await;
    let details = m
        .workload(
            Net::A,
            "10.10.0.5",
            "details-a1",
            "details",
            AuthorizationPolicy::default(),
        )
        .await;
    let web = m.client(Net::A, "web").await;
    for name in ["reviews", "ratings", "details"] {
        web.wait_for_targets(&host(name), SVC_PORT, 1).await;
    }

    // reviews: through B's gateway; the client verified the workload, not the gateway,
    // and the workload saw the client's identity.
    let c = m.call(Net::A, &web, "reviews").await.expect("reviews");
    assert_eq!(c.greeting, "reviews-b1");
    assert_eq!(
        c.server,
        Some(id("reviews")),
        "the server certificate is the workload's"
    );
    assert!(c.target.via_gateway);
    assert_eq!(
        c.target.addr,
        SocketAddr::new(m.topo.gateway_addr(Net::B).into(), SNI_PORT)
    );
    assert_eq!(reviews.last_peer(), Some(id("web")));

    // ratings: same service port, other service: the SNI picks it.
    let c = m.call(Net::A, &web, "ratings").await.expect("ratings");
    assert_eq!(c.greeting, "ratings-b1");
    assert_eq!(c.server, Some(id("ratings")));
    assert_eq!(ratings.last_peer(), Some(id("web")));

    // details: local, on the address reviews has in B; reached directly.
    let c = m.call(Net::A, &web, "details").await.expect("details");
    assert_eq!(c.greeting, "details-a1");
    assert!(!c.target.via_gateway);
    assert_eq!(c.target.addr, "10.10.0.5:8080".parse().unwrap());
    assert_eq!(details.last_peer(), Some(id("web")));

    // Authorization at the destination: the intruder is refused by ratings (deny rule)
    // and by reviews (not on the allow list); web still passes.
    let intruder = m.client(Net::A, "intruder").await;
    intruder
        .wait_for_targets(&host("ratings"), SVC_PORT, 1)
        .await;
    for name in ["ratings", "reviews"] {
        let r = m.call(Net::A, &intruder, name).await;
        assert!(r.is_err(), "{name} let the intruder in: {r:?}");
    }
    assert_ne!(ratings.last_peer(), Some(id("intruder")));
    assert!(m.call(Net::A, &web, "ratings").await.is_ok());
    let denied = ratings
        .inbound
        .metrics
        .connections
        .get_or_create(&isthmus_proxy::metrics::ConnLabels {
            direction: isthmus_proxy::metrics::Direction::inbound,
            service: ratings.app.addr.to_string(),
            result: isthmus_proxy::metrics::ConnResult::denied,
        })
        .get();
    assert!(denied >= 1, "the refusal was not counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_moves_off_dead_endpoints_then_fails_over_to_the_local_network() {
    let catalog = vec![
        yaml::service("reviews", "shop", SVC_PORT),
        yaml::workload(
            "reviews-b1",
            "shop",
            "reviews",
            "10.10.0.5",
            APP_PORT,
            "network-b",
        ),
        yaml::workload(
            "reviews-b2",
            "shop",
            "reviews",
            "10.10.0.6",
            APP_PORT,
            "network-b",
        ),
        yaml::workload(
            "reviews-b3",
            "shop",
            "reviews",
            "10.10.0.7",
            APP_PORT,
            "network-b",
        ),
        yaml::workload(
            "reviews-a1",
            "shop",
            "reviews",
            "10.10.0.5",
            APP_PORT,
            "network-a",
        ),
    ];
    let Some(m) = Mesh::start("gw-failover", &catalog).await else {
        return;
    };
    let gw_b = m.gateway(Net::B).await;
    let allow = AuthorizationPolicy::default;
    let b: Vec<Workload> = vec![
        m.workload(Net::B, "10.10.0.5", "reviews-b1", "reviews", allow())
            .await,
        m.workload(Net::B, "10.10.0.6", "reviews-b2", "reviews", allow())
            .await,
        m.workload(Net::B, "10.10.0.7", "reviews-b3", "reviews", allow())
            .await,
    ];
    let _a1 = m
        .workload(Net::A, "10.10.0.5", "reviews-a1", "reviews", allow())
        .await;
    let web = m.client(Net::A, "web").await;
    // The local endpoint and B's gateway.
    web.wait_for_targets(&host("reviews"), SVC_PORT, 2).await;
    let routed = eventually(Duration::from_secs(20), || async {
        let d = gw_b
            .routes
            .load()
            .lookup(&host("reviews"), SVC_PORT, "")
            .ok()?;
        (d.targets().len() == 3).then_some(())
    })
    .await;
    assert!(routed.is_some(), "gateway B never had 3 endpoints");

    let answered = |calls: &[Call]| -> std::collections::BTreeSet<String> {
        calls.iter().map(|c| c.greeting.clone()).collect()
    };
    let mut calls = Vec::new();
    for _ in 0..24 {
        calls.push(m.call(Net::A, &web, "reviews").await.expect("call"));
    }
    let seen = answered(&calls);
    for n in ["reviews-a1", "reviews-b1", "reviews-b2", "reviews-b3"] {
        assert!(seen.contains(n), "{n} never answered: {seen:?}");
    }

    // Kill B's endpoints one by one: every call still succeeds, never on a dead one.
    for dead in 0..3 {
        b[dead].stop().await;
        let mut calls = Vec::new();
        for _ in 0..12 {
            calls.push(
                m.call(Net::A, &web, "reviews")
                    .await
                    .expect("call after a kill"),
            );
        }
        let seen = answered(&calls);
        for gone in b.iter().take(dead + 1) {
            let name = gone.app_name();
            assert!(
                !seen.contains(&name),
                "{name} answered after it was stopped"
            );
        }
        if dead < 2 {
            let alive = format!("reviews-b{}", dead + 2);
            assert!(
                seen.iter().any(|s| s.starts_with("reviews-b")),
                "no B endpoint answered after stopping {dead} (expected {alive} among {seen:?})"
            );
        } else {
            assert_eq!(
                seen,
                ["reviews-a1".to_string()].into_iter().collect(),
                "with all of B down, A's endpoint takes everything"
            );
        }
    }
    let text = http_get(gw_b.metrics_addr.unwrap(), "/metrics")
        .await
        .unwrap()
        .1;
    assert!(
        text.contains("isthmus_gateway_endpoint_ejections_total"),
        "no ejection counted:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_keeps_routing_through_a_registry_outage_and_resumes() {
    let catalog = vec![
        yaml::service("reviews", "shop", SVC_PORT),
        yaml::workload(
            "reviews-b1",
            "shop",
            "reviews",
            "10.10.0.5",
            APP_PORT,
            "network-b",
        ),
    ];
    let Some(mut m) = Mesh::start("gw-outage", &catalog).await else {
        return;
    };
    let gw_b = m.gateway(Net::B).await;
    let _w = m
        .workload(
            Net::B,
            "10.10.0.5",
            "reviews-b1",
            "reviews",
            AuthorizationPolicy::default(),
        )
        .await;
    let web = m.client(Net::A, "web").await;
    web.wait_for_targets(&host("reviews"), SVC_PORT, 1).await;
    assert_eq!(
        m.call(Net::A, &web, "reviews").await.unwrap().greeting,
        "reviews-b1"
    );
    let before = gw_b.sync.borrow().clone();
    assert_eq!(before.snapshots, 1);

    m.reg.stop_keeping_port().await;
    let down = eventually(Duration::from_secs(20), || async {
        (!gw_b.sync.borrow().connected).then_some(())
    })
    .await;
    assert!(down.is_some(), "the gateway never noticed the outage");
    for _ in 0..3 {
        assert_eq!(
            m.call(Net::A, &web, "reviews")
                .await
                .expect("call during the outage")
                .greeting,
            "reviews-b1"
        );
    }
    let admin = gw_b.admin_addr.unwrap();
    let (_, dump) = on(m.rt(Net::B), async move {
        http_get(admin, "/config_dump").await
    })
    .await
    .unwrap();
    assert!(dump.contains("\"connected\":false"), "{dump}");
    assert!(dump.contains(&host("reviews")), "{dump}");

    m.reg.start_again().await.unwrap();
    let back = eventually(Duration::from_secs(30), || async {
        let s = gw_b.sync.borrow().clone();
        s.connected.then_some(s)
    })
    .await
    .expect("the gateway never reconnected");
    assert_eq!(back.snapshots, 1, "the view was sent again in full");
    assert!(back.resumes >= 1, "the watch did not resume");
    // Same content (the version's digest); the view id is the new registry's.
    let digest = |v: &str| v.rsplit('.').next().unwrap().to_string();
    assert_eq!(digest(&back.view.version), digest(&before.view.version));
    assert_eq!(
        m.call(Net::A, &web, "reviews").await.unwrap().greeting,
        "reviews-b1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_gateway_process() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let catalog = vec![
        yaml::service("reviews", "shop", SVC_PORT),
        yaml::workload(
            "reviews-b1",
            "shop",
            "reviews",
            "10.10.0.5",
            APP_PORT,
            "network-b",
        ),
    ];
    let Some(m) = Mesh::start("gw-drain", &catalog).await else {
        return;
    };
    let _w = m
        .workload(
            Net::B,
            "10.10.0.5",
            "reviews-b1",
            "reviews",
            AuthorizationPolicy::default(),
        )
        .await;
    let cert_dir = mesh::gateway_credentials(&m.reg, "network-b", m.dir.path()).await;
    let gw_ip = m.topo.gateway_addr(Net::B);
    let log = std::fs::File::create(m.dir.path().join("gateway.log")).unwrap();
    let mut cmd = m
        .topo
        .netns(Net::B)
        .command(workspace_binary("isthmus-gateway", "isthmus-gateway"));
    cmd.args([
        "--network",
        "network-b",
        "--cluster",
        CLUSTER,
        "--registry",
        &m.registry_addr.to_string(),
        "--root",
        m.reg.ca_root().to_str().unwrap(),
        "--cert-dir",
        cert_dir.to_str().unwrap(),
        "--sni-addr",
        &format!("{gw_ip}:{SNI_PORT}"),
        "--admin-addr",
        "127.0.0.1:15000",
        "--metrics-addr",
        &format!("{gw_ip}:15020"),
        "--health-addr",
        &format!("{gw_ip}:15021"),
        "--drain-deadline",
        "60s",
    ])
    .env("LOG_FORMAT", "plain")
    .stdout(log.try_clone().unwrap())
    .stderr(log);
    let gw = m.topo.spawn(cmd).expect("start the gateway");
    let health = SocketAddr::new(gw_ip.into(), 15021);
    let ready = eventually(Duration::from_secs(30), || async {
        matches!(http_get(health, "/healthz/ready").await, Ok((200, _))).then_some(())
    })
    .await;
    let log_text = || std::fs::read_to_string(m.dir.path().join("gateway.log")).unwrap_or_default();
    assert!(
        ready.is_some(),
        "the gateway never became ready:\n{}",
        log_text()
    );

    let web = m.client(Net::A, "web").await;
    web.wait_for_targets(&host("reviews"), SVC_PORT, 1).await;

    // An in-flight transfer: half now, half after SIGTERM.
    let (go_on, wait) = tokio::sync::oneshot::channel::<()>();
    let (halfway, at_half) = tokio::sync::oneshot::channel::<()>();
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let transfer = {
        let web = web.clone();
        let chunk = chunk.clone();
        m.rt(Net::A).spawn(async move {
            let (greeting, s) = web.call(&host("reviews"), SVC_PORT).await?;
            anyhow::ensure!(greeting == "reviews-b1");
            // Read while writing, as a real client does: the echo comes back as it goes.
            let (mut r, mut w) = tokio::io::split(s.stream);
            let mut back = vec![0u8; chunk.len()];
            let (sent, got) = tokio::join!(w.write_all(&chunk), r.read_exact(&mut back));
            sent?;
            got?;
            anyhow::ensure!(back == chunk, "first half corrupted");
            let _ = halfway.send(());
            let _ = wait.await;
            let (sent, got) = tokio::join!(w.write_all(&chunk), r.read_exact(&mut back));
            sent?;
            got?;
            anyhow::ensure!(back == chunk, "second half corrupted");
            w.shutdown().await?;
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).await?;
            Ok::<_, anyhow::Error>(2 * chunk.len())
        })
    };
    if tokio::time::timeout(Duration::from_secs(30), at_half)
        .await
        .is_err()
    {
        panic!(
            "the first half never came back; gateway log:\n{}",
            log_text()
        );
    }

    gw.signal(nix::sys::signal::Signal::SIGTERM)
        .expect("SIGTERM the gateway");
    // Not ready any more, and new connections are refused...
    let not_ready = eventually(Duration::from_secs(10), || async {
        matches!(http_get(health, "/healthz/ready").await, Ok((503, _))).then_some(())
    })
    .await;
    assert!(
        not_ready.is_some(),
        "still ready while draining:\n{}",
        log_text()
    );
    let refused = eventually(Duration::from_secs(10), || async {
        m.call(Net::A, &web, "reviews").await.is_err().then_some(())
    })
    .await;
    assert!(
        refused.is_some(),
        "a new connection was accepted while draining"
    );
    // ...while the open one finishes.
    let _ = go_on.send(());
    let moved = tokio::time::timeout(Duration::from_secs(30), transfer)
        .await
        .expect("the in-flight transfer stalled")
        .unwrap()
        .expect("the in-flight transfer failed");
    assert_eq!(moved, 2 * chunk.len());
    let status = gw
        .wait_timeout(Duration::from_secs(30))
        .expect("the gateway did not exit after draining");
    assert!(status.success(), "exit status {status:?}:\n{}", log_text());
    let log = log_text();
    assert!(log.contains("draining"), "{log}");
    assert!(
        log.contains("result=\"ok\""),
        "no access-log line for the drained connection:\n{log}"
    );
}
