//! Injection metrics: pods injected, pods left alone by reason, requests refused by
//! reason, the webhook's TLS front door, and the cluster-side publishing.

use isthmus_proto::grpc::ListenerMetrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// "created", "updated" or "error".
    pub result: &'static str,
}

#[derive(Debug, Clone, Default)]
pub struct InjectMetrics {
    pub injections: Counter,
    pub skips: Family<ReasonLabels, Counter>,
    pub errors: Family<ReasonLabels, Counter>,
    /// TLS connections to the webhook port.
    pub listener: ListenerMetrics,
    /// Writes of the root-cert ConfigMaps.
    pub configmap_writes: Family<ResultLabels, Counter>,
    /// Patches of the webhook configuration's caBundle.
    pub ca_bundle_patches: Family<ResultLabels, Counter>,
}

impl InjectMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "sidecar_injections",
            "Pods the webhook injected the sidecar into",
            m.injections.clone(),
        );
        registry.register(
            "sidecar_injection_skips",
            "Pods the webhook admitted unchanged, by reason",
            m.skips.clone(),
        );
        registry.register(
            "sidecar_injection_errors",
            "Webhook requests refused or answered with allowed=false, by reason",
            m.errors.clone(),
        );
        registry.register(
            "webhook_connections_accepted",
            "TLS connections accepted on the webhook port",
            m.listener.accepted.clone(),
        );
        registry.register(
            "webhook_connections_refused",
            "Connections to the webhook port closed before or during the TLS handshake, by reason",
            m.listener.refused.clone(),
        );
        registry.register(
            "ca_root_configmap_writes",
            "Writes of the isthmus-ca-root-cert ConfigMap into injected namespaces, by result",
            m.configmap_writes.clone(),
        );
        registry.register(
            "webhook_ca_bundle_patches",
            "Patches of the webhook configuration's caBundle to the mesh root, by result",
            m.ca_bundle_patches.clone(),
        );
        m
    }
}
