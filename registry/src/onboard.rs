//! VM onboarding (`isthmusctl vm onboard`): the bundle a VM agent starts from, written on
//! the operator's machine from the cluster's CA directory: where the registry is and what
//! the VM registers as (`agent.yaml`), the mesh root, and a one-time bootstrap token for
//! the group's identity. The layout and its checks are `isthmus_proto::bundle`'s, shared
//! with the agent.

use isthmus_proto::config::ConfigProblems;
use std::path::PathBuf;
use std::time::Duration;

use ::time::OffsetDateTime;
use isthmus_proto::bundle::{AgentBundle, BundleError};
use isthmus_proto::identity::{SpiffeId, TrustDomain};

use crate::ca::token::{self, TokenError};
use crate::ca::{CaError, CaMaterial};

/// How long a bootstrap token in a bundle lasts unless the operator says otherwise: time to
/// copy the bundle and start the agent, not a standing credential.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct OnboardOptions {
    /// The registry's gRPC address as the VM reaches it (several, comma-separated, for a
    /// set of registries).
    pub registry: String,
    /// The cluster's CA directory (`DIR/<cluster>`); its name is the cluster.
    pub ca_dir: PathBuf,
    pub group: String,
    pub namespace: String,
    pub service_account: String,
    pub network: String,
    pub out: PathBuf,
    pub token_ttl: Duration,
    /// By default, the CA's.
    pub trust_domain: Option<TrustDomain>,
}

/// What [`onboard`] wrote.
#[derive(Debug, Clone)]
pub struct Onboarded {
    pub bundle: AgentBundle,
    pub identity: SpiffeId,
    /// `agent.yaml`, `root-cert.pem`, `token`.
    pub files: Vec<PathBuf>,
    pub token_expires: OffsetDateTime,
}

#[derive(Debug, thiserror::Error)]
pub enum OnboardError {
    #[error("--ca-dir: {0}")]
    Ca(#[from] CaError),
    /// Every bad flag, each named.
    #[error("{0}")]
    Flags(ConfigProblems),
    #[error("--token-ttl: {0}")]
    Token(#[from] TokenError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

/// The flag an `agent.yaml` field comes from.
fn flag_of(field: &str) -> &'static str {
    match field {
        "registry" => "--registry",
        "trustDomain" => "--trust-domain",
        "cluster" => "--ca-dir (its directory name is the cluster)",
        "network" => "--network",
        "group" => "--group",
        "namespace" => "--namespace",
        "serviceAccount" => "--service-account",
        _ => "bundle",
    }
}

/// Checks the options, creates the token and writes the bundle into `opts.out`.
pub fn onboard(opts: &OnboardOptions, now: OffsetDateTime) -> Result<Onboarded, OnboardError> {
    let material = CaMaterial::load(&opts.ca_dir, opts.trust_domain.as_ref())?;
    let cluster = opts
        .ca_dir
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_default();
    let bundle = AgentBundle {
        registry: opts.registry.clone(),
        trust_domain: material.trust_domain.to_string(),
        cluster,
        network: opts.network.clone(),
        group: opts.group.clone(),
        namespace: opts.namespace.clone(),
        service_account: opts.service_account.clone(),
    };
    let mut problems = ConfigProblems::default();
    if let Err(bundle_problems) = bundle.check() {
        for p in bundle_problems.problems {
            problems.push(flag_of(&p.field), p.message);
        }
    }
    problems.check(!opts.token_ttl.is_zero(), "--token-ttl", || {
        "must be longer than 0s".into()
    });
    problems.check(
        opts.token_ttl <= token::MAX_TOKEN_TTL,
        "--token-ttl",
        || {
            format!(
            "{} is above the maximum of {}h; a VM that has not enrolled by then gets a new bundle",
            isthmus_proto::config::format_duration(opts.token_ttl),
            token::MAX_TOKEN_TTL.as_secs() / 3600
        )
        },
    );
    problems.into_result().map_err(OnboardError::Flags)?;
    let identity = bundle.identity().map_err(|e| {
        let mut p = ConfigProblems::default();
        p.push("", e.to_string());
        OnboardError::Flags(p)
    })?;
    let token = token::create(
        &material,
        &bundle.cluster,
        &bundle.namespace,
        &bundle.service_account,
        opts.token_ttl,
        now,
    )?;
    let files = bundle.write(&opts.out, &material.root_pem, &token)?;
    Ok(Onboarded {
        bundle,
        identity,
        files,
        token_expires: now + opts.token_ttl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dir: &std::path::Path) -> OnboardOptions {
        crate::ca::init::init(
            &crate::ca::init::InitOptions {
                trust_domain: TrustDomain::new("cluster.local").unwrap(),
                clusters: vec!["cluster-a".into()],
                out: dir.join("ca"),
                rotate: false,
            },
            OffsetDateTime::now_utc(),
        )
        .unwrap();
        OnboardOptions {
            registry: "10.0.0.2:15012".into(),
            ca_dir: dir.join("ca").join("cluster-a"),
            group: "vm-web".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            network: "network-a".into(),
            out: dir.join("bundle"),
            token_ttl: DEFAULT_TOKEN_TTL,
            trust_domain: None,
        }
    }

    #[test]
    fn writes_a_bundle_whose_token_the_ca_accepts() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = options(tmp.path());
        let now = OffsetDateTime::now_utc();
        let done = onboard(&opts, now).unwrap();
        assert_eq!(done.bundle.cluster, "cluster-a");
        assert_eq!(done.bundle.trust_domain, "cluster.local");
        assert_eq!(AgentBundle::load(&opts.out).unwrap(), done.bundle);
        let material = CaMaterial::load(&opts.ca_dir, None).unwrap();
        let token = AgentBundle::read_token(&opts.out).unwrap().unwrap();
        let claims = token::verify(&material, &token, now).unwrap();
        assert_eq!(claims.identity().unwrap(), done.identity);
        assert_eq!(claims.cluster, "cluster-a");
    }

    #[test]
    fn every_bad_flag_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let good = options(tmp.path());
        let mut opts = good.clone();
        opts.network = "Net A".into();
        opts.registry = "registry".into();
        opts.token_ttl = Duration::from_secs(25 * 3600);
        let err = onboard(&opts, OffsetDateTime::now_utc())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--network") && err.contains("--registry") && err.contains("--token-ttl"),
            "{err}"
        );
        assert!(!opts.out.exists(), "nothing is written");
        opts = good;
        opts.trust_domain = Some(TrustDomain::new("other.example").unwrap());
        let err = onboard(&opts, OffsetDateTime::now_utc())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("--ca-dir") && err.contains("other.example"),
            "{err}"
        );
    }
}
