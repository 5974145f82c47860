//! One cluster: connect, discover which Istio kinds it serves, start its watchers, and map
//! what they report into the catalog under the origin `kube:<cluster>/`. Changes are mapped
//! per Service (or per Istio object) as they come; a complete list (the first sync, a relist
//! after a watch expired, a restarted API server) maps everything again and lets ingest's
//! diff keep what did not change, so subscribers see no churn. A probe of the API server
//! decides when the cluster is out of reach: its endpoints then stay, marked stale since
//! that moment, until it is back (or until `stale_after`, if set, drops them).

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use isthmus_proto::backoff::Backoff;
use isthmus_proto::model::{OwnedResource, Resource};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::mapping::{self, labels, ClusterContext};
use super::status::now_ms;
use super::watchers::{self, Msg, Stores, Touched};
use super::{origin, Shared};
use crate::sources::static_files::{parse_file, SourceDefaults};
use isthmus_proto::program::error_chain;

/// A cluster to watch: its id, its network, and how to reach its API server.
#[derive(Clone)]
pub struct ClusterSpec {
    pub id: String,
    pub network: String,
    /// Where the credentials come from, for the status (`kubeconfig FILE`, `secret NS/NAME`).
    pub credentials: String,
    pub config: kube::Config,
}

impl std::fmt::Debug for ClusterSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSpec")
            .field("id", &self.id)
            .field("network", &self.network)
            .field("credentials", &self.credentials)
            .field("server", &self.config.cluster_url.to_string())
            .finish()
    }
}

/// What one unit of mapping is: a Kubernetes Service with its endpoints, or one Istio or
/// isthmus object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Unit {
    Service {
        namespace: String,
        name: String,
    },
    Object {
        kind: &'static str,
        namespace: String,
        name: String,
    },
}

/// What a batch of events calls for.
#[derive(Debug, Default)]
struct Dirty {
    units: BTreeSet<Unit>,
    pods: BTreeSet<(String, String)>,
    all: bool,
}

