//! Start-up phase 7: the systemd supervisor. READY=1 once certificate, catalog (from the
//! registry or the snapshot), its capture and DNS are up; then, at the watchdog's pace, the
//! self-check: listeners accepting, the nftables table and its chains present, the
//! certificate unexpired. While it passes: WATCHDOG=1 and a STATUS line. While it fails: no
//! ping (so systemd restarts the agent, which reinstalls its rules, rather than the agent
//! quietly repairing a firewall someone else changed), `/healthz/ready` turns 503 (the
//! "data plane" part of readiness is held again) and STATUS says why.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use isthmus_proto::admin::Readiness;
use isthmus_proto::drain;
use isthmus_proto::program::Tasks;
use isthmus_proto::subscription::SyncState;
use isthmus_proto::tls::Credentials;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::capture::Capture;
use super::inputs::Inputs;
use crate::capture::{self, CapturePlan, CaptureProgress};
use crate::metrics::{AgentMetrics, Reason};
use crate::notify::Notifier;
use crate::registration::RegistrationState;

/// How often the data plane checks itself when systemd sets no watchdog.
const SELF_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// The readiness part held while the agent is not ready to serve: before the first catalog
/// and capture, and while the self-check fails.
pub(crate) const READY_PART: &str = "data plane";

struct Supervisor {
    notifier: Arc<Notifier>,
    readiness: Readiness,
    sync: watch::Receiver<Arc<SyncState>>,
    /// What the DNS proxy's name table answers from.
    dns: watch::Receiver<Arc<SyncState>>,
    registration: watch::Receiver<RegistrationState>,
    creds: watch::Receiver<Arc<Credentials>>,
    capture: Option<Arc<Mutex<CapturePlan>>>,
    accept_alive: Vec<AbortHandle>,
    capture_progress: watch::Receiver<CaptureProgress>,
    metrics: AgentMetrics,
    /// A pod's sidecar: not registered.
    pod: bool,
}

/// Starts the supervisor; `accept_alive` are the accepting tasks it watches.
pub(crate) fn start(
    cx: &Inputs,
    sync: &watch::Receiver<Arc<SyncState>>,
    dns: &watch::Receiver<Arc<SyncState>>,
    registration: &watch::Receiver<RegistrationState>,
    capture: &Capture,
    accept_alive: Vec<AbortHandle>,
    tasks: &mut Tasks,
) {
    let supervisor = Supervisor {
        notifier: cx.notifier.clone(),
        readiness: cx.readiness.clone(),
        sync: sync.clone(),
        dns: dns.clone(),
        registration: registration.clone(),
        creds: cx.creds.clone(),
        capture: capture.plan.clone(),
        accept_alive,
        capture_progress: capture.progress.clone(),
        metrics: cx.agent_metrics.clone(),
        pod: cx.config.pod.is_some(),
    };
    tasks.spawn("supervisor", supervisor.run(cx.shutdown.clone()));
}

impl Supervisor {
    /// Runs until `shutdown`.
    async fn run(self, shutdown: drain::Watch) {
        let stop = shutdown.signaled();
        tokio::pin!(stop);
        let interval = self
            .notifier
            .watchdog_interval()
            .map_or(SELF_CHECK_INTERVAL, |w| w.min(SELF_CHECK_INTERVAL));
        let mut announced = false;
        let mut not_ready = Some(self.readiness.part(READY_PART));
        let mut tick = tokio::time::interval(interval);
        let mut sync = self.sync.clone();
        let mut dns = self.dns.clone();
        let mut progress = self.capture_progress.clone();
        loop {
            match self.self_check().await {
                Ok(()) => {
                    self.metrics.data_plane_healthy.set(1);
                    if self.catalog_up() {
                        not_ready.take();
                        self.announce(&mut announced);
                    } else {
                        let _ = self
                            .notifier
                            .status("waiting for the first catalog from the registry");
                        let _ = self.notifier.watchdog();
                    }
                }
                Err((reason, why)) => {
                    self.unhealthy(reason, &why);
                    if not_ready.is_none() {
                        not_ready = Some(self.readiness.part(READY_PART));
                    }
                }
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => {}
                // Announce READY as soon as the first catalog and its capture are in place.
                r = sync.changed(), if !announced => if r.is_err() { return },
                r = dns.changed(), if !announced => if r.is_err() { return },
                r = progress.changed(), if !announced => if r.is_err() { return },
            }
        }
    }

