//! `WorkloadGroup`: the template a VM registers from, and its readiness probe.

use std::collections::BTreeMap;
use std::net::IpAddr;

use isthmus_proto::model::{Origin, Probe, ProbeAction, Resource, WorkloadGroup};
use serde::Deserialize;

use super::defaults::SourceDefaults;
use super::metadata::{nullable, Meta};
use super::problems::{check_labels, required_port, Problems};
use super::workload_entry::{workload, AddressRule, WorkloadContext, WorkloadEntrySpec};
use crate::validate::{check_hostname, check_label_key};

const DEFAULT_PROBE_PERIOD_SECONDS: u32 = 5;
const DEFAULT_PROBE_TIMEOUT_SECONDS: u32 = 1;
const DEFAULT_PROBE_SUCCESS_THRESHOLD: u32 = 1;
const DEFAULT_PROBE_FAILURE_THRESHOLD: u32 = 3;
const DEFAULT_PROBE_PATH: &str = "/";

/// A WorkloadEntry whose `address` is not used: a VM brings its own when it registers.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct WorkloadTemplateSpec {
    /// Tolerated, as Istio tolerates it, and not used.
    address: Option<String>,
    #[serde(deserialize_with = "nullable")]
    ports: BTreeMap<String, u32>,
    #[serde(deserialize_with = "nullable")]
    labels: BTreeMap<String, String>,
    network: Option<String>,
    locality: Option<String>,
    weight: Option<u32>,
    service_account: Option<String>,
}

