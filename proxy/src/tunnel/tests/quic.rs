//! QUIC tunnels on loopback: the race against HTTP/2 as the pool runs it, and the QUIC
//! listener's answers to what is not a proper tunnel (garbage datagrams, strangers, bad
//! stream headers, a flood of Initial packets).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, StatusCode};
use isthmus_proto::test_pki::TestCa;
use isthmus_proto::tls::{self, Credentials};
use quinn::VarInt;
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;

use super::{echo, eventually, only, Scene, STEP};
use crate::authz::AuthorizationPolicy;
use crate::metrics::{RaceLabels, TunnelRole};
use crate::tunnel::pool::{PoolSettings, Transports};
use crate::tunnel::quic;

/// In the parent, `quic::` names the product's QUIC module, which this module's name
/// shadows there: its items are reachable through this module too.
pub(super) use crate::tunnel::quic::*;

/// The transport label of HTTP/2 tunnels.
const HBONE: &str = crate::tunnel::TRANSPORT;

fn races(s: &Scene, winner: &'static str) -> u64 {
    s.client
        .metrics
        .tunnels
        .races
        .get_or_create(&RaceLabels { winner })
        .get()
}

/// A QUIC client config presenting `creds`, trusting the scene's CA, offering `alpn`.
fn quic_client(s: &Scene, creds: &Credentials, alpn: &[&[u8]]) -> quinn::ClientConfig {
    let cfg = tls::client_config(
        Some(creds),
        &s.ca.bundle(),
        tls::ServerIdentity::TrustDomain,
        alpn,
    )
    .unwrap();
    quic::client_config(Arc::new(cfg)).unwrap()
}

/// The config of a proper tunnel client: `shop/ratings`, ALPN [`quic::ALPN_QUIC`].
fn proper_client(s: &Scene) -> quinn::ClientConfig {
    quic_client(s, &s.ca.workload("shop", "ratings"), &[quic::ALPN_QUIC])
}

/// A QUIC connection to `addr` with `config`, from an endpoint of its own (returned too:
/// it outlives the connection).
async fn dial(
    addr: SocketAddr,
    config: quinn::ClientConfig,
) -> (
    quinn::Endpoint,
    Result<quinn::Connection, quinn::ConnectionError>,
) {
    let endpoint = quic::client_endpoint(addr).unwrap();
    let connecting = endpoint
        .connect_with(config, addr, &addr.ip().to_string())
        .unwrap();
    let conn = tokio::time::timeout(STEP, connecting)
        .await
        .expect("the QUIC handshake neither completed nor failed in time");
    (endpoint, conn)
}

/// Waits until a connection that may have looked set up to the client is closed by the
/// server (TLS 1.3: the client may finish before the server has refused its certificate).
async fn closed_by_server(conn: Result<quinn::Connection, quinn::ConnectionError>) {
    if let Ok(conn) = conn {
        let why = tokio::time::timeout(STEP, conn.closed())
            .await
            .expect("the server did not close the connection");
        assert!(
            matches!(why, quinn::ConnectionError::ConnectionClosed(_)),
            "{why:?}"
        );
    }
}

/// Opens a stream, writes `bytes` (finishing the stream when `finish`), and returns how
/// the server answered: the error code it reset the stream with, if it did.
async fn bad_stream(conn: &quinn::Connection, bytes: &[u8], finish: bool) -> Option<VarInt> {
    let (mut send, mut recv) = tokio::time::timeout(STEP, conn.open_bi())
        .await
        .unwrap()
        .unwrap();
    send.write_all(bytes).await.unwrap();
    if finish {
        send.finish().unwrap();
    }
    let mut buf = [0u8; 64];
    let got = tokio::time::timeout(STEP, recv.read(&mut buf))
        .await
        .expect("the server neither answered nor reset the stream");
    match got {
        Err(quinn::ReadError::Reset(code)) => Some(code),
        Ok(None) => None,
        other => panic!("a bad stream header was answered: {other:?}"),
    }
}

/// The destination connection ID of a QUIC long-header packet.
fn initial_dcid(datagram: &[u8]) -> Option<&[u8]> {
    if datagram.len() < 6 || datagram[0] & 0x80 == 0 {
        return None;
    }
    let len = usize::from(datagram[5]);
    datagram.get(6..6 + len)
}

