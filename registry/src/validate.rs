//! The value checks every way into the catalog shares: names (DNS labels and names, host
//! names, network ids), Kubernetes label keys and values, localities, ports, IPs and CIDRs.
//! The static files check their manifests with them and the VM registrations check what an
//! agent brings, so a value one path accepts the other does too. Each check returns the
//! message an operator reads, naming the value and what is wrong with it.

use std::net::IpAddr;

use isthmus_proto::identity::validate_dns_label;
use isthmus_proto::model::{label_name_chars, Locality};

/// A value that failed its check; the message names the value and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(String);

impl Invalid {
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl From<Invalid> for String {
    fn from(invalid: Invalid) -> Self {
        invalid.0
    }
}

/// A port number, 1-65535.
pub fn port(v: u32) -> Result<u16, Invalid> {
    match u16::try_from(v) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(Invalid(format!("{v} is not a valid port (1-65535)"))),
    }
}

/// A DNS-1123 label (namespaces, service accounts, port names); `what` names the value.
pub fn dns_label(what: &'static str, value: &str) -> Result<(), Invalid> {
    validate_dns_label(what, value).map_err(|e| Invalid(e.to_string()))
}

/// Network ids travel as label values (`topology.istio.io/network`) and as object names, so
/// they must be valid as both: a DNS-1123 label.
pub fn check_network_id(id: &str) -> Result<(), Invalid> {
    dns_label("network", id)
}

/// A DNS name (RFC 1123, lower case), optionally with `*` as the whole first label.
pub fn check_dns_name(what: &str, name: &str, wildcard_ok: bool) -> Result<(), Invalid> {
    let bad = |why: &str| {
        Err(Invalid(format!(
            "{what} {name:?} is not a valid DNS name: {why}"
        )))
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 253 {
        return bad("it is longer than 253 characters");
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        let lower = name.to_ascii_lowercase();
        if check_dns_name(what, &lower, wildcard_ok).is_ok() {
            return Err(Invalid(format!(
                "{what} {name:?} has upper-case letters; names are lower case (did you mean {lower:?}?)"
            )));
        }
    }
    let rest = match name.strip_prefix("*.") {
        Some(rest) if wildcard_ok => rest,
        Some(_) => return bad("a wildcard is not allowed here"),
        None => name,
    };
    if rest.contains('*') {
        return bad("a wildcard is allowed only as the whole first label, as in \"*.example.com\"");
    }
    for label in rest.split('.') {
        if label.is_empty() {
            return bad("it has an empty label (two dots in a row, or a dot at either end)");
        }
        // Each label follows the same rule as a namespace name.
        validate_dns_label("label", label)
            .map_err(|e| Invalid(format!("{what} {name:?} is not a valid DNS name: {e}")))?;
    }
    Ok(())
}

/// A name to resolve: a DNS name whose last label is not all digits, so that a mistyped IP
/// address (`10.0.0.300`) is not taken for a hostname.
pub fn check_hostname(name: &str, wildcard_ok: bool) -> Result<(), Invalid> {
    check_dns_name("host", name, wildcard_ok)?;
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(Invalid(format!(
            "host {name:?} is not a valid DNS name or IP address (its last label is all digits)"
        )));
    }
    Ok(())
}

/// Kubernetes label syntax: `[prefix/]name`, prefix a DNS subdomain, name 1-63 characters.
pub fn check_label_key(key: &str) -> Result<(), Invalid> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() || check_dns_name("prefix", prefix, false).is_err() {
            return Err(Invalid(format!(
                "label key {key:?} is not valid: the prefix before '/' must be a lower-case DNS name"
            )));
        }
    }
    if name.is_empty() {
        return Err(Invalid(format!(
            "label key {key:?} is not valid: the name is empty"
        )));
    }
    label_name_chars(name).map_err(|why| Invalid(format!("label key {key:?} is not valid: {why}")))
}

pub fn check_label_value(key: &str, value: &str) -> Result<(), Invalid> {
    if value.is_empty() {
        return Ok(());
    }
    label_name_chars(value).map_err(|why| {
        Invalid(format!(
            "label {key:?} has the value {value:?}, which is not valid: {why}"
        ))
    })
}

