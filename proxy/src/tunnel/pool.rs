//! The client side of the tunnels: per peer proxy (its tunnel address and the identities
//! accepted for it) a few tunnels, each carrying up to a stream limit at once.
//!
//! - **On demand.** The first stream to a peer opens its tunnel; streams that arrive while
//!   it is being set up wait for it rather than open their own, so a burst costs one
//!   handshake. A tunnel at its limit (ours, or the peer's `MAX_CONCURRENT_STREAMS` if
//!   lower) gets a sibling.
//! - **Idle timeout.** A tunnel without streams for the idle timeout is closed (GOAWAY).
//! - **A peer that went away** (its tunnel closed, or the stream cannot be opened on it) is
//!   dialled again once for the same stream before the stream fails.
//! - **A peer whose tunnel cannot be set up** (nothing listens on its tunnel port, UDP or
//!   the port is blocked, its TLS fails) is remembered for [`FALLBACK_MEMORY`]: the caller
//!   connects to it without a tunnel meanwhile ([`Pool::reachable`]), counted in
//!   `tunnel_fallbacks`.
//! - **Renewal.** [`Pool::clear`] (a renewed certificate) takes every tunnel out of the
//!   pool: new streams open new tunnels with the new certificate, while streams in flight
//!   finish over the old ones, which close when their last stream ends.
//! - **QUIC or HTTP/2.** With [`Transports::Auto`] a new tunnel races QUIC (15008/udp)
//!   against HTTP/2 (15008/tcp): QUIC is dialled first and HTTP/2 too once QUIC has had
//!   [`QUIC_HEAD_START`] or failed; the first set up is taken. A peer where HTTP/2 won (UDP
//!   blocked, no QUIC listener, QUIC slower) is dialled with HTTP/2 alone for
//!   [`CHOICE_MEMORY`]. Races are counted by winner in `tunnel_races`. A QUIC tunnel whose
//!   path goes silent (the request not acknowledged as received within [`SILENT_PATH`]) is
//!   closed and its peer remembered for HTTP/2 the same way; the stream is dialled again.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use http::HeaderMap;
use isthmus_proto::identity::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::quic::{self, QuicStream};
use super::{client_builder, io_error, H2Stream, Stream, FALLBACK_MEMORY, TRANSPORT};
use crate::metrics::{Metrics, RaceLabels, TunnelCounters, TunnelLabels, TunnelRole};

pub use crate::metrics::TunnelMetrics;

/// How the pool behaves.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    /// Streams one tunnel carries at once.
    pub max_streams: u32,
    /// A tunnel without streams for this long is closed.
    pub idle_timeout: Duration,
    /// For dialling a tunnel (TCP, TLS and HTTP/2, or QUIC) and, separately, for a
    /// stream's answer.
    pub timeout: Duration,
    /// Which transports new tunnels take.
    pub transports: Transports,
}

/// Which transports a pool's tunnels take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transports {
    /// QUIC raced against HTTP/2, QUIC preferred (see the module's documentation).
    #[default]
    Auto,
    /// QUIC alone: a peer without it is reached with mTLS of its own.
    Quic,
    /// HTTP/2 alone.
    #[serde(rename = "h2")]
    Http2,
}

impl std::str::FromStr for Transports {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Transports::Auto),
            "quic" => Ok(Transports::Quic),
            "h2" | "http2" => Ok(Transports::Http2),
            _ => Err(format!(
                "tunnel transports {s:?}: expected auto (QUIC raced against HTTP/2), quic or h2"
            )),
        }
    }
}

/// How long QUIC is dialled alone before HTTP/2 is dialled beside it.
pub const QUIC_HEAD_START: Duration = Duration::from_millis(200);
/// How long a peer where HTTP/2 won the race is dialled with HTTP/2 alone.
pub const CHOICE_MEMORY: Duration = Duration::from_secs(300);
/// A QUIC tunnel whose listener has not said it received a stream's request within this
/// long has lost its path: it is closed, the stream dialled again (over HTTP/2 with
/// [`Transports::Auto`]), and HTTP/2 remembered for the peer.
pub const SILENT_PATH: Duration = Duration::from_secs(1);

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_streams: super::DEFAULT_MAX_STREAMS,
            idle_timeout: super::DEFAULT_IDLE_TIMEOUT,
            timeout: crate::upstream::DEFAULT_CONNECT_TIMEOUT,
            transports: Transports::default(),
        }
    }
}

