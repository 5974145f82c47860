//! The last catalog view, kept in the state directory: a start with the registry
//! unreachable serves from it (while the certificate is valid) and catches up when the
//! registry answers, resuming from its version.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use isthmus_proto::drain;
use isthmus_proto::subscription::{self, LocalView, SyncState};
use tokio::sync::watch;

use crate::metrics::{AgentMetrics, Outcome};

/// Writes are spaced at least this far apart: a busy catalog costs one write a second.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// A view kept by an earlier run and when it was written; `None` if there is none or it is
/// damaged (said in the log: the agent then waits for the registry).
pub fn load(path: &Path) -> Option<(LocalView, SystemTime)> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the catalog snapshot");
            return None;
        }
    };
    let written = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    match LocalView::decode(bytes) {
        Ok(view) => Some((view, written)),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "ignoring a damaged catalog snapshot");
            None
        }
    }
}

/// Keeps `path` holding the latest view confirmed by the registry, until `shutdown`.
pub async fn keep(
    path: PathBuf,
    sync: watch::Receiver<Arc<SyncState>>,
    metrics: AgentMetrics,
    shutdown: drain::Watch,
) {
    let mut written: Option<String> = Some(sync.borrow().view.version.clone());
    let turn = move |state: Arc<SyncState>, _view_changed: bool| {
        let attempt = state.connected && written.as_deref() != Some(state.view.version.as_str());
        if attempt && write(&path, &state, &metrics) {
            written = Some(state.view.version.clone());
        }
        // The next attempt waits: a busy catalog costs one write a second, and a failed
        // write is retried a second later (the tick).
        async move {
            if attempt {
                tokio::time::sleep(MIN_INTERVAL).await;
            }
        }
    };
    subscription::follow(sync, shutdown, Some(MIN_INTERVAL), turn).await;
}

/// Writes the view; false (said in the log and counted) when it could not.
fn write(path: &Path, state: &SyncState, metrics: &AgentMetrics) -> bool {
    let bytes = state.view.encode();
    match isthmus_proto::certs::write_atomic(path, &bytes, 0o600) {
        Ok(()) => {
            tracing::debug!(version = %state.view.version, bytes = bytes.len(), "catalog snapshot written");
            metrics.snapshot_writes.get_or_create(&Outcome::ok()).inc();
            true
        }
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot write the catalog snapshot");
            metrics
                .snapshot_writes
                .get_or_create(&Outcome::error())
                .inc();
            false
        }
    }
}
