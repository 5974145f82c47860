//! What injected pods need from the registry's own cluster, kept there by the registry:
//!
//! - the `isthmus-ca-root-cert` ConfigMap (key `root-cert.pem`, the mesh root) in every
//!   namespace labelled `isthmus-injection=enabled`, as istiod publishes
//!   `istio-ca-root-cert`: created when missing (also after a deletion), updated when the
//!   root changes; a ConfigMap of that name without the registry's label is someone
//!   else's and is left alone;
//! - the `caBundle` of every webhook in the MutatingWebhookConfiguration, set to the mesh
//!   root whenever it differs.
//!
//! Both are reconcile loops: a watch (or a CA change) says something may differ, one pass
//! compares the cluster with what it should be and writes the difference; a periodic pass
//! catches anything a watch missed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use isthmus_proto::drain;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use serde_json::json;

use super::metrics::{InjectMetrics, ResultLabels};
use super::{NAMESPACE_LABEL, NAMESPACE_LABEL_VALUE, ROOT_CERT_CONFIGMAP, ROOT_CERT_KEY};
use crate::ca::Authority;

/// The label the registry puts on the ConfigMaps it publishes; only those it updates.
pub const PUBLISHER_LABEL: &str = "app.kubernetes.io/managed-by";
pub const PUBLISHER_LABEL_VALUE: &str = "isthmus-registry";
/// A full pass at least this often, whatever the watches say.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(60);
/// After a failed pass, the next one this much later.
const RETRY_INTERVAL: Duration = Duration::from_secs(2);
/// The field manager of the registry's writes.
const FIELD_MANAGER: &str = "isthmus-registry";

/// Runs `pass` now, whenever one of `triggers` yields, when the CA changes, and every
/// [`RESYNC_INTERVAL`], until `shutdown`; a failed pass is retried soon.
async fn reconcile_loop<F, Fut>(
    what: &'static str,
    authority: Arc<Authority>,
    mut triggers: futures_util::stream::SelectAll<futures_util::stream::BoxStream<'static, ()>>,
    shutdown: drain::Watch,
    mut pass: F,
) where
    F: FnMut(Arc<crate::ca::CaMaterial>) -> Fut,
    Fut: std::future::Future<Output = Result<(), kube::Error>>,
{
    let mut ca = authority.subscribe();
    let stop = shutdown.signaled();
    tokio::pin!(stop);
    let mut wait = Duration::ZERO;
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(wait) => {}
            changed = ca.changed() => if changed.is_err() { return },
            Some(()) = triggers.next() => {
                // Whatever else queued up is covered by this one pass.
                while let Some(Some(())) = futures_util::FutureExt::now_or_never(triggers.next()) {}
            }
        }
        match pass(authority.current()).await {
            Ok(()) => {
                if last_error.take().is_some() {
                    tracing::info!(what, "recovered");
                }
                wait = RESYNC_INTERVAL;
            }
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_deref() != Some(&msg) {
                    tracing::warn!(what, error = %msg, "cannot reconcile; retrying");
                }
                last_error = Some(msg);
                wait = RETRY_INTERVAL;
            }
        }
    }
}

/// Any event of a watch, as a trigger.
fn trigger<K>(api: Api<K>, config: watcher::Config) -> futures_util::stream::BoxStream<'static, ()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, config)
        .default_backoff()
        .map(|_| ())
        .boxed()
}

/// Keeps the root-cert ConfigMap in every injected namespace until `shutdown`.
pub async fn publish_root_cert(
    client: kube::Client,
    authority: Arc<Authority>,
    metrics: InjectMetrics,
    shutdown: drain::Watch,
) {
    let selector = format!("{NAMESPACE_LABEL}={NAMESPACE_LABEL_VALUE}");
    let name_field = format!("metadata.name={ROOT_CERT_CONFIGMAP}");
    let triggers = futures_util::stream::select_all([
        trigger(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default().labels(&selector),
        ),
        trigger(
            Api::<ConfigMap>::all(client.clone()),
            watcher::Config::default().fields(&name_field),
        ),
    ]);
    let foreign_seen = Arc::new(Mutex::new(BTreeSet::new()));
    reconcile_loop(
        "root-cert ConfigMaps",
        authority,
        triggers,
        shutdown,
        |material| {
            let (client, metrics) = (client.clone(), metrics.clone());
            let (selector, name_field) = (selector.clone(), name_field.clone());
            let foreign_seen = foreign_seen.clone();
            async move {
                publish_pass(
                    &client,
                    &material.root_pem,
                    &selector,
                    &name_field,
                    &metrics,
                    &foreign_seen,
                )
                .await
            }
        },
    )
    .await
}

