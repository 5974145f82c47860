//! The tunnel listener on loopback: a raw HTTP/2 client with a test CA's workload
//! certificate opens `CONNECT` streams to services whose endpoints are local apps that
//! greet with their name and then echo.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use isthmus_proto::drain;
use isthmus_proto::model::{
    Address, EndpointKind, Health, Locality, Scope, Service, ServicePort, ServiceView,
    ViewEndpoint, ViewResource,
};
use isthmus_proto::subscription::LocalView;
use isthmus_proto::test_pki::TestCa;
use isthmus_proto::tls::{self, ServerIdentity};
use isthmus_proto::SpiffeId;
use isthmus_proxy::connection::Tracker;
use isthmus_proxy::metrics::{
    ConnLabels, ConnResult, Direction, Metrics, RefusalLabels, TunnelHandshakeLabels, TunnelRole,
    UNKNOWN_PEER,
};
use isthmus_proxy::routes::{Reach, RouteOptions, RouteTable};
use isthmus_proxy::tunnel::{H2Stream, ALPN_H2, DEFAULT_MAX_STREAMS};
use isthmus_proxy::upstream::ConnectOptions;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::*;

const WEB: &str = "web.shop.svc.cluster.local";
const INTERNAL: &str = "internal.shop.svc.cluster.local";
const DOWN: &str = "down.shop.svc.cluster.local";
const PORT: u16 = 80;
/// Bounds a step that should take milliseconds.
const STEP: Duration = Duration::from_secs(10);

/// An app that greets each connection with `name`, then echoes.
async fn app(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                s.write_all(name.as_bytes()).await?;
                let (mut r, mut w) = s.split();
                tokio::io::copy(&mut r, &mut w).await?;
                w.shutdown().await
            });
        }
    });
    addr
}

fn endpoint(uid: &str, at: SocketAddr, version: &str) -> ViewEndpoint {
    ViewEndpoint {
        kind: EndpointKind::Workload,
        address: Address::Ip(at.ip()),
        ports: [(PORT, at.port())].into_iter().collect(),
        network: "network-b".into(),
        cluster: String::new(),
        locality: Locality::default(),
        identities: Vec::new(),
        weight: 1,
        health: Health::Healthy,
        labels: [("version".to_string(), version.to_string())].into(),
        uid: uid.into(),
        tunnel_port: 0,
        stale_since_ms: 0,
        subset_weights: Default::default(),
    }
}

fn service(hostname: &str, scope: Scope, endpoints: Vec<ViewEndpoint>) -> (String, ViewResource) {
    let (name, namespace) = hostname.split_once('.').unwrap();
    let service = Service {
        hostname: hostname.into(),
        namespace: namespace.split('.').next().unwrap().into(),
        name: name.into(),
        ports: vec![ServicePort {
            name: "tcp".into(),
            number: PORT,
            protocol: "TCP".into(),
            target_port: 0,
        }],
        scope,
        ..Default::default()
    };
    let view = ServiceView {
        service,
        endpoints,
        ..Default::default()
    };
    (
        format!("svc/{hostname}"),
        ViewResource::Service(Arc::new(view)),
    )
}

/// `web` (two endpoints, `v1` and `v2`), `internal` (cluster-local) and `down` (its endpoint
/// refuses connections).
async fn routes() -> RouteTable {
    let (v1, v2) = (app("v1").await, app("v2").await);
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let resources: BTreeMap<_, _> = [
        service(
            WEB,
            Scope::Mesh,
            vec![endpoint("web-1", v1, "v1"), endpoint("web-2", v2, "v2")],
        ),
        service(
            INTERNAL,
            Scope::ClusterLocal,
            vec![endpoint("internal-1", v1, "v1")],
        ),
        service(DOWN, Scope::Mesh, vec![endpoint("down-1", closed, "v1")]),
    ]
    .into();
    let view = LocalView {
        version: "v.1".into(),
        resources,
    };
    let opts = RouteOptions {
        reach: Reach::LocalWorkloads,
        ..RouteOptions::default()
    };
    RouteTable::build(&view, &RouteTable::default(), &opts)
}

struct Scene {
    ca: TestCa,
    addr: SocketAddr,
    passthrough: Arc<Passthrough>,
    cert_dir: tempfile::TempDir,
    stop: drain::Trigger,
}

