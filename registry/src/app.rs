//! The registry's wiring. `run` starts it in named phases and returns once everything
//! listens, with the bound addresses and a handle, so tests start a whole registry
//! in-process:
//!
//! 1. check the configuration, every problem at once ([`config`]);
//! 2. bind the gRPC and admin listeners ([`listeners`]);
//! 3. open the state: metrics, store, CA, views, ingest ([`state`]);
//! 4. serve admin, so `/readyz` names what start-up still waits for;
//! 5. restore the catalog from the store and adopt the previous run's VM entries
//!    (readiness part "catalog"), then start the VM lease timer;
//! 6. apply the resources directory once and start its poller ([`static_resources`];
//!    part "resources", only with `--resources`); then start importing from the peered
//!    registries (`--peer`), after removing what peers no longer configured left;
//! 7. start the upkeep: CA file watcher, token and VIP sweepers, and the store's write
//!    health (a part "store writes (<cause>)" while writes fail) ([`upkeep`]);
//! 8. serve gRPC: serving certificate and its renewer, Watch, Certificates, Registration
//!    ([`grpc`]; part "grpc");
//! 9. serve the sidecar injection webhook when configured, and keep the root-cert
//!    ConfigMaps and the webhook's `caBundle` in the registry's own cluster ([`webhook`]).
//!
//! Shutdown is [`isthmus_proto::program::Stop`]'s order: not ready; the gRPC server stops
//! accepting and ends its streams (subscribers and VM agents reconnect elsewhere or later)
//! and is joined; then admin, the poller, the lease timer and the upkeep stop, each joined
//! within `TASK_STOP_DEADLINE`.

mod config;
mod grpc;
mod kubernetes;
mod listeners;
mod state;
mod static_resources;
#[cfg(test)]
mod tests;
mod upkeep;
mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use isthmus_proto::drain;
use isthmus_proto::identity::TrustDomain;
use isthmus_proto::program::{Program, Readiness, Stop, Tasks};

pub use config::{
    validate_resources, KubernetesConfig, LocalCluster, RegistryConfig, StoreSettings,
    WebhookConfig, DEFAULT_ADMIN_ADDR, DEFAULT_CLUSTER_DOMAIN, DEFAULT_CLUSTER_SYNC_DEADLINE,
    DEFAULT_GRPC_ADDR, DEFAULT_RESOURCE_POLL, DEFAULT_SYSTEM_NAMESPACE,
};
pub use grpc::{MAX_REQUEST_BYTES, REGISTRY_NAMESPACE, REGISTRY_SERVICE_ACCOUNT};
pub use listeners::ListenError;
pub use upkeep::TOKEN_GC_INTERVAL;

use crate::admin::{self, SourceStatus};
use crate::ca::service::{CertificateService, KubernetesAuth};
use crate::ca::Authority;
use crate::ingest::Ingest;
use crate::registration::RegistrationService;
use crate::sources::kubernetes::ClusterStatuses;
use crate::sources::vm_registrations::VmRegistrations;
use crate::views::Views;
use crate::watch::{Subscribers, WatchService};
use listeners::Listeners;
use state::{Metrics, State};
use static_resources::StaticResources;

/// A running registry.
#[derive(Debug)]
pub struct RegistryHandle {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Where the sidecar injection webhook listens, when it is served.
    pub webhook_addr: Option<SocketAddr>,
    pub trust_domain: TrustDomain,
    pub views: Arc<Views>,
    pub subscribers: Arc<Subscribers>,
    pub authority: Arc<Authority>,
    /// The path by which sources write to the catalog (for in-process sources and drivers).
    pub ingest: Ingest,
    /// Registered VMs and their leases.
    pub registrations: Arc<VmRegistrations>,
    /// The Kubernetes clusters' sync state (empty without clusters).
    pub clusters: ClusterStatuses,
    /// The peered registries' import state (empty without `--peer`).
    pub peers: crate::sources::peers::PeerStatuses,
    pub readiness: Readiness,
    stop: Stop,
}

impl RegistryHandle {
    /// Stops in order (see the module doc) and joins every task, bounded.
    pub async fn shutdown(self) {
        // Nothing of the registry's own outlives the gRPC server's join: its streams are
        // its in-flight work.
        self.stop.run(std::future::ready(())).await;
    }
}

impl Program for RegistryHandle {
    fn shutdown(self) -> impl std::future::Future<Output = ()> + Send {
        RegistryHandle::shutdown(self)
    }
}

/// What the tasks watch to stop: the two triggers of the handle's [`Stop`].
struct Signals {
    /// Fired first: the gRPC server stops accepting and ends its streams.
    accept: drain::Watch,
    /// Fired once the gRPC server is done: everything else.
    rest: drain::Watch,
}

