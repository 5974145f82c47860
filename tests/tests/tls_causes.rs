//! Every TLS failure between a client and the registry names its cause on both sides: in
//! the error the client's operator sees (what a gateway, a DNS proxy or an agent logs and
//! shows in `/config_dump`) and in the registry's log. The causes: unknown issuer (either
//! way), trust-domain mismatch (with both domains, either way), an identity the client does
//! not allow, a certificate expired, and one not yet valid (with the clock skew). After each
//! the registry keeps serving a good client.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use isthmus_proto::certs;
use isthmus_proto::identity::{SpiffeId, TrustDomain};
use isthmus_proto::model::NodeKind;
use isthmus_proto::subscription::Subscription;
use isthmus_proto::test_pki::TestCa;
use isthmus_proto::tls::{self, Credentials, ServerIdentity, TrustBundle};
use isthmus_proto::{bundle::AgentBundle, grpc};
use isthmus_tests::{eventually, node, TestRegistry, CLUSTER, NETWORK, TRUST_DOMAIN};

/// The registry's log, shared by every test of this file (one process, one subscriber).
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log() -> &'static Log {
    static LOG: OnceLock<Log> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Log::default();
        let writer = log.clone();
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .init();
        log
    })
}

/// Waits until the registry's log has a refused handshake naming all of `words`.
async fn registry_logged(words: &[&str]) {
    let found = eventually(Duration::from_secs(10), || async {
        let text = String::from_utf8_lossy(&log().0.lock().unwrap()).to_string();
        text.lines()
            .any(|l| l.contains("TLS handshake refused") && words.iter().all(|w| l.contains(w)))
            .then_some(())
    })
    .await;
    assert!(
        found.is_some(),
        "the registry never logged a refusal naming {words:?}:\n{}",
        String::from_utf8_lossy(&log().0.lock().unwrap())
    );
}

async fn registry() -> TestRegistry {
    log();
    TestRegistry::start(&[]).await.unwrap()
}

fn id(td: &str, sa: &str) -> SpiffeId {
    SpiffeId::workload(&TrustDomain::new(td).unwrap(), "shop", sa).unwrap()
}

/// What a client of the registry reports when it subscribes: the connect error, or the
/// Watch's, as a program says it.
async fn client_error(
    reg: &TestRegistry,
    creds: Option<&Credentials>,
    bundle: &TrustBundle,
    expected: ServerIdentity,
) -> String {
    let cfg = tls::client_config(creds, bundle, expected, &[tls::ALPN_H2]).unwrap();
    let channel = match grpc::connect(&reg.grpc_addr().to_string(), Arc::new(cfg)).await {
        Ok(c) => c,
        Err(e) => return e.to_string(),
    };
    match Subscription::open(channel, &node("probe", NodeKind::Gateway, NETWORK), None).await {
        Ok(_) => panic!("the registry accepted the client"),
        Err(e) => e.to_string(),
    }
}

/// The registry still serves a good client.
async fn still_serving(reg: &TestRegistry) {
    let good = reg
        .credentials("shop", "good")
        .await
        .expect("a good client");
    let cfg = tls::client_config(
        Some(&good),
        &reg.bundle(),
        ServerIdentity::TrustDomain,
        &[tls::ALPN_H2],
    )
    .unwrap();
    let channel = grpc::connect(&reg.grpc_addr().to_string(), Arc::new(cfg))
        .await
        .unwrap();
    Subscription::open(channel, &node("good", NodeKind::Gateway, NETWORK), None)
        .await
        .expect("a good client subscribes");
}

/// A certificate of `identity` from the registry's own CA, valid for an hour from `from`.
fn signed(reg: &TestRegistry, identity: &SpiffeId, from: time::OffsetDateTime) -> Credentials {
    let (key, csr) = certs::generate_key_and_csr(identity).unwrap();
    let chain = reg
        .material()
        .sign_csr(&csr, identity, Duration::from_secs(3600), from)
        .unwrap();
    Credentials::from_pem(&chain.concat(), &key).unwrap()
}

/// One refused handshake: what the client presents and trusts, and the words its error
/// and the registry's log must hold.
struct Case<'a> {
    creds: Option<Credentials>,
    bundle: TrustBundle,
    expected: ServerIdentity,
    client_says: &'a [&'a str],
    registry_logs: &'a [&'a str],
}

/// Runs `case` against `reg`: both sides name the cause, and the registry keeps serving.
async fn refused(reg: &TestRegistry, case: Case<'_>) {
    let err = client_error(reg, case.creds.as_ref(), &case.bundle, case.expected).await;
    for words in case.client_says {
        assert!(err.contains(words), "{words:?} missing: {err}");
    }
    assert!(!err.contains("is the registry running"), "{err}");
    registry_logged(case.registry_logs).await;
    still_serving(reg).await;
}

/// A client presenting `creds`, trusting the registry's root.
fn presenting(reg: &TestRegistry, creds: Credentials) -> (Option<Credentials>, TrustBundle) {
    (Some(creds), reg.bundle())
}

#[tokio::test]
async fn bad_input_tls_client_certificate_of_an_unknown_issuer() {
    let reg = registry().await;
    let stranger = TestCa::new(TRUST_DOMAIN).leaf(&id(TRUST_DOMAIN, "stranger"));
    let (creds, bundle) = presenting(&reg, stranger);
    let case = Case {
        creds,
        bundle,
        expected: ServerIdentity::TrustDomain,
        client_says: &["unknown issuer", "does not know the issuer"],
        registry_logs: &["unknown issuer", "does not chain to this side's mesh root"],
    };
    refused(&reg, case).await;
}

