//! Start-up phase 4, DNS: the DNS proxy embedded in-process. It answers the app's queries
//! on the DNS port (where capture redirects them), follows the agent's own Watch client for
//! mesh names (one stream to the registry, not two) and registers its metrics in the
//! agent's registry; its upstreams are the resolv.conf nameservers, reached with the
//! agent's mark so capture lets them pass.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use isthmus_dns::server::Resolver;
use isthmus_dns::DnsHandle;
use isthmus_proto::program::Tasks;
use isthmus_proto::subscription::SyncState;
use tokio::sync::watch;

use super::inputs::Inputs;

/// The readiness part held until the DNS proxy answers from a confirmed view: its name table
/// is built a moment after the routing table, and an app resolving a mesh name in between
/// would get SERVFAIL from an agent that already said READY.
pub(crate) const READY_PART: &str = "dns";

/// The running DNS proxy: where it answers, and its name table (for `/config_dump`).
pub(crate) struct Dns {
    pub addr: SocketAddr,
    pub resolver: Arc<Resolver>,
    /// The catalog state its name table answers from (synced once built from a confirmed
    /// view).
    pub answering: watch::Receiver<Arc<SyncState>>,
}

/// Starts the DNS proxy; it stops with the rest, after the drain (apps finishing their
/// connections may still resolve names).
pub(crate) async fn start(
    cx: &Inputs,
    sync: &watch::Receiver<Arc<SyncState>>,
    tasks: &mut Tasks,
) -> anyhow::Result<Dns> {
    let ready = cx.readiness.part(READY_PART);
    let dns = run(cx, sync).await?;
    let running = Dns {
        addr: dns.dns_addr,
        resolver: dns.resolver.clone(),
        answering: dns.sync.clone(),
    };
    let mut answering = dns.sync.clone();
    let shutdown = cx.shutdown.clone();
    tasks.spawn("dns readiness", async move {
        tokio::select! {
            r = answering.wait_for(|s| s.synced()) => if r.is_ok() {
                ready.ready();
            },
            _ = shutdown.signaled() => {}
        }
    });
    let shutdown = cx.shutdown.clone();
    tasks.spawn("dns", async move {
        shutdown.signaled().await;
        dns.shutdown().await;
    });
    Ok(running)
}

async fn run(cx: &Inputs, sync: &watch::Receiver<Arc<SyncState>>) -> anyhow::Result<DnsHandle> {
    let mut dns_config =
        isthmus_dns::Config::new(&cx.bundle.network, &cx.bundle.cluster, cx.settings.clone());
    dns_config.listen = cx.config.dns_addr;
    dns_config.admin_addr = None;
    dns_config.metrics_addr = None;
    dns_config.namespace = cx.bundle.namespace.clone();
    dns_config.resolv_conf = cx.config.resolv_conf.clone();
    dns_config.node_id = format!("{}-dns", cx.hello.entry_name());
    dns_config.socket_mark = Some(cx.config.mark);
    // The VM's own processes are the proxy's only clients: never rate-limit them (their
    // captured queries come from the VM's address, or from loopback, which is exempt).
    dns_config.rate_limit_exempt = vec![cx.address];
    // A VM without an IPv6 route cannot reach IPv6 service addresses (capture redirects
    // only what the kernel could route): give its apps IPv4 addresses only.
    dns_config.ipv6 = has_ipv6_route();
    if !dns_config.ipv6 {
        tracing::info!("no IPv6 route: mesh names are answered with IPv4 addresses only");
    }
    isthmus_dns::run_with(
        dns_config,
        Some(isthmus_dns::Embedding {
            sync: sync.clone(),
            metrics: cx.registry.clone(),
        }),
    )
    .await
    .context("starting the embedded DNS proxy")
}

/// Whether this host can route to IPv6 service addresses (the allocated VIP range).
fn has_ipv6_route() -> bool {
    let probe: SocketAddr = "[2001:2::1]:9".parse().expect("literal");
    std::net::UdpSocket::bind("[::]:0")
        .and_then(|s| s.connect(probe))
        .is_ok()
}
