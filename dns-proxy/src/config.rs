//! The DNS proxy's configuration: one typed struct, every default a named constant, checked
//! in one pass that reports every bad field.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use isthmus_proto::config::ConfigProblems;
use serde::Serialize;

use crate::forwarder::UpstreamMode;

/// Istio's DNS proxy port.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:15053";
/// Admin (`/config_dump`, `/logging`) on loopback: all but `/metrics` and health answer
/// loopback peers only.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15000";
/// `/metrics` for scrapers on the network (Istio's merged-metrics port).
pub const DEFAULT_METRICS: &str = "0.0.0.0:15020";
pub const DEFAULT_NAMESPACE: &str = "default";
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
/// TTL of mesh answers: short, so a moved VIP or endpoint is picked up quickly, long enough
/// that a client's own cache absorbs bursts.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);
pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_CACHE_ENTRIES: usize = 10_000;
pub const DEFAULT_CACHE_MAX_TTL: Duration = Duration::from_secs(3600);
/// RFC 2308 suggests one to three hours at most; a mesh changes faster than that.
pub const DEFAULT_NEGATIVE_MAX_TTL: Duration = Duration::from_secs(300);
/// Queries waiting on upstreams at once; beyond this new ones are refused at once instead
/// of queueing (a flood of unique names must not exhaust memory or sockets).
pub const DEFAULT_MAX_INFLIGHT: usize = 1024;
/// Of those, how many one client address may hold: with a slow or dead upstream, a client
/// sending unique names keeps its slots for the whole query timeout, and without a share
/// one client would take them all and everyone else would be refused.
pub const DEFAULT_MAX_INFLIGHT_PER_CLIENT: usize = DEFAULT_MAX_INFLIGHT / 8;
pub const DEFAULT_MAX_TCP_CONNECTIONS: usize = 256;
/// Queries a second one client address may send (0 turns the limit off). Far above what an
/// application resolves, so only a runaway or hostile client meets it.
pub const DEFAULT_CLIENT_RATE: u32 = 10_000;
/// Queries one client may send at once on top of the steady rate.
pub const DEFAULT_CLIENT_BURST: u32 = 20_000;
/// Client addresses the rate limit tracks at most.
pub const DEFAULT_RATE_LIMITED_CLIENTS: usize = 65_536;
/// A client TCP connection idle this long (or slow to send a whole message) is closed.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Tasks reading the UDP socket; 0 means one per worker of the runtime (one per core for
/// the DNS proxy on its own, one for the VM agent's by default).
pub const DEFAULT_UDP_WORKERS: usize = 0;
/// Largest UDP answer sent to a client that advertises a larger EDNS size (flag day 2020).
pub const DEFAULT_MAX_UDP_PAYLOAD: u16 = 1232;
/// Largest query accepted (UDP or TCP); a query is a header and one question, plus EDNS.
pub const MAX_QUERY_BYTES: usize = 4096;
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

pub use isthmus_proto::subscription::RegistrySettings;

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    /// `/metrics` alone, for scrapers on the network.
    pub metrics_addr: Option<SocketAddr>,
    pub registry: RegistrySettings,
    pub node_id: String,
    pub network: String,
    pub cluster: String,
    pub namespace: String,
    pub cluster_domain: String,
    /// Empty: the nameservers of `resolv_conf`.
    pub upstreams: Vec<SocketAddr>,
    pub resolv_conf: PathBuf,
    #[serde(skip)]
    pub upstream_mode: UpstreamMode,
    pub query_timeout: Duration,
    pub ttl: Duration,
    pub cache_entries: usize,
    pub cache_max_ttl: Duration,
    pub negative_max_ttl: Duration,
    pub max_inflight: usize,
    /// Of `max_inflight`, how many one client address may hold at once (at most all).
    pub max_inflight_per_client: usize,
    pub max_tcp_connections: usize,
    /// Queries a second per client address; 0 disables the limit.
    pub client_rate: u32,
    pub client_burst: u32,
    /// Rate-limit loopback clients too. Off by default: on a host, loopback is the host's
    /// own resolver traffic (all of a VM's queries arrive from 127.0.0.1 at the agent's
    /// proxy), which a limit would only make wait for its resolver timeout.
    pub rate_limit_loopback: bool,
    /// Client addresses never rate-limited besides loopback (the VM's own address, where
    /// the agent embeds this proxy).
    pub rate_limit_exempt: Vec<IpAddr>,
    pub tcp_idle_timeout: Duration,
    pub max_udp_payload: u16,
    /// Tasks reading the UDP socket; 0 means one per worker of the runtime.
    pub udp_workers: usize,
    /// `SO_MARK` on the sockets that query upstreams: set when this proxy runs inside the
    /// VM agent, whose capture rules redirect DNS to it except packets with its mark.
    pub socket_mark: Option<u32>,
    /// Answer AAAA for mesh names with their IPv6 addresses (off where the host has no
    /// IPv6 route: an app would try the address first and fail).
    pub ipv6: bool,
}

