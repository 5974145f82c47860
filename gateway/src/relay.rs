//! Placeholder relay (replaced by the measured one).

use std::io;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
}

#[derive(Debug)]
pub struct RelayOutcome {
    pub transferred: Transferred,
    pub error: Option<io::Error>,
}

pub async fn relay_tcp(client: TcpStream, upstream: TcpStream) -> RelayOutcome {
    relay(client, upstream).await
}

pub async fn relay<A, B>(mut client: A, mut upstream: B) -> RelayOutcome
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((a, b)) => RelayOutcome {
            transferred: Transferred {
                client_to_upstream: a,
                upstream_to_client: b,
            },
            error: None,
        },
        Err(e) => RelayOutcome {
            transferred: Transferred::default(),
            error: Some(e),
        },
    }
}
