//! Start-up phase 4: the listeners, all bound before capture points at any of them and
//! before the control plane starts, so a port in use fails the start at once.
//!
//! - With `--capture nftables`: one inbound mTLS listener (captured connections keep their
//!   original port, which names the app's port) and the outbound capture listener (on
//!   127.0.0.1 and ::1, where REDIRECT sends IPv4 and IPv6).
//! - With `--capture none`: one inbound listener per app port on the VM's address (the
//!   app listens on loopback only).
//! - The tunnel listener (`--tunnel-port`, 15008 on the VM's address): HBONE streams from
//!   other proxies, through the same authorization to the same app ports; the outbound
//!   carries mesh connections to workloads that accept tunnels over a pool of them.
//! - The explicit outbound listeners (`--outbound-listener`), and the admin and health
//!   ports (served once the control plane they report on is running).
//!
//! The proxies come from the proxy core (`isthmus-proxy`); a renewed certificate is
//! swapped into them. Who the VM is in Istio's standard metrics (the source of its
//! outbound, the destination of its inbound) follows the group template: the group's name
//! as the workload (Istio's name for an auto-registered VM), the labels the VM registers
//! with, the bundle's namespace and cluster, and the VM's identity.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use isthmus_proto::drain;
use isthmus_proto::identity::SpiffeId;
use isthmus_proto::model::WorkloadGroup;
use isthmus_proto::program::{self, Tasks};
use isthmus_proto::tls::{Credentials, TrustBundle};
use isthmus_proxy::admission::Admission;
use isthmus_proxy::authz::AuthorizationPolicy;
use isthmus_proxy::connection::{refusal, Tracker};
use isthmus_proxy::inbound::hbone::{self, TunnelInbound};
use isthmus_proxy::inbound::{self, AppTarget, Inbound, Mode};
use isthmus_proxy::metrics::istio::{Local, Peer};
use isthmus_proxy::metrics::Metrics;
use isthmus_proxy::original_dst::original_destination;
use isthmus_proxy::outbound::{
    self, ClientTls, Destination, NoDestination, Outbound, OutboundTarget,
};
use isthmus_proxy::routes::RouteTable;
use isthmus_proxy::tunnel::pool::Transports;
use isthmus_proxy::tunnel::{self, quic, Pool, PoolSettings};
use isthmus_proxy::upstream::ConnectOptions;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::inputs::Inputs;
use crate::config::CaptureMode;
use crate::registration::app_ports;

/// The tasks that accept connections: stopped first at shutdown, and watched by the
/// supervisor's self-check (one that ended means a listener stopped accepting).
#[derive(Default)]
pub(crate) struct Accepting {
    pub tasks: Tasks,
    pub alive: Vec<AbortHandle>,
}

impl Accepting {
    fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let handle = tokio::spawn(task);
        self.alive.push(handle.abort_handle());
        self.tasks.push(name, handle);
    }
}

/// The bound listeners and the proxies behind them.
pub(crate) struct Listeners {
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    /// Bound, served by the admin phase.
    pub admin: Option<TcpListener>,
    pub admin_addr: Option<SocketAddr>,
    pub health: Option<TcpListener>,
    pub health_addr: Option<SocketAddr>,
    pub metrics: Option<TcpListener>,
    /// The open connections of the inbound and outbound proxies, drained at shutdown.
    pub trackers: Vec<Arc<Tracker>>,
    /// The outbound's tunnel pool, unless tunnels are off.
    pub tunnels: Option<Pool>,
    pub accepting: Accepting,
}

