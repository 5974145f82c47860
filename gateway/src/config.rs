//! The east-west gateway's configuration: one typed struct, every default a named
//! constant, every field checked in one pass that reports all problems at once.

use std::net::SocketAddr;
use std::time::Duration;

use isthmus_proto::config::{format_duration, ConfigProblems};
use isthmus_proto::identity::validate_dns_label;
use isthmus_proto::model::Locality;
use isthmus_proto::subscription::RegistrySettings;
use isthmus_proxy::balancer::{OutlierConfig, Policy};
use isthmus_proxy::routes;
use isthmus_proxy::upstream::{self, ConnectOptions};
use serde::Serialize;

pub const DEFAULT_SNI_ADDR: &str = "0.0.0.0:15443";
/// Tunnels (HBONE: HTTP/2 `CONNECT` over mTLS) from other networks' agents, on Istio
/// ambient's port.
pub const DEFAULT_TUNNEL_ADDR: &str = "0.0.0.0:15008";
/// Admin (`/config_dump`, `/logging`, `/debug/*`) on loopback: it reveals the catalog and
/// changes state; operators reach it over ssh or `kubectl port-forward`.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
/// `/metrics` for scrapers on the network (Istio's merged-metrics port).
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15020";
pub const DEFAULT_HEALTH_ADDR: &str = "0.0.0.0:15021";
/// Time a client has to send a complete ClientHello. Real clients send it in their first
/// segment; the bound is for clients that connect and say nothing.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time open connections get to finish after SIGTERM before they are closed.
pub const DEFAULT_DRAIN_DEADLINE: Duration = Duration::from_secs(20);
/// Connections the gateway holds at once (all services); further clients wait in the
/// listen backlog.
pub const DEFAULT_MAX_CONNECTIONS: usize = 65_536;

#[derive(Debug, Clone, Serialize)]
pub struct GatewayConfig {
    pub network: String,
    pub cluster: String,
    /// This gateway's id at the registry.
    pub node_id: String,
    #[serde(serialize_with = "display")]
    pub locality: Locality,
    /// The registry, the root and the gateway's own certificate directory.
    pub registry: RegistrySettings,
    /// A bootstrap token, exchanged for a certificate written to the certificate
    /// directory when that has none yet.
    #[serde(skip)]
    pub token: Option<String>,
    pub sni_addr: SocketAddr,
    /// The tunnel listener; `None`: no tunnels, SNI passthrough only.
    pub tunnel_addr: Option<SocketAddr>,
    /// Tunnels over QUIC too, on the tunnel listener's port over UDP.
    pub quic: bool,
    pub admin_addr: Option<SocketAddr>,
    /// `/metrics` alone, for scrapers on the network.
    pub metrics_addr: Option<SocketAddr>,
    pub health_addr: Option<SocketAddr>,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub connect_attempts: u32,
    #[serde(serialize_with = "debug")]
    pub policy: Policy,
    pub outlier_failures: u32,
    pub outlier_base_ejection: Duration,
    pub outlier_max_ejection: Duration,
    pub max_connections: usize,
    pub max_connections_per_destination: usize,
    pub drain_deadline: Duration,
}

fn display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn debug<T: std::fmt::Debug, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{v:?}"))
}

