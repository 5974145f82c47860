//! The sidecar injection part of start-up (see `inject`): the webhook on its listener with
//! its serving certificate and renewer, and, in the registry's own cluster, the root-cert
//! ConfigMaps and the webhook configuration's `caBundle`.

use std::sync::{Arc, Mutex};

use anyhow::Context;
use isthmus_proto::drain;
use isthmus_proto::grpc::ListenerOptions;
use isthmus_proto::program::Tasks;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::config::RegistryConfig;
use crate::ca::Authority;
use crate::inject::metrics::InjectMetrics;
use crate::inject::{cluster, server};

/// Starts what the configuration asks for; nothing without a webhook listener or a cluster.
pub(super) async fn start(
    cfg: &RegistryConfig,
    listener: Option<TcpListener>,
    authority: &Arc<Authority>,
    prom: &Arc<Mutex<Registry>>,
    tasks: &mut Tasks,
    shutdown: &drain::Watch,
) -> anyhow::Result<()> {
    let local = cfg.kubernetes.local.as_ref();
    if listener.is_none() && local.is_none() {
        return Ok(());
    }
    let metrics = InjectMetrics::register(&mut prom.lock().expect("metrics registry lock"));
    let provided = match (&cfg.webhook.cert_file, &cfg.webhook.key_file) {
        (Some(cert), Some(key)) => Some(server::ServingCert::Files {
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => None,
    };
    if let Some(listener) = listener {
        let source = provided
            .clone()
            .unwrap_or_else(|| server::ServingCert::Issued {
                names: cfg.webhook.dns_names(&cfg.kubernetes.system_namespace),
            });
        let (tls, renew_in) = source
            .load(&authority.current(), ::time::OffsetDateTime::now_utc())
            .context("the webhook's serving certificate")?;
        let (tx, rx) = tokio::sync::watch::channel(tls);
        tasks.spawn(
            "webhook certificate renewer",
            server::keep_serving_cert(source, authority.clone(), tx, renew_in, shutdown.clone()),
        );
        let settings = Arc::new(cfg.inject_settings());
        tracing::info!(?settings, "sidecar injection webhook configured");
        tasks.spawn(
            "sidecar injection webhook",
            server::serve(
                listener,
                rx,
                ListenerOptions {
                    name: "webhook",
                    ..cfg.listener.clone()
                },
                server::routes(settings, metrics.clone()),
                metrics.clone(),
                shutdown.clone(),
            ),
        );
    }
    if let Some(local) = local {
        let (config, _, _) = super::kubernetes::local_config(local).await?;
        let client = kube::Client::try_from(config).context("a client for the local cluster")?;
        tasks.spawn(
            "root-cert ConfigMap publisher",
            cluster::publish_root_cert(
                client.clone(),
                authority.clone(),
                metrics.clone(),
                shutdown.clone(),
            ),
        );
        // With a certificate of the operator's, the caBundle is the operator's too.
        if provided.is_none() {
            tasks.spawn(
                "webhook caBundle keeper",
                cluster::keep_ca_bundle(
                    client,
                    cfg.webhook.config_name().to_string(),
                    authority.clone(),
                    metrics,
                    shutdown.clone(),
                ),
            );
        }
    }
    Ok(())
}
