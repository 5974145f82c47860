//! File descriptors, the resource every listener spends: the soft `RLIMIT_NOFILE` raised to
//! the hard limit at start (a default soft limit of 1,024 is far below what a gateway or a
//! registry holds), how many of them a listener may spend on connections, and what a
//! listener says when a limit is reached: a log line at most every [`LIMIT_LOG_INTERVAL`]
//! and a counter, never a log line per failed `accept`.

use std::io;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Descriptors kept back from the connection budget for everything else a process opens
/// (its store, certificate and resource files, upstream and API-server connections, logs).
pub const FD_RESERVE: u64 = 256;
/// How often a listener repeats that it is at a limit while it stays there.
pub const LIMIT_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How long an accept loop waits after `accept` fails (EMFILE and friends leave the
/// connection in the backlog, so retrying at once would spin).
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// The file-descriptor limits after [`raise_fd_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit before the raise.
    pub was: u64,
    /// The soft limit now.
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and logs both, so an operator sees at
/// start how many connections the process can hold (and that `LimitNOFILE=` took effect).
/// `None` (logged) when the limit cannot be read.
pub fn raise_fd_limit(program: &str) -> Option<FdLimit> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (was, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(program, error = %e, "cannot read the open-file limit");
            return None;
        }
    };
    let soft = if was < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(program, soft = was, hard, error = %e, "cannot raise the open-file limit to the hard limit");
                was
            }
        }
    } else {
        was
    };
    let limit = FdLimit { was, soft, hard };
    if soft < 4 * 1024 {
        tracing::warn!(program, soft, hard, "open-file limit is low: each connection holds a descriptor (two when relayed); set LimitNOFILE= (systemd) or ulimit -n to at least 65536");
    } else {
        tracing::info!(program, soft, was, hard, "open-file limit");
    }
    Some(limit)
}

/// The current soft `RLIMIT_NOFILE`.
pub fn fd_soft_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024)
}

/// How many connections a listener may hold when each costs `fds_per_connection`
/// descriptors: the soft limit less [`FD_RESERVE`], never less than one.
pub fn connection_budget(fds_per_connection: u64) -> usize {
    let budget = fd_soft_limit().saturating_sub(FD_RESERVE) / fds_per_connection.max(1);
    usize::try_from(budget.max(1)).unwrap_or(usize::MAX)
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// The listener's role ("grpc", "webhook", "outbound", "passthrough", …).
    pub listener: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcceptErrorLabels {
    pub listener: &'static str,
    /// "too_many_open_files", "out_of_memory" or "other".
    pub kind: &'static str,
}

/// The process's counters of limits reached; one set per process, added to each program's
/// registry by [`register`].
#[derive(Debug, Clone, Default)]
pub struct LimitMetrics {
    pub accept_errors: Family<AcceptErrorLabels, Counter>,
    pub at_limit: Family<ListenerLabels, Counter>,
}

/// The process's [`LimitMetrics`].
pub fn metrics() -> &'static LimitMetrics {
    static METRICS: OnceLock<LimitMetrics> = OnceLock::new();
    METRICS.get_or_init(LimitMetrics::default)
}

/// Adds the limit counters to a program's registry.
pub fn register(registry: &mut Registry) {
    let m = metrics();
    registry.register(
        "accept_errors",
        "accept() failures by listener and kind (too_many_open_files: raise LimitNOFILE)",
        m.accept_errors.clone(),
    );
    registry.register(
        "listener_at_limit",
        "Times a listener met its connection limit and closed or held back a new connection",
        m.at_limit.clone(),
    );
}

/// What `accept` failing means, as a metric label.
pub fn accept_error_kind(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(code) if code == nix::libc::EMFILE || code == nix::libc::ENFILE => {
            "too_many_open_files"
        }
        Some(code) if code == nix::libc::ENOMEM || code == nix::libc::ENOBUFS => "out_of_memory",
        _ => "other",
    }
}

/// A log line that is written at most once per [`LIMIT_LOG_INTERVAL`], saying how many
/// times it was held back in between.
#[derive(Debug, Default)]
pub struct Throttle(Mutex<ThrottleState>);

