//! The server side every tunnel listener shares (the VM agent's in front of its app, the
//! gateway's in front of its network): the mTLS handshake with ALPN `h2`, the HTTP/2
//! connection, and each `CONNECT` stream handed to the listener's own handling as a
//! [`Pending`] stream with an access record of its own, registered with the tracker that
//! drain waits on. On shutdown each tunnel is told to go away (GOAWAY): its streams in
//! flight finish, new ones go elsewhere.
//!
//! A connection refused before its streams is a [`Refusal`]: not TLS, no client
//! certificate, a failed handshake (`connections_refused` by the classified reason), no
//! ALPN `h2` (`tunnel_wrong_alpn`), no HTTP/2 preface (`tunnel_not_http2`).
//!
//! The same listener serves QUIC tunnels from a UDP endpoint ([`Listener::serve_quic`]):
//! the QUIC handshake (its failures counted as `tunnel_quic_handshake`), each stream's
//! header read into the same [`Pending`] (a bad one is `tunnel_bad_header`, the stream reset
//! with `PROTOCOL_ERROR`) and acknowledged at once with [`quic::RECEIVED`], the same
//! handling. A QUIC connection has no GOAWAY: on shutdown its new streams are reset with
//! `REFUSED_STREAM` (the client takes another tunnel) and it is closed once its streams in
//! flight end. Beyond [`quic::MAX_HANDSHAKES`] handshakes at once, a new client must first
//! prove its address (a Retry, `tunnel_quic_retry`), and beyond twice that it is refused
//! (`tunnel_quic_handshake_limit`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Response, StatusCode};
use isthmus_proto::drain;
use isthmus_proto::identity::SpiffeId;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tracing::Instrument;

use super::quic::{self, QuicStream};
use super::{io_error, server_builder, H2Stream, Stream, ALPN_H2, TRANSPORT};
use crate::connection::{accept_mtls, refusal, AccessRecord, Refusal, Tracker};
use crate::metrics::{Direction, Metrics, TunnelCounters, TunnelRole, UNKNOWN_PEER};

/// A stream's request, not answered yet.
pub struct Pending {
    pub method: Method,
    /// The request's `:authority`, as sent.
    pub authority: Option<String>,
    pub headers: http::HeaderMap,
    reply: Reply,
    /// Its tunnel's series: the stream's bytes are counted there once accepted.
    counters: TunnelCounters,
}

/// Where a pending stream's answer goes.
enum Reply {
    H2 {
        body: RecvStream,
        respond: SendResponse<Bytes>,
    },
    Quic {
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    },
    /// Answered already.
    Done,
}

impl Pending {
    /// Answers `status` and ends the stream.
    pub fn refuse(&mut self, status: StatusCode) {
        match std::mem::replace(&mut self.reply, Reply::Done) {
            Reply::H2 { mut respond, .. } => {
                let _ = respond.send_response(answer(status), true);
            }
            Reply::Quic { mut send, .. } => {
                // The answer is a few bytes: written in the background, then the stream
                // ends.
                tokio::spawn(async move {
                    let _ = send.write_all(&quic::encode_response(status)).await;
                    let _ = send.finish();
                });
            }
            Reply::Done => {}
        }
    }

    /// Resets the stream (`CONNECT_ERROR` is a TCP reset's equivalent, RFC 9113 8.5).
    pub fn reset(&mut self) {
        match std::mem::replace(&mut self.reply, Reply::Done) {
            Reply::H2 { mut respond, .. } => respond.send_reset(h2::Reason::CONNECT_ERROR),
            Reply::Quic { send, recv } => {
                QuicStream::new(send, recv).reset(quic::code::CONNECT_ERROR);
            }
            Reply::Done => {}
        }
    }

    /// Answers `200`: from here the stream carries the app's bytes.
    pub async fn accept(mut self) -> io::Result<Stream> {
        match std::mem::replace(&mut self.reply, Reply::Done) {
            Reply::H2 { body, mut respond } => {
                let send = respond
                    .send_response(answer(StatusCode::OK), false)
                    .map_err(io_error)?;
                Ok(Stream::from(H2Stream::new(send, body)).counted(&self.counters))
            }
            Reply::Quic { mut send, recv } => {
                send.write_all(&quic::encode_response(StatusCode::OK))
                    .await?;
                Ok(Stream::from(QuicStream::new(send, recv)).counted(&self.counters))
            }
            Reply::Done => Err(io::Error::other("the stream was answered already")),
        }
    }