impl GatewayConfig {
    /// The defaults: the gateway's own constants above, and the proxy core's for what the
    /// core does (connect, balancing, outlier detection, per-destination limit).
    pub fn new(network: &str, cluster: &str, registry: RegistrySettings) -> Self {
        let outlier = OutlierConfig::default();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        Self {
            network: network.to_string(),
            cluster: cluster.to_string(),
            node_id: format!("gateway-{network}-{host}-{}", std::process::id()),
            locality: Locality::default(),
            registry,
            token: None,
            sni_addr: DEFAULT_SNI_ADDR.parse().expect("valid default"),
            tunnel_addr: Some(DEFAULT_TUNNEL_ADDR.parse().expect("valid default")),
            quic: true,
            admin_addr: Some(DEFAULT_ADMIN_ADDR.parse().expect("valid default")),
            metrics_addr: Some(DEFAULT_METRICS_ADDR.parse().expect("valid default")),
            health_addr: Some(DEFAULT_HEALTH_ADDR.parse().expect("valid default")),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            connect_timeout: upstream::DEFAULT_CONNECT_TIMEOUT,
            connect_attempts: upstream::DEFAULT_CONNECT_ATTEMPTS,
            policy: Policy::default(),
            outlier_failures: outlier.consecutive_failures,
            outlier_base_ejection: outlier.base_ejection,
            outlier_max_ejection: outlier.max_ejection,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_destination: routes::DEFAULT_MAX_CONNECTIONS_PER_DESTINATION,
            drain_deadline: DEFAULT_DRAIN_DEADLINE,
        }
    }

    pub fn connect_options(&self) -> ConnectOptions {
        ConnectOptions {
            timeout: self.connect_timeout,
            attempts: self.connect_attempts,
            mark: None,
        }
    }

    pub fn outlier(&self) -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: self.outlier_failures,
            base_ejection: self.outlier_base_ejection,
            max_ejection: self.outlier_max_ejection,
            ..OutlierConfig::default()
        }
    }

    /// Whether the certificate directory holds a certificate already (else the token is
    /// exchanged for one at start).
    pub fn has_credentials(&self) -> bool {
        self.registry
            .cert_dir
            .join(isthmus_proto::tls::CERT_CHAIN_FILE)
            .is_file()
    }

    /// Every problem at once, each naming its flag, fields checked against each other in
    /// the same pass.
    pub fn validate(&self) -> Result<(), ConfigProblems> {
        let mut p = ConfigProblems::new("the gateway's configuration");
        check_label(&mut p, "--network", "network", &self.network);
        if !self.cluster.is_empty() {
            check_label(&mut p, "--cluster", "cluster", &self.cluster);
        }
        if let Err(e) = isthmus_proto::grpc::check_address(&self.registry.addr) {
            p.push("--registry", e.to_string());
        }
        self.check_root(&mut p);
        if !self.locality.is_empty() {
            if let Err(e) = Locality::check(&self.locality.to_string()) {
                p.push("--locality", e);
            }
        }
        p.check(
            self.has_credentials() || self.token.is_some(),
            "--cert-dir",
            || {
                format!(
                    "{}: no {} there; pass --token to obtain one with a bootstrap token",
                    self.registry.cert_dir.display(),
                    isthmus_proto::tls::CERT_CHAIN_FILE
                )
            },
        );
        for (flag, d) in [
            ("--handshake-timeout", self.handshake_timeout),
            ("--connect-timeout", self.connect_timeout),
        ] {
            p.check(!d.is_zero(), flag, || "must be more than 0".into());
        }
        for (flag, n) in [
            ("--connect-attempts", self.connect_attempts as usize),
            ("--outlier-failures", self.outlier_failures as usize),
            ("--max-connections", self.max_connections),
            (
                "--max-connections-per-destination",
                self.max_connections_per_destination,
            ),
        ] {
            p.check(n >= 1, flag, || "must be at least 1".into());
        }
        p.check(
            self.outlier_max_ejection >= self.outlier_base_ejection,
            "--outlier-max-ejection",
            || {
                format!(
                    "{} is shorter than --outlier-base-ejection {}",
                    format_duration(self.outlier_max_ejection),
                    format_duration(self.outlier_base_ejection)
                )
            },
        );
        self.check_listeners(&mut p);
        p.into_result()
    }

    /// The mesh root must be a readable PEM CA certificate of a trust domain.
    fn check_root(&self, p: &mut ConfigProblems) {
        let root = &self.registry.root_cert;
        if !root.is_file() {
            p.push(
                "--root",
                format!(
                    "{}: no such file (the mesh root certificate, root-cert.pem)",
                    root.display()
                ),
            );
            return;
        }
        match isthmus_proto::tls::read_certs(root) {
            Err(e) => p.push("--root", e.to_string()),
            Ok(certs) => p.check(
                isthmus_proto::tls::trust_domain_of_ca(&certs[0]).is_some(),
                "--root",
                || {
                    format!(
                        "{}: the first certificate is not a mesh root (no spiffe://<trust domain> \
                         name in it); use the root-cert.pem of the registry's CA",
                        root.display()
                    )
                },
            ),
        }
    }

    /// Two listeners on one address (other than port 0, "any free port") cannot both bind.
    fn check_listeners(&self, p: &mut ConfigProblems) {
        let listeners = [
            ("--sni-addr", Some(self.sni_addr)),
            ("--tunnel-addr", self.tunnel_addr),
            ("--admin-addr", self.admin_addr),
            ("--metrics-addr", self.metrics_addr),
            ("--health-addr", self.health_addr),
        ];
        for (i, (flag, addr)) in listeners.iter().enumerate() {
            let Some(addr) = addr.filter(|a| a.port() != 0) else {
                continue;
            };
            if let Some((other, _)) = listeners[..i].iter().find(|(_, a)| *a == Some(addr)) {
                p.push(
                    flag,
                    format!("{addr} is also {other}: each listener needs its own port"),
                );
            }
        }
    }
}

