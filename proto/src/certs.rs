//! Workload certificate plumbing shared by every program that holds a mesh identity: key and
//! CSR generation, the credential directory on disk, the call to the registry's CA, and the
//! one profile of a mesh leaf certificate ([`leaf_params`]) that the CA signs and the test
//! PKI copies by calling it, so the two cannot drift apart.

use std::path::Path;
use std::time::Duration;

use time::OffsetDateTime;

use crate::identity::SpiffeId;
use crate::pb;
use crate::tls::{CERT_CHAIN_FILE, KEY_FILE, ROOT_CERT_FILE};

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("cannot generate a key or CSR: {0}")]
    Generate(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA refused the request: {0}")]
    Refused(String),
    #[error("the CA returned an empty certificate chain")]
    EmptyChain,
    #[error(transparent)]
    Token(#[from] crate::token::TokenFormatError),
    #[error("the bootstrap token expired at {at} (unix seconds); ask for a new one (`isthmusctl token create`)")]
    TokenExpired { at: i64 },
    #[error("cannot reach the registry's CA: {0}")]
    Connect(String),
}

/// A fresh ECDSA P-256 key and a CSR for `id` (its only SAN), both PEM.
pub fn generate_key_and_csr(id: &SpiffeId) -> Result<(String, String), CertsError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CertsError::Generate(e.to_string()))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from(id.as_str())
            .map_err(|e| CertsError::Generate(e.to_string()))?,
    )];
    let csr = params
        .serialize_request(&key)
        .map_err(|e| CertsError::Generate(e.to_string()))?;
    let csr_pem = csr.pem().map_err(|e| CertsError::Generate(e.to_string()))?;
    Ok((key.serialize_pem(), csr_pem))
}

/// Leaves start this far in the past so that a peer with a slightly slow clock accepts them.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

/// When a leaf certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafValidity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl LeafValidity {
    /// A leaf issued at `now` for `ttl`: valid from [`CLOCK_SKEW_ALLOWANCE`] before `now`,
    /// and never past `issuer_not_after` (a leaf never outlives the CA that signed it).
    pub fn issued(now: OffsetDateTime, ttl: Duration, issuer_not_after: OffsetDateTime) -> Self {
        Self {
            not_before: now - CLOCK_SKEW_ALLOWANCE,
            not_after: (now + ttl).min(issuer_not_after),
        }
    }
}

/// The profile of every mesh leaf certificate: an empty subject, exactly one SAN (the URI
/// `identity`), not a CA, digital signature and key encipherment, usable by both ends of a
/// TLS connection (server and client auth), the issuer's key named (authority key id),
/// valid for `validity`, with `serial`.
pub fn leaf_params(
    identity: &SpiffeId,
    validity: LeafValidity,
    serial: rcgen::SerialNumber,
) -> Result<rcgen::CertificateParams, rcgen::Error> {
    use rcgen::{ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType};
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(rcgen::string::Ia5String::try_from(
        identity.as_str(),
    )?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.serial_number = Some(serial);
    Ok(params)
}

/// The profile of every mesh CA certificate (the root and the per-cluster intermediates):
/// subject `O=<trust domain>, CN=<common_name>`, the URI SAN `spiffe://<trust domain>`, a CA
/// with `constraints`, allowed to sign certificates and CRLs, valid for `validity`, with
/// `serial`.
pub fn ca_params(
    trust_domain: &str,
    common_name: String,
    constraints: rcgen::BasicConstraints,
    validity: LeafValidity,
    serial: rcgen::SerialNumber,
) -> Result<rcgen::CertificateParams, rcgen::Error> {
    use rcgen::{DnType, IsCa, KeyUsagePurpose, SanType};
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![SanType::URI(rcgen::string::Ia5String::try_from(format!(
        "spiffe://{trust_domain}"
    ))?)];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.serial_number = Some(serial);
    Ok(params)
}

/// Writes `key.pem` (0600), `cert-chain.pem` and `root-cert.pem` into `dir`, each file
/// replaced atomically so a reader never sees a half-written credential.
pub fn write_credentials(
    dir: &Path,
    key_pem: &str,
    chain_pems: &[String],
    root_pem: &str,
) -> Result<(), CertsError> {
    std::fs::create_dir_all(dir).map_err(|source| CertsError::Write {
        path: dir.display().to_string(),
        source,
    })?;
    write_atomic(&dir.join(KEY_FILE), key_pem.as_bytes(), 0o600)?;
    write_atomic(
        &dir.join(CERT_CHAIN_FILE),
        chain_pems.concat().as_bytes(),
        0o644,
    )?;
    write_atomic(&dir.join(ROOT_CERT_FILE), root_pem.as_bytes(), 0o644)?;
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file and a rename, with `mode` set before
/// any content is written (a key is never readable by others, not even briefly).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertsError> {
    use std::io::Write;
    let err = |source| CertsError::Write {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    let mut f = opts.open(&tmp).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(err)?;
    }
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(())
}

/// What the CA returned.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    pub chain_pems: Vec<String>,
    pub root_pem: String,
}

