//! Tunnels on loopback: the agent's outbound with a pool on one side, the tunnel listener
//! in front of an echo app on the other, both with a test CA's certificates.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use isthmus_proto::drain;
use isthmus_proto::model::{
    Address, EndpointKind, Health, Locality, Service, ServicePort, ServiceView, ViewEndpoint,
    ViewResource,
};
use isthmus_proto::subscription::LocalView;
use isthmus_proto::test_pki::TestCa;
use isthmus_proto::tls;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsConnector;

use super::pool::{PoolSettings, StreamRequest, Transports};
use super::*;
use crate::admission::Admission;
use crate::authz::{AuthorizationPolicy, Rule};
use crate::connection::Tracker;
use crate::inbound::hbone::{self, TunnelInbound};
use crate::inbound::{AppTarget, Inbound, Mode};
use crate::metrics::{
    ConnLabels, ConnResult, Direction, Metrics, RefusalLabels, TunnelBytesLabels, TunnelFlow,
    TunnelHandshakeLabels, TunnelLabels, TunnelRole, UNKNOWN_PEER,
};
use crate::outbound::{ClientTls, Outbound, OutboundTarget};
use crate::routes::{RouteOptions, RouteTable};
use crate::upstream::ConnectOptions;

mod quic;

const HOST: &str = "web.shop.svc.cluster.local";
const PORT: u16 = 80;
/// Bounds a step that should take milliseconds.
const STEP: Duration = Duration::from_secs(10);

struct Scene {
    ca: TestCa,
    /// The echo app behind the tunnel listener.
    app: SocketAddr,
    tunnel_addr: SocketAddr,
    server: Arc<Metrics>,
    client: Outbound,
    /// The tunnel listener, and what stops it.
    listener: Arc<TunnelInbound>,
    stop: std::sync::Mutex<drain::Trigger>,
    /// The transport label the client's tunnels are expected to have.
    transport: &'static str,
    /// Whether a QUIC listener serves beside the HTTP/2 one.
    quic: bool,
}

/// Pool settings that take `t` alone.
fn only(t: Transports) -> PoolSettings {
    PoolSettings {
        transports: t,
        ..PoolSettings::default()
    }
}

/// The HTTP/2 tunnels alone.
fn h2() -> PoolSettings {
    only(Transports::Http2)
}

/// The QUIC listener of a scene on `addr` (UDP).
fn quic_listener(
    ca: &TestCa,
    addr: SocketAddr,
    served: Arc<TunnelInbound>,
    shutdown: drain::Watch,
) -> std::io::Result<()> {
    let config = quic::listener_config(
        &ca.workload("shop", "web"),
        &ca.bundle(),
        DEFAULT_MAX_STREAMS,
    )?;
    let endpoint = quic::server_endpoint(addr, config)?;
    tokio::spawn(hbone::serve_quic(endpoint, served, shutdown));
    Ok(())
}

async fn echo_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

