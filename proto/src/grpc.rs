//! gRPC over the mesh's mTLS: a TLS-accepting incoming stream for tonic servers, and a
//! channel builder for clients, both using the builders in [`crate::tls`].
//!
//! tonic's own TLS support cannot take a custom certificate verifier, so the handshake is
//! done here with tokio-rustls and the verified peer identity rides along as the
//! connection's `ConnectInfo` ([`PeerInfo`]), found in every request's extensions.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

use crate::drain;
use crate::identity::SpiffeId;
use crate::tls;

/// How long a client has to finish the TLS handshake; a client that sends nothing is
/// closed after this.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; beyond this new connections wait in the kernel backlog.
pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 1024;
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
            "Connections closed before or during the TLS handshake, by reason",
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
    pub handshake_timeout: Duration,
    pub max_pending_handshakes: usize,
}

impl Default for ListenerOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_pending_handshakes: DEFAULT_MAX_PENDING_HANDSHAKES,
        }
    }
}

/// Accepts TCP connections, completes TLS handshakes (bounded in time and number) with the
/// current server config, and yields the connections for `serve_with_incoming`. The stream
/// ends when `shutdown` fires.
pub fn tls_incoming(
    listener: TcpListener,
    config: watch::Receiver<Arc<rustls::ServerConfig>>,
    opts: ListenerOptions,
    metrics: ListenerMetrics,
    shutdown: drain::Watch,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConnection, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let permits = Arc::new(Semaphore::new(opts.max_pending_handshakes));
    tokio::spawn(async move {
        let stop = shutdown.signaled();
        tokio::pin!(stop);
        loop {
            let permit = tokio::select! {
                _ = &mut stop => break,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let (tcp, remote) = tokio::select! {
                _ = &mut stop => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(config.borrow().clone());
            let tx = tx.clone();
            let metrics = metrics.clone();
            let timeout = opts.handshake_timeout;
            tokio::spawn(async move {
                let _permit = permit;
                let reason = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let identity = tls::peer_identity(stream.get_ref().1.peer_certificates());
                        metrics.accepted.inc();
                        let conn = TlsConnection {
                            inner: stream,
                            info: PeerInfo { remote, identity },
                        };
                        let _ = tx.send(Ok(conn)).await;
                        return;
                    }
                    Ok(Err(e)) => {
                        let reason = classify_handshake_error(&e);
                        // A certificate refused either way is an operator's problem to
                        // fix: said with its cause. Garbage and early closes stay at debug.
                        if let Some(cause) = tls::failure::cause_in(&e).filter(|_| {
                            matches!(
                                reason,
                                "peer_rejected" | "peer_alert" | "no_client_certificate"
                            )
                        }) {
                            tracing::warn!(%remote, reason, %cause, "TLS handshake refused");
                        }
                        reason
                    }
                    Err(_) => "handshake_timeout",
                };
                tracing::debug!(%remote, reason, "connection refused during TLS handshake");
                metrics
                    .refused
                    .get_or_create(&RefusalLabels { reason })
                    .inc();
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
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

/// An mTLS gRPC channel to `addr` (`host:port`), verified with `tls`.
pub async fn connect(addr: &str, tls: Arc<rustls::ClientConfig>) -> Result<Channel, ConnectError> {
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

/// A client connection whose server has spoken first.
type Replayed = tokio::io::Join<
    tokio::io::Chain<io::Cursor<Vec<u8>>, tokio::io::ReadHalf<ClientTlsStream>>,
    tokio::io::WriteHalf<ClientTlsStream>,
>;
type ClientTlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Waits for the server's first bytes before handing the connection to HTTP/2, and replays
/// them. In TLS 1.3 a server refuses a client certificate after the client's handshake is
/// done: its alert arrives with the first read, and inside h2 it would lose its type and
/// surface as a bare "transport error" at the first request. Read here, the refusal is a
/// connect error whose cause [`tls::failure`] names. An HTTP/2 server speaks first (its
/// SETTINGS), so an accepted connection waits no longer than that; a server silent for the
/// connect timeout is handed over as it is.
async fn server_first_flight(mut tls: ClientTlsStream) -> io::Result<Replayed> {
    use tokio::io::AsyncReadExt;
    let mut first = vec![0u8; 16 * 1024];
    let n = match tokio::time::timeout(DEFAULT_CONNECT_TIMEOUT, tls.read(&mut first)).await {
        Ok(read) => read?,
        Err(_) => 0,
    };
    first.truncate(n);
    let (read, write) = tokio::io::split(tls);
    Ok(tokio::io::join(io::Cursor::new(first).chain(read), write))
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