pub(crate) async fn bind(
    cx: &Inputs,
    routes: &Arc<ArcSwap<RouteTable>>,
    tasks: &mut Tasks,
) -> anyhow::Result<Listeners> {
    let config = &cx.config;
    let creds = cx.creds.borrow().clone();
    let inbounds = InboundFactory::new(cx, &creds)?;
    let outbound = Arc::new(Outbound {
        routes: routes.clone(),
        tls: Arc::new(ArcSwap::from_pointee(ClientTls::new(
            (*creds).clone(),
            cx.trust.clone(),
        ))),
        metrics: cx.metrics.clone(),
        tracker: Tracker::new(),
        connect: ConnectOptions {
            timeout: config.connect_timeout,
            // A pod's sidecar is exempt from capture by its uid, and may not set marks.
            mark: (config.capture != CaptureMode::Preinstalled).then_some(config.mark),
            ..ConnectOptions::default()
        },
        source_labels: Default::default(),
        tunnel: (config.tunnel_port != 0).then(|| {
            let settings = PoolSettings {
                timeout: config.connect_timeout,
                transports: config.tunnel_transports,
                ..PoolSettings::default()
            };
            Pool::new(settings, cx.metrics.clone())
        }),
    });
    let mut accepting = Accepting::default();
    let (bound, served) = match config.capture {
        CaptureMode::Nftables | CaptureMode::Preinstalled => {
            bind_captured(cx, routes, &inbounds, &outbound, &mut accepting).await?
        }
        CaptureMode::None => bind_per_port(cx, &inbounds, &mut accepting).await?,
    };
    for l in &config.outbound_listeners {
        let listener = program::bind(l.listen, "outbound").await?;
        accepting.spawn(
            "outbound listener",
            outbound::serve(
                listener,
                outbound.clone(),
                l.target(),
                config.max_connections,
                cx.accept.clone(),
            ),
        );
    }
    let tunnel = bind_tunnel(cx, &inbounds, &creds, &mut accepting).await?;
    let me = IstioSelf::of(cx);
    me.apply(cx.group.borrow().as_ref(), &outbound);
    tasks.spawn(
        "istio labels",
        follow_group(cx.group.clone(), me, outbound.clone(), cx.shutdown.clone()),
    );
    tasks.spawn(
        "certificate swap",
        follow_credentials(
            cx.creds.clone(),
            cx.trust.clone(),
            served,
            tunnel,
            outbound.clone(),
            cx.shutdown.clone(),
        ),
    );
    let admin = program::bind_optional(config.admin_addr, "admin").await?;
    let health = program::bind_optional(config.health_addr, "health").await?;
    let metrics = program::bind_optional(config.metrics_addr, "metrics").await?;
    Ok(Listeners {
        inbound_addr: bound.0,
        outbound_addr: bound.1,
        admin_addr: admin.as_ref().map(TcpListener::local_addr).transpose()?,
        admin,
        health_addr: health.as_ref().map(TcpListener::local_addr).transpose()?,
        health,
        metrics,
        trackers: vec![inbounds.tracker.clone(), outbound.tracker.clone()],
        tunnels: outbound.tunnel.clone(),
        accepting,
    })
}

/// The inbound listeners' and the outbound listener's addresses, and the inbound proxies.
type Bound = ((SocketAddr, SocketAddr), Vec<Arc<Inbound>>);

/// One inbound mTLS listener for every captured app port, and the outbound capture
/// listener.
async fn bind_captured(
    cx: &Inputs,
    routes: &Arc<ArcSwap<RouteTable>>,
    inbounds: &InboundFactory,
    outbound: &Arc<Outbound>,
    accepting: &mut Accepting,
) -> anyhow::Result<Bound> {
    let (config, accept) = (&cx.config, &cx.accept);
    let listener = program::bind(config.inbound_addr, "inbound").await?;
    let inbound_addr = listener.local_addr()?;
    let ib = inbounds.make(AppTarget::OriginalPort {
        host: config.app_host,
    })?;
    accepting.spawn(
        "inbound",
        inbound::serve(listener, ib.clone(), accept.clone()),
    );
    let out = program::bind(config.outbound_addr, "outbound").await?;
    let outbound_addr = out.local_addr()?;
    let mut outs = vec![out];
    // REDIRECT sends IPv6 to ::1: listen there too when the host has IPv6.
    if outbound_addr.is_ipv4() {
        let v6 = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), outbound_addr.port());
        match program::bind(v6, "outbound").await {
            Ok(l) => outs.push(l),
            Err(e) => {
                tracing::info!(addr = %v6, error = %e.error, "no IPv6 outbound capture listener")
            }
        }
    }
    let passthrough = config.pod.is_some();
    for out in outs {
        let table = routes.clone();
        accepting.spawn(
            "outbound",
            outbound::serve_with(
                out,
                outbound.clone(),
                config.max_connections,
                accept.clone(),
                move |tcp: &TcpStream| captured_target(tcp, &table.load(), passthrough),
            ),
        );
    }
    Ok(((inbound_addr, outbound_addr), vec![ib]))
}

/// Without capture: one inbound listener per app port, on the VM's address (the app
/// listens on loopback only); bound once the group's ports are known.
async fn bind_per_port(
    cx: &Inputs,
    inbounds: &InboundFactory,
    accepting: &mut Accepting,
) -> anyhow::Result<Bound> {
    let (config, accept) = (&cx.config, &cx.accept);
    let ports = app_ports(cx.group.borrow().as_ref());
    let mut first = None;
    let mut served = Vec::new();
    for port in ports {
        let listener = program::bind(SocketAddr::new(cx.address, port), "inbound").await?;
        first.get_or_insert(listener.local_addr()?);
        let ib = inbounds.make(AppTarget::Fixed(SocketAddr::new(config.app_host, port)))?;
        served.push(ib.clone());
        accepting.spawn("inbound", inbound::serve(listener, ib, accept.clone()));
    }
    if served.is_empty() {
        tracing::warn!("--capture none: the app's ports are not known yet (no WorkloadGroup template kept from an earlier run); inbound listeners start after the next restart once registered");
    }
    let inbound_addr = first.unwrap_or(config.inbound_addr);
    Ok(((inbound_addr, config.outbound_addr), served))
}

