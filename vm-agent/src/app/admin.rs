//! The admin and health ports, served once everything they report on is running (they
//! were bound with the other listeners). Admin: `/metrics`, `/logging`, `/readyz`,
//! `/config_dump` (the effective flags and what the agent holds now: identity,
//! registration, the app's health, the group template, the catalog, the capture plan, the
//! routing table and the DNS names), `/debug/connections` and `/debug/tunnels`. Health:
//! `/healthz/ready`.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use isthmus_proto::admin::{self, Readiness};
use isthmus_proto::drain;
use isthmus_proto::model::{Probe, ProbeAction, WorkloadGroup};
use isthmus_proto::program::Tasks;
use isthmus_proto::registration::HealthReport;
use isthmus_proto::subscription::SyncState;
use isthmus_proto::tls::Credentials;
use isthmus_proxy::connection::Tracker;
use isthmus_proxy::routes::RouteTable;
use isthmus_proxy::tunnel::Pool;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::capture::CapturePlan;
use crate::identity;
use crate::pod::AppProbers;
use crate::probe;
use crate::registration::RegistrationState;

/// What `/config_dump` shows.
pub(crate) struct Dump {
    pub effective: serde_json::Value,
    pub address: IpAddr,
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub sync: watch::Receiver<Arc<SyncState>>,
    pub registration: watch::Receiver<RegistrationState>,
    pub health: watch::Receiver<HealthReport>,
    pub group: watch::Receiver<Option<WorkloadGroup>>,
    pub creds: watch::Receiver<Arc<Credentials>>,
    pub capture: Option<Arc<Mutex<CapturePlan>>>,
    pub dns_names: Arc<isthmus_dns::server::Resolver>,
}

/// The admin port's parts besides its listener.
pub(crate) struct Admin {
    pub dump: Dump,
    /// A pod's app probes, answered on the health port.
    pub app_probers: AppProbers,
    pub app_host: IpAddr,
    pub trackers: Vec<Arc<Tracker>>,
    /// The outbound's tunnels, for `/debug/tunnels`.
    pub tunnels: Option<Pool>,
    pub registry: Arc<Mutex<Registry>>,
    pub readiness: Readiness,
}

/// Serves the admin port (when bound) and the health port (when bound) until `shutdown`.
pub(crate) fn serve(
    admin: Admin,
    admin_listener: Option<TcpListener>,
    health_listener: Option<TcpListener>,
    metrics_listener: Option<TcpListener>,
    tasks: &mut Tasks,
    shutdown: &drain::Watch,
) {
    if let Some(listener) = admin_listener {
        let extra = routes(admin.dump, admin.trackers, admin.tunnels);
        let (registry, readiness, shutdown) = (
            admin.registry.clone(),
            admin.readiness.clone(),
            shutdown.clone(),
        );
        tasks.spawn("admin", async move {
            if let Err(e) = admin::serve(listener, registry, readiness, extra, shutdown).await {
                tracing::error!(error = %e, "admin server failed");
            }
        });
    }
    if let Some(listener) = metrics_listener {
        if let Err(e) =
            admin::spawn_metrics(tasks, listener, admin.registry.clone(), shutdown.clone())
        {
            tracing::error!(error = %e, "metrics server failed");
        }
    }
    if let Some(listener) = health_listener {
        let extra = app_health(admin.app_probers, admin.app_host);
        tasks.spawn(
            "health",
            admin::serve_health_with(listener, admin.readiness, extra, shutdown.clone()),
        );
    }
}

