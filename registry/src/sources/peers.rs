//! Peering: importing what another cluster's registry exports, Istio's multi-primary model
//! without a shared store. Each `--peer` is followed over the Watch like any data plane
//! follows its registry (the same client: back-off, resume by version and digest, failover
//! across the peer's set), authenticated with this registry's own identity, as a subscriber
//! of kind `peer`. What the peer exports is its own services (never what it imported
//! itself, so peering cannot loop) with every endpoint as the workload it is, and the
//! networks those endpoints are on with their gateways (see
//! [`crate::views::build_export_view`]).
//!
//! The import goes into the catalog under the origin `peer:<name>/`: services, one workload
//! per service endpoint, and networks, so that this registry's views route to them as to any
//! remote endpoint, through the gateways of their networks. A peer out of reach keeps its
//! resources, marked stale since it was lost (with the age every view entry then carries),
//! until it answers again. A resource this registry has from its own sources wins over a
//! peer's with the same key, and the clash is reported in the peer's status.

mod convert;
pub mod metrics;
mod status;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use isthmus_proto::drain;
use isthmus_proto::grpc::ConnectError;
use isthmus_proto::model::{Node, NodeKind, OwnedResource, ViewResource};
use isthmus_proto::subscription::{self, LocalView, SyncState, WatchClient, WatchOptions};

pub use status::{PeerStatus, PeerStatuses};

use crate::catalog::PEER_ORIGIN_PREFIX;
use crate::ingest::Ingest;
use crate::sources::kubernetes::now_ms;

/// Every imported resource has the origin `peer:<name>/`.
pub const ORIGIN_PREFIX: &str = PEER_ORIGIN_PREFIX;

/// How often a peer's import is looked at besides its changes: to retry a failed write and
/// to notice a peer lost.
const TICK: Duration = Duration::from_secs(2);
/// On a store several registries share (each of a set importing the same peer), how often a
/// registry that follows the peer writes its whole import again where the catalog differs:
/// another registry of the set that lost the peer marked it stale for all of them, and
/// nothing else would undo that while this one's view does not change.
const SHARED_STORE_REASSERT: Duration = Duration::from_secs(30);

/// The origin of peer `name`'s resources.
pub fn origin(name: &str) -> String {
    format!("{ORIGIN_PREFIX}{name}/")
}

/// One `--peer`: a name (the origin of what it brings, the label of its metrics) and the
/// addresses of its registry set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub name: String,
    /// `host:port`, comma-separated when the peer runs a set of registries.
    pub addresses: String,
}

impl PeerSpec {
    /// `[NAME=]ADDR[,ADDR…]`; without a name, the peer is named by its first address.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (name, addresses) = match s.split_once('=') {
            Some((n, a)) => (n.trim().to_string(), a.trim()),
            None => (
                isthmus_proto::registries::entries(s)
                    .first()
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
                s.trim(),
            ),
        };
        let name_ok = !name.is_empty()
            && name.len() <= 253
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b));
        if !name_ok {
            return Err(format!(
                "{s:?}: the peer's name {name:?} must be 1 to 253 letters, digits, '-', '.', '_', ':', '[' or ']'"
            ));
        }
        isthmus_proto::grpc::check_address(addresses).map_err(|e| format!("{s:?}: {e}"))?;
        Ok(Self {
            name,
            addresses: addresses.to_string(),
        })
    }
}

/// The client TLS config a registry presents to its peers: its own identity, issued by its
/// cluster's intermediate (kept current by the caller).
pub type ClientTls = Arc<dyn Fn() -> Arc<rustls::ClientConfig> + Send + Sync>;

/// What the importers need from the registry.
#[derive(Clone)]
pub struct PeerContext {
    pub ingest: Ingest,
    pub tls: ClientTls,
    pub statuses: PeerStatuses,
    /// How this registry names itself to its peers (its cluster and network).
    pub cluster: String,
    pub network: String,
}

/// Removes what peers no longer configured left in the store (a `--peer` dropped between
/// runs): the catalog keeps only what configured peers bring.
pub async fn forget_unconfigured(ingest: &Ingest, peers: &[PeerSpec]) {
    let configured: BTreeSet<String> = peers.iter().map(|p| origin(&p.name)).collect();
    let left: BTreeSet<String> = ingest
        .views()
        .resources_with_origin(ORIGIN_PREFIX)
        .into_iter()
        .map(|r| r.origin)
        .filter(|o| !configured.contains(o))
        .collect();
    for o in left {
        match ingest.replace_origin(&o, Vec::new()).await {
            Ok(r) => {
                tracing::info!(origin = %o, removed = r.removed, "removed the resources of a peer no longer configured")
            }
            Err(e) => {
                tracing::warn!(origin = %o, error = %e, "cannot remove the resources of a peer no longer configured")
            }
        }
    }
}

