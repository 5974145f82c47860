//! The DNS socket's receive buffer: how large it is asked to be, and how many datagrams the
//! kernel dropped because it was full.
//!
//! A burst of queries larger than the buffer is dropped by the kernel before any worker can
//! read it, with no answer and nothing in the proxy's own counters: for the client a silent
//! drop, which a resolver library waits out (5 s by default). The system's default buffer
//! (`net.core.rmem_default`, 208 KiB on most systems) holds about 250 small queries. The
//! proxy asks for [`RECEIVE_BUFFER`]: with `CAP_NET_ADMIN` (the VM agent has it for its
//! nftables rules) past `net.core.rmem_max`, without it up to that limit. The size granted
//! is logged at start, and the kernel's drop count for the socket is exported at every
//! scrape as `isthmus_dns_udp_receive_drops_total`, read from `/proc/net/udp` and `udp6`.

use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

/// Bytes of receive buffer asked for the DNS socket: about 2,500 queries of a usual size
/// (each datagram is charged its payload and the kernel's bookkeeping, ~400 bytes in all).
/// Larger is not better: during a flood from another address, every query queued ahead of a
/// local one is a wait, and a 4 MiB buffer tripled a loopback client's 99th percentile
/// (dns-bench's flood) where 1 MiB kept it where the system's default left it.
pub const RECEIVE_BUFFER: usize = 1 << 20;

/// Asks for `want` bytes of receive buffer on `socket`, past `net.core.rmem_max` where the
/// process may (`SO_RCVBUFFORCE`), and returns the size the kernel reports (it doubles what
/// it grants, for its bookkeeping).
pub fn size_receive_buffer(socket: &impl AsFd, want: usize) -> std::io::Result<usize> {
    if setsockopt(socket, sockopt::RcvBufForce, &want).is_err() {
        setsockopt(socket, sockopt::RcvBuf, &want)?;
    }
    Ok(getsockopt(socket, sockopt::RcvBuf)?)
}

/// The socket's inode number, which `/proc/net/udp` names it by.
fn inode_of(socket: &impl AsFd) -> std::io::Result<u64> {
    Ok(nix::sys::stat::fstat(socket.as_fd())?.st_ino)
}

/// The kernel's count of datagrams dropped on the UDP socket with inode `inode`, from the
/// `drops` column of `/proc/net/udp` or `udp6` (this process's network namespace); `None`
/// when neither lists it.
fn drops_of(inode: u64) -> Option<u64> {
    ["/proc/self/net/udp", "/proc/self/net/udp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .find_map(|text| drops_in(&text, inode))
}

/// The `drops` of the line for `inode` in a `/proc/net/udp`-format table: its tenth column is
/// the inode and its last the drops.
fn drops_in(table: &str, inode: u64) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let columns: Vec<&str> = line.split_whitespace().collect();
        let this: u64 = columns.get(9)?.parse().ok()?;
        (this == inode)
            .then(|| columns.last()?.parse().ok())
            .flatten()
    })
}

/// Registers the receive buffer's and drops' metrics of `socket` (under `isthmus_dns_`).
pub fn register(
    registry: &mut prometheus_client::registry::Registry,
    socket: &impl AsFd,
) -> std::io::Result<()> {
    let collector = ReceiveCollector {
        inode: inode_of(socket)?,
        buffer_bytes: getsockopt(socket, sockopt::RcvBuf)?,
    };
    registry
        .sub_registry_with_prefix("isthmus_dns")
        .register_collector(Box::new(collector));
    Ok(())
}

/// Exports the DNS socket's receive buffer and its kernel drops, read at scrape time.
#[derive(Debug)]
struct ReceiveCollector {
    inode: u64,
    buffer_bytes: usize,
}

impl Collector for ReceiveCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(drops) = drops_of(self.inode) {
            let counter = ConstCounter::new(drops);
            let m = encoder.encode_descriptor(
                "udp_receive_drops",
                "Queries the kernel dropped before the proxy could read them, its socket's receive buffer being full (a burst larger than the buffer); never answered",
                None,
                counter.metric_type(),
            )?;
            counter.encode(m)?;
        }
        let gauge = ConstGauge::new(i64::try_from(self.buffer_bytes).unwrap_or(i64::MAX));
        let m = encoder.encode_descriptor(
            "udp_receive_buffer_bytes",
            "The DNS socket's receive buffer as the kernel reports it (twice what it granted, its bookkeeping included)",
            None,
            MetricType::Gauge,
        )?;
        gauge.encode(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_read_from_the_line_of_the_socket() {
        let table = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
             1: 0100007F:3AF5 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 51234 2 0000000000000000 0\n\
             2: 0100007F:3AF6 00000000:0000 07 00000000:00034000 00:00000000 00000000     0        0 51235 2 0000000000000000 1322\n";
        assert_eq!(drops_in(table, 51234), Some(0));
        assert_eq!(drops_in(table, 51235), Some(1322));
        assert_eq!(drops_in(table, 7), None);
    }

    /// A burst into a socket nobody reads, its buffer as small as the kernel allows: the
    /// kernel drops what does not fit, and the count says so.
    #[test]
    fn a_burst_past_the_buffer_is_counted_as_dropped() {
        let quiet = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        setsockopt(&quiet, sockopt::RcvBuf, &1).unwrap();
        let inode = inode_of(&quiet).unwrap();
        assert_eq!(drops_of(inode), Some(0));
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = quiet.local_addr().unwrap();
        for _ in 0..200 {
            sender.send_to(&[0u8; 64], to).unwrap();
        }
        let dropped = drops_of(inode).unwrap();
        assert!(dropped > 0 && dropped < 200, "{dropped} of 200 dropped");
    }

    #[test]
    fn the_buffer_asked_for_is_granted_up_to_what_the_process_may_have() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let want = 1 << 20;
        let granted = size_receive_buffer(&socket, want).unwrap();
        let limit: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .map(|s| s.trim().parse().unwrap())
            .unwrap_or(want);
        // The kernel reports twice what it grants; without privilege it grants rmem_max at most.
        assert!(
            granted >= want.min(limit),
            "asked {want}, granted {granted}"
        );
    }
}
