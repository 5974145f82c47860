//! VM auto-registration end to end: a VM registers from a WorkloadGroup over mTLS and a
//! Watch subscriber of its network sees it as an endpoint of the group's service; health
//! reports, Deregister, lost agents, reconnects within the grace period, takeovers,
//! refusals, registry restarts, and an onboarding bundle used the way the agent will use it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_proto::bundle::AgentBundle;
use isthmus_proto::model::{Health, NodeKind};
use isthmus_proto::pb;
use isthmus_proto::registration::RegisterRequest;
use isthmus_proto::subscription::{LocalView, Subscription};
use isthmus_proto::{certs, grpc, tls};
use isthmus_registry::onboard::{self, OnboardOptions};
use isthmus_tests::harness::vm::{
    always_for, endpoint, hello, until, until_keeping, with_labels, Registrar, STEP,
};
use isthmus_tests::{eventually, host, metric, node, yaml, TestRegistry, NETWORK};
use serde_json::Value;
use tonic::Code;

const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn health_of(view: &LocalView, address: &str) -> Option<Health> {
    endpoint(view, &host("web", "shop"), address).map(|e| e.health)
}

async fn registrations(reg: &TestRegistry) -> Vec<Value> {
    let (status, body) = isthmus_tests::http_get(reg.admin_addr(), "/debug/registrations")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap();
    doc["registrations"].as_array().unwrap().clone()
}

fn web_resources(probe: bool) -> Vec<(&'static str, String)> {
    vec![
        (
            "vm-web.yaml",
            yaml::workload_group("vm-web", "shop", "web", "web", probe),
        ),
        ("web.yaml", yaml::service("web", "shop", 80)),
    ]
}

async fn start(probe: bool, vm_grace: Duration) -> TestRegistry {
    let files = web_resources(probe);
    let refs: Vec<(&str, &str)> = files.iter().map(|(n, y)| (*n, y.as_str())).collect();
    TestRegistry::start_with(&refs, |cfg| cfg.vm_grace = vm_grace)
        .await
        .unwrap()
}

async fn watcher(reg: &TestRegistry) -> Subscription {
    let creds = reg.credentials("shop", "watcher").await.unwrap();
    let mut sub = reg
        .subscribe(&creds, &node("watcher", NodeKind::Workload, NETWORK))
        .await
        .unwrap();
    assert!(sub.next().await.unwrap().snapshot);
    sub
}

#[tokio::test]
async fn a_registered_vm_joins_its_service_with_the_group_labels_and_reports_health() {
    let mut files = web_resources(true);
    files.push((
        "batch.yaml",
        yaml::docs(&[
            yaml::workload_group("vm-batch", "shop", "batch", "batch", false),
            yaml::service("batch", "shop", 9000),
        ]),
    ));
    let refs: Vec<(&str, &str)> = files.iter().map(|(n, y)| (*n, y.as_str())).collect();
    let reg = TestRegistry::start(&refs).await.unwrap();
    let mut sub = watcher(&reg).await;
    assert_eq!(health_of(&sub.view, "10.1.0.5"), None);

    let creds = reg.credentials("shop", "web").await.unwrap();
    let vm = with_labels(
        hello("vm-web", "shop", "10.1.0.5", NETWORK),
        &[("version", "v2"), ("app", "admin")],
    );
    let mut registrar = reg.register_vm(Some(&creds), &vm).await.unwrap();
    assert_eq!(registrar.ack.entry_name, "vm-web-10-1-0-5-network-a");
    assert_eq!(registrar.ack.namespace, "shop");
    assert_eq!(
        registrar.ack.health,
        Health::Unhealthy,
        "a probe group waits for a report"
    );
    assert!(!registrar.ack.resumed);
    assert!(
        registrar.ack.warnings.len() == 1 && registrar.ack.warnings[0].contains("hello.labels.app"),
        "the template's label wins, and the ack says so: {:?}",
        registrar.ack.warnings
    );

    until(&mut sub, |v| health_of(v, "10.1.0.5").is_some()).await;
    let e = endpoint(&sub.view, &host("web", "shop"), "10.1.0.5").unwrap();
    assert_eq!(e.health, Health::Unhealthy);
    assert_eq!(e.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(e.labels.get("version").map(String::as_str), Some("v2"));
    assert_eq!(e.ports, [(80, 8080)].into(), "the template's port");
    assert_eq!(e.network, NETWORK);
    assert_eq!(
        e.identities.iter().map(|i| i.as_str()).collect::<Vec<_>>(),
        vec![WEB_ID]
    );
    assert_eq!(e.uid, "cluster-a/shop/vm-web-10-1-0-5-network-a");

    let ack = registrar.health(true, "GET /healthz: 200").await.unwrap();
    assert_eq!(ack.health, Health::Healthy);
    until(&mut sub, |v| {
        health_of(v, "10.1.0.5") == Some(Health::Healthy)
    })
    .await;
    let ack = registrar.health(false, "GET /healthz: 503").await.unwrap();
    assert_eq!(ack.health, Health::Unhealthy);
    until(&mut sub, |v| {
        health_of(v, "10.1.0.5") == Some(Health::Unhealthy)
    })
    .await;

    // A group without a probe: healthy from the start.
    let batch_creds = reg.credentials("shop", "batch").await.unwrap();
    let batch = reg
        .register_vm(
            Some(&batch_creds),
            &hello("vm-batch", "shop", "10.1.0.6", ""),
        )
        .await
        .unwrap();
    assert_eq!(batch.ack.entry_name, "vm-batch-10-1-0-6");
    assert_eq!(batch.ack.health, Health::Healthy);
    until(&mut sub, |v| {
        endpoint(v, &host("batch", "shop"), "10.1.0.6").is_some_and(|e| e.health == Health::Healthy)
    })
    .await;

    let listed = registrations(&reg).await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    let web = listed
        .iter()
        .find(|r| r["entry"] == "vm-web-10-1-0-5-network-a")
        .unwrap();
    assert_eq!(web["state"], "connected", "{web}");
    assert_eq!(web["health"], "unhealthy", "{web}");
    assert_eq!(web["group"], "vm-web", "{web}");
    assert_eq!(web["identity"], WEB_ID, "{web}");
    let m = reg.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"isthmus_registry_vm_registrations{state="connected"}"#
        ),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"isthmus_registry_vm_registrations_accepted_total{takeover="new"}"#
        ),
        Some(2.0),
        "{m}"
    );
}

