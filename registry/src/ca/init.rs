//! `isthmusctl ca init`: a root and one intermediate per cluster, written in Istio's
//! `cacerts` layout so that existing tooling and habits carry over:
//!
//! ```text
//! DIR/root-cert.pem  DIR/root-key.pem (0600)
//! DIR/<cluster>/{ca-cert.pem, ca-key.pem (0600), cert-chain.pem, root-cert.pem}
//! ```
//!
//! Both CA certificates carry the URI SAN `spiffe://<trust-domain>`, so a registry learns its
//! trust domain from its CA files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ::time::OffsetDateTime;
use isthmus_proto::certs::{self, write_atomic, LeafValidity};
use isthmus_proto::identity::{validate_dns_label, TrustDomain};
use rcgen::{BasicConstraints, CertificateParams, KeyPair};

use super::{CA_CERT_FILE, CA_CHAIN_FILE, CA_KEY_FILE, ROOT_CERT_FILE, ROOT_KEY_FILE};

pub const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
pub const INTERMEDIATE_TTL: Duration = Duration::from_secs(5 * 365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(
        "{0} already exists; pass --rotate to replace the cluster intermediates (the root is kept)"
    )]
    Exists(PathBuf),
    #[error("cluster name {0:?}: {1}")]
    BadCluster(String, String),
    #[error("{path}: {why}")]
    Io { path: PathBuf, why: String },
    #[error("the existing root in {0} is not usable: {1}")]
    BadRoot(PathBuf, String),
    #[error("certificate generation failed: {0}")]
    Generate(String),
}

#[derive(Debug, Clone)]
pub struct InitOptions {
    pub trust_domain: TrustDomain,
    pub clusters: Vec<String>,
    pub out: PathBuf,
    /// Replace existing intermediates (keeping the root).
    pub rotate: bool,
}

/// What `init` wrote.
#[derive(Debug, Clone)]
pub struct InitReport {
    pub root_created: bool,
    pub cluster_dirs: Vec<PathBuf>,
}

fn gen(e: rcgen::Error) -> InitError {
    InitError::Generate(e.to_string())
}

