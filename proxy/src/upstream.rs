//! Connecting to a destination: pick an endpoint, connect within the timeout, run the
//! caller's first step on the new connection (replay the ClientHello, or the mTLS
//! handshake), and on failure count it against the endpoint (outlier detection) and try
//! another one, up to a number of attempts. The destination's connection limit is taken
//! before anything is dialled.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::{TcpSocket, TcpStream};

use isthmus_proto::traffic::TcpKeepalive;

use crate::balancer::FailureOutcome;
use crate::metrics::{Direction, DirectionLabels, Metrics, ServiceLabels};
use crate::routes::{Destination, Slot, Target};

/// Istio's default connect timeout is 10 s; a mesh endpoint that has not answered a SYN
/// in 5 s is better retried elsewhere.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Endpoints tried for one connection before giving up (the first and two retries).
pub const DEFAULT_CONNECT_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone, Copy)]
pub struct ConnectOptions {
    /// For the TCP connect and, separately, for the caller's first step.
    pub timeout: Duration,
    pub attempts: u32,
    /// `SO_MARK` for upstream sockets: the VM agent marks its own connections so that its
    /// capture rules let them through instead of redirecting them back to itself. Setting
    /// it needs CAP_NET_ADMIN.
    pub mark: Option<u32>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_CONNECT_TIMEOUT,
            attempts: DEFAULT_CONNECT_ATTEMPTS,
            mark: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{destination}: no healthy endpoint (none in the view, or all ejected)")]
    NoHealthyEndpoint { destination: String },
    #[error("{destination}: connection limit of {limit} reached")]
    LimitReached { destination: String, limit: usize },
    #[error("{destination}: {attempts} endpoint(s) tried, last {endpoint}: {source}")]
    Failed {
        destination: String,
        attempts: u32,
        endpoint: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Holds a connection's share of its destination: the connection-limit slot and the
/// endpoint's open-connection count, both released on drop.
#[derive(Debug)]
pub struct Lease {
    destination: Arc<Destination>,
    target: Arc<Target>,
    _slot: Slot,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.destination.on_close(&self.target.uid);
    }
}

/// A connected endpoint.
#[derive(Debug)]
pub struct Upstream<S> {
    pub stream: S,
    pub target: Arc<Target>,
    pub lease: Lease,
}

/// Connects to one endpoint of `destination`; `first_step` runs on each new TCP
/// connection (its failure counts as the endpoint's failure, and another is tried).
pub async fn connect<S, F, Fut>(
    destination: &Arc<Destination>,
    opts: ConnectOptions,
    metrics: &Metrics,
    direction: Direction,
    first_step: F,
) -> Result<Upstream<S>, ConnectError>
where
    F: Fn(TcpStream, Arc<Target>) -> Fut,
    Fut: Future<Output = io::Result<S>>,
{
    let first_step = &first_step;
    connect_with(destination, opts, metrics, |target, opts| async move {
        let tcp = dial(target.addr, destination, opts, metrics, direction).await?;
        answer_within(opts.timeout, first_step(tcp, target)).await
    })
    .await
}

/// `step` on a new connection (a handshake, a replay), bounded by `timeout`: its own
/// outcome, or a timeout that says the peer did not answer.
pub async fn answer_within<T>(
    timeout: Duration,
    step: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout(timeout, step).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?} after connecting"),
        )
    })?
}

/// A TCP connection to `addr` for `destination`, within the timeout, with its socket
/// options (no delay; the rule's keepalive) set; the connect time is observed.
pub async fn dial(
    addr: SocketAddr,
    destination: &Destination,
    opts: ConnectOptions,
    metrics: &Metrics,
    direction: Direction,
) -> io::Result<TcpStream> {
    let started = Instant::now();
    let tcp = tokio::time::timeout(opts.timeout, connect_tcp(addr, opts.mark))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out after {:?}", opts.timeout),
            )
        })??;
    metrics
        .connect_duration
        .get_or_create(&DirectionLabels { direction })
        .observe(started.elapsed().as_secs_f64());
    let _ = tcp.set_nodelay(true);
    if let Some(keepalive) = destination.tcp_keepalive() {
        if let Err(e) = set_keepalive(&tcp, &keepalive) {
            tracing::debug!(destination = %destination.key, error = %e, "cannot set TCP keepalive");
        }
    }
    Ok(tcp)
}

