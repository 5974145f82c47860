//! The agent's wiring. Start-up order (each step only once the one before worked):
//!
//! 1. the bundle and the configuration are checked: nothing touches the network before;
//! 2. the identity: the certificate in the state directory, or a first enrolment with the
//!    bundle's token;
//! 3. the catalog: the Watch client, starting from the persisted snapshot when there is one;
//!    the routing table and the DNS proxy's name table follow it;
//! 4. the listeners (inbound mTLS, outbound, DNS, admin, health) are bound;
//! 5. the capture rules are installed (they point at listeners that already answer);
//! 6. registration, the probe, renewal and the snapshot writer run beside the data plane;
//! 7. READY once certificate, catalog and DNS are up; then WATCHDOG while the self-check
//!    passes.
//!
//! Shutdown reverses it: STOPPING, deregister (the entry leaves the views at once), stop
//! accepting, drain open connections until the deadline, remove the capture rules, stop the
//! rest.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use arc_swap::ArcSwap;
use axum::routing::get;
use axum::{Json, Router};
use isthmus_proto::admin::{self, Readiness};
use isthmus_proto::bundle::AgentBundle;
use isthmus_proto::drain;
use isthmus_proto::model::{Node, NodeKind, WorkloadGroup};
use isthmus_proto::registration::{HealthReport, Hello};
use isthmus_proto::subscription::{RegistrySettings, SyncState, WatchClient, WatchOptions};
use isthmus_proto::tls::{Credentials, TrustBundle};
use isthmus_proxy::authz::AuthorizationPolicy;
use isthmus_proxy::connection::{refusal, Tracker};
use isthmus_proxy::inbound::{self, AppTarget, Inbound, Mode};
use isthmus_proxy::metrics::Metrics;
use isthmus_proxy::original_dst::original_destination;
use isthmus_proxy::outbound::{self, ClientTls, Outbound, OutboundTarget};
use isthmus_proxy::routes::{self, Reach, RouteOptions, RouteTable};
use isthmus_proxy::upstream::ConnectOptions;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::capture::{self, CapturePlan};
use crate::config::{AgentConfig, CaptureMode};
use crate::identity;
use crate::metrics::{AgentMetrics, Reason};
use crate::notify::Notifier;
use crate::probe;
use crate::registration::{self, Registration, RegistrationState};
use crate::snapshot;

/// How often the data plane checks itself when systemd sets no watchdog.
const SELF_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// A running agent.
pub struct AgentHandle {
    /// The VM's registered address.
    pub address: IpAddr,
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub dns_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub health_addr: Option<SocketAddr>,
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub sync: watch::Receiver<Arc<SyncState>>,
    pub registration: watch::Receiver<RegistrationState>,
    /// The identity the agent holds; true if this start enrolled with the token.
    pub identity: String,
    pub enrolled: bool,
    readiness: Readiness,
    notifier: Arc<Notifier>,
    capture: Option<Arc<Mutex<CapturePlan>>>,
    /// Keeps the rules in step with the catalog; stopped before the rules are removed.
    capture_task: Option<JoinHandle<()>>,
    drain_deadline: Duration,
    trackers: Vec<Arc<Tracker>>,
    dns: isthmus_dns::DnsHandle,
    /// Stops the registration (which deregisters).
    registration_trigger: drain::Trigger,
    registration_task: JoinHandle<()>,
    /// Stops accepting.
    accept_trigger: drain::Trigger,
    accept_tasks: Vec<JoinHandle<()>>,
    /// Stops the rest.
    trigger: drain::Trigger,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for AgentHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentHandle")
            .field("address", &self.address)
            .field("inbound_addr", &self.inbound_addr)
            .field("outbound_addr", &self.outbound_addr)
            .field("dns_addr", &self.dns_addr)
            .finish_non_exhaustive()
    }
}

impl AgentHandle {
    pub fn is_ready(&self) -> bool {
        self.readiness.is_ready()
    }

