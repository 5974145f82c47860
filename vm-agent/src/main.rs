//! `isthmus-vm-agent`: `run` parses arguments and runs the agent until SIGTERM; `sidecar`
//! runs it in a Kubernetes pod and `capture-init` installs that pod's capture; `cleanup`
//! removes every nftables rule the agent added.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use isthmus_dns::resolv_conf::ResolvConf;
use isthmus_proto::config::DurationFlag;
use isthmus_proto::model::Locality;
use isthmus_proto::program;
use isthmus_vm_agent::capture::{self, CapturePlan};
use isthmus_vm_agent::config::{self, AgentConfig, CaptureMode, OutboundListener};
use isthmus_vm_agent::pod::{self, AppProbers, PodConfig};

/// Threads for blocking work (the `nft` command, file writes) at most.
const MAX_BLOCKING_THREADS: usize = 4;
/// Allocator arenas (unless `MALLOC_ARENA_MAX` says otherwise): glibc's default, up to eight
/// per core, gives the workers and blocking threads an arena each, whose free pages stay
/// resident; the agent allocates little on its data path, so arenas buy it nothing.
const MALLOC_ARENAS: usize = 1;

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
    /// Run as a Kubernetes pod's sidecar (as the registry's injector starts it).
    Sidecar(Box<SidecarArgs>),
    /// Install a pod's capture rules and exit (the injected init container, with
    /// NET_ADMIN).
    CaptureInit(Box<CaptureInitArgs>),
    /// Remove every nftables rule the agent added (idempotent; safe after a crash).
    Cleanup,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The onboarding bundle written by `isthmusctl vm onboard` (agent.yaml, root-cert.pem,
    /// token).
    #[arg(long, env = "ISTHMUS_BUNDLE", default_value = config::DEFAULT_BUNDLE_DIR)]
    bundle: PathBuf,
    /// The VM's address as other workloads reach it [default: the source address of the
    /// route towards the registry].
    #[arg(long)]
    address: Option<IpAddr>,
    /// nftables: capture outbound, inbound and DNS; none: explicit listeners only.
    #[arg(long, value_enum, default_value = "nftables")]
    capture: CaptureMode,
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
    /// KEY=VALUE added to the group template's labels (repeatable).
    #[arg(long = "label", value_parser = config::parse_label)]
    labels: Vec<(String, String)>,
    /// region/zone/subzone of this VM.
    #[arg(long, default_value = "")]
    locality: String,
    /// The mark on the agent's own sockets, which capture lets pass.
    #[arg(long, default_value_t = config::DEFAULT_MARK, value_parser = mark)]
    mark: u32,
    /// Check the configuration and the bundle, then exit (nothing is sent).
    #[arg(long)]
    validate: bool,
    #[command(flatten)]
    common: CommonArgs,
}

/// A pod's sidecar, as the registry's injector starts it: who the pod is comes from the
/// downward API in the environment.
#[derive(Debug, clap::Args)]
struct SidecarArgs {
    /// The registry's gRPC address; for a set of registries several, comma-separated, or a
    /// name that resolves to each.
    #[arg(long, env = "ISTHMUS_REGISTRY")]
    registry: String,
    /// The pod's cluster (as the registry names it).
    #[arg(long, env = "ISTHMUS_CLUSTER")]
    cluster: String,
    /// The pod's network.
    #[arg(long, env = "ISTHMUS_NETWORK")]
    network: String,
    /// The pod's name (metadata.name).
    #[arg(long, env = "POD_NAME")]
    pod_name: String,
    /// The pod's namespace (metadata.namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    pod_namespace: String,
    /// The pod's service account: its identity is
    /// spiffe://<trust domain>/ns/<namespace>/sa/<service account>.
    #[arg(long, env = "SERVICE_ACCOUNT")]
    service_account: String,
    /// The pod's IP (status.podIP).
    #[arg(long, env = "INSTANCE_IP")]
    address: IpAddr,
    /// The projected service-account token whose audience is the CA's.
    #[arg(long, env = "ISTHMUS_TOKEN", default_value = pod::DEFAULT_TOKEN_PATH)]
    token: PathBuf,
    /// The directory of the mounted `isthmus-ca-root-cert` ConfigMap (root-cert.pem).
    #[arg(long, env = "ISTHMUS_ROOT_DIR", default_value = pod::DEFAULT_ROOT_DIR)]
    root_dir: PathBuf,
    /// The mesh's trust domain [default: the one the root names].
    #[arg(long, env = "ISTHMUS_TRUST_DOMAIN")]
    trust_domain: Option<String>,
    /// The app's probes the injector rewrote to the health port, as JSON.
    #[arg(long, env = "ISTHMUS_APP_PROBERS", default_value = "")]
    app_probers: String,
    #[command(flatten)]
    common: CommonArgs,
}

