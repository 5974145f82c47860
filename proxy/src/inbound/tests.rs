//! Real mTLS on loopback: a test CA, workload certificates, an echo app behind the inbound
//! listener, and clients that present (or do not present) certificates.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use isthmus_proto::tls::ServerIdentity;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use super::*;
use crate::authz::admission::Admission;
use crate::authz::Rule;
use crate::metrics::RefusalLabels;
use isthmus_proto::test_pki::TestCa;

const TD: &str = "cluster.local";
/// What clients put in their ClientHello.
const SNI: &str = "web.shop.svc.cluster.local";
/// Bounds a step that should take milliseconds, so a bug fails the test instead of hanging.
const STEP: Duration = Duration::from_secs(10);

/// A local app that echoes what it reads and counts the connections it accepted.
struct EchoApp {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

async fn echo_app() -> EchoApp {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    EchoApp { addr, accepted }
}

/// An address nothing listens on.
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

struct Setup {
    ca: TestCa,
    app: EchoApp,
    ib: Arc<Inbound>,
    listener: Arc<TcpListener>,
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<InboundConnection>>>,
}

async fn setup(mode: Mode, policy: AuthorizationPolicy) -> Setup {
    let ca = TestCa::new(TD);
    let bundle = ca.bundle();
    setup_with(ca, &bundle, mode, policy).await
}

/// The app's proxy presents `shop/web` from `ca` and verifies clients against `bundle`.
async fn setup_with(
    ca: TestCa,
    bundle: &TrustBundle,
    mode: Mode,
    policy: AuthorizationPolicy,
) -> Setup {
    let app = echo_app().await;
    let server = Inbound::server_config(&ca.workload("shop", "web"), bundle).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hook_seen = seen.clone();
    let ib = Arc::new(Inbound {
        tls: Arc::new(ArcSwap::from_pointee(server)),
        admission: Admission::new(&policy),
        policy: Arc::new(ArcSwap::from_pointee(policy)),
        mode,
        app: AppTarget::Fixed(app.addr),
        metrics: Arc::new(Metrics::default()),
        tracker: Tracker::new(),
        handshake_timeout: Duration::from_millis(300),
        connect_timeout: Duration::from_secs(2),
        max_connections: 64,
        on_connection: Some(Arc::new(move |c: &InboundConnection| {
            hook_seen.lock().unwrap().push(c.clone())
        })),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    Setup {
        ca,
        app,
        ib,
        listener: Arc::new(listener),
        addr,
        seen,
    }
}

impl Setup {
    /// Handles the next connection like `serve` does; resolves to its access record once
    /// the proxy is done with it, so metrics and the app can be checked without racing.
    fn serve_one(&self) -> JoinHandle<AccessRecord> {
        let ib = self.ib.clone();
        let listener = self.listener.clone();
        tokio::spawn(async move {
            let (tcp, client) = listener.accept().await.unwrap();
            let mut rec = AccessRecord::new(0, DIRECTION, client);
            handle(&ib, tcp, &mut rec).await;
            rec
        })
    }

    /// Runs the real listener on a fresh port; returns its task and address.
    async fn serve(&self, shutdown: drain::Watch) -> (JoinHandle<()>, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (
            tokio::spawn(serve(listener, self.ib.clone(), shutdown)),
            addr,
        )
    }

    fn server_id(&self) -> SpiffeId {
        self.ca.id("shop", "web")
    }

    fn service(&self) -> String {
        self.app.addr.to_string()
    }

    fn connections(&self, result: ConnResult) -> u64 {
        self.ib
            .metrics
            .connections
            .get_or_create(&ConnLabels {
                direction: DIRECTION,
                service: self.service(),
                result,
            })
            .get()
    }

    fn refused(&self, reason: &str) -> u64 {
        self.ib
            .metrics
            .refused
            .get_or_create(&RefusalLabels {
                direction: DIRECTION,
                reason: reason.to_string(),
            })
            .get()
    }

    fn seen(&self) -> Vec<InboundConnection> {
        self.seen.lock().unwrap().clone()
    }

    fn app_connections(&self) -> usize {
        self.app.accepted.load(Ordering::SeqCst)
    }

    /// An mTLS client presenting `creds` (none: no client certificate) that trusts the
    /// proxy's CA and expects its identity.
    async fn tls_client(
        &self,
        addr: SocketAddr,
        creds: Option<&Credentials>,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let cfg = tls::client_config(
            creds,
            &self.ca.bundle(),
            ServerIdentity::OneOf(vec![self.server_id()]),
            &[],
        )
        .unwrap();
        let tcp = TcpStream::connect(addr).await?;
        TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from(SNI).unwrap(), tcp)
            .await
    }

    /// Sends `payload` over mTLS to the listener `serve_one` handles, closes the sending
    /// side and returns what came back.
    async fn tls_exchange(
        &self,
        creds: Option<&Credentials>,
        payload: &[u8],
    ) -> io::Result<Vec<u8>> {
        self.tls_exchange_with(self.addr, creds, payload).await
    }

    async fn tls_exchange_with(
        &self,
        addr: SocketAddr,
        creds: Option<&Credentials>,
        payload: &[u8],
    ) -> io::Result<Vec<u8>> {
        tokio::time::timeout(STEP, async {
            let mut s = self.tls_client(addr, creds).await?;
            s.write_all(payload).await?;
            s.shutdown().await?;
            let mut back = Vec::new();
            s.read_to_end(&mut back).await?;
            Ok(back)
        })
        .await
        .expect("the exchange finished")
    }

    /// The same over plain TCP.
    async fn plaintext_exchange(&self, payload: &[u8]) -> io::Result<Vec<u8>> {
        tokio::time::timeout(STEP, async {
            let mut s = TcpStream::connect(self.addr).await?;
            s.write_all(payload).await?;
            s.shutdown().await?;
            let mut back = Vec::new();
            s.read_to_end(&mut back).await?;
            Ok(back)
        })
        .await
        .expect("the exchange finished")
    }
}

async fn record(task: JoinHandle<AccessRecord>) -> AccessRecord {
    tokio::time::timeout(STEP, task)
        .await
        .expect("the proxy finished with the connection")
        .unwrap()
}

/// The client got nothing back: the connection was closed (cleanly or not) without data.
fn assert_closed_without_data(got: io::Result<Vec<u8>>) {
    if let Ok(b) = got {
        assert!(b.is_empty(), "got {b:?}");
    }
}

fn policy(allow: Vec<Rule>, deny: Vec<Rule>) -> AuthorizationPolicy {
    AuthorizationPolicy {
        allow,
        deny,
        ..Default::default()
    }
}

fn principals(p: &[&str]) -> Rule {
    Rule {
        principals: p.iter().map(|s| s.to_string()).collect(),
        namespaces: vec![],
    }
}

fn namespaces(n: &[&str]) -> Rule {
    Rule {
        principals: vec![],
        namespaces: n.iter().map(|s| s.to_string()).collect(),
    }
}

#[tokio::test]
async fn mtls_client_reaches_the_app_and_the_hook_sees_its_identity() {
    let s = setup(Mode::Strict, AuthorizationPolicy::default()).await;
    let (trigger, shutdown) = drain::channel();
    let (server, addr) = s.serve(shutdown).await;
    let cart = s.ca.workload("shop", "cart");
    let back = s
        .tls_exchange_with(addr, Some(&cart), b"hello app")
        .await
        .unwrap();
    assert_eq!(back, b"hello app");
    // Waits for the connection's task to finish (and count) instead of sleeping.
    assert_eq!(s.ib.tracker.drain(STEP).await, 0);
    let seen = s.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].peer.as_ref(), Some(&cart.identity));
    assert_eq!(seen[0].sni.as_deref(), Some(SNI));
    assert_eq!(s.connections(ConnResult::ok), 1);
    assert_eq!(s.app_connections(), 1);
    trigger.fire();
    tokio::time::timeout(STEP, server).await.unwrap().unwrap();
}

