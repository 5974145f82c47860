//! The one test PKI of the workspace: a root CA for a trust domain (optionally with an
//! intermediate under it, as the mesh CA issues from) and mesh leaves for SPIFFE identities,
//! for any crate's tests without a running registry. Leaves are built with the CA's own
//! profile ([`certs::leaf_params`]), so a test certificate is shaped exactly like an issued
//! one and the two cannot drift apart.
//!
//! Certificates are deterministic in everything but their keys and signatures: subjects,
//! serial numbers (counted from 1 in each [`TestCa`]) and validity ([`test_validity`], or
//! what the caller asks for) never depend on the clock or a random source. Each [`TestCa`]
//! has fresh keys, so two CAs of the same trust domain are two different roots (an
//! impostor CA for a test is just a second `TestCa::new`).
//!
//! Built for this crate's own tests, and for other crates' tests through the `test-pki`
//! feature (`isthmus-proto = { workspace = true, features = ["test-pki"] }` under
//! `[dev-dependencies]`).

use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, KeyPair};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::certs::{self, LeafValidity};
use crate::identity::SpiffeId;
use crate::tls::{Credentials, TrustBundle};

/// The validity of every test certificate unless a test asks otherwise: a fixed window that
/// holds now and for as long as these tests will run (rcgen's own default window).
pub fn test_validity() -> LeafValidity {
    LeafValidity {
        not_before: rcgen::date_time_ymd(1975, 1, 1),
        not_after: rcgen::date_time_ymd(4096, 1, 1),
    }
}

/// Serial number `n`, minimally encoded (a DER INTEGER, positive).
fn serial_number(n: u64) -> rcgen::SerialNumber {
    let bytes = n.to_be_bytes();
    let first = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len() - 1);
    let mut out = Vec::with_capacity(9);
    if bytes[first] & 0x80 != 0 {
        out.push(0);
    }
    out.extend_from_slice(&bytes[first..]);
    rcgen::SerialNumber::from(out)
}

fn new_key() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key generation")
}

/// A root CA for a trust domain, with an optional intermediate that then signs the leaves.
pub struct TestCa {
    trust_domain: String,
    root: CertifiedIssuer<'static, KeyPair>,
    intermediate: Option<CertifiedIssuer<'static, KeyPair>>,
    next_serial: AtomicU64,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("trust_domain", &self.trust_domain)
            .field("intermediate", &self.intermediate.is_some())
            .finish_non_exhaustive()
    }
}

impl TestCa {
    /// A root CA whose certificate carries the `spiffe://TD` URI SAN; it signs leaves itself.
    pub fn new(trust_domain: &str) -> Self {
        let serial = AtomicU64::new(1);
        let params = ca_params(
            trust_domain,
            format!("test root CA {trust_domain}"),
            BasicConstraints::Unconstrained,
            &serial,
        );
        Self {
            trust_domain: trust_domain.to_string(),
            root: CertifiedIssuer::self_signed(params, new_key()).expect("self-signed root"),
            intermediate: None,
            next_serial: serial,
        }
    }

    /// A root and one intermediate under it (the mesh CA's layout): leaves are signed by the
    /// intermediate and their chain carries it.
    pub fn with_intermediate(trust_domain: &str) -> Self {
        let mut ca = Self::new(trust_domain);
        let mut params = ca_params(
            trust_domain,
            format!("test intermediate CA {trust_domain}"),
            BasicConstraints::Constrained(0),
            &ca.next_serial,
        );
        params.use_authority_key_identifier_extension = true;
        ca.intermediate =
            Some(CertifiedIssuer::signed_by(params, new_key(), &ca.root).expect("intermediate"));
        ca
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn root(&self) -> CertificateDer<'static> {
        self.root.der().clone()
    }

    /// The root as PEM (a `root-cert.pem`).
    pub fn root_pem(&self) -> String {
        self.root.pem()
    }

