//! The readiness probe of the VM's WorkloadGroup, with Kubernetes' semantics: `httpGet` (HTTP
//! or HTTPS, [`http`]), `tcpSocket`, `exec` ([`exec`]) or `grpc` health checking ([`grpc`]),
//! every `periodSeconds`, each try bounded by `timeoutSeconds`, healthy after
//! `successThreshold` passes in a row, unhealthy after `failureThreshold` failures in a row.
//! Its verdict, with the last failure's reason, is what the agent reports on its
//! registration stream and shows in `/config_dump` (`app_health`).

mod exec;
mod grpc;
mod http;
#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use isthmus_proto::drain;
use isthmus_proto::model::{Probe, ProbeAction, WorkloadGroup};
use isthmus_proto::registration::HealthReport;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::metrics::{AgentMetrics, Outcome};

/// What a 0 on the wire means (Istio's agent's reading: proto3 cannot tell 0 from unset).
/// The registry fills every field, so these apply only to a probe from elsewhere.
const ZERO_PERIOD: u32 = 10;
const ZERO_TIMEOUT: u32 = 1;
/// Thresholds have a minimum of 1.
const ZERO_THRESHOLD: u32 = 1;

/// The probe's settings, a 0 read as Istio's agent reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl Schedule {
    pub fn of(p: &Probe) -> Self {
        let or = |v: u32, d: u32| if v == 0 { d } else { v };
        Self {
            initial_delay: Duration::from_secs(p.initial_delay_seconds.into()),
            period: Duration::from_secs(or(p.period_seconds, ZERO_PERIOD).into()),
            timeout: Duration::from_secs(or(p.timeout_seconds, ZERO_TIMEOUT).into()),
            success_threshold: or(p.success_threshold, ZERO_THRESHOLD),
            failure_threshold: or(p.failure_threshold, ZERO_THRESHOLD),
        }
    }
}

/// Consecutive results turned into a verdict: the thresholds, Kubernetes' way.
#[derive(Debug, Clone)]
pub struct Verdict {
    healthy: bool,
    successes: u32,
    failures: u32,
}

impl Verdict {
    /// A probed app starts unhealthy until it passes.
    pub fn new() -> Self {
        Self::starting(false)
    }

    pub fn starting(healthy: bool) -> Self {
        Self {
            healthy,
            successes: 0,
            failures: 0,
        }
    }

    /// Records one try; returns the verdict after it.
    pub fn record(&mut self, passed: bool, s: &Schedule) -> bool {
        if passed {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if self.successes >= s.success_threshold {
                self.healthy = true;
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.failures >= s.failure_threshold {
                self.healthy = false;
            }
        }
        self.healthy
    }
}

impl Default for Verdict {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs one try of `action` against the app on `app_host`; `Err` says why it failed.
pub async fn try_once(
    action: &ProbeAction,
    app_host: IpAddr,
    timeout: Duration,
) -> Result<(), String> {
    // The exec probe keeps its own time, so that on timeout it kills what it started.
    if let ProbeAction::Exec { command } = action {
        return exec::run(command, timeout).await;
    }
    let attempt = async {
        match action {
            ProbeAction::TcpSocket { host, port } => connect(host, app_host, *port).await.map(drop),
            ProbeAction::HttpGet {
                path,
                port,
                host,
                scheme,
                headers,
            } => {
                http::HttpGet {
                    path,
                    port: *port,
                    host,
                    scheme: *scheme,
                    headers,
                }
                .run(app_host)
                .await
            }
            ProbeAction::Grpc { port, service } => {
                grpc::check(app_host, *port, service, timeout).await
            }
            ProbeAction::Exec { .. } => unreachable!("run above"),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "{}: no answer within {timeout:?}",
            describe(action, app_host)
        )),
    }
}

/// What a probe tries, for a reason that names it.
fn describe(action: &ProbeAction, app_host: IpAddr) -> String {
    let at = |host: &str, port: &u16| {
        if host.is_empty() {
            SocketAddr::new(app_host, *port).to_string()
        } else {
            format!("{host}:{port}")
        }
    };
    match action {
        ProbeAction::HttpGet {
            path,
            port,
            host,
            scheme,
            headers,
        } => {
            let get = http::HttpGet {
                path,
                port: *port,
                host,
                scheme: *scheme,
                headers,
            };
            format!("GET {}", get.url(app_host))
        }
        ProbeAction::TcpSocket { host, port } => format!("tcp {}", at(host, port)),
        ProbeAction::Grpc { port, .. } => format!("grpc health {}", at("", port)),
        ProbeAction::Exec { command } => format!("exec {}", command.join(" ")),
    }
}

/// Connects to the app's host, or to `host` when the probe names one (an address, or a name
/// resolved now, every address tried in turn).
async fn connect(host: &str, app_host: IpAddr, port: u16) -> Result<TcpStream, String> {
    let addrs = if host.is_empty() {
        vec![SocketAddr::new(app_host, port)]
    } else if let Ok(ip) = host.parse::<IpAddr>() {
        vec![SocketAddr::new(ip, port)]
    } else {
        let name = host.trim_end_matches('.');
        tokio::net::lookup_host((name, port))
            .await
            .map_err(|e| format!("cannot resolve {name}: {e}"))?
            .collect()
    };
    let mut last = format!("{host} resolves to no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("tcp {addr}: {e}"),
        }
    }
    Err(last)
}

