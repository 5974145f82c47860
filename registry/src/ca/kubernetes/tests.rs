use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use base64::Engine;
use isthmus_proto::pb;
use isthmus_proto::pb::certificates_server::Certificates;
use tonic::Code;

use super::*;
use crate::ca::metrics::{CaMetrics, IssuedLabels, RefusedLabels};
use crate::ca::service::{CaPolicy, CertificateService, KubernetesAuth};
use crate::ca::tests::make_ca;
use crate::ca::Authority;
use crate::store::EmbeddedStore;

/// A scripted reviewer: what each cluster answers, and every review it was asked for.
#[derive(Debug, Default)]
struct FakeReviewer {
    local: Option<String>,
    answers: BTreeMap<String, Result<ReviewStatus, ReviewCallError>>,
    asked: Mutex<Vec<(String, String, String)>>,
}

impl FakeReviewer {
    fn new(local: Option<&str>) -> Self {
        Self {
            local: local.map(str::to_string),
            ..Default::default()
        }
    }

    fn answer(mut self, cluster: &str, a: Result<ReviewStatus, ReviewCallError>) -> Self {
        self.answers.insert(cluster.to_string(), a);
        self
    }

    fn asked(&self) -> Vec<(String, String, String)> {
        self.asked.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl TokenReviewer for FakeReviewer {
    fn local_cluster(&self) -> Option<String> {
        self.local.clone()
    }

    fn clusters(&self) -> Vec<String> {
        self.answers.keys().cloned().collect()
    }

    async fn review(
        &self,
        cluster: &str,
        token: &str,
        audience: &str,
    ) -> Result<ReviewStatus, ReviewCallError> {
        self.asked
            .lock()
            .unwrap()
            .push((cluster.into(), token.into(), audience.into()));
        self.answers
            .get(cluster)
            .cloned()
            .unwrap_or(Err(ReviewCallError::UnknownCluster))
    }
}

const AUDIENCE: &str = "isthmus-ca";

fn b64(s: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

/// A JWT-shaped token with these claims (its signature is the fake reviewer's business).
fn jwt(aud: &[&str], exp: i64) -> String {
    let claims =
        serde_json::json!({"aud": aud, "exp": exp, "sub": "system:serviceaccount:shop:web"});
    format!(
        "{}.{}.{}",
        b64(r#"{"alg":"RS256","kid":"k"}"#),
        b64(&claims.to_string()),
        b64("signature")
    )
}

fn in_an_hour() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp() + 3600
}

fn authenticated(username: &str, audiences: &[&str]) -> Result<ReviewStatus, ReviewCallError> {
    Ok(ReviewStatus {
        authenticated: true,
        username: username.to_string(),
        audiences: audiences.iter().map(|a| a.to_string()).collect(),
        error: String::new(),
    })
}

fn refused(error: &str) -> Result<ReviewStatus, ReviewCallError> {
    Ok(ReviewStatus {
        error: error.to_string(),
        ..Default::default()
    })
}

const WEB: &str = "system:serviceaccount:shop:web";

struct Setup {
    svc: CertificateService,
    metrics: CaMetrics,
    reviewer: Arc<FakeReviewer>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

fn setup(reviewer: Option<FakeReviewer>) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let c1: &Path = &make_ca(tmp.path(), "mesh.test", &["c1"]);
    let authority = Arc::new(Authority::load(c1, None).unwrap());
    let store = Arc::new(EmbeddedStore::open(data.path()).unwrap());
    let metrics = CaMetrics::default();
    let mut svc = CertificateService::new(authority, store, CaPolicy::default(), metrics.clone());
    let reviewer = Arc::new(reviewer.unwrap_or_default());
    if !reviewer.answers.is_empty() || reviewer.local.is_some() {
        svc = svc.with_kubernetes(KubernetesAuth {
            reviewer: reviewer.clone(),
            audience: AUDIENCE.into(),
        });
    }
    Setup {
        svc,
        metrics,
        reviewer,
        _dirs: (tmp, data),
    }
}

fn csr_for(identity: &str) -> String {
    let id = isthmus_proto::SpiffeId::parse(identity).unwrap();
    isthmus_proto::certs::generate_key_and_csr(&id).unwrap().1
}

fn request(identity: &str, cluster: &str, token: &str) -> pb::CertificateRequest {
    pb::CertificateRequest {
        csr_pem: csr_for(identity),
        kubernetes_token: token.to_string(),
        cluster: cluster.to_string(),
        ..Default::default()
    }
}

const WEB_ID: &str = "spiffe://mesh.test/ns/shop/sa/web";

impl Setup {
    async fn call(
        &self,
        req: pb::CertificateRequest,
    ) -> Result<pb::CertificateResponse, tonic::Status> {
        self.svc
            .create_certificate(tonic::Request::new(req))
            .await
            .map(|r| r.into_inner())
    }

    /// Sends `req`, expects a refusal with `code` and `reason`, and returns its message.
    async fn refused(
        &self,
        req: pb::CertificateRequest,
        code: Code,
        reason: &'static str,
    ) -> String {
        let before = self.refusals(reason);
        let status = self.call(req).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert_eq!(
            self.refusals(reason),
            before + 1,
            "counted as {reason}: {status:?}"
        );
        status.message().to_string()
    }

    fn refusals(&self, reason: &'static str) -> u64 {
        self.metrics
            .refused
            .get_or_create(&RefusedLabels { reason })
            .get()
    }

    fn issued(&self, auth: &'static str) -> u64 {
        self.metrics
            .issued
            .get_or_create(&IssuedLabels { auth })
            .get()
    }
}

#[tokio::test]
async fn a_reviewed_service_account_token_gets_its_own_identity() {
    let s = setup(Some(
        FakeReviewer::new(Some("c1"))
            .answer("c1", authenticated(WEB, &[AUDIENCE]))
            .answer("c2", authenticated(WEB, &[AUDIENCE])),
    ));
    let token = jwt(&[AUDIENCE], in_an_hour());
    // No cluster named: the registry's own.
    let resp = s.call(request(WEB_ID, "", &token)).await.unwrap();
    let leaf =
        isthmus_proto::tls::parse_certs(Path::new("leaf"), resp.cert_chain_pem[0].as_bytes())
            .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf[0]).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        format!("{:?}", san.value.general_names),
        format!("[URI(\"{WEB_ID}\")]")
    );
    assert_eq!(s.issued("kubernetes"), 1);
    // A named cluster is asked itself.
    s.call(request(WEB_ID, "c2", &token)).await.unwrap();
    assert_eq!(s.issued("kubernetes"), 2);
    let asked = s.reviewer.asked();
    assert_eq!(
        asked,
        vec![
            ("c1".to_string(), token.clone(), AUDIENCE.to_string()),
            ("c2".to_string(), token.clone(), AUDIENCE.to_string()),
        ]
    );
}

#[tokio::test]
async fn both_tokens_at_once_are_ambiguous_and_none_is_unauthenticated() {
    let s = setup(Some(
        FakeReviewer::new(Some("c1")).answer("c1", authenticated(WEB, &[AUDIENCE])),
    ));
    let mut req = request(WEB_ID, "", &jwt(&[AUDIENCE], in_an_hour()));
    req.bootstrap_token = "ist1.e30.c2ln".into();
    let msg = s
        .refused(req, Code::InvalidArgument, "ambiguous_credentials")
        .await;
    assert!(
        msg.contains("both a bootstrap token and a Kubernetes"),
        "{msg}"
    );
    assert!(
        s.reviewer.asked().is_empty(),
        "no review for an ambiguous request"
    );
    let msg = s
        .refused(
            request(WEB_ID, "", ""),
            Code::Unauthenticated,
            "unauthenticated",
        )
        .await;
    assert!(msg.contains("Kubernetes service-account token"), "{msg}");
}

#[tokio::test]
async fn without_kubernetes_clusters_a_kubernetes_token_is_refused_saying_so() {
    let token = jwt(&[AUDIENCE], in_an_hour());
    // No reviewer at all (no cluster configured).
    let s = setup(None);
    let msg = s
        .refused(
            request(WEB_ID, "", &token),
            Code::FailedPrecondition,
            "kubernetes_disabled",
        )
        .await;
    assert!(msg.contains("watches no Kubernetes cluster"), "{msg}");
    // A reviewer whose clusters have all gone.
    let s = setup(Some(FakeReviewer::new(Some("c1"))));
    let msg = s
        .refused(
            request(WEB_ID, "", &token),
            Code::FailedPrecondition,
            "kubernetes_disabled",
        )
        .await;
    assert!(msg.contains("watches no Kubernetes cluster"), "{msg}");
}

#[tokio::test]
async fn unknown_clusters_are_named_with_the_known_ones() {
    let token = jwt(&[AUDIENCE], in_an_hour());
    let s = setup(Some(
        FakeReviewer::new(Some("c1"))
            .answer("c1", authenticated(WEB, &[AUDIENCE]))
            .answer("c2", Err(ReviewCallError::UnknownCluster)),
    ));
    let msg = s
        .refused(
            request(WEB_ID, "c9", &token),
            Code::FailedPrecondition,
            "unknown_cluster",
        )
        .await;
    assert!(msg.contains("\"c9\"") && msg.contains("c1, c2"), "{msg}");
    // Removed between the lookup and the review.
    let msg = s
        .refused(
            request(WEB_ID, "c2", &token),
            Code::FailedPrecondition,
            "unknown_cluster",
        )
        .await;
    assert!(msg.contains("\"c2\""), "{msg}");
    // No cluster named, and the registry has none of its own.
    let s = setup(Some(
        FakeReviewer::new(None).answer("c2", authenticated(WEB, &[AUDIENCE])),
    ));
    let msg = s
        .refused(
            request(WEB_ID, "", &token),
            Code::FailedPrecondition,
            "unknown_cluster",
        )
        .await;
    assert!(
        msg.contains("no cluster of its own") && msg.contains("c2"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_token_that_is_not_a_jwt_is_refused_without_a_review() {
    let s = setup(Some(
        FakeReviewer::new(Some("c1")).answer("c1", authenticated(WEB, &[AUDIENCE])),
    ));
    for garbage in ["garbage", "a.b.c", "x.y"] {
        let msg = s
            .refused(
                request(WEB_ID, "", garbage),
                Code::Unauthenticated,
                "k8s_token_malformed",
            )
            .await;
        assert!(msg.contains("not a JWT"), "{msg}");
    }
    assert!(s.reviewer.asked().is_empty());
}

#[tokio::test]
async fn refused_tokens_are_explained_expired_audience_or_the_api_servers_reason() {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let s = setup(Some(FakeReviewer::new(Some("c1")).answer(
        "c1",
        refused("[invalid bearer token, service account token has been invalidated]"),
    )));
    // Expired: named with when.
    let expired = jwt(&[AUDIENCE], 1_700_000_000);
    let msg = s
        .refused(
            request(WEB_ID, "", &expired),
            Code::Unauthenticated,
            "k8s_token_expired",
        )
        .await;
    assert!(msg.contains("expired at 2023-11-14T22:13:20Z"), "{msg}");
    // Another audience: both named.
    let other = jwt(&["https://kubernetes.default.svc", "vault"], now + 600);
    let msg = s
        .refused(
            request(WEB_ID, "", &other),
            Code::Unauthenticated,
            "k8s_token_audience",
        )
        .await;
    assert!(
        msg.contains("https://kubernetes.default.svc, vault")
            && msg.contains("requires isthmus-ca"),
        "{msg}"
    );
    // Right audience, still refused: the API server's reason.
    let ours = jwt(&[AUDIENCE], now + 600);
    let msg = s
        .refused(
            request(WEB_ID, "", &ours),
            Code::Unauthenticated,
            "k8s_token_rejected",
        )
        .await;
    assert!(
        msg.contains("cluster c1") && msg.contains("has been invalidated"),
        "{msg}"
    );
}

#[tokio::test]
async fn an_authenticated_token_must_carry_the_audience_and_be_a_service_accounts() {
    let token = jwt(&[AUDIENCE], in_an_hour());
    let s = setup(Some(
        FakeReviewer::new(Some("c1"))
            .answer("c1", authenticated(WEB, &["other"]))
            .answer("user", authenticated("alice", &[AUDIENCE]))
            .answer(
                "short",
                authenticated("system:serviceaccount:shop", &[AUDIENCE]),
            )
            .answer(
                "bad",
                authenticated("system:serviceaccount:Shop:web", &[AUDIENCE]),
            ),
    ));
    let msg = s
        .refused(
            request(WEB_ID, "", &token),
            Code::Unauthenticated,
            "k8s_token_audience",
        )
        .await;
    assert!(msg.contains("audience other"), "{msg}");
    for (cluster, who) in [
        ("user", "alice"),
        ("short", "system:serviceaccount:shop"),
        ("bad", "system:serviceaccount:Shop:web"),
    ] {
        let msg = s
            .refused(
                request(WEB_ID, cluster, &token),
                Code::PermissionDenied,
                "k8s_not_service_account",
            )
            .await;
        assert!(msg.contains(&format!("authenticates {who},")), "{msg}");
    }
}

#[tokio::test]
async fn a_csr_for_another_identity_names_both() {
    let s = setup(Some(
        FakeReviewer::new(Some("c1")).answer("c1", authenticated(WEB, &[AUDIENCE])),
    ));
    let token = jwt(&[AUDIENCE], in_an_hour());
    let msg = s
        .refused(
            request("spiffe://mesh.test/ns/shop/sa/admin", "", &token),
            Code::PermissionDenied,
            "identity_mismatch",
        )
        .await;
    assert!(
        msg.contains("spiffe://mesh.test/ns/shop/sa/admin") && msg.contains(WEB_ID),
        "{msg}"
    );
    assert_eq!(s.issued("kubernetes"), 0);
}

#[tokio::test]
async fn a_review_that_fails_is_unavailable_and_retryable() {
    let s = setup(Some(FakeReviewer::new(Some("c1")).answer(
        "c1",
        Err(ReviewCallError::Failed("connection refused".into())),
    )));
    let token = jwt(&[AUDIENCE], in_an_hour());
    let msg = s
        .refused(
            request(WEB_ID, "", &token),
            Code::Unavailable,
            "k8s_review_failed",
        )
        .await;
    assert!(
        msg.contains("against cluster c1") && msg.contains("connection refused"),
        "{msg}"
    );
}

#[test]
fn claims_are_read_from_jwts_and_anything_else_is_named() {
    let token = format!(
        "{}.{}.{}",
        b64(r#"{"alg":"RS256"}"#),
        b64(r#"{"aud":["a","b"],"exp":5}"#),
        b64("sig")
    );
    let c = unverified_claims(&token).unwrap();
    assert_eq!(c.audiences(), ["a", "b"]);
    assert_eq!(c.exp, Some(5));
    let one = format!("{}.{}.{}", b64("{}"), b64(r#"{"aud":"x"}"#), b64("sig"));
    assert_eq!(unverified_claims(&one).unwrap().audiences(), ["x"]);
    let odd = format!("{}.{}.{}", b64("{}"), b64(r#"{"aud":7}"#), b64("sig"));
    assert!(unverified_claims(&odd).unwrap().audiences().is_empty());
    for (bad, says) in [
        ("", "1 dot-separated part"),
        ("abc", "1 dot-separated part"),
        ("a.b", "2 dot-separated part"),
        ("a..c", "a part is empty"),
        ("!!.e30.c2ln", "header is not base64url"),
        ("e30.!!.c2ln", "claims part is not base64url"),
        ("bm90IGpzb24.e30.c2ln", "header is not a JSON object"),
        ("e30.WzFd.c2ln", "claims are not a JSON object"),
        ("e30.eyJleHAiOiJzb29uIn0.c2ln", "not JWT claims"),
    ] {
        let err = unverified_claims(bad).unwrap_err();
        assert_eq!(err.reason(), "k8s_token_malformed");
        assert!(err.to_string().contains(says), "{bad:?}: {err}");
    }
}

#[test]
fn times_are_named_in_rfc3339_and_unix_seconds() {
    assert_eq!(format_time(0), "1970-01-01T00:00:00Z (unix 0)");
    assert_eq!(format_time(i64::MAX), format!("unix {}", i64::MAX));
}

#[test]
fn a_forbidden_review_names_the_permission_the_registry_lacks() {
    let forbidden = kube::Error::Api(
        kube::core::Status::failure("tokenreviews is forbidden", "Forbidden")
            .with_code(403)
            .boxed(),
    );
    let said = describe_kube_error(&forbidden);
    assert!(
        said.contains("tokenreviews is forbidden")
            && said.contains("create on tokenreviews.authentication.k8s.io"),
        "{said}"
    );
    let other = kube::Error::Api(
        kube::core::Status::failure("etcd is down", "InternalError")
            .with_code(500)
            .boxed(),
    );
    assert!(!describe_kube_error(&other).contains("tokenreviews"));
}
