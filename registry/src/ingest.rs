//! Ingest: the one path by which resources reach the catalog. A source hands over the full
//! set it owns (or, if its resources change one at a time, just the changed ones); ingest
//! diffs it against what the catalog holds for that source, allocates or releases the VIPs
//! of the hostnames the difference adds or removes, writes both to the store (durably,
//! first), then to the views.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use isthmus_proto::drain;
use isthmus_proto::model::{OwnedResource, Resource, Service};
use isthmus_proto::pb;
use prost::Message;

use crate::metrics::{FollowLabels, RegistryMetrics, StoreOpLabels, VipStateLabels};
use crate::store::{Op, Store, StoreChange, StoreError, Table, VipWrite};
use crate::views::Views;
use crate::vips::{self, Allocation, VipChange, VipError, VipPlan};

#[derive(Debug, Clone)]
pub struct Ingest {
    store: Arc<dyn Store>,
    views: Arc<Views>,
    metrics: RegistryMetrics,
    /// One writer at a time: a VIP plan is made against the table as it stands and must be
    /// stored and applied before the next one is made, or two writers could hand the same
    /// address to two hostnames.
    writer: Arc<tokio::sync::Mutex<()>>,
}

/// Resources a change must touch before the allocator's free pages are handed back after
/// it: a large change leaves behind the encoded rows, the diff and the resources it
/// replaced (tens of MB for a catalog of 100,000 endpoints), which would otherwise stay
/// resident; a small one leaves nothing worth the walk over the free lists.
const RELEASE_AFTER_RESOURCES: usize = 1000;

