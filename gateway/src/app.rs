//! The east-west gateway's wiring, as the phases it starts in: bind every listener (a port
//! in use fails the start before the registry is asked anything), make sure there is a
//! certificate (enrol with the bootstrap token when the directory has none), follow the
//! catalog (the Watch client, as a gateway of its network so the view holds only local
//! endpoints, and the routing table that follows it: readiness part "catalog"), serve the
//! data path (SNI passthrough, and the tunnel listener on the same routing, counting and
//! tracker), the admin server (with `/config_dump`) and the health server. The handle it
//! returns stops them in the skeleton's order: not ready, stop accepting (tunnels are told
//! to go away), let open connections finish until the drain deadline, stop the rest.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use axum::routing::get;
use axum::{Json, Router};
use isthmus_proto::admin;
use isthmus_proto::drain;
use isthmus_proto::model::{Node, NodeKind};
use isthmus_proto::program::{self, Program, Readiness, Stop, Tasks};
use isthmus_proto::subscription::{SyncState, WatchClient, WatchOptions};
use isthmus_proto::tls::{Credentials, TrustBundle};
use isthmus_proxy::connection::{self, Tracker};
use isthmus_proxy::metrics::istio::{Local, Peer};
use isthmus_proxy::metrics::Metrics;
use isthmus_proxy::routes::{self, Reach, RouteOptions, RouteTable};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::GatewayConfig;
use crate::passthrough::{self, Passthrough};
use crate::tunnel::{self, Tunnel, TunnelTls};

/// The prefix of every metric the gateway exports.
pub const METRICS_PREFIX: &str = "isthmus_gateway";

/// A running gateway.
pub struct GatewayHandle {
    pub sni_addr: SocketAddr,
    pub tunnel_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub health_addr: Option<SocketAddr>,
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub metrics: Arc<Metrics>,
    pub sync: watch::Receiver<Arc<SyncState>>,
    pub tracker: Arc<Tracker>,
    drain_deadline: Duration,
    stop: Stop,
}

impl std::fmt::Debug for GatewayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayHandle")
            .field("sni_addr", &self.sni_addr)
            .field("tunnel_addr", &self.tunnel_addr)
            .field("admin_addr", &self.admin_addr)
            .field("metrics_addr", &self.metrics_addr)
            .field("health_addr", &self.health_addr)
            .finish()
    }
}

impl GatewayHandle {
    pub fn is_ready(&self) -> bool {
        self.stop.readiness.is_ready()
    }

    /// Drains: reports not-ready, stops accepting, lets open connections finish until the
    /// drain deadline, closes the rest, then stops every task.
    pub async fn shutdown(self) {
        self.metrics.draining.set(1);
        let (tracker, deadline) = (self.tracker, self.drain_deadline);
        self.stop
            .run(async move {
                connection::drain_all(&[tracker], deadline).await;
            })
            .await;
    }
}

impl Program for GatewayHandle {
    fn shutdown(self) -> impl std::future::Future<Output = ()> + Send {
        GatewayHandle::shutdown(self)
    }
}

/// Every listener, bound before anything else starts.
struct Listeners {
    sni: TcpListener,
    tunnel: Option<TcpListener>,
    admin: Option<TcpListener>,
    metrics: Option<TcpListener>,
    health: Option<TcpListener>,
}

/// What the phases share: the two stop triggers' watches, the tasks they start, readiness
/// and the metrics.
struct Wiring {
    /// Fires first, to stop accepting.
    accept_shutdown: drain::Watch,
    /// Fires once open connections are done, to stop everything else.
    shutdown: drain::Watch,
    accepting: Tasks,
    tasks: Tasks,
    readiness: Readiness,
    registry: Arc<Mutex<Registry>>,
    metrics: Arc<Metrics>,
    tracker: Arc<Tracker>,
}

/// What following the catalog gives the rest of the gateway.
struct Catalog {
    sync: watch::Receiver<Arc<SyncState>>,
    routes: Arc<ArcSwap<RouteTable>>,
}