impl Scene {
    async fn start() -> Scene {
        let ca = TestCa::new("cluster.local");
        let cert_dir = tempfile::tempdir().unwrap();
        ca.write_credentials(cert_dir.path(), &ca.id("istio-system", "gateway"))
            .unwrap();
        let passthrough = Arc::new(Passthrough {
            routes: Arc::new(ArcSwap::from_pointee(routes().await)),
            metrics: Arc::new(Metrics::default()),
            tracker: Tracker::new(),
            handshake_timeout: Duration::from_secs(2),
            connect: ConnectOptions {
                timeout: Duration::from_secs(2),
                attempts: 1,
                mark: None,
            },
            max_connections: 64,
        });
        let tunnel = Arc::new(Tunnel {
            passthrough: passthrough.clone(),
            tls: Arc::new(TunnelTls::load(cert_dir.path(), ca.bundle()).unwrap()),
            max_streams: DEFAULT_MAX_STREAMS,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, shutdown) = drain::channel();
        tokio::spawn(serve(listener, tunnel, shutdown));
        Scene {
            ca,
            addr,
            passthrough,
            cert_dir,
            stop,
        }
    }

    /// An mTLS connection to the tunnel port as `shop/<sa>` of `ca`.
    async fn tls_as(&self, ca: &TestCa, sa: &str) -> std::io::Result<TlsStream<TcpStream>> {
        mtls(self.addr, &ca.workload("shop", sa), &self.ca.bundle()).await
    }

    /// A tunnel as `shop/ratings`.
    async fn tunnel(&self) -> SendRequest<Bytes> {
        h2_over(self.tls_as(&self.ca, "ratings").await.unwrap()).await
    }

    fn refused(&self, reason: &str) -> u64 {
        self.passthrough
            .metrics
            .refused
            .get_or_create(&RefusalLabels {
                direction: Direction::passthrough,
                reason: reason.into(),
            })
            .get()
    }

    fn connections(&self, service: &str, result: ConnResult) -> u64 {
        self.passthrough
            .metrics
            .connections
            .get_or_create(&ConnLabels {
                direction: Direction::passthrough,
                service: service.into(),
                result,
            })
            .get()
    }

    fn handshakes(&self, result: &'static str) -> u64 {
        self.passthrough
            .metrics
            .tunnels
            .handshakes
            .get_or_create(&TunnelHandshakeLabels {
                role: TunnelRole::server,
                transport: "hbone",
                // Identified only once its handshake succeeded: `shop/ratings`.
                peer: match result {
                    "ok" => self.ca.id("shop", "ratings").to_string(),
                    _ => UNKNOWN_PEER.to_string(),
                },
                result,
            })
            .get()
    }
}

/// An mTLS connection to a tunnel port at `addr` with `creds`, offering ALPN `h2`.
pub(crate) async fn mtls(
    addr: SocketAddr,
    creds: &Credentials,
    bundle: &TrustBundle,
) -> std::io::Result<TlsStream<TcpStream>> {
    let config =
        tls::client_config(Some(creds), bundle, ServerIdentity::TrustDomain, &[ALPN_H2]).unwrap();
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
}

/// The client side of an HTTP/2 connection over `tls`, its connection driven by a task.
pub(crate) async fn h2_over(tls: TlsStream<TcpStream>) -> SendRequest<Bytes> {
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    send
}

/// Sends `method` to `authority` (with the subset header when given): the stream once
/// answered `200`, else the status.
pub(crate) async fn request(
    send: &mut SendRequest<Bytes>,
    method: Method,
    authority: &str,
    subset: Option<&str>,
) -> Result<H2Stream, StatusCode> {
    let mut req = Request::builder().method(method).uri(authority);
    if let Some(s) = subset {
        req = req.header(SUBSET_HEADER, s);
    }
    let (response, body) = send.send_request(req.body(()).unwrap(), false).unwrap();
    let response = tokio::time::timeout(STEP, response)
        .await
        .expect("no answer in time")
        .unwrap();
    match response.status() {
        StatusCode::OK => Ok(H2Stream::new(body, response.into_body())),
        status => Err(status),
    }
}

pub(crate) async fn connect(
    send: &mut SendRequest<Bytes>,
    authority: &str,
    subset: Option<&str>,
) -> Result<H2Stream, StatusCode> {
    request(send, Method::CONNECT, authority, subset).await
}

/// The app's greeting, then `msg` echoed.
async fn greeting_and_echo(s: &mut H2Stream, msg: &[u8]) -> (String, Vec<u8>) {
    let mut name = [0u8; 2];
    tokio::time::timeout(STEP, s.read_exact(&mut name))
        .await
        .expect("no greeting in time")
        .unwrap();
    (
        String::from_utf8_lossy(&name).into_owned(),
        echo(s, msg).await,
    )
}

async fn echo(s: &mut H2Stream, msg: &[u8]) -> Vec<u8> {
    let mut got = vec![0u8; msg.len()];
    let exchange = async {
        s.write_all(msg).await.unwrap();
        s.read_exact(&mut got).await.unwrap();
    };
    tokio::time::timeout(STEP, exchange)
        .await
        .expect("no echo in time");
    got
}

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

fn web() -> String {
    format!("{WEB}:{PORT}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_streams_over_one_tunnel_each_reach_the_service_and_are_counted() {
    let s = Scene::start().await;
    let mut send = s.tunnel().await;
    let mut a = connect(&mut send, &web(), None).await.unwrap();
    let mut b = connect(&mut send, &web(), None).await.unwrap();
    let (from_a, echo_a) = greeting_and_echo(&mut a, b"over a").await;
    let (from_b, echo_b) = greeting_and_echo(&mut b, b"over b").await;
    assert_eq!(
        (echo_a.as_slice(), echo_b.as_slice()),
        (&b"over a"[..], &b"over b"[..])
    );
    assert!(["v1", "v2"].contains(&from_a.as_str()), "{from_a}");
    assert!(["v1", "v2"].contains(&from_b.as_str()), "{from_b}");
    for mut stream in [a, b] {
        stream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "the app closed after its echo");
    }
    assert!(eventually(|| s.connections(WEB, ConnResult::ok) == 2).await);
    assert_eq!(s.handshakes("ok"), 1, "one tunnel for both");
    // Each stream's access record names the caller's identity and the endpoint.
    let recent = s.passthrough.tracker.recent();
    let streams: Vec<_> = recent
        .iter()
        .filter(|r| r.service.as_deref() == Some(WEB))
        .collect();
    assert_eq!(streams.len(), 2, "{recent:?}");
    for r in streams {
        assert_eq!(r.direction, "passthrough");
        assert_eq!(r.destination, web());
        assert_eq!(
            r.peer_identity.as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/ratings")
        );
        assert!(r.endpoint.is_some());
        assert_eq!(r.bytes_to_upstream, 6);
        assert_eq!(r.bytes_from_upstream, 8);
    }
}

#[tokio::test]
async fn a_subset_header_routes_to_that_subset_only() {
    let s = Scene::start().await;
    let mut send = s.tunnel().await;
    for i in 0..4 {
        let mut up = connect(&mut send, &web(), Some("v2")).await.unwrap();
        let (from, _) = greeting_and_echo(&mut up, format!("{i}").as_bytes()).await;
        assert_eq!(from, "v2");
    }
    // No such subset: 404, by passthrough's reason.
    let err = connect(&mut send, &web(), Some("v9")).await.unwrap_err();
    assert_eq!(err, StatusCode::NOT_FOUND);
    assert!(eventually(|| s.refused("unknown_subset") == 1).await);
    // An empty header is every endpoint.
    let mut up = connect(&mut send, &web(), Some("")).await.unwrap();
    let (from, _) = greeting_and_echo(&mut up, b"any").await;
    assert!(["v1", "v2"].contains(&from.as_str()), "{from}");
}

#[tokio::test]
async fn what_this_network_does_not_serve_gets_404_by_passthrough_reasons() {
    let s = Scene::start().await;
    let mut send = s.tunnel().await;
    for (authority, reason) in [
        (
            "nope.shop.svc.cluster.local:80".to_string(),
            "unknown_service",
        ),
        (format!("{WEB}:81"), "unknown_port"),
        (format!("{INTERNAL}:{PORT}"), "not_exported"),
    ] {
        let err = connect(&mut send, &authority, None).await.unwrap_err();
        assert_eq!(err, StatusCode::NOT_FOUND, "{authority}");
        assert!(eventually(|| s.refused(reason) == 1).await, "{reason}");
    }
    let refused = s
        .passthrough
        .tracker
        .recent()
        .into_iter()
        .find(|r| r.result == "not_exported")
        .expect("the refusal's access record");
    assert!(
        refused.error.unwrap_or_default().contains("not exported"),
        "the record says why"
    );
    // The tunnel still serves.
    let mut up = connect(&mut send, &web(), None).await.unwrap();
    assert_eq!(greeting_and_echo(&mut up, b"still").await.1, b"still");
}

#[tokio::test]
async fn a_method_other_than_connect_gets_405_and_a_bad_authority_400() {
    let s = Scene::start().await;
    let mut send = s.tunnel().await;
    let err = request(&mut send, Method::GET, &format!("https://{WEB}/"), None)
        .await
        .unwrap_err();
    assert_eq!(err, StatusCode::METHOD_NOT_ALLOWED);
    assert!(eventually(|| s.refused("tunnel_not_connect") == 1).await);
    for bad in [WEB.to_string(), format!("{WEB}:0"), "[::1]".to_string()] {
        let err = connect(&mut send, &bad, None).await.unwrap_err();
        assert_eq!(err, StatusCode::BAD_REQUEST, "{bad}");
    }
    assert!(eventually(|| s.refused("tunnel_bad_authority") == 3).await);
}

#[tokio::test]
async fn a_service_whose_endpoints_cannot_be_connected_gets_503() {
    let s = Scene::start().await;
    let mut send = s.tunnel().await;
    let err = connect(&mut send, &format!("{DOWN}:{PORT}"), None)
        .await
        .unwrap_err();
    assert_eq!(err, StatusCode::SERVICE_UNAVAILABLE);
    // Counted as passthrough counts a connection no endpoint took.
    assert!(eventually(|| s.connections(DOWN, ConnResult::upstream_connect_failed) == 1).await);
}

#[tokio::test]
async fn a_client_of_another_trust_domain_is_refused() {
    let s = Scene::start().await;
    let other = TestCa::new("other.example");
    if let Ok(mut tls) = s.tls_as(&other, "ratings").await {
        // TLS 1.3: the client may finish before the server refuses its certificate.
        let mut buf = [0u8; 16];
        let got = tokio::time::timeout(STEP, tls.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(got, Ok(0) | Err(_)), "{got:?}");
    }
    assert!(eventually(|| s.handshakes("failed") == 1).await);
}

#[tokio::test]
async fn a_rewritten_certificate_is_presented_from_the_next_tunnel_on() {
    let s = Scene::start().await;
    let presented =
        |tls: &TlsStream<TcpStream>| tls::peer_identity(tls.get_ref().1.peer_certificates());
    let first = s.tls_as(&s.ca, "ratings").await.unwrap();
    assert_eq!(presented(&first), Some(s.ca.id("istio-system", "gateway")));
    let renewed: SpiffeId = s.ca.id("istio-system", "gateway-renewed");
    s.ca.write_credentials(s.cert_dir.path(), &renewed).unwrap();
    let second = s.tls_as(&s.ca, "ratings").await.unwrap();
    assert_eq!(presented(&second), Some(renewed.clone()));
    // Files that do not load: the last certificate that did is kept.
    std::fs::write(s.cert_dir.path().join(tls::KEY_FILE), "not a key").unwrap();
    let third = s.tls_as(&s.ca, "ratings").await.unwrap();
    assert_eq!(presented(&third), Some(renewed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_shutdown_a_tunnel_goes_away_after_its_streams_finish() {
    let s = Scene::start().await;
    let mut send = s.tunnel().await;
    let mut up = connect(&mut send, &web(), None).await.unwrap();
    assert_eq!(greeting_and_echo(&mut up, b"before").await.1, b"before");
    s.stop.fire();
    // GOAWAY: the stream in flight carries on, and no new one is taken.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(echo(&mut up, b"after").await, b"after");
    let refused = async {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(web())
            .body(())
            .unwrap();
        match send.send_request(req, false) {
            Err(_) => true,
            Ok((response, _)) => tokio::time::timeout(STEP, response).await.unwrap().is_err(),
        }
    };
    assert!(refused.await, "a new stream after GOAWAY");
    // Once the stream ends, the tunnel closes and nothing is left to drain.
    up.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = up.read_to_end(&mut rest).await;
    drop(up);
    assert!(eventually(|| s.passthrough.tracker.open() == 0).await);
    assert_eq!(s.connections(WEB, ConnResult::ok), 1);
}
