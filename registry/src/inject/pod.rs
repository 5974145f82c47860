//! The injection: from a Pod (as the API server sends it) and the registry's
//! [`InjectSettings`] to a JSONPatch, or to the reason the pod is left alone. No I/O, so
//! every point of the contract is tested on plain JSON.
//!
//! The patch replaces whole members (`/spec/containers`, `/spec/initContainers`,
//! `/spec/volumes`, `/metadata/annotations`, `/metadata/labels`) with the pod's own entries
//! plus ours: `add` on an existing member replaces it, so one patch works whether or not
//! the pod had the member, and every field of the pod's entries is kept as sent.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{json, Map, Value};

use super::{
    InjectSettings, EXCLUDE_INBOUND_PORTS, EXCLUDE_OUTBOUND_PORTS, INJECT_KEY,
    ISTIO_EXCLUDE_INBOUND_PORTS, ISTIO_EXCLUDE_OUTBOUND_PORTS, ISTIO_INJECT_KEY,
    ROOT_CERT_CONFIGMAP, STATUS_ANNOTATION, TLS_MODE_LABEL,
};

pub const INIT_CONTAINER: &str = "isthmus-init";
pub const SIDECAR_CONTAINER: &str = "isthmus-proxy";
pub const TOKEN_VOLUME: &str = "isthmus-token";
pub const ROOT_VOLUME: &str = "isthmus-ca-root";
pub const STATE_VOLUME: &str = "isthmus-state";
pub const TOKEN_MOUNT: &str = "/var/run/secrets/tokens";
pub const TOKEN_PATH: &str = "isthmus-token";
pub const ROOT_MOUNT: &str = "/var/run/secrets/isthmus";
pub const STATE_MOUNT: &str = "/var/lib/isthmus";
/// Half a day: the kubelet refreshes a projected token at 80% of its life, long before the
/// sidecar's certificate (24 h) needs a new one.
pub const TOKEN_EXPIRATION_SECONDS: i64 = 43200;
/// The uid the sidecar runs as; the capture exempts its traffic.
pub const PROXY_UID: i64 = 1337;
pub const INBOUND_PORT: u16 = 15006;
pub const OUTBOUND_PORT: u16 = 15001;
pub const DNS_PORT: u16 = 15053;
/// The sidecar's health port: its own readiness and the rewritten app probes.
pub const HEALTH_PORT: u16 = 15021;
pub const METRICS_PORT: u16 = 15020;
/// Inbound ports never captured: the kubelet reaches the sidecar's own ports directly.
pub const ALWAYS_EXCLUDED_INBOUND: [u16; 2] = [METRICS_PORT, HEALTH_PORT];
/// The app probes, as the sidecar serves them: `/app-health/<container>/<suffix>`.
const PROBES: [(&str, &str); 3] = [
    ("readinessProbe", "readyz"),
    ("livenessProbe", "livez"),
    ("startupProbe", "startupz"),
];
/// Kubernetes' default probe timeout.
const DEFAULT_PROBE_TIMEOUT_SECONDS: i32 = 1;
/// The annotation `kubectl logs` and `exec` default to: the app, not the sidecar.
const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";
/// The pod label that puts a pod on another network than its cluster's (as the Kubernetes
/// source reads it).
const NETWORK_LABEL: &str = "topology.istio.io/network";

/// What the injector does with a pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Injection {
    /// JSONPatch operations.
    Patch(Vec<Value>),
    /// Left unchanged, and why.
    Skip(SkipReason),
}

/// Why a pod was left alone (the pod is still admitted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// `key` (a label or annotation) is `"false"`.
    OptedOut { key: String },
    /// The pod already has the sidecar or the status annotation.
    AlreadyInjected,
    /// The pod shares its node's network namespace: capturing there would capture the
    /// node.
    HostNetwork,
    /// A namespace that is never injected.
    IgnoredNamespace(String),
}