/// Follows peer `spec` until `shutdown`, keeping its import in the catalog.
pub async fn run(spec: PeerSpec, ctx: PeerContext, shutdown: drain::Watch) {
    let node = Node {
        id: format!("registry.{}", ctx.cluster),
        kind: NodeKind::Peer,
        network: ctx.network.clone(),
        cluster: ctx.cluster.clone(),
        locality: Default::default(),
    };
    ctx.statuses.update(&spec.name, |s| {
        s.addresses = spec.addresses.clone();
    });
    let client = WatchClient::new(
        connector(&spec.addresses, ctx.tls.clone()),
        node,
        None,
        WatchOptions::default(),
    )
    .following(&spec.addresses);
    let sync = client.state();
    let client_stop = shutdown.clone();
    let client_task = tokio::spawn(async move { client.run(client_stop).await });
    let import = Arc::new(tokio::sync::Mutex::new(Import::new(spec, ctx)));
    subscription::follow(sync, shutdown, Some(TICK), |state, _| {
        let import = import.clone();
        async move { import.lock().await.turn(state).await }
    })
    .await;
    let _ = client_task.await;
}

/// Connects to the peer's set with the client TLS config [`PeerContext::tls`] gives at
/// that moment.
fn connector(
    addresses: &str,
    tls: ClientTls,
) -> impl Fn() -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<tonic::transport::Channel, ConnectError>> + Send>,
> + Send
       + Sync
       + 'static {
    let addresses = addresses.to_string();
    move || {
        let tls = tls();
        let addresses = addresses.clone();
        Box::pin(async move { isthmus_proto::grpc::connect(&addresses, tls).await })
    }
}

/// One peer's import: what of its view is in the catalog, and under which keys.
struct Import {
    spec: PeerSpec,
    ctx: PeerContext,
    origin: String,
    /// The view last imported.
    view: Arc<LocalView>,
    /// View key -> the catalog keys imported from it.
    imported: HashMap<String, Vec<String>>,
    /// View key -> clashes with this registry's own resources.
    clashes: BTreeMap<String, Vec<String>>,
    /// Unix ms since which the peer has been out of reach (0 while it answers).
    stale_since_ms: i64,
    /// The catalog may differ from the view (nothing imported yet, a failed write, a new
    /// staleness mark): the next turn imports the whole view.
    whole: bool,
    /// When the whole view was last imported.
    whole_at: Instant,
    /// What the catalog held of this peer before it first answered (from the store) has
    /// been marked stale.
    restored_marked: bool,
}

impl Import {
    fn new(spec: PeerSpec, ctx: PeerContext) -> Self {
        Self {
            origin: origin(&spec.name),
            spec,
            ctx,
            view: Arc::default(),
            imported: HashMap::new(),
            clashes: BTreeMap::new(),
            stale_since_ms: 0,
            whole: true,
            whole_at: Instant::now(),
            restored_marked: false,
        }
    }

    async fn turn(&mut self, state: Arc<SyncState>) {
        {
            let now = now_ms();
            if state.connected {
                if self.stale_since_ms != 0 {
                    tracing::info!(peer = %self.spec.name, stale_for_ms = now - self.stale_since_ms, "peer back; its services are current again");
                    self.stale_since_ms = 0;
                    self.whole = true;
                }
            } else if state.last_error.is_some() && self.stale_since_ms == 0 {
                // Lost, or never reached: what it brought is kept, marked stale from now.
                self.stale_since_ms = now;
                self.whole = true;
                tracing::warn!(peer = %self.spec.name, error = state.last_error.as_deref().unwrap_or(""), "peer out of reach; keeping its services, marked stale");
            }
            if state.connected
                && self.ctx.ingest.store_is_shared()
                && self.whole_at.elapsed() >= SHARED_STORE_REASSERT
            {
                self.whole = true;
            }
            if state.synced() {
                if self.whole || !Arc::ptr_eq(&self.view, &state.view) {
                    self.import(state.view.clone()).await;
                }
            } else if self.stale_since_ms != 0 && !self.restored_marked {
                self.mark_restored_stale().await;
            }
            self.report(&state, now);
        }
    }

