//! The agent's wiring: `run` starts the phases in order (each only once the one before
//! worked), each in its own file:
//!
//! 1. `check`: the bundle and the configuration; nothing touches the network before;
//! 2. `identity`: the certificate in the state directory, or a first enrolment with the
//!    bundle's token;
//! 3. `catalog`: the Watch client, starting from the persisted snapshot when there is
//!    one, and the snapshot writer; the routing table follows it;
//! 4. `dns` and `listeners`: the embedded DNS proxy (its name table follows the same
//!    client), inbound mTLS, outbound, and the admin and health ports, all bound;
//! 5. `capture`: the capture rules (they point at listeners that already answer) and the
//!    capture follower;
//! 6. `control`: registration, the probe and renewal beside the data plane; then
//!    `admin` serves the admin port (`/config_dump`) and the health port;
//! 7. `supervisor`: READY once certificate, catalog and DNS are up; then WATCHDOG while
//!    the self-check passes.
//!
//! `shutdown` reverses it: STOPPING, deregister (the entry leaves the views at once), stop
//! accepting, drain open connections until the deadline, remove the capture rules, stop
//! the rest. What the phases after the identity share is in `inputs`.

mod admin;
mod capture;
mod catalog;
mod check;
mod control;
mod dns;
mod identity;
mod inputs;
mod listeners;
mod shutdown;
mod supervisor;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use isthmus_proto::admin::Readiness;
use isthmus_proto::program::{Program, Stop, Tasks};
use isthmus_proto::subscription::SyncState;
use isthmus_proxy::routes::RouteTable;
use tokio::sync::watch;

use crate::config::AgentConfig;
use crate::registration::RegistrationState;
use inputs::Inputs;
use shutdown::Teardown;

/// A running agent.
pub struct AgentHandle {
    /// The VM's registered address.
    pub address: IpAddr,
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub dns_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub health_addr: Option<SocketAddr>,
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub sync: watch::Receiver<Arc<SyncState>>,
    pub registration: watch::Receiver<RegistrationState>,
    /// The identity the agent holds; true if this start enrolled with the token.
    pub identity: String,
    pub enrolled: bool,
    readiness: Readiness,
    teardown: Teardown,
}

impl std::fmt::Debug for AgentHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentHandle")
            .field("address", &self.address)
            .field("inbound_addr", &self.inbound_addr)
            .field("outbound_addr", &self.outbound_addr)
            .field("dns_addr", &self.dns_addr)
            .finish_non_exhaustive()
    }
}

impl AgentHandle {
    pub fn is_ready(&self) -> bool {
        self.readiness.is_ready()
    }
}

impl Program for AgentHandle {
    /// STOPPING, deregistration, drain, removal of the capture rules, then everything else.
    fn shutdown(self) -> impl Future<Output = ()> + Send {
        self.teardown.run()
    }
}

pub async fn run(config: AgentConfig) -> anyhow::Result<AgentHandle> {
    // 1. Everything that can be checked without the network.
    let checked = check::check(&config).await?;
    // 2. The identity: the kept certificate, or a first enrolment.
    let id = identity::obtain(&config, &checked).await?;
    let (cx, publish) = Inputs::new(config, checked, &id);
    let mut tasks = Tasks::default();
    // 3. The catalog, from the snapshot first when there is one.
    let catalog = catalog::start(&cx, &mut tasks)?;
    // 4. Every listener bound: DNS, inbound, outbound, admin, health.
    let dns = dns::start(&cx, &catalog.sync, &mut tasks).await?;
    let listeners = listeners::bind(&cx, &catalog.routes, &mut tasks).await?;
    // 5. Capture, once the listeners answer.
    let ports = capture::Ports {
        inbound: listeners.inbound_addr,
        outbound: listeners.outbound_addr,
        dns: dns.addr,
    };
    let capture = capture::start(&cx, ports, &catalog.routes, &catalog.sync).await?;
    // 6. Probe, registration, renewal; then the admin and health ports are served.
    let control = control::start(
        &cx,
        publish.creds,
        publish.group,
        &capture.progress,
        &mut tasks,
    );
    let served = serve_admin(&cx, &catalog, &dns, &control, &capture, &listeners)?;
    admin::serve(
        served,
        listeners.admin,
        listeners.health,
        listeners.metrics,
        &mut tasks,
        &cx.shutdown,
    );
    // 7. READY, then the watchdog.
    let (sync, registration) = (&catalog.sync, &control.registration);
    let alive = listeners.accepting.alive;
    supervisor::start(
        &cx,
        sync,
        &dns.answering,
        registration,
        &capture,
        alive,
        &mut tasks,
    );

    let handle = AgentHandle {
        address: cx.address,
        inbound_addr: listeners.inbound_addr,
        outbound_addr: listeners.outbound_addr,
        dns_addr: dns.addr,
        admin_addr: listeners.admin_addr,
        health_addr: listeners.health_addr,
        routes: catalog.routes,
        sync: catalog.sync,
        registration: control.registration,
        identity: cx.identity.to_string(),
        enrolled: id.enrolled,
        readiness: cx.readiness.clone(),
        teardown: Teardown {
            notifier: cx.notifier.clone(),
            deregister: control.deregister,
            registration: control.registration_task,
            trackers: listeners.trackers,
            drain_deadline: cx.config.drain_deadline,
            capture,
            stop: Stop {
                readiness: cx.readiness.clone(),
                accept: publish.accept,
                accepting: listeners.accepting.tasks,
                rest: publish.rest,
                tasks,
            },
        },
    };
    serving(&cx, &handle);
    Ok(handle)
}

/// Says in the log where the agent serves.
fn serving(cx: &Inputs, h: &AgentHandle) {
    tracing::info!(
        identity = %h.identity,
        address = %h.address,
        inbound_addr = %h.inbound_addr,
        outbound_addr = %h.outbound_addr,
        dns_addr = %h.dns_addr,
        admin_addr = ?h.admin_addr,
        health_addr = ?h.health_addr,
        capture = ?cx.config.capture,
        registry = %cx.bundle.registry,
        "vm agent serving"
    );
}

/// What the admin port serves, from every phase's state.
fn serve_admin(
    cx: &Inputs,
    catalog: &catalog::Catalog,
    dns: &dns::Dns,
    control: &control::Control,
    capture: &capture::Capture,
    listeners: &listeners::Listeners,
) -> anyhow::Result<admin::Admin> {
    Ok(admin::Admin {
        dump: admin::Dump {
            effective: serde_json::to_value(&cx.config)?,
            address: cx.address,
            routes: catalog.routes.clone(),
            sync: catalog.sync.clone(),
            registration: control.registration.clone(),
            health: control.health.clone(),
            group: cx.group.clone(),
            creds: cx.creds.clone(),
            capture: capture.plan.clone(),
            dns_names: dns.resolver.clone(),
        },
        app_probers: cx
            .config
            .pod
            .as_ref()
            .map(|p| p.app_probers.clone())
            .unwrap_or_default(),
        app_host: cx.config.app_host,
        trackers: listeners.trackers.clone(),
        tunnels: listeners.tunnels.clone(),
        registry: cx.registry.clone(),
        readiness: cx.readiness.clone(),
    })
}