    /// STOPPING, deregistration, drain, removal of the capture rules, then everything else.
    pub async fn shutdown(self) {
        let _ = self.notifier.send(&[
            ("STOPPING", "1"),
            ("STATUS", "stopping: deregistering and draining"),
        ]);
        self.readiness.drain();
        self.registration_trigger.fire();
        if tokio::time::timeout(Duration::from_secs(5), self.registration_task)
            .await
            .is_err()
        {
            tracing::warn!("deregistration did not finish within 5s");
        }
        self.accept_trigger.fire();
        for t in self.accept_tasks {
            let _ = t.await;
        }
        let open: usize = self.trackers.iter().map(|t| t.open()).sum();
        tracing::info!(open, deadline = ?self.drain_deadline, "draining: no new connections; waiting for open ones");
        let drains = self
            .trackers
            .iter()
            .map(|t| {
                let t = t.clone();
                let d = self.drain_deadline;
                tokio::spawn(async move { t.drain(d).await })
            })
            .collect::<Vec<_>>();
        let mut forced = 0;
        for d in drains {
            forced += d.await.unwrap_or(0);
        }
        tracing::info!(forced, "drained");
        if let Some(t) = self.capture_task {
            t.abort();
            let _ = t.await;
        }
        if self.capture.is_some() {
            match tokio::task::spawn_blocking(capture::cleanup).await {
                Ok(Ok(_)) => tracing::info!("capture rules removed"),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot remove the capture rules; run `isthmus-vm-agent cleanup`")
                }
                Err(e) => tracing::error!(error = %e, "capture cleanup task failed"),
            }
        }
        self.trigger.fire();
        self.dns.shutdown().await;
        for t in self.tasks {
            if tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .is_err()
            {
                tracing::warn!("an agent task did not stop within 5s");
            }
        }
    }

    pub async fn run_until_signal(self) {
        drain::os_signal().await;
        tracing::info!("SIGTERM: shutting down");
        self.shutdown().await;
    }
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} listener on {addr}"))
}

/// The nameservers of resolv.conf's text: the addresses whose DNS traffic is captured.
pub fn resolvers(text: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("nameserver") {
            // A scoped IPv6 address ("fe80::1%eth0") keeps its address part.
            if let Some(Ok(ip)) = words
                .next()
                .map(|w| w.split('%').next().unwrap_or(w).parse::<IpAddr>())
            {
                if !out.contains(&ip) {
                    out.push(ip);
                }
            }
        }
    }
    out
}

/// Whether this host can route to IPv6 service addresses (the allocated VIP range).
fn has_ipv6_route() -> bool {
    let probe: SocketAddr = "[2001:2::1]:9".parse().expect("literal");
    std::net::UdpSocket::bind("[::]:0")
        .and_then(|s| s.connect(probe))
        .is_ok()
}

/// The app ports of a group template, deduplicated and sorted.
pub(crate) fn app_ports(group: Option<&WorkloadGroup>) -> Vec<u16> {
    let ports: BTreeSet<u16> = group
        .map(|g| g.template.ports.values().copied().collect())
        .unwrap_or_default();
    ports.into_iter().collect()
}

