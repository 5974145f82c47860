//! Phases 3 and 4: the catalog this proxy answers from — its own Watch of the registry, or
//! the view of the program that embeds it — and the follower that rebuilds the name table
//! from every view it publishes.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use isthmus_proto::drain;
use isthmus_proto::model::{Node, NodeKind};
use isthmus_proto::program::{ReadyPart, Tasks};
use isthmus_proto::subscription::{self, SyncState, WatchClient, WatchOptions};
use tokio::sync::watch;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::names::{Locale, NameTable};

/// How often the catalog gauges are refreshed when no view arrives.
const CATALOG_METRICS_TICK: Duration = Duration::from_secs(1);

/// The view to follow: `shared` when the proxy is embedded, else a Watch client of its own,
/// started into `tasks`.
pub(super) fn start(
    config: &Config,
    shared: Option<watch::Receiver<Arc<SyncState>>>,
    tasks: &mut Tasks,
    shutdown: &drain::Watch,
) -> anyhow::Result<watch::Receiver<Arc<SyncState>>> {
    if let Some(sync) = shared {
        return Ok(sync);
    }
    let client = watch_client(config)?;
    let sync = client.state();
    tasks.spawn("watch client", client.run(shutdown.clone()));
    Ok(sync)
}

fn watch_client(config: &Config) -> anyhow::Result<WatchClient> {
    let node = Node {
        id: config.node_id.clone(),
        kind: NodeKind::Dns,
        network: config.network.clone(),
        cluster: config.cluster.clone(),
        locality: Default::default(),
    };
    WatchClient::over_mtls(&config.registry, node, None, WatchOptions::default()).with_context(
        || {
            format!(
                "loading the registry credentials (root {}, certificates in {})",
                config.registry.root_cert.display(),
                config.registry.cert_dir.display()
            )
        },
    )
}

/// Rebuilds the name table whenever the catalog publishes a new view, and keeps the catalog
/// metrics current; `ready` is reported once a confirmed view is in the table. Every state
/// is passed on to `answering` only once the table built from it is in place: whoever waits
/// there for a synced catalog (the handle's `sync`) is never answered from an older table.
pub(super) async fn follow_names(
    sync: watch::Receiver<Arc<SyncState>>,
    answering: watch::Sender<Arc<SyncState>>,
    names: Arc<ArcSwap<NameTable>>,
    locale: Locale,
    metrics: Arc<Metrics>,
    ready: ReadyPart,
    shutdown: drain::Watch,
) {
    let mut ready = Some(ready);
    // The table also depends on whether the view is confirmed (unsynced answers differ).
    let mut built_synced: Option<bool> = None;
    let turn = |state: Arc<SyncState>, view_changed: bool| {
        let synced = state.synced();
        if view_changed || built_synced != Some(synced) {
            let table = NameTable::build(&state.view, &locale, synced);
            tracing::debug!(
                names = table.len(),
                version = table.version(),
                "name table rebuilt"
            );
            metrics.names.set(table.len() as i64);
            names.store(Arc::new(table));
            built_synced = Some(synced);
            if synced {
                ready.take();
            }
        }
        metrics.catalog.observe(&state);
        answering.send_if_modified(|current| {
            let changed = !Arc::ptr_eq(current, &state);
            *current = state;
            changed
        });
        std::future::ready(())
    };
    subscription::follow(sync, shutdown, Some(CATALOG_METRICS_TICK), turn).await;
}
