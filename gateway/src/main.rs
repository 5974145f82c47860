//! `isthmus-gateway`: parses arguments and runs the east-west gateway until SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use isthmus_gateway::balancer::Policy;
use isthmus_gateway::config::{self, GatewayConfig};
use isthmus_proto::config::parse_duration;
use isthmus_proto::model::Locality;
use isthmus_proto::subscription::RegistrySettings;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "The isthmus east-west gateway: TLS SNI passthrough from other networks to this network's workloads"
)]
struct Args {
    /// This gateway's network (it routes only to workloads on it).
    #[arg(long, env = "ISTHMUS_NETWORK")]
    network: String,
    #[arg(long, env = "ISTHMUS_CLUSTER", default_value = "")]
    cluster: String,
    /// The registry's gRPC address.
    #[arg(long, default_value = config::DEFAULT_REGISTRY)]
    registry: String,
    /// The mesh root certificate.
    #[arg(long)]
    root: PathBuf,
    /// Directory with this gateway's key.pem and cert-chain.pem.
    #[arg(long)]
    cert_dir: PathBuf,
    /// A bootstrap token to obtain the certificate when --cert-dir has none.
    #[arg(long, env = "ISTHMUS_TOKEN")]
    token: Option<String>,
    #[arg(long, default_value = config::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// region/zone/subzone of this gateway (locality-priority load balancing).
    #[arg(long, default_value = "")]
    locality: String,
    /// TLS SNI passthrough listener.
    #[arg(long, default_value = config::DEFAULT_SNI_ADDR)]
    sni_addr: SocketAddr,
    /// Admin HTTP (/metrics, /config_dump, /logging).
    #[arg(long, default_value = config::DEFAULT_ADMIN_ADDR)]
    admin_addr: SocketAddr,
    /// Health HTTP (/healthz/ready).
    #[arg(long, default_value = config::DEFAULT_HEALTH_ADDR)]
    health_addr: SocketAddr,
    /// Time a client has to send its ClientHello.
    #[arg(long, default_value = "5s", value_parser = duration)]
    handshake_timeout: Duration,
    /// Time to connect to one endpoint before trying another.
    #[arg(long, default_value = "5s", value_parser = duration)]
    connect_timeout: Duration,
    /// Endpoints tried per connection.
    #[arg(long, default_value_t = isthmus_gateway::upstream::DEFAULT_CONNECT_ATTEMPTS)]
    connect_attempts: u32,
    /// round-robin or least-connections (power of two choices).
    #[arg(long, default_value = "round-robin", value_parser = policy)]
    lb_policy: Policy,
    /// Consecutive connect failures that eject an endpoint.
    #[arg(long, default_value_t = isthmus_gateway::balancer::DEFAULT_CONSECUTIVE_FAILURES)]
    outlier_failures: u32,
    /// First ejection; doubles with each further ejection of the same endpoint.
    #[arg(long, default_value = "30s", value_parser = duration)]
    outlier_base_ejection: Duration,
    #[arg(long, default_value = "5m", value_parser = duration)]
    outlier_max_ejection: Duration,
    #[arg(long, default_value_t = config::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    #[arg(long, default_value_t = config::DEFAULT_MAX_CONNECTIONS_PER_DESTINATION)]
    max_connections_per_destination: usize,
    /// Time open connections get to finish after SIGTERM.
    #[arg(long, default_value = "20s", value_parser = duration)]
    drain_deadline: Duration,
    /// Check the configuration and exit.
    #[arg(long)]
    validate: bool,
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

fn policy(s: &str) -> Result<Policy, String> {
    match s {
        "round-robin" => Ok(Policy::RoundRobin),
        "least-connections" => Ok(Policy::LeastConnections),
        other => Err(format!("{other:?}: use round-robin or least-connections")),
    }
}

fn main() -> anyhow::Result<()> {
    isthmus_proto::telemetry::init();
    let a = Args::parse();
    let mut cfg = GatewayConfig::new(
        &a.network,
        &a.cluster,
        RegistrySettings {
            addr: a.registry,
            root_cert: a.root,
            cert_dir: a.cert_dir,
            trust_domain: a.trust_domain,
        },
    );
    cfg.token = a.token;
    cfg.locality = Locality::parse(&a.locality);
    cfg.sni_addr = a.sni_addr;
    cfg.admin_addr = Some(a.admin_addr);
    cfg.health_addr = Some(a.health_addr);
    cfg.handshake_timeout = a.handshake_timeout;
    cfg.connect_timeout = a.connect_timeout;
    cfg.connect_attempts = a.connect_attempts;
    cfg.policy = a.lb_policy;
    cfg.outlier_failures = a.outlier_failures;
    cfg.outlier_base_ejection = a.outlier_base_ejection;
    cfg.outlier_max_ejection = a.outlier_max_ejection;
    cfg.max_connections = a.max_connections;
    cfg.max_connections_per_destination = a.max_connections_per_destination;
    cfg.drain_deadline = a.drain_deadline;
    cfg.validate()?;
    if a.validate {
        println!("configuration is valid");
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let handle = isthmus_gateway::run(cfg).await?;
        handle.run_until_signal().await;
        Ok(())
    })
}
