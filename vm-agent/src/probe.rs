//! The readiness probe of the VM's WorkloadGroup (Kubernetes semantics: `httpGet`,
//! `tcpSocket` or `exec`, every `periodSeconds`, each try bounded by `timeoutSeconds`,
//! healthy after `successThreshold` passes in a row, unhealthy after `failureThreshold`
//! failures in a row). Its verdict is what the agent reports on its registration stream.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use isthmus_proto::drain;
use isthmus_proto::model::{Probe, ProbeAction, WorkloadGroup};
use isthmus_proto::registration::HealthReport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::metrics::{AgentMetrics, Outcome};

/// Kubernetes' defaults for fields left at 0.
const DEFAULT_PERIOD: u32 = 10;
const DEFAULT_TIMEOUT: u32 = 1;
const DEFAULT_SUCCESS_THRESHOLD: u32 = 1;
const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
/// An HTTP probe reads the status line only; a response head longer than this is a failure.
const MAX_STATUS_LINE: usize = 1024;

/// The probe's settings with Kubernetes' defaults filled in.
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
            period: Duration::from_secs(or(p.period_seconds, DEFAULT_PERIOD).into()),
            timeout: Duration::from_secs(or(p.timeout_seconds, DEFAULT_TIMEOUT).into()),
            success_threshold: or(p.success_threshold, DEFAULT_SUCCESS_THRESHOLD),
            failure_threshold: or(p.failure_threshold, DEFAULT_FAILURE_THRESHOLD),
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
    let attempt = async {
        match action {
            ProbeAction::TcpSocket { host, port } => {
                let addr = target(host, app_host, *port)?;
                TcpStream::connect(addr)
                    .await
                    .map(drop)
                    .map_err(|e| format!("tcp {addr}: {e}"))
            }
            ProbeAction::HttpGet {
                path,
                port,
                host,
                scheme,
            } => {
                if !scheme.is_empty() && !scheme.eq_ignore_ascii_case("http") {
                    return Err(format!(
                        "httpGet scheme {scheme:?} is not supported; probe the app over HTTP"
                    ));
                }
                let addr = target(host, app_host, *port)?;
                http_get(addr, if path.is_empty() { "/" } else { path }).await
            }
            ProbeAction::Exec { command } => exec(command).await,
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

fn target(host: &str, app_host: IpAddr, port: u16) -> Result<SocketAddr, String> {
    let ip = if host.is_empty() {
        app_host
    } else {
        host.parse()
            .map_err(|_| format!("probe host {host:?} is not an IP address"))?
    };
    Ok(SocketAddr::new(ip, port))
}

async fn http_get(addr: SocketAddr, path: &str) -> Result<(), String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("GET http://{addr}{path}: {e}"))?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: isthmus-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("GET http://{addr}{path}: {e}"))?;
    let mut head = Vec::with_capacity(128);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') {
        let n = s
            .read(&mut buf)
            .await
            .map_err(|e| format!("GET http://{addr}{path}: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_STATUS_LINE {
            break;
        }
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or("");
    let code = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .filter(|_| line.starts_with("HTTP/"))
        .ok_or_else(|| format!("GET http://{addr}{path}: not an HTTP response"))?;
    // Kubernetes: 200 to 399 passes.
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("GET http://{addr}{path}: status {code}"))
    }
}

/// The exec probe's command: no stdin or stdout, stderr kept for the reason, and not the
/// agent's systemd variables (a probe must never ping the agent's watchdog).
fn exec_command(program: &str, args: &[String]) -> tokio::process::Command {
    let mut cmd = std::process::Command::new(program);
    crate::notify::without_notify_env(&mut cmd)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    cmd
}

async fn exec(command: &[String]) -> Result<(), String> {
    let Some((program, args)) = command.split_first() else {
        return Err("exec probe without a command".into());
    };
    let out = exec_command(program, args)
        .output()
        .await
        .map_err(|e| format!("exec {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim();
        Err(format!(
            "exec {program}: {}{}",
            out.status,
            if err.is_empty() {
                String::new()
            } else {
                format!(": {}", err.chars().take(200).collect::<String>())
            }
        ))
    }
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
        match (&result, was, healthy) {
            (Err(e), true, true) => tracing::debug!(error = %e, "readiness probe failed"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exec_probe_runs_without_the_agents_systemd_variables() {
        let cmd = exec_command("sh", &["-c".into(), "true".into()]);
        crate::notify::tests::assert_no_notify_env(cmd.as_std());
    }

    fn schedule(success: u32, failure: u32) -> Schedule {
        Schedule {
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_threshold: success,
            failure_threshold: failure,
        }
    }

    #[test]
    fn thresholds_count_consecutive_results() {
        let s = schedule(2, 3);
        let mut v = Verdict::new();
        assert!(!v.record(true, &s));
        assert!(v.record(true, &s));
        assert!(v.record(false, &s));
        assert!(v.record(false, &s));
        assert!(v.record(true, &s), "a pass resets the failure count");
        assert!(v.record(false, &s));
        assert!(v.record(false, &s));
        assert!(!v.record(false, &s), "three failures in a row");
        assert!(!v.record(true, &s));
        assert!(v.record(true, &s));
    }

    #[test]
    fn zero_fields_take_kubernetes_defaults() {
        let p = Probe {
            initial_delay_seconds: 0,
            period_seconds: 0,
            timeout_seconds: 0,
            success_threshold: 0,
            failure_threshold: 0,
            action: ProbeAction::Exec {
                command: vec!["true".into()],
            },
        };
        assert_eq!(
            Schedule::of(&p),
            Schedule {
                initial_delay: Duration::ZERO,
                period: Duration::from_secs(10),
                timeout: Duration::from_secs(1),
                success_threshold: 1,
                failure_threshold: 3,
            }
        );
    }

    #[tokio::test]
    async fn http_tcp_and_exec_probes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable", "200 OK"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                // The TCP probe closes without a request: no answer needed, none checked.
                let _ = s.read(&mut buf).await;
                let resp = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let get = ProbeAction::HttpGet {
            path: "/healthz".into(),
            port,
            host: String::new(),
            scheme: "HTTP".into(),
        };
        let t = Duration::from_secs(5);
        assert_eq!(try_once(&get, local, t).await, Ok(()));
        let err = try_once(&get, local, t).await.unwrap_err();
        assert!(err.contains("status 503"), "{err}");
        let tcp = ProbeAction::TcpSocket {
            host: String::new(),
            port,
        };
        assert_eq!(try_once(&tcp, local, t).await, Ok(()));
        server.await.unwrap();
        let err = try_once(&tcp, local, t).await.unwrap_err();
        assert!(err.contains("refused"), "{err}");
        let ok = ProbeAction::Exec {
            command: vec!["true".into()],
        };
        assert_eq!(try_once(&ok, local, t).await, Ok(()));
        let fail = ProbeAction::Exec {
            command: vec!["sh".into(), "-c".into(), "echo broken >&2; exit 3".into()],
        };
        let err = try_once(&fail, local, t).await.unwrap_err();
        assert!(err.contains("broken"), "{err}");
        let https = ProbeAction::HttpGet {
            path: "/".into(),
            port,
            host: String::new(),
            scheme: "HTTPS".into(),
        };
        assert!(try_once(&https, local, t)
            .await
            .unwrap_err()
            .contains("not supported"));
    }
}
