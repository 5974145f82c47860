use std::sync::Arc;
use std::time::Duration;

use ::time::OffsetDateTime;
use isthmus_proto::identity::{SpiffeId, TrustDomain};
use isthmus_proto::pb;
use isthmus_proto::tls::{self, Credentials};

use super::init::{init, InitOptions};
use super::metrics::CaMetrics;
use super::service::{CaPolicy, CertificateService};
use super::token;
use super::*;
use crate::store::EmbeddedStore;

pub(crate) fn make_ca(dir: &Path, td: &str, clusters: &[&str]) -> PathBuf {
    init(
        &InitOptions {
            trust_domain: TrustDomain::new(td).unwrap(),
            clusters: clusters.iter().map(|c| c.to_string()).collect(),
            out: dir.to_path_buf(),
            rotate: false,
        },
        OffsetDateTime::now_utc(),
    )
    .unwrap();
    dir.join(clusters[0])
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

#[test]
fn init_writes_the_cacerts_layout_with_private_keys_0600() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let c1 = make_ca(tmp.path(), "mesh.test", &["c1", "c2"]);
    for f in [CA_CERT_FILE, CA_KEY_FILE, CA_CHAIN_FILE, ROOT_CERT_FILE] {
        assert!(c1.join(f).exists(), "{f}");
        assert!(tmp.path().join("c2").join(f).exists(), "{f}");
    }
    let mode = std::fs::metadata(c1.join(CA_KEY_FILE))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let mode = std::fs::metadata(tmp.path().join(ROOT_KEY_FILE))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let m = CaMaterial::load(&c1, None).unwrap();
    assert_eq!(m.trust_domain.as_str(), "mesh.test");
    // A second init without --rotate refuses to overwrite.
    let again = init(
        &InitOptions {
            trust_domain: TrustDomain::new("mesh.test").unwrap(),
            clusters: vec!["c1".into()],
            out: tmp.path().to_path_buf(),
            rotate: false,
        },
        OffsetDateTime::now_utc(),
    );
    assert!(matches!(again, Err(init::InitError::Exists(_))));
}

#[test]
fn leaf_has_one_uri_san_and_chains_to_the_root() {
    use x509_parser::prelude::*;
    let tmp = tempfile::tempdir().unwrap();
    let c1 = make_ca(tmp.path(), "mesh.test", &["c1"]);
    let m = CaMaterial::load(&c1, None).unwrap();
    let ident = id("spiffe://mesh.test/ns/shop/sa/web");
    let (key, csr) = isthmus_proto::certs::generate_key_and_csr(&ident).unwrap();
    let chain = m
        .sign_csr(&csr, &ident, DEFAULT_LEAF_TTL, OffsetDateTime::now_utc())
        .unwrap();
    let creds = Credentials::from_pem(&chain.concat(), &key).unwrap();
    assert_eq!(creds.identity, ident);
    let (_, leaf) = X509Certificate::from_der(&creds.chain[0]).unwrap();
    let sans = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(sans.value.general_names.len(), 1);
    assert!(!leaf.is_ca());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert_eq!(
        life as u64,
        DEFAULT_LEAF_TTL.as_secs() + CLOCK_SKEW_ALLOWANCE.as_secs()
    );
    let bundle = tls::TrustBundle::new(m.root_der(), "mesh.test", &[]).unwrap();
    let got = bundle
        .verify_peer(
            &creds.chain[0],
            &creds.chain[1..],
            tls::PeerUsage::Client,
            rustls::pki_types::UnixTime::now(),
        )
        .unwrap();
    assert_eq!(got, ident);
}

/// An RSA 1024-bit CSR for `spiffe://mesh.test/ns/shop/sa/web` (openssl req -newkey rsa:1024).
const RSA_1024_CSR: &str = "-----BEGIN CERTIFICATE REQUEST-----\nMIIBfjCB6AIBADAAMIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQC4N+PpZ2Q6\ndGY3j6ombCKKccTeuxNClBJoxYfel2Tb0vyAv4fFBcmIxjBcl7R15/11k1zhDHBH\n9vLIhCc6xqTE2Ab1QWAW0r4MBRMEY52kQBYOwbIpdtZu7uximtZvJkKltvx0Nvbs\nzvRp6hxCCd9oTpvjc+VofcNhGjnw2DgFmQIDAQABoD8wPQYJKoZIhvcNAQkOMTAw\nLjAsBgNVHREEJTAjhiFzcGlmZmU6Ly9tZXNoLnRlc3QvbnMvc2hvcC9zYS93ZWIw\nDQYJKoZIhvcNAQELBQADgYEAdl/grYr3FWRlAOz62BjY4oz51brQCiVTeZYRzM9i\nO7wEXIUtPk7hlOzyFVJFE+0Rm/pnkE11jbPTzRhn7Q/69UljaXlijKs7/kicUO6O\nHULe/kB8gfadv4yNpEzNPakUkSuHUb+pftowyfc582KiGGFi6xS3HKc44D4iDvHk\nNVc=\n-----END CERTIFICATE REQUEST-----\n";

