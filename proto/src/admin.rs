//! The admin HTTP server every program runs: `/metrics`, `/healthz`, `/readyz`, `/logging`
//! (GET shows the log filter, POST `?level=<filter>` changes it), plus the program's own
//! routes (`/debug/*`, `/config_dump`).
//!
//! Only `/metrics`, `/healthz` and `/readyz` ([`PUBLIC_PATHS`]) answer any peer: everything
//! else reveals the catalog or the configuration, or changes state, and answers a loopback
//! peer alone, whatever address the port is bound to. Others get 403 saying how to reach
//! it (an ssh tunnel or `kubectl port-forward`, which both arrive on loopback).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{ConnectInfo, Query, Request};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::drain;
use crate::limits::Throttle;

pub use crate::program::Readiness;

/// The admin paths any peer may read: what scrapers and orchestrators' probes need.
pub const PUBLIC_PATHS: &[&str] = &["/metrics", "/healthz", "/readyz"];

/// Serves the admin routes on `listener` until `shutdown` fires; all but [`PUBLIC_PATHS`]
/// to loopback peers only.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Mutex<Registry>>,
    readiness: Readiness,
    extra: Router,
    shutdown: drain::Watch,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", metrics_route(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", ready_route(readiness))
        .route("/logging", get(show_logging).post(set_logging))
        .merge(extra)
        .layer(middleware::from_fn(loopback_unless_public));
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.signaled())
    .await
}

/// Lets a request through when its path is public or its peer is on loopback; answers
/// 403 naming the path, the peer and the way in otherwise.
async fn loopback_unless_public(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if PUBLIC_PATHS.contains(&path) || is_loopback(peer) {
        return next.run(request).await;
    }
    let refusal = format!(
        "{method} {path} is refused to {peer}: only {public} answer from the network; \
         everything else on the admin port reveals configuration or changes state and \
         answers loopback only. Reach it from the host itself, through an ssh tunnel \
         (ssh -L PORT:127.0.0.1:PORT HOST) or kubectl port-forward.\n",
        method = request.method(),
        peer = peer.ip(),
        public = PUBLIC_PATHS.join(", "),
    );
    // A scanner could otherwise write a line per request: one line per interval, saying
    // how many were not logged.
    static LOG: Throttle = Throttle::new();
    if let Some(suppressed) = LOG.allow(std::time::Instant::now()) {
        tracing::info!(%peer, %path, suppressed, "admin request from a non-loopback peer refused");
    }
    (StatusCode::FORBIDDEN, refusal).into_response()
}

/// A loopback peer, including an IPv4 one on a dual-stack socket (`::ffff:127.0.0.1`).
fn is_loopback(peer: SocketAddr) -> bool {
    match peer.ip() {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Serves `/metrics` alone on `listener` until `shutdown` fires: the port scrapers reach
/// from the network (Istio's 15020), while the admin port stays on loopback.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Mutex<Registry>>,
    shutdown: drain::Watch,
) -> std::io::Result<()> {
    let router = Router::new().route("/metrics", metrics_route(metrics));
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.signaled())
        .await
}