    /// Brings the catalog to `view`: the keys that changed since the last import, or the
    /// whole view when [`Self::whole`] is set.
    async fn import(&mut self, view: Arc<LocalView>) {
        let whole = self.whole;
        let changed: Vec<&String> = if whole {
            view.resources.keys().collect()
        } else {
            view.resources
                .iter()
                .filter(|(k, r)| self.view.resources.get(*k) != Some(*r))
                .map(|(k, _)| k)
                .collect()
        };
        let gone: Vec<String> = self
            .view
            .resources
            .keys()
            .filter(|k| !view.resources.contains_key(*k))
            .cloned()
            .collect();
        let mut converted: Vec<(String, Vec<OwnedResource>)> = changed
            .into_iter()
            .map(|k| {
                let rs = convert::resources(&self.origin, &view.resources[k], self.stale_since_ms);
                (k.clone(), rs)
            })
            .collect();
        // This registry's own resources win over the peer's of the same key.
        let mut clashes: Vec<(String, Vec<String>)> = Vec::new();
        self.ctx.ingest.views().with_catalog(|c| {
            for (vk, rs) in &mut converted {
                let mut found = Vec::new();
                rs.retain(|r| {
                    let key = r.resource.key();
                    match c.get(&key) {
                        Some(held) if !held.origin.starts_with(&self.origin) => {
                            found.push(format!(
                                "{key}: this registry's own (from {}) is kept",
                                held.origin
                            ));
                            false
                        }
                        _ => true,
                    }
                });
                clashes.push((vk.clone(), found));
            }
        });
        for (vk, found) in clashes {
            if found.is_empty() {
                self.clashes.remove(&vk);
            } else {
                self.clashes.insert(vk, found);
            }
        }
        for k in &gone {
            self.clashes.remove(k);
        }
        let mut keys_now: HashMap<String, Vec<String>> = HashMap::new();
        let mut upserts = Vec::new();
        for (vk, rs) in converted {
            keys_now.insert(vk, rs.iter().map(|r| r.resource.key()).collect());
            upserts.extend(rs);
        }
        let result = if whole {
            self.ctx
                .ingest
                .replace_origin(&self.origin, upserts)
                .await
                .map(|_| ())
        } else {
            let mut removals = Vec::new();
            for k in &gone {
                removals.extend(self.imported.get(k).into_iter().flatten().cloned());
            }
            for (vk, now) in &keys_now {
                if let Some(before) = self.imported.get(vk) {
                    removals.extend(before.iter().filter(|k| !now.contains(k)).cloned());
                }
            }
            self.ctx
                .ingest
                .update_origin(&self.origin, upserts, removals)
                .await
                .map(|_| ())
        };
        match result {
            Ok(()) => {
                if whole {
                    self.whole_at = Instant::now();
                    self.imported = keys_now;
                } else {
                    for k in &gone {
                        self.imported.remove(k);
                    }
                    self.imported.extend(keys_now);
                }
                self.view = view;
                self.whole = false;
                self.restored_marked = true;
            }
            Err(e) => {
                tracing::warn!(peer = %self.spec.name, error = %e, "cannot store the peer's services; retrying");
                self.whole = true;
            }
        }
    }

    /// Marks what the catalog holds of this peer from an earlier run stale, while the peer
    /// has not answered yet.
    async fn mark_restored_stale(&mut self) {
        let held = self.ctx.ingest.views().resources_with_origin(&self.origin);
        let marked: Vec<OwnedResource> = held
            .into_iter()
            .filter_map(|r| convert::marked_stale(&r, self.stale_since_ms))
            .collect();
        if marked.is_empty() {
            self.restored_marked = true;
            return;
        }
        match self
            .ctx
            .ingest
            .update_origin(&self.origin, marked, Vec::new())
            .await
        {
            Ok(_) => self.restored_marked = true,
            Err(e) => {
                tracing::warn!(peer = %self.spec.name, error = %e, "cannot mark the peer's stored services stale; retrying")
            }
        }
    }

    fn report(&self, state: &SyncState, now: i64) {
        let ms = |t: Option<SystemTime>| {
            t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0)
        };
        let (mut services, mut networks) = (0, 0);
        let mut clusters = BTreeSet::new();
        let mut endpoints = 0;
        for r in self.view.resources.values() {
            match r {
                ViewResource::Service(sv) => {
                    services += 1;
                    endpoints += sv.endpoints.len();
                    clusters.extend(sv.endpoints.iter().map(|e| e.cluster.clone()));
                }
                ViewResource::Network(_) => networks += 1,
            }
        }
        clusters.remove("");
        let mut problems: Vec<String> = self.clashes.values().flatten().cloned().collect();
        if clusters.contains(&self.ctx.cluster) {
            problems.push(format!(
                "the peer exports endpoints of cluster {:?}, this registry's own cluster: cluster names must differ across peered registries",
                self.ctx.cluster
            ));
        }
        self.ctx.statuses.update(&self.spec.name, |s| {
            s.connected = state.connected;
            s.following = state.registry.clone();
            if state.synced() && s.synced_at_ms == 0 {
                s.synced_at_ms = now;
            }
            s.synced = state.synced();
            s.last_sync_ms = ms(state.last_sync);
            s.snapshots = state.snapshots;
            s.resumes = state.resumes;
            // The error while it applies (the client clears it once the peer answers);
            // `last_error_ms` keeps when the last one began.
            if state.last_error.is_some() && s.last_error != state.last_error {
                s.last_error_ms = now;
            }
            s.last_error = state.last_error.clone();
            s.stale_since_ms = self.stale_since_ms;
            s.version = self.view.version.clone();
            s.services = services;
            s.endpoints = endpoints;
            s.networks = networks;
            s.clusters = clusters.into_iter().collect();
            s.problems = problems;
        });
    }
}
