//! The east-west gateway's SNI passthrough listener on loopback, in-process: what it
//! refuses (and counts), and that it keeps serving afterwards. Cross-network behaviour is in
//! `gateway_topology.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use isthmus_gateway::{GatewayConfig, GatewayHandle};
use isthmus_proto::identity::{SpiffeId, TrustDomain};
use isthmus_proto::sni::SniKey;
use isthmus_proto::subscription::RegistrySettings;
use isthmus_proto::tls::{self, Credentials, ServerIdentity};
use isthmus_proxy::authz::AuthorizationPolicy;
use isthmus_proxy::inbound::Mode;
use isthmus_tests::harness::mesh::{self, yaml, Workload};
use isthmus_tests::{eventually, http_get, metric, TestRegistry, CLUSTER, TRUST_DOMAIN};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const REVIEWS: &str = "reviews.shop.svc.cluster.local";

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::workload(&TrustDomain::new(TRUST_DOMAIN).unwrap(), ns, sa).unwrap()
}

struct Setup {
    reg: TestRegistry,
    _dir: tempfile::TempDir,
    gw: GatewayHandle,
    workload: Workload,
    client: Credentials,
}

async fn setup() -> Setup {
    // `internal` is exported to its own namespace only: not for callers of other networks.
    let internal = format!(
        "{}  exportTo:\n  - \".\"\n",
        yaml::service("internal", "shop", 9080)
    );
    let reg = TestRegistry::start(&[
        ("svc.yaml", &yaml::service("reviews", "shop", 9080)),
        ("internal.yaml", &internal),
    ])
    .await
    .unwrap();
    let server = reg.credentials("shop", "reviews").await.unwrap();
    let workload = Workload::start(
        "127.0.0.1:0".parse().unwrap(),
        "reviews-1",
        &server,
        &reg.bundle(),
        AuthorizationPolicy::default(),
        Mode::Strict,
    )
    .await
    .unwrap();
    reg.write_resource(
        "wl.yaml",
        &[
            yaml::workload(
                "reviews-1",
                "shop",
                "reviews",
                "127.0.0.1",
                workload.addr.port(),
                "network-a",
            ),
            yaml::workload(
                "internal-1",
                "shop",
                "internal",
                "127.0.0.1",
                workload.addr.port(),
                "network-a",
            ),
        ]
        .join("---\n"),
    );
    let dir = tempfile::tempdir().unwrap();
    let cert_dir = mesh::gateway_credentials(&reg, "network-a", dir.path()).await;
    let mut cfg = GatewayConfig::new(
        "network-a",
        CLUSTER,
        RegistrySettings {
            addr: reg.grpc_addr().to_string(),
            root_cert: reg.ca_root(),
            cert_dir,
            trust_domain: TRUST_DOMAIN.into(),
        },
    );
    let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
    cfg.sni_addr = lo;
    cfg.tunnel_addr = Some(lo);
    cfg.admin_addr = Some(lo);
    cfg.metrics_addr = Some(lo);
    cfg.health_addr = Some(lo);
    cfg.handshake_timeout = Duration::from_millis(500);
    let gw = isthmus_gateway::run(cfg).await.unwrap();
    let routed = eventually(Duration::from_secs(20), || async {
        let d = gw.routes.load().lookup(REVIEWS, 9080, "").ok()?;
        let i = gw
            .routes
            .load()
            .lookup("internal.shop.svc.cluster.local", 9080, "")
            .ok()?;
        (d.targets().len() == 1 && i.targets().len() == 1).then_some(())
    })
    .await;
    assert!(routed.is_some(), "the gateway never routed reviews");
    let client = reg.credentials("shop", "web").await.unwrap();
    Setup {
        reg,
        _dir: dir,
        gw,
        workload,
        client,
    }
}

/// A TLS session through the gateway with `server_name` as SNI, verifying the server as
/// the reviews workload.
async fn tls_through(
    s: &Setup,
    to: SocketAddr,
    server_name: ServerName<'static>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let cfg = tls::client_config(
        Some(&s.client),
        &s.reg.bundle(),
        ServerIdentity::OneOf(vec![id("shop", "reviews")]),
        &[],
    )
    .unwrap();
    let tcp = TcpStream::connect(to).await?;
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(server_name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"))?
}

