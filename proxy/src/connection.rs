//! What every proxied connection shares, whichever listener took it: the tracker that
//! drain waits on (stop accepting, let open connections finish until a deadline, then
//! close them), the access-log line written once per connection when it ends, and the last
//! few of those lines kept for `/debug/connections`.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use isthmus_proto::drain;
use isthmus_proto::grpc::classify_handshake_error;
use isthmus_proto::limits::{AcceptErrors, AtLimit, ACCEPT_ERROR_BACKOFF};
use isthmus_proto::tls;
use isthmus_proto::SpiffeId;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, TryAcquireError};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::metrics::{ConnResult, Direction};

/// Counts open connections and tells them when the drain deadline has passed.
#[derive(Debug)]
pub struct Tracker {
    open: AtomicUsize,
    next_id: AtomicU64,
    idle: Notify,
    force: drain::Trigger,
    force_watch: drain::Watch,
    recent: Mutex<VecDeque<ConnectionSummary>>,
}

/// Finished connections remembered for `/debug/connections` (oldest dropped first).
pub const RECENT_CONNECTIONS: usize = 64;
/// Once the drain deadline has passed and open connections were told to close, how long
/// [`Tracker::drain`] waits for them to go: closing a socket takes no time, so this only
/// bounds a connection task that is slow to notice.
pub const FORCED_CLOSE_WAIT: Duration = Duration::from_secs(2);

impl Default for Tracker {
    fn default() -> Self {
        let (force, force_watch) = drain::channel();
        Self {
            open: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            idle: Notify::new(),
            force,
            force_watch,
            recent: Mutex::new(VecDeque::with_capacity(RECENT_CONNECTIONS)),
        }
    }
}

