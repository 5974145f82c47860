//! The server side of the tunnels (HBONE on 15008/tcp): mTLS with ALPN `h2`, then one
//! HTTP/2 `CONNECT` stream per proxied connection, its `:authority` the destination
//! `ip:port` on this workload. Each stream goes through the same path as a connection of
//! its own on the inbound listener (the peer's identity is the tunnel's client identity:
//! authorization, quotas and faults, Istio's metrics, one access-log line) and is answered
//! the way ztunnel answers: `200` once the app is connected, `401` when the policy denies
//! the caller, `429` over a quota, `503` when the app cannot be connected to, `400` for a
//! destination this workload does not serve, `405` for a method other than `CONNECT`; an
//! injected abort resets the stream (`CONNECT_ERROR`, a TCP reset's equivalent).
//!
//! A connection refused before its streams (no TLS, no client certificate, another ALPN,
//! not HTTP/2) is counted in `connections_refused{direction="inbound"}` by reason, as is a
//! stream refused before the app is chosen. On shutdown each tunnel is told to go away
//! (GOAWAY): its streams in flight finish, new ones go to another tunnel.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Request, Response, StatusCode};
use isthmus_proto::drain;
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use super::{accept, refuse, serve_accepted, Accepted, Downstream, Inbound, DIRECTION};
use crate::connection::{accept_loop, refusal, AccessRecord};
use crate::metrics::{TunnelHandshakeLabels, TunnelLabels, TunnelRole};
use crate::tunnel::{self, io_error, H2Stream};

const TRANSPORT: &str = "hbone";

/// A stream's request, not answered yet.
pub(super) struct Pending {
    body: RecvStream,
    respond: SendResponse<Bytes>,
}

impl Pending {
    pub(super) fn refuse(&mut self, status: StatusCode) {
        let response = Response::builder()
            .status(status)
            .body(())
            .expect("a status alone is a valid response");
        let _ = self.respond.send_response(response, true);
    }

    pub(super) fn reset(&mut self, reason: h2::Reason) {
        self.respond.send_reset(reason);
    }

    /// Answers `200`: from here the stream carries the app's bytes.
    pub(super) fn accept(mut self) -> io::Result<H2Stream> {
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
}

impl TunnelInbound {
    /// The tunnel port's TLS: the inbound's mTLS, offering ALPN `h2` only.
    pub fn server_config(
        creds: &isthmus_proto::tls::Credentials,
        bundle: &isthmus_proto::tls::TrustBundle,
    ) -> Result<rustls::ServerConfig, isthmus_proto::tls::TlsError> {
        isthmus_proto::tls::server_config(
            creds,
            bundle,
            isthmus_proto::tls::ClientAuth::Required,
            &[tunnel::ALPN_H2],
        )
    }
}

/// What the tunnel listener needs beside the inbound path it shares.
#[derive(Debug)]
pub struct TunnelInbound {
    /// Authorization, quotas, metrics, timeouts and the tracker, shared with the inbound
    /// listener; its TLS config must offer ALPN `h2`, and its mode is ignored (a tunnel is
    /// mTLS or nothing).
    pub inbound: Arc<Inbound>,
    /// The addresses a stream may name: the workload's own.
    pub addresses: Vec<IpAddr>,
    /// The app ports a stream may reach; empty: any.
    pub ports: Vec<u16>,
    /// Where the app listens: a stream to port P is connected to this address, port P.
    pub app_host: IpAddr,
    /// Streams one tunnel may carry at once (`MAX_CONCURRENT_STREAMS`).
    pub max_streams: u32,
}

/// Accepts tunnels until `shutdown`; tunnels open then are told to go away, and their
/// streams finish (the tracker's drain waits for them).
pub async fn serve(listener: TcpListener, tunnel: Arc<TunnelInbound>, shutdown: drain::Watch) {
    let ib = &tunnel.inbound;
    let (tracker, max) = (ib.tracker.clone(), ib.max_connections);
    let stop = shutdown.clone();
    accept_loop(
        listener,
        DIRECTION,
        tracker,
        max,
        shutdown,
        move |tcp, mut rec| {
            let tunnel = tunnel.clone();
            let stop = stop.clone();
            async move {
                serve_tunnel(&tunnel, tcp, &mut rec, stop).await;
                rec
            }
        },
    )
    .await;
}

async fn serve_tunnel(
    tunnel: &Arc<TunnelInbound>,
    tcp: TcpStream,
    rec: &mut AccessRecord,
    stop: drain::Watch,
) {
    let ib = &tunnel.inbound;
    rec.destination = "tunnel".into();
    let handshake = |result| {
        ib.metrics
            .tunnels
            .handshakes
            .get_or_create(&TunnelHandshakeLabels {
                role: TunnelRole::server,
                transport: TRANSPORT,
                result,
            })
            .inc();
    };
    let accepted = match accept(ib, tcp).await {
        Ok(Accepted {
            stream: Downstream::Tls(tls),
            peer: Some(peer),
            ..
        }) => (tls, peer),
        Ok(_) => {
            handshake("failed");
            let r = refusal("plaintext_in_strict_mode", "a tunnel is mTLS only");
            refuse(ib, rec, r);
            return;
        }
        Err(r) => {
            handshake("failed");
            refuse(ib, rec, r);
            return;
        }
    };
    let (tls, peer) = accepted;
    rec.peer_identity = Some(peer.to_string());
    tracing::Span::current().record("peer", tracing::field::display(&peer));
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    if alpn.as_deref() != Some(tunnel::ALPN_H2) {
        handshake("failed");
        let shown = alpn.map_or_else(
            || "none".to_string(),
            |a| String::from_utf8_lossy(&a).into_owned(),
        );
        refuse(
            ib,
            rec,
            refusal(
                "tunnel_wrong_alpn",
                format!("the client negotiated ALPN {shown}; the tunnel port speaks h2 only"),
            ),
        );
        return;
    }
    let setup = tunnel::server_builder(tunnel.max_streams).handshake::<_, Bytes>(tls);
    let mut conn = match tokio::time::timeout(ib.handshake_timeout, setup).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            handshake("failed");
            refuse(ib, rec, refusal("tunnel_not_http2", io_error(e)));
            return;
        }
        Err(_) => {
            handshake("failed");
            refuse(
                ib,
                rec,
                refusal(
                    "handshake_timeout",
                    "no HTTP/2 preface after the TLS handshake",
                ),
            );
            return;
        }
    };
    handshake("ok");
    let labels = TunnelLabels {
        role: TunnelRole::server,
        transport: TRANSPORT,
    };
    let open = ib.metrics.tunnels.open.get_or_create(&labels).clone();
    open.inc();
    let streams = Arc::new(AtomicU64::new(0));
    let client = rec.client;
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
        streams.fetch_add(1, Ordering::Relaxed);
        ib.metrics.tunnels.streams.get_or_create(&labels).inc();
        let tunnel = tunnel.clone();
        let peer = peer.clone();
        let guard = ib.tracker.register();
        let span = tracing::debug_span!(
            "stream",
            id = guard.id,
            dir = DIRECTION.as_str(),
            %client,
            peer = %peer,
        );
        tokio::spawn(
            async move {
                let mut rec = AccessRecord::new(guard.id, DIRECTION, client);
                rec.peer_identity = Some(peer.to_string());
                serve_stream(&tunnel, request, respond, peer, &mut rec).await;
                rec.emit();
                tunnel.inbound.tracker.remember(&rec);
                drop(guard);
            }
            .instrument(span),
        );
    };
    open.dec();
    let n = streams.load(Ordering::Relaxed);
    rec.destination = format!("tunnel ({n} streams)");
    rec.result = "ok";
    if let Some(e) = ended {
        rec.result = "error";
        rec.error = Some(e.to_string());
    }
}