#[tokio::test]
async fn the_access_record_names_the_peer_sni_app_and_bytes() {
    let s = setup(Mode::Strict, AuthorizationPolicy::default()).await;
    let rec = s.serve_one();
    let cart = s.ca.workload("shop", "cart");
    let back = s.tls_exchange(Some(&cart), b"0123456789").await.unwrap();
    assert_eq!(back, b"0123456789");
    let rec = record(rec).await;
    assert_eq!(
        rec.peer_identity.as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/cart")
    );
    assert_eq!(rec.destination, SNI);
    assert_eq!(rec.service, Some(s.service()));
    assert_eq!(rec.endpoint, Some(s.app.addr));
    assert_eq!(rec.result, "ok");
    assert_eq!(rec.error, None);
    assert_eq!((rec.bytes_to_upstream, rec.bytes_from_upstream), (10, 10));
    let bytes = |flow| {
        s.ib.metrics
            .bytes
            .get_or_create(&BytesLabels {
                direction: DIRECTION,
                service: s.service(),
                flow,
            })
            .get()
    };
    assert_eq!(
        (bytes(Flow::to_upstream), bytes(Flow::from_upstream)),
        (10, 10)
    );
}

#[tokio::test]
async fn denied_principal_is_closed_before_the_app() {
    let s = setup(
        Mode::Strict,
        policy(vec![], vec![principals(&["cluster.local/ns/shop/sa/cart"])]),
    )
    .await;
    let rec = s.serve_one();
    let cart = s.ca.workload("shop", "cart");
    assert_closed_without_data(s.tls_exchange(Some(&cart), b"secret").await);
    let rec = record(rec).await;
    assert_eq!(rec.result, "denied");
    assert_eq!(
        rec.error.as_deref(),
        Some("deny rule 0 matched principal cluster.local/ns/shop/sa/cart")
    );
    // The identity is logged for a denied connection too.
    assert_eq!(rec.peer_identity, Some(cart.identity.to_string()));
    assert_eq!(rec.endpoint, None);
    assert_eq!(s.connections(ConnResult::denied), 1);
    assert_eq!(s.connections(ConnResult::ok), 0);
    assert_eq!(s.app_connections(), 0, "no byte may reach the app");
    assert!(
        s.seen().is_empty(),
        "the hook is for authorized connections"
    );
}