impl Tracker {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A connection is open until the guard drops.
    pub fn register(self: &Arc<Self>) -> ConnGuard {
        self.open.fetch_add(1, Ordering::SeqCst);
        ConnGuard {
            tracker: self.clone(),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
        }
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Keeps `rec`'s summary among the recent connections (its names move into it).
    pub fn remember(&self, rec: AccessRecord) {
        let summary = rec.into_summary();
        let mut recent = self.recent.lock().expect("recent connections poisoned");
        if recent.len() >= RECENT_CONNECTIONS {
            recent.pop_front();
        }
        recent.push_back(summary);
    }

    /// The last connections that ended, newest first.
    pub fn recent(&self) -> Vec<ConnectionSummary> {
        let recent = self.recent.lock().expect("recent connections poisoned");
        recent.iter().rev().cloned().collect()
    }

    /// Fires when open connections must close now (the drain deadline passed).
    pub fn closing(&self) -> drain::Watch {
        self.force_watch.clone()
    }

    /// Waits until every connection has closed or `deadline` has passed, then tells the
    /// rest to close and waits (bounded) for them. Returns how many were closed by force.
    pub async fn drain(&self, deadline: Duration) -> usize {
        let wait_idle = async {
            loop {
                let notified = self.idle.notified();
                if self.open() == 0 {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(deadline, wait_idle).await.is_ok() {
            return 0;
        }
        let left = self.open();
        tracing::warn!(
            open = left,
            ?deadline,
            "drain deadline passed: closing the connections still open"
        );
        self.force.fire();
        let _ = tokio::time::timeout(FORCED_CLOSE_WAIT, async {
            while self.open() > 0 {
                let notified = self.idle.notified();
                if self.open() == 0 {
                    break;
                }
                notified.await;
            }
        })
        .await;
        left
    }
}

/// One open connection; dropping it marks the connection closed.
#[derive(Debug)]
pub struct ConnGuard {
    tracker: Arc<Tracker>,
    pub id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.tracker.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle_notify();
        }
    }
}

impl ConnGuard {
    fn idle_notify(&self) {
        self.tracker.idle.notify_waiters();
    }
}

/// The drain every program runs at shutdown: logs what is open, waits for the connections
/// of every tracker (all at once) until `deadline`, then closes the rest. Returns how many
/// were closed by force.
pub async fn drain_all(trackers: &[Arc<Tracker>], deadline: Duration) -> usize {
    let open: usize = trackers.iter().map(|t| t.open()).sum();
    tracing::info!(
        open,
        ?deadline,
        "draining: no new connections; waiting for open ones"
    );
    let drains: Vec<_> = trackers
        .iter()
        .map(|t| {
            let t = t.clone();
            tokio::spawn(async move { t.drain(deadline).await })
        })
        .collect();
    let mut forced = 0;
    for d in drains {
        forced += d.await.unwrap_or(0);
    }
    tracing::info!(forced, "drained");
    forced
}

/// A listener's handling of one accepted connection; [`serve`] runs the shared accept loop
/// for it. The SNI passthrough, the inbound mTLS listener and the like implement it.
pub trait ConnectionHandler: Send + Sync + 'static {
    /// The listener's label in metrics and the access log.
    const DIRECTION: Direction;
    /// Where its open connections are counted (drain waits for them).
    fn tracker(&self) -> &Arc<Tracker>;
    /// Connections held at once; the rest wait in the listen backlog.
    fn max_connections(&self) -> usize;
    /// Handles `tcp` to the end, filling in `rec`.
    fn handle(&self, tcp: TcpStream, rec: &mut AccessRecord) -> impl Future<Output = ()> + Send;
}

/// Accepts for `handler` until `shutdown`, then returns (open connections carry on; the
/// caller drains them through the tracker).
pub async fn serve<H: ConnectionHandler>(
    listener: TcpListener,
    handler: Arc<H>,
    shutdown: drain::Watch,
) {
    let (tracker, max) = (handler.tracker().clone(), handler.max_connections());
    accept_loop(
        listener,
        H::DIRECTION,
        tracker,
        max,
        shutdown,
        move |tcp, mut rec| {
            let handler = handler.clone();
            async move {
                handler.handle(tcp, &mut rec).await;
                rec
            }
        },
    )
    .await;
}

/// The accept loop every listener shares: at most `max_connections` held at once, fewer when
/// the open-file limit allows fewer (the rest wait in the listen backlog; meeting the limit
/// and a failed `accept` are logged at most every 10 s and counted in
/// `isthmus_listener_at_limit` and `isthmus_accept_errors`), each registered with the tracker, run in its own task and
/// span by `handle`, and logged once when it ends. Returns when `shutdown` fires; open
/// connections carry on and the caller drains them through the tracker.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    direction: Direction,
    tracker: Arc<Tracker>,
    max_connections: usize,
    shutdown: drain::Watch,
    handle: F,
) where
    F: Fn(TcpStream, AccessRecord) -> Fut,
    Fut: Future<Output = AccessRecord> + Send + 'static,
{
    // Each relayed connection holds two descriptors (client and upstream); beyond what the
    // open-file limit allows, `accept` or the upstream connect would fail instead.
    let max_connections = max_connections.min(isthmus_proto::limits::connection_budget(2));
    let slots = Arc::new(Semaphore::new(max_connections));
    let accept_errors = AcceptErrors::new(direction.as_str());
    let at_limit = AtLimit::new(direction.as_str(), max_connections);
    let stop = shutdown.signaled();
    tokio::pin!(stop);
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(s) => s,
            Err(TryAcquireError::Closed) => break,
            Err(TryAcquireError::NoPermits) => {
                at_limit.record("wait in the listen backlog");
                tokio::select! {
                    _ = &mut stop => break,
                    s = slots.clone().acquire_owned() => match s { Ok(s) => s, Err(_) => break },
                }
            }
        };
        let (tcp, client) = tokio::select! {
            _ = &mut stop => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    accept_errors.record(&e);
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let guard = tracker.register();
        let span = tracing::debug_span!(
            "conn",
            id = guard.id,
            dir = direction.as_str(),
            %client,
            peer = tracing::field::Empty
        );
        // A connection's future is large (every step from the first read to the relay is in
        // its state, several kilobytes). Boxed, it is written once into its allocation and
        // the task holds a pointer; unboxed, spawning and completing the task copied all of
        // it several times per connection.
        let work = Box::pin(handle(tcp, AccessRecord::new(guard.id, direction, client)));
        tokio::spawn(
            async move {
                let rec = work.await;
                rec.emit();
                guard.tracker.remember(rec);
                drop(guard);
                drop(slot);
            }
            .instrument(span),
        );
    }
    tracing::info!(direction = direction.as_str(), "listener stopped accepting");
}

/// Why a connection was refused before it reached a destination: a metric label and the
/// detail for the access log.
#[derive(Debug)]
pub struct Refusal {
    pub reason: &'static str,
    pub detail: String,
}

