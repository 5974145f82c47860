//! Why a TLS handshake failed, in the operator's words, on both sides of it.
//!
//! The side that refuses a certificate knows the cause: rustls' own errors (unknown issuer,
//! expired, not yet valid, with the times) or an [`IdentityRefusal`] of the SPIFFE verifier
//! (trust-domain mismatch with both domains, an identity not allowed), which rides inside
//! `rustls::Error` so it survives every layer above. The refused side learns only the TLS
//! alert the other sent, which still separates an unknown issuer, a certificate outside
//! its validity and a refusal of the identity, and says that the peer's log has the rest.
//!
//! [`describe`] turns a rustls error into that text; [`find`] digs it out of an error
//! chain (tonic, hyper and `std::io::Error` each wrap it), so a client's "transport
//! error" becomes the cause.

use std::error::Error as StdError;
use std::time::Duration;

use rustls::pki_types::UnixTime;
use rustls::{AlertDescription, CertificateError};

/// A peer certificate that chains to the root but whose identity this side refuses.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityRefusal {
    #[error(
        "trust-domain mismatch: the peer identity {peer} is outside the trust domain \
         {ours:?}{aliases} this side accepts: the peer's trust domain is {peer_domain:?}; both \
         sides must name the mesh's trust domain (check --trust-domain against the root \
         certificate on each side)",
        aliases = aliases_text(.aliases)
    )]
    TrustDomain {
        peer: String,
        peer_domain: String,
        ours: String,
        aliases: Vec<String>,
    },
    #[error(
        "identity not allowed: server identity {peer} is not one of the expected identities \
         [{allowed}]"
    )]
    NotAllowed { peer: String, allowed: String },
    #[error("the peer's certificate has no usable SPIFFE identity: {0}")]
    NoIdentity(String),
}

/// The operator's words: rustls renders a refusal it carries with `Debug`
/// (`invalid peer certificate: Other(OtherError(..))`), and that text should name the cause
/// too.
impl std::fmt::Debug for IdentityRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

fn aliases_text(aliases: &[String]) -> String {
    if aliases.is_empty() {
        String::new()
    } else {
        format!(" (or its aliases {aliases:?})")
    }
}

impl IdentityRefusal {
    /// As rustls carries a verifier's refusal (the alert it sends is `certificate_unknown`).
    pub fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
            std::sync::Arc::new(self),
        )))
    }
}

/// The first rustls error in `e`'s chain, looking inside `std::io::Error`s (whose
/// `source()` skips the error they wrap).
pub fn find<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut next: Option<&'a (dyn StdError + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(tls) = find(inner) {
                    return Some(tls);
                }
            }
        }
        next = err.source();
    }
    None
}

/// The cause of a failed handshake in `e`'s chain, described; `None` when the chain holds
/// no TLS error (a refused or reset connection, a timeout).
pub fn cause_in(e: &(dyn StdError + 'static)) -> Option<String> {
    find(e).map(describe)
}

/// What went wrong, for the log and for the operator's error.
pub fn describe(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(c) => describe_certificate(c),
        rustls::Error::AlertReceived(alert) => describe_alert(*alert),
        rustls::Error::NoCertificatesPresented => {
            "no client certificate: the peer presented none, and this side requires one".into()
        }
        rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. } => {
            format!("not TLS, or not TLS this side understands: {e}")
        }
        other => other.to_string(),
    }
}

/// The peer's certificate, refused here.
fn describe_certificate(c: &CertificateError) -> String {
    match c {
        CertificateError::UnknownIssuer => "unknown issuer: the peer's certificate does not \
            chain to this side's mesh root (the two sides trust different roots; give both \
            the mesh's root-cert.pem)"
            .into(),
        CertificateError::ExpiredContext { time, not_after } => format!(
            "certificate expired: the peer's certificate was valid until {}, {} ago by this \
             host's clock (the peer must renew it; if it should still be valid, check the \
             clocks)",
            format_time(*not_after),
            format_span(seconds_between(*not_after, *time)),
        ),
        CertificateError::NotValidYetContext { time, not_before } => {
            let skew = format_span(seconds_between(*time, *not_before));
            format!(
                "certificate not yet valid: the peer's certificate is valid from {}, {skew} \
                 ahead of this host's clock: clock skew of {skew} between the two hosts \
                 (synchronise their clocks)",
                format_time(*not_before),
            )
        }
        CertificateError::Expired => "certificate expired".into(),
        CertificateError::NotValidYet => "certificate not yet valid (clock skew?)".into(),
        CertificateError::Other(other) => match other.0.downcast_ref::<IdentityRefusal>() {
            Some(refusal) => refusal.to_string(),
            None => format!("the peer's certificate is refused: {}", other.0),
        },
        other => format!("the peer's certificate is refused: {other}"),
    }
}