/// `n` client Initial datagrams, each of a connection of its own (its own destination
/// connection ID, so its own handshake at a server), as a proper client sends them.
async fn capture_initials(s: &Scene, n: usize) -> Vec<Vec<u8>> {
    let sink = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let endpoint = quic::client_endpoint(sink_addr).unwrap();
    let config = proper_client(s);
    let mut seen = HashSet::new();
    let mut initials = Vec::with_capacity(n);
    let mut buf = vec![0u8; 65536];
    while initials.len() < n {
        // Each connection's first datagram is its Initial; the connection is dropped once
        // it has been seen (whatever else it sends is a datagram already seen).
        let connecting = endpoint
            .connect_with(config.clone(), sink_addr, "127.0.0.1")
            .unwrap();
        loop {
            let (len, _) = tokio::time::timeout(STEP, sink.recv_from(&mut buf))
                .await
                .expect("no Initial from the client")
                .unwrap();
            let datagram = &buf[..len];
            let Some(dcid) = initial_dcid(datagram) else {
                continue;
            };
            if seen.insert(dcid.to_vec()) {
                assert!(len >= 1200, "a client Initial of {len} bytes");
                initials.push(datagram.to_vec());
                break;
            }
        }
        drop(connecting);
    }
    initials
}

/// A UDP socket for a client that never answers. On 127.0.0.2 where the host has it: a
/// scene takes its UDP port by the number of its TCP one on 127.0.0.1, which a flood of
/// sockets there could hold.
async fn spoofed_client() -> UdpSocket {
    match UdpSocket::bind("127.0.0.2:0").await {
        Ok(socket) => socket,
        Err(_) => UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_takes_quic_where_the_peer_serves_it() {
    let s = Scene::start(AuthorizationPolicy::default(), PoolSettings::default()).await;
    assert!(s.quic);
    let mut open = Vec::new();
    for i in 0..10 {
        let mut up = s.connect().await.unwrap();
        assert_eq!(up.stream.tunnel_transport(), Some(quic::TRANSPORT), "{i}");
        assert_eq!(up.server_identity, Some(s.ca.id("shop", "web")));
        let msg = format!("quic {i}");
        assert_eq!(echo(&mut up.stream, msg.as_bytes()).await, msg.as_bytes());
        open.push(up);
    }
    // One race, won by QUIC; every connection went over its one tunnel.
    assert_eq!(races(&s, quic::TRANSPORT), 1);
    assert_eq!(races(&s, HBONE), 0);
    assert_eq!(
        s.handshakes_on(quic::TRANSPORT, TunnelRole::client, "ok"),
        1
    );
    assert_eq!(
        s.handshakes_on(quic::TRANSPORT, TunnelRole::client, "failed"),
        0
    );
    assert!(eventually(|| s.handshakes_on(quic::TRANSPORT, TunnelRole::server, "ok") == 1).await);
    assert_eq!(s.pool().open_tunnels().await, 1);
    drop(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_takes_http2_where_udp_is_not_served_and_remembers_it() {
    let s = Scene::start_with(
        AuthorizationPolicy::default(),
        PoolSettings::default(),
        false,
    )
    .await;
    let mut first = s.connect().await.unwrap();
    assert_eq!(first.stream.tunnel_transport(), Some(HBONE));
    assert_eq!(echo(&mut first.stream, b"first").await, b"first");
    assert_eq!(races(&s, HBONE), 1);
    assert_eq!(races(&s, quic::TRANSPORT), 0);
    assert_eq!(s.handshakes_on(HBONE, TunnelRole::client, "ok"), 1);
    assert_eq!(s.handshakes_on(HBONE, TunnelRole::client, "failed"), 0);

    // A new tunnel to the same peer is dialled over HTTP/2 alone: no race, no QUIC.
    s.pool().clear();
    let mut second = s.connect().await.unwrap();
    assert_eq!(second.stream.tunnel_transport(), Some(HBONE));
    assert_eq!(echo(&mut second.stream, b"second").await, b"second");
    assert_eq!(races(&s, HBONE), 1);
    assert_eq!(races(&s, quic::TRANSPORT), 0);
    assert_eq!(s.handshakes_on(HBONE, TunnelRole::client, "ok"), 2);
    for result in ["ok", "failed", "timeout"] {
        assert_eq!(
            s.handshakes_on(quic::TRANSPORT, TunnelRole::client, result),
            0,
            "QUIC {result}"
        );
    }
    // No connection fell back to plain mTLS.
    let fallbacks = s.fallbacks(s.tunnel_addr);
    assert_eq!(fallbacks, 0);
    // The first stream still moves bytes over the old tunnel.
    assert_eq!(echo(&mut first.stream, b"after").await, b"after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_on_the_quic_port_is_refused_and_counted_by_reason() {
    let s = Scene::start(AuthorizationPolicy::default(), only(Transports::Quic)).await;
    let failed = || s.handshakes_on(quic::TRANSPORT, TunnelRole::server, "failed");
    let accepted = || s.handshakes_on(quic::TRANSPORT, TunnelRole::server, "ok");

    // (a) Garbage datagrams: random bytes of a full Initial's size, and datagrams too small
    // to be a packet. None of them is a connection attempt the server can tell apart from
    // noise without a key: each is dropped (or answered statelessly).
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut rng = rand::thread_rng();
    for _ in 0..100 {
        let mut d = vec![0u8; 1200];
        rng.fill_bytes(&mut d);
        udp.send_to(&d, s.tunnel_addr).await.unwrap();
    }
    for len in 0..24 {
        let mut d = vec![0u8; len];
        rng.fill_bytes(&mut d);
        udp.send_to(&d, s.tunnel_addr).await.unwrap();
    }
    // A real client's Initial cut short (under QUIC's 1200 bytes): dropped unread.
    let initial = capture_initials(&s, 1).await.remove(0);
    udp.send_to(&initial[..600], s.tunnel_addr).await.unwrap();
    // The same Initial with its authentication tag broken: its header reads as a new
    // connection's, so the server starts a handshake, which fails as it decrypts the packet.
    let mut forged = initial.clone();
    *forged.last_mut().unwrap() ^= 0xff;
    udp.send_to(&forged, s.tunnel_addr).await.unwrap();
    assert!(eventually(|| failed() == 1).await);
    assert_eq!(s.refused("tunnel_quic_handshake"), 1);
    let mut up = s.connect().await.unwrap();
    assert_eq!(up.stream.tunnel_transport(), Some(quic::TRANSPORT));
    assert_eq!(
        echo(&mut up.stream, b"after garbage").await,
        b"after garbage"
    );
    drop(up);
    // The only handshakes: the forged one, failed, and the pool's.
    assert!(eventually(|| accepted() == 1).await);
    assert_eq!(failed(), 1);

    // (b) A client certificate of another trust domain.
    let other = TestCa::new("other.example");
    let (_ep, conn) = dial(
        s.tunnel_addr,
        quic_client(&s, &other.workload("shop", "ratings"), &[quic::ALPN_QUIC]),
    )
    .await;
    closed_by_server(conn).await;
    assert!(eventually(|| failed() == 2).await);
    assert_eq!(s.refused("tunnel_quic_handshake"), 2);
    assert_eq!(accepted(), 1);

    // (c) Another ALPN: no common protocol, the handshake itself fails.
    let (_ep, conn) = dial(
        s.tunnel_addr,
        quic_client(&s, &s.ca.workload("shop", "ratings"), &[b"h3"]),
    )
    .await;
    match conn {
        Err(quinn::ConnectionError::ConnectionClosed(close)) => {
            // TLS alert no_application_protocol (120).
            assert_eq!(close.error_code, quinn::TransportErrorCode::crypto(120));
        }
        other => panic!("a client offering h3 got {other:?}"),
    }
    assert!(eventually(|| failed() == 3).await);
    assert_eq!(s.refused("tunnel_quic_handshake"), 3);
    assert_eq!(accepted(), 1);

    // (d) A proper client, and stream headers that are not.
    let (_ep, conn) = dial(s.tunnel_addr, proper_client(&s)).await;
    let conn = conn.unwrap();
    assert!(eventually(|| accepted() == 2).await);
    // Another version.
    let mut wrong_version = quic::encode_request(&s.app.to_string(), &HeaderMap::new()).unwrap();
    wrong_version[0] = 9;
    assert_eq!(
        bad_stream(&conn, &wrong_version, false).await,
        Some(quic::code::PROTOCOL_ERROR)
    );
    assert!(eventually(|| s.refused("tunnel_bad_header") == 1).await);
    // A header longer than any allowed.
    let too_long = u16::try_from(quic::MAX_HEADER + 1).unwrap().to_be_bytes();
    assert_eq!(
        bad_stream(&conn, &[1, too_long[0], too_long[1]], false).await,
        Some(quic::code::PROTOCOL_ERROR)
    );
    assert!(eventually(|| s.refused("tunnel_bad_header") == 2).await);
    // A stream that ends inside its header.
    assert_eq!(
        bad_stream(&conn, &[1, 0], true).await,
        Some(quic::code::PROTOCOL_ERROR)
    );
    assert!(eventually(|| s.refused("tunnel_bad_header") == 3).await);

    // (e) The same connection still carries proper streams.
    let (status, mut stream) = raw_stream(&conn, &s.app.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echo(&mut stream, b"proper").await, b"proper");
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(STEP, stream.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
    // A destination that is not the workload's address.
    let (status, _stream) = raw_stream(&conn, "127.0.0.2:80").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(eventually(|| s.refused("tunnel_destination_not_local") == 1).await);
    assert_eq!(s.refused("tunnel_bad_header"), 3);
    // None of it was refused for another reason.
    for reason in [
        "tunnel_quic_retry",
        "tunnel_quic_handshake_limit",
        "tunnel_wrong_alpn",
        "no_client_certificate",
        "handshake_timeout",
    ] {
        assert_eq!(s.refused(reason), 0, "{reason}");
    }
    assert_eq!(failed(), 3);
    conn.close(quic::code::NO_ERROR, b"done");

    // The listener still serves.
    let mut up = s.connect().await.unwrap();
    assert_eq!(up.stream.tunnel_transport(), Some(quic::TRANSPORT));
    assert_eq!(echo(&mut up.stream, b"fine").await, b"fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_flood_is_answered_with_retries_and_real_clients_still_connect() {
    isthmus_proto::limits::raise_fd_limit("tunnel test");
    const FLOOD: usize = 700;
    let s = Scene::start(AuthorizationPolicy::default(), only(Transports::Quic)).await;
    // Proper Initials, each of its own connection: the server routes an Initial by its
    // destination connection ID, so the same one from many addresses is one handshake.
    let initials = capture_initials(&s, FLOOD).await;
    // One socket per spoofed client, held until the end.
    let mut sockets = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        sockets.push(spoofed_client().await);
    }
    // Nobody answers the server from these addresses: each handshake stays pending until
    // the listener's handshake timeout. The Initials go in small batches, the next once the
    // server has answered each of the last (its first flight, a Retry or a refusal): all at
    // once, most would overflow the server socket's receive buffer and never be seen.
    let mut buf = vec![0u8; 65536];
    let mut unanswered = 0;
    for (batch, initials) in sockets.chunks(32).zip(initials.chunks(32)) {
        for (socket, initial) in batch.iter().zip(initials) {
            socket.send_to(initial, s.tunnel_addr).await.unwrap();
        }
        for socket in batch {
            if tokio::time::timeout(STEP, socket.recv_from(&mut buf))
                .await
                .is_err()
            {
                unanswered += 1;
            }
        }
    }
    assert!(
        eventually(|| s.refused("tunnel_quic_retry") > 0).await,
        "no Retry after {FLOOD} Initials ({unanswered} unanswered)"
    );

    // A proper client, meanwhile: it proves its address (a Retry) and is served.
    let (_ep, conn) = dial(s.tunnel_addr, proper_client(&s)).await;
    let conn = conn.expect("a proper client during the flood");
    let (status, mut stream) = raw_stream(&conn, &s.app.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echo(&mut stream, b"flooded").await, b"flooded");

    // The pool's client too. Not retried: a pool whose tunnel cannot be set up reaches the
    // peer without one for a while, so a failure here would stay one.
    let mut up = s.connect().await.unwrap();
    assert_eq!(up.stream.tunnel_transport(), Some(quic::TRANSPORT));
    assert_eq!(echo(&mut up.stream, b"after").await, b"after");
    // The spoofed handshakes ended (timed out) and were counted as failed.
    assert!(
        eventually(|| s.handshakes_on(quic::TRANSPORT, TunnelRole::server, "failed") > 0).await
    );
    assert!(s.refused("handshake_timeout") > 0);
    // The clients that proved their address were taken, none refused.
    assert_eq!(s.refused("tunnel_quic_handshake_limit"), 0);
    drop(sockets);
}

/// A stream to `authority` opened by hand on `conn`: its final answer, and the stream.
async fn raw_stream(conn: &quinn::Connection, authority: &str) -> (StatusCode, quic::QuicStream) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let header = quic::encode_request(authority, &HeaderMap::new()).unwrap();
    send.write_all(&header).await.unwrap();
    let status = tokio::time::timeout(STEP, final_answer(&mut recv))
        .await
        .unwrap()
        .unwrap();
    (status, quic::QuicStream::new(send, recv))
}

/// The final answer to a stream's request, after the listener's `100` (received).
async fn final_answer(recv: &mut quinn::RecvStream) -> std::io::Result<StatusCode> {
    let first = quic::read_response(recv).await?;
    assert_eq!(
        first,
        quic::RECEIVED,
        "the listener says it received the request first"
    );
    quic::read_response(recv).await
}
