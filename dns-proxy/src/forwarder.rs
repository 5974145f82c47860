//! Upstream resolvers: one exchange per query over UDP from a fresh socket (a random source
//! port and a random ID, so an off-path attacker has both to guess), retried over TCP when
//! the answer is truncated, with failover between upstreams in order (default) or the first
//! answer of all of them in parallel, inside one deadline per query.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use nix::sys::socket::{setsockopt, sockopt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::time::Instant;

use crate::metrics::{Metrics, UpstreamError, UpstreamLabels};

/// The EDNS payload size advertised upstream: 1232 avoids IP fragmentation on any path
/// (DNS flag day 2020).
pub const UPSTREAM_EDNS_PAYLOAD: u16 = 1232;
/// Largest UDP answer read from an upstream.
const MAX_UDP_RESPONSE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamMode {
    /// Ask one upstream at a time, in order, moving on when one fails.
    #[default]
    Sequential,
    /// Ask every upstream at once; the first good answer wins.
    Parallel,
}

impl std::fmt::Display for UpstreamMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sequential => "sequential",
            Self::Parallel => "parallel",
        })
    }
}

impl std::str::FromStr for UpstreamMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sequential" => Ok(Self::Sequential),
            "parallel" => Ok(Self::Parallel),
            other => Err(format!(
                "{other:?} is not an upstream mode; use sequential or parallel"
            )),
        }
    }
}

/// Why one exchange with one upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("no answer in time")]
    Timeout,
    #[error("connection refused: is a resolver listening there?")]
    Refused,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the answer could not be parsed: {0}")]
    BadResponse(String),
    #[error("answered {0}")]
    Failed(ResponseCode),
}

impl AttemptError {
    fn reason(&self) -> UpstreamError {
        match self {
            AttemptError::Timeout => UpstreamError::timeout,
            AttemptError::Refused => UpstreamError::refused,
            AttemptError::Io(_) => UpstreamError::io,
            AttemptError::BadResponse(_) => UpstreamError::bad_response,
            AttemptError::Failed(_) => UpstreamError::servfail,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolvers are configured (set --upstream, or nameserver lines in /etc/resolv.conf)")]
    NoUpstreams,
    #[error("every upstream failed: {}", .0.iter().map(|(a, e)| format!("{a}: {e}")).collect::<Vec<_>>().join("; "))]
    AllFailed(Vec<(SocketAddr, AttemptError)>),
}

#[derive(Debug)]
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    labels: Vec<UpstreamLabels>,
    mode: UpstreamMode,
    timeout: Duration,
    metrics: Arc<Metrics>,
    /// `SO_MARK` on upstream sockets, so that capture rules exempting the mark let the
    /// forwarded queries through (see [`Forwarder::with_socket_mark`]).
    mark: Option<u32>,
}

impl Forwarder {
    pub fn new(
        upstreams: Vec<SocketAddr>,
        mode: UpstreamMode,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let labels = upstreams
            .iter()
            .map(|u| UpstreamLabels {
                upstream: u.to_string(),
            })
            .collect();
        Self {
            upstreams,
            labels,
            mode,
            timeout,
            metrics,
            mark: None,
        }
    }

    /// Marks every upstream socket with `mark` (`SO_MARK`, which needs CAP_NET_ADMIN). On a
    /// VM whose DNS traffic is redirected to this proxy, the redirect rules let marked
    /// packets through; unmarked, the proxy's own queries would come back to it.
    pub fn with_socket_mark(mut self, mark: Option<u32>) -> Self {
        self.mark = mark;
        self
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// Asks the upstreams `query`; the answer's ID and question are the upstream's, the
    /// caller puts the client's back.
    pub async fn forward(&self, query: &Query, dnssec_ok: bool) -> Result<Message, ForwardError> {
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstreams);
        }
        let deadline = Instant::now() + self.timeout;
        match self.mode {
            UpstreamMode::Sequential => {
                let mut errors = Vec::new();
                for (i, upstream) in self.upstreams.iter().enumerate() {
                    // Share what is left of the deadline among the upstreams not yet tried,
                    // so a silent first upstream cannot use up the whole query.
                    let left = deadline.saturating_duration_since(Instant::now());
                    let share = left / (self.upstreams.len() - i) as u32;
                    match self
                        .attempt(i, query, dnssec_ok, Instant::now() + share)
                        .await
                    {
                        Ok(m) => return Ok(m),
                        Err(e) => errors.push((*upstream, e)),
                    }
                }
                Err(ForwardError::AllFailed(errors))
            }
            UpstreamMode::Parallel => {
                let mut pending: FuturesUnordered<_> = (0..self.upstreams.len())
                    .map(|i| async move { (i, self.attempt(i, query, dnssec_ok, deadline).await) })
                    .collect();
                let mut errors = Vec::new();
                while let Some((i, r)) = pending.next().await {
                    match r {
                        Ok(m) => return Ok(m),
                        Err(e) => errors.push((self.upstreams[i], e)),
                    }
                }
                Err(ForwardError::AllFailed(errors))
            }
        }
    }