/// The tunnel listeners on the VM's address, in front of the app's ports (all of them when
/// capture takes every port, else the group's), unless `--tunnel-port 0`: HTTP/2 on the
/// tunnel port over TCP and, unless `--tunnel-transports h2`, QUIC on it over UDP.
async fn bind_tunnel(
    cx: &Inputs,
    inbounds: &InboundFactory,
    creds: &Credentials,
    accepting: &mut Accepting,
) -> anyhow::Result<Option<TunnelListeners>> {
    let config = &cx.config;
    if config.tunnel_port == 0 {
        return Ok(None);
    }
    let addr = SocketAddr::new(cx.address, config.tunnel_port);
    let listener = program::bind(addr, "tunnel").await?;
    let tls = tunnel::server_config(creds, &cx.trust)?;
    let app = AppTarget::OriginalPort {
        host: config.app_host,
    };
    let ib = Arc::new(inbounds.inbound(app, tls));
    let ports = if config.pod.is_some() {
        Vec::new()
    } else {
        app_ports(cx.group.borrow().as_ref())
    };
    let served = Arc::new(TunnelInbound {
        inbound: ib.clone(),
        addresses: vec![cx.address],
        ports,
        app_host: config.app_host,
        max_streams: tunnel::DEFAULT_MAX_STREAMS,
    });
    let quic = if config.tunnel_transports == Transports::Http2 {
        None
    } else {
        let qc = quic::listener_config(creds, &cx.trust, tunnel::DEFAULT_MAX_STREAMS)?;
        let endpoint = quic::server_endpoint(addr, qc)?;
        accepting.spawn(
            "QUIC tunnel",
            hbone::serve_quic(endpoint.clone(), served.clone(), cx.accept.clone()),
        );
        Some(endpoint)
    };
    accepting.spawn("tunnel", hbone::serve(listener, served, cx.accept.clone()));
    Ok(Some(TunnelListeners { inbound: ib, quic }))
}

/// The tunnel listeners, for the certificate swap.
struct TunnelListeners {
    inbound: Arc<Inbound>,
    quic: Option<quic::Endpoint>,
}

/// Makes the inbound proxies: STRICT mTLS, the authorization policy, one shared tracker.
struct InboundFactory {
    creds: Credentials,
    trust: TrustBundle,
    policy: AuthorizationPolicy,
    /// The policy's quotas and faults, shared by every inbound listener.
    admission: Arc<Admission>,
    metrics: Arc<Metrics>,
    tracker: Arc<Tracker>,
    handshake_timeout: Duration,
    connect_timeout: Duration,
    max_connections: usize,
}

impl InboundFactory {
    fn new(cx: &Inputs, creds: &Credentials) -> anyhow::Result<Self> {
        let policy = match &cx.config.authz_policy {
            Some(path) => AuthorizationPolicy::from_yaml_file(path)?,
            None => AuthorizationPolicy::default(),
        };
        Ok(Self {
            creds: creds.clone(),
            trust: cx.trust.clone(),
            admission: Admission::new(&policy),
            policy,
            metrics: cx.metrics.clone(),
            tracker: Tracker::new(),
            handshake_timeout: cx.config.handshake_timeout,
            connect_timeout: cx.config.connect_timeout,
            max_connections: cx.config.max_connections,
        })
    }

    fn make(&self, app: AppTarget) -> anyhow::Result<Arc<Inbound>> {
        let tls = Inbound::server_config(&self.creds, &self.trust)?;
        Ok(Arc::new(self.inbound(app, tls)))
    }

    /// An inbound proxy to `app` with `tls`.
    fn inbound(&self, app: AppTarget, tls: rustls::ServerConfig) -> Inbound {
        Inbound {
            tls: Arc::new(ArcSwap::from_pointee(tls)),
            policy: Arc::new(ArcSwap::from_pointee(self.policy.clone())),
            admission: self.admission.clone(),
            mode: Mode::Strict,
            app,
            metrics: self.metrics.clone(),
            tracker: self.tracker.clone(),
            handshake_timeout: self.handshake_timeout,
            connect_timeout: self.connect_timeout,
            max_connections: self.max_connections,
            on_connection: None,
        }
    }
}

