//! The workload side's outbound path: for a destination service and port, pick an endpoint
//! from the caller's network view (a local workload directly, a remote network through
//! its gateway), originate mTLS with the workload's certificate and the SNI key
//! `outbound_.<port>_.<subset>_.<hostname>`, and accept the server only if its verified
//! identity is one of the service's identities. Through a remote gateway the session is
//! still end to end: the gateway routes on the SNI and never terminates it.
//!
//! [`serve`] is the explicit local listener a plaintext app connects to (no capture):
//! every connection on it is carried as mTLS to one configured destination.
//! [`serve_with`] takes the destination from each connection instead (the VM agent's
//! capture listener: the original destination of a redirected connection).
//!
//! Istio's standard metrics count each connection to a known service as
//! `reporter="source"`: the program's own workload as the source, the destination the
//! catalog's workload at the endpoint when it is the server identity verified (through a
//! remote gateway, what that identity alone says), `CONNECT` when no endpoint answered.
//! A connection that reached an endpoint is also counted in
//! `isthmus_tcp_connections_opened_total` with the program's network, the endpoint's (for a
//! gateway, the remote network's) and the transport: `sni-gateway` through a remote
//! network's gateway, `hbone` over a pooled tunnel, else `direct`.
//!
//! With a tunnel pool ([`Outbound::tunnel`]), a connection to a workload whose proxy
//! accepts tunnels (its endpoint has a tunnel port) is carried as a stream of the pooled
//! tunnel to that proxy instead of an mTLS connection of its own: the tunnel's mTLS is the
//! same certificates, verified against the same identities, so the app's bytes ride on it
//! as they are, and only the first connection to a peer pays a handshake.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use isthmus_proto::drain;
use isthmus_proto::sni::SniKey;
use isthmus_proto::tls::{self, Credentials, ServerIdentity, TlsError, TrustBundle};
use isthmus_proto::SpiffeId;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::client_hello::{self, ClientHelloReader, Hello};
use crate::connection::{accept_loop, finish_relay, AccessRecord, Tracker};
use crate::metrics::istio::{
    self, IstioLabels, Peer, Reporter, ResponseFlags, SecurityPolicy, Transit, Transport,
};
use crate::metrics::{ConnResult, Direction, Metrics};
use crate::routes::{LookupError, RouteTable, Target};
use crate::tunnel::pool::{PoolKey, StreamRequest};
use crate::tunnel::{self, Pool, Stream};
use crate::upstream::{self, ConnectError, ConnectOptions, Lease};

const DIRECTION: Direction = Direction::outbound;

/// The workload's credentials and the mesh roots, with client configs cached per set of
/// accepted server identities (a config per connection would re-parse the roots).
pub struct ClientTls {
    creds: Credentials,
    bundle: TrustBundle,
    configs: Mutex<HashMap<ConfigKey, Arc<rustls::ClientConfig>>>,
}

/// A cached client config's accepted identities, and the ALPN it offers (none, a tunnel's
/// `h2`, a QUIC tunnel's).
type ConfigKey = (Vec<SpiffeId>, &'static [u8]);

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("identity", &self.creds.identity)
            .finish()
    }
}

/// Distinct server-identity sets cached before the cache is cleared (bounded memory).
const MAX_CACHED_CONFIGS: usize = 1024;

impl ClientTls {
    pub fn new(creds: Credentials, bundle: TrustBundle) -> Self {
        Self {
            creds,
            bundle,
            configs: Mutex::new(HashMap::new()),
        }
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.creds.identity
    }

    /// A config that accepts exactly `expected` (any identity of the trust domain when
    /// the catalog names none).
    pub fn config(&self, expected: &[SpiffeId]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        self.cached(expected, b"")
    }