/// A peer proxy: where its tunnels go, and which identities it may present.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub addr: SocketAddr,
    pub identities: Vec<SpiffeId>,
}

/// One stream's request.
#[derive(Debug, Clone)]
pub struct StreamRequest {
    /// The destination on the peer's side (`:authority`): `ip:port` of a workload behind
    /// its own proxy, `hostname:port` of a service behind a gateway.
    pub authority: String,
    /// The original client's address, sent as `Forwarded: for=`.
    pub source: Option<IpAddr>,
    /// The DestinationRule subset, for a gateway (header [`SUBSET_HEADER`]).
    pub subset: Option<String>,
}

/// The request header naming the subset of a service a gateway routes a stream to.
pub const SUBSET_HEADER: &str = "isthmus-subset";

impl StreamRequest {
    /// A stream to `addr` on the peer proxy's own workload.
    pub fn to_workload(addr: SocketAddr, source: Option<IpAddr>) -> Self {
        Self {
            authority: addr.to_string(),
            source,
            subset: None,
        }
    }
}

/// A stream opened over a tunnel, and the peer proxy's verified identity.
#[derive(Debug)]
pub struct Opened {
    pub stream: Stream,
    pub peer: Option<SpiffeId>,
    /// False when the stream reused a tunnel that was already open.
    pub new_tunnel: bool,
}

type Slot = Arc<tokio::sync::Mutex<Vec<Tunnel>>>;

/// The tunnels to every peer.
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    peers: Mutex<HashMap<PoolKey, Slot>>,
    /// Peers whose tunnel could not be set up, reached without one for a while.
    unreachable: PeerMemory,
    /// Peers where HTTP/2 won the race, dialled with it alone for a while.
    http2_only: PeerMemory,
    /// The QUIC client endpoints, IPv4 and IPv6, made on first use.
    endpoints: Mutex<[Option<quinn::Endpoint>; 2]>,
    settings: PoolSettings,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Clone)]
struct Tunnel {
    conn: Conn,
    state: Arc<TunnelState>,
}

/// A tunnel's connection: where its streams are opened.
#[derive(Debug, Clone)]
enum Conn {
    H2(SendRequest<Bytes>),
    Quic(quinn::Connection),
}

impl Conn {
    fn transport(&self) -> &'static str {
        match self {
            Conn::H2(_) => TRANSPORT,
            Conn::Quic(_) => quic::TRANSPORT,
        }
    }

    /// Streams the peer lets this tunnel carry at once.
    fn peer_limit(&self) -> u32 {
        match self {
            Conn::H2(send) => u32::try_from(send.current_max_send_streams()).unwrap_or(u32::MAX),
            // Its listener allows what ours does; a closed one takes none.
            Conn::Quic(c) if c.close_reason().is_some() => 0,
            Conn::Quic(_) => u32::MAX,
        }
    }
}

/// A tunnel just set up: its connection, the peer's identity, and the task that drives it.
type SetUp = (Conn, Option<SpiffeId>, Driver);

/// What keeps a new tunnel's connection going: HTTP/2's connection future, or nothing for
/// QUIC (its endpoint drives it).
enum Driver {
    H2(Pin<Box<dyn Future<Output = Result<(), h2::Error>> + Send>>),
    Quic(quinn::Connection),
}

#[derive(Debug)]
struct TunnelState {
    streams: AtomicU32,
    /// Streams it has carried.
    carried: AtomicU64,
    opened: Instant,
    /// Taken out of the pool: no new stream goes over it.
    closed: AtomicBool,
    idle_since: Mutex<Instant>,
    peer: Option<SpiffeId>,
    /// Its series in the tunnel metrics.
    counters: TunnelCounters,
}

impl TunnelState {
    fn usable(&self, limit: u32) -> bool {
        !self.closed.load(Ordering::Acquire) && self.streams.load(Ordering::Acquire) < limit
    }
}

/// A stream's place on its tunnel, given back when the stream is dropped.
struct StreamCount(Arc<TunnelState>);

impl Drop for StreamCount {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().expect("tunnel state poisoned") = Instant::now();
        }
    }
}