/// A locality, `region/zone/subzone` (see [`Locality::check`]).
pub fn check_locality(l: &str) -> Result<(), Invalid> {
    Locality::check(l).map_err(Invalid)
}

pub fn parse_ip_or_cidr(s: &str) -> Result<String, Invalid> {
    if s.contains('/') {
        parse_cidr(s)
    } else {
        s.parse::<IpAddr>()
            .map(|ip| ip.to_string())
            .map_err(|_| Invalid(format!("{s:?} is not an IP address or CIDR")))
    }
}

/// A CIDR in canonical form. Host bits must be zero: `10.1.2.3/8` is nearly always a typo for
/// either an address or `10.0.0.0/8`, and guessing which would route the wrong traffic.
pub fn parse_cidr(s: &str) -> Result<String, Invalid> {
    let (ip, len) = split_cidr(s)?;
    if masked(ip, len) != ip {
        return Err(Invalid(format!(
            "{s:?} is not a CIDR: the address has bits set beyond the /{len} prefix"
        )));
    }
    Ok(format!("{ip}/{len}"))
}

/// The address and prefix length of `address/prefix-length`, each checked.
fn split_cidr(s: &str) -> Result<(IpAddr, u32), Invalid> {
    let bad = |why: String| Err(Invalid(format!("{s:?} is not a CIDR: {why}")));
    let Some((addr, len)) = s.split_once('/') else {
        return bad("expected address/prefix-length, as in 10.0.0.0/16".into());
    };
    let Ok(ip) = addr.parse::<IpAddr>() else {
        return bad(format!("{addr:?} is not an IP address"));
    };
    let max: u32 = if ip.is_ipv4() { 32 } else { 128 };
    match len.parse::<u32>() {
        Ok(n) if n <= max && !len.starts_with('+') => Ok((ip, n)),
        _ => bad(format!("the prefix length must be 0-{max}")),
    }
}

