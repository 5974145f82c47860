//! Where clusters and their credentials come from, besides the registry's own cluster:
//! kubeconfig files in a directory (one cluster per file, named by the file), and
//! remote-cluster Secrets in the local cluster (Istio's: labelled `istio/multiCluster=true`,
//! one cluster per data key, the value a kubeconfig). Both are watched: a new file or Secret
//! adds its cluster, a changed one reconnects it, a removed one removes the cluster and its
//! endpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use ring::digest;

use super::{ClusterSpec, KubernetesSource};
use crate::sources::kubernetes::mapping::labels;
use isthmus_proto::program::error_chain;

/// The label that marks a Secret as holding remote clusters' kubeconfigs (Istio's).
pub const REMOTE_SECRET_LABEL: &str = "istio/multiCluster";

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("{what}: {why}")]
    Kubeconfig { what: String, why: String },
}

/// A kube client config from kubeconfig text. `trusted` is false for kubeconfigs read from
/// Secrets: those may not run commands (`exec`) or auth plugins on the registry's host.
pub async fn config_from_kubeconfig(
    what: &str,
    text: &str,
    trusted: bool,
) -> Result<kube::Config, CredentialError> {
    let fail = |why: String| CredentialError::Kubeconfig {
        what: what.to_string(),
        why,
    };
    let kc = Kubeconfig::from_yaml(text).map_err(|e| fail(error_chain(&e)))?;
    if !trusted {
        let runs = kc
            .auth_infos
            .iter()
            .filter_map(|a| a.auth_info.as_ref())
            .any(|a| a.exec.is_some() || a.auth_provider.is_some());
        if runs {
            return Err(fail(
                "uses an exec command or auth provider, which a kubeconfig from a Secret may not \
                 (use a token or client certificate)"
                    .into(),
            ));
        }
    }
    kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| fail(error_chain(&e)))
}

/// A digest of a kubeconfig's text, to notice a change of credentials.
pub fn digest(text: &str) -> String {
    hex::encode(digest::digest(&digest::SHA256, text.as_bytes()).as_ref())
}

fn fingerprint(text: &str, network: &str) -> String {
    format!("{}/{network}", digest(text))
}

/// The network of cluster `id`: `--cluster-network`, else the registry's own.
fn network_of(id: &str, networks: &BTreeMap<String, String>, default: &str) -> String {
    networks
        .get(id)
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

/// Watches `dir` for kubeconfig files (`*.yaml`, `*.yml`, `*.kubeconfig`, or no
/// extension), one cluster each, named by the file's stem. Polls, as the static source does,
/// since Secret and ConfigMap volumes swap a symlink rather than write files.
/// `local`: the registry's own cluster when it watches one; a file cannot redefine it.
pub async fn watch_directory(
    dir: PathBuf,
    local: Option<String>,
    source: Arc<KubernetesSource>,
    networks: BTreeMap<String, String>,
    default_network: String,
    poll: Duration,
    stop: isthmus_proto::drain::Watch,
) {
    let mut known: BTreeSet<String> = BTreeSet::new();
    let mut warned = false;
    loop {
        let mut found = read_directory(&dir);
        match local.as_ref().and_then(|id| found.remove(id)) {
            Some((path, _)) if !warned => {
                tracing::warn!(file = %path.display(), "a kubeconfig file names this registry's own cluster; ignored");
                warned = true;
            }
            Some(_) => {}
            None => warned = false,
        }
        for (id, (path, text)) in &found {
            let network = network_of(id, &networks, &default_network);
            let what = format!("kubeconfig {}", path.display());
            add_cluster(&source, id, network, what, text, true).await;
        }
        for gone in known.iter().filter(|id| !found.contains_key(*id)) {
            tracing::info!(cluster = %gone, dir = %dir.display(), "kubeconfig file removed");
            source.remove_cluster(gone).await;
        }
        known = found.into_keys().collect();
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = stop.clone().signaled() => return,
        }
    }
}

/// Starts (or keeps, or restarts) cluster `id` from kubeconfig `text`, or reports why its
/// credentials cannot be used.
async fn add_cluster(
    source: &KubernetesSource,
    id: &str,
    network: String,
    what: String,
    text: &str,
    trusted: bool,
) {
    match config_from_kubeconfig(&what, text, trusted).await {
        Ok(config) => {
            let fingerprint = fingerprint(text, &network);
            source.set_cluster(
                ClusterSpec {
                    id: id.to_string(),
                    network,
                    credentials: what,
                    config,
                },
                fingerprint,
            )
        }
        Err(e) => report_bad_credentials(source, id, &e),
    }
}

fn report_bad_credentials(source: &KubernetesSource, id: &str, e: &CredentialError) {
    tracing::error!(cluster = %id, error = %e, "cluster not watched: its credentials cannot be used");
    source.statuses().update(id, |s| {
        s.last_error = Some(e.to_string());
        s.last_error_ms = super::status::now_ms();
    });
}

