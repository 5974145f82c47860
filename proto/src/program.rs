//! What every isthmus program does around its own work, written once: bind a listener with an
//! error that names what it is for, say when the process is ready by named parts, run until
//! SIGTERM/SIGINT, then stop in order (not ready, stop accepting, let in-flight work finish
//! until a deadline, stop the rest) and join every task within a bound.
//!
//! A program's `app::run` binds, starts its tasks into [`Tasks`], and returns a handle whose
//! `shutdown` is a [`Stop`]; `main.rs` calls [`run_until_signal`] on it.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::drain;

/// How long a task gets to finish once told to stop before it is aborted and named in the
/// log. Tasks other than the data path only have to notice a signal and return.
pub const TASK_STOP_DEADLINE: Duration = Duration::from_secs(5);

/// A listener that could not be bound, with what it was for and where.
#[derive(Debug, thiserror::Error)]
// The I/O error is part of the message, not a `source()`: printing the error chain would
// otherwise say the cause twice.
#[error("cannot listen for {what} on {addr}: {error}{hint}")]
pub struct BindError {
    pub what: &'static str,
    pub addr: SocketAddr,
    pub error: std::io::Error,
    hint: &'static str,
}

/// Binds a TCP listener for `what` (the listener's role, e.g. "SNI passthrough"). Programs
/// bind every port before they talk to anyone, so a port in use fails the start at once.
pub async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|error| {
        let hint = match error.kind() {
            std::io::ErrorKind::AddrInUse => {
                " (another process holds the port: stop it or choose another address)"
            }
            std::io::ErrorKind::AddrNotAvailable => {
                " (the address is not on this host: use one of its addresses or 0.0.0.0)"
            }
            std::io::ErrorKind::PermissionDenied => {
                " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
            }
            _ => "",
        };
        BindError {
            what,
            addr,
            error,
            hint,
        }
    })
}

/// Binds `addr` for `what` when it is set; `None` leaves that listener off.
pub async fn bind_optional(
    addr: Option<SocketAddr>,
    what: &'static str,
) -> Result<Option<TcpListener>, BindError> {
    match addr {
        Some(a) => bind(a, what).await.map(Some),
        None => Ok(None),
    }
}

/// Whether the process is ready to serve, by named parts: it is ready when no part is
/// pending and it is not draining. Start-up takes a [`ReadyPart`] for each thing it waits
/// for ("catalog", "dns", "capture", …) and drops it (or calls [`ReadyPart::ready`]) when
/// that thing is up; `/readyz` names the parts still pending.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<ReadinessInner>);

#[derive(Debug, Default)]
struct ReadinessInner {
    /// Part name -> how many holders have not yet reported it ready.
    pending: Mutex<BTreeMap<String, usize>>,
    /// Part name -> how many holders report it down without taking the process out of
    /// service (what it still serves is worth more than nothing).
    degraded: Mutex<BTreeMap<String, usize>>,
    draining: AtomicBool,
}

impl Readiness {
    /// A part the process waits for until the returned guard is dropped.
    pub fn part(&self, name: &str) -> ReadyPart {
        *self.pending().entry(name.to_string()).or_insert(0) += 1;
        ReadyPart {
            readiness: self.clone(),
            name: name.to_string(),
            degraded: false,
        }
    }

    /// A part that is down until the returned guard is dropped, but that leaves the
    /// process ready: `/readyz` stays 200 and names it ("ready; degraded: …").
    pub fn degraded(&self, name: &str) -> ReadyPart {
        *self.degraded_map().entry(name.to_string()).or_insert(0) += 1;
        ReadyPart {
            readiness: self.clone(),
            name: name.to_string(),
            degraded: true,
        }
    }

    /// The degraded parts, in name order.
    pub fn degraded_parts(&self) -> Vec<String> {
        self.degraded_map().keys().cloned().collect()
    }

    /// Ready when no part is pending and the process is not draining.
    pub fn is_ready(&self) -> bool {
        !self.0.draining.load(Ordering::SeqCst) && self.pending().is_empty()
    }

    /// Whether `name` is still pending.
    pub fn is_pending(&self, name: &str) -> bool {
        self.pending().contains_key(name)
    }

    /// The parts still pending, in name order.
    pub fn pending_parts(&self) -> Vec<String> {
        self.pending().keys().cloned().collect()
    }

