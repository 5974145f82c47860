//! The DNS proxy against a real registry, a real upstream (unbound) and the real `dig`:
//! mesh names, short names, wildcards, headless services, catalog changes, forwarding,
//! caching, failover, and malformed input.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_dns::DnsHandle;
use isthmus_proto::subscription::SyncState;
use isthmus_tests::harness::dns::{a_query, dead_upstream, dig, proxy_config, require, Unbound};
use isthmus_tests::{eventually, http_get, metric, yaml, TestRegistry, NETWORK};
use tokio::sync::watch;

/// A ServiceEntry with explicit hosts, addresses and resolution.
fn service_entry(name: &str, ns: &str, hosts: &[&str], addresses: &[&str], extra: &str) -> String {
    let list = |v: &[&str]| {
        v.iter()
            .map(|h| format!("  - \"{h}\"\n"))
            .collect::<String>()
    };
    let addrs = if addresses.is_empty() {
        String::new()
    } else {
        format!("  addresses:\n{}", list(addresses))
    };
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  hosts:\n{hosts}{addrs}  ports:\n  - number: 80\n    name: http\n    protocol: HTTP\n{extra}",
        hosts = list(hosts),
    )
}

fn mesh_catalog() -> Vec<(&'static str, String)> {
    vec![
        (
            "reviews.yaml",
            service_entry(
                "reviews",
                "shop",
                &["reviews.shop.svc.cluster.local"],
                &["10.96.0.10"],
                "  resolution: STATIC\n",
            ),
        ),
        (
            "ratings.yaml",
            service_entry(
                "ratings",
                "books",
                &["ratings.books.svc.cluster.local"],
                &["10.96.0.20"],
                "  resolution: STATIC\n",
            ),
        ),
        (
            "wild.yaml",
            service_entry(
                "wild",
                "shop",
                &["*.wild.example.com"],
                &["240.240.0.7"],
                "  resolution: STATIC\n",
            ),
        ),
        (
            "db.yaml",
            // Headless: opted out of a registry-allocated VIP, so its endpoints are the answer.
            service_entry(
                "db",
                "shop",
                &["db.shop.svc.cluster.local"],
                &[],
                "  resolution: STATIC\n  workloadSelector:\n    labels:\n      app: db\n",
            )
            .replace(
                "  namespace: shop\n",
                "  namespace: shop\n  labels:\n    isthmus.io/vip: none\n",
            ),
        ),
        (
            "db-workloads.yaml",
            yaml::docs(&[
                yaml::workload("db-1", "shop", "db", "10.0.0.1", NETWORK),
                yaml::workload("db-2", "shop", "db", "10.0.0.2", NETWORK),
                yaml::workload("db-3", "shop", "db", "10.1.0.1", "network-b"),
            ]),
        ),
        ("network-b.yaml", yaml::network("network-b", &["192.0.2.1"])),
    ]
}

struct Setup {
    reg: TestRegistry,
    dns: DnsHandle,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn start(
        catalog: &[(&str, String)],
        tune: impl FnOnce(&mut isthmus_dns::Config),
    ) -> Setup {
        let files: Vec<(&str, &str)> = catalog.iter().map(|(n, y)| (*n, y.as_str())).collect();
        let reg = TestRegistry::start(&files).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = proxy_config(&reg, dir.path()).await.unwrap();
        cfg.namespace = "shop".into();
        tune(&mut cfg);
        let dns = isthmus_dns::run(cfg).await.unwrap();
        Setup { reg, dns, dir }
    }

    fn addr(&self) -> SocketAddr {
        self.dns.dns_addr
    }