#[tokio::test]
async fn allow_list_lets_listed_principals_through_and_denies_the_rest() {
    let s = setup(
        Mode::Strict,
        policy(
            vec![principals(&["spiffe://cluster.local/ns/shop/sa/cart"])],
            vec![],
        ),
    )
    .await;
    let rec = s.serve_one();
    let back = s
        .tls_exchange(Some(&s.ca.workload("shop", "cart")), b"in")
        .await
        .unwrap();
    assert_eq!(back, b"in");
    assert_eq!(record(rec).await.result, "ok");

    let rec = s.serve_one();
    assert_closed_without_data(
        s.tls_exchange(Some(&s.ca.workload("ops", "admin")), b"out")
            .await,
    );
    let rec = record(rec).await;
    assert_eq!(rec.result, "denied");
    assert_eq!(
        rec.error.as_deref(),
        Some("no allow rule matched principal cluster.local/ns/ops/sa/admin")
    );
    assert_eq!(s.connections(ConnResult::ok), 1);
    assert_eq!(s.connections(ConnResult::denied), 1);
    assert_eq!(s.app_connections(), 1);
}

#[tokio::test]
async fn a_swapped_policy_applies_to_the_next_connection() {
    let s = setup(Mode::Strict, AuthorizationPolicy::default()).await;
    let cart = s.ca.workload("shop", "cart");
    let rec = s.serve_one();
    assert_eq!(s.tls_exchange(Some(&cart), b"a").await.unwrap(), b"a");
    assert_eq!(record(rec).await.result, "ok");
    s.ib.policy
        .store(Arc::new(policy(vec![namespaces(&["ops"])], vec![])));
    let rec = s.serve_one();
    assert_closed_without_data(s.tls_exchange(Some(&cart), b"a").await);
    assert_eq!(record(rec).await.result, "denied");
}

