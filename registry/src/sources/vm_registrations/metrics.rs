//! VM lease metrics: how many entries are held, by lease state, and how many expired. The
//! source owns them because it owns the leases; the Registration service counts its own
//! accepts and refusals (`crate::registration::metrics`).

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

#[derive(Debug, Clone, Default)]
pub struct LeaseMetrics {
    pub registrations: Family<LeaseStateLabels, Gauge>,
    pub expired: Counter,
}

impl LeaseMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "registry_vm_registrations",
            "Registered VM entries, by lease state",
            m.registrations.clone(),
        );
        registry.register(
            "registry_vm_registrations_expired",
            "VM entries removed because their agent did not reconnect within the grace period",
            m.expired.clone(),
        );
        m
    }
}
