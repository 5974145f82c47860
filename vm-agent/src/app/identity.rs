//! Start-up phase 2: the VM's identity. The certificate kept in the state directory when
//! it is valid and for the bundle's identity, otherwise a first enrolment that spends the
//! bundle's token; then the VM's address (given, or the source address of the route
//! towards the registry). Only this phase may need the registry to answer. A pod's sidecar
//! asks for its certificate with the pod's service-account token instead, and its address
//! is the pod's.

use std::net::IpAddr;

use anyhow::Context;
use isthmus_proto::tls::Credentials;

use super::check::Checked;
use crate::config::AgentConfig;
use crate::{identity, registration};

/// Who and where the VM is in the mesh.
pub(crate) struct Identity {
    pub creds: Credentials,
    /// True if this start enrolled with the token.
    pub enrolled: bool,
    /// The VM's registered address.
    pub address: IpAddr,
}

pub(crate) async fn obtain(config: &AgentConfig, checked: &Checked) -> anyhow::Result<Identity> {
    let _ = checked.notifier.status("obtaining the certificate");
    let settings = &checked.settings;
    if let Some(pod) = &config.pod {
        let (creds, asked) = identity::ensure_pod(pod, settings, &checked.identity).await?;
        match asked {
            true => {
                tracing::info!(identity = %creds.identity, cluster = %pod.cluster, "certificate issued for the pod's service-account token")
            }
            false => {
                tracing::info!(identity = %creds.identity, "using the certificate in the state directory")
            }
        }
        let address = config.address.context(
            "a pod's address is needed (--address, or INSTANCE_IP from the pod's status.podIP)",
        )?;
        return Ok(Identity {
            creds,
            enrolled: asked,
            address,
        });
    }
    let (creds, enrolled) = identity::ensure(&checked.bundle, &config.bundle_dir, settings).await?;
    if enrolled {
        tracing::info!(identity = %creds.identity, dir = %settings.cert_dir.display(), "enrolled with the bootstrap token; the token is spent, renewals use the certificate");
    } else {
        tracing::info!(identity = %creds.identity, "using the certificate in the state directory");
    }
    let registry = &checked.bundle.registry;
    let address = match config.address {
        Some(a) => a,
        None => registration::detect_address(registry).with_context(|| {
            format!(
                "finding the VM's address towards the registry {registry} (give it with --address)"
            )
        })?,
    };
    Ok(Identity {
        creds,
        enrolled,
        address,
    })
}
