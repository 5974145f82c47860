//! The API clients of the clusters being watched, shared with whoever needs to call a
//! cluster's API besides the watchers (the CA's TokenReviews). Clusters come and go at run
//! time, so this is a live map kept by the source, not a snapshot.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// Cluster id -> a client for its API server, as the source currently has them.
#[derive(Clone, Default)]
pub struct ClusterClients {
    clients: Arc<RwLock<BTreeMap<String, kube::Client>>>,
}

impl std::fmt::Debug for ClusterClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterClients")
            .field("clusters", &self.ids())
            .finish()
    }
}

impl ClusterClients {
    /// Cluster `id`'s client, if the source watches it.
    pub fn get(&self, id: &str) -> Option<kube::Client> {
        self.clients
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// The ids of the clusters with a client, sorted.
    pub fn ids(&self) -> Vec<String> {
        self.clients
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    pub(super) fn insert(&self, id: &str, client: kube::Client) {
        self.clients
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), client);
    }

    pub(super) fn remove(&self, id: &str) {
        self.clients
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
}
