//! Wiring: the Watch client feeding the name table, the resolver, the UDP and TCP listeners
//! and the admin server, all stopped by one trigger.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use axum::routing::get;
use axum::{Json, Router};
use isthmus_proto::admin::{self, Readiness};
use isthmus_proto::drain;
use isthmus_proto::model::{Node, NodeKind};
use isthmus_proto::program::ReadyPart;
use isthmus_proto::subscription::{SyncState, WatchClient, WatchOptions};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cache::{Cache, CacheLimits};
use crate::config::Config;
use crate::forwarder::Forwarder;
use crate::metrics::Metrics;
use crate::names::{Locale, NameTable};
use crate::resolv_conf::ResolvConf;
use crate::server::{self, Resolver, TcpLimits};

/// A running DNS proxy.
pub struct DnsHandle {
    /// Where DNS is served, over both UDP and TCP.
    pub dns_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub resolver: Arc<Resolver>,
    pub metrics: Arc<Metrics>,
    pub sync: watch::Receiver<Arc<SyncState>>,
    trigger: drain::Trigger,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for DnsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsHandle")
            .field("dns_addr", &self.dns_addr)
            .field("admin_addr", &self.admin_addr)
            .finish()
    }
}

impl DnsHandle {
    pub fn names(&self) -> Arc<NameTable> {
        self.resolver.names()
    }

    /// Stops every task and waits for them (bounded).
    pub async fn shutdown(self) {
        self.trigger.fire();
        for t in self.tasks {
            if tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .is_err()
            {
                tracing::warn!("a dns task did not stop within 5s");
            }
        }
    }

    pub async fn run_until_signal(self) {
        drain::os_signal().await;
        tracing::info!("shutting down");
        self.shutdown().await;
    }
}

/// Binds UDP and TCP on the same port (the kernel picks one for port 0).
async fn bind_dns(addr: SocketAddr) -> anyhow::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..16 {
        let udp = UdpSocket::bind(addr)
            .await
            .with_context(|| format!("binding DNS on udp {addr}"))?;
        let bound = udp.local_addr()?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            // Only a kernel-chosen port can be retried: that one was free for UDP only.
            Err(e) if addr.port() == 0 => last = Some(e),
            Err(e) => return Err(e).with_context(|| format!("binding DNS on tcp {bound}")),
        }
    }
    Err(last.expect("tried at least once")).context("no port free for both UDP and TCP")
}

/// How a program that already follows the catalog embeds the DNS proxy (the VM agent): the
/// proxy reads that program's view instead of opening a Watch of its own, and registers its
/// metrics in that program's registry.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub sync: watch::Receiver<Arc<SyncState>>,
    pub metrics: Arc<Mutex<Registry>>,
}

/// The DNS proxy as its own program: its own Watch of the registry and its own metrics.
pub async fn run(config: Config) -> anyhow::Result<DnsHandle> {
    run_with(config, None).await
}

