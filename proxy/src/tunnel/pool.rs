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

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use isthmus_proto::identity::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{client_builder, io_error, H2Stream, FALLBACK_MEMORY, TRANSPORT};
use crate::metrics::{Metrics, TunnelHandshakeLabels, TunnelLabels, TunnelRole};

pub use crate::metrics::TunnelMetrics;

/// How the pool behaves.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    /// Streams one tunnel carries at once.
    pub max_streams: u32,
    /// A tunnel without streams for this long is closed.
    pub idle_timeout: Duration,
    /// For dialling a tunnel (TCP, TLS and HTTP/2) and, separately, for a stream's answer.
    pub timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_streams: super::DEFAULT_MAX_STREAMS,
            idle_timeout: super::DEFAULT_IDLE_TIMEOUT,
            timeout: crate::upstream::DEFAULT_CONNECT_TIMEOUT,
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
    pub stream: H2Stream,
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
    /// Peers whose tunnel could not be set up, until when they are reached without one.
    unreachable: Mutex<HashMap<SocketAddr, Instant>>,
    settings: PoolSettings,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Clone)]
struct Tunnel {
    send: SendRequest<Bytes>,
    state: Arc<TunnelState>,
}

#[derive(Debug)]
struct TunnelState {
    streams: AtomicU32,
    /// Taken out of the pool: no new stream goes over it.
    closed: AtomicBool,
    idle_since: Mutex<Instant>,
    peer: Option<SpiffeId>,
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
                unreachable: Mutex::new(HashMap::new()),
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

    /// False while a tunnel to `addr` could not be set up within the last
    /// [`FALLBACK_MEMORY`]: connect without one meanwhile.
    pub fn reachable(&self, addr: SocketAddr) -> bool {
        let mut unreachable = self.inner.unreachable.lock().expect("tunnel pool poisoned");
        match unreachable.get(&addr) {
            Some(until) if Instant::now() < *until => false,
            Some(_) => {
                unreachable.remove(&addr);
                true
            }
            None => true,
        }
    }