/// A pod's init step: installs the capture rules once, with the sidecar's uid exempt.
#[derive(Debug, clap::Args)]
struct CaptureInitArgs {
    /// The sidecar's uid: its own connections are never captured.
    #[arg(long, default_value_t = pod::SIDECAR_UID)]
    uid: u32,
    /// The sidecar's inbound mTLS listener: captured inbound TCP goes there.
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// The sidecar's outbound listener (on loopback): captured outbound TCP goes there.
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    /// The sidecar's DNS proxy (on loopback): captured DNS goes there.
    #[arg(long, default_value_t = 15053)]
    dns_port: u16,
    /// Outbound destinations captured: the mesh's VIP range and the cluster's service CIDR
    /// (comma-separated; a connection to an address there that the catalog does not know
    /// is passed through).
    #[arg(long, default_value = pod::DEFAULT_CAPTURE_CIDRS, value_parser = parse_cidrs)]
    capture_cidr: Cidrs,
    /// Inbound ports never captured (comma-separated; the sidecar's health and metrics
    /// ports always).
    #[arg(long, default_value = pod::DEFAULT_POD_EXCLUDED_INBOUND, value_parser = config::parse_ports)]
    exclude_inbound_ports: std::vec::Vec<u16>,
    /// Outbound ports never captured (comma-separated).
    #[arg(long, default_value = "", value_parser = config::parse_ports)]
    exclude_outbound_ports: std::vec::Vec<u16>,
    /// The resolver configuration whose nameservers' DNS is captured.
    #[arg(long, default_value = config::DEFAULT_RESOLV_CONF)]
    resolv_conf: PathBuf,
}

type Cidrs = std::vec::Vec<capture::Cidr>;

fn parse_cidrs(s: &str) -> Result<Cidrs, String> {
    capture::parse_cidrs(s)
}

