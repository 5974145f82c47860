//! What the registry holds, opened in start-up's first phases: the metrics, the store, the
//! CA, the views and the paths into them (ingest, VM registrations, Watch subscribers); then
//! the catalog restored from the store, so a restart serves what it served before any source
//! has spoken.

use std::sync::{Arc, Mutex};

use anyhow::Context;
use isthmus_proto::grpc::ListenerMetrics;
use isthmus_proto::identity::TrustDomain;
use prometheus_client::registry::Registry;

use super::config::{RegistryConfig, StoreSettings};
use crate::ca::metrics::CaMetrics;
use crate::ca::Authority;
use crate::ingest::Ingest;
use crate::metrics::RegistryMetrics;
use crate::registration::metrics::RegistrationMetrics;
use crate::sources::kubernetes::ClusterStatuses;
use crate::sources::peers::PeerStatuses;
use crate::sources::vm_registrations::metrics::LeaseMetrics;
use crate::sources::vm_registrations::VmRegistrations;
use crate::store::{EmbeddedStore, EtcdConfig, EtcdStore, Store};
use crate::views::Views;
use crate::watch::Subscribers;

/// Every metric family of the process, in one prometheus registry.
pub(super) struct Metrics {
    pub registry: Arc<Mutex<Registry>>,
    pub registry_metrics: RegistryMetrics,
    pub ca: CaMetrics,
    pub registration: RegistrationMetrics,
    pub leases: LeaseMetrics,
    pub listener: ListenerMetrics,
}

impl Metrics {
    pub(super) fn register() -> Self {
        let mut prom = Registry::with_prefix("isthmus");
        let registry_metrics = RegistryMetrics::register(&mut prom);
        let ca = CaMetrics::register(&mut prom);
        let leases = LeaseMetrics::register(&mut prom);
        let registration = RegistrationMetrics::register(&mut prom);
        let listener = ListenerMetrics::register(&mut prom);
        isthmus_proto::limits::register(&mut prom);
        Self {
            registry: Arc::new(Mutex::new(prom)),
            registry_metrics,
            ca,
            registration,
            leases,
            listener,
        }
    }
}

/// The registry's state and the ways into it.
pub(super) struct State {
    pub store: Arc<dyn Store>,
    pub authority: Arc<Authority>,
    pub trust_domain: TrustDomain,
    pub views: Arc<Views>,
    pub ingest: Ingest,
    pub registrations: Arc<VmRegistrations>,
    pub subscribers: Arc<Subscribers>,
    /// The Kubernetes clusters' sync state, written by their watchers.
    pub clusters: ClusterStatuses,
    /// The peered registries' sync state, written by their importers.
    pub peers: PeerStatuses,
}

impl State {
    /// Opens the store and loads the CA; the catalog is still empty.
    pub(super) async fn open(cfg: &RegistryConfig, metrics: &Metrics) -> anyhow::Result<Self> {
        let store: Arc<dyn Store> = match &cfg.store {
            StoreSettings::Embedded => {
                Arc::new(EmbeddedStore::open(&cfg.data_dir).context("opening the embedded store")?)
            }
            StoreSettings::Etcd(etcd) => {
                // VM registrations outlive a registry that stops renewing its lease by the
                // grace period an agent has to reconnect.
                let etcd = EtcdConfig {
                    lease_ttl: cfg.vm_grace,
                    ..etcd.clone()
                };
                Arc::new(
                    EtcdStore::connect(etcd)
                        .await
                        .context("connecting to the etcd store")?,
                )
            }
        };
        tracing::info!(store = store.kind(), "store open");
        let authority = Arc::new(
            Authority::load(&cfg.ca_dir, cfg.trust_domain.clone()).context("loading the CA")?,
        );
        let trust_domain = authority.trust_domain();
        let views = Arc::new(Views::default());
        let ingest = Ingest::new(
            store.clone(),
            views.clone(),
            metrics.registry_metrics.clone(),
        );
        let registrations = Arc::new(VmRegistrations::new(
            ingest.clone(),
            cfg.vm_grace,
            metrics.leases.clone(),
        ));
        Ok(Self {
            store,
            authority,
            trust_domain,
            views,
            ingest,
            registrations,
            subscribers: Arc::new(Subscribers::default()),
            clusters: ClusterStatuses::default(),
            peers: PeerStatuses::default(),
        })
    }

    /// Loads the catalog from the store, and gives the VM entries a previous run registered
    /// a grace period from now, within which their agents reconnect (leases do not survive
    /// a restart).
    pub(super) async fn restore(&self, cfg: &RegistryConfig) -> anyhow::Result<()> {
        let restored = self
            .ingest
            .load_from_store()
            .await
            .context("loading the catalog from the store")?;
        tracing::info!(
            resources = restored,
            store = self.store.kind(),
            "catalog restored from the store"
        );
        let adopted = self
            .registrations
            .adopt_stored(std::time::SystemTime::now())
            .await;
        if adopted > 0 {
            tracing::info!(
                entries = adopted,
                grace_s = cfg.vm_grace.as_secs_f64(),
                "VM registrations from the previous run are kept for the grace period; their agents register again"
            );
        }
        Ok(())
    }
}
