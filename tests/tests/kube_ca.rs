//! Kubernetes identity at the CA, against real API servers: a pod's service-account token
//! from the TokenRequest API gets a certificate for its service account once the pod's
//! cluster has confirmed it with a TokenReview, made with the reader role that
//! `deploy/kubernetes/rbac.yaml` ships. Every other token is refused with its reason named.

use std::path::Path;
use std::time::Duration;

use isthmus_proto::certs::{self, send_certificate_request, CertsError, IssuedCertificate};
use isthmus_proto::identity::{SpiffeId, TrustDomain};
use isthmus_proto::pb;
use isthmus_proto::tls::{self, Credentials};
use isthmus_registry::app::LocalCluster;
use isthmus_tests::harness::kube::{self, KubeApi, ISSUER};
use isthmus_tests::{eventually, metric, TestRegistry, CLUSTER, TRUST_DOMAIN};

const AUDIENCE: &str = "isthmus-ca";
/// How long the API server may take to learn of a deletion (generous: the machines are
/// shared; nothing here measures speed).
const STEP: Duration = Duration::from_secs(60);
const REMOTE: &str = "cluster-b";

fn identity(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::workload(&TrustDomain::new(TRUST_DOMAIN).unwrap(), ns, sa).unwrap()
}

/// Asks `reg`'s CA for a certificate of `spiffe://TD/ns/<ns>/sa/<sa>` with a Kubernetes
/// token of `cluster` (empty: the registry's own); the key with what was issued.
async fn request(
    reg: &TestRegistry,
    ns: &str,
    sa: &str,
    cluster: &str,
    token: &str,
) -> (String, Result<IssuedCertificate, CertsError>) {
    let (key, csr_pem) = certs::generate_key_and_csr(&identity(ns, sa)).unwrap();
    let req = pb::CertificateRequest {
        csr_pem,
        kubernetes_token: token.to_string(),
        cluster: cluster.to_string(),
        ..Default::default()
    };
    let sent = send_certificate_request(reg.channel(None).await.unwrap(), req).await;
    (key, sent)
}

/// Expects a certificate for `ns/sa` whose chain verifies against the mesh root.
async fn issued(reg: &TestRegistry, ns: &str, sa: &str, cluster: &str, token: &str) {
    let (key, sent) = request(reg, ns, sa, cluster, token).await;
    let issued = sent.unwrap_or_else(|e| panic!("{ns}/{sa} of {cluster:?}: {e}"));
    let creds = Credentials::from_pem(&issued.chain_pems.concat(), &key).unwrap();
    let verified = reg
        .bundle()
        .verify_peer(
            &creds.chain[0],
            &creds.chain[1..],
            tls::PeerUsage::Client,
            rustls::pki_types::UnixTime::now(),
        )
        .unwrap();
    assert_eq!(verified, identity(ns, sa));
    assert_eq!(
        verified.as_str(),
        format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}")
    );
}

/// Expects a refusal whose message holds every one of `says`, counted under `reason`.
async fn refused(
    reg: &TestRegistry,
    (ns, sa, cluster, token): (&str, &str, &str, &str),
    reason: &str,
    says: &[&str],
) {
    let label = format!("isthmus_ca_certificates_refused_total{{reason=\"{reason}\"}}");
    let before = metric(&reg.metrics().await, &label).unwrap_or(0.0);
    let (_, sent) = request(reg, ns, sa, cluster, token).await;
    let err = sent.expect_err("refused").to_string();
    for s in says {
        assert!(err.contains(s), "{reason}: {s:?} not in {err}");
    }
    eprintln!("refused as {reason}: {err}");
    let after = metric(&reg.metrics().await, &label).unwrap_or(0.0);
    assert_eq!(after, before + 1.0, "{label} after {err}");
}

/// As [`refused`], for a token whose revocation the API server learns of through its
/// informers (a deleted service account or pod): accepted until it is, then refused.
async fn refused_once_revoked(
    reg: &TestRegistry,
    (ns, sa, cluster, token): (&str, &str, &str, &str),
    reason: &str,
    says: &[&str],
) {
    let still_accepted = eventually(STEP, || async {
        let (_, sent) = request(reg, ns, sa, cluster, token).await;
        sent.is_err().then_some(())
    })
    .await;
    assert!(
        still_accepted.is_some(),
        "{ns}/{sa}: still accepted after {STEP:?}"
    );
    refused(reg, (ns, sa, cluster, token), reason, says).await;
}

/// A Pod of `sa` in `ns` (never scheduled: there is no kubelet).
async fn create_pod(api: &KubeApi, ns: &str, name: &str, sa: &str) {
    api.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  serviceAccountName: {sa}\n  containers:\n  - {{name: app, image: app}}\n"
    ))
    .await
    .unwrap();
}

async fn service_accounts(api: &KubeApi, ns: &str, names: &[&str]) {
    api.create_namespace(ns, &[]).await.unwrap();
    for sa in names {
        api.create_service_account(ns, sa).await.unwrap();
    }
}