#[tokio::test]
async fn deregister_removes_at_once_and_a_lost_agent_expires_after_the_grace_period() {
    const GRACE: Duration = Duration::from_secs(1);
    let reg = start(false, GRACE).await;
    let mut sub = watcher(&reg).await;
    let creds = reg.credentials("shop", "web").await.unwrap();
    let views = reg.handle().views.clone();
    let in_catalog = |name: &str| {
        let key = format!("Workload/cluster-a/shop/{name}");
        views.with_catalog(|c| c.get(&key).is_some())
    };

    let registrar = reg
        .register_vm(Some(&creds), &hello("vm-web", "shop", "10.1.0.5", ""))
        .await
        .unwrap();
    until(&mut sub, |v| {
        health_of(v, "10.1.0.5") == Some(Health::Healthy)
    })
    .await;
    registrar.deregister().await.unwrap();
    assert!(
        !in_catalog("vm-web-10-1-0-5"),
        "gone from the catalog by the time the Deregister is acknowledged"
    );
    until(&mut sub, |v| health_of(v, "10.1.0.5").is_none()).await;
    assert!(registrations(&reg).await.is_empty());

    // An agent that goes away without a word: unhealthy at once, removed after the grace.
    let registrar = reg
        .register_vm(Some(&creds), &hello("vm-web", "shop", "10.1.0.6", ""))
        .await
        .unwrap();
    until(&mut sub, |v| {
        health_of(v, "10.1.0.6") == Some(Health::Healthy)
    })
    .await;
    drop(registrar);
    until(&mut sub, |v| {
        health_of(v, "10.1.0.6") == Some(Health::Unhealthy)
    })
    .await;
    let disconnected_seen = Instant::now();
    let listed = registrations(&reg).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["state"], "disconnected", "{listed:?}");
    assert_eq!(listed[0]["cause"], "stream ended", "{listed:?}");
    assert!(listed[0]["expires_at"].is_string(), "{listed:?}");
    let m = reg.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"isthmus_registry_vm_registrations{state="disconnected"}"#
        ),
        Some(1.0),
        "{m}"
    );

    until(&mut sub, |v| health_of(v, "10.1.0.6").is_none()).await;
    let waited = disconnected_seen.elapsed();
    assert!(
        waited >= GRACE / 2,
        "removed after the grace period, not at once ({waited:?})"
    );
    assert!(!in_catalog("vm-web-10-1-0-6"));
    assert!(registrations(&reg).await.is_empty());
    let m = reg.metrics().await;
    assert_eq!(
        metric(&m, "isthmus_registry_vm_registrations_expired_total"),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test]