pub async fn run(config: AgentConfig) -> anyhow::Result<AgentHandle> {
    // 1. Everything that can be checked without the network.
    config.validate()?;
    let bundle = AgentBundle::load(&config.bundle_dir)?;
    let identity = bundle.identity()?;
    crate::config::prepare_state_dir(&config.state_dir).with_context(|| {
        format!(
            "preparing the state directory {} (the agent keeps its key and catalog there)",
            config.state_dir.display()
        )
    })?;
    let settings: RegistrySettings =
        bundle.registry_settings(&config.bundle_dir, &config.cert_dir());
    let trust = TrustBundle::from_pem_file(&settings.root_cert, &settings.trust_domain)
        .with_context(|| format!("loading {}", settings.root_cert.display()))?;
    if config.capture == CaptureMode::Nftables {
        let version = tokio::task::spawn_blocking(capture::nft_version)
            .await?
            .context("--capture nftables needs a working `nft`")?;
        tracing::debug!(%version, "nftables");
    }
    let notifier = Arc::new(Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "ignoring the systemd notify settings");
        Notifier::disabled()
    }));
    let _ = notifier.status("obtaining the certificate");

    // 2. Identity.
    let (creds, enrolled) = identity::ensure(&bundle, &config.bundle_dir, &settings).await?;
    if enrolled {
        tracing::info!(identity = %creds.identity, dir = %settings.cert_dir.display(), "enrolled with the bootstrap token; the token is spent, renewals use the certificate");
    } else {
        tracing::info!(identity = %creds.identity, "using the certificate in the state directory");
    }
    let address = match config.address {
        Some(a) => a,
        None => registration::detect_address(&bundle.registry).with_context(|| {
            format!(
                "finding the VM's address towards the registry {} (give it with --address)",
                bundle.registry
            )
        })?,
    };

    let (trigger, shutdown) = drain::channel();
    let (accept_trigger, accept_shutdown) = drain::channel();
    let (registration_trigger, registration_shutdown) = drain::channel();
    let mut tasks = Vec::new();
    let mut accept_tasks = Vec::new();
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry, crate::metrics::PREFIX));
    let agent_metrics = AgentMetrics::register(&mut registry);
    let registry = Arc::new(Mutex::new(registry));
    let readiness = Readiness::default();
    let (creds_tx, creds_rx) = watch::channel(Arc::new(creds.clone()));

    // 3. The catalog, from the snapshot first when there is one.
    let hello = Hello {
        network: bundle.network.clone(),
        locality: config.locality.clone(),
        labels: config.labels.clone(),
        ..Hello::new(&bundle.group, &bundle.namespace, address)
    };
    let node = Node {
        id: hello.entry_name(),
        kind: NodeKind::Vm,
        network: bundle.network.clone(),
        cluster: bundle.cluster.clone(),
        locality: config.locality.clone(),
    };
    let restored = snapshot::load(&config.snapshot_path());
    let (initial, restored_at) = match restored {
        Some((view, at)) => {
            tracing::info!(version = %view.version, resources = view.resources.len(), "serving the catalog snapshot until the registry answers");
            (Some(view), Some(at))
        }
        None => (None, None),
    };
    let mut client = WatchClient::over_mtls(&settings, node, initial, WatchOptions::default())
        .context("loading the agent's credentials for the registry")?;
    if let Some(at) = restored_at {
        client = client.restored_at(at);
    }
    let sync = client.state();
    tasks.push(tokio::spawn(client.run(shutdown.clone())));
    tasks.push(tokio::spawn(snapshot::keep(
        config.snapshot_path(),
        sync.clone(),
        agent_metrics.clone(),
        shutdown.clone(),
    )));
    let routes = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
    // Ready once the routing table follows a view from the registry (or the snapshot).
    let catalog_ready = Readiness::default();
    let catalog_part = catalog_ready.part("catalog");
    tasks.push(tokio::spawn(routes::follow(
        sync.clone(),
        routes.clone(),
        RouteOptions {
            reach: Reach::Mesh,
            locality: config.locality.clone(),
            ..RouteOptions::default()
        },
        metrics.clone(),
        catalog_part,
        shutdown.clone(),
    )));

    // 4. Listeners: the embedded DNS proxy, inbound, outbound, admin, health.
    let mut dns_config =
        isthmus_dns::Config::new(&bundle.network, &bundle.cluster, settings.clone());
    dns_config.listen = config.dns_addr;
    dns_config.admin_addr = None;
    dns_config.namespace = bundle.namespace.clone();
    dns_config.resolv_conf = config.resolv_conf.clone();
    dns_config.node_id = format!("{}-dns", hello.entry_name());
    dns_config.socket_mark = Some(config.mark);
    // A VM without an IPv6 route cannot reach IPv6 service addresses (capture redirects
    // only what the kernel could route): give its apps IPv4 addresses only.
    dns_config.ipv6 = has_ipv6_route();
    if !dns_config.ipv6 {
        tracing::info!("no IPv6 route: mesh names are answered with IPv4 addresses only");
    }
    let dns = isthmus_dns::run_with(
        dns_config,
        Some(isthmus_dns::Embedding {
            sync: sync.clone(),
            metrics: registry.clone(),
        }),
    )
    .await
    .context("starting the embedded DNS proxy")?;
    let dns_addr = dns.dns_addr;

    let policy = match &config.authz_policy {
        Some(path) => AuthorizationPolicy::from_yaml_file(path)?,
        None => AuthorizationPolicy::default(),
    };
    let inbound_tracker = Tracker::new();
    let new_inbound = |app: AppTarget| {
        Ok::<_, anyhow::Error>(Arc::new(Inbound {
            tls: Arc::new(ArcSwap::from_pointee(Inbound::server_config(
                &creds, &trust,
            )?)),
            policy: Arc::new(ArcSwap::from_pointee(policy.clone())),
            mode: Mode::Strict,
            app,
            metrics: metrics.clone(),
            tracker: inbound_tracker.clone(),
            handshake_timeout: config.handshake_timeout,
            connect_timeout: config.connect_timeout,
            max_connections: config.max_connections,
            on_connection: None,
        }))
    };
    let outbound = Arc::new(Outbound {
        routes: routes.clone(),
        tls: Arc::new(ArcSwap::from_pointee(ClientTls::new(
            creds.clone(),
            trust.clone(),
        ))),
        metrics: metrics.clone(),
        tracker: Tracker::new(),
        connect: ConnectOptions {
            timeout: config.connect_timeout,
            mark: Some(config.mark),
            ..ConnectOptions::default()
        },
    });

    let group_kept = registration::load_group(&config.group_path());
    let (group_tx, group_rx) = watch::channel(group_kept);
    let mut inbounds: Vec<Arc<Inbound>> = Vec::new();
    let (inbound_addr, outbound_addr) = match config.capture {
        CaptureMode::Nftables => {
            let listener = bind(config.inbound_addr, "inbound").await?;
            let bound = listener.local_addr()?;
            let ib = new_inbound(AppTarget::OriginalPort {
                host: config.app_host,
            })?;
            inbounds.push(ib.clone());
            accept_tasks.push(tokio::spawn(inbound::serve(
                listener,
                ib,
                accept_shutdown.clone(),
            )));
            let out = bind(config.outbound_addr, "outbound").await?;
            let out_bound = out.local_addr()?;
            let mut outs = vec![out];
            // REDIRECT sends IPv6 to ::1: listen there too when the host has IPv6.
            if out_bound.is_ipv4() {
                let v6 = SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), out_bound.port());
                match TcpListener::bind(v6).await {
                    Ok(l) => outs.push(l),
                    Err(e) => {
                        tracing::info!(addr = %v6, error = %e, "no IPv6 outbound capture listener")
                    }
                }
            }
            for out in outs {
                let table = routes.clone();
                accept_tasks.push(tokio::spawn(outbound::serve_with(
                    out,
                    outbound.clone(),
                    config.max_connections,
                    accept_shutdown.clone(),
                    move |tcp: &TcpStream| captured_target(tcp, &table.load()),
                )));
            }
            (bound, out_bound)
        }
        CaptureMode::None => {
            // One inbound listener per app port, on the VM's address (the app listens on
            // loopback only); bound once the group's ports are known.
            let ports = app_ports(group_rx.borrow().as_ref());
            let mut first = None;
            for port in ports {
                let addr = SocketAddr::new(address, port);
                let listener = bind(addr, "inbound").await?;
                first.get_or_insert(listener.local_addr()?);
                let ib = new_inbound(AppTarget::Fixed(SocketAddr::new(config.app_host, port)))?;
                inbounds.push(ib.clone());
                accept_tasks.push(tokio::spawn(inbound::serve(
                    listener,
                    ib,
                    accept_shutdown.clone(),
                )));
            }
            if inbounds.is_empty() {
                tracing::warn!("--capture none: the app's ports are not known yet (no WorkloadGroup template kept from an earlier run); inbound listeners start after the next restart once registered");
            }
            (first.unwrap_or(config.inbound_addr), config.outbound_addr)
        }
    };
    for l in &config.outbound_listeners {
        let listener = bind(l.listen, "outbound").await?;
        accept_tasks.push(tokio::spawn(outbound::serve(
            listener,
            outbound.clone(),
            l.target(),
            config.max_connections,
            accept_shutdown.clone(),
        )));
    }
    tasks.push(tokio::spawn(follow_credentials(
        creds_rx.clone(),
        trust.clone(),
        inbounds.clone(),
        outbound.clone(),
        shutdown.clone(),
    )));

    // 5. Capture, once the listeners answer.
    let (capture_progress_tx, capture_progress) = watch::channel(CaptureProgress::default());
    let mut capture_task = None;
    let capture = match config.capture {
        CaptureMode::Nftables => {
            let resolv = std::fs::read_to_string(&config.resolv_conf).unwrap_or_default();
            let plan = CapturePlan {
                outbound_port: outbound_addr.port(),
                inbound_port: inbound_addr.port(),
                dns_port: dns_addr.port(),
                mark: config.mark,
                inbound_ports: app_ports(group_rx.borrow().as_ref()),
                exclude_inbound_ports: config.exclude_inbound_ports.clone(),
                exclude_outbound_ports: config.exclude_outbound_ports.clone(),
                dns_servers: resolvers(&resolv),
                // A dedicated user's connections are the agent's own; root's may be the app's.
                exempt_uid: Some(nix::unistd::geteuid())
                    .filter(|uid| !uid.is_root())
                    .map(|uid| uid.as_raw()),
            };
            install(plan.clone()).await?;
            agent_metrics.capture_installed.set(1);
            let plan = Arc::new(Mutex::new(plan));
            capture_task = Some(tokio::spawn(follow_capture(
                plan.clone(),
                routes.clone(),
                sync.clone(),
                group_rx.clone(),
                capture_progress_tx,
                agent_metrics.clone(),
            )));
            Some(plan)
        }
        CaptureMode::None => {
            // Nothing to wait for: the inbound listeners are the app's ports.
            capture_progress_tx.send_replace(CaptureProgress {
                ports: None,
                addresses: Some(0),
            });
            None
        }
    };

    // 6. Registration, probe, renewal.
    let (health_tx, health_rx) = watch::channel(HealthReport {
        healthy: false,
        reason: "not probed yet".into(),
    });
    tasks.push(tokio::spawn(probe::run(
        group_rx.clone(),
        config.app_host,
        health_tx,
        agent_metrics.clone(),
        shutdown.clone(),
    )));
    let (reg_state_tx, reg_state) = watch::channel(RegistrationState::default());
    let registration_task = tokio::spawn(
        Registration {
            registry: settings.clone(),
            hello: hello.clone(),
            creds: creds_rx.clone(),
            health: health_rx.clone(),
            group: group_tx,
            group_path: config.group_path(),
            state: reg_state_tx,
            metrics: agent_metrics.clone(),
            captured: capture_progress.clone(),
        }
        .run(registration_shutdown),
    );
    tasks.push(tokio::spawn(identity::keep_renewed(
        settings.clone(),
        creds_tx,
        agent_metrics.clone(),
        shutdown.clone(),
    )));

    // Admin and health.
    let trackers = vec![inbound_tracker.clone(), outbound.tracker.clone()];
    let admin_addr = match config.admin_addr {
        Some(addr) => {
            let listener = bind(addr, "admin").await?;
            let bound = listener.local_addr()?;
            let dump = Dump {
                effective: serde_json::to_value(&config)?,
                address,
                routes: routes.clone(),
                sync: sync.clone(),
                registration: reg_state.clone(),
                health: health_rx.clone(),
                group: group_rx.clone(),
                creds: creds_rx.clone(),
                capture: capture.clone(),
                dns_names: dns.resolver.clone(),
            };
            let dump = Arc::new(dump);
            let recent = trackers.clone();
            let extra = Router::new()
                .route(
                    "/config_dump",
                    get(move || {
                        let dump = dump.clone();
                        async move { Json(dump.render()) }
                    }),
                )
                .route(
                    "/debug/connections",
                    get(move || {
                        let mut all: Vec<_> = recent.iter().flat_map(|t| t.recent()).collect();
                        all.sort_by(|a, b| b.ended_unix.cmp(&a.ended_unix).then(b.id.cmp(&a.id)));
                        async move { Json(all) }
                    }),
                );
            let (shutdown, readiness, registry) =
                (shutdown.clone(), readiness.clone(), registry.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = admin::serve(listener, registry, readiness, extra, shutdown).await {
                    tracing::error!(error = %e, "admin server failed");
                }
            }));
            Some(bound)
        }
        None => None,
    };
    let health_addr = match config.health_addr {
        Some(addr) => {
            let listener = bind(addr, "health").await?;
            let bound = listener.local_addr()?;
            tasks.push(tokio::spawn(admin::serve_health(
                listener,
                readiness.clone(),
                shutdown.clone(),
            )));
            Some(bound)
        }
        None => None,
    };

    // 7. READY, then the watchdog.
    let accept_alive: Vec<_> = accept_tasks.iter().map(|t| t.abort_handle()).collect();
    tasks.push(tokio::spawn(supervise(Supervisor {
        notifier: notifier.clone(),
        readiness: readiness.clone(),
        catalog_ready,
        sync: sync.clone(),
        registration: reg_state.clone(),
        creds: creds_rx,
        capture: capture.clone(),
        accept_alive,
        capture_progress,
        metrics: agent_metrics,
        shutdown: shutdown.clone(),
    })));

    tracing::info!(
        identity = %identity,
        %address,
        %inbound_addr,
        %outbound_addr,
        %dns_addr,
        ?admin_addr,
        ?health_addr,
        capture = ?config.capture,
        registry = %bundle.registry,
        "vm agent serving"
    );
    Ok(AgentHandle {
        address,
        inbound_addr,
        outbound_addr,
        dns_addr,
        admin_addr,
        health_addr,
        routes,
        sync,
        registration: reg_state,
        identity: identity.to_string(),
        enrolled,
        readiness,
        notifier,
        capture,
        capture_task,
        drain_deadline: config.drain_deadline,
        trackers,
        dns,
        registration_trigger,
        registration_task,
        accept_trigger,
        accept_tasks,
        trigger,
        tasks,
    })
}

