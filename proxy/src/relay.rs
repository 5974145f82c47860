//! The byte relay of the proxy core: once a connection is routed (and any bytes already read
//! to route it, such as a ClientHello, have been written to the upstream), it moves bytes both
//! ways until both directions have ended, respecting half-close: when one side sends FIN the
//! other side's write half is shut down and the opposite direction goes on until it ends too.
//!
//! Two implementations, chosen by what the two sides are:
//!
//! - [`relay_tcp`] (and its counting forms), for two TCP sockets: on Linux a direction
//!   copies short reads (a handshake flight, a request) through one small buffer per thread,
//!   and once a read fills that buffer (bulk) it turns to `splice(2)` through a pipe, so the
//!   bulk of the payload never enters user space (socket → pipe → socket, pages moved, not
//!   copied). A direction holds its pipe only while bytes move (idle connections hold none,
//!   nor a buffer), and it is driven by tokio readiness, one task for both directions. The gateway's SNI passthrough, the agent's plain-TCP passthrough and the
//!   inbound listener's permissive plaintext use it. Elsewhere it is the copy loop.
//! - [`relay`] (and its counting forms), for any two byte streams: a copy loop whose buffer
//!   starts small, so that idle and chatty connections stay cheap, and doubles while reads
//!   fill it, so that bulk transfers move in large chunks. Wherever one side is a TLS session
//!   held in this process (the inbound listener, the agent's outbound) the bytes must pass
//!   through user space to be sealed or opened, so this is the one used there.
//!
//! Both return what they moved, and how ([`RelayMethod`], which the access log and
//! `/debug/connections` show), even when the relay ended with an error, and count into a
//! [`Meter`] as they go, so metrics see long-lived connections before they end. An error on
//! either side (a reset, a failed write) ends both directions; the streams are closed when
//! the relay returns. Both pass the same tests (bytes exact, half-close, resets, live
//! counters).
//!
//! A stall once kept splice off the data path: a bulk transfer echoed through the gateway in
//! the topology tests stalled in about one run in four, with every relay (splice, the copy
//! loop, tokio's `copy_bidirectional`). The relays were innocent; the test's client was not.
//! It wrote its whole 512 KiB before reading any of the echo, and the echo app writes back
//! before it reads more: once the bytes in flight exceed every buffer on the path (socket
//! buffers that TCP sizes per connection as it goes, so the limit differs from run to run),
//! both ends wait for ever. With 100 MiB that pattern stalls with no relay at all (a TLS
//! client straight to a TLS echo server on loopback: five runs of five) and through the
//! gateway (four of five; the fifth had buffers large enough). The client that replaced it
//! read while writing but never flushed, a second way to stall: a TLS `write` returns once
//! its bytes are sealed into the session's buffer, and when the socket is full at that moment
//! they stay in the process until the next write, flush or shutdown, so the echo of the last
//! records never comes (seen through the gateway in one run of five with a small send buffer,
//! and shown step by step, without timing, by a test). Read while writing and flush before
//! waiting: the topology test now moves 100 MiB each way through the gateway (spliced) and
//! the workload's inbound (copied), checked by SHA-256 at both ends.
//!
//! The measurement: `relay-bench` (in `isthmus-tests`) pushes 1 GiB at a time through
//! each relay on loopback, the relay alone on one core, both relays counting into a meter as
//! the listeners do. On an idle two-vCPU virtual machine, two runs of nine: splice moved 20.0
//! and 21.2 Gbit/s at 0.22 and 0.21 CPU seconds per GB in the relay thread (0.56 and 0.55
//! for the whole machine, sender and sink included); the copy loop 17.1 and 18.9 Gbit/s at
//! 0.38 and 0.35 (0.63 and 0.60); tokio's `copy_bidirectional_with_sizes` with 64 KiB buffers
//! 11.4 and 12.1 Gbit/s at 0.66 and 0.60. A direct connection, no relay: 27–30 Gbit/s. On the
//! same machine busy with other work (most of its CPU taken by other processes, so the
//! throughput figures mean nothing), two runs of five: splice 0.22 and 0.24, the copy loop
//! 0.39 and 0.37. So splice needs about 40% less CPU in the relay for the same bytes. Nearly
//! all of what remains is the kernel's: a profile of the relay thread shows TCP input and
//! output (on loopback the receiving side's processing runs in the sending thread) and
//! wake-ups; the splice calls themselves move about 220 KiB each, with one `EAGAIN` and one
//! `epoll_wait` per burst. The price is a little latency on small messages: a 64-byte round
//! trip through the relay (all on one core) took 30.5 µs at the median with splice, 28.9 µs
//! with the copy loop (12.4 µs direct) on the idle machine, and 47 µs against 44 µs at the
//! 99th percentile. 1 MiB pipes cost the relay less CPU per GB than 256 KiB and 64 KiB ones;
//! copy buffers of up to 1 MiB were no faster than up to 256 KiB, which holds less memory
//! per connection.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes moved by one relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
}

