//! `isthmusctl`: CA setup, bootstrap tokens, certificate requests, VM onboarding bundles,
//! a network's view, the Kubernetes clusters the registry watches, the peered registries it
//! imports from, and who talks to whom (the mesh graph, from the proxies' metrics). This
//! file is the command line and its dispatch; each command is a function in the file named
//! after what it works on ([`ca`], [`cert`], [`vm`], [`catalog`], [`clusters`],
//! [`cluster_secret`], [`peers`], [`graph`]),
//! and [`connect`] is how the commands that talk to a registry reach it.

mod ca;
mod catalog;
mod cert;
mod cluster_secret;
mod clusters;
mod connect;
mod graph;
mod http;
mod peers;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use clusters::COLUMNS as CLUSTER_COLUMNS;

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
    Catalog(catalog::CatalogArgs),
    /// VMs joining the mesh.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Each Kubernetes cluster the registry watches: synced or not, objects per kind, the
    /// age of the last event, staleness, reconnects, errors (its admin's /debug/clusters).
    Clusters(clusters::ClustersArgs),
    /// Kubernetes clusters joining the mesh.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Each registry this one imports from (--peer): connected or stale, the registry of its
    /// set followed, what it brought, the age of its last sync (its admin's /debug/peers).
    Peers(peers::PeersArgs),
    /// Who talks to whom: workloads and services grouped by network and cluster, and
    /// between them connections, bytes, refusals and the transport (direct, sni-gateway, hbone, hbone-gateway),
    /// read from each proxy's /metrics (--metrics); as text, Graphviz DOT or SVG.
    Graph(graph::GraphArgs),
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Install the registry's reader role in a cluster and print a remote-cluster Secret
    /// (Istio's shape) with a token of that role; applied in the registry's own cluster, it
    /// makes the registry watch this one.
    Secret(cluster_secret::SecretArgs),
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// Write the bundle a VM agent starts from into --out: agent.yaml (registry, network,
    /// cluster, group, identity), root-cert.pem, and a one-time bootstrap token (0600).
    Onboard(vm::OnboardArgs),
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Write a root and one intermediate per cluster (Istio's cacerts layout).
    Init(ca::InitArgs),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print a one-time bootstrap token for spiffe://TD/ns/NS/sa/SA.
    Create(ca::TokenArgs),
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Generate a key, have the registry's CA sign it, and write key.pem, cert-chain.pem and
    /// root-cert.pem. Authenticates with --token (first certificate) or --cert-dir (renewal).
    Request(cert::RequestArgs),
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
    isthmus_proto::program::exit("isthmusctl", rt.block_on(run(cli.command)))
}

async fn run(cmd: Command) -> anyhow::Result<()> {
    let now = ::time::OffsetDateTime::now_utc();
    match cmd {
        Command::Ca(CaCommand::Init(args)) => ca::init(args, now),
        Command::Token(TokenCommand::Create(args)) => ca::create_token(args, now),
        Command::Cert(CertCommand::Request(args)) => cert::request(args).await,
        Command::Vm(VmCommand::Onboard(args)) => vm::onboard(args, now),
        Command::Catalog(args) => catalog::show(args).await,
        Command::Clusters(args) => clusters::show(args).await,
        Command::Peers(args) => peers::show(args).await,
        Command::Graph(args) => graph::show(args).await,
        Command::Cluster(ClusterCommand::Secret(args)) => cluster_secret::create(args).await,
    }
}
