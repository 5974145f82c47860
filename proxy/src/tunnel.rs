//! Pooled tunnels between proxies: many proxied connections share one mTLS connection per
//! peer proxy, each carried as an HTTP/2 `CONNECT` stream (HBONE, as Istio ambient's
//! ztunnel speaks it on 15008/tcp). The tunnel's TLS is the proxies' own SPIFFE
//! certificates (TLS 1.3, ALPN `h2`); a stream's `:authority` is the destination `ip:port`
//! on the far proxy's workload, and the bytes on the stream are the app's, as they are.
//!
//! - `stream`: one `CONNECT` stream as a byte stream ([`H2Stream`]), with HTTP/2's
//!   per-stream flow control underneath, so the relay moves it like a socket.
//! - `pool`: the client side: per peer proxy a few tunnels opened on demand, each taking
//!   up to a stream limit, closed after an idle timeout, cleared when the certificate is
//!   renewed (streams in flight carry on over the old tunnel until they end).
//!
//! - `server`: the server side's handshake and stream loop, which each tunnel listener
//!   gives its own handling of a stream: `inbound::hbone` ends it at the local app with
//!   the inbound path's authorization; the gateway routes it into its network.

pub mod pool;
pub mod quic;
pub mod server;
pub mod stream;
#[cfg(test)]
mod tests;

pub use pool::{Pool, PoolSettings, TunnelMetrics};
pub use stream::{H2Stream, Stream};

use std::time::Duration;

use isthmus_proto::tls::{self, ClientAuth, Credentials, TlsError, TrustBundle};

/// The tunnel port, TCP (HTTP/2) and UDP (QUIC), as in Istio ambient.
pub const DEFAULT_PORT: u16 = 15008;
/// The ALPN protocol of an HBONE tunnel.
pub const ALPN_H2: &[u8] = b"h2";
/// The `transport` label of these tunnels in the tunnel metrics.
pub const TRANSPORT: &str = "hbone";
/// Streams one tunnel carries at once; the pool opens another tunnel to the same peer
/// beyond that, and the server refuses more than that on one connection.
pub const DEFAULT_MAX_STREAMS: u32 = 1000;
/// A peer whose tunnel could not be set up is reached without one for this long before
/// its tunnel is tried again.
pub const FALLBACK_MEMORY: Duration = Duration::from_secs(30);
/// A tunnel with no stream for this long is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// HTTP/2 flow-control windows: each stream may have this much in flight before the
/// reader takes it. The defaults (64 KiB) would cap a stream at 64 KiB per round trip; this
/// is what a TCP connection's buffers would hold at most, per stream.
pub const STREAM_WINDOW: u32 = 4 << 20;
/// The whole tunnel's window, shared by its streams.
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// The largest frame either side accepts: four times HTTP/2's default, so bulk moves in
/// fewer frames, yet small enough that the streams of one tunnel take turns often (1 MiB
/// frames measured no cheaper).
pub const MAX_FRAME_SIZE: u32 = 64 << 10;
/// Bytes a stream may hold in its send buffer before a write waits for the peer's window.
pub const MAX_SEND_BUFFER: usize = 1 << 20;

/// The TLS of a tunnel listener (the agent's, the gateway's): the listener's certificate, a
/// client certificate of the trust domain required, ALPN `h2` only.
pub fn server_config(
    creds: &Credentials,
    bundle: &TrustBundle,
) -> Result<rustls::ServerConfig, TlsError> {
    tls::server_config(creds, bundle, ClientAuth::Required, &[ALPN_H2])
}

/// The HTTP/2 settings of a tunnel's server side.
pub fn server_builder(max_streams: u32) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_concurrent_streams(max_streams)
        // Extended CONNECT (RFC 8441) beside the classic form ztunnel sends: the target is
        // the request's authority either way.
        .enable_connect_protocol();
    b
}

/// The HTTP/2 settings of a tunnel's client side.
pub fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .enable_push(false);
    b
}

/// An HTTP/2 error as an I/O error: its own I/O error when it is one, a reset when the peer
/// reset the stream or the tunnel.
pub fn io_error(e: h2::Error) -> std::io::Error {
    if e.is_io() {
        return e.into_io().expect("is_io");
    }
    let kind = if e.is_reset() || e.is_go_away() {
        std::io::ErrorKind::ConnectionReset
    } else {
        std::io::ErrorKind::Other
    };
    std::io::Error::new(kind, format!("tunnel: {e}"))
}
