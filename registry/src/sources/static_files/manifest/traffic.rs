//! What the traffic kinds (`DestinationRule`, `VirtualService`) share: their hosts, with
//! short names resolved as Istio resolves them, and the fields isthmus accepts (so a manifest
//! ported from Istio loads) but does not honour yet.

use std::net::IpAddr;

use serde_yaml_ng::{Mapping, Value};

use super::problems::Problems;
use crate::validate::istio_host;

/// The warning for a field Istio accepts and isthmus does not act on: refusing it would
/// refuse most real manifests, and loading it silently would let the operator believe it
/// applies.
pub(super) const NOT_HONOURED: &str = "not honoured by isthmus yet (ignored)";

/// Where a host is resolved: the rule's namespace and the clusters' DNS domain.
#[derive(Debug, Clone, Copy)]
pub(super) struct HostContext<'a> {
    pub(super) namespace: &'a str,
    pub(super) domain: &'a str,
}

impl HostContext<'_> {
    /// `host` fully qualified, as Istio resolves a rule's short name against the rule's own
    /// namespace: `reviews` is `reviews.<ns>.svc.<domain>`, `reviews.other` (a name and a
    /// namespace) is `reviews.other.svc.<domain>`, and a name with more dots, or ending in a
    /// dot (`example.com.`), is taken as written. Lower-cased, without the trailing dot.
    fn qualify(&self, host: &str) -> String {
        let absolute = host.ends_with('.');
        let name = host.trim_end_matches('.').to_ascii_lowercase();
        match name.matches('.').count() {
            _ if absolute => name,
            0 => format!("{name}.{}.svc.{}", self.namespace, self.domain),
            1 => format!("{name}.svc.{}", self.domain),
            _ => name,
        }
    }
}

/// A host of a traffic rule, fully qualified (see [`HostContext::qualify`]), or `None` with
/// its problem recorded at `field`. Wildcards are refused: isthmus keys a rule by the one
/// hostname it applies to, and does not yet spread a rule over the hosts a wildcard covers.
pub(super) fn resolve_host(
    field: &str,
    host: Option<&str>,
    at: HostContext<'_>,
    p: &mut Problems,
) -> Option<String> {
    let host = match host {
        None | Some("") => {
            p.add(field, "is required");
            return None;
        }
        Some(host) => host,
    };
    if host.contains('*') {
        p.add(
            field,
            format!("{host:?}: wildcard hosts are not supported by isthmus yet; name each host"),
        );
        return None;
    }
    if host.parse::<IpAddr>().is_ok() {
        p.add(
            field,
            format!("{host:?} is an IP address; isthmus routes by hostname, so name the service"),
        );
        return None;
    }
    match istio_host(host) {
        Ok(_) => Some(at.qualify(host)),
        Err(e) => {
            p.add(field, e);
            None
        }
    }
}

/// The hosts of a rule (`spec.hosts`), fully qualified, each once: a host listed twice, or
/// written both short and long, is warned about and taken once.
pub(super) fn resolve_hosts(
    field: &str,
    hosts: &[String],
    at: HostContext<'_>,
    p: &mut Problems,
) -> Vec<String> {
    if hosts.is_empty() {
        p.add(field, "at least one host is required");
    }
    let mut resolved: Vec<String> = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        let field = format!("{field}[{i}]");
        let Some(name) = resolve_host(&field, Some(host), at, p) else {
            continue;
        };
        if resolved.contains(&name) {
            p.warn(
                field,
                format!("{host:?} is {name}, which is listed already; it is taken once"),
            );
            continue;
        }
        resolved.push(name);
    }
    resolved
}

/// Warns, one field at a time, about every field of `section` (a policy isthmus accepts
/// but does not apply), so the operator sees exactly what has no effect.
pub(super) fn warn_not_honoured(p: &mut Problems, field: &str, section: &Mapping) {
    for key in section.keys() {
        p.warn(format!("{field}.{}", key_name(key)), NOT_HONOURED);
    }
}

/// A mapping key as a field name; YAML allows keys that are not strings.
fn key_name(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => "?".into(),
    }
}
