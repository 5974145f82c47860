//! Cross-network traffic through east-west gateways in network namespaces: network A,
//! network B and a WAN between them, where only the gateways' addresses cross and workload
//! addresses overlap (10.10.0.5 lives in both). The registry runs in this process on the
//! root namespace's WAN address; gateways and workloads run inside their namespaces (on
//! runtimes whose threads entered them, or as real processes).
//!
//! As root these always run (and in CI they must: they fail if namespaces cannot be made);
//! elsewhere they skip with a message.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_gateway::GatewayHandle;
use isthmus_proxy::authz::{AuthorizationPolicy, Rule};
use isthmus_tests::harness::mesh::{
    self, bulk_echo, host, id, on, yaml, Call, Client, Mesh, Workload, APP_PORT, SNI_PORT, SVC_PORT,
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
        ..Default::default()
    };
    let reviews_policy = AuthorizationPolicy {
        allow: vec![Rule {
            principals: vec!["cluster.local/ns/shop/sa/web".into()],
            namespaces: vec![],
        }],
        deny: vec![],
        ..Default::default()
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
    let Some((mut m, gw_b, _w, web)) = reviews_through_b("gw-outage").await else {
        return;
    };
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

/// One service, reviews, with one workload in network B.
fn reviews_in_b() -> Vec<String> {
    vec![
        yaml::service("reviews", "shop", SVC_PORT),
        yaml::workload(
            "reviews-b1",
            "shop",
            "reviews",
            "10.10.0.5",
            APP_PORT,
            "network-b",
        ),
    ]
}

/// The workload of [`reviews_in_b`], letting everyone in.
async fn reviews_b1(m: &Mesh) -> Workload {
    m.workload(
        Net::B,
        "10.10.0.5",
        "reviews-b1",
        "reviews",
        AuthorizationPolicy::default(),
    )
    .await
}

/// [`reviews_in_b`] with B's gateway in-process, the reviews workload, and web in A once it
/// routes to reviews.
async fn reviews_through_b(name: &str) -> Option<(Mesh, GatewayHandle, Workload, Arc<Client>)> {
    let m = Mesh::start(name, &reviews_in_b()).await?;
    let gw = m.gateway(Net::B).await;
    let w = reviews_b1(&m).await;
    let web = m.client(Net::A, "web").await;
    web.wait_for_targets(&host("reviews"), SVC_PORT, 1).await;
    Some((m, gw, w, web))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_gateway_process() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let catalog = reviews_in_b();
    let Some(m) = Mesh::start("gw-drain", &catalog).await else {
        return;
    };
    let _w = reviews_b1(&m).await;
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
    let chunk: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
    let transfer = {
        let web = web.clone();
        let chunk = chunk.clone();
        m.rt(Net::A).spawn(async move {
            let (greeting, s) = web.call(&host("reviews"), SVC_PORT).await?;
            anyhow::ensure!(greeting == "reviews-b1");
            // Read while writing, as a real client does: the echo comes back as it goes.
            // And flush before waiting for the last of the echo: a TLS write can return with
            // its bytes still in the session's buffer (see `bulk_echo`).
            let (mut r, mut w) = tokio::io::split(s.stream);
            let mut back = vec![0u8; chunk.len()];
            let send = async {
                w.write_all(&chunk).await?;
                w.flush().await
            };
            let (sent, got) = tokio::join!(send, r.read_exact(&mut back));
            sent?;
            got?;
            anyhow::ensure!(back == chunk, "first half corrupted");
            let _ = halfway.send(());
            let _ = wait.await;
            let send = async {
                w.write_all(&chunk).await?;
                w.flush().await
            };
            let (sent, got) = tokio::join!(send, r.read_exact(&mut back));
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
    assert!(
        log.contains("relay=\"splice\""),
        "the gateway did not splice the drained connection:\n{log}"
    );
}

/// What the bulk test moves each way.
const BULK: u64 = 100 << 20;

/// 100 MiB each way through B's gateway (SNI passthrough, TCP both sides: spliced) and the
/// workload's inbound (TLS terminated in the process: the copy loop), the client reading the
/// echo while it writes and flushing before it waits for the last of it. Every byte arrives
/// in order both ways (size and SHA-256 at the app and back at the client), and each hop says
/// how it relayed.
///
/// This is the transfer that used to stall in about one run in four. The client wrote
/// everything before reading the echo, which deadlocks once the bytes in flight exceed the
/// path's socket buffers (with this size, also with no gateway or relay at all); then it read
/// while writing but did not flush, so when its socket was full at its last write the tail
/// stayed in its TLS session's buffer and the echo of it never came (the next test shows that
/// step alone). `bulk_echo` does neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_echo_through_the_gateway_is_exact_both_ways() {
    let Some((m, gw, w, web)) = reviews_through_b("gw-bulk").await else {
        return;
    };

    let transfer = on(m.rt(Net::A), async move {
        let (greeting, s) = web.call(&host("reviews"), SVC_PORT).await?;
        anyhow::ensure!(greeting == "reviews-b1", "answered by {greeting}");
        anyhow::ensure!(
            s.target.via_gateway,
            "not through the gateway: {:?}",
            s.target
        );
        Ok(bulk_echo(s.stream, BULK).await?)
    });
    // A bound against a hang, not a speed limit.
    let echo = tokio::time::timeout(Duration::from_secs(600), transfer)
        .await
        .expect("the bulk echo stalled")
        .expect("the bulk echo failed");
    assert_eq!(echo.sent.bytes, BULK);
    assert_eq!(
        echo.echoed, echo.sent,
        "the echo differs from what was sent"
    );
    assert_eq!(
        *w.app.received.lock().unwrap(),
        vec![echo.sent.clone()],
        "the app received something else"
    );

    // The gateway spliced (plain TCP both sides); the workload's inbound, which holds the
    // TLS session, copied. Both counted every byte (the gateway also the ClientHello).
    let spliced = eventually(Duration::from_secs(10), || async {
        gw.tracker
            .recent()
            .into_iter()
            .find(|c| c.bytes_from_upstream >= BULK)
    })
    .await
    .expect("the gateway recorded no bulk connection");
    assert_eq!(spliced.relay, Some("splice"), "{spliced:?}");
    assert_eq!(spliced.result, "ok", "{spliced:?}");
    assert!(spliced.bytes_to_upstream > BULK, "{spliced:?}");
    let copied = eventually(Duration::from_secs(10), || async {
        w.inbound
            .tracker
            .recent()
            .into_iter()
            .find(|c| c.bytes_to_upstream == BULK)
    })
    .await
    .expect("the inbound recorded no bulk connection");
    assert_eq!(copied.relay, Some("copy"), "{copied:?}");
    assert_eq!(
        copied.bytes_from_upstream,
        BULK + "reviews-b1\n".len() as u64
    );
}

/// The step that stalled the bulk echo, alone: no gateway, no relay, a TLS client and a
/// server on loopback that does not read yet. The client writes until a `write` returns
/// while the socket is full: it reports the bytes written, yet the session still holds
/// them (`wants_write`), and nothing but another write, a flush or a shutdown sends them.
/// After a flush the server gets every byte. Runs anywhere (no namespaces).
#[tokio::test]
async fn a_tls_write_returns_before_its_bytes_leave_the_process() {
    use isthmus_proto::test_pki::TestCa;
    use isthmus_proto::tls::{self, ClientAuth, ServerIdentity};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    let ca = TestCa::new("cluster.local");
    let server_id = ca.id("shop", "reviews");
    let server_config = tls::server_config(
        &ca.leaf(&server_id),
        &ca.bundle(),
        ClientAuth::Required,
        &[],
    )
    .unwrap();
    let client_config = tls::client_config(
        Some(&ca.workload("shop", "web")),
        &ca.bundle(),
        ServerIdentity::OneOf(vec![server_id]),
        &[],
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        acceptor.accept(tcp).await.unwrap()
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut client = tokio_rustls::TlsConnector::from(Arc::new(client_config))
        .connect("reviews.shop.svc.cluster.local".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let mut server = server.await.unwrap();

    // Bounded: the kernel's socket buffers hold a few MiB at most.
    let chunk = vec![0x5au8; 64 << 10];
    let mut written = 0usize;
    while !client.get_ref().1.wants_write() {
        assert!(written < 256 << 20, "the socket never filled");
        written += client.write(&chunk).await.unwrap();
    }
    // The last write succeeded, and part of what it reported is still in the process.
    let reader = tokio::spawn(async move {
        let mut got = vec![0u8; written];
        server.read_exact(&mut got).await.map(|_| got.len())
    });
    client.flush().await.unwrap();
    assert!(!client.get_ref().1.wants_write());
    let got = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the flushed bytes arrived")
        .unwrap()
        .unwrap();
    assert_eq!(got, written);
}
