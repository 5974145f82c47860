//! The peers' metrics, read from their status at scrape time (so they can never disagree
//! with `/debug/peers`): connected, synced, seconds since the peer last confirmed its view,
//! seconds stale, what is imported, problems, snapshots and resumes.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::status::{PeerStatus, PeerStatuses};
use crate::sources::kubernetes::now_ms;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
}

/// Registers the peers' metrics with the process's prometheus registry.
pub fn register(registry: &mut prometheus_client::registry::Registry, statuses: PeerStatuses) {
    registry.register_collector(Box::new(PeerCollector(statuses)));
}

#[derive(Debug)]
struct PeerCollector(PeerStatuses);

fn seconds_since(ms: i64, now: i64) -> f64 {
    if ms == 0 {
        0.0
    } else {
        (now - ms).max(0) as f64 / 1000.0
    }
}

type PerPeer = fn(&PeerStatus, i64) -> f64;
type PerPeerCount = fn(&PeerStatus) -> u64;

impl Collector for PeerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let all = self.0.snapshot();
        let now = now_ms();
        let gauges: [(&str, &str, PerPeer); 7] = [
            (
                "registry_peer_connected",
                "1 while the peer's Watch stream is up",
                |s, _| f64::from(u8::from(s.connected)),
            ),
            (
                "registry_peer_synced",
                "1 once the peer's view has been imported",
                |s, _| f64::from(u8::from(s.synced)),
            ),
            (
                "registry_peer_sync_age_seconds",
                "Seconds since the peer last confirmed its view (0 before the first)",
                |s, now| seconds_since(s.last_sync_ms, now),
            ),
            (
                "registry_peer_stale_seconds",
                "How long the peer has been out of reach (0 while it answers); its services are kept, marked stale",
                |s, now| seconds_since(s.stale_since_ms, now),
            ),
            (
                "registry_peer_services",
                "Services imported from the peer",
                |s, _| s.services as f64,
            ),
            (
                "registry_peer_endpoints",
                "Endpoints imported from the peer",
                |s, _| s.endpoints as f64,
            ),
            (
                "registry_peer_problems",
                "What of the peer's view could not be imported",
                |s, _| s.problems.len() as f64,
            ),
        ];
        for (name, help, value) in gauges {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for s in &all {
                let labels = PeerLabels {
                    peer: s.peer.clone(),
                };
                ConstGauge::new(value(s, now)).encode(m.encode_family(&labels)?)?;
            }
        }
        let counters: [(&str, &str, PerPeerCount); 2] = [
            (
                "registry_peer_snapshots",
                "Full snapshots received from the peer",
                |s| s.snapshots,
            ),
            (
                "registry_peer_resumes",
                "Reconnects to the peer that resumed without a full resend",
                |s| s.resumes,
            ),
        ];
        for (name, help, value) in counters {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in &all {
                let labels = PeerLabels {
                    peer: s.peer.clone(),
                };
                ConstCounter::new(value(s)).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
