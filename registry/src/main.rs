//! `isthmus-registry`: parses flags and runs the registry (see `app.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use isthmus_proto::config::parse_duration;
use isthmus_proto::TrustDomain;
use isthmus_registry::app::{self, RegistryConfig, DEFAULT_ADMIN_ADDR, DEFAULT_GRPC_ADDR};

/// The isthmus control plane: catalog, per-network views, Watch and the mesh CA.
#[derive(Debug, Parser)]
#[command(name = "isthmus-registry", version)]
struct Args {
    /// This registry's cluster (a DNS label); resources without one belong to it.
    #[arg(long, env = "ISTHMUS_CLUSTER")]
    cluster: String,
    /// This registry's network; workloads without one are on it.
    #[arg(long, env = "ISTHMUS_NETWORK")]
    network: String,
    /// The cluster's CA directory (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem),
    /// as written by `isthmusctl ca init`; reloaded when the files change.
    #[arg(long, env = "ISTHMUS_CA_DIR")]
    ca_dir: PathBuf,
    /// Where the embedded store keeps its file.
    #[arg(
        long,
        env = "ISTHMUS_DATA_DIR",
        default_value = "/var/lib/isthmus-registry"
    )]
    data_dir: PathBuf,
    /// A directory of ServiceEntry / WorkloadEntry / WorkloadGroup / Network YAML files,
    /// watched for changes.
    #[arg(long, env = "ISTHMUS_RESOURCES")]
    resources: Option<PathBuf>,
    /// The trust domain; by default read from the CA certificate's spiffe:// URI SAN.
    #[arg(long, env = "ISTHMUS_TRUST_DOMAIN")]
    trust_domain: Option<String>,
    #[arg(long, default_value = DEFAULT_GRPC_ADDR)]
    grpc_addr: SocketAddr,
    #[arg(long, default_value = DEFAULT_ADMIN_ADDR)]
    admin_addr: SocketAddr,
    /// Default leaf certificate lifetime.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cert_ttl: std::time::Duration,
    /// Longest leaf certificate lifetime a caller may ask for.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    max_cert_ttl: std::time::Duration,
    /// How often the resources directory is re-read.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    resource_poll: std::time::Duration,
    /// How long a deleted service's VIPs stay reserved for it before another may get them.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    vip_grace: std::time::Duration,
    /// How long a registered VM's entry stays (unhealthy) after its agent's stream ended
    /// without deregistering, for the agent to reconnect.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    vm_grace: std::time::Duration,
    /// Check the configuration and the resource files, print every problem, and exit.
    #[arg(long)]
    validate: bool,
}

fn main() -> ExitCode {
    isthmus_proto::telemetry::init();
    let args = Args::parse();
    let mut cfg = RegistryConfig::new(&args.cluster, &args.network, args.ca_dir, args.data_dir);
    let mut errors = Vec::new();
    if let Some(td) = &args.trust_domain {
        match TrustDomain::new(td) {
            Ok(td) => cfg.trust_domain = Some(td),
            Err(e) => errors.push(format!("--trust-domain: {e}")),
        }
    }
    cfg.resources = args.resources;
    cfg.grpc_addr = args.grpc_addr;
    cfg.admin_addr = args.admin_addr;
    cfg.ca_policy.default_ttl = args.cert_ttl;
    cfg.ca_policy.max_ttl = args.max_cert_ttl;
    cfg.resource_poll = args.resource_poll;
    cfg.vip_grace = args.vip_grace;
    cfg.vm_grace = args.vm_grace;
    if let Err(e) = cfg.validate() {
        errors.extend(e);
    }
    if args.validate {
        match app::validate_resources(&cfg) {
            Ok(n) if errors.is_empty() => {
                println!("configuration is valid; {n} resources");
                return ExitCode::SUCCESS;
            }
            Ok(_) => {}
            Err(e) => errors.extend(e),
        }
    }
    if !errors.is_empty() {
        eprintln!("isthmus-registry: invalid configuration:");
        for e in &errors {
            eprintln!("  {e}");
        }
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("isthmus-registry: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        match app::run(cfg).await {
            Ok(handle) => {
                handle.run_until_signal().await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("isthmus-registry: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}