/// How a relay moved its bytes (the access log and `/debug/connections` say which).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayMethod {
    /// `splice(2)` through a pipe, for at least one direction's bulk: those bytes stayed in
    /// the kernel (the first short reads of a direction are copied).
    Splice,
    /// Read into a buffer of this process and written out again.
    Copy,
}

impl RelayMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            RelayMethod::Splice => "splice",
            RelayMethod::Copy => "copy",
        }
    }
}

/// How a relay ended: the bytes it moved, and the error that ended it, if one did.
#[derive(Debug)]
pub struct RelayOutcome {
    pub transferred: Transferred,
    /// `None` when both directions ended with FIN.
    pub error: Option<io::Error>,
    pub method: RelayMethod,
}

impl RelayOutcome {
    /// A relay that could not start: nothing moved.
    pub fn failed(error: io::Error) -> Self {
        Self {
            transferred: Transferred::default(),
            error: Some(error),
            method: RelayMethod::Copy,
        }
    }

    pub fn into_result(self) -> io::Result<Transferred> {
        match self.error {
            None => Ok(self.transferred),
            Some(e) => Err(e),
        }
    }
}

/// Byte counters updated while a relay runs (after each chunk is written to its destination,
/// with relaxed ordering), for metrics on connections that last long. At the end they have
/// grown by exactly the relay's [`Transferred`].
#[derive(Debug, Default)]
pub struct LiveBytes {
    pub client_to_upstream: AtomicU64,
    pub upstream_to_client: AtomicU64,
}

/// Where a relay counts as it goes, one counter per direction (a metric's own counters,
/// such as Istio's received and sent bytes, or a [`LiveBytes`]).
#[derive(Debug, Clone, Copy)]
pub struct Meter<'a> {
    pub client_to_upstream: &'a AtomicU64,
    pub upstream_to_client: &'a AtomicU64,
}

impl LiveBytes {
    pub fn meter(&self) -> Meter<'_> {
        Meter {
            client_to_upstream: &self.client_to_upstream,
            upstream_to_client: &self.upstream_to_client,
        }
    }
}

/// Relays between two TCP sockets: on Linux short reads copied and bulk spliced
/// (`splice(2)`), elsewhere the copy loop of [`relay`].
///
/// With splice, a write to a connection the peer has reset raises `SIGPIPE`, which Rust
/// programs ignore from the start (the write then fails with `EPIPE`); a program that
/// restores the default action must not use this. When no pipe can be had (out of file
/// descriptors or pipe memory), a burst is copied through user space instead.
pub async fn relay_tcp(client: TcpStream, upstream: TcpStream) -> RelayOutcome {
    relay_tcp_impl(client, upstream, None).await
}

/// [`relay_tcp`], counting into `live` as it goes.
pub async fn relay_tcp_counted(
    client: TcpStream,
    upstream: TcpStream,
    live: &LiveBytes,
) -> RelayOutcome {
    relay_tcp_impl(client, upstream, Some(live.meter())).await
}

/// [`relay_tcp`], counting into `meter` as it goes.
pub async fn relay_tcp_metered(
    client: TcpStream,
    upstream: TcpStream,
    meter: Meter<'_>,
) -> RelayOutcome {
    relay_tcp_impl(client, upstream, Some(meter)).await
}

/// Relays between any two byte streams (TLS on one side or both) with a copy loop per
/// direction whose buffer grows from 8 KiB up to 256 KiB while reads keep filling it.
/// Shutting down a stream's write half is its `poll_shutdown` (for TLS: `close_notify`, then
/// FIN).
pub async fn relay<A, B>(client: A, upstream: B) -> RelayOutcome
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    relay_impl(client, upstream, None).await
}

/// [`relay`], counting into `live` as it goes.
pub async fn relay_counted<A, B>(client: A, upstream: B, live: &LiveBytes) -> RelayOutcome
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    relay_impl(client, upstream, Some(live.meter())).await
}

/// [`relay`], counting into `meter` as it goes.
pub async fn relay_metered<A, B>(client: A, upstream: B, meter: Meter<'_>) -> RelayOutcome
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    relay_impl(client, upstream, Some(meter)).await
}

async fn relay_tcp_impl(
    client: TcpStream,
    upstream: TcpStream,
    meter: Option<Meter<'_>>,
) -> RelayOutcome {
    #[cfg(target_os = "linux")]
    return splice::relay(&client, &upstream, meter).await;
    #[cfg(not(target_os = "linux"))]
    relay_impl(client, upstream, meter).await
}

#[cfg(target_os = "linux")]
mod splice {
    use std::cell::RefCell;
    use std::io;
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use nix::errno::Errno;
    use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
    use nix::sys::socket::{shutdown, Shutdown};
    use nix::unistd::pipe2;
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    use super::{Meter, RelayMethod, RelayOutcome, Transferred};