/// Runs one cluster until `stop` fires: connects (retrying with back-off), then maps.
pub(super) async fn run(
    spec: ClusterSpec,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    shared.statuses.update(&spec.id, |s| {
        s.network = spec.network.clone();
        s.credentials = spec.credentials.clone();
        s.server = spec.config.cluster_url.to_string();
    });
    let mut cluster = Cluster::new(spec, shared);
    loop {
        let connected = tokio::select! {
            r = cluster.connect() => r,
            _ = stop.changed() => return,
        };
        match connected {
            Ok((client, stores, rx, tasks)) => {
                cluster.serve(client, stores, rx, tasks, &mut stop).await;
                return;
            }
            Err(e) => {
                cluster.failed("connecting", e);
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

struct Cluster {
    spec: ClusterSpec,
    shared: Arc<Shared>,
    origin: String,
    /// Catalog keys each unit gave the last time it was mapped.
    emitted: HashMap<Unit, Vec<String>>,
    /// Kinds listed at least once; mapping waits for all of them.
    listed: BTreeSet<&'static str>,
    kinds: Vec<&'static str>,
    synced: bool,
    stale_since_ms: i64,
    dropped: bool,
    last_watch_error_ms: i64,
}

type Connected = (Client, Stores, mpsc::UnboundedReceiver<Msg>, JoinSet<()>);

impl Cluster {
    fn new(spec: ClusterSpec, shared: Arc<Shared>) -> Self {
        let origin = origin(&spec.id);
        Self {
            spec,
            shared,
            origin,
            emitted: HashMap::new(),
            listed: BTreeSet::new(),
            kinds: Vec::new(),
            synced: false,
            stale_since_ms: 0,
            dropped: false,
            last_watch_error_ms: 0,
        }
    }

    /// A client, the Istio kinds the cluster serves, and the watchers started.
    async fn connect(&mut self) -> Result<Connected, String> {
        let client = Client::try_from(self.spec.config.clone()).map_err(|e| error_chain(&e))?;
        let mut objects =
            watchers::discover(&client, watchers::ISTIO_GROUP, watchers::ISTIO_KINDS).await?;
        objects.extend(
            watchers::discover(&client, watchers::ISTHMUS_GROUP, watchers::ISTHMUS_KINDS).await?,
        );
        let served: Vec<&str> = objects.iter().map(|(k, _)| *k).collect();
        self.shared.statuses.update(&self.spec.id, |s| {
            for k in watchers::ISTIO_KINDS.iter().chain(watchers::ISTHMUS_KINDS) {
                s.kinds.entry(k.to_string()).or_default().not_installed = !served.contains(k);
            }
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let mut tasks = JoinSet::new();
        let stores = watchers::start(
            &client,
            &objects,
            self.shared.settings.watch_timeout,
            tx,
            &mut tasks,
        );
        self.kinds = ["Service", "EndpointSlice", "Pod", "Node", "Namespace"]
            .into_iter()
            .chain(served.iter().map(|k| {
                let k: &'static str = watchers::ISTIO_KINDS
                    .iter()
                    .chain(watchers::ISTHMUS_KINDS)
                    .find(|x| *x == k)
                    .expect("a kind of ours");
                k
            }))
            .collect();
        for k in &self.kinds {
            self.shared.statuses.update(&self.spec.id, |s| {
                s.kinds.entry(k.to_string()).or_default();
            });
        }
        Ok((client, stores, rx, tasks))
    }

    /// Maps events until `stop` fires; probes the API server meanwhile.
    async fn serve(
        &mut self,
        client: Client,
        stores: Stores,
        mut rx: mpsc::UnboundedReceiver<Msg>,
        tasks: JoinSet<()>,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) {
        let _tasks = tasks; // dropped (and aborted) when this returns
        let mut probe = tokio::time::interval(self.shared.settings.probe_interval);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut dirty = Dirty::default();
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { return };
                    self.take(msg, &mut dirty);
                    while let Ok(msg) = rx.try_recv() {
                        self.take(msg, &mut dirty);
                    }
                }
                _ = probe.tick() => {
                    self.probe(&client, &mut dirty).await;
                }
                _ = stop.changed() => return,
            }
            self.update_counts(&stores);
            if self.synced && !self.dropped {
                self.map(&stores, dirty).await;
            }
        }
    }

    /// Notes one watcher message in the status and in `dirty`.
    fn take(&mut self, msg: Msg, dirty: &mut Dirty) {
        let now = now_ms();
        let id = self.spec.id.clone();
        match msg {
            Msg::Changed(kind, touched) => {
                self.shared.statuses.update(&id, |s| {
                    s.kinds.entry(kind.to_string()).or_default().last_event_ms = now;
                });
                match touched {
                    Touched::Service { namespace, name } => {
                        dirty.units.insert(Unit::Service { namespace, name });
                    }
                    Touched::Pod { namespace, name } => {
                        dirty.pods.insert((namespace, name));
                    }
                    Touched::Node | Touched::Namespace(_) => dirty.all = true,
                    Touched::Object {
                        kind,
                        namespace,
                        name,
                    } => {
                        dirty.units.insert(Unit::Object {
                            kind,
                            namespace,
                            name,
                        });
                    }
                }
            }
            Msg::Listed(kind) => {
                self.listed.insert(kind);
                self.shared.statuses.update(&id, |s| {
                    let k = s.kinds.entry(kind.to_string()).or_default();
                    k.synced = true;
                    k.lists += 1;
                    k.last_event_ms = now;
                });
                dirty.all = true;
                if !self.synced && self.kinds.iter().all(|k| self.listed.contains(k)) {
                    self.synced = true;
                    self.shared.statuses.update(&id, |s| {
                        s.synced = true;
                        s.synced_at_ms = now;
                        s.last_error = None;
                    });
                    tracing::info!(cluster = %id, "cluster synced");
                }
            }
            Msg::Failed(kind, error) => {
                self.last_watch_error_ms = now;
                self.shared.statuses.update(&id, |s| {
                    let k = s.kinds.entry(kind.to_string()).or_default();
                    k.errors += 1;
                    k.last_error = Some(error.clone());
                    s.reconnects += 1;
                    s.last_error = Some(format!("watching {kind}: {error}"));
                    s.last_error_ms = now;
                });
                tracing::warn!(cluster = %id, kind, %error, "watch failed; retrying");
            }
        }
    }

    fn failed(&self, what: &str, error: String) {
        tracing::warn!(cluster = %self.spec.id, %error, "{what} failed; retrying");
        self.shared.statuses.update(&self.spec.id, |s| {
            s.last_error = Some(format!("{what}: {error}"));
            s.last_error_ms = now_ms();
        });
    }

    fn update_counts(&self, stores: &Stores) {
        let counts = stores.counts();
        self.shared.statuses.update(&self.spec.id, |s| {
            for (kind, n) in counts {
                s.kinds.entry(kind.to_string()).or_default().objects = n;
            }
        });
    }
}

impl Cluster {
    /// Asks the API server for its version: the cheapest proof that it is reachable with
    /// these credentials. Going out of reach marks every workload stale; coming back (with no
    /// watch error since the last probe) clears the mark; stale past `stale_after` drops the
    /// cluster's resources.
    async fn probe(&mut self, client: &Client, dirty: &mut Dirty) {
        let now = now_ms();
        let interval_ms = self.shared.settings.probe_interval.as_millis() as i64;
        match client.apiserver_version().await {
            Err(e) => {
                let error = error_chain(&e);
                if self.stale_since_ms == 0 && self.synced {
                    self.stale_since_ms = now;
                    tracing::warn!(cluster = %self.spec.id, %error, "API server out of reach; keeping its endpoints, marked stale");
                    dirty.all = true;
                }
                self.failed("reaching the API server", error);
            }
            Ok(_) if self.stale_since_ms != 0 && now - self.last_watch_error_ms > interval_ms => {
                tracing::info!(cluster = %self.spec.id, stale_for_ms = now - self.stale_since_ms, "API server back; endpoints current again");
                self.stale_since_ms = 0;
                self.dropped = false;
                dirty.all = true;
            }
            Ok(_) => {}
        }
        self.shared.statuses.update(&self.spec.id, |s| {
            s.stale_since_ms = self.stale_since_ms;
            s.dropped = self.dropped;
            if self.stale_since_ms == 0
                && s.last_error.is_some()
                && self.synced
                && now - self.last_watch_error_ms > interval_ms
            {
                s.last_error = None;
            }
        });
        self.maybe_drop(now).await;
    }

    async fn maybe_drop(&mut self, now: i64) {
        let Some(after) = self.shared.settings.stale_after else {
            return;
        };
        if self.dropped || self.stale_since_ms == 0 {
            return;
        }
        if now - self.stale_since_ms < after.as_millis() as i64 {
            return;
        }
        match self
            .shared
            .ingest
            .replace_origin(&self.origin, Vec::new())
            .await
        {
            Ok(r) => {
                tracing::warn!(cluster = %self.spec.id, removed = r.removed, stale_after_s = after.as_secs(), "cluster stale for too long: its endpoints are dropped until it is back");
                self.dropped = true;
                self.emitted.clear();
                self.shared.statuses.update(&self.spec.id, |s| {
                    s.dropped = true;
                    s.resources = 0;
                });
            }
            Err(e) => self.failed("dropping the stale cluster", e.to_string()),
        }
    }

    fn context(&self) -> ClusterContext {
        let s = &self.shared.settings;
        ClusterContext {
            cluster: self.spec.id.clone(),
            network: self.spec.network.clone(),
            domain: s.domain.clone(),
            trust_domain: s.trust_domain.clone(),
            cluster_local_hosts: s.cluster_local_hosts.clone(),
            stale_since_ms: self.stale_since_ms,
        }
    }

    /// Maps what `dirty` names and hands it to ingest: everything (with ingest's diff
    /// keeping what did not change) or only the units touched.
    async fn map(&mut self, stores: &Stores, mut dirty: Dirty) {
        if !dirty.all {
            self.units_of_pods(stores, &mut dirty);
        }
        if !dirty.all && dirty.units.is_empty() {
            return;
        }
        let ctx = self.context();
        let units: Vec<Unit> = if dirty.all {
            all_units(stores)
        } else {
            dirty.units.into_iter().collect()
        };
        let slices = slices_by_service(stores, (!dirty.all).then_some(&units));
        let mut problems = Vec::new();
        let mut mapped: Vec<(Unit, Vec<Resource>)> = Vec::with_capacity(units.len());
        for unit in units {
            let resources = self.map_unit(&ctx, stores, &slices, &unit, &mut problems);
            mapped.push((unit, resources));
        }
        let result = if dirty.all {
            self.apply_all(mapped).await
        } else {
            self.apply_some(mapped).await
        };
        if let Err(e) = result {
            self.failed("writing the cluster's resources", e.to_string());
            return;
        }
        let resources = self.emitted.values().map(Vec::len).sum();
        self.shared.statuses.update(&self.spec.id, |s| {
            s.resources = resources;
            s.problems = problems;
        });
        self.shared.cluster_ready(&self.spec.id);
    }

    /// The Services whose slices list one of the pods touched.
    fn units_of_pods(&self, stores: &Stores, dirty: &mut Dirty) {
        if dirty.pods.is_empty() {
            return;
        }
        for slice in stores.slices.state() {
            let ns = slice.metadata.namespace.clone().unwrap_or_default();
            let hit = slice.endpoints.iter().any(|e| {
                e.target_ref.as_ref().is_some_and(|r| {
                    r.kind.as_deref() == Some("Pod")
                        && dirty.pods.contains(&(
                            r.namespace.clone().unwrap_or_else(|| ns.clone()),
                            r.name.clone().unwrap_or_default(),
                        ))
                })
            });
            if let (true, Some(name)) = (hit, service_of(&slice)) {
                dirty.units.insert(Unit::Service {
                    namespace: ns,
                    name,
                });
            }
        }
    }

    fn map_unit(
        &self,
        ctx: &ClusterContext,
        stores: &Stores,
        slices: &HashMap<(String, String), Vec<Arc<EndpointSlice>>>,
        unit: &Unit,
        problems: &mut Vec<String>,
    ) -> Vec<Resource> {
        match unit {
            Unit::Service { namespace, name } => {
                let key = kube::runtime::reflector::ObjectRef::new(name).within(namespace);
                let Some(svc) = stores.services.get(&key) else {
                    return Vec::new();
                };
                let key = (namespace.clone(), name.clone());
                let none = Vec::new();
                mapping::map_service(ctx, &svc, slices.get(&key).unwrap_or(&none), stores)
            }
            Unit::Object {
                kind,
                namespace,
                name,
            } => self.map_object(ctx, stores, kind, namespace, name, problems),
        }
    }

    /// An Istio or isthmus object, read exactly as the same object in a file would be.
    fn map_object(
        &self,
        ctx: &ClusterContext,
        stores: &Stores,
        kind: &'static str,
        namespace: &str,
        name: &str,
        problems: &mut Vec<String>,
    ) -> Vec<Resource> {
        let Some(obj) = stores
            .objects
            .iter()
            .find(|o| o.kind == kind)
            .and_then(|o| o.get(namespace, name))
        else {
            return Vec::new();
        };
        let network =
            mapping::namespace_network(namespace, stores).unwrap_or_else(|| ctx.network.clone());
        let defaults = SourceDefaults {
            cluster: ctx.cluster.clone(),
            network,
            trust_domain: ctx.trust_domain.clone(),
            domain: ctx.domain.clone(),
        };
        let text = match serde_json::to_string(obj.as_ref()) {
            Ok(t) => t,
            Err(e) => {
                problems.push(format!("{kind} {namespace}/{name}: {e}"));
                return Vec::new();
            }
        };
        let label = PathBuf::from(format!("{kind} {namespace}/{name}"));
        match parse_file(&label, &text, &defaults) {
            Ok(resources) => self.without_clashes(resources, problems),
            Err(errors) => {
                problems.extend(errors.iter().map(|e| e.to_string()));
                Vec::new()
            }
        }
    }

    /// Drops resources whose key another source already holds (a WorkloadGroup or a
    /// Network of the same name from a file or another cluster): the first holder keeps it.
    fn without_clashes(
        &self,
        resources: Vec<Resource>,
        problems: &mut Vec<String>,
    ) -> Vec<Resource> {
        self.shared.ingest.views().with_catalog(|c| {
            resources
                .into_iter()
                .filter(|r| {
                    let key = r.key();
                    match c.get(&key) {
                        Some(held) if held.origin != self.origin => {
                            problems.push(format!(
                                "{key} is already defined by {}; this cluster's copy is not used",
                                held.origin
                            ));
                            false
                        }
                        _ => true,
                    }
                })
                .collect()
        })
    }

    async fn apply_all(
        &mut self,
        mapped: Vec<(Unit, Vec<Resource>)>,
    ) -> Result<(), crate::store::StoreError> {
        let mut emitted = HashMap::with_capacity(mapped.len());
        let mut all = Vec::new();
        for (unit, resources) in mapped {
            emitted.insert(unit, resources.iter().map(Resource::key).collect());
            all.extend(
                resources
                    .into_iter()
                    .map(|r| OwnedResource::new(self.origin.clone(), r)),
            );
        }
        self.shared.ingest.replace_origin(&self.origin, all).await?;
        self.emitted = emitted;
        Ok(())
    }

    async fn apply_some(
        &mut self,
        mapped: Vec<(Unit, Vec<Resource>)>,
    ) -> Result<(), crate::store::StoreError> {
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        let mut emitted = Vec::with_capacity(mapped.len());
        for (unit, resources) in mapped {
            let keys: Vec<String> = resources.iter().map(Resource::key).collect();
            if let Some(before) = self.emitted.get(&unit) {
                removals.extend(before.iter().filter(|k| !keys.contains(k)).cloned());
            }
            upserts.extend(
                resources
                    .into_iter()
                    .map(|r| OwnedResource::new(self.origin.clone(), r)),
            );
            emitted.push((unit, keys));
        }
        self.shared
            .ingest
            .update_origin(&self.origin, upserts, removals)
            .await?;
        for (unit, keys) in emitted {
            if keys.is_empty() {
                self.emitted.remove(&unit);
            } else {
                self.emitted.insert(unit, keys);
            }
        }
        Ok(())
    }
}

/// The Service an EndpointSlice belongs to, by its label.
fn service_of(slice: &EndpointSlice) -> Option<String> {
    slice
        .metadata
        .labels
        .as_ref()?
        .get(labels::SERVICE_NAME)
        .filter(|n| !n.is_empty())
        .cloned()
}

/// The slices of each Service (of those in `only`, when given).
fn slices_by_service(
    stores: &Stores,
    only: Option<&Vec<Unit>>,
) -> HashMap<(String, String), Vec<Arc<EndpointSlice>>> {
    let wanted: Option<std::collections::HashSet<(&str, &str)>> = only.map(|units| {
        units
            .iter()
            .filter_map(|u| match u {
                Unit::Service { namespace, name } => Some((namespace.as_str(), name.as_str())),
                Unit::Object { .. } => None,
            })
            .collect()
    });
    let mut out: HashMap<(String, String), Vec<Arc<EndpointSlice>>> = HashMap::new();
    if wanted.as_ref().is_some_and(|w| w.is_empty()) {
        return out;
    }
    for slice in stores.slices.state() {
        let Some(name) = service_of(&slice) else {
            continue;
        };
        let ns = slice.metadata.namespace.as_deref().unwrap_or_default();
        if wanted
            .as_ref()
            .is_some_and(|w| !w.contains(&(ns, name.as_str())))
        {
            continue;
        }
        let ns = ns.to_string();
        out.entry((ns, name)).or_default().push(slice);
    }
    out
}

/// Every unit the stores hold.
fn all_units(stores: &Stores) -> Vec<Unit> {
    let mut units: Vec<Unit> = stores
        .services
        .state()
        .iter()
        .map(|s| Unit::Service {
            namespace: s.metadata.namespace.clone().unwrap_or_default(),
            name: s.metadata.name.clone().unwrap_or_default(),
        })
        .collect();
    for o in &stores.objects {
        units.extend(o.store.state().iter().map(|obj| Unit::Object {
            kind: o.kind,
            namespace: obj.metadata.namespace.clone().unwrap_or_default(),
            name: obj.metadata.name.clone().unwrap_or_default(),
        }));
    }
    units
}