    /// [`ClientTls::config`] for a tunnel: the same, offering ALPN `h2`.
    pub fn tunnel_config(
        &self,
        expected: &[SpiffeId],
    ) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        self.cached(expected, tunnel::ALPN_H2)
    }

    /// [`ClientTls::config`] for a QUIC tunnel: the same, offering its ALPN.
    pub fn quic_config(
        &self,
        expected: &[SpiffeId],
    ) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        self.cached(expected, tunnel::quic::ALPN_QUIC)
    }

    fn cached(
        &self,
        expected: &[SpiffeId],
        alpn: &'static [u8],
    ) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let key = (expected.to_vec(), alpn);
        let mut cache = self.configs.lock().expect("tls cache poisoned");
        if let Some(c) = cache.get(&key) {
            return Ok(c.clone());
        }
        let identity = if expected.is_empty() {
            ServerIdentity::TrustDomain
        } else {
            ServerIdentity::OneOf(expected.to_vec())
        };
        let offered: &[&[u8]] = if alpn.is_empty() { &[] } else { &[alpn] };
        let cfg = Arc::new(tls::client_config(
            Some(&self.creds),
            &self.bundle,
            identity,
            offered,
        )?);
        if cache.len() >= MAX_CACHED_CONFIGS {
            cache.clear();
        }
        cache.insert(key, cfg.clone());
        Ok(cfg)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("cannot build the client TLS config: {0}")]
    Tls(#[from] TlsError),
    #[error("SNI {0:?} is not a valid TLS server name")]
    ServerName(String),
}

impl OutboundError {
    pub fn result(&self) -> ConnResult {
        match self {
            OutboundError::Connect(e) => e.result(),
            _ => ConnResult::upstream_connect_failed,
        }
    }
}

/// Where an outbound connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundTarget {
    pub hostname: String,
    pub port: u16,
    /// Empty: every endpoint.
    pub subset: String,
    /// The server name the app sent in its ClientHello, for the VirtualService's `tls`
    /// routes; `None` lets [`serve_with`] read it when the host has such routes.
    pub sni: Option<String>,
}

/// The bytes' way to an endpoint: an mTLS connection of its own, or a stream of a pooled
/// tunnel to the endpoint's proxy.
#[derive(Debug)]
pub enum MeshStream {
    Tls(Box<TlsStream<TcpStream>>),
    /// A stream of the tunnel to the workload's proxy.
    Tunnel(Stream),
    /// The end-to-end mTLS inside a stream of the tunnel to the network's gateway.
    TunnelTls(Box<TlsStream<Stream>>),
}

impl MeshStream {
    pub fn is_tunnel(&self) -> bool {
        !matches!(self, MeshStream::Tls(_))
    }

    /// The transport of the tunnel carrying it (`hbone`, `quic`), if one does.
    pub fn tunnel_transport(&self) -> Option<&'static str> {
        match self {
            MeshStream::Tls(_) => None,
            MeshStream::Tunnel(s) => Some(s.transport()),
            MeshStream::TunnelTls(s) => Some(s.get_ref().0.transport()),
        }
    }
}

impl AsyncRead for MeshStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MeshStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            MeshStream::Tunnel(s) => Pin::new(s).poll_read(cx, buf),
            MeshStream::TunnelTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MeshStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            MeshStream::Tunnel(s) => Pin::new(s).poll_write(cx, buf),
            MeshStream::TunnelTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MeshStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            MeshStream::Tunnel(s) => Pin::new(s).poll_flush(cx),
            MeshStream::TunnelTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MeshStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            MeshStream::Tunnel(s) => Pin::new(s).poll_shutdown(cx),
            MeshStream::TunnelTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An established connection to a service endpoint: mTLS, or a stream of an mTLS tunnel.
#[derive(Debug)]
pub struct OutboundStream {
    pub stream: MeshStream,
    /// Where the TCP connection went: the workload, or the remote network's gateway.
    pub target: Arc<Target>,
    /// The server's verified identity (the workload's, also through a gateway).
    pub server_identity: Option<SpiffeId>,
    pub lease: Lease,
    /// The service, as the metric labels name it.
    pub service: istio::Service,
}

/// What outbound connections need.
#[derive(Debug)]
pub struct Outbound {
    pub routes: Arc<ArcSwap<RouteTable>>,
    /// Swapped when the certificate is renewed.
    pub tls: Arc<ArcSwap<ClientTls>>,
    pub metrics: Arc<Metrics>,
    pub tracker: Arc<Tracker>,
    pub connect: ConnectOptions,
    /// The local workload's labels, matched against routes' `sourceLabels`; swapped when
    /// they change (a VM's group template).
    pub source_labels: ArcSwap<BTreeMap<String, String>>,
    /// Pooled tunnels to the endpoints' proxies that accept them; `None`: every connection
    /// is mTLS of its own.
    pub tunnel: Option<Pool>,
}