/// This side's certificate, refused by the peer: the alert is all the peer says.
fn describe_alert(alert: AlertDescription) -> String {
    let why = match alert {
        AlertDescription::UnknownCA => {
            "unknown issuer: the peer does not know the issuer of \
            this side's certificate (the two sides trust different roots)"
        }
        AlertDescription::CertificateExpired => {
            "this side's certificate is expired or not yet \
            valid for the peer: renew it, or check the clocks of both hosts (the peer's log \
            names the dates and the skew)"
        }
        AlertDescription::CertificateUnknown
        | AlertDescription::BadCertificate
        | AlertDescription::AccessDenied => {
            "the peer refused this side's identity (a \
            trust-domain mismatch or an identity it does not allow; the peer's log names both \
            sides)"
        }
        AlertDescription::CertificateRequired => {
            "the peer requires a client certificate and this side sent none"
        }
        AlertDescription::DecryptError => "the peer could not verify this side's signature",
        _ => "",
    };
    let name = format!("{alert:?}");
    if why.is_empty() {
        format!("the peer ended the handshake with the TLS alert {name}")
    } else {
        format!("{why} (TLS alert {name})")
    }
}

fn seconds_between(earlier: UnixTime, later: UnixTime) -> u64 {
    later.as_secs().saturating_sub(earlier.as_secs())
}

/// `1h 2m 3s`, to the second.
fn format_span(secs: u64) -> String {
    let d = Duration::from_secs(secs);
    let (h, m, s) = (d.as_secs() / 3600, d.as_secs() / 60 % 60, d.as_secs() % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m {s}s"),
        _ => format!("{h}h {m}m {s}s"),
    }
}

fn format_time(t: UnixTime) -> String {
    let secs = i64::try_from(t.as_secs()).unwrap_or(i64::MAX);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("unix {secs}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(secs))
    }

    #[test]
    fn a_refusal_is_found_through_io_and_named() {
        let refusal = IdentityRefusal::TrustDomain {
            peer: "spiffe://other.org/ns/shop/sa/web".into(),
            peer_domain: "other.org".into(),
            ours: "cluster.local".into(),
            aliases: vec![],
        };
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, refusal.into_rustls());
        let text = cause_in(&io).expect("found inside the io::Error");
        assert!(text.contains("trust-domain mismatch"), "{text}");
        assert!(
            text.contains("\"other.org\"") && text.contains("\"cluster.local\""),
            "{text}"
        );
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(cause_in(&plain), None);
    }

    #[test]
    fn times_name_the_dates_and_the_skew() {
        let expired = describe(&rustls::Error::InvalidCertificate(
            CertificateError::ExpiredContext {
                time: at(1_800_000_000),
                not_after: at(1_800_000_000 - 3_725),
            },
        ));
        assert!(expired.contains("certificate expired"), "{expired}");
        assert!(expired.contains("1h 2m 5s ago"), "{expired}");
        let early = describe(&rustls::Error::InvalidCertificate(
            CertificateError::NotValidYetContext {
                time: at(1_800_000_000),
                not_before: at(1_800_000_090),
            },
        ));
        assert!(early.contains("not yet valid"), "{early}");
        assert!(early.contains("clock skew of 1m 30s"), "{early}");
        assert!(early.contains("2027-01-15T08:01:30Z"), "{early}");
    }

    #[test]
    fn the_refused_side_reads_the_alert() {
        for (alert, words) in [
            (AlertDescription::UnknownCA, "unknown issuer"),
            (
                AlertDescription::CertificateExpired,
                "expired or not yet valid",
            ),
            (
                AlertDescription::CertificateUnknown,
                "refused this side's identity",
            ),
            (
                AlertDescription::CertificateRequired,
                "requires a client certificate",
            ),
            (
                AlertDescription::ProtocolVersion,
                "TLS alert ProtocolVersion",
            ),
        ] {
            let text = describe(&rustls::Error::AlertReceived(alert));
            assert!(text.contains(words), "{alert:?}: {text}");
        }
    }
}
