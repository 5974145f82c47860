//! What the traffic kinds (`DestinationRule`, `VirtualService`) share: their hosts, with
//! short names resolved as Istio resolves them, durations as Istio writes them, and the fields
//! isthmus accepts (so a manifest ported from Istio loads) but does not honour yet.

use std::net::IpAddr;

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

const NANOS_PER_MS: u128 = 1_000_000;

/// The longest duration protobuf represents (10,000 years), in nanoseconds.
const MAX_DURATION_NANOS: u128 = 315_576_000_000 * 1_000_000_000;

/// A duration as Istio's manifests write them, in nanoseconds: protobuf's JSON form (a
/// decimal number of seconds and `s`: `1s`, `1.5s`) and the Kubernetes (Go) form Istio's
/// schema also takes, one or more decimal numbers each with its unit (`ns`, `us`, `µs`, `ms`,
/// `s`, `m`, `h`: `250ms`, `2m`, `1h30m`). `0` needs no unit. On error, why, for the
/// operator (the caller names the field).
pub(super) fn parse_duration(text: &str) -> Result<u128, String> {
    let invalid = || {
        format!("{text:?} is not a duration; write a number and a unit, as 250ms, 1.5s, 2m or 1h")
    };
    if text == "0" {
        return Ok(0);
    }
    if text.starts_with('-') {
        return Err(format!("{text:?} is negative; a duration is at least 0"));
    }
    if text.is_empty() {
        return Err(invalid());
    }
    let mut rest = text;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let whole_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (whole, after) = rest.split_at(whole_len);
        let (fraction, after) = match after.strip_prefix('.') {
            Some(after) => after.split_at(after.bytes().take_while(u8::is_ascii_digit).count()),
            None => ("", after),
        };
        if whole.is_empty() && fraction.is_empty() {
            return Err(invalid());
        }
        let unit_len = after
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(after.len(), |(i, _)| i);
        let (unit, after) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            _ => return Err(invalid()),
        };
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| invalid())?
        };
        // Digits past the 18th change the value by less than a nanosecond.
        let fraction = &fraction[..fraction.len().min(18)];
        let fraction_nanos = if fraction.is_empty() {
            0
        } else {
            let digits: u128 = fraction.parse().map_err(|_| invalid())?;
            digits * unit_nanos / 10u128.pow(fraction.len() as u32)
        };
        total = whole
            .checked_mul(unit_nanos)
            .and_then(|n| n.checked_add(fraction_nanos))
            .and_then(|n| n.checked_add(total))
            .filter(|n| *n <= MAX_DURATION_NANOS)
            .ok_or_else(|| format!("{text:?} is longer than a duration can be (10000 years)"))?;
        rest = after;
    }
    Ok(total)
}

/// A duration field Istio applies to whole milliseconds and refuses below 1ms (its
/// `connectTimeout`, `baseEjectionTime`), in milliseconds; or `None` with its problem
/// recorded at `field`.
pub(super) fn duration_ms(p: &mut Problems, field: &str, text: &str) -> Option<u64> {
    let nanos = match parse_duration(text) {
        Ok(nanos) => nanos,
        Err(why) => {
            p.add(field, why);
            return None;
        }
    };
    if nanos < NANOS_PER_MS {
        p.add(
            field,
            format!("{text:?} is shorter than 1ms, the least Istio accepts"),
        );
        return None;
    }
    if nanos % NANOS_PER_MS != 0 {
        p.add(
            field,
            format!("{text:?} is not a whole number of milliseconds, the precision Istio takes"),
        );
        return None;
    }
    // At most MAX_DURATION_NANOS, so it fits.
    Some(u64::try_from(nanos / NANOS_PER_MS).unwrap_or(u64::MAX))
}