    /// The catalog is in use (from the registry, or the snapshot the routing table
    /// follows), the DNS proxy answers from it, and its service addresses are captured: an
    /// app that resolves a name must get its address and find its connection redirected.
    fn catalog_up(&self) -> bool {
        let catalog =
            self.sync.borrow().synced() || !self.readiness.is_pending(super::catalog::READY_PART);
        // The name table is built from the catalog's current state (the DNS proxy passes a
        // state on once its table is built from it).
        let dns = Arc::ptr_eq(&self.dns.borrow(), &self.sync.borrow());
        catalog && dns && self.capture_progress.borrow().addresses.is_some()
    }

    /// READY=1 the first time, STATUS after; WATCHDOG=1 every time.
    fn announce(&self, announced: &mut bool) {
        let status = self.status_line();
        if !*announced {
            tracing::info!(status = %status, "ready");
            let _ = self.notifier.send(&[("READY", "1"), ("STATUS", &status)]);
            *announced = true;
        } else {
            let _ = self.notifier.status(&status);
        }
        let _ = self.notifier.watchdog();
    }

    fn unhealthy(&self, reason: &'static str, why: &str) {
        self.metrics.data_plane_healthy.set(0);
        self.metrics
            .data_plane_failures
            .get_or_create(&Reason {
                reason: reason.to_string(),
            })
            .inc();
        tracing::error!(reason, why = %why, "data plane unhealthy: not telling the watchdog");
        let _ = self.notifier.status(&format!("unhealthy: {why}"));
    }

    async fn self_check(&self) -> Result<(), (&'static str, String)> {
        if self.accept_alive.iter().any(|h| h.is_finished()) {
            return Err(("listener_stopped", "a listener stopped accepting".into()));
        }
        if let Some(plan) = &self.capture {
            let plan = plan.lock().expect("capture plan poisoned").clone();
            match tokio::task::spawn_blocking(move || capture::check(&plan)).await {
                Ok(Ok(())) => {}
                Ok(Err(why)) => return Err(("capture_rules", why)),
                Err(e) => return Err(("capture_rules", e.to_string())),
            }
        }
        let (remaining, _) = self.creds.borrow().leaf_validity().unwrap_or((0, 0));
        if remaining <= 0 {
            return Err((
                "certificate_expired",
                "the certificate expired and could not be renewed; is the registry reachable?"
                    .into(),
            ));
        }
        Ok(())
    }

    fn status_line(&self) -> String {
        let sync = self.sync.borrow().clone();
        let services = sync
            .view
            .resources
            .keys()
            .filter(|k| k.starts_with("svc/"))
            .count();
        let catalog = if sync.connected {
            format!("{services} services")
        } else {
            let age = sync
                .last_sync
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .map_or("?".into(), |d| format!("{}s", d.as_secs()));
            format!("{services} services from a {age} old view (registry unreachable)")
        };
        let reg = self.registration.borrow().clone();
        let entry = match (&reg.entry, reg.connected) {
            _ if self.pod => "a pod, known to the Kubernetes source".into(),
            (Some(e), true) => format!(
                "registered as {e} ({})",
                reg.health.as_deref().unwrap_or("?")
            ),
            (Some(e), false) => format!("re-registering {e}"),
            (None, _) => "registering".into(),
        };
        let (remaining, _) = self.creds.borrow().leaf_validity().unwrap_or((0, 0));
        format!(
            "{catalog}; {entry}; certificate valid {}h{:02}m",
            remaining / 3600,
            (remaining % 3600) / 60
        )
    }
}
