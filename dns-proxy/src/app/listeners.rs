//! Phases 2 and 6: the ports, bound before anything else runs, and the UDP workers and the
//! TCP server that serve DNS on them.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use isthmus_proto::drain;
use isthmus_proto::program::{self, Tasks};
use tokio::net::{TcpListener, UdpSocket};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::server::{self, Resolver, TcpLimits};
use crate::udp::{self, receive_buffer};

/// How many times a kernel-chosen port is tried for a port free for both UDP and TCP.
const DNS_PORT_ATTEMPTS: usize = 16;

/// Every port of the proxy, bound.
pub(super) struct Bound {
    /// DNS over UDP and TCP, on the same port.
    pub dns: (UdpSocket, TcpListener),
    pub admin: Option<TcpListener>,
    pub metrics: Option<TcpListener>,
}

pub(super) async fn bind(config: &Config) -> anyhow::Result<Bound> {
    Ok(Bound {
        dns: bind_dns(config.listen).await?,
        admin: program::bind_optional(config.admin_addr, "admin").await?,
        metrics: program::bind_optional(config.metrics_addr, "metrics").await?,
    })
}

/// Asks for a receive buffer that holds a burst of queries (`udp::receive_buffer`) and says
/// what was granted; a smaller one is a warning, not a failure.
fn size_receive_buffer(udp: &UdpSocket, addr: SocketAddr) {
    let want = receive_buffer::RECEIVE_BUFFER;
    match receive_buffer::size_receive_buffer(udp, want) {
        // The kernel reports twice what it granted.
        Ok(reported) if reported / 2 >= want => {
            tracing::debug!(%addr, bytes = reported / 2, "DNS over UDP: receive buffer");
        }
        Ok(reported) => tracing::warn!(
            %addr,
            granted_bytes = reported / 2,
            wanted_bytes = want,
            "DNS over UDP: the receive buffer is smaller than asked for, so a burst of \
             queries past it is dropped by the kernel (counted in \
             isthmus_dns_udp_receive_drops_total); raise net.core.rmem_max or give the process \
             CAP_NET_ADMIN"
        ),
        Err(e) => tracing::warn!(%addr, error = %e, "DNS over UDP: cannot size the receive buffer"),
    }
}

/// Binds UDP and TCP on the same port (the kernel picks one for port 0).
async fn bind_dns(addr: SocketAddr) -> anyhow::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..DNS_PORT_ATTEMPTS {
        let udp = UdpSocket::bind(addr)
            .await
            .with_context(|| format!("binding DNS on udp {addr}"))?;
        let bound = udp.local_addr()?;
        size_receive_buffer(&udp, bound);
        match program::bind(bound, "DNS over TCP").await {
            Ok(tcp) => return Ok((udp, tcp)),
            // Only a kernel-chosen port can be retried: that one was free for UDP only.
            Err(e) if addr.port() == 0 => last = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last.expect("tried at least once")).context("no port free for both UDP and TCP")
}

/// Starts the UDP workers (one per worker of the runtime unless configured: more tasks than
/// threads would only take turns at the socket) and the TCP server into `accepting`;
/// returns the DNS address.
pub(super) fn serve(
    (udp, tcp): (UdpSocket, TcpListener),
    config: &Config,
    resolver: &Arc<Resolver>,
    metrics: &Arc<Metrics>,
    accepting: &mut Tasks,
    shutdown: &drain::Watch,
) -> anyhow::Result<SocketAddr> {
    let dns_addr = udp.local_addr()?;
    let udp = Arc::new(udp);
    let workers = if config.udp_workers == 0 {
        tokio::runtime::Handle::current().metrics().num_workers()
    } else {
        config.udp_workers
    };
    for _ in 0..workers {
        accepting.spawn(
            "dns udp worker",
            udp::serve(udp.clone(), resolver.clone(), shutdown.clone()),
        );
    }
    accepting.spawn(
        "dns tcp server",
        server::serve_tcp(
            tcp,
            resolver.clone(),
            metrics.clone(),
            TcpLimits {
                max_connections: config.max_tcp_connections,
                idle_timeout: config.tcp_idle_timeout,
            },
            shutdown.clone(),
        ),
    );
    Ok(dns_addr)
}