#[test]
fn a_csr_key_the_ca_does_not_sign_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let c1 = make_ca(tmp.path(), "mesh.test", &["c1"]);
    let m = CaMaterial::load(&c1, None).unwrap();
    let ident = id("spiffe://mesh.test/ns/shop/sa/web");
    let now = OffsetDateTime::now_utc();
    let err = m
        .sign_csr(RSA_1024_CSR, &ident, DEFAULT_LEAF_TTL, now)
        .unwrap_err();
    assert_eq!(err.reason(), "csr_key_type", "{err}");
    assert!(err.to_string().contains("an RSA 1024-bit key"), "{err}");
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(
        rcgen::string::Ia5String::try_from(ident.as_str()).unwrap(),
    )];
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();
    let err = m.sign_csr(&csr, &ident, DEFAULT_LEAF_TTL, now).unwrap_err();
    assert_eq!(err.reason(), "csr_key_type", "{err}");
    assert!(
        err.to_string().contains("1.3.101.112"),
        "Ed25519 named by its OID: {err}"
    );
}

#[test]
fn csr_with_extra_or_foreign_sans_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let c1 = make_ca(tmp.path(), "mesh.test", &["c1"]);
    let m = CaMaterial::load(&c1, None).unwrap();
    let ident = id("spiffe://mesh.test/ns/shop/sa/web");
    // Extra DNS SAN.
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["evil.example.com".to_string()]).unwrap();
    p.subject_alt_names.push(SanType::URI(
        rcgen::string::Ia5String::try_from(ident.as_str()).unwrap(),
    ));
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();
    let err = m
        .sign_csr(&csr, &ident, DEFAULT_LEAF_TTL, OffsetDateTime::now_utc())
        .unwrap_err();
    assert_eq!(err.reason(), "csr_sans", "{err}");
    assert!(err.to_string().contains("DNS evil.example.com"), "{err}");
    // Someone else's identity.
    let (_, other_csr) = isthmus_proto::certs::generate_key_and_csr(&id(
        "spiffe://mesh.test/ns/kube-system/sa/admin",
    ))
    .unwrap();
    let err = m
        .sign_csr(
            &other_csr,
            &ident,
            DEFAULT_LEAF_TTL,
            OffsetDateTime::now_utc(),
        )
        .unwrap_err();
    assert_eq!(err.reason(), "identity_mismatch", "{err}");
    // Garbage.
    let err = m
        .sign_csr(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            &ident,
            DEFAULT_LEAF_TTL,
            OffsetDateTime::now_utc(),
        )
        .unwrap_err();
    assert_eq!(err.reason(), "csr_invalid");
}

#[test]
fn tokens_verify_and_refuse_tampering_expiry_and_foreign_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let c1 = make_ca(tmp.path(), "mesh.test", &["c1", "c2"]);
    let m1 = CaMaterial::load(&c1, None).unwrap();
    let m2 = CaMaterial::load(&tmp.path().join("c2"), None).unwrap();
    let now = OffsetDateTime::now_utc();
    let t = token::create(&m1, "c1", "shop", "web", Duration::from_secs(3600), now).unwrap();
    let claims = token::verify(&m1, &t, now).unwrap();
    assert_eq!(
        claims.identity().unwrap().as_str(),
        "spiffe://mesh.test/ns/shop/sa/web"
    );
    // A lifetime under a second would be expired when printed: refused, named.
    for ttl in [Duration::ZERO, Duration::from_millis(500)] {
        let err = token::create(&m1, "c1", "shop", "web", ttl, now).unwrap_err();
        assert!(err.to_string().contains("below the minimum of 1s"), "{err}");
    }
    // Expired.
    let err = token::verify(&m1, &t, now + Duration::from_secs(3601)).unwrap_err();
    assert_eq!(err.reason(), "token_expired");
    // Another cluster's intermediate.
    let err = token::verify(&m2, &t, now).unwrap_err();
    assert_eq!(err.reason(), "token_foreign_key", "{err}");
    // Tampered claims (ask for another service account with the same signature).
    let parts: Vec<&str> = t.split('.').collect();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut c: serde_json::Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    c["sa"] = "admin".into();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(serde_json::to_vec(&c).unwrap()),
        parts[2]
    );
    assert_eq!(
        token::verify(&m1, &forged, now).unwrap_err().reason(),
        "token_signature"
    );
    for junk in ["", "ist1", "ist1.a.b", "jwt.x.y", "ist1.e30.AAAA.extra"] {
        assert_eq!(
            token::verify(&m1, junk, now).unwrap_err().reason(),
            "token_malformed",
            "{junk:?}"
        );
    }
    assert!(token::create(
        &m1,
        "c1",
        "shop",
        "web",
        Duration::from_secs(2 * 86400),
        now
    )
    .is_err());
}