fn check_label(p: &mut ConfigProblems, flag: &str, what: &'static str, value: &str) {
    if let Err(e) = validate_dns_label(what, value) {
        p.push(flag, e.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_proto::subscription::{DEFAULT_REGISTRY_ADDR, DEFAULT_TRUST_DOMAIN};

    fn config() -> GatewayConfig {
        GatewayConfig::new(
            "network-b",
            "",
            RegistrySettings {
                addr: DEFAULT_REGISTRY_ADDR.into(),
                root_cert: "/nonexistent/root-cert.pem".into(),
                cert_dir: "/nonexistent/certs".into(),
                trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            },
        )
    }

    #[test]
    fn every_problem_is_named_at_once() {
        let mut c = config();
        c.connect_timeout = Duration::ZERO;
        c.max_connections = 0;
        let err = c.validate().unwrap_err();
        let fields: Vec<&str> = err.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "--root",
                "--cert-dir",
                "--connect-timeout",
                "--max-connections"
            ]
        );
    }

    #[test]
    fn two_listeners_on_one_port_are_a_problem_but_port_zero_is_not() {
        let mut c = config();
        c.sni_addr = "127.0.0.1:0".parse().unwrap();
        c.admin_addr = Some("127.0.0.1:0".parse().unwrap());
        c.health_addr = Some("127.0.0.1:15021".parse().unwrap());
        let mut p = ConfigProblems::default();
        c.check_listeners(&mut p);
        assert!(p.is_empty(), "{p}");
        c.admin_addr = c.health_addr;
        c.check_listeners(&mut p);
        assert_eq!(p.len(), 1);
        assert!(p.to_string().contains("--health-addr"), "{p}");
        assert!(p.to_string().contains("--admin-addr"), "{p}");
    }

    #[test]
    fn the_tunnel_listener_is_on_by_default_and_needs_a_port_of_its_own() {
        let mut c = config();
        assert_eq!(c.tunnel_addr, Some(DEFAULT_TUNNEL_ADDR.parse().unwrap()));
        c.tunnel_addr = Some(c.sni_addr);
        let mut p = ConfigProblems::default();
        c.check_listeners(&mut p);
        assert_eq!(p.len(), 1, "{p}");
        assert!(p.to_string().contains("--tunnel-addr"), "{p}");
        assert!(p.to_string().contains("--sni-addr"), "{p}");
        c.tunnel_addr = None;
        let mut p = ConfigProblems::default();
        c.check_listeners(&mut p);
        assert!(p.is_empty(), "{p}");
    }
}
