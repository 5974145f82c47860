//! The registry's wiring: store, CA, sources, views, the gRPC and admin servers. `run`
//! returns once everything listens, with the bound addresses, so tests start a whole
//! registry in-process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use isthmus_proto::admin::Readiness;
use isthmus_proto::drain;
use isthmus_proto::grpc::{self, ListenerMetrics, ListenerOptions};
use isthmus_proto::identity::{SpiffeId, TrustDomain};
use isthmus_proto::pb;
use isthmus_proto::tls::{self, ClientAuth, TrustBundle};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, SourceStatus};
use crate::ca::metrics::CaMetrics;
use crate::ca::service::{CaPolicy, CertificateService};
use crate::ca::{Authority, CaMaterial};
use crate::ingest::Ingest;
use crate::metrics::{RegistryMetrics, SourceLabels};
use crate::registration::metrics::RegistrationMetrics;
use crate::registration::RegistrationService;
use crate::sources::static_files::{SourceDefaults, StaticSource, ORIGIN_PREFIX};
use crate::sources::vm_registrations::{VmRegistrations, DEFAULT_VM_GRACE};
use crate::store::{EmbeddedStore, Store};
use crate::views::Views;
use crate::vips::{DEFAULT_VIP_GRACE, VIP_GC_INTERVAL};
use crate::watch::{Subscribers, WatchService};

pub const DEFAULT_GRPC_ADDR: &str = "0.0.0.0:15012";
pub const DEFAULT_ADMIN_ADDR: &str = "0.0.0.0:15014";
/// How often the resources directory is re-read.
pub const DEFAULT_RESOURCE_POLL: Duration = crate::sources::static_files::POLL_INTERVAL;
/// Largest request the registry decodes: requests are small (Subscribe, Ack, a CSR, a
/// Hello), so a bigger one is a bug or an attack.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// The namespace and service account of the registry's own serving certificate.
pub const REGISTRY_NAMESPACE: &str = "isthmus-system";
pub const REGISTRY_SERVICE_ACCOUNT: &str = "isthmus-registry";
/// How often redeemed bootstrap tokens past their expiry are forgotten.
pub const TOKEN_GC_INTERVAL: Duration = Duration::from_secs(3600);
/// Lifetime of the registry's serving certificate; renewed at half-life.
const SERVING_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// HTTP/2 pings on idle gRPC connections: a VM agent whose network was cut sends no
/// FIN, and its registration should start its grace period within seconds, not when TCP
/// gives up minutes later.
const GRPC_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const GRPC_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct RegistryConfig {
    pub cluster: String,
    pub network: String,
    pub trust_domain: Option<TrustDomain>,
    pub ca_dir: PathBuf,
    pub data_dir: PathBuf,
    pub resources: Option<PathBuf>,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub resource_poll: Duration,
    pub ca_reload: Duration,
    pub ca_policy: CaPolicy,
    pub listener: ListenerOptions,
    /// How long a released VIP stays reserved for its hostname.
    pub vip_grace: Duration,
    /// How long a registered VM's entry stays after its agent's stream ended.
    pub vm_grace: Duration,
}

impl RegistryConfig {
    /// A config with the defaults for everything but the required settings.
    pub fn new(cluster: &str, network: &str, ca_dir: PathBuf, data_dir: PathBuf) -> Self {
        Self {
            cluster: cluster.to_string(),
            network: network.to_string(),
            trust_domain: None,
            ca_dir,
            data_dir,
            resources: None,
            grpc_addr: DEFAULT_GRPC_ADDR.parse().expect("default address"),
            admin_addr: DEFAULT_ADMIN_ADDR.parse().expect("default address"),
            resource_poll: DEFAULT_RESOURCE_POLL,
            ca_reload: crate::ca::DEFAULT_RELOAD_INTERVAL,
            ca_policy: CaPolicy::default(),
            listener: ListenerOptions::default(),
            vip_grace: DEFAULT_VIP_GRACE,
            vm_grace: DEFAULT_VM_GRACE,
        }
    }

