//! The east-west gateway's wiring: the Watch client (as a gateway of its network, so the
//! view holds only local endpoints), the routing table that follows it, the SNI
//! passthrough listener, the admin server and the health server; one trigger stops them
//! and drain lets open connections finish.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use axum::routing::get;
use axum::{Json, Router};
use isthmus_proto::admin::{self, Readiness};
use isthmus_proto::drain;
use isthmus_proto::model::{Node, NodeKind};
use isthmus_proto::subscription::{SyncState, WatchClient, WatchOptions};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::GatewayConfig;
use crate::connection::Tracker;
use crate::metrics::Metrics;
use crate::passthrough::{self, Passthrough};
use crate::routes::{self, Reach, RouteOptions, RouteTable};

/// A running gateway.
pub struct GatewayHandle {
    pub sni_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub health_addr: Option<SocketAddr>,
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub metrics: Arc<Metrics>,
    pub sync: watch::Receiver<Arc<SyncState>>,
    pub tracker: Arc<Tracker>,
    readiness: Readiness,
    drain_deadline: Duration,
    /// Stops accepting.
    accept_trigger: drain::Trigger,
    /// Stops everything else (Watch, admin, health).
    trigger: drain::Trigger,
    accept_task: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for GatewayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayHandle")
            .field("sni_addr", &self.sni_addr)
            .field("admin_addr", &self.admin_addr)
            .field("health_addr", &self.health_addr)
            .finish()
    }
}

impl GatewayHandle {
    pub fn is_ready(&self) -> bool {
        self.readiness.is_ready()
    }

    /// Drains: reports not-ready, stops accepting, lets open connections finish until the
    /// drain deadline, closes the rest, then stops every task.
    pub async fn shutdown(self) {
        self.readiness.drain();
        self.metrics.draining.set(1);
        self.accept_trigger.fire();
        let _ = self.accept_task.await;
        let open = self.tracker.open();
        tracing::info!(
            open,
            deadline = ?self.drain_deadline,
            "draining: no new connections; waiting for open ones"
        );
        let forced = self.tracker.drain(self.drain_deadline).await;
        tracing::info!(forced, "drained");
        self.trigger.fire();
        for t in self.tasks {
            if tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .is_err()
            {
                tracing::warn!("a gateway task did not stop within 5s");
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

pub async fn run(config: GatewayConfig) -> anyhow::Result<GatewayHandle> {
    config.validate()?;
    let (trigger, shutdown) = drain::channel();
    let (accept_trigger, accept_shutdown) = drain::channel();
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry, "isthmus_gateway"));
    let registry = Arc::new(Mutex::new(registry));
    let readiness = Readiness::default();
    let tracker = Tracker::new();
    let mut tasks = Vec::new();

    // Bind first: a port in use is an error at start, not after the registry answered.
    let sni = bind(config.sni_addr, "SNI passthrough").await?;
    let sni_addr = sni.local_addr()?;
    let admin = match config.admin_addr {
        Some(a) => Some(bind(a, "admin").await?),
        None => None,
    };
    let health = match config.health_addr {
        Some(a) => Some(bind(a, "health").await?),
        None => None,
    };

    if let (false, Some(token)) = (config.has_credentials(), &config.token) {
        let creds =
            isthmus_proto::certs::enroll(&config.registry, token, &config.registry.cert_dir)
                .await
                .with_context(|| {
                    format!(
                        "obtaining a certificate with the bootstrap token into {}",
                        config.registry.cert_dir.display()
                    )
                })?;
        tracing::info!(identity = %creds.identity, dir = %config.registry.cert_dir.display(), "enrolled with the bootstrap token");
    }

    let node = Node {
        id: config.node_id.clone(),
        kind: NodeKind::Gateway,
        network: config.network.clone(),
        cluster: config.cluster.clone(),
        locality: config.locality.clone(),
    };
    let client = WatchClient::over_mtls(&config.registry, node, None, WatchOptions::default())
        .with_context(|| {
            format!(
                "loading the gateway's credentials (root {}, certificates in {})",
                config.registry.root_cert.display(),
                config.registry.cert_dir.display()
            )
        })?;
    let sync = client.state();
    tasks.push(tokio::spawn(client.run(shutdown.clone())));

    let routes = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
    let route_opts = RouteOptions {
        reach: Reach::LocalWorkloads,
        policy: config.policy,
        outlier: config.outlier(),
        locality: config.locality.clone(),
        max_connections_per_destination: config.max_connections_per_destination,
    };
    tasks.push(tokio::spawn(routes::follow(
        sync.clone(),
        routes.clone(),
        route_opts,
        metrics.clone(),
        readiness.part("catalog"),
        shutdown.clone(),
    )));

    let p = Arc::new(Passthrough {
        routes: routes.clone(),
        metrics: metrics.clone(),
        tracker: tracker.clone(),
        handshake_timeout: config.handshake_timeout,
        connect: config.connect_options(),
        max_connections: config.max_connections,
    });
    let accept_task = tokio::spawn(passthrough::serve(sni, p, accept_shutdown));

    let admin_addr = match admin {
        Some(listener) => {
            let bound = listener.local_addr()?;
            let dump_routes = routes.clone();
            let dump_sync = sync.clone();
            let dump_tracker = tracker.clone();
            let effective = serde_json::to_value(&config)?;
            let extra = Router::new().route(
                "/config_dump",
                get(move || {
                    let table = dump_routes.load_full();
                    let state = dump_sync.borrow().clone();
                    let effective = effective.clone();
                    let open = dump_tracker.open();
                    async move {
                        Json(serde_json::json!({
                            "effective": effective,
                            "catalog": {
                                "version": state.view.version,
                                "connected": state.connected,
                                "synced": state.synced(),
                                "last_error": state.last_error,
                                "snapshots": state.snapshots,
                                "resumes": state.resumes,
                            },
                            "open_connections": open,
                            "destinations": table.dump(),
                        }))
                    }
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

    let health_addr = match health {
        Some(listener) => {
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

    tracing::info!(
        network = %config.network,
        %sni_addr,
        ?admin_addr,
        ?health_addr,
        registry = %config.registry.addr,
        "east-west gateway serving"
    );
    Ok(GatewayHandle {
        sni_addr,
        admin_addr,
        health_addr,
        routes,
        metrics,
        sync,
        tracker,
        readiness,
        drain_deadline: config.drain_deadline,
        accept_trigger,
        trigger,
        accept_task,
        tasks,
    })
}
