//! Tunnels over QUIC on 15008/udp: the same mTLS (the proxies' SPIFFE certificates, ALPN
//! [`ALPN_QUIC`]), one bidirectional QUIC stream per proxied connection, QUIC's own flow
//! control per stream and per connection, and no head-of-line blocking between streams.
//!
//! A stream starts with a small header in place of HTTP/2's `CONNECT`, then carries the
//! app's bytes as they are:
//!
//! ```text
//! request:  version (1) | length (u16) | fields
//! response: version (1) | status (u16) | length (u16) | fields
//! field:    name length (u8) | name | value length (u16) | value
//! ```
//!
//! The request's fields are `:authority` (the destination, as HTTP/2's `CONNECT` names it)
//! and the headers an HBONE request carries (`forwarded`, `baggage`, `traceparent`,
//! `isthmus-subset`); the response's status is the HTTP status an HBONE answer would have.
//! Integers are big-endian; a header is at most [`MAX_HEADER`] bytes.
//!
//! The listener answers [`RECEIVED`] (`100`) as soon as it has read a request, before the
//! final status (which may wait for a connection to the destination): a client that has
//! no `100` within a second knows its request did not get there (UDP dropped on the way
//! out, the peer gone), which QUIC itself would notice only at its idle timeout, and ACKs
//! cannot tell apart from a peer still retransmitting what it sent before.
//!
//! Neither 0-RTT nor early data is offered: a replayed first flight would open the same
//! connections at the destination again. Connection migration is allowed: the peer is
//! known by its certificate, not its address, and QUIC validates a new path before it
//! sends more than a few packets on it.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use isthmus_proto::identity::SpiffeId;
use isthmus_proto::tls::{self, ClientAuth, Credentials, TlsError, TrustBundle};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

pub use quinn::{Endpoint, ServerConfig};

use super::{CONNECTION_WINDOW, STREAM_WINDOW};
use crate::connection::{refusal, Refusal};

/// The ALPN protocol of a QUIC tunnel.
pub const ALPN_QUIC: &[u8] = b"isthmus-tunnel/1";
/// The `transport` label of QUIC tunnels in the tunnel metrics.
pub const TRANSPORT: &str = "quic";
/// The stream header's version.
const VERSION: u8 = 1;
/// The largest stream header either side accepts.
pub const MAX_HEADER: usize = 8 << 10;
/// A connection without a packet for this long is gone (the client's keep-alives hold an
/// idle tunnel open until the pool closes it).
pub const MAX_IDLE: Duration = Duration::from_secs(30);
/// How often a client sends a keep-alive on a quiet tunnel.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// Handshakes the server carries at once before it asks new clients to prove their address
/// first (a Retry), and beyond twice that refuses them: a flood of Initial packets costs
/// state only up to here.
pub const MAX_HANDSHAKES: usize = 256;

/// The interim answer a listener sends once it has read a stream's request.
pub const RECEIVED: StatusCode = StatusCode::CONTINUE;

/// Application error codes, as HTTP/2's (RFC 9113, 7).
pub mod code {
    use quinn::VarInt;
    /// The tunnel or a stream ended normally.
    pub const NO_ERROR: VarInt = VarInt::from_u32(0x0);
    /// The peer broke the protocol (a bad stream header, the wrong ALPN, no certificate).
    pub const PROTOCOL_ERROR: VarInt = VarInt::from_u32(0x1);
    /// The stream was refused before it was processed (the listener is going away): another
    /// tunnel may carry it.
    pub const REFUSED_STREAM: VarInt = VarInt::from_u32(0x7);
    /// The connection to the destination was reset or abnormally closed.
    pub const CONNECT_ERROR: VarInt = VarInt::from_u32(0xa);
}

/// The TLS of a QUIC tunnel listener: as [`super::server_config`], ALPN [`ALPN_QUIC`].
pub fn server_tls(
    creds: &Credentials,
    bundle: &TrustBundle,
) -> Result<rustls::ServerConfig, TlsError> {
    tls::server_config(creds, bundle, ClientAuth::Required, &[ALPN_QUIC])
}