impl Pool {
    pub fn new(settings: PoolSettings, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(Inner {
                peers: Mutex::new(HashMap::new()),
                unreachable: PeerMemory::default(),
                http2_only: PeerMemory::default(),
                endpoints: Mutex::new([None, None]),
                settings,
                metrics,
            }),
        }
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.inner.settings
    }

    /// Tunnels open in the pool now, across peers.
    pub async fn open_tunnels(&self) -> usize {
        let slots: Vec<Slot> = self.peers().values().cloned().collect();
        let mut n = 0;
        for slot in slots {
            n += slot.lock().await.len();
        }
        n
    }

    /// Every tunnel in the pool by peer, and the peers remembered for HTTP/2 or for no
    /// tunnel: what the admin's `/debug/tunnels` shows.
    pub async fn snapshot(&self) -> PoolSnapshot {
        let peers: Vec<(PoolKey, Slot)> = self
            .peers()
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        let mut tunnels = Vec::new();
        for (key, slot) in peers {
            for t in slot.lock().await.iter() {
                let st = &t.state;
                let quic = match &t.conn {
                    Conn::Quic(c) => Some(c.stats()),
                    Conn::H2(_) => None,
                };
                tunnels.push(TunnelInfo {
                    peer: key.addr,
                    transport: t.conn.transport(),
                    peer_identity: st.peer.as_ref().map(ToString::to_string),
                    streams_open: st.streams.load(Ordering::Acquire),
                    streams_carried: st.carried.load(Ordering::Relaxed),
                    age_seconds: st.opened.elapsed().as_secs(),
                    rtt_micros: quic.as_ref().map(|q| q.path.rtt.as_micros() as u64),
                    bytes_sent: quic.as_ref().map(|q| q.udp_tx.bytes),
                    bytes_received: quic.as_ref().map(|q| q.udp_rx.bytes),
                });
            }
        }
        tunnels.sort_by_key(|t| t.peer);
        PoolSnapshot {
            transports: self.inner.settings.transports,
            tunnels,
            http2_only: self.inner.http2_only.list(),
            without_tunnel: self.inner.unreachable.list(),
        }
    }

    /// False while a tunnel to `addr` could not be set up within the last
    /// [`FALLBACK_MEMORY`]: connect without one meanwhile.
    pub fn reachable(&self, addr: SocketAddr) -> bool {
        !self.inner.unreachable.holds(addr)
    }

    /// Counts a connection made without a tunnel to `addr` because its tunnel could not be
    /// set up.
    pub fn fell_back(&self, addr: SocketAddr) {
        let tunnels = &self.inner.metrics.tunnels;
        tunnels
            .fallbacks
            .get_or_create(&TunnelLabels {
                role: TunnelRole::client,
                transport: TRANSPORT,
                peer: tunnels.peer(addr),
            })
            .inc();
    }

    /// Takes every tunnel out of the pool (see the module's documentation).
    pub fn clear(&self) {
        let slots: Vec<Slot> = self.peers().drain().map(|(_, s)| s).collect();
        for slot in slots {
            if let Ok(tunnels) = slot.try_lock() {
                for t in tunnels.iter() {
                    t.state.closed.store(true, Ordering::Release);
                }
            }
        }
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Slot>> {
        self.inner.peers.lock().expect("tunnel pool poisoned")
    }

    /// Opens a stream to `request.authority` over a tunnel to `key`, dialling one when none
    /// can take it: over HTTP/2 with `dial` (TCP and the mTLS handshake, ALPN `h2`; it
    /// returns the peer's verified identity), over QUIC with the client config `quic_tls`
    /// gives (ALPN [`quic::ALPN_QUIC`]), as the pool's [`Transports`] say.
    pub async fn open<D, Fut, T, Q>(
        &self,
        key: &PoolKey,
        dial: D,
        quic_tls: Q,
        request: &StreamRequest,
    ) -> io::Result<Opened>
    where
        D: Fn() -> Fut,
        Fut: Future<Output = io::Result<(T, Option<SpiffeId>)>>,
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        Q: Fn() -> io::Result<Arc<rustls::ClientConfig>>,
    {
        let slot = {
            let mut peers = self.peers();
            match peers.get(key) {
                Some(slot) => slot.clone(),
                // The key is cloned only for a peer seen for the first time.
                None => peers.entry(key.clone()).or_default().clone(),
            }
        };
        let dialer = Dialer {
            addr: key.addr,
            tcp: &dial,
            quic_tls: &quic_tls,
        };
        let mut redialled = false;
        loop {
            let (tunnel, new_tunnel) = self.take(&slot, &dialer).await?;
            let count = StreamCount(tunnel.state.clone());
            match self.stream(&tunnel.conn, key.addr, request).await {
                Ok(stream) => {
                    tunnel.state.counters.streams.inc();
                    return Ok(Opened {
                        stream: stream.counted(&tunnel.state.counters).holding(count),
                        peer: tunnel.state.peer.clone(),
                        new_tunnel,
                    });
                }
                // The tunnel died under the stream (the peer restarted, or closed it):
                // dial again, once.
                Err(StreamError::Tunnel(e)) if !new_tunnel && !redialled => {
                    tracing::debug!(peer = %key.addr, error = %e, "tunnel gone; dialling again");
                    tunnel.state.closed.store(true, Ordering::Release);
                    redialled = true;
                }
                Err(StreamError::Tunnel(e) | StreamError::Refused(e)) => return Err(e),
            }
        }
    }

    /// A tunnel of `slot` with room for one more stream (counted on it), dialled if none.
    async fn take<D, Fut, T, Q>(
        &self,
        slot: &Slot,
        dialer: &Dialer<'_, D, Q>,
    ) -> io::Result<(Tunnel, bool)>
    where
        D: Fn() -> Fut,
        Fut: Future<Output = io::Result<(T, Option<SpiffeId>)>>,
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        Q: Fn() -> io::Result<Arc<rustls::ClientConfig>>,
    {
        let limit = self.inner.settings.max_streams;
        let mut tunnels = slot.lock().await;
        tunnels.retain(|t| !t.state.closed.load(Ordering::Acquire));
        let found = tunnels
            .iter()
            .find(|t| t.state.usable(limit.min(t.conn.peer_limit())));
        let (t, new_tunnel) = match found {
            Some(t) => (t.clone(), false),
            None => {
                let t = self.dial(slot, dialer).await?;
                tunnels.push(t.clone());
                (t, true)
            }
        };
        t.state.streams.fetch_add(1, Ordering::AcqRel);
        t.state.carried.fetch_add(1, Ordering::Relaxed);
        Ok((t, new_tunnel))
    }

    /// Sets up a new tunnel to the dialer's peer with the transports it is to take; when
    /// none can be, the peer is reached without a tunnel for [`FALLBACK_MEMORY`].
    async fn dial<D, Fut, T, Q>(&self, slot: &Slot, dialer: &Dialer<'_, D, Q>) -> io::Result<Tunnel>
    where
        D: Fn() -> Fut,
        Fut: Future<Output = io::Result<(T, Option<SpiffeId>)>>,
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        Q: Fn() -> io::Result<Arc<rustls::ClientConfig>>,
    {
        let addr = dialer.addr;
        let set_up = match self.inner.settings.transports {
            Transports::Http2 => self.dial_h2(dialer).await,
            Transports::Quic => self.dial_quic(dialer).await,
            Transports::Auto if self.inner.http2_only.holds(addr) => self.dial_h2(dialer).await,
            Transports::Auto => self.race(dialer).await,
        };
        let (conn, peer, driver) = match set_up {
            Ok(s) => s,
            Err(e) => {
                self.inner.unreachable.remember(addr, FALLBACK_MEMORY);
                return Err(e);
            }
        };
        let tunnels = &self.inner.metrics.tunnels;
        let counters = tunnels.tunnel(TunnelRole::client, conn.transport(), &tunnels.peer(addr));
        let state = Arc::new(TunnelState {
            streams: AtomicU32::new(0),
            carried: AtomicU64::new(0),
            opened: Instant::now(),
            closed: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            peer,
            counters,
        });
        tokio::spawn(drive(
            driver,
            state.clone(),
            Arc::downgrade(slot),
            self.inner.settings.idle_timeout,
        ));
        Ok(Tunnel { conn, state })
    }

    /// Dials `addr` with HTTP/2 alone for [`CHOICE_MEMORY`] (with [`Transports::Auto`]).
    fn remember_http2(&self, addr: SocketAddr) {
        if self.inner.settings.transports == Transports::Auto {
            self.inner.http2_only.remember(addr, CHOICE_MEMORY);
        }
    }

    /// QUIC first, HTTP/2 beside it after [`QUIC_HEAD_START`] or once QUIC failed; the
    /// first set up wins.
    async fn race<D, Fut, T, Q>(&self, dialer: &Dialer<'_, D, Q>) -> io::Result<SetUp>
    where
        D: Fn() -> Fut,
        Fut: Future<Output = io::Result<(T, Option<SpiffeId>)>>,
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        Q: Fn() -> io::Result<Arc<rustls::ClientConfig>>,
    {
        // Futures do nothing until polled: HTTP/2 is dialled only once it is awaited.
        let (quic, h2) = (self.dial_quic(dialer), self.dial_h2(dialer));
        tokio::pin!(quic, h2);
        let head_start = tokio::select! {
            r = &mut quic => Some(r),
            _ = tokio::time::sleep(QUIC_HEAD_START) => None,
        };
        let raced = match head_start {
            Some(Ok(set_up)) => Ok(set_up),
            Some(Err(q)) => h2.await.map_err(|e| (q, e)),
            None => tokio::select! {
                r = &mut quic => match r {
                    Ok(set_up) => Ok(set_up),
                    Err(q) => h2.await.map_err(|e| (q, e)),
                },
                // HTTP/2 failed first: QUIC gets one more head start, no more (a peer
                // where nothing listens would otherwise hold the caller for the whole
                // timeout, as a silent UDP port gives no error).
                r = &mut h2 => match r {
                    Ok(set_up) => Ok(set_up),
                    Err(e) => match tokio::time::timeout(QUIC_HEAD_START, quic).await {
                        Ok(r) => r.map_err(|q| (q, e)),
                        Err(_) => Err((io::Error::new(io::ErrorKind::TimedOut, "no QUIC answer"), e)),
                    },
                },
            },
        };
        match raced {
            Ok(set_up) => Ok(self.won(dialer.addr, set_up)),
            Err((quic_error, h2_error)) => Err(io::Error::new(
                h2_error.kind(),
                format!("no tunnel over QUIC ({quic_error}) nor HTTP/2 ({h2_error})"),
            )),
        }
    }

    /// Counts a race's winner and remembers HTTP/2 where it won.
    fn won(&self, addr: SocketAddr, set_up: SetUp) -> SetUp {
        let winner = set_up.0.transport();
        if winner == TRANSPORT {
            self.remember_http2(addr);
            tracing::debug!(peer = %addr, memory = ?CHOICE_MEMORY, "HTTP/2 won the tunnel race");
        }
        self.inner
            .metrics
            .tunnels
            .races
            .get_or_create(&RaceLabels { winner })
            .inc();
        set_up
    }

    /// Runs one transport's setup to `addr` within the pool's timeout, counting how it went.
    async fn counted<F>(
        &self,
        transport: &'static str,
        addr: SocketAddr,
        setup: F,
    ) -> io::Result<SetUp>
    where
        F: Future<Output = io::Result<SetUp>>,
    {
        let timeout = self.inner.settings.timeout;
        let (result, outcome) = match tokio::time::timeout(timeout, setup).await {
            Ok(Ok(set_up)) => ("ok", Ok(set_up)),
            Ok(Err(e)) => ("failed", Err(e)),
            Err(_) => (
                "timeout",
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the tunnel was not set up within {timeout:?}"),
                )),
            ),
        };
        let tunnels = &self.inner.metrics.tunnels;
        tunnels.handshake(TunnelRole::client, transport, &tunnels.peer(addr), result);
        outcome
    }

    async fn dial_h2<D, Fut, T, Q>(&self, dialer: &Dialer<'_, D, Q>) -> io::Result<SetUp>
    where
        D: Fn() -> Fut,
        Fut: Future<Output = io::Result<(T, Option<SpiffeId>)>>,
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.counted(TRANSPORT, dialer.addr, async {
            let (io, peer) = (dialer.tcp)().await?;
            let (send, conn) = client_builder()
                .handshake::<_, Bytes>(io)
                .await
                .map_err(io_error)?;
            Ok((Conn::H2(send), peer, Driver::H2(Box::pin(conn))))
        })
        .await
    }

    async fn dial_quic<D, Q>(&self, dialer: &Dialer<'_, D, Q>) -> io::Result<SetUp>
    where
        Q: Fn() -> io::Result<Arc<rustls::ClientConfig>>,
    {
        self.counted(quic::TRANSPORT, dialer.addr, async {
            let endpoint = self.endpoint(dialer.addr)?;
            let config = quic::client_config((dialer.quic_tls)()?)?;
            // The tunnel's peer is verified by its SPIFFE identity; the name is its address.
            let name = dialer.addr.ip().to_string();
            let conn = endpoint
                .connect_with(config, dialer.addr, &name)
                .map_err(io::Error::other)?
                .await
                .map_err(quic::io_error)?;
            let peer = quic::peer_identity(&conn);
            Ok((Conn::Quic(conn.clone()), peer, Driver::Quic(conn)))
        })
        .await
    }

    /// The QUIC client endpoint for `peer`'s address family, made on first use.
    fn endpoint(&self, peer: SocketAddr) -> io::Result<quinn::Endpoint> {
        let mut endpoints = self.inner.endpoints.lock().expect("tunnel pool poisoned");
        let slot = &mut endpoints[usize::from(peer.is_ipv6())];
        if let Some(e) = slot {
            return Ok(e.clone());
        }
        let e = quic::client_endpoint(peer)?;
        *slot = Some(e.clone());
        Ok(e)
    }

    /// Opens a stream on `conn` and waits for its answer.
    async fn stream(
        &self,
        conn: &Conn,
        addr: SocketAddr,
        request: &StreamRequest,
    ) -> Result<Stream, StreamError> {
        match conn {
            Conn::H2(send) => self
                .h2_stream(send.clone(), request)
                .await
                .map(Stream::from),
            Conn::Quic(c) => self.quic_stream(c, addr, request).await.map(Stream::from),
        }
    }

    /// Sends the `CONNECT` and waits for its answer.
    async fn h2_stream(
        &self,
        send: SendRequest<Bytes>,
        request: &StreamRequest,
    ) -> Result<H2Stream, StreamError> {
        let timeout = self.inner.settings.timeout;
        let mut send = send
            .ready()
            .await
            .map_err(|e| StreamError::Tunnel(io_error(e)))?;
        let mut req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(request.authority.as_str())
            .version(http::Version::HTTP_2)
            .body(())
            .map_err(|e| StreamError::Refused(io::Error::other(e)))?;
        *req.headers_mut() = request.headers()?;
        let (response, body) = send
            .send_request(req, false)
            .map_err(|e| StreamError::Tunnel(io_error(e)))?;
        let response = match tokio::time::timeout(timeout, response).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) if e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM) => {
                return Err(StreamError::Tunnel(io_error(e)))
            }
            Ok(Err(e)) if e.is_go_away() || e.is_io() => {
                return Err(StreamError::Tunnel(io_error(e)))
            }
            Ok(Err(e)) => return Err(StreamError::Refused(io_error(e))),
            Err(_) => return Err(StreamError::Refused(no_answer(request, timeout))),
        };
        let status = response.status();
        if status != http::StatusCode::OK {
            return Err(StreamError::Refused(refused(status, &request.authority)));
        }
        Ok(H2Stream::new(body, response.into_body()))
    }

    /// Opens a QUIC stream, sends its header and waits for its answer.
    async fn quic_stream(
        &self,
        conn: &quinn::Connection,
        addr: SocketAddr,
        request: &StreamRequest,
    ) -> Result<QuicStream, StreamError> {
        let timeout = self.inner.settings.timeout;
        let header = quic::encode_request(&request.authority, &request.headers()?)
            .map_err(StreamError::Refused)?;
        let tunnel_gone = |e: io::Error| StreamError::Tunnel(e);
        let (send, recv) = match tokio::time::timeout(timeout, conn.open_bi()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(tunnel_gone(quic::io_error(e))),
            Err(_) => {
                return Err(tunnel_gone(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the QUIC tunnel gave no stream credit in time",
                )))
            }
        };
        let mut stream = QuicStream::new(send, recv);
        // The listener says `100` as soon as it has read the request: without it within
        // [`SILENT_PATH`] the request did not get there (see `quic::RECEIVED`).
        let received = async {
            stream.write_all(&header).await?;
            stream.read_response().await
        };
        let first = match tokio::time::timeout(SILENT_PATH.min(timeout), received).await {
            Ok(r) => r,
            Err(_) => {
                conn.close(quic::code::NO_ERROR, b"path silent");
                self.remember_http2(addr);
                return Err(tunnel_gone(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the QUIC tunnel to {addr} went silent: the stream's request was not received within {SILENT_PATH:?}"),
                )));
            }
        };
        let answered = match first {
            Ok(status) if status == quic::RECEIVED => {
                tokio::time::timeout(timeout, stream.read_response())
                    .await
                    .ok()
            }
            other => Some(other),
        };
        let status = match answered {
            Some(Ok(status)) => status,
            // A stream the peer refused unprocessed (it is going away), or a tunnel that
            // died: another tunnel may carry it.
            Some(Err(e)) if conn.close_reason().is_some() || quic::refused_stream(&e) => {
                return Err(tunnel_gone(e))
            }
            Some(Err(e)) => return Err(StreamError::Refused(e)),
            None => return Err(StreamError::Refused(no_answer(request, timeout))),
        };
        if status != http::StatusCode::OK {
            stream.finished();
            return Err(StreamError::Refused(refused(status, &request.authority)));
        }
        Ok(stream)
    }
}