/// Probes the app as the group says, publishing every change of verdict into `health`,
/// until `shutdown`. Follows `group`: a new probe takes effect at once. Without a probe
/// the app counts as healthy.
pub async fn run(
    mut group: watch::Receiver<Option<WorkloadGroup>>,
    app_host: IpAddr,
    health: watch::Sender<HealthReport>,
    metrics: AgentMetrics,
    shutdown: drain::Watch,
) {
    let stop = shutdown.signaled();
    tokio::pin!(stop);
    loop {
        let template = group.borrow_and_update().clone();
        let follow = async {
            match template {
                // Until the registry (or a kept copy) says what to probe, the app is not
                // known to be ready.
                None => {
                    metrics.app_healthy.set(0);
                    publish(&health, false, "waiting for the WorkloadGroup template");
                    std::future::pending::<()>().await
                }
                Some(WorkloadGroup { probe: None, .. }) => {
                    metrics.app_healthy.set(1);
                    publish(&health, true, "the WorkloadGroup has no readiness probe");
                    std::future::pending::<()>().await
                }
                Some(WorkloadGroup { probe: Some(p), .. }) => {
                    probe_loop(&p, app_host, &health, &metrics).await
                }
            }
        };
        tokio::select! {
            _ = &mut stop => return,
            r = group.changed() => if r.is_err() { return },
            _ = follow => {}
        }
    }
}

async fn probe_loop(
    p: &Probe,
    app_host: IpAddr,
    health: &watch::Sender<HealthReport>,
    metrics: &AgentMetrics,
) {
    let s = Schedule::of(p);
    // A changed probe carries on from the current verdict rather than flapping.
    let mut verdict = Verdict::starting(health.borrow().healthy);
    if !health.borrow().healthy {
        publish(health, false, "waiting for the readiness probe");
    }
    tokio::time::sleep(s.initial_delay).await;
    let mut tick = tokio::time::interval(s.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The last failure logged at warn: the same reason again is logged at debug only, so a
    // probe failing every period for hours says so once (and again when the reason changes).
    let mut logged: Option<String> = None;
    loop {
        tick.tick().await;
        let result = try_once(&p.action, app_host, s.timeout).await;
        metrics
            .probes
            .get_or_create(&if result.is_ok() {
                Outcome::ok()
            } else {
                Outcome::error()
            })
            .inc();
        let was = health.borrow().healthy;
        let healthy = verdict.record(result.is_ok(), &s);
        metrics.app_healthy.set(healthy as i64);
        match &result {
            Err(e) if logged.as_deref() != Some(e.as_str()) => {
                tracing::warn!(error = %e, healthy, "readiness probe failed");
                logged = Some(e.clone());
            }
            Err(e) => tracing::debug!(error = %e, healthy, "readiness probe failed"),
            Ok(()) => logged = None,
        }
        match (&result, was, healthy) {
            (Err(e), _, false) => {
                if was {
                    tracing::warn!(error = %e, "readiness probe: app unhealthy");
                }
                publish(health, false, e);
            }
            (Ok(()), false, true) => {
                tracing::info!("readiness probe: app healthy");
                publish(health, true, "readiness probe passed");
            }
            _ => {}
        }
    }
}

fn publish(health: &watch::Sender<HealthReport>, healthy: bool, reason: &str) {
    health.send_if_modified(|h| {
        let changed = h.healthy != healthy || h.reason != reason;
        *h = HealthReport {
            healthy,
            reason: reason.to_string(),
        };
        changed
    });
}