/// The mesh destination of a captured connection: its original destination, by the
/// service address (VIP) it was made to.
fn captured_target(
    tcp: &TcpStream,
    routes: &RouteTable,
) -> Result<OutboundTarget, isthmus_proxy::outbound::NoDestination> {
    let original = original_destination(tcp).map_err(|e| {
        refusal(
            "no_original_destination",
            format!("{e}: was this connection redirected?"),
        )
    })?;
    let local = tcp.local_addr().ok();
    if Some(original) == local {
        return Err(refusal(
            "not_redirected",
            format!("{original} is the capture listener itself: nothing to forward to"),
        ));
    }
    let hostname = routes.hostname_of(original.ip()).ok_or_else(|| {
        refusal(
            "unknown_service_address",
            format!(
                "{} is not a service address in the catalog (it may have just been removed)",
                original.ip()
            ),
        )
    })?;
    Ok(OutboundTarget {
        hostname: hostname.to_string(),
        port: original.port(),
        subset: String::new(),
    })
}

async fn install(plan: CapturePlan) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || capture::install(&plan))
        .await?
        .context("installing the capture rules (--capture none runs without them)")
}

/// Swaps the TLS configs when the certificate is renewed.
async fn follow_credentials(
    mut creds: watch::Receiver<Arc<Credentials>>,
    trust: TrustBundle,
    inbounds: Vec<Arc<Inbound>>,
    outbound: Arc<Outbound>,
    shutdown: drain::Watch,
) {
    let stop = shutdown.signaled();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            r = creds.changed() => if r.is_err() { return },
        }
        let c = creds.borrow_and_update().clone();
        match Inbound::server_config(&c, &trust) {
            Ok(cfg) => {
                let cfg = Arc::new(cfg);
                for ib in &inbounds {
                    ib.tls.store(cfg.clone());
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot use the renewed certificate for inbound"),
        }
        outbound
            .tls
            .store(Arc::new(ClientTls::new((*c).clone(), trust.clone())));
    }
}

