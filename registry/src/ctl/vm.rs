//! `isthmusctl vm onboard`: the bundle a VM agent starts from, and what to do with it next.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use isthmus_proto::identity::TrustDomain;
use time::OffsetDateTime;

use crate::onboard::{self, OnboardOptions, DEFAULT_TOKEN_TTL};
use isthmus_proto::config::DurationFlag;

#[derive(Debug, Args)]
pub(super) struct OnboardArgs {
    /// The registry's gRPC address (host:port), as the VM reaches it; for a set of
    /// registries several, comma-separated, or a name that resolves to each.
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
    /// Directory to write the bundle into (agent.yaml, root-cert.pem, token).
    #[arg(long)]
    out: PathBuf,
    /// Lifetime of the bootstrap token (at most 24h).
    #[arg(long, default_value_t = DurationFlag(DEFAULT_TOKEN_TTL))]
    token_ttl: DurationFlag,
    /// The trust domain; by default the CA's.
    #[arg(long)]
    trust_domain: Option<String>,
}

/// Writes the bundle into --out and says what each file is and what to do next.
pub(super) fn onboard(args: OnboardArgs, now: OffsetDateTime) -> anyhow::Result<()> {
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
            token_ttl: args.token_ttl.0,
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
    Ok(())
}
