//! The Kubernetes source: any number of clusters watched the way istiod watches them in a
//! multi-cluster mesh. Each cluster gets its own watcher set (`kube`'s watchers and
//! reflectors over Services, EndpointSlices, Pods, Nodes, Namespaces and, where the cluster
//! serves them, Istio's ServiceEntry, WorkloadEntry, WorkloadGroup, DestinationRule and
//! VirtualService and isthmus' Network) and its own origin in the catalog, `kube:<cluster>/`,
//! so that removing a cluster removes
//! exactly what it brought. Clusters come from the registry's own kubeconfig (or in-cluster
//! config), from kubeconfig files in a directory, and from remote-cluster Secrets in the
//! local cluster (Istio's `istio/multiCluster=true` Secrets), each watched.

mod clients;
mod cluster;
mod credentials;
pub mod mapping;
pub mod metrics;
mod status;
mod watchers;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use isthmus_proto::identity::TrustDomain;
use isthmus_proto::program::{Readiness, ReadyPart};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use clients::ClusterClients;
pub use cluster::ClusterSpec;
pub use credentials::{
    config_from_kubeconfig, digest, watch_directory, watch_secrets, CredentialError,
    REMOTE_SECRET_LABEL,
};
pub use status::{now_ms, ClusterStatus, ClusterStatuses, KindStatus};

use crate::ingest::Ingest;

/// Every resource from a cluster has the origin `kube:<cluster>/`.
pub const ORIGIN_PREFIX: &str = "kube:";

/// How often a cluster's API server is probed to tell "quiet" from "out of reach".
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// The hosts Istio keeps inside their cluster by default (its `clusterLocal` defaults): the
/// cluster's own system services and API server.
pub fn default_cluster_local_hosts(domain: &str) -> Vec<String> {
    vec![
        format!("*.kube-system.svc.{domain}"),
        format!("kubernetes.default.svc.{domain}"),
    ]
}

/// The origin of cluster `id`'s resources.
pub fn origin(id: &str) -> String {
    format!("{ORIGIN_PREFIX}{id}/")
}

/// Settings shared by every cluster.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// The clusters' DNS domain.
    pub domain: String,
    pub trust_domain: TrustDomain,
    /// Host patterns (`*.suffix` or exact) that never leave their cluster.
    pub cluster_local_hosts: Vec<String>,
    /// Drop a cluster's endpoints after it has been out of reach this long (never if `None`).
    pub stale_after: Option<Duration>,
    pub probe_interval: Duration,
    /// How long one watch request lasts before the watcher renews it from the last
    /// resourceVersion it saw (the API server may end it sooner).
    pub watch_timeout: Duration,
}

/// kube's and client-go's usual watch length: under the API server's own limit, so that a
/// watch normally ends on the client's terms.
pub const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(290);

/// What the clusters' tasks share.
pub(crate) struct Shared {
    ingest: Ingest,
    statuses: ClusterStatuses,
    settings: KubeSettings,
    /// Readiness parts of the clusters the registry waits for before it is ready.
    waiting: Mutex<HashMap<String, ReadyPart>>,
}