fn release_after(resources: usize) {
    if resources >= RELEASE_AFTER_RESOURCES {
        isthmus_proto::allocator::release_free_memory();
    }
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
            writer: Arc::default(),
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

    /// Loads the VIP allocations and the catalog persisted by a previous run into the views.
    /// Entries that no longer decode are skipped with an error log, never fatal: the sources
    /// will rewrite them, and their hostnames get VIPs again.
    pub async fn load_from_store(&self) -> Result<usize, StoreError> {
        let _writer = self.writer.lock().await;
        let pools = self.views.with_vips(|v| *v.pools());
        let loaded = vips::load(self.store.as_ref(), pools).await;
        self.count("list", loaded.is_ok());
        let (mut table, problems) = loaded?;
        for e in problems {
            tracing::error!(error = %e, "skipping a stored VIP allocation");
        }
        let rows = self.store.list(Table::Catalog).await;
        self.count("list", rows.is_ok());
        let mut resources = Vec::new();
        let mut rekeyed = Vec::new();
        for (key, bytes) in rows? {
            match decode_resource(&bytes) {
                Ok(r) => {
                    if r.resource.key() != key {
                        rekeyed.push((key, r.resource.key(), bytes));
                    }
                    resources.push(r)
                }
                Err(e) => {
                    tracing::error!(%key, error = %e, "skipping a stored resource that does not decode")
                }
            }
        }
        self.rekey(rekeyed).await?;
        let n = resources.len();
        // Reconcile before anything is served: hostnames that want a VIP and have none get
        // one (say, a catalog stored before VIPs existed, or a write that failed halfway),
        // allocations of hostnames that went away are released (their grace starts now).
        let mut wants = vips::wants_by_hostname(resources.iter().filter_map(service));
        for a in table.iter() {
            wants.entry(a.hostname.clone()).or_insert(false);
        }
        let plan = table.plan(&wants, SystemTime::now());
        let writes = vips::writes(&plan.changes, &table);
        // On a shared store what another registry got in first is left out; its own
        // allocation reaches the views through the store's feed.
        let stored = self.store_vips(plan.changes, writes).await?;
        for c in &stored {
            if let Err(e) = table.apply(c) {
                tracing::error!(error = %e, "VIP change not applied");
            }
        }
        self.report_vip_failures(plan.failures);
        let allocations = table.iter().cloned().map(VipChange::Put).collect();
        self.views.apply(resources, Vec::new(), allocations);
        self.metrics
            .catalog_resources
            .set(self.views.with_catalog(|c| c.len()) as i64);
        self.update_vip_gauges();
        release_after(n);
        Ok(n)
    }

    /// Moves stored resources to the key they have now (a Service stored before its key
    /// named its namespace), so that removing one later removes the row it is stored under.
    async fn rekey(&self, rows: Vec<(String, String, Vec<u8>)>) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        tracing::info!(
            rows = rows.len(),
            "moving stored resources to their current catalog keys"
        );
        let mut ops = Vec::with_capacity(rows.len() * 2);
        for (old, new, bytes) in rows {
            ops.push(Op::Delete(old));
            ops.push(Op::Put(new, bytes));
        }
        let res = self.store.apply(Table::Catalog, ops).await;
        self.count("apply", res.is_ok());
        res
    }

    /// Makes the catalog's resources with an origin starting with `origin_prefix` exactly
    /// `resources`.
    pub async fn replace_origin(
        &self,
        origin_prefix: &str,
        resources: Vec<OwnedResource>,
    ) -> Result<IngestReport, StoreError> {
        let _writer = self.writer.lock().await;
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
        let upserts = changed.iter().filter_map(|k| wanted.remove(k)).collect();
        self.commit(upserts, removals, false).await
    }

    /// Changes some of a source's resources without handing over the rest: `upserts` (each
    /// with an origin starting with `origin_prefix`) are written where they differ from the
    /// catalog, `removals` (keys) are removed where the catalog holds them from this source.
    /// For sources whose resources change one at a time (VM registrations), so a change
    /// costs its own size rather than the size of the source.
    pub async fn update_origin(
        &self,
        origin_prefix: &str,
        upserts: Vec<OwnedResource>,
        removals: Vec<String>,
    ) -> Result<IngestReport, StoreError> {
        self.update(origin_prefix, upserts, removals, false).await
    }

    /// [`Self::update_origin`] for entries this registry holds while it lives (VM
    /// registrations; see [`Store::apply_held`]): on a shared store they go with this
    /// registry's lease, and a removal leaves an entry another registry took over.
    pub async fn update_held(
        &self,
        origin_prefix: &str,
        upserts: Vec<OwnedResource>,
        removals: Vec<String>,
    ) -> Result<IngestReport, StoreError> {
        self.update(origin_prefix, upserts, removals, true).await
    }

    /// Writes every entry this registry holds from `origin_prefix` again, changed or not
    /// (on a shared store, under its current lease), and removes `removals` it held: after
    /// a lost lease or failed writes, when the store may lack what the views show.
    pub async fn rewrite_held(
        &self,
        origin_prefix: &str,
        all: Vec<OwnedResource>,
        removals: Vec<String>,
    ) -> Result<IngestReport, StoreError> {
        let _writer = self.writer.lock().await;
        debug_assert!(all.iter().all(|r| r.origin.starts_with(origin_prefix)));
        let removals = self.views.with_catalog(|c| {
            removals
                .into_iter()
                .filter(|k| {
                    c.get(k)
                        .is_some_and(|r| r.origin.starts_with(origin_prefix))
                })
                .filter(|k| !all.iter().any(|r| &r.resource.key() == k))
                .collect()
        });
        self.commit(all, removals, true).await
    }

    /// Whether several registries share the store (see [`Store::shared`]).
    pub fn store_is_shared(&self) -> bool {
        self.store.shared()
    }

    /// See [`Store::lease_generation`].
    pub fn lease_generation(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.store.lease_generation()
    }

    async fn update(
        &self,
        origin_prefix: &str,
        upserts: Vec<OwnedResource>,
        removals: Vec<String>,
        held: bool,
    ) -> Result<IngestReport, StoreError> {
        let _writer = self.writer.lock().await;
        debug_assert!(upserts.iter().all(|r| r.origin.starts_with(origin_prefix)));
        // A held entry on a shared store is written even when the views hold the same: the
        // write puts it under this registry's lease (an agent that moved here from another
        // registry of the set).
        let keep_unchanged = held && self.store.shared();
        let (upserts, removals) = self.views.with_catalog(|c| {
            let upserts: Vec<OwnedResource> = upserts
                .into_iter()
                .filter(|r| keep_unchanged || c.get(&r.resource.key()) != Some(r))
                .collect();
            let removals = removals
                .into_iter()
                .filter(|k| {
                    c.get(k)
                        .is_some_and(|r| r.origin.starts_with(origin_prefix))
                })
                .filter(|k| !upserts.iter().any(|r| &r.resource.key() == k))
                .collect();
            (upserts, removals)
        });
        self.commit(upserts, removals, held).await
    }

    /// Stores and applies changed resources and removals, with the VIP changes they call
    /// for; `held` writes go through [`Store::apply_held`]. The caller holds the writer lock
    /// and has dropped what does not change.
    async fn commit(
        &self,
        upserts: Vec<OwnedResource>,
        mut removals: Vec<String>,
        held: bool,
    ) -> Result<IngestReport, StoreError> {
        let changed: Vec<String> = upserts.iter().map(|r| r.resource.key()).collect();
        let mut ops = Vec::with_capacity(changed.len() + removals.len());
        for (k, r) in changed.iter().zip(&upserts) {
            ops.push(Op::Put(
                k.clone(),
                pb::CatalogResource::from(r).encode_to_vec(),
            ));
        }
        ops.extend(removals.iter().map(|k| Op::Delete(k.clone())));
        let report = IngestReport {
            upserted: upserts.len(),
            removed: removals.len(),
        };
        if ops.is_empty() {
            return Ok(report);
        }
        // VIPs first: a hostname is never served without the VIP it is due. Should the
        // catalog write then fail, the source retries and the same plan comes out again.
        let mut plan = self.plan_vips(&upserts, &changed, &removals);
        let mut vip_changes = Vec::new();
        for attempt in 1.. {
            let wanted = plan.changes.len();
            let writes = self.views.with_vips(|t| vips::writes(&plan.changes, t));
            let stored = self.store_vips(plan.changes, writes).await?;
            if stored.len() == wanted || attempt == VIP_ATTEMPTS {
                vip_changes.extend(stored);
                break;
            }
            // Another registry of the set allocated first (for this hostname, or an address
            // this plan chose): take what is stored in, then plan again against it.
            self.views.apply(Vec::new(), Vec::new(), stored);
            self.refresh_vips().await?;
            plan = self.plan_vips(&upserts, &changed, &removals);
        }
        let res = if held {
            self.store.apply_held(Table::Catalog, ops).await
        } else {
            self.store
                .apply(Table::Catalog, ops)
                .await
                .map(|()| Vec::new())
        };
        self.count("apply", res.is_ok());
        let not_held = res?;
        if !not_held.is_empty() {
            // Another registry of the set holds these now; they stay, as it wrote them.
            removals.retain(|k| !not_held.contains(k));
        }
        let vips_changed = !vip_changes.is_empty();
        self.views.apply(upserts, removals, vip_changes);
        self.report_vip_failures(plan.failures);
        self.metrics
            .catalog_resources
            .set(self.views.with_catalog(|c| c.len()) as i64);
        if vips_changed {
            self.update_vip_gauges();
        }
        release_after(report.upserted + report.removed);
        Ok(report)
    }

    /// Follows a store several registries share (etcd): applies the other registries'
    /// writes of the catalog and the VIP table to the views as the store reports them, so
    /// every registry of the set serves the same catalog. Returns at once for a store only
    /// this registry writes; runs until `shutdown` otherwise.
    pub async fn follow_store(&self, shutdown: drain::Watch) {
        let Some(mut feed) = self.store.follow() else {
            return;
        };
        let stop = shutdown.signaled();
        tokio::pin!(stop);
        loop {
            let first = tokio::select! {
                _ = &mut stop => return,
                c = feed.recv() => match c {
                    Some(c) => c,
                    None => return,
                },
            };
            // What else is waiting goes in the same pass: one views update per burst.
            let mut batch = vec![first];
            while batch.len() < FOLLOW_BATCH {
                match feed.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            self.apply_followed(batch).await;
        }
    }

    async fn apply_followed(&self, batch: Vec<StoreChange>) {
        // Under the writer lock: this registry's own writes are in the views before their
        // changes are looked at, so `superseded` sees every one of them.
        let _writer = self.writer.lock().await;
        let mut catalog: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        let mut vips: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        let mut own = 0u64;
        for change in batch {
            match change {
                StoreChange::Resync => {
                    // Everything read so far is covered by reading the store whole.
                    catalog.clear();
                    vips.clear();
                    if let Err(e) = self.resync().await {
                        tracing::error!(error = %e, "cannot read the shared store again; retrying on its next change");
                    }
                    self.followed("resync", 1);
                }
                StoreChange::Key {
                    table,
                    key,
                    value,
                    revision,
                } => {
                    if self.store.superseded(table, &key, revision) {
                        own += 1;
                        continue;
                    }
                    match table {
                        Table::Catalog => catalog.insert(key, value),
                        Table::Vips => vips.insert(key, value),
                        Table::RedeemedTokens | Table::VipAddresses => continue,
                    };
                }
            }
        }
        self.followed("own", own);
        let (applied, unchanged) = self.apply_stored(catalog, vips, false);
        self.followed("applied", applied);
        self.followed("unchanged", unchanged);
    }

    /// Reads the catalog and VIP tables whole and makes the views match them.
    async fn resync(&self) -> Result<(), StoreError> {
        let vip_rows = self.store.list(Table::Vips).await;
        self.count("list", vip_rows.is_ok());
        let catalog_rows = self.store.list(Table::Catalog).await;
        self.count("list", catalog_rows.is_ok());
        let vips = vip_rows?.into_iter().map(|(k, v)| (k, Some(v))).collect();
        let catalog = catalog_rows?
            .into_iter()
            .map(|(k, v)| (k, Some(v)))
            .collect();
        let (applied, _) = self.apply_stored(catalog, vips, true);
        tracing::info!(
            applied,
            "read the shared store again after its change feed lost its place"
        );
        Ok(())
    }

    /// Applies stored rows (`None`: deleted) to the views where they differ; with `whole`,
    /// rows the views hold and the maps lack are removed too. Returns (changes applied,
    /// rows the views held already).
    fn apply_stored(
        &self,
        catalog: BTreeMap<String, Option<Vec<u8>>>,
        vips: BTreeMap<String, Option<Vec<u8>>>,
        whole: bool,
    ) -> (u64, u64) {
        let mut unchanged = 0u64;
        let (upserts, removals) = self.views.with_catalog(|c| {
            let mut upserts = Vec::new();
            let mut removals = Vec::new();
            for (key, value) in &catalog {
                match value.as_deref().map(decode_resource) {
                    Some(Ok(r)) if c.get(key) == Some(&r) => unchanged += 1,
                    Some(Ok(r)) => upserts.push(r),
                    Some(Err(e)) => {
                        tracing::error!(%key, error = %e, "skipping a stored resource that does not decode")
                    }
                    None if c.get(key).is_some() => removals.push(key.clone()),
                    None => unchanged += 1,
                }
            }
            if whole {
                removals.extend(
                    c.iter()
                        .filter(|(k, _)| !catalog.contains_key(*k))
                        .map(|(k, _)| k.clone()),
                );
            }
            (upserts, removals)
        });
        let vip_changes: Vec<VipChange> = self.views.with_vips(|t| {
            let mut changes = Vec::new();
            for (hostname, value) in &vips {
                match value.as_deref().map(|b| Allocation::decode(hostname, b)) {
                    Some(Ok(a)) if t.get(hostname) == Some(&a) => unchanged += 1,
                    Some(Ok(a)) => changes.push(VipChange::Put(a)),
                    Some(Err(e)) => tracing::error!(error = %e, "skipping a stored VIP allocation"),
                    None if t.get(hostname).is_some() => {
                        changes.push(VipChange::Free(hostname.clone()))
                    }
                    None => unchanged += 1,
                }
            }
            if whole {
                changes.extend(
                    t.iter()
                        .filter(|a| !vips.contains_key(&a.hostname))
                        .map(|a| VipChange::Free(a.hostname.clone())),
                );
            }
            changes
        });
        let applied = (upserts.len() + removals.len() + vip_changes.len()) as u64;
        if applied == 0 {
            return (0, unchanged);
        }
        // Frees first: another registry may have handed a freed address to a new hostname.
        let (frees, puts): (Vec<VipChange>, Vec<VipChange>) = vip_changes
            .into_iter()
            .partition(|c| matches!(c, VipChange::Free(_)));
        let vips_changed = !frees.is_empty() || !puts.is_empty();
        self.views.apply(Vec::new(), Vec::new(), frees);
        self.views.apply(upserts, removals, puts);
        self.metrics
            .catalog_resources
            .set(self.views.with_catalog(|c| c.len()) as i64);
        if vips_changed {
            self.update_vip_gauges();
        }
        (applied, unchanged)
    }

    fn followed(&self, outcome: &'static str, n: u64) {
        if n > 0 {
            self.metrics
                .store_followed
                .get_or_create(&FollowLabels { outcome })
                .inc_by(n);
        }
    }

    /// Frees the allocations released at least `grace` before `now`, then gives hostnames
    /// that found the pool full another chance. Returns how many allocations it freed.
    pub async fn free_expired_vips(
        &self,
        now: SystemTime,
        grace: Duration,
    ) -> Result<usize, StoreError> {
        let _writer = self.writer.lock().await;
        let expired = self.views.with_vips(|v| v.expired(now, grace));
        if expired.is_empty() {
            return Ok(0);
        }
        let writes = self.views.with_vips(|t| vips::writes(&expired, t));
        let expired = self.store_vips(expired, writes).await?;
        let freed = expired.len();
        self.views.apply(Vec::new(), Vec::new(), expired);
        let plan = self.views.with_catalog_and_vips(|catalog, table| {
            let wants = catalog
                .hostnames()
                .filter(|h| {
                    table.get(h).is_none() && vips::hostname_wants_vip(&catalog.service_defs(h))
                })
                .map(|h| (h.clone(), true))
                .collect();
            table.plan(&wants, now)
        });
        let writes = self.views.with_vips(|t| vips::writes(&plan.changes, t));
        let stored = self.store_vips(plan.changes, writes).await?;
        self.views.apply(Vec::new(), Vec::new(), stored);
        self.report_vip_failures(plan.failures);
        self.update_vip_gauges();
        Ok(freed)
    }

    /// The VIP changes a catalog change calls for: only the hostnames of the Services it
    /// upserts or removes are looked at, as they will be defined once it is applied.
    fn plan_vips(
        &self,
        upserts: &[OwnedResource],
        changed: &[String],
        removals: &[String],
    ) -> VipPlan {
        self.views.with_catalog_and_vips(|catalog, table| {
            let mut new_defs: BTreeMap<&str, Vec<&Service>> = BTreeMap::new();
            for s in upserts.iter().filter_map(service) {
                new_defs.entry(s.hostname.as_str()).or_default().push(s);
            }
            let mut touched: BTreeSet<&str> = new_defs.keys().copied().collect();
            touched.extend(
                removals
                    .iter()
                    .filter_map(|k| catalog.get(k).and_then(service))
                    .map(|s| s.hostname.as_str()),
            );
            if touched.is_empty() {
                return VipPlan::default();
            }
            let replaced: HashSet<&str> =
                removals.iter().chain(changed).map(String::as_str).collect();
            let wants = touched
                .into_iter()
                .map(|h| {
                    let mut defs: Vec<&Service> = catalog
                        .service_def_entries(h)
                        .into_iter()
                        .filter(|(k, _)| !replaced.contains(k.as_str()))
                        .map(|(_, s)| s)
                        .collect();
                    defs.extend(new_defs.get(h).into_iter().flatten());
                    (h.to_string(), vips::hostname_wants_vip(&defs))
                })
                .collect();
            table.plan(&wants, SystemTime::now())
        })
    }

    /// Stores VIP changes (`writes` is what [`vips::writes`] made of them); returns those
    /// stored, counting the ones another registry of a set got in first.
    async fn store_vips(
        &self,
        changes: Vec<VipChange>,
        writes: Vec<VipWrite>,
    ) -> Result<Vec<VipChange>, StoreError> {
        if changes.is_empty() {
            return Ok(changes);
        }
        let wanted = changes.len();
        let res = vips::persist(self.store.as_ref(), changes, writes).await;
        self.count("apply", res.is_ok());
        let stored = res?;
        let lost = wanted - stored.len();
        if lost > 0 {
            tracing::info!(
                lost,
                "another registry of the set allocated these VIPs first; taking its allocations"
            );
            self.metrics.vip_allocations_lost.inc_by(lost as u64);
        }
        Ok(stored)
    }

    /// Reads the VIP table from the store into the views (another registry's allocations
    /// the feed has not brought yet).
    async fn refresh_vips(&self) -> Result<(), StoreError> {
        let rows = self.store.list(Table::Vips).await;
        self.count("list", rows.is_ok());
        let rows = rows?.into_iter().map(|(k, v)| (k, Some(v))).collect();
        self.apply_stored(BTreeMap::new(), rows, false);
        Ok(())
    }

    /// A hostname the pool has no room for is served without a VIP; it gets one when it
    /// changes again or when the sweep frees addresses.
    fn report_vip_failures(&self, failures: Vec<VipError>) {
        for e in failures {
            tracing::error!(error = %e, "service left without a VIP");
            self.metrics.vip_allocation_failures.inc();
        }
    }

    fn update_vip_gauges(&self) {
        let (active, released) = self.views.with_vips(|v| v.counts());
        let set = |state, n: usize| {
            self.metrics
                .vips_allocated
                .get_or_create(&VipStateLabels { state })
                .set(n as i64)
        };
        set("active", active);
        set("released", released);
    }
}

