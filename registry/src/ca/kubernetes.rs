//! Kubernetes identity at the CA: a pod's projected service-account token, checked with a
//! TokenReview (`authentication.k8s.io/v1`) against the API server of the pod's cluster,
//! authenticates a request for `spiffe://<trust domain>/ns/<ns>/sa/<sa>` of that token's
//! service account. The review decides; the token's own claims are read (unverified) only
//! to say why a refused token was refused.

use std::time::Duration;

use ::time::OffsetDateTime;
use isthmus_proto::identity::{SpiffeId, TrustDomain};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

use crate::sources::kubernetes::ClusterClients;

/// The audience a pod's token must be projected for, unless configured otherwise.
pub const DEFAULT_TOKEN_AUDIENCE: &str = "isthmus-ca";
/// How long one TokenReview may take before the request is refused as unavailable.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);
/// The username the API server gives a service account's token.
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// Why a Kubernetes token did not authenticate a certificate request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KubeTokenError {
    #[error("the request carries both a bootstrap token and a Kubernetes service-account token: send one or the other")]
    Ambiguous,
    #[error("this registry watches no Kubernetes cluster, so it cannot check a Kubernetes service-account token (start it with --kubeconfig, --in-cluster or --remote-kubeconfigs)")]
    NoClusters,
    #[error("the Kubernetes token is not a JWT: {0}")]
    NotJwt(String),
    #[error("the request names no cluster (meaning this registry's own) but this registry watches no cluster of its own; name the pod's cluster, one of: {known}")]
    NoLocalCluster { known: String },
    #[error("unknown cluster {cluster:?}: this registry watches {known}")]
    UnknownCluster { cluster: String, known: String },
    #[error("the Kubernetes token of cluster {cluster} expired at {at}; the kubelet renews projected tokens: is the pod reading its current token?")]
    Expired { cluster: String, at: String },
    #[error("the Kubernetes token is for audience {has}, but this CA requires {required} (project the token with audience {required})")]
    Audience { has: String, required: String },
    #[error("cluster {cluster} did not authenticate the Kubernetes token: {why}")]
    Rejected { cluster: String, why: String },
    #[error("the Kubernetes token authenticates {username}, which is not a service account (system:serviceaccount:<namespace>:<name>)")]
    NotServiceAccount { username: String },
    #[error("the TokenReview against cluster {cluster} failed: {why}")]
    ReviewFailed { cluster: String, why: String },
}

impl KubeTokenError {
    /// The metric label for a refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            KubeTokenError::Ambiguous => "ambiguous_credentials",
            KubeTokenError::NoClusters => "kubernetes_disabled",
            KubeTokenError::NotJwt(_) => "k8s_token_malformed",
            KubeTokenError::NoLocalCluster { .. } | KubeTokenError::UnknownCluster { .. } => {
                "unknown_cluster"
            }
            KubeTokenError::Expired { .. } => "k8s_token_expired",
            KubeTokenError::Audience { .. } => "k8s_token_audience",
            KubeTokenError::Rejected { .. } => "k8s_token_rejected",
            KubeTokenError::NotServiceAccount { .. } => "k8s_not_service_account",
            KubeTokenError::ReviewFailed { .. } => "k8s_review_failed",
        }
    }
}

/// What the API server said of a token (a TokenReview's status).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReviewStatus {
    pub authenticated: bool,
    pub username: String,
    pub audiences: Vec<String>,
    /// The API server's reason when the token did not authenticate.
    pub error: String,
}

/// Why a review could not be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReviewCallError {
    /// The cluster is not (or no longer) watched.
    UnknownCluster,
    /// The API server could not be asked, or refused to answer.
    Failed(String),
}