pub fn refusal(reason: &'static str, detail: impl ToString) -> Refusal {
    Refusal {
        reason,
        detail: detail.to_string(),
    }
}

/// The server side of an mTLS handshake on `tcp` with `config`, finished by `deadline`
/// (`timeout` is how long that allowed, for the message): the session and the client's
/// verified identity, or the refusal it is counted under, its cause in the operator's words
/// where TLS gives one. `listener` names who requires mTLS in the refusal of a client
/// without a certificate (a config swapped in without client authentication must still not
/// let an anonymous peer through).
pub async fn accept_mtls(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    deadline: tokio::time::Instant,
    timeout: Duration,
    listener: &str,
) -> Result<(TlsStream<TcpStream>, SpiffeId), Refusal> {
    let handshake = TlsAcceptor::from(config).accept(tcp);
    let stream = match tokio::time::timeout_at(deadline, handshake).await {
        Err(_) => {
            return Err(refusal(
                "handshake_timeout",
                format!("the TLS handshake did not complete within {timeout:?}"),
            ))
        }
        Ok(Err(e)) => {
            let detail = tls::failure::cause_in(&e).unwrap_or_else(|| e.to_string());
            return Err(refusal(classify_handshake_error(&e), detail));
        }
        Ok(Ok(s)) => s,
    };
    let Some(peer) = tls::peer_identity(stream.get_ref().1.peer_certificates()) else {
        return Err(refusal(
            "no_client_certificate",
            format!("the TLS handshake completed without a client certificate; {listener} requires mTLS"),
        ));
    };
    Ok((stream, peer))
}

/// Runs a relay to its end or until the drain deadline tells open connections to close,
/// and writes what it moved and how it ended into `rec`.
pub async fn finish_relay(
    rec: &mut AccessRecord,
    closing: drain::Watch,
    relay: impl Future<Output = crate::relay::RelayOutcome>,
) -> ConnResult {
    let outcome = tokio::select! {
        o = relay => o,
        _ = closing.signaled() => {
            rec.error = Some("closed by the drain deadline".into());
            return ConnResult::drained;
        }
    };
    rec.relay = Some(outcome.method.as_str());
    rec.bytes_to_upstream += outcome.transferred.client_to_upstream;
    rec.bytes_from_upstream += outcome.transferred.upstream_to_client;
    match outcome.error {
        None => ConnResult::ok,
        Some(e) => {
            rec.error = Some(e.to_string());
            ConnResult::error
        }
    }
}

/// One access-log line: what a connection was, where it went and how it ended.
#[derive(Debug)]
pub struct AccessRecord {
    pub id: u64,
    pub direction: Direction,
    pub started: Instant,
    pub client: SocketAddr,
    /// The SNI the client sent (passthrough), or the destination it asked for.
    pub destination: String,
    /// The service, once known.
    pub service: Option<String>,
    pub endpoint: Option<SocketAddr>,
    /// The verified SPIFFE identity of the peer (inbound), or of the server (outbound).
    pub peer_identity: Option<String>,
    pub bytes_to_upstream: u64,
    pub bytes_from_upstream: u64,
    /// How the bytes moved (`splice` or `copy`), once a relay has ended.
    pub relay: Option<&'static str>,
    pub result: &'static str,
    pub error: Option<String>,
}

/// An access-log line as data: what `/debug/connections` shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnectionSummary {
    pub id: u64,
    pub direction: &'static str,
    pub client: SocketAddr,
    pub destination: String,
    pub service: Option<String>,
    pub endpoint: Option<SocketAddr>,
    pub peer_identity: Option<String>,
    pub bytes_to_upstream: u64,
    pub bytes_from_upstream: u64,
    pub relay: Option<&'static str>,
    pub duration_ms: f64,
    pub result: &'static str,
    pub error: Option<String>,
    /// When it ended, in seconds since the Unix epoch.
    pub ended_unix: u64,
}

