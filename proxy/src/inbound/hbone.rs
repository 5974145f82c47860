//! The VM agent's tunnel listeners (HBONE on 15008/tcp, QUIC on 15008/udp): each stream, its
//! `:authority` the destination `ip:port` on this workload, goes through the same path as a
//! connection of its own on the inbound listener (the peer's identity is the tunnel's
//! client identity: authorization, quotas and faults, Istio's metrics, one access-log line)
//! and is answered the way ztunnel answers: `200` once the app is connected, `401` when the
//! policy denies the caller, `429` over a quota, `503` when the app cannot be connected to,
//! `400` for a destination this workload does not serve, `405` for a method other than
//! `CONNECT`; an injected abort resets the stream (`CONNECT_ERROR`).
//!
//! The handshake and the stream loop are the tunnels' own (`tunnel::server`); a refused
//! tunnel or stream is counted in `connections_refused{direction="inbound"}` by reason.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::StatusCode;
use isthmus_proto::drain;
use isthmus_proto::SpiffeId;
use tokio::net::{TcpListener, TcpStream};

use super::{refuse, serve_accepted, Accepted, Downstream, Inbound, DIRECTION};
use crate::connection::{accept_loop, refusal, AccessRecord, Refusal};
use crate::tunnel::server::{Listener, Pending};

/// What the tunnel listener needs beside the inbound path it shares.
#[derive(Debug)]
pub struct TunnelInbound {
    /// Authorization, quotas, metrics, timeouts and the tracker, shared with the inbound
    /// listener; its TLS config must offer ALPN `h2` ([`crate::tunnel::server_config`]),
    /// and its mode is ignored (a tunnel is mTLS or nothing).
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

impl TunnelInbound {
    fn listener(&self) -> Listener {
        let ib = &self.inbound;
        Listener {
            direction: DIRECTION,
            metrics: ib.metrics.clone(),
            tracker: ib.tracker.clone(),
            handshake_timeout: ib.handshake_timeout,
            max_streams: self.max_streams,
        }
    }
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
                serve_tunnel(tunnel, tcp, &mut rec, stop).await;
                rec
            }
        },
    )
    .await;
}

/// Accepts QUIC tunnels on `endpoint` (15008/udp) until `shutdown`; each stream goes the
/// way an HTTP/2 tunnel's does.
pub async fn serve_quic(
    endpoint: quinn::Endpoint,
    tunnel: Arc<TunnelInbound>,
    shutdown: drain::Watch,
) {
    let listener = tunnel.listener();
    let on_stream = move |pending, peer, mut rec: AccessRecord| {
        let tunnel = tunnel.clone();
        async move {
            serve_stream(&tunnel, pending, peer, &mut rec).await;
            rec
        }
    };
    listener
        .serve_quic(endpoint, || None, shutdown, on_stream)
        .await;
}

async fn serve_tunnel(
    tunnel: Arc<TunnelInbound>,
    tcp: TcpStream,
    rec: &mut AccessRecord,
    stop: drain::Watch,
) {
    let listener = tunnel.listener();
    let (tls, peer) = match listener.accept(tcp, tunnel.inbound.tls.load_full()).await {
        Ok(accepted) => accepted,
        Err(r) => return refuse(&tunnel.inbound, rec, r),
    };
    let on_stream = |pending, peer, mut rec: AccessRecord| {
        let tunnel = tunnel.clone();
        async move {
            serve_stream(&tunnel, pending, peer, &mut rec).await;
            rec
        }
    };
    listener.serve(tls, peer, rec, stop, on_stream).await;
}

async fn serve_stream(
    tunnel: &TunnelInbound,
    mut pending: Pending,
    peer: SpiffeId,
    rec: &mut AccessRecord,
) {
    let app = match destination(tunnel, &pending) {
        Ok(app) => app,
        Err((status, r)) => {
            pending.refuse(status);
            refuse(&tunnel.inbound, rec, r);
            return;
        }
    };
    let accepted = Accepted {
        stream: Downstream::Tunnel(Box::new(pending)),
        peer: Some(peer),
        sni: None,
    };
    serve_accepted(&tunnel.inbound, accepted, app, rec).await;
}

/// The app address a stream asks for, or its refusal.
fn destination(
    tunnel: &TunnelInbound,
    pending: &Pending,
) -> Result<SocketAddr, (StatusCode, Refusal)> {
    let target = pending.target_addr()?;
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