    /// Checks every setting and reports all problems at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        if let Err(e) = isthmus_proto::identity::validate_dns_label("--cluster", &self.cluster) {
            errors.push(e.to_string());
        }
        if let Err(e) = isthmus_proto::identity::validate_dns_label("--network", &self.network) {
            errors.push(e.to_string());
        }
        if self.ca_policy.default_ttl > self.ca_policy.max_ttl {
            errors.push(format!(
                "--cert-ttl ({}) is above --max-cert-ttl ({})",
                isthmus_proto::config::format_duration(self.ca_policy.default_ttl),
                isthmus_proto::config::format_duration(self.ca_policy.max_ttl)
            ));
        }
        if let Err(e) = CaMaterial::load(&self.ca_dir, self.trust_domain.as_ref()) {
            errors.push(format!("--ca-dir: {e}"));
        }
        if let Some(dir) = &self.resources {
            if !dir.is_dir() {
                errors.push(format!("--resources {}: not a directory", dir.display()));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    fn source_defaults(&self, td: TrustDomain) -> SourceDefaults {
        SourceDefaults {
            cluster: self.cluster.clone(),
            network: self.network.clone(),
            trust_domain: td,
        }
    }
}

/// Parses the resources directory as `--validate` does: every error, named by file and field.
pub fn validate_resources(cfg: &RegistryConfig) -> Result<usize, Vec<String>> {
    let Some(dir) = &cfg.resources else {
        return Ok(0);
    };
    let td = match (
        &cfg.trust_domain,
        CaMaterial::load(&cfg.ca_dir, cfg.trust_domain.as_ref()),
    ) {
        (Some(td), _) => td.clone(),
        (None, Ok(m)) => m.trust_domain.clone(),
        (None, Err(_)) => TrustDomain::new("cluster.local").expect("valid"),
    };
    let mut source = StaticSource::new(dir.clone(), cfg.source_defaults(td));
    let scan = source.scan();
    if scan.errors.is_empty() {
        Ok(source.resources().len())
    } else {
        Err(scan.errors.iter().map(|e| e.to_string()).collect())
    }
}

/// A running registry.
#[derive(Debug)]
pub struct RegistryHandle {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub trust_domain: TrustDomain,
    pub views: Arc<Views>,
    pub subscribers: Arc<Subscribers>,
    pub authority: Arc<Authority>,
    /// The path by which sources write to the catalog (for in-process sources and drivers).
    pub ingest: Ingest,
    /// Registered VMs and their leases.
    pub registrations: Arc<VmRegistrations>,
    trigger: drain::Trigger,
    tasks: Vec<JoinHandle<()>>,
}

impl RegistryHandle {
    /// Stops accepting, ends every stream, and waits for the tasks (bounded).
    pub async fn shutdown(self) {
        self.trigger.fire();
        for t in self.tasks {
            if tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .is_err()
            {
                tracing::warn!("a registry task did not stop within 5s");
            }
        }
    }

    /// Runs until SIGTERM/Ctrl-C, then shuts down.
    pub async fn run_until_signal(self) {
        drain::os_signal().await;
        tracing::info!("shutting down");
        self.shutdown().await;
    }
}

fn serving_config(material: &CaMaterial) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let id = SpiffeId::workload(
        &material.trust_domain,
        REGISTRY_NAMESPACE,
        REGISTRY_SERVICE_ACCOUNT,
    )?;
    let creds =
        material.self_credentials(&id, SERVING_CERT_TTL, ::time::OffsetDateTime::now_utc())?;
    let bundle = TrustBundle::new(material.root_der(), material.trust_domain.as_str(), &[])?;
    Ok(Arc::new(tls::server_config(
        &creds,
        &bundle,
        ClientAuth::Optional,
        &[tls::ALPN_H2],
    )?))
}