impl From<WorkloadTemplateSpec> for WorkloadEntrySpec {
    fn from(t: WorkloadTemplateSpec) -> Self {
        Self {
            address: None,
            ports: t.ports,
            labels: t.labels,
            network: t.network,
            locality: t.locality,
            weight: t.weight,
            service_account: t.service_account,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct WorkloadGroupSpec {
    metadata: Option<GroupMetadataSpec>,
    template: Option<WorkloadTemplateSpec>,
    probe: Option<ProbeSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct GroupMetadataSpec {
    #[serde(deserialize_with = "nullable")]
    labels: BTreeMap<String, String>,
    #[serde(deserialize_with = "nullable")]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct ProbeSpec {
    initial_delay_seconds: Option<u32>,
    period_seconds: Option<u32>,
    timeout_seconds: Option<u32>,
    success_threshold: Option<u32>,
    failure_threshold: Option<u32>,
    http_get: Option<HttpGetSpec>,
    tcp_socket: Option<TcpSocketSpec>,
    exec: Option<ExecSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct HttpGetSpec {
    path: Option<String>,
    port: Option<u32>,
    host: Option<String>,
    scheme: Option<String>,
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
    #[serde(deserialize_with = "nullable")]
    command: Vec<String>,
}

pub(super) fn workload_group(
    meta: &Meta,
    spec: WorkloadGroupSpec,
    d: &SourceDefaults,
    p: &mut Problems,
) -> Vec<(Resource, String)> {
    let group_meta = spec.metadata.unwrap_or_default();
    check_labels(p, "spec.metadata.labels", &group_meta.labels);
    for key in group_meta.annotations.keys() {
        p.check(
            format!("spec.metadata.annotations.{key}"),
            check_label_key(key),
        );
    }
    let Some(template) = spec.template else {
        p.add("spec.template", "is required");
        return Vec::new();
    };
    if template.address.as_deref().is_some_and(|a| !a.is_empty()) {
        p.warn(
            "spec.template.address",
            "is not used: each VM registers with its own address",
        );
    }
    let ctx = WorkloadContext {
        field: "spec.template",
        // A VM brings its own name and address when it registers.
        name: String::new(),
        meta,
        base_labels: Some(("spec.metadata.labels", &group_meta.labels)),
        services: Vec::new(),
        origin: Origin::Vm,
        address: AddressRule::Absent,
    };
    let Some(template) = workload(&ctx, template.into(), d, p) else {
        return Vec::new();
    };
    let probe = spec.probe.and_then(|probe| convert_probe(probe, p));
    vec![(
        Resource::WorkloadGroup(WorkloadGroup {
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            labels: meta.labels.clone(),
            template,
            probe,
        }),
        "metadata.name".into(),
    )]
}

fn convert_probe(spec: ProbeSpec, p: &mut Problems) -> Option<Probe> {
    let mut actions = probe_actions(spec.http_get, spec.tcp_socket, spec.exec, p);
    let mut at_least_one = |field: &str, value: Option<u32>, default: u32| -> u32 {
        let v = value.unwrap_or(default);
        if v == 0 {
            p.add(
                format!("spec.probe.{field}"),
                "0 is not allowed; the minimum is 1",
            );
        }
        v
    };
    let period_seconds = at_least_one(
        "periodSeconds",
        spec.period_seconds,
        DEFAULT_PROBE_PERIOD_SECONDS,
    );
    let timeout_seconds = at_least_one(
        "timeoutSeconds",
        spec.timeout_seconds,
        DEFAULT_PROBE_TIMEOUT_SECONDS,
    );
    let success_threshold = at_least_one(
        "successThreshold",
        spec.success_threshold,
        DEFAULT_PROBE_SUCCESS_THRESHOLD,
    );
    let failure_threshold = at_least_one(
        "failureThreshold",
        spec.failure_threshold,
        DEFAULT_PROBE_FAILURE_THRESHOLD,
    );
    if actions.len() != 1 {
        p.add(
            "spec.probe",
            format!(
                "needs exactly one of httpGet, tcpSocket or exec; found {}",
                actions.len()
            ),
        );
        return None;
    }
    Some(Probe {
        initial_delay_seconds: spec.initial_delay_seconds.unwrap_or(0),
        period_seconds,
        timeout_seconds,
        success_threshold,
        failure_threshold,
        action: actions.pop().flatten()?,
    })
}

fn check_probe_host(p: &mut Problems, field: &str, host: &str) {
    if !host.is_empty() && host.parse::<IpAddr>().is_err() {
        p.check(field, check_hostname(host, false));
    }
}

/// Each action the probe names, `None` where its port was refused; exactly one is allowed.
fn probe_actions(
    http_get: Option<HttpGetSpec>,
    tcp_socket: Option<TcpSocketSpec>,
    exec: Option<ExecSpec>,
    p: &mut Problems,
) -> Vec<Option<ProbeAction>> {
    let mut actions = Vec::new();
    if let Some(h) = http_get {
        let port = required_port(p, "spec.probe.httpGet.port", h.port);
        let path = h.path.unwrap_or_else(|| DEFAULT_PROBE_PATH.into());
        if !path.starts_with('/') {
            p.add(
                "spec.probe.httpGet.path",
                format!("{path:?} must start with '/'"),
            );
        }
        let scheme = h
            .scheme
            .unwrap_or_else(|| "HTTP".into())
            .to_ascii_uppercase();
        if scheme != "HTTP" && scheme != "HTTPS" {
            p.add(
                "spec.probe.httpGet.scheme",
                format!("{scheme:?} is not a scheme; use HTTP or HTTPS"),
            );
        }
        let host = h.host.unwrap_or_default();
        check_probe_host(p, "spec.probe.httpGet.host", &host);
        actions.push(port.map(|port| ProbeAction::HttpGet {
            path,
            port,
            host,
            scheme,
        }));
    }
    if let Some(t) = tcp_socket {
        let port = required_port(p, "spec.probe.tcpSocket.port", t.port);
        let host = t.host.unwrap_or_default();
        check_probe_host(p, "spec.probe.tcpSocket.host", &host);
        actions.push(port.map(|port| ProbeAction::TcpSocket { host, port }));
    }
    if let Some(e) = exec {
        if e.command.is_empty() || e.command[0].is_empty() {
            p.add(
                "spec.probe.exec.command",
                "needs at least the program to run",
            );
        }
        actions.push(Some(ProbeAction::Exec { command: e.command }));
    }
    actions
}
