//! Admin surfaces seen from the network: a client in network A's namespace (a non-loopback
//! peer) scrapes `/metrics` of the registry (15014's port), of B's gateway (its metrics
//! port) and of a VM's agent (its metrics port), but is refused `/config_dump`,
//! `/debug/*` and `/logging`: with 403 naming the way in where the admin port is bound to
//! every address (the registry, an agent its operator opened), and not even connected
//! where it stays on loopback (the gateway's default). From loopback the same routes
//! answer.
//!
//! As root these always run (and in CI they must: they fail if namespaces cannot be made);
//! elsewhere they skip with a message.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use isthmus_tests::harness::agent::{agent_binary, group_yaml, Vm, HEALTH};
use isthmus_tests::harness::mesh::{on, yaml, Mesh, APP_PORT, SVC_PORT};
use isthmus_tests::harness::netns::Net;
use isthmus_tests::{http_get, http_request};

const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 7);

/// Every request a scraper may make, then every one it may not, against `admin`, made
/// from network A's namespace; returns the refusals' bodies.
async fn from_network_a(
    m: &Mesh,
    scrape: SocketAddr,
    admin: SocketAddr,
    private: &[(&'static str, &'static str)],
) -> Vec<String> {
    let (status, metrics) = on(
        m.rt(Net::A),
        async move { http_get(scrape, "/metrics").await },
    )
    .await
    .unwrap_or_else(|e| panic!("scraping {scrape} from network A: {e}"));
    assert_eq!(status, 200, "{metrics}");
    assert!(metrics.contains("isthmus_"), "{metrics}");
    let mut refusals = Vec::new();
    for (method, path) in private.iter().copied() {
        let (status, body) = on(m.rt(Net::A), async move {
            http_request(admin, method, path).await
        })
        .await
        .unwrap_or_else(|e| panic!("{method} {path} on {admin} from network A: {e}"));
        assert_eq!(status, 403, "{method} {path} from the network: {body}");
        assert!(
            body.contains(path.split('?').next().unwrap())
                && body.contains("loopback")
                && body.contains("port-forward"),
            "{method} {path}: {body}"
        );
        refusals.push(body);
    }
    refusals
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_registry_admin_from_the_network_scrapes_but_reads_nothing() {
    let Some(m) = Mesh::start_with("admin-reg", &[], |cfg| {
        // As deployed: every address (a pod's), so scrapers reach it.
        cfg.admin_addr = SocketAddr::from(([0, 0, 0, 0], 0));
    })
    .await
    else {
        return;
    };
    let port = m.reg.admin_addr().port();
    let from_a = SocketAddr::new(IpAddr::V4(m.topo.host_addr()), port);
    let private = [
        ("GET", "/debug/catalog?network=network-a"),
        ("GET", "/debug/registrations"),
        ("GET", "/debug/subscribers"),
        ("GET", "/debug/vips"),
        ("GET", "/logging"),
        ("POST", "/logging?level=trace"),
    ];
    let refusals = from_network_a(&m, from_a, from_a, &private).await;
    assert!(
        refusals[0].contains(&m.topo.gateway_addr(Net::A).to_string()),
        "the refusal names the peer: {}",
        refusals[0]
    );
    for path in ["/healthz", "/readyz"] {
        let (status, body) = on(m.rt(Net::A), async move { http_get(from_a, path).await })
            .await
            .unwrap();
        assert_eq!(status, 200, "{path}: {body}");
    }
    // The registry keeps serving loopback, where isthmusctl and a port-forward arrive:
    // /logging reaches its handler there (in this test process no filter is managed).
    let local = SocketAddr::from(([127, 0, 0, 1], port));
    let (status, level) = http_get(local, "/logging").await.unwrap();
    assert_ne!(status, 403, "{level}");
    assert!(!level.contains("is refused to"), "{level}");
    let (status, body) = http_get(local, "/debug/resources").await.unwrap();
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gateway_admin_from_the_network_is_not_even_reachable() {
    let Some(m) = Mesh::start("admin-gw", &[]).await else {
        return;
    };
    let gw = m.gateway(Net::B).await;
    let metrics = gw.metrics_addr.expect("metrics port");
    assert_eq!(metrics.ip(), IpAddr::V4(m.topo.gateway_addr(Net::B)));
    let (status, body) = on(
        m.rt(Net::A),
        async move { http_get(metrics, "/metrics").await },
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("isthmus_gateway_"), "{body}");
    // The metrics port serves nothing else.
    for path in ["/config_dump", "/logging", "/debug/connections"] {
        let (status, body) = on(m.rt(Net::A), async move { http_get(metrics, path).await })
            .await
            .unwrap();
        assert_eq!(status, 404, "{path} on the metrics port: {body}");
    }
    // The admin port listens on B's loopback: from A there is nothing to connect to.
    let admin = gw.admin_addr.expect("admin port");
    assert!(admin.ip().is_loopback(), "{admin}");
    let wan_admin = SocketAddr::new(IpAddr::V4(m.topo.gateway_addr(Net::B)), admin.port());
    let err = on(m.rt(Net::A), async move {
        http_request(wan_admin, "POST", "/logging?level=trace").await
    })
    .await
    .expect_err("the gateway's admin answered from the network");
    assert!(err.to_string().contains("refused"), "{err}");
    // Inside B, on loopback, it answers.
    let (status, dump) = on(m.rt(Net::B), async move {
        http_get(admin, "/config_dump").await
    })
    .await
    .unwrap();
    assert_eq!(status, 200, "{dump}");
    assert!(dump.contains("\"effective\""), "{dump}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_agent_admin_opened_to_the_network_still_refuses_it() {
    let catalog = vec![
        group_yaml("web", "web", "web", APP_PORT, false),
        yaml::service("web", "shop", SVC_PORT),
    ];
    let Some(m) = Mesh::start("admin-vm", &catalog).await else {
        return;
    };
    let vm = Vm::create(&m, Net::A, "web", VM_IP, "web", "web");
    // The operator opened the admin port to every address; the agent still answers only
    // /metrics and health there.
    let mut cmd = vm.logged_command(agent_binary(), &[]);
    cmd.args(["run", "--bundle"])
        .arg(vm.bundle_dir())
        .arg("--state-dir")
        .arg(vm.state_dir())
        .args(["--admin-addr", "0.0.0.0:15000", "--health-addr", HEALTH])
        .args(["--drain-deadline", "2s", "--capture", "none"]);
    let _agent = m.topo.spawn(cmd).expect("start the agent");
    vm.wait_ready().await;

    let scrape = SocketAddr::new(IpAddr::V4(VM_IP), 15020);
    let admin = SocketAddr::new(IpAddr::V4(VM_IP), 15000);
    let private = [
        ("GET", "/config_dump"),
        ("GET", "/debug/connections"),
        ("POST", "/logging?level=trace"),
    ];
    from_network_a(&m, scrape, admin, &private).await;
    let (status, metrics) = on(
        m.rt(Net::A),
        async move { http_get(admin, "/metrics").await },
    )
    .await
    .unwrap();
    assert_eq!(
        status, 200,
        "/metrics stays public on the admin port: {metrics}"
    );
    // The agent keeps serving: on its own loopback the dump answers.
    let dump = vm.admin("/config_dump").await;
    assert!(dump.is_object(), "{dump}");
    assert!(
        vm.log().contains("non-loopback peer refused"),
        "the refusals are logged:\n{}",
        vm.log()
    );
}