pub async fn run(cfg: RegistryConfig) -> anyhow::Result<RegistryHandle> {
    if let Err(errors) = cfg.validate() {
        anyhow::bail!("invalid configuration:\n  {}", errors.join("\n  "));
    }
    let (trigger, shutdown) = drain::channel();
    let mut prom = Registry::with_prefix("isthmus");
    let metrics = RegistryMetrics::register(&mut prom);
    let ca_metrics = CaMetrics::register(&mut prom);
    let registration_metrics = RegistrationMetrics::register(&mut prom);
    let listener_metrics = ListenerMetrics::register(&mut prom);
    let prom = Arc::new(Mutex::new(prom));

    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&cfg.data_dir).context("opening the embedded store")?);
    let authority =
        Arc::new(Authority::load(&cfg.ca_dir, cfg.trust_domain.clone()).context("loading the CA")?);
    let trust_domain = authority.trust_domain();
    let views = Arc::new(Views::default());
    let ingest = Ingest::new(store.clone(), views.clone(), metrics.clone());
    let restored = ingest
        .load_from_store()
        .await
        .context("loading the catalog from the store")?;
    tracing::info!(
        resources = restored,
        store = store.kind(),
        "catalog restored from the store"
    );

    let source_status = SourceStatus::default();
    let mut tasks = Vec::new();
    // VM leases do not survive a restart: entries a previous run registered get a grace
    // period from now, within which their agents reconnect.
    let registrations = Arc::new(VmRegistrations::new(
        ingest.clone(),
        cfg.vm_grace,
        registration_metrics.clone(),
    ));
    let adopted = registrations
        .adopt_stored(std::time::SystemTime::now())
        .await;
    if adopted > 0 {
        tracing::info!(
            entries = adopted,
            grace_s = cfg.vm_grace.as_secs_f64(),
            "VM registrations from the previous run are kept for the grace period; their agents register again"
        );
    }
    {
        let registrations = registrations.clone();
        let shutdown = shutdown.clone();
        tasks.push(tokio::spawn(
            async move { registrations.run(shutdown).await },
        ));
    }
    if let Some(dir) = &cfg.resources {
        let mut source = StaticSource::new(dir.clone(), cfg.source_defaults(trust_domain.clone()));
        source.seed(views.resources_with_origin(ORIGIN_PREFIX));
        let source = Arc::new(Mutex::new(source));
        sync_static(&source, &ingest, &metrics, &source_status, true).await?;
        tasks.push(tokio::spawn(poll_static(
            source,
            ingest.clone(),
            metrics.clone(),
            source_status.clone(),
            cfg.resource_poll,
            shutdown.clone(),
        )));
    }

    // The registry's serving certificate, reissued when the intermediate changes or at half-life.
    let (tls_tx, tls_rx) = watch::channel(serving_config(&authority.current())?);
    tasks.push(tokio::spawn(renew_serving_cert(
        authority.clone(),
        tls_tx,
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn(forget_expired_tokens(
        store.clone(),
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn(free_expired_vips(
        ingest.clone(),
        cfg.vip_grace,
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn(authority.clone().watch_files(
        cfg.ca_reload,
        ca_metrics.clone(),
        shutdown.clone(),
    )));

    let subscribers = Arc::new(Subscribers::default());
    let watch_svc = WatchService::new(
        views.clone(),
        subscribers.clone(),
        metrics.clone(),
        shutdown.clone(),
    );
    let registration_svc = RegistrationService::new(
        registrations.clone(),
        views.clone(),
        trust_domain.clone(),
        registration_metrics,
        shutdown.clone(),
    );
    let ca_svc = CertificateService::new(
        authority.clone(),
        store.clone(),
        cfg.ca_policy.clone(),
        ca_metrics,
    );

    let grpc_listener = TcpListener::bind(cfg.grpc_addr)
        .await
        .with_context(|| format!("binding the gRPC port {}", cfg.grpc_addr))?;
    let admin_listener = TcpListener::bind(cfg.admin_addr)
        .await
        .with_context(|| format!("binding the admin port {}", cfg.admin_addr))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let incoming = grpc::tls_incoming(
        grpc_listener,
        tls_rx,
        cfg.listener.clone(),
        listener_metrics,
        shutdown.clone(),
    );
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(GRPC_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(GRPC_KEEPALIVE_TIMEOUT))
        .add_service(
            pb::watch_server::WatchServer::new(watch_svc)
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            pb::certificates_server::CertificatesServer::new(ca_svc)
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            pb::registration_server::RegistrationServer::new(registration_svc)
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown.clone().signaled());
    tasks.push(tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "gRPC server failed");
        }
    }));

    let readiness = Readiness::default();
    let routes = admin::routes(
        views.clone(),
        subscribers.clone(),
        source_status,
        registrations.clone(),
    );
    let admin_shutdown = shutdown.clone();
    let admin_ready = readiness.clone();
    tasks.push(tokio::spawn(async move {
        if let Err(e) =
            isthmus_proto::admin::serve(admin_listener, prom, admin_ready, routes, admin_shutdown)
                .await
        {
            tracing::error!(error = %e, "admin server failed");
        }
    }));
    tracing::info!(%grpc_addr, %admin_addr, cluster = %cfg.cluster, network = %cfg.network, trust_domain = %trust_domain, "registry serving");
    Ok(RegistryHandle {
        grpc_addr,
        admin_addr,
        trust_domain,
        views,
        subscribers,
        authority,
        ingest,
        registrations,
        trigger,
        tasks,
    })
}

/// Scans the static source once and hands its resources to ingest when they changed.
/// `force` hands the resources over even when the scan saw no change (after a failed write).
async fn sync_static(
    source: &Arc<Mutex<StaticSource>>,
    ingest: &Ingest,
    metrics: &RegistryMetrics,
    status: &SourceStatus,
    force: bool,
) -> anyhow::Result<()> {
    let s = source.clone();
    let (scan, resources, dir) = tokio::task::spawn_blocking(move || {
        let mut s = s.lock().expect("static source lock");
        let scan = s.scan();
        let resources = (scan.changed || force).then(|| s.resources());
        (scan, resources, s.dir().to_path_buf())
    })
    .await?;
    let labels = SourceLabels { source: "static" };
    metrics
        .resource_errors
        .get_or_create(&labels)
        .set(scan.errors.len() as i64);
    let messages: Vec<String> = scan.errors.iter().map(|e| e.to_string()).collect();
    if messages != status.get() {
        for m in &messages {
            tracing::error!(error = %m, "invalid resource file; its last good state stays in force");
        }
        if !messages.is_empty() {
            metrics.resource_error_events.get_or_create(&labels).inc();
        }
        status.set(messages);
    }
    if let Some(resources) = resources {
        let report = ingest
            .replace_origin(ORIGIN_PREFIX, resources)
            .await
            .context("writing static resources to the store")?;
        tracing::info!(upserted = report.upserted, removed = report.removed, dir = %dir.display(), "static resources applied");
    }
    Ok(())
}

async fn poll_static(
    source: Arc<Mutex<StaticSource>>,
    ingest: Ingest,
    metrics: RegistryMetrics,
    status: SourceStatus,
    every: Duration,
    shutdown: drain::Watch,
) {
    let stop = shutdown.signaled();
    tokio::pin!(stop);
    let mut retry = false;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(every) => {}
        }
        match sync_static(&source, &ingest, &metrics, &status, retry).await {
            Ok(()) => retry = false,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "static resources not applied; retrying");
                retry = true;
            }
        }
    }
}

