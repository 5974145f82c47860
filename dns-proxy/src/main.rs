//! `isthmus-dns`: parses arguments and runs the DNS proxy until SIGTERM.

use std::net::SocketAddr;

use clap::Parser;
use isthmus_dns::config::{self, Config};
use isthmus_dns::forwarder::UpstreamMode;
use isthmus_proto::config::DurationFlag;
use isthmus_proto::program;
use isthmus_proto::subscription::RegistryFlags;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "The isthmus DNS proxy: mesh names from the catalog, everything else forwarded and cached"
)]
struct Args {
    /// UDP and TCP address to serve DNS on.
    #[arg(long, default_value = config::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Admin HTTP address (/config_dump, /logging, /metrics, /healthz, /readyz): all but
    /// /metrics and health answer loopback peers only; reach it remotely with an ssh tunnel.
    #[arg(long, default_value = config::DEFAULT_ADMIN)]
    admin_addr: SocketAddr,
    /// /metrics alone, for scrapers on the network (Istio's merged-metrics port).
    #[arg(long, default_value = config::DEFAULT_METRICS)]
    metrics_addr: SocketAddr,
    #[command(flatten)]
    registry: RegistryFlags,
    /// This proxy's network (it sees the catalog as this network does).
    #[arg(long, env = "ISTHMUS_NETWORK")]
    network: String,
    /// This proxy's cluster (picks the cluster's VIP of a service).
    #[arg(long, env = "ISTHMUS_CLUSTER", default_value = "")]
    cluster: String,
    /// The namespace short names are relative to.
    #[arg(long, default_value = config::DEFAULT_NAMESPACE)]
    namespace: String,
    /// The clusters' DNS domain (`name.ns.svc.<domain>`).
    #[arg(long, default_value = config::DEFAULT_CLUSTER_DOMAIN)]
    cluster_domain: String,
    /// Upstream resolver (ip:port; repeatable). Default: the nameservers of /etc/resolv.conf.
    #[arg(long = "upstream")]
    upstreams: Vec<SocketAddr>,
    /// sequential (failover in order) or parallel (first answer wins).
    #[arg(long, default_value_t = UpstreamMode::default())]
    upstream_mode: UpstreamMode,
    /// Deadline for one forwarded query, over all upstreams.
    #[arg(long, default_value_t = DurationFlag(config::DEFAULT_QUERY_TIMEOUT))]
    query_timeout: DurationFlag,
    /// TTL of mesh answers.
    #[arg(long, default_value_t = DurationFlag(config::DEFAULT_TTL))]
    ttl: DurationFlag,
    /// Answers from upstream kept in the cache at most.
    #[arg(long, default_value_t = config::DEFAULT_CACHE_ENTRIES)]
    cache_entries: usize,
    /// The longest an upstream answer is cached, whatever its TTL says.
    #[arg(long, default_value_t = DurationFlag(config::DEFAULT_CACHE_MAX_TTL))]
    cache_max_ttl: DurationFlag,
    /// The longest a negative answer (NXDOMAIN, no data) is cached.
    #[arg(long, default_value_t = DurationFlag(config::DEFAULT_NEGATIVE_MAX_TTL))]
    negative_max_ttl: DurationFlag,
    /// Queries waiting on upstreams at once; more are refused.
    #[arg(long, default_value_t = config::DEFAULT_MAX_INFLIGHT)]
    max_inflight: usize,
    /// Of those, how many one client address may hold; more from it are refused.
    #[arg(long, default_value_t = config::DEFAULT_MAX_INFLIGHT_PER_CLIENT)]
    max_inflight_per_client: usize,
    /// DNS-over-TCP clients served at once; when all are taken, the one idle the longest
    /// is closed for a newcomer.
    #[arg(long, default_value_t = config::DEFAULT_MAX_TCP_CONNECTIONS)]
    max_tcp_connections: usize,
    /// Queries a second one client address may send; 0 turns the limit off.
    #[arg(long, default_value_t = config::DEFAULT_CLIENT_RATE)]
    client_rate_limit: u32,
    /// Queries one client may send at once above that rate.
    #[arg(long, default_value_t = config::DEFAULT_CLIENT_BURST)]
    client_burst: u32,
    /// Rate-limit loopback clients too (by default the host's own queries are not limited).
    #[arg(long)]
    rate_limit_loopback: bool,
    /// A client address never rate-limited (repeatable).
    #[arg(long = "rate-limit-exempt")]
    rate_limit_exempt: Vec<std::net::IpAddr>,
    /// Tasks reading the UDP socket (0: one per runtime worker, which is one per core).
    #[arg(long, default_value_t = config::DEFAULT_UDP_WORKERS)]
    udp_workers: usize,
    /// Check the configuration and exit.
    #[arg(long)]
    validate: bool,
}

fn main() -> std::process::ExitCode {
    isthmus_proto::program::exit("isthmus-dns", run())
}

fn run() -> anyhow::Result<()> {
    isthmus_proto::telemetry::init();
    let a = Args::parse();
    let mut cfg = Config::new(&a.network, &a.cluster, a.registry.settings()?);
    cfg.listen = a.listen;
    cfg.admin_addr = Some(a.admin_addr);
    cfg.metrics_addr = Some(a.metrics_addr);
    cfg.namespace = a.namespace;
    cfg.cluster_domain = a.cluster_domain;
    cfg.upstreams = a.upstreams;
    cfg.upstream_mode = a.upstream_mode;
    cfg.query_timeout = a.query_timeout.0;
    cfg.ttl = a.ttl.0;
    cfg.cache_entries = a.cache_entries;
    cfg.cache_max_ttl = a.cache_max_ttl.0;
    cfg.negative_max_ttl = a.negative_max_ttl.0;
    cfg.max_inflight = a.max_inflight;
    cfg.max_inflight_per_client = a.max_inflight_per_client;
    cfg.max_tcp_connections = a.max_tcp_connections;
    cfg.client_rate = a.client_rate_limit;
    cfg.client_burst = a.client_burst;
    cfg.rate_limit_loopback = a.rate_limit_loopback;
    cfg.rate_limit_exempt = a.rate_limit_exempt;
    cfg.udp_workers = a.udp_workers;
    cfg.validate()?;
    if a.validate {
        println!("configuration is valid");
        return Ok(());
    }
    isthmus_proto::limits::raise_fd_limit("isthmus-dns");
    program::runtime(program::RuntimeSize::default())?.block_on(async {
        let handle = isthmus_dns::run(cfg).await?;
        program::run_until_signal(handle).await;
        Ok(())
    })
}