async fn serve_stream(
    tunnel: &TunnelInbound,
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    peer: isthmus_proto::SpiffeId,
    rec: &mut AccessRecord,
) {
    let ib = &tunnel.inbound;
    let method = request.method().clone();
    let authority = request.uri().authority().map(|a| a.as_str().to_owned());
    let mut pending = Pending {
        body: request.into_body(),
        respond,
    };
    rec.destination = authority.clone().unwrap_or_default();
    let app = match destination(tunnel, &method, authority.as_deref()) {
        Ok(app) => app,
        Err((status, r)) => {
            pending.refuse(status);
            refuse(ib, rec, r);
            return;
        }
    };
    let accepted = Accepted {
        stream: Downstream::Tunnel(Box::new(pending)),
        peer: Some(peer),
        sni: None,
    };
    serve_accepted(ib, accepted, app, rec).await;
}

/// The app address a stream asks for, or its refusal.
fn destination(
    tunnel: &TunnelInbound,
    method: &Method,
    authority: Option<&str>,
) -> Result<SocketAddr, (StatusCode, crate::connection::Refusal)> {
    if method != Method::CONNECT {
        return Err((
            StatusCode::METHOD_NOT_ALLOWED,
            refusal(
                "tunnel_not_connect",
                format!("{method} on the tunnel port; only CONNECT opens a stream"),
            ),
        ));
    }
    let Some(target) = authority.and_then(|a| a.parse::<SocketAddr>().ok()) else {
        return Err((
            StatusCode::BAD_REQUEST,
            refusal(
                "tunnel_bad_authority",
                format!(
                    "the CONNECT names {:?}, not an ip:port",
                    authority.unwrap_or_default()
                ),
            ),
        ));
    };
    if !tunnel.addresses.contains(&target.ip()) {
        return Err((
            StatusCode::BAD_REQUEST,
            refusal(
                "tunnel_destination_not_local",
                format!(
                    "the CONNECT names {target}, which is not this workload's address ({})",
                    list(&tunnel.addresses)
                ),
            ),
        ));
    }
    if !tunnel.ports.is_empty() && !tunnel.ports.contains(&target.port()) {
        return Err((
            StatusCode::BAD_REQUEST,
            refusal(
                "tunnel_port_not_served",
                format!(
                    "the CONNECT names port {}, which is not one of the app's ports ({})",
                    target.port(),
                    list(&tunnel.ports)
                ),
            ),
        ));
    }
    Ok(SocketAddr::new(tunnel.app_host, target.port()))
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