async fn publish_pass(
    client: &kube::Client,
    root_pem: &str,
    selector: &str,
    name_field: &str,
    metrics: &InjectMetrics,
    foreign_seen: &Mutex<BTreeSet<String>>,
) -> Result<(), kube::Error> {
    let namespaces = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default().labels(selector))
        .await?;
    let existing: BTreeMap<String, ConfigMap> = Api::<ConfigMap>::all(client.clone())
        .list(&ListParams::default().fields(name_field))
        .await?
        .into_iter()
        .filter_map(|cm| Some((cm.metadata.namespace.clone()?, cm)))
        .collect();
    let mut first_error = None;
    for ns in namespaces {
        let Some(name) = ns.metadata.name.clone() else {
            continue;
        };
        let terminating = ns.metadata.deletion_timestamp.is_some()
            || ns.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating");
        if terminating {
            continue;
        }
        let api = Api::<ConfigMap>::namespaced(client.clone(), &name);
        let result = match existing.get(&name) {
            None => {
                let created = api
                    .create(&post_params(), &root_configmap(root_pem, None))
                    .await;
                match created {
                    // Created meanwhile by someone else: the next pass looks at it.
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(None),
                    other => other.map(|_| Some("created")),
                }
            }
            Some(cm) if !is_ours(cm) => {
                let first = foreign_seen
                    .lock()
                    .expect("foreign ConfigMaps lock")
                    .insert(name.clone());
                if first {
                    tracing::warn!(namespace = %name, "a ConfigMap {ROOT_CERT_CONFIGMAP} not made by the registry is in the way; leaving it alone (injected pods there trust whatever it holds)");
                }
                Ok(None)
            }
            Some(cm) if holds(cm, root_pem) => Ok(None),
            Some(cm) => {
                let version = cm.metadata.resource_version.clone();
                api.replace(
                    ROOT_CERT_CONFIGMAP,
                    &post_params(),
                    &root_configmap(root_pem, version),
                )
                .await
                .map(|_| Some("updated"))
            }
        };
        match result {
            Ok(Some(result)) => {
                metrics
                    .configmap_writes
                    .get_or_create(&ResultLabels { result })
                    .inc();
                tracing::info!(namespace = %name, result, "published the mesh root as {ROOT_CERT_CONFIGMAP}");
            }
            Ok(None) => {}
            Err(e) => {
                metrics
                    .configmap_writes
                    .get_or_create(&ResultLabels { result: "error" })
                    .inc();
                tracing::warn!(namespace = %name, error = %e, "cannot write {ROOT_CERT_CONFIGMAP}");
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    }
}

fn is_ours(cm: &ConfigMap) -> bool {
    cm.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(PUBLISHER_LABEL))
        .map(String::as_str)
        == Some(PUBLISHER_LABEL_VALUE)
}

fn holds(cm: &ConfigMap, root_pem: &str) -> bool {
    cm.data
        .as_ref()
        .and_then(|d| d.get(ROOT_CERT_KEY))
        .map(String::as_str)
        == Some(root_pem)
}

/// The ConfigMap the registry publishes (with `resource_version` for a replace).
pub fn root_configmap(root_pem: &str, resource_version: Option<String>) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(ROOT_CERT_CONFIGMAP.into()),
            labels: Some(BTreeMap::from([(
                PUBLISHER_LABEL.to_string(),
                PUBLISHER_LABEL_VALUE.to_string(),
            )])),
            resource_version,
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            ROOT_CERT_KEY.to_string(),
            root_pem.to_string(),
        )])),
        ..ConfigMap::default()
    }
}

/// Keeps the `caBundle` of every webhook of MutatingWebhookConfiguration `name` at the
/// mesh root until `shutdown`. A configuration not (yet) installed is waited for.
pub async fn keep_ca_bundle(
    client: kube::Client,
    name: String,
    authority: Arc<Authority>,
    metrics: InjectMetrics,
    shutdown: drain::Watch,
) {
    let api = Api::<MutatingWebhookConfiguration>::all(client);
    let triggers = futures_util::stream::select_all([trigger(
        api.clone(),
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )]);
    reconcile_loop(
        "webhook caBundle",
        authority,
        triggers,
        shutdown,
        |material| {
            let (api, name, metrics) = (api.clone(), name.clone(), metrics.clone());
            async move { ca_bundle_pass(&api, &name, material.root_pem.as_bytes(), &metrics).await }
        },
    )
    .await
}

async fn ca_bundle_pass(
    api: &Api<MutatingWebhookConfiguration>,
    name: &str,
    root: &[u8],
    metrics: &InjectMetrics,
) -> Result<(), kube::Error> {
    let Some(config) = api.get_opt(name).await? else {
        tracing::debug!(%name, "no MutatingWebhookConfiguration to set the caBundle of yet");
        return Ok(());
    };
    let Some(patch) = ca_bundle_patch(&config, root) else {
        return Ok(());
    };
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    let result = api.patch(name, &params, &Patch::Strategic(patch)).await;
    let label = if result.is_ok() { "updated" } else { "error" };
    metrics
        .ca_bundle_patches
        .get_or_create(&ResultLabels { result: label })
        .inc();
    result?;
    tracing::info!(%name, "set the webhooks' caBundle to the mesh root");
    Ok(())
}

/// A strategic-merge patch (webhooks merge by name) setting the `caBundle` of each webhook
/// whose bundle is not `root`; `None` when all are.
pub fn ca_bundle_patch(
    config: &MutatingWebhookConfiguration,
    root: &[u8],
) -> Option<serde_json::Value> {
    let stale: Vec<serde_json::Value> = config
        .webhooks
        .iter()
        .flatten()
        .filter(|w| w.client_config.ca_bundle.as_ref() != Some(&ByteString(root.to_vec())))
        .map(|w| {
            json!({
                "name": w.name,
                "clientConfig": {"caBundle": ByteString(root.to_vec())},
            })
        })
        .collect();
    (!stale.is_empty()).then(|| json!({ "webhooks": stale }))
}