fn key(host: &str) -> ServerName<'static> {
    ServerName::try_from(SniKey::new(9080, "", host).to_string()).unwrap()
}

/// A call that must work: the greeting comes from the workload, whose identity (not the
/// gateway's) the client verified, and the workload saw the client's identity.
async fn good_call(s: &Setup, to: SocketAddr) {
    let mut tls = tls_through(s, to, key(REVIEWS)).await.expect("handshake");
    let server = tls::peer_identity(tls.get_ref().1.peer_certificates());
    assert_eq!(server, Some(id("shop", "reviews")));
    assert_eq!(mesh::read_line(&mut tls).await.unwrap(), "reviews-1");
    assert_eq!(mesh::echo(&mut tls, "ping").await.unwrap(), "ping");
    assert_eq!(s.workload.last_peer(), Some(id("shop", "web")));
}

async fn refused_count(s: &Setup, reason: &str) -> f64 {
    let text = http_get(s.gw.admin_addr.unwrap(), "/metrics")
        .await
        .unwrap()
        .1;
    metric(
        &text,
        &format!("isthmus_gateway_connections_refused_total{{direction=\"passthrough\",reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

/// Waits for the gateway to close `tcp` (EOF or reset), bounded generously.
async fn closed_by_gateway(tcp: &mut TcpStream) {
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await;
    match r {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("the gateway answered {n} bytes instead of closing"),
        Err(_) => panic!("the gateway did not close the connection"),
    }
}

async fn wait_refused(s: &Setup, reason: &str, at_least: f64) {
    let ok = eventually(Duration::from_secs(10), || async {
        (refused_count(s, reason).await >= at_least).then_some(())
    })
    .await;
    assert!(ok.is_some(), "no refusal counted for {reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_counted_and_the_gateway_keeps_serving() {
    let s = setup().await;
    let gw = s.gw.sni_addr;
    good_call(&s, gw).await;

    // Plaintext: refused on its first bytes.
    let mut tcp = TcpStream::connect(gw).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    closed_by_gateway(&mut tcp).await;
    wait_refused(&s, "not_tls", 1.0).await;
    good_call(&s, gw).await;

    // No SNI: rustls sends none for an IP address.
    let ip = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    assert!(tls_through(&s, gw, ip).await.is_err());
    wait_refused(&s, "no_sni", 1.0).await;

    // An SNI that is not a mesh key, and a key for a service nobody has.
    let other = ServerName::try_from("example.com").unwrap();
    assert!(tls_through(&s, gw, other).await.is_err());
    wait_refused(&s, "not_mesh_key", 1.0).await;
    assert!(tls_through(&s, gw, key("nope.shop.svc.cluster.local"))
        .await
        .is_err());
    wait_refused(&s, "unknown_service", 1.0).await;
    let wrong_port = ServerName::try_from(SniKey::new(9999, "", REVIEWS).to_string()).unwrap();
    assert!(tls_through(&s, gw, wrong_port).await.is_err());
    wait_refused(&s, "unknown_port", 1.0).await;
    assert!(tls_through(&s, gw, key("internal.shop.svc.cluster.local"))
        .await
        .is_err());
    wait_refused(&s, "not_exported", 1.0).await;
    good_call(&s, gw).await;

    // A client that connects and says nothing is closed once the handshake timeout passes.
    let mut silent = TcpStream::connect(gw).await.unwrap();
    closed_by_gateway(&mut silent).await;
    wait_refused(&s, "handshake_timeout", 1.0).await;

    // A ClientHello delivered one byte per segment is still routed.
    let splitter = ByteByByte::start(gw).await;
    good_call(&s, splitter.addr).await;
    assert!(
        splitter.split_writes() > 100,
        "the ClientHello was not split"
    );

    // Still serving, and every good call was counted once per result.
    good_call(&s, gw).await;
    let text = http_get(s.gw.admin_addr.unwrap(), "/metrics")
        .await
        .unwrap()
        .1;
    let ok = eventually(Duration::from_secs(5), || async {
        let text = http_get(s.gw.admin_addr.unwrap(), "/metrics").await.unwrap().1;
        let n = metric(
            &text,
            &format!("isthmus_gateway_connections_total{{direction=\"passthrough\",service=\"{REVIEWS}\",result=\"ok\"}}"),
        )?;
        (n >= 5.0).then_some(())
    })
    .await;
    assert!(ok.is_some(), "ok connections not counted:\n{text}");
    let (code, dump) = http_get(s.gw.admin_addr.unwrap(), "/config_dump")
        .await
        .unwrap();
    assert_eq!(code, 200);
    assert!(dump.contains(REVIEWS), "{dump}");
    let (code, _) = http_get(s.gw.health_addr.unwrap(), "/healthz/ready")
        .await
        .unwrap();
    assert_eq!(code, 200);
    s.gw.shutdown().await;
}

/// A forwarder that passes the client's first bytes on one byte per write (with
/// TCP_NODELAY, so one per segment), then relays normally.
struct ByteByByte {
    addr: SocketAddr,
    writes: Arc<std::sync::atomic::AtomicUsize>,
}

impl ByteByByte {
    async fn start(to: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = writes.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let up = TcpStream::connect(to).await.unwrap();
                    up.set_nodelay(true).unwrap();
                    let (mut cr, mut cw) = client.into_split();
                    let (mut ur, mut uw) = up.into_split();
                    let back = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut ur, &mut cw).await;
                    });
                    let mut buf = [0u8; 4096];
                    let mut first = true;
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if first {
                            for b in &buf[..n] {
                                if uw.write_all(std::slice::from_ref(b)).await.is_err() {
                                    return;
                                }
                                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_micros(200)).await;
                            }
                            first = false;
                        } else if uw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = uw.shutdown().await;
                    let _ = back.await;
                });
            }
        });
        Self { addr, writes }
    }

    fn split_writes(&self) -> usize {
        self.writes.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The sum of `metric` over the series whose labels include every `name="value"` given.
fn istio_sum(text: &str, metric: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Istio's standard metrics at the gateway: a routed connection is opened and closed as
/// `reporter="source"` with the catalog's destination; one whose endpoint refuses is opened
/// and closed at once with `response_flags="CONNECT"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_metrics_count_routed_connections_and_connect_failures() {
    let s = setup().await;
    let to = s.gw.sni_addr;
    let admin = s.gw.admin_addr.unwrap();
    // Connected, the destination is the catalog's workload; refused, nobody knows it.
    let closed = |flags: &'static str| async move {
        let text = http_get(admin, "/metrics").await.unwrap().1;
        let workload = if flags == "-" { "reviews" } else { "unknown" };
        let labels = [
            "reporter=\"source\"",
            "source_workload=\"gateway-network-a\"",
            "destination_service=\"reviews.shop.svc.cluster.local\"",
            &format!("destination_workload=\"{workload}\""),
            &format!("destination_app=\"{workload}\""),
            &format!("response_flags=\"{flags}\""),
        ];
        let opened = istio_sum(&text, "istio_tcp_connections_opened_total", &labels);
        let closed = istio_sum(&text, "istio_tcp_connections_closed_total", &labels);
        (opened, closed, text)
    };
    good_call(&s, to).await;
    let done = eventually(Duration::from_secs(10), || async {
        let (opened, closed, _) = closed("-").await;
        (opened == 1.0 && closed == 1.0).then_some(())
    })
    .await;
    assert!(done.is_some(), "{}", closed("-").await.2);

    s.workload.stop().await;
    assert!(tls_through(&s, to, key(REVIEWS)).await.is_err());
    let failed = eventually(Duration::from_secs(10), || async {
        let (opened, closed, _) = closed("CONNECT").await;
        (opened == 1.0 && closed == 1.0).then_some(())
    })
    .await;
    assert!(failed.is_some(), "{}", closed("CONNECT").await.2);
}
