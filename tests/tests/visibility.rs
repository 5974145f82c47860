//! VIPs and visibility as Istio has them, end to end: a `resolution: NONE` egress entry (or
//! one labelled out of allocation) keeps resolving upstream to its real addresses and is
//! never captured; the same hostname defined in two namespaces is two services, each served
//! to the namespaces its `exportTo` names; a bad `exportTo` is refused naming the entry.

use std::time::Duration;

use isthmus_proto::model::{service_view_key, EndpointKind, NodeKind, ViewResource};
use isthmus_proto::subscription::{LocalView, Subscription};
use isthmus_proxy::routes::{RouteOptions, RouteTable};
use isthmus_tests::harness::dns::{dig, proxy_config, require, Unbound};
use isthmus_tests::{eventually, http_get, node, yaml, TestRegistry, NETWORK};
use serde_json::Value;

const STEP: Duration = Duration::from_secs(20);

/// A ServiceEntry for an outside name: `hosts`, one TLS port, the given resolution, and
/// `extra` lines under `metadata` (labels) and `spec` (exportTo, workloadSelector).
fn egress(name: &str, ns: &str, host: &str, resolution: &str, meta: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\n  namespace: {ns}\n{meta}spec:\n  hosts:\n  - {host}\n  ports:\n  - number: 443\n    name: tls\n    protocol: TLS\n  location: MESH_EXTERNAL\n  resolution: {resolution}\n{spec}"
    )
}

