//! VM registration metrics: registrations accepted (by how they took over an entry) and
//! refused (by reason). The entries' lease metrics are the source's
//! (`crate::sources::vm_registrations::metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TakeoverLabels {
    /// "new", "reconnected" (within the grace period) or "replaced" (a second stream).
    pub takeover: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Default)]
pub struct RegistrationMetrics {
    pub accepted: Family<TakeoverLabels, Counter>,
    pub refused: Family<RefusedLabels, Counter>,
}

impl RegistrationMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "registry_vm_registrations_accepted",
            "VM registrations accepted, by whether they took over an existing entry",
            m.accepted.clone(),
        );
        registry.register(
            "registry_vm_registrations_refused",
            "VM registrations refused, by reason",
            m.refused.clone(),
        );
        m
    }
}
