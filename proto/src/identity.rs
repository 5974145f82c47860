//! SPIFFE identities: strict parsing per the SPIFFE ID specification, and the mesh's
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` form.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The URI scheme of every SPIFFE ID; the spec requires it in lower case.
const SCHEME_PREFIX: &str = "spiffe://";
/// The spec caps a trust domain name at 255 bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// The spec caps a whole SPIFFE ID (as a URI) at 2048 bytes.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID {0:?} is longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong(String),
    #[error("SPIFFE ID {0:?} does not start with \"spiffe://\"")]
    WrongScheme(String),
    #[error("SPIFFE ID {0:?} has no trust domain")]
    MissingTrustDomain(String),
    #[error("trust domain {0:?} is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong(String),
    #[error("trust domain {domain:?} has the character {ch:?}; only a-z, 0-9, '.', '-' and '_' are allowed")]
    BadTrustDomainChar { domain: String, ch: char },
    #[error("SPIFFE ID {0:?} has an empty path segment")]
    EmptySegment(String),
    #[error("SPIFFE ID {0:?} has a '.' or '..' path segment")]
    DotSegment(String),
    #[error("SPIFFE ID {id:?} has the character {ch:?} in its path; only a-z, A-Z, 0-9, '.', '-' and '_' are allowed (no percent-encoding, query or fragment)")]
    BadPathChar { id: String, ch: char },
    #[error("SPIFFE ID {0:?} ends with '/'")]
    TrailingSlash(String),
    #[error("SPIFFE ID {0:?} is not of the mesh form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    NotWorkload(String),
    #[error("{what} {value:?} is not a valid name: {why}")]
    BadName {
        what: &'static str,
        value: String,
        why: &'static str,
    },
}

/// A SPIFFE trust domain name, validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn new(s: &str) -> Result<Self, IdentityError> {
        validate_trust_domain(s)?;
        Ok(Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), IdentityError> {
    if td.is_empty() {
        return Err(IdentityError::MissingTrustDomain(format!(
            "{SCHEME_PREFIX}{td}"
        )));
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdentityError::TrustDomainTooLong(td.to_string()));
    }
    if let Some(ch) = td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(IdentityError::BadTrustDomainChar {
            domain: td.to_string(),
            ch,
        });
    }
    Ok(())
}

/// The namespace and service account of the registries' own certificates.
pub const REGISTRY_NAMESPACE: &str = "isthmus-system";
pub const REGISTRY_SERVICE_ACCOUNT: &str = "isthmus-registry";

/// A SPIFFE ID: `spiffe://<trust-domain>[/<segment>...]`. Immutable and shared: a copy (a
/// routing table's targets, a destination's accepted identities) costs no allocation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: Arc<str>,
    /// Byte offset where the path starts (== uri.len() when there is no path).
    path_start: usize,
}