/// The pool as [`Pool::snapshot`] sees it.
#[derive(Debug, serde::Serialize)]
pub struct PoolSnapshot {
    pub transports: Transports,
    pub tunnels: Vec<TunnelInfo>,
    /// Peers where HTTP/2 won the race (or QUIC's path went silent), dialled with it alone
    /// for a while.
    pub http2_only: Vec<Remembered>,
    /// Peers whose tunnel could not be set up, reached with mTLS of their own for a while.
    pub without_tunnel: Vec<Remembered>,
}

/// One tunnel of the pool.
#[derive(Debug, serde::Serialize)]
pub struct TunnelInfo {
    pub peer: SocketAddr,
    pub transport: &'static str,
    pub peer_identity: Option<String>,
    pub streams_open: u32,
    pub streams_carried: u64,
    pub age_seconds: u64,
    /// QUIC only: the path's smoothed round-trip time and the UDP bytes each way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_micros: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_received: Option<u64>,
}

/// A peer remembered for a while, and for how much longer.
#[derive(Debug, serde::Serialize)]
pub struct Remembered {
    pub peer: SocketAddr,
    pub for_seconds: u64,
}

/// Peers remembered for a while (reached without a tunnel, dialled with HTTP/2 alone).
#[derive(Debug, Default)]
struct PeerMemory(Mutex<HashMap<SocketAddr, Instant>>);

