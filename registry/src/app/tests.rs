use std::net::SocketAddr;
use std::path::Path;

use isthmus_proto::identity::TrustDomain;

use super::*;
use crate::ca::init::{self, InitOptions};

/// A config on loopback over a fresh CA, store and (empty) resources directory.
fn config(dir: &Path) -> RegistryConfig {
    init::init(
        &InitOptions {
            trust_domain: TrustDomain::new("cluster.local").unwrap(),
            clusters: vec!["cluster-a".into()],
            out: dir.join("ca"),
            rotate: false,
        },
        ::time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("resources")).unwrap();
    let mut cfg = RegistryConfig::new(
        "cluster-a",
        "network-a",
        dir.join("ca").join("cluster-a"),
        dir.join("data"),
    );
    cfg.resources = Some(dir.join("resources"));
    cfg.grpc_addr = "127.0.0.1:0".parse().unwrap();
    cfg.admin_addr = "127.0.0.1:0".parse().unwrap();
    cfg
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test]
async fn ready_once_started_and_draining_from_shutdown_on() {
    let tmp = tempfile::tempdir().unwrap();
    let handle = run(config(tmp.path())).await.unwrap();
    let readiness = handle.readiness.clone();
    assert_eq!(readiness.describe(), "ready");
    handle.shutdown().await;
    assert_eq!(readiness.describe(), "draining");
}

#[tokio::test]
async fn a_port_in_use_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = config(tmp.path());
    cfg.admin_addr = held.local_addr().unwrap();
    let err = format!("{:#}", run(cfg).await.unwrap_err());
    assert!(err.contains("admin HTTP server"), "{err}");
    assert!(
        err.contains(&held.local_addr().unwrap().to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn a_failed_start_leaves_no_port_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    // The store cannot open a file as its directory: start-up fails after binding.
    std::fs::write(tmp.path().join("not-a-dir"), "").unwrap();
    cfg.data_dir = tmp.path().join("not-a-dir");
    cfg.grpc_addr = free_addr();
    cfg.admin_addr = free_addr();
    let err = format!("{:#}", run(cfg.clone()).await.unwrap_err());
    assert!(err.contains("embedded store"), "{err}");
    std::net::TcpListener::bind(cfg.grpc_addr).expect("gRPC port released");
    std::net::TcpListener::bind(cfg.admin_addr).expect("admin port released");
}

#[test]
fn every_configuration_problem_is_reported_at_once() {
    let mut cfg = RegistryConfig::new(
        "Bad_Cluster",
        "bad network",
        "/nonexistent/ca".into(),
        "/tmp".into(),
    );
    cfg.ca_policy.default_ttl = cfg.ca_policy.max_ttl * 2;
    cfg.resources = Some("/nonexistent/resources".into());
    cfg.ca_token_audience = " ".into();
    let problems = cfg.validate().unwrap_err();
    let fields: Vec<&str> = problems.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "--cluster",
            "--network",
            "--cert-ttl",
            "--ca-token-audience",
            "--ca-dir",
            "--resources"
        ]
    );
    let shown = problems.to_string();
    assert!(shown.contains("\"Bad_Cluster\""), "{shown}");
    assert!(shown.contains("above --max-cert-ttl"), "{shown}");
    assert!(shown.contains("must not be empty"), "{shown}");
}

#[test]
fn webhook_settings_are_checked_all_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.webhook.cert_file = Some(tmp.path().join("missing.pem"));
    cfg.webhook.dns_names = vec!["127.0.0.1".into(), "bad name".into()];
    cfg.webhook.capture_cidrs = vec!["10.0.0.1/8".into()];
    cfg.webhook.registry_address = Some("no-port".into());
    let problems = cfg.validate().unwrap_err().to_string();
    for expect in [
        "--webhook-cert and --webhook-key go together",
        "missing.pem: no such file",
        "\"bad name\"",
        "--inject-capture-cidr",
        "\"no-port\" is not host:port",
    ] {
        assert!(problems.contains(expect), "{expect}: {problems}");
    }
    assert!(!problems.contains("127.0.0.1"), "{problems}");
}

#[test]
fn the_webhook_is_served_with_a_cluster_of_its_own_or_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    assert_eq!(cfg.webhook.listen_addr(&cfg.kubernetes), None);
    cfg.kubernetes.local = Some(LocalCluster::InCluster);
    assert_eq!(
        cfg.webhook.listen_addr(&cfg.kubernetes),
        Some("0.0.0.0:15017".parse().unwrap())
    );
    cfg.kubernetes.local = None;
    cfg.webhook.addr = Some("127.0.0.1:0".parse().unwrap());
    assert_eq!(
        cfg.webhook.listen_addr(&cfg.kubernetes),
        Some("127.0.0.1:0".parse().unwrap())
    );
    // The flags' values reach the settings, canonical.
    cfg.webhook.capture_cidrs = vec!["10.0.0.0/8".into(), "fd00::/8".into()];
    cfg.webhook.image = Some("example/agent:2".into());
    let s = cfg.inject_settings();
    assert_eq!(s.capture_cidrs, ["10.0.0.0/8", "fd00::/8"]);
    assert_eq!(s.image, "example/agent:2");
    assert_eq!(
        s.registry_address,
        "isthmus-registry.isthmus-system.svc:15012"
    );
    assert_eq!(s.cluster, "cluster-a");
    assert_eq!(s.token_audience, "isthmus-ca");
    cfg.ca_token_audience = "mesh-ca".into();
    assert_eq!(cfg.inject_settings().token_audience, "mesh-ca");
}