/// `/app-health/<container>/<probe>`: the app's probe the injector moved here, one try per
/// request (the kubelet keeps the timing and thresholds). Its probes reach the app over
/// loopback, where capture does not apply; from the kubelet they would have been captured
/// and refused by the mTLS inbound.
fn app_health(probers: AppProbers, app_host: IpAddr) -> Router {
    let probers = Arc::new(probers);
    Router::new().route(
        "/app-health/{container}/{probe}",
        get(move |Path((container, probe)): Path<(String, String)>| {
            let probers = probers.clone();
            async move {
                let path = format!("/app-health/{container}/{probe}");
                let Some(p) = probers.0.get(&path) else {
                    let known: Vec<&String> = probers.0.keys().collect();
                    return (
                        StatusCode::NOT_FOUND,
                        format!("no app probe at {path}; this pod's are {known:?}\n"),
                    );
                };
                match probe::try_once(&p.action, app_host, p.timeout).await {
                    Ok(()) => (StatusCode::OK, "ok\n".to_string()),
                    Err(why) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("{}: {why}\n", p.summary),
                    ),
                }
            }
        }),
    )
}

/// The agent's own admin routes: `/config_dump`, `/debug/connections` and
/// `/debug/tunnels` (the pool's tunnels by peer, and the peers remembered for HTTP/2 or
/// for no tunnel).
fn routes(dump: Dump, trackers: Vec<Arc<Tracker>>, tunnels: Option<Pool>) -> Router {
    let dump = Arc::new(dump);
    Router::new()
        .route(
            "/debug/tunnels",
            get(move || {
                let tunnels = tunnels.clone();
                async move {
                    match tunnels {
                        Some(pool) => {
                            Json(serde_json::to_value(pool.snapshot().await).unwrap_or_default())
                        }
                        None => {
                            Json(serde_json::json!({ "tunnels": [], "off": "--tunnel-port 0" }))
                        }
                    }
                }
            }),
        )
        .route(
            "/config_dump",
            get(move || {
                let dump = dump.clone();
                async move { dump.body() }
            }),
        )
        .route(
            "/debug/connections",
            get(move || {
                let mut all: Vec<_> = trackers.iter().flat_map(|t| t.recent()).collect();
                all.sort_by(|a, b| b.ended_unix.cmp(&a.ended_unix).then(b.id.cmp(&a.id)));
                async move { Json(all) }
            }),
        )
}

impl Dump {
    /// The dump as a JSON response. Rendering a large catalog's dump allocates much more
    /// than the text in passing (a JSON tree of every service, destination and name), and
    /// the allocator would keep those pages (1,000 services left the agent 3.3 MiB bigger
    /// for good): they are handed back once the text is made.
    fn body(&self) -> axum::response::Response {
        use axum::response::IntoResponse;
        let text = serde_json::to_vec(&self.render());
        isthmus_proto::allocator::release_free_memory();
        match text {
            Ok(text) => (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                text,
            )
                .into_response(),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("rendering the dump: {e}\n"),
            )
                .into_response(),
        }
    }

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
                "probe": g.probe.as_ref().map(probe_json),
            })),
            "catalog": state.dump(),
            "capture": capture,
            "destinations": self.routes.load().dump(),
            "name_table": self.dns_names.names().dump(),
        })
    }
}

/// The group's probe as the agent runs it (every timing field filled in), for
/// `/config_dump`; header values are left out, since they may carry credentials.
fn probe_json(p: &Probe) -> serde_json::Value {
    let action = match &p.action {
        ProbeAction::HttpGet {
            path,
            port,
            host,
            scheme,
            headers,
        } => serde_json::json!({
            "httpGet": {
                "scheme": scheme.as_str(),
                "host": host,
                "port": port,
                "path": path,
                "headers": headers.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(),
            }
        }),
        ProbeAction::TcpSocket { host, port } => {
            serde_json::json!({"tcpSocket": {"host": host, "port": port}})
        }
        ProbeAction::Exec { command } => serde_json::json!({"exec": {"command": command}}),
        ProbeAction::Grpc { port, service } => {
            serde_json::json!({"grpc": {"port": port, "service": service}})
        }
    };
    serde_json::json!({
        "action": action,
        "initial_delay_seconds": p.initial_delay_seconds,
        "period_seconds": p.period_seconds,
        "timeout_seconds": p.timeout_seconds,
        "success_threshold": p.success_threshold,
        "failure_threshold": p.failure_threshold,
    })
}
