//! Start-up phase 5: capture, once the listeners answer. With `--capture nftables` the
//! rules are installed pointing at the bound ports, then the capture follower keeps them in
//! step with the catalog (the service addresses to redirect) and with the group template
//! (the app's ports to capture inbound). It holds the "capture" part of readiness until the
//! captured addresses are first in place: an app that resolves a mesh name must find its
//! connection redirected. At shutdown the rules are removed after the drain.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use isthmus_dns::resolv_conf::ResolvConf;
use isthmus_proto::drain;
use isthmus_proto::model::WorkloadGroup;
use isthmus_proto::program::ReadyPart;
use isthmus_proto::subscription::{self, SyncState};
use isthmus_proxy::routes::RouteTable;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::inputs::Inputs;
use crate::capture::{self, CapturePlan, CaptureProgress};
use crate::config::CaptureMode;
use crate::metrics::AgentMetrics;
use crate::registration::app_ports;

/// The readiness part held until the captured service addresses are in place.
pub(crate) const READY_PART: &str = "capture";
/// How often a failed update of the captured addresses is retried.
const RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// The installed capture, if any, and what it covers so far.
pub(crate) struct Capture {
    pub plan: Option<Arc<Mutex<CapturePlan>>>,
    /// The capture follower; stopped before the rules are removed.
    pub follower: Option<JoinHandle<()>>,
    pub progress: watch::Receiver<CaptureProgress>,
}

/// The listeners capture points at.
pub(crate) struct Ports {
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub dns: SocketAddr,
}

pub(crate) async fn start(
    cx: &Inputs,
    ports: Ports,
    routes: &Arc<ArcSwap<RouteTable>>,
    sync: &watch::Receiver<Arc<SyncState>>,
) -> anyhow::Result<Capture> {
    let ready = cx.readiness.part(READY_PART);
    let (progress_tx, progress) = watch::channel(CaptureProgress::default());
    let config = &cx.config;
    // Nothing to install or wait for: without capture the inbound listeners are the app's
    // ports; in a pod the init container installed the rules (every inbound port, the
    // mesh's address ranges outbound), and the sidecar has no right to change them.
    let fixed = match config.capture {
        CaptureMode::None => Some(None),
        CaptureMode::Preinstalled => Some(Some(Vec::new())),
        CaptureMode::Nftables => None,
    };
    if let Some(ports) = fixed {
        progress_tx.send_replace(CaptureProgress {
            ports,
            addresses: Some(0),
        });
        ready.ready();
        return Ok(Capture {
            plan: None,
            follower: None,
            progress,
        });
    }
    let plan = CapturePlan {
        outbound_port: ports.outbound.port(),
        inbound_port: ports.inbound.port(),
        dns_port: ports.dns.port(),
        mark: config.mark,
        inbound_ports: app_ports(cx.group.borrow().as_ref()),
        exclude_inbound_ports: config.exclude_inbound_ports.clone(),
        exclude_outbound_ports: config.exclude_outbound_ports.clone(),
        dns_servers: ResolvConf::read(&config.resolv_conf).addresses(),
        // A dedicated user's connections are the agent's own; root's may be the app's.
        exempt_uid: Some(nix::unistd::geteuid())
            .filter(|uid| !uid.is_root())
            .map(|uid| uid.as_raw()),
        inbound_all: false,
    };
    install(plan.clone()).await?;
    cx.agent_metrics.capture_installed.set(1);
    let plan = Arc::new(Mutex::new(plan));
    let follower = Follower {
        plan: plan.clone(),
        routes: routes.clone(),
        group: cx.group.clone(),
        progress: progress_tx,
        metrics: cx.agent_metrics.clone(),
        applied: None,
        ready: Some(ready),
    };
    let follower = tokio::spawn(follower.run(sync.clone(), cx.shutdown.clone()));
    Ok(Capture {
        plan: Some(plan),
        follower: Some(follower),
        progress,
    })
}

async fn install(plan: CapturePlan) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || capture::install(&plan))
        .await?
        .context("installing the capture rules (--capture none runs without them)")
}

/// Stops the follower, then removes the rules (after the drain: open connections were
/// redirected by them).
pub(crate) async fn remove(capture: Capture) {
    if let Some(t) = capture.follower {
        t.abort();
        let _ = t.await;
    }
    if capture.plan.is_none() {
        return;
    }
    match tokio::task::spawn_blocking(capture::cleanup).await {
        Ok(Ok(_)) => tracing::info!("capture rules removed"),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot remove the capture rules; run `isthmus-vm-agent cleanup`")
        }
        Err(e) => tracing::error!(error = %e, "capture cleanup task failed"),
    }
}

