//! The destination a client asked for before the capture rules redirected its connection
//! to a local listener (the VM agent's outbound 15001 and inbound 15006 listeners).
//!
//! A REDIRECT (or DNAT) rule rewrites the destination of the connection's first packet and
//! records the original in the connection's conntrack entry; `SO_ORIGINAL_DST` (IPv4) and
//! `IP6T_SO_ORIGINAL_DST` (IPv6) read it back from there. A connection that no rule
//! rewrote still has a conntrack entry when conntrack runs in the namespace (any NAT rule
//! turns it on), and then its "original" destination is simply the listener's own address:
//! callers that would connect there must check for that (see
//! `inbound::AppTarget::OriginalPort`, which does).

use std::io;
use std::net::SocketAddr;

use nix::errno::Errno;
use nix::sys::socket::{getsockopt, sockopt, SockaddrIn, SockaddrIn6};
use tokio::net::TcpStream;

/// The original destination of `stream`, an accepted connection.
///
/// Fails with [`io::ErrorKind::NotFound`] when the connection has no conntrack entry (no
/// NAT rule is loaded in this network namespace, so nothing can have redirected it).
pub fn original_destination(stream: &TcpStream) -> io::Result<SocketAddr> {
    let local = stream.local_addr()?;
    // A v4-mapped address on an IPv6 socket is an IPv4 connection, tracked as one; the
    // IPv4 option reads it (the kernel hands SOL_IP options of IPv6 sockets to IPv4).
    let ipv4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    };
    let got = if ipv4 {
        getsockopt(stream, sockopt::OriginalDst).map(|a| SocketAddr::from(SockaddrIn::from(a)))
    } else {
        getsockopt(stream, sockopt::Ip6tOriginalDst).map(|a| SocketAddr::from(SockaddrIn6::from(a)))
    };
    got.map_err(|errno| match errno {
        Errno::ENOENT => io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "the connection to {local} has no conntrack entry, so no capture rule \
                 redirected it (are the nftables capture rules installed?)"
            ),
        ),
        other => io::Error::new(
            io::Error::from(other).kind(),
            format!("reading the original destination of the connection to {local}: {other}"),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Without a redirect there is either no conntrack entry (NotFound) or one whose
    /// original destination is the listener itself; never some other address.
    #[tokio::test]
    async fn an_unredirected_connection_has_no_other_destination() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = TcpListener::bind(bind).await else {
                eprintln!("skipping {bind}: cannot bind (no IPv6?)");
                continue;
            };
            let addr = listener.local_addr().unwrap();
            let _client = TcpStream::connect(addr).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            match original_destination(&server) {
                Ok(dst) => assert_eq!(dst, addr),
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
                    assert!(e.to_string().contains("no conntrack entry"), "{e}");
                }
            }
        }
    }
}
