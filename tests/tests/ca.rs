//! The mesh CA end to end: certificates issued over gRPC, used in real mTLS handshakes
//! built with the workspace's TLS builders; token rules; intermediate rotation.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use isthmus_proto::certs;
use isthmus_proto::identity::SpiffeId;
use isthmus_proto::test_pki::TestCa;
use isthmus_proto::tls::{self, ClientAuth, Credentials, ServerIdentity, TrustBundle};
use isthmus_registry::ca::token;
use isthmus_tests::{eventually, metric, TestRegistry, TRUST_DOMAIN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// An echo server with the workspace builders; it answers with the client's identity.
async fn identity_echo_server(creds: Credentials, bundle: TrustBundle) -> std::net::SocketAddr {
    let cfg = Arc::new(tls::server_config(&creds, &bundle, ClientAuth::Required, &[]).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg.clone());
            tokio::spawn(async move {
                if let Ok(mut tls_stream) = acceptor.accept(tcp).await {
                    let peer = tls::peer_identity(tls_stream.get_ref().1.peer_certificates())
                        .map(|i| i.to_string())
                        .unwrap_or_default();
                    let _ = tls_stream.write_all(peer.as_bytes()).await;
                    let _ = tls_stream.shutdown().await;
                }
            });
        }
    });
    addr
}