impl Outbound {
    /// Connects to `target` over mTLS, or where its VirtualService routes it (see
    /// [`RouteTable::resolve`]); a failed TCP connect or handshake is counted against the
    /// endpoint and another one is tried.
    pub async fn connect(&self, target: &OutboundTarget) -> Result<OutboundStream, OutboundError> {
        let dest = self.routes.load().resolve(
            &target.hostname,
            target.port,
            &target.subset,
            &self.source_labels.load(),
            target.sni.as_deref(),
        )?;
        let key = &dest.key;
        let sni = SniKey::new(key.port, &key.subset, &key.hostname).to_string();
        let server_name = ServerName::try_from(sni.clone())
            .map_err(|_| OutboundError::ServerName(sni.clone()))?;
        let client_tls = self.tls.load_full();
        let service_identities = dest.identities();
        let (dest_ref, metrics) = (&dest, &*self.metrics);
        let up = upstream::connect_with(&dest, self.connect, metrics, |t, opts| {
            let expected = if t.identities.is_empty() {
                service_identities.clone()
            } else {
                t.identities.clone()
            };
            let server_name = server_name.clone();
            let client_tls = client_tls.clone();
            async move {
                let hop = Hop {
                    target: &t,
                    dest: dest_ref,
                    expected,
                    client_tls: &client_tls,
                    server_name,
                    opts,
                };
                if let Some(pool) = self.tunnel.as_ref() {
                    if let Some(opened) = self.through_tunnel(pool, &hop).await? {
                        return Ok(opened);
                    }
                }
                let config = hop
                    .client_tls
                    .config(&hop.expected)
                    .map_err(io::Error::other)?;
                let tcp = upstream::dial(t.addr, dest_ref, opts, metrics, DIRECTION).await?;
                let stream = handshake(config, hop.server_name, tcp, opts.timeout).await?;
                let peer = tls::peer_identity(stream.get_ref().1.peer_certificates());
                Ok((MeshStream::Tls(Box::new(stream)), peer))
            }
        })
        .await?;
        let (stream, server_identity) = up.stream;
        Ok(OutboundStream {
            stream,
            target: up.target,
            server_identity,
            lease: up.lease,
            service: dest.service.clone(),
        })
    }