/// Plans of one catalog change's VIPs tried against a shared store before the hostnames
/// still lost are left without a VIP until their next change or the sweep.
const VIP_ATTEMPTS: usize = 5;

/// Changes read from a shared store's feed applied in one pass at most.
const FOLLOW_BATCH: usize = 1024;

fn decode_resource(bytes: &[u8]) -> Result<OwnedResource, String> {
    pb::CatalogResource::decode(bytes)
        .map_err(|e| e.to_string())
        .and_then(|r| OwnedResource::try_from(r).map_err(|e| e.to_string()))
}

fn service(r: &OwnedResource) -> Option<&Service> {
    match &*r.resource {
        Resource::Service(s) => Some(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::tests::{svc, wl};
    use crate::store::EmbeddedStore;
    use crate::vips::{Allocation, DEFAULT_VIP_GRACE};

    #[tokio::test]
    async fn released_vips_are_freed_in_the_store_after_the_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let ingest = Ingest::new(
            store.clone(),
            Arc::new(Views::default()),
            RegistryMetrics::default(),
        );
        ingest
            .replace_origin("test", vec![svc("web.shop", "shop", "c", "web")])
            .await
            .unwrap();
        assert_eq!(store.list(Table::Vips).await.unwrap().len(), 1);
        ingest.replace_origin("test", vec![]).await.unwrap();
        let stored = store.get(Table::Vips, "web.shop").await.unwrap().unwrap();
        let released = Allocation::decode("web.shop", &stored).unwrap();
        assert!(!released.is_active());

        let now = SystemTime::now();
        assert_eq!(
            ingest
                .free_expired_vips(now, DEFAULT_VIP_GRACE)
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            ingest
                .free_expired_vips(now + DEFAULT_VIP_GRACE, DEFAULT_VIP_GRACE)
                .await
                .unwrap(),
            1
        );
        assert!(store.list(Table::Vips).await.unwrap().is_empty());
        assert!(ingest.views().with_vips(|v| v.is_empty()));
        assert_eq!(ingest.metrics.vip_allocation_failures.get(), 0);
    }

    #[tokio::test]
    async fn a_service_stored_under_its_old_key_moves_to_its_namespaced_key() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let web = svc("web.shop", "shop", "c", "web");
        // As a registry that keyed services by cluster and hostname wrote it.
        store
            .put(
                Table::Catalog,
                "Service/c/web.shop",
                pb::CatalogResource::from(&web).encode_to_vec(),
            )
            .await
            .unwrap();
        let ingest = Ingest::new(
            store.clone(),
            Arc::new(Views::default()),
            RegistryMetrics::default(),
        );
        assert_eq!(ingest.load_from_store().await.unwrap(), 1);
        let keys: Vec<String> = store
            .list(Table::Catalog)
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["Service/c/shop/web.shop/web"]);
        // Its source no longer has it: the stored row goes too, so it does not come back at
        // the next start.
        ingest.replace_origin("test", vec![]).await.unwrap();
        assert!(store.list(Table::Catalog).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn update_origin_changes_only_its_own_resources_and_only_what_differs() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let ingest = Ingest::new(
            store.clone(),
            Arc::new(Views::default()),
            RegistryMetrics::default(),
        );
        let with_origin = |mut r: OwnedResource, origin: &str| {
            r.origin = origin.into();
            r
        };
        let stat = with_origin(wl("a", "shop", "web", "10.0.0.1", "n"), "static:a.yaml");
        let vm = with_origin(wl("b", "shop", "web", "10.0.0.2", "n"), "vm:shop/g");
        ingest
            .replace_origin("static:", vec![stat.clone()])
            .await
            .unwrap();
        let report = ingest
            .update_origin("vm:", vec![vm.clone()], vec![stat.resource.key()])
            .await
            .unwrap();
        assert_eq!(
            report,
            IngestReport {
                upserted: 1,
                removed: 0
            },
            "another source's resource is not this source's to remove"
        );
        assert_eq!(store.list(Table::Catalog).await.unwrap().len(), 2);
        let report = ingest
            .update_origin("vm:", vec![vm.clone()], Vec::new())
            .await
            .unwrap();
        assert_eq!(
            report,
            IngestReport::default(),
            "unchanged: nothing written"
        );
        let report = ingest
            .update_origin("vm:", Vec::new(), vec![vm.resource.key()])
            .await
            .unwrap();
        assert_eq!(report.removed, 1);
        assert_eq!(
            ingest
                .views()
                .with_catalog(|c| c.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>()),
            vec![stat.resource.key()]
        );
        assert_eq!(store.list(Table::Catalog).await.unwrap().len(), 1);
    }
}
