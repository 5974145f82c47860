//! The key material an API server under test is started with, as a real cluster's
//! bootstrap makes it: a CA, a serving certificate it signs for every name the API server
//! answers on, and the service-account signing key (ES256) from which the TokenRequest
//! API mints tokens. [`expired_token`] signs a service-account token that expired, which
//! the API server refuses as a real cluster would.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// The names a pod reaches its API server by, besides loopback.
const SERVICE_NAMES: [&str; 5] = [
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
];

/// An API server's keys and certificates, PEM.
pub(super) struct Pki {
    pub ca_pem: String,
    pub serving_cert_pem: String,
    pub serving_key_pem: String,
    /// PKCS#8, for `--service-account-signing-key-file`.
    pub sa_key_pem: String,
    /// Its public half, for `--service-account-key-file`.
    pub sa_pub_pem: String,
    sa_key_der: Vec<u8>,
}

fn p256() -> anyhow::Result<KeyPair> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

/// A fresh CA named after the cluster, and a serving certificate for `service_ip` (the
/// `kubernetes` Service's ClusterIP), loopback and the in-cluster names.
pub(super) fn generate(cluster: &str, service_ip: std::net::IpAddr) -> anyhow::Result<Pki> {
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, format!("{cluster} test cluster CA"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca, p256()?).context("self-signing the cluster CA")?;

    let mut serving = CertificateParams::default();
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    serving.subject_alt_names = vec![
        SanType::IpAddress([127, 0, 0, 1].into()),
        SanType::IpAddress(service_ip),
    ];
    for name in SERVICE_NAMES {
        serving
            .subject_alt_names
            .push(SanType::DnsName(name.try_into()?));
    }
    serving.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    serving.use_authority_key_identifier_extension = true;
    let serving_key = p256()?;
    let serving_cert = serving
        .signed_by(&serving_key, &ca)
        .context("signing the serving certificate")?;

    let sa_key = p256()?;
    Ok(Pki {
        ca_pem: ca.pem(),
        serving_cert_pem: serving_cert.pem(),
        serving_key_pem: serving_key.serialize_pem(),
        sa_key_pem: sa_key.serialize_pem(),
        sa_pub_pem: sa_key.public_key_pem(),
        sa_key_der: sa_key.serialize_der(),
    })
}

/// What a service-account token names: its issuer, audience and account.
pub(super) struct TokenSubject<'a> {
    pub issuer: &'a str,
    pub audience: &'a str,
    pub namespace: &'a str,
    pub service_account: &'a str,
    pub uid: &'a str,
}

/// A service-account token for `who`, signed with the cluster's key exactly as the
/// TokenRequest API signs one, that expired `ago` ago (TokenRequest itself mints none
/// shorter than ten minutes).
pub(super) fn expired_token(
    pki: &Pki,
    who: &TokenSubject,
    ago: Duration,
) -> anyhow::Result<String> {
    use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    let rng = ring::rand::SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pki.sa_key_der, &rng)
        .map_err(|e| anyhow::anyhow!("the service-account key: {e}"))?;
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)?
        .saturating_sub(ago)
        .as_secs();
    let iat = exp.saturating_sub(3600);
    let header = serde_json::json!({"alg": "ES256", "typ": "JWT"});
    let claims = serde_json::json!({
        "iss": who.issuer,
        "aud": [who.audience],
        "sub": format!("system:serviceaccount:{}:{}", who.namespace, who.service_account),
        "iat": iat,
        "nbf": iat,
        "exp": exp,
        "kubernetes.io": {
            "namespace": who.namespace,
            "serviceaccount": {"name": who.service_account, "uid": who.uid},
        },
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = key
        .sign(&rng, signing_input.as_bytes())
        .map_err(|e| anyhow::anyhow!("signing a token: {e}"))?;
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(sig.as_ref())
    ))
}
