//! What each peer's import reports about itself, for `/debug/peers`, the metrics and
//! `isthmusctl peers`: connected and synced or not, which registry of the peer's set is
//! followed, when the peer last confirmed its view, the last error, and since when it has
//! been out of reach.

use serde::{Deserialize, Serialize};

/// Every peer's status.
pub type PeerStatuses = crate::sources::Statuses<PeerStatus>;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct PeerStatus {
    pub peer: String,
    /// The peer's registry set, as configured.
    pub addresses: String,
    /// The registry of that set last answered.
    pub following: Option<String>,
    pub connected: bool,
    /// The peer's view has been imported once.
    pub synced: bool,
    /// Unix milliseconds of the first import (0 before it).
    pub synced_at_ms: i64,
    /// Unix milliseconds of the last time the peer confirmed its view (a snapshot, a delta
    /// or a resume): the age of what is imported.
    pub last_sync_ms: i64,
    /// Full snapshots received; reconnects that resumed do not add one.
    pub snapshots: u64,
    pub resumes: u64,
    /// Why the peer cannot be followed now (none while it answers).
    pub last_error: Option<String>,
    /// Unix milliseconds of when the last error began.
    pub last_error_ms: i64,
    /// Unix milliseconds since which the peer has been out of reach (0 while it answers);
    /// its services are kept, their endpoints marked stale since then.
    pub stale_since_ms: i64,
    /// The peer's view version imported.
    pub version: String,
    pub services: usize,
    pub endpoints: usize,
    pub networks: usize,
    /// The clusters the peer's endpoints are in.
    pub clusters: Vec<String>,
    /// What could not be imported, with why (a clash with this registry's own resources).
    pub problems: Vec<String>,
}

impl crate::sources::Named for PeerStatus {
    fn named(name: &str) -> Self {
        PeerStatus {
            peer: name.to_string(),
            ..Default::default()
        }
    }
}

impl PeerStatus {
    /// One line: `synced`, `stale for 12s: <error>`, `not synced: <error>`.
    pub fn summary(&self, now_ms: i64) -> String {
        if self.stale_since_ms != 0 && self.synced {
            let age = (now_ms - self.stale_since_ms).max(0) / 1000;
            return format!(
                "stale for {age}s: {}",
                self.last_error.as_deref().unwrap_or("out of reach")
            );
        }
        if self.synced {
            return "synced".into();
        }
        match &self.last_error {
            Some(e) => format!("not synced: {e}"),
            None => "not synced yet".into(),
        }
    }
}
