//! The one reader of `/etc/resolv.conf`'s `nameserver` lines, shared by the DNS proxy (its
//! upstreams) and the VM agent (the addresses whose DNS it captures), so the two can never
//! disagree about which resolvers the host uses.
//!
//! Each nameserver is parsed once into typed values: its address, and for a scoped IPv6
//! address (`fe80::1%eth0`, which glibc accepts) the interface's index, so it is both a
//! capture address and a usable upstream. A scope naming an interface this host does not
//! have cannot be reached and is skipped with a warning; a line that is not a nameserver
//! address is ignored, as glibc ignores it.

use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::path::Path;

/// The port resolv.conf's nameservers answer on (resolv.conf cannot name another).
pub const NAMESERVER_PORT: u16 = 53;

/// One `nameserver` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nameserver {
    /// The address, without its scope: what a packet to it carries as destination.
    pub ip: IpAddr,
    /// The interface index of a scoped IPv6 address (`%eth0` or `%2`).
    pub scope: Option<u32>,
    /// Where to send queries: `ip` on port 53, with the scope.
    pub addr: SocketAddr,
}

impl Nameserver {
    /// The nameserver written as `address` or `address%scope`; `None` (with a warning for
    /// an unknown interface) when it is not one this host can reach.
    pub fn parse(word: &str) -> Option<Self> {
        let (ip, scope) = match word.split_once('%') {
            Some((ip, scope)) => (ip, Some(scope)),
            None => (word, None),
        };
        let ip: IpAddr = ip.parse().ok()?;
        let (IpAddr::V6(v6), Some(scope)) = (ip, scope) else {
            // A scope on an IPv4 address means nothing; glibc ignores such a line.
            return scope.is_none().then(|| Self {
                ip,
                scope: None,
                addr: SocketAddr::new(ip, NAMESERVER_PORT),
            });
        };
        let Some(index) = interface_index(scope) else {
            tracing::warn!(
                nameserver = word,
                interface = scope,
                "ignoring a resolv.conf nameserver scoped to an interface this host does not have"
            );
            return None;
        };
        Some(Self {
            ip,
            scope: Some(index),
            addr: SocketAddr::V6(SocketAddrV6::new(v6, NAMESERVER_PORT, 0, index)),
        })
    }
}

/// The nameservers of resolv.conf's text, in order, each once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<Nameserver>,
}

impl ResolvConf {
    pub fn parse(text: &str) -> Self {
        let mut nameservers: Vec<Nameserver> = Vec::new();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("nameserver") {
                continue;
            }
            if let Some(ns) = words.next().and_then(Nameserver::parse) {
                if !nameservers.iter().any(|n| n.addr == ns.addr) {
                    nameservers.push(ns);
                }
            }
        }
        Self { nameservers }
    }

    /// The file at `path`; a missing or unreadable file has no nameservers (the caller says
    /// what that means for it).
    pub fn read(path: &Path) -> Self {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text),
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(file = %path.display(), error = %e, "cannot read resolv.conf");
                }
                Self::default()
            }
        }
    }

    /// Where to forward queries, less `exclude` (a proxy itself: on a host whose resolv.conf
    /// points at the proxy, forwarding there would loop).
    pub fn upstreams(&self, exclude: SocketAddr) -> Vec<SocketAddr> {
        self.nameservers
            .iter()
            .map(|n| n.addr)
            .filter(|a| *a != exclude)
            .collect()
    }

    /// The nameservers' addresses without scope, each once: the destinations whose DNS
    /// traffic is captured.
    pub fn addresses(&self) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = Vec::new();
        for n in &self.nameservers {
            if !out.contains(&n.ip) {
                out.push(n.ip);
            }
        }
        out
    }
}

