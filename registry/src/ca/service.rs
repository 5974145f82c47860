//! The Certificates gRPC service: signs CSRs authenticated by a bootstrap token, by a pod's
//! Kubernetes service-account token, or by the caller's current mesh certificate.

use std::sync::Arc;
use std::time::Duration;

use ::time::OffsetDateTime;
use isthmus_proto::grpc::PeerInfo;
use isthmus_proto::pb;
use tonic::{Request, Response, Status};

use super::kubernetes::{self, KubeTokenError, TokenReviewer};
use super::metrics::{CaMetrics, IssuedLabels, RefusedLabels};
use super::token::{self, TokenError};
use super::{csr_identity, Authority, CaError};
use crate::store::{Store, Table};

#[derive(Debug, Clone)]
pub struct CaPolicy {
    pub default_ttl: Duration,
    pub max_ttl: Duration,
}

impl Default for CaPolicy {
    fn default() -> Self {
        Self {
            default_ttl: super::DEFAULT_LEAF_TTL,
            max_ttl: super::DEFAULT_MAX_LEAF_TTL,
        }
    }
}

#[derive(Debug, Clone)]
pub struct CertificateService {
    authority: Arc<Authority>,
    store: Arc<dyn Store>,
    policy: CaPolicy,
    metrics: CaMetrics,
    kubernetes: Option<KubernetesAuth>,
}

/// How the service checks Kubernetes service-account tokens.
#[derive(Debug, Clone)]
pub struct KubernetesAuth {
    pub reviewer: Arc<dyn TokenReviewer>,
    /// The audience a token must be projected for.
    pub audience: String,
}

impl CertificateService {
    pub fn new(
        authority: Arc<Authority>,
        store: Arc<dyn Store>,
        policy: CaPolicy,
        metrics: CaMetrics,
    ) -> Self {
        Self {
            authority,
            store,
            policy,
            metrics,
            kubernetes: None,
        }
    }

    /// Also accepts pods' service-account tokens, checked as `auth` says.
    pub fn with_kubernetes(mut self, auth: KubernetesAuth) -> Self {
        self.kubernetes = Some(auth);
        self
    }

    /// Authenticates and signs one request; `caller` is the verified client certificate
    /// identity, if the caller presented one.
    pub async fn issue(
        &self,
        req: pb::CertificateRequest,
        caller: Option<&isthmus_proto::SpiffeId>,
    ) -> Result<pb::CertificateResponse, CaError> {
        let now = OffsetDateTime::now_utc();
        if !req.bootstrap_token.is_empty() && !req.kubernetes_token.is_empty() {
            return Err(KubeTokenError::Ambiguous.into());
        }
        let ttl = match req.ttl_seconds {
            0 => self.policy.default_ttl,
            s => Duration::from_secs(s),
        };
        if ttl > self.policy.max_ttl {
            return Err(CaError::TtlTooLong {
                requested: ttl.as_secs(),
                max: self.policy.max_ttl.as_secs(),
            });
        }
        let material = self.authority.current();
        let requested = csr_identity(&req.csr_pem)?;
        // Authenticate, sign, and only then spend the token: a CSR that cannot be signed
        // does not burn the token it came with.
        let (auth, token_claims) = if !req.bootstrap_token.is_empty() {
            let claims = token::verify(&material, &req.bootstrap_token, now)?;
            let token_id = claims
                .identity()
                .map_err(|e| TokenError::Malformed(e.to_string()))?;
            if token_id != requested {
                return Err(TokenError::Scope {
                    token: token_id.to_string(),
                    requested: requested.to_string(),
                }
                .into());
            }
            ("token", Some(claims))
        } else if !req.kubernetes_token.is_empty() {
            let k = self.kubernetes.as_ref().ok_or(KubeTokenError::NoClusters)?;
            let proven = kubernetes::authenticate(
                k.reviewer.as_ref(),
                &k.audience,
                &material.trust_domain,
                &req.cluster,
                &req.kubernetes_token,
                now,
            )
            .await?;
            if proven.identity != requested {
                return Err(CaError::IdentityMismatch {
                    requested: requested.to_string(),
                    caller: format!(
                        "{} (the token's service account in cluster {})",
                        proven.identity, proven.cluster
                    ),
                });
            }
            ("kubernetes", None)
        } else if let Some(caller) = caller {
            if caller != &requested {
                return Err(CaError::IdentityMismatch {
                    requested: requested.to_string(),
                    caller: caller.to_string(),
                });
            }
            ("renewal", None)
        } else {
            return Err(CaError::Unauthenticated);
        };
        let chain = material.sign_csr(&req.csr_pem, &requested, ttl, now)?;
        if let Some(claims) = token_claims {
            let redeemed = self
                .store
                .insert_if_absent(
                    Table::RedeemedTokens,
                    &claims.jti,
                    claims.exp.to_string().into_bytes(),
                )
                .await
                .map_err(|e| CaError::Store(e.to_string()))?;
            if !redeemed {
                return Err(TokenError::Reused.into());
            }
        }
        self.metrics
            .issued
            .get_or_create(&IssuedLabels { auth })
            .inc();
        tracing::info!(identity = %requested, auth, ttl_s = ttl.as_secs(), "certificate issued");
        Ok(pb::CertificateResponse {
            cert_chain_pem: chain,
            root_cert_pem: material.root_pem.clone(),
        })
    }
}

/// Maps a CA refusal to its gRPC status, in one place.
pub fn status_of(e: &CaError) -> Status {
    let msg = e.to_string();
    match e {
        CaError::Unauthenticated => Status::unauthenticated(msg),
        CaError::Token(_) | CaError::IdentityMismatch { .. } => Status::permission_denied(msg),
        CaError::Kubernetes(k) => match k {
            KubeTokenError::Ambiguous => Status::invalid_argument(msg),
            KubeTokenError::NoClusters
            | KubeTokenError::NoLocalCluster { .. }
            | KubeTokenError::UnknownCluster { .. } => Status::failed_precondition(msg),
            KubeTokenError::NotJwt(_)
            | KubeTokenError::Expired { .. }
            | KubeTokenError::Audience { .. }
            | KubeTokenError::Rejected { .. } => Status::unauthenticated(msg),
            KubeTokenError::NotServiceAccount { .. } => Status::permission_denied(msg),
            // The cluster's API server could not answer: worth retrying.
            KubeTokenError::ReviewFailed { .. } => Status::unavailable(msg),
        },
        CaError::BadCsr(_)
        | CaError::CsrSans { .. }
        | CaError::CsrKeyType(_)
        | CaError::TtlTooLong { .. } => Status::invalid_argument(msg),
        CaError::Store(_) | CaError::Read { .. } | CaError::BadFile { .. } => {
            Status::unavailable(msg)
        }
        CaError::Sign(_) => Status::internal(msg),
    }
}

#[tonic::async_trait]
impl pb::certificates_server::Certificates for CertificateService {
    async fn create_certificate(
        &self,
        request: Request<pb::CertificateRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let caller = peer.as_ref().and_then(|p| p.identity.clone());
        match self.issue(request.into_inner(), caller.as_ref()).await {
            Ok(resp) => Ok(Response::new(resp)),
            Err(e) => {
                let reason = e.reason();
                self.metrics
                    .refused
                    .get_or_create(&RefusedLabels { reason })
                    .inc();
                tracing::warn!(reason, error = %e, remote = ?peer.map(|p| p.remote), "certificate request refused");
                Err(status_of(&e))
            }
        }
    }
}
