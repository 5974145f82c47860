//! The workspace's only rustls configuration builders, with a SPIFFE verifier on both sides
//! (and, in [`probe_client`], the readiness probes' client that verifies nothing).
//!
//! Mesh certificates carry exactly one URI SAN (`spiffe://TD/ns/NS/sa/SA`) and no DNS names,
//! so WebPKI's hostname check does not apply: the chain is verified against the trust bundle
//! with `rustls-webpki`, then the peer's single URI SAN is parsed and checked against the
//! trust domain (servers) or the expected identities (clients).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{IdentityError, SpiffeId};

pub mod failure;
mod probe_client;
pub use failure::IdentityRefusal;
pub use probe_client::probe_client_config;

/// File names of a credential directory (also Istio's `cacerts`/`certs` layout).
pub const KEY_FILE: &str = "key.pem";
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// The ALPN protocol for gRPC over TLS.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    BadPem { path: PathBuf, why: String },
    #[error("certificate has no URI SAN with a SPIFFE ID")]
    NoSpiffeId,
    #[error("certificate has {0} URI SANs; a mesh certificate has exactly one")]
    ManyUriSans(usize),
    #[error("certificate is not valid X.509: {0}")]
    BadCertificate(String),
    #[error("certificate URI SAN is not a valid SPIFFE ID: {0}")]
    BadSpiffeId(#[from] IdentityError),
    #[error("the trust bundle is empty")]
    EmptyBundle,
    #[error("trust anchor is not usable: {0}")]
    BadAnchor(String),
    #[error("rustls refused the configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The CA certificates a peer's chain must lead to, and the trust domains accepted.
#[derive(Clone)]
pub struct TrustBundle {
    anchors: Arc<Vec<TrustAnchor<'static>>>,
    roots_der: Arc<Vec<CertificateDer<'static>>>,
    trust_domains: Arc<Vec<String>>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.roots_der.len())
            .field("trust_domains", &self.trust_domains)
            .finish()
    }
}

impl TrustBundle {
    /// `roots` are trusted for identities in `trust_domain` and in each alias.
    pub fn new(
        roots: Vec<CertificateDer<'static>>,
        trust_domain: &str,
        aliases: &[String],
    ) -> Result<Self, TlsError> {
        if roots.is_empty() {
            return Err(TlsError::EmptyBundle);
        }
        let anchors = roots
            .iter()
            .map(|c| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| TlsError::BadAnchor(format!("{e:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut trust_domains = vec![trust_domain.to_string()];
        trust_domains.extend(aliases.iter().cloned());
        Ok(Self {
            anchors: Arc::new(anchors),
            roots_der: Arc::new(roots),
            trust_domains: Arc::new(trust_domains),
        })
    }

    pub fn from_pem_file(path: &Path, trust_domain: &str) -> Result<Self, TlsError> {
        Self::new(read_certs(path)?, trust_domain, &[])
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domains[0]
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots_der
    }

    fn accepts_domain(&self, td: &str) -> bool {
        self.trust_domains.iter().any(|d| d == td)
    }

    /// Verifies `end_entity` (with `intermediates`) for `usage` at `now` and returns the
    /// peer's SPIFFE ID after checking its trust domain.
    pub fn verify_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        usage: PeerUsage,
        now: UnixTime,
    ) -> Result<SpiffeId, rustls::Error> {
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        let algs = provider().signature_verification_algorithms;
        let usage = match usage {
            PeerUsage::Client => webpki::KeyUsage::client_auth(),
            PeerUsage::Server => webpki::KeyUsage::server_auth(),
        };
        ee.verify_for_usage(
            algs.all,
            &self.anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(pki_error)?;
        let id = spiffe_id_of(end_entity)
            .map_err(|e| IdentityRefusal::NoIdentity(e.to_string()).into_rustls())?;
        if !self.accepts_domain(id.trust_domain()) {
            return Err(IdentityRefusal::TrustDomain {
                peer: id.to_string(),
                peer_domain: id.trust_domain().to_string(),
                ours: self.trust_domain().to_string(),
                aliases: self.trust_domains[1..].to_vec(),
            }
            .into_rustls());
        }
        Ok(id)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerUsage {
    Client,
    Server,
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use rustls::CertificateError as C;
    let ce = match e {
        // The times ride along: the refusal names the dates and the clock skew.
        webpki::Error::CertExpired { time, not_after } => C::ExpiredContext { time, not_after },
        webpki::Error::CertNotValidYet { time, not_before } => {
            C::NotValidYetContext { time, not_before }
        }
        webpki::Error::UnknownIssuer => C::UnknownIssuer,
        webpki::Error::CertRevoked => C::Revoked,
        webpki::Error::InvalidSignatureForPublicKey => C::BadSignature,
        webpki::Error::RequiredEkuNotFoundContext(_) => C::Other(rustls::OtherError(Arc::new(
            PlainError("required extended key usage not found".into()),
        ))),
        other => C::Other(rustls::OtherError(Arc::new(PlainError(format!(
            "{other:?}"
        ))))),
    };
    rustls::Error::InvalidCertificate(ce)
}

#[derive(Debug)]
struct PlainError(String);
impl fmt::Display for PlainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for PlainError {}

/// The single SPIFFE ID in a certificate's URI SANs.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, TlsError> {
    use x509_parser::prelude::*;
    let (_, x509) =
        X509Certificate::from_der(cert).map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                uris.push(u.to_string());
            }
        }
    }
    match uris.len() {
        0 => Err(TlsError::NoSpiffeId),
        1 => Ok(SpiffeId::parse(&uris[0])?),
        n => Err(TlsError::ManyUriSans(n)),
    }
}

/// The process-wide crypto provider: ring's, with `TLS13_AES_128_GCM_SHA256` preferred.
///
/// ring's default order puts `TLS13_AES_256_GCM_SHA384` first. Its key schedule (every HKDF
/// and HMAC of a handshake, the transcript hash) runs on SHA-384, which no x86 CPU
/// accelerates, where SHA-256 has the SHA extensions on current AMD and Intel server CPUs;
/// and AES-256 takes 14 rounds per block to AES-128's 10. AES-128-GCM gives 128-bit security,
/// as the P-256 and X25519 key exchanges do; it is TLS 1.3's mandatory suite, and Go and
/// BoringSSL prefer it wherever AES is in hardware. Every suite stays enabled: a peer that
/// prefers another (a server honours the client's order) still gets it.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = rustls::crypto::ring::default_provider();
            p.cipher_suites
                .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
            Arc::new(p)
        })
        .clone()
}