    /// Not ready from now on: the process is stopping.
    pub fn drain(&self) {
        self.0.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::SeqCst)
    }

    /// One line for `/readyz` and logs: `ready`, `ready; degraded: a`, `draining`, or
    /// `waiting for a, b`.
    pub fn describe(&self) -> String {
        if self.is_draining() {
            return "draining".to_string();
        }
        let pending = self.pending_parts();
        let degraded = self.degraded_parts();
        match (pending.is_empty(), degraded.is_empty()) {
            (true, true) => "ready".to_string(),
            (true, false) => format!("ready; degraded: {}", degraded.join(", ")),
            (false, _) => format!("waiting for {}", pending.join(", ")),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, usize>> {
        // The map is only ever updated in one step under the lock; a panic elsewhere
        // cannot leave it half-written.
        self.0
            .pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn degraded_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, usize>> {
        self.0
            .degraded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One pending part of [`Readiness`]; the part is ready once this is dropped.
#[derive(Debug)]
pub struct ReadyPart {
    readiness: Readiness,
    name: String,
    degraded: bool,
}

impl ReadyPart {
    /// Reports the part ready (the same as dropping it; reads better at the call site).
    pub fn ready(self) {}
}

impl Drop for ReadyPart {
    fn drop(&mut self) {
        let mut pending = if self.degraded {
            self.readiness.degraded_map()
        } else {
            self.readiness.pending()
        };
        if let Some(n) = pending.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                pending.remove(&self.name);
            }
        }
    }
}

/// A program's tasks, each with a name, joined within a bound on the way out.
#[derive(Debug, Default)]
pub struct Tasks(Vec<(&'static str, JoinHandle<()>)>);

impl Tasks {
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.0.push((name, tokio::spawn(task)));
    }

    /// Adds a task that is already running.
    pub fn push(&mut self, name: &'static str, task: JoinHandle<()>) {
        self.0.push((name, task));
    }

    /// Waits for every task, all within one `deadline`; a task still running then is
    /// aborted and named in the log, one that panicked is named with its panic.
    pub async fn join(self, deadline: Duration) {
        let until = tokio::time::Instant::now() + deadline;
        for (name, mut task) in self.0 {
            match tokio::time::timeout_at(until, &mut task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) if e.is_panic() => {
                    tracing::error!(task = name, error = %e, "task panicked");
                }
                Ok(Err(_)) => {}
                Err(_) => {
                    tracing::warn!(task = name, ?deadline, "task did not stop in time; aborted");
                    task.abort();
                }
            }
        }
    }
}

/// The order every program stops in. It owns two triggers: one that stops accepting (the
/// listeners' tasks) and one that stops everything else (control plane, admin, health).
#[derive(Debug)]
pub struct Stop {
    pub readiness: Readiness,
    /// Fired first: listeners stop accepting.
    pub accept: drain::Trigger,
    pub accepting: Tasks,
    /// Fired once in-flight work is done or its deadline passed.
    pub rest: drain::Trigger,
    pub tasks: Tasks,
}

impl Stop {
    /// Not ready, stop accepting, wait for `in_flight` (the program's own drain of open
    /// connections or requests, bounded by its deadline), then stop and join the rest.
    pub async fn run<F: Future>(self, in_flight: F) -> F::Output {
        self.readiness.drain();
        self.accept.fire();
        self.accepting.join(TASK_STOP_DEADLINE).await;
        let out = in_flight.await;
        self.rest.fire();
        self.tasks.join(TASK_STOP_DEADLINE).await;
        out
    }
}

/// A running program: something that can be told to stop and stops in order.
pub trait Program {
    fn shutdown(self) -> impl Future<Output = ()> + Send;
}

/// Runs `program` until SIGTERM or SIGINT, then shuts it down.
pub async fn run_until_signal<P: Program>(program: P) {
    drain::os_signal().await;
    tracing::info!("signal received: shutting down");
    program.shutdown().await;
}

/// How big a program's runtime is; the defaults are a worker per core the process may run
/// on (its CPU affinity and cgroup quota) and tokio's 512 blocking threads.
#[derive(Debug, Clone, Copy, Default)]
pub struct RuntimeSize {
    pub worker_threads: Option<usize>,
    /// Bounds the pool that blocking work (files, `nft`) runs on.
    pub max_blocking_threads: Option<usize>,
}

impl RuntimeSize {
    /// The workers the runtime will have: as given (at least one), or one per core the
    /// process may run on.
    fn workers(&self) -> usize {
        self.worker_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1)
    }
}

/// The runtime every program runs on. With one worker it is tokio's current-thread
/// scheduler: every task runs on the thread that called `block_on`, so a connection's
/// wake-ups never cross threads and no work-stealing queues are paid for. That costs a
/// proxy measurably less CPU per connection than the multi-thread scheduler with one
/// worker (ARCHITECTURE.md of the proxy core has the figures). With more workers it is the
/// multi-thread scheduler. Blocking work goes to the blocking pool either way.
pub fn runtime(size: RuntimeSize) -> std::io::Result<tokio::runtime::Runtime> {
    let workers = size.workers();
    let mut b = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    b.enable_all();
    if let Some(n) = size.max_blocking_threads {
        b.max_blocking_threads(n.max(1));
    }
    b.build()
}

/// An error with its causes (`connecting: transport error: Connection refused`), which say
/// what actually went wrong; a cause whose text the message already holds is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Ends a program's `main`: success exits 0; an error is printed once on stderr as
/// `program: what failed: why` (each cause once, through [`error_chain`], and no backtrace:
/// the reader is an operator) and exits 1.
pub fn exit(program: &str, result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {}", error_chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_the_message_already_holds_is_said_once() {
        let not_found = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = anyhow::Error::new(not_found())
            .context(format!("cannot read /etc/x: {}", not_found()))
            .context("loading the bundle");
        assert_eq!(
            error_chain(e.as_ref()),
            format!("loading the bundle: cannot read /etc/x: {}", not_found())
        );
        let e = anyhow::Error::new(not_found()).context("cannot read /etc/x");
        assert_eq!(
            error_chain(e.as_ref()),
            format!("cannot read /etc/x: {}", not_found())
        );
    }

    #[test]
    fn ready_once_every_part_is() {
        let r = Readiness::default();
        assert!(r.is_ready(), "no parts: ready");
        let catalog = r.part("catalog");
        let dns = r.part("dns");
        assert!(!r.is_ready());
        assert_eq!(r.describe(), "waiting for catalog, dns");
        catalog.ready();
        assert_eq!(r.pending_parts(), vec!["dns".to_string()]);
        assert!(r.is_pending("dns") && !r.is_pending("catalog"));
        drop(dns);
        assert!(r.is_ready());
        assert_eq!(r.describe(), "ready");
        r.drain();
        assert!(!r.is_ready());
        assert_eq!(r.describe(), "draining");
    }

    #[test]
    fn a_part_held_twice_is_pending_until_both_report() {
        let r = Readiness::default();
        let a = r.part("listeners");
        let b = r.part("listeners");
        drop(a);
        assert!(!r.is_ready());
        drop(b);
        assert!(r.is_ready());
    }

    #[tokio::test]
    async fn bind_names_the_listener_and_the_cause() {
        let held = bind("127.0.0.1:0".parse().unwrap(), "admin").await.unwrap();
        let addr = held.local_addr().unwrap();
        let err = bind(addr, "SNI passthrough").await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("SNI passthrough"), "{msg}");
        assert!(msg.contains(&addr.to_string()), "{msg}");
        assert!(msg.contains("another process holds the port"), "{msg}");
        // The cause is said once: it is in the message, not a second link of the chain.
        assert!(std::error::Error::source(&err).is_none());
        assert_eq!(msg.matches("in use").count(), 1, "{msg}");
    }

    #[tokio::test]
    async fn a_task_that_ignores_stop_is_aborted_at_the_deadline() {
        let mut tasks = Tasks::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn("stubborn", async move {
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        tasks.spawn("quick", async {});
        tasks.join(Duration::from_millis(50)).await;
        // The stubborn task was aborted: its end of the channel is gone.
        assert!(rx.await.is_err());
    }

    #[tokio::test]
    async fn stop_runs_in_order() {
        let readiness = Readiness::default();
        let (accept, accept_watch) = drain::channel();
        let (rest, rest_watch) = drain::channel();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut accepting = Tasks::default();
        let o = order.clone();
        accepting.spawn("listener", async move {
            accept_watch.signaled().await;
            o.lock().unwrap().push("stopped accepting");
        });
        let mut tasks = Tasks::default();
        let o = order.clone();
        tasks.spawn("admin", async move {
            rest_watch.signaled().await;
            o.lock().unwrap().push("stopped the rest");
        });
        let stop = Stop {
            readiness: readiness.clone(),
            accept,
            accepting,
            rest,
            tasks,
        };
        let o = order.clone();
        let r = readiness.clone();
        stop.run(async move {
            assert!(!r.is_ready(), "not ready while draining");
            o.lock().unwrap().push("drained");
        })
        .await;
        assert_eq!(
            *order.lock().unwrap(),
            vec!["stopped accepting", "drained", "stopped the rest"]
        );
    }

    #[test]
    fn one_worker_runs_every_task_on_the_calling_thread() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::runtime::RuntimeFlavor;

        let rt = runtime(RuntimeSize {
            worker_threads: Some(1),
            max_blocking_threads: Some(2),
        })
        .unwrap();
        let caller = std::thread::current().id();
        let (flavor, task_thread, echoed, blocking) = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 4];
                s.read_exact(&mut buf).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
                s.write_all(&buf).await.unwrap();
                std::thread::current().id()
            });
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(b"ping").await.unwrap();
            let mut back = [0u8; 4];
            c.read_exact(&mut back).await.unwrap();
            let blocking = tokio::task::spawn_blocking(|| std::thread::current().id())
                .await
                .unwrap();
            let flavor = tokio::runtime::Handle::current().runtime_flavor();
            (flavor, server.await.unwrap(), back, blocking)
        });
        assert_eq!(flavor, RuntimeFlavor::CurrentThread);
        assert_eq!(task_thread, caller, "a spawned task ran on another thread");
        assert_eq!(&echoed, b"ping");
        assert_ne!(
            blocking, caller,
            "blocking work ran on the runtime's thread"
        );
    }

    #[test]
    fn more_workers_run_the_multi_thread_scheduler() {
        let size = RuntimeSize {
            worker_threads: Some(2),
            max_blocking_threads: None,
        };
        assert_eq!(size.workers(), 2);
        let rt = runtime(size).unwrap();
        assert_eq!(
            rt.handle().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::MultiThread
        );
        assert_eq!(rt.metrics().num_workers(), 2);
        let zero = RuntimeSize {
            worker_threads: Some(0),
            max_blocking_threads: None,
        };
        assert_eq!(zero.workers(), 1, "zero workers is read as one");
        assert!(RuntimeSize::default().workers() >= 1);
    }
}
