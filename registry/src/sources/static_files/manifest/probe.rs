//! A WorkloadGroup's `probe` (Istio's `ReadinessProbe`): read, checked as Istio checks it (its
//! validation webhook and the CRD schema together), and filled with the timing defaults, so the
//! catalog carries a probe the agent runs as written.
//!
//! What Istio accepts is accepted, with two kinds of exception, each named where it is made: a
//! probe Istio would accept but that can never pass (a `grpc` check without a port, a header
//! value no HTTP request can carry, a host that is neither an IP address nor a DNS name) is
//! refused, because an agent running it would hold its VM unready forever; and `grpc`, which
//! Istio's CRD and agent support but its webhook refuses, is accepted.
//!
//! Timing follows Kubernetes where a field is absent and Istio's agent where it is 0 (Istio's
//! API is proto3, so 0 and absent are one there, and its agent reads both as below):
//!
//! | field                 | absent | 0  |
//! |-----------------------|--------|----|
//! | `initialDelaySeconds` | 0      | 0  |
//! | `periodSeconds`       | 10     | 10 |
//! | `timeoutSeconds`      | 1      | 1  |
//! | `successThreshold`    | 1      | 1  |
//! | `failureThreshold`    | 3      | 1  |

use std::net::IpAddr;

use isthmus_proto::model::{HttpHeader, HttpScheme, Probe, ProbeAction};
use serde::Deserialize;

use super::metadata::nullable;
use super::problems::{required_port, Problems};
use crate::validate::check_hostname;

/// One timing field: what it is when absent (Kubernetes) and when 0 (Istio's agent).
struct Timing {
    key: &'static str,
    absent: u32,
    zero: u32,
}

