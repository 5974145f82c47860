//! Catalog sources: where resources come from before they reach the store.

pub mod kubernetes;
pub mod peers;
pub mod static_files;
pub mod vm_registrations;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// On a pod or a WorkloadEntry: [`AMBIENT_REDIRECTION_ENABLED`] once Istio ambient's node
/// proxy (ztunnel) captures its traffic (the Kubernetes and the file sources both read it).
pub const AMBIENT_REDIRECTION: &str = "ambient.istio.io/redirection";
/// The value of [`AMBIENT_REDIRECTION`] on a captured workload (`pending` while capture is
/// under way).
pub const AMBIENT_REDIRECTION_ENABLED: &str = "enabled";
/// The port ztunnel accepts tunnels (HBONE) on for the workloads it captures.
pub const HBONE_PORT: u16 = 15008;
/// On a pod: the injector's status annotation (`inject::STATUS_ANNOTATION`), present once an
/// isthmus sidecar is injected; its agent takes tunnels on [`HBONE_PORT`].
pub const SIDECAR_STATUS: &str = "sidecar.isthmus.io/status";

/// The tunnel port of a workload whose metadata carries `annotations`: [`HBONE_PORT`] once
/// ztunnel captures it, or once an isthmus sidecar is injected into it (its agent takes
/// tunnels on that port of the pod's address, HTTP/2 and QUIC), else 0 (its ports are
/// reached directly).
pub fn tunnel_port_of(annotations: &BTreeMap<String, String>) -> u16 {
    let ambient = annotations
        .get(AMBIENT_REDIRECTION)
        .is_some_and(|v| v == AMBIENT_REDIRECTION_ENABLED);
    let sidecar = annotations.contains_key(SIDECAR_STATUS);
    if ambient || sidecar {
        HBONE_PORT
    } else {
        0
    }
}

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