pub async fn run(cfg: RegistryConfig) -> anyhow::Result<RegistryHandle> {
    cfg.validate().context("invalid configuration")?;
    let listeners = Listeners::bind(&cfg).await?;
    let (accept, accept_watch) = drain::channel();
    let (rest, rest_watch) = drain::channel();
    let mut stop = Stop {
        readiness: Readiness::default(),
        accept,
        accepting: Tasks::default(),
        rest,
        tasks: Tasks::default(),
    };
    let signals = Signals {
        accept: accept_watch,
        rest: rest_watch,
    };
    let (grpc_addr, admin_addr) = (listeners.grpc_addr, listeners.admin_addr);
    let webhook_addr = listeners.webhook.as_ref().map(|(_, a)| *a);
    match start(&cfg, listeners, &mut stop, &signals).await {
        Ok(state) => {
            tracing::info!(%grpc_addr, %admin_addr, cluster = %cfg.cluster, network = %cfg.network, trust_domain = %state.trust_domain, "registry serving");
            Ok(RegistryHandle {
                grpc_addr,
                admin_addr,
                webhook_addr,
                trust_domain: state.trust_domain,
                views: state.views,
                subscribers: state.subscribers,
                authority: state.authority,
                ingest: state.ingest,
                registrations: state.registrations,
                clusters: state.clusters,
                peers: state.peers,
                readiness: stop.readiness.clone(),
                stop,
            })
        }
        Err(e) => {
            // Whatever started stops again, so a failed start leaves no port bound.
            stop.run(std::future::ready(())).await;
            Err(e)
        }
    }
}

/// Phases 3 to 8 (see the module doc); the tasks they start go into `stop`.
async fn start(
    cfg: &RegistryConfig,
    listeners: Listeners,
    stop: &mut Stop,
    signals: &Signals,
) -> anyhow::Result<State> {
    let readiness = stop.readiness.clone();
    let catalog_part = readiness.part("catalog");
    let resources_part = cfg.resources.is_some().then(|| readiness.part("resources"));
    let grpc_part = readiness.part("grpc");

    let metrics = Metrics::register();
    let state = State::open(cfg, &metrics).await?;
    if cfg.kubernetes.enabled() {
        crate::sources::kubernetes::metrics::register(
            &mut metrics.registry.lock().expect("metrics registry lock"),
            state.clusters.clone(),
        );
    }
    if !cfg.peers.is_empty() {
        crate::sources::peers::metrics::register(
            &mut metrics.registry.lock().expect("metrics registry lock"),
            state.peers.clone(),
        );
    }
    let source_status = SourceStatus::default();
    serve_admin(
        listeners.admin,
        &metrics,
        &state,
        source_status.clone(),
        readiness.clone(),
        stop,
        signals,
    );

    state.restore(cfg).await?;
    let registrations = state.registrations.clone();
    let shutdown = signals.rest.clone();
    stop.tasks.spawn("VM lease timer", async move {
        registrations.run(shutdown).await
    });
    let (ingest, shutdown) = (state.ingest.clone(), signals.rest.clone());
    stop.tasks.spawn("store follower", async move {
        ingest.follow_store(shutdown).await
    });
    catalog_part.ready();

    if let Some(dir) = &cfg.resources {
        let resources = StaticResources::new(
            dir.clone(),
            cfg,
            state.trust_domain.clone(),
            &state.views,
            state.ingest.clone(),
            metrics.registry_metrics.clone(),
            source_status,
        );
        resources.sync(true).await?;
        let shutdown = signals.rest.clone();
        stop.tasks.spawn(
            "static resources poller",
            resources.poll(cfg.resource_poll, shutdown),
        );
    }
    drop(resources_part);
    start_peers(cfg, &state, &mut stop.tasks, &signals.rest).await?;
    let kube_source = kubernetes::start(
        cfg,
        state.trust_domain.clone(),
        state.ingest.clone(),
        state.clusters.clone(),
        &readiness,
        &mut stop.tasks,
        &signals.rest,
    )
    .await?;

    start_upkeep(cfg, &state, &metrics, &readiness, &mut stop.tasks, signals);
    let kube_auth = kube_source.map(|source| kubernetes::token_auth(cfg, &source));
    serve_grpc(
        cfg,
        listeners.grpc,
        &metrics,
        &state,
        kube_auth,
        stop,
        signals,
    )?;
    grpc_part.ready();
    webhook::start(
        cfg,
        listeners.webhook.map(|(l, _)| l),
        &state.authority,
        &metrics.registry,
        &mut stop.tasks,
        &signals.rest,
    )
    .await?;
    Ok(state)
}