    /// Asked for each pipe. The kernel may give less: past `fs.pipe-user-pages-soft` (64 MiB
    /// of pipe capacity per user, so 64 pipes this size) an unprivileged process gets 8 KiB
    /// pipes, which still work, only with more system calls per byte. A process with
    /// `CAP_SYS_RESOURCE` is not limited.
    const PIPE_SIZE: i32 = 1 << 20;
    /// Empty pipes kept per thread for the next burst.
    const POOL_MAX: usize = 8;

    thread_local! {
        static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    }

    /// A pipe is held only while bytes move: taken when the source becomes readable, given
    /// back once it is empty and the source has nothing more. So idle connections hold no
    /// pipes (no file descriptors, no pipe quota), and only directions moving data at the
    /// same moment count against the per-user pipe limit.
    struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
        capacity: usize,
    }

    impl Pipe {
        fn take() -> io::Result<Pipe> {
            #[cfg(test)]
            if super::tests::NO_PIPES.get() {
                return Err(io::Error::from_raw_os_error(Errno::EMFILE as i32));
            }
            match POOL.with_borrow_mut(Vec::pop) {
                Some(pipe) => Ok(pipe),
                None => Pipe::new(),
            }
        }

        /// Only for an empty pipe; one holding bytes is dropped (closed) instead.
        fn give_back(self) {
            POOL.with_borrow_mut(|pool| {
                if pool.len() < POOL_MAX {
                    pool.push(self);
                }
            });
        }

        fn new() -> io::Result<Pipe> {
            let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
            let capacity = match fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE)) {
                Ok(size) => size,
                Err(_) => fcntl(&write, FcntlArg::F_GETPIPE_SZ)?,
            };
            Ok(Pipe {
                read,
                write,
                capacity: capacity as usize,
            })
        }
    }

    pub(super) async fn relay(
        client: &TcpStream,
        upstream: &TcpStream,
        meter: Option<Meter<'_>>,
    ) -> RelayOutcome {
        let mut transferred = Transferred::default();
        let (mut spliced_up, mut spliced_down) = (false, false);
        let ended = AtomicBool::new(false);
        let error = tokio::try_join!(
            one_way(
                client,
                upstream,
                &mut transferred.client_to_upstream,
                meter.map(|m| m.client_to_upstream),
                &mut spliced_up,
                &ended,
            ),
            one_way(
                upstream,
                client,
                &mut transferred.upstream_to_client,
                meter.map(|m| m.upstream_to_client),
                &mut spliced_down,
                &ended,
            ),
        )
        .err();
        RelayOutcome {
            transferred,
            error,
            method: if spliced_up || spliced_down {
                RelayMethod::Splice
            } else {
                RelayMethod::Copy
            },
        }
    }

    const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

    /// Moves `src`'s bytes to `dst` until `src` ends, then shuts down `dst`'s write half,
    /// unless the other direction has ended already (`ended`): then both sockets close as
    /// soon as the relay returns, and the close sends that FIN.
    ///
    /// A direction starts by copying: each read takes what `src` has into the thread's
    /// [`SCRATCH`] buffer and writes it on. A read that fills the buffer means bulk, and from
    /// then on the direction splices (`spliced` says it did; out of pipes it copies). Request/response traffic and
    /// TLS handshakes, whose reads come back short, never pay for a pipe: a short read
    /// drains the socket, so its readiness is cleared there and then (as tokio's own reads
    /// do), where a splice would need one more call to learn it from `EAGAIN`.
    ///
    /// The pipe is filled only when empty and then drained completely: with room in the pipe,
    /// `EAGAIN` from the socket-to-pipe splice can only mean that `src` has nothing to read,
    /// and with bytes in the pipe, `EAGAIN` from the pipe-to-socket splice only that `dst`'s
    /// send buffer is full. So each `EAGAIN` clears the readiness of the right socket, and
    /// whatever was read is written before the shutdown, the next read or the pipe's return.
    async fn one_way(
        src: &TcpStream,
        dst: &TcpStream,
        moved: &mut u64,
        live: Option<&AtomicU64>,
        spliced: &mut bool,
        ended: &AtomicBool,
    ) -> io::Result<()> {
        let shut_write = |dst: &TcpStream| match ended.swap(true, Ordering::Relaxed) {
            true => Ok(()),
            false => shut_write(dst),
        };
        let mut bulk = false;
        loop {
            src.readable().await?;
            if !bulk {
                match copy_read(src, dst, moved, live).await? {
                    Read::Ended => return shut_write(dst),
                    Read::Drained => {}
                    Read::Bulk => bulk = true,
                }
                tokio::task::coop::consume_budget().await;
                continue;
            }
            let pipe = match Pipe::take() {
                Ok(pipe) => {
                    *spliced = true;
                    pipe
                }
                // No file descriptor or pipe memory left for a pipe: this read goes through
                // user space instead, so a process at its limits slows down instead of
                // cutting connections (and takes a pipe again as soon as there is one).
                Err(e) if is_shortage(&e) => {
                    if let Read::Ended = copy_read(src, dst, moved, live).await? {
                        return shut_write(dst);
                    }
                    tokio::task::coop::consume_budget().await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let ended = loop {
                let mut in_pipe = match src.try_io(Interest::READABLE, || {
                    splice_io(src, &pipe.write, pipe.capacity)
                }) {
                    Ok(0) => break true,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                while in_pipe > 0 {
                    match dst.try_io(Interest::WRITABLE, || splice_io(&pipe.read, dst, in_pipe)) {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(n) => {
                            in_pipe -= n;
                            count(n, moved, live);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                // `try_io` does not count against the task's budget: a socket that always
                // has data would otherwise keep this task (and its worker) busy forever.
                tokio::task::coop::consume_budget().await;
            };
            pipe.give_back();
            if ended {
                return shut_write(dst);
            }
        }
    }

    /// What one [`copy_read`] found.
    enum Read {
        /// `src` sent FIN.
        Ended,
        /// What `src` had is written (or nothing was there); its readiness is cleared.
        Drained,
        /// The read filled the buffer: more is probably waiting, time to splice.
        Bulk,
    }

    /// A read of up to [`COPY_FIRST`] bytes: enough for a handshake flight or a request,
    /// while a bulk transfer fills it at once.
    const COPY_FIRST: usize = 16 << 10;

    thread_local! {
        /// The copying reads' buffer, one per thread: bytes stay in it only between a read and
        /// the write that follows without waiting, so idle connections hold no buffer.
        static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; COPY_FIRST].into_boxed_slice());
    }

    /// Reads what `src` has into [`SCRATCH`] and writes it to `dst`. What `dst` cannot take
    /// at once is kept in a buffer of its own while this waits for room.
    async fn copy_read(
        src: &TcpStream,
        dst: &TcpStream,
        moved: &mut u64,
        live: Option<&AtomicU64>,
    ) -> io::Result<Read> {
        let (read, rest) = SCRATCH.with_borrow_mut(|buf| -> io::Result<(Read, Vec<u8>)> {
            let mut n = 0;
            // A short read drained the socket: reporting it as `WouldBlock` makes tokio clear
            // the readiness now (the bytes are in `n`). A FIN still shows, since tokio never
            // clears the read-closed readiness.
            let read = src.try_io(Interest::READABLE, || {
                n = nix::unistd::read(src, buf)?;
                if n > 0 && n < buf.len() {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            });
            if n == 0 {
                return match read {
                    Ok(()) => Ok((Read::Ended, Vec::new())),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) =>
                    {
                        Ok((Read::Drained, Vec::new()))
                    }
                    Err(e) => Err(e),
                };
            }
            let kind = if n == buf.len() {
                Read::Bulk
            } else {
                Read::Drained
            };
            let mut written = 0;
            while written < n {
                match dst.try_write(&buf[written..n]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(w) => written += w,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            count(written, moved, live);
            Ok((kind, buf[written..n].to_vec()))
        })?;
        write_all(dst, &rest, moved, live).await?;
        Ok(read)
    }

    /// Writes `bytes` to `dst`, waiting for room as needed.
    async fn write_all(
        dst: &TcpStream,
        bytes: &[u8],
        moved: &mut u64,
        live: Option<&AtomicU64>,
    ) -> io::Result<()> {
        let mut written = 0;
        while written < bytes.len() {
            match dst.try_write(&bytes[written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(w) => {
                    written += w;
                    count(w, moved, live);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn count(n: usize, moved: &mut u64, live: Option<&AtomicU64>) {
        *moved += n as u64;
        if let Some(live) = live {
            live.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    fn shut_write(dst: &TcpStream) -> io::Result<()> {
        match shutdown(dst.as_raw_fd(), Shutdown::Write) {
            // `dst` is already gone entirely; its reader reports how it went.
            Ok(()) | Err(Errno::ENOTCONN) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn is_shortage(e: &io::Error) -> bool {
        [Errno::EMFILE, Errno::ENFILE, Errno::ENOMEM]
            .iter()
            .any(|n| e.raw_os_error() == Some(*n as i32))
    }

    fn splice_io(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
        Ok(splice(from, None, to, None, len, FLAGS)?)
    }
}

/// Where a copy buffer starts: what most request/response exchanges need.
const COPY_BUF_MIN: usize = 8 << 10;
/// Where it stops growing.
const COPY_BUF_MAX: usize = 256 << 10;

async fn relay_impl<A, B>(mut client: A, mut upstream: B, live: Option<Meter<'_>>) -> RelayOutcome
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut to_upstream = CopyHalf::new(live.map(|l| l.client_to_upstream));
    let mut to_client = CopyHalf::new(live.map(|l| l.upstream_to_client));
    let result = poll_fn(|cx| {
        let up = to_upstream.poll_copy(cx, Pin::new(&mut client), Pin::new(&mut upstream))?;
        let down = to_client.poll_copy(cx, Pin::new(&mut upstream), Pin::new(&mut client))?;
        match (up, down) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    })
    .await;
    RelayOutcome {
        transferred: Transferred {
            client_to_upstream: to_upstream.moved,
            upstream_to_client: to_client.moved,
        },
        error: result.err(),
        method: RelayMethod::Copy,
    }
}

/// One direction of [`relay`]: read into an empty buffer, write all of it, repeat; at EOF
/// flush and shut the writer down.
struct CopyHalf<'a> {
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// The last read filled the whole buffer: the next one may use a bigger one.
    filled: bool,
    need_flush: bool,
    read_done: bool,
    done: bool,
    moved: u64,
    live: Option<&'a AtomicU64>,
}

impl<'a> CopyHalf<'a> {
    fn new(live: Option<&'a AtomicU64>) -> Self {
        CopyHalf {
            buf: vec![0; COPY_BUF_MIN],
            pos: 0,
            end: 0,
            filled: false,
            need_flush: false,
            read_done: false,
            done: false,
            moved: 0,
            live,
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        // Streams that are always ready (an in-memory pipe, buffered TLS records) would
        // otherwise keep this task busy forever.
        let coop = ready!(tokio::task::coop::poll_proceed(cx));
        loop {
            if self.pos == self.end && !self.read_done {
                if self.filled && self.buf.len() < COPY_BUF_MAX {
                    self.buf.resize(self.buf.len() * 2, 0);
                }
                let mut read = ReadBuf::new(&mut self.buf);
                match reader.as_mut().poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => {
                        let n = read.filled().len();
                        coop.made_progress();
                        self.read_done = n == 0;
                        self.filled = n == self.buf.len();
                        self.pos = 0;
                        self.end = n;
                    }
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Nothing to read: push out what the writer may be holding back.
                        if self.need_flush {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.end {
                match ready!(writer
                    .as_mut()
                    .poll_write(cx, &self.buf[self.pos..self.end]))
                {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        coop.made_progress();
                        self.pos += n;
                        self.moved += n as u64;
                        self.need_flush = true;
                        if let Some(live) = self.live {
                            live.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if self.read_done {
                ready!(writer.as_mut().poll_flush(cx))?;
                match ready!(writer.as_mut().poll_shutdown(cx)) {
                    // The peer is already gone entirely; its reader reports how it went.
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use rand::{RngCore, SeedableRng};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    use super::*;

    /// Bounds every wait, so that a relay that fails to end fails the test instead of hanging.
    const LIMIT: Duration = Duration::from_secs(30);

    thread_local! {
        /// Makes the splice relay's pipes fail on this thread as a process out of file
        /// descriptors sees them fail.
        pub(super) static NO_PIPES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Out of pipes, the TCP relay copies through user space instead of failing the
    /// connection: every byte arrives, counted, and both directions end with FIN.
    #[tokio::test]
    async fn without_pipes_the_tcp_relay_copies_instead() {
        NO_PIPES.set(true);
        let live = Arc::new(LiveBytes::default());
        let (client, server, relay) = relayed(Kind::Tcp, Some(live.clone())).await;
        let up = payload(1 << 20, 3);
        let down = payload((1 << 20) + 7, 4);
        let (at_server, at_client) =
            tokio::join!(exchange(server, down.clone()), exchange(client, up.clone()));
        let outcome = finish(relay).await;
        NO_PIPES.set(false);
        assert!(
            at_server == up && at_client == down,
            "bytes intact both ways"
        );
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(outcome.method, RelayMethod::Copy, "no pipe, no splice");
        assert_eq!(outcome.transferred.client_to_upstream, up.len() as u64);
        assert_eq!(outcome.transferred.upstream_to_client, down.len() as u64);
        assert_eq!(
            live.upstream_to_client.load(Ordering::Relaxed),
            down.len() as u64
        );
    }

    #[derive(Debug, Clone, Copy)]
    enum Kind {
        Tcp,
        Copy,
    }

    const KINDS: [Kind; 2] = [Kind::Tcp, Kind::Copy];

    impl Kind {
        /// How the relay of this kind must have moved its bytes.
        fn method(self) -> RelayMethod {
            match self {
                Kind::Tcp if cfg!(target_os = "linux") => RelayMethod::Splice,
                Kind::Tcp | Kind::Copy => RelayMethod::Copy,
            }
        }
    }

    fn payload(len: usize, seed: u64) -> Vec<u8> {
        let mut bytes = vec![0; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
        bytes
    }

    /// Two connected loopback sockets.
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (connected, accepted) = tokio::join!(
            TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        (connected.unwrap(), accepted.unwrap().0)
    }

    /// A relay between two loopback connections: returns the far ends (what the client and
    /// the upstream server hold) and the relay's task.
    async fn relayed(
        kind: Kind,
        live: Option<Arc<LiveBytes>>,
    ) -> (TcpStream, TcpStream, JoinHandle<RelayOutcome>) {
        let (client, client_side) = tcp_pair().await;
        let (upstream_side, server) = tcp_pair().await;
        let relay = tokio::spawn(async move {
            let live = live.as_deref();
            match (kind, live) {
                (Kind::Tcp, None) => relay_tcp(client_side, upstream_side).await,
                (Kind::Tcp, Some(live)) => {
                    relay_tcp_counted(client_side, upstream_side, live).await
                }
                (Kind::Copy, None) => relay(client_side, upstream_side).await,
                (Kind::Copy, Some(live)) => relay_counted(client_side, upstream_side, live).await,
            }
        });
        (client, server, relay)
    }

    async fn finish(relay: JoinHandle<RelayOutcome>) -> RelayOutcome {
        tokio::time::timeout(LIMIT, relay)
            .await
            .expect("relay ended")
            .unwrap()
    }

    /// Writes `data` then shuts down the write half, while reading everything until EOF.
    async fn exchange<S>(stream: S, data: Vec<u8>) -> Vec<u8>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut read, mut write) = tokio::io::split(stream);
        let writer = tokio::spawn(async move {
            write.write_all(&data).await.unwrap();
            write.shutdown().await.unwrap();
            write
        });
        let mut received = Vec::new();
        tokio::time::timeout(LIMIT, read.read_to_end(&mut received))
            .await
            .expect("EOF in time")
            .unwrap();
        drop(writer.await.unwrap());
        received
    }

    #[tokio::test]
    async fn bytes_arrive_intact_both_ways() {
        for kind in KINDS {
            let (client, server, relay) = relayed(kind, None).await;
            let up = payload(1 << 20, 1);
            let down = payload((1 << 20) + 12_345, 2);
            let (at_server, at_client) =
                tokio::join!(exchange(server, down.clone()), exchange(client, up.clone()));
            assert!(at_server == up, "{kind:?}: client to upstream");
            assert!(at_client == down, "{kind:?}: upstream to client");
            let outcome = finish(relay).await;
            assert!(outcome.error.is_none(), "{kind:?}: {:?}", outcome.error);
            assert_eq!(outcome.method, kind.method());
            assert_eq!(
                outcome.transferred,
                Transferred {
                    client_to_upstream: up.len() as u64,
                    upstream_to_client: down.len() as u64
                },
                "{kind:?}"
            );
        }
    }

    /// As the listeners relay: into a metric's own counters, one per direction. The TCP
    /// relay splices, and counts each direction exactly, as the copy loop does.
    #[tokio::test]
    async fn metered_relays_count_both_directions_into_the_meter() {
        for kind in KINDS {
            let (client, client_side) = tcp_pair().await;
            let (upstream_side, server) = tcp_pair().await;
            let (to_upstream, to_client) =
                (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            let counters = (to_upstream.clone(), to_client.clone());
            let relay = tokio::spawn(async move {
                let meter = Meter {
                    client_to_upstream: &counters.0,
                    upstream_to_client: &counters.1,
                };
                match kind {
                    Kind::Tcp => relay_tcp_metered(client_side, upstream_side, meter).await,
                    Kind::Copy => relay_metered(client_side, upstream_side, meter).await,
                }
            });
            let up = payload(5 << 20, 11);
            let down = payload(3 << 20, 12);
            let (at_server, at_client) =
                tokio::join!(exchange(server, down.clone()), exchange(client, up.clone()));
            assert!(at_server == up && at_client == down, "{kind:?}");
            let outcome = finish(relay).await;
            assert_eq!(outcome.method, kind.method());
            let transferred = outcome.into_result().unwrap();
            assert_eq!(transferred.client_to_upstream, up.len() as u64, "{kind:?}");
            assert_eq!(
                transferred.upstream_to_client,
                down.len() as u64,
                "{kind:?}"
            );
            assert_eq!(to_upstream.load(Ordering::Relaxed), up.len() as u64);
            assert_eq!(to_client.load(Ordering::Relaxed), down.len() as u64);
        }
    }

    #[tokio::test]
    async fn large_transfer_intact_and_counted_live() {
        for kind in KINDS {
            let live = Arc::new(LiveBytes::default());
            let (client, server, relay) = relayed(kind, Some(live.clone())).await;
            let up = payload(32 << 20, 3);
            let down = payload(100, 4);
            let (at_server, at_client) =
                tokio::join!(exchange(server, down.clone()), exchange(client, up.clone()));
            assert!(at_server == up, "{kind:?}");
            assert!(at_client == down, "{kind:?}");
            let outcome = finish(relay).await;
            let transferred = outcome.into_result().unwrap();
            assert_eq!(transferred.client_to_upstream, 32 << 20, "{kind:?}");
            assert_eq!(transferred.upstream_to_client, 100, "{kind:?}");
            assert_eq!(live.client_to_upstream.load(Ordering::Relaxed), 32 << 20);
            assert_eq!(live.upstream_to_client.load(Ordering::Relaxed), 100);
        }
    }

    #[tokio::test]
    async fn live_counters_move_before_the_end() {
        for kind in KINDS {
            let live = Arc::new(LiveBytes::default());
            let (mut client, mut server, relay) = relayed(kind, Some(live.clone())).await;
            client.write_all(&[7; 1000]).await.unwrap();
            let mut got = [0; 1000];
            server.read_exact(&mut got).await.unwrap();
            // The relay counts a chunk right after writing it, before it yields.
            assert_eq!(
                live.client_to_upstream.load(Ordering::Relaxed),
                1000,
                "{kind:?}"
            );
            drop((client, server));
            finish(relay).await;
        }
    }

    /// Many small request/response exchanges on one connection: each burst takes a pipe and
    /// gives it back (splice), or reuses the buffer (copy), and readiness must re-arm every
    /// time or an exchange hangs.
    #[tokio::test]
    async fn many_small_exchanges() {
        for kind in KINDS {
            let live = Arc::new(LiveBytes::default());
            let (mut client, mut server, relay) = relayed(kind, Some(live.clone())).await;
            for i in 0..200u32 {
                let request = payload(1 + (i as usize * 37) % 3000, u64::from(i));
                client.write_all(&request).await.unwrap();
                let mut at_server = vec![0; request.len()];
                tokio::time::timeout(LIMIT, server.read_exact(&mut at_server))
                    .await
                    .expect("request relayed")
                    .unwrap();
                assert!(at_server == request, "{kind:?} exchange {i}");
                let reply = payload(1 + (i as usize * 101) % 5000, u64::from(i) + 1000);
                server.write_all(&reply).await.unwrap();
                let mut at_client = vec![0; reply.len()];
                tokio::time::timeout(LIMIT, client.read_exact(&mut at_client))
                    .await
                    .expect("reply relayed")
                    .unwrap();
                assert!(at_client == reply, "{kind:?} exchange {i}");
            }
            drop((client, server));
            let outcome = finish(relay).await;
            assert!(outcome.error.is_none(), "{kind:?}: {:?}", outcome.error);
            assert_eq!(
                outcome.transferred.client_to_upstream,
                live.client_to_upstream.load(Ordering::Relaxed)
            );
            assert_eq!(
                outcome.transferred.upstream_to_client,
                live.upstream_to_client.load(Ordering::Relaxed)
            );
        }
    }

    /// A request/response exchange through the TCP relay is copied (no pipe, reads come
    /// back short); the same relay turns to splice once bulk comes, and small messages
    /// after the bulk still arrive exactly.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn tcp_relay_copies_short_reads_and_splices_bulk() {
        async fn ping(from: &mut TcpStream, to: &mut TcpStream, bytes: &[u8]) {
            from.write_all(bytes).await.unwrap();
            let mut got = vec![0; bytes.len()];
            tokio::time::timeout(LIMIT, to.read_exact(&mut got))
                .await
                .expect("relayed")
                .unwrap();
            assert!(got == bytes);
        }
        let small = payload(700, 21);
        for bulk in [false, true] {
            let (mut client, mut server, relay) = relayed(Kind::Tcp, None).await;
            for _ in 0..20 {
                ping(&mut client, &mut server, &small).await;
                ping(&mut server, &mut client, &small).await;
            }
            let big = payload(4 << 20, 22);
            if bulk {
                let (at_server, ()) = tokio::join!(
                    async {
                        let mut got = vec![0; big.len()];
                        server.read_exact(&mut got).await.unwrap();
                        got
                    },
                    async { client.write_all(&big).await.unwrap() }
                );
                assert!(at_server == big, "bulk intact");
                ping(&mut server, &mut client, &small).await;
                ping(&mut client, &mut server, &small).await;
            }
            drop((client, server));
            let outcome = finish(relay).await;
            assert!(outcome.error.is_none(), "{:?}", outcome.error);
            let expected = if bulk {
                RelayMethod::Splice
            } else {
                RelayMethod::Copy
            };
            assert_eq!(outcome.method, expected, "bulk: {bulk}");
            let extra = if bulk { big.len() + small.len() } else { 0 };
            assert_eq!(
                outcome.transferred.client_to_upstream,
                (20 * small.len() + extra) as u64
            );
        }
    }

    /// The client sends its request and shuts down its write half; the server sees EOF, and
    /// only then sends its reply, which still reaches the client in full.
    #[tokio::test]
    async fn half_close_keeps_the_other_direction_open() {
        for kind in KINDS {
            let (mut client, mut server, relay) = relayed(kind, None).await;
            let request = payload(70_000, 5);
            let reply = payload(3 << 20, 6);
            client.write_all(&request).await.unwrap();
            client.shutdown().await.unwrap();

            let mut at_server = Vec::new();
            tokio::time::timeout(LIMIT, server.read_to_end(&mut at_server))
                .await
                .expect("the client's FIN reached the server")
                .unwrap();
            assert!(at_server == request, "{kind:?}");

            let reply_sent = reply.clone();
            let serve = tokio::spawn(async move {
                server.write_all(&reply_sent).await.unwrap();
                server.shutdown().await.unwrap();
                server
            });
            let mut at_client = Vec::new();
            tokio::time::timeout(LIMIT, client.read_to_end(&mut at_client))
                .await
                .expect("the server's FIN reached the client")
                .unwrap();
            assert!(at_client == reply, "{kind:?}");

            let outcome = finish(relay).await;
            assert!(outcome.error.is_none(), "{kind:?}: {:?}", outcome.error);
            assert_eq!(
                outcome.transferred,
                Transferred {
                    client_to_upstream: request.len() as u64,
                    upstream_to_client: reply.len() as u64
                }
            );
            drop((client, serve.await.unwrap()));
        }
    }

    /// Forwards 1000 bytes one way, makes sure they arrived, then resets `reset` (one of the
    /// two far ends); the relay must end with an error and report the 1000 bytes.
    async fn reset_ends_the_relay(kind: Kind, reset_client: bool) {
        let (mut client, mut server, relay) = relayed(kind, None).await;
        let (sender, receiver) = if reset_client {
            (&mut client, &mut server)
        } else {
            (&mut server, &mut client)
        };
        sender.write_all(&[1; 1000]).await.unwrap();
        let mut got = [0; 1000];
        receiver.read_exact(&mut got).await.unwrap();
        let (reset, mut other) = if reset_client {
            (client, server)
        } else {
            (server, client)
        };
        reset.set_zero_linger().unwrap();
        drop(reset);

        let outcome = finish(relay).await;
        let error = outcome.error.expect("a reset is an error");
        assert!(
            matches!(
                error.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "{kind:?}: {error}"
        );
        let forwarded = if reset_client {
            outcome.transferred.client_to_upstream
        } else {
            outcome.transferred.upstream_to_client
        };
        assert_eq!(forwarded, 1000, "{kind:?}");
        // The relay closed its side of the other connection when it ended.
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(LIMIT, other.read_to_end(&mut rest))
            .await
            .expect("the other side is closed");
    }

    #[tokio::test]
    async fn client_reset_ends_the_relay_with_an_error() {
        for kind in KINDS {
            reset_ends_the_relay(kind, true).await;
        }
    }

    #[tokio::test]
    async fn upstream_reset_ends_the_relay_with_an_error() {
        for kind in KINDS {
            reset_ends_the_relay(kind, false).await;
        }
    }

    /// The upstream resets while the client is still streaming: the relay is writing to it
    /// when it goes, and must end with an error, closing the client's connection too.
    #[tokio::test]
    async fn reset_while_streaming_ends_the_relay() {
        for kind in KINDS {
            let (client, mut server, relay) = relayed(kind, None).await;
            let (mut client_read, mut client_write) = client.into_split();
            let streaming = tokio::spawn(async move {
                let chunk = payload(64 << 10, 10);
                // Ends when the relay has closed the client's connection.
                while client_write.write_all(&chunk).await.is_ok() {}
            });
            let mut got = vec![0; 1 << 20];
            server.read_exact(&mut got).await.unwrap();
            server.set_zero_linger().unwrap();
            drop(server);

            let outcome = finish(relay).await;
            assert!(outcome.error.is_some(), "{kind:?}");
            assert!(
                outcome.transferred.client_to_upstream >= 1 << 20,
                "{kind:?}"
            );
            tokio::time::timeout(LIMIT, streaming)
                .await
                .expect("the client's connection was closed")
                .unwrap();
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(LIMIT, client_read.read_to_end(&mut rest))
                .await
                .expect("the client's connection was closed");
        }
    }

    /// The generic relay over in-memory pipes smaller than one write, so that every read and
    /// write on both sides is partial and many are pending.
    #[tokio::test]
    async fn generic_relay_over_duplex_streams() {
        let (client, client_side) = tokio::io::duplex(1000);
        let (upstream_side, server) = tokio::io::duplex(777);
        let relay = tokio::spawn(relay(client_side, upstream_side));
        let up = payload(300_000, 7);
        let down = payload(500_001, 8);
        let (at_server, at_client) =
            tokio::join!(exchange(server, down.clone()), exchange(client, up.clone()));
        assert!(at_server == up);
        assert!(at_client == down);
        let outcome = finish(relay).await;
        assert_eq!(
            outcome.into_result().unwrap(),
            Transferred {
                client_to_upstream: up.len() as u64,
                upstream_to_client: down.len() as u64
            }
        );
    }

    /// Half-close through the generic relay: the upstream answers only after the client's
    /// write half is shut down.
    #[tokio::test]
    async fn generic_relay_half_close_over_duplex_streams() {
        let (mut client, client_side) = tokio::io::duplex(4096);
        let (upstream_side, mut server) = tokio::io::duplex(4096);
        let relay = tokio::spawn(relay(client_side, upstream_side));
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut at_server = Vec::new();
        server.read_to_end(&mut at_server).await.unwrap();
        assert_eq!(at_server, b"request");
        let reply = payload(100_000, 9);
        let (at_client, ()) = tokio::join!(
            async {
                let mut at_client = Vec::new();
                client.read_to_end(&mut at_client).await.unwrap();
                at_client
            },
            async {
                server.write_all(&reply).await.unwrap();
                server.shutdown().await.unwrap();
            }
        );
        assert!(at_client == reply);
        let outcome = finish(relay).await;
        assert_eq!(
            outcome.into_result().unwrap(),
            Transferred {
                client_to_upstream: 7,
                upstream_to_client: reply.len() as u64
            }
        );
    }
}
