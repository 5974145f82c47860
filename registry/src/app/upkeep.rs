//! The registry's periodic upkeep, each a task that sleeps between rounds and stops on the
//! shutdown signal: forgetting redeemed bootstrap tokens past their expiry, freeing VIPs
//! released longer than the grace period ago, and following whether the store takes writes
//! (not ready, and retried, while it does not).

use std::sync::Arc;
use std::time::Duration;

use isthmus_proto::drain;
use isthmus_proto::program::{Readiness, ReadyPart};
use prometheus_client::metrics::gauge::Gauge;

use crate::ingest::Ingest;
use crate::store::{Store, WriteHealth, RECOVERY_INTERVAL};
use crate::vips::VIP_GC_INTERVAL;

/// How often redeemed bootstrap tokens past their expiry are forgotten.
pub const TOKEN_GC_INTERVAL: Duration = Duration::from_secs(3600);

pub(super) async fn forget_expired_tokens(store: Arc<dyn Store>, shutdown: drain::Watch) {
    let stop = shutdown.signaled();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(TOKEN_GC_INTERVAL) => {}
        }
        match crate::ca::token::forget_expired(store.as_ref(), ::time::OffsetDateTime::now_utc())
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(tokens = n, "forgot expired redeemed bootstrap tokens"),
            Err(e) => tracing::warn!(error = %e, "cannot clean up redeemed bootstrap tokens"),
        }
    }
}

pub(super) async fn free_expired_vips(ingest: Ingest, grace: Duration, shutdown: drain::Watch) {
    let stop = shutdown.signaled();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(VIP_GC_INTERVAL) => {}
        }
        match ingest
            .free_expired_vips(std::time::SystemTime::now(), grace)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                allocations = n,
                "freed VIPs past their release grace period"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot free expired VIPs; retrying later"),
        }
    }
}

/// While the store's writes fail, the registry is not ready (the part names the cause, so
/// `/readyz` says "waiting for store writes (the disk holding … is full …)"); on a shared
/// store it stays ready for reads and says "ready; degraded: store writes (…)". The gauge is
/// 0, and the store is tried again every [`RECOVERY_INTERVAL`] until writes succeed.
pub(super) async fn follow_store_writes(
    store: Arc<dyn Store>,
    readiness: Readiness,
    writable: Gauge,
    shutdown: drain::Watch,
) {
    let mut health = store.write_health();
    let mut not_ready: Option<ReadyPart> = None;
    let stop = shutdown.signaled();
    tokio::pin!(stop);
    loop {
        let current = health.borrow_and_update().clone();
        match &current {
            WriteHealth::Writable => {
                writable.set(1);
                if not_ready.take().is_some() {
                    tracing::info!(store = store.kind(), "the store takes writes again");
                }
            }
            WriteHealth::Unwritable { why } => {
                writable.set(0);
                if not_ready.is_none() {
                    tracing::error!(store = store.kind(), %why, "store writes fail: not ready, writes refused, retrying every {}s", RECOVERY_INTERVAL.as_secs());
                }
                // A new cause replaces the old part, so `/readyz` names the current one.
                // A set of registries on one etcd loses writes together when etcd goes: out
                // of service together, none would serve the reads (Watch) they all still
                // can, so on a shared store writes down is a degraded part, not a pending one.
                let name = format!("store writes ({why})");
                not_ready = Some(if store.shared() {
                    readiness.degraded(&name)
                } else {
                    readiness.part(&name)
                });
            }
        }
        let unwritable = current != WriteHealth::Writable;
        tokio::select! {
            _ = &mut stop => return,
            changed = health.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(RECOVERY_INTERVAL), if unwritable => {
                if let Err(e) = store.recover().await {
                    tracing::debug!(error = %e, "the store still refuses writes");
                }
            }
        }
    }
}
