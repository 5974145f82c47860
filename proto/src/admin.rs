//! The admin HTTP server every program runs: `/metrics`, `/healthz`, `/readyz`, `/logging`
//! (GET shows the log filter, POST `?level=<filter>` changes it), plus the program's own
//! routes (`/debug/*`, `/config_dump`).

use std::sync::{Arc, Mutex};

use axum::extract::Query;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::drain;

pub use crate::program::Readiness;

/// Serves the admin routes on `listener` until `shutdown` fires.
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
        .merge(extra);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.signaled())
        .await
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
                (StatusCode::OK, "ready\n".to_string())
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
