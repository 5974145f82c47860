//! The VM's registration: one Registration stream to the registry that registers the VM's
//! WorkloadEntry from its group, reports every change of the probe's verdict, and holds
//! the entry's lease while it is open. When it breaks the agent reconnects with back-off
//! (within the registry's grace period the entry is kept); on shutdown it deregisters, so
//! the entry leaves the views at once.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use isthmus_proto::backoff::Backoff;
use isthmus_proto::drain;
use isthmus_proto::model::{Health, WorkloadGroup};
use isthmus_proto::pb;
use isthmus_proto::registration::{HealthReport, Hello, Registrar};
use isthmus_proto::subscription::RegistrySettings;
use isthmus_proto::tls::Credentials;
use serde::Serialize;
use tokio::sync::watch;

use crate::capture::CaptureProgress;
use crate::metrics::{AgentMetrics, Outcome};

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long shutdown waits for the registry to acknowledge the Deregister.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(3);

/// What the registration stream is doing, for `/config_dump` and STATUS lines.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RegistrationState {
    pub connected: bool,
    pub entry: Option<String>,
    pub namespace: Option<String>,
    /// The entry's health in the catalog, as last acknowledged.
    pub health: Option<String>,
    pub resumed: bool,
    pub warnings: Vec<String>,
    pub last_error: Option<String>,
    /// Streams opened so far.
    pub registrations: u64,
    /// The registry of the `--registry` set the stream is open to (or was, last).
    pub registry: Option<String>,
}

/// The address the VM registers: the source address of the route towards the registry
/// (the first of a set that resolves; no packet is sent, a UDP socket's connect only picks
/// the route).
pub fn detect_address(registry: &str) -> std::io::Result<IpAddr> {
    use std::net::ToSocketAddrs;
    let mut last = None;
    let mut target = None;
    for entry in isthmus_proto::registries::entries(registry) {
        match entry.to_socket_addrs() {
            Ok(mut addrs) => {
                if let Some(a) = addrs.next() {
                    target = Some(a);
                    break;
                }
            }
            Err(e) => last = Some(e),
        }
    }
    let target: SocketAddr = match (target, last) {
        (Some(t), _) => t,
        (None, Some(e)) => return Err(e),
        (None, None) => {
            return Err(std::io::Error::other(format!(
                "{registry} does not resolve to an address"
            )))
        }
    };
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let s = UdpSocket::bind(bind)?;
    s.connect(target)?;
    Ok(s.local_addr()?.ip())
}

/// Everything the registration task needs.
pub struct Registration {
    pub registry: RegistrySettings,
    pub hello: Hello,
    pub creds: watch::Receiver<Arc<Credentials>>,
    pub health: watch::Receiver<HealthReport>,
    /// Where the group template from the registry goes (the probe and the app's ports).
    pub group: watch::Sender<Option<WorkloadGroup>>,
    /// Where the last group template is kept for starts without the registry.
    pub group_path: PathBuf,
    pub state: watch::Sender<RegistrationState>,
    pub metrics: AgentMetrics,
    /// What capture covers: the first health report waits (bounded) until the group's app
    /// ports are captured, so peers never reach the app around the agent.
    pub captured: watch::Receiver<CaptureProgress>,
}

/// How long the first health report waits for the app's ports to be captured.
const CAPTURE_WAIT: Duration = Duration::from_secs(5);