fn sig_algs() -> WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

/// A workload's certificate chain and key.
#[derive(Clone)]
pub struct Credentials {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
    pub identity: SpiffeId,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .finish()
    }
}

impl Credentials {
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        let leaf = chain.first().ok_or(TlsError::NoSpiffeId)?;
        let identity = spiffe_id_of(leaf)?;
        Ok(Self {
            chain,
            key: Arc::new(key),
            identity,
        })
    }

    /// Loads `key.pem` and `cert-chain.pem` from a credential directory.
    pub fn from_dir(dir: &Path) -> Result<Self, TlsError> {
        let chain = read_certs(&dir.join(CERT_CHAIN_FILE))?;
        let key = read_key(&dir.join(KEY_FILE))?;
        Self::new(chain, key)
    }

    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let src = Path::new("<memory>");
        Self::new(
            parse_certs(src, chain_pem.as_bytes())?,
            parse_key(src, key_pem.as_bytes())?,
        )
    }

    /// Seconds until the leaf expires (negative once expired), and its full lifetime.
    pub fn leaf_validity(&self) -> Result<(i64, i64), TlsError> {
        use x509_parser::prelude::*;
        let (_, x509) = X509Certificate::from_der(&self.chain[0])
            .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
        let nb = x509.validity().not_before.timestamp();
        let na = x509.validity().not_after.timestamp();
        let now = ::time::OffsetDateTime::now_utc().unix_timestamp();
        Ok((na - now, na - nb))
    }
}

/// The `spiffe://TD` URI SAN a CA certificate carries, if any.
pub fn trust_domain_of_ca(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::*;
    let (_, x) = X509Certificate::from_der(der).ok()?;
    let san = x.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => u
            .strip_prefix("spiffe://")
            .filter(|td| !td.contains('/'))
            .map(str::to_string),
        _ => None,
    })
}

pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_certs(path, &bytes)
}

pub fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::BadPem {
            path: path.to_path_buf(),
            why: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_key(path, &bytes)
}

pub fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::BadPem {
        path: path.to_path_buf(),
        why: match e {
            pem::Error::NoItemsFound => "no PRIVATE KEY block found".into(),
            e => e.to_string(),
        },
    })
}

/// Whether a server requires a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// mTLS: a handshake without a valid mesh certificate fails.
    Required,
    /// A client may present no certificate (e.g. a bootstrap-token CSR); one that is
    /// presented must still verify.
    Optional,
}