#[tokio::test]
async fn client_without_a_certificate_is_refused_in_both_modes() {
    for mode in [Mode::Strict, Mode::Permissive] {
        let s = setup(mode, AuthorizationPolicy::default()).await;
        let rec = s.serve_one();
        assert_closed_without_data(s.tls_exchange(None, b"anonymous").await);
        let rec = record(rec).await;
        assert_eq!(rec.result, "no_client_certificate", "{mode}");
        assert_eq!(s.refused("no_client_certificate"), 1, "{mode}");
        assert_eq!(rec.peer_identity, None);
        assert_eq!(s.app_connections(), 0, "{mode}");
        assert!(s.seen().is_empty());
    }
}

#[tokio::test]
async fn strict_mode_refuses_plaintext() {
    let s = setup(Mode::Strict, AuthorizationPolicy::default()).await;
    let rec = s.serve_one();
    assert_closed_without_data(s.plaintext_exchange(b"GET / HTTP/1.1\r\n\r\n").await);
    let rec = record(rec).await;
    assert_eq!(rec.result, "plaintext_in_strict_mode");
    assert!(
        rec.error.as_deref().unwrap().contains("0x47"),
        "{:?}",
        rec.error
    );
    assert_eq!(s.refused("plaintext_in_strict_mode"), 1);
    assert_eq!(s.app_connections(), 0);
}

#[tokio::test]
async fn permissive_mode_relays_plaintext_without_an_identity_and_still_speaks_mtls() {
    let s = setup(Mode::Permissive, AuthorizationPolicy::default()).await;
    let rec = s.serve_one();
    let back = s.plaintext_exchange(b"plain hello").await.unwrap();
    assert_eq!(back, b"plain hello");
    let rec = record(rec).await;
    assert_eq!(rec.result, "ok");
    assert_eq!(rec.peer_identity, None);
    assert_eq!(rec.destination, "");

    let rec = s.serve_one();
    let cart = s.ca.workload("shop", "cart");
    assert_eq!(
        s.tls_exchange(Some(&cart), b"tls hello").await.unwrap(),
        b"tls hello"
    );
    assert_eq!(
        record(rec).await.peer_identity,
        Some(cart.identity.to_string())
    );

    let seen = s.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        (seen[0].peer.as_ref(), seen[0].sni.as_deref()),
        (None, None)
    );
    assert_eq!(seen[1].peer.as_ref(), Some(&cart.identity));
    assert_eq!(s.connections(ConnResult::ok), 2);
    assert_eq!(s.app_connections(), 2);
}

#[tokio::test]
async fn permissive_mode_denies_plaintext_when_the_policy_names_peers() {
    let s = setup(
        Mode::Permissive,
        policy(vec![namespaces(&["shop"])], vec![]),
    )
    .await;
    let rec = s.serve_one();
    assert_closed_without_data(s.plaintext_exchange(b"plain").await);
    let rec = record(rec).await;
    assert_eq!(rec.result, "denied");
    assert_eq!(
        rec.error.as_deref(),
        Some("no allow rule matched a plaintext peer (no identity)")
    );
    assert_eq!(s.connections(ConnResult::denied), 1);
    assert_eq!(s.app_connections(), 0);
}

#[tokio::test]
async fn a_silent_client_is_closed_after_the_handshake_timeout() {
    for mode in [Mode::Strict, Mode::Permissive] {
        // Nothing at all, and a TLS record header that never gets its body.
        for sent in [&b""[..], &[0x16, 0x03, 0x01][..]] {
            let s = setup(mode, AuthorizationPolicy::default()).await;
            let rec = s.serve_one();
            let mut c = TcpStream::connect(s.addr).await.unwrap();
            c.write_all(sent).await.unwrap();
            let rec = record(rec).await;
            assert_eq!(rec.result, "handshake_timeout", "{mode} {sent:?}");
            assert_eq!(s.refused("handshake_timeout"), 1);
            let mut buf = [0u8; 16];
            let read = tokio::time::timeout(STEP, c.read(&mut buf))
                .await
                .expect("the proxy closed the connection");
            assert!(matches!(read, Ok(0) | Err(_)), "{mode} {sent:?}: {read:?}");
            assert_eq!(s.app_connections(), 0);
        }
    }
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let s = setup(Mode::Strict, AuthorizationPolicy::default()).await;
    // Same trust domain name, different CA: the chain does not lead to the bundle.
    let impostor = TestCa::new(TD).workload("shop", "cart");
    let rec = s.serve_one();
    assert_closed_without_data(s.tls_exchange(Some(&impostor), b"x").await);
    let rec = record(rec).await;
    assert_eq!(rec.result, "peer_rejected");
    assert_eq!(s.refused("peer_rejected"), 1);
    assert_eq!(s.app_connections(), 0);
}

