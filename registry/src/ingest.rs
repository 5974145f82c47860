//! Ingest: the one path by which resources reach the catalog. A source hands over the full
//! set it owns; ingest diffs it against what the catalog holds for that source, writes the
//! difference to the store (durably, first), then to the views.

use std::collections::BTreeMap;
use std::sync::Arc;

use isthmus_proto::model::OwnedResource;
use isthmus_proto::pb;
use prost::Message;

use crate::metrics::{RegistryMetrics, StoreOpLabels};
use crate::store::{Op, Store, StoreError, Table};
use crate::views::Views;

#[derive(Debug, Clone)]
pub struct Ingest {
    store: Arc<dyn Store>,
    views: Arc<Views>,
    metrics: RegistryMetrics,
}

/// What one `replace_origin` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IngestReport {
    pub upserted: usize,
    pub removed: usize,
}

impl Ingest {
    pub fn new(store: Arc<dyn Store>, views: Arc<Views>, metrics: RegistryMetrics) -> Self {
        Self {
            store,
            views,
            metrics,
        }
    }

    pub fn views(&self) -> &Arc<Views> {
        &self.views
    }

    fn count(&self, op: &'static str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.metrics
            .store_ops
            .get_or_create(&StoreOpLabels { op, result })
            .inc();
    }

    /// Loads the catalog persisted by a previous run into the views. Entries that no longer
    /// decode are skipped with an error log, never fatal: the sources will rewrite them.
    pub async fn load_from_store(&self) -> Result<usize, StoreError> {
        let rows = self.store.list(Table::Catalog).await;
        self.count("list", rows.is_ok());
        let mut resources = Vec::new();
        for (key, bytes) in rows? {
            match pb::CatalogResource::decode(bytes.as_slice())
                .map_err(|e| e.to_string())
                .and_then(|r| OwnedResource::try_from(r).map_err(|e| e.to_string()))
            {
                Ok(r) => resources.push(r),
                Err(e) => {
                    tracing::error!(%key, error = %e, "skipping a stored resource that does not decode")
                }
            }
        }
        let n = resources.len();
        self.views.apply(resources, Vec::new());
        self.metrics
            .catalog_resources
            .set(self.views.with_catalog(|c| c.len()) as i64);
        Ok(n)
    }

    /// Makes the catalog's resources with an origin starting with `origin_prefix` exactly
    /// `resources`.
    pub async fn replace_origin(
        &self,
        origin_prefix: &str,
        resources: Vec<OwnedResource>,
    ) -> Result<IngestReport, StoreError> {
        let mut wanted: BTreeMap<String, OwnedResource> = resources
            .into_iter()
            .map(|r| (r.resource.key(), r))
            .collect();
        // Diff against the catalog in place: no copy of what the source already had.
        let (changed, removals): (Vec<String>, Vec<String>) = self.views.with_catalog(|c| {
            let changed = wanted
                .iter()
                .filter(|(k, r)| c.get(k) != Some(*r))
                .map(|(k, _)| k.clone())
                .collect();
            let removals = c
                .iter()
                .filter(|(k, r)| r.origin.starts_with(origin_prefix) && !wanted.contains_key(*k))
                .map(|(k, _)| k.clone())
                .collect();
            (changed, removals)
        });
        let mut ops = Vec::with_capacity(changed.len() + removals.len());
        for k in &changed {
            ops.push(Op::Put(
                k.clone(),
                pb::CatalogResource::from(&wanted[k]).encode_to_vec(),
            ));
        }
        ops.extend(removals.iter().map(|k| Op::Delete(k.clone())));
        let upserts: Vec<OwnedResource> = changed.iter().filter_map(|k| wanted.remove(k)).collect();
        let report = IngestReport {
            upserted: upserts.len(),
            removed: removals.len(),
        };
        if ops.is_empty() {
            return Ok(report);
        }
        let res = self.store.apply(Table::Catalog, ops).await;
        self.count("apply", res.is_ok());
        res?;
        self.views.apply(upserts, removals);
        self.metrics
            .catalog_resources
            .set(self.views.with_catalog(|c| c.len()) as i64);
        Ok(report)
    }
}
