//! `isthmusctl`: CA setup, bootstrap tokens, certificate requests, VM onboarding bundles,
//! and a network's view.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use isthmus_proto::config::parse_duration;
use isthmus_proto::identity::{SpiffeId, TrustDomain};
use isthmus_proto::model::{Node, NodeKind};
use isthmus_proto::subscription::Subscription;
use isthmus_proto::tls::{self, Credentials, ServerIdentity, TrustBundle};
use isthmus_proto::{certs, grpc};

use crate::ca::{self, init, token, CaMaterial};
use crate::onboard::{self, OnboardOptions};
use crate::render;

#[derive(Debug, Parser)]
#[command(name = "isthmusctl", version, about = "Operate an isthmus mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mesh CA files.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Bootstrap tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Workload certificates.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Print the view a subscriber in a network gets.
    Catalog(CatalogArgs),
    /// VMs joining the mesh.
    #[command(subcommand)]
    Vm(VmCommand),
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// Write the bundle a VM agent starts from into --out: agent.yaml (registry, network,
    /// cluster, group, identity), root-cert.pem, and a one-time bootstrap token (0600).
    Onboard(OnboardArgs),
}

#[derive(Debug, Args)]
struct OnboardArgs {
    /// The registry's gRPC address (host:port), as the VM reaches it.
    #[arg(long)]
    registry: String,
    /// The cluster CA directory (DIR/<cluster>) whose registry the VM joins.
    #[arg(long)]
    ca_dir: PathBuf,
    /// The WorkloadGroup the VM registers from.
    #[arg(long)]
    group: String,
    /// The group's namespace.
    #[arg(long)]
    namespace: String,
    /// The group template's service account: the VM's identity.
    #[arg(long)]
    service_account: String,
    /// The VM's network.
    #[arg(long)]
    network: String,
    #[arg(long)]
    out: PathBuf,
    /// Lifetime of the bootstrap token (at most 24h).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    token_ttl: Duration,
    /// The trust domain; by default the CA's.
    #[arg(long)]
    trust_domain: Option<String>,
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Write a root and one intermediate per cluster (Istio's cacerts layout).
    Init {
        #[arg(long)]
        trust_domain: String,
        /// Repeat for several clusters.
        #[arg(long = "cluster", required = true)]
        clusters: Vec<String>,
        #[arg(long)]
        out: PathBuf,
        /// Replace existing cluster intermediates, keeping the root.
        #[arg(long)]
        rotate: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print a one-time bootstrap token for spiffe://TD/ns/NS/sa/SA.
    Create {
        /// The cluster CA directory (DIR/<cluster>) whose registry will redeem the token.
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        service_account: String,
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
    },
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Generate a key, have the registry's CA sign it, and write key.pem, cert-chain.pem and
    /// root-cert.pem. Authenticates with --token (first certificate) or --cert-dir (renewal).
    Request {
        #[command(flatten)]
        conn: RegistryConn,
        #[arg(
            long,
            conflicts_with = "cert_dir",
            required_unless_present = "cert_dir"
        )]
        token: Option<String>,
        #[arg(long)]
        out: PathBuf,
        /// Requested lifetime (the CA's default when absent).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
}

#[derive(Debug, Args)]
struct RegistryConn {
    /// The registry's gRPC address (host:port).
    #[arg(long)]
    registry: String,
    /// The mesh root certificate.
    #[arg(long)]
    root: PathBuf,
    /// A credential directory (key.pem, cert-chain.pem) to authenticate with.
    #[arg(long)]
    cert_dir: Option<PathBuf>,
    /// The trust domain; by default read from the root certificate.
    #[arg(long)]
    trust_domain: Option<String>,
}

#[derive(Debug, Args)]
struct CatalogArgs {
    #[command(flatten)]
    conn: RegistryConn,
    #[arg(long)]
    network: String,
    /// Whose view: a workload's (split horizon) or a gateway's (local endpoints only).
    #[arg(long, default_value = "workload")]
    kind: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("isthmusctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("isthmusctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Command) -> anyhow::Result<()> {
    let now = ::time::OffsetDateTime::now_utc();
    match cmd {
        Command::Ca(CaCommand::Init {
            trust_domain,
            clusters,
            out,
            rotate,
        }) => {
            let td = TrustDomain::new(&trust_domain).context("--trust-domain")?;
            let report = init::init(
                &init::InitOptions {
                    trust_domain: td,
                    clusters,
                    out: out.clone(),
                    rotate,
                },
                now,
            )?;
            if report.root_created {
                println!("root CA: {}", out.join(ca::ROOT_CERT_FILE).display());
            } else {
                println!("root CA (kept): {}", out.join(ca::ROOT_CERT_FILE).display());
            }
            for d in report.cluster_dirs {
                println!("intermediate: {}", d.display());
            }
        }
        Command::Token(TokenCommand::Create {
            ca_dir,
            namespace,
            service_account,
            ttl,
        }) => {
            let material = CaMaterial::load(&ca_dir, None)?;
            let cluster = ca_dir
                .file_name()
                .map(|f| f.to_string_lossy().to_string())
                .unwrap_or_default();
            let t = token::create(&material, &cluster, &namespace, &service_account, ttl, now)?;
            println!("{t}");
        }
        Command::Cert(CertCommand::Request {
            conn,
            token,
            out,
            ttl,
        }) => {
            let (identity, creds) = match (&token, &conn.cert_dir) {
                (Some(t), _) => (identity_in_token(t)?, None),
                (None, Some(dir)) => {
                    let c = Credentials::from_dir(dir)
                        .with_context(|| format!("--cert-dir {}", dir.display()))?;
                    (c.identity.clone(), Some(c))
                }
                (None, None) => bail!("pass --token (first certificate) or --cert-dir (renewal)"),
            };
            let channel = connect(&conn, creds.as_ref()).await?;
            let (key_pem, csr_pem) = certs::generate_key_and_csr(&identity)?;
            let issued = certs::request_certificate(
                channel,
                csr_pem,
                token,
                ttl.map(|d| d.as_secs()).unwrap_or(0),
            )
            .await?;
            certs::write_credentials(&out, &key_pem, &issued.chain_pems, &issued.root_pem)?;
            let c = Credentials::from_dir(&out)?;
            let (left, _) = c.leaf_validity()?;
            println!(
                "{} -> {} (valid for {}h)",
                c.identity,
                out.display(),
                left / 3600
            );
        }
        Command::Vm(VmCommand::Onboard(args)) => {
            let trust_domain = args
                .trust_domain
                .as_deref()
                .map(TrustDomain::new)
                .transpose()
                .context("--trust-domain")?;
            let done = onboard::onboard(
                &OnboardOptions {
                    registry: args.registry,
                    ca_dir: args.ca_dir,
                    group: args.group,
                    namespace: args.namespace,
                    service_account: args.service_account,
                    network: args.network,
                    out: args.out.clone(),
                    token_ttl: args.token_ttl,
                    trust_domain,
                },
                now,
            )?;
            let b = &done.bundle;
            let expires = done
                .token_expires
                .format(&::time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            let [config, root, token] = &done.files[..] else {
                bail!("the bundle was written incompletely");
            };
            println!(
                "wrote {}: registers into WorkloadGroup {}/{} as {} on network {}, through the registry at {} (cluster {})",
                config.display(),
                b.namespace,
                b.group,
                done.identity,
                b.network,
                b.registry,
                b.cluster
            );
            println!("wrote {}: the mesh root certificate", root.display());
            println!(
                "wrote {}: a one-time bootstrap token (mode 0600), valid until {expires}",
                token.display()
            );
            println!(
                "next: copy {dir} to the VM keeping the token private (e.g. `scp -rp {dir} VM:/etc/isthmus`) and start isthmus-vm-agent with it before {expires}; WorkloadGroup {}/{} must be in the registry's resources",
                b.namespace,
                b.group,
                dir = args.out.display()
            );
        }
        Command::Catalog(args) => {
            let kind = NodeKind::parse(&args.kind)
                .with_context(|| format!("--kind {:?}: use workload or gateway", args.kind))?;
            let Some(dir) = &args.conn.cert_dir else {
                bail!("--cert-dir is required: the registry only serves views over mTLS");
            };
            let creds = Credentials::from_dir(dir)
                .with_context(|| format!("--cert-dir {}", dir.display()))?;
            let channel = connect(&args.conn, Some(&creds)).await?;
            let node = Node {
                id: format!("isthmusctl-{}", std::process::id()),
                kind,
                network: args.network.clone(),
                ..Default::default()
            };
            let mut sub = Subscription::open(channel, &node, None).await?;
            tokio::time::timeout(Duration::from_secs(30), sub.next())
                .await
                .context("no snapshot from the registry within 30s")??;
            let resources: Vec<_> = sub.view.resources.values().cloned().collect();
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&render::view_json(
                        &args.network,
                        &sub.view.version,
                        &resources
                    ))?
                );
            } else {
                print!(
                    "{}",
                    render::view_table(&args.network, &sub.view.version, &resources)
                );
            }
        }
    }
    Ok(())
}

