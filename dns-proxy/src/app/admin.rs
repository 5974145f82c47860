//! Phase 8: the admin server — the skeleton's `/metrics`, `/healthz` and `/readyz`, and
//! `/config_dump` with the effective configuration, the catalog's state and the name table.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::routing::get;
use axum::{Json, Router};
use isthmus_proto::admin::{self, Readiness};
use isthmus_proto::drain;
use isthmus_proto::program::Tasks;
use isthmus_proto::subscription::SyncState;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::server::Resolver;

/// What `/config_dump` shows: the effective configuration (fixed at start) and the live
/// state it reads at each request.
pub(super) struct Dump {
    effective: serde_json::Value,
    resolver: Arc<Resolver>,
    sync: watch::Receiver<Arc<SyncState>>,
}

impl Dump {
    pub(super) fn new(
        config: &Config,
        upstreams: &[SocketAddr],
        resolver: &Arc<Resolver>,
        sync: &watch::Receiver<Arc<SyncState>>,
    ) -> Self {
        Self {
            effective: serde_json::json!({
                "config": config,
                "upstreams": upstreams,
                "upstream_mode": format!("{:?}", config.upstream_mode).to_lowercase(),
            }),
            resolver: resolver.clone(),
            sync: sync.clone(),
        }
    }

    fn now(&self) -> serde_json::Value {
        let names = self.resolver.names();
        let state = self.sync.borrow().clone();
        serde_json::json!({
            "effective": self.effective,
            "catalog": state.dump(),
            "cache_entries": self.resolver.cache().len(),
            "name_table": names.dump(),
        })
    }
}

/// Serves admin on `listener` (when the admin port is on) into `tasks`; returns its address.
pub(super) fn start(
    listener: Option<TcpListener>,
    dump: Dump,
    registry: Arc<Mutex<Registry>>,
    readiness: Readiness,
    tasks: &mut Tasks,
    shutdown: &drain::Watch,
) -> std::io::Result<Option<SocketAddr>> {
    let Some(listener) = listener else {
        return Ok(None);
    };
    let bound = listener.local_addr()?;
    let dump = Arc::new(dump);
    let extra = Router::new().route(
        "/config_dump",
        get(move || {
            let dump = dump.clone();
            async move { Json(dump.now()) }
        }),
    );
    let shutdown = shutdown.clone();
    tasks.spawn("admin", async move {
        if let Err(e) = admin::serve(listener, registry, readiness, extra, shutdown).await {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    Ok(Some(bound))
}
