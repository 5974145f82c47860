//! The registry's listeners (gRPC, admin, and the injection webhook when served), bound before anything else starts so that a port in use
//! fails the start at once, with an error that names the listener.

use std::net::SocketAddr;

use isthmus_proto::program::{self, BindError};
use tokio::net::TcpListener;

use super::config::RegistryConfig;

pub(super) struct Listeners {
    pub grpc: TcpListener,
    pub grpc_addr: SocketAddr,
    pub admin: TcpListener,
    pub admin_addr: SocketAddr,
    /// The sidecar injection webhook, when it is served (see `WebhookConfig::listen_addr`).
    pub webhook: Option<(TcpListener, SocketAddr)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot read the address {what} was bound to: {source}")]
    LocalAddr {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl Listeners {
    pub(super) async fn bind(cfg: &RegistryConfig) -> Result<Self, ListenError> {
        const GRPC: &str = "gRPC (Watch, Registration, CA)";
        const ADMIN: &str = "the admin HTTP server";
        const WEBHOOK: &str = "the sidecar injection webhook";
        let grpc = program::bind(cfg.grpc_addr, GRPC).await?;
        let admin = program::bind(cfg.admin_addr, ADMIN).await?;
        let local = |l: &TcpListener, what| {
            l.local_addr()
                .map_err(|source| ListenError::LocalAddr { what, source })
        };
        let webhook = match cfg.webhook.listen_addr(&cfg.kubernetes) {
            Some(addr) => {
                let l = program::bind(addr, WEBHOOK).await?;
                let addr = local(&l, WEBHOOK)?;
                Some((l, addr))
            }
            None => None,
        };
        Ok(Self {
            webhook,
            grpc_addr: local(&grpc, GRPC)?,
            admin_addr: local(&admin, ADMIN)?,
            grpc,
            admin,
        })
    }
}