const INITIAL_DELAY: Timing = Timing {
    key: "initialDelaySeconds",
    absent: 0,
    zero: 0,
};
const PERIOD: Timing = Timing {
    key: "periodSeconds",
    absent: 10,
    zero: 10,
};
const TIMEOUT: Timing = Timing {
    key: "timeoutSeconds",
    absent: 1,
    zero: 1,
};
const SUCCESS_THRESHOLD: Timing = Timing {
    key: "successThreshold",
    absent: 1,
    zero: 1,
};
/// Kubernetes' default is 3; Istio's agent raises an unset (0) threshold to its minimum, 1.
const FAILURE_THRESHOLD: Timing = Timing {
    key: "failureThreshold",
    absent: 3,
    zero: 1,
};
const DEFAULT_PATH: &str = "/";
/// Istio's probe header name rule (its webhook's, stricter than its CRD's, which also allows
/// `_`): letters, digits and `-`.
fn is_probe_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct ProbeSpec {
    // Signed, so that a negative value is reported as such rather than as a type error.
    initial_delay_seconds: Option<i64>,
    period_seconds: Option<i64>,
    timeout_seconds: Option<i64>,
    success_threshold: Option<i64>,
    failure_threshold: Option<i64>,
    http_get: Option<HttpGetSpec>,
    tcp_socket: Option<TcpSocketSpec>,
    exec: Option<ExecSpec>,
    grpc: Option<GrpcSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct HttpGetSpec {
    path: Option<String>,
    port: Option<u32>,
    host: Option<String>,
    scheme: Option<String>,
    #[serde(deserialize_with = "nullable")]
    http_headers: Vec<HttpHeaderSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct HttpHeaderSpec {
    name: Option<String>,
    value: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct TcpSocketSpec {
    host: Option<String>,
    port: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct ExecSpec {
    command: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct GrpcSpec {
    port: Option<u32>,
    service: Option<String>,
}

/// The probe at `spec.probe`, or `None` with every problem recorded.
pub(super) fn readiness_probe(spec: ProbeSpec, p: &mut Problems) -> Option<Probe> {
    let initial_delay_seconds = timing(p, &INITIAL_DELAY, spec.initial_delay_seconds);
    let period_seconds = timing(p, &PERIOD, spec.period_seconds);
    let timeout_seconds = timing(p, &TIMEOUT, spec.timeout_seconds);
    let success_threshold = timing(p, &SUCCESS_THRESHOLD, spec.success_threshold);
    let failure_threshold = timing(p, &FAILURE_THRESHOLD, spec.failure_threshold);
    let named: Vec<&str> = [
        ("httpGet", spec.http_get.is_some()),
        ("tcpSocket", spec.tcp_socket.is_some()),
        ("exec", spec.exec.is_some()),
        ("grpc", spec.grpc.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, present)| present.then_some(name))
    .collect();
    if named.len() != 1 {
        let found = if named.is_empty() {
            "none is given".to_string()
        } else {
            format!("{} are given", named.join(" and "))
        };
        p.add(
            "spec.probe",
            format!("needs exactly one of httpGet, tcpSocket, exec or grpc; {found}"),
        );
        return None;
    }
    let action = if let Some(h) = spec.http_get {
        http_get(h, p)
    } else if let Some(t) = spec.tcp_socket {
        tcp_socket(t, p)
    } else if let Some(e) = spec.exec {
        exec(e, p)
    } else {
        grpc(spec.grpc?, p)
    }?;
    Some(Probe {
        initial_delay_seconds: initial_delay_seconds?,
        period_seconds: period_seconds?,
        timeout_seconds: timeout_seconds?,
        success_threshold: success_threshold?,
        failure_threshold: failure_threshold?,
        action,
    })
}

/// A timing field's value: Istio's schema allows 0 up to the largest int32.
fn timing(p: &mut Problems, t: &Timing, value: Option<i64>) -> Option<u32> {
    let field = format!("spec.probe.{}", t.key);
    match value {
        None => Some(t.absent),
        Some(0) => Some(t.zero),
        Some(v) if v < 0 => {
            p.add(field, format!("{v} is negative; it must be 0 or more"));
            None
        }
        Some(v) => match u32::try_from(v) {
            Ok(v) if i32::try_from(v).is_ok() => Some(v),
            _ => {
                p.add(field, format!("{v} is more than {} (int32)", i32::MAX));
                None
            }
        },
    }
}

fn http_get(h: HttpGetSpec, p: &mut Problems) -> Option<ProbeAction> {
    let port = required_port(p, "spec.probe.httpGet.port", h.port);
    // Any path is accepted, as Istio does; the agent encodes what a request line cannot
    // carry as it is, as the kubelet does.
    let path = h
        .path
        .filter(|path| !path.is_empty())
        .unwrap_or_else(|| DEFAULT_PATH.into());
    let scheme_text = h.scheme.unwrap_or_default();
    let scheme = HttpScheme::parse(&scheme_text);
    if scheme.is_none() {
        p.add(
            "spec.probe.httpGet.scheme",
            format!(
                "{scheme_text:?} is not a scheme; use HTTP or HTTPS (upper case), or leave it out"
            ),
        );
    }
    let host = h.host.unwrap_or_default();
    let host_ok = check_probe_host(p, "spec.probe.httpGet.host", &host);
    let mut headers = Vec::with_capacity(h.http_headers.len());
    let mut headers_ok = true;
    for (i, header) in h.http_headers.into_iter().enumerate() {
        let name = header.name.unwrap_or_default();
        let value = header.value.unwrap_or_default();
        if !is_probe_header_name(&name) {
            headers_ok = false;
            p.add(
                format!("spec.probe.httpGet.httpHeaders[{i}].name"),
                format!("{name:?} is not a header name: use letters, digits and '-'"),
            );
        }
        // Istio takes any value, but one with a control character can never be sent: the
        // request would fail on every try.
        if value.chars().any(|c| c.is_control() && c != '\t') {
            headers_ok = false;
            p.add(
                format!("spec.probe.httpGet.httpHeaders[{i}].value"),
                format!("{value:?} has a control character, which no HTTP request can carry"),
            );
        }
        headers.push(HttpHeader { name, value });
    }
    (host_ok && headers_ok).then_some(())?;
    Some(ProbeAction::HttpGet {
        path,
        port: port?,
        host,
        scheme: scheme?,
        headers,
    })
}

fn tcp_socket(t: TcpSocketSpec, p: &mut Problems) -> Option<ProbeAction> {
    let port = required_port(p, "spec.probe.tcpSocket.port", t.port);
    let host = t.host.unwrap_or_default();
    let host_ok = check_probe_host(p, "spec.probe.tcpSocket.host", &host);
    host_ok.then_some(())?;
    Some(ProbeAction::TcpSocket { host, port: port? })
}

fn exec(e: ExecSpec, p: &mut Problems) -> Option<ProbeAction> {
    let command = e.command.unwrap_or_default();
    if command.is_empty() {
        p.add(
            "spec.probe.exec.command",
            "is required: the program to run and its arguments",
        );
        return None;
    }
    let mut ok = true;
    for (i, arg) in command.iter().enumerate() {
        // Istio's schema: every item at least one character long.
        if arg.is_empty() {
            ok = false;
            p.add(
                format!("spec.probe.exec.command[{i}]"),
                "is empty; every item needs at least one character",
            );
        }
    }
    ok.then_some(ProbeAction::Exec { command })
}

fn grpc(g: GrpcSpec, p: &mut Problems) -> Option<ProbeAction> {
    // Istio's schema leaves the port optional, but a check of port 0 can never pass.
    let port = required_port(p, "spec.probe.grpc.port", g.port)?;
    Some(ProbeAction::Grpc {
        port,
        service: g.service.unwrap_or_default(),
    })
}

/// A probe's `host`: empty (the app's own host), an IP address or a DNS name (any case, an
/// absolute name's final dot allowed). Istio takes any text, but the agent could reach no
/// other. Returns whether it passed.
fn check_probe_host(p: &mut Problems, field: &str, host: &str) -> bool {
    if host.is_empty() || host.parse::<IpAddr>().is_ok() {
        return true;
    }
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    match check_hostname(&name, false) {
        Ok(()) => true,
        Err(_) => {
            p.add(
                field,
                format!(
                    "{host:?} is neither an IP address nor a DNS name, so it can never be reached"
                ),
            );
            false
        }
    }
}