/// A rustls server config presenting `creds` and verifying clients against `bundle`.
pub fn server_config(
    creds: &Credentials,
    bundle: &TrustBundle,
    auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    let verifier = Arc::new(SpiffeClientVerifier {
        bundle: bundle.clone(),
        optional: auth == ClientAuth::Optional,
        subjects: Vec::new(),
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// What a client accepts as the server's identity.
#[derive(Debug, Clone)]
pub enum ServerIdentity {
    /// Any identity in the bundle's trust domains (e.g. the registry).
    TrustDomain,
    /// One of these identities exactly.
    OneOf(Vec<SpiffeId>),
}

/// A rustls client config verifying the server against `bundle` and `expected`, and
/// presenting `creds` when given.
pub fn client_config(
    creds: Option<&Credentials>,
    bundle: &TrustBundle,
    expected: ServerIdentity,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    let verifier = Arc::new(SpiffeServerVerifier {
        bundle: bundle.clone(),
        expected,
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match creds {
        Some(c) => builder.with_client_auth_cert(c.chain.clone(), c.key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

#[derive(Debug)]
struct SpiffeClientVerifier {
    bundle: TrustBundle,
    optional: bool,
    subjects: Vec<DistinguishedName>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        !self.optional
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.subjects
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.bundle
            .verify_peer(end_entity, intermediates, PeerUsage::Client, now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &sig_algs())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &sig_algs())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        sig_algs().supported_schemes()
    }
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    bundle: TrustBundle,
    expected: ServerIdentity,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self
            .bundle
            .verify_peer(end_entity, intermediates, PeerUsage::Server, now)?;
        if let ServerIdentity::OneOf(ids) = &self.expected {
            if !ids.contains(&id) {
                return Err(IdentityRefusal::NotAllowed {
                    peer: id.to_string(),
                    allowed: ids
                        .iter()
                        .map(|i| i.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                }
                .into_rustls());
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &sig_algs())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &sig_algs())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        sig_algs().supported_schemes()
    }
}

/// The verified SPIFFE ID of the peer of an established connection.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    certs
        .and_then(|c| c.first())
        .and_then(|leaf| spiffe_id_of(leaf).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_pki::{test_validity, TestCa};

    /// Our two ends agree on AES-128-GCM with SHA-256; a client that prefers AES-256 (as
    /// ztunnel's order does) still gets it.
    #[test]
    fn mesh_ends_prefer_aes_128_gcm_and_a_peer_preferring_another_suite_gets_it() {
        use rustls::{CipherSuite, ClientConnection, ServerConnection};
        let ca = TestCa::new("cluster.local");
        let (server_id, client_id) = (ca.id("shop", "reviews"), ca.id("shop", "web"));
        let server = Arc::new(
            server_config(
                &ca.leaf(&server_id),
                &ca.bundle(),
                ClientAuth::Required,
                &[],
            )
            .unwrap(),
        );
        let negotiated = |client: rustls::ClientConfig| {
            let name = rustls::pki_types::ServerName::try_from("reviews.shop").unwrap();
            let mut c = ClientConnection::new(Arc::new(client), name).unwrap();
            let mut s = ServerConnection::new(server.clone()).unwrap();
            while c.is_handshaking() || s.is_handshaking() {
                let mut wire = Vec::new();
                c.write_tls(&mut wire).unwrap();
                s.read_tls(&mut wire.as_slice()).unwrap();
                s.process_new_packets().unwrap();
                wire.clear();
                s.write_tls(&mut wire).unwrap();
                c.read_tls(&mut wire.as_slice()).unwrap();
                c.process_new_packets().unwrap();
            }
            c.negotiated_cipher_suite().unwrap().suite()
        };
        let ours = || {
            client_config(
                Some(&ca.leaf(&client_id)),
                &ca.bundle(),
                ServerIdentity::OneOf(vec![server_id.clone()]),
                &[],
            )
            .unwrap()
        };
        assert_eq!(negotiated(ours()), CipherSuite::TLS13_AES_128_GCM_SHA256);

        let mut aes256_first = (*provider()).clone();
        aes256_first
            .cipher_suites
            .sort_by_key(|s| s.suite() != CipherSuite::TLS13_AES_256_GCM_SHA384);
        let verifier = Arc::new(SpiffeServerVerifier {
            bundle: ca.bundle(),
            expected: ServerIdentity::OneOf(vec![server_id.clone()]),
        });
        let creds = ca.leaf(&client_id);
        let theirs = rustls::ClientConfig::builder_with_provider(Arc::new(aes256_first))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())
            .unwrap();
        assert_eq!(negotiated(theirs), CipherSuite::TLS13_AES_256_GCM_SHA384);
    }

    #[test]
    fn pem_certificates_and_keys_are_read_and_their_absence_named() {
        let ca = TestCa::with_intermediate("cluster.local");
        let (chain, key) = ca.leaf_pem(&ca.id("shop", "web"), test_validity());
        let path = Path::new("cert-chain.pem");
        let certs = parse_certs(path, chain.as_bytes()).unwrap();
        assert_eq!(certs.len(), 2, "leaf and intermediate");
        assert!(parse_key(Path::new("key.pem"), key.as_bytes()).is_ok());
        // A file holding the key before the chain still yields just the certificates.
        let mixed = format!("{key}{chain}");
        assert_eq!(parse_certs(path, mixed.as_bytes()).unwrap().len(), 2);
        let err = parse_certs(path, key.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("no CERTIFICATE block found"), "{err}");
        let err = parse_key(Path::new("key.pem"), chain.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no PRIVATE KEY block found"), "{err}");
        let err = parse_certs(path, b"not pem at all")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cert-chain.pem"), "{err}");
    }
}
