//! gRPC over the mesh's mTLS: a TLS-accepting incoming stream for tonic servers, and a
//! channel builder for clients, both using the builders in [`crate::tls`].
//!
//! tonic's own TLS support cannot take a custom certificate verifier, so the handshake is
//! done here with tokio-rustls and the verified peer identity rides along as the
//! connection's `ConnectInfo` ([`PeerInfo`]), found in every request's extensions.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

use crate::drain;
use crate::identity::SpiffeId;
use crate::limits::Throttle;
use crate::tls;

/// How long a client has to finish the TLS handshake; a client that sends nothing is
/// closed after this. A handshake takes milliseconds even across a WAN; the bound only
/// decides how long a silent client holds a slot.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client has, once TLS is up, to send its first request bytes (an HTTP/2
/// client sends its preface at once); a client that completed TLS and stays silent is
/// closed after this instead of holding a descriptor for ever.
pub const DEFAULT_FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections between `accept` and their first request bytes, at once. When all are
/// taken, the oldest is closed to make room: a flood of silent connections then only
/// shortens its own connections' lives, while a real client, which finishes in
/// milliseconds, still gets through.
pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 1024;
/// Connections from one address between `accept` and their first request bytes; beyond
/// this, a new one from that address is closed at once (one source cannot take the
/// pending slots from everyone else).
pub const DEFAULT_MAX_PENDING_PER_SOURCE: usize = 64;
/// Connections a listener holds at once, pending and established; also bounded by the
/// process's open-file limit (see [`crate::limits::connection_budget`]). Beyond it, a new
/// connection is closed at once and the limit is logged and counted.
pub const DEFAULT_MAX_CONNECTIONS: usize = 65_536;
/// Largest gRPC message a server or client decodes (4 MiB, gRPC's customary limit, raised
/// for catalog snapshots).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Who is on the other end of a server-side connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// The verified SPIFFE ID of the client certificate, if one was presented.
    pub identity: Option<SpiffeId>,
}

/// A server-side TLS connection, handed to tonic.
pub struct TlsConnection {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
    /// The first request bytes, read to see that the client speaks, given back first.
    first: Vec<u8>,
    first_read: usize,
    /// The connection's place in the listener's connection limit.
    _slot: OwnedSemaphorePermit,
}

impl Connected for TlsConnection {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.first_read < self.first.len() {
            let n = buf.remaining().min(self.first.len() - self.first_read);
            let from = self.first_read;
            buf.put_slice(&self.first[from..from + n]);
            self.first_read += n;
            if self.first_read == self.first.len() {
                self.first = Vec::new();
                self.first_read = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub reason: &'static str,
}

/// Counters of the TLS front door of a gRPC server.
#[derive(Debug, Clone, Default)]
pub struct ListenerMetrics {
    pub accepted: Counter,
    pub refused: Family<RefusalLabels, Counter>,
}

impl ListenerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "grpc_connections_accepted",
            "TLS connections accepted on the gRPC port",
            m.accepted.clone(),
        );
        registry.register(
            "grpc_connections_refused",
            "Connections closed before their first request, by reason (handshake_timeout, \
             silent_after_handshake, too_many_from_source, pending_evicted, connection_limit, \
             TLS failures)",
            m.refused.clone(),
        );
        m
    }
}

/// Why a handshake failed, as a metric label.
pub fn classify_handshake_error(e: &io::Error) -> &'static str {
    if let Some(tls_err) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return match tls_err {
            rustls::Error::InvalidMessage(_)
            | rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. } => "not_tls",
            rustls::Error::NoCertificatesPresented => "no_client_certificate",
            rustls::Error::InvalidCertificate(_) | rustls::Error::General(_) => "peer_rejected",
            rustls::Error::AlertReceived(_) => "peer_alert",
            rustls::Error::PeerIncompatible(_) | rustls::Error::NoApplicationProtocol => {
                "incompatible"
            }
            _ => "tls_error",
        };
    }
    match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => "closed_early",
        _ => "io_error",
    }
}

#[derive(Debug, Clone)]
pub struct ListenerOptions {
    /// The listener's role in logs and metrics ("grpc", "webhook").
    pub name: &'static str,
    pub handshake_timeout: Duration,
    pub first_request_timeout: Duration,
    pub max_pending_handshakes: usize,
    pub max_pending_per_source: usize,
    pub max_connections: usize,
}