impl SkipReason {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            SkipReason::OptedOut { .. } => "opted_out",
            SkipReason::AlreadyInjected => "already_injected",
            SkipReason::HostNetwork => "host_network",
            SkipReason::IgnoredNamespace(_) => "ignored_namespace",
        }
    }
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::OptedOut { key } => write!(f, "not injected: {key} is \"false\""),
            SkipReason::AlreadyInjected => write!(
                f,
                "not injected: the pod already has {SIDECAR_CONTAINER} or {STATUS_ANNOTATION}"
            ),
            SkipReason::HostNetwork => write!(
                f,
                "not injected: the pod uses hostNetwork, and capturing its traffic would capture the node's"
            ),
            SkipReason::IgnoredNamespace(ns) => {
                write!(f, "not injected: namespace {ns} is never injected")
            }
        }
    }
}

/// Why a pod cannot be injected (the pod is refused, with this message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("the object is not a Pod the injector can read: {0}")]
    BadPod(String),
    #[error("annotation {key}={value:?}: {why}")]
    BadAnnotation {
        key: &'static str,
        value: String,
        why: String,
    },
    #[error("container {container}, {probe}: {why}")]
    BadProbe {
        container: String,
        probe: &'static str,
        why: String,
    },
    #[error("the pod already has {what} {name:?} but is not injected ({STATUS_ANNOTATION} is absent): rename it or opt the pod out with {INJECT_KEY}: \"false\"")]
    NameTaken { what: &'static str, name: String },
}

impl InjectError {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            InjectError::BadPod(_) => "bad_pod",
            InjectError::BadAnnotation { .. } => "bad_annotation",
            InjectError::BadProbe { .. } => "bad_probe",
            InjectError::NameTaken { .. } => "name_taken",
        }
    }
}