/// Connects with `creds`, expecting the server to be `expected`; returns what the server saw.
async fn call(
    addr: std::net::SocketAddr,
    creds: &Credentials,
    bundle: &TrustBundle,
    expected: &SpiffeId,
) -> Result<String, String> {
    let cfg = tls::client_config(
        Some(creds),
        bundle,
        ServerIdentity::OneOf(vec![expected.clone()]),
        &[],
    )
    .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut s = connector
        .connect("workload.mesh".try_into().unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .await
        .map_err(|e| e.to_string())?;
    if out.is_empty() {
        return Err("server closed the connection without answering (handshake refused)".into());
    }
    Ok(out)
}

#[tokio::test]
async fn issued_certificates_work_in_a_real_mtls_handshake() {
    let reg = TestRegistry::start(&[]).await.unwrap();
    let server_creds = reg.credentials("shop", "reviews").await.unwrap();
    let client_creds = reg.credentials("shop", "web").await.unwrap();
    let bundle = reg.bundle();
    let addr = identity_echo_server(server_creds.clone(), bundle.clone()).await;

    let seen = call(addr, &client_creds, &bundle, &server_creds.identity)
        .await
        .unwrap();
    assert_eq!(
        seen, "spiffe://cluster.local/ns/shop/sa/web",
        "the server sees the client's SPIFFE identity"
    );

    // The client refuses a server that is not the identity it expects.
    let err = call(
        addr,
        &client_creds,
        &bundle,
        &id("spiffe://cluster.local/ns/shop/sa/ratings"),
    )
    .await
    .unwrap_err();
    assert!(err.contains("not one of the expected identities"), "{err}");

    // A peer from another trust domain (its own root) is refused by the server.
    let evil = TestCa::with_intermediate("evil.example");
    let evil_id = id("spiffe://evil.example/ns/shop/sa/web");
    let evil_creds = evil.leaf(&evil_id);
    assert!(call(addr, &evil_creds, &bundle, &server_creds.identity)
        .await
        .is_err());

    // Even a bundle that trusts both roots refuses an identity outside its trust domain.
    let mut roots = bundle.roots().to_vec();
    roots.push(evil.root());
    let both = TrustBundle::new(roots, TRUST_DOMAIN, &[]).unwrap();
    let err = both
        .verify_peer(
            &evil_creds.chain[0],
            &evil_creds.chain[1..],
            tls::PeerUsage::Client,
            rustls::pki_types::UnixTime::now(),
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("outside the trust domain"),
        "{err}"
    );

    // An expired certificate from our own CA is refused.
    let web = id("spiffe://cluster.local/ns/shop/sa/web");
    let (key, csr) = certs::generate_key_and_csr(&web).unwrap();
    let past = ::time::OffsetDateTime::now_utc() - Duration::from_secs(3 * 86400);
    let chain = reg
        .material()
        .sign_csr(&csr, &web, Duration::from_secs(3600), past)
        .unwrap();
    let expired = Credentials::from_pem(&chain.concat(), &key).unwrap();
    assert!(expired.leaf_validity().unwrap().0 < 0);
    assert!(call(addr, &expired, &bundle, &server_creds.identity)
        .await
        .is_err());
    let err = bundle
        .verify_peer(
            &expired.chain[0],
            &expired.chain[1..],
            tls::PeerUsage::Client,
            rustls::pki_types::UnixTime::now(),
        )
        .unwrap_err();
    assert!(format!("{err:?}").contains("Expired"), "{err:?}");
}

async fn request(
    reg: &TestRegistry,
    token: Option<String>,
    identity: SpiffeId,
    creds: Option<Credentials>,
) -> Result<Credentials, certs::CertsError> {
    let (key, csr) = certs::generate_key_and_csr(&identity).unwrap();
    let ch = reg.channel(creds.as_ref()).await.unwrap();
    certs::request_certificate(ch, csr, token, 0)
        .await
        .map(|issued| Credentials::from_pem(&issued.chain_pems.concat(), &key).unwrap())
}

#[tokio::test]
async fn token_rules_over_grpc_including_reuse_after_restart() {
    let mut reg = TestRegistry::start(&[]).await.unwrap();
    let web = id("spiffe://cluster.local/ns/shop/sa/web");
    let tok = reg.token("shop", "web", Duration::from_secs(600));
    // A CSR for another identity than the token's is refused, naming both.
    let err = request(
        &reg,
        Some(tok.clone()),
        id("spiffe://cluster.local/ns/shop/sa/admin"),
        None,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("PermissionDenied") && err.contains("sa/web") && err.contains("sa/admin"),
        "{err}"
    );

    let first = request(&reg, Some(tok.clone()), web.clone(), None)
        .await
        .unwrap();
    assert_eq!(first.identity, web);
    let err = request(&reg, Some(tok.clone()), web.clone(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("already been used"), "{err}");

    // Still refused after a restart: redeemed tokens live in the store.
    reg.restart().await.unwrap();
    let err = request(&reg, Some(tok.clone()), web.clone(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("already been used"), "{err}");

    // An expired token.
    let old = token::create(
        &reg.material(),
        "cluster-a",
        "shop",
        "web",
        Duration::from_secs(60),
        ::time::OffsetDateTime::now_utc() - Duration::from_secs(120),
    )
    .unwrap();
    let err = request(&reg, Some(old), web.clone(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("expired"), "{err}");

    // Renewal with the current certificate, no token.
    let renewed = request(&reg, None, web.clone(), Some(first.clone()))
        .await
        .unwrap();
    assert_eq!(renewed.identity, web);
    assert_ne!(renewed.chain[0], first.chain[0]);
    // ...but not for someone else's identity.
    let err = request(
        &reg,
        None,
        id("spiffe://cluster.local/ns/shop/sa/admin"),
        Some(first),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("PermissionDenied"), "{err}");
    // No token and no certificate.
    let err = request(&reg, None, web.clone(), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("Unauthenticated"), "{err}");

    let m = reg.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"isthmus_ca_certificates_refused_total{reason="token_expired"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"isthmus_ca_certificates_refused_total{reason="token_reused"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"isthmus_ca_certificates_issued_total{auth="renewal"}"#
        ),
        Some(1.0),
        "{m}"
    );
    reg.stop().await;
}

#[tokio::test]
async fn replaced_intermediate_signs_the_next_certificate_without_restart() {
    let mut reg = TestRegistry::start(&[]).await.unwrap();
    let before = reg.credentials("shop", "web").await.unwrap();
    let old_key_id = reg.material().key_id;
    isthmus_tests::init_ca(
        &reg.dir.path().join("ca"),
        TRUST_DOMAIN,
        isthmus_tests::CLUSTER,
        true,
    );
    let new_material = reg.material();
    assert_ne!(new_material.key_id, old_key_id);
    let authority = reg.handle().authority.clone();
    eventually(Duration::from_secs(10), || {
        let a = authority.clone();
        let want = new_material.key_id.clone();
        async move { (a.current().key_id == want).then_some(()) }
    })
    .await
    .expect("the registry reloads the intermediate");

    let after = reg.credentials("shop", "web").await.unwrap();
    let new_inter = tls::parse_certs(
        Path::new("ca-cert.pem"),
        new_material.chain_pems[0].as_bytes(),
    )
    .unwrap();
    assert_eq!(
        after.chain[1], new_inter[0],
        "the new leaf chains to the new intermediate"
    );
    assert_ne!(before.chain[1], after.chain[1]);
    // Both verify against the unchanged root.
    let bundle = reg.bundle();
    for c in [&before, &after] {
        bundle
            .verify_peer(
                &c.chain[0],
                &c.chain[1..],
                tls::PeerUsage::Client,
                rustls::pki_types::UnixTime::now(),
            )
            .unwrap();
    }
    let m = reg.metrics().await;
    assert_eq!(
        metric(&m, r#"isthmus_ca_reloads_total{result="ok"}"#),
        Some(1.0),
        "{m}"
    );
    reg.stop().await;
}
