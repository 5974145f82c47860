//! The VM registrations source: WorkloadEntries that VM agents register over the
//! Registration stream (`crate::registration`), each held by a lease. It owns the lease
//! table and hands every change to ingest, like any source, so the entries reach the store,
//! the views and Watch subscribers as any WorkloadEntry does.
//!
//! Leases live in memory. An entry whose stream ends without a Deregister stays, unhealthy,
//! for the grace period (`--vm-grace`), then is removed; the same VM registering again in
//! time takes it over without it ever leaving the catalog. The store keeps the entries
//! through a registry restart, but not their leases: at start every entry of this source
//! found in the store gets a grace period from that moment, and is removed unless its
//! agent reconnects (agents reconnect on their own). Its health is left as stored until
//! then: a registry restart says nothing about the VM.
//!
//! One timer task removes expired entries at their deadline (no periodic sweep), and retries
//! the whole set when a write to the store failed.

mod leases;
pub mod metrics;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use isthmus_proto::drain;
use isthmus_proto::model::{workload_key, Address, Health, OwnedResource, Resource, Workload};
use serde::Serialize;
use tokio::sync::{oneshot, Notify};

pub use leases::{Disconnect, Lease, LeaseError, Leases, Registration, StreamId, Takeover};
use metrics::{LeaseMetrics, LeaseStateLabels};

use crate::ingest::Ingest;
use crate::store::StoreError;

/// Every resource from this source has an origin `vm:<namespace>/<group>`.
pub const ORIGIN_PREFIX: &str = "vm:";

/// How long an entry whose agent is gone stays before it is removed: long enough for an
/// agent restart or a brief network cut, short enough that traffic does not linger on a
/// VM that is gone (it is unhealthy meanwhile, so clients already avoid it).
pub const DEFAULT_VM_GRACE: Duration = Duration::from_secs(10);

/// How soon a change that could not be stored is retried.
const RESYNC_INTERVAL: Duration = Duration::from_secs(1);

/// The origin of an entry registered from `namespace/group`.
pub fn origin(namespace: &str, group: &str) -> String {
    format!("{ORIGIN_PREFIX}{namespace}/{group}")
}