fn transport(max_streams: u32, keep_alive: bool) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(max_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        .max_idle_timeout(Some(MAX_IDLE.try_into().expect("a small duration")))
        .keep_alive_interval(keep_alive.then_some(KEEP_ALIVE));
    t
}

/// The QUIC server config of a tunnel listener with `tls` (from [`server_tls`]).
pub fn server_config(
    tls: Arc<rustls::ServerConfig>,
    max_streams: u32,
) -> io::Result<quinn::ServerConfig> {
    let crypto = QuicServerConfig::try_from(tls).map_err(io::Error::other)?;
    let mut c = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    c.transport_config(Arc::new(transport(max_streams, false)))
        .migration(true)
        .max_incoming(2 * MAX_HANDSHAKES);
    Ok(c)
}

/// The QUIC server config of a tunnel listener with `creds`: [`server_tls`] and
/// [`server_config`] together.
pub fn listener_config(
    creds: &Credentials,
    bundle: &TrustBundle,
    max_streams: u32,
) -> io::Result<quinn::ServerConfig> {
    let tls = server_tls(creds, bundle).map_err(io::Error::other)?;
    server_config(Arc::new(tls), max_streams)
}

/// A QUIC tunnel listener's endpoint on `addr` (UDP), its error naming the address.
pub fn server_endpoint(
    addr: SocketAddr,
    config: quinn::ServerConfig,
) -> io::Result<quinn::Endpoint> {
    quinn::Endpoint::server(config, addr).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen for QUIC tunnels on {addr}/udp: {e}"),
        )
    })
}

/// The QUIC client config of a tunnel with `tls` (a client config offering [`ALPN_QUIC`]).
pub fn client_config(tls: Arc<rustls::ClientConfig>) -> io::Result<quinn::ClientConfig> {
    let crypto = QuicClientConfig::try_from(tls).map_err(io::Error::other)?;
    let mut c = quinn::ClientConfig::new(Arc::new(crypto));
    c.transport_config(Arc::new(transport(super::DEFAULT_MAX_STREAMS, true)));
    Ok(c)
}

/// A client endpoint for peers of the address family of `peer` (an ephemeral UDP port).
pub fn client_endpoint(peer: SocketAddr) -> io::Result<quinn::Endpoint> {
    let local = match peer {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    quinn::Endpoint::client(local)
}

/// The peer's verified SPIFFE identity on a QUIC connection.
pub fn peer_identity(conn: &quinn::Connection) -> Option<SpiffeId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    tls::peer_identity(Some(&certs))
}

/// A QUIC connection error as an I/O error.
pub fn io_error(e: quinn::ConnectionError) -> io::Error {
    use quinn::ConnectionError as E;
    let kind = match e {
        E::TimedOut => io::ErrorKind::TimedOut,
        E::Reset | E::ApplicationClosed(_) | E::ConnectionClosed(_) | E::LocallyClosed => {
            io::ErrorKind::ConnectionReset
        }
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("QUIC tunnel: {e}"))
}

/// True for the error of a stream the peer refused before it processed it.
pub fn refused_stream(e: &io::Error) -> bool {
    let code = match e
        .get_ref()
        .and_then(|e| e.downcast_ref::<quinn::ReadError>())
    {
        Some(quinn::ReadError::Reset(code)) => Some(*code),
        _ => e
            .get_ref()
            .and_then(|e| e.downcast_ref::<quinn::WriteError>())
            .and_then(|w| match w {
                quinn::WriteError::Stopped(code) => Some(*code),
                _ => None,
            }),
    };
    code == Some(code::REFUSED_STREAM)
}

/// A stream's request header: the destination and the headers.
pub fn encode_request(authority: &str, headers: &HeaderMap) -> io::Result<Vec<u8>> {
    let mut fields = Vec::with_capacity(64);
    field(&mut fields, ":authority", authority.as_bytes())?;
    for (name, value) in headers {
        field(&mut fields, name.as_str(), value.as_bytes())?;
    }
    let mut out = Vec::with_capacity(3 + fields.len());
    out.push(VERSION);
    out.extend_from_slice(&length(fields.len())?.to_be_bytes());
    out.extend_from_slice(&fields);
    Ok(out)
}