/// Injects the sidecar into `pod` (a Pod object as JSON), created in `namespace`.
pub fn inject(
    pod: &Value,
    namespace: &str,
    settings: &InjectSettings,
) -> Result<Injection, InjectError> {
    let typed: Pod = serde_path_to_error::deserialize(pod).map_err(|e| {
        InjectError::BadPod(match e.path().to_string().as_str() {
            "." => e.inner().to_string(),
            path => format!("{path}: {}", e.inner()),
        })
    })?;
    let spec = typed
        .spec
        .as_ref()
        .ok_or_else(|| InjectError::BadPod("the pod has no spec".into()))?;
    if spec.containers.is_empty() {
        return Err(InjectError::BadPod("spec.containers is empty".into()));
    }
    let meta = &typed.metadata;
    let labels = meta.labels.clone().unwrap_or_default();
    let annotations = meta.annotations.clone().unwrap_or_default();

    if settings.ignored_namespaces.iter().any(|n| n == namespace) {
        return Ok(Injection::Skip(SkipReason::IgnoredNamespace(
            namespace.to_string(),
        )));
    }
    if let Some(key) = opted_out(&labels, &annotations) {
        return Ok(Injection::Skip(SkipReason::OptedOut { key }));
    }
    if annotations.contains_key(STATUS_ANNOTATION)
        || spec.containers.iter().any(|c| c.name == SIDECAR_CONTAINER)
    {
        return Ok(Injection::Skip(SkipReason::AlreadyInjected));
    }
    if spec.host_network == Some(true) {
        return Ok(Injection::Skip(SkipReason::HostNetwork));
    }
    check_names_free(spec)?;

    let exclude_in = ports_annotation(
        &annotations,
        EXCLUDE_INBOUND_PORTS,
        ISTIO_EXCLUDE_INBOUND_PORTS,
    )?;
    let exclude_out = ports_annotation(
        &annotations,
        EXCLUDE_OUTBOUND_PORTS,
        ISTIO_EXCLUDE_OUTBOUND_PORTS,
    )?;

    // The app containers with their probes rewritten, and what the sidecar must probe.
    let raw_containers = pod["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut probers = BTreeMap::new();
    let mut containers = Vec::with_capacity(raw_containers.len() + 1);
    for (raw, typed) in raw_containers.into_iter().zip(&spec.containers) {
        containers.push(rewrite_probes(raw, typed, &mut probers)?);
    }
    let network = labels
        .get(NETWORK_LABEL)
        .filter(|n| !n.is_empty())
        .cloned()
        .unwrap_or_else(|| settings.network.clone());
    containers.push(sidecar(settings, &network, &probers));

    let mut init_containers = vec![init_container(settings, &exclude_in, &exclude_out)];
    init_containers.extend(
        pod["spec"]["initContainers"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
    );
    let mut volumes = pod["spec"]["volumes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    volumes.extend(volumes_for(settings));

    let mut new_annotations = object_or_empty(&pod["metadata"]["annotations"]);
    new_annotations.insert(
        STATUS_ANNOTATION.into(),
        Value::String(status(probers.keys()).to_string()),
    );
    if !new_annotations.contains_key(DEFAULT_CONTAINER_ANNOTATION) {
        new_annotations.insert(
            DEFAULT_CONTAINER_ANNOTATION.into(),
            Value::String(spec.containers[0].name.clone()),
        );
    }
    let mut new_labels = object_or_empty(&pod["metadata"]["labels"]);
    new_labels.insert(TLS_MODE_LABEL.into(), Value::String("istio".into()));

    let add = |path: &str, value: Value| json!({"op": "add", "path": path, "value": value});
    let patch = vec![
        add("/spec/initContainers", Value::Array(init_containers)),
        add("/spec/containers", Value::Array(containers)),
        add("/spec/volumes", Value::Array(volumes)),
        add("/metadata/annotations", Value::Object(new_annotations)),
        add("/metadata/labels", Value::Object(new_labels)),
    ];
    Ok(Injection::Patch(patch))
}

/// The key that opts the pod out, if any: a label before an annotation, isthmus's key
/// before Istio's (so `sidecar.isthmus.io/inject: "true"` overrides Istio's `"false"`).
fn opted_out(
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> Option<String> {
    for key in [INJECT_KEY, ISTIO_INJECT_KEY] {
        for (kind, map) in [("label", labels), ("annotation", annotations)] {
            if let Some(v) = map.get(key) {
                return v
                    .trim()
                    .eq_ignore_ascii_case("false")
                    .then(|| format!("{kind} {key}"));
            }
        }
    }
    None
}

fn check_names_free(spec: &k8s_openapi::api::core::v1::PodSpec) -> Result<(), InjectError> {
    let taken = |what, name: &str| InjectError::NameTaken {
        what,
        name: name.to_string(),
    };
    for c in spec.init_containers.iter().flatten() {
        if c.name == INIT_CONTAINER || c.name == SIDECAR_CONTAINER {
            return Err(taken("an init container", &c.name));
        }
    }
    for c in &spec.containers {
        if c.name == INIT_CONTAINER {
            return Err(taken("a container", &c.name));
        }
    }
    for v in spec.volumes.iter().flatten() {
        if [TOKEN_VOLUME, ROOT_VOLUME, STATE_VOLUME].contains(&v.name.as_str()) {
            return Err(taken("a volume", &v.name));
        }
    }
    Ok(())
}

/// The ports of isthmus's key, else of Istio's: comma-separated numbers, each checked.
fn ports_annotation(
    annotations: &BTreeMap<String, String>,
    key: &'static str,
    istio_key: &'static str,
) -> Result<Vec<u16>, InjectError> {
    let Some((key, value)) = [key, istio_key]
        .into_iter()
        .find_map(|k| annotations.get(k).map(|v| (k, v)))
    else {
        return Ok(Vec::new());
    };
    let bad = |why: String| InjectError::BadAnnotation {
        key,
        value: value.clone(),
        why,
    };
    let mut ports = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.parse::<u16>() {
            Ok(p) if p > 0 => {
                if !ports.contains(&p) {
                    ports.push(p);
                }
            }
            _ => {
                return Err(bad(format!(
                    "{item:?} is not a port number (1-65535); expected a comma-separated list such as \"8080,9090\""
                )))
            }
        }
    }
    Ok(ports)
}

fn join_ports(ports: impl IntoIterator<Item = u16>) -> String {
    ports
        .into_iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn init_container(settings: &InjectSettings, exclude_in: &[u16], exclude_out: &[u16]) -> Value {
    let mut inbound: Vec<u16> = ALWAYS_EXCLUDED_INBOUND.to_vec();
    inbound.extend(
        exclude_in
            .iter()
            .filter(|p| !ALWAYS_EXCLUDED_INBOUND.contains(p)),
    );
    json!({
        "name": INIT_CONTAINER,
        "image": settings.image,
        "args": [
            "capture-init",
            format!("--uid={PROXY_UID}"),
            format!("--inbound-port={INBOUND_PORT}"),
            format!("--outbound-port={OUTBOUND_PORT}"),
            format!("--dns-port={DNS_PORT}"),
            format!("--capture-cidr={}", settings.capture_cidrs.join(",")),
            format!("--exclude-inbound-ports={}", join_ports(inbound)),
            format!("--exclude-outbound-ports={}", join_ports(exclude_out.iter().copied())),
        ],
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    })
}

fn sidecar(settings: &InjectSettings, network: &str, probers: &BTreeMap<String, Value>) -> Value {
    let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}});
    let mut env = vec![
        json!({"name": "ISTHMUS_REGISTRY", "value": settings.registry_address}),
        json!({"name": "ISTHMUS_CLUSTER", "value": settings.cluster}),
        json!({"name": "ISTHMUS_NETWORK", "value": network}),
        field("POD_NAME", "metadata.name"),
        field("POD_NAMESPACE", "metadata.namespace"),
        field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field("INSTANCE_IP", "status.podIP"),
    ];
    if !probers.is_empty() {
        env.push(json!({
            "name": "ISTHMUS_APP_PROBERS",
            "value": serde_json::to_string(probers).expect("JSON values serialize"),
        }));
    }
    json!({
        "name": SIDECAR_CONTAINER,
        "image": settings.image,
        "args": ["sidecar"],
        "env": env,
        "ports": [
            {"name": "http-health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
            {"name": "http-metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/healthz/ready", "port": HEALTH_PORT, "scheme": "HTTP"},
            "initialDelaySeconds": 1,
            "periodSeconds": 2,
            "failureThreshold": 30,
            "timeoutSeconds": 3,
        },
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_MOUNT, "readOnly": true},
            {"name": ROOT_VOLUME, "mountPath": ROOT_MOUNT, "readOnly": true},
            {"name": STATE_VOLUME, "mountPath": STATE_MOUNT},
        ],
    })
}

