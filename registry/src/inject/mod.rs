//! Sidecar injection: the mutating admission webhook the API server calls for every pod
//! created in a namespace labelled `isthmus-injection=enabled`, and what the registry keeps
//! in its own cluster for injected pods.
//!
//! - [`pod`]: the injection itself, a pure function from a Pod and [`InjectSettings`] to a
//!   JSONPatch (init container, sidecar, volumes, rewritten probes, status annotation);
//! - [`review`]: AdmissionReview `admission.k8s.io/v1` in and out, every refusal named;
//! - [`server`]: the TLS listener on 15017 and its serving certificate (from files, or
//!   issued by the cluster intermediate for the webhook's DNS names and renewed);
//! - [`cluster`]: the `isthmus-ca-root-cert` ConfigMap in every injected namespace and the
//!   `caBundle` of the webhook configuration, both kept equal to the mesh root.
//!
//! The shipped webhook configuration (`deploy/kubernetes/webhook.yaml`) fails closed
//! (`failurePolicy: Fail`): while the webhook is down, a pod of an injected namespace is
//! refused rather than created outside the mesh.

pub mod cluster;
pub mod metrics;
pub mod pod;
pub mod review;
pub mod server;
#[cfg(test)]
mod tests;

pub use pod::{inject, InjectError, Injection, SkipReason};

/// The namespace label that turns injection on (the webhook configuration selects on it).
pub const NAMESPACE_LABEL: &str = "isthmus-injection";
pub const NAMESPACE_LABEL_VALUE: &str = "enabled";
/// Per-pod opt-out, as a label or an annotation, `"false"`; Istio's key is honoured too.
pub const INJECT_KEY: &str = "sidecar.isthmus.io/inject";
pub const ISTIO_INJECT_KEY: &str = "sidecar.istio.io/inject";
/// Marks an injected pod: JSON of what was added. The catalog's sources read it too (such a
/// pod takes tunnels), so it is defined with them.
pub const STATUS_ANNOTATION: &str = crate::sources::SIDECAR_STATUS;
/// Extra ports the capture leaves alone, comma-separated (Istio's keys are honoured too).
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.isthmus.io/excludeInboundPorts";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.isthmus.io/excludeOutboundPorts";
pub const ISTIO_EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
pub const ISTIO_EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
/// The label that tells peers the pod speaks mesh mTLS (Istio's).
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";
/// The ConfigMap with the mesh root, published into every injected namespace.
pub const ROOT_CERT_CONFIGMAP: &str = "isthmus-ca-root-cert";
pub const ROOT_CERT_KEY: &str = "root-cert.pem";
/// The MutatingWebhookConfiguration whose `caBundle` the registry keeps at the mesh root.
pub const DEFAULT_WEBHOOK_CONFIG_NAME: &str = "isthmus-sidecar-injector";
/// Where the webhook listens unless `--webhook-addr` says otherwise.
pub const DEFAULT_WEBHOOK_ADDR: &str = "0.0.0.0:15017";
/// The audience of the projected service-account token the sidecar presents to the CA
/// (the registry injects the CA's `--ca-token-audience`).
pub const DEFAULT_TOKEN_AUDIENCE: &str = crate::ca::kubernetes::DEFAULT_TOKEN_AUDIENCE;
/// The mesh VIP range and a cluster's usual service CIDR: what the sidecar captures.
pub const DEFAULT_CAPTURE_CIDRS: [&str; 2] = ["240.240.0.0/16", "10.96.0.0/12"];

/// The image of the init container and the sidecar unless `--inject-image` says otherwise.
pub fn default_image() -> String {
    format!("isthmus/vm-agent:{}", env!("CARGO_PKG_VERSION"))
}

/// The registry's gRPC address as pods of its cluster reach it.
pub fn default_registry_address(system_namespace: &str) -> String {
    format!("isthmus-registry.{system_namespace}.svc:15012")
}

/// The webhook's DNS name as the API server reaches it through the registry's Service.
pub fn default_webhook_dns_name(system_namespace: &str) -> String {
    format!("isthmus-registry.{system_namespace}.svc")
}

/// What every injected pod gets that is not in the pod itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectSettings {
    /// Image of `isthmus-init` and `isthmus-proxy`.
    pub image: String,
    /// `ISTHMUS_REGISTRY`: host:port of the registry's gRPC port.
    pub registry_address: String,
    /// Canonical CIDRs (`a.b.c.d/n`) the capture redirects to the sidecar.
    pub capture_cidrs: Vec<String>,
    pub cluster: String,
    pub network: String,
    /// Audience of the projected token (the CA requires it).
    pub token_audience: String,
    /// Namespaces never injected whatever they are labelled (the registry's own, and
    /// Kubernetes' system namespaces).
    pub ignored_namespaces: Vec<String>,
}

impl InjectSettings {
    /// The defaults for a registry of `cluster` on `network` with its system namespace.
    pub fn new(cluster: &str, network: &str, system_namespace: &str) -> Self {
        Self {
            image: default_image(),
            registry_address: default_registry_address(system_namespace),
            capture_cidrs: DEFAULT_CAPTURE_CIDRS
                .iter()
                .map(|c| c.to_string())
                .collect(),
            cluster: cluster.to_string(),
            network: network.to_string(),
            token_audience: DEFAULT_TOKEN_AUDIENCE.to_string(),
            ignored_namespaces: vec![
                system_namespace.to_string(),
                "kube-system".to_string(),
                "kube-public".to_string(),
            ],
        }
    }
}
