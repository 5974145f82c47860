//! One tunnel stream as a byte stream: what the app writes goes out as DATA frames within
//! the peer's flow-control window, what arrives is handed to the reader and only then given
//! back to the peer as window (so a slow reader slows its writer, stream by stream, and
//! never the tunnel's other streams). Shutting down the write half ends the stream's
//! sending side (END_STREAM, TCP's FIN); dropping it before that resets the stream.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::io_error;
use crate::metrics::TunnelCounters;

/// Bytes asked for at once when writing: a write larger than this is written in parts.
const MAX_WRITE: usize = super::MAX_SEND_BUFFER;
/// Writes from this size on are copied into the stream's own buffer, whose memory is taken
/// back for the next write once the frames sent from it are written out: a fresh
/// allocation per bulk write would come from new pages each time (for glibc, sizes above
/// its mmap threshold), faulted in and zeroed. Smaller writes take a small allocation.
const REUSE_FROM: usize = 16 << 10;

/// An established `CONNECT` stream.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not yet read.
    pending: Bytes,
    /// Where bulk writes are copied to (see [`REUSE_FROM`]).
    out: BytesMut,
    write_closed: bool,
    /// Whatever the stream's owner keeps alive with it (the pool's count of open streams).
    _hold: Option<Box<dyn Send + Sync>>,
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream")
            .field("pending", &self.pending.len())
            .field("write_closed", &self.write_closed)
            .finish_non_exhaustive()
    }
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            out: BytesMut::new(),
            write_closed: false,
            _hold: None,
        }
    }

    /// Keeps `hold` until the stream is dropped.
    pub fn holding(mut self, hold: impl Send + Sync + 'static) -> Self {
        self._hold = Some(Box::new(hold));
        self
    }

    /// Resets the stream with `reason` (`CONNECT_ERROR` is a TCP reset's equivalent).
    pub fn reset(&mut self, reason: Reason) {
        self.send.send_reset(reason);
    }

    /// The error for a stream whose sending side the peer closed or reset.
    fn poll_send_error(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        Poll::Ready(match ready!(self.send.poll_reset(cx)) {
            Ok(Reason::NO_ERROR | Reason::CANCEL | Reason::STREAM_CLOSED) => {
                io::ErrorKind::BrokenPipe.into()
            }
            Ok(reason) => io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("tunnel stream reset by the peer: {reason}"),
            ),
            Err(e) => io_error(e),
        })
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                // The peer may send as much again.
                let _ = this.recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                // END_STREAM: the peer's FIN.
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => this.pending = data,
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        this.send.reserve_capacity(buf.len().min(MAX_WRITE));
        loop {
            match ready!(this.send.poll_capacity(cx)) {
                // Capacity granted and taken back before this poll: wait for more.
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(buf.len());
                    let data = if n < REUSE_FROM {
                        Bytes::copy_from_slice(&buf[..n])
                    } else {
                        this.out.reserve(n);
                        this.out.extend_from_slice(&buf[..n]);
                        this.out.split().freeze()
                    };
                    if this.send.send_data(data, false).is_ok() {
                        return Poll::Ready(Ok(n));
                    }
                    break;
                }
                Some(Err(_)) | None => break,
            }
        }
        this.poll_send_error(cx).map(Err)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The tunnel's connection task writes frames out as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.write_closed {
            return Poll::Ready(Ok(()));
        }
        if this.send.send_data(Bytes::new(), true).is_ok() {
            this.write_closed = true;
            return Poll::Ready(Ok(()));
        }
        this.poll_send_error(cx).map(Err)
    }
}

/// A tunnel stream of either transport, an HTTP/2 `CONNECT` stream or a QUIC stream, and
/// where the bytes it moves are counted (the tunnel metrics' `bytes`, per peer).
#[derive(Debug)]
pub struct Stream {
    io: Io,
    counted: Option<Counted>,
}

#[derive(Debug)]
enum Io {
    H2(H2Stream),
    Quic(super::quic::QuicStream),
}

/// A stream's byte counters: what it wrote (`sent`) and what it read (`received`).
#[derive(Debug)]
struct Counted {
    sent: Counter,
    received: Counter,
}

impl From<H2Stream> for Stream {
    fn from(s: H2Stream) -> Self {
        Self {
            io: Io::H2(s),
            counted: None,
        }
    }
}

impl From<super::quic::QuicStream> for Stream {
    fn from(s: super::quic::QuicStream) -> Self {
        Self {
            io: Io::Quic(s),
            counted: None,
        }
    }
}

impl Stream {
    /// The tunnel metrics' `transport` label of the stream's tunnel.
    pub fn transport(&self) -> &'static str {
        match self.io {
            Io::H2(_) => super::TRANSPORT,
            Io::Quic(_) => super::quic::TRANSPORT,
        }
    }

    /// Counts the bytes the stream moves into its tunnel's `sent` and `received`.
    pub fn counted(mut self, tunnel: &TunnelCounters) -> Self {
        self.counted = Some(Counted {
            sent: tunnel.sent.clone(),
            received: tunnel.received.clone(),
        });
        self
    }

    /// Keeps `hold` until the stream is dropped.
    pub fn holding(self, hold: impl Send + Sync + 'static) -> Self {
        let io = match self.io {
            Io::H2(s) => Io::H2(s.holding(hold)),
            Io::Quic(s) => Io::Quic(s.holding(hold)),
        };
        Self { io, ..self }
    }

    /// Resets the stream: the peer sees the equivalent of a TCP reset (`CONNECT_ERROR`).
    pub fn reset(&mut self) {
        match &mut self.io {
            Io::H2(s) => s.reset(Reason::CONNECT_ERROR),
            Io::Quic(s) => s.reset(super::quic::code::CONNECT_ERROR),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = match &mut this.io {
            Io::H2(s) => Pin::new(s).poll_read(cx, buf),
            Io::Quic(s) => Pin::new(s).poll_read(cx, buf),
        };
        if let (Some(c), Poll::Ready(Ok(()))) = (&this.counted, &read) {
            c.received.inc_by((buf.filled().len() - before) as u64);
        }
        read
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = match &mut this.io {
            Io::H2(s) => Pin::new(s).poll_write(cx, buf),
            Io::Quic(s) => Pin::new(s).poll_write(cx, buf),
        };
        if let (Some(c), Poll::Ready(Ok(n))) = (&this.counted, &written) {
            c.sent.inc_by(*n as u64);
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::H2(s) => Pin::new(s).poll_flush(cx),
            Io::Quic(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::H2(s) => Pin::new(s).poll_shutdown(cx),
            Io::Quic(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