    /// The connection over a pooled tunnel, where the endpoint's proxy (or its network's
    /// gateway) takes tunnels: `None` where it takes none, or its tunnel could not be set up
    /// lately (mTLS of its own, then; [`tunnel::FALLBACK_MEMORY`]).
    ///
    /// - To a workload: a stream to its `ip:port` on the tunnel to its proxy, which verifies
    ///   the workload's identity as its own mTLS would; the app's bytes ride on it as they
    ///   are.
    /// - Through a gateway: a stream to `hostname:port` (and subset) on the tunnel to the
    ///   gateway, which any proxy of the trust domain may serve; inside it, the end-to-end
    ///   mTLS to the workload with its SNI key, exactly as SNI passthrough would carry it.
    async fn through_tunnel(
        &self,
        pool: &Pool,
        hop: &Hop<'_>,
    ) -> io::Result<Option<(MeshStream, Option<SpiffeId>)>> {
        let t = hop.target;
        if t.tunnel_port == 0 {
            return Ok(None);
        }
        let addr = SocketAddr::new(t.addr.ip(), t.tunnel_port);
        if !pool.reachable(addr) {
            pool.fell_back(addr);
            return Ok(None);
        }
        let (identities, request) = if t.via_gateway {
            let key = &hop.dest.key;
            let request = StreamRequest {
                authority: format!("{}:{}", key.hostname, key.port),
                source: None,
                subset: Some(key.subset.clone()),
            };
            (Vec::new(), request)
        } else {
            let source = self.metrics.istio.local().address;
            (
                hop.expected.clone(),
                StreamRequest::to_workload(t.addr, source),
            )
        };
        let key = PoolKey { addr, identities };
        let (metrics, dest, opts) = (&*self.metrics, hop.dest, hop.opts);
        // Only a new tunnel needs the TLS config: a stream on an open one does not look it up.
        let dial = || {
            let config = hop.client_tls.tunnel_config(&key.identities);
            async move {
                let config = config.map_err(io::Error::other)?;
                let tcp = upstream::dial(addr, dest, opts, metrics, DIRECTION).await?;
                // The tunnel's peer is verified by its SPIFFE identity; no name to send.
                let name = ServerName::IpAddress(addr.ip().into());
                let tls = TlsConnector::from(config).connect(name, tcp).await?;
                let peer = tls::peer_identity(tls.get_ref().1.peer_certificates());
                Ok((tls, peer))
            }
        };
        let quic_tls = || {
            hop.client_tls
                .quic_config(&key.identities)
                .map_err(io::Error::other)
        };
        let opened = match pool.open(&key, dial, quic_tls, &request).await {
            Ok(opened) => opened,
            // The tunnel could not be set up: mTLS of its own for a while.
            Err(e) if !pool.reachable(addr) => {
                tracing::info!(peer = %addr, error = %e, fallback_for = ?tunnel::FALLBACK_MEMORY, "no tunnel to the peer; connecting without one");
                pool.fell_back(addr);
                return Ok(None);
            }
            // Named by the tunnel's address: the attempt's endpoint is the workload's or
            // the gateway's SNI port.
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("over the tunnel to {addr}: {e}"),
                ))
            }
        };
        if !t.via_gateway {
            return Ok(Some((MeshStream::Tunnel(opened.stream), opened.peer)));
        }
        let config = hop
            .client_tls
            .config(&hop.expected)
            .map_err(io::Error::other)?;
        let inner = handshake(
            config,
            hop.server_name.clone(),
            opened.stream,
            hop.opts.timeout,
        )
        .await?;
        let peer = tls::peer_identity(inner.get_ref().1.peer_certificates());
        Ok(Some((MeshStream::TunnelTls(Box::new(inner)), peer)))
    }

    /// Istio's labels of a connection to `service` (`-` for the flags), with the endpoint
    /// and the server identity once connected.
    fn istio_labels(
        &self,
        service: &istio::Service,
        connected: Option<(&Target, Option<&SpiffeId>)>,
    ) -> IstioLabels {
        let m = &self.metrics.istio;
        let destination = match connected {
            Some((t, id)) if !t.via_gateway => m.catalog().endpoint(&t.uid, id),
            Some((_, Some(id))) => Peer::from_identity(id),
            _ => Peer::default(),
        };
        IstioLabels::new(&istio::Traffic {
            reporter: Reporter::source,
            source: &m.local().peer,
            destination: &destination,
            service: Some(service),
            // Istio sets the policy only where the connection is received.
            security: SecurityPolicy::unknown,
            flags: ResponseFlags::None,
        })
    }

    /// The service `target` names, when the routing table has it.
    fn service_of(&self, target: &OutboundTarget) -> Option<istio::Service> {
        let table = self.routes.load();
        let dest = table
            .lookup(&target.hostname, target.port, &target.subset)
            .ok()?;
        Some(dest.service.clone())
    }
}

/// Accepts plaintext connections from the local app until `shutdown` and carries each as
/// mTLS to `target`.
pub async fn serve(
    listener: TcpListener,
    outbound: Arc<Outbound>,
    target: OutboundTarget,
    max_connections: usize,
    shutdown: drain::Watch,
) {
    let target = Arc::new(target);
    serve_with(listener, outbound, max_connections, shutdown, move |_| {
        Ok((*target).clone())
    })
    .await;
}

/// Where [`serve_with`] sends one captured connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A mesh service: mTLS to one of its endpoints.
    Mesh(OutboundTarget),
    /// Not a mesh address: connected to as it is, in plain TCP, from the proxy's own
    /// socket. A pod's sidecar captures whole address ranges (its rules cannot follow the
    /// catalog), and the app's connections to the rest of a range must still work, as
    /// through Istio's `PassthroughCluster`.
    Passthrough(std::net::SocketAddr),
}

impl From<OutboundTarget> for Destination {
    fn from(t: OutboundTarget) -> Self {
        Self::Mesh(t)
    }
}

/// The service name passed-through connections are counted under.
pub const PASSTHROUGH: &str = "PassthroughCluster";