    /// The intermediate, when this CA has one.
    pub fn intermediate(&self) -> Option<CertificateDer<'static>> {
        self.intermediate.as_ref().map(|i| i.der().clone())
    }

    /// A bundle trusting this CA for its own trust domain only.
    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::new(vec![self.root()], &self.trust_domain, &[]).expect("test bundle")
    }

    /// The identity `spiffe://TD/ns/NS/sa/SA` in this CA's trust domain.
    pub fn id(&self, ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://{}/ns/{ns}/sa/{sa}", self.trust_domain))
            .expect("a test identity")
    }

    /// A leaf for `spiffe://TD/ns/NS/sa/SA`.
    pub fn workload(&self, ns: &str, sa: &str) -> Credentials {
        self.leaf(&self.id(ns, sa))
    }

    /// A leaf whose only SAN is `id` (which may be outside this CA's trust domain).
    pub fn leaf(&self, id: &SpiffeId) -> Credentials {
        self.leaf_valid(id, test_validity())
    }

    /// A leaf for `id` valid for `validity` (e.g. one that has expired).
    pub fn leaf_valid(&self, id: &SpiffeId, validity: LeafValidity) -> Credentials {
        let (chain_pem, key_pem) = self.leaf_pem(id, validity);
        let creds = Credentials::from_pem(&chain_pem, &key_pem).expect("test leaf credentials");
        assert_eq!(&creds.identity, id);
        creds
    }

    /// A leaf for `id` as PEM: (certificate chain without the root, private key).
    pub fn leaf_pem(&self, id: &SpiffeId, validity: LeafValidity) -> (String, String) {
        let key = new_key();
        let params = certs::leaf_params(id, validity, self.serial()).expect("leaf profile");
        let issuer = self.intermediate.as_ref().unwrap_or(&self.root);
        let cert = params.signed_by(&key, issuer).expect("signing a test leaf");
        let mut chain = cert.pem();
        if let Some(i) = &self.intermediate {
            chain.push_str(&i.pem());
        }
        (chain, key.serialize_pem())
    }

    /// Writes a leaf for `id` into `dir` the way an enrolled program keeps it (`key.pem`,
    /// `cert-chain.pem`, `root-cert.pem`).
    pub fn write_credentials(
        &self,
        dir: &std::path::Path,
        id: &SpiffeId,
    ) -> Result<(), certs::CertsError> {
        let (chain, key) = self.leaf_pem(id, test_validity());
        certs::write_credentials(dir, &key, &[chain], &self.root_pem())
    }

    fn serial(&self) -> rcgen::SerialNumber {
        serial_number(self.next_serial.fetch_add(1, Ordering::Relaxed))
    }
}

/// A CA certificate for `trust_domain` (the mesh's CA profile) with the next serial of
/// `serial`.
fn ca_params(
    trust_domain: &str,
    common_name: String,
    constraints: BasicConstraints,
    serial: &AtomicU64,
) -> CertificateParams {
    certs::ca_params(
        trust_domain,
        common_name,
        constraints,
        test_validity(),
        serial_number(serial.fetch_add(1, Ordering::Relaxed)),
    )
    .expect("a trust domain is IA5")
}

/// An expired validity window ending `ago` before `now`, for tests of refusal.
pub fn expired(now: OffsetDateTime, ago: std::time::Duration) -> LeafValidity {
    LeafValidity {
        not_before: now - ago * 2,
        not_after: now - ago,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::PeerUsage;
    use rustls_pki_types::UnixTime;

    #[test]
    fn leaves_verify_under_their_own_root_only() {
        for ca in [
            TestCa::new("mesh.test"),
            TestCa::with_intermediate("mesh.test"),
        ] {
            let web = ca.workload("shop", "web");
            let got = ca
                .bundle()
                .verify_peer(
                    &web.chain[0],
                    &web.chain[1..],
                    PeerUsage::Client,
                    UnixTime::now(),
                )
                .unwrap();
            assert_eq!(got, ca.id("shop", "web"));
            assert_eq!(
                web.chain.len(),
                1 + usize::from(ca.intermediate().is_some())
            );
            // A second CA of the same trust domain is a different root.
            let impostor = TestCa::new("mesh.test").workload("shop", "web");
            assert!(ca
                .bundle()
                .verify_peer(
                    &impostor.chain[0],
                    &impostor.chain[1..],
                    PeerUsage::Client,
                    UnixTime::now(),
                )
                .is_err());
        }
    }

    #[test]
    fn leaves_have_the_ca_profile_and_counted_serials() {
        use x509_parser::prelude::*;
        let ca = TestCa::with_intermediate("mesh.test");
        let a = ca.workload("shop", "web");
        let b = ca.workload("shop", "web");
        let (_, x) = X509Certificate::from_der(&a.chain[0]).unwrap();
        let (_, y) = X509Certificate::from_der(&b.chain[0]).unwrap();
        // Root 1, intermediate 2, then the leaves.
        assert_eq!(x.raw_serial(), &[3u8]);
        assert_eq!(y.raw_serial(), &[4u8]);
        assert!(!x.is_ca());
        let sans = x.subject_alternative_name().unwrap().unwrap();
        assert_eq!(sans.value.general_names.len(), 1);
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert_eq!(
            x.validity().not_before.timestamp(),
            test_validity().not_before.unix_timestamp()
        );
    }

    #[test]
    fn an_expired_leaf_is_refused() {
        let ca = TestCa::new("mesh.test");
        let now = OffsetDateTime::now_utc();
        let old = ca.leaf_valid(
            &ca.id("shop", "web"),
            expired(now, std::time::Duration::from_secs(3600)),
        );
        assert!(old.leaf_validity().unwrap().0 < 0);
        let err = ca
            .bundle()
            .verify_peer(
                &old.chain[0],
                &old.chain[1..],
                PeerUsage::Client,
                UnixTime::now(),
            )
            .unwrap_err();
        assert!(format!("{err:?}").contains("Expired"), "{err:?}");
    }
}
