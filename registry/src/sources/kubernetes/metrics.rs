//! The clusters' metrics, read from their status at scrape time (so they can never disagree
//! with `/debug/clusters`): synced, objects per kind, seconds stale, watch errors, resources.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::status::{now_ms, ClusterStatuses};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    cluster: String,
    kind: String,
}

/// Registers the clusters' metrics with the process's prometheus registry.
pub fn register(registry: &mut prometheus_client::registry::Registry, statuses: ClusterStatuses) {
    registry.register_collector(Box::new(ClusterCollector(statuses)));
}

#[derive(Debug)]
struct ClusterCollector(ClusterStatuses);

/// One per-cluster gauge's value, from the status and the time now (Unix ms).
type PerCluster = fn(&super::ClusterStatus, i64) -> f64;

impl Collector for ClusterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let all = self.0.snapshot();
        let now = now_ms();
        let per_cluster: [(&str, &str, PerCluster); 4] = [
            (
                "registry_cluster_synced",
                "1 once every kind of the cluster has been listed",
                |s, _| f64::from(u8::from(s.synced)),
            ),
            (
                "registry_cluster_stale_seconds",
                "How long the cluster's API server has been out of reach (0 while current); its endpoints are kept, marked stale",
                |s, now| {
                    if s.stale_since_ms == 0 {
                        0.0
                    } else {
                        (now - s.stale_since_ms).max(0) as f64 / 1000.0
                    }
                },
            ),
            (
                "registry_cluster_resources",
                "Catalog resources (services and workloads) the cluster contributes",
                |s, _| s.resources as f64,
            ),
            (
                "registry_cluster_problems",
                "Objects of the cluster the mapping could not take",
                |s, _| s.problems.len() as f64,
            ),
        ];
        for (name, help, value) in per_cluster {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for s in &all {
                let labels = ClusterLabels {
                    cluster: s.cluster.clone(),
                };
                ConstGauge::new(value(s, now)).encode(m.encode_family(&labels)?)?;
            }
        }
        let per_kind: [(&str, &str, MetricType); 2] = [
            (
                "registry_cluster_objects",
                "Objects per kind in the cluster's watch caches",
                MetricType::Gauge,
            ),
            (
                "registry_cluster_watch_errors",
                "Watch failures per kind (each is retried with back-off)",
                MetricType::Counter,
            ),
        ];
        for (name, help, kind_of_metric) in per_kind {
            let mut m = encoder.encode_descriptor(name, help, None, kind_of_metric)?;
            for s in &all {
                for (kind, k) in &s.kinds {
                    let labels = KindLabels {
                        cluster: s.cluster.clone(),
                        kind: kind.clone(),
                    };
                    let family = m.encode_family(&labels)?;
                    match kind_of_metric {
                        MetricType::Counter => ConstCounter::new(k.errors).encode(family)?,
                        _ => ConstGauge::new(k.objects as i64).encode(family)?,
                    }
                }
            }
        }
        Ok(())
    }
}