#[tokio::test]
async fn bad_input_tls_registry_certificate_of_an_unknown_issuer() {
    let reg = registry().await;
    let case = Case {
        creds: None,
        bundle: TestCa::new(TRUST_DOMAIN).bundle(),
        expected: ServerIdentity::TrustDomain,
        client_says: &[
            "TLS handshake failed",
            "unknown issuer",
            "does not chain to this side's mesh root",
        ],
        registry_logs: &["unknown issuer", "does not know the issuer of this side's"],
    };
    refused(&reg, case).await;
}

#[tokio::test]
async fn bad_input_tls_client_trust_domain_differs_from_the_registrys() {
    // The case: a client told another trust domain than the registry's root has.
    let reg = registry().await;
    let case = Case {
        creds: None,
        bundle: TrustBundle::new(reg.bundle().roots().to_vec(), "other.example", &[]).unwrap(),
        expected: ServerIdentity::TrustDomain,
        client_says: &[
            "trust-domain mismatch",
            "\"other.example\"",
            "\"cluster.local\"",
        ],
        registry_logs: &["refused this side's identity"],
    };
    refused(&reg, case).await;
}

#[tokio::test]
async fn bad_input_tls_client_identity_outside_the_registrys_trust_domain() {
    let reg = registry().await;
    let now = time::OffsetDateTime::now_utc();
    let (creds, bundle) = presenting(&reg, signed(&reg, &id("other.example", "web"), now));
    let case = Case {
        creds,
        bundle,
        expected: ServerIdentity::TrustDomain,
        client_says: &["refused this side's identity"],
        registry_logs: &[
            "trust-domain mismatch",
            "spiffe://other.example/ns/shop/sa/web",
            "\"cluster.local\"",
        ],
    };
    refused(&reg, case).await;
}

#[tokio::test]
async fn bad_input_tls_registry_identity_not_allowed() {
    let reg = registry().await;
    let case = Case {
        creds: None,
        bundle: reg.bundle(),
        expected: ServerIdentity::OneOf(vec![id(TRUST_DOMAIN, "someone-else")]),
        client_says: &[
            "identity not allowed",
            "spiffe://cluster.local/ns/shop/sa/someone-else",
        ],
        registry_logs: &["refused this side's identity"],
    };
    refused(&reg, case).await;
}

#[tokio::test]
async fn bad_input_tls_client_certificate_expired() {
    let reg = registry().await;
    let two_hours_ago = time::OffsetDateTime::now_utc() - Duration::from_secs(2 * 3600);
    let (creds, bundle) = presenting(&reg, signed(&reg, &id(TRUST_DOMAIN, "late"), two_hours_ago));
    let case = Case {
        creds,
        bundle,
        expected: ServerIdentity::TrustDomain,
        client_says: &["expired or not yet valid"],
        registry_logs: &["certificate expired", "ago by this host's clock"],
    };
    refused(&reg, case).await;
}

#[tokio::test]
async fn bad_input_tls_client_certificate_not_yet_valid_names_the_skew() {
    let reg = registry().await;
    let in_two_hours = time::OffsetDateTime::now_utc() + Duration::from_secs(2 * 3600);
    let (creds, bundle) = presenting(&reg, signed(&reg, &id(TRUST_DOMAIN, "early"), in_two_hours));
    let case = Case {
        creds,
        bundle,
        expected: ServerIdentity::TrustDomain,
        client_says: &["expired or not yet valid", "check the clocks"],
        // Two hours ahead, less the few minutes the CA backdates a certificate by.
        registry_logs: &[
            "certificate not yet valid",
            "ahead of this host's clock: clock skew of 1h 5",
        ],
    };
    refused(&reg, case).await;
}

#[tokio::test]
async fn bad_input_vm_bundle_trust_domain_that_disagrees_with_the_root() {
    // The agent takes its trust domain from the root unless agent.yaml names one; one that
    // disagrees with the root is refused at start, naming both.
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let bundle = AgentBundle {
        registry: reg.grpc_addr().to_string(),
        trust_domain: String::new(),
        cluster: CLUSTER.into(),
        network: NETWORK.into(),
        group: "vm-web".into(),
        namespace: "shop".into(),
        service_account: "web".into(),
    };
    let root = std::fs::read_to_string(reg.ca_root()).unwrap();
    let write = |b: &AgentBundle| {
        std::fs::write(AgentBundle::config_path(dir.path()), serde_yaml_text(b)).unwrap();
        std::fs::write(AgentBundle::root_cert_path(dir.path()), &root).unwrap();
    };
    write(&bundle);
    let loaded = AgentBundle::load(dir.path()).unwrap();
    assert_eq!(loaded.trust_domain, TRUST_DOMAIN, "taken from the root");
    write(&AgentBundle {
        trust_domain: "other.example".into(),
        ..bundle
    });
    let err = AgentBundle::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("\"other.example\"") && err.contains("\"cluster.local\""),
        "{err}"
    );
}

/// `agent.yaml` as `isthmusctl vm onboard` writes it (camelCase, an empty trust domain
/// left out).
fn serde_yaml_text(b: &AgentBundle) -> String {
    let v = serde_json::to_value(b).unwrap();
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k}: {}\n", v.as_str().unwrap()))
        .collect()
}
