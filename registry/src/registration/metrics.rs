//! VM registration metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaseStateLabels {
    /// "connected", or "disconnected" (waiting out the grace period).
    pub state: &'static str,
}

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
    pub registrations: Family<LeaseStateLabels, Gauge>,
    pub accepted: Family<TakeoverLabels, Counter>,
    pub refused: Family<RefusedLabels, Counter>,
    pub expired: Counter,
}

impl RegistrationMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "registry_vm_registrations",
            "Registered VM entries, by lease state",
            m.registrations.clone(),
        );
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
        registry.register(
            "registry_vm_registrations_expired",
            "VM entries removed because their agent did not reconnect within the grace period",
            m.expired.clone(),
        );
        m
    }
}