#[tokio::test]
async fn a_certificate_from_another_trust_domain_is_refused() {
    // The proxy trusts the other CA's root, but only for identities in its own trust
    // domain: a chain that verifies is not enough.
    let ca = TestCa::new(TD);
    let other = TestCa::new("other.example");
    let bundle = TrustBundle::new(vec![ca.root(), other.root()], TD, &[]).unwrap();
    let s = setup_with(ca, &bundle, Mode::Strict, AuthorizationPolicy::default()).await;
    let foreign = other.workload("shop", "cart");
    let rec = s.serve_one();
    assert_closed_without_data(s.tls_exchange(Some(&foreign), b"x").await);
    let rec = record(rec).await;
    assert_eq!(rec.result, "peer_rejected");
    let error = rec.error.unwrap();
    assert!(error.contains("outside the trust domain"), "{error}");
    assert_eq!(s.refused("peer_rejected"), 1);
    assert_eq!(s.app_connections(), 0);
}

#[tokio::test]
async fn an_app_that_is_not_listening_is_counted() {
    let mut s = setup(Mode::Strict, AuthorizationPolicy::default()).await;
    let down = closed_port().await;
    let mut ib = Arc::into_inner(s.ib).unwrap();
    ib.app = AppTarget::Fixed(down);
    s.ib = Arc::new(ib);
    let rec = s.serve_one();
    assert_closed_without_data(
        s.tls_exchange(Some(&s.ca.workload("shop", "cart")), b"x")
            .await,
    );
    let rec = record(rec).await;
    assert_eq!(rec.result, "upstream_connect_failed");
    assert!(rec.error.unwrap().contains(&down.to_string()));
    let failed =
        s.ib.metrics
            .connections
            .get_or_create(&ConnLabels {
                direction: DIRECTION,
                service: down.to_string(),
                result: ConnResult::upstream_connect_failed,
            })
            .get();
    assert_eq!(failed, 1);
}

