//! Bootstrap tokens: one-time, expiring credentials scoped to one identity, signed with the
//! cluster intermediate's key so the registry verifies them without a round trip. The
//! registry records each redeemed token id in its store, so a token cannot be used twice,
//! not even across a restart.
//!
//! Format: `ist1.<base64url(JSON claims)>.<base64url(ECDSA P-256 signature)>`.

use std::time::Duration;

use ::time::OffsetDateTime;
use isthmus_proto::identity::{validate_dns_label, validate_service_account};
use rcgen::SigningKey;

use super::CaMaterial;

pub use isthmus_proto::token::{TokenClaims, TOKEN_PREFIX};

/// Longest lifetime a bootstrap token may have: a VM that has not enrolled within a day
/// should be given a new one.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Expiry is kept in whole seconds: a shorter lifetime would print an expired token.
pub const MIN_TOKEN_TTL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("bootstrap token is malformed: {0}")]
    Malformed(String),
    #[error("bootstrap token was signed by CA key {token_key}, but this registry signs with {current_key} (was the intermediate rotated, or is the token for another cluster?)")]
    ForeignKey {
        token_key: String,
        current_key: String,
    },
    #[error("bootstrap token signature is invalid")]
    BadSignature,
    #[error("bootstrap token expired at {at} (unix seconds); create a new one with `isthmusctl token create`")]
    Expired { at: i64 },
    #[error("bootstrap token is for trust domain {token}, not {ours}")]
    TrustDomain { token: String, ours: String },
    #[error("bootstrap token has already been used; create a new one with `isthmusctl token create` (renewals use the current certificate, not a token)")]
    Reused,
    #[error("bootstrap token is for {token} but the CSR asks for {requested}")]
    Scope { token: String, requested: String },
    #[error("a token lifetime of {} is above the maximum of 24h", isthmus_proto::config::format_duration(*.0))]
    TtlTooLong(Duration),
    #[error("a token lifetime of {} is below the minimum of 1s: the token would be expired when it is printed", isthmus_proto::config::format_duration(*.0))]
    TtlTooShort(Duration),
    #[error("cannot sign the token: {0}")]
    Sign(String),
}

impl TokenError {
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Malformed(_) => "token_malformed",
            TokenError::ForeignKey { .. } => "token_foreign_key",
            TokenError::BadSignature => "token_signature",
            TokenError::Expired { .. } => "token_expired",
            TokenError::TrustDomain { .. } => "token_trust_domain",
            TokenError::Reused => "token_reused",
            TokenError::Scope { .. } => "token_scope",
            TokenError::TtlTooLong(_) | TokenError::TtlTooShort(_) | TokenError::Sign(_) => {
                "token_invalid"
            }
        }
    }
}

/// Creates a token for `spiffe://TD/ns/<ns>/sa/<sa>` valid for `ttl` from `now`.
pub fn create(
    material: &CaMaterial,
    cluster: &str,
    ns: &str,
    sa: &str,
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<String, TokenError> {
    validate_dns_label("namespace", ns).map_err(|e| TokenError::Malformed(e.to_string()))?;
    validate_service_account(sa).map_err(|e| TokenError::Malformed(e.to_string()))?;
    if ttl > MAX_TOKEN_TTL {
        return Err(TokenError::TtlTooLong(ttl));
    }
    if ttl < MIN_TOKEN_TTL {
        return Err(TokenError::TtlTooShort(ttl));
    }
    let iat = now.unix_timestamp();
    let claims = TokenClaims {
        td: material.trust_domain.to_string(),
        ns: ns.to_string(),
        sa: sa.to_string(),
        cluster: cluster.to_string(),
        iat,
        exp: iat + ttl.as_secs() as i64,
        jti: hex::encode(rand::random::<[u8; 16]>()),
        kid: material.key_id.clone(),
    };
    let signed =
        isthmus_proto::token::signed_text(&claims).map_err(|e| TokenError::Sign(e.to_string()))?;
    let sig = material
        .key()
        .sign(signed.as_bytes())
        .map_err(|e| TokenError::Sign(e.to_string()))?;
    Ok(format!(
        "{signed}.{}",
        isthmus_proto::token::encode_signature(&sig)
    ))
}

/// Checks the signature, expiry and trust domain of `token`. Redemption (single use) is the
/// caller's job, against the store.
pub fn verify(
    material: &CaMaterial,
    token: &str,
    now: OffsetDateTime,
) -> Result<TokenClaims, TokenError> {
    let parsed = isthmus_proto::token::parse(token).map_err(|e| match e {
        isthmus_proto::token::TokenFormatError::Malformed(m) => TokenError::Malformed(m),
        other => TokenError::Malformed(other.to_string()),
    })?;
    let claims = parsed.claims;
    let sig = parsed.signature;
    if claims.kid != material.key_id {
        return Err(TokenError::ForeignKey {
            token_key: claims.kid,
            current_key: material.key_id.clone(),
        });
    }
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        &material.public_key,
    )
    .verify(parsed.signed.as_bytes(), &sig)
    .map_err(|_| TokenError::BadSignature)?;
    if claims.td != material.trust_domain.as_str() {
        return Err(TokenError::TrustDomain {
            token: claims.td,
            ours: material.trust_domain.to_string(),
        });
    }
    if now.unix_timestamp() >= claims.exp {
        return Err(TokenError::Expired { at: claims.exp });
    }
    claims
        .identity()
        .map_err(|e| TokenError::Malformed(e.to_string()))?;
    Ok(claims)
}

/// Forgets redeemed tokens that have expired: an expired token is refused for its expiry,
/// so its redemption record no longer protects anything. Returns how many were dropped.
pub async fn forget_expired(
    store: &dyn crate::store::Store,
    now: OffsetDateTime,
) -> Result<usize, crate::store::StoreError> {
    use crate::store::{Op, Table};
    let now = now.unix_timestamp();
    let ops: Vec<Op> = store
        .list(Table::RedeemedTokens)
        .await?
        .into_iter()
        .filter(|(_, v)| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
                .is_none_or(|exp| exp <= now)
        })
        .map(|(k, _)| Op::Delete(k))
        .collect();
    let n = ops.len();
    store.apply(Table::RedeemedTokens, ops).await?;
    Ok(n)
}