impl SpiffeId {
    /// Parses a SPIFFE ID strictly: lower-case scheme, a valid trust domain, path segments of
    /// unreserved characters only, no empty, `.` or `..` segments, no trailing slash, no
    /// percent-encoding, query, fragment, port or user info.
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        if s.is_empty() {
            return Err(IdentityError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdentityError::TooLong(truncate(s)));
        }
        let rest = s
            .strip_prefix(SCHEME_PREFIX)
            .ok_or_else(|| IdentityError::WrongScheme(s.to_string()))?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(IdentityError::MissingTrustDomain(s.to_string()));
        }
        validate_trust_domain(td)?;
        if !path.is_empty() {
            if path.ends_with('/') {
                return Err(IdentityError::TrailingSlash(s.to_string()));
            }
            for seg in path[1..].split('/') {
                if seg.is_empty() {
                    return Err(IdentityError::EmptySegment(s.to_string()));
                }
                if seg == "." || seg == ".." {
                    return Err(IdentityError::DotSegment(s.to_string()));
                }
                if let Some(ch) = seg
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
                {
                    return Err(IdentityError::BadPathChar {
                        id: s.to_string(),
                        ch,
                    });
                }
            }
        }
        Ok(Self {
            uri: s.into(),
            path_start: SCHEME_PREFIX.len() + td.len(),
        })
    }

    /// The mesh identity of a workload: `spiffe://TD/ns/NS/sa/SA`.
    pub fn workload(
        td: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        validate_dns_label("namespace", namespace)?;
        validate_service_account(service_account)?;
        Self::parse(&format!(
            "{SCHEME_PREFIX}{td}/ns/{namespace}/sa/{service_account}"
        ))
    }

    /// The identity of the registries of trust domain `td` (their serving certificate, and
    /// the client certificate with which one registry imports from another).
    pub fn registry(td: &TrustDomain) -> Self {
        Self::workload(td, REGISTRY_NAMESPACE, REGISTRY_SERVICE_ACCOUNT)
            .expect("the registry's namespace and service account are valid")
    }

    /// Whether this is a registry's identity (of the trust domain the handshake checked).
    pub fn is_registry(&self) -> bool {
        self.workload_parts() == Ok((REGISTRY_NAMESPACE, REGISTRY_SERVICE_ACCOUNT))
    }

    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME_PREFIX.len()..self.path_start]
    }

    pub fn path(&self) -> &str {
        &self.uri[self.path_start..]
    }

    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// `(namespace, service account)` for an ID of the mesh form.
    pub fn workload_parts(&self) -> Result<(&str, &str), IdentityError> {
        let segs: Vec<&str> = self.path().split('/').skip(1).collect();
        match segs.as_slice() {
            ["ns", ns, "sa", sa] => Ok((ns, sa)),
            _ => Err(IdentityError::NotWorkload(self.uri.to_string())),
        }
    }

    pub fn namespace(&self) -> Option<&str> {
        self.workload_parts().ok().map(|(ns, _)| ns)
    }

    pub fn service_account(&self) -> Option<&str> {
        self.workload_parts().ok().map(|(_, sa)| sa)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Kubernetes DNS-1123 label rules (namespaces, service accounts): 1-63 characters of
/// `a-z0-9-`, starting and ending with an alphanumeric.
pub fn validate_dns_label(what: &'static str, value: &str) -> Result<(), IdentityError> {
    let bad = |why| {
        Err(IdentityError::BadName {
            what,
            value: value.to_string(),
            why,
        })
    };
    if value.is_empty() {
        return bad("it is empty");
    }
    if value.len() > 63 {
        return bad("it is longer than 63 characters");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("only lower-case letters, digits and '-' are allowed");
    }
    if value.starts_with('-') || value.ends_with('-') {
        return bad("it must start and end with a letter or digit");
    }
    Ok(())
}

/// A Kubernetes service account name: a DNS subdomain (lower-case DNS labels joined by dots,
/// at most 253 characters), as the API server accepts one.
pub fn validate_service_account(value: &str) -> Result<(), IdentityError> {
    if value.len() > 253 {
        return Err(IdentityError::BadName {
            what: "service account",
            value: value.to_string(),
            why: "it is longer than 253 characters",
        });
    }
    for label in value.split('.') {
        validate_dns_label("service account", label).map_err(|e| match e {
            IdentityError::BadName { why, .. } => IdentityError::BadName {
                what: "service account",
                value: value.to_string(),
                why: if label.is_empty() && !value.is_empty() {
                    "it has an empty part between dots"
                } else {
                    why
                },
            },
            other => other,
        })?;
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    let mut end = 64.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_accounts_are_kubernetes_names_with_dots_allowed() {
        let td = TrustDomain::new("cluster.local").unwrap();
        for sa in ["default", "reader", "inventory.reader", "a-1.b-2.c"] {
            validate_service_account(sa).unwrap_or_else(|e| panic!("{sa}: {e}"));
            let id = SpiffeId::workload(&td, "shop", sa).unwrap();
            assert_eq!(id.workload_parts().unwrap(), ("shop", sa));
        }
        for sa in ["", "Reader", "a..b", ".a", "a.", "a_b", &"a".repeat(254)] {
            let e = validate_service_account(sa).expect_err(sa).to_string();
            assert!(e.contains("service account"), "{sa}: {e}");
        }
    }

    #[test]
    fn valid_ids() {
        for (s, td, path) in [
            ("spiffe://example.org", "example.org", ""),
            (
                "spiffe://cluster.local/ns/default/sa/web",
                "cluster.local",
                "/ns/default/sa/web",
            ),
            ("spiffe://a-b_c.9/x/Y.z-_", "a-b_c.9", "/x/Y.z-_"),
            ("spiffe://td/...x/.a", "td", "/...x/.a"),
        ] {
            let id = SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.trust_domain(), td);
            assert_eq!(id.path(), path);
            assert_eq!(id.to_string(), s);
        }
    }

    #[test]
    fn malicious_ids_are_refused() {
        let long_path = format!("spiffe://td/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
        let long_td = format!("spiffe://{}/x", "a".repeat(256));
        type Check = fn(&IdentityError) -> bool;
        let cases: Vec<(&str, Check)> = vec![
            ("", |e| matches!(e, IdentityError::Empty)),
            ("http://td/ns/a/sa/b", |e| {
                matches!(e, IdentityError::WrongScheme(_))
            }),
            ("SPIFFE://td/ns/a/sa/b", |e| {
                matches!(e, IdentityError::WrongScheme(_))
            }),
            ("spiffe:/td/ns/a", |e| {
                matches!(e, IdentityError::WrongScheme(_))
            }),
            ("spiffe://", |e| {
                matches!(e, IdentityError::MissingTrustDomain(_))
            }),
            ("spiffe:///ns/a", |e| {
                matches!(e, IdentityError::MissingTrustDomain(_))
            }),
            ("spiffe://Example.org/ns/a", |e| {
                matches!(e, IdentityError::BadTrustDomainChar { .. })
            }),
            ("spiffe://td:443/ns/a", |e| {
                matches!(e, IdentityError::BadTrustDomainChar { .. })
            }),
            ("spiffe://user@td/ns/a", |e| {
                matches!(e, IdentityError::BadTrustDomainChar { .. })
            }),
            ("spiffe://t%64/ns/a", |e| {
                matches!(e, IdentityError::BadTrustDomainChar { .. })
            }),
            ("spiffe://td/ns//sa/b", |e| {
                matches!(e, IdentityError::EmptySegment(_))
            }),
            ("spiffe://td//", |e| {
                matches!(e, IdentityError::TrailingSlash(_))
            }),
            ("spiffe://td/ns/a/", |e| {
                matches!(e, IdentityError::TrailingSlash(_))
            }),
            ("spiffe://td/", |e| {
                matches!(e, IdentityError::TrailingSlash(_))
            }),
            ("spiffe://td/ns/../sa/b", |e| {
                matches!(e, IdentityError::DotSegment(_))
            }),
            ("spiffe://td/./a", |e| {
                matches!(e, IdentityError::DotSegment(_))
            }),
            ("spiffe://td/ns/a%2Fb", |e| {
                matches!(e, IdentityError::BadPathChar { ch: '%', .. })
            }),
            ("spiffe://td/ns/a?x=1", |e| {
                matches!(e, IdentityError::BadPathChar { ch: '?', .. })
            }),
            ("spiffe://td/ns/a#frag", |e| {
                matches!(e, IdentityError::BadPathChar { ch: '#', .. })
            }),
            ("spiffe://td/ns/a b", |e| {
                matches!(e, IdentityError::BadPathChar { ch: ' ', .. })
            }),
            ("spiffe://td/ns/\u{e9}", |e| {
                matches!(e, IdentityError::BadPathChar { .. })
            }),
            ("spiffe://td?q", |e| {
                matches!(e, IdentityError::BadTrustDomainChar { ch: '?', .. })
            }),
            (&long_path, |e| matches!(e, IdentityError::TooLong(_))),
            (&long_td, |e| {
                matches!(e, IdentityError::TrustDomainTooLong(_))
            }),
        ];
        for (input, check) in cases {
            let err = SpiffeId::parse(input).expect_err(input);
            assert!(check(&err), "{input:?} gave the wrong error: {err:?}");
        }
    }

    #[test]
    fn workload_form() {
        let td = TrustDomain::new("mesh.example").unwrap();
        let id = SpiffeId::workload(&td, "shop", "cart").unwrap();
        assert_eq!(id.as_str(), "spiffe://mesh.example/ns/shop/sa/cart");
        assert_eq!(id.workload_parts().unwrap(), ("shop", "cart"));
        assert!(SpiffeId::workload(&td, "Shop", "cart").is_err());
        assert!(SpiffeId::workload(&td, "shop", "-cart").is_err());
        let other = SpiffeId::parse("spiffe://mesh.example/ns/shop/sa/cart/extra").unwrap();
        assert!(matches!(
            other.workload_parts(),
            Err(IdentityError::NotWorkload(_))
        ));
        assert!(TrustDomain::new("UPPER").is_err());
    }
}