/// A stream's response header: the status alone.
pub fn encode_response(status: StatusCode) -> Vec<u8> {
    let mut out = Vec::with_capacity(5);
    out.push(VERSION);
    out.extend_from_slice(&status.as_u16().to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out
}

fn length(n: usize) -> io::Result<u16> {
    u16::try_from(n)
        .ok()
        .filter(|&n| usize::from(n) <= MAX_HEADER)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a stream header of {n} bytes; at most {MAX_HEADER}"),
            )
        })
}

fn field(out: &mut Vec<u8>, name: &str, value: &[u8]) -> io::Result<()> {
    let name_len = u8::try_from(name.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("header name {name:?} is too long"),
        )
    })?;
    let value_len = u16::try_from(value.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("header {name} is too long"),
        )
    })?;
    out.push(name_len);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&value_len.to_be_bytes());
    out.extend_from_slice(value);
    Ok(())
}

/// A stream's request as read: the destination and the other headers.
#[derive(Debug)]
pub struct Request {
    pub authority: String,
    pub headers: HeaderMap,
}

/// Reads a stream's request header, or why the stream is refused.
pub async fn read_request(recv: &mut RecvStream) -> Result<Request, Refusal> {
    let bad = |detail: String| refusal("tunnel_bad_header", detail);
    let mut head = [0u8; 3];
    AsyncReadExt::read_exact(recv, &mut head)
        .await
        .map_err(|e| bad(format!("the stream ended before its header: {e}")))?;
    if head[0] != VERSION {
        return Err(bad(format!(
            "stream header version {}; this proxy speaks {VERSION}",
            head[0]
        )));
    }
    let len = usize::from(u16::from_be_bytes([head[1], head[2]]));
    if len > MAX_HEADER {
        return Err(bad(format!(
            "a stream header of {len} bytes; at most {MAX_HEADER}"
        )));
    }
    let mut fields = vec![0u8; len];
    AsyncReadExt::read_exact(recv, &mut fields)
        .await
        .map_err(|e| bad(format!("the stream ended inside its header: {e}")))?;
    let mut authority = None;
    let mut headers = HeaderMap::new();
    for f in Fields(&fields) {
        let (name, value) = f.map_err(bad)?;
        if name == ":authority" {
            let a = std::str::from_utf8(value)
                .map_err(|_| bad("the destination is not UTF-8".into()))?;
            authority = Some(a.to_owned());
            continue;
        }
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| bad(format!("{name:?} is not a header name")))?;
        let value = HeaderValue::from_bytes(value)
            .map_err(|_| bad(format!("the value of {name} is not a header value")))?;
        headers.append(name, value);
    }
    let authority =
        authority.ok_or_else(|| bad("the stream header names no destination".into()))?;
    Ok(Request { authority, headers })
}

/// Reads a stream's response header: its status.
pub async fn read_response(recv: &mut RecvStream) -> io::Result<StatusCode> {
    let mut head = [0u8; 5];
    AsyncReadExt::read_exact(recv, &mut head).await?;
    if head[0] != VERSION {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "stream answer version {}; this proxy speaks {VERSION}",
                head[0]
            ),
        ));
    }
    let status = StatusCode::from_u16(u16::from_be_bytes([head[1], head[2]]))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("stream answer: {e}")))?;
    let len = usize::from(u16::from_be_bytes([head[3], head[4]]));
    if len > MAX_HEADER {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a stream answer of {len} bytes; at most {MAX_HEADER}"),
        ));
    }
    let mut fields = vec![0u8; len];
    AsyncReadExt::read_exact(recv, &mut fields).await?;
    Ok(status)
}