/// What a VM's agent and a pod's sidecar both take.
#[derive(Debug, clap::Args)]
struct CommonArgs {
    /// Where the agent keeps its key, certificates and last catalog snapshot.
    #[arg(long, env = "ISTHMUS_STATE_DIR", default_value = config::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Inbound mTLS listener (captured connections to the app's ports land here).
    #[arg(long, default_value = config::DEFAULT_INBOUND_ADDR)]
    inbound_addr: SocketAddr,
    /// Outbound capture listener.
    #[arg(long, default_value = config::DEFAULT_OUTBOUND_ADDR)]
    outbound_addr: SocketAddr,
    /// The embedded DNS proxy.
    #[arg(long, default_value = config::DEFAULT_DNS_ADDR)]
    dns_addr: SocketAddr,
    /// Admin HTTP (/config_dump, /logging, /debug/connections, /debug/tunnels, /metrics): all but
    /// /metrics, /healthz and /readyz answer loopback peers only; reach it remotely with an
    /// ssh tunnel or kubectl port-forward.
    #[arg(long, default_value = config::DEFAULT_ADMIN_ADDR)]
    admin_addr: SocketAddr,
    /// /metrics alone, for scrapers on the network (Istio's merged-metrics port).
    #[arg(long, default_value = config::DEFAULT_METRICS_ADDR)]
    metrics_addr: SocketAddr,
    /// Health HTTP (/healthz/ready; in a pod also the app's probes, /app-health/...).
    #[arg(long, default_value = config::DEFAULT_HEALTH_ADDR)]
    health_addr: SocketAddr,
    /// Where the app listens, as the inbound reaches it.
    #[arg(long, default_value = "127.0.0.1")]
    app_host: IpAddr,
    /// The inbound policy file: who may connect (allow/deny by principal and namespace),
    /// quotas on each caller's connections and injected faults (see the README's traffic
    /// management).
    #[arg(long)]
    authz_policy: Option<PathBuf>,
    /// The resolver configuration whose nameservers are forwarded to (on a VM also
    /// captured).
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
    /// The tunnel listener's port on the workload's address (HBONE: HTTP/2 CONNECT over
    /// mTLS, as Istio ambient's ztunnel). Mesh connections to workloads whose proxy accepts
    /// tunnels go over one pooled tunnel per peer; 0 turns tunnels off both ways.
    #[arg(long, default_value_t = isthmus_proxy::tunnel::DEFAULT_PORT)]
    tunnel_port: u16,
    /// The tunnels' transports: `auto` races QUIC (the tunnel port over UDP) against
    /// HTTP/2 for each new tunnel, QUIC preferred, and listens for both; `quic` or `h2`
    /// takes one alone (with `h2` no QUIC listener is started).
    #[arg(long, default_value = "auto", value_parser = clap::builder::ValueParser::new(|s: &str| s.parse::<isthmus_proxy::tunnel::pool::Transports>()))]
    tunnel_transports: isthmus_proxy::tunnel::pool::Transports,
    /// Runtime worker threads: 1 runs every task on one thread (the least CPU per
    /// connection); more spread connections over that many cores.
    #[arg(long, default_value_t = config::DEFAULT_WORKER_THREADS)]
    worker_threads: usize,
}