    async fn synced(&self) -> Arc<SyncState> {
        let mut rx: watch::Receiver<Arc<SyncState>> = self.dns.sync.clone();
        let state = tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| s.synced()))
            .await
            .expect("the proxy synced with the registry")
            .unwrap()
            .clone();
        state
    }

    async fn metrics(&self) -> String {
        http_get(self.dns.admin_addr.unwrap(), "/metrics")
            .await
            .unwrap()
            .1
    }

    async fn count(&self, qtype: &str, outcome: &str) -> f64 {
        metric(
            &self.metrics().await,
            &format!("isthmus_dns_queries_total{{qtype=\"{qtype}\",outcome=\"{outcome}\"}}"),
        )
        .unwrap_or(0.0)
    }

    async fn stop(mut self) {
        self.dns.shutdown().await;
        self.reg.stop().await;
        drop(self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_names_from_the_catalog() {
    if !require("dig", "dnsutils") || !require("unbound", "unbound") {
        return;
    }
    let upstream = Unbound::start(&[("example.test", 60)], &[]).unwrap();
    let s = Setup::start(&mesh_catalog(), |c| c.upstreams = vec![upstream.addr]).await;
    s.synced().await;
    let a = s.addr();

    // A mesh service by its full name: authoritative, the configured TTL.
    let d = dig(a, &["reviews.shop.svc.cluster.local", "A"]).await;
    assert_eq!(d.status, "NOERROR", "{}", d.output);
    assert_eq!(d.answers, ["10.96.0.10"], "{}", d.output);
    assert!(d.flags.contains(&"aa".to_string()), "{}", d.output);
    assert_eq!(d.ttls, [30], "{}", d.output);

    // Short names in the proxy's namespace, and another namespace's with its namespace.
    // Each is answered with the CNAME chain to the service hostname, then its address.
    for name in ["reviews", "reviews.shop", "reviews.shop.svc"] {
        let d = dig(a, &[name, "A"]).await;
        assert_eq!(d.answer_types, ["CNAME", "A"], "{name}: {}", d.output);
        assert_eq!(
            d.answers,
            ["reviews.shop.svc.cluster.local.", "10.96.0.10"],
            "{name}: {}",
            d.output
        );
    }
    for name in ["ratings.books", "ratings.books.svc"] {
        let d = dig(a, &[name, "A"]).await;
        assert_eq!(
            d.answers,
            ["ratings.books.svc.cluster.local.", "10.96.0.20"],
            "{name}: {}",
            d.output
        );
    }
    // Out of the namespace without it: not a mesh name, so it goes upstream (NXDOMAIN there).
    let d = dig(a, &["ratings", "A"]).await;
    assert!(d.answers.is_empty(), "{}", d.output);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.output);

    // A wildcard host matches at any depth, not its parent.
    for name in ["api.wild.example.com", "a.b.c.wild.example.com"] {
        let d = dig(a, &[name, "A"]).await;
        assert_eq!(d.answers, ["240.240.0.7"], "{name}: {}", d.output);
    }

    // Headless: the workloads on this network only, never the other network or its gateway.
    let d = dig(a, &["db.shop.svc.cluster.local", "A"]).await;
    let mut got = d.answers.clone();
    got.sort();
    assert_eq!(got, ["10.0.0.1", "10.0.0.2"], "{}", d.output);

    // A v4-only service asked for AAAA: NOERROR and no answer, never NXDOMAIN.
    let d = dig(a, &["reviews.shop.svc.cluster.local", "AAAA"]).await;
    assert_eq!(d.status, "NOERROR", "{}", d.output);
    assert!(d.answers.is_empty(), "{}", d.output);

    // A name in the service domain the catalog does not have.
    let d = dig(a, &["nope.shop.svc.cluster.local", "A"]).await;
    assert_eq!(d.status, "NXDOMAIN", "{}", d.output);

    // Over TCP too.
    let d = dig(a, &["+tcp", "reviews.shop.svc.cluster.local", "A"]).await;
    assert_eq!(d.answers, ["10.96.0.10"], "{}", d.output);

    assert!(s.count("A", "mesh_hit").await >= 10.0);
    assert_eq!(s.count("AAAA", "mesh_hit").await, 1.0);
    assert_eq!(s.count("A", "nxdomain").await, 1.0);

    // The name table is on the admin port.
    let (code, dump) = http_get(s.dns.admin_addr.unwrap(), "/config_dump")
        .await
        .unwrap();
    assert_eq!(code, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let names: Vec<&str> = dump["name_table"]["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["hostname"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"*.wild.example.com"), "{names:?}");
    assert_eq!(
        http_get(s.dns.admin_addr.unwrap(), "/readyz")
            .await
            .unwrap()
            .0,
        200
    );

    s.stop().await;
    drop(upstream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_changes_arrive_as_one_delta_and_outages_keep_the_last_table() {
    if !require("dig", "dnsutils") {
        return;
    }
    let mut s = Setup::start(&mesh_catalog(), |c| c.upstreams = vec![dead_upstream()]).await;
    let first = s.synced().await;
    assert_eq!(first.snapshots, 1);
    let a = s.addr();
    let fresh = "fresh.shop.svc.cluster.local";
    assert_eq!(dig(a, &[fresh, "A"]).await.status, "NXDOMAIN");

    // Added.
    s.reg.write_resource(
        "fresh.yaml",
        &service_entry(
            "fresh",
            "shop",
            &[fresh],
            &["10.96.0.99"],
            "  resolution: STATIC\n",
        ),
    );
    let added = eventually(Duration::from_secs(20), || async {
        let d = dig(a, &[fresh, "A"]).await;
        (d.answers == ["10.96.0.99"]).then_some(d)
    })
    .await;
    assert!(added.is_some(), "the new service is answered");
    let state = s.dns.sync.borrow().clone();
    assert_eq!(state.snapshots, 1, "a delta, not a new snapshot");

    // Removed.
    std::fs::remove_file(s.reg.resources_dir().join("fresh.yaml")).unwrap();
    let removed = eventually(Duration::from_secs(20), || async {
        let d = dig(a, &[fresh, "A"]).await;
        (d.status == "NXDOMAIN").then_some(d)
    })
    .await;
    assert!(removed.is_some(), "the removed service is gone");
    assert_eq!(s.dns.sync.borrow().snapshots, 1);

    // The registry goes away: the last table keeps answering.
    s.reg.stop().await;
    let mut rx = s.dns.sync.clone();
    tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|st| !st.connected))
        .await
        .unwrap()
        .unwrap();
    let d = dig(a, &["reviews", "A"]).await;
    assert_eq!(
        d.answers.last().map(String::as_str),
        Some("10.96.0.10"),
        "{}",
        d.output
    );
    assert!(metric(&s.metrics().await, "isthmus_dns_catalog_connected").is_some());

    s.dns.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_names_are_servfail_before_the_first_sync_and_the_rest_is_forwarded() {
    if !require("dig", "dnsutils") || !require("unbound", "unbound") {
        return;
    }
    let upstream = Unbound::start(
        &[("example.test", 60)],
        &["www.example.test. 300 IN A 192.0.2.10".into()],
    )
    .unwrap();
    // Credentials from a registry that is then stopped: the proxy never syncs.
    let mut reg = TestRegistry::start(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = proxy_config(&reg, dir.path()).await.unwrap();
    reg.stop().await;
    cfg.upstreams = vec![upstream.addr];
    let dns = isthmus_dns::run(cfg).await.unwrap();
    let d = dig(dns.dns_addr, &["reviews.shop.svc.cluster.local", "A"]).await;
    assert_eq!(d.status, "SERVFAIL", "{}", d.output);
    let d = dig(dns.dns_addr, &["www.example.test", "A"]).await;
    assert_eq!(d.answers, ["192.0.2.10"], "{}", d.output);
    assert_eq!(
        http_get(dns.admin_addr.unwrap(), "/readyz")
            .await
            .unwrap()
            .0,
        503
    );
    dns.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_and_caching_through_a_real_unbound() {
    if !require("dig", "dnsutils") || !require("unbound", "unbound") {
        return;
    }
    let mut records = vec![
        "www.example.test. 300 IN A 192.0.2.10".to_string(),
        "www.example.test. 300 IN TXT \"hello\"".to_string(),
        // A TXT record for a mesh name upstream is never asked for: the mesh owns the name.
        "reviews.shop.svc.cluster.local. 300 IN TXT \"from-upstream\"".to_string(),
    ];
    // More A records than fit in 1232 bytes: unbound truncates, the proxy retries over TCP.
    records.extend((1..=120).map(|i| {
        format!(
            "big.example.test. 300 IN A 10.2.{}.{}",
            i / 200,
            i % 200 + 1
        )
    }));
    let upstream =
        Unbound::start(&[("example.test", 45), ("cluster.local", 45)], &records).unwrap();
    let s = Setup::start(&mesh_catalog(), |c| c.upstreams = vec![upstream.addr]).await;
    s.synced().await;
    let a = s.addr();

    let d = dig(a, &["www.example.test", "A"]).await;
    assert_eq!(d.answers, ["192.0.2.10"], "{}", d.output);
    assert!(
        !d.flags.contains(&"aa".to_string()),
        "a forwarded answer is not ours: {}",
        d.output
    );
    assert_eq!(s.count("A", "forwarded").await, 1.0);
    assert_eq!(s.count("A", "cache_hit").await, 0.0);

    // Again: from the cache, TTL counting down from unbound's.
    let d = dig(a, &["www.example.test", "A"]).await;
    assert_eq!(d.answers, ["192.0.2.10"], "{}", d.output);
    assert_eq!(s.count("A", "cache_hit").await, 1.0);
    assert_eq!(s.count("A", "forwarded").await, 1.0);

    // Other types of names outside the mesh are forwarded; of a mesh name, they are
    // NOERROR with no data, answered here (never the upstream's, whose NXDOMAIN would deny
    // the name's A record too).
    let d = dig(a, &["www.example.test", "TXT"]).await;
    assert_eq!(d.answers, ["\"hello\""], "{}", d.output);
    let d = dig(a, &["reviews.shop.svc.cluster.local", "TXT"]).await;
    assert_eq!(d.status, "NOERROR", "{}", d.output);
    assert!(d.answers.is_empty(), "{}", d.output);
    assert_eq!(s.count("TXT", "forwarded").await, 1.0);
    assert_eq!(s.count("TXT", "mesh_hit").await, 1.0);
    // An EDNS version this proxy does not speak: BADVERS, as RFC 6891 has it.
    let d = dig(
        a,
        &[
            "+edns=1",
            "+noednsnegotiation",
            "reviews.shop.svc.cluster.local",
            "A",
        ],
    )
    .await;
    assert_eq!(d.status, "BADVERS", "{}", d.output);

    // NXDOMAIN is cached negatively (the SOA minimum is 45 s).
    for _ in 0..2 {
        let d = dig(a, &["nope.example.test", "A"]).await;
        assert_eq!(d.status, "NXDOMAIN", "{}", d.output);
    }
    assert_eq!(s.count("A", "forwarded").await, 2.0);
    assert_eq!(s.count("A", "cache_hit").await, 2.0);

    // A truncated upstream answer is fetched again over TCP; dig, truncated in turn over
    // UDP, retries over TCP and gets all of it (from the cache).
    let d = dig(a, &["big.example.test", "A"]).await;
    assert_eq!(d.answers.len(), 120, "{}", d.output);
    let m = s.metrics().await;
    assert!(
        metric(&m, "isthmus_dns_upstream_tcp_retries_total").unwrap() >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "isthmus_dns_cache_entries").unwrap() >= 3.0,
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "isthmus_dns_upstream_duration_seconds_count{{upstream=\"{}\"}}",
            upstream.addr
        )),
        "{m}"
    );

    s.stop().await;
    drop(upstream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_the_second_upstream_and_servfail_when_all_are_dead() {
    if !require("dig", "dnsutils") || !require("unbound", "unbound") {
        return;
    }
    let upstream = Unbound::start(
        &[("example.test", 60)],
        &["www.example.test. 300 IN A 192.0.2.10".into()],
    )
    .unwrap();
    let s = Setup::start(&mesh_catalog(), |c| {
        c.upstreams = vec![dead_upstream(), upstream.addr];
        c.query_timeout = Duration::from_secs(2);
    })
    .await;
    s.synced().await;
    let d = dig(s.addr(), &["www.example.test", "A"]).await;
    assert_eq!(d.answers, ["192.0.2.10"], "{}", d.output);
    let m = s.metrics().await;
    assert!(
        m.contains("isthmus_dns_upstream_errors_total{upstream=\""),
        "{m}"
    );
    s.stop().await;

    // Parallel: a silent first upstream does not delay the answer of the second.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let s = Setup::start(&mesh_catalog(), |c| {
        c.upstreams = vec![silent.local_addr().unwrap(), upstream.addr];
        c.upstream_mode = isthmus_dns::forwarder::UpstreamMode::Parallel;
        c.query_timeout = Duration::from_secs(30);
    })
    .await;
    s.synced().await;
    let d = dig(s.addr(), &["www.example.test", "A", "+time=10", "+tries=1"]).await;
    assert_eq!(d.answers, ["192.0.2.10"], "{}", d.output);
    assert_eq!(s.count("A", "forwarded").await, 1.0);
    s.stop().await;
    drop(silent);

    // Every upstream dead: one refuses, one never answers. SERVFAIL within the timeout.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let s = Setup::start(&mesh_catalog(), |c| {
        c.upstreams = vec![dead_upstream(), silent.local_addr().unwrap()];
        c.query_timeout = Duration::from_secs(1);
    })
    .await;
    s.synced().await;
    let started = Instant::now();
    let d = dig(s.addr(), &["www.example.test", "A", "+time=5", "+tries=1"]).await;
    let took = started.elapsed();
    assert_eq!(d.status, "SERVFAIL", "{}", d.output);
    assert!(
        took < Duration::from_secs(4),
        "answered after {took:?}, timeout 1s"
    );
    assert_eq!(s.count("A", "servfail").await, 1.0);
    // The mesh still answers.
    assert_eq!(
        dig(s.addr(), &["reviews", "A"])
            .await
            .answers
            .last()
            .cloned(),
        Some("10.96.0.10".to_string())
    );
    s.stop().await;
    drop(upstream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_are_counted_and_never_crash() {
    if !require("dig", "dnsutils") {
        return;
    }
    let s = Setup::start(&mesh_catalog(), |c| c.upstreams = vec![dead_upstream()]).await;
    s.synced().await;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(s.addr()).await.unwrap();

    let header = |id: u16, qd: u16| {
        let mut h = id.to_be_bytes().to_vec();
        h.extend_from_slice(&[0x01, 0x00]);
        h.extend_from_slice(&qd.to_be_bytes());
        h.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        h
    };
    let with = |mut h: Vec<u8>, rest: &[u8]| {
        h.extend_from_slice(rest);
        h
    };
    let formerr_cases: Vec<Vec<u8>> = vec![
        // A label running past the end.
        with(header(1, 1), &[63, b'a', b'b']),
        // A compression pointer to itself.
        with(header(2, 1), &[0xc0, 12, 0, 1, 0, 1]),
        // Garbage after a valid header.
        with(header(3, 1), &[0xff; 64]),
        // No question.
        header(4, 0),
        // A label length with the reserved 0b01 prefix.
        with(header(5, 1), &[0x41, b'a', 0, 0, 1, 0, 1]),
    ];
    let mut buf = [0u8; 512];
    for p in &formerr_cases {
        sock.send(p).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
            .await
            .expect("a FORMERR answer")
            .unwrap();
        assert_eq!(&buf[..2], &p[..2], "the answer carries the query's ID");
        assert_eq!(buf[3] & 0x0f, 1, "FORMERR");
        assert!(n >= 12);
    }
    // Dropped: too short to carry an ID, a response, oversized.
    let mut response = header(9, 1);
    response[2] |= 0x80;
    for p in [vec![0x12], vec![1, 2, 3, 4, 5], response, vec![0u8; 5000]] {
        sock.send(&p).await.unwrap();
    }
    // Still alive and answering.
    let d = dig(s.addr(), &["reviews.shop.svc.cluster.local", "A"]).await;
    assert_eq!(d.answers, ["10.96.0.10"], "{}", d.output);
    let m = s.metrics().await;
    let count = |reason: &str| {
        metric(
            &m,
            &format!("isthmus_dns_malformed_packets_total{{reason=\"{reason}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(count("unparseable"), 4.0, "{m}");
    assert_eq!(count("questions"), 1.0, "{m}");
    assert_eq!(count("short"), 2.0, "{m}");
    assert_eq!(count("response"), 1.0, "{m}");
    assert_eq!(count("oversize"), 1.0, "{m}");

    // Over TCP: a bad length prefix closes the connection, nothing else.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    tcp.write_all(&[0xff, 0xff, 1, 2, 3]).await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    let d = dig(s.addr(), &["+tcp", "reviews", "A"]).await;
    assert_eq!(
        d.answers.last().map(String::as_str),
        Some("10.96.0.10"),
        "{}",
        d.output
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocated_vips_are_answered_distinct_and_stable_across_a_registry_restart() {
    if !require("dig", "dnsutils") {
        return;
    }
    // Two ServiceEntries without addresses, on the same port.
    let catalog = vec![
        (
            "api.yaml",
            service_entry(
                "api",
                "shop",
                &["api.shop.svc.cluster.local"],
                &[],
                "  resolution: STATIC\n",
            ),
        ),
        (
            "billing.yaml",
            service_entry(
                "billing",
                "shop",
                &["billing.shop.svc.cluster.local"],
                &[],
                "  resolution: STATIC\n",
            ),
        ),
    ];
    let mut s = Setup::start(&catalog, |_| {}).await;
    s.synced().await;
    let a = s.addr();
    let answer = |name: &'static str, qtype: &'static str| async move {
        let d = dig(a, &[name, qtype]).await;
        assert_eq!(d.status, "NOERROR", "{}", d.output);
        assert_eq!(d.answers.len(), 1, "{}", d.output);
        d.answers[0].clone()
    };
    let api4 = answer("api.shop.svc.cluster.local", "A").await;
    let api6 = answer("api.shop.svc.cluster.local", "AAAA").await;
    let billing4 = answer("billing.shop.svc.cluster.local", "A").await;
    assert!(
        api4.starts_with("240.240.") && billing4.starts_with("240.240."),
        "{api4} {billing4}"
    );
    assert!(api6.starts_with("2001:2:"), "{api6}");
    assert_ne!(api4, billing4, "two services never share a VIP");

    // Restart the registry on the same address; the proxy reconnects. A service added after
    // the restart proves the answers come from the new registry.
    s.reg.cfg.grpc_addr = s.reg.grpc_addr();
    s.reg.cfg.admin_addr = s.reg.admin_addr();
    s.reg.restart().await.unwrap();
    s.reg.write_resource(
        "late.yaml",
        &service_entry(
            "late",
            "shop",
            &["late.shop.svc.cluster.local"],
            &[],
            "  resolution: STATIC\n",
        ),
    );
    eventually(Duration::from_secs(20), || async {
        let d = dig(a, &["late.shop.svc.cluster.local", "A"]).await;
        (d.status == "NOERROR" && !d.answers.is_empty()).then_some(())
    })
    .await
    .expect("the proxy follows the restarted registry");
    assert_eq!(
        answer("api.shop.svc.cluster.local", "A").await,
        api4,
        "stable across a registry restart"
    );
    assert_eq!(answer("api.shop.svc.cluster.local", "AAAA").await, api6);
    assert_eq!(
        answer("billing.shop.svc.cluster.local", "A").await,
        billing4
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_rate_limit_is_refused_then_dropped_and_others_are_not() {
    let s = Setup::start(&mesh_catalog(), |c| {
        c.upstreams = vec![dead_upstream()];
        c.client_rate = 5;
        c.client_burst = 5;
        // The flood comes from loopback addresses here, which are exempt by default.
        c.rate_limit_loopback = true;
    })
    .await;
    s.synced().await;
    let flood = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    flood.connect(s.addr()).await.unwrap();
    for id in 0..50u16 {
        flood
            .send(&a_query(id, "reviews.shop.svc.cluster.local"))
            .await
            .unwrap();
    }
    let (mut answered, mut refused) = (0, 0);
    let mut buf = [0u8; 512];
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(500), flood.recv(&mut buf)).await
    {
        // RCODE is the low nibble of the fourth header byte: 5 is REFUSED.
        match buf[3] & 0x0f {
            5 => {
                refused += 1;
                assert_eq!(n, 12, "a refusal is the bare header: nothing to amplify");
            }
            _ => answered += 1,
        }
    }
    assert!(answered >= 5, "the burst is answered ({answered})");
    // Over the limit, refused: a resolver library moves on at once. As many refusals again
    // as the limit allows answers; past that (ten times the limit here: a flood) dropped.
    assert!(refused >= 5, "over the limit, refused first ({refused})");
    let metrics = s.metrics().await;
    let limited = metric(&metrics, "isthmus_dns_rate_limited_total").unwrap_or(0.0);
    assert_eq!(limited as usize, refused, "every refused query is counted");
    let dropped =
        metric(&metrics, "isthmus_dns_rate_limited_dropped_total").unwrap_or(0.0) as usize;
    assert!(dropped > 0, "the rest of the flood is dropped");
    assert_eq!(
        answered + refused + dropped,
        50,
        "every query is answered, refused or counted as dropped"
    );

    // Another client (another source address) is answered meanwhile.
    let other = tokio::net::UdpSocket::bind("127.0.0.2:0").await.unwrap();
    other.connect(s.addr()).await.unwrap();
    other
        .send(&a_query(7, "reviews.shop.svc.cluster.local"))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), other.recv(&mut buf))
        .await
        .expect("the other client is answered")
        .unwrap();

    // The flooder gets answers again once its bucket refills.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    flood
        .send(&a_query(99, "reviews.shop.svc.cluster.local"))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), flood.recv(&mut buf))
        .await
        .expect("answered after a pause")
        .unwrap();
    assert_ne!(buf[3] & 0x0f, 5, "not refused once the bucket refilled");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_clients_are_not_rate_limited_by_default() {
    let s = Setup::start(&mesh_catalog(), |c| {
        c.upstreams = vec![dead_upstream()];
        c.client_rate = 5;
        c.client_burst = 5;
    })
    .await;
    s.synced().await;
    let local = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    local.connect(s.addr()).await.unwrap();
    let mut buf = [0u8; 512];
    for id in 0..50u16 {
        local
            .send(&a_query(id, "reviews.shop.svc.cluster.local"))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), local.recv(&mut buf))
            .await
            .expect("every local query is answered")
            .unwrap();
        assert_eq!(buf[3] & 0x0f, 0, "NOERROR, never REFUSED");
    }
    let limited = metric(&s.metrics().await, "isthmus_dns_rate_limited_total").unwrap_or(0.0);
    assert_eq!(limited, 0.0);
    s.stop().await;
}

/// A local burst far above any rate limit, sent without waiting for answers: the proxy's
/// socket holds it (its receive buffer is sized for bursts), and whatever the kernel still
/// drops is counted. Every query is either handled or counted as dropped: none vanishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_burst_is_held_or_its_kernel_drops_are_counted() {
    const BURST: usize = 5_000;
    let s = Setup::start(&mesh_catalog(), |c| c.upstreams = vec![dead_upstream()]).await;
    s.synced().await;
    let metrics = s.metrics().await;
    let buffer = metric(&metrics, "isthmus_dns_udp_receive_buffer_bytes").unwrap_or(0.0);
    assert!(buffer > 0.0, "the receive buffer is exported:\n{metrics}");
    let local = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    local.connect(s.addr()).await.unwrap();
    for id in 0..BURST {
        local
            .send(&a_query(id as u16, "reviews.shop.svc.cluster.local"))
            .await
            .unwrap();
    }
    let accounted = |m: &str| {
        let handled = isthmus_tests::metric_sum(m, "isthmus_dns_queries_total", &[]) as usize;
        let dropped = metric(m, "isthmus_dns_udp_receive_drops_total").unwrap_or(0.0) as usize;
        (handled, dropped)
    };
    let settled = isthmus_tests::eventually(Duration::from_secs(20), || async {
        let (handled, dropped) = accounted(&s.metrics().await);
        (handled + dropped >= BURST).then_some((handled, dropped))
    })
    .await;
    let Some((handled, dropped)) = settled else {
        let now = accounted(&s.metrics().await);
        panic!("{BURST} sent, but handled and dropped are {now:?}");
    };
    assert_eq!(
        handled + dropped,
        BURST,
        "handled {handled}, dropped {dropped}"
    );
    eprintln!("burst of {BURST}: {handled} handled, {dropped} dropped by the kernel, buffer {buffer} bytes");
    s.stop().await;
}

/// The RCODE of a DNS answer (the low nibble of the fourth header byte).
fn rcode(answer: &[u8]) -> u8 {
    answer[3] & 0x0f
}

/// One query over TCP on `stream` (RFC 7766 framing); the answer's bytes.
async fn tcp_exchange(
    stream: &mut tokio::net::TcpStream,
    query: &[u8],
) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut out = (query.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(query);
    stream.write_all(&out).await?;
    let len = stream.read_u16().await?;
    let mut answer = vec![0u8; usize::from(len)];
    stream.read_exact(&mut answer).await?;
    Ok(answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_names_are_answered_as_soon_as_the_handle_says_synced() {
    // A catalog large enough that building the name table takes a while after the registry's
    // view has arrived: the handle must not say synced before the table answers from it.
    let mut catalog = mesh_catalog();
    let services: Vec<String> = (0..2000)
        .map(|i| {
            service_entry(
                &format!("bulk-{i}"),
                "shop",
                &[&format!("bulk-{i}.shop.svc.cluster.local")],
                &[&format!("10.97.{}.{}", i / 250, i % 250 + 1)],
                "  resolution: STATIC\n",
            )
        })
        .collect();
    catalog.push(("bulk.yaml", yaml::docs(&services)));
    let s = Setup::start(&catalog, |c| c.upstreams = vec![dead_upstream()]).await;
    s.synced().await;
    let local = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    local.connect(s.addr()).await.unwrap();
    let mut buf = [0u8; 512];
    for (id, name) in [
        "reviews.shop.svc.cluster.local",
        "bulk-1999.shop.svc.cluster.local",
    ]
    .iter()
    .enumerate()
    {
        local.send(&a_query(id as u16, name)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), local.recv(&mut buf))
            .await
            .expect("answered")
            .unwrap();
        assert_eq!(
            rcode(&buf),
            0,
            "{name}: NOERROR once the handle says synced"
        );
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_one_client_flooding_unique_names_to_a_silent_upstream_leaves_slots_for_others() {
    // An upstream that never answers: every forwarded query holds its slot until the
    // timeout, the worst case for the shared upstream slots.
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let s = Setup::start(&mesh_catalog(), |c| {
        c.upstreams = vec![silent.local_addr().unwrap()];
        c.query_timeout = Duration::from_secs(2);
        c.max_inflight = 16;
        c.max_inflight_per_client = 4;
    })
    .await;
    s.synced().await;
    // The flooder (not rate-limited: loopback) asks 50 unique names at once.
    let flood = tokio::net::UdpSocket::bind("127.0.0.2:0").await.unwrap();
    flood.connect(s.addr()).await.unwrap();
    for id in 0..50u16 {
        flood
            .send(&a_query(id, &format!("n{id}.flood.example")))
            .await
            .unwrap();
    }
    let mut buf = [0u8; 512];
    let mut refused = 0;
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(500), flood.recv(&mut buf)).await
    {
        assert_eq!(
            rcode(&buf),
            5,
            "only the queries beyond its share are answered now"
        );
        refused += 1;
    }
    assert_eq!(refused, 46, "all but its share of 4 are refused at once");

    // Three other clients still get upstream slots: their queries are forwarded (and fail
    // with SERVFAIL once the silent upstream's time is up), never REFUSED.
    let mut others = Vec::new();
    for (i, last) in [3u8, 4, 5].into_iter().enumerate() {
        let c = tokio::net::UdpSocket::bind((std::net::Ipv4Addr::new(127, 0, 0, last), 0))
            .await
            .unwrap();
        c.connect(s.addr()).await.unwrap();
        c.send(&a_query(100 + i as u16, &format!("other-{last}.example")))
            .await
            .unwrap();
        others.push(c);
    }
    for c in &others {
        tokio::time::timeout(Duration::from_secs(10), c.recv(&mut buf))
            .await
            .expect("the other client is answered")
            .unwrap();
        assert_eq!(
            rcode(&buf),
            2,
            "forwarded (SERVFAIL from the silent upstream), not REFUSED"
        );
    }
    // Meanwhile mesh names are answered to anyone, the flooder included.
    flood
        .send(&a_query(999, "reviews.shop.svc.cluster.local"))
        .await
        .unwrap();
    // (Its four forwarded queries' SERVFAILs may arrive first.)
    let answered = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            flood.recv(&mut buf).await.unwrap();
            if buf[..2] == 999u16.to_be_bytes() {
                return rcode(&buf);
            }
        }
    })
    .await
    .expect("the flooder's mesh query is answered");
    assert_eq!(answered, 0);

    let text = s.metrics().await;
    assert_eq!(
        metric(
            &text,
            "isthmus_dns_shed_total{reason=\"upstream_client_share\"}"
        ),
        Some(46.0),
        "every refusal is counted by its reason"
    );
    assert_eq!(
        metric(
            &text,
            "isthmus_dns_shed_total{reason=\"upstream_slots_full\"}"
        )
        .unwrap_or(0.0),
        0.0
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_idle_tcp_connections_cannot_lock_out_a_tcp_client() {
    let s = Setup::start(&mesh_catalog(), |c| {
        c.upstreams = vec![dead_upstream()];
        c.max_tcp_connections = 8;
    })
    .await;
    s.synced().await;
    // 40 connections that never send anything: five times the slots.
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(tokio::net::TcpStream::connect(s.addr()).await.unwrap());
    }
    let closed = eventually(Duration::from_secs(10), || async {
        let n = metric(
            &s.metrics().await,
            "isthmus_dns_shed_total{reason=\"tcp_idle_closed\"}",
        )
        .unwrap_or(0.0);
        (n >= 32.0).then_some(n)
    })
    .await;
    assert_eq!(
        closed,
        Some(32.0),
        "the oldest idle ones made room, one per newcomer"
    );
    // The first connection, idle the longest, was closed.
    let mut first = idle.remove(0);
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut first, &mut byte),
    )
    .await
    .expect("the oldest idle connection is closed, not left hanging");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");

    // A real client over TCP is served, several queries on one connection.
    let mut client = tokio::net::TcpStream::connect(s.addr()).await.unwrap();
    for id in 0..3u16 {
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            tcp_exchange(&mut client, &a_query(id, "reviews.shop.svc.cluster.local")),
        )
        .await
        .expect("answered over TCP")
        .expect("not reset");
        assert_eq!(rcode(&answer), 0);
        assert_eq!(&answer[..2], &id.to_be_bytes());
    }
    assert!(
        metric(&s.metrics().await, "isthmus_dns_tcp_connections").unwrap_or(0.0) <= 10.0,
        "the open connections stay near the limit"
    );
    s.stop().await;
}