    async fn attempt(
        &self,
        i: usize,
        query: &Query,
        dnssec_ok: bool,
        deadline: Instant,
    ) -> Result<Message, AttemptError> {
        let upstream = self.upstreams[i];
        let started = Instant::now();
        let result = async {
            let (id, bytes) = encode_query(query, dnssec_ok)?;
            let answer = tokio::time::timeout_at(
                deadline,
                exchange_udp(upstream, self.mark, id, &bytes, query),
            )
            .await
            .map_err(|_| AttemptError::Timeout)??;
            if !answer.metadata.truncation {
                return Ok(answer);
            }
            self.metrics.upstream_tcp_retries.inc();
            tokio::time::timeout_at(
                deadline,
                exchange_tcp(upstream, self.mark, id, &bytes, query),
            )
            .await
            .map_err(|_| AttemptError::Timeout)?
        }
        .await;
        let result = result.and_then(|m| match m.metadata.response_code {
            // A resolver that cannot answer is a failed upstream: try the next one.
            ResponseCode::ServFail | ResponseCode::Refused | ResponseCode::NotImp => {
                Err(AttemptError::Failed(m.metadata.response_code))
            }
            _ => Ok(m),
        });
        match &result {
            Ok(_) => self
                .metrics
                .upstream_duration
                .get_or_create(&self.labels[i])
                .observe(started.elapsed().as_secs_f64()),
            Err(e) => {
                tracing::debug!(%upstream, error = %e, "upstream attempt failed");
                self.metrics
                    .upstream_errors
                    .get_or_create(&crate::metrics::UpstreamErrorLabels {
                        upstream: self.labels[i].upstream.clone(),
                        reason: e.reason(),
                    })
                    .inc();
            }
        }
        result
    }
}

fn encode_query(query: &Query, dnssec_ok: bool) -> Result<(u16, Vec<u8>), AttemptError> {
    let id: u16 = rand::random();
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.queries.push(query.clone());
    let mut edns = Edns::new();
    edns.set_max_payload(UPSTREAM_EDNS_PAYLOAD);
    edns.set_dnssec_ok(dnssec_ok);
    m.set_edns(edns);
    let bytes = m
        .to_vec()
        .map_err(|e| AttemptError::BadResponse(format!("cannot encode the query: {e}")))?;
    Ok((id, bytes))
}

fn set_mark(socket: &impl AsFd, mark: u32) -> Result<(), AttemptError> {
    setsockopt(socket, sockopt::Mark, &mark).map_err(|errno| {
        AttemptError::Io(std::io::Error::new(
            std::io::Error::from(errno).kind(),
            format!("cannot set SO_MARK {mark:#x} on the upstream socket: {errno} (it needs CAP_NET_ADMIN)"),
        ))
    })
}

fn io_error(e: std::io::Error) -> AttemptError {
    if e.kind() == std::io::ErrorKind::ConnectionRefused {
        AttemptError::Refused
    } else {
        AttemptError::Io(e)
    }
}

/// Whether `m` answers our query `id` for `query` (anything else on the socket is ignored).
fn matches(m: &Message, id: u16, query: &Query) -> bool {
    m.metadata.id == id
        && m.metadata.message_type == MessageType::Response
        && m.queries.len() == 1
        && m.queries[0].query_type == query.query_type
        && m.queries[0].query_class == query.query_class
        && m.queries[0].name.eq_ignore_root(&query.name)
}

async fn exchange_udp(
    upstream: SocketAddr,
    mark: Option<u32>,
    id: u16,
    bytes: &[u8],
    query: &Query,
) -> Result<Message, AttemptError> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let socket = UdpSocket::bind(bind).await?;
    if let Some(mark) = mark {
        set_mark(&socket, mark)?;
    }
    socket.connect(upstream).await.map_err(io_error)?;
    socket.send(bytes).await.map_err(io_error)?;
    let mut buf = vec![0u8; MAX_UDP_RESPONSE];
    loop {
        let n = socket.recv(&mut buf).await.map_err(io_error)?;
        match Message::from_vec(&buf[..n]) {
            Ok(m) if matches(&m, id, query) => return Ok(m),
            // A stray or spoofed datagram: keep waiting for ours until the deadline.
            _ => continue,
        }
    }
}

async fn exchange_tcp(
    upstream: SocketAddr,
    mark: Option<u32>,
    id: u16,
    bytes: &[u8],
    query: &Query,
) -> Result<Message, AttemptError> {
    let mut stream = match mark {
        None => TcpStream::connect(upstream).await,
        Some(mark) => {
            let socket = if upstream.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            set_mark(&socket, mark)?;
            socket.connect(upstream).await
        }
    }
    .map_err(io_error)?;
    let mut out = Vec::with_capacity(bytes.len() + 2);
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
    stream.write_all(&out).await?;
    let len = stream.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    let m = Message::from_vec(&buf).map_err(|e| AttemptError::BadResponse(e.to_string()))?;
    if !matches(&m, id, query) {
        return Err(AttemptError::BadResponse(
            "the answer is for another question".into(),
        ));
    }
    Ok(m)
}