pub async fn run(config: GatewayConfig) -> anyhow::Result<GatewayHandle> {
    config.validate()?;
    let listeners = bind(&config).await?;
    ensure_credentials(&config).await?;

    let (accept_trigger, accept_shutdown) = drain::channel();
    let (trigger, shutdown) = drain::channel();
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry, METRICS_PREFIX));
    isthmus_proto::limits::register(registry.sub_registry_with_prefix("isthmus"));
    report_as(&config, &metrics);
    let mut w = Wiring {
        accept_shutdown,
        shutdown,
        accepting: Tasks::default(),
        tasks: Tasks::default(),
        readiness: Readiness::default(),
        registry: Arc::new(Mutex::new(registry)),
        metrics,
        tracker: Tracker::new(),
    };

    let catalog = follow_catalog(&config, &mut w)?;
    let passthrough = data_path(&config, &catalog, &w);
    let sni_addr = serve_passthrough(listeners.sni, passthrough.clone(), &mut w)?;
    let tunnel_addr = match listeners.tunnel {
        Some(l) => Some(serve_tunnel(&config, l, passthrough, &mut w)?),
        None => None,
    };
    let admin_addr = match listeners.admin {
        Some(l) => Some(serve_admin(&config, l, &catalog, &mut w)?),
        None => None,
    };
    let metrics_addr = match listeners.metrics {
        Some(l) => Some(admin::spawn_metrics(
            &mut w.tasks,
            l,
            w.registry.clone(),
            w.shutdown.clone(),
        )?),
        None => None,
    };
    let health_addr = match listeners.health {
        Some(l) => Some(serve_health(l, &mut w)?),
        None => None,
    };

    tracing::info!(
        network = %config.network,
        %sni_addr,
        ?tunnel_addr,
        ?admin_addr,
        ?metrics_addr,
        ?health_addr,
        registry = %config.registry.addr,
        "east-west gateway serving"
    );
    Ok(GatewayHandle {
        sni_addr,
        tunnel_addr,
        admin_addr,
        metrics_addr,
        health_addr,
        routes: catalog.routes,
        metrics: w.metrics,
        sync: catalog.sync,
        tracker: w.tracker,
        drain_deadline: config.drain_deadline,
        stop: Stop {
            readiness: w.readiness,
            accept: accept_trigger,
            accepting: w.accepting,
            rest: trigger,
            tasks: w.tasks,
        },
    })
}

/// Phase 1: every listener, so a port in use is an error at start, not after the registry
/// answered.
async fn bind(config: &GatewayConfig) -> anyhow::Result<Listeners> {
    Ok(Listeners {
        sni: program::bind(config.sni_addr, "SNI passthrough").await?,
        tunnel: program::bind_optional(config.tunnel_addr, "tunnel").await?,
        admin: program::bind_optional(config.admin_addr, "admin").await?,
        metrics: program::bind_optional(config.metrics_addr, "metrics").await?,
        health: program::bind_optional(config.health_addr, "health").await?,
    })
}

/// Phase 2: a certificate in the certificate directory, obtained with the bootstrap token
/// when there is none yet.
async fn ensure_credentials(config: &GatewayConfig) -> anyhow::Result<()> {
    let (false, Some(token)) = (config.has_credentials(), &config.token) else {
        return Ok(());
    };
    let dir = &config.registry.cert_dir;
    let creds = isthmus_proto::certs::enroll(&config.registry, token, dir)
        .await
        .with_context(|| {
            format!(
                "obtaining a certificate with the bootstrap token into {}",
                dir.display()
            )
        })?;
    tracing::info!(identity = %creds.identity, dir = %dir.display(), "enrolled with the bootstrap token");
    Ok(())
}

/// Who the gateway is in Istio's metrics (it reports as their source): the service account
/// of its certificate as the workload, in that identity's namespace, of its cluster.
fn report_as(config: &GatewayConfig, metrics: &Metrics) {
    let identity = match Credentials::from_dir(&config.registry.cert_dir) {
        Ok(c) => c.identity,
        Err(e) => {
            // The Watch client reads the same files next and fails the start naming them.
            tracing::debug!(error = %e, "no certificate to name the gateway in Istio's metrics");
            return;
        }
    };
    let peer = Peer::from_labels(
        identity.service_account(),
        &isthmus_proto::model::Labels::default(),
        &config.cluster,
        Some(&identity),
    );
    metrics.istio.set_local(Local {
        peer,
        address: None,
    });
}