impl Default for ListenerOptions {
    fn default() -> Self {
        Self {
            name: "grpc",
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            first_request_timeout: DEFAULT_FIRST_REQUEST_TIMEOUT,
            max_pending_handshakes: DEFAULT_MAX_PENDING_HANDSHAKES,
            max_pending_per_source: DEFAULT_MAX_PENDING_PER_SOURCE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// The connections between `accept` and their first request bytes: how many from each
/// address, and, oldest first, how to close each one.
#[derive(Debug, Default)]
struct PendingTable {
    next: u64,
    order: BTreeMap<u64, (IpAddr, oneshot::Sender<()>)>,
    per_source: HashMap<IpAddr, usize>,
}

/// Why a new connection gets no pending slot.
enum Admission {
    /// Admitted under this id; `evicted` says whether the oldest pending one was closed
    /// to make room.
    Admitted {
        id: u64,
        evicted: bool,
    },
    TooManyFromSource,
}

impl PendingTable {
    fn admit(
        &mut self,
        source: IpAddr,
        opts: &ListenerOptions,
        close: oneshot::Sender<()>,
    ) -> Admission {
        let from_source = self.per_source.get(&source).copied().unwrap_or(0);
        if from_source >= opts.max_pending_per_source {
            return Admission::TooManyFromSource;
        }
        let mut evicted = false;
        if self.order.len() >= opts.max_pending_handshakes.max(1) {
            if let Some((_, (old_source, old_close))) = self.order.pop_first() {
                self.release_source(old_source);
                let _ = old_close.send(());
                evicted = true;
            }
        }
        let id = self.next;
        self.next += 1;
        self.order.insert(id, (source, close));
        *self.per_source.entry(source).or_insert(0) += 1;
        Admission::Admitted { id, evicted }
    }

    /// Removes `id` (a connection that got through or failed); an evicted one is gone
    /// already.
    fn remove(&mut self, id: u64) {
        if let Some((source, _)) = self.order.remove(&id) {
            self.release_source(source);
        }
    }

    fn release_source(&mut self, source: IpAddr) {
        if let Some(n) = self.per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&source);
            }
        }
    }
}

/// A pending connection's slot, given back when the connection gets through or fails.
struct PendingSlot {
    table: Arc<Mutex<PendingTable>>,
    id: u64,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        lock(&self.table).remove(self.id);
    }
}

fn lock(table: &Mutex<PendingTable>) -> std::sync::MutexGuard<'_, PendingTable> {
    // Every update is one step under the lock; a panic elsewhere cannot leave it torn.
    table.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts a connection closed before its first request, by `reason`.
fn refuse(metrics: &ListenerMetrics, reason: &'static str) {
    metrics
        .refused
        .get_or_create(&RefusalLabels { reason })
        .inc();
}

