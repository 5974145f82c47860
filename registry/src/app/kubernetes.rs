//! The Kubernetes source's part of start-up: the registry's own cluster, the remote clusters
//! of its Secrets and of the kubeconfig directory, and the deadline after which readiness
//! stops waiting for clusters that have not synced (naming them); and the CA's reviewer of
//! pods' tokens over the same clusters.

use std::sync::Arc;

use anyhow::Context;
use isthmus_proto::drain;
use isthmus_proto::identity::TrustDomain;
use isthmus_proto::program::{Readiness, Tasks};

use super::config::{LocalCluster, RegistryConfig};
use crate::ca::kubernetes::KubeTokenReviewer;
use crate::ca::service::KubernetesAuth;
use crate::ingest::Ingest;
use crate::sources::kubernetes::{
    self, config_from_kubeconfig, default_cluster_local_hosts, watch_directory, watch_secrets,
    ClusterSpec, ClusterStatuses, KubeSettings, KubernetesSource,
};

/// Starts watching the configured clusters; `None` when there are none.
pub(super) async fn start(
    cfg: &RegistryConfig,
    trust_domain: TrustDomain,
    ingest: Ingest,
    statuses: ClusterStatuses,
    readiness: &Readiness,
    tasks: &mut Tasks,
    shutdown: &drain::Watch,
) -> anyhow::Result<Option<Arc<KubernetesSource>>> {
    let k = &cfg.kubernetes;
    if !k.enabled() {
        return Ok(None);
    }
    let settings = KubeSettings {
        domain: k.domain.clone(),
        trust_domain,
        cluster_local_hosts: k
            .cluster_local_hosts
            .clone()
            .unwrap_or_else(|| default_cluster_local_hosts(&k.domain)),
        stale_after: k.stale_after,
        probe_interval: k.probe_interval,
        watch_timeout: k.watch_timeout,
    };
    let source = Arc::new(KubernetesSource::new(
        ingest,
        settings,
        statuses,
        Some(readiness.clone()),
    ));
    if let Some(local) = &k.local {
        let (config, credentials, digest) = local_config(local).await?;
        if k.remote_secrets {
            let client =
                kube::Client::try_from(config.clone()).context("a client for the local cluster")?;
            tasks.spawn(
                "remote-cluster Secret watcher",
                watch_secrets(
                    client,
                    k.system_namespace.clone(),
                    cfg.cluster.clone(),
                    source.clone(),
                    k.cluster_networks.clone(),
                    cfg.network.clone(),
                    shutdown.clone(),
                ),
            );
        }
        source.set_cluster(
            ClusterSpec {
                id: cfg.cluster.clone(),
                network: cfg.network.clone(),
                credentials,
                config,
            },
            format!("{digest}/{}", cfg.network),
        );
    }
    if let Some(dir) = &k.remote_kubeconfigs {
        tasks.spawn(
            "remote kubeconfig directory poller",
            watch_directory(
                dir.clone(),
                k.local.as_ref().map(|_| cfg.cluster.clone()),
                source.clone(),
                k.cluster_networks.clone(),
                cfg.network.clone(),
                cfg.resource_poll,
                shutdown.clone(),
            ),
        );
    }
    let (deadline, watched) = (k.sync_deadline, source.clone());
    let stop = shutdown.clone();
    tasks.spawn("cluster sync deadline", async move {
        tokio::select! {
            _ = tokio::time::sleep(deadline) => {}
            _ = stop.signaled() => return,
        }
        for (cluster, why) in watched.stop_waiting() {
            tracing::warn!(%cluster, %why, deadline_s = deadline.as_secs(), "ready without this cluster: it has not synced by the deadline");
        }
    });
    let (watched, stop) = (source.clone(), shutdown.clone());
    tasks.spawn("cluster watchers", async move {
        stop.signaled().await;
        watched.shutdown().await;
    });
    Ok(Some(source))
}

/// The CA's check of pods' service-account tokens, against the clusters `source` watches.
pub(super) fn token_auth(cfg: &RegistryConfig, source: &KubernetesSource) -> KubernetesAuth {
    let local = cfg.kubernetes.local.as_ref().map(|_| cfg.cluster.clone());
    KubernetesAuth {
        reviewer: Arc::new(KubeTokenReviewer::new(source.clients(), local)),
        audience: cfg.ca_token_audience.clone(),
    }
}

/// The local cluster's client config, a description of where it came from, and a digest of
/// it (so a restart with other credentials is noticed).
pub(super) async fn local_config(
    local: &LocalCluster,
) -> anyhow::Result<(kube::Config, String, String)> {
    match local {
        LocalCluster::Kubeconfig(path) => {
            let what = format!("kubeconfig {}", path.display());
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let config = config_from_kubeconfig(&what, &text, true).await?;
            Ok((config, what, kubernetes::digest(&text)))
        }
        LocalCluster::InCluster => {
            let config = kube::Config::incluster()
                .context("in-cluster config (is the registry running in a pod?)")?;
            Ok((config, "in-cluster service account".into(), String::new()))
        }
    }
}
