//! `isthmus-gateway`: parses arguments and runs the east-west gateway until SIGTERM.
//! Every flag's default is the named constant of the config or of the proxy core, shown in
//! `--help` as it is parsed.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use isthmus_gateway::config::{self, GatewayConfig};
use isthmus_proto::config::{ConfigProblems, DurationFlag};
use isthmus_proto::model::Locality;
use isthmus_proto::program;
use isthmus_proto::subscription::RegistryFlags;
use isthmus_proxy::balancer::{self, Policy};
use isthmus_proxy::{routes, upstream};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "The isthmus east-west gateway: TLS SNI passthrough and tunnels (HBONE) from other networks to this network's workloads"
)]
struct Args {
    /// This gateway's network (it routes only to workloads on it).
    #[arg(long, env = "ISTHMUS_NETWORK")]
    network: String,
    /// This gateway's cluster, as the registry names it.
    #[arg(long, env = "ISTHMUS_CLUSTER", default_value = "")]
    cluster: String,
    #[command(flatten)]
    registry: RegistryFlags,
    /// A bootstrap token to obtain the certificate when --cert-dir has none.
    #[arg(long, env = "ISTHMUS_TOKEN")]
    token: Option<String>,
    /// region/zone/subzone of this gateway (locality-priority load balancing).
    #[arg(long, default_value = "")]
    locality: String,
    /// TLS SNI passthrough listener.
    #[arg(long, default_value = config::DEFAULT_SNI_ADDR)]
    sni_addr: SocketAddr,
    /// Tunnel listener (HBONE: HTTP/2 CONNECT streams over mTLS from other networks'
    /// agents, each a connection to one of this network's services).
    #[arg(long, default_value = config::DEFAULT_TUNNEL_ADDR)]
    tunnel_addr: SocketAddr,
    /// Serve no tunnels: SNI passthrough only.
    #[arg(long, conflicts_with = "tunnel_addr")]
    no_tunnel: bool,
    /// Serve tunnels over HTTP/2 only: no QUIC listener on the tunnel port over UDP.
    #[arg(long)]
    no_quic: bool,
    /// Admin HTTP (/config_dump, /logging, /debug/*, /metrics): on loopback by default, and
    /// all but /metrics, /healthz and /readyz answer loopback peers only whatever the
    /// address; reach it remotely with an ssh tunnel or kubectl port-forward.
    #[arg(long, default_value = config::DEFAULT_ADMIN_ADDR)]
    admin_addr: SocketAddr,
    /// /metrics alone, for scrapers on the network (Istio's merged-metrics port).
    #[arg(long, default_value = config::DEFAULT_METRICS_ADDR)]
    metrics_addr: SocketAddr,
    /// Health HTTP (/healthz/ready).
    #[arg(long, default_value = config::DEFAULT_HEALTH_ADDR)]
    health_addr: SocketAddr,
    /// Time a client has to send its ClientHello (and a tunnel's client to complete its TLS
    /// handshake, then again to send the HTTP/2 preface).
    #[arg(long, default_value_t = DurationFlag(config::DEFAULT_HANDSHAKE_TIMEOUT))]
    handshake_timeout: DurationFlag,
    /// Time to connect to one endpoint before trying another.
    #[arg(long, default_value_t = DurationFlag(upstream::DEFAULT_CONNECT_TIMEOUT))]
    connect_timeout: DurationFlag,
    /// Endpoints tried per connection.
    #[arg(long, default_value_t = upstream::DEFAULT_CONNECT_ATTEMPTS)]
    connect_attempts: u32,
    /// round-robin, least-connections (power of two choices) or random (by weight).
    #[arg(long, default_value_t = Policy::default())]
    lb_policy: Policy,
    /// Consecutive connect failures that eject an endpoint.
    #[arg(long, default_value_t = balancer::DEFAULT_CONSECUTIVE_FAILURES)]
    outlier_failures: u32,
    /// First ejection; doubles with each further ejection of the same endpoint.
    #[arg(long, default_value_t = DurationFlag(balancer::DEFAULT_BASE_EJECTION))]
    outlier_base_ejection: DurationFlag,
    /// The longest an ejection grows to.
    #[arg(long, default_value_t = DurationFlag(balancer::DEFAULT_MAX_EJECTION))]
    outlier_max_ejection: DurationFlag,
    /// Connections held at once (all services); further clients wait in the listen backlog.
    #[arg(long, default_value_t = config::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Connections to one service port at once; the excess is refused and counted.
    #[arg(long, default_value_t = routes::DEFAULT_MAX_CONNECTIONS_PER_DESTINATION)]
    max_connections_per_destination: usize,
    /// Time open connections get to finish after SIGTERM.
    #[arg(long, default_value_t = DurationFlag(config::DEFAULT_DRAIN_DEADLINE))]
    drain_deadline: DurationFlag,
    /// Check the configuration and exit.
    #[arg(long)]
    validate: bool,
}

impl Args {
    fn into_config(self) -> Result<GatewayConfig, ConfigProblems> {
        let a = self;
        let mut cfg = GatewayConfig::new(&a.network, &a.cluster, a.registry.settings()?);
        cfg.token = a.token;
        cfg.locality = Locality::parse(&a.locality);
        cfg.sni_addr = a.sni_addr;
        cfg.tunnel_addr = (!a.no_tunnel).then_some(a.tunnel_addr);
        cfg.quic = !a.no_quic;
        cfg.admin_addr = Some(a.admin_addr);
        cfg.metrics_addr = Some(a.metrics_addr);
        cfg.health_addr = Some(a.health_addr);
        cfg.handshake_timeout = a.handshake_timeout.0;
        cfg.connect_timeout = a.connect_timeout.0;
        cfg.connect_attempts = a.connect_attempts;
        cfg.policy = a.lb_policy;
        cfg.outlier_failures = a.outlier_failures;
        cfg.outlier_base_ejection = a.outlier_base_ejection.0;
        cfg.outlier_max_ejection = a.outlier_max_ejection.0;
        cfg.max_connections = a.max_connections;
        cfg.max_connections_per_destination = a.max_connections_per_destination;
        cfg.drain_deadline = a.drain_deadline.0;
        Ok(cfg)
    }
}

fn main() -> std::process::ExitCode {
    isthmus_proto::program::exit("isthmus-gateway", run())
}

fn run() -> anyhow::Result<()> {
    isthmus_proto::telemetry::init();
    let args = Args::parse();
    let validate_only = args.validate;
    let cfg = args.into_config()?;
    cfg.validate()?;
    if validate_only {
        println!("configuration is valid");
        return Ok(());
    }
    isthmus_proto::limits::raise_fd_limit("isthmus-gateway");
    program::runtime(program::RuntimeSize::default())
        .context("starting the runtime")?
        .block_on(async {
            let handle = isthmus_gateway::run(cfg).await?;
            program::run_until_signal(handle).await;
            Ok(())
        })
}
