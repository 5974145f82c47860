//! Test certificates: a root CA for a trust domain and mesh leaves signed by it, shaped like
//! the registry's (one `spiffe://` URI SAN, P-256, server and client EKU), without linking
//! the registry.

use isthmus_proto::identity::SpiffeId;
use isthmus_proto::tls::{Credentials, TrustBundle};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;

fn uri_san(uri: &str) -> SanType {
    SanType::URI(rcgen::string::Ia5String::try_from(uri).unwrap())
}

/// A root CA whose certificate carries the `spiffe://TD` URI SAN.
pub(crate) struct TestCa {
    trust_domain: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub(crate) fn new(trust_domain: &str) -> Self {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("test root CA {trust_domain}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![uri_san(&format!("spiffe://{trust_domain}"))];
        Self {
            trust_domain: trust_domain.to_string(),
            issuer: CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    pub(crate) fn root(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A bundle trusting this CA for its own trust domain only.
    pub(crate) fn bundle(&self) -> TrustBundle {
        TrustBundle::new(vec![self.root()], &self.trust_domain, &[]).unwrap()
    }

    /// The identity `spiffe://TD/ns/NS/sa/SA` in this CA's trust domain.
    pub(crate) fn id(&self, ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://{}/ns/{ns}/sa/{sa}", self.trust_domain)).unwrap()
    }

    /// A leaf for `spiffe://TD/ns/NS/sa/SA`.
    pub(crate) fn workload(&self, ns: &str, sa: &str) -> Credentials {
        self.leaf(&self.id(ns, sa))
    }

    /// A leaf whose only SAN is `id` (which may be outside this CA's trust domain).
    pub(crate) fn leaf(&self, id: &SpiffeId) -> Credentials {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![uri_san(id.as_str())];
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
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let creds = Credentials::from_pem(&cert.pem(), &key.serialize_pem()).unwrap();
        assert_eq!(&creds.identity, id);
        creds
    }
}
