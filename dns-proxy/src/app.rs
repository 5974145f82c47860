//! Wiring: the DNS proxy as a list of phases, each a small function (in its own file under
//! `app/`, but for the few lines that build the request path), started in this order by
//! [`run_with`]:
//!
//! 1. **config check** ([`Config::validate`]): every bad field at once, before anything runs;
//! 2. **listeners bound** (`listeners::bind`): UDP and TCP on one port, and the admin port,
//!    so a port in use fails the start before the proxy talks to anyone;
//! 3. **catalog** (`catalog::start`): its own Watch of the registry, or the view of the
//!    program that embeds the proxy;
//! 4. **name table follower** (`catalog::follow_names`): rebuilds the table from every view;
//!    the proxy is ready (part `catalog`) once a confirmed view is in it;
//! 5. **request path** (`resolver`): cache, forwarder and resolver over the name table;
//! 6. **serving** (`listeners::serve`): the UDP workers and the TCP server;
//! 7. **cache purge** (`purge::start`);
//! 8. **admin** (`admin::start`): `/metrics`, `/healthz`, `/readyz`, `/config_dump`.
//!
//! [`DnsHandle`] stops them in the order every isthmus program stops in
//! ([`isthmus_proto::program::Stop`]): not ready, stop serving, then the rest.

mod admin;
mod catalog;
mod listeners;
mod purge;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use arc_swap::ArcSwap;
use isthmus_proto::admin::Readiness;
use isthmus_proto::drain;
use isthmus_proto::program::{Program, Stop, Tasks};
use isthmus_proto::subscription::SyncState;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::cache::{Cache, CacheLimits};
use crate::config::Config;
use crate::forwarder::Forwarder;
use crate::metrics::Metrics;
use crate::names::{Locale, NameTable};
use crate::resolv_conf::ResolvConf;
use crate::server::Resolver;

/// A running DNS proxy.
pub struct DnsHandle {
    /// Where DNS is served, over both UDP and TCP.
    pub dns_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    /// `/metrics` alone, for scrapers on the network.
    pub metrics_addr: Option<SocketAddr>,
    pub resolver: Arc<Resolver>,
    pub metrics: Arc<Metrics>,
    /// The catalog state the name table answers from: it turns synced only once the table
    /// built from the confirmed view is in place (the catalog's own state runs ahead of it).
    pub sync: watch::Receiver<Arc<SyncState>>,
    stop: Stop,
}

impl std::fmt::Debug for DnsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsHandle")
            .field("dns_addr", &self.dns_addr)
            .field("admin_addr", &self.admin_addr)
            .field("metrics_addr", &self.metrics_addr)
            .finish()
    }
}

impl DnsHandle {
    pub fn names(&self) -> Arc<NameTable> {
        self.resolver.names()
    }

    /// Not ready, stop serving, then stop the catalog, the purge and the admin server; every
    /// task is joined within the skeleton's deadline. A query waiting on an upstream is not
    /// waited for: its client retries, as it would after any lost datagram.
    pub async fn shutdown(self) {
        self.stop.run(std::future::ready(())).await;
    }
}

impl Program for DnsHandle {
    fn shutdown(self) -> impl std::future::Future<Output = ()> + Send {
        DnsHandle::shutdown(self)
    }
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
    let bound = listeners::bind(&config).await?;
    let (registry, shared_sync) = match embedding {
        Some(e) => (e.metrics, Some(e.sync)),
        None => {
            let mut registry = Registry::default();
            // Standalone, the process's accept errors and listeners at their limit are this
            // program's to report (a program that embeds the proxy reports its own).
            isthmus_proto::limits::register(registry.sub_registry_with_prefix("isthmus"));
            (Arc::new(Mutex::new(registry)), None)
        }
    };
    let metrics = {
        let mut registry = registry.lock().expect("metrics registry poisoned");
        crate::udp::receive_buffer::register(&mut registry, &bound.dns.0)
            .context("reading the DNS socket for its receive-buffer metrics")?;
        Arc::new(Metrics::register(&mut registry))
    };
    let readiness = Readiness::default();
    let (accept, accept_watch) = drain::channel();
    let (rest, rest_watch) = drain::channel();
    let (mut accepting, mut tasks) = (Tasks::default(), Tasks::default());

    let upstreams = upstreams(&config);
    let locale = locale(&config);
    let names = Arc::new(ArcSwap::from_pointee(NameTable::unsynced(&locale)));
    let sync = catalog::start(&config, shared_sync, &mut tasks, &rest_watch)?;
    let (answering, answering_rx) = watch::channel(Arc::new(SyncState::default()));
    tasks.spawn(
        "name table",
        catalog::follow_names(
            sync.clone(),
            answering,
            names.clone(),
            locale,
            metrics.clone(),
            readiness.part("catalog"),
            rest_watch.clone(),
        ),
    );
    let resolver = resolver(&config, names, upstreams.clone(), metrics.clone());
    let dns_addr = listeners::serve(
        bound.dns,
        &config,
        &resolver,
        &metrics,
        &mut accepting,
        &accept_watch,
    )?;
    purge::start(&resolver, &metrics, &mut tasks, &rest_watch);
    let metrics_addr = bound
        .metrics
        .map(|l| {
            isthmus_proto::admin::spawn_metrics(&mut tasks, l, registry.clone(), rest_watch.clone())
        })
        .transpose()?;
    let admin_addr = admin::start(
        bound.admin,
        admin::Dump::new(&config, &upstreams, &resolver, &sync),
        registry,
        readiness.clone(),
        &mut tasks,
        &rest_watch,
    )?;

    tracing::info!(%dns_addr, ?admin_addr, ?metrics_addr, upstreams = ?upstreams, "dns proxy serving");
    Ok(DnsHandle {
        dns_addr,
        admin_addr,
        metrics_addr,
        resolver,
        metrics,
        sync: answering_rx,
        stop: Stop {
            readiness,
            accept,
            accepting,
            rest,
            tasks,
        },
    })
}

/// The configured upstreams, else the nameservers of the resolv.conf file (less this proxy).
fn upstreams(config: &Config) -> Vec<SocketAddr> {
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
    upstreams
}

/// Where this proxy stands in the mesh: what the name table is built for.
fn locale(config: &Config) -> Locale {
    Locale {
        network: config.network.clone(),
        cluster: config.cluster.clone(),
        namespace: config.namespace.clone(),
        cluster_domain: config.cluster_domain.clone(),
        ipv6: config.ipv6,
    }
}

/// The request path: the name table, then the cache, then the upstreams.
fn resolver(
    config: &Config,
    names: Arc<ArcSwap<NameTable>>,
    upstreams: Vec<SocketAddr>,
    metrics: Arc<Metrics>,
) -> Arc<Resolver> {
    let cache = Cache::new(CacheLimits {
        max_entries: config.cache_entries,
        max_ttl: config.cache_max_ttl,
        max_negative_ttl: config.negative_max_ttl,
    });
    let forwarder = Forwarder::new(
        upstreams,
        config.upstream_mode,
        config.query_timeout,
        metrics.clone(),
    )
    .with_socket_mark(config.socket_mark);
    Arc::new(
        Resolver::new(
            names,
            cache,
            forwarder,
            metrics,
            config.max_inflight,
            config.ttl,
            config.max_udp_payload,
            &config.cluster_domain,
        )
        .with_client_upstream_share(config.max_inflight_per_client)
        .with_client_rate_limit(
            config.client_rate,
            config.client_burst,
            crate::config::DEFAULT_RATE_LIMITED_CLIENTS,
            config.rate_limit_loopback,
            config.rate_limit_exempt.clone(),
        ),
    )
}
