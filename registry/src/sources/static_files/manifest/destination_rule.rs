//! `DestinationRule`: the subsets of one host, which a VirtualService's routes name, and the
//! traffic policies (the rule's, each subset's, and within either each port's) as far as they
//! apply to the L4 connections isthmus carries.
//!
//! Honoured, in `trafficPolicy` and in each of its `portLevelSettings`:
//! - `loadBalancer.simple`: `ROUND_ROBIN`, `LEAST_REQUEST` and `LEAST_CONN` (both the fewest
//!   open connections), `RANDOM`; `UNSPECIFIED` leaves the proxy's own choice;
//! - `connectionPool.tcp.maxConnections`, `connectTimeout` and `tcpKeepalive`;
//! - `outlierDetection.consecutiveGatewayErrors` and `consecutive5xxErrors` (the smaller when
//!   both are set: a failed connect is both), `baseEjectionTime` and `maxEjectionPercent`;
//! - `loadBalancer.localityLbSetting`: `enabled`, `failover` (region to region),
//!   `failoverPriority` of the locality labels (`topology.kubernetes.io/region`,
//!   `topology.kubernetes.io/zone`, `topology.istio.io/subzone`), `distribute`.
//!
//! Accepted, so that a manifest ported from Istio loads, and warned about as not honoured, one
//! warning a field: `loadBalancer.simple: PASSTHROUGH`; `loadBalancer.consistentHash`,
//! a `failoverPriority` naming any other label (the whole list is then not applied),
//! `zoneAwareLbSetting`, `warmupDurationSecs` and `warmup`;
//! `connectionPool.tcp.maxConnectionDuration` and `idleTimeout`;
//! `connectionPool.http`; `outlierDetection.interval`, `consecutiveLocalOriginFailures`,
//! `splitExternalLocalOriginErrors`, `minHealthPercent`, `consecutiveErrors` and
//! `outlierDetectionHttpErrorCodes`; a policy's (or a port's) `tls`, and a policy's `tunnel`,
//! `proxyProtocol` and `retryBudget`; the rule's `workloadSelector` (the rule applies to every
//! caller). Warned sections are checked for their type only, warned durations also for being
//! durations. A field Istio does not have is an error, as Istio refuses it, and so is a value
//! Istio refuses.

use std::collections::BTreeMap;

use isthmus_proto::model::{
    DestinationRule, LoadBalancer, OutlierPolicy, Resource, Subset, TrafficPolicy,
};
use isthmus_proto::traffic::{LocalityLb, LocalityLevel, TcpKeepalive};
use serde::Deserialize;
use serde_yaml_ng::Mapping;

use super::defaults::SourceDefaults;
use super::metadata::{nullable, Meta};
use super::problems::{check_labels, required_port, Problems};
use super::service_entry::export_to;
use super::traffic::{duration_ms, parse_duration, resolve_host, HostContext, NOT_HONOURED};
use crate::validate::dns_label;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct DestinationRuleSpec {
    host: Option<String>,
    #[serde(deserialize_with = "nullable")]
    subsets: Vec<SubsetSpec>,
    /// Boxed: it is most of the spec's size, and specs of every kind share an enum.
    traffic_policy: Option<Box<TrafficPolicySpec>>,
    /// Which callers the rule applies to; not honoured, so the rule applies to every caller.
    workload_selector: Option<Mapping>,
    #[serde(deserialize_with = "nullable")]
    export_to: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct SubsetSpec {
    name: Option<String>,
    #[serde(deserialize_with = "nullable")]
    labels: BTreeMap<String, String>,
    traffic_policy: Option<TrafficPolicySpec>,
}

/// Istio's TrafficPolicy. What isthmus does not honour is read loosely (a `Mapping` checked
/// only for being one) and warned about as a whole.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct TrafficPolicySpec {
    load_balancer: Option<LoadBalancerSpec>,
    connection_pool: Option<ConnectionPoolSpec>,
    outlier_detection: Option<OutlierDetectionSpec>,
    tls: Option<Mapping>,
    #[serde(deserialize_with = "nullable")]
    port_level_settings: Vec<PortTrafficPolicySpec>,
    tunnel: Option<Mapping>,
    proxy_protocol: Option<Mapping>,
    retry_budget: Option<Mapping>,
}