async fn a_vm_that_comes_back_within_the_grace_period_is_never_removed() {
    const GRACE: Duration = Duration::from_secs(3);
    let reg = start(false, GRACE).await;
    let mut sub = watcher(&reg).await;
    let creds = reg.credentials("shop", "web").await.unwrap();
    let vm = hello("vm-web", "shop", "10.1.0.5", "");

    let present = |v: &LocalView| health_of(v, "10.1.0.5").is_some();

    let first = reg.register_vm(Some(&creds), &vm).await.unwrap();
    until(&mut sub, |v| {
        health_of(v, "10.1.0.5") == Some(Health::Healthy)
    })
    .await;
    drop(first);
    until_keeping(&mut sub, present, |v| {
        health_of(v, "10.1.0.5") == Some(Health::Unhealthy)
    })
    .await;

    // The agent is back: it takes the entry over.
    let mut second = reg.register_vm(Some(&creds), &vm).await.unwrap();
    assert!(second.ack.resumed);
    until_keeping(&mut sub, present, |v| {
        health_of(v, "10.1.0.5") == Some(Health::Healthy)
    })
    .await;

    // A second stream of the same VM replaces the first, which is closed; the entry stays.
    let third = reg.register_vm(Some(&creds), &vm).await.unwrap();
    assert!(third.ack.resumed);
    let closed = tokio::time::timeout(STEP, second.closed()).await.unwrap();
    assert_eq!(closed.code(), Code::Aborted, "{closed:?}");
    assert!(
        closed.message().contains("took the entry over"),
        "{closed:?}"
    );

    // Past the grace period of the first disconnect: no delta ever removed the endpoint.
    always_for(&mut sub, GRACE + Duration::from_secs(1), present).await;
    let listed = registrations(&reg).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["state"], "connected", "{listed:?}");
    let m = reg.metrics().await;
    assert_eq!(
        metric(&m, "isthmus_registry_vm_registrations_expired_total"),
        Some(0.0),
        "{m}"
    );
    for (takeover, n) in [("new", 1.0), ("reconnected", 1.0), ("replaced", 1.0)] {
        assert_eq!(
            metric(
                &m,
                &format!(
                    r#"isthmus_registry_vm_registrations_accepted_total{{takeover="{takeover}"}}"#
                )
            ),
            Some(n),
            "{m}"
        );
    }
    drop(third);
}

