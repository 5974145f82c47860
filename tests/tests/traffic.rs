//! Traffic management from Istio's own resources, and the inbound policy's quotas and
//! faults, across networks (network namespaces):
//!
//! - a DestinationRule's subsets by `version` and a VirtualService `tcp` route splitting
//!   90/10 between v1 and v2, where v2 lives only in network B and v1 in both: a client in
//!   network A makes 2,000 connections, the shares hold, and every v2 answer comes through
//!   B's gateway, which honours the subset the SNI names; then the route moves everything
//!   to v2;
//! - a DestinationRule's `maxConnections`, outlier settings and `localityLbSetting` at the
//!   caller;
//! - quotas and injected faults per calling identity at the destination, through B's
//!   gateway.
//!
//! Needs root (network namespaces); in CI it must run, elsewhere it skips with a message.

use std::collections::BTreeMap;
use std::time::Duration;

use isthmus_tests::eventually;
use isthmus_tests::harness::mesh::{host, yaml, Mesh, APP_PORT, SVC_PORT};
use isthmus_tests::harness::netns::Net;

const WAIT: Duration = Duration::from_secs(30);
const CONNECTIONS: usize = 2000;

/// A WorkloadEntry of `reviews` at `address` in `network`, labelled `version`.
fn reviews(name: &str, address: &str, network: &str, version: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  address: {address}\n  network: {network}\n  ports:\n    tcp: {APP_PORT}\n  labels:\n    app: reviews\n    version: {version}\n  serviceAccount: reviews\n"
    )
}

const RULE: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: shop
spec:
  host: reviews
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
";

