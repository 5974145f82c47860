//! Registry metrics that are not the CA's or the VM registrations': subscribers, pushes,
//! resource errors, store operations, VIP allocations. One prometheus registry per process,
//! every name under `isthmus_`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PushLabels {
    /// "snapshot", "delta" or "resume".
    pub r#type: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreOpLabels {
    pub op: &'static str,
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IgnoredLabels {
    pub source: &'static str,
    /// The document's kind (`VirtualService`, `Deployment`, …), as the operator wrote it.
    pub kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VipStateLabels {
    /// "active", or "released" (held for its hostname through the grace period).
    pub state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FollowLabels {
    /// "applied" (another registry's write, now in the views), "own" (this registry's write
    /// or an older one), "unchanged" (the views held it already) or "resync" (the whole
    /// store read again).
    pub outcome: &'static str,
}

#[derive(Debug, Clone)]
pub struct RegistryMetrics {
    pub subscribers: Family<KindLabels, Gauge>,
    pub pushes: Family<PushLabels, Counter>,
    pub push_latency: Histogram,
    pub watch_refused: Family<KindLabels, Counter>,
    pub resource_errors: Family<SourceLabels, Gauge>,
    pub resource_error_events: Family<SourceLabels, Counter>,
    pub ignored_documents: Family<IgnoredLabels, Gauge>,
    pub catalog_resources: Gauge,
    pub store_ops: Family<StoreOpLabels, Counter>,
    /// 1 while the store takes writes, 0 while they fail (a full disk, say).
    pub store_writable: Gauge,
    pub vips_allocated: Family<VipStateLabels, Gauge>,
    pub vip_allocation_failures: Counter,
    /// Changes read from a shared store's feed (etcd), by outcome.
    pub store_followed: Family<FollowLabels, Counter>,
    /// VIP allocations another registry of the set made first (this one took theirs).
    pub vip_allocations_lost: Counter,
}

impl Default for RegistryMetrics {
    fn default() -> Self {
        Self {
            subscribers: Default::default(),
            pushes: Default::default(),
            // 100 µs .. ~13 s
            push_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            watch_refused: Default::default(),
            resource_errors: Default::default(),
            resource_error_events: Default::default(),
            ignored_documents: Default::default(),
            catalog_resources: Default::default(),
            store_ops: Default::default(),
            store_writable: Default::default(),
            vips_allocated: Default::default(),
            vip_allocation_failures: Default::default(),
            store_followed: Default::default(),
            vip_allocations_lost: Default::default(),
        }
    }
}

impl RegistryMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "registry_subscribers",
            "Watch subscribers connected, by kind",
            m.subscribers.clone(),
        );
        registry.register(
            "registry_pushes",
            "Watch responses sent, by type",
            m.pushes.clone(),
        );
        registry.register(
            "registry_push_latency_seconds",
            "Time from a catalog change to the delta carrying it being handed to the subscriber's stream",
            m.push_latency.clone(),
        );
        registry.register(
            "registry_watch_refused",
            "Watch streams refused, by reason",
            m.watch_refused.clone(),
        );
        registry.register(
            "registry_resource_errors",
            "Problems currently found in the resource files (refused documents, unreadable files), by source",
            m.resource_errors.clone(),
        );
        registry.register(
            "registry_resource_error_events",
            "Times a source found invalid resources",
            m.resource_error_events.clone(),
        );
        registry.register(
            "registry_ignored_documents",
            "Documents of the resource files that are of kinds isthmus does not read, by source and kind",
            m.ignored_documents.clone(),
        );
        registry.register(
            "registry_catalog_resources",
            "Resources in the catalog",
            m.catalog_resources.clone(),
        );
        registry.register(
            "registry_store_operations",
            "Store operations, by operation and result",
            m.store_ops.clone(),
        );
        registry.register(
            "registry_store_changes_followed",
            "Changes read from a store several registries share (etcd), by outcome: applied (another registry's write), own, unchanged, resync",
            m.store_followed.clone(),
        );
        registry.register(
            "registry_vip_allocations_lost",
            "VIP allocations another registry sharing the store made first (this registry took theirs and planned again)",
            m.vip_allocations_lost.clone(),
        );
        registry.register(
            "registry_store_writable",
            "1 while the store takes writes, 0 while they fail (a full disk, an I/O error)",
            m.store_writable.clone(),
        );
        registry.register(
            "registry_vips_allocated",
            "VIP allocations held, by state",
            m.vips_allocated.clone(),
        );
        registry.register(
            "registry_vip_allocation_failures",
            "Hostnames left without a VIP because a pool was exhausted",
            m.vip_allocation_failures.clone(),
        );
        m
    }
}