async fn subscriber(reg: &TestRegistry, ns: &str) -> Subscription {
    let creds = reg.credentials(ns, "client").await.unwrap();
    let mut sub = reg
        .subscribe(
            &creds,
            &node(&format!("{ns}-client"), NodeKind::Workload, NETWORK),
        )
        .await
        .unwrap();
    sub.next().await.unwrap();
    sub
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

/// The namespace and workload addresses of `host`'s entry in a view.
fn entry(view: &LocalView, host: &str) -> Option<(String, Vec<String>)> {
    match view.resources.get(&service_view_key(host)) {
        Some(ViewResource::Service(sv)) => Some((
            sv.service.namespace.clone(),
            sv.endpoints
                .iter()
                .filter(|e| e.kind == EndpointKind::Workload)
                .map(|e| e.address.to_string())
                .collect(),
        )),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolution_none_and_opted_out_entries_resolve_upstream_and_are_not_captured() {
    if !require("dig", "dnsutils") || !require("unbound", "unbound") {
        return;
    }
    let upstream = Unbound::start(
        &[("example.test", 60)],
        &[
            "pypi.example.test. 300 IN A 192.0.2.80".into(),
            "legacy.example.test. 300 IN A 192.0.2.81".into(),
            "api.example.test. 300 IN A 192.0.2.82".into(),
        ],
    )
    .unwrap();
    let istio_out = "  labels:\n    networking.istio.io/enable-autoallocate-ip: \"false\"\n";
    let mut reg = TestRegistry::start(&[
        (
            "pypi.yaml",
            &egress("pypi", "shop", "pypi.example.test", "NONE", "", ""),
        ),
        (
            "legacy.yaml",
            &egress(
                "legacy",
                "shop",
                "legacy.example.test",
                "DNS",
                istio_out,
                "",
            ),
        ),
        (
            "api.yaml",
            &egress("api", "shop", "api.example.test", "DNS", "", ""),
        ),
    ])
    .await
    .unwrap();
    // Neither NONE nor the opted-out entry holds an allocation; the plain DNS entry does.
    let vip = |h: &str| {
        reg.handle()
            .views
            .with_vips(|t| t.active(h).map(|a| a.ipv4.to_string()))
    };
    assert_eq!(vip("pypi.example.test"), None);
    assert_eq!(vip("legacy.example.test"), None);
    let api_vip = vip("api.example.test").expect("a DNS entry without addresses gets a VIP");

    // The DNS proxy of a workload in shop: the egress names go to the upstream resolver
    // (not authoritative, the real address); the allocated one is the mesh's.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = proxy_config(&reg, dir.path()).await.unwrap();
    reg.credentials_dir("shop", "client", &dir.path().join("dns-certs"))
        .await
        .unwrap();
    cfg.namespace = "shop".into();
    cfg.upstreams = vec![upstream.addr];
    let dns = isthmus_dns::run(cfg).await.unwrap();
    let mut sync = dns.sync.clone();
    tokio::time::timeout(STEP, sync.wait_for(|s| s.synced()))
        .await
        .expect("the DNS proxy synced")
        .unwrap();
    let api = eventually(STEP, || async {
        let d = dig(dns.dns_addr, &["api.example.test", "A"]).await;
        (d.answers == [api_vip.clone()]).then_some(d)
    })
    .await
    .expect("the allocated VIP answered from the mesh");
    assert!(api.flags.contains(&"aa".to_string()), "{}", api.output);
    for (name, real) in [
        ("pypi.example.test", "192.0.2.80"),
        ("legacy.example.test", "192.0.2.81"),
    ] {
        let d = dig(dns.dns_addr, &[name, "A"]).await;
        assert_eq!(d.status, "NOERROR", "{name}: {}", d.output);
        assert_eq!(d.answers, [real], "{name}: {}", d.output);
        assert!(
            !d.flags.contains(&"aa".to_string()),
            "{name} forwarded, not answered by the mesh: {}",
            d.output
        );
    }

    // What an agent in shop captures is the addresses of its routing table: the VIP of the
    // allocated entry, nothing of the NONE entry (its traffic keeps its real destination).
    let sub = subscriber(&reg, "shop").await;
    let table = RouteTable::build(&sub.view, &RouteTable::default(), &RouteOptions::default());
    let captured: Vec<(String, String)> = table
        .addresses()
        .map(|a| (a.to_string(), table.hostname_of(a).unwrap().to_string()))
        .collect();
    assert!(
        captured
            .iter()
            .any(|(a, h)| *a == api_vip && h == "api.example.test"),
        "{captured:?}"
    );
    assert!(
        captured
            .iter()
            .all(|(_, h)| h != "pypi.example.test" && h != "legacy.example.test"),
        "{captured:?}"
    );
    dns.shutdown().await;
    reg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_hostname_in_two_namespaces_is_served_to_the_right_namespaces() {
    const DB: &str = "db.example.test";
    let selector = "  workloadSelector:\n    labels:\n      app: db\n";
    let private = format!("{selector}  exportTo: [\".\"]\n");
    let mut reg = TestRegistry::start(&[
        (
            "shop-db.yaml",
            &egress("db", "shop", DB, "STATIC", "", selector),
        ),
        (
            "books-db.yaml",
            &egress("db", "books", DB, "STATIC", "", &private),
        ),
        (
            "workloads.yaml",
            &yaml::docs(&[
                yaml::workload("db-1", "shop", "db", "10.0.0.1", NETWORK),
                yaml::workload("db-2", "books", "db", "10.0.0.2", NETWORK),
            ]),
        ),
    ])
    .await
    .unwrap();
    // Both definitions are in the catalog: not a conflict.
    let defs = reg
        .handle()
        .views
        .with_catalog(|c| c.service_defs(DB).len());
    assert_eq!(defs, 2);

    let mut shop = subscriber(&reg, "shop").await;
    let mut books = subscriber(&reg, "books").await;
    let mut web = subscriber(&reg, "web").await;
    let want = |ns: &str, addr: &str| Some((ns.to_string(), vec![addr.to_string()]));
    until(&mut shop, |v| entry(v, DB) == want("shop", "10.0.0.1")).await;
    until(&mut books, |v| entry(v, DB) == want("books", "10.0.0.2")).await;
    // books keeps its own to itself: another namespace sees shop's.
    until(&mut web, |v| entry(v, DB) == want("shop", "10.0.0.1")).await;

    // Export books' to web by name: web now prefers it over shop's public one.
    let to_web = format!("{selector}  exportTo: [\".\", web]\n");
    reg.write_resource(
        "books-db.yaml",
        &egress("db", "books", DB, "STATIC", "", &to_web),
    );
    until(&mut web, |v| entry(v, DB) == want("books", "10.0.0.2")).await;
    until(&mut shop, |v| entry(v, DB) == want("shop", "10.0.0.1")).await;

    // The operator's view of a namespace shows what that namespace sees.
    let (status, body) = http_get(
        reg.admin_addr(),
        &format!("/debug/catalog?network={NETWORK}&namespace=books"),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("10.0.0.2") && !body.contains("10.0.0.1"),
        "{body}"
    );

    // Shop's goes away: shop has nothing left to see (books' is for books and web only).
    std::fs::remove_file(reg.resources_dir().join("shop-db.yaml")).unwrap();
    until(&mut shop, |v| entry(v, DB).is_none()).await;
    until(&mut web, |v| entry(v, DB) == want("books", "10.0.0.2")).await;
    reg.stop().await;
}

#[tokio::test]
async fn export_to_is_refused_as_istio_refuses_it() {
    let mut reg = TestRegistry::start(&[]).await.unwrap();
    for (list, field, says) in [
        ("[\".\", shop]", "spec.exportTo[1]", "same entry"),
        ("[web, web]", "spec.exportTo[1]", "listed twice"),
        ("[\"*\", web]", "spec.exportTo", "\\\"*\\\""),
        ("[\"~\", web]", "spec.exportTo", "\\\"~\\\""),
    ] {
        let spec = format!("  exportTo: {list}\n");
        reg.write_resource(
            "db.yaml",
            &egress("db", "shop", "db.example.test", "DNS", "", &spec),
        );
        let errors = eventually(STEP, || async {
            let (_, body) = http_get(reg.admin_addr(), "/debug/resources").await.ok()?;
            let doc: Value = serde_json::from_str(&body).ok()?;
            let errors = doc["errors"].to_string();
            errors.contains(says).then_some(errors)
        })
        .await
        .unwrap_or_else(|| panic!("exportTo {list} refused"));
        assert!(errors.contains(field), "{list}: {errors}");
        assert_eq!(
            reg.handle()
                .views
                .with_catalog(|c| c.service_defs("db.example.test").len()),
            0,
            "{list}"
        );
    }
    reg.stop().await;
}