impl AccessRecord {
    pub fn into_summary(self) -> ConnectionSummary {
        ConnectionSummary {
            id: self.id,
            direction: self.direction.as_str(),
            client: self.client,
            destination: self.destination,
            service: self.service,
            endpoint: self.endpoint,
            peer_identity: self.peer_identity,
            bytes_to_upstream: self.bytes_to_upstream,
            bytes_from_upstream: self.bytes_from_upstream,
            relay: self.relay,
            duration_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            result: self.result,
            error: self.error,
            ended_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    pub fn new(id: u64, direction: Direction, client: SocketAddr) -> Self {
        Self {
            id,
            direction,
            started: Instant::now(),
            client,
            destination: String::new(),
            service: None,
            endpoint: None,
            peer_identity: None,
            bytes_to_upstream: 0,
            bytes_from_upstream: 0,
            relay: None,
            result: "",
            error: None,
        }
    }

    pub fn finish(&mut self, result: ConnResult) {
        self.result = result.as_str();
    }

    /// Writes the line (target `isthmus::access`, so it can be filtered or routed alone).
    pub fn emit(&self) {
        tracing::info!(
            target: "isthmus::access",
            conn = self.id,
            direction = self.direction.as_str(),
            client = %LogAddr(self.client),
            destination = %self.destination,
            service = self.service.as_deref().unwrap_or("-"),
            endpoint = %OrDash(self.endpoint.map(LogAddr)),
            peer = self.peer_identity.as_deref().unwrap_or("-"),
            bytes_to_upstream = self.bytes_to_upstream,
            bytes_from_upstream = self.bytes_from_upstream,
            relay = self.relay.unwrap_or("-"),
            duration_ms = %Millis(self.started.elapsed()),
            result = self.result,
            error = self.error.as_deref().unwrap_or("-"),
            "connection"
        );
    }
}

/// A value of the access-log line that may not be known yet: `-` then.
struct OrDash<T>(Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// A socket address as `Display` writes it. An IPv4 one is written by `itoa`, a part at a
/// time: std's writes each address into a buffer first, in case a width asks for padding.
struct LogAddr(SocketAddr);

impl std::fmt::Display for LogAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        let SocketAddr::V4(v4) = self.0 else {
            return self.0.fmt(f);
        };
        let mut digits = itoa::Buffer::new();
        for (i, octet) in v4.ip().octets().into_iter().enumerate() {
            if i > 0 {
                f.write_char('.')?;
            }
            f.write_str(digits.format(octet))?;
        }
        f.write_char(':')?;
        f.write_str(digits.format(v4.port()))
    }
}

/// A duration in milliseconds to the microsecond (`12.345`), written from integers: the
/// line is written for every connection, and a float with a precision is the slow way.
struct Millis(Duration);

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // As u64 (585,000 years of microseconds): std formats a u128 the long way.
        let micros = u64::try_from(self.0.as_micros()).unwrap_or(u64::MAX);
        write!(f, "{}.{:03}", micros / 1000, micros % 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_returns_once_the_last_connection_closes() {
        let t = Tracker::new();
        let g = t.register();
        let t2 = t.clone();
        let waiter = tokio::spawn(async move { t2.drain(Duration::from_secs(30)).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(g);
        assert_eq!(waiter.await.unwrap(), 0);
        assert!(!t.closing().is_signaled());
    }

    #[tokio::test(start_paused = true)]
    async fn drain_deadline_tells_open_connections_to_close() {
        let t = Tracker::new();
        let g = t.register();
        let closing = t.closing();
        let conn = tokio::spawn(async move {
            closing.signaled().await;
            drop(g);
        });
        assert_eq!(t.drain(Duration::from_secs(5)).await, 1);
        conn.await.unwrap();
        assert_eq!(t.open(), 0);
    }

    #[test]
    fn access_log_values_are_written_as_the_line_shows_them() {
        assert_eq!(OrDash::<SocketAddr>(None).to_string(), "-");
        let addr: SocketAddr = "10.1.2.3:8080".parse().unwrap();
        assert_eq!(OrDash(Some(addr)).to_string(), "10.1.2.3:8080");
        for addr in [
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "127.0.0.1:15443",
            "[::1]:80",
            "[fe80::1%2]:15008",
            "[::ffff:10.0.0.1]:443",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(LogAddr(addr).to_string(), addr.to_string());
        }
        assert_eq!(Millis(Duration::from_micros(12_345)).to_string(), "12.345");
        assert_eq!(Millis(Duration::from_nanos(999)).to_string(), "0.000");
        assert_eq!(
            Millis(Duration::from_micros(7_001_020)).to_string(),
            "7001.020"
        );
    }
}