fn route(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: shop
spec:
  hosts:
  - reviews
  tcp:
  - match:
    - port: {SVC_PORT}
    route:
    - destination:
        host: reviews
        subset: v1
      weight: {v1}
    - destination:
        host: reviews
        subset: v2
      weight: {v2}
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weighted_route_splits_across_networks_and_the_far_gateway_keeps_the_subset() {
    let catalog = vec![
        yaml::service("reviews", "shop", SVC_PORT),
        reviews("reviews-a-v1", "10.10.0.5", "network-a", "v1"),
        reviews("reviews-b-v1", "10.10.0.7", "network-b", "v1"),
        reviews("reviews-b-v2", "10.10.0.6", "network-b", "v2"),
        RULE.to_string(),
    ];
    let Some(m) = Mesh::start("traffic", &catalog).await else {
        return;
    };
    m.reg.write_resource("route.yaml", &route(90, 10));
    let _gateways = [m.gateway(Net::A).await, m.gateway(Net::B).await];
    let _a_v1 = m
        .workload(
            Net::A,
            "10.10.0.5",
            "reviews-a-v1",
            "reviews",
            Default::default(),
        )
        .await;
    let _b_v1 = m
        .workload(
            Net::B,
            "10.10.0.7",
            "reviews-b-v1",
            "reviews",
            Default::default(),
        )
        .await;
    let _b_v2 = m
        .workload(
            Net::B,
            "10.10.0.6",
            "reviews-b-v2",
            "reviews",
            Default::default(),
        )
        .await;
    let web = m.client(Net::A, "web").await;
    // The route and both subsets are in the client's table.
    let ready = eventually(WAIT, || async {
        let t = web.routes.load();
        let v1 = t
            .lookup(&host("reviews"), SVC_PORT, "v1")
            .ok()?
            .targets()
            .len();
        let v2 = t
            .lookup(&host("reviews"), SVC_PORT, "v2")
            .ok()?
            .targets()
            .len();
        (v1 == 2 && v2 == 1).then_some(())
    })
    .await;
    assert!(ready.is_some(), "the subsets never reached the client");

    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..CONNECTIONS {
        let call = m
            .call(Net::A, &web, "reviews")
            .await
            .unwrap_or_else(|e| panic!("connection {i}: {e:#}"));
        *answers.entry(call.greeting).or_default() += 1;
    }
    let v1 = answers.get("reviews-a-v1").copied().unwrap_or(0)
        + answers.get("reviews-b-v1").copied().unwrap_or(0);
    let v2 = answers.get("reviews-b-v2").copied().unwrap_or(0);
    println!("90/10 over {CONNECTIONS} connections: {answers:?}");
    assert_eq!(v1 + v2, CONNECTIONS, "{answers:?}");
    let share = v2 as f64 / CONNECTIONS as f64;
    assert!(
        (share - 0.10).abs() <= 0.02,
        "v2 got {share:.3}: {answers:?}"
    );
    assert!(
        answers.get("reviews-b-v1").copied().unwrap_or(0) > 0,
        "v1 behind B's gateway never answered: {answers:?}"
    );

    // Everything to v2: only B's v2 answers, through B's gateway.
    m.reg.write_resource("route.yaml", &route(0, 100));
    let moved = eventually(WAIT, || async {
        let t = web.routes.load();
        let d = t
            .resolve(&host("reviews"), SVC_PORT, "", &BTreeMap::new(), None)
            .ok()?;
        (d.key.subset == "v2").then_some(())
    })
    .await;
    assert!(moved.is_some(), "the new route never reached the client");
    for _ in 0..200 {
        let call = m.call(Net::A, &web, "reviews").await.expect("call to v2");
        assert_eq!(call.greeting, "reviews-b-v2");
    }
}

/// A DestinationRule's `trafficPolicy` at the caller: `outlierDetection` ejects the endpoint
/// that refused after one failure (for a minute, so no later connection tries it), and
/// `connectionPool.tcp.maxConnections` refuses a third connection while two are open,
/// naming the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_rules_limit_and_outlier_settings_apply_at_the_caller() {
    use isthmus_tests::harness::mesh::on;
    let rule = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: ratings
  namespace: shop
spec:
  host: ratings
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 2
        connectTimeout: 1s
    outlierDetection:
      consecutive5xxErrors: 1
      baseEjectionTime: 60s
";
    let catalog = vec![
        yaml::service("ratings", "shop", SVC_PORT),
        yaml::workload(
            "ratings-1",
            "shop",
            "ratings",
            "10.10.0.8",
            APP_PORT,
            "network-a",
        ),
        // Its address answers, but nothing listens: every connect is refused.
        yaml::workload(
            "ratings-2",
            "shop",
            "ratings",
            "10.10.0.9",
            APP_PORT,
            "network-a",
        ),
        rule.to_string(),
    ];
    let Some(m) = Mesh::start("traffic-policy", &catalog).await else {
        return;
    };
    let _ratings = m
        .workload(
            Net::A,
            "10.10.0.8",
            "ratings-1",
            "ratings",
            Default::default(),
        )
        .await;
    m.topo.netns(Net::A).add_ip("10.10.0.9".parse().unwrap());
    let web = m.client(Net::A, "web").await;
    let ready = eventually(WAIT, || async {
        let d = web
            .routes
            .load()
            .lookup(&host("ratings"), SVC_PORT, "")
            .ok()?;
        (d.max_connections() == 2 && d.targets().len() == 2).then_some(())
    })
    .await;
    assert!(
        ready.is_some(),
        "the rule's policy never reached the client"
    );

    for _ in 0..10 {
        let call = m.call(Net::A, &web, "ratings").await.expect("call");
        assert_eq!(call.greeting, "ratings-1");
    }
    let dump = web.routes.load().dump();
    let dest = dump
        .iter()
        .find(|d| d.key.hostname == host("ratings") && d.key.subset.is_empty())
        .unwrap();
    let refused = dest
        .endpoints
        .iter()
        .find(|e| e.target.addr.ip().to_string() == "10.10.0.9")
        .unwrap();
    assert!(refused.ejected, "{dest:?}");

    // Two held open; the third is refused at the caller.
    let hostname = host("ratings");
    let open = |c: std::sync::Arc<isthmus_tests::harness::mesh::Client>| {
        let hostname = hostname.clone();
        on(
            m.rt(Net::A),
            async move { c.call(&hostname, SVC_PORT).await },
        )
    };
    let first = open(web.clone()).await.expect("first");
    let second = open(web.clone()).await.expect("second");
    let third = open(web.clone()).await.map(|_| ()).unwrap_err();
    assert!(
        format!("{third:#}").contains("connection limit of 2"),
        "{third:#}"
    );
    drop((first, second));
    let again = eventually(WAIT, || async { open(web.clone()).await.ok() }).await;
    assert!(again.is_some(), "a slot never came back");
}

/// The destination's policy file, as the VM agent reads it.
fn inbound_policy(text: &str) -> isthmus_proxy::authz::AuthorizationPolicy {
    isthmus_proxy::authz::AuthorizationPolicy::from_yaml(std::path::Path::new("policy.yaml"), text)
        .expect("policy")
}