#[tokio::test]
async fn refusals_name_what_is_wrong() {
    let mut files = web_resources(false);
    files.push((
        "static-vm.yaml",
        yaml::workload("vm-web-10-1-0-9", "shop", "web", "10.1.0.9", NETWORK),
    ));
    let refs: Vec<(&str, &str)> = files.iter().map(|(n, y)| (*n, y.as_str())).collect();
    let reg = TestRegistry::start(&refs).await.unwrap();
    let web = reg.credentials("shop", "web").await.unwrap();
    let vm = hello("vm-web", "shop", "10.1.0.5", "");

    let admin = reg.credentials("shop", "admin").await.unwrap();
    let err = reg.register_vm(Some(&admin), &vm).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .contains("spiffe://cluster.local/ns/shop/sa/admin")
            && err.message().contains(WEB_ID),
        "both identities named: {err:?}"
    );

    let err = reg
        .register_vm(Some(&web), &hello("vm-nope", "shop", "10.1.0.5", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("shop/vm-nope"), "{err:?}");

    let mut bad = pb::RegisterRequest::from(&RegisterRequest::Hello(vm.clone()));
    if let Some(pb::register_request::Request::Hello(h)) = &mut bad.request {
        h.address = "10.1.0.300".into();
    }
    let err = Registrar::open(reg.channel(Some(&web)).await.unwrap(), bad)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("hello.address") && err.message().contains("10.1.0.300"),
        "{err:?}"
    );

    let not_hello = pb::RegisterRequest::from(&RegisterRequest::Deregister);
    let err = Registrar::open(reg.channel(Some(&web)).await.unwrap(), not_hello)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("must be Hello"), "{err:?}");

    let err = reg.register_vm(None, &vm).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // A VM cannot take over an entry another source owns.
    let err = reg
        .register_vm(Some(&web), &hello("vm-web", "shop", "10.1.0.9", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains("static:static-vm.yaml"), "{err:?}");

    assert!(registrations(&reg).await.is_empty());
    let m = reg.metrics().await;
    for (reason, n) in [
        ("identity_mismatch", 1.0),
        ("unknown_group", 1.0),
        ("bad_request", 2.0),
        ("unauthenticated", 1.0),
        ("entry_conflict", 1.0),
    ] {
        assert_eq!(
            metric(
                &m,
                &format!(r#"isthmus_registry_vm_registrations_refused_total{{reason="{reason}"}}"#)
            ),
            Some(n),
            "{reason}: {m}"
        );
    }
}

#[tokio::test]
async fn entries_from_before_a_restart_wait_for_their_agents() {
    const GRACE: Duration = Duration::from_secs(3);
    let mut reg = start(false, GRACE).await;
    let creds = reg.credentials("shop", "web").await.unwrap();
    let a = hello("vm-web", "shop", "10.1.0.5", "");
    let b = hello("vm-web", "shop", "10.1.0.6", "");
    let _ra = reg.register_vm(Some(&creds), &a).await.unwrap();
    let _rb = reg.register_vm(Some(&creds), &b).await.unwrap();

    reg.restart().await.unwrap();
    let views = reg.handle().views.clone();
    let health = move |name: &str| {
        let key = format!("Workload/cluster-a/shop/{name}");
        views.with_catalog(|c| {
            c.get(&key).map(|r| match &*r.resource {
                isthmus_proto::model::Resource::Workload(w) => w.health,
                other => panic!("{other:?}"),
            })
        })
    };
    // Served from the store as they were: a registry restart says nothing about the VMs.
    assert_eq!(health("vm-web-10-1-0-5"), Some(Health::Healthy));
    assert_eq!(health("vm-web-10-1-0-6"), Some(Health::Healthy));
    let listed = registrations(&reg).await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(
        listed
            .iter()
            .all(|r| r["state"] == "disconnected" && r["cause"] == "registry restarted"),
        "{listed:?}"
    );

    // A's agent comes back; B's does not.
    let ra = reg.register_vm(Some(&creds), &a).await.unwrap();
    assert!(ra.ack.resumed);
    assert_eq!(ra.ack.health, Health::Healthy, "kept");
    let h = health.clone();
    eventually(Duration::from_secs(10), move || {
        let gone = h("vm-web-10-1-0-6").is_none();
        async move { gone.then_some(()) }
    })
    .await
    .expect("B removed after the grace period");
    assert_eq!(health("vm-web-10-1-0-5"), Some(Health::Healthy));
    let listed = registrations(&reg).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["state"], "connected", "{listed:?}");
}

#[tokio::test]
async fn an_onboarded_vm_enrols_and_registers_with_its_bundle() {
    let reg = start(true, Duration::from_secs(10)).await;
    let out = reg.dir.path().join("bundle");
    let done = onboard::onboard(
        &OnboardOptions {
            registry: reg.grpc_addr().to_string(),
            ca_dir: reg.ca_dir(),
            group: "vm-web".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            network: NETWORK.into(),
            out: out.clone(),
            token_ttl: onboard::DEFAULT_TOKEN_TTL,
            trust_domain: None,
        },
        ::time::OffsetDateTime::now_utc(),
    )
    .unwrap();

    // What the agent will do: read the bundle, enrol with its token, register.
    let bundle = AgentBundle::load(&out).unwrap();
    assert_eq!(bundle, done.bundle);
    let token = AgentBundle::read_token(&out).unwrap().unwrap();
    let cert_dir = out.join("certs");
    let settings = bundle.registry_settings(&out, &cert_dir);
    let creds = certs::enroll(&settings, &token, &cert_dir).await.unwrap();
    assert_eq!(creds.identity, bundle.identity().unwrap());
    let trust =
        tls::TrustBundle::from_pem_file(&settings.root_cert, &settings.trust_domain).unwrap();
    let cfg = tls::client_config(
        Some(&creds),
        &trust,
        tls::ServerIdentity::TrustDomain,
        &[tls::ALPN_H2],
    )
    .unwrap();
    let channel = grpc::connect(&bundle.registry, Arc::new(cfg))
        .await
        .unwrap();
    let mut registrar = Registrar::register(
        channel,
        &hello(
            &bundle.group,
            &bundle.namespace,
            "10.1.0.7",
            &bundle.network,
        ),
    )
    .await
    .unwrap();
    assert_eq!(registrar.ack.entry_name, "vm-web-10-1-0-7-network-a");
    assert_eq!(
        registrar.health(true, "ready").await.unwrap().health,
        Health::Healthy
    );
    // The token is spent.
    let err = certs::enroll(&settings, &token, &out.join("again"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already been used"), "{err}");
}
