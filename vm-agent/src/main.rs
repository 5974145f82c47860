//! `isthmus-vm-agent`: `run` parses arguments and runs the agent until SIGTERM; `cleanup`
//! removes every nftables rule the agent added.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use isthmus_proto::config::DurationFlag;
use isthmus_proto::model::Locality;
use isthmus_proto::program;
use isthmus_vm_agent::config::{self, AgentConfig, CaptureMode, OutboundListener};

/// Threads for blocking work (the `nft` command, file writes) at most.
const MAX_BLOCKING_THREADS: usize = 4;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "The isthmus VM agent: mesh identity, registration, health, traffic capture and DNS for one VM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent until SIGTERM (under systemd: Type=notify).
    Run(Box<RunArgs>),
    /// Remove every nftables rule the agent added (idempotent; safe after a crash).
    Cleanup,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The onboarding bundle written by `isthmusctl vm onboard` (agent.yaml, root-cert.pem,
    /// token).
    #[arg(long, env = "ISTHMUS_BUNDLE", default_value = config::DEFAULT_BUNDLE_DIR)]
    bundle: PathBuf,
    /// Where the agent keeps its key, certificates and last catalog snapshot.
    #[arg(long, env = "ISTHMUS_STATE_DIR", default_value = config::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// The VM's address as other workloads reach it [default: the source address of the
    /// route towards the registry].
    #[arg(long)]
    address: Option<IpAddr>,
    /// nftables: capture outbound, inbound and DNS; none: explicit listeners only.
    #[arg(long, value_enum, default_value = "nftables")]
    capture: CaptureMode,
    /// Inbound mTLS listener (captured connections to the app's ports land here).
    #[arg(long, default_value = config::DEFAULT_INBOUND_ADDR)]
    inbound_addr: SocketAddr,
    /// Outbound capture listener.
    #[arg(long, default_value = config::DEFAULT_OUTBOUND_ADDR)]
    outbound_addr: SocketAddr,
    /// The embedded DNS proxy.
    #[arg(long, default_value = config::DEFAULT_DNS_ADDR)]
    dns_addr: SocketAddr,
    /// Admin HTTP (/metrics, /config_dump, /logging, /debug/connections).
    #[arg(long, default_value = config::DEFAULT_ADMIN_ADDR)]
    admin_addr: SocketAddr,
    /// Health HTTP (/healthz/ready).
    #[arg(long, default_value = config::DEFAULT_HEALTH_ADDR)]
    health_addr: SocketAddr,
    /// Inbound ports never captured (comma-separated).
    #[arg(long, default_value = "22", value_parser = config::parse_ports)]
    exclude_inbound_ports: std::vec::Vec<u16>,
    /// Outbound ports never captured (comma-separated).
    #[arg(long, default_value = "22", value_parser = config::parse_ports)]
    exclude_outbound_ports: std::vec::Vec<u16>,
    /// LISTEN=HOST:PORT: plaintext from the app on LISTEN carried as mTLS to the service
    /// HOST:PORT (for --capture none; repeatable).
    #[arg(long = "outbound-listener", value_parser = OutboundListener::parse)]
    outbound_listeners: Vec<OutboundListener>,
    /// Where the app listens, as the inbound reaches it.
    #[arg(long, default_value = "127.0.0.1")]
    app_host: IpAddr,
    /// An authorization policy file (allow/deny by principal and namespace).
    #[arg(long)]
    authz_policy: Option<PathBuf>,
    /// KEY=VALUE added to the group template's labels (repeatable).
    #[arg(long = "label", value_parser = config::parse_label)]
    labels: Vec<(String, String)>,
    /// region/zone/subzone of this VM.
    #[arg(long, default_value = "")]
    locality: String,
    /// The resolver configuration whose nameservers are captured and forwarded to.
    #[arg(long, default_value = config::DEFAULT_RESOLV_CONF)]
    resolv_conf: PathBuf,
    /// Time open connections get to finish after SIGTERM.
    #[arg(long, default_value_t = DurationFlag(config::DEFAULT_DRAIN_DEADLINE))]
    drain_deadline: DurationFlag,
    /// Time to connect to one endpoint (or the local app) before trying another.
    #[arg(long, default_value_t = DurationFlag(config::DEFAULT_CONNECT_TIMEOUT))]
    connect_timeout: DurationFlag,
    /// Time a peer has to complete its TLS handshake with the inbound listener.
    #[arg(long, default_value_t = DurationFlag(config::DEFAULT_HANDSHAKE_TIMEOUT))]
    handshake_timeout: DurationFlag,
    /// Connections each listener holds at once; more wait in the listen backlog.
    #[arg(long, default_value_t = config::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// The mark on the agent's own sockets, which capture lets pass.
    #[arg(long, default_value_t = config::DEFAULT_MARK, value_parser = mark)]
    mark: u32,
    /// Runtime worker threads (a VM agent needs few).
    #[arg(long, default_value_t = config::DEFAULT_WORKER_THREADS)]
    worker_threads: usize,
    /// Check the configuration and the bundle, then exit (nothing is sent).
    #[arg(long)]
    validate: bool,
}

fn mark(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed
        .ok()
        .filter(|m| *m != 0)
        .ok_or_else(|| format!("{s:?} is not a non-zero mark (decimal or 0x hex)"))
}

fn main() -> anyhow::Result<()> {
    isthmus_proto::telemetry::init();
    let cli = Cli::parse();
    let a = match cli.command {
        Command::Cleanup => {
            match isthmus_vm_agent::capture::cleanup()? {
                true => println!(
                    "removed the nftables table inet {}",
                    isthmus_vm_agent::capture::TABLE
                ),
                false => println!("no capture rules to remove"),
            }
            return Ok(());
        }
        Command::Run(a) => *a,
    };
    let mut cfg = AgentConfig::new(&a.bundle, &a.state_dir);
    cfg.address = a.address;
    cfg.capture = a.capture;
    cfg.inbound_addr = a.inbound_addr;
    cfg.outbound_addr = a.outbound_addr;
    cfg.dns_addr = a.dns_addr;
    cfg.admin_addr = Some(a.admin_addr);
    cfg.health_addr = Some(a.health_addr);
    cfg.exclude_inbound_ports = a.exclude_inbound_ports;
    cfg.exclude_outbound_ports = a.exclude_outbound_ports;
    cfg.outbound_listeners = a.outbound_listeners;
    cfg.app_host = a.app_host;
    cfg.authz_policy = a.authz_policy;
    cfg.labels = a.labels.into_iter().collect();
    cfg.locality = Locality::parse(&a.locality);
    cfg.resolv_conf = a.resolv_conf;
    cfg.drain_deadline = a.drain_deadline.into();
    cfg.connect_timeout = a.connect_timeout.into();
    cfg.handshake_timeout = a.handshake_timeout.into();
    cfg.max_connections = a.max_connections;
    cfg.mark = a.mark;
    cfg.validate()?;
    if a.validate {
        isthmus_proto::bundle::AgentBundle::load(&cfg.bundle_dir)?;
        println!("configuration and bundle are valid");
        return Ok(());
    }
    // The blocking pool is bounded: `nft` runs there (see ARCHITECTURE.md), and a slow
    // nftables must never take more than a few threads.
    let rt = program::runtime(program::RuntimeSize {
        worker_threads: Some(a.worker_threads),
        max_blocking_threads: Some(MAX_BLOCKING_THREADS),
    })?;
    rt.block_on(async {
        let handle = isthmus_vm_agent::run(cfg).await?;
        program::run_until_signal(handle).await;
        Ok(())
    })
}