/// The value of one series of a workload's inbound metrics, 0 if it was never counted.
fn inbound_count(
    w: &isthmus_tests::harness::mesh::Workload,
    family: &str,
    rule: &str,
    kind: &'static str,
) -> u64 {
    use isthmus_proxy::metrics::RuleLabels;
    let labels = RuleLabels {
        rule: rule.to_string(),
        kind,
    };
    let m = &w.inbound.metrics;
    match family {
        "quota" => m.quota_refusals.get_or_create(&labels).get(),
        _ => m.faults.get_or_create(&labels).get(),
    }
}

/// `service` with one workload at `ip` in network B under the inbound `policy`, and two
/// callers in network A, `web` and `cart`, that reach it through B's gateway.
struct PolicyScene {
    m: Mesh,
    workload: isthmus_tests::harness::mesh::Workload,
    web: std::sync::Arc<isthmus_tests::harness::mesh::Client>,
    cart: std::sync::Arc<isthmus_tests::harness::mesh::Client>,
    _gateways: [isthmus_gateway::GatewayHandle; 2],
}

impl PolicyScene {
    async fn start(topology: &str, service: &str, ip: &str, policy: &str) -> Option<Self> {
        let name = format!("{service}-1");
        let catalog = vec![
            yaml::service(service, "shop", SVC_PORT),
            yaml::workload(&name, "shop", service, ip, APP_PORT, "network-b"),
        ];
        let m = Mesh::start(topology, &catalog).await?;
        let _gateways = [m.gateway(Net::A).await, m.gateway(Net::B).await];
        let workload = m
            .workload(Net::B, ip, &name, service, inbound_policy(policy))
            .await;
        let (web, cart) = (
            m.client(Net::A, "web").await,
            m.client(Net::A, "cart").await,
        );
        for c in [&web, &cart] {
            c.wait_for_targets(&host(service), SVC_PORT, 1).await;
        }
        Some(Self {
            m,
            workload,
            web,
            cart,
            _gateways,
        })
    }
}

/// Quotas per calling identity at the destination, across networks: `ratings` in network
/// B allows `web` two connections open at once and `cart` three new connections at a
/// trickle of a rate. Each caller is refused over its own quota, counted by rule and limit,
/// while the other is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_refuses_one_caller_over_it_and_not_another() {
    use isthmus_tests::harness::mesh::on;
    let Some(PolicyScene {
        m,
        workload: ratings,
        web,
        cart,
        _gateways,
    }) = PolicyScene::start(
        "traffic-quota",
        "ratings",
        "10.10.0.8",
        r#"
quotas:
  - principals: ["cluster.local/ns/shop/sa/web"]
    maxConnections: 2
  - principals: ["cluster.local/ns/shop/sa/cart"]
    connectionsPerSecond: 0.001
    burst: 3
"#,
    )
    .await
    else {
        return;
    };
    let hostname = host("ratings");
    let open = |c: std::sync::Arc<isthmus_tests::harness::mesh::Client>| {
        let hostname = hostname.clone();
        on(
            m.rt(Net::A),
            async move { c.call(&hostname, SVC_PORT).await },
        )
    };

    // web: two open at once, the third refused; cart, meanwhile, is not held to web's.
    let first = open(web.clone()).await.expect("web's first");
    let second = open(web.clone()).await.expect("web's second");
    assert!(
        open(web.clone()).await.is_err(),
        "web's third was let through"
    );
    assert_eq!(
        inbound_count(&ratings, "quota", "quotas[0]", "concurrent"),
        1
    );
    for i in 0..3 {
        let (greeting, _) = open(cart.clone())
            .await
            .unwrap_or_else(|e| panic!("cart's call {i}: {e:#}"));
        assert_eq!(greeting, "ratings-1");
    }
    // cart's burst is spent and its rate is one connection in 1,000 s.
    assert!(
        open(cart.clone()).await.is_err(),
        "cart's fourth was let through"
    );
    assert_eq!(inbound_count(&ratings, "quota", "quotas[1]", "rate"), 1);
    // web's connections end and web gets its places back; cart still has none.
    drop((first, second));
    let again = eventually(WAIT, || async { open(web.clone()).await.ok() }).await;
    assert!(again.is_some(), "web's places never came back");
    assert!(open(cart.clone()).await.is_err());
    assert_eq!(inbound_count(&ratings, "quota", "quotas[0]", "rate"), 0);
}