    /// The `CONNECT` target as an address, or why the stream is refused (`405` for another
    /// method, `400` for an authority that is not `ip:port`).
    pub fn target_addr(&self) -> Result<SocketAddr, (StatusCode, Refusal)> {
        self.connect_authority()?
            .parse::<SocketAddr>()
            .map_err(|_| self.bad_authority("an ip:port"))
    }

    /// The `CONNECT` target as it was sent, or why the stream is refused.
    pub fn connect_authority(&self) -> Result<&str, (StatusCode, Refusal)> {
        if self.method != Method::CONNECT {
            return Err((
                StatusCode::METHOD_NOT_ALLOWED,
                refusal(
                    "tunnel_not_connect",
                    format!(
                        "{} on the tunnel port; only CONNECT opens a stream",
                        self.method
                    ),
                ),
            ));
        }
        self.authority
            .as_deref()
            .ok_or_else(|| self.bad_authority("a destination"))
    }

    /// The `400` for an authority that is not `what`.
    pub fn bad_authority(&self, what: &str) -> (StatusCode, Refusal) {
        (
            StatusCode::BAD_REQUEST,
            refusal(
                "tunnel_bad_authority",
                format!(
                    "the CONNECT names {:?}, not {what}",
                    self.authority.as_deref().unwrap_or_default()
                ),
            ),
        )
    }
}

fn answer(status: StatusCode) -> Response<()> {
    Response::builder()
        .status(status)
        .body(())
        .expect("a status alone is a valid response")
}

/// What a tunnel listener shares with this loop.
#[derive(Debug, Clone)]
pub struct Listener {
    pub direction: Direction,
    pub metrics: Arc<Metrics>,
    pub tracker: Arc<Tracker>,
    /// For the TLS handshake and, separately, the HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// Streams one tunnel may carry at once (`MAX_CONCURRENT_STREAMS`).
    pub max_streams: u32,
}

impl Listener {
    /// Counts a handshake by its result, and by the client's identity where it succeeded.
    fn handshake<T>(&self, transport: &'static str, accepted: &Result<(T, SpiffeId), Refusal>) {
        let tunnels = &self.metrics.tunnels;
        let (peer, result) = match accepted {
            Ok((_, id)) => (tunnels.peer(id), "ok"),
            Err(_) => (UNKNOWN_PEER.to_string(), "failed"),
        };
        tunnels.handshake(TunnelRole::server, transport, &peer, result);
    }

    /// The series of a tunnel accepted from `peer`.
    fn counters(&self, transport: &'static str, peer: &SpiffeId) -> TunnelCounters {
        let tunnels = &self.metrics.tunnels;
        tunnels.tunnel(TunnelRole::server, transport, &tunnels.peer(peer))
    }