/// Why [`serve_with`]'s `destination` found nowhere to send a connection: a metric label
/// (`isthmus_gateway_connections_refused_total{reason}`) and the detail for the log.
pub type NoDestination = crate::connection::Refusal;

/// Accepts plaintext connections until `shutdown` and carries each as mTLS to the target
/// `destination` names for it; a connection it names none for is closed and counted.
pub async fn serve_with<D, T>(
    listener: TcpListener,
    outbound: Arc<Outbound>,
    max_connections: usize,
    shutdown: drain::Watch,
    destination: D,
) where
    D: Fn(&TcpStream) -> Result<T, NoDestination> + Send + Sync + 'static,
    T: Into<Destination>,
{
    let tracker = outbound.tracker.clone();
    let destination = Arc::new(destination);
    accept_loop(
        listener,
        DIRECTION,
        tracker,
        max_connections,
        shutdown,
        move |tcp, mut rec| {
            let outbound = outbound.clone();
            let target = destination(&tcp).map(Into::into);
            async move {
                match target {
                    Ok(Destination::Mesh(target)) => {
                        handle(&outbound, tcp, &target, &mut rec).await
                    }
                    Ok(Destination::Passthrough(addr)) => {
                        passthrough(&outbound, tcp, addr, &mut rec).await
                    }
                    Err(refused) => {
                        outbound.metrics.refuse(DIRECTION, refused.reason);
                        rec.error = Some(refused.detail);
                        rec.result = refused.reason;
                    }
                }
                rec
            }
        },
    )
    .await;
}

/// How long a captured connection to a host with `tls` routes may take to send its
/// ClientHello before it is routed without a server name (by the `tcp` routes).
pub const SNI_PEEK_TIMEOUT: Duration = Duration::from_secs(1);

