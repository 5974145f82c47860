//! Floods of unauthenticated connections on the registry's gRPC port: silent TCP from one
//! address, from many addresses (more than the pending slots), and clients that complete TLS
//! and then say nothing. Each is closed within a bound and counted by reason, and a real
//! client still gets its certificate and its Watch snapshot meanwhile.
//!
//! Sources are loopback addresses other than 127.0.0.1 (all of 127/8 is local on Linux), so
//! that the real client, on 127.0.0.1, is a different source from the flood.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use isthmus_proto::grpc::DEFAULT_MAX_PENDING_PER_SOURCE;
use isthmus_proto::model::NodeKind;
use isthmus_proto::tls::{self, ServerIdentity};
use isthmus_tests::{metric, node, yaml, TestRegistry, NETWORK};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

/// How long the tests give an unauthenticated client before the registry must have closed
/// it: the configured timeouts (2 s or 10 s here) and slack for a loaded machine.
const CLOSE_BOUND: Duration = Duration::from_secs(20);

async fn connect_from(source: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    socket.connect(to).await
}

/// Whether the server closes `stream` within [`CLOSE_BOUND`] (whatever it says first).
async fn closed_by_server<S: AsyncReadExt + Unpin>(stream: &mut S) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + CLOSE_BOUND;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// A registry whose pending connections time out after `handshake` and then 2 s.
async fn start(handshake: Duration) -> TestRegistry {
    isthmus_proto::limits::raise_fd_limit("registry_flood test");
    TestRegistry::start_with(
        &[("reviews.yaml", &yaml::service("reviews", "shop", 9080))],
        |cfg| {
            cfg.listener.handshake_timeout = handshake;
            cfg.listener.first_request_timeout = Duration::from_secs(2);
        },
    )
    .await
    .unwrap()
}

/// A real client: a certificate for a new workload, then a Watch snapshot with it.
async fn real_client_is_served(reg: &TestRegistry, who: &str) {
    let creds = tokio::time::timeout(CLOSE_BOUND, reg.credentials("shop", who))
        .await
        .expect("the CA answers during the flood")
        .unwrap();
    let mut sub = tokio::time::timeout(
        CLOSE_BOUND,
        reg.subscribe(&creds, &node(who, NodeKind::Workload, NETWORK)),
    )
    .await
    .expect("Watch answers during the flood")
    .unwrap();
    let first = tokio::time::timeout(CLOSE_BOUND, sub.next())
        .await
        .expect("snapshot during the flood")
        .unwrap();
    assert!(first.snapshot);
}

fn refused(m: &str, reason: &str) -> f64 {
    metric(
        m,
        &format!(r#"isthmus_grpc_connections_refused_total{{reason="{reason}"}}"#),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_silent_tcp_flood_from_one_address_is_capped_and_real_clients_are_served() {
    let reg = start(Duration::from_secs(2)).await;
    let addr = reg.grpc_addr();
    // 2,000 silent connections from one address, all held open by the client.
    let flood = Ipv4Addr::new(127, 0, 0, 2);
    let mut held = Vec::new();
    for _ in 0..2000 {
        held.push(connect_from(flood, addr).await.unwrap());
    }
    real_client_is_served(&reg, "during-flood").await;

    // All but the address's pending share were closed at once; the rest after the
    // handshake timeout. Every one of them is closed.
    for (i, s) in held.iter_mut().enumerate() {
        assert!(closed_by_server(s).await, "flood connection {i} still open");
    }
    let m = reg.metrics().await;
    let capped = refused(&m, "too_many_from_source");
    let timed_out = refused(&m, "handshake_timeout");
    assert!(
        capped >= (2000 - DEFAULT_MAX_PENDING_PER_SOURCE) as f64,
        "capped {capped}: {m}"
    );
    assert!(
        capped + timed_out >= 2000.0,
        "capped {capped} + timed out {timed_out}: {m}"
    );
    real_client_is_served(&reg, "after-flood").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_silent_tcp_from_many_addresses_evicts_the_oldest_and_real_clients_are_served() {
    // A handshake timeout longer than opening the flood takes, so that the pending slots
    // fill up rather than time out first.
    let reg = start(Duration::from_secs(10)).await;
    let addr = reg.grpc_addr();
    // 40 addresses x 40 connections: 1,600 pending, above the 1,024 pending slots, below
    // each address's share.
    let mut held = Vec::new();
    for a in 0..40u8 {
        for _ in 0..40 {
            let source = Ipv4Addr::new(127, 0, 1, a + 1);
            held.push(connect_from(source, addr).await.unwrap());
        }
    }
    real_client_is_served(&reg, "during-spread-flood").await;
    for (i, s) in held.iter_mut().enumerate() {
        assert!(closed_by_server(s).await, "flood connection {i} still open");
    }
    let m = reg.metrics().await;
    let evicted = refused(&m, "pending_evicted");
    assert!(evicted >= 1600.0 - 1024.0, "evicted {evicted}: {m}");
    assert!(
        metric(&m, r#"isthmus_listener_at_limit_total{listener="grpc"}"#).unwrap_or(0.0) >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_tls_clients_that_never_send_a_request_are_closed() {
    let reg = start(Duration::from_secs(2)).await;
    let addr = reg.grpc_addr();
    let cfg = tls::client_config(
        None,
        &reg.bundle(),
        ServerIdentity::TrustDomain,
        &[tls::ALPN_H2],
    )
    .unwrap();
    let connector = TlsConnector::from(Arc::new(cfg));
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    // Twenty clients complete TLS without a certificate and say nothing.
    let mut silent = Vec::new();
    for _ in 0..20 {
        let tcp = connect_from(Ipv4Addr::new(127, 0, 0, 3), addr)
            .await
            .unwrap();
        silent.push(connector.connect(name.clone(), tcp).await.unwrap());
    }
    real_client_is_served(&reg, "beside-silent-tls").await;
    for (i, s) in silent.iter_mut().enumerate() {
        assert!(
            closed_by_server(s).await,
            "silent TLS client {i} still open"
        );
    }
    let m = reg.metrics().await;
    assert_eq!(refused(&m, "silent_after_handshake"), 20.0, "{m}");
    // A client that speaks at once is not one of them: the real clients above got through.
    real_client_is_served(&reg, "after-silent-tls").await;
}
