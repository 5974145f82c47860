//! How `isthmusctl` reaches a registry: the flags that name it and the root to trust, and an
//! mTLS (or, for a bootstrap token, server-authenticated) gRPC channel.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use isthmus_proto::grpc;
use isthmus_proto::identity::TrustDomain;
use isthmus_proto::tls::{self, Credentials, ServerIdentity, TrustBundle};

use crate::ca;

#[derive(Debug, Args)]
pub(super) struct RegistryConn {
    /// The registry's gRPC address (host:port); for a set of registries several,
    /// comma-separated (the first that answers is used).
    #[arg(long)]
    pub registry: String,
    /// The mesh root certificate.
    #[arg(long)]
    pub root: PathBuf,
    /// A credential directory (key.pem, cert-chain.pem) to authenticate with.
    #[arg(long)]
    pub cert_dir: Option<PathBuf>,
    /// The trust domain; by default read from the root certificate.
    #[arg(long)]
    pub trust_domain: Option<String>,
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

pub(super) async fn connect(
    conn: &RegistryConn,
    creds: Option<&Credentials>,
) -> anyhow::Result<tonic::transport::Channel> {
    let td = trust_domain_for(conn, &conn.root)?;
    let bundle = TrustBundle::from_pem_file(&conn.root, &td)
        .with_context(|| format!("--root {}", conn.root.display()))?;
    let cfg = tls::client_config(creds, &bundle, ServerIdentity::TrustDomain, &[tls::ALPN_H2])?;
    Ok(grpc::connect(&conn.registry, Arc::new(cfg)).await?)
}