impl Shared {
    /// Cluster `id` has put its first complete sync into the catalog.
    fn cluster_ready(&self, id: &str) {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
}

struct Running {
    /// What the cluster was started with (kubeconfig digest and network): a change restarts it.
    fingerprint: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The set of clusters being watched.
pub struct KubernetesSource {
    shared: Arc<Shared>,
    running: Mutex<BTreeMap<String, Running>>,
    /// A client per cluster being watched, for calls other than the watchers'.
    clients: ClusterClients,
    readiness: Option<Readiness>,
    /// Set once the start-up deadline has passed: clusters added later do not hold readiness.
    deadline_passed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for KubernetesSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesSource").finish_non_exhaustive()
    }
}

impl KubernetesSource {
    /// `readiness`: the registry's, while clusters added now should hold it back until they
    /// have synced (`None` once the start-up deadline has passed or for tests).
    pub fn new(
        ingest: Ingest,
        settings: KubeSettings,
        statuses: ClusterStatuses,
        readiness: Option<Readiness>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                ingest,
                statuses,
                settings,
                waiting: Mutex::new(HashMap::new()),
            }),
            running: Mutex::new(BTreeMap::new()),
            clients: ClusterClients::default(),
            readiness,
            deadline_passed: Default::default(),
        }
    }

    pub fn statuses(&self) -> &ClusterStatuses {
        &self.shared.statuses
    }

    /// The clients of the clusters being watched, kept current as clusters come and go.
    pub fn clients(&self) -> ClusterClients {
        self.clients.clone()
    }

    /// Starts watching a cluster, or restarts it if it runs with other credentials or
    /// another network; the same spec again changes nothing.
    pub fn set_cluster(&self, spec: ClusterSpec, fingerprint: String) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if running
            .get(&spec.id)
            .is_some_and(|r| r.fingerprint == fingerprint)
        {
            return;
        }
        // The old watchers finish what they are writing before the new ones start, so the
        // two never write the cluster's resources at once.
        let previous = running.remove(&spec.id).map(|old| {
            tracing::info!(cluster = %spec.id, "cluster credentials or network changed; reconnecting");
            let _ = old.stop.send(true);
            old.task
        });
        let waits = !self
            .deadline_passed
            .load(std::sync::atomic::Ordering::SeqCst);
        if let Some(r) = self.readiness.as_ref().filter(|_| waits) {
            let part = r.part(&format!("cluster {}", spec.id));
            self.shared
                .waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(spec.id.clone(), part);
        }
        tracing::info!(cluster = %spec.id, network = %spec.network, credentials = %spec.credentials, server = %spec.config.cluster_url, "watching cluster");
        match kube::Client::try_from(spec.config.clone()) {
            Ok(client) => self.clients.insert(&spec.id, client),
            Err(e) => {
                // The watchers retry (and report) the same failure; only other calls lose it.
                tracing::warn!(cluster = %spec.id, error = %isthmus_proto::program::error_chain(&e), "no API client for the cluster");
                self.clients.remove(&spec.id);
            }
        }
        let (stop, stop_rx) = watch::channel(false);
        let id = spec.id.clone();
        let shared = self.shared.clone();
        let task = tokio::spawn(async move {
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            cluster::run(spec, shared, stop_rx).await
        });
        running.insert(
            id,
            Running {
                fingerprint,
                stop,
                task,
            },
        );
    }

    /// Stops watching a cluster and removes everything it brought into the catalog.
    pub async fn remove_cluster(&self, id: &str) {
        let removed = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        let Some(r) = removed else {
            return;
        };
        self.clients.remove(id);
        let _ = r.stop.send(true);
        let _ = r.task.await;
        self.shared.cluster_ready(id);
        match self
            .shared
            .ingest
            .replace_origin(&origin(id), Vec::new())
            .await
        {
            Ok(report) => {
                tracing::info!(cluster = %id, removed = report.removed, "cluster removed with its endpoints")
            }
            Err(e) => {
                tracing::error!(cluster = %id, error = %e, "removing the cluster's resources")
            }
        }
        self.shared.statuses.remove(id);
    }

    /// The ids of the clusters being watched.
    pub fn clusters(&self) -> Vec<String> {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Stops holding readiness back for clusters that have not synced: called once the
    /// start-up deadline has passed. Returns the clusters still not synced, with why.
    pub fn stop_waiting(&self) -> Vec<(String, String)> {
        self.deadline_passed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let waiting: Vec<String> = self
            .shared
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(id, _)| id)
            .collect();
        let now = status::now_ms();
        waiting
            .into_iter()
            .map(|id| {
                let why = self
                    .shared
                    .statuses
                    .get(&id)
                    .map(|s| s.summary(now))
                    .unwrap_or_default();
                (id, why)
            })
            .collect()
    }

    /// Stops every cluster's watchers (the catalog keeps what they brought).
    pub async fn shutdown(&self) {
        let all: Vec<Running> =
            std::mem::take(&mut *self.running.lock().unwrap_or_else(|e| e.into_inner()))
                .into_values()
                .collect();
        for r in all {
            let _ = r.stop.send(true);
            let _ = r.task.await;
        }
    }
}
