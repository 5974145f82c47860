//! Start-up phase 3: the catalog. The Watch client starts from the persisted snapshot when
//! there is one (served as synced, its age visible in the sync-age gauge) and catches up
//! when the registry answers; the snapshot writer keeps the latest confirmed view on disk;
//! the routing table follows the view and holds the "catalog" part of readiness until it
//! is built from a synced one. The DNS proxy's name table follows the same client once the
//! DNS proxy starts with the listeners.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use isthmus_proto::model::{Node, NodeKind};
use isthmus_proto::program::Tasks;
use isthmus_proto::subscription::{self, SyncState, WatchClient, WatchOptions};
use isthmus_proxy::routes::{self, Reach, RouteOptions, RouteTable};
use tokio::sync::watch;

use super::inputs::Inputs;
use crate::snapshot;

/// The readiness part held until the routing table follows a view.
pub(crate) const READY_PART: &str = "catalog";

/// How long after a view changed the allocator's free pages are handed back: by then the
/// routing table, the DNS names, the capture sets and the snapshot file that follow the view
/// have been rebuilt, and what they replaced freed.
const RELEASE_AFTER_CHANGE: Duration = Duration::from_secs(1);

/// The view and the routing table that follows it.
pub(crate) struct Catalog {
    pub sync: watch::Receiver<Arc<SyncState>>,
    pub routes: Arc<ArcSwap<RouteTable>>,
}

pub(crate) fn start(cx: &Inputs, tasks: &mut Tasks) -> anyhow::Result<Catalog> {
    let node = Node {
        id: cx.hello.entry_name(),
        kind: match cx.config.pod {
            Some(_) => NodeKind::Workload,
            None => NodeKind::Vm,
        },
        network: cx.bundle.network.clone(),
        cluster: cx.bundle.cluster.clone(),
        locality: cx.config.locality.clone(),
    };
    let (initial, restored_at) = match snapshot::load(&cx.config.snapshot_path()) {
        Some((view, at)) => {
            tracing::info!(version = %view.version, resources = view.resources.len(), "serving the catalog snapshot until the registry answers");
            (Some(view), Some(at))
        }
        None => (None, None),
    };
    let mut client = WatchClient::over_mtls(&cx.settings, node, initial, WatchOptions::default())
        .context("loading the agent's credentials for the registry")?;
    if let Some(at) = restored_at {
        client = client.restored_at(at);
    }
    let sync = client.state();
    tasks.spawn("catalog watch", client.run(cx.shutdown.clone()));
    tasks.spawn(
        "catalog snapshot",
        snapshot::keep(
            cx.config.snapshot_path(),
            sync.clone(),
            cx.agent_metrics.clone(),
            cx.shutdown.clone(),
        ),
    );
    let routes = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
    tasks.spawn(
        "routing table",
        routes::follow(
            sync.clone(),
            routes.clone(),
            RouteOptions {
                reach: Reach::Mesh,
                locality: cx.config.locality.clone(),
                ..RouteOptions::default()
            },
            cx.metrics.clone(),
            cx.readiness.part(READY_PART),
            cx.shutdown.clone(),
        ),
    );
    tasks.spawn(
        "memory release",
        subscription::follow(
            sync.clone(),
            cx.shutdown.clone(),
            None,
            |_, view_changed| async move {
                if view_changed {
                    tokio::time::sleep(RELEASE_AFTER_CHANGE).await;
                    isthmus_proto::allocator::release_free_memory();
                }
            },
        ),
    );
    Ok(Catalog { sync, routes })
}
