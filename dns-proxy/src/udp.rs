//! DNS over UDP: workers sharing one socket, each taking every datagram waiting on it with
//! one `recvmmsg(2)` (up to [`BATCH`]) and answering them in turn, so a busy proxy pays one
//! receive system call per batch instead of one per query; an idle one still wakes for a
//! single datagram. Answers go out with a non-blocking send each, awaiting writability only
//! when the socket's buffer is full.

pub mod receive_buffer;

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use isthmus_proto::drain;
use nix::sys::socket::{recvmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::config::MAX_QUERY_BYTES;
use crate::ratelimit::Verdict;
use crate::server::{refusal_for, Resolver, Step, Transport};

/// Datagrams taken per receive at most.
pub const BATCH: usize = 32;
/// One byte more than the largest query accepted: a longer datagram arrives cut to this
/// size and is seen as oversized, not as a shorter query.
const DATAGRAM: usize = MAX_QUERY_BYTES + 1;

/// Buffers for one worker's batches, allocated once. (The message headers that point into
/// them hold raw pointers, so they live only for one receive: a worker's future must be
/// `Send`.)
struct Batch {
    buffers: Vec<Vec<u8>>,
    /// Length and sender of each datagram of the last receive.
    received: Vec<(usize, Option<SocketAddr>)>,
}

impl Batch {
    fn new() -> Self {
        Self {
            buffers: (0..BATCH).map(|_| vec![0u8; DATAGRAM]).collect(),
            received: Vec::with_capacity(BATCH),
        }
    }

    /// Takes the datagrams waiting on `socket`, without blocking.
    fn receive(&mut self, socket: &UdpSocket) -> std::io::Result<usize> {
        self.received.clear();
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
        let mut slices: Vec<[IoSliceMut<'_>; 1]> = self
            .buffers
            .iter_mut()
            .map(|b| [IoSliceMut::new(b)])
            .collect();
        let messages = recvmmsg(
            socket.as_raw_fd(),
            &mut headers,
            slices.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map_err(std::io::Error::from)?;
        for m in messages {
            self.received
                .push((m.bytes, m.address.as_ref().and_then(socket_addr)));
        }
        Ok(self.received.len())
    }
}

fn socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::from(*v4));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6))
}

/// Serves UDP on `socket` until `shutdown`; several of these may share one socket.
pub async fn serve(socket: Arc<UdpSocket>, resolver: Arc<Resolver>, shutdown: drain::Watch) {
    let mut batch = Batch::new();
    let stop = shutdown.signaled();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            r = socket.readable() => if let Err(e) = r {
                tracing::debug!(error = %e, "udp socket not readable");
                continue;
            },
        }
        let n = match socket.try_io(Interest::READABLE, || batch.receive(&socket)) {
            Ok(n) => n,
            // Another worker took them first.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                // An ICMP error from an earlier send can surface here; the socket is fine.
                tracing::debug!(error = %e, "udp receive error");
                continue;
            }
        };
        for i in 0..n {
            let (len, peer) = batch.received[i];
            let Some(peer) = peer else { continue };
            answer(&socket, &resolver, &batch.buffers[i][..len], peer).await;
        }
    }
}

/// Answers one datagram from `peer`.
async fn answer(
    socket: &Arc<UdpSocket>,
    resolver: &Arc<Resolver>,
    packet: &[u8],
    peer: SocketAddr,
) {
    // Over the limit: REFUSED, so the client's resolver moves on at once instead of waiting
    // out its timeout. The answer is the bare header, never larger than the query: nothing
    // to amplify. Past the refusal budget (a flood), nothing.
    match resolver.admit(peer.ip()) {
        Verdict::Answer => {}
        Verdict::Refuse => {
            if let Some(refused) = refusal_for(packet) {
                send(socket, &refused, peer).await;
            }
            return;
        }
        Verdict::Drop => return,
    }
    match resolver.begin_from(packet, Transport::Udp, Some(peer.ip())) {
        Step::Reply(b) => send(socket, &b, peer).await,
        Step::Drop => {}
        Step::Forward(p) => {
            let socket = socket.clone();
            let resolver = resolver.clone();
            tokio::spawn(async move {
                let b = resolver.finish(*p).await;
                send(&socket, &b, peer).await;
            });
        }
    }
}

/// Sends at once when the socket's buffer has room (the common case: no wake-up, no
/// future), else waits for room.
async fn send(socket: &UdpSocket, bytes: &[u8], peer: SocketAddr) {
    let sent = match socket.try_send_to(bytes, peer) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => socket.send_to(bytes, peer).await,
        other => other,
    };
    if let Err(e) = sent {
        tracing::debug!(%peer, error = %e, "udp send failed");
    }
}