async fn service(dir: &Path, store_dir: &Path) -> CertificateService {
    let authority = Arc::new(Authority::load(dir, None).unwrap());
    let store = Arc::new(EmbeddedStore::open(store_dir).unwrap());
    CertificateService::new(authority, store, CaPolicy::default(), CaMetrics::default())
}

#[tokio::test]
async fn token_is_single_use_even_across_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let c1 = make_ca(tmp.path(), "mesh.test", &["c1"]);
    let ident = id("spiffe://mesh.test/ns/shop/sa/web");
    let tok = token::create(
        &CaMaterial::load(&c1, None).unwrap(),
        "c1",
        "shop",
        "web",
        Duration::from_secs(600),
        OffsetDateTime::now_utc(),
    )
    .unwrap();
    let req = |csr: String| pb::CertificateRequest {
        csr_pem: csr,
        bootstrap_token: tok.clone(),
        ttl_seconds: 0,
        ..Default::default()
    };
    {
        let svc = service(&c1, data.path()).await;
        let (_, csr) = isthmus_proto::certs::generate_key_and_csr(&ident).unwrap();
        svc.issue(req(csr.clone()), None).await.unwrap();
        let err = svc.issue(req(csr), None).await.unwrap_err();
        assert_eq!(err.reason(), "token_reused");
    }
    // A new registry process on the same data dir.
    let svc = service(&c1, data.path()).await;
    let (_, csr) = isthmus_proto::certs::generate_key_and_csr(&ident).unwrap();
    let err = svc.issue(req(csr), None).await.unwrap_err();
    assert_eq!(err.reason(), "token_reused");
    assert!(err.to_string().contains("already been used"));
}

#[tokio::test]
async fn expired_redemptions_are_forgotten_and_live_ones_kept() {
    let data = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(data.path()).unwrap();
    let now = OffsetDateTime::now_utc();
    let t = now.unix_timestamp();
    use crate::store::{Store, Table};
    store
        .put(
            Table::RedeemedTokens,
            "old",
            (t - 10).to_string().into_bytes(),
        )
        .await
        .unwrap();
    store
        .put(
            Table::RedeemedTokens,
            "live",
            (t + 600).to_string().into_bytes(),
        )
        .await
        .unwrap();
    store
        .put(Table::RedeemedTokens, "junk", b"x".to_vec())
        .await
        .unwrap();
    assert_eq!(token::forget_expired(&store, now).await.unwrap(), 2);
    let left: Vec<String> = store
        .list(Table::RedeemedTokens)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(left, vec!["live".to_string()]);
}