impl PeerMemory {
    fn remember(&self, peer: SocketAddr, memory: Duration) {
        let mut peers = self.0.lock().expect("tunnel pool poisoned");
        peers.insert(peer, Instant::now() + memory);
    }

    /// True while `peer` is remembered; an expired entry is forgotten.
    fn holds(&self, peer: SocketAddr) -> bool {
        let mut peers = self.0.lock().expect("tunnel pool poisoned");
        match peers.get(&peer) {
            Some(until) if Instant::now() < *until => true,
            Some(_) => {
                peers.remove(&peer);
                false
            }
            None => false,
        }
    }

    /// The peers remembered now, with how much longer.
    fn list(&self) -> Vec<Remembered> {
        let now = Instant::now();
        let mut v: Vec<Remembered> = self
            .0
            .lock()
            .expect("tunnel pool poisoned")
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(peer, until)| Remembered {
                peer: *peer,
                for_seconds: (*until - now).as_secs(),
            })
            .collect();
        v.sort_by_key(|r| r.peer);
        v
    }
}

/// A new tunnel's peer and how to reach it over each transport.
struct Dialer<'a, D, Q> {
    addr: SocketAddr,
    tcp: &'a D,
    quic_tls: &'a Q,
}

impl StreamRequest {
    /// The headers a stream's request carries beside its destination.
    fn headers(&self) -> Result<HeaderMap, StreamError> {
        let mut h = HeaderMap::new();
        let bad = |e: http::header::InvalidHeaderValue| StreamError::Refused(io::Error::other(e));
        if let Some(ip) = self.source {
            h.insert(
                http::header::FORWARDED,
                forwarded_for(ip).try_into().map_err(bad)?,
            );
        }
        if let Some(subset) = self.subset.as_deref().filter(|s| !s.is_empty()) {
            h.insert(SUBSET_HEADER, subset.try_into().map_err(bad)?);
        }
        Ok(h)
    }
}

