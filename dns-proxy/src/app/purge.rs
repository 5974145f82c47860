//! Phase 7: expired cache entries dropped now and then, so the size gauge tells the truth.

use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_proto::drain;
use isthmus_proto::program::Tasks;

use crate::metrics::Metrics;
use crate::server::Resolver;

/// How often expired entries are dropped.
const PURGE_INTERVAL: Duration = Duration::from_secs(10);

pub(super) fn start(
    resolver: &Arc<Resolver>,
    metrics: &Arc<Metrics>,
    tasks: &mut Tasks,
    shutdown: &drain::Watch,
) {
    tasks.spawn(
        "cache purge",
        purge_cache(resolver.clone(), metrics.clone(), shutdown.clone()),
    );
}

async fn purge_cache(resolver: Arc<Resolver>, metrics: Arc<Metrics>, shutdown: drain::Watch) {
    let stop = shutdown.signaled();
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(PURGE_INTERVAL);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {
                let n = resolver.cache().purge(Instant::now());
                metrics.cache_entries.set(n as i64);
            }
        }
    }
}