    /// Counts a connection made without a tunnel because its peer's could not be set up.
    pub fn fell_back(&self) {
        self.inner
            .metrics
            .tunnels
            .fallbacks
            .get_or_create(&labels())
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

    /// Opens a stream to `request.authority` over a tunnel to `key`, dialling one with
    /// `dial` (TCP and the mTLS handshake, ALPN `h2`; it returns the peer's verified
    /// identity) when none can take it.
    pub async fn open<D, Fut, T>(
        &self,
        key: &PoolKey,
        dial: D,
        request: &StreamRequest,
    ) -> io::Result<Opened>
    where
        D: Fn() -> Fut,
        Fut: Future<Output = io::Result<(T, Option<SpiffeId>)>>,
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let slot = {
            let mut peers = self.peers();
            match peers.get(key) {
                Some(slot) => slot.clone(),
                // The key is cloned only for a peer seen for the first time.
                None => peers.entry(key.clone()).or_default().clone(),
            }
        };
        let mut redialled = false;
        loop {
            let (tunnel, new_tunnel) = self.take(&slot, key.addr, &dial).await?;
            let count = StreamCount(tunnel.state.clone());
            match self.stream(tunnel.send.clone(), request).await {
                Ok(stream) => {
                    self.inner
                        .metrics
                        .tunnels
                        .streams
                        .get_or_create(&labels())
                        .inc();
                    return Ok(Opened {
                        stream: stream.holding(count),
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
    async fn take<D, Fut, T>(
        &self,
        slot: &Slot,
        addr: SocketAddr,
        dial: &D,
    ) -> io::Result<(Tunnel, bool)>
    where
        D: Fn() -> Fut,
        Fut: Future<Output = io::Result<(T, Option<SpiffeId>)>>,
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let limit = self.inner.settings.max_streams;
        let mut tunnels = slot.lock().await;
        tunnels.retain(|t| !t.state.closed.load(Ordering::Acquire));
        let found = tunnels.iter().find(|t| {
            let peer_limit = u32::try_from(t.send.current_max_send_streams()).unwrap_or(u32::MAX);
            t.state.usable(limit.min(peer_limit))
        });
        if let Some(t) = found {
            t.state.streams.fetch_add(1, Ordering::AcqRel);
            return Ok((t.clone(), false));
        }
        let t = self.dial(slot, addr, dial).await?;
        t.state.streams.fetch_add(1, Ordering::AcqRel);
        tunnels.push(t.clone());
        Ok((t, true))
    }

    async fn dial<D, Fut, T>(&self, slot: &Slot, addr: SocketAddr, dial: &D) -> io::Result<Tunnel>
    where
        D: Fn() -> Fut,
        Fut: Future<Output = io::Result<(T, Option<SpiffeId>)>>,
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let timeout = self.inner.settings.timeout;
        let setup = async {
            let (io, peer) = dial().await?;
            let (send, conn) = client_builder()
                .handshake::<_, Bytes>(io)
                .await
                .map_err(io_error)?;
            io::Result::Ok((send, conn, peer))
        };
        let handshakes = &self.inner.metrics.tunnels.handshakes;
        let counted = |result| {
            handshakes
                .get_or_create(&TunnelHandshakeLabels {
                    role: TunnelRole::client,
                    transport: TRANSPORT,
                    result,
                })
                .inc()
        };
        let failed = |result, addr| {
            counted(result);
            let until = Instant::now() + FALLBACK_MEMORY;
            let mut unreachable = self.inner.unreachable.lock().expect("tunnel pool poisoned");
            unreachable.insert(addr, until);
        };
        let (send, conn, peer) = match tokio::time::timeout(timeout, setup).await {
            Ok(Ok(set_up)) => set_up,
            Ok(Err(e)) => {
                failed("failed", addr);
                return Err(e);
            }
            Err(_) => {
                failed("timeout", addr);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the tunnel was not set up within {timeout:?}"),
                ));
            }
        };
        counted("ok");
        let state = Arc::new(TunnelState {
            streams: AtomicU32::new(0),
            closed: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            peer,
        });
        tokio::spawn(drive(
            conn,
            state.clone(),
            Arc::downgrade(slot),
            self.inner.settings.idle_timeout,
            self.inner.metrics.clone(),
        ));
        Ok(Tunnel { send, state })
    }

    /// Sends the `CONNECT` and waits for its answer.
    async fn stream(
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
            .version(http::Version::HTTP_2);
        if let Some(ip) = request.source {
            req = req.header(http::header::FORWARDED, forwarded_for(ip));
        }
        if let Some(subset) = request.subset.as_deref().filter(|s| !s.is_empty()) {
            req = req.header(SUBSET_HEADER, subset);
        }
        let req = req
            .body(())
            .map_err(|e| StreamError::Refused(io::Error::other(e)))?;
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
            Err(_) => {
                return Err(StreamError::Refused(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the tunnel peer did not answer the CONNECT to {} within {timeout:?}",
                        request.authority
                    ),
                )))
            }
        };
        let status = response.status();
        if status != http::StatusCode::OK {
            return Err(StreamError::Refused(refused(status, &request.authority)));
        }
        Ok(H2Stream::new(body, response.into_body()))
    }
}

enum StreamError {
    /// The tunnel could not carry the stream: another tunnel may.
    Tunnel(io::Error),
    /// The peer answered, and said no.
    Refused(io::Error),
}

fn labels() -> TunnelLabels {
    TunnelLabels {
        role: TunnelRole::client,
        transport: TRANSPORT,
    }
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
/// `idle_timeout` (it leaves the pool; HTTP/2 sends GOAWAY once no handle is left).
async fn drive<T>(
    conn: h2::client::Connection<T, Bytes>,
    state: Arc<TunnelState>,
    slot: Weak<tokio::sync::Mutex<Vec<Tunnel>>>,
    idle_timeout: Duration,
    metrics: Arc<Metrics>,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let open = metrics.tunnels.open.get_or_create(&labels()).clone();
    open.inc();
    tokio::pin!(conn);
    let check = (idle_timeout / 4).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            ended = &mut conn => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "tunnel ended");
                }
                break;
            }
            _ = tokio::time::sleep(check), if !state.closed.load(Ordering::Acquire) => {
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
    open.dec();
}