/// The identity a token is for, read from its claims (the registry does the verifying).
fn identity_in_token(t: &str) -> anyhow::Result<SpiffeId> {
    let claims = isthmus_proto::token::parse(t).context("--token")?.claims;
    claims.identity().context("--token")
}

fn trust_domain_for(conn: &RegistryConn, root: &Path) -> anyhow::Result<String> {
    if let Some(td) = &conn.trust_domain {
        return Ok(TrustDomain::new(td)?.to_string());
    }
    let certs = tls::read_certs(root)?;
    ca::trust_domain_of_ca(&certs[0]).with_context(|| {
        format!(
            "{} carries no spiffe:// trust domain; pass --trust-domain",
            root.display()
        )
    })
}

async fn connect(
    conn: &RegistryConn,
    creds: Option<&Credentials>,
) -> anyhow::Result<tonic::transport::Channel> {
    let td = trust_domain_for(conn, &conn.root)?;
    let bundle = TrustBundle::from_pem_file(&conn.root, &td)
        .with_context(|| format!("--root {}", conn.root.display()))?;
    let cfg = tls::client_config(creds, &bundle, ServerIdentity::TrustDomain, &[tls::ALPN_H2])?;
    Ok(grpc::connect(&conn.registry, Arc::new(cfg)).await?)
}
