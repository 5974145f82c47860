//! Start-up phase 1: everything that can be checked without the network. The flags, the
//! bundle (its identity, the root that verifies the registry; in a pod, who the pod is and
//! the mounted root), the state directory and,
//! with `--capture nftables`, a working `nft`, each failing the start with the file or
//! flag to fix, before anything is sent. It also opens the systemd notifier, so the next
//! phases can say what they wait for.

use std::sync::Arc;

use anyhow::Context;
use isthmus_proto::bundle::AgentBundle;
use isthmus_proto::identity::SpiffeId;
use isthmus_proto::subscription::{RegistryFlags, RegistrySettings};
use isthmus_proto::tls::TrustBundle;

use crate::capture;
use crate::config::{self, AgentConfig, CaptureMode};
use crate::notify::Notifier;
use crate::pod;

/// What the checks established.
pub(crate) struct Checked {
    pub bundle: AgentBundle,
    /// The identity the bundle registers as.
    pub identity: SpiffeId,
    pub settings: RegistrySettings,
    pub trust: TrustBundle,
    pub notifier: Arc<Notifier>,
}

pub(crate) async fn check(config: &AgentConfig) -> anyhow::Result<Checked> {
    config.validate()?;
    let (bundle, settings) = match &config.pod {
        None => {
            let bundle = AgentBundle::load(&config.bundle_dir)?;
            let settings = bundle.registry_settings(&config.bundle_dir, &config.cert_dir());
            (bundle, settings)
        }
        // A pod has no bundle: who it is comes from the pod, the root from the mounted
        // ConfigMap (the bundle directory), the trust domain from the root.
        Some(pod) => {
            let settings = RegistryFlags {
                registry: pod.registry.clone(),
                root: pod::root_cert_path(&config.bundle_dir),
                cert_dir: config.cert_dir(),
                trust_domain: pod.trust_domain.clone(),
            }
            .settings()?;
            (pod.bundle(&settings.trust_domain), settings)
        }
    };
    let identity = bundle.identity()?;
    config::prepare_state_dir(&config.state_dir).with_context(|| {
        format!(
            "preparing the state directory {} (the agent keeps its key and catalog there)",
            config.state_dir.display()
        )
    })?;
    let trust = TrustBundle::from_pem_file(&settings.root_cert, &settings.trust_domain)
        .with_context(|| format!("loading {}", settings.root_cert.display()))?;
    if config.capture == CaptureMode::Nftables {
        let version = tokio::task::spawn_blocking(capture::nft_version)
            .await?
            .context("--capture nftables needs a working `nft`")?;
        tracing::debug!(%version, "nftables");
    }
    let notifier = Arc::new(Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "ignoring the systemd notify settings");
        Notifier::disabled()
    }));
    Ok(Checked {
        bundle,
        identity,
        settings,
        trust,
        notifier,
    })
}