/// Faults per calling identity at the destination, across networks: `details` in network B
/// delays a quarter of `web`'s connections by 2 s and resets a fifth of `cart`'s. The
/// share is exact and spread evenly (every fourth, every fifth), each delayed call took at
/// least the delay, and each fault is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_delays_or_resets_its_share_of_one_callers_connections() {
    const DELAY: Duration = Duration::from_secs(2);
    let Some(PolicyScene {
        m,
        workload: details,
        web,
        cart,
        _gateways,
    }) = PolicyScene::start(
        "traffic-fault",
        "details",
        "10.10.0.9",
        r#"
faults:
  - principals: ["cluster.local/ns/shop/sa/web"]
    delay:
      fixedDelay: 2s
      percentage: {value: 25}
  - principals: ["cluster.local/ns/shop/sa/cart"]
    abort:
      percentage: {value: 20}
"#,
    )
    .await
    else {
        return;
    };

    let mut delayed = Vec::new();
    for i in 0..20 {
        let started = std::time::Instant::now();
        m.call(Net::A, &web, "details")
            .await
            .unwrap_or_else(|e| panic!("web's call {i}: {e:#}"));
        if started.elapsed() >= DELAY {
            delayed.push(i);
        }
    }
    // Every fourth was delayed, and took at least the delay.
    let picked = [3, 7, 11, 15, 19];
    for i in picked {
        assert!(
            delayed.contains(&i),
            "web's call {i} was not delayed: {delayed:?}"
        );
    }
    assert_eq!(inbound_count(&details, "fault", "faults[0]", "delay"), 5);
    assert_eq!(inbound_count(&details, "fault", "faults[0]", "abort"), 0);

    let mut reset = Vec::new();
    for i in 0..20 {
        if m.call(Net::A, &cart, "details").await.is_err() {
            reset.push(i);
        }
    }
    assert_eq!(reset, vec![4, 9, 14, 19], "cart's failed calls");
    assert_eq!(inbound_count(&details, "fault", "faults[1]", "abort"), 4);
    assert_eq!(inbound_count(&details, "fault", "faults[1]", "delay"), 0);
}

/// A WorkloadEntry of `ratings` at `address` in network A, in `locality`.
fn ratings_at(name: &str, address: &str, locality: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  address: {address}\n  network: network-a\n  locality: {locality}\n  ports:\n    tcp: {APP_PORT}\n  labels:\n    app: ratings\n  serviceAccount: ratings\n"
    )
}

/// `localityLbSetting` at the caller: a caller in eu-west/zone-a whose own region has only
/// a dead endpoint fails over to the region the rule names (ap-south), never to us-east,
/// though both are as far; with `failoverPriority` on the zone label instead, it goes to
/// the endpoint sharing its zone name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_failover_goes_where_the_destination_rule_says() {
    use isthmus_proto::model::Locality;
    let rule = |setting: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: ratings
  namespace: shop
spec:
  host: ratings
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 1
      baseEjectionTime: 60s
    loadBalancer:
      localityLbSetting:
{setting}"
        )
    };
    let failover = "        failover:\n        - {from: eu-west, to: ap-south}\n";
    let by_zone = "        failoverPriority: [topology.kubernetes.io/zone]\n";
    let catalog = vec![
        yaml::service("ratings", "shop", SVC_PORT),
        // Its address answers, but nothing listens: every connect to it is refused.
        ratings_at("ratings-near", "10.10.0.10", "eu-west/zone-a"),
        ratings_at("ratings-us", "10.10.0.11", "us-east/zone-a"),
        ratings_at("ratings-ap", "10.10.0.12", "ap-south/zone-b"),
    ];
    let Some(m) = Mesh::start("traffic-locality", &catalog).await else {
        return;
    };
    m.reg.write_resource("rule.yaml", &rule(failover));
    m.topo.netns(Net::A).add_ip("10.10.0.10".parse().unwrap());
    let _us = m
        .workload(
            Net::A,
            "10.10.0.11",
            "ratings-us",
            "ratings",
            Default::default(),
        )
        .await;
    let _ap = m
        .workload(
            Net::A,
            "10.10.0.12",
            "ratings-ap",
            "ratings",
            Default::default(),
        )
        .await;
    let web = m
        .client_at(Net::A, "web", Locality::parse("eu-west/zone-a"))
        .await;
    let has_rule = |want: &'static str| {
        let web = web.clone();
        async move {
            let d = web
                .routes
                .load()
                .lookup(&host("ratings"), SVC_PORT, "")
                .ok()?;
            (d.targets().len() == 3 && format!("{:?}", d.locality()).contains(want)).then_some(())
        }
    };
    assert!(
        eventually(WAIT, || has_rule("ap-south")).await.is_some(),
        "the failover rule never reached the client"
    );
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..20 {
        let call = m
            .call(Net::A, &web, "ratings")
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e:#}"));
        *answers.entry(call.greeting).or_default() += 1;
    }
    assert_eq!(answers, BTreeMap::from([("ratings-ap".to_string(), 20)]));

    m.reg.write_resource("rule.yaml", &rule(by_zone));
    assert!(
        eventually(WAIT, || has_rule("Zone")).await.is_some(),
        "the priority rule never reached the client"
    );
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..20 {
        let call = m
            .call(Net::A, &web, "ratings")
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e:#}"));
        *answers.entry(call.greeting).or_default() += 1;
    }
    assert_eq!(answers, BTreeMap::from([("ratings-us".to_string(), 20)]));
}

