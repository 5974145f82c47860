//! The east-west gateway's configuration: one typed struct, every default a named
//! constant, every field checked in one pass that reports all problems at once.

use std::net::SocketAddr;
use std::time::Duration;

use isthmus_proto::model::Locality;
use isthmus_proto::subscription::RegistrySettings;
use serde::Serialize;

use crate::balancer::{OutlierConfig, Policy};
use crate::upstream::ConnectOptions;

pub const DEFAULT_SNI_ADDR: &str = "0.0.0.0:15443";
pub const DEFAULT_ADMIN_ADDR: &str = "0.0.0.0:15000";
pub const DEFAULT_HEALTH_ADDR: &str = "0.0.0.0:15021";
pub const DEFAULT_REGISTRY: &str = "127.0.0.1:15012";
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Time a client has to send a complete ClientHello. Real clients send it in their first
/// segment; the bound is for clients that connect and say nothing.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time open connections get to finish after SIGTERM before they are closed.
pub const DEFAULT_DRAIN_DEADLINE: Duration = Duration::from_secs(20);
/// Connections the gateway holds at once (all services); further clients wait in the
/// listen backlog.
pub const DEFAULT_MAX_CONNECTIONS: usize = 65_536;
/// Connections to one service port at once (Envoy's circuit-breaker default is 1,024 per
/// cluster; a gateway fans in a whole network's clients, so more).
pub const DEFAULT_MAX_CONNECTIONS_PER_DESTINATION: usize = 16_384;

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
    pub admin_addr: Option<SocketAddr>,
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
            admin_addr: Some(DEFAULT_ADMIN_ADDR.parse().expect("valid default")),
            health_addr: Some(DEFAULT_HEALTH_ADDR.parse().expect("valid default")),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            connect_timeout: ConnectOptions::default().timeout,
            connect_attempts: ConnectOptions::default().attempts,
            policy: Policy::RoundRobin,
            outlier_failures: outlier.consecutive_failures,
            outlier_base_ejection: outlier.base_ejection,
            outlier_max_ejection: outlier.max_ejection,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_destination: DEFAULT_MAX_CONNECTIONS_PER_DESTINATION,
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

    /// Every problem at once, each naming its setting.
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut problems: Vec<String> = Vec::new();
        if let Err(e) = isthmus_proto::identity::validate_dns_label("network", &self.network) {
            problems.push(e.to_string());
        }
        if !self.cluster.is_empty() {
            if let Err(e) = isthmus_proto::identity::validate_dns_label("cluster", &self.cluster) {
                problems.push(e.to_string());
            }
        }
        if self.registry.addr.is_empty() {
            problems.push("registry: must name the registry's address".into());
        }
        if !self.registry.root_cert.is_file() {
            problems.push(format!(
                "root {}: no such file (the mesh root certificate, root-cert.pem)",
                self.registry.root_cert.display()
            ));
        }
        if !self.has_credentials() && self.token.is_none() {
            problems.push(format!(
                "cert-dir {}: no {} there; pass --token to obtain one with a bootstrap token",
                self.registry.cert_dir.display(),
                isthmus_proto::tls::CERT_CHAIN_FILE
            ));
        }
        for (name, d) in [
            ("handshake-timeout", self.handshake_timeout),
            ("connect-timeout", self.connect_timeout),
        ] {
            if d.is_zero() {
                problems.push(format!("{name}: must be more than 0"));
            }
        }
        if self.connect_attempts == 0 {
            problems.push("connect-attempts: must be at least 1".into());
        }
        if self.outlier_failures == 0 {
            problems.push("outlier-failures: must be at least 1".into());
        }
        if self.outlier_max_ejection < self.outlier_base_ejection {
            problems.push(format!(
                "outlier-max-ejection {:?} is shorter than outlier-base-ejection {:?}",
                self.outlier_max_ejection, self.outlier_base_ejection
            ));
        }
        if self.max_connections == 0 {
            problems.push("max-connections: must be at least 1".into());
        }
        if self.max_connections_per_destination == 0 {
            problems.push("max-connections-per-destination: must be at least 1".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("invalid configuration:\n  {}", problems.join("\n  "))
        }
    }
}