/// The index of the interface named `scope`, or `scope` itself when it is a number (as
/// `getaddrinfo` reads it).
fn interface_index(scope: &str) -> Option<u32> {
    if let Ok(n) = scope.parse::<u32>() {
        return (n != 0).then_some(n);
    }
    nix::net::if_::if_nametoindex(scope).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(text: &str) -> Vec<SocketAddr> {
        ResolvConf::parse(text)
            .nameservers
            .iter()
            .map(|n| n.addr)
            .collect()
    }

    #[test]
    fn plain_nameservers_in_order_each_once() {
        let text = "nameserver 10.0.0.2\nnameserver 10.0.0.3\nnameserver 10.0.0.2\n";
        assert_eq!(
            addrs(text),
            vec![
                "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
                "10.0.0.3:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn ipv6_nameservers() {
        let conf = ResolvConf::parse("nameserver ::1\nnameserver fd00::53\n");
        assert_eq!(
            conf.upstreams("127.0.0.1:53".parse().unwrap()),
            vec![
                "[::1]:53".parse::<SocketAddr>().unwrap(),
                "[fd00::53]:53".parse().unwrap()
            ]
        );
        assert!(conf.nameservers.iter().all(|n| n.scope.is_none()));
    }

    #[test]
    fn a_scoped_ipv6_nameserver_is_kept_with_its_interface() {
        let lo = nix::net::if_::if_nametoindex("lo").expect("every Linux host has lo");
        let conf = ResolvConf::parse("nameserver fe80::1%lo\nnameserver fe80::2%7\n");
        let ns = conf.nameservers[0];
        assert_eq!(ns.ip, "fe80::1".parse::<IpAddr>().unwrap());
        assert_eq!(ns.scope, Some(lo));
        match ns.addr {
            SocketAddr::V6(a) => {
                assert_eq!(a.scope_id(), lo);
                assert_eq!(a.port(), 53);
                assert_eq!(*a.ip(), "fe80::1".parse::<std::net::Ipv6Addr>().unwrap());
            }
            SocketAddr::V4(a) => panic!("{a} is not the scoped address"),
        }
        // A numeric scope is the interface index itself.
        assert_eq!(conf.nameservers[1].scope, Some(7));
        // Captured by its address alone.
        assert_eq!(
            conf.addresses(),
            vec![
                "fe80::1".parse::<IpAddr>().unwrap(),
                "fe80::2".parse().unwrap()
            ]
        );
    }

    #[test]
    fn a_nameserver_on_an_unknown_interface_is_skipped() {
        let text = "nameserver fe80::1%isthmus-none0\nnameserver 10.0.0.2\nnameserver fe80::1%0\n";
        assert_eq!(addrs(text), vec!["10.0.0.2:53".parse().unwrap()]);
    }

    #[test]
    fn comments_options_search_and_garbage_are_ignored() {
        let text = "# generated\n; also a comment\nsearch example.com\ndomain example.com\n\
                    options ndots:5 edns0\nnameserver\nnameserver bogus\nnameserver 10.0.0.2:53\n\
                    nameserver 10.0.0.9%eth0\n#nameserver 10.0.0.8\n  nameserver   10.0.0.2  \n\
                    nameservers 10.0.0.7\n";
        assert_eq!(addrs(text), vec!["10.0.0.2:53".parse().unwrap()]);
        assert_eq!(ResolvConf::parse(""), ResolvConf::default());
    }

    #[test]
    fn the_proxy_itself_is_not_its_own_upstream() {
        let text = "# comment\nsearch example.com\nnameserver 10.0.0.2\nnameserver ::1\nnameserver 127.0.0.1\noptions ndots:5\n";
        let got = ResolvConf::parse(text).upstreams("127.0.0.1:53".parse().unwrap());
        assert_eq!(
            got,
            vec![
                "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn the_agent_and_the_proxy_read_the_same_nameservers() {
        // The agent's old reader kept the scoped address; the proxy's dropped it. Both now
        // keep it (lo: an interface every host has).
        let text = "# generated\nsearch example.com\nnameserver 10.0.0.2\nnameserver fe80::1%lo\nnameserver 10.0.0.2\noptions ndots:5\nnameserver bogus\n";
        let conf = ResolvConf::parse(text);
        assert_eq!(
            conf.addresses(),
            vec![
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap()
            ]
        );
        assert_eq!(conf.upstreams("127.0.0.1:15053".parse().unwrap()).len(), 2);
    }

    #[test]
    fn a_missing_file_has_no_nameservers() {
        let conf = ResolvConf::read(Path::new("/nonexistent/resolv.conf"));
        assert!(conf.nameservers.is_empty());
    }
}