impl CommonArgs {
    fn apply(self, cfg: &mut AgentConfig) {
        cfg.inbound_addr = self.inbound_addr;
        cfg.outbound_addr = self.outbound_addr;
        cfg.dns_addr = self.dns_addr;
        cfg.admin_addr = Some(self.admin_addr);
        cfg.metrics_addr = Some(self.metrics_addr);
        cfg.health_addr = Some(self.health_addr);
        cfg.app_host = self.app_host;
        cfg.authz_policy = self.authz_policy;
        cfg.resolv_conf = self.resolv_conf;
        cfg.drain_deadline = self.drain_deadline.into();
        cfg.connect_timeout = self.connect_timeout.into();
        cfg.handshake_timeout = self.handshake_timeout.into();
        cfg.max_connections = self.max_connections;
        cfg.tunnel_port = self.tunnel_port;
        cfg.tunnel_transports = self.tunnel_transports;
    }
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

fn main() -> std::process::ExitCode {
    isthmus_proto::program::exit("isthmus-vm-agent", run())
}

fn run() -> anyhow::Result<()> {
    isthmus_proto::telemetry::init();
    let cli = Cli::parse();
    let (cfg, worker_threads, validate) = match cli.command {
        Command::Cleanup => {
            match capture::cleanup()? {
                true => println!("removed the nftables table inet {}", capture::TABLE),
                false => println!("no capture rules to remove"),
            }
            return Ok(());
        }
        Command::CaptureInit(a) => return capture_init(*a),
        Command::Run(a) => {
            let a = *a;
            let mut cfg = AgentConfig::new(&a.bundle, &a.common.state_dir);
            cfg.address = a.address;
            cfg.capture = a.capture;
            cfg.exclude_inbound_ports = a.exclude_inbound_ports;
            cfg.exclude_outbound_ports = a.exclude_outbound_ports;
            cfg.outbound_listeners = a.outbound_listeners;
            cfg.labels = a.labels.into_iter().collect();
            cfg.locality = Locality::parse(&a.locality);
            cfg.mark = a.mark;
            let workers = a.common.worker_threads;
            a.common.apply(&mut cfg);
            (cfg, workers, a.validate)
        }
        Command::Sidecar(a) => {
            let a = *a;
            let mut cfg = AgentConfig::new(&a.root_dir, &a.common.state_dir);
            cfg.address = Some(a.address);
            cfg.capture = CaptureMode::Preinstalled;
            cfg.pod = Some(PodConfig {
                registry: a.registry,
                cluster: a.cluster,
                network: a.network,
                namespace: a.pod_namespace,
                name: a.pod_name,
                service_account: a.service_account,
                token_path: a.token,
                trust_domain: a.trust_domain,
                app_probers: AppProbers::parse(&a.app_probers)
                    .map_err(|e| anyhow::anyhow!("ISTHMUS_APP_PROBERS (--app-probers): {e}"))?,
            });
            let workers = a.common.worker_threads;
            a.common.apply(&mut cfg);
            (cfg, workers, false)
        }
    };
    cfg.validate()?;
    if validate {
        isthmus_proto::bundle::AgentBundle::load(&cfg.bundle_dir)?;
        println!("configuration and bundle are valid");
        return Ok(());
    }
    isthmus_proto::allocator::limit_arenas(MALLOC_ARENAS);
    // The blocking pool is bounded: `nft` runs there (see ARCHITECTURE.md), and a slow
    // nftables must never take more than a few threads.
    isthmus_proto::limits::raise_fd_limit("isthmus-vm-agent");
    let rt = program::runtime(program::RuntimeSize {
        worker_threads: Some(worker_threads),
        max_blocking_threads: Some(MAX_BLOCKING_THREADS),
    })?;
    rt.block_on(async {
        let handle = isthmus_vm_agent::run(cfg).await?;
        program::run_until_signal(handle).await;
        Ok(())
    })
}

/// Installs a pod's capture: every inbound TCP port but the excluded ones to the inbound
/// listener, DNS to the resolv.conf's servers to the DNS proxy, outbound TCP to the given
/// ranges to the outbound listener; the sidecar's uid exempt. Replaces an earlier
/// installation (an init container re-run after a pod restart).
fn capture_init(a: CaptureInitArgs) -> anyhow::Result<()> {
    // The sidecar's health and metrics ports are never captured: the kubelet and scrapers
    // reach them in plain text.
    let mut exclude_inbound = a.exclude_inbound_ports;
    exclude_inbound.extend(
        config::parse_ports(pod::DEFAULT_POD_EXCLUDED_INBOUND).map_err(anyhow::Error::msg)?,
    );
    exclude_inbound.sort_unstable();
    exclude_inbound.dedup();
    let plan = CapturePlan {
        outbound_port: a.outbound_port,
        inbound_port: a.inbound_port,
        dns_port: a.dns_port,
        mark: config::DEFAULT_MARK,
        inbound_ports: Vec::new(),
        inbound_all: true,
        exclude_inbound_ports: exclude_inbound,
        exclude_outbound_ports: a.exclude_outbound_ports,
        dns_servers: ResolvConf::read(&a.resolv_conf).addresses(),
        exempt_uid: Some(a.uid),
    };
    capture::install(&plan)?;
    capture::set_ranges(&a.capture_cidr)?;
    println!(
        "capture installed (nft list table inet {}): inbound TCP except ports {:?} to :{}; \
         outbound TCP to {} to :{}; DNS to {:?} to :{}; uid {} exempt",
        capture::TABLE,
        plan.exclude_inbound_ports,
        plan.inbound_port,
        a.capture_cidr
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        plan.outbound_port,
        plan.dns_servers,
        plan.dns_port,
        a.uid
    );
    Ok(())
}
