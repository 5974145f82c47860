//! The VM's mesh identity: the first start exchanges the bundle's one-time token for a
//! certificate; the key (0600) and chain stay in the state directory; renewal at half-life
//! authenticates with the current certificate, so restarts and reboots need no new token.
//! An expired or missing credential stops the start with what to do about it.

use isthmus_proto::backoff::Backoff;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use isthmus_proto::bundle::AgentBundle;
use isthmus_proto::identity::SpiffeId;

use crate::pod::{self, PodConfig};
use isthmus_proto::certs::{self, CertsError};
use isthmus_proto::drain;
use isthmus_proto::subscription::RegistrySettings;
use isthmus_proto::tls::{self, Credentials, TlsError};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "no certificate in {cert_dir} and no bootstrap token in {token}: this VM has not \
         enrolled yet, or its state was lost. Onboard it (`isthmusctl vm onboard ... --out DIR`) \
         and copy DIR's files into {bundle}"
    )]
    NoCredential {
        cert_dir: PathBuf,
        token: PathBuf,
        bundle: PathBuf,
    },
    #[error(
        "the certificate in {cert_dir} expired {ago}s ago and cannot renew itself: onboard \
         the VM again (`isthmusctl vm onboard`), put the new token in {token}, and remove \
         {cert_dir}"
    )]
    Expired {
        cert_dir: PathBuf,
        token: PathBuf,
        ago: i64,
    },
    #[error(
        "the certificate in {cert_dir} is for {held}, but the bundle registers as {wanted}: \
         remove {cert_dir} (and give the bundle a fresh token) or use the matching bundle"
    )]
    WrongIdentity {
        cert_dir: PathBuf,
        held: String,
        wanted: String,
    },
    #[error("cannot read the credentials in {cert_dir}: {source}")]
    Unreadable {
        cert_dir: PathBuf,
        #[source]
        source: TlsError,
    },
    #[error(
        "enrolling with the bootstrap token in {token} failed: {source}. A token works once \
         and expires: if this VM enrolled before, its certificate in {cert_dir} was lost; \
         onboard it again (`isthmusctl vm onboard`) for a new token"
    )]
    Enroll {
        token: PathBuf,
        cert_dir: PathBuf,
        #[source]
        source: CertsError,
    },
    #[error(transparent)]
    Bundle(#[from] isthmus_proto::bundle::BundleError),
    #[error(transparent)]
    Pod(#[from] crate::pod::PodError),
    #[error("the bundle's identity: {0}")]
    BundleIdentity(#[from] isthmus_proto::identity::IdentityError),
}

/// Whether `cert_dir` holds a key and chain (not whether they are good).
pub fn has_credentials(cert_dir: &Path) -> bool {
    cert_dir.join(tls::KEY_FILE).exists() && cert_dir.join(tls::CERT_CHAIN_FILE).exists()
}

/// The VM's credentials: those in `cert_dir` if they are valid and for the bundle's
/// identity, else a first enrolment with the bundle's token. Only the enrolment touches the
/// network, and only after the token was checked (well-formed, for this identity, unexpired).
pub async fn ensure(
    bundle: &AgentBundle,
    bundle_dir: &Path,
    registry: &RegistrySettings,
) -> Result<(Credentials, bool), IdentityError> {
    let cert_dir = &registry.cert_dir;
    let token_path = AgentBundle::token_path(bundle_dir);
    let wanted = bundle.identity()?;
    if has_credentials(cert_dir) {
        let creds =
            Credentials::from_dir(cert_dir).map_err(|source| IdentityError::Unreadable {
                cert_dir: cert_dir.clone(),
                source,
            })?;
        if creds.identity != wanted {
            return Err(IdentityError::WrongIdentity {
                cert_dir: cert_dir.clone(),
                held: creds.identity.to_string(),
                wanted: wanted.to_string(),
            });
        }
        let (remaining, _) = creds
            .leaf_validity()
            .map_err(|source| IdentityError::Unreadable {
                cert_dir: cert_dir.clone(),
                source,
            })?;
        if remaining <= 0 {
            return Err(IdentityError::Expired {
                cert_dir: cert_dir.clone(),
                token: token_path,
                ago: -remaining,
            });
        }
        return Ok((creds, false));
    }
    if let Some(warning) = AgentBundle::token_exposure(bundle_dir) {
        tracing::warn!("{warning}");
    }
    let Some(token) = AgentBundle::read_token(bundle_dir)? else {
        return Err(IdentityError::NoCredential {
            cert_dir: cert_dir.clone(),
            token: token_path,
            bundle: bundle_dir.to_path_buf(),
        });
    };
    let creds = certs::enroll(registry, &token, cert_dir)
        .await
        .map_err(|source| IdentityError::Enroll {
            token: token_path,
            cert_dir: cert_dir.clone(),
            source,
        })?;
    Ok((creds, true))
}

/// A pod's credentials: those in `cert_dir` (an emptyDir, kept across restarts of the
/// sidecar container) when they are for `wanted` and unexpired, else new ones for the
/// pod's service-account token. Returns true when it asked the CA.
pub async fn ensure_pod(
    pod: &PodConfig,
    registry: &RegistrySettings,
    wanted: &SpiffeId,
) -> Result<(Credentials, bool), IdentityError> {
    let cert_dir = &registry.cert_dir;
    if has_credentials(cert_dir) {
        if let Ok(creds) = Credentials::from_dir(cert_dir) {
            let remaining = creds.leaf_validity().map(|(r, _)| r).unwrap_or(0);
            if &creds.identity == wanted && remaining > 0 {
                return Ok((creds, false));
            }
        }
    }
    let creds = pod::request_certificate(registry, pod, wanted).await?;
    Ok((creds, true))
}

/// How renewals authenticate.
#[derive(Debug, Clone)]
pub enum Renewal {
    /// With the current certificate (a VM: its token was spent on the first one).
    Certificate,
    /// With the pod's service-account token, read afresh each time.
    PodToken(Arc<PodConfig>),
}

/// When to renew: at half the certificate's lifetime, i.e. once `remaining` is at most
/// half of `lifetime` (now, if it already is).
pub fn renew_in(remaining: i64, lifetime: i64) -> Duration {
    let wait = remaining - lifetime / 2;
    Duration::from_secs(wait.max(0) as u64)
}

/// Renews once, authenticating as `how` says; writes the new key and chain into the cert
/// directory and returns them.
pub async fn renew(
    registry: &RegistrySettings,
    current: &Credentials,
    how: &Renewal,
) -> Result<Credentials, String> {
    match how {
        Renewal::Certificate => renew_with_certificate(registry, current)
            .await
            .map_err(|e| e.to_string()),
        Renewal::PodToken(pod) => pod::request_certificate(registry, pod, &current.identity)
            .await
            .map_err(|e| e.to_string()),
    }
}

async fn renew_with_certificate(
    registry: &RegistrySettings,
    current: &Credentials,
) -> Result<Credentials, CertsError> {
    let req = Default::default();
    certs::obtain(
        registry,
        Some(current),
        &current.identity,
        req,
        &registry.cert_dir,
    )
    .await
}

/// Renewal retries: the certificate stays valid meanwhile, so they can start slow.
const RENEWAL_RETRY_MIN: Duration = Duration::from_secs(1);
const RENEWAL_RETRY_MAX: Duration = Duration::from_secs(60);

/// Keeps the credentials fresh until `shutdown`: renews at half-life, retries failures
/// with back-off (the certificate stays valid meanwhile), and publishes every renewal.
pub async fn keep_renewed(
    registry: RegistrySettings,
    how: Renewal,
    creds: watch::Sender<Arc<Credentials>>,
    metrics: crate::metrics::AgentMetrics,
    shutdown: drain::Watch,
) {
    let stop = shutdown.signaled();
    tokio::pin!(stop);
    let mut retry = Backoff::new(RENEWAL_RETRY_MIN, RENEWAL_RETRY_MAX);
    // A certificate issued in this run renews at half of what it had left when it came;
    // one found on disk at half of its validity (which starts a little in the past, for
    // clock skew, so a very short-lived one renews at once).
    let mut issued_here = false;
    loop {
        let current = creds.borrow().clone();
        let (remaining, lifetime) = current.leaf_validity().unwrap_or((0, 0));
        metrics.cert_expiry_seconds.set(remaining.max(0) as f64);
        let wait = if issued_here {
            Duration::from_secs((remaining.max(0) / 2) as u64)
        } else {
            renew_in(remaining, lifetime)
        };
        tracing::debug!(?wait, remaining, "next certificate renewal");
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match renew(&registry, &current, &how).await {
            Ok(fresh) => {
                retry.reset();
                let (left, _) = fresh.leaf_validity().unwrap_or((0, 0));
                tracing::info!(identity = %fresh.identity, valid_for_s = left, "certificate renewed");
                metrics
                    .renewals
                    .get_or_create(&crate::metrics::Outcome::ok())
                    .inc();
                creds.send_replace(Arc::new(fresh));
                issued_here = true;
            }
            Err(e) => {
                let (left, _) = current.leaf_validity().unwrap_or((0, 0));
                tracing::warn!(error = %e, valid_for_s = left, retry_in = ?retry.peek(), "certificate renewal failed; the current one stays in use");
                metrics
                    .renewals
                    .get_or_create(&crate::metrics::Outcome::error())
                    .inc();
                // Never sleep past expiry by much: retries speed up as it nears.
                let cap = Duration::from_secs((left.max(2) / 4) as u64).max(Duration::from_secs(1));
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(retry.next_delay().min(cap)) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_at_half_life() {
        assert_eq!(renew_in(86_400, 86_400), Duration::from_secs(43_200));
        assert_eq!(renew_in(43_200, 86_400), Duration::ZERO);
        assert_eq!(renew_in(10, 86_400), Duration::ZERO);
        assert_eq!(renew_in(30, 40), Duration::from_secs(10));
    }
}