/// Cluster id -> (file, content) for every kubeconfig file in `dir`.
fn read_directory(dir: &Path) -> BTreeMap<String, (PathBuf, String)> {
    let mut out = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot read the kubeconfig directory");
            return out;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with('.') || !path.is_file() {
            continue;
        }
        let (stem, ext) = name.rsplit_once('.').unwrap_or((name.as_str(), ""));
        if !matches!(ext, "" | "yaml" | "yml" | "kubeconfig") {
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                out.insert(stem.to_string(), (path, text));
            }
            Err(e) => tracing::warn!(file = %path.display(), error = %e, "cannot read kubeconfig"),
        }
    }
    out
}

/// Watches the remote-cluster Secrets in `namespace` of the local cluster.
pub async fn watch_secrets(
    client: kube::Client,
    namespace: String,
    local: String,
    source: Arc<KubernetesSource>,
    networks: BTreeMap<String, String>,
    default_network: String,
    stop: isthmus_proto::drain::Watch,
) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().labels(&format!("{REMOTE_SECRET_LABEL}=true"));
    let stream = kube::runtime::WatchStreamExt::default_backoff(watcher::watcher(api, config));
    let mut stream = std::pin::pin!(stream);
    // Secret name -> the clusters it defines; rebuilt on a relist.
    let mut by_secret: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut relist: Option<BTreeMap<String, BTreeSet<String>>> = None;
    loop {
        let event = tokio::select! {
            e = stream.next() => e,
            _ = stop.clone().signaled() => return,
        };
        let Some(event) = event else { return };
        let ctx = SecretContext {
            local: &local,
            source: &source,
            networks: &networks,
            default_network: &default_network,
            namespace: &namespace,
        };
        match event {
            Ok(watcher::Event::Init) => relist = Some(BTreeMap::new()),
            Ok(watcher::Event::InitApply(s)) => {
                let ids = ctx.apply(&s).await;
                if let Some(r) = relist.as_mut() {
                    r.insert(secret_name(&s), ids);
                }
            }
            Ok(watcher::Event::InitDone) => {
                let now = relist.take().unwrap_or_default();
                for (name, ids) in &by_secret {
                    let kept = now.get(name).cloned().unwrap_or_default();
                    ctx.remove_all(ids.difference(&kept)).await;
                }
                by_secret = now;
            }
            Ok(watcher::Event::Apply(s)) => {
                let ids = ctx.apply(&s).await;
                let before = by_secret
                    .insert(secret_name(&s), ids.clone())
                    .unwrap_or_default();
                ctx.remove_all(before.difference(&ids)).await;
            }
            Ok(watcher::Event::Delete(s)) => {
                let before = by_secret.remove(&secret_name(&s)).unwrap_or_default();
                ctx.remove_all(before.iter()).await;
            }
            Err(e) => {
                tracing::warn!(namespace = %namespace, error = %error_chain(&e), "watching remote-cluster Secrets failed; retrying")
            }
        }
    }
}

fn secret_name(s: &Secret) -> String {
    s.metadata.name.clone().unwrap_or_default()
}

struct SecretContext<'a> {
    /// The registry's own cluster: a Secret cannot redefine it (as in Istio).
    local: &'a str,
    source: &'a Arc<KubernetesSource>,
    networks: &'a BTreeMap<String, String>,
    default_network: &'a str,
    namespace: &'a str,
}

impl SecretContext<'_> {
    /// Starts (or keeps) the clusters a Secret defines; returns their ids.
    async fn apply(&self, s: &Secret) -> BTreeSet<String> {
        let name = secret_name(s);
        let annotated_network = s
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(labels::NETWORK).cloned());
        let mut ids = BTreeSet::new();
        for (id, bytes) in s.data.iter().flatten() {
            if id == self.local {
                tracing::warn!(secret = %name, cluster = %id, "a remote-cluster Secret names this registry's own cluster; ignored");
                continue;
            }
            ids.insert(id.clone());
            let network = annotated_network
                .clone()
                .unwrap_or_else(|| network_of(id, self.networks, self.default_network));
            let what = format!("secret {}/{name} key {id}", self.namespace);
            let text = match std::str::from_utf8(&bytes.0) {
                Ok(t) => t,
                Err(_) => {
                    let e = CredentialError::Kubeconfig {
                        what,
                        why: "is not UTF-8 text".into(),
                    };
                    report_bad_credentials(self.source, id, &e);
                    continue;
                }
            };
            add_cluster(self.source, id, network, what, text, false).await;
        }
        ids
    }

    async fn remove_all(&self, ids: impl Iterator<Item = &String>) {
        for id in ids {
            tracing::info!(cluster = %id, "remote-cluster Secret removed");
            self.source.remove_cluster(id).await;
        }
    }
}