/// One entry of `portLevelSettings`: the settings for connections to one service port.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct PortTrafficPolicySpec {
    port: Option<PortSelectorSpec>,
    load_balancer: Option<LoadBalancerSpec>,
    connection_pool: Option<ConnectionPoolSpec>,
    outlier_detection: Option<OutlierDetectionSpec>,
    tls: Option<Mapping>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct PortSelectorSpec {
    number: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct LoadBalancerSpec {
    simple: Option<String>,
    consistent_hash: Option<Mapping>,
    locality_lb_setting: Option<LocalityLbSpec>,
    zone_aware_lb_setting: Option<Mapping>,
    warmup_duration_secs: Option<String>,
    warmup: Option<Mapping>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct LocalityLbSpec {
    enabled: Option<bool>,
    distribute: Vec<DistributeSpec>,
    failover: Vec<FailoverSpec>,
    failover_priority: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct DistributeSpec {
    from: Option<String>,
    to: BTreeMap<String, u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FailoverSpec {
    from: Option<String>,
    to: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct ConnectionPoolSpec {
    tcp: Option<TcpSettingsSpec>,
    /// isthmus carries TCP: no HTTP setting applies.
    http: Option<Mapping>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct TcpSettingsSpec {
    /// Wider than Istio's int32, so that 0, a negative and a too large number each get an
    /// error that says what is accepted.
    max_connections: Option<i64>,
    connect_timeout: Option<String>,
    tcp_keepalive: Option<TcpKeepaliveSpec>,
    max_connection_duration: Option<String>,
    idle_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct TcpKeepaliveSpec {
    /// Wider than Istio's uint32, so that a negative gets an error saying what is accepted.
    probes: Option<i64>,
    time: Option<String>,
    interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct OutlierDetectionSpec {
    consecutive_gateway_errors: Option<u32>,
    #[serde(rename = "consecutive5xxErrors")]
    consecutive_5xx_errors: Option<u32>,
    base_ejection_time: Option<String>,
    /// Wider than Istio's int32, like `maxConnections`.
    max_ejection_percent: Option<i64>,
    interval: Option<String>,
    consecutive_local_origin_failures: Option<u32>,
    split_external_local_origin_errors: Option<bool>,
    min_health_percent: Option<i32>,
    /// Deprecated by Istio for the two counts above.
    consecutive_errors: Option<i32>,
    outlier_detection_http_error_codes: Option<Vec<u32>>,
}

pub(super) fn destination_rule(
    meta: &Meta,
    spec: DestinationRuleSpec,
    d: &SourceDefaults,
    p: &mut Problems,
) -> Vec<(Resource, String)> {
    let at = HostContext {
        namespace: &meta.namespace,
        domain: &d.domain,
    };
    let host = resolve_host("spec.host", spec.host.as_deref(), at, p);
    let policy = spec
        .traffic_policy
        .map(|t| traffic_policy("spec.trafficPolicy", *t, p))
        .unwrap_or_default();
    let subsets = subsets(spec.subsets, p);
    if spec.workload_selector.is_some() {
        p.warn(
            "spec.workloadSelector",
            format!("{NOT_HONOURED}: the rule applies to every caller"),
        );
    }
    let export_to = export_to(&spec.export_to, &meta.namespace, p);
    let Some(host) = host else {
        return Vec::new();
    };
    vec![(
        Resource::DestinationRule(Box::new(DestinationRule {
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            host,
            policy,
            subsets,
            export_to,
        })),
        "metadata.name".into(),
    )]
}

/// `spec.subsets`: each named by a DNS label (the name routes refer to, and part of the
/// cluster names Istio derives from it), unique within the rule, with valid labels.
fn subsets(specs: Vec<SubsetSpec>, p: &mut Problems) -> Vec<Subset> {
    let mut subsets: Vec<(Subset, String)> = Vec::new();
    for (i, spec) in specs.into_iter().enumerate() {
        let field = format!("spec.subsets[{i}]");
        let policy = spec
            .traffic_policy
            .map(|t| traffic_policy(&format!("{field}.trafficPolicy"), t, p))
            .unwrap_or_default();
        check_labels(p, &format!("{field}.labels"), &spec.labels);
        let Some(name) = subset_name(&field, spec.name, p) else {
            continue;
        };
        if let Some((_, first)) = subsets.iter().find(|(s, _)| s.name == name) {
            p.add(
                format!("{field}.name"),
                format!(
                    "{name:?} is the name of another subset ({first}); subset names must be unique"
                ),
            );
            continue;
        }
        let subset = Subset {
            name,
            labels: spec.labels,
            policy,
        };
        subsets.push((subset, field));
    }
    subsets.into_iter().map(|(s, _)| s).collect()
}

/// A subset's name, required and a DNS label, or `None` with its problem recorded.
fn subset_name(field: &str, name: Option<String>, p: &mut Problems) -> Option<String> {
    match name.filter(|n| !n.is_empty()) {
        None => {
            p.add(format!("{field}.name"), "is required");
            None
        }
        Some(name) => p
            .check(format!("{field}.name"), dns_label("subset name", &name))
            .then_some(name),
    }
}

// ---- traffic policies ----------------------------------------------------------------------

/// A `trafficPolicy` (the rule's or a subset's) at `field`.
fn traffic_policy(field: &str, spec: TrafficPolicySpec, p: &mut Problems) -> TrafficPolicy {
    let mut policy = settings(
        field,
        spec.load_balancer,
        spec.connection_pool,
        spec.outlier_detection,
        spec.tls,
        p,
    );
    policy.ports = port_level_settings(
        &format!("{field}.portLevelSettings"),
        spec.port_level_settings,
        p,
    );
    ignored(p, format!("{field}.tunnel"), spec.tunnel.is_some());
    ignored(
        p,
        format!("{field}.proxyProtocol"),
        spec.proxy_protocol.is_some(),
    );
    ignored(
        p,
        format!("{field}.retryBudget"),
        spec.retry_budget.is_some(),
    );
    policy
}

/// What a policy and a port's settings share, read at `field`; `ports` is left empty.
fn settings(
    field: &str,
    load_balancer: Option<LoadBalancerSpec>,
    connection_pool: Option<ConnectionPoolSpec>,
    outlier_detection: Option<OutlierDetectionSpec>,
    tls: Option<Mapping>,
    p: &mut Problems,
) -> TrafficPolicy {
    let mut policy = TrafficPolicy::default();
    if let Some(spec) = load_balancer {
        self::load_balancer(&format!("{field}.loadBalancer"), spec, &mut policy, p);
    }
    if let Some(spec) = connection_pool {
        self::connection_pool(&format!("{field}.connectionPool"), spec, &mut policy, p);
    }
    if let Some(spec) = outlier_detection {
        policy.outlier = self::outlier_detection(&format!("{field}.outlierDetection"), spec, p);
    }
    ignored(p, format!("{field}.tls"), tls.is_some());
    policy
}

/// `portLevelSettings`, by port: each entry names a valid port, and a port at most once.
fn port_level_settings(
    field: &str,
    specs: Vec<PortTrafficPolicySpec>,
    p: &mut Problems,
) -> BTreeMap<u16, TrafficPolicy> {
    let mut ports: BTreeMap<u16, (TrafficPolicy, String)> = BTreeMap::new();
    for (i, spec) in specs.into_iter().enumerate() {
        let field = format!("{field}[{i}]");
        let policy = settings(
            &field,
            spec.load_balancer,
            spec.connection_pool,
            spec.outlier_detection,
            spec.tls,
            p,
        );
        let Some(selector) = spec.port else {
            p.add(format!("{field}.port"), "is required");
            continue;
        };
        let number_field = format!("{field}.port.number");
        let Some(port) = required_port(p, &number_field, selector.number) else {
            continue;
        };
        if let Some((_, first)) = ports.get(&port) {
            p.add(
                number_field,
                format!("port {port} has its settings already ({first}); list each port once"),
            );
            continue;
        }
        ports.insert(port, (policy, field));
    }
    ports
        .into_iter()
        .map(|(port, (policy, _))| (port, policy))
        .collect()
}

/// `loadBalancer`: the `simple` policy and the locality settings, into `policy`.
fn load_balancer(
    field: &str,
    spec: LoadBalancerSpec,
    policy: &mut TrafficPolicy,
    p: &mut Problems,
) {
    if spec.simple.is_some() && spec.consistent_hash.is_some() {
        p.add(
            field,
            "simple and consistentHash are alternatives (Istio takes one); set only one",
        );
    }
    let chosen = spec
        .simple
        .as_deref()
        .and_then(|simple| simple_load_balancer(&format!("{field}.simple"), simple, p));
    ignored(
        p,
        format!("{field}.consistentHash"),
        spec.consistent_hash.is_some(),
    );
    if let Some(locality) = spec.locality_lb_setting {
        policy.locality = locality_lb(&format!("{field}.localityLbSetting"), locality, p);
    }
    ignored(
        p,
        format!("{field}.zoneAwareLbSetting"),
        spec.zone_aware_lb_setting.is_some(),
    );
    ignored_duration(
        p,
        format!("{field}.warmupDurationSecs"),
        spec.warmup_duration_secs.as_deref(),
        NOT_HONOURED,
    );
    ignored(p, format!("{field}.warmup"), spec.warmup.is_some());
    policy.load_balancer = chosen;
}

/// `tcpKeepalive`: probes, and the idle time and interval (the kernel counts them in whole
/// seconds: a part of a second is rounded up).
fn tcp_keepalive(field: &str, spec: TcpKeepaliveSpec, p: &mut Problems) -> Option<TcpKeepalive> {
    let errors = p.errors.len();
    let probes = spec.probes.and_then(|n| match u32::try_from(n) {
        Ok(n) if (1..=127).contains(&n) => Some(n),
        _ => {
            p.add(
                format!("{field}.probes"),
                format!("{n} is not a number of probes from 1 to 127 (the kernel's limit)"),
            );
            None
        }
    });
    let mut seconds = |name: &str, text: Option<&str>| {
        let at = format!("{field}.{name}");
        let ms = duration_ms(p, &at, text?)?;
        if ms > 32_767_000 {
            p.add(at, format!("{ms} ms is longer than the kernel's 32767 s"));
            return None;
        }
        Some(ms)
    };
    let time_ms = seconds("time", spec.time.as_deref());
    let interval_ms = seconds("interval", spec.interval.as_deref());
    (p.errors.len() == errors).then_some(TcpKeepalive {
        probes,
        time_ms,
        interval_ms,
    })
}

/// The labels of the locality levels, as `failoverPriority` names them.
const LOCALITY_LABELS: [(&str, LocalityLevel); 3] = [
    ("topology.kubernetes.io/region", LocalityLevel::Region),
    ("topology.kubernetes.io/zone", LocalityLevel::Zone),
    ("topology.istio.io/subzone", LocalityLevel::Subzone),
];

/// `localityLbSetting`, checked as Istio checks it.
fn locality_lb(field: &str, spec: LocalityLbSpec, p: &mut Problems) -> Option<LocalityLb> {
    let errors = p.errors.len();
    if !spec.distribute.is_empty() && !spec.failover.is_empty() {
        p.add(
            field,
            "distribute and failover are alternatives (Istio refuses both at once); set only one",
        );
    }
    let mut failover = Vec::new();
    for (i, f) in spec.failover.iter().enumerate() {
        let at = format!("{field}.failover[{i}]");
        match (&f.from, &f.to) {
            (Some(from), Some(to)) if from == to => p.add(
                &at,
                format!("from and to are both {from:?}: fail over to another region"),
            ),
            (Some(from), Some(to)) => {
                for (name, region) in [("from", from), ("to", to)] {
                    if region.is_empty() || region.contains('/') || region.contains('*') {
                        p.add(
                            format!("{at}.{name}"),
                            format!("{region:?} is not a region (failover is from one region to another)"),
                        );
                    }
                }
                failover.push((from.clone(), to.clone()));
            }
            _ => p.add(&at, "needs both from and to (regions)"),
        }
    }
    let mut distribute = Vec::new();
    for (i, d) in spec.distribute.iter().enumerate() {
        let at = format!("{field}.distribute[{i}]");
        let Some(from) = &d.from else {
            p.add(
                format!("{at}.from"),
                "is required (a locality, e.g. region/zone/*)",
            );
            continue;
        };
        check_locality_pattern(p, &format!("{at}.from"), from);
        for pattern in d.to.keys() {
            check_locality_pattern(p, &format!("{at}.to"), pattern);
        }
        let total: u64 = d.to.values().map(|&w| u64::from(w)).sum();
        if total != 100 {
            p.add(
                format!("{at}.to"),
                format!("the shares add up to {total}; they must add up to 100"),
            );
        }
        distribute.push((
            from.clone(),
            d.to.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        ));
    }
    let mut failover_priority = Vec::new();
    for (i, label) in spec.failover_priority.iter().enumerate() {
        match LOCALITY_LABELS.iter().find(|(name, _)| name == label) {
            Some((_, level)) => failover_priority.push(*level),
            None => {
                p.warn(
                    format!("{field}.failoverPriority[{i}]"),
                    format!(
                        "{NOT_HONOURED}: {label:?} is not a locality label (isthmus orders by \
                         topology.kubernetes.io/region, topology.kubernetes.io/zone and \
                         topology.istio.io/subzone only), so failoverPriority is not applied"
                    ),
                );
                failover_priority.clear();
                break;
            }
        }
    }
    if p.errors.len() > errors {
        return None;
    }
    Some(LocalityLb {
        disabled: spec.enabled == Some(false),
        failover,
        failover_priority,
        distribute,
    })
}

/// `region`, `region/zone` or `region/zone/subzone`, or any of them ending in `/*`, or `*`.
fn check_locality_pattern(p: &mut Problems, field: &str, pattern: &str) {
    let parts: Vec<&str> = pattern.split('/').collect();
    let bad_star = parts
        .iter()
        .enumerate()
        .any(|(i, part)| part.contains('*') && (*part != "*" || i + 1 != parts.len()));
    if pattern.is_empty() || parts.len() > 3 || parts.iter().any(|x| x.is_empty()) || bad_star {
        p.add(
            field,
            format!("{pattern:?} is not a locality: use region, region/zone or region/zone/subzone, optionally ending in /*"),
        );
    }
}

/// `loadBalancer.simple`, Istio's names for its algorithms.
fn simple_load_balancer(field: &str, simple: &str, p: &mut Problems) -> Option<LoadBalancer> {
    match simple {
        "ROUND_ROBIN" => Some(LoadBalancer::RoundRobin),
        // At L4 both are the fewest open connections: a connection is the only request the
        // proxy sees.
        "LEAST_REQUEST" | "LEAST_CONN" => Some(LoadBalancer::LeastConnections),
        "RANDOM" => Some(LoadBalancer::Random),
        "UNSPECIFIED" => None,
        "PASSTHROUGH" => {
            p.warn(
                field,
                format!(
                    "{NOT_HONOURED}: isthmus always picks an endpoint, rather than connecting \
                     to the address the caller dialled"
                ),
            );
            None
        }
        other => {
            p.add(
                field,
                format!(
                    "{other:?} is not a load balancer; use ROUND_ROBIN, LEAST_REQUEST, \
                     LEAST_CONN, RANDOM, PASSTHROUGH or UNSPECIFIED"
                ),
            );
            None
        }
    }
}

/// `connectionPool`: its TCP limits, into `policy`.
fn connection_pool(
    field: &str,
    spec: ConnectionPoolSpec,
    policy: &mut TrafficPolicy,
    p: &mut Problems,
) {
    if let Some(tcp) = spec.tcp {
        let field = format!("{field}.tcp");
        if let Some(n) = tcp.max_connections {
            policy.max_connections = max_connections(&format!("{field}.maxConnections"), n, p);
        }
        if let Some(timeout) = &tcp.connect_timeout {
            policy.connect_timeout_ms = duration_ms(p, &format!("{field}.connectTimeout"), timeout);
        }
        if let Some(keepalive) = tcp.tcp_keepalive {
            policy.tcp_keepalive = tcp_keepalive(&format!("{field}.tcpKeepalive"), keepalive, p);
        }
        ignored_duration(
            p,
            format!("{field}.maxConnectionDuration"),
            tcp.max_connection_duration.as_deref(),
            NOT_HONOURED,
        );
        ignored_duration(
            p,
            format!("{field}.idleTimeout"),
            tcp.idle_timeout.as_deref(),
            NOT_HONOURED,
        );
    }
    ignored(p, format!("{field}.http"), spec.http.is_some());
}

/// `maxConnections`: within Istio's int32; 0 is Istio's "unset" (it loads, as in Istio,
/// with a warning that no limit is set).
fn max_connections(field: &str, n: i64, p: &mut Problems) -> Option<u32> {
    match u32::try_from(n) {
        Ok(0) => {
            p.warn(
                field,
                "0 sets no limit (Istio reads 0 as unset); the proxy's own limit applies",
            );
            None
        }
        Ok(n) if n <= i32::MAX.unsigned_abs() => Some(n),
        _ => {
            p.add(
                field,
                format!("{n} is not a valid number of connections (1-{})", i32::MAX),
            );
            None
        }
    }
}

/// `outlierDetection`: what ejects an endpoint and for how long; `None` when it sets none of
/// that.
fn outlier_detection(
    field: &str,
    spec: OutlierDetectionSpec,
    p: &mut Problems,
) -> Option<OutlierPolicy> {
    let base_ejection_ms = spec
        .base_ejection_time
        .as_deref()
        .and_then(|t| duration_ms(p, &format!("{field}.baseEjectionTime"), t));
    let max_ejection_percent = spec
        .max_ejection_percent
        .and_then(|n| match u32::try_from(n) {
            Ok(n) if n <= 100 => Some(n),
            _ => {
                p.add(
                    format!("{field}.maxEjectionPercent"),
                    format!("{n} is not a percentage (0-100)"),
                );
                None
            }
        });
    ignored_duration(
        p,
        format!("{field}.interval"),
        spec.interval.as_deref(),
        format!(
            "{NOT_HONOURED}: isthmus ejects an endpoint on the failures themselves, with no \
             periodic sweep"
        ),
    );
    ignored(
        p,
        format!("{field}.consecutiveLocalOriginFailures"),
        spec.consecutive_local_origin_failures.is_some(),
    );
    ignored(
        p,
        format!("{field}.splitExternalLocalOriginErrors"),
        spec.split_external_local_origin_errors.is_some(),
    );
    ignored(
        p,
        format!("{field}.minHealthPercent"),
        spec.min_health_percent.is_some(),
    );
    if spec.consecutive_errors.is_some() {
        p.warn(
            format!("{field}.consecutiveErrors"),
            format!(
                "{NOT_HONOURED}: deprecated by Istio; use consecutiveGatewayErrors or \
                 consecutive5xxErrors"
            ),
        );
    }
    ignored(
        p,
        format!("{field}.outlierDetectionHttpErrorCodes"),
        spec.outlier_detection_http_error_codes.is_some(),
    );
    let outlier = OutlierPolicy {
        consecutive_errors: consecutive_errors(
            spec.consecutive_gateway_errors,
            spec.consecutive_5xx_errors,
        ),
        base_ejection_ms,
        max_ejection_percent,
    };
    (outlier != OutlierPolicy::default()).then_some(outlier)
}

/// The failed connects in a row that eject an endpoint, from `consecutiveGatewayErrors` and
/// `consecutive5xxErrors`. At L4 a failed connect is both a gateway error and a 5xx, so with
/// both set the smaller count ejects first and is the one taken. 0 is Istio's "off" for
/// either: with one off the other applies alone, and with both off the count is 0, no
/// ejection.
fn consecutive_errors(gateway: Option<u32>, five_xx: Option<u32>) -> Option<u32> {
    match (gateway, five_xx) {
        (Some(a), Some(b)) => Some(match (a, b) {
            (0, n) | (n, 0) => n,
            (a, b) => a.min(b),
        }),
        (a, b) => a.or(b),
    }
}

/// Warns that `field`, when the manifest sets it, is not honoured.
fn ignored(p: &mut Problems, field: String, present: bool) {
    if present {
        p.warn(field, NOT_HONOURED);
    }
}

/// Warns with `message` that the duration at `field`, when set, is not honoured; one that is
/// no duration is an error still, as Istio refuses it.
fn ignored_duration(
    p: &mut Problems,
    field: String,
    value: Option<&str>,
    message: impl Into<String>,
) {
    let Some(text) = value else {
        return;
    };
    match parse_duration(text) {
        Ok(_) => p.warn(field, message),
        Err(why) => p.add(field, why),
    }
}
