//! What each cluster's watchers report about themselves, for `/debug/clusters`, the metrics,
//! `isthmusctl clusters` and readiness: synced or not, objects per kind, the age of the last
//! event, the last error, reconnects, and since when the cluster has been out of reach.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// Every configured cluster's status, shared by the source and the admin server.
pub type ClusterStatuses = crate::sources::Statuses<ClusterStatus>;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ClusterStatus {
    pub cluster: String,
    pub network: String,
    /// Where the cluster's credentials come from: `kubeconfig FILE`, `secret NS/NAME`, ….
    pub credentials: String,
    /// The API server's address.
    pub server: String,
    /// Every kind has been listed once.
    pub synced: bool,
    /// Unix milliseconds of the first complete sync (0 before it).
    pub synced_at_ms: i64,
    pub kinds: BTreeMap<String, KindStatus>,
    /// The last error of any watcher (or of connecting), with its cause.
    pub last_error: Option<String>,
    /// Unix milliseconds of that error.
    pub last_error_ms: i64,
    /// How many times the watchers re-established their watch after an error.
    pub reconnects: u64,
    /// Unix milliseconds since which the API server has been out of reach (0 while current);
    /// the cluster's endpoints are kept, marked with this time.
    pub stale_since_ms: i64,
    /// The cluster was stale for longer than `--cluster-stale-after`; its endpoints are gone.
    pub dropped: bool,
    /// Catalog resources (services and workloads) this cluster contributes.
    pub resources: usize,
    /// Objects the mapping could not take (an invalid ServiceEntry, a name clash), with why.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct KindStatus {
    pub synced: bool,
    /// Complete lists of the kind: the first sync, then one per relist (a watch that
    /// expired, an API server that restarted).
    pub lists: u64,
    pub objects: usize,
    /// Unix milliseconds of the last event of this kind.
    pub last_event_ms: i64,
    pub errors: u64,
    pub last_error: Option<String>,
    /// The API group is not served by this cluster (Istio's CRDs not installed): nothing to
    /// watch, and not an error.
    pub not_installed: bool,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

impl crate::sources::Named for ClusterStatus {
    fn named(name: &str) -> Self {
        ClusterStatus {
            cluster: name.to_string(),
            ..Default::default()
        }
    }
}

impl ClusterStatus {
    /// One line for logs and `/readyz`: `synced`, `not synced: <last error>`, `stale for 12s`.
    pub fn summary(&self, now_ms: i64) -> String {
        if self.dropped {
            return format!("dropped after being stale since {}", self.stale_since_ms);
        }
        if self.stale_since_ms != 0 {
            let age = (now_ms - self.stale_since_ms).max(0) / 1000;
            return format!(
                "stale for {age}s: {}",
                self.last_error
                    .as_deref()
                    .unwrap_or("API server out of reach")
            );
        }
        if self.synced {
            return "synced".into();
        }
        match &self.last_error {
            Some(e) => format!("not synced: {e}"),
            None => {
                let waiting: Vec<&str> = self
                    .kinds
                    .iter()
                    .filter(|(_, k)| !k.synced && !k.not_installed)
                    .map(|(n, _)| n.as_str())
                    .collect();
                format!("not synced yet (listing {})", waiting.join(", "))
            }
        }
    }
}