#[derive(Debug, thiserror::Error)]
pub enum VmSourceError {
    #[error(transparent)]
    Held(#[from] LeaseError),
    #[error("{entry} already exists in the catalog from {origin}; a VM cannot replace a resource another source owns (rename the group or the other resource)")]
    Conflict { entry: String, origin: String },
    #[error("the registration could not be stored ({0}); register again")]
    Store(#[from] StoreError),
}

/// A stream's hold on its entry, returned by [`VmRegistrations::register`].
#[derive(Debug)]
pub struct Holder {
    pub key: String,
    pub stream: StreamId,
    pub takeover: Takeover,
    /// The entry as the catalog now holds it.
    pub workload: Workload,
    /// Fires (with the remote address of the newer stream) when another stream of the same
    /// VM took the entry over.
    pub superseded: oneshot::Receiver<String>,
}

/// One registration, for `/debug/registrations`.
#[derive(Debug, Serialize)]
pub struct RegistrationStatus {
    pub entry: String,
    pub namespace: String,
    pub group: String,
    pub address: Address,
    pub network: String,
    pub identity: String,
    pub health: &'static str,
    /// "connected" or "disconnected".
    pub state: &'static str,
    /// When the current state began (RFC 3339).
    pub since: String,
    /// Disconnected only: when the entry is removed unless its VM registers again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Disconnected only: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<&'static str>,
    /// Connected only: the agent's address as the registry sees it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    leases: Leases,
    /// How to tell each live stream that a newer one took its entry over.
    streams: HashMap<StreamId, oneshot::Sender<String>>,
    /// A change could not be stored: the next write hands ingest the whole set.
    dirty: bool,
    /// Removals not stored yet (on a shared store, where the whole set cannot say what
    /// to remove: other registries' entries are there too).
    pending_removals: BTreeSet<String>,
}

#[derive(Debug)]
pub struct VmRegistrations {
    /// Held across the ingest write, so changes reach the catalog in the order they were
    /// made to the lease table.
    state: tokio::sync::Mutex<State>,
    ingest: Ingest,
    grace: Duration,
    /// Wakes the timer task when a deadline may have moved.
    wake: Notify,
    next_stream: AtomicU64,
    metrics: LeaseMetrics,
}

fn owned(reg: &Registration) -> OwnedResource {
    OwnedResource::new(
        origin(&reg.workload.namespace, &reg.group),
        Resource::Workload(reg.workload.clone()),
    )
}

fn rfc3339(t: SystemTime) -> String {
    ::time::OffsetDateTime::from(t)
        .format(&::time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl VmRegistrations {
    pub fn new(ingest: Ingest, grace: Duration, metrics: LeaseMetrics) -> Self {
        Self {
            state: Default::default(),
            ingest,
            grace,
            wake: Notify::new(),
            next_stream: AtomicU64::new(1),
            metrics,
        }
    }

    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Takes in the entries a previous run registered (this source's resources in the
    /// catalog loaded from the store): each is removed a grace period from `now` unless
    /// its VM registers again. Returns how many.
    pub async fn adopt_stored(&self, now: SystemTime) -> usize {
        if self.ingest.store_is_shared() {
            // Each entry is under the lease of the registry that wrote it: it stays while
            // that registry lives (or its agent moves here and registers again) and goes
            // with its lease otherwise. None is this registry's to time out.
            return 0;
        }
        let found: Vec<(String, Workload, String)> = self
            .ingest
            .views()
            .resources_with_origin(ORIGIN_PREFIX)
            .into_iter()
            .filter_map(|r| {
                let Resource::Workload(w) = &*r.resource else {
                    return None;
                };
                let group = r
                    .origin
                    .strip_prefix(ORIGIN_PREFIX)
                    .and_then(|o| o.split_once('/'))
                    .map(|(_, g)| g.to_string())
                    .unwrap_or_default();
                Some((r.resource.key(), w.clone(), group))
            })
            .collect();
        let n = found.len();
        let mut st = self.state.lock().await;
        st.leases.adopt(found, now, self.grace);
        self.observe(&st);
        drop(st);
        self.wake.notify_one();
        n
    }

    /// Registers `workload` (built from `group`'s template) for a new stream from `remote`.
    pub async fn register(
        &self,
        workload: Workload,
        group: &str,
        remote: String,
        now: SystemTime,
    ) -> Result<Holder, VmSourceError> {
        let key = workload_key(&workload.cluster, &workload.namespace, &workload.name);
        let mut st = self.state.lock().await;
        let foreign = self.ingest.views().with_catalog(|c| {
            c.get(&key)
                .filter(|r| !r.origin.starts_with(ORIGIN_PREFIX))
                .map(|r| r.origin.clone())
        });
        if let Some(origin) = foreign {
            return Err(VmSourceError::Conflict {
                entry: format!("WorkloadEntry {}/{}", workload.namespace, workload.name),
                origin,
            });
        }
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let previous = st.leases.get(&key).cloned();
        let takeover = st.leases.register(
            &key,
            Registration {
                workload,
                group: group.to_string(),
                lease: Lease::Connected {
                    stream,
                    remote: remote.clone(),
                    since: now,
                },
            },
        )?;
        let reg = st.leases.get(&key).expect("just registered").clone();
        if let Err(e) = self.write(&mut st, vec![owned(&reg)], Vec::new()).await {
            st.leases.restore(&key, previous);
            self.observe(&st);
            return Err(e.into());
        }
        if let Takeover::Replaced { stream: old } = takeover {
            if let Some(tx) = st.streams.remove(&old) {
                let _ = tx.send(remote);
            }
        }
        let (tx, superseded) = oneshot::channel();
        st.streams.insert(stream, tx);
        self.observe(&st);
        drop(st);
        self.wake.notify_one();
        Ok(Holder {
            key,
            stream,
            takeover,
            workload: reg.workload,
            superseded,
        })
    }

    /// Applies a health report from `stream`. `Ok(None)`: the stream no longer holds the
    /// entry. A failed write is retried in the background (the error says so).
    pub async fn set_health(
        &self,
        key: &str,
        stream: StreamId,
        health: Health,
        now: SystemTime,
    ) -> Result<Option<Health>, StoreError> {
        let mut st = self.state.lock().await;
        if st.leases.set_health(key, stream, health, now).is_none() {
            return Ok(None);
        }
        let reg = st.leases.get(key).expect("held").clone();
        self.write(&mut st, vec![owned(&reg)], Vec::new()).await?;
        Ok(Some(reg.workload.health))
    }

    /// `stream` ended without a Deregister: its entry, if it still holds it, turns
    /// unhealthy and waits out the grace period.
    pub async fn disconnect(&self, key: &str, stream: StreamId, now: SystemTime) {
        let mut st = self.state.lock().await;
        st.streams.remove(&stream);
        if st.leases.disconnect(key, stream, now, self.grace).is_none() {
            return;
        }
        let reg = st.leases.get(key).expect("held").clone();
        if let Err(e) = self.write(&mut st, vec![owned(&reg)], Vec::new()).await {
            tracing::warn!(entry = %key, error = %e, "cannot store that the VM disconnected; retrying");
        }
        self.observe(&st);
        drop(st);
        self.wake.notify_one();
    }

    /// Removes the entry `stream` holds at once. Returns whether it held one.
    pub async fn deregister(&self, key: &str, stream: StreamId) -> Result<bool, StoreError> {
        let mut st = self.state.lock().await;
        st.streams.remove(&stream);
        if st.leases.deregister(key, stream).is_none() {
            return Ok(false);
        }
        self.observe(&st);
        self.write(&mut st, Vec::new(), vec![key.to_string()])
            .await
            .map(|()| true)
    }

    /// `stream` ended while the registry shuts down: its entry is left as it is (the next
    /// run gives it a grace period).
    pub async fn forget_stream(&self, stream: StreamId) {
        self.state.lock().await.streams.remove(&stream);
    }

    /// Removes the entries whose grace period ended by `now`, and retries a failed write.
    /// Returns how many entries expired.
    pub async fn expire(&self, now: SystemTime) -> usize {
        let mut st = self.state.lock().await;
        let expired = st.leases.expire(now);
        for key in &expired {
            tracing::info!(entry = %key, "VM registration expired: its agent did not reconnect within the grace period");
        }
        self.metrics.expired.inc_by(expired.len() as u64);
        self.observe(&st);
        if !expired.is_empty() || st.dirty {
            if let Err(e) = self.write(&mut st, Vec::new(), expired.clone()).await {
                tracing::warn!(error = %e, "cannot store VM registration changes; retrying");
            }
        }
        expired.len()
    }

    /// Removes entries at their deadline until `shutdown`.
    pub async fn run(&self, shutdown: drain::Watch) {
        let stop = shutdown.signaled();
        tokio::pin!(stop);
        let mut lease = self.ingest.lease_generation();
        loop {
            let (next, dirty) = {
                let st = self.state.lock().await;
                (st.leases.next_expiry(), st.dirty)
            };
            let mut wait = next.map_or(Duration::MAX, |t| {
                t.duration_since(SystemTime::now()).unwrap_or_default()
            });
            if dirty {
                wait = wait.min(RESYNC_INTERVAL);
            }
            let lease_lost = async {
                match lease.as_mut() {
                    Some(g) => g.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut stop => return,
                _ = self.wake.notified() => continue,
                lost = lease_lost => {
                    if !lost {
                        lease = None;
                        continue;
                    }
                    // The entries this registry held went with its lease: all again.
                    tracing::info!("writing this registry's VM registrations again under its new lease");
                    self.state.lock().await.dirty = true;
                }
                _ = tokio::time::sleep(wait.min(Duration::from_secs(3600))) => {}
            }
            self.expire(SystemTime::now()).await;
        }
    }

    /// Every registration, in key order.
    pub async fn status(&self) -> Vec<RegistrationStatus> {
        let st = self.state.lock().await;
        st.leases
            .iter()
            .map(|(_, r)| {
                let w = &r.workload;
                let mut s = RegistrationStatus {
                    entry: w.name.clone(),
                    namespace: w.namespace.clone(),
                    group: r.group.clone(),
                    address: w.address.clone(),
                    network: w.network.clone(),
                    identity: w
                        .identity
                        .as_ref()
                        .map(|i| i.to_string())
                        .unwrap_or_default(),
                    health: match w.health {
                        Health::Healthy => "healthy",
                        Health::Unhealthy => "unhealthy",
                    },
                    state: "connected",
                    since: String::new(),
                    expires_at: None,
                    cause: None,
                    remote: None,
                };
                match &r.lease {
                    Lease::Connected { remote, since, .. } => {
                        s.since = rfc3339(*since);
                        s.remote = Some(remote.clone());
                    }
                    Lease::Disconnected {
                        since,
                        expires,
                        cause,
                    } => {
                        s.state = "disconnected";
                        s.since = rfc3339(*since);
                        s.expires_at = Some(rfc3339(*expires));
                        s.cause = Some(cause.as_str());
                    }
                }
                s
            })
            .collect()
    }

    /// Hands ingest a change; after a failed write, the whole set instead, so that whatever
    /// was missed is caught up.
    async fn write(
        &self,
        st: &mut State,
        upserts: Vec<OwnedResource>,
        removals: Vec<String>,
    ) -> Result<(), StoreError> {
        let res = if !st.dirty {
            self.ingest
                .update_held(ORIGIN_PREFIX, upserts, removals.clone())
                .await
        } else if self.ingest.store_is_shared() {
            // Only what this registry holds: the other registries' entries are theirs.
            let all = st.leases.iter().map(|(_, r)| owned(r)).collect();
            let gone = st
                .pending_removals
                .iter()
                .chain(&removals)
                .filter(|k| st.leases.get(k).is_none())
                .cloned()
                .collect();
            self.ingest.rewrite_held(ORIGIN_PREFIX, all, gone).await
        } else {
            let all = st.leases.iter().map(|(_, r)| owned(r)).collect();
            self.ingest.replace_origin(ORIGIN_PREFIX, all).await
        };
        match res {
            Ok(_) => {
                st.dirty = false;
                st.pending_removals.clear();
                Ok(())
            }
            Err(e) => {
                st.dirty = true;
                st.pending_removals.extend(removals);
                self.wake.notify_one();
                Err(e)
            }
        }
    }

    fn observe(&self, st: &State) {
        let (connected, disconnected) = st.leases.counts();
        for (state, n) in [("connected", connected), ("disconnected", disconnected)] {
            self.metrics
                .registrations
                .get_or_create(&LeaseStateLabels { state })
                .set(n as i64);
        }
    }
}
