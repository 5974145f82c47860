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
        let current: BTreeMap<String, OwnedResource> = self
            .views
            .resources_with_origin(origin_prefix)
            .into_iter()
            .map(|r| (r.resource.key(), r))
            .collect();
        let wanted: BTreeMap<String, OwnedResource> = resources
            .into_iter()
            .map(|r| (r.resource.key(), r))
            .collect();
        let mut ops = Vec::new();
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        for (k, r) in &wanted {
            if current.get(k) != Some(r) {
                ops.push(Op::Put(
                    k.clone(),
                    pb::CatalogResource::from(r).encode_to_vec(),
                ));
                upserts.push(r.clone());
            }
        }
        for k in current.keys() {
            if !wanted.contains_key(k) {
                ops.push(Op::Delete(k.clone()));
                removals.push(k.clone());
            }
        }
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