/// Asks the registry's CA to sign `csr_pem`, authenticated by `token` (first certificate) or
/// by the client certificate of `channel`'s TLS session (renewal).
pub async fn request_certificate(
    channel: tonic::transport::Channel,
    csr_pem: String,
    token: Option<String>,
    ttl_seconds: u64,
) -> Result<IssuedCertificate, CertsError> {
    let req = pb::CertificateRequest {
        csr_pem,
        bootstrap_token: token.unwrap_or_default(),
        ttl_seconds,
        ..Default::default()
    };
    send_certificate_request(channel, req).await
}

/// Sends one request as it is: the other forms of authentication (a pod's service-account
/// token) fill in their own fields.
pub async fn send_certificate_request(
    channel: tonic::transport::Channel,
    req: pb::CertificateRequest,
) -> Result<IssuedCertificate, CertsError> {
    let mut client = pb::certificates_client::CertificatesClient::new(channel);
    let resp = client
        .create_certificate(req)
        .await
        .map_err(|s| match crate::tls::failure::cause_in(&s) {
            // TLS 1.3 reports a refused client certificate at the first request.
            Some(cause) => CertsError::Connect(format!("TLS handshake failed: {cause}")),
            None => CertsError::Refused(format!("{:?}: {}", s.code(), s.message())),
        })?
        .into_inner();
    if resp.cert_chain_pem.is_empty() {
        return Err(CertsError::EmptyChain);
    }
    Ok(IssuedCertificate {
        chain_pems: resp.cert_chain_pem,
        root_pem: resp.root_cert_pem,
    })
}

/// First enrolment: exchanges a bootstrap token for a certificate of the identity the token
/// names and writes the credentials into `dir`. An expired or malformed token is refused
/// here, before anything is sent.
pub async fn enroll(
    registry: &crate::subscription::RegistrySettings,
    token: &str,
    dir: &Path,
) -> Result<crate::tls::Credentials, CertsError> {
    let claims = crate::token::parse(token)?.claims;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    if now >= claims.exp {
        return Err(CertsError::TokenExpired { at: claims.exp });
    }
    let id = claims
        .identity()
        .map_err(crate::token::TokenFormatError::from)?;
    let req = pb::CertificateRequest {
        bootstrap_token: token.trim().to_string(),
        ..Default::default()
    };
    obtain(registry, None, &id, req, dir).await
}

/// A certificate of `identity` for a new key: connects to the registry (presenting
/// `client`, for a renewal, or nothing), sends `req` (which says how the caller
/// authenticates) with the CSR, and keeps the key and chain in `dir`.
pub async fn obtain(
    registry: &crate::subscription::RegistrySettings,
    client: Option<&crate::tls::Credentials>,
    identity: &crate::identity::SpiffeId,
    req: pb::CertificateRequest,
    dir: &Path,
) -> Result<crate::tls::Credentials, CertsError> {
    let channel = registry
        .connect(client)
        .await
        .map_err(|e| CertsError::Connect(e.to_string()))?;
    let (key_pem, csr_pem) = generate_key_and_csr(identity)?;
    let issued =
        send_certificate_request(channel, pb::CertificateRequest { csr_pem, ..req }).await?;
    write_credentials(dir, &key_pem, &issued.chain_pems, &issued.root_pem)?;
    crate::tls::Credentials::from_dir(dir).map_err(|e| CertsError::Generate(e.to_string()))
}