/// The server name in the ClientHello `tcp` starts with, read without taking any byte off
/// the socket (they are relayed as they are); `None` when the app sends no TLS, no name,
/// or nothing within `timeout`.
async fn peek_server_name(tcp: &TcpStream, timeout: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 2048];
    loop {
        let n = tokio::time::timeout_at(deadline, tcp.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        match ClientHelloReader::new().feed(&buf[..n]) {
            Ok(Hello::ServerName(name)) => return Some(name),
            Err(_) => return None,
            Ok(Hello::NeedMore) => {
                // A ClientHello split over segments: wait for the rest. Peeking returns
                // what is there at once, so wait a little before looking again.
                if n == buf.len() {
                    if buf.len() >= client_hello::MAX_CLIENT_HELLO + 64 {
                        return None;
                    }
                    buf.resize(buf.len() * 2, 0);
                }
                if tokio::time::Instant::now() >= deadline {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
}

/// Relays a connection to `addr` in plain TCP (no identity, no Istio metrics: it is not
/// mesh traffic), counted under [`PASSTHROUGH`].
async fn passthrough(
    outbound: &Outbound,
    tcp: TcpStream,
    addr: std::net::SocketAddr,
    rec: &mut AccessRecord,
) {
    rec.destination = addr.to_string();
    rec.service = Some(PASSTHROUGH.into());
    let m = &outbound.metrics;
    let open = m.open(DIRECTION, PASSTHROUGH);
    let result = async {
        let connect = upstream::connect_tcp(addr, outbound.connect.mark);
        let up = match tokio::time::timeout(outbound.connect.timeout, connect).await {
            Ok(Ok(up)) => up,
            Ok(Err(e)) => {
                rec.error = Some(format!("passthrough to {addr}: {e}"));
                return ConnResult::upstream_connect_failed;
            }
            Err(_) => {
                rec.error = Some(format!(
                    "passthrough to {addr}: no answer within {:?}",
                    outbound.connect.timeout
                ));
                return ConnResult::upstream_connect_failed;
            }
        };
        rec.endpoint = Some(addr);
        finish_relay(
            rec,
            outbound.tracker.closing(),
            crate::relay::relay_tcp(tcp, up),
        )
        .await
    }
    .await;
    close(m, open, rec, PASSTHROUGH, result);
}

async fn handle(
    outbound: &Outbound,
    tcp: TcpStream,
    target: &OutboundTarget,
    rec: &mut AccessRecord,
) {
    let sniffed;
    let target = if target.sni.is_none() && outbound.routes.load().wants_sni(&target.hostname) {
        sniffed = OutboundTarget {
            sni: peek_server_name(&tcp, SNI_PEEK_TIMEOUT).await,
            ..target.clone()
        };
        &sniffed
    } else {
        target
    };
    let service = target.hostname.clone();
    rec.destination = format!("{}:{}", target.hostname, target.port);
    rec.service = Some(service.clone());
    let m = &outbound.metrics;
    let open = m.open(DIRECTION, &service);
    let result = async {
        let up = match outbound.connect(target).await {
            Ok(up) => up,
            Err(e) => {
                rec.error = Some(e.to_string());
                // A service the table does not know is no Istio connection.
                if let (OutboundError::Connect(_), Some(svc)) = (&e, outbound.service_of(target)) {
                    let labels = outbound.istio_labels(&svc, None);
                    m.istio
                        .refused(labels.with_flags(ResponseFlags::ConnectFailed));
                }
                return e.result();
            }
        };
        // Where the TCP connection went: over a tunnel, the peer's tunnel port.
        rec.endpoint = Some(if up.stream.is_tunnel() {
            SocketAddr::new(up.target.addr.ip(), up.target.tunnel_port)
        } else {
            up.target.addr
        });
        rec.peer_identity = up.server_identity.as_ref().map(|i| i.to_string());
        // The labels follow from the service, the endpoint, the identity it proved and how
        // it was reached: built for the first such connection, found after that.
        let (target, identity) = (&up.target, up.server_identity.as_ref());
        let tunnel = up.stream.tunnel_transport();
        let report = m.istio.open_memo(
            "outbound",
            &[
                &up.service.hostname,
                &up.service.name,
                &up.service.namespace,
                &target.uid,
                &target.network,
                if target.via_gateway { "gateway" } else { "" },
                identity.map_or("", |i| i.as_str()),
                tunnel.unwrap_or(""),
            ],
            || {
                let labels = outbound.istio_labels(&up.service, Some((target, identity)));
                (labels, Some(transit(m, target, tunnel)))
            },
        );
        finish_relay(
            rec,
            outbound.tracker.closing(),
            crate::relay::relay_metered(tcp, up.stream, report.meter()),
        )
        .await
    }
    .await;
    close(m, open, rec, &service, result);
}

/// One attempt's endpoint and what connecting to it needs.
struct Hop<'a> {
    target: &'a Target,
    dest: &'a crate::routes::Destination,
    /// The identities the endpoint may present.
    expected: Vec<SpiffeId>,
    client_tls: &'a ClientTls,
    /// The SNI key.
    server_name: ServerName<'static>,
    opts: ConnectOptions,
}

/// The mTLS handshake on `io`, within `timeout`.
async fn handshake<IO>(
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
    io: IO,
    timeout: Duration,
) -> io::Result<TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let connect = TlsConnector::from(config).connect(server_name, io);
    upstream::answer_within(timeout, connect).await
}

/// How a connection to `target` is carried, from the program's network.
fn transit(m: &Metrics, target: &Target, tunnel: Option<&str>) -> Transit {
    let quic = tunnel == Some(tunnel::quic::TRANSPORT);
    Transit {
        source_network: m.istio.network().to_string(),
        destination_network: target.network.clone(),
        transport: match (tunnel.is_some(), quic, target.via_gateway) {
            (true, true, true) => Transport::QuicGateway,
            (true, true, false) => Transport::Quic,
            (true, false, true) => Transport::HboneGateway,
            (true, false, false) => Transport::Hbone,
            (false, _, true) => Transport::SniGateway,
            (false, _, false) => Transport::Direct,
        },
    }
}

/// Ends a connection: it leaves the open gauge, its record is finished, and it is counted
/// with its bytes under `service`.
fn close(
    m: &Metrics,
    open: crate::metrics::OpenConnection,
    rec: &mut AccessRecord,
    service: &str,
    result: ConnResult,
) {
    drop(open);
    rec.finish(result);
    m.closed(
        DIRECTION,
        service,
        result,
        rec.bytes_to_upstream,
        rec.bytes_from_upstream,
    );
}

#[cfg(test)]
mod tests;