/// The IPv4 and IPv6 addresses of `addrs`.
fn split(addrs: &BTreeSet<IpAddr>) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for ip in addrs {
        match ip {
            IpAddr::V4(a) => v4.push(*a),
            IpAddr::V6(a) => v6.push(*a),
        }
    }
    (v4, v6)
}

/// Keeps the capture rules in step with the catalog and the group template.
struct Follower {
    plan: Arc<Mutex<CapturePlan>>,
    routes: Arc<ArcSwap<RouteTable>>,
    group: watch::Receiver<Option<WorkloadGroup>>,
    progress: watch::Sender<CaptureProgress>,
    metrics: AgentMetrics,
    /// The service addresses in the sets now (`None`: unknown, after a reinstall or a
    /// failed update).
    applied: Option<BTreeSet<IpAddr>>,
    ready: Option<ReadyPart>,
}

impl Follower {
    /// Turns after every view, every change of the group template, and every
    /// [`RETRY_INTERVAL`] (which retries a failed update and is otherwise a no-op).
    async fn run(self, sync: watch::Receiver<Arc<SyncState>>, shutdown: drain::Watch) {
        let group = self.group.clone();
        // One turn at a time: the state moves into each turn's future and back.
        let me = Arc::new(tokio::sync::Mutex::new(self));
        subscription::follow_with(
            sync,
            group,
            shutdown,
            Some(RETRY_INTERVAL),
            move |state: Arc<SyncState>, _| {
                let me = me.clone();
                async move { me.lock().await.turn(&state).await }
            },
        )
        .await;
    }

    async fn turn(&mut self, state: &SyncState) {
        self.apply_ports().await;
        // The routing table follows the view: wait (bounded) until it is built from this
        // version, then take its addresses.
        let version = state.view.version.clone();
        for _ in 0..200 {
            if self.routes.load().version() == version {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let wanted: BTreeSet<IpAddr> = self.routes.load().addresses().collect();
        if self.applied.as_ref() != Some(&wanted) {
            self.apply_addresses(wanted).await;
        }
    }

    /// Reinstalls the rules when the group's app ports changed, with the service addresses
    /// captured now in the same transaction. The plan (which the self-check compares the
    /// table with) takes the new ports once they are installed.
    async fn apply_ports(&mut self) {
        let ports = app_ports(self.group.borrow().as_ref());
        let reinstall = {
            let p = self.plan.lock().expect("capture plan poisoned");
            (p.inbound_ports != ports).then(|| {
                let mut next = p.clone();
                next.inbound_ports = ports;
                next
            })
        };
        if let Some(next) = reinstall {
            tracing::info!(ports = ?next.inbound_ports, "capturing inbound to the app's ports");
            let kept = self.applied.clone().unwrap_or_default();
            let (v4, v6) = split(&kept);
            let plan = next.clone();
            let installed =
                tokio::task::spawn_blocking(move || capture::install_with(&plan, &v4, &v6)).await;
            match installed {
                Ok(Ok(())) => {
                    let ports = next.inbound_ports.clone();
                    *self.plan.lock().expect("capture plan poisoned") = next;
                    self.progress.send_modify(|c| c.ports = Some(ports));
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot update the capture rules");
                    self.applied = None;
                }
                Err(e) => {
                    tracing::error!(error = %e, "capture update task failed");
                    self.applied = None;
                }
            }
        } else if self.progress.borrow().ports.is_none() {
            let ports = self
                .plan
                .lock()
                .expect("capture plan poisoned")
                .inbound_ports
                .clone();
            self.progress.send_modify(|c| c.ports = Some(ports));
        }
    }

    /// Replaces the captured service addresses with `wanted`.
    async fn apply_addresses(&mut self, wanted: BTreeSet<IpAddr>) {
        let (v4, v6) = split(&wanted);
        let n = wanted.len();
        match tokio::task::spawn_blocking(move || capture::set_destinations(&v4, &v6)).await {
            Ok(Ok(())) => {
                tracing::debug!(addresses = n, "captured service addresses updated");
                self.metrics.captured_addresses.set(n as i64);
                self.applied = Some(wanted);
                self.progress.send_modify(|c| c.addresses = Some(n));
                self.ready.take();
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot update the captured service addresses")
            }
            Err(e) => tracing::error!(error = %e, "capture update task failed"),
        }
    }
}
