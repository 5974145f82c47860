//! The registry's periodic upkeep, each a task that sleeps between rounds and stops on the
//! shutdown signal: forgetting redeemed bootstrap tokens past their expiry, and freeing VIPs
//! released longer than the grace period ago.

use std::sync::Arc;
use std::time::Duration;

use isthmus_proto::drain;

use crate::ingest::Ingest;
use crate::store::Store;
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