/// The mesh destination of a captured connection: its original destination, by the
/// service address (VIP) it was made to. An address the catalog does not know is refused
/// on a VM (its rules capture only the catalog's addresses: this one was just removed),
/// and passed through in a pod (whose rules capture whole ranges).
fn captured_target(
    tcp: &TcpStream,
    routes: &RouteTable,
    passthrough: bool,
) -> Result<Destination, NoDestination> {
    let original = original_destination(tcp).map_err(|e| {
        refusal(
            "no_original_destination",
            format!("{e}: was this connection redirected?"),
        )
    })?;
    let local = tcp.local_addr().ok();
    if Some(original) == local {
        return Err(refusal(
            "not_redirected",
            format!("{original} is the capture listener itself: nothing to forward to"),
        ));
    }
    let Some(hostname) = routes.hostname_of(original.ip()) else {
        if passthrough {
            return Ok(Destination::Passthrough(original));
        }
        return Err(refusal(
            "unknown_service_address",
            format!(
                "{} is not a service address in the catalog (it may have just been removed)",
                original.ip()
            ),
        ));
    };
    Ok(Destination::Mesh(OutboundTarget {
        hostname: hostname.to_string(),
        port: original.port(),
        subset: String::new(),
        sni: None,
    }))
}

/// What the VM's own Istio labels are made of, apart from the group template.
struct IstioSelf {
    metrics: Arc<Metrics>,
    group: String,
    cluster: String,
    identity: SpiffeId,
    address: IpAddr,
    /// The VM's own labels (`--label`), which the template's override as at registration.
    labels: BTreeMap<String, String>,
}

impl IstioSelf {
    fn of(cx: &Inputs) -> Self {
        Self {
            metrics: cx.metrics.clone(),
            group: cx.bundle.group.clone(),
            cluster: cx.bundle.cluster.clone(),
            identity: cx.identity.clone(),
            address: cx.address,
            labels: cx.hello.labels.clone(),
        }
    }

    /// The VM's labels: its own, overridden by the group template's.
    fn labels(&self, group: Option<&WorkloadGroup>) -> BTreeMap<String, String> {
        let mut labels = self.labels.clone();
        if let Some(g) = group {
            labels.extend(g.template.labels.clone());
        }
        labels
    }

    /// Puts the VM's labels (with `group`'s) where they are read: the Istio metrics' local
    /// side, and the outbound's routes (`sourceLabels`).
    fn apply(&self, group: Option<&WorkloadGroup>, outbound: &Outbound) {
        self.metrics.istio.set_local(self.local(group));
        outbound.source_labels.store(Arc::new(self.labels(group)));
    }

    fn local(&self, group: Option<&WorkloadGroup>) -> Local {
        let labels = self.labels(group);
        Local {
            peer: Peer::from_labels(
                Some(&self.group),
                &labels,
                &self.cluster,
                Some(&self.identity),
            ),
            address: Some(self.address),
        }
    }
}

/// Keeps the VM's own labels current (Istio metrics, routes' `sourceLabels`) when the
/// registry's group template changes.
async fn follow_group(
    mut group: watch::Receiver<Option<WorkloadGroup>>,
    me: IstioSelf,
    outbound: Arc<Outbound>,
    shutdown: drain::Watch,
) {
    let stop = shutdown.signaled();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            r = group.changed() => if r.is_err() { return },
        }
        let g = group.borrow_and_update().clone();
        me.apply(g.as_ref(), &outbound);
    }
}

/// Swaps the TLS configs when the certificate is renewed.
async fn follow_credentials(
    mut creds: watch::Receiver<Arc<Credentials>>,
    trust: TrustBundle,
    inbounds: Vec<Arc<Inbound>>,
    tunnel: Option<TunnelListeners>,
    outbound: Arc<Outbound>,
    shutdown: drain::Watch,
) {
    let stop = shutdown.signaled();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            r = creds.changed() => if r.is_err() { return },
        }
        let c = creds.borrow_and_update().clone();
        match Inbound::server_config(&c, &trust) {
            Ok(cfg) => {
                let cfg = Arc::new(cfg);
                for ib in &inbounds {
                    ib.tls.store(cfg.clone());
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot use the renewed certificate for inbound"),
        }
        if let Some(t) = &tunnel {
            match tunnel::server_config(&c, &trust) {
                Ok(cfg) => t.inbound.tls.store(Arc::new(cfg)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot use the renewed certificate for the tunnel listener")
                }
            }
            if let Some(endpoint) = &t.quic {
                match quic::listener_config(&c, &trust, tunnel::DEFAULT_MAX_STREAMS) {
                    Ok(cfg) => endpoint.set_server_config(Some(cfg)),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot use the renewed certificate for the QUIC tunnel listener")
                    }
                }
            }
        }
        // New tunnels with the new certificate; streams in flight finish on the old ones.
        if let Some(pool) = &outbound.tunnel {
            pool.clear();
        }
        outbound
            .tls
            .store(Arc::new(ClientTls::new((*c).clone(), trust.clone())));
    }
}