/// The fields of a header, each checked to fit.
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(&'a str, &'a [u8]), String>;

    fn next(&mut self) -> Option<Self::Item> {
        let b = self.0;
        if b.is_empty() {
            return None;
        }
        let cut = "a header field is cut short".to_string();
        let n = usize::from(b[0]);
        let Some(name) = b.get(1..1 + n) else {
            self.0 = &[];
            return Some(Err(cut));
        };
        let Some(len) = b.get(1 + n..3 + n) else {
            self.0 = &[];
            return Some(Err(cut));
        };
        let v = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let Some(value) = b.get(3 + n..3 + n + v) else {
            self.0 = &[];
            return Some(Err(cut));
        };
        self.0 = &b[3 + n + v..];
        match std::str::from_utf8(name) {
            Ok(name) => Some(Ok((name, value))),
            Err(_) => {
                self.0 = &[];
                Some(Err("a header name is not UTF-8".into()))
            }
        }
    }
}

/// An established stream of a QUIC tunnel. Shutting down the write half finishes the
/// stream's sending side (TCP's FIN); dropping it before that resets it (`CONNECT_ERROR`).
pub struct QuicStream {
    send: SendStream,
    recv: RecvStream,
    write_closed: bool,
    /// Whatever the stream's owner keeps alive with it (the pool's count of open streams).
    _hold: Option<Box<dyn Send + Sync>>,
}

impl std::fmt::Debug for QuicStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicStream")
            .field("id", &self.send.id())
            .field("write_closed", &self.write_closed)
            .finish_non_exhaustive()
    }
}

impl QuicStream {
    pub fn new(send: SendStream, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            write_closed: false,
            _hold: None,
        }
    }

    /// Keeps `hold` until the stream is dropped.
    pub fn holding(mut self, hold: impl Send + Sync + 'static) -> Self {
        self._hold = Some(Box::new(hold));
        self
    }

    /// Reads the peer's answer to this stream's request header: its status.
    pub async fn read_response(&mut self) -> io::Result<StatusCode> {
        read_response(&mut self.recv).await
    }

    /// Ends the sending side gracefully (not a reset when dropped).
    pub fn finished(&mut self) {
        let _ = self.send.finish();
        self.write_closed = true;
    }

    /// Resets the stream both ways with `code`.
    pub fn reset(&mut self, code: VarInt) {
        let _ = self.send.reset(code);
        let _ = self.recv.stop(code);
        self.write_closed = true;
    }
}

impl Drop for QuicStream {
    fn drop(&mut self) {
        if !self.write_closed {
            let _ = self.send.reset(code::CONNECT_ERROR);
        }
    }
}

impl AsyncRead for QuicStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task sends what is written as soon as the window allows.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.write_closed {
            return Poll::Ready(Ok(()));
        }
        self.write_closed = true;
        Poll::Ready(self.send.finish().map_err(|e| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("QUIC tunnel stream: {e}"),
            )
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_header_names_its_destination_and_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::FORWARDED,
            HeaderValue::from_static("for=10.0.0.1"),
        );
        h.insert("isthmus-subset", HeaderValue::from_static("v1"));
        let b = encode_request("10.0.0.2:8080", &h).unwrap();
        assert_eq!(b[0], VERSION);
        assert_eq!(usize::from(u16::from_be_bytes([b[1], b[2]])), b.len() - 3);
        let fields: Vec<_> = Fields(&b[3..]).map(Result::unwrap).collect();
        assert_eq!(fields[0], (":authority", &b"10.0.0.2:8080"[..]));
        assert!(fields.contains(&("forwarded", &b"for=10.0.0.1"[..])));
        assert!(fields.contains(&("isthmus-subset", &b"v1"[..])));
    }

    #[test]
    fn a_field_cut_short_is_an_error_not_a_panic() {
        for bad in [
            &[5u8, b'a'][..],
            &[1, b'a', 0][..],
            &[1, b'a', 0, 9, 1, 2][..],
            &[1, 0xff, 0, 0][..],
        ] {
            let r: Result<Vec<_>, _> = Fields(bad).collect();
            assert!(r.is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_header_too_large_is_refused_when_written() {
        let mut h = HeaderMap::new();
        let big = "x".repeat(MAX_HEADER);
        h.insert("baggage", HeaderValue::from_str(&big).unwrap());
        let e = encode_request("10.0.0.2:80", &h).unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
    }
}