/// Phase 3: the Watch client (as a gateway of its network) and the route follower, which
/// holds the readiness part "catalog" until the first view is in use.
fn follow_catalog(config: &GatewayConfig, w: &mut Wiring) -> anyhow::Result<Catalog> {
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
    w.tasks.spawn("watch", client.run(w.shutdown.clone()));

    let routes = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
    let opts = RouteOptions {
        reach: Reach::LocalWorkloads,
        policy: config.policy,
        outlier: config.outlier(),
        locality: config.locality.clone(),
        max_connections_per_destination: config.max_connections_per_destination,
    };
    w.tasks.spawn(
        "route follower",
        routes::follow(
            sync.clone(),
            routes.clone(),
            opts,
            w.metrics.clone(),
            w.readiness.part("catalog"),
            w.shutdown.clone(),
        ),
    );
    Ok(Catalog { sync, routes })
}

/// Phase 4: the data path into the network, which both listeners share: the routing table,
/// connect options, metrics and the tracker that drain waits on.
fn data_path(config: &GatewayConfig, catalog: &Catalog, w: &Wiring) -> Arc<Passthrough> {
    Arc::new(Passthrough {
        routes: catalog.routes.clone(),
        metrics: w.metrics.clone(),
        tracker: w.tracker.clone(),
        handshake_timeout: config.handshake_timeout,
        connect: config.connect_options(),
        max_connections: config.max_connections,
    })
}

/// SNI passthrough; it stops accepting on the first trigger and its open connections are
/// drained through the tracker.
fn serve_passthrough(
    listener: TcpListener,
    p: Arc<Passthrough>,
    w: &mut Wiring,
) -> anyhow::Result<SocketAddr> {
    let bound = listener.local_addr()?;
    w.accepting.spawn(
        "SNI passthrough",
        passthrough::serve(listener, p, w.accept_shutdown.clone()),
    );
    Ok(bound)
}

/// The tunnel listener, with the gateway's certificate and the mesh root; on the first
/// trigger it stops accepting and tells open tunnels to go away, and their streams are
/// drained through the tracker with passthrough's connections.
fn serve_tunnel(
    config: &GatewayConfig,
    listener: TcpListener,
    p: Arc<Passthrough>,
    w: &mut Wiring,
) -> anyhow::Result<SocketAddr> {
    let bound = listener.local_addr()?;
    let registry = &config.registry;
    let tls = TrustBundle::from_pem_file(&registry.root_cert, &registry.trust_domain)
        .and_then(|bundle| TunnelTls::load(&registry.cert_dir, bundle))
        .with_context(|| {
            format!(
                "loading the tunnel listener's credentials (root {}, certificates in {})",
                registry.root_cert.display(),
                registry.cert_dir.display()
            )
        })?;
    let tunnel = Arc::new(Tunnel {
        passthrough: p,
        tls: Arc::new(tls),
        max_streams: isthmus_proxy::tunnel::DEFAULT_MAX_STREAMS,
    });
    if config.quic {
        let initial = (*tunnel.tls.current_quic()).clone();
        let endpoint = isthmus_proxy::tunnel::quic::server_endpoint(bound, initial)?;
        w.accepting.spawn(
            "QUIC tunnel",
            tunnel::serve_quic(endpoint, tunnel.clone(), w.accept_shutdown.clone()),
        );
    }
    w.accepting.spawn(
        "tunnel",
        tunnel::serve(listener, tunnel, w.accept_shutdown.clone()),
    );
    Ok(bound)
}