/// A registry watching `a` as its own cluster and `b` as a remote one (a kubeconfig file),
/// each through the shipped reader role.
async fn registry(a: &KubeApi, b: &KubeApi, dir: &Path) -> TestRegistry {
    let own = dir.join("a-reader.kubeconfig");
    a.reader_kubeconfig(&own).await.unwrap();
    let remote = dir.join("remote");
    std::fs::create_dir(&remote).unwrap();
    b.reader_kubeconfig(&remote.join(format!("{REMOTE}.yaml")))
        .await
        .unwrap();
    TestRegistry::start_with(&[], |cfg| {
        cfg.kubernetes.local = Some(LocalCluster::Kubeconfig(own));
        cfg.kubernetes.remote_kubeconfigs = Some(remote);
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn service_account_tokens_get_their_identity_and_nothing_else() {
    if !kube::available() {
        return;
    }
    let (a, b) = tokio::join!(KubeApi::start(CLUSTER), KubeApi::start(REMOTE));
    let (a, mut b) = (a.unwrap(), b.unwrap());
    let dir = tempfile::tempdir().unwrap();
    service_accounts(&a, "shop", &["web", "admin", "gone"]).await;
    service_accounts(&b, "shop", &["web"]).await;
    let reg = registry(&a, &b, dir.path()).await;

    // A token for the CA's audience, with no cluster named (the registry's own) and with
    // the registry's own cluster named.
    let web = a
        .create_bound_token("shop", "web", "1h", AUDIENCE, None)
        .await
        .unwrap();
    issued(&reg, "shop", "web", "", &web).await;
    issued(&reg, "shop", "web", CLUSTER, &web).await;
    // The remote cluster reviews its own pods' tokens.
    let remote_web = b
        .create_bound_token("shop", "web", "1h", AUDIENCE, None)
        .await
        .unwrap();
    issued(&reg, "shop", "web", REMOTE, &remote_web).await;
    let text = reg.metrics().await;
    assert_eq!(
        metric(
            &text,
            "isthmus_ca_certificates_issued_total{auth=\"kubernetes\"}"
        ),
        Some(3.0),
        "{text}"
    );

    // Another audience (the API server's own, kubectl's default).
    let api_audience = a.create_token("shop", "web", "1h").await.unwrap();
    refused(
        &reg,
        ("shop", "web", "", &api_audience),
        "k8s_token_audience",
        &["Unauthenticated", ISSUER, "requires isthmus-ca"],
    )
    .await;
    // Expired.
    let expired = a.expired_token("shop", "web").await.unwrap();
    refused(
        &reg,
        ("shop", "web", "", &expired),
        "k8s_token_expired",
        &["Unauthenticated", "expired at"],
    )
    .await;
    // A CSR for another service account than the token's.
    refused(
        &reg,
        ("shop", "admin", "", &web),
        "identity_mismatch",
        &[
            "PermissionDenied",
            "spiffe://cluster.local/ns/shop/sa/admin",
            "spiffe://cluster.local/ns/shop/sa/web",
        ],
    )
    .await;
    // Another cluster's token presented as this cluster's: signed with another key.
    refused(
        &reg,
        ("shop", "web", "", &remote_web),
        "k8s_token_rejected",
        &["Unauthenticated", "cluster cluster-a did not authenticate"],
    )
    .await;
    // A cluster the registry does not watch.
    refused(
        &reg,
        ("shop", "web", "cluster-z", &web),
        "unknown_cluster",
        &[
            "FailedPrecondition",
            "\"cluster-z\"",
            "cluster-a, cluster-b",
        ],
    )
    .await;
    // A deleted service account's token.
    let gone = a
        .create_bound_token("shop", "gone", "1h", AUDIENCE, None)
        .await
        .unwrap();
    issued(&reg, "shop", "gone", "", &gone).await;
    a.delete("serviceaccount", Some("shop"), "gone")
        .await
        .unwrap();
    refused_once_revoked(
        &reg,
        ("shop", "gone", "", &gone),
        "k8s_token_rejected",
        &["Unauthenticated", "cluster cluster-a did not authenticate"],
    )
    .await;
    // Not a JWT at all.
    refused(
        &reg,
        ("shop", "web", "", "garbage"),
        "k8s_token_malformed",
        &["Unauthenticated", "not a JWT"],
    )
    .await;
    // A bootstrap token and a Kubernetes token at once.
    let (_, csr_pem) = certs::generate_key_and_csr(&identity("shop", "web")).unwrap();
    let both = pb::CertificateRequest {
        csr_pem,
        bootstrap_token: reg.token("shop", "web", Duration::from_secs(600)),
        kubernetes_token: web.clone(),
        ..Default::default()
    };
    let err = send_certificate_request(reg.channel(None).await.unwrap(), both)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("InvalidArgument") && err.contains("both a bootstrap token"),
        "{err}"
    );

    // A token bound to a Pod works while the pod exists, and not after.
    create_pod(&a, "shop", "web-0", "web").await;
    let bound = a
        .create_bound_token("shop", "web", "1h", AUDIENCE, Some("web-0"))
        .await
        .unwrap();
    issued(&reg, "shop", "web", "", &bound).await;
    a.delete("pod", Some("shop"), "web-0").await.unwrap();
    refused_once_revoked(
        &reg,
        ("shop", "web", "", &bound),
        "k8s_token_rejected",
        &["Unauthenticated", "did not authenticate"],
    )
    .await;

    // The remote cluster out of reach: the review fails, retryably.
    b.stop_apiserver();
    refused(
        &reg,
        ("shop", "web", REMOTE, &remote_web),
        "k8s_review_failed",
        &[
            "Unavailable",
            "TokenReview against cluster cluster-b failed",
        ],
    )
    .await;
}

/// A registry without Kubernetes clusters refuses Kubernetes tokens, saying so.
#[tokio::test]
async fn without_clusters_a_kubernetes_token_is_refused_saying_so() {
    let reg = TestRegistry::start(&[]).await.unwrap();
    let (_, sent) = request(&reg, "shop", "web", "", "a.b.c").await;
    let err = sent.unwrap_err().to_string();
    assert!(
        err.contains("FailedPrecondition") && err.contains("watches no Kubernetes cluster"),
        "{err}"
    );
    let text = reg.metrics().await;
    assert_eq!(
        metric(
            &text,
            "isthmus_ca_certificates_refused_total{reason=\"kubernetes_disabled\"}"
        ),
        Some(1.0),
        "{text}"
    );
}