impl Registration {
    /// Runs until `shutdown`, then deregisters (bounded by [`DEREGISTER_TIMEOUT`]).
    pub async fn run(mut self, shutdown: drain::Watch) {
        let stop = shutdown.signaled();
        tokio::pin!(stop);
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        loop {
            let opened = tokio::select! {
                _ = &mut stop => return,
                r = self.open() => r,
            };
            let mut registrar = match opened {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff.peek(), "cannot register with the registry");
                    self.metrics
                        .registration_attempts
                        .get_or_create(&Outcome::error())
                        .inc();
                    self.state.send_modify(|s| {
                        s.connected = false;
                        s.last_error = Some(e);
                    });
                    tokio::select! {
                        _ = &mut stop => return,
                        _ = backoff.wait() => {}
                    }
                    continue;
                }
            };
            backoff.reset();
            self.metrics
                .registration_attempts
                .get_or_create(&Outcome::ok())
                .inc();
            self.metrics.registered.set(1);
            let ended = self.hold(&mut registrar, &mut stop).await;
            self.metrics.registered.set(0);
            match ended {
                Some(why) => {
                    // Another registry of the set first: the entry is under the lost one's
                    // lease only until the grace period ends.
                    let set = &self.registry.addr;
                    if let Some(addr) = isthmus_proto::registries::followed(set) {
                        isthmus_proto::registries::lost(set, &addr);
                    }
                    tracing::warn!(reason = %why, "registration stream lost; registering again");
                    self.state.send_modify(|s| {
                        s.connected = false;
                        s.last_error = Some(why);
                    });
                }
                None => {
                    self.deregister(registrar).await;
                    return;
                }
            }
        }
    }

    /// Holds the stream, reporting every change of verdict, until it breaks (`Some(why)`)
    /// or we stop (`None`).
    async fn hold<S: Future<Output = ()>>(
        &mut self,
        registrar: &mut Registrar,
        stop: &mut Pin<&mut S>,
    ) -> Option<String> {
        loop {
            tokio::select! {
                _ = stop.as_mut() => return None,
                status = registrar.closed() => return Some(format!("the registry ended the registration stream: {}", status.message())),
                r = self.health.changed() => {
                    if r.is_err() {
                        return None;
                    }
                    let report = self.health.borrow_and_update().clone();
                    match registrar.health(report.healthy, &report.reason).await {
                        Ok(ack) => {
                            self.state.send_modify(|s| {
                                s.health = Some(health_str(ack.health).into());
                                s.warnings = ack.warnings.clone();
                            });
                        }
                        Err(status) => return Some(format!("health report refused: {}", status.message())),
                    }
                }
            }
        }
    }

    /// Deregisters (bounded by [`DEREGISTER_TIMEOUT`]): the entry leaves the views at once.
    async fn deregister(&mut self, registrar: Registrar) {
        match tokio::time::timeout(DEREGISTER_TIMEOUT, registrar.deregister()).await {
            Ok(Ok(_)) => tracing::info!("deregistered"),
            Ok(Err(s)) => {
                tracing::warn!(error = %s.message(), "deregistration refused; the registry removes the entry after its grace period")
            }
            Err(_) => {
                tracing::warn!("no answer to the deregistration; the registry removes the entry after its grace period")
            }
        }
        self.state.send_modify(|s| s.connected = false);
    }

    /// Opens a stream with the current credentials and registers; then reports the
    /// current verdict at once, since the registry may hold an older one.
    async fn open(&mut self) -> Result<Registrar, String> {
        let creds = self.creds.borrow().clone();
        let channel = self
            .registry
            .connect(Some(&creds))
            .await
            .map_err(|e| e.to_string())?;
        let mut registrar = Registrar::register(channel, &self.hello)
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        let ack = registrar.ack.clone();
        for w in &ack.warnings {
            tracing::warn!(warning = %w, "the registry ignored part of the registration");
        }
        tracing::info!(entry = %ack.entry_name, namespace = %ack.namespace, resumed = ack.resumed, "registered");
        if let Some(group) = ack.group.clone() {
            self.keep_group(&group);
            let ports = app_ports(Some(&group));
            self.group.send_if_modified(|g| {
                let changed = g.as_ref() != Some(&group);
                *g = Some(group);
                changed
            });
            let captured = tokio::time::timeout(
                CAPTURE_WAIT,
                self.captured
                    // Without capture (`ports: None` once settled) there is nothing to wait for.
                    .wait_for(|c| match &c.ports {
                        Some(p) => *p == ports,
                        None => c.addresses.is_some(),
                    }),
            )
            .await;
            if captured.is_err() {
                tracing::warn!(
                    ?ports,
                    "the app's ports are not captured yet; reporting health anyway"
                );
            }
        }
        let report = self.health.borrow_and_update().clone();
        let health = registrar
            .health(report.healthy, &report.reason)
            .await
            .map_err(|s| format!("health report refused: {}", s.message()))?
            .health;
        self.state.send_modify(|s| {
            s.connected = true;
            s.entry = Some(ack.entry_name.clone());
            s.namespace = Some(ack.namespace.clone());
            s.health = Some(health_str(health).into());
            s.resumed = ack.resumed;
            s.warnings = ack.warnings.clone();
            s.last_error = None;
            s.registrations += 1;
            s.registry = isthmus_proto::registries::followed(&self.registry.addr);
        });
        Ok(registrar)
    }

    fn keep_group(&self, group: &WorkloadGroup) {
        use prost::Message;
        let bytes = pb::WorkloadGroup::from(group).encode_to_vec();
        if let Err(e) = isthmus_proto::certs::write_atomic(&self.group_path, &bytes, 0o600) {
            tracing::warn!(error = %e, "cannot keep the WorkloadGroup template for starts without the registry");
        }
    }
}

/// The group template an earlier run kept, if any (a damaged file is ignored with a warning).
pub fn load_group(path: &std::path::Path) -> Option<WorkloadGroup> {
    use prost::Message;
    let bytes = std::fs::read(path).ok()?;
    match pb::WorkloadGroup::decode(bytes.as_slice())
        .map_err(|e| e.to_string())
        .and_then(|g| WorkloadGroup::try_from(g).map_err(|e| e.to_string()))
    {
        Ok(g) => Some(g),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "ignoring the kept WorkloadGroup template");
            None
        }
    }
}

/// The app ports of a group template, deduplicated and sorted: what capture redirects
/// inbound (or, without capture, where the inbound listeners are).
pub fn app_ports(group: Option<&WorkloadGroup>) -> Vec<u16> {
    let ports: BTreeSet<u16> = group
        .map(|g| g.template.ports.values().copied().collect())
        .unwrap_or_default();
    ports.into_iter().collect()
}

fn health_str(h: Health) -> &'static str {
    match h {
        Health::Healthy => "healthy",
        Health::Unhealthy => "unhealthy",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_is_the_route_source_towards_the_first_registry_that_resolves() {
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(detect_address("127.0.0.1:15012").unwrap(), loopback);
        assert_eq!(
            detect_address("127.0.0.1:15012,127.0.0.2:15012").unwrap(),
            loopback
        );
        assert_eq!(
            detect_address("no-such-registry.invalid:15012, 127.0.0.1:15012").unwrap(),
            loopback
        );
        let err = detect_address("no-such-registry.invalid:15012").unwrap_err();
        assert!(!err.to_string().is_empty());
    }
}
