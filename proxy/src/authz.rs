//! Authorization of inbound connections: which verified peers may reach the local app.
//! Pure logic, no I/O; the inbound listener asks [`AuthorizationPolicy::decide`] once per
//! connection, after the mTLS handshake has verified the peer against the trust domain.
//!
//! The semantics follow Istio's `AuthorizationPolicy` for the L4 fields that make sense
//! here (`source.principals`, `source.namespaces`):
//!
//! - a rule matches when every non-empty field matches; the values of one field are OR-ed;
//! - any matching `deny` rule denies, whatever `allow` says;
//! - an empty `allow` list allows every peer the TLS layer accepted (the trust domain is
//!   the default boundary); a non-empty one allows only peers that match one of its rules;
//! - a plaintext peer (PERMISSIVE mode) has no identity, so it matches no rule that names
//!   principals or namespaces, only an empty rule `{}`.
//!
//! Principals are written as Istio writes them (`cluster.local/ns/shop/sa/web`) or as the
//! full SPIFFE ID (`spiffe://cluster.local/ns/shop/sa/web`), exactly or with one `*` at the
//! start or the end (`*` alone: any authenticated peer). Namespaces are exact or `*` (any
//! peer whose identity names a namespace).
//!
//! ```yaml
//! deny:
//!   - principals: ["cluster.local/ns/shop/sa/legacy"]
//! allow:
//!   - namespaces: ["shop"]
//!   - principals: ["spiffe://cluster.local/ns/ops/sa/*"]
//! ```
//!
//! The same file holds what happens to an allowed connection per calling identity,
//! `quotas` and `faults`, matched the same way: see [`admission`].

use std::path::{Path, PathBuf};

pub use isthmus_proto::config::FieldProblem;
use isthmus_proto::identity::{validate_dns_label, SpiffeId};
use serde::Deserialize;

pub mod admission;

use admission::{FaultRule, QuotaRule};

const SPIFFE_SCHEME: &str = "spiffe://";
/// A policy file is a few rules; anything much larger is a mistake (a wrong path, a
/// generator gone wrong), refused before it is parsed.
pub const MAX_POLICY_BYTES: u64 = 1024 * 1024;

/// Who may reach the local app. The default (no rules) allows every peer that passed the
/// mTLS handshake, and plaintext peers where the listener accepts them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationPolicy {
    #[serde(default)]
    pub allow: Vec<Rule>,
    #[serde(default)]
    pub deny: Vec<Rule>,
    /// Limits on each calling identity's connections ([`admission`]).
    #[serde(default)]
    pub quotas: Vec<QuotaRule>,
    /// Delays and resets for resilience drills ([`admission`]).
    #[serde(default)]
    pub faults: Vec<FaultRule>,
}

/// One source match; empty fields match anything (an empty rule matches every peer,
/// plaintext included).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
}

/// The verdict for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// `reason` names the rule and the peer, for the access log.
    Deny {
        reason: String,
    },
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read the authorization policy {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("authorization policy {} is larger than {MAX_POLICY_BYTES} bytes; is it the right file?", .path.display())]
    TooLarge { path: PathBuf },
    /// Display: `FILE: FIELD: message[; FIELD: message ...]`, every problem found.
    #[error("{}: {}", .path.display(), FieldProblem::join(.problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<FieldProblem>,
    },
}