#[tokio::test]
async fn the_drain_deadline_closes_relayed_connections() {
    let s = setup(Mode::Strict, AuthorizationPolicy::default()).await;
    let (_trigger, shutdown) = drain::channel();
    let (_server, addr) = s.serve(shutdown).await;
    let mut c = s
        .tls_client(addr, Some(&s.ca.workload("shop", "cart")))
        .await
        .unwrap();
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(STEP, c.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping");
    assert_eq!(s.ib.tracker.drain(Duration::from_millis(50)).await, 1);
    assert_eq!(s.ib.tracker.open(), 0);
    assert_eq!(s.connections(ConnResult::drained), 1);
    let mut rest = Vec::new();
    let end = tokio::time::timeout(STEP, c.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
}

#[test]
fn modes_parse_as_istio_spells_them() {
    assert_eq!("STRICT".parse::<Mode>().unwrap(), Mode::Strict);
    assert_eq!("permissive".parse::<Mode>().unwrap(), Mode::Permissive);
    let err = "DISABLE".parse::<Mode>().unwrap_err();
    assert!(err.contains("STRICT or PERMISSIVE"), "{err}");
    assert_eq!(Mode::Permissive.to_string(), "PERMISSIVE");
}

/// Without capture rules nothing redirected the connection: `OriginalPort` must not send it
/// anywhere (its original destination, if conntrack knows one, is the listener itself).
#[tokio::test]
async fn original_port_refuses_a_connection_that_was_not_redirected() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    let target = AppTarget::OriginalPort {
        host: "127.0.0.1".parse().unwrap(),
    };
    let err = target.resolve(&server).unwrap_err();
    match err.kind() {
        io::ErrorKind::InvalidInput => assert!(err.to_string().contains("would loop"), "{err}"),
        io::ErrorKind::NotFound => assert!(err.to_string().contains("redirect"), "{err}"),
        other => panic!("unexpected {other:?}: {err}"),
    }
}

// ---- Istio's standard metrics, as the destination reports them ----

mod istio_metrics {
    use std::collections::BTreeMap;

    use isthmus_proto::model::{Address, EndpointKind, Health, Locality, ViewEndpoint};
    use isthmus_proto::subscription::LocalView;
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::metrics::istio::tests::service_view;
    use crate::metrics::istio::{Catalog, Local, Peer};

    /// Where the catalog has the web workload (this proxy's own) and the cart client.
    const WEB_IP: &str = "127.0.0.3";
    const CART_IP: &str = "127.0.0.1";

    fn endpoint(ip: &str, id: &SpiffeId, labels: &[(&str, &str)]) -> ViewEndpoint {
        ViewEndpoint {
            kind: EndpointKind::Workload,
            address: Address::parse(ip).unwrap(),
            ports: [(9080, 8080)].into_iter().collect(),
            network: "network-a".into(),
            cluster: "cluster-a".into(),
            locality: Locality::default(),
            identities: vec![id.clone()],
            weight: 1,
            health: Health::Healthy,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            uid: format!("uid-{ip}"),
            tunnel_port: 0,
            stale_since_ms: 0,
            subset_weights: Default::default(),
        }
    }

    /// Tells the proxy who it is (web, v1) and what the catalog holds.
    fn report_as_web(s: &Setup) {
        let web = s.server_id();
        let cart = s.ca.id("shop", "cart");
        let view = LocalView {
            version: "v.1".into(),
            resources: [
                service_view(
                    "web",
                    vec![endpoint(WEB_IP, &web, &[("app", "web"), ("version", "v1")])],
                ),
                service_view(
                    "cart",
                    vec![endpoint(
                        CART_IP,
                        &cart,
                        &[("app", "cart"), ("version", "v3")],
                    )],
                ),
            ]
            .into_iter()
            .collect(),
        };
        let m = &s.ib.metrics.istio;
        m.set_catalog(Catalog::build(&view));
        let labels: BTreeMap<String, String> = [("app", "web"), ("version", "v1")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        m.set_local(Local {
            peer: Peer::from_labels(Some("web"), &labels, "cluster-a", Some(&web)),
            address: Some(WEB_IP.parse().unwrap()),
        });
    }

    /// The Istio metrics as Prometheus scrapes them.
    fn exposition(s: &Setup) -> String {
        let m = &s.ib.metrics.istio;
        let mut registry = Registry::default();
        let r = registry.sub_registry_with_prefix("istio");
        r.register("tcp_connections_opened", "", m.opened.clone());
        r.register("tcp_connections_closed", "", m.closed.clone());
        r.register("tcp_received_bytes", "", m.received_bytes.clone());
        r.register("tcp_sent_bytes", "", m.sent_bytes.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    /// The value of the one series of `metric` whose labels contain every one of `labels`.
    fn value(text: &str, metric: &str, labels: &[&str]) -> Option<u64> {
        let found: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(&format!("{metric}{{")))
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .collect();
        assert!(found.len() <= 1, "{found:?}");
        found.first()?.rsplit(' ').next()?.parse().ok()
    }

    #[tokio::test]
    async fn an_mtls_peer_is_the_source_and_this_workload_the_destination() {
        let s = setup(Mode::Strict, AuthorizationPolicy::default()).await;
        report_as_web(&s);
        let rec = s.serve_one();
        let cart = s.ca.workload("shop", "cart");
        let back = s.tls_exchange(Some(&cart), b"0123456789").await.unwrap();
        assert_eq!(back, b"0123456789");
        record(rec).await;
        let text = exposition(&s);
        let series = [
            "reporter=\"destination\"",
            "source_workload=\"cart\"",
            "source_canonical_revision=\"v3\"",
            "source_workload_namespace=\"shop\"",
            "source_principal=\"spiffe://cluster.local/ns/shop/sa/cart\"",
            "source_app=\"cart\"",
            "source_version=\"v3\"",
            "source_cluster=\"cluster-a\"",
            "destination_service=\"web.shop.svc.cluster.local\"",
            "destination_service_name=\"web\"",
            "destination_workload=\"web\"",
            "destination_principal=\"spiffe://cluster.local/ns/shop/sa/web\"",
            "destination_app=\"web\"",
            "destination_version=\"v1\"",
            "request_protocol=\"tcp\"",
            "response_flags=\"-\"",
            "connection_security_policy=\"mutual_tls\"",
        ];
        for metric in [
            "istio_tcp_connections_opened_total",
            "istio_tcp_connections_closed_total",
        ] {
            assert_eq!(value(&text, metric, &series), Some(1), "{metric}\n{text}");
        }
        assert_eq!(
            value(&text, "istio_tcp_received_bytes_total", &series),
            Some(10)
        );
        assert_eq!(
            value(&text, "istio_tcp_sent_bytes_total", &series),
            Some(10)
        );
    }

    #[tokio::test]
    async fn a_denied_connection_is_opened_and_closed_with_deny() {
        let s = setup(
            Mode::Strict,
            policy(vec![], vec![principals(&["cluster.local/ns/shop/sa/cart"])]),
        )
        .await;
        report_as_web(&s);
        let rec = s.serve_one();
        let cart = s.ca.workload("shop", "cart");
        assert_closed_without_data(s.tls_exchange(Some(&cart), b"secret").await);
        record(rec).await;
        let text = exposition(&s);
        let denied = ["source_workload=\"cart\"", "response_flags=\"DENY\""];
        assert_eq!(
            value(&text, "istio_tcp_connections_opened_total", &denied),
            Some(1),
            "{text}"
        );
        assert_eq!(
            value(&text, "istio_tcp_connections_closed_total", &denied),
            Some(1)
        );
        assert_eq!(
            value(&text, "istio_tcp_received_bytes_total", &denied).unwrap_or(0),
            0,
            "no byte reached the app"
        );
    }

    #[tokio::test]
    async fn an_app_that_is_not_listening_is_opened_and_closed_with_connect() {
        let mut s = setup(Mode::Strict, AuthorizationPolicy::default()).await;
        let mut ib = Arc::into_inner(s.ib).unwrap();
        ib.app = AppTarget::Fixed(closed_port().await);
        s.ib = Arc::new(ib);
        report_as_web(&s);
        let rec = s.serve_one();
        let cart = s.ca.workload("shop", "cart");
        assert_closed_without_data(s.tls_exchange(Some(&cart), b"x").await);
        record(rec).await;
        let text = exposition(&s);
        let failed = ["source_workload=\"cart\"", "response_flags=\"CONNECT\""];
        for metric in [
            "istio_tcp_connections_opened_total",
            "istio_tcp_connections_closed_total",
        ] {
            assert_eq!(value(&text, metric, &failed), Some(1), "{metric}\n{text}");
        }
        assert_eq!(
            value(
                &text,
                "istio_tcp_connections_opened_total",
                &["response_flags=\"-\""]
            ),
            None
        );
    }

    #[tokio::test]
    async fn a_plaintext_peer_is_unknown_and_the_policy_none() {
        let s = setup(Mode::Permissive, AuthorizationPolicy::default()).await;
        report_as_web(&s);
        let rec = s.serve_one();
        assert_eq!(s.plaintext_exchange(b"plain").await.unwrap(), b"plain");
        record(rec).await;
        let text = exposition(&s);
        // The catalog has cart at this address, but a plaintext peer proves nothing.
        let series = [
            "source_workload=\"unknown\"",
            "source_principal=\"unknown\"",
            "destination_workload=\"web\"",
            "destination_principal=\"unknown\"",
            "connection_security_policy=\"none\"",
        ];
        assert_eq!(
            value(&text, "istio_tcp_connections_closed_total", &series),
            Some(1),
            "{text}"
        );
        assert_eq!(
            value(&text, "istio_tcp_received_bytes_total", &series),
            Some(5)
        );
    }
}