/// `ip` with the bits beyond the `/len` prefix cleared.
fn masked(ip: IpAddr, len: u32) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            IpAddr::from(std::net::Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            IpAddr::from(std::net::Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

// ---- Istio's forms, for manifests --------------------------------------------------------
//
// A manifest ported from Istio must be read as Istio's validation reads it, which is in some
// places looser than the checks above (upper case in host and port names, host bits in a
// CIDR). These are used by the manifest reader only; what an agent brings at registration
// keeps the stricter checks.

/// One label of a host as Istio accepts it: letters (either case), digits and '-', 1-63
/// characters, starting and ending with a letter or digit.
fn istio_label(label: &str) -> bool {
    let b = label.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// A ServiceEntry host, checked as Istio checks one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IstioHost {
    /// Lower case and without a trailing dot: names are compared case-insensitively, as DNS
    /// compares them.
    pub name: String,
    /// A wildcard that is not the whole first label (`*foo.example.com`): Istio warns about
    /// it and loads it.
    pub partial_wildcard: bool,
}

/// A host as Istio's ServiceEntry validation accepts it: not `*` alone, at most 255
/// characters, a first label that may be or start with `*`, the other labels DNS labels
/// (either case), an optional trailing dot, and a last label that is not all digits.
pub fn istio_host(host: &str) -> Result<IstioHost, Invalid> {
    let bad = |why: &str| Err(Invalid(format!("host {host:?} is not valid: {why}")));
    if host == "*" {
        return bad("a ServiceEntry cannot be for every host (\"*\")");
    }
    if host.is_empty() {
        return bad("it is empty");
    }
    if host.len() > 255 {
        return bad("it is longer than 255 characters");
    }
    let trimmed = host.strip_suffix('.').unwrap_or(host);
    let (first, rest) = match trimmed.split_once('.') {
        Some((first, rest)) => (first, Some(rest)),
        None => (trimmed, None),
    };
    let first_ok = first == "*"
        || istio_label(first)
        || first
            .strip_prefix("*-")
            .or_else(|| first.strip_prefix('*'))
            .is_some_and(istio_label);
    if !first_ok {
        return bad(&format!(
            "its first label {first:?} is not a DNS label or a wildcard (\"*\", \"*name\")"
        ));
    }
    if let Some(rest) = rest {
        for label in rest.split('.') {
            if !istio_label(label) {
                return bad(&format!(
                    "{label:?} is not a DNS label (letters, digits and '-', 1-63 characters)"
                ));
            }
        }
    }
    let last = trimmed.rsplit('.').next().unwrap_or(trimmed);
    if rest.is_some() && last.bytes().all(|b| b.is_ascii_digit()) {
        return bad("its last label is all digits (an IP address goes in addresses)");
    }
    Ok(IstioHost {
        name: trimmed.to_ascii_lowercase(),
        partial_wildcard: first.contains('*') && first != "*",
    })
}

/// A port name as Istio accepts one: a DNS label in either case.
pub fn istio_port_name(name: &str) -> Result<(), Invalid> {
    if istio_label(name) {
        Ok(())
    } else {
        Err(Invalid(format!(
            "port name {name:?} is not valid: use letters, digits and '-', 1-63 characters, \
             starting and ending with a letter or digit"
        )))
    }
}

/// The protocols Istio accepts on a port, by the name it gives each (compared
/// case-insensitively, as Istio does).
pub const ISTIO_PROTOCOLS: &[&str] = &[
    "HTTP",
    "HTTPS",
    "HTTP2",
    "HTTP_PROXY",
    "GRPC",
    "GRPC-Web",
    "TCP",
    "TLS",
    "UDP",
    "Mongo",
    "Redis",
    "MySQL",
];

/// A port protocol in Istio's spelling, or the list it must be one of.
pub fn istio_protocol(protocol: &str) -> Result<&'static str, Invalid> {
    ISTIO_PROTOCOLS
        .iter()
        .find(|p| p.eq_ignore_ascii_case(protocol))
        .copied()
        .ok_or_else(|| {
            Invalid(format!(
                "{protocol:?} is not a protocol; use one of {}",
                ISTIO_PROTOCOLS.join(", ")
            ))
        })
}

/// An address of a ServiceEntry as Istio reads one: an IP, or a CIDR whose host bits may be
/// set (Istio's prefix parsing keeps only the prefix); returned canonical and masked
/// (`10.1.2.3/8` is `10.0.0.0/8`).
pub fn istio_subnet(s: &str) -> Result<String, Invalid> {
    if !s.contains('/') {
        return parse_ip_or_cidr(s);
    }
    let (ip, len) = split_cidr(s)?;
    Ok(format!("{}/{len}", masked(ip, len)))
}

/// Istio's UNIX domain socket endpoint: `unix://` and an absolute path to a file, or an
/// abstract socket (`unix://@name`). Returns the path.
pub fn istio_unix_address(address: &str) -> Option<Result<&str, Invalid>> {
    let path = address.strip_prefix("unix://")?;
    if path.starts_with('@') && path.len() > 1 {
        return Some(Ok(path));
    }
    if !path.starts_with('/') || path.ends_with('/') {
        return Some(Err(Invalid(format!(
            "{address:?} is not a UNIX socket address: after unix:// comes an absolute path \
             to a socket file or @ and an abstract socket name"
        ))));
    }
    Some(Ok(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys_follow_kubernetes_rules() {
        for key in [
            "app",
            "example.com/app",
            "a.b-c_d",
            "topology.istio.io/network",
        ] {
            check_label_key(key).unwrap_or_else(|e| panic!("{key}: {e}"));
        }
        for key in [
            "",
            "-app",
            "app-",
            "Example.com/app",
            "/app",
            "example.com/",
            "a b",
            &"x".repeat(64),
        ] {
            let err = check_label_key(key).expect_err(key).to_string();
            assert!(err.contains(&format!("{key:?}")), "{err}");
        }
        assert!(check_label_value("app", "").is_ok());
        assert!(check_label_value("app", "v1.2_x").is_ok());
        assert!(check_label_value("app", "v1 ").is_err());
    }
}