/// A real ClientHello naming `sni`: the first bytes an app speaking TLS sends.
fn client_hello(sni: &str) -> Vec<u8> {
    let cfg = rustls::ClientConfig::builder_with_provider(isthmus_proto::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// A VirtualService's `tls` route on a captured connection: the caller reads the server
/// name from the app's ClientHello (without taking the bytes off the connection) and a
/// name the route lists goes to v2 in network B, through B's gateway; another name, and
/// plaintext, take the `tcp` route to v1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_route_matches_the_server_name_the_app_sends() {
    use isthmus_proto::drain;
    use isthmus_proxy::outbound::{self, OutboundTarget};
    use tokio::io::AsyncWriteExt;
    let route = format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: shop
spec:
  hosts:
  - reviews
  - canary.reviews.example
  tls:
  - match:
    - port: {SVC_PORT}
      sniHosts: [canary.reviews.example]
    route:
    - destination:
        host: reviews
        subset: v2
  tcp:
  - route:
    - destination:
        host: reviews
        subset: v1
"
    );
    let catalog = vec![
        yaml::service("reviews", "shop", SVC_PORT),
        reviews("reviews-a-v1", "10.10.0.5", "network-a", "v1"),
        reviews("reviews-b-v2", "10.10.0.6", "network-b", "v2"),
        RULE.to_string(),
        route,
    ];
    let Some(m) = Mesh::start("traffic-tls", &catalog).await else {
        return;
    };
    let _gateways = [m.gateway(Net::A).await, m.gateway(Net::B).await];
    let _v1 = m
        .workload(
            Net::A,
            "10.10.0.5",
            "reviews-a-v1",
            "reviews",
            Default::default(),
        )
        .await;
    let _v2 = m
        .workload(
            Net::B,
            "10.10.0.6",
            "reviews-b-v2",
            "reviews",
            Default::default(),
        )
        .await;
    let web = m.client(Net::A, "web").await;
    let ready = eventually(WAIT, || async {
        let t = web.routes.load();
        let n = |subset| {
            t.lookup(&host("reviews"), SVC_PORT, subset)
                .ok()
                .map(|d| d.targets().len())
        };
        (n("v1") == Some(1) && n("v2") == Some(1) && t.wants_sni(&host("reviews"))).then_some(())
    })
    .await;
    assert!(ready.is_some(), "the routes never reached the client");

    // The app's side: a captured listener for reviews, as the agent's capture gives it.
    let outbound = web.outbound.clone();
    let hostname = host("reviews");
    let answers = isthmus_tests::harness::mesh::on(m.rt(Net::A), async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_trigger, shutdown) = drain::channel();
        let target = OutboundTarget {
            hostname,
            port: SVC_PORT,
            subset: String::new(),
            sni: None,
        };
        tokio::spawn(outbound::serve(listener, outbound, target, 64, shutdown));
        let mut answers = Vec::new();
        let first_bytes = [
            client_hello("canary.reviews.example"),
            client_hello("reviews.shop.svc.cluster.local"),
            b"plain text\n".to_vec(),
            client_hello("canary.reviews.example"),
        ];
        for bytes in first_bytes {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(&bytes).await.unwrap();
            let greeting = isthmus_tests::harness::mesh::read_line(&mut s)
                .await
                .unwrap_or_else(|e| format!("error: {e:#}"));
            answers.push(greeting);
        }
        answers
    })
    .await;
    assert_eq!(
        answers,
        [
            "reviews-b-v2",
            "reviews-a-v1",
            "reviews-a-v1",
            "reviews-b-v2"
        ]
    );
}