    /// The mTLS handshake with `config` (which must offer ALPN `h2` and require a client
    /// certificate): the session and the client's verified identity.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        config: Arc<rustls::ServerConfig>,
    ) -> Result<(TlsStream<TcpStream>, SpiffeId), Refusal> {
        let accepted = self.accept_tls(tcp, config).await;
        self.handshake(TRANSPORT, &accepted);
        accepted
    }

    async fn accept_tls(
        &self,
        tcp: TcpStream,
        config: Arc<rustls::ServerConfig>,
    ) -> Result<(TlsStream<TcpStream>, SpiffeId), Refusal> {
        let timeout = self.handshake_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let (tls, peer) = accept_mtls(tcp, config, deadline, timeout, "a tunnel").await?;
        let conn = tls.get_ref().1;
        if conn.alpn_protocol() != Some(ALPN_H2) {
            let shown = conn.alpn_protocol().map_or_else(
                || "none".to_string(),
                |a| String::from_utf8_lossy(a).into_owned(),
            );
            return Err(refusal(
                "tunnel_wrong_alpn",
                format!("the client negotiated ALPN {shown}; the tunnel port speaks h2 only"),
            ));
        }
        Ok((tls, peer))
    }

    /// Serves the tunnel `tls` from `peer` until it ends, each stream with `on_stream` in a
    /// task of its own; when `stop` fires the tunnel is told to go away. Fills in `rec` for
    /// the tunnel itself (its peer, how many streams it carried, how it ended).
    pub async fn serve<F, Fut>(
        &self,
        tls: TlsStream<TcpStream>,
        peer: SpiffeId,
        rec: &mut AccessRecord,
        stop: drain::Watch,
        on_stream: F,
    ) where
        F: Fn(Pending, SpiffeId, AccessRecord) -> Fut,
        Fut: Future<Output = AccessRecord> + Send + 'static,
    {
        rec.destination = "tunnel".into();
        rec.peer_identity = Some(peer.to_string());
        tracing::Span::current().record("peer", tracing::field::display(&peer));
        let setup = server_builder(self.max_streams).handshake::<_, Bytes>(tls);
        let mut conn = match tokio::time::timeout(self.handshake_timeout, setup).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return self.refuse(rec, refusal("tunnel_not_http2", io_error(e))),
            Err(_) => {
                let r = refusal(
                    "tunnel_not_http2",
                    "no HTTP/2 preface within the handshake timeout after the TLS handshake",
                );
                return self.refuse(rec, r);
            }
        };
        let counters = self.counters(TRANSPORT, &peer);
        let open = counters.open.clone();
        open.inc();
        let client = rec.client;
        let mut streams = 0u64;
        let stopped = stop.signaled();
        tokio::pin!(stopped);
        let mut going_away = false;
        let ended = loop {
            let next = tokio::select! {
                next = conn.accept() => next,
                _ = &mut stopped, if !going_away => {
                    going_away = true;
                    conn.graceful_shutdown();
                    continue;
                }
            };
            let (request, respond) = match next {
                None => break None,
                Some(Ok(r)) => r,
                Some(Err(e)) => break Some(io_error(e)),
            };
            streams += 1;
            let (parts, body) = request.into_parts();
            let pending = Pending {
                method: parts.method,
                authority: parts.uri.authority().map(|a| a.as_str().to_owned()),
                headers: parts.headers,
                reply: Reply::H2 { body, respond },
                counters: counters.clone(),
            };
            self.spawn_stream(pending, &peer, client, None, &on_stream);
        };
        open.dec();
        self.ended(rec, streams, ended);
    }

    /// Registers a stream with the tracker and hands it to `on_stream` in a task of its own
    /// (holding `hold` until it ends).
    fn spawn_stream<F, Fut>(
        &self,
        pending: Pending,
        peer: &SpiffeId,
        client: SocketAddr,
        hold: Option<Arc<()>>,
        on_stream: &F,
    ) where
        F: Fn(Pending, SpiffeId, AccessRecord) -> Fut,
        Fut: Future<Output = AccessRecord> + Send + 'static,
    {
        pending.counters.streams.inc();
        let guard = self.tracker.register();
        let span = tracing::debug_span!(
            "stream",
            id = guard.id,
            dir = self.direction.as_str(),
            %client,
            peer = %peer,
        );
        let mut stream_rec = AccessRecord::new(guard.id, self.direction, client);
        stream_rec.peer_identity = Some(peer.to_string());
        stream_rec.destination = pending.authority.clone().unwrap_or_default();
        // Boxed, as the accept loop boxes a connection's: a stream's future is large, and
        // the task then holds a pointer rather than copying it as it starts and ends.
        let work = Box::pin(on_stream(pending, peer.clone(), stream_rec));
        let tracker = self.tracker.clone();
        tokio::spawn(
            async move {
                let rec = work.await;
                rec.emit();
                tracker.remember(rec);
                drop(guard);
                drop(hold);
            }
            .instrument(span),
        );
    }

    /// Fills in a tunnel's own record as it ends.
    fn ended(&self, rec: &mut AccessRecord, streams: u64, error: Option<io::Error>) {
        rec.destination = format!("tunnel ({streams} streams)");
        rec.result = "ok";
        if let Some(e) = error {
            rec.result = "error";
            rec.error = Some(e.to_string());
        }
    }

    /// Accepts QUIC tunnels on `endpoint` until `shutdown`, each registered with the tracker
    /// and served by [`Listener::serve_quic_connection`] in a task of its own; then the
    /// endpoint takes no new connection, and those open are told to go away. `config`
    /// gives the server config for each new connection where it may have changed since the
    /// endpoint's (`None`: the endpoint's).
    pub async fn serve_quic<C, F, Fut>(
        &self,
        endpoint: quinn::Endpoint,
        config: C,
        shutdown: drain::Watch,
        on_stream: F,
    ) where
        C: Fn() -> Option<Arc<quinn::ServerConfig>>,
        F: Fn(Pending, SpiffeId, AccessRecord) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = AccessRecord> + Send + 'static,
    {
        let handshaking = Arc::new(AtomicUsize::new(0));
        let stop = shutdown.clone().signaled();
        tokio::pin!(stop);
        loop {
            let incoming = tokio::select! {
                _ = &mut stop => break,
                i = endpoint.accept() => match i {
                    Some(i) => i,
                    None => break,
                },
            };
            let now = handshaking.load(Ordering::Acquire);
            // Beyond the limit the client must prove its address first (nothing is
            // formatted here: this is the path a flood takes).
            if now >= quic::MAX_HANDSHAKES && !incoming.remote_address_validated() {
                self.metrics.refuse(self.direction, "tunnel_quic_retry");
                if incoming.may_retry() {
                    let _ = incoming.retry();
                } else {
                    incoming.refuse();
                }
                continue;
            }
            if now >= 2 * quic::MAX_HANDSHAKES {
                self.metrics
                    .refuse(self.direction, "tunnel_quic_handshake_limit");
                incoming.refuse();
                continue;
            }
            handshaking.fetch_add(1, Ordering::AcqRel);
            let guard = self.tracker.register();
            let client = incoming.remote_address();
            let span = tracing::debug_span!(
                "conn",
                id = guard.id,
                dir = self.direction.as_str(),
                %client,
                peer = tracing::field::Empty
            );
            let (listener, on_stream, stop) = (self.clone(), on_stream.clone(), shutdown.clone());
            let config = config();
            let (handshaking, tracker) = (handshaking.clone(), self.tracker.clone());
            tokio::spawn(
                async move {
                    let mut rec = AccessRecord::new(guard.id, listener.direction, client);
                    let accepted = listener.accept_quic(incoming, config).await;
                    handshaking.fetch_sub(1, Ordering::AcqRel);
                    match accepted {
                        Ok((conn, peer)) => {
                            listener
                                .serve_quic_connection(conn, peer, &mut rec, stop, on_stream)
                                .await
                        }
                        Err(r) => listener.refuse(&mut rec, r),
                    }
                    rec.emit();
                    tracker.remember(rec);
                    drop(guard);
                }
                .instrument(span),
            );
        }
        endpoint.set_server_config(None);
        tracing::info!(
            direction = self.direction.as_str(),
            "QUIC tunnel listener stopped accepting"
        );
    }

    /// The QUIC handshake of `incoming`: the connection and the client's verified identity.
    pub async fn accept_quic(
        &self,
        incoming: quinn::Incoming,
        config: Option<Arc<quinn::ServerConfig>>,
    ) -> Result<(quinn::Connection, SpiffeId), Refusal> {
        let accepted = self.quic_handshake(incoming, config).await;
        self.handshake(quic::TRANSPORT, &accepted);
        accepted
    }

    async fn quic_handshake(
        &self,
        incoming: quinn::Incoming,
        config: Option<Arc<quinn::ServerConfig>>,
    ) -> Result<(quinn::Connection, SpiffeId), Refusal> {
        let timeout = self.handshake_timeout;
        let failed = |e: quinn::ConnectionError| refusal("tunnel_quic_handshake", e);
        let connecting = match config {
            Some(c) => incoming.accept_with(c),
            None => incoming.accept(),
        }
        .map_err(failed)?;
        let conn = match tokio::time::timeout(timeout, connecting).await {
            Err(_) => {
                return Err(refusal(
                    "handshake_timeout",
                    format!("the QUIC handshake did not complete within {timeout:?}"),
                ))
            }
            Ok(Err(e)) => return Err(failed(e)),
            Ok(Ok(c)) => c,
        };
        let alpn = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol);
        if alpn.as_deref() != Some(quic::ALPN_QUIC) {
            conn.close(quic::code::PROTOCOL_ERROR, b"wrong ALPN");
            let shown = alpn.map_or_else(
                || "none".into(),
                |a| String::from_utf8_lossy(&a).into_owned(),
            );
            return Err(refusal(
                "tunnel_wrong_alpn",
                format!(
                    "the QUIC client negotiated ALPN {shown}; the tunnel port speaks {} only",
                    String::from_utf8_lossy(quic::ALPN_QUIC)
                ),
            ));
        }
        let Some(peer) = quic::peer_identity(&conn) else {
            conn.close(quic::code::PROTOCOL_ERROR, b"no client certificate");
            return Err(refusal(
                "no_client_certificate",
                "the QUIC handshake completed without a client certificate; a tunnel requires mTLS",
            ));
        };
        Ok((conn, peer))
    }

    /// Serves the QUIC tunnel `conn` from `peer` until it ends, as [`Listener::serve`] does
    /// an HTTP/2 one; each stream's header is read in the stream's own task.
    pub async fn serve_quic_connection<F, Fut>(
        &self,
        conn: quinn::Connection,
        peer: SpiffeId,
        rec: &mut AccessRecord,
        stop: drain::Watch,
        on_stream: F,
    ) where
        F: Fn(Pending, SpiffeId, AccessRecord) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = AccessRecord> + Send + 'static,
    {
        rec.destination = "tunnel".into();
        rec.peer_identity = Some(peer.to_string());
        tracing::Span::current().record("peer", tracing::field::display(&peer));
        let counters = self.counters(quic::TRANSPORT, &peer);
        let open = counters.open.clone();
        open.inc();
        let client = rec.client;
        let mut streams = 0u64;
        // One per stream in flight, and this one.
        let in_flight = Arc::new(());
        let stopped = stop.signaled();
        tokio::pin!(stopped);
        let mut going_away = false;
        let ended = loop {
            let next = tokio::select! {
                next = conn.accept_bi() => next,
                _ = &mut stopped, if !going_away => {
                    going_away = true;
                    continue;
                }
                _ = tokio::time::sleep(Duration::from_millis(50)), if going_away => {
                    if Arc::strong_count(&in_flight) == 1 {
                        conn.close(quic::code::NO_ERROR, b"going away");
                        break None;
                    }
                    continue;
                }
            };
            let (send, mut recv) = match next {
                Ok(s) => s,
                Err(
                    quinn::ConnectionError::ApplicationClosed(_)
                    | quinn::ConnectionError::LocallyClosed,
                ) => break None,
                Err(e) => break Some(quic::io_error(e)),
            };
            if going_away {
                // The client takes another tunnel for it.
                QuicStream::new(send, recv).reset(quic::code::REFUSED_STREAM);
                continue;
            }
            streams += 1;
            let (listener, on_stream, peer, counters) = (
                self.clone(),
                on_stream.clone(),
                peer.clone(),
                counters.clone(),
            );
            let hold = in_flight.clone();
            let timeout = self.handshake_timeout;
            tokio::spawn(async move {
                let header = tokio::time::timeout(timeout, quic::read_request(&mut recv)).await;
                let request = match header {
                    Ok(Ok(r)) => r,
                    Ok(Err(r)) => {
                        QuicStream::new(send, recv).reset(quic::code::PROTOCOL_ERROR);
                        listener.metrics.refuse(listener.direction, r.reason);
                        tracing::debug!(reason = r.reason, detail = %r.detail, "tunnel stream refused");
                        return;
                    }
                    Err(_) => {
                        QuicStream::new(send, recv).reset(quic::code::PROTOCOL_ERROR);
                        listener
                            .metrics
                            .refuse(listener.direction, "tunnel_bad_header");
                        tracing::debug!(?timeout, "no stream header within the handshake timeout");
                        return;
                    }
                };
                // Received: the client knows its request got here, whatever the answer
                // waits for (see `quic::RECEIVED`).
                let mut send = send;
                if send
                    .write_all(&quic::encode_response(quic::RECEIVED))
                    .await
                    .is_err()
                {
                    return;
                }
                let pending = Pending {
                    method: Method::CONNECT,
                    authority: Some(request.authority),
                    headers: request.headers,
                    reply: Reply::Quic { send, recv },
                    counters,
                };
                listener.spawn_stream(pending, &peer, client, Some(hold), &on_stream);
            });
        };
        open.dec();
        self.ended(rec, streams, ended);
    }

    /// Counts and records a refusal of the tunnel or of one of its streams.
    pub fn refuse(&self, rec: &mut AccessRecord, r: Refusal) {
        tracing::debug!(reason = r.reason, detail = %r.detail, "tunnel refused");
        self.metrics.refuse(self.direction, r.reason);
        rec.result = r.reason;
        rec.error = Some(r.detail);
    }
}
