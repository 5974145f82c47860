//! `isthmusctl ca init` and `isthmusctl token create`: the mesh CA's files and the one-time
//! bootstrap tokens signed with a cluster's intermediate, both offline.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use isthmus_proto::identity::TrustDomain;
use time::OffsetDateTime;

use crate::ca::{self, init, token, CaMaterial};
use crate::onboard::DEFAULT_TOKEN_TTL;
use isthmus_proto::config::DurationFlag;

#[derive(Debug, Args)]
pub(super) struct InitArgs {
    /// The mesh's trust domain (the `spiffe://` authority of every identity).
    #[arg(long)]
    trust_domain: String,
    /// Repeat for several clusters.
    #[arg(long = "cluster", required = true)]
    clusters: Vec<String>,
    /// Directory for the root and one sub-directory per cluster (Istio's cacerts layout).
    #[arg(long)]
    out: PathBuf,
    /// Replace existing cluster intermediates, keeping the root.
    #[arg(long)]
    rotate: bool,
}

#[derive(Debug, Args)]
pub(super) struct TokenArgs {
    /// The cluster CA directory (DIR/<cluster>) whose registry will redeem the token.
    #[arg(long)]
    ca_dir: PathBuf,
    /// The namespace of the identity the token is for.
    #[arg(long)]
    namespace: String,
    /// The service account of the identity the token is for.
    #[arg(long)]
    service_account: String,
    /// How long the token can be redeemed (at most 24h).
    #[arg(long, default_value_t = DurationFlag(DEFAULT_TOKEN_TTL))]
    ttl: DurationFlag,
}

/// Writes a root (unless one is there) and one intermediate per cluster, and says where.
pub(super) fn init(args: InitArgs, now: OffsetDateTime) -> anyhow::Result<()> {
    let td = TrustDomain::new(&args.trust_domain).context("--trust-domain")?;
    let out = args.out;
    let report = init::init(
        &init::InitOptions {
            trust_domain: td,
            clusters: args.clusters,
            out: out.clone(),
            rotate: args.rotate,
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
    Ok(())
}

/// Prints a token for the cluster the CA directory is named after.
pub(super) fn create_token(args: TokenArgs, now: OffsetDateTime) -> anyhow::Result<()> {
    let material = CaMaterial::load(&args.ca_dir, None)?;
    let cluster = args
        .ca_dir
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_default();
    let ttl: Duration = args.ttl.0;
    let t = token::create(
        &material,
        &cluster,
        &args.namespace,
        &args.service_account,
        ttl,
        now,
    )
    .map_err(|e| match e {
        token::TokenError::TtlTooLong(_) | token::TokenError::TtlTooShort(_) => {
            anyhow::Error::new(e).context("--ttl")
        }
        e => e.into(),
    })?;
    println!("{t}");
    Ok(())
}
