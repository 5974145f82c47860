//! Catalog sources: where resources come from before they reach the store.

pub mod kubernetes;
pub mod peers;
pub mod static_files;
pub mod vm_registrations;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A status kept per named remote source (a Kubernetes cluster, a peered registry), created
/// on first update under its name.
pub trait Named: Clone + Default {
    fn named(name: &str) -> Self;
}

/// Every remote source's status by name, shared by the source's tasks, the admin server,
/// the metrics and readiness.
#[derive(Debug)]
pub struct Statuses<T>(Arc<Mutex<BTreeMap<String, T>>>);

impl<T> Clone for Statuses<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> Default for Statuses<T> {
    fn default() -> Self {
        Self(Arc::default())
    }
}

impl<T: Named> Statuses<T> {
    pub fn snapshot(&self) -> Vec<T> {
        self.lock().values().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Option<T> {
        self.lock().get(name).cloned()
    }

    /// Changes one source's status (creating it if need be).
    pub fn update<R>(&self, name: &str, f: impl FnOnce(&mut T) -> R) -> R {
        let mut all = self.lock();
        let st = all
            .entry(name.to_string())
            .or_insert_with(|| T::named(name));
        f(st)
    }

    pub fn remove(&self, name: &str) {
        self.lock().remove(name);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, T>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