/// Checks tokens against the clusters' API servers.
#[async_trait::async_trait]
pub trait TokenReviewer: Send + Sync + std::fmt::Debug {
    /// The registry's own cluster (the one an empty `cluster` names), if it watches one.
    fn local_cluster(&self) -> Option<String>;
    /// The clusters tokens can be reviewed for, sorted.
    fn clusters(&self) -> Vec<String>;
    /// A TokenReview of `token` for `audience` against `cluster`'s API server.
    async fn review(
        &self,
        cluster: &str,
        token: &str,
        audience: &str,
    ) -> Result<ReviewStatus, ReviewCallError>;
}

/// The reviewer over the Kubernetes source's clients.
#[derive(Debug, Clone)]
pub struct KubeTokenReviewer {
    clients: ClusterClients,
    local: Option<String>,
}

impl KubeTokenReviewer {
    /// `local`: the registry's own cluster id when it watches its own cluster.
    pub fn new(clients: ClusterClients, local: Option<String>) -> Self {
        Self { clients, local }
    }
}

#[async_trait::async_trait]
impl TokenReviewer for KubeTokenReviewer {
    fn local_cluster(&self) -> Option<String> {
        self.local.clone()
    }

    fn clusters(&self) -> Vec<String> {
        self.clients.ids()
    }

    async fn review(
        &self,
        cluster: &str,
        token: &str,
        audience: &str,
    ) -> Result<ReviewStatus, ReviewCallError> {
        let client = self
            .clients
            .get(cluster)
            .ok_or(ReviewCallError::UnknownCluster)?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                audiences: Some(vec![audience.to_string()]),
                token: Some(token.to_string()),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(client);
        let created =
            tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review))
                .await
                .map_err(|_| {
                    ReviewCallError::Failed(format!(
                        "no answer within {}s",
                        REVIEW_TIMEOUT.as_secs()
                    ))
                })?
                .map_err(|e| ReviewCallError::Failed(describe_kube_error(&e)))?;
        let status = created.status.unwrap_or_default();
        Ok(ReviewStatus {
            authenticated: status.authenticated.unwrap_or(false),
            username: status.user.and_then(|u| u.username).unwrap_or_default(),
            audiences: status.audiences.unwrap_or_default(),
            error: status.error.unwrap_or_default(),
        })
    }
}

/// A kube error as the operator needs it: a 403 is the registry's own permissions.
fn describe_kube_error(e: &kube::Error) -> String {
    let chain = isthmus_proto::program::error_chain(e);
    match e {
        kube::Error::Api(status) if status.code == 403 => format!(
            "{chain} (the registry's account in that cluster needs create on \
             tokenreviews.authentication.k8s.io: apply deploy/kubernetes/rbac.yaml there)"
        ),
        _ => chain,
    }
}

/// The claims of a JWT read without checking its signature, to explain a refusal.
#[derive(Debug, Default, serde::Deserialize)]
struct UnverifiedClaims {
    #[serde(default)]
    exp: Option<i64>,
    /// One audience, a list of them, or (in a token this CA cannot accept) anything else.
    #[serde(default)]
    aud: serde_json::Value,
}

impl UnverifiedClaims {
    fn audiences(&self) -> Vec<String> {
        match &self.aud {
            serde_json::Value::String(a) => vec![a.clone()],
            serde_json::Value::Array(v) => v
                .iter()
                .filter_map(|a| a.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Reads a JWT's claims without verifying it; an error says why `token` is not a JWT.
fn unverified_claims(token: &str) -> Result<UnverifiedClaims, KubeTokenError> {
    use base64::Engine;
    let bad = |why: &str| KubeTokenError::NotJwt(why.to_string());
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(KubeTokenError::NotJwt(format!(
            "{} dot-separated part(s), a JWT has 3 (header.claims.signature)",
            parts.len()
        )));
    }
    if parts.iter().any(|p| p.is_empty()) {
        return Err(bad("a part is empty"));
    }
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let decode = |what: &str, part: &str| {
        b64.decode(part.trim_end_matches('='))
            .map_err(|e| KubeTokenError::NotJwt(format!("the {what} is not base64url: {e}")))
    };
    let header = decode("header", parts[0])?;
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&header)
        .map_err(|e| KubeTokenError::NotJwt(format!("the header is not a JSON object: {e}")))?;
    let claims = decode("claims part", parts[1])?;
    decode("signature", parts[2])?;
    let claims: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&claims)
        .map_err(|e| KubeTokenError::NotJwt(format!("the claims are not a JSON object: {e}")))?;
    // `exp` of another type than a number is not a JWT's.
    serde_json::from_value(serde_json::Value::Object(claims))
        .map_err(|e| KubeTokenError::NotJwt(format!("the claims are not JWT claims: {e}")))
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "(none)".to_string()
    } else {
        v.join(", ")
    }
}