/// The DNS proxy, standalone (`None`) or embedded in a program that follows the catalog.
pub async fn run_with(config: Config, embedding: Option<Embedding>) -> anyhow::Result<DnsHandle> {
    config.validate()?;
    let (trigger, shutdown) = drain::channel();
    let (registry, shared_sync) = match embedding {
        Some(e) => (e.metrics, Some(e.sync)),
        None => (Arc::new(Mutex::new(Registry::default())), None),
    };
    let metrics = Arc::new(Metrics::register(
        &mut registry.lock().expect("metrics registry poisoned"),
    ));
    let readiness = Readiness::default();
    let mut tasks = Vec::new();

    let mut upstreams = config.upstreams.clone();
    if upstreams.is_empty() {
        upstreams = ResolvConf::read(&config.resolv_conf).upstreams(config.listen);
        if upstreams.is_empty() {
            tracing::warn!(
                file = %config.resolv_conf.display(),
                "no upstream resolvers: names outside the mesh will get SERVFAIL"
            );
        }
    }

    let locale = Locale {
        network: config.network.clone(),
        cluster: config.cluster.clone(),
        namespace: config.namespace.clone(),
        cluster_domain: config.cluster_domain.clone(),
        ipv6: config.ipv6,
    };
    let names = Arc::new(ArcSwap::from_pointee(NameTable::unsynced(&locale)));

    // The catalog: a Watch client, and a task that rebuilds the table after every view.
    let sync = match shared_sync {
        Some(sync) => sync,
        None => {
            let client = watch_client(&config)?;
            let sync = client.state();
            tasks.push(tokio::spawn(client.run(shutdown.clone())));
            sync
        }
    };
    tasks.push(tokio::spawn(maintain_table(
        sync.clone(),
        names.clone(),
        locale,
        metrics.clone(),
        readiness.part("catalog"),
        shutdown.clone(),
    )));

    let cache = Cache::new(CacheLimits {
        max_entries: config.cache_entries,
        max_ttl: config.cache_max_ttl,
        max_negative_ttl: config.negative_max_ttl,
    });
    let forwarder = Forwarder::new(
        upstreams.clone(),
        config.upstream_mode,
        config.query_timeout,
        metrics.clone(),
    )
    .with_socket_mark(config.socket_mark);
    let resolver = Arc::new(
        Resolver::new(
            names.clone(),
            cache,
            forwarder,
            metrics.clone(),
            config.max_inflight,
            config.ttl,
            config.max_udp_payload,
            &config.cluster_domain,
        )
        .with_client_rate_limit(
            config.client_rate,
            config.client_burst,
            crate::config::DEFAULT_RATE_LIMITED_CLIENTS,
        ),
    );

    let (udp, tcp) = bind_dns(config.listen).await?;
    let dns_addr = udp.local_addr()?;
    let udp = Arc::new(udp);
    let workers = if config.udp_workers == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        config.udp_workers
    };
    for _ in 0..workers {
        tasks.push(tokio::spawn(server::serve_udp(
            udp.clone(),
            resolver.clone(),
            shutdown.clone(),
        )));
    }
    tasks.push(tokio::spawn(server::serve_tcp(
        tcp,
        resolver.clone(),
        metrics.clone(),
        TcpLimits {
            max_connections: config.max_tcp_connections,
            idle_timeout: config.tcp_idle_timeout,
        },
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn(purge_cache(
        resolver.clone(),
        metrics.clone(),
        shutdown.clone(),
    )));

    let admin_addr = match config.admin_addr {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding admin on {addr}"))?;
            let bound = listener.local_addr()?;
            let dump_resolver = resolver.clone();
            let dump_sync = sync.clone();
            let effective = serde_json::json!({
                "config": &config,
                "upstreams": upstreams,
                "upstream_mode": format!("{:?}", config.upstream_mode).to_lowercase(),
            });
            let extra = Router::new().route(
                "/config_dump",
                get(move || {
                    let names = dump_resolver.names();
                    let state = dump_sync.borrow().clone();
                    let effective = effective.clone();
                    async move {
                        Json(serde_json::json!({
                            "effective": effective,
                            "catalog": {
                                "connected": state.connected,
                                "last_error": state.last_error,
                                "snapshots": state.snapshots,
                                "resumes": state.resumes,
                            },
                            "cache_entries": dump_resolver.cache().len(),
                            "name_table": names.dump(),
                        }))
                    }
                }),
            );
            let shutdown = shutdown.clone();
            let readiness = readiness.clone();
            let registry = registry.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = admin::serve(listener, registry, readiness, extra, shutdown).await {
                    tracing::error!(error = %e, "admin server failed");
                }
            }));
            Some(bound)
        }
        None => None,
    };

    tracing::info!(%dns_addr, ?admin_addr, upstreams = ?upstreams, "dns proxy serving");
    Ok(DnsHandle {
        dns_addr,
        admin_addr,
        resolver,
        metrics,
        sync,
        trigger,
        tasks,
    })
}

fn watch_client(config: &Config) -> anyhow::Result<WatchClient> {
    let node = Node {
        id: config.node_id.clone(),
        kind: NodeKind::Dns,
        network: config.network.clone(),
        cluster: config.cluster.clone(),
        locality: Default::default(),
    };
    WatchClient::over_mtls(&config.registry, node, None, WatchOptions::default()).with_context(
        || {
            format!(
                "loading the registry credentials (root {}, certificates in {})",
                config.registry.root_cert.display(),
                config.registry.cert_dir.display()
            )
        },
    )
}

/// Rebuilds the name table whenever the Watch client publishes a new view, and keeps the
/// catalog metrics current.
async fn maintain_table(
    sync: watch::Receiver<Arc<SyncState>>,
    names: Arc<ArcSwap<NameTable>>,
    locale: Locale,
    metrics: Arc<Metrics>,
    ready: ReadyPart,
    shutdown: drain::Watch,
) {
    let mut ready = Some(ready);
    // The table also depends on whether the view is confirmed (unsynced answers differ).
    let mut built_synced: Option<bool> = None;
    let turn = |state: Arc<SyncState>, view_changed: bool| {
        let synced = state.synced();
        if view_changed || built_synced != Some(synced) {
            let table = NameTable::build(&state.view, &locale, synced);
            tracing::debug!(
                names = table.len(),
                version = table.version(),
                "name table rebuilt"
            );
            metrics.names.set(table.len() as i64);
            names.store(Arc::new(table));
            built_synced = Some(synced);
            if synced {
                ready.take();
            }
        }
        metrics.catalog.observe(&state);
        std::future::ready(())
    };
    isthmus_proto::subscription::follow(sync, shutdown, Some(Duration::from_secs(1)), turn).await;
}

/// Drops expired cache entries now and then, so the size gauge tells the truth.
async fn purge_cache(resolver: Arc<Resolver>, metrics: Arc<Metrics>, shutdown: drain::Watch) {
    let stop = shutdown.signaled();
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {
                let n = resolver.cache().purge(std::time::Instant::now());
                metrics.cache_entries.set(n as i64);
            }
        }
    }
}