/// Phase 6½: the importers of the peered registries, after what the catalog held of peers no
/// longer configured is gone.
async fn start_peers(
    cfg: &RegistryConfig,
    state: &State,
    tasks: &mut Tasks,
    shutdown: &drain::Watch,
) -> anyhow::Result<()> {
    use crate::sources::peers::{self, PeerContext};
    peers::forget_unconfigured(&state.ingest, &cfg.peers).await;
    if cfg.peers.is_empty() {
        return Ok(());
    }
    let tls = grpc::peer_client_tls(state.authority.clone())?;
    for spec in &cfg.peers {
        tracing::info!(peer = %spec.name, addresses = %spec.addresses, "importing the peer's services");
        let ctx = PeerContext {
            ingest: state.ingest.clone(),
            tls: tls.clone(),
            statuses: state.peers.clone(),
            cluster: cfg.cluster.clone(),
            network: cfg.network.clone(),
        };
        tasks.spawn(
            "peer importer",
            peers::run(spec.clone(), ctx, shutdown.clone()),
        );
    }
    Ok(())
}

/// Phase 4: the admin server (`/metrics`, health, `/debug/*`), stopped with the rest.
fn serve_admin(
    listener: tokio::net::TcpListener,
    metrics: &Metrics,
    state: &State,
    source_status: SourceStatus,
    readiness: Readiness,
    stop: &mut Stop,
    signals: &Signals,
) {
    let routes = admin::routes(
        state.views.clone(),
        state.subscribers.clone(),
        source_status,
        state.registrations.clone(),
        state.clusters.clone(),
        state.peers.clone(),
    );
    let prom = metrics.registry.clone();
    let shutdown = signals.rest.clone();
    stop.tasks.spawn("admin server", async move {
        if let Err(e) =
            isthmus_proto::admin::serve(listener, prom, readiness, routes, shutdown).await
        {
            tracing::error!(error = %e, "admin server failed");
        }
    });
}

/// Phase 7: the store's write health, the CA file watcher and the sweepers of tokens and
/// VIPs.
fn start_upkeep(
    cfg: &RegistryConfig,
    state: &State,
    metrics: &Metrics,
    readiness: &Readiness,
    tasks: &mut Tasks,
    signals: &Signals,
) {
    tasks.spawn(
        "store write health",
        upkeep::follow_store_writes(
            state.store.clone(),
            readiness.clone(),
            metrics.registry_metrics.store_writable.clone(),
            signals.rest.clone(),
        ),
    );
    tasks.spawn(
        "bootstrap token sweeper",
        upkeep::forget_expired_tokens(state.store.clone(), signals.rest.clone()),
    );
    tasks.spawn(
        "VIP sweeper",
        upkeep::free_expired_vips(state.ingest.clone(), cfg.vip_grace, signals.rest.clone()),
    );
    tasks.spawn(
        "CA file watcher",
        state.authority.clone().watch_files(
            cfg.ca_reload,
            metrics.ca.clone(),
            signals.rest.clone(),
        ),
    );
}

/// Phase 8: the serving certificate and its renewer, then the gRPC server, the one task
/// stopped first.
fn serve_grpc(
    cfg: &RegistryConfig,
    listener: tokio::net::TcpListener,
    metrics: &Metrics,
    state: &State,
    kube_auth: Option<KubernetesAuth>,
    stop: &mut Stop,
    signals: &Signals,
) -> anyhow::Result<()> {
    let mut certificates = CertificateService::new(
        state.authority.clone(),
        state.store.clone(),
        cfg.ca_policy.clone(),
        metrics.ca.clone(),
    );
    if let Some(auth) = kube_auth {
        certificates = certificates.with_kubernetes(auth);
    }
    let (tls_tx, tls_rx) = grpc::serving_tls(&state.authority)?;
    stop.tasks.spawn(
        "serving certificate renewer",
        grpc::renew_serving_cert(state.authority.clone(), tls_tx, signals.rest.clone()),
    );
    let services = grpc::Services {
        watch: WatchService::new(
            state.views.clone(),
            state.subscribers.clone(),
            metrics.registry_metrics.clone(),
            signals.accept.clone(),
        ),
        certificates,
        registration: RegistrationService::new(
            state.registrations.clone(),
            state.views.clone(),
            state.trust_domain.clone(),
            metrics.registration.clone(),
            signals.accept.clone(),
        ),
    };
    stop.accepting.spawn(
        "gRPC server",
        grpc::serve(
            listener,
            tls_rx,
            cfg.listener.clone(),
            metrics.listener.clone(),
            services,
            signals.accept.clone(),
        ),
    );
    Ok(())
}