async fn forget_expired_tokens(store: Arc<dyn Store>, shutdown: drain::Watch) {
    let stop = shutdown.signaled();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(TOKEN_GC_INTERVAL) => {}
        }
        match crate::ca::token::forget_expired(store.as_ref(), ::time::OffsetDateTime::now_utc())
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(tokens = n, "forgot expired redeemed bootstrap tokens"),
            Err(e) => tracing::warn!(error = %e, "cannot clean up redeemed bootstrap tokens"),
        }
    }
}

async fn free_expired_vips(ingest: Ingest, grace: Duration, shutdown: drain::Watch) {
    let stop = shutdown.signaled();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(VIP_GC_INTERVAL) => {}
        }
        match ingest
            .free_expired_vips(std::time::SystemTime::now(), grace)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                allocations = n,
                "freed VIPs past their release grace period"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot free expired VIPs; retrying later"),
        }
    }
}

async fn renew_serving_cert(
    authority: Arc<Authority>,
    tx: watch::Sender<Arc<rustls::ServerConfig>>,
    shutdown: drain::Watch,
) {
    let mut ca = authority.subscribe();
    let stop = shutdown.signaled();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            changed = ca.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(SERVING_CERT_TTL / 2) => {}
        }
        match serving_config(&authority.current()) {
            Ok(cfg) => {
                tx.send_replace(cfg);
                tracing::info!("registry serving certificate reissued");
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot reissue the registry serving certificate; keeping the current one")
            }
        }
    }
}