fn volumes_for(settings: &InjectSettings) -> [Value; 3] {
    [
        json!({"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
            "audience": settings.token_audience,
            "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
            "path": TOKEN_PATH,
        }}]}}),
        json!({"name": ROOT_VOLUME, "configMap": {"name": ROOT_CERT_CONFIGMAP}}),
        json!({"name": STATE_VOLUME, "emptyDir": {}}),
    ]
}

/// The status annotation: what was injected, so a later reader (and the injector itself)
/// knows the pod is in the mesh.
fn status<'a>(rewritten: impl Iterator<Item = &'a String>) -> Value {
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "initContainers": [INIT_CONTAINER],
        "containers": [SIDECAR_CONTAINER],
        "volumes": [TOKEN_VOLUME, ROOT_VOLUME, STATE_VOLUME],
        "rewrittenProbes": rewritten.collect::<Vec<_>>(),
    })
}

fn object_or_empty(v: &Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

/// The sidecar path of one app probe.
pub fn probe_path(container: &str, suffix: &str) -> String {
    format!("/app-health/{container}/{suffix}")
}

/// `raw` (an app container as sent) with its httpGet, tcpSocket and grpc probes pointed at
/// the sidecar's health port; each original goes into `probers` under its new path. Exec
/// probes stay: they run inside the container, outside the capture.
fn rewrite_probes(
    mut raw: Value,
    typed: &Container,
    probers: &mut BTreeMap<String, Value>,
) -> Result<Value, InjectError> {
    for (field, suffix) in PROBES {
        let probe = match field {
            "readinessProbe" => typed.readiness_probe.as_ref(),
            "livenessProbe" => typed.liveness_probe.as_ref(),
            _ => typed.startup_probe.as_ref(),
        };
        let Some(probe) = probe else { continue };
        let bad = |why: String| InjectError::BadProbe {
            container: typed.name.clone(),
            probe: field,
            why,
        };
        let Some(original) = prober(probe, typed).map_err(bad)? else {
            continue;
        };
        let path = probe_path(&typed.name, suffix);
        let Some(obj) = raw[field].as_object_mut() else {
            continue;
        };
        for handler in ["httpGet", "tcpSocket", "grpc"] {
            obj.remove(handler);
        }
        obj.insert(
            "httpGet".into(),
            json!({"path": path, "port": HEALTH_PORT, "scheme": "HTTP"}),
        );
        probers.insert(path, original);
    }
    Ok(raw)
}

/// What the sidecar runs for `probe` (named ports resolved), or `None` for an exec probe.
fn prober(probe: &Probe, container: &Container) -> Result<Option<Value>, String> {
    let timeout = probe
        .timeout_seconds
        .unwrap_or(DEFAULT_PROBE_TIMEOUT_SECONDS);
    let handler = if let Some(h) = &probe.http_get {
        let mut v = json!({
            "path": h.path.clone().filter(|p| !p.is_empty()).unwrap_or_else(|| "/".into()),
            "port": resolve_port(&h.port, container, "httpGet.port")?,
            "scheme": h.scheme.clone().unwrap_or_else(|| "HTTP".into()),
            "httpHeaders": h.http_headers.clone().unwrap_or_default()
                .iter()
                .map(|hh| json!({"name": hh.name, "value": hh.value}))
                .collect::<Vec<_>>(),
        });
        if let Some(host) = h.host.as_ref().filter(|h| !h.is_empty()) {
            v["host"] = json!(host);
        }
        json!({"httpGet": v})
    } else if let Some(t) = &probe.tcp_socket {
        let mut v = json!({"port": resolve_port(&t.port, container, "tcpSocket.port")?});
        if let Some(host) = t.host.as_ref().filter(|h| !h.is_empty()) {
            v["host"] = json!(host);
        }
        json!({"tcpSocket": v})
    } else if let Some(g) = &probe.grpc {
        json!({"grpc": {
            "port": check_port(i64::from(g.port), "grpc.port")?,
            "service": g.service.clone().unwrap_or_default(),
        }})
    } else {
        return Ok(None);
    };
    let mut v = handler;
    v["timeoutSeconds"] = json!(timeout);
    Ok(Some(v))
}

fn check_port(port: i64, what: &str) -> Result<u16, String> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{what} {port} is not a port number (1-65535)"))
}

/// A probe's port as a number: a name is looked up among the container's ports.
fn resolve_port(port: &IntOrString, container: &Container, what: &str) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => check_port(i64::from(*n), what),
        IntOrString::String(name) => {
            let named = container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()));
            match named {
                Some(p) => check_port(i64::from(p.container_port), what),
                None => match name.parse::<i64>() {
                    Ok(n) => check_port(n, what),
                    Err(_) => Err(format!(
                        "{what} {name:?} names no port of the container (its ports: {})",
                        describe_ports(container)
                    )),
                },
            }
        }
    }
}

fn describe_ports(container: &Container) -> String {
    let ports: Vec<String> = container
        .ports
        .iter()
        .flatten()
        .map(|p| match &p.name {
            Some(n) => format!("{n}={}", p.container_port),
            None => p.container_port.to_string(),
        })
        .collect();
    if ports.is_empty() {
        "none".into()
    } else {
        ports.join(", ")
    }
}