/// Sends `packet` over UDP and expects an answer with its ID and `expected` RCODE, then a
/// mesh name still answered: the proxy refused the bad input clearly and keeps serving.
async fn answered_with_then_serving(s: &Setup, packet: &[u8], expected: u8) {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(s.addr()).await.unwrap();
    sock.send(packet).await.unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
        .await
        .expect("the bad query is answered, not dropped")
        .unwrap();
    assert!(n >= 12);
    assert_eq!(&buf[..2], &packet[..2], "the answer carries the query's ID");
    assert_eq!(rcode(&buf), expected);
    sock.send(&a_query(77, "reviews.shop.svc.cluster.local"))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
        .await
        .expect("still serving")
        .unwrap();
    assert_eq!((&buf[..2], rcode(&buf)), (&77u16.to_be_bytes()[..], 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_an_edns_record_longer_than_the_packet_is_formerr() {
    let s = Setup::start(&mesh_catalog(), |c| c.upstreams = vec![dead_upstream()]).await;
    s.synced().await;
    let mut q = a_query(41, "reviews.shop.svc.cluster.local");
    q[11] = 1; // one additional record: an OPT claiming 32 bytes of options it lacks
    q.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 32]);
    answered_with_then_serving(&s, &q, 1).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_a_name_longer_than_255_bytes_is_formerr() {
    let s = Setup::start(&mesh_catalog(), |c| c.upstreams = vec![dead_upstream()]).await;
    s.synced().await;
    let label = "a".repeat(63);
    let long = [label.as_str(); 5].join(".");
    answered_with_then_serving(&s, &a_query(42, &long), 1).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_an_opcode_other_than_query_is_notimp() {
    let s = Setup::start(&mesh_catalog(), |c| c.upstreams = vec![dead_upstream()]).await;
    s.synced().await;
    let mut q = a_query(43, "reviews.shop.svc.cluster.local");
    q[2] |= 4 << 3; // NOTIFY
    answered_with_then_serving(&s, &q, 4).await;
    s.stop().await;
}
