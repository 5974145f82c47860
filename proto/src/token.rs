//! The bootstrap token's format, as a workload reads it before it has a certificate: the
//! claims say which identity the token is for and until when, so a program can ask for
//! the right certificate and refuse an expired token before it touches the network.
//! Signing and verification stay with the CA (in the registry).
//!
//! Format: `ist1.<base64url(JSON claims)>.<base64url(ECDSA P-256 signature)>`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::identity::{IdentityError, SpiffeId, TrustDomain};

pub const TOKEN_PREFIX: &str = "ist1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenClaims {
    /// Trust domain.
    pub td: String,
    pub ns: String,
    pub sa: String,
    pub cluster: String,
    /// Issued at, unix seconds.
    pub iat: i64,
    /// Expires at, unix seconds.
    pub exp: i64,
    /// Unique id (single use).
    pub jti: String,
    /// The id of the CA key that signed it.
    pub kid: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenFormatError {
    #[error("not an isthmus bootstrap token: {0}")]
    Malformed(String),
    #[error("bootstrap token names an invalid identity: {0}")]
    Identity(#[from] IdentityError),
}

impl TokenClaims {
    pub fn identity(&self) -> Result<SpiffeId, IdentityError> {
        SpiffeId::workload(&TrustDomain::new(&self.td)?, &self.ns, &self.sa)
    }
}

/// A token taken apart: the signed text (`prefix.payload`), the claims and the signature.
#[derive(Debug, Clone)]
pub struct ParsedToken<'a> {
    pub signed: &'a str,
    pub claims: TokenClaims,
    pub signature: Vec<u8>,
}

/// Takes a token apart without checking its signature.
pub fn parse(token: &str) -> Result<ParsedToken<'_>, TokenFormatError> {
    let token = token.trim();
    let malformed = |m: String| TokenFormatError::Malformed(m);
    let mut parts = token.split('.');
    let (Some(prefix), Some(payload), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("expected three dot-separated parts".into()));
    };
    if prefix != TOKEN_PREFIX {
        return Err(malformed(format!("unknown token format {prefix:?}")));
    }
    let payload_bytes = B64
        .decode(payload)
        .map_err(|e| malformed(format!("claims: {e}")))?;
    let claims: TokenClaims =
        serde_json::from_slice(&payload_bytes).map_err(|e| malformed(format!("claims: {e}")))?;
    let signature = B64
        .decode(sig)
        .map_err(|e| malformed(format!("signature: {e}")))?;
    Ok(ParsedToken {
        signed: &token[..prefix.len() + 1 + payload.len()],
        claims,
        signature,
    })
}

/// The signed text for `claims` (the CA appends `.` and the signature).
pub fn signed_text(claims: &TokenClaims) -> Result<String, serde_json::Error> {
    Ok(format!(
        "{TOKEN_PREFIX}.{}",
        B64.encode(serde_json::to_vec(claims)?)
    ))
}

pub fn encode_signature(sig: &[u8]) -> String {
    B64.encode(sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_tokens_are_named() {
        for bad in [
            "",
            "ist1",
            "ist1.a.b.c",
            "xyz.e30.AA",
            "ist1.!!.AA",
            "ist1.e30.AA",
        ] {
            assert!(
                matches!(parse(bad), Err(TokenFormatError::Malformed(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn round_trip() {
        let claims = TokenClaims {
            td: "cluster.local".into(),
            ns: "shop".into(),
            sa: "web".into(),
            cluster: "c".into(),
            iat: 1,
            exp: 2,
            jti: "j".into(),
            kid: "k".into(),
        };
        let t = format!(
            "{}.{}",
            signed_text(&claims).unwrap(),
            encode_signature(b"sig")
        );
        let p = parse(&t).unwrap();
        assert_eq!(p.claims, claims);
        assert_eq!(p.signature, b"sig");
        assert_eq!(
            p.claims.identity().unwrap().as_str(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
    }
}