impl AuthorizationPolicy {
    /// Reads and checks a YAML (or JSON) policy file.
    pub fn from_yaml_file(path: &Path) -> Result<Self, PolicyError> {
        let read_err = |source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        };
        let len = std::fs::metadata(path).map_err(read_err)?.len();
        if len > MAX_POLICY_BYTES {
            return Err(PolicyError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        Self::from_yaml(path, &text)
    }

    /// Parses and checks a policy; `origin` names it in errors (a file, or e.g. `<flag>`).
    /// An empty document is the default policy.
    pub fn from_yaml(origin: &Path, text: &str) -> Result<Self, PolicyError> {
        let invalid = |problems| PolicyError::Invalid {
            path: origin.to_path_buf(),
            problems,
        };
        // A typo (or a bomb) in a policy must not take the proxy down with it.
        let value = isthmus_proto::config::yaml_value(text).map_err(|why| {
            invalid(vec![FieldProblem {
                field: String::new(),
                message: why,
            }])
        })?;
        if value.is_null() {
            return Ok(Self::default());
        }
        let policy: Self = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            invalid(vec![FieldProblem {
                field: if path == "." { String::new() } else { path },
                message: e.inner().to_string(),
            }])
        })?;
        policy.check().map_err(invalid)?;
        Ok(policy)
    }

    /// Every value that could never match as written (a `*` in the middle, an empty string,
    /// a namespace that is not a DNS label), so a typo is refused rather than silently
    /// matching nothing.
    pub fn check(&self) -> Result<(), Vec<FieldProblem>> {
        let mut problems = Vec::new();
        for (list, rules) in [("allow", &self.allow), ("deny", &self.deny)] {
            for (i, rule) in rules.iter().enumerate() {
                check_source(
                    &format!("{list}[{i}]."),
                    &rule.principals,
                    &rule.namespaces,
                    &mut problems,
                );
            }
        }
        admission::check(&self.quotas, &self.faults, &mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The verdict for `peer` (`None`: a plaintext connection).
    pub fn decide(&self, peer: Option<&SpiffeId>) -> Decision {
        if let Some(i) = self.deny.iter().position(|r| r.matches(peer)) {
            return Decision::Deny {
                reason: format!("deny rule {i} matched {}", describe(peer)),
            };
        }
        if self.allow.is_empty() || self.allow.iter().any(|r| r.matches(peer)) {
            return Decision::Allow;
        }
        Decision::Deny {
            reason: format!("no allow rule matched {}", describe(peer)),
        }
    }
}

impl Rule {
    /// Whether every non-empty field matches `peer`.
    pub fn matches(&self, peer: Option<&SpiffeId>) -> bool {
        source_matches(&self.principals, &self.namespaces, peer)
    }
}

/// Whether `peer` matches a rule's `principals` and `namespaces` (each matches when empty).
pub(crate) fn source_matches(
    principals: &[String],
    namespaces: &[String],
    peer: Option<&SpiffeId>,
) -> bool {
    let principal_ok = principals.is_empty()
        || peer.is_some_and(|id| principals.iter().any(|p| principal_matches(p, id)));
    let namespace_ok = namespaces.is_empty()
        || peer.is_some_and(|id| {
            let ns = id.namespace();
            namespaces
                .iter()
                .any(|want| ns.is_some_and(|ns| want == "*" || want == ns))
        });
    principal_ok && namespace_ok
}

/// Every value of a rule's `principals` and `namespaces` that could never match as written,
/// its field named after `prefix` (`allow[0].`).
pub(crate) fn check_source(
    prefix: &str,
    principals: &[String],
    namespaces: &[String],
    problems: &mut Vec<FieldProblem>,
) {
    for (j, p) in principals.iter().enumerate() {
        if let Err(message) = check_principal(p) {
            problems.push(FieldProblem {
                field: format!("{prefix}principals[{j}]"),
                message,
            });
        }
    }
    for (j, ns) in namespaces.iter().enumerate() {
        if ns == "*" {
            continue;
        }
        if let Err(e) = validate_dns_label("namespace", ns) {
            problems.push(FieldProblem {
                field: format!("{prefix}namespaces[{j}]"),
                message: format!("{e} (a namespace is exact or \"*\")"),
            });
        }
    }
}

/// `cluster.local/ns/shop/sa/web` for `spiffe://cluster.local/ns/shop/sa/web`: the form
/// Istio policies and operators use.
fn istio_form(s: &str) -> &str {
    s.strip_prefix(SPIFFE_SCHEME).unwrap_or(s)
}

fn principal_matches(pattern: &str, id: &SpiffeId) -> bool {
    let pattern = istio_form(pattern);
    let have = istio_form(id.as_str());
    if pattern == "*" {
        true
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        have.ends_with(suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        have.starts_with(prefix)
    } else {
        have == pattern
    }
}

fn check_principal(p: &str) -> Result<(), String> {
    let bare = istio_form(p);
    if bare.is_empty() {
        return Err("a principal cannot be empty; use \"*\" for any authenticated peer".into());
    }
    let stars = bare.matches('*').count();
    let at_edge = bare == "*" || (stars == 1 && (bare.starts_with('*') || bare.ends_with('*')));
    if stars > 0 && !at_edge {
        return Err(format!(
            "{p:?}: a principal may have one \"*\", at its start or its end (e.g. \"cluster.local/ns/shop/*\")"
        ));
    }
    Ok(())
}

fn describe(peer: Option<&SpiffeId>) -> String {
    match peer {
        Some(id) => format!("principal {}", istio_form(id.as_str())),
        None => "a plaintext peer (no identity)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn rule(principals: &[&str], namespaces: &[&str]) -> Rule {
        Rule {
            principals: principals.iter().map(|s| s.to_string()).collect(),
            namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
        }
    }

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";
    const OPS: &str = "spiffe://cluster.local/ns/ops/sa/admin";
    const NOT_WORKLOAD: &str = "spiffe://cluster.local/agent/vm-1";

    #[test]
    fn decisions() {
        let default = AuthorizationPolicy::default();
        let allow_web = AuthorizationPolicy {
            allow: vec![rule(&["cluster.local/ns/shop/sa/web"], &[])],
            deny: vec![],
            ..Default::default()
        };
        let allow_web_full = AuthorizationPolicy {
            allow: vec![rule(&[WEB], &[])],
            deny: vec![],
            ..Default::default()
        };
        let deny_web_allow_shop = AuthorizationPolicy {
            allow: vec![rule(&[], &["shop"])],
            deny: vec![rule(&["cluster.local/ns/shop/sa/web"], &[])],
            ..Default::default()
        };
        let allow_ns_shop = AuthorizationPolicy {
            allow: vec![rule(&[], &["shop"])],
            deny: vec![],
            ..Default::default()
        };
        let allow_any_ns = AuthorizationPolicy {
            allow: vec![rule(&[], &["*"])],
            deny: vec![],
            ..Default::default()
        };
        let allow_any_principal = AuthorizationPolicy {
            allow: vec![rule(&["*"], &[])],
            deny: vec![],
            ..Default::default()
        };
        let prefix = AuthorizationPolicy {
            allow: vec![rule(&["cluster.local/ns/shop/*"], &[])],
            deny: vec![],
            ..Default::default()
        };
        let prefix_full = AuthorizationPolicy {
            allow: vec![rule(&["spiffe://cluster.local/ns/ops/*"], &[])],
            deny: vec![],
            ..Default::default()
        };
        let suffix = AuthorizationPolicy {
            allow: vec![rule(&["*/sa/cart"], &[])],
            deny: vec![],
            ..Default::default()
        };
        // Both fields of one rule must match; two rules are alternatives.
        let and_within_or_across = AuthorizationPolicy {
            allow: vec![
                rule(&["*/sa/web"], &["ops"]),
                rule(&["cluster.local/ns/ops/sa/admin"], &[]),
            ],
            deny: vec![],
            ..Default::default()
        };
        let empty_allow_rule = AuthorizationPolicy {
            allow: vec![Rule::default()],
            deny: vec![],
            ..Default::default()
        };
        let deny_everything = AuthorizationPolicy {
            allow: vec![Rule::default()],
            deny: vec![Rule::default()],
            ..Default::default()
        };
        let deny_ns_only = AuthorizationPolicy {
            allow: vec![],
            deny: vec![rule(&[], &["ops"])],
            ..Default::default()
        };
        let other_td = AuthorizationPolicy {
            allow: vec![rule(&["other.domain/ns/shop/sa/web"], &[])],
            deny: vec![],
            ..Default::default()
        };

        // (name, policy, peer, Ok or a piece of the denial reason)
        type Case<'a> = (
            &'a str,
            &'a AuthorizationPolicy,
            Option<&'a str>,
            Result<(), &'a str>,
        );
        let cases: Vec<Case> = vec![
            ("default allows a peer", &default, Some(WEB), Ok(())),
            ("default allows plaintext", &default, None, Ok(())),
            ("allow-list: listed", &allow_web, Some(WEB), Ok(())),
            (
                "allow-list: not listed",
                &allow_web,
                Some(CART),
                Err("no allow rule matched principal cluster.local/ns/shop/sa/cart"),
            ),
            (
                "allow-list: spiffe:// form",
                &allow_web_full,
                Some(WEB),
                Ok(()),
            ),
            (
                "allow-list denies plaintext",
                &allow_web,
                None,
                Err("no allow rule matched a plaintext peer (no identity)"),
            ),
            (
                "deny wins over allow",
                &deny_web_allow_shop,
                Some(WEB),
                Err("deny rule 0 matched principal cluster.local/ns/shop/sa/web"),
            ),
            (
                "deny leaves others",
                &deny_web_allow_shop,
                Some(CART),
                Ok(()),
            ),
            (
                "deny, then allow-list",
                &deny_web_allow_shop,
                Some(OPS),
                Err("no allow rule matched principal cluster.local/ns/ops/sa/admin"),
            ),
            ("namespace-only: in", &allow_ns_shop, Some(CART), Ok(())),
            (
                "namespace-only: out",
                &allow_ns_shop,
                Some(OPS),
                Err("no allow rule matched"),
            ),
            (
                "namespace-only: plaintext",
                &allow_ns_shop,
                None,
                Err("plaintext"),
            ),
            (
                "namespace *: any namespace",
                &allow_any_ns,
                Some(OPS),
                Ok(()),
            ),
            (
                "namespace *: not a workload identity",
                &allow_any_ns,
                Some(NOT_WORKLOAD),
                Err("no allow rule matched principal cluster.local/agent/vm-1"),
            ),
            (
                "namespace *: plaintext",
                &allow_any_ns,
                None,
                Err("plaintext"),
            ),
            (
                "principal *: any peer",
                &allow_any_principal,
                Some(NOT_WORKLOAD),
                Ok(()),
            ),
            (
                "principal *: plaintext",
                &allow_any_principal,
                None,
                Err("plaintext"),
            ),
            ("prefix: in", &prefix, Some(CART), Ok(())),
            ("prefix: out", &prefix, Some(OPS), Err("no allow rule")),
            ("prefix spiffe:// form: in", &prefix_full, Some(OPS), Ok(())),
            (
                "prefix spiffe:// form: out",
                &prefix_full,
                Some(WEB),
                Err("no allow rule"),
            ),
            ("suffix: in", &suffix, Some(CART), Ok(())),
            ("suffix: out", &suffix, Some(WEB), Err("no allow rule")),
            (
                "fields AND-ed: namespace misses",
                &and_within_or_across,
                Some(WEB),
                Err("no allow rule"),
            ),
            ("rules OR-ed", &and_within_or_across, Some(OPS), Ok(())),
            (
                "empty allow rule: peer",
                &empty_allow_rule,
                Some(WEB),
                Ok(()),
            ),
            (
                "empty allow rule: plaintext",
                &empty_allow_rule,
                None,
                Ok(()),
            ),
            (
                "empty deny rule: plaintext",
                &deny_everything,
                None,
                Err("deny rule 0 matched a plaintext peer (no identity)"),
            ),
            (
                "empty deny rule: peer",
                &deny_everything,
                Some(WEB),
                Err("deny rule 0"),
            ),
            (
                "deny namespace-only: in",
                &deny_ns_only,
                Some(OPS),
                Err("deny rule 0"),
            ),
            ("deny namespace-only: out", &deny_ns_only, Some(WEB), Ok(())),
            (
                "deny namespace-only: plaintext passes",
                &deny_ns_only,
                None,
                Ok(()),
            ),
            (
                "trust domain is part of the principal",
                &other_td,
                Some(WEB),
                Err("no allow rule"),
            ),
        ];
        for (name, policy, peer, want) in cases {
            let peer = peer.map(id);
            let got = policy.decide(peer.as_ref());
            match (want, &got) {
                (Ok(()), Decision::Allow) => {}
                (Err(needle), Decision::Deny { reason }) if reason.contains(needle) => {}
                _ => panic!("{name}: expected {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn parses_yaml_and_json() {
        let yaml = r#"
deny:
  - principals: ["cluster.local/ns/shop/sa/legacy"]
allow:
  - namespaces: [shop]
  - principals: ["spiffe://cluster.local/ns/ops/sa/*"]
    namespaces: ["*"]
  - {}
"#;
        let p = AuthorizationPolicy::from_yaml(Path::new("p.yaml"), yaml).unwrap();
        assert_eq!(
            p,
            AuthorizationPolicy {
                allow: vec![
                    rule(&[], &["shop"]),
                    rule(&["spiffe://cluster.local/ns/ops/sa/*"], &["*"]),
                    Rule::default(),
                ],
                deny: vec![rule(&["cluster.local/ns/shop/sa/legacy"], &[])],
                ..Default::default()
            }
        );
        let json = r#"{"allow": [{"principals": ["cluster.local/ns/shop/sa/web"]}]}"#;
        let p = AuthorizationPolicy::from_yaml(Path::new("p.json"), json).unwrap();
        assert_eq!(p.allow, vec![rule(&["cluster.local/ns/shop/sa/web"], &[])]);
        assert!(p.deny.is_empty());
        for empty in ["", "# nothing yet\n", "{}"] {
            assert_eq!(
                AuthorizationPolicy::from_yaml(Path::new("p.yaml"), empty).unwrap(),
                AuthorizationPolicy::default(),
                "{empty:?}"
            );
        }
    }

    #[test]
    fn bad_policies_name_the_file_and_field() {
        let cases = [
            (
                "allow:\n  - principal: [x]\n",
                "policy.yaml: allow[0].principal: ",
                "unknown field",
            ),
            (
                "allow:\n  - principals: x\n",
                "policy.yaml: allow[0].principals",
                "sequence",
            ),
            ("alow: []\n", "policy.yaml: alow: ", "unknown field"),
            (
                "deny:\n  - {}\n  - principals: [a, \"cluster.local/*/sa/web\"]\n",
                "policy.yaml: deny[1].principals[1]",
                "one \"*\"",
            ),
            (
                "allow:\n  - namespaces: [\"shop*\"]\n",
                "policy.yaml: allow[0].namespaces[0]",
                "exact or \"*\"",
            ),
            (
                "allow:\n  - principals: [\"\"]\n",
                "policy.yaml: allow[0].principals[0]",
                "cannot be empty",
            ),
            ("allow: [\n", "policy.yaml: ", "line"),
            ("- a\n- b\n", "policy.yaml: ", "sequence"),
        ];
        for (text, prefix, needle) in cases {
            let err = AuthorizationPolicy::from_yaml(Path::new("policy.yaml"), text)
                .expect_err(text)
                .to_string();
            assert!(
                err.starts_with(prefix) && err.contains(needle),
                "{text:?}: {err}"
            );
        }
        // Every problem is reported, not just the first.
        let err = AuthorizationPolicy::from_yaml(
            Path::new("policy.yaml"),
            "allow:\n  - principals: [\"a*b\"]\n    namespaces: [Shop]\n",
        )
        .unwrap_err();
        let PolicyError::Invalid { problems, .. } = err else {
            panic!("{err}")
        };
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["allow[0].principals[0]", "allow[0].namespaces[0]"]);
    }

    #[test]
    fn policy_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authz.yaml");
        std::fs::write(&path, "allow:\n  - namespaces: [shop]\n").unwrap();
        let p = AuthorizationPolicy::from_yaml_file(&path).unwrap();
        assert!(p.decide(Some(&id(WEB))).is_allow());
        assert!(!p.decide(Some(&id(OPS))).is_allow());
        std::fs::write(&path, "allow:\n  - namespace: [shop]\n").unwrap();
        let err = AuthorizationPolicy::from_yaml_file(&path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("authz.yaml: allow[0].namespace: "), "{err}");
        let missing = dir.path().join("missing.yaml");
        let err = AuthorizationPolicy::from_yaml_file(&missing)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.yaml"), "{err}");
    }
}