impl Config {
    pub fn new(network: &str, cluster: &str, registry: RegistrySettings) -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("literal"),
            admin_addr: Some(DEFAULT_ADMIN.parse().expect("literal")),
            metrics_addr: Some(DEFAULT_METRICS.parse().expect("literal")),
            registry,
            node_id: format!("dns-{}", std::process::id()),
            network: network.into(),
            cluster: cluster.into(),
            namespace: DEFAULT_NAMESPACE.into(),
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.into(),
            upstreams: Vec::new(),
            resolv_conf: RESOLV_CONF.into(),
            upstream_mode: UpstreamMode::default(),
            query_timeout: DEFAULT_QUERY_TIMEOUT,
            ttl: DEFAULT_TTL,
            cache_entries: DEFAULT_CACHE_ENTRIES,
            cache_max_ttl: DEFAULT_CACHE_MAX_TTL,
            negative_max_ttl: DEFAULT_NEGATIVE_MAX_TTL,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            max_inflight_per_client: DEFAULT_MAX_INFLIGHT_PER_CLIENT,
            max_tcp_connections: DEFAULT_MAX_TCP_CONNECTIONS,
            client_rate: DEFAULT_CLIENT_RATE,
            client_burst: DEFAULT_CLIENT_BURST,
            rate_limit_loopback: false,
            rate_limit_exempt: Vec::new(),
            tcp_idle_timeout: DEFAULT_TCP_IDLE_TIMEOUT,
            max_udp_payload: DEFAULT_MAX_UDP_PAYLOAD,
            udp_workers: DEFAULT_UDP_WORKERS,
            socket_mark: None,
            ipv6: true,
        }
    }

    /// Checks every field and reports every problem at once.
    pub fn validate(&self) -> Result<(), ConfigProblems> {
        let mut p = ConfigProblems::new("invalid configuration");
        p.check(!self.network.is_empty(), "network", || {
            "must name this proxy's network".into()
        });
        p.check(!self.registry.addr.is_empty(), "registry", || {
            "must name the registry's address".into()
        });
        for (field, v) in [
            ("namespace", &self.namespace),
            ("cluster-domain", &self.cluster_domain),
        ] {
            p.check(
                !v.is_empty() && v.split('.').all(|l| !l.is_empty() && l.len() <= 63),
                field,
                || format!("{v:?} is not a DNS name"),
            );
        }
        p.check(
            self.ttl.as_secs() >= 1 && self.ttl.as_secs() <= u64::from(i32::MAX as u32),
            "ttl",
            || format!("{:?} must be between 1s and 68 years", self.ttl),
        );
        p.check(!self.query_timeout.is_zero(), "query-timeout", || {
            "must be above zero".into()
        });
        p.check(self.max_inflight > 0, "max-inflight", || {
            "must be at least 1".into()
        });
        p.check(
            self.max_inflight_per_client > 0,
            "max-inflight-per-client",
            || "must be at least 1 (above max-inflight, a client may hold every slot)".into(),
        );
        p.check(self.max_tcp_connections > 0, "max-tcp-connections", || {
            "must be at least 1".into()
        });
        p.check(self.max_udp_payload >= 512, "max-udp-payload", || {
            format!(
                "{} is below the 512 bytes every DNS client accepts",
                self.max_udp_payload
            )
        });
        for u in &self.upstreams {
            p.check(*u != self.listen, "upstream", || {
                format!("{u} is this proxy's own address (a forwarding loop)")
            });
        }
        p.into_result()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::new(
            "net-a",
            "c1",
            RegistrySettings {
                addr: "127.0.0.1:15012".into(),
                root_cert: "root.pem".into(),
                cert_dir: "certs".into(),
                trust_domain: "cluster.local".into(),
            },
        )
    }

    #[test]
    fn defaults_are_valid_and_every_bad_field_is_named() {
        cfg().validate().unwrap();
        let mut c = cfg();
        c.network.clear();
        c.cluster_domain = "bad..domain".into();
        c.max_udp_payload = 100;
        c.upstreams = vec![c.listen];
        c.max_inflight_per_client = 0;
        let err = c.validate().unwrap_err().to_string();
        for field in [
            "network:",
            "cluster-domain:",
            "max-udp-payload:",
            "upstream:",
            "max-inflight-per-client:",
        ] {
            assert!(err.contains(field), "{field} in {err}");
        }
    }
}