fn write(path: &Path, content: &str, mode: u32) -> Result<(), InitError> {
    write_atomic(path, content.as_bytes(), mode).map_err(|e| InitError::Io {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

/// Parameters of a CA certificate for `td` (the mesh's one CA profile): a random serial,
/// valid from a little before `now` for `ttl`.
fn ca_params(
    td: &TrustDomain,
    common_name: String,
    constraints: BasicConstraints,
    now: OffsetDateTime,
    ttl: Duration,
) -> Result<CertificateParams, InitError> {
    let validity = LeafValidity {
        not_before: now - super::CLOCK_SKEW_ALLOWANCE,
        not_after: now + ttl,
    };
    certs::ca_params(
        td.as_str(),
        common_name,
        constraints,
        validity,
        super::random_serial(),
    )
    .map_err(gen)
}

pub fn init(opts: &InitOptions, now: OffsetDateTime) -> Result<InitReport, InitError> {
    for c in &opts.clusters {
        validate_dns_label("cluster", c)
            .map_err(|e| InitError::BadCluster(c.clone(), e.to_string()))?;
    }
    std::fs::create_dir_all(&opts.out).map_err(|e| InitError::Io {
        path: opts.out.clone(),
        why: e.to_string(),
    })?;
    let root_cert_path = opts.out.join(ROOT_CERT_FILE);
    let root_key_path = opts.out.join(ROOT_KEY_FILE);
    let (root_pem, root_key, root_created) = if root_cert_path.exists() {
        let (cert, key) = existing_root(opts, root_cert_path, &root_key_path)?;
        (cert, key, false)
    } else {
        let (cert, key) = new_root(opts, &root_cert_path, &root_key_path, now)?;
        (cert, key, true)
    };
    let issuer = rcgen::Issuer::from_ca_cert_pem(&root_pem, &root_key).map_err(gen)?;

    let mut cluster_dirs = Vec::new();
    for cluster in &opts.clusters {
        let dir = opts.out.join(cluster);
        if dir.join(CA_CERT_FILE).exists() && !opts.rotate {
            return Err(InitError::Exists(dir.join(CA_CERT_FILE)));
        }
        std::fs::create_dir_all(&dir).map_err(|e| InitError::Io {
            path: dir.clone(),
            why: e.to_string(),
        })?;
        write_intermediate(opts, cluster, &dir, &issuer, &root_pem, now)?;
        cluster_dirs.push(dir);
    }
    Ok(InitReport {
        root_created,
        cluster_dirs,
    })
}

/// The root already in `out`: read back, and refused unless it is for the same trust domain.
fn existing_root(
    opts: &InitOptions,
    root_cert_path: PathBuf,
    root_key_path: &Path,
) -> Result<(String, KeyPair), InitError> {
    let cert = std::fs::read_to_string(&root_cert_path)
        .map_err(|e| InitError::BadRoot(root_cert_path.clone(), e.to_string()))?;
    let key_pem = std::fs::read_to_string(root_key_path)
        .map_err(|e| InitError::BadRoot(root_key_path.to_path_buf(), e.to_string()))?;
    let key = KeyPair::from_pem(&key_pem)
        .map_err(|e| InitError::BadRoot(root_key_path.to_path_buf(), e.to_string()))?;
    let der = isthmus_proto::tls::parse_certs(&root_cert_path, cert.as_bytes())
        .map_err(|e| InitError::BadRoot(root_cert_path.clone(), e.to_string()))?;
    match super::trust_domain_of_ca(&der[0]) {
        Some(td) if td == opts.trust_domain.as_str() => Ok((cert, key)),
        Some(td) => Err(InitError::BadRoot(
            root_cert_path,
            format!("it is for trust domain {td}, not {}", opts.trust_domain),
        )),
        None => Err(InitError::BadRoot(
            root_cert_path,
            "it carries no spiffe:// trust domain".into(),
        )),
    }
}

/// A new self-signed root, written to `out` (its key 0600).
fn new_root(
    opts: &InitOptions,
    root_cert_path: &Path,
    root_key_path: &Path,
    now: OffsetDateTime,
) -> Result<(String, KeyPair), InitError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen)?;
    let params = ca_params(
        &opts.trust_domain,
        "isthmus root CA".into(),
        BasicConstraints::Unconstrained,
        now,
        ROOT_TTL,
    )?;
    let cert = params.self_signed(&key).map_err(gen)?;
    write(root_key_path, &key.serialize_pem(), 0o600)?;
    write(root_cert_path, &cert.pem(), 0o644)?;
    Ok((cert.pem(), key))
}

/// One cluster's intermediate, signed by the root, written into `dir` in Istio's `cacerts`
/// layout.
fn write_intermediate(
    opts: &InitOptions,
    cluster: &str,
    dir: &Path,
    issuer: &rcgen::Issuer<'_, &KeyPair>,
    root_pem: &str,
    now: OffsetDateTime,
) -> Result<(), InitError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen)?;
    let mut params = ca_params(
        &opts.trust_domain,
        format!("isthmus intermediate CA {cluster}"),
        BasicConstraints::Constrained(0),
        now,
        INTERMEDIATE_TTL,
    )?;
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, issuer).map_err(gen)?;
    // Key first: a reloading registry that sees the new certificate finds its key.
    write(&dir.join(CA_KEY_FILE), &key.serialize_pem(), 0o600)?;
    write(&dir.join(ROOT_CERT_FILE), root_pem, 0o644)?;
    write(
        &dir.join(CA_CHAIN_FILE),
        &format!("{}{}", cert.pem(), root_pem),
        0o644,
    )?;
    write(&dir.join(CA_CERT_FILE), &cert.pem(), 0o644)?;
    Ok(())
}