fn no_answer(request: &StreamRequest, timeout: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "the tunnel peer did not answer the CONNECT to {} within {timeout:?}",
            request.authority
        ),
    )
}

enum StreamError {
    /// The tunnel could not carry the stream: another tunnel may.
    Tunnel(io::Error),
    /// The peer answered, and said no.
    Refused(io::Error),
}

/// `Forwarded: for=` (RFC 7239): an IPv6 address is quoted and bracketed.
fn forwarded_for(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

/// The error for a `CONNECT` the peer answered with `status`.
fn refused(status: http::StatusCode, authority: &str) -> io::Error {
    let why = match status.as_u16() {
        401 | 403 => "denied by the destination's authorization policy",
        400 => "the destination proxy does not serve that address",
        404 => "the gateway's network does not export that service",
        429 => "over a quota of the destination's policy",
        503 => "the destination proxy could not connect to the app",
        _ => "refused by the destination proxy",
    };
    io::Error::new(
        io::ErrorKind::ConnectionRefused,
        format!("tunnel CONNECT to {authority}: {status}: {why}"),
    )
}

/// Runs a tunnel's connection until it ends, closing it once it has been idle for
/// `idle_timeout` (it leaves the pool; HTTP/2 sends GOAWAY once no handle is left, a QUIC
/// connection is closed), or once it is out of the pool and its last stream ended.
async fn drive(
    driver: Driver,
    state: Arc<TunnelState>,
    slot: Weak<tokio::sync::Mutex<Vec<Tunnel>>>,
    idle_timeout: Duration,
) {
    let open = state.counters.open.clone();
    open.inc();
    let (ended, quic): (Pin<Box<dyn Future<Output = ()> + Send>>, _) = match driver {
        Driver::H2(conn) => (
            Box::pin(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "tunnel ended");
                }
            }),
            None,
        ),
        Driver::Quic(conn) => {
            let c = conn.clone();
            (
                Box::pin(async move {
                    let e = c.closed().await;
                    tracing::debug!(error = %e, "QUIC tunnel ended");
                }),
                Some(conn),
            )
        }
    };
    tokio::pin!(ended);
    let check = (idle_timeout / 4).max(Duration::from_millis(10));
    loop {
        let closed = state.closed.load(Ordering::Acquire);
        tokio::select! {
            _ = &mut ended => break,
            _ = tokio::time::sleep(check), if !closed || quic.is_some() => {
                if closed {
                    // Out of the pool: a QUIC connection is closed once its streams end.
                    if state.streams.load(Ordering::Acquire) == 0 {
                        break;
                    }
                    continue;
                }
                let idle = state.streams.load(Ordering::Acquire) == 0
                    && state.idle_since.lock().expect("tunnel state poisoned").elapsed() >= idle_timeout;
                if !idle {
                    continue;
                }
                let Some(slot) = slot.upgrade() else {
                    state.closed.store(true, Ordering::Release);
                    continue;
                };
                let mut tunnels = slot.lock().await;
                // Decided under the pool's lock, so no stream takes it meanwhile.
                if state.streams.load(Ordering::Acquire) == 0 {
                    state.closed.store(true, Ordering::Release);
                    tunnels.retain(|t| !Arc::ptr_eq(&t.state, &state));
                    tracing::debug!(?idle_timeout, "idle tunnel closed");
                }
            }
        }
    }
    state.closed.store(true, Ordering::Release);
    if let Some(slot) = slot.upgrade() {
        slot.lock().await.retain(|t| !Arc::ptr_eq(&t.state, &state));
    }
    if let Some(conn) = quic {
        conn.close(quic::code::NO_ERROR, b"done");
    }
    open.dec();
}