/// [`serve_metrics`] as the task "metrics" of `tasks`, a failure logged; the bound address.
pub fn spawn_metrics(
    tasks: &mut crate::program::Tasks,
    listener: TcpListener,
    metrics: Arc<Mutex<Registry>>,
    shutdown: drain::Watch,
) -> std::io::Result<SocketAddr> {
    let bound = listener.local_addr()?;
    tasks.spawn("metrics", async move {
        if let Err(e) = serve_metrics(listener, metrics, shutdown).await {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    Ok(bound)
}

/// The registry's metrics in Prometheus' text format, at each request.
fn metrics_route(metrics: Arc<Mutex<Registry>>) -> axum::routing::MethodRouter {
    get(move || {
        let metrics = metrics.clone();
        async move {
            let mut out = String::new();
            let reg = metrics.lock().expect("metrics registry poisoned");
            match prometheus_client::encoding::text::encode(&mut out, &reg) {
                Ok(()) => (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    out,
                )
                    .into_response(),
                Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
            }
        }
    })
}

/// 200 `ready` or 503 `not ready`, as `readiness` says at each request.
fn ready_route(readiness: Readiness) -> axum::routing::MethodRouter {
    get(move || {
        let ready = readiness.is_ready();
        let why = readiness.describe();
        async move {
            if ready {
                (StatusCode::OK, format!("{why}\n"))
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                )
            }
        }
    })
}

/// Serves the health port (`/healthz/ready`, Istio's path, for load balancers and
/// orchestrators) on `listener` until `shutdown` fires; a failure is logged.
pub async fn serve_health(listener: TcpListener, readiness: Readiness, shutdown: drain::Watch) {
    serve_health_with(listener, readiness, Router::new(), shutdown).await
}

/// [`serve_health`] with the program's own routes beside `/healthz/ready` (a pod's
/// sidecar answers the app's rewritten probes there).
pub async fn serve_health_with(
    listener: TcpListener,
    readiness: Readiness,
    extra: Router,
    shutdown: drain::Watch,
) {
    let router = Router::new()
        .route("/healthz/ready", ready_route(readiness))
        .merge(extra);
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.signaled())
        .await
    {
        tracing::error!(error = %e, "health server failed");
    }
}

#[derive(Debug, serde::Deserialize)]
struct LoggingQuery {
    level: Option<String>,
}

async fn show_logging() -> impl IntoResponse {
    match crate::telemetry::current_level() {
        Some(f) => (StatusCode::OK, format!("{f}\n")),
        None => (
            StatusCode::NOT_FOUND,
            "logging is not managed by this process\n".to_string(),
        ),
    }
}

async fn set_logging(Query(q): Query<LoggingQuery>) -> impl IntoResponse {
    let Some(level) = q.level else {
        return (
            StatusCode::BAD_REQUEST,
            "pass ?level=<filter>, e.g. ?level=debug\n".to_string(),
        );
    };
    match crate::telemetry::set_level(&level) {
        Ok(f) => (StatusCode::OK, format!("{f}\n")),
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn request(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("{method} {path} HTTP/1.0\r\nContent-Length: 0\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        (
            status,
            out.split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default(),
        )
    }

    #[tokio::test]
    async fn bad_input_admin_route_from_off_loopback_is_refused_but_metrics_answer() {
        use tower::ServiceExt;
        let router = Router::new()
            .route("/metrics", get(|| async { "metrics\n" }))
            .route("/config_dump", get(|| async { "secret\n" }))
            .layer(middleware::from_fn(loopback_unless_public));
        for (peer, method, path, want) in [
            ("10.0.0.9:4000", "GET", "/metrics", 200),
            ("10.0.0.9:4000", "GET", "/config_dump", 403),
            ("10.0.0.9:4000", "POST", "/logging?level=trace", 403),
            ("10.0.0.9:4000", "GET", "/debug/anything", 403),
            ("[::ffff:10.0.0.9]:4000", "GET", "/config_dump", 403),
            ("127.0.0.1:4000", "GET", "/config_dump", 200),
            ("[::1]:4000", "GET", "/config_dump", 200),
            ("[::ffff:127.0.0.1]:4000", "GET", "/config_dump", 200),
        ] {
            let mut req = axum::http::Request::builder()
                .method(method)
                .uri(path)
                .body(axum::body::Body::empty())
                .unwrap();
            let peer: SocketAddr = peer.parse().unwrap();
            req.extensions_mut().insert(ConnectInfo(peer));
            let resp = router.clone().oneshot(req).await.unwrap();
            let status = resp.status().as_u16();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
                .await
                .unwrap();
            let body = String::from_utf8_lossy(&body);
            assert_eq!(status, want, "{method} {path} from {peer}: {body}");
            if want == 403 {
                let bare = path.split('?').next().unwrap();
                assert!(
                    body.contains(bare)
                        && body.contains(&peer.ip().to_string())
                        && body.contains("ssh -L")
                        && body.contains("port-forward"),
                    "{body}"
                );
            }
        }
    }

    #[tokio::test]
    async fn health_readiness_metrics_and_runtime_log_level() {
        crate::telemetry::init();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let readiness = Readiness::default();
        let started = readiness.part("started");
        let (trigger, watch) = crate::drain::channel();
        let mut reg = Registry::with_prefix("isthmus");
        let c = prometheus_client::metrics::counter::Counter::<u64>::default();
        reg.register("test_events", "a test counter", c.clone());
        c.inc();
        let server = tokio::spawn(serve(
            listener,
            Arc::new(Mutex::new(reg)),
            readiness.clone(),
            Router::new(),
            watch,
        ));

        assert_eq!(request(addr, "GET", "/healthz").await.0, 200);
        assert_eq!(request(addr, "GET", "/readyz").await.0, 503);
        assert!(request(addr, "GET", "/readyz")
            .await
            .1
            .contains("waiting for started"));
        started.ready();
        assert_eq!(request(addr, "GET", "/readyz").await.0, 200);
        // A degraded part leaves the process in service and is named.
        let degraded = readiness.degraded("writes");
        assert_eq!(
            request(addr, "GET", "/readyz").await,
            (200, "ready; degraded: writes\n".to_string())
        );
        drop(degraded);
        assert_eq!(request(addr, "GET", "/readyz").await.1, "ready\n");
        let (_, metrics) = request(addr, "GET", "/metrics").await;
        assert!(metrics.contains("isthmus_test_events_total 1"), "{metrics}");

        let (status, body) = request(addr, "POST", "/logging?level=isthmus_proto=debug,warn").await;
        assert_eq!(status, 200, "{body}");
        let (_, shown) = request(addr, "GET", "/logging").await;
        assert!(
            shown.contains("isthmus_proto=debug") && shown.contains("warn"),
            "{shown}"
        );
        let (status, body) = request(addr, "POST", "/logging?level=not%20a%20filter%3D%3D").await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(request(addr, "POST", "/logging").await.0, 400);

        trigger.fire();
        server.await.unwrap().unwrap();
    }
}
