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

use std::future::Future;
use std::io;
use std::net::SocketAddr;
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

use super::{io_error, server_builder, H2Stream, ALPN_H2, TRANSPORT};
use crate::connection::{accept_mtls, refusal, AccessRecord, Refusal, Tracker};
use crate::metrics::{Direction, Metrics, TunnelHandshakeLabels, TunnelLabels, TunnelRole};

/// A stream's request, not answered yet.
pub struct Pending {
    pub method: Method,
    /// The request's `:authority`, as sent.
    pub authority: Option<String>,
    pub headers: http::HeaderMap,
    body: RecvStream,
    respond: SendResponse<Bytes>,
}

impl Pending {
    /// Answers `status` and ends the stream.
    pub fn refuse(&mut self, status: StatusCode) {
        let response = Response::builder()
            .status(status)
            .body(())
            .expect("a status alone is a valid response");
        let _ = self.respond.send_response(response, true);
    }

    /// Resets the stream (`CONNECT_ERROR` is a TCP reset's equivalent, RFC 9113 8.5).
    pub fn reset(&mut self, reason: h2::Reason) {
        self.respond.send_reset(reason);
    }

    /// Answers `200`: from here the stream carries the app's bytes.
    pub fn accept(mut self) -> io::Result<H2Stream> {
        let response = Response::builder()
            .status(StatusCode::OK)
            .body(())
            .expect("a status alone is a valid response");
        let send = self
            .respond
            .send_response(response, false)
            .map_err(io_error)?;
        Ok(H2Stream::new(send, self.body))
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
    fn handshake(&self, result: &'static str) {
        self.metrics
            .tunnels
            .handshakes
            .get_or_create(&TunnelHandshakeLabels {
                role: TunnelRole::server,
                transport: TRANSPORT,
                result,
            })
            .inc();
    }

    /// The mTLS handshake with `config` (which must offer ALPN `h2` and require a client
    /// certificate): the session and the client's verified identity.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        config: Arc<rustls::ServerConfig>,
    ) -> Result<(TlsStream<TcpStream>, SpiffeId), Refusal> {
        let accepted = self.accept_tls(tcp, config).await;
        self.handshake(if accepted.is_ok() { "ok" } else { "failed" });
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
        let labels = TunnelLabels {
            role: TunnelRole::server,
            transport: TRANSPORT,
        };
        let open = self.metrics.tunnels.open.get_or_create(&labels).clone();
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
            self.metrics.tunnels.streams.get_or_create(&labels).inc();
            let guard = self.tracker.register();
            let span = tracing::debug_span!(
                "stream",
                id = guard.id,
                dir = self.direction.as_str(),
                %client,
                peer = %peer,
            );
            let (parts, body) = request.into_parts();
            let pending = Pending {
                method: parts.method,
                authority: parts.uri.authority().map(|a| a.as_str().to_owned()),
                headers: parts.headers,
                body,
                respond,
            };
            let mut stream_rec = AccessRecord::new(guard.id, self.direction, client);
            stream_rec.peer_identity = Some(peer.to_string());
            stream_rec.destination = pending.authority.clone().unwrap_or_default();
            let work = on_stream(pending, peer.clone(), stream_rec);
            let tracker = self.tracker.clone();
            tokio::spawn(
                async move {
                    let rec = work.await;
                    rec.emit();
                    tracker.remember(&rec);
                    drop(guard);
                }
                .instrument(span),
            );
        };
        open.dec();
        rec.destination = format!("tunnel ({streams} streams)");
        rec.result = "ok";
        if let Some(e) = ended {
            rec.result = "error";
            rec.error = Some(e.to_string());
        }
    }

    /// Counts and records a refusal of the tunnel or of one of its streams.
    pub fn refuse(&self, rec: &mut AccessRecord, r: Refusal) {
        tracing::debug!(reason = r.reason, detail = %r.detail, "tunnel refused");
        self.metrics.refuse(self.direction, r.reason);
        rec.result = r.reason;
        rec.error = Some(r.detail);
    }
}