#[tokio::test]
async fn token_scope_renewal_and_ttl_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let c1 = make_ca(tmp.path(), "mesh.test", &["c1"]);
    let svc = service(&c1, data.path()).await;
    let m = CaMaterial::load(&c1, None).unwrap();
    let web = id("spiffe://mesh.test/ns/shop/sa/web");
    let admin = id("spiffe://mesh.test/ns/shop/sa/admin");
    let tok = token::create(
        &m,
        "c1",
        "shop",
        "web",
        Duration::from_secs(600),
        OffsetDateTime::now_utc(),
    )
    .unwrap();
    // A CSR for another identity than the token's: refused, and the token is not spent.
    let (_, csr_admin) = isthmus_proto::certs::generate_key_and_csr(&admin).unwrap();
    let err = svc
        .issue(
            pb::CertificateRequest {
                csr_pem: csr_admin.clone(),
                bootstrap_token: tok.clone(),
                ttl_seconds: 0,
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "token_scope");
    let (_, csr_web) = isthmus_proto::certs::generate_key_and_csr(&web).unwrap();
    // TTL above the maximum.
    let err = svc
        .issue(
            pb::CertificateRequest {
                csr_pem: csr_web.clone(),
                bootstrap_token: tok.clone(),
                ttl_seconds: 30 * 86400,
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "ttl_too_long");
    assert!(err.to_string().contains("maximum"));
    svc.issue(
        pb::CertificateRequest {
            csr_pem: csr_web.clone(),
            bootstrap_token: tok,
            ttl_seconds: 0,
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap();
    // Renewal: the caller's certificate identity stands in for a token.
    svc.issue(
        pb::CertificateRequest {
            csr_pem: csr_web.clone(),
            bootstrap_token: String::new(),
            ttl_seconds: 0,
            ..Default::default()
        },
        Some(&web),
    )
    .await
    .unwrap();
    let err = svc
        .issue(
            pb::CertificateRequest {
                csr_pem: csr_admin,
                bootstrap_token: String::new(),
                ttl_seconds: 0,
                ..Default::default()
            },
            Some(&web),
        )
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "identity_mismatch");
    let err = svc
        .issue(
            pb::CertificateRequest {
                csr_pem: csr_web,
                bootstrap_token: String::new(),
                ttl_seconds: 0,
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "unauthenticated");
}

#[test]
fn replaced_intermediate_is_picked_up_and_old_leaves_keep_verifying() {
    use x509_parser::prelude::*;
    let tmp = tempfile::tempdir().unwrap();
    let c1 = make_ca(tmp.path(), "mesh.test", &["c1"]);
    let authority = Authority::load(&c1, None).unwrap();
    let ident = id("spiffe://mesh.test/ns/shop/sa/web");
    let (_, csr) = isthmus_proto::certs::generate_key_and_csr(&ident).unwrap();
    let old = authority.current();
    let old_leaf = old
        .sign_csr(&csr, &ident, DEFAULT_LEAF_TTL, OffsetDateTime::now_utc())
        .unwrap();
    assert!(
        !authority.reload_if_changed().unwrap(),
        "nothing changed yet"
    );
    init(
        &InitOptions {
            trust_domain: TrustDomain::new("mesh.test").unwrap(),
            clusters: vec!["c1".into()],
            out: tmp.path().to_path_buf(),
            rotate: true,
        },
        OffsetDateTime::now_utc(),
    )
    .unwrap();
    assert!(authority.reload_if_changed().unwrap());
    let new = authority.current();
    assert_ne!(old.key_id, new.key_id);
    let new_leaf = new
        .sign_csr(&csr, &ident, DEFAULT_LEAF_TTL, OffsetDateTime::now_utc())
        .unwrap();
    // The new leaf is signed by the new intermediate, the old one is not.
    let parse = |pem: &str| {
        tls::parse_certs(Path::new("x"), pem.as_bytes())
            .unwrap()
            .remove(0)
    };
    let new_inter = parse(&new.chain_pems[0]);
    let (_, new_inter) = X509Certificate::from_der(&new_inter).unwrap();
    let (new_der, old_der) = (parse(&new_leaf[0]), parse(&old_leaf[0]));
    let (_, new_x) = X509Certificate::from_der(&new_der).unwrap();
    let (_, old_x) = X509Certificate::from_der(&old_der).unwrap();
    assert!(new_x.verify_signature(Some(new_inter.public_key())).is_ok());
    assert!(old_x
        .verify_signature(Some(new_inter.public_key()))
        .is_err());
    let bundle = tls::TrustBundle::new(new.root_der(), "mesh.test", &[]).unwrap();
    for chain in [&old_leaf, &new_leaf] {
        let ders = tls::parse_certs(Path::new("x"), chain.concat().as_bytes()).unwrap();
        bundle
            .verify_peer(
                &ders[0],
                &ders[1..],
                tls::PeerUsage::Server,
                rustls::pki_types::UnixTime::now(),
            )
            .unwrap();
    }
    // A broken replacement (key of another cert) is refused and the current one stays.
    std::fs::copy(tmp.path().join(ROOT_KEY_FILE), c1.join(CA_KEY_FILE)).unwrap();
    assert!(authority.reload_if_changed().is_err());
    assert_eq!(authority.current().key_id, new.key_id);
}