/// Accepts TCP connections, completes TLS handshakes with the current server config, waits
/// for the client's first request bytes, and yields the connections for
/// `serve_with_incoming`. Everything before the first request is bounded in time, in number
/// per source address and in total (the oldest pending connection makes room for a new
/// one); connections in all are bounded by `max_connections` and the open-file limit. Each
/// connection closed early is counted by reason. The stream ends when `shutdown` fires.
pub fn tls_incoming(
    listener: TcpListener,
    config: watch::Receiver<Arc<rustls::ServerConfig>>,
    opts: ListenerOptions,
    metrics: ListenerMetrics,
    shutdown: drain::Watch,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConnection, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let max_connections = opts
        .max_connections
        .min(crate::limits::connection_budget(1));
    let connections = Arc::new(Semaphore::new(max_connections));
    let pending = Arc::new(Mutex::new(PendingTable::default()));
    let accept_errors = crate::limits::AcceptErrors::new(opts.name);
    // Refused handshakes are logged once per interval per listener (a misconfigured fleet
    // retries in a loop); every one is counted by reason.
    let refusals_log = Arc::new(Throttle::new());
    let at_limit = crate::limits::AtLimit::new(opts.name, max_connections);
    tracing::debug!(
        listener = opts.name,
        max_connections,
        max_pending = opts.max_pending_handshakes,
        max_pending_per_source = opts.max_pending_per_source,
        "TLS listener limits"
    );
    tokio::spawn(async move {
        let stop = shutdown.signaled();
        tokio::pin!(stop);
        loop {
            // Accept first, decide after: a connection left in the kernel's backlog is one
            // nobody can count, close or explain.
            let (tcp, remote) = tokio::select! {
                _ = &mut stop => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        accept_errors.record(&e);
                        tokio::time::sleep(crate::limits::ACCEPT_ERROR_BACKOFF).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = connections.clone().try_acquire_owned() else {
                at_limit.record("are closed at once");
                refuse(&metrics, "connection_limit");
                continue;
            };
            let (close_tx, close_rx) = oneshot::channel();
            let admitted = lock(&pending).admit(remote.ip(), &opts, close_tx);
            let id = match admitted {
                Admission::TooManyFromSource => {
                    tracing::debug!(%remote, "closed: too many pending connections from this address");
                    refuse(&metrics, "too_many_from_source");
                    continue;
                }
                Admission::Admitted { id, evicted } => {
                    if evicted {
                        at_limit.record("close the oldest pending connection");
                    }
                    id
                }
            };
            let pending_slot = PendingSlot {
                table: pending.clone(),
                id,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(config.borrow().clone());
            let tx = tx.clone();
            let metrics = metrics.clone();
            let opts = opts.clone();
            let refusals_log = refusals_log.clone();
            tokio::spawn(async move {
                let reason = tokio::select! {
                    _ = close_rx => "pending_evicted",
                    r = first_request(acceptor, tcp, remote, &opts, &refusals_log) => match r {
                        Ok((stream, first)) => {
                            drop(pending_slot);
                            let identity = tls::peer_identity(stream.get_ref().1.peer_certificates());
                            metrics.accepted.inc();
                            let conn = TlsConnection {
                                inner: stream,
                                info: PeerInfo { remote, identity },
                                first,
                                first_read: 0,
                                _slot: slot,
                            };
                            let _ = tx.send(Ok(conn)).await;
                            return;
                        }
                        Err(reason) => reason,
                    },
                };
                tracing::debug!(%remote, reason, "connection closed before its first request");
                refuse(&metrics, reason);
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The TLS handshake and the client's first request bytes, each within its bound; the
/// error is the reason label.
async fn first_request(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    opts: &ListenerOptions,
    log: &Throttle,
) -> Result<(tokio_rustls::server::TlsStream<TcpStream>, Vec<u8>), &'static str> {
    let mut stream = match tokio::time::timeout(opts.handshake_timeout, acceptor.accept(tcp)).await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(handshake_refused(remote, &e, log)),
        Err(_) => return Err("handshake_timeout"),
    };
    // An HTTP/2 preface is 24 bytes; whatever the first read brings is given back to the
    // server through `TlsConnection`.
    let mut first = vec![0u8; 64];
    match tokio::time::timeout(opts.first_request_timeout, stream.read(&mut first)).await {
        Ok(Ok(0)) => Err("closed_early"),
        Ok(Ok(n)) => {
            first.truncate(n);
            Ok((stream, first))
        }
        // A client that refuses our certificate says so with its first bytes.
        Ok(Err(e)) => Err(handshake_refused(remote, &e, log)),
        Err(_) => Err("silent_after_handshake"),
    }
}

/// The reason a TLS handshake failed. A certificate refused either way is an operator's
/// problem to fix, said at warn with its cause (at most once per interval, by `log`, with
/// the number held back); garbage and early closes stay at debug.
fn handshake_refused(remote: SocketAddr, e: &io::Error, log: &Throttle) -> &'static str {
    let reason = classify_handshake_error(e);
    match tls::failure::cause_in(e).filter(|_| {
        matches!(
            reason,
            "peer_rejected" | "peer_alert" | "no_client_certificate"
        )
    }) {
        Some(cause) => {
            if let Some(suppressed) = log.allow(std::time::Instant::now()) {
                tracing::warn!(%remote, reason, %cause, suppressed, "TLS handshake refused");
            }
        }
        None => tracing::debug!(%remote, reason, error = %e, "TLS handshake failed"),
    }
    reason
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{addr:?} is not a host:port address")]
    BadAddress { addr: String },
    /// Display: the TLS cause when the handshake failed (it is not a reachability
    /// problem), else the whole chain and what to check.
    #[error("cannot connect to {addr}: {}", connect_cause(.error))]
    Connect {
        addr: String,
        error: tonic::transport::Error,
    },
    /// Several registries were named and none answered; the last one's failure.
    #[error("no registry of {tried} answered; the last: {last}")]
    NoneAnswered {
        tried: String,
        last: Box<ConnectError>,
    },
}

/// Why a connection failed: the handshake's cause, or every cause of the chain.
fn connect_cause(e: &tonic::transport::Error) -> String {
    match tls::failure::cause_in(e) {
        Some(cause) => format!("TLS handshake failed: {cause}"),
        None => format!(
            "{} (is the registry running and is its gRPC port reachable?)",
            crate::program::error_chain(e)
        ),
    }
}

/// An mTLS gRPC channel to one registry of `set` (a `host:port`, or several
/// comma-separated; see [`crate::registries`]), verified with `tls`: the one followed last
/// first, then the others, and the first that answers is followed from then on.
pub async fn connect(set: &str, tls: Arc<rustls::ClientConfig>) -> Result<Channel, ConnectError> {
    check_address(set)?;
    let candidates = crate::registries::candidates(set).await;
    let mut last = None;
    for addr in &candidates {
        match connect_one(addr, tls.clone()).await {
            Ok(channel) => {
                crate::registries::answered(set, addr);
                return Ok(channel);
            }
            Err(e) => {
                tracing::debug!(registry = %addr, error = %e, "registry did not answer; trying the next");
                last = Some(e);
            }
        }
    }
    let last = last.unwrap_or_else(|| ConnectError::BadAddress {
        addr: set.to_string(),
    });
    Err(if candidates.len() > 1 {
        ConnectError::NoneAnswered {
            tried: candidates.join(", "),
            last: Box::new(last),
        }
    } else {
        last
    })
}

/// An mTLS gRPC channel to `addr` (`host:port`), verified with `tls`.
async fn connect_one(addr: &str, tls: Arc<rustls::ClientConfig>) -> Result<Channel, ConnectError> {
    let endpoint = endpoint(addr)?;
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
        .unwrap_or_default();
    let connector = TlsConnector::from(tls);
    endpoint
        .connect_with_connector(tower::service_fn(move |uri: http::Uri| {
            let connector = connector.clone();
            let host = host.clone();
            async move {
                let authority = uri
                    .authority()
                    .map(|a| a.as_str().to_string())
                    .unwrap_or_default();
                let tcp = TcpStream::connect(&authority).await?;
                let _ = tcp.set_nodelay(true);
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .unwrap_or_else(|_| {
                        rustls::pki_types::ServerName::try_from("registry.isthmus")
                            .expect("static name")
                    })
                    .to_owned();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, io::Error>(TokioIo::new(server_first_flight(tls).await?))
            }
        }))
        .await
        .map_err(|error| ConnectError::Connect {
            addr: addr.to_string(),
            error,
        })
}

/// Checks that `addr` is an address [`connect`] can use, for a program's configuration check.
pub fn check_address(addr: &str) -> Result<(), ConnectError> {
    let entries = crate::registries::entries(addr);
    if entries.is_empty() {
        return Err(ConnectError::BadAddress {
            addr: addr.to_string(),
        });
    }
    entries.into_iter().try_for_each(|e| endpoint(e).map(drop))
}

/// The HTTP/2 client connection preface (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A client connection whose server has spoken first: its first bytes replayed to HTTP/2,
/// and the preface HTTP/2 writes already sent.
type Replayed = tokio::io::Join<
    tokio::io::Chain<io::Cursor<Vec<u8>>, tokio::io::ReadHalf<ClientTlsStream>>,
    PrefaceSent<tokio::io::WriteHalf<ClientTlsStream>>,
>;
type ClientTlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Sends the HTTP/2 preface and waits for the server's first bytes before handing the
/// connection to HTTP/2, replaying them. In TLS 1.3 a server refuses a client certificate
/// after the client's handshake is done: its alert arrives with the first read, and inside
/// h2 it would lose its type and surface as a bare "transport error" at the first request.
/// Read here, the refusal is a connect error whose cause [`tls::failure`] names. The preface
/// goes first because the server waits for a client's first bytes before its HTTP/2 answers
/// (a silent client is closed, [`ListenerOptions::first_request_timeout`]); then the server's
/// SETTINGS come at once. A server silent for the connect timeout is handed over as it is.
async fn server_first_flight(mut tls: ClientTlsStream) -> io::Result<Replayed> {
    use tokio::io::AsyncWriteExt;
    tls.write_all(H2_PREFACE).await?;
    tls.flush().await?;
    let mut first = vec![0u8; 16 * 1024];
    let n = match tokio::time::timeout(DEFAULT_CONNECT_TIMEOUT, tls.read(&mut first)).await {
        Ok(read) => read?,
        Err(_) => 0,
    };
    first.truncate(n);
    let (read, write) = tokio::io::split(tls);
    let write = PrefaceSent {
        inner: write,
        skip: H2_PREFACE.len(),
    };
    Ok(tokio::io::join(io::Cursor::new(first).chain(read), write))
}

/// A writer whose first bytes, the HTTP/2 preface, were sent already: HTTP/2 writes them
/// again, and they are checked and passed over.
struct PrefaceSent<W> {
    inner: W,
    /// Preface bytes still to pass over.
    skip: usize,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for PrefaceSent<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.skip == 0 {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        let at = H2_PREFACE.len() - this.skip;
        let n = this.skip.min(buf.len());
        if buf[..n] != H2_PREFACE[at..at + n] {
            return Poll::Ready(Err(io::Error::other(
                "the HTTP/2 client did not begin with its connection preface",
            )));
        }
        this.skip -= n;
        if n == buf.len() {
            return Poll::Ready(Ok(n));
        }
        match Pin::new(&mut this.inner).poll_write(cx, &buf[n..]) {
            Poll::Ready(Ok(written)) => Poll::Ready(Ok(n + written)),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            // What was passed over counts as written; the rest is asked again.
            Poll::Pending => Poll::Ready(Ok(n)),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn endpoint(addr: &str) -> Result<Endpoint, ConnectError> {
    let bad = || ConnectError::BadAddress {
        addr: addr.to_string(),
    };
    if !addr.contains(':') {
        return Err(bad());
    }
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| bad())?
        .connect_timeout(DEFAULT_CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(total: usize, per_source: usize) -> ListenerOptions {
        ListenerOptions {
            max_pending_handshakes: total,
            max_pending_per_source: per_source,
            ..ListenerOptions::default()
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn one_source_gets_its_share_and_no_more() {
        let mut t = PendingTable::default();
        let o = opts(10, 2);
        let (tx, _rx1) = oneshot::channel();
        assert!(matches!(
            t.admit(ip(1), &o, tx),
            Admission::Admitted {
                id: 0,
                evicted: false
            }
        ));
        let (tx, _rx2) = oneshot::channel();
        assert!(matches!(
            t.admit(ip(1), &o, tx),
            Admission::Admitted { id: 1, .. }
        ));
        let (tx, _rx3) = oneshot::channel();
        assert!(matches!(
            t.admit(ip(1), &o, tx),
            Admission::TooManyFromSource
        ));
        // Another source is not affected; a finished one gives its place back.
        let (tx, _rx4) = oneshot::channel();
        assert!(matches!(t.admit(ip(2), &o, tx), Admission::Admitted { .. }));
        t.remove(0);
        let (tx, _rx5) = oneshot::channel();
        assert!(matches!(t.admit(ip(1), &o, tx), Admission::Admitted { .. }));
    }

    #[test]
    fn when_all_slots_are_taken_the_oldest_is_closed() {
        let mut t = PendingTable::default();
        let o = opts(2, 10);
        let (tx, mut oldest) = oneshot::channel();
        t.admit(ip(1), &o, tx);
        let (tx, mut second) = oneshot::channel();
        t.admit(ip(2), &o, tx);
        let (tx, _third) = oneshot::channel();
        assert!(matches!(
            t.admit(ip(3), &o, tx),
            Admission::Admitted {
                id: 2,
                evicted: true
            }
        ));
        assert!(oldest.try_recv().is_ok(), "the oldest is told to close");
        assert!(second.try_recv().is_err(), "the others stay");
        assert_eq!(t.order.len(), 2);
        assert!(
            !t.per_source.contains_key(&ip(1)),
            "its source's count is given back"
        );
        // Removing an evicted one again changes nothing.
        t.remove(0);
        assert_eq!(t.order.len(), 2);
    }
}
