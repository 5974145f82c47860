//! Outbound mTLS on loopback against a server with a test CA's certificate: which server
//! identities the client accepts.

use std::collections::BTreeMap;
use std::time::Duration;

use isthmus_proto::model::{
    Address, EndpointKind, Health, Locality, Service, ServicePort, ServiceView, ViewEndpoint,
    ViewResource,
};
use isthmus_proto::subscription::LocalView;
use isthmus_proto::test_pki::TestCa;
use tokio_rustls::TlsAcceptor;

use super::*;
use crate::routes::RouteOptions;

const HOST: &str = "db.shop.internal";
const PORT: u16 = 5432;

/// A TLS server on loopback presenting `shop/postgres`, accepting connections until dropped.
async fn postgres_server(ca: &TestCa) -> std::net::SocketAddr {
    let config = tls::server_config(
        &ca.workload("shop", "postgres"),
        &ca.bundle(),
        tls::ClientAuth::Required,
        &[],
    )
    .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(tcp).await;
            });
        }
    });
    addr
}

/// The client's route table: the service at `server`, whose endpoint the catalog names as
/// `shop/default` (the account of a ServiceEntry endpoint that names none), with `sans`.
fn routes(ca: &TestCa, server: std::net::SocketAddr, sans: Vec<String>) -> RouteTable {
    let endpoint = ViewEndpoint {
        kind: EndpointKind::Workload,
        address: Address::Ip(server.ip()),
        ports: [(PORT, server.port())].into_iter().collect(),
        network: "network-a".into(),
        cluster: String::new(),
        locality: Locality::default(),
        identities: vec![ca.id("shop", "default")],
        weight: 1,
        health: Health::Healthy,
        labels: Default::default(),
        uid: "db-0".into(),
        tunnel_port: 0,
        stale_since_ms: 0,
        subset_weights: Default::default(),
    };
    let service = Service {
        hostname: HOST.into(),
        namespace: "shop".into(),
        name: "db".into(),
        ports: vec![ServicePort {
            name: "tcp-pg".into(),
            number: PORT,
            protocol: "TCP".into(),
            target_port: 0,
        }],
        subject_alt_names: sans,
        ..Default::default()
    };
    let mut resources = BTreeMap::new();
    resources.insert(
        format!("svc/{HOST}"),
        ViewResource::Service(Arc::new(ServiceView {
            service,
            endpoints: vec![endpoint],
            ..Default::default()
        })),
    );
    let view = LocalView {
        version: "v.1".into(),
        resources,
    };
    RouteTable::build(&view, &RouteTable::default(), &RouteOptions::default())
}

fn outbound(ca: &TestCa, routes: RouteTable) -> Outbound {
    Outbound {
        routes: Arc::new(ArcSwap::from_pointee(routes)),
        tls: Arc::new(ArcSwap::from_pointee(ClientTls::new(
            ca.workload("shop", "web"),
            ca.bundle(),
        ))),
        metrics: Arc::new(Metrics::default()),
        tracker: Tracker::new(),
        connect: ConnectOptions {
            timeout: Duration::from_secs(5),
            attempts: 1,
            mark: None,
        },
        source_labels: Default::default(),
        tunnel: None,
    }
}

fn target() -> OutboundTarget {
    OutboundTarget {
        hostname: HOST.into(),
        port: PORT,
        subset: String::new(),
        sni: None,
    }
}

#[tokio::test]
async fn a_server_is_accepted_under_a_subject_alt_name_of_its_service_and_refused_without() {
    let ca = TestCa::new("cluster.local");
    let server = postgres_server(&ca).await;

    // The endpoint's own identity is shop/default; the server presents shop/postgres.
    let strict = outbound(&ca, routes(&ca, server, Vec::new()));
    let refused = strict
        .connect(&target())
        .await
        .expect_err("a server presenting another identity was accepted");
    assert!(
        refused
            .to_string()
            .contains("server identity spiffe://cluster.local/ns/shop/sa/postgres is not one of the expected identities"),
        "{refused}"
    );

    let sans = vec![ca.id("shop", "postgres").to_string()];
    let with_sans = outbound(&ca, routes(&ca, server, sans));
    let up = with_sans.connect(&target()).await.unwrap();
    assert_eq!(up.server_identity, Some(ca.id("shop", "postgres")));
}