fn routes(ca: &TestCa, app: SocketAddr, tunnel_port: u16) -> RouteTable {
    let endpoint = ViewEndpoint {
        kind: EndpointKind::Workload,
        address: Address::Ip(app.ip()),
        ports: [(PORT, app.port())].into_iter().collect(),
        network: "network-a".into(),
        cluster: String::new(),
        locality: Locality::default(),
        identities: vec![ca.id("shop", "web")],
        weight: 1,
        health: Health::Healthy,
        labels: Default::default(),
        uid: "web-0".into(),
        tunnel_port,
        stale_since_ms: 0,
        subset_weights: Default::default(),
    };
    let service = Service {
        hostname: HOST.into(),
        namespace: "shop".into(),
        name: "web".into(),
        ports: vec![ServicePort {
            name: "http".into(),
            number: PORT,
            protocol: "TCP".into(),
            target_port: 0,
        }],
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

impl Scene {
    async fn start(policy: AuthorizationPolicy, settings: PoolSettings) -> Scene {
        let quic = settings.transports != Transports::Http2;
        Self::start_with(policy, settings, quic).await
    }

    /// A scene whose tunnel port serves QUIC only when `quic`.
    async fn start_with(policy: AuthorizationPolicy, settings: PoolSettings, quic: bool) -> Scene {
        let ca = TestCa::new("cluster.local");
        let app = echo_app().await;
        let server_tls = server_config(&ca.workload("shop", "web"), &ca.bundle()).unwrap();
        let server = Arc::new(Metrics::default());
        let inbound = Arc::new(Inbound {
            tls: Arc::new(ArcSwap::from_pointee(server_tls)),
            admission: Admission::new(&policy),
            policy: Arc::new(ArcSwap::from_pointee(policy)),
            mode: Mode::Strict,
            app: AppTarget::OriginalPort { host: app.ip() },
            metrics: server.clone(),
            tracker: Tracker::new(),
            handshake_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(2),
            max_connections: 64,
            on_connection: None,
        });
        // The QUIC listener takes the same port over UDP: one free for both.
        let listener = loop {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            if !quic || std::net::UdpSocket::bind(l.local_addr().unwrap()).is_ok() {
                break l;
            }
        };
        let tunnel_addr = listener.local_addr().unwrap();
        let tunnel_listener = Arc::new(TunnelInbound {
            inbound,
            addresses: vec![app.ip()],
            ports: Vec::new(),
            app_host: app.ip(),
            max_streams: DEFAULT_MAX_STREAMS,
        });
        let (stop, shutdown) = drain::channel();
        if quic {
            quic_listener(&ca, tunnel_addr, tunnel_listener.clone(), shutdown.clone()).unwrap();
        }
        tokio::spawn(hbone::serve(listener, tunnel_listener.clone(), shutdown));
        let transport = match (settings.transports, quic) {
            (Transports::Http2, _) | (Transports::Auto, false) => TRANSPORT,
            _ => quic::TRANSPORT,
        };
        let metrics = Arc::new(Metrics::default());
        let client = Outbound {
            routes: Arc::new(ArcSwap::from_pointee(routes(&ca, app, tunnel_addr.port()))),
            tls: Arc::new(ArcSwap::from_pointee(ClientTls::new(
                ca.workload("shop", "ratings"),
                ca.bundle(),
            ))),
            metrics: metrics.clone(),
            tracker: Tracker::new(),
            connect: ConnectOptions {
                timeout: Duration::from_secs(2),
                attempts: 1,
                mark: None,
            },
            source_labels: Default::default(),
            tunnel: Some(Pool::new(settings, metrics)),
        };
        Scene {
            ca,
            app,
            tunnel_addr,
            server,
            client,
            listener: tunnel_listener,
            stop: std::sync::Mutex::new(stop),
            transport,
            quic,
        }
    }

    /// Stops the tunnel listener (its tunnels are told to go away) and starts it again on
    /// the same port, as a restarted peer.
    async fn restart_server(&self) {
        let (stop, shutdown) = drain::channel();
        let old = std::mem::replace(&mut *self.stop.lock().unwrap(), stop);
        old.fire();
        // The old listener closes once it sees the signal; bind as soon as the port is free.
        let listener = loop {
            match TcpListener::bind(self.tunnel_addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        if self.quic {
            // The old endpoint's socket closes once its tunnels have gone.
            loop {
                match quic_listener(
                    &self.ca,
                    self.tunnel_addr,
                    self.listener.clone(),
                    shutdown.clone(),
                ) {
                    Ok(()) => break,
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }
        tokio::spawn(hbone::serve(listener, self.listener.clone(), shutdown));
    }

    fn pool(&self) -> &Pool {
        self.client.tunnel.as_ref().unwrap()
    }

    async fn connect(&self) -> std::io::Result<crate::outbound::OutboundStream> {
        let target = OutboundTarget {
            hostname: HOST.into(),
            port: PORT,
            subset: String::new(),
            sni: None,
        };
        match tokio::time::timeout(STEP, self.client.connect(&target)).await {
            Ok(r) => r.map_err(std::io::Error::other),
            Err(_) => panic!("connect did not finish within {STEP:?}"),
        }
    }

    fn handshakes(&self, role: TunnelRole, result: &'static str) -> u64 {
        self.handshakes_on(self.transport, role, result)
    }

    fn handshakes_on(
        &self,
        transport: &'static str,
        role: TunnelRole,
        result: &'static str,
    ) -> u64 {
        // A server knows its client only once the handshake succeeded.
        let peer = match (role, result) {
            (TunnelRole::server, "ok") | (TunnelRole::client, _) => self.tunnel_labels(role).peer,
            (TunnelRole::server, _) => UNKNOWN_PEER.to_string(),
        };
        Self::handshakes_with(self.metrics(role), transport, role, peer, result)
    }

    /// The metrics of `role`'s proxy: the client's pool or the server's listener.
    fn metrics(&self, role: TunnelRole) -> &Metrics {
        match role {
            TunnelRole::client => &self.client.metrics,
            TunnelRole::server => &self.server,
        }
    }

    fn handshakes_with(
        m: &Metrics,
        transport: &'static str,
        role: TunnelRole,
        peer: String,
        result: &'static str,
    ) -> u64 {
        m.tunnels
            .handshakes
            .get_or_create(&TunnelHandshakeLabels {
                role,
                transport,
                peer,
                result,
            })
            .get()
    }

    /// The client proxy's identity: the `peer` of the server's tunnel metrics.
    fn client_identity(&self) -> String {
        self.ca.id("shop", "ratings").to_string()
    }

    /// The app's bytes the tunnels carried, on `role`'s side, by flow.
    fn tunnel_bytes(&self, role: TunnelRole, flow: TunnelFlow) -> u64 {
        let labels = self.tunnel_labels(role);
        self.metrics(role)
            .tunnels
            .bytes
            .get_or_create(&TunnelBytesLabels {
                role,
                transport: labels.transport,
                peer: labels.peer,
                flow,
            })
            .get()
    }

    /// Connections the client made without a tunnel to `peer`, whose tunnel could not be
    /// set up.
    fn fallbacks(&self, peer: SocketAddr) -> u64 {
        self.client
            .metrics
            .tunnels
            .fallbacks
            .get_or_create(&TunnelLabels {
                role: TunnelRole::client,
                transport: TRANSPORT,
                peer: peer.to_string(),
            })
            .get()
    }

    /// The labels of the tunnel between the scene's proxies, on `role`'s side.
    fn tunnel_labels(&self, role: TunnelRole) -> TunnelLabels {
        TunnelLabels {
            role,
            transport: self.transport,
            peer: match role {
                TunnelRole::client => self.tunnel_addr.to_string(),
                TunnelRole::server => self.client_identity(),
            },
        }
    }

    fn refused(&self, reason: &str) -> u64 {
        self.server
            .refused
            .get_or_create(&RefusalLabels {
                direction: Direction::inbound,
                reason: reason.into(),
            })
            .get()
    }

    /// A raw mTLS connection to the tunnel port as `shop/ratings`, offering `alpn`.
    async fn raw_tls(
        &self,
        alpn: &[&[u8]],
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let config = tls::client_config(
            Some(&self.ca.workload("shop", "ratings")),
            &self.ca.bundle(),
            tls::ServerIdentity::TrustDomain,
            alpn,
        )
        .unwrap();
        let tcp = tokio::net::TcpStream::connect(self.tunnel_addr)
            .await
            .unwrap();
        let name = ServerName::IpAddress(self.tunnel_addr.ip().into());
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
    }
}

async fn echo(s: &mut (impl AsyncRead + AsyncWrite + Unpin), msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(STEP, s.read_exact(&mut got))
        .await
        .expect("no echo in time")
        .unwrap();
    got
}

use tokio::io::{AsyncRead, AsyncWrite};

async fn eventually(mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + STEP;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

async fn many_connections_share_one_tunnel_and_each_reaches_the_app(settings: PoolSettings) {
    let s = Scene::start(AuthorizationPolicy::default(), settings).await;
    let mut calls = Vec::new();
    for i in 0..50 {
        let s = &s;
        calls.push(async move {
            let mut up = s.connect().await.unwrap();
            assert!(up.stream.is_tunnel());
            assert_eq!(up.server_identity, Some(s.ca.id("shop", "web")));
            let msg = format!("hello {i}");
            let got = echo(&mut up.stream, msg.as_bytes()).await;
            assert_eq!(got, msg.as_bytes());
            up.stream.shutdown().await.unwrap();
            let mut rest = Vec::new();
            up.stream.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty(), "the app closed after its echo");
        });
    }
    futures_join(calls).await;
    assert_eq!(
        s.handshakes(TunnelRole::client, "ok"),
        1,
        "one tunnel for all"
    );
    assert_eq!(s.handshakes(TunnelRole::server, "ok"), 1);
    let streams = |m: &Metrics, role| {
        m.tunnels
            .streams
            .get_or_create(&s.tunnel_labels(role))
            .get()
    };
    assert_eq!(streams(&s.client.metrics, TunnelRole::client), 50);
    assert_eq!(streams(&s.server, TunnelRole::server), 50);
    // The app's bytes, per peer: "hello 0" .. "hello 49" each way.
    let echoed: u64 = (0..50).map(|i| format!("hello {i}").len() as u64).sum();
    assert_eq!(s.tunnel_bytes(TunnelRole::client, TunnelFlow::sent), echoed);
    assert_eq!(
        s.tunnel_bytes(TunnelRole::client, TunnelFlow::received),
        echoed
    );
    assert!(
        eventually(
            || s.tunnel_bytes(TunnelRole::server, TunnelFlow::received) == echoed
                && s.tunnel_bytes(TunnelRole::server, TunnelFlow::sent) == echoed
        )
        .await,
        "the server counts what it relayed"
    );
    // Every stream went through the inbound path, counted as a connection to the app.
    let app = s.app.to_string();
    assert!(
        eventually(|| {
            s.server
                .connections
                .get_or_create(&ConnLabels {
                    direction: Direction::inbound,
                    service: app.clone(),
                    result: ConnResult::ok,
                })
                .get()
                == 50
        })
        .await
    );
    assert_eq!(s.pool().open_tunnels().await, 1);
}

/// Runs the futures concurrently on this task.
async fn futures_join<F: std::future::Future<Output = ()>>(futs: Vec<F>) {
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    let mut pending: Vec<_> = set.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut left = false;
        for slot in pending.iter_mut() {
            if let Some(f) = slot {
                if f.as_mut().poll(cx).is_ready() {
                    *slot = None;
                } else {
                    left = true;
                }
            }
        }
        if left {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
}

async fn bulk_both_ways_while_echoing_arrives_whole(settings: PoolSettings) {
    let s = Scene::start(AuthorizationPolicy::default(), settings).await;
    let up = s.connect().await.unwrap();
    const TOTAL: usize = 32 << 20;
    let (mut r, mut w) = tokio::io::split(up.stream);
    let writer = tokio::spawn(async move {
        let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let mut sent = 0;
        while sent < TOTAL {
            w.write_all(&chunk).await.unwrap();
            sent += chunk.len();
        }
        w.shutdown().await.unwrap();
    });
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    let mut pos = 0usize;
    let read = async {
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            for b in &buf[..n] {
                assert_eq!(*b, (pos % (64 * 1024) % 251) as u8, "byte {pos}");
                pos += 1;
            }
            got += n;
        }
    };
    tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .expect("the echo stalled");
    writer.await.unwrap();
    assert_eq!(got, TOTAL);
}

async fn a_denied_caller_gets_401_and_the_app_is_never_connected(settings: PoolSettings) {
    let policy = AuthorizationPolicy {
        allow: vec![Rule {
            principals: vec!["cluster.local/ns/shop/sa/frontend".into()],
            ..Default::default()
        }],
        ..Default::default()
    };
    let s = Scene::start(policy, settings).await;
    let err = s.connect().await.unwrap_err().to_string();
    assert!(
        err.contains("401") && err.contains("authorization policy"),
        "{err}"
    );
    let denied = s
        .server
        .connections
        .get_or_create(&ConnLabels {
            direction: Direction::inbound,
            service: s.app.to_string(),
            result: ConnResult::denied,
        })
        .get();
    assert_eq!(denied, 1);
}

async fn a_stream_to_an_app_that_is_down_gets_503(settings: PoolSettings) {
    let s = Scene::start(AuthorizationPolicy::default(), settings).await;
    // The app's port, closed: take a port nothing listens on.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let pool = s.pool();
    let config = s
        .client
        .tls
        .load()
        .tunnel_config(&[s.ca.id("shop", "web")])
        .unwrap();
    let key = super::pool::PoolKey {
        addr: s.tunnel_addr,
        identities: vec![s.ca.id("shop", "web")],
    };
    let quic_tls = || {
        s.client
            .tls
            .load()
            .quic_config(&[s.ca.id("shop", "web")])
            .map_err(std::io::Error::other)
    };
    let dial = || {
        let config = config.clone();
        let addr = s.tunnel_addr;
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let tls = TlsConnector::from(config)
                .connect(ServerName::IpAddress(addr.ip().into()), tcp)
                .await?;
            Ok((tls, None))
        }
    };
    let err = pool
        .open(
            &key,
            dial,
            quic_tls,
            &StreamRequest::to_workload(closed, None),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("503"), "{err}");
    // A destination that is not this workload's address is refused by name.
    let elsewhere: SocketAddr = "127.0.0.2:80".parse().unwrap();
    let err = pool
        .open(
            &key,
            dial,
            quic_tls,
            &StreamRequest::to_workload(elsewhere, None),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("400"), "{err}");
    assert!(eventually(|| s.refused("tunnel_destination_not_local") == 1).await);
    // Both went over the one tunnel, which still serves.
    assert_eq!(s.handshakes(TunnelRole::client, "ok"), 1);
    let mut up = s.connect().await.unwrap();
    assert_eq!(echo(&mut up.stream, b"still here").await, b"still here");
}

#[tokio::test]
async fn a_client_without_h2_is_refused_by_name() {
    let s = Scene::start(AuthorizationPolicy::default(), h2()).await;
    // Another protocol only: the TLS handshake itself fails (no common protocol).
    let err = s.raw_tls(&[b"http/1.1"]).await.unwrap_err().to_string();
    assert!(err.contains("NoApplicationProtocol"), "{err}");
    assert!(eventually(|| s.handshakes(TunnelRole::server, "failed") == 1).await);
    // No ALPN at all: TLS completes, and the tunnel refuses it by name.
    let mut tls = s.raw_tls(&[]).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(STEP, tls.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(eventually(|| s.refused("tunnel_wrong_alpn") == 1).await);

    // HTTP/2 over the right ALPN, but a GET: 405.
    let tls = s.raw_tls(&[ALPN_H2]).await.unwrap();
    let (mut send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(http::Method::GET)
        .uri("https://127.0.0.1/")
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(STEP, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), http::StatusCode::METHOD_NOT_ALLOWED);
    assert!(eventually(|| s.refused("tunnel_not_connect") == 1).await);
}

async fn an_idle_tunnel_closes_and_the_next_stream_opens_another(settings: PoolSettings) {
    let settings = PoolSettings {
        idle_timeout: Duration::from_millis(200),
        ..settings
    };
    let s = Scene::start(AuthorizationPolicy::default(), settings).await;
    let mut up = s.connect().await.unwrap();
    assert_eq!(echo(&mut up.stream, b"one").await, b"one");
    // Not idle while a stream is open.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.pool().open_tunnels().await, 1);
    drop(up);
    let mut closed = false;
    for _ in 0..200 {
        if s.pool().open_tunnels().await == 0 {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(closed, "the idle tunnel stayed in the pool");
    let mut up = s.connect().await.unwrap();
    assert_eq!(echo(&mut up.stream, b"two").await, b"two");
    assert_eq!(s.handshakes(TunnelRole::client, "ok"), 2);
}

async fn a_cleared_pool_keeps_streams_in_flight_and_dials_anew(settings: PoolSettings) {
    let s = Scene::start(AuthorizationPolicy::default(), settings).await;
    let mut first = s.connect().await.unwrap();
    assert_eq!(echo(&mut first.stream, b"before").await, b"before");
    // A renewed certificate: the pool is cleared.
    s.pool().clear();
    let mut second = s.connect().await.unwrap();
    assert_eq!(echo(&mut second.stream, b"new").await, b"new");
    assert_eq!(s.handshakes(TunnelRole::client, "ok"), 2);
    // The first stream still moves bytes over the old tunnel.
    assert_eq!(echo(&mut first.stream, b"after").await, b"after");
}

#[tokio::test]
async fn bad_input_on_the_tunnel_port_is_closed_and_counted_by_reason() {
    let s = Scene::start(AuthorizationPolicy::default(), h2()).await;
    let closed = |mut io: tokio::net::TcpStream| async move {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(STEP, io.read(&mut buf)).await.unwrap();
        matches!(n, Ok(0) | Err(_)) || n.is_ok_and(|n| n > 0 && buf[0] == 0x15)
    };

    // Not TLS at all.
    let mut plain = tokio::net::TcpStream::connect(s.tunnel_addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(closed(plain).await);
    assert!(eventually(|| s.refused("not_tls") == 1).await);

    // A client certificate of another trust domain.
    let other = TestCa::new("other.example");
    let config = tls::client_config(
        Some(&other.workload("shop", "ratings")),
        &s.ca.bundle(),
        tls::ServerIdentity::TrustDomain,
        &[ALPN_H2],
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(s.tunnel_addr).await.unwrap();
    let name = ServerName::IpAddress(s.tunnel_addr.ip().into());
    if let Ok(mut tls) = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
    {
        // TLS 1.3: the client may finish before the server refuses its certificate.
        let mut buf = [0u8; 16];
        let got = tokio::time::timeout(STEP, tls.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(got, Ok(0) | Err(_)), "{got:?}");
    }
    assert!(eventually(|| s.handshakes(TunnelRole::server, "failed") == 2).await);

    // mTLS and h2, then garbage instead of the HTTP/2 preface.
    let mut tls = s.raw_tls(&[ALPN_H2]).await.unwrap();
    tls.write_all(&[0xde; 64]).await.unwrap();
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(STEP, tls.read(&mut buf))
        .await
        .unwrap();
    assert!(eventually(|| s.refused("tunnel_not_http2") == 1).await);

    // The listener still serves.
    let mut up = s.connect().await.unwrap();
    assert_eq!(echo(&mut up.stream, b"fine").await, b"fine");
}

async fn a_peer_whose_tunnel_cannot_be_set_up_is_reached_with_mtls_for_a_while(
    settings: PoolSettings,
) {
    let s = Scene::start(AuthorizationPolicy::default(), settings).await;
    // The workload's own mTLS inbound in front of the same app; its tunnel port is closed.
    let inbound = Arc::new(Inbound {
        tls: Arc::new(ArcSwap::from_pointee(
            Inbound::server_config(&s.ca.workload("shop", "web"), &s.ca.bundle()).unwrap(),
        )),
        admission: Admission::new(&AuthorizationPolicy::default()),
        policy: Default::default(),
        mode: Mode::Strict,
        app: AppTarget::Fixed(s.app),
        metrics: Arc::new(Metrics::default()),
        tracker: Tracker::new(),
        handshake_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_secs(2),
        max_connections: 64,
        on_connection: None,
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mtls = listener.local_addr().unwrap();
    let (_stop, shutdown) = drain::channel();
    tokio::spawn(crate::inbound::serve(listener, inbound, shutdown));
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    s.client
        .routes
        .store(Arc::new(routes(&s.ca, mtls, closed.port())));

    for round in 0..2 {
        let mut up = s.connect().await.unwrap();
        assert!(!up.stream.is_tunnel(), "round {round}");
        assert_eq!(echo(&mut up.stream, b"plain").await, b"plain");
    }
    let fallbacks = s.fallbacks(closed);
    assert_eq!(fallbacks, 2);
    // The tunnel was tried once (HTTP/2 refused at once, QUIC given its grace and
    // dropped); the second connection remembered it.
    let failed = Scene::handshakes_with(
        &s.client.metrics,
        TRANSPORT,
        TunnelRole::client,
        closed.to_string(),
        "failed",
    );
    assert_eq!(failed, 1);
}

async fn a_thousand_streams_at_once_share_one_tunnel(settings: PoolSettings) {
    // Each stream holds a socket to the app on the server side and one in the app.
    isthmus_proto::limits::raise_fd_limit("tunnel test");
    const STREAMS: usize = 1000;
    let s = Scene::start(AuthorizationPolicy::default(), settings).await;
    let mut open = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        open.push(s.connect().await.unwrap());
    }
    // All open at once; each still carries its own bytes.
    let mut echoes = Vec::new();
    for (i, up) in open.iter_mut().enumerate() {
        echoes.push(async move {
            let msg = format!("stream {i}");
            assert_eq!(echo(&mut up.stream, msg.as_bytes()).await, msg.as_bytes());
        });
    }
    futures_join(echoes).await;
    assert_eq!(
        s.handshakes(TunnelRole::client, "ok"),
        1,
        "one tunnel for all"
    );
    assert_eq!(s.pool().open_tunnels().await, 1);
    let open_now = s
        .server
        .tunnels
        .open
        .get_or_create(&s.tunnel_labels(TunnelRole::server))
        .get();
    assert_eq!(open_now, 1);
    drop(open);
}

async fn a_restarted_peer_is_dialled_again_and_no_connection_fails(settings: PoolSettings) {
    let s = Scene::start(AuthorizationPolicy::default(), settings).await;
    let mut before = s.connect().await.unwrap();
    assert_eq!(echo(&mut before.stream, b"before").await, b"before");
    drop(before);
    s.restart_server().await;
    // The old tunnel was told to go away (or is found dead): the next connections open a
    // new one, and every one of them works.
    for i in 0..5 {
        let mut up = s.connect().await.unwrap();
        assert!(up.stream.is_tunnel(), "connection {i}");
        let msg = format!("after {i}");
        assert_eq!(echo(&mut up.stream, msg.as_bytes()).await, msg.as_bytes());
    }
    assert_eq!(s.handshakes(TunnelRole::client, "ok"), 2);
    assert_eq!(s.pool().open_tunnels().await, 1);
}

#[tokio::test]
async fn an_extended_connect_reaches_the_app_as_a_classic_one_does() {
    let s = Scene::start(AuthorizationPolicy::default(), h2()).await;
    let tls = s.raw_tls(&[ALPN_H2]).await.unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut send = tokio::time::timeout(STEP, send.ready())
        .await
        .unwrap()
        .unwrap();
    // The server's SETTINGS arrive with the first exchange; wait until they are seen.
    for _ in 0..100 {
        if send.is_extended_connect_protocol_enabled() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(send.is_extended_connect_protocol_enabled());
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("https://{}/", s.app))
        .body(())
        .unwrap();
    req.extensions_mut()
        .insert(h2::ext::Protocol::from_static("connect-tcp"));
    let (resp, body) = send.send_request(req, false).unwrap();
    let resp = tokio::time::timeout(STEP, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), http::StatusCode::OK);
    let mut stream = H2Stream::new(body, resp.into_body());
    assert_eq!(echo(&mut stream, b"extended").await, b"extended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_share_one_tunnel_and_each_reaches_the_app_over_http2() {
    many_connections_share_one_tunnel_and_each_reaches_the_app(h2()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_share_one_tunnel_and_each_reaches_the_app_over_quic() {
    many_connections_share_one_tunnel_and_each_reaches_the_app(only(Transports::Quic)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_both_ways_while_echoing_arrives_whole_over_http2() {
    bulk_both_ways_while_echoing_arrives_whole(h2()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_both_ways_while_echoing_arrives_whole_over_quic() {
    bulk_both_ways_while_echoing_arrives_whole(only(Transports::Quic)).await;
}

#[tokio::test]
async fn a_denied_caller_gets_401_and_the_app_is_never_connected_over_http2() {
    a_denied_caller_gets_401_and_the_app_is_never_connected(h2()).await;
}

#[tokio::test]
async fn a_denied_caller_gets_401_and_the_app_is_never_connected_over_quic() {
    a_denied_caller_gets_401_and_the_app_is_never_connected(only(Transports::Quic)).await;
}

#[tokio::test]
async fn a_stream_to_an_app_that_is_down_gets_503_over_http2() {
    a_stream_to_an_app_that_is_down_gets_503(h2()).await;
}

#[tokio::test]
async fn a_stream_to_an_app_that_is_down_gets_503_over_quic() {
    a_stream_to_an_app_that_is_down_gets_503(only(Transports::Quic)).await;
}

#[tokio::test]
async fn an_idle_tunnel_closes_and_the_next_stream_opens_another_over_http2() {
    an_idle_tunnel_closes_and_the_next_stream_opens_another(h2()).await;
}

#[tokio::test]
async fn an_idle_tunnel_closes_and_the_next_stream_opens_another_over_quic() {
    an_idle_tunnel_closes_and_the_next_stream_opens_another(only(Transports::Quic)).await;
}

#[tokio::test]
async fn a_cleared_pool_keeps_streams_in_flight_and_dials_anew_over_http2() {
    a_cleared_pool_keeps_streams_in_flight_and_dials_anew(h2()).await;
}

#[tokio::test]
async fn a_cleared_pool_keeps_streams_in_flight_and_dials_anew_over_quic() {
    a_cleared_pool_keeps_streams_in_flight_and_dials_anew(only(Transports::Quic)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_streams_at_once_share_one_tunnel_over_http2() {
    a_thousand_streams_at_once_share_one_tunnel(h2()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_streams_at_once_share_one_tunnel_over_quic() {
    a_thousand_streams_at_once_share_one_tunnel(only(Transports::Quic)).await;
}

#[tokio::test]
async fn a_restarted_peer_is_dialled_again_and_no_connection_fails_over_http2() {
    a_restarted_peer_is_dialled_again_and_no_connection_fails(h2()).await;
}

#[tokio::test]
async fn a_restarted_peer_is_dialled_again_and_no_connection_fails_over_quic() {
    a_restarted_peer_is_dialled_again_and_no_connection_fails(only(Transports::Quic)).await;
}

#[tokio::test]
async fn a_peer_whose_tunnel_cannot_be_set_up_is_reached_with_mtls_for_a_while_over_http2() {
    a_peer_whose_tunnel_cannot_be_set_up_is_reached_with_mtls_for_a_while(h2()).await;
}

#[tokio::test]
async fn a_peer_whose_tunnel_cannot_be_set_up_is_reached_with_mtls_for_a_while_when_both_transports_fail(
) {
    a_peer_whose_tunnel_cannot_be_set_up_is_reached_with_mtls_for_a_while(PoolSettings::default())
        .await;
}