/// Connects to one endpoint of `destination` with `attempt` (given the endpoint and the
/// options in effect: the rule's connect timeout where it sets one); a failed attempt
/// counts as the endpoint's failure, and another endpoint is tried.
pub async fn connect_with<S, F, Fut>(
    destination: &Arc<Destination>,
    opts: ConnectOptions,
    metrics: &Metrics,
    attempt: F,
) -> Result<Upstream<S>, ConnectError>
where
    F: Fn(Arc<Target>, ConnectOptions) -> Fut,
    Fut: Future<Output = io::Result<S>>,
{
    let Some(slot) = destination.take_slot() else {
        return Err(ConnectError::LimitReached {
            destination: destination.key.to_string(),
            limit: destination.max_connections(),
        });
    };
    // The DestinationRule's connect timeout, where it sets one.
    let opts = ConnectOptions {
        timeout: destination.connect_timeout().unwrap_or(opts.timeout),
        ..opts
    };
    let mut tried: Vec<Arc<Target>> = Vec::new();
    let mut last: Option<(std::net::SocketAddr, io::Error)> = None;
    for _ in 0..opts.attempts.max(1) {
        let Some(target) = destination.pick(Instant::now(), &tried) else {
            break;
        };
        tried.push(target.clone());
        let attempt = attempt(target.clone(), opts);
        match attempt.await {
            Ok(stream) => {
                destination.on_connected(&target.uid);
                return Ok(Upstream {
                    stream,
                    lease: Lease {
                        destination: destination.clone(),
                        target: target.clone(),
                        _slot: slot,
                    },
                    target,
                });
            }
            Err(e) => {
                let service = ServiceLabels {
                    service: destination.key.hostname.clone(),
                };
                metrics.connect_failures.get_or_create(&service).inc();
                if let Some(FailureOutcome::Ejected(until)) =
                    destination.on_connect_failed(&target.uid, Instant::now())
                {
                    metrics.ejections.get_or_create(&service).inc();
                    tracing::warn!(
                        destination = %destination.key,
                        endpoint = %target.addr,
                        ejected_for = ?until.saturating_duration_since(Instant::now()),
                        "endpoint ejected after consecutive connect failures"
                    );
                }
                tracing::debug!(destination = %destination.key, endpoint = %target.addr, error = %e, "connect failed; trying another endpoint");
                last = Some((target.addr, e));
            }
        }
    }
    match last {
        Some((endpoint, source)) => Err(ConnectError::Failed {
            destination: destination.key.to_string(),
            attempts: tried.len() as u32,
            endpoint,
            source,
        }),
        None => Err(ConnectError::NoHealthyEndpoint {
            destination: destination.key.to_string(),
        }),
    }
}

/// Turns keepalive on for `tcp` with the times and probes `keepalive` sets (the kernel's
/// own for the rest); times are in whole seconds, a part of one rounded up.
pub fn set_keepalive(tcp: &TcpStream, keepalive: &TcpKeepalive) -> io::Result<()> {
    let seconds = |ms: u64| u32::try_from(ms.div_ceil(1000).max(1)).unwrap_or(u32::MAX);
    sockopt_set(tcp, sockopt::KeepAlive, &true)?;
    if let Some(ms) = keepalive.time_ms {
        sockopt_set(tcp, sockopt::TcpKeepIdle, &seconds(ms))?;
    }
    if let Some(ms) = keepalive.interval_ms {
        sockopt_set(tcp, sockopt::TcpKeepInterval, &seconds(ms))?;
    }
    if let Some(n) = keepalive.probes {
        sockopt_set(tcp, sockopt::TcpKeepCount, &n)?;
    }
    Ok(())
}

fn sockopt_set<O: nix::sys::socket::SetSockOpt>(
    tcp: &TcpStream,
    opt: O,
    value: &O::Val,
) -> io::Result<()> {
    setsockopt(tcp, opt, value).map_err(io::Error::from)
}

/// A TCP connection to `addr` from a socket carrying `mark`, if any.
pub async fn connect_tcp(addr: SocketAddr, mark: Option<u32>) -> io::Result<TcpStream> {
    let Some(mark) = mark else {
        return TcpStream::connect(addr).await;
    };
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    setsockopt(&socket, sockopt::Mark, &mark).map_err(|errno| {
        io::Error::new(
            io::Error::from(errno).kind(),
            format!("setting SO_MARK {mark:#x} on the socket to {addr}: {errno} (it needs CAP_NET_ADMIN)"),
        )
    })?;
    socket.connect(addr).await
}

impl ConnectError {
    pub fn result(&self) -> crate::metrics::ConnResult {
        use crate::metrics::ConnResult;
        match self {
            ConnectError::NoHealthyEndpoint { .. } => ConnResult::no_healthy_endpoint,
            ConnectError::LimitReached { .. } => ConnResult::connection_limit,
            ConnectError::Failed { .. } => ConnResult::upstream_connect_failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::getsockopt;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn keepalive_is_set_as_the_rule_says() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = connect_tcp(listener.local_addr().unwrap(), None)
            .await
            .unwrap();
        let before = getsockopt(&tcp, sockopt::TcpKeepIdle).unwrap();
        set_keepalive(
            &tcp,
            &TcpKeepalive {
                probes: Some(4),
                time_ms: Some(90_500),
                interval_ms: None,
            },
        )
        .unwrap();
        assert!(getsockopt(&tcp, sockopt::KeepAlive).unwrap());
        assert_eq!(
            getsockopt(&tcp, sockopt::TcpKeepIdle).unwrap(),
            91,
            "rounded up"
        );
        assert_eq!(getsockopt(&tcp, sockopt::TcpKeepCount).unwrap(), 4);
        assert_ne!(before, 91);
    }

    #[tokio::test]
    async fn a_marked_connection_carries_its_mark() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let plain = connect_tcp(addr, None).await.unwrap();
        assert_eq!(getsockopt(&plain, sockopt::Mark).unwrap(), 0);
        match connect_tcp(addr, Some(0x1571)).await {
            Ok(marked) => assert_eq!(getsockopt(&marked, sockopt::Mark).unwrap(), 0x1571),
            // Not root: the error says what is missing.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}");
                eprintln!("skipping the marked half: {e}");
            }
            Err(e) => panic!("{e}"),
        }
    }
}
