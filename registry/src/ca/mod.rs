//! The mesh CA: a root and one intermediate per cluster in Istio's `cacerts` layout, leaf
//! certificates for SPIFFE identities, bootstrap tokens, pods' service-account tokens
//! (checked with the pod's cluster), and hot reload of the intermediate.

pub mod init;
pub mod kubernetes;
pub mod metrics;
pub mod service;
pub mod token;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ::time::OffsetDateTime;
use isthmus_proto::identity::{SpiffeId, TrustDomain};
use isthmus_proto::{certs, tls};
use rcgen::{KeyPair, SanType};
use tokio::sync::watch;

/// Files of a cluster's CA directory (Istio's `cacerts` secret layout).
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const CA_CHAIN_FILE: &str = "cert-chain.pem";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";

/// Leaf lifetime when the caller asks for none (Istio's default).
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest leaf lifetime the CA signs unless configured otherwise.
pub const DEFAULT_MAX_LEAF_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Certificates start this far in the past so that a peer with a slightly slow clock accepts
/// them (the leaf profile and this allowance live in `isthmus_proto::certs`).
pub use isthmus_proto::certs::CLOCK_SKEW_ALLOWANCE;
/// How often the CA directory is checked for a replaced intermediate.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read CA file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CA file {path}: {why}")]
    BadFile { path: PathBuf, why: String },
    #[error("the CSR is not valid: {0}")]
    BadCsr(String),
    #[error("the CSR must carry exactly one SAN, the URI {expected}; it has: {found}")]
    CsrSans { expected: String, found: String },
    #[error("the CSR asks for {requested} but the caller is {caller}")]
    IdentityMismatch { requested: String, caller: String },
    #[error("the CSR key is {0}; the mesh CA signs ECDSA P-256 keys only (as isthmusctl and the agents generate them)")]
    CsrKeyType(String),
    #[error("requested lifetime {requested}s is above the CA's maximum of {max}s")]
    TtlTooLong { requested: u64, max: u64 },
    #[error("no bootstrap token, no Kubernetes service-account token and no client certificate: present one of them")]
    Unauthenticated,
    #[error(transparent)]
    Token(#[from] token::TokenError),
    #[error(transparent)]
    Kubernetes(#[from] kubernetes::KubeTokenError),
    #[error("store error while redeeming the token: {0}")]
    Store(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

impl CaError {
    /// The metric label for a refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            CaError::Read { .. } | CaError::BadFile { .. } => "ca_unavailable",
            CaError::BadCsr(_) => "csr_invalid",
            CaError::CsrSans { .. } => "csr_sans",
            CaError::IdentityMismatch { .. } => "identity_mismatch",
            CaError::CsrKeyType(_) => "csr_key_type",
            CaError::TtlTooLong { .. } => "ttl_too_long",
            CaError::Unauthenticated => "unauthenticated",
            CaError::Token(t) => t.reason(),
            CaError::Kubernetes(k) => k.reason(),
            CaError::Store(_) => "store_error",
            CaError::Sign(_) => "sign_error",
        }
    }
}

/// The signing material of one cluster's intermediate, as loaded from disk.
pub struct CaMaterial {
    pub trust_domain: TrustDomain,
    pub root_pem: String,
    /// The intermediate first, then any further CAs up to (not including) the root.
    pub chain_pems: Vec<String>,
    intermediate_der: rustls::pki_types::CertificateDer<'static>,
    key: KeyPair,
    /// Raw public key of the intermediate, which verifies bootstrap tokens.
    pub public_key: Vec<u8>,
    /// Short id of the intermediate key, carried in tokens so a rotated key is named.
    pub key_id: String,
    pub not_after: OffsetDateTime,
    fingerprint: [u8; 32],
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaMaterial")
            .field("trust_domain", &self.trust_domain)
            .field("key_id", &self.key_id)
            .field("not_after", &self.not_after)
            .finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CaError> {
    std::fs::read(path).map_err(|source| CaError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn bad(path: &Path, why: impl std::fmt::Display) -> CaError {
    CaError::BadFile {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

fn dir_fingerprint(dir: &Path) -> Result<[u8; 32], CaError> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for f in [CA_CERT_FILE, CA_KEY_FILE, CA_CHAIN_FILE, ROOT_CERT_FILE] {
        let p = dir.join(f);
        // cert-chain.pem is optional.
        match std::fs::read(&p) {
            Ok(b) => ctx.update(&b),
            Err(e) if f == CA_CHAIN_FILE && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(CaError::Read { path: p, source }),
        }
        ctx.update(b"\0");
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
}

pub use isthmus_proto::tls::trust_domain_of_ca;

/// The trust domain of a CA directory: `given` (which must match the certificates' when they
/// name one), else the intermediate's or the root's spiffe:// URI SAN.
fn ca_trust_domain(
    given: Option<&TrustDomain>,
    intermediate_der: &[u8],
    roots: &[rustls::pki_types::CertificateDer<'_>],
    cert_path: &Path,
) -> Result<TrustDomain, CaError> {
    let td_from_cert =
        trust_domain_of_ca(intermediate_der).or_else(|| trust_domain_of_ca(&roots[0]));
    match (given, td_from_cert) {
        (Some(td), Some(c)) if td.as_str() != c => Err(bad(
            cert_path,
            format!("the CA is for trust domain {c}, not {td}"),
        )),
        (Some(td), _) => Ok(td.clone()),
        (None, Some(c)) => TrustDomain::new(&c).map_err(|e| bad(cert_path, e)),
        (None, None) => Err(bad(
            cert_path,
            "no spiffe://<trust-domain> URI SAN; pass --trust-domain",
        )),
    }
}

/// The chain handed out with every leaf: cert-chain.pem without the root, else just the
/// intermediate.
fn chain_pems(
    chain_path: &Path,
    roots: &[rustls::pki_types::CertificateDer<'_>],
    intermediate_der: &[u8],
) -> Result<Vec<String>, CaError> {
    let mut chain_pems = Vec::new();
    if let Ok(bytes) = std::fs::read(chain_path) {
        for c in tls::parse_certs(chain_path, &bytes).map_err(|e| bad(chain_path, e))? {
            if roots.iter().any(|r| r.as_ref() == c.as_ref()) {
                continue;
            }
            chain_pems.push(der_to_pem(&c));
        }
    }
    if chain_pems.is_empty() {
        chain_pems.push(der_to_pem(intermediate_der));
    }
    Ok(chain_pems)
}

impl CaMaterial {
    /// Loads and checks a cluster CA directory: the key matches the intermediate, the
    /// intermediate is signed by the root, and the trust domain is known.
    pub fn load(dir: &Path, trust_domain: Option<&TrustDomain>) -> Result<Self, CaError> {
        use x509_parser::prelude::*;
        let fingerprint = dir_fingerprint(dir)?;
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let root_path = dir.join(ROOT_CERT_FILE);
        let chain_path = dir.join(CA_CHAIN_FILE);
        let cert_pem = String::from_utf8(read(&cert_path)?).map_err(|e| bad(&cert_path, e))?;
        let key_pem = String::from_utf8(read(&key_path)?).map_err(|e| bad(&key_path, e))?;
        let root_pem = String::from_utf8(read(&root_path)?).map_err(|e| bad(&root_path, e))?;
        let inter =
            tls::parse_certs(&cert_path, cert_pem.as_bytes()).map_err(|e| bad(&cert_path, e))?;
        let roots =
            tls::parse_certs(&root_path, root_pem.as_bytes()).map_err(|e| bad(&root_path, e))?;
        let intermediate_der = inter[0].clone().into_owned();
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| bad(&key_path, format!("not a usable private key: {e}")))?;

        let (_, icert) =
            X509Certificate::from_der(&intermediate_der).map_err(|e| bad(&cert_path, e))?;
        let public_key = icert.public_key().subject_public_key.data.to_vec();
        if public_key != key.public_key_raw() {
            return Err(bad(
                &key_path,
                format!(
                    "this key does not belong to the certificate in {}",
                    cert_path.display()
                ),
            ));
        }
        if !icert.is_ca() {
            return Err(bad(
                &cert_path,
                "not a CA certificate (basicConstraints CA:FALSE)",
            ));
        }
        let (_, rcert) = X509Certificate::from_der(&roots[0]).map_err(|e| bad(&root_path, e))?;
        if icert.verify_signature(Some(rcert.public_key())).is_err()
            && intermediate_der.as_ref() != roots[0].as_ref()
        {
            return Err(bad(
                &cert_path,
                format!("not signed by the root in {}", root_path.display()),
            ));
        }
        let trust_domain = ca_trust_domain(trust_domain, &intermediate_der, &roots, &cert_path)?;
        let chain_pems = chain_pems(&chain_path, &roots, &intermediate_der)?;
        let key_id =
            hex::encode(&ring::digest::digest(&ring::digest::SHA256, &public_key).as_ref()[..8]);
        let not_after = icert.validity().not_after.to_datetime();
        Ok(Self {
            trust_domain,
            root_pem,
            chain_pems,
            intermediate_der,
            key,
            public_key,
            key_id,
            not_after,
            fingerprint,
        })
    }

    pub fn root_der(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        tls::parse_certs(Path::new(ROOT_CERT_FILE), self.root_pem.as_bytes()).unwrap_or_default()
    }

    pub fn key(&self) -> &KeyPair {
        &self.key
    }

    /// Signs a leaf for `identity` with the public key of `csr_pem`, after checking that the
    /// CSR asks for exactly that identity and nothing else.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<Vec<String>, CaError> {
        // The key type first: a key the CA does not sign (RSA, Ed25519, another curve) is
        // named as such, not reported as whatever its signature check then says.
        if let Some(other) = csr_key_other_than_p256(csr_pem) {
            return Err(CaError::CsrKeyType(other));
        }
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        check_csr_sans(&csr.params.subject_alt_names, identity)?;
        if csr.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::CsrKeyType("not ECDSA P-256".into()));
        }
        self.sign_public_key(&csr.public_key, identity, ttl, now)
    }

    fn sign_public_key(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        identity: &SpiffeId,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<Vec<String>, CaError> {
        let validity = certs::LeafValidity::issued(now, ttl, self.not_after);
        let params = certs::leaf_params(identity, validity, random_serial())
            .map_err(|e| CaError::Sign(e.to_string()))?;
        self.sign_params(&params, public_key)
    }

    /// Signs `params` for `public_key` with the intermediate: the chain in PEM, the leaf
    /// first, then the intermediates up to (not including) the root. Leaves other than the
    /// mesh's SPIFFE ones (the webhook's serving certificate) bring their own `params`.
    pub fn sign_params(
        &self,
        params: &rcgen::CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<Vec<String>, CaError> {
        let sign_err = |e: rcgen::Error| CaError::Sign(e.to_string());
        let issuer =
            rcgen::Issuer::from_ca_cert_der(&self.intermediate_der, &self.key).map_err(sign_err)?;
        let leaf = params.signed_by(public_key, &issuer).map_err(sign_err)?;
        let mut chain = vec![leaf.pem()];
        chain.extend(self.chain_pems.iter().cloned());
        Ok(chain)
    }

    /// A key and certificate for the registry's own identity (its serving certificate).
    pub fn self_credentials(
        &self,
        identity: &SpiffeId,
        ttl: Duration,
        now: OffsetDateTime,
    ) -> Result<tls::Credentials, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let chain = self.sign_public_key(&key, identity, ttl, now)?;
        tls::Credentials::from_pem(&chain.concat(), &key.serialize_pem())
            .map_err(|e| CaError::Sign(e.to_string()))
    }
}

/// A random positive 128-bit serial number (RFC 5280 asks for at most 20 octets, positive).
pub(crate) fn random_serial() -> rcgen::SerialNumber {
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f;
    rcgen::SerialNumber::from_slice(&serial)
}

pub fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ascii"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn check_csr_sans(sans: &[SanType], identity: &SpiffeId) -> Result<(), CaError> {
    let describe = || {
        if sans.is_empty() {
            return "none".to_string();
        }
        sans.iter()
            .map(|s| match s {
                SanType::URI(u) => format!("URI {}", u.as_str()),
                SanType::DnsName(d) => format!("DNS {}", d.as_str()),
                SanType::IpAddress(ip) => format!("IP {ip}"),
                SanType::Rfc822Name(e) => format!("email {}", e.as_str()),
                other => format!("{other:?}"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    match sans {
        [SanType::URI(u)] if u.as_str() == identity.as_str() => Ok(()),
        [SanType::URI(u)] => Err(CaError::IdentityMismatch {
            requested: u.as_str().to_string(),
            caller: identity.to_string(),
        }),
        _ => Err(CaError::CsrSans {
            expected: identity.to_string(),
            found: describe(),
        }),
    }
}

/// What the CSR's key is when it can be read and is not ECDSA P-256 (e.g. "an RSA 1024-bit
/// key"); `None` for P-256 or a CSR that does not parse (the signature check says why).
fn csr_key_other_than_p256(csr_pem: &str) -> Option<String> {
    use x509_parser::prelude::*;
    use x509_parser::public_key::PublicKey;
    let (_, pem) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes()).ok()?;
    let (_, csr) = X509CertificationRequest::from_der(&pem.contents).ok()?;
    let spki = &csr.certification_request_info.subject_pki;
    match spki.parsed().ok()? {
        PublicKey::RSA(rsa) => Some(format!("an RSA {}-bit key", rsa.key_size())),
        PublicKey::EC(_) => {
            let p256 = x509_parser::oid_registry::OID_EC_P256;
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            match curve {
                Some(c) if c == p256 => None,
                Some(c) => Some(format!("an EC key on curve {c}")),
                None => Some("an EC key without a named curve".into()),
            }
        }
        PublicKey::DSA(_) => Some("a DSA key".into()),
        PublicKey::GostR3410(_) | PublicKey::GostR3410_2012(_) => Some("a GOST key".into()),
        PublicKey::Unknown(_) => Some(format!("a key of algorithm {}", spki.algorithm.algorithm)),
    }
}

/// The identity a CSR asks for, when it asks for exactly one URI SAN.
pub fn csr_identity(csr_pem: &str) -> Result<SpiffeId, CaError> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| CaError::BadCsr(e.to_string()))?;
    match csr.params.subject_alt_names.as_slice() {
        [SanType::URI(u)] => {
            SpiffeId::parse(u.as_str()).map_err(|e| CaError::BadCsr(e.to_string()))
        }
        other => Err(CaError::CsrSans {
            expected: "spiffe://<trust-domain>/ns/<ns>/sa/<sa>".into(),
            found: format!("{} SANs", other.len()),
        }),
    }
}

/// The CA of this registry's cluster, reloaded from disk when its files change.
#[derive(Debug)]
pub struct Authority {
    dir: PathBuf,
    trust_domain: Option<TrustDomain>,
    current: watch::Sender<Arc<CaMaterial>>,
}

impl Authority {
    pub fn load(dir: &Path, trust_domain: Option<TrustDomain>) -> Result<Self, CaError> {
        let material = CaMaterial::load(dir, trust_domain.as_ref())?;
        let (current, _) = watch::channel(Arc::new(material));
        Ok(Self {
            dir: dir.to_path_buf(),
            trust_domain,
            current,
        })
    }

    pub fn current(&self) -> Arc<CaMaterial> {
        self.current.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<CaMaterial>> {
        self.current.subscribe()
    }

    pub fn trust_domain(&self) -> TrustDomain {
        self.current().trust_domain.clone()
    }

    /// Reloads when the files changed and the new set is valid. A broken set leaves the
    /// current material in force and returns the error.
    pub fn reload_if_changed(&self) -> Result<bool, CaError> {
        let fp = dir_fingerprint(&self.dir)?;
        if fp == self.current.borrow().fingerprint {
            return Ok(false);
        }
        let material = CaMaterial::load(&self.dir, self.trust_domain.as_ref())?;
        tracing::info!(dir = %self.dir.display(), key_id = %material.key_id, "CA intermediate reloaded");
        self.current.send_replace(Arc::new(material));
        Ok(true)
    }

    /// Polls the CA directory until `shutdown`.
    pub async fn watch_files(
        self: Arc<Self>,
        interval: Duration,
        metrics: metrics::CaMetrics,
        shutdown: isthmus_proto::drain::Watch,
    ) {
        let stop = shutdown.signaled();
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error: Option<String> = None;
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => {}
            }
            let this = self.clone();
            let res = tokio::task::spawn_blocking(move || this.reload_if_changed()).await;
            match res {
                Ok(Ok(true)) => {
                    metrics
                        .reloads
                        .get_or_create(&metrics::ResultLabels { result: "ok" })
                        .inc();
                    last_error = None;
                }
                Ok(Ok(false)) => last_error = None,
                Ok(Err(e)) => {
                    let msg = e.to_string();
                    if last_error.as_deref() != Some(&msg) {
                        tracing::error!(error = %msg, "CA files changed but cannot be loaded; still signing with the previous intermediate");
                        metrics
                            .reloads
                            .get_or_create(&metrics::ResultLabels { result: "error" })
                            .inc();
                    }
                    last_error = Some(msg);
                }
                Err(e) => tracing::error!(error = %e, "CA reload task failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests;
