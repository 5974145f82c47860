//! `isthmusctl cert request`: a key generated here, signed by the registry's CA against a
//! bootstrap token (first certificate) or the current certificate (renewal).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use isthmus_proto::certs;
use isthmus_proto::config::parse_duration;
use isthmus_proto::identity::SpiffeId;
use isthmus_proto::tls::Credentials;

use super::connect::{connect, RegistryConn};

#[derive(Debug, Args)]
pub(super) struct RequestArgs {
    #[command(flatten)]
    conn: RegistryConn,
    /// A bootstrap token for a first certificate (else --cert-dir renews the one there).
    #[arg(
        long,
        conflicts_with = "cert_dir",
        required_unless_present = "cert_dir"
    )]
    token: Option<String>,
    /// Directory to write key.pem (0600), cert-chain.pem and root-cert.pem into.
    #[arg(long)]
    out: PathBuf,
    /// Requested lifetime (the CA's default when absent).
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,
}

/// Requests a certificate and writes key.pem, cert-chain.pem and root-cert.pem to --out.
pub(super) async fn request(args: RequestArgs) -> anyhow::Result<()> {
    let RequestArgs {
        conn,
        token,
        out,
        ttl,
    } = args;
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
    Ok(())
}

/// The identity a token is for, read from its claims (the registry does the verifying).
fn identity_in_token(t: &str) -> anyhow::Result<SpiffeId> {
    let claims = isthmus_proto::token::parse(t).context("--token")?.claims;
    claims.identity().context("--token")
}