#[derive(Debug, Default)]
struct ThrottleState {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    pub const fn new() -> Self {
        Self(Mutex::new(ThrottleState {
            last: None,
            suppressed: 0,
        }))
    }

    /// Whether to log now; if so, how many occurrences were not logged since the last line.
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match s.last {
            Some(last) if now.duration_since(last) < LIMIT_LOG_INTERVAL => {
                s.suppressed += 1;
                None
            }
            _ => {
                s.last = Some(now);
                Some(std::mem::take(&mut s.suppressed))
            }
        }
    }
}

/// An accept loop's account of a failed `accept`: counted every time, logged at most once
/// per interval. The caller then waits [`ACCEPT_ERROR_BACKOFF`].
#[derive(Debug)]
pub struct AcceptErrors {
    listener: &'static str,
    throttle: Throttle,
}

impl AcceptErrors {
    pub fn new(listener: &'static str) -> Self {
        Self {
            listener,
            throttle: Throttle::default(),
        }
    }

    pub fn record(&self, e: &io::Error) {
        let kind = accept_error_kind(e);
        metrics()
            .accept_errors
            .get_or_create(&AcceptErrorLabels {
                listener: self.listener,
                kind,
            })
            .inc();
        if let Some(suppressed) = self.throttle.allow(Instant::now()) {
            if kind == "too_many_open_files" {
                tracing::warn!(listener = self.listener, error = %e, suppressed, soft_limit = fd_soft_limit(), "accept failed: out of file descriptors; new connections wait in the listen backlog (raise LimitNOFILE=)");
            } else {
                tracing::warn!(listener = self.listener, error = %e, suppressed, "accept failed");
            }
        }
    }
}

/// A listener's account of meeting its connection limit: counted every time, logged at most
/// once per interval with the limit and what happens to new connections.
#[derive(Debug)]
pub struct AtLimit {
    listener: &'static str,
    limit: usize,
    throttle: Throttle,
}

impl AtLimit {
    pub fn new(listener: &'static str, limit: usize) -> Self {
        Self {
            listener,
            limit,
            throttle: Throttle::default(),
        }
    }

    /// Counts one meeting of the limit; `consequence` says what the new connection gets
    /// ("closed", "waits in the listen backlog").
    pub fn record(&self, consequence: &'static str) {
        metrics()
            .at_limit
            .get_or_create(&ListenerLabels {
                listener: self.listener,
            })
            .inc();
        if let Some(suppressed) = self.throttle.allow(Instant::now()) {
            tracing::warn!(
                listener = self.listener,
                limit = self.limit,
                suppressed,
                soft_fd_limit = fd_soft_limit(),
                "connection limit reached: new connections {consequence}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_logs_once_per_interval_and_counts_the_rest() {
        let t = Throttle::default();
        let start = Instant::now();
        assert_eq!(t.allow(start), Some(0));
        assert_eq!(t.allow(start + Duration::from_millis(50)), None);
        assert_eq!(t.allow(start + Duration::from_millis(100)), None);
        assert_eq!(t.allow(start + LIMIT_LOG_INTERVAL), Some(2));
        assert_eq!(t.allow(start + LIMIT_LOG_INTERVAL), None);
    }

    #[test]
    fn accept_errors_are_classified() {
        let emfile = io::Error::from_raw_os_error(nix::libc::EMFILE);
        assert_eq!(accept_error_kind(&emfile), "too_many_open_files");
        let other = io::Error::from_raw_os_error(nix::libc::ECONNABORTED);
        assert_eq!(accept_error_kind(&other), "other");
    }

    #[test]
    fn the_raised_limit_is_the_hard_limit_and_budgets_follow_it() {
        let limit = raise_fd_limit("test").unwrap();
        assert!(limit.soft >= limit.was);
        assert_eq!(fd_soft_limit(), limit.soft);
        let one = connection_budget(1);
        let two = connection_budget(2);
        assert!(two <= one && two >= 1, "{one} {two}");
    }
}
