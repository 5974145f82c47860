//! Bad input to the registry: invalid resource files, junk on the gRPC port, oversized
//! messages. Each is refused with a clear error and counted; nothing is lost and the
//! registry keeps serving.

use std::time::Duration;

use isthmus_proto::model::NodeKind;
use isthmus_proto::pb;
use isthmus_tests::{eventually, host, http_get, metric, node, yaml, TestRegistry, NETWORK};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn resource_errors(reg: &TestRegistry) -> Vec<String> {
    let (_, body) = http_get(reg.admin_addr(), "/debug/resources")
        .await
        .unwrap();
    let doc: Value = serde_json::from_str(&body).unwrap();
    doc["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_string())
        .collect()
}

fn port_of(reg: &TestRegistry, hostname: &str) -> Option<u16> {
    reg.handle()
        .views
        .with_catalog(|c| c.service_defs(hostname).first().map(|s| s.ports[0].number))
}

#[tokio::test]
async fn invalid_resources_are_named_and_the_last_good_state_stays() {
    let reg = TestRegistry::start(&[("reviews.yaml", &yaml::service("reviews", "shop", 9080))])
        .await
        .unwrap();
    assert_eq!(port_of(&reg, &host("reviews", "shop")), Some(9080));

    // An invalid value: the error names the file and the field; the old port stays.
    reg.write_resource("reviews.yaml", &yaml::service("reviews", "shop", 70000));
    let errors = eventually(Duration::from_secs(10), || async {
        Some(resource_errors(&reg).await).filter(|e| !e.is_empty())
    })
    .await
    .expect("error reported");
    assert!(
        errors[0].contains("reviews.yaml")
            && errors[0].contains("spec.ports[0].number")
            && errors[0].contains("70000"),
        "{errors:?}"
    );
    assert_eq!(
        port_of(&reg, &host("reviews", "shop")),
        Some(9080),
        "last good state kept"
    );
    let m = reg.metrics().await;
    assert_eq!(
        metric(&m, r#"isthmus_registry_resource_errors{source="static"}"#),
        Some(1.0),
        "{m}"
    );

    // Broken YAML syntax in another file.
    reg.write_resource(
        "broken.yaml",
        "apiVersion: networking.istio.io/v1\nkind: [unclosed\n",
    );
    let errors = eventually(Duration::from_secs(10), || async {
        Some(resource_errors(&reg).await).filter(|e| e.len() == 2)
    })
    .await
    .expect("both errors reported");
    assert!(
        errors.iter().any(|e| e.contains("broken.yaml")),
        "{errors:?}"
    );

    // Fixing both clears the errors and applies the new value.
    std::fs::remove_file(reg.resources_dir().join("broken.yaml")).unwrap();
    reg.write_resource("reviews.yaml", &yaml::service("reviews", "shop", 9081));
    eventually(Duration::from_secs(10), || async {
        (port_of(&reg, &host("reviews", "shop")) == Some(9081)).then_some(())
    })
    .await
    .expect("fixed file applied");
    eventually(Duration::from_secs(10), || async {
        resource_errors(&reg).await.is_empty().then_some(())
    })
    .await
    .expect("errors cleared");
}

async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // Whatever the server says (a TLS alert), it must then close.
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn junk_on_the_grpc_port_is_closed_counted_and_harmless() {
    let reg = TestRegistry::start(&[("reviews.yaml", &yaml::service("reviews", "shop", 9080))])
        .await
        .unwrap();
    let addr = reg.grpc_addr();

    let mut random = TcpStream::connect(addr).await.unwrap();
    let junk: Vec<u8> = (0..4096).map(|_| rand::random::<u8>()).collect();
    let _ = random.write_all(&junk).await;
    assert!(
        closed_by_server(&mut random).await,
        "random bytes: connection closed"
    );

    let mut http = TcpStream::connect(addr).await.unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: registry\r\n\r\n")
        .await
        .unwrap();
    assert!(
        closed_by_server(&mut http).await,
        "plaintext HTTP: connection closed"
    );

    // A client that sends nothing is closed after the handshake timeout (2s in tests).
    let mut silent = TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_by_server(&mut silent).await,
        "silent client: connection closed"
    );

    let m = reg.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"isthmus_grpc_connections_refused_total{reason="not_tls"}"#
        ),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"isthmus_grpc_connections_refused_total{reason="handshake_timeout"}"#
        ),
        Some(1.0),
        "{m}"
    );

    // Still serving.
    let creds = reg.credentials("shop", "web").await.unwrap();
    let mut sub = reg
        .subscribe(&creds, &node("after", NodeKind::Workload, NETWORK))
        .await
        .unwrap();
    assert!(sub.next().await.unwrap().snapshot);
}

#[tokio::test]
async fn oversized_messages_are_refused() {
    let reg = TestRegistry::start(&[]).await.unwrap();
    let mut client =
        pb::certificates_client::CertificatesClient::new(reg.channel(None).await.unwrap());
    let err = client
        .create_certificate(pb::CertificateRequest {
            csr_pem: "A".repeat(2 * 1024 * 1024),
            bootstrap_token: String::new(),
            ttl_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{err:?}"
    );
    // The same connection and the registry keep working.
    let err = client
        .create_certificate(pb::CertificateRequest {
            csr_pem: "not a csr".into(),
            bootstrap_token: String::new(),
            ttl_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("CSR"), "{err:?}");
    reg.credentials("shop", "web").await.unwrap();
}

#[tokio::test]
async fn a_mixed_file_loads_what_isthmus_reads_and_reports_the_rest_as_ignored() {
    let mixed = format!(
        "{}---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: shop}}\nspec: {{}}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: reviews, namespace: shop}}\nspec: {{}}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: bad, namespace: shop}}\nspec: {{address: \"not an address\"}}\n",
        yaml::service("reviews", "shop", 9080)
    );
    let reg = TestRegistry::start(&[("app.yaml", &mixed)]).await.unwrap();
    // The ServiceEntry loads although the same file holds kinds isthmus does not read and a
    // document it refuses.
    assert_eq!(port_of(&reg, &host("reviews", "shop")), Some(9080));
    let (_, body) = http_get(reg.admin_addr(), "/debug/resources")
        .await
        .unwrap();
    let doc: Value = serde_json::from_str(&body).unwrap();
    let ignored = doc["ignored"].as_array().unwrap();
    assert_eq!(ignored.len(), 2, "{doc:#}");
    assert_eq!(ignored[0]["object"], "Sidecar shop/default", "{doc:#}");
    assert_eq!(ignored[0]["position"], "document 2", "{doc:#}");
    assert!(
        ignored[1]["reason"]
            .as_str()
            .unwrap()
            .contains("Deployment (apps/v1) is not a kind isthmus reads"),
        "{doc:#}"
    );
    let errors = resource_errors(&reg).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("app.yaml (document 4): spec.address"),
        "{errors:?}"
    );
    let m = reg.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"isthmus_registry_ignored_documents{source="static",kind="Sidecar"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"isthmus_registry_ignored_documents{source="static",kind="Deployment"}"#
        ),
        Some(1.0),
        "{m}"
    );
}
