//! The agent's own metrics (`isthmus_vm_agent_*`); the data plane's are the proxy core's
//! (`isthmus_vm_agent_connections_total` and friends) and the DNS proxy's (`isthmus_dns_*`),
//! all on one `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

pub const PREFIX: &str = "isthmus_vm_agent";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: String,
}

impl Outcome {
    pub fn ok() -> Self {
        Self {
            outcome: "ok".into(),
        }
    }
    pub fn error() -> Self {
        Self {
            outcome: "error".into(),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

#[derive(Debug, Clone, Default)]
pub struct AgentMetrics {
    pub cert_expiry_seconds: Gauge<f64, AtomicU64>,
    pub renewals: Family<Outcome, Counter>,
    /// 1 while the registration stream is open.
    pub registered: Gauge,
    /// 1 while the readiness probe passes (or the group has none).
    pub app_healthy: Gauge,
    pub probes: Family<Outcome, Counter>,
    pub registration_attempts: Family<Outcome, Counter>,
    /// 1 while the capture rules are in place (nftables mode).
    pub capture_installed: Gauge,
    pub captured_addresses: Gauge,
    /// 1 while the data plane passes the agent's self-check.
    pub data_plane_healthy: Gauge,
    pub data_plane_failures: Family<Reason, Counter>,
    pub snapshot_writes: Family<Outcome, Counter>,
}

impl AgentMetrics {
    pub fn register(r: &mut Registry) -> Self {
        let m = Self::default();
        let r = r.sub_registry_with_prefix(PREFIX);
        r.register(
            "certificate_expiry_seconds",
            "Seconds until the VM's certificate expires",
            m.cert_expiry_seconds.clone(),
        );
        r.register(
            "certificate_renewals",
            "Certificate renewals by outcome",
            m.renewals.clone(),
        );
        r.register(
            "registered",
            "1 while the registration stream to the registry is open",
            m.registered.clone(),
        );
        r.register(
            "app_healthy",
            "1 while the readiness probe passes (or the group has no probe)",
            m.app_healthy.clone(),
        );
        r.register(
            "probes",
            "Readiness probe runs by outcome",
            m.probes.clone(),
        );
        r.register(
            "registration_attempts",
            "Registration stream openings by outcome",
            m.registration_attempts.clone(),
        );
        r.register(
            "capture_installed",
            "1 while the nftables capture rules are in place",
            m.capture_installed.clone(),
        );
        r.register(
            "captured_addresses",
            "Service addresses (VIPs) outbound capture redirects",
            m.captured_addresses.clone(),
        );
        r.register(
            "data_plane_healthy",
            "1 while the data plane passes the self-check (listeners, DNS, capture rules)",
            m.data_plane_healthy.clone(),
        );
        r.register(
            "data_plane_failures",
            "Failed data plane self-checks by reason",
            m.data_plane_failures.clone(),
        );
        r.register(
            "snapshot_writes",
            "Catalog snapshot writes to the state directory by outcome",
            m.snapshot_writes.clone(),
        );
        m
    }
}