/// Phase 5: the admin server, with the gateway's `/config_dump`.
fn serve_admin(
    config: &GatewayConfig,
    listener: TcpListener,
    catalog: &Catalog,
    w: &mut Wiring,
) -> anyhow::Result<SocketAddr> {
    let bound = listener.local_addr()?;
    let extra = config_dump(config, catalog, w.tracker.clone())?;
    let (registry, readiness, shutdown) =
        (w.registry.clone(), w.readiness.clone(), w.shutdown.clone());
    w.tasks.spawn("admin", async move {
        if let Err(e) = admin::serve(listener, registry, readiness, extra, shutdown).await {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    Ok(bound)
}

/// `/config_dump`: the effective configuration, the catalog's sync state, open connections
/// and every destination with its endpoints.
fn config_dump(
    config: &GatewayConfig,
    catalog: &Catalog,
    tracker: Arc<Tracker>,
) -> anyhow::Result<Router> {
    let effective = serde_json::to_value(config)?;
    let (routes, sync) = (catalog.routes.clone(), catalog.sync.clone());
    Ok(Router::new().route(
        "/config_dump",
        get(move || {
            let table = routes.load_full();
            let state = sync.borrow().clone();
            let effective = effective.clone();
            let open = tracker.open();
            async move {
                Json(serde_json::json!({
                    "effective": effective,
                    "catalog": state.dump(),
                    "open_connections": open,
                    "destinations": table.dump(),
                }))
            }
        }),
    ))
}

/// Phase 6: the health server (`/healthz/ready`, from the same readiness as `/readyz`).
fn serve_health(listener: TcpListener, w: &mut Wiring) -> anyhow::Result<SocketAddr> {
    let bound = listener.local_addr()?;
    w.tasks.spawn(
        "health",
        admin::serve_health(listener, w.readiness.clone(), w.shutdown.clone()),
    );
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use isthmus_proto::subscription::RegistrySettings;
    use isthmus_proto::test_pki::TestCa;
    use isthmus_proto::tls;
    use isthmus_proxy::metrics::{Direction, RefusalLabels};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::tunnel::tests::{connect, h2_over, mtls};

    /// `GET path` on the admin port: the whole response.
    async fn admin_get(addr: SocketAddr, path: &str) -> String {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut body = String::new();
        tcp.read_to_string(&mut body).await.unwrap();
        body
    }

    /// A gateway whose registry never answers serves its listeners all the same, with an
    /// empty routing table: the tunnel port presents the certificate of the certificate
    /// directory, refuses an unknown service by name, is in `/config_dump`, and its tunnels
    /// go away at shutdown rather than wait for the drain deadline.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_tunnel_listener_is_wired_to_the_gateways_certificate_metrics_and_drain() {
        let ca = TestCa::new("cluster.local");
        let dir = tempfile::tempdir().unwrap();
        let gateway = ca.id("istio-system", "eastwest");
        ca.write_credentials(dir.path(), &gateway).unwrap();
        let mut config = GatewayConfig::new(
            "network-b",
            "",
            RegistrySettings {
                addr: "127.0.0.1:1".into(),
                root_cert: dir.path().join(tls::ROOT_CERT_FILE),
                cert_dir: dir.path().to_path_buf(),
                trust_domain: ca.trust_domain().into(),
            },
        );
        let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
        config.sni_addr = lo;
        config.tunnel_addr = Some(lo);
        config.admin_addr = Some(lo);
        config.metrics_addr = None;
        config.health_addr = None;
        let gw = run(config).await.unwrap();

        let caller = ca.workload("shop", "ratings");
        let tls = mtls(gw.tunnel_addr.unwrap(), &caller, &ca.bundle())
            .await
            .unwrap();
        let presented = tls::peer_identity(tls.get_ref().1.peer_certificates());
        assert_eq!(presented, Some(gateway));
        let mut send = h2_over(tls).await;
        let err = connect(&mut send, "reviews.shop.svc.cluster.local:9080", None)
            .await
            .unwrap_err();
        assert_eq!(err, http::StatusCode::NOT_FOUND);
        let refused = || {
            gw.metrics
                .refused
                .get_or_create(&RefusalLabels {
                    direction: Direction::passthrough,
                    reason: "unknown_service".into(),
                })
                .get()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while refused() == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(refused(), 1);

        let dump = admin_get(gw.admin_addr.unwrap(), "/config_dump").await;
        assert!(dump.contains(r#""tunnel_addr":"127.0.0.1:0""#), "{dump}");

        assert!(gw.tracker.open() >= 1, "the tunnel is open");
        let started = Instant::now();
        gw.shutdown().await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "shutdown waited {:?} for the open tunnel",
            started.elapsed()
        );
        drop(send);
    }
}