fn format_time(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&::time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map(|t| format!("{t} (unix {unix})"))
        .unwrap_or_else(|| format!("unix {unix}"))
}

/// The cluster `requested` names: itself when watched, the registry's own when empty.
fn resolve_cluster(
    reviewer: &dyn TokenReviewer,
    requested: &str,
) -> Result<String, KubeTokenError> {
    let known = reviewer.clusters();
    if known.is_empty() {
        return Err(KubeTokenError::NoClusters);
    }
    let cluster = if requested.is_empty() {
        reviewer
            .local_cluster()
            .ok_or_else(|| KubeTokenError::NoLocalCluster {
                known: known.join(", "),
            })?
    } else {
        requested.to_string()
    };
    if !known.contains(&cluster) {
        return Err(unknown_cluster(cluster, &known));
    }
    Ok(cluster)
}

fn unknown_cluster(cluster: String, known: &[String]) -> KubeTokenError {
    KubeTokenError::UnknownCluster {
        cluster,
        known: list_or_none(known),
    }
}

/// A token that authenticated: its cluster and its service account's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeIdentity {
    pub cluster: String,
    pub identity: SpiffeId,
}

/// Authenticates `token` of a pod in `cluster` (empty: the registry's own) with a review
/// for `audience`, and names the identity it proves in `trust_domain`.
pub async fn authenticate(
    reviewer: &dyn TokenReviewer,
    audience: &str,
    trust_domain: &TrustDomain,
    cluster: &str,
    token: &str,
    now: OffsetDateTime,
) -> Result<KubeIdentity, KubeTokenError> {
    let claims = unverified_claims(token)?;
    let cluster = resolve_cluster(reviewer, cluster)?;
    let status = match reviewer.review(&cluster, token, audience).await {
        Ok(s) => s,
        Err(ReviewCallError::UnknownCluster) => {
            return Err(unknown_cluster(cluster, &reviewer.clusters()))
        }
        Err(ReviewCallError::Failed(why)) => {
            return Err(KubeTokenError::ReviewFailed { cluster, why })
        }
    };
    let wrong_audience = |has: Vec<String>| KubeTokenError::Audience {
        has: list_or_none(&has),
        required: audience.to_string(),
    };
    if !status.authenticated {
        // The review's verdict stands; the claims only say which of the usual reasons
        // it most likely was.
        if let Some(exp) = claims.exp.filter(|exp| *exp <= now.unix_timestamp()) {
            return Err(KubeTokenError::Expired {
                cluster,
                at: format_time(exp),
            });
        }
        let has = claims.audiences();
        if !has.iter().any(|a| a == audience) {
            return Err(wrong_audience(has));
        }
        let why = if status.error.is_empty() {
            "the API server gave no reason".to_string()
        } else {
            status.error
        };
        return Err(KubeTokenError::Rejected { cluster, why });
    }
    if !status.audiences.iter().any(|a| a == audience) {
        return Err(wrong_audience(status.audiences));
    }
    let not_sa = || KubeTokenError::NotServiceAccount {
        username: status.username.clone(),
    };
    let (ns, sa) = status
        .username
        .strip_prefix(SERVICE_ACCOUNT_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .ok_or_else(not_sa)?;
    let identity = SpiffeId::workload(trust_domain, ns, sa).map_err(|_| not_sa())?;
    Ok(KubeIdentity { cluster, identity })
}

#[cfg(test)]
mod tests;