/// What the capture rules cover so far: the app ports captured inbound, and how many
/// service addresses outbound (`None` until first applied).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureProgress {
    pub ports: Option<Vec<u16>>,
    pub addresses: Option<usize>,
}

/// Keeps the capture rules in step with the catalog (the service addresses to redirect)
/// and with the group template (the app ports to capture inbound).
async fn follow_capture(
    plan: Arc<Mutex<CapturePlan>>,
    routes: Arc<ArcSwap<RouteTable>>,
    mut sync: watch::Receiver<Arc<SyncState>>,
    mut group: watch::Receiver<Option<WorkloadGroup>>,
    progress: watch::Sender<CaptureProgress>,
    metrics: AgentMetrics,
) {
    let mut applied: Option<BTreeSet<IpAddr>> = None;
    loop {
        let ports = app_ports(group.borrow_and_update().as_ref());
        let reinstall = {
            let mut p = plan.lock().expect("capture plan poisoned");
            if p.inbound_ports != ports {
                p.inbound_ports = ports;
                Some(p.clone())
            } else {
                None
            }
        };
        if let Some(p) = reinstall {
            tracing::info!(ports = ?p.inbound_ports, "capturing inbound to the app's ports");
            let ports = p.inbound_ports.clone();
            match install(p).await {
                Ok(()) => progress.send_modify(|c| c.ports = Some(ports)),
                Err(e) => tracing::error!(error = %e, "cannot update the capture rules"),
            }
            // A reinstall empties the address sets.
            applied = None;
        } else if progress.borrow().ports.is_none() {
            let ports = plan
                .lock()
                .expect("capture plan poisoned")
                .inbound_ports
                .clone();
            progress.send_modify(|c| c.ports = Some(ports));
        }
        // The routing table follows the view: wait (bounded) until it is built from this
        // version, then take its addresses.
        let version = sync.borrow_and_update().view.version.clone();
        for _ in 0..200 {
            if routes.load().version() == version {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let wanted: BTreeSet<IpAddr> = routes.load().addresses().collect();
        if applied.as_ref() != Some(&wanted) {
            let v4: Vec<_> = wanted
                .iter()
                .filter_map(|ip| match ip {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                })
                .collect();
            let v6: Vec<_> = wanted
                .iter()
                .filter_map(|ip| match ip {
                    IpAddr::V6(v6) => Some(*v6),
                    IpAddr::V4(_) => None,
                })
                .collect();
            let n = wanted.len();
            match tokio::task::spawn_blocking(move || capture::set_destinations(&v4, &v6)).await {
                Ok(Ok(())) => {
                    tracing::debug!(addresses = n, "captured service addresses updated");
                    metrics.captured_addresses.set(n as i64);
                    applied = Some(wanted);
                    progress.send_modify(|c| c.addresses = Some(n));
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot update the captured service addresses")
                }
                Err(e) => tracing::error!(error = %e, "capture update task failed"),
            }
        }
        tokio::select! {
            r = sync.changed() => if r.is_err() { return },
            r = group.changed() => if r.is_err() { return },
            // A failed update is retried.
            _ = tokio::time::sleep(Duration::from_secs(5)), if applied.is_none() => {}
        }
    }
}

struct Supervisor {
    notifier: Arc<Notifier>,
    readiness: Readiness,
    catalog_ready: Readiness,
    sync: watch::Receiver<Arc<SyncState>>,
    registration: watch::Receiver<RegistrationState>,
    creds: watch::Receiver<Arc<Credentials>>,
    capture: Option<Arc<Mutex<CapturePlan>>>,
    accept_alive: Vec<tokio::task::AbortHandle>,
    capture_progress: watch::Receiver<CaptureProgress>,
    metrics: AgentMetrics,
    shutdown: drain::Watch,
}

/// READY once certificate, catalog and DNS are up (the DNS proxy is bound before this
/// runs); then, at the watchdog's pace, the self-check: WATCHDOG=1 and a STATUS line while
/// it passes, no ping (so systemd restarts the agent) and the reason while it fails.
async fn supervise(s: Supervisor) {
    let stop = s.shutdown.clone().signaled();
    tokio::pin!(stop);
    let interval = s
        .notifier
        .watchdog_interval()
        .map_or(SELF_CHECK_INTERVAL, |w| w.min(SELF_CHECK_INTERVAL));
    let mut announced = false;
    // Held while the agent is not ready to serve: before the first catalog and capture,
    // and while the self-check fails.
    let mut not_ready = Some(s.readiness.part("data plane"));
    let mut tick = tokio::time::interval(interval);
    let mut sync = s.sync.clone();
    let mut progress = s.capture_progress.clone();
    loop {
        let check = self_check(&s).await;
        // Ready also means the captured addresses are in place: an app that resolves a
        // name must find its connection redirected.
        let catalog_up = (s.sync.borrow().synced() || s.catalog_ready.is_ready())
            && s.capture_progress.borrow().addresses.is_some();
        match &check {
            Ok(()) => {
                s.metrics.data_plane_healthy.set(1);
                if catalog_up {
                    not_ready.take();
                    let status = status_line(&s);
                    if !announced {
                        tracing::info!(status = %status, "ready");
                        let _ = s.notifier.send(&[("READY", "1"), ("STATUS", &status)]);
                        announced = true;
                    } else {
                        let _ = s.notifier.status(&status);
                    }
                    let _ = s.notifier.watchdog();
                } else {
                    let _ = s
                        .notifier
                        .status("waiting for the first catalog from the registry");
                    let _ = s.notifier.watchdog();
                }
            }
            Err((reason, why)) => {
                s.metrics.data_plane_healthy.set(0);
                s.metrics
                    .data_plane_failures
                    .get_or_create(&Reason {
                        reason: (*reason).to_string(),
                    })
                    .inc();
                if not_ready.is_none() {
                    not_ready = Some(s.readiness.part("data plane"));
                }
                tracing::error!(reason, why = %why, "data plane unhealthy: not telling the watchdog");
                let _ = s.notifier.status(&format!("unhealthy: {why}"));
            }
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {}
            // Announce READY as soon as the first catalog and its capture are in place.
            r = sync.changed(), if !announced => if r.is_err() { return },
            r = progress.changed(), if !announced => if r.is_err() { return },
        }
    }
}

async fn self_check(s: &Supervisor) -> Result<(), (&'static str, String)> {
    if s.accept_alive.iter().any(|h| h.is_finished()) {
        return Err(("listener_stopped", "a listener stopped accepting".into()));
    }
    if let Some(plan) = &s.capture {
        let plan = plan.lock().expect("capture plan poisoned").clone();
        match tokio::task::spawn_blocking(move || capture::check(&plan)).await {
            Ok(Ok(())) => {}
            Ok(Err(why)) => return Err(("capture_rules", why)),
            Err(e) => return Err(("capture_rules", e.to_string())),
        }
    }
    let (remaining, _) = s.creds.borrow().leaf_validity().unwrap_or((0, 0));
    if remaining <= 0 {
        return Err((
            "certificate_expired",
            "the certificate expired and could not be renewed; is the registry reachable?".into(),
        ));
    }
    Ok(())
}

fn status_line(s: &Supervisor) -> String {
    let sync = s.sync.borrow().clone();
    let services = sync
        .view
        .resources
        .keys()
        .filter(|k| k.starts_with("svc/"))
        .count();
    let catalog = if sync.connected {
        format!("{services} services")
    } else {
        let age = sync
            .last_sync
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .map_or("?".into(), |d| format!("{}s", d.as_secs()));
        format!("{services} services from a {age} old view (registry unreachable)")
    };
    let reg = s.registration.borrow().clone();
    let entry = match (&reg.entry, reg.connected) {
        (Some(e), true) => format!(
            "registered as {e} ({})",
            reg.health.as_deref().unwrap_or("?")
        ),
        (Some(e), false) => format!("re-registering {e}"),
        (None, _) => "registering".into(),
    };
    let (remaining, _) = s.creds.borrow().leaf_validity().unwrap_or((0, 0));
    format!(
        "{catalog}; {entry}; certificate valid {}h{:02}m",
        remaining / 3600,
        (remaining % 3600) / 60
    )
}

/// What `/config_dump` shows.
struct Dump {
    effective: serde_json::Value,
    address: IpAddr,
    routes: Arc<ArcSwap<RouteTable>>,
    sync: watch::Receiver<Arc<SyncState>>,
    registration: watch::Receiver<RegistrationState>,
    health: watch::Receiver<HealthReport>,
    group: watch::Receiver<Option<WorkloadGroup>>,
    creds: watch::Receiver<Arc<Credentials>>,
    capture: Option<Arc<Mutex<CapturePlan>>>,
    dns_names: Arc<isthmus_dns::server::Resolver>,
}

impl Dump {
    fn render(&self) -> serde_json::Value {
        let state = self.sync.borrow().clone();
        let creds = self.creds.borrow().clone();
        let (remaining, lifetime) = creds.leaf_validity().unwrap_or((0, 0));
        let health = self.health.borrow().clone();
        let group = self.group.borrow().clone();
        let capture = self.capture.as_ref().map(|p| {
            serde_json::to_value(&*p.lock().expect("capture plan poisoned")).unwrap_or_default()
        });
        serde_json::json!({
            "effective": self.effective,
            "address": self.address,
            "identity": {
                "spiffe_id": creds.identity.to_string(),
                "valid_for_seconds": remaining,
                "lifetime_seconds": lifetime,
                "renews_in_seconds": identity::renew_in(remaining, lifetime).as_secs(),
            },
            "registration": *self.registration.borrow(),
            "app_health": { "healthy": health.healthy, "reason": health.reason },
            "workload_group": group.map(|g| serde_json::json!({
                "name": g.name,
                "namespace": g.namespace,
                "ports": g.template.ports,
                "probe": g.probe.is_some(),
            })),
            "catalog": {
                "version": state.view.version,
                "connected": state.connected,
                "synced": state.synced(),
                "last_error": state.last_error,
                "snapshots": state.snapshots,
                "resumes": state.resumes,
            },
            "capture": capture,
            "destinations": self.routes.load().dump(),
            "name_table": self.dns_names.names().dump(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# generated\nsearch example.com\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nnameserver 10.0.0.2\noptions ndots:5\nnameserver bogus\n";
        assert_eq!(
            resolvers(text),
            vec![
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap()
            ]
        );
    }
}
