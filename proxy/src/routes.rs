//! The routing table of the proxy core: every (service hostname, service port, subset) the
//! caller's network view names is a [`Destination`] with its endpoints, its balancer and
//! its connection limit, built from the service's view when a connection first needs it.
//! The table is rebuilt off the data path whenever the view changes and swapped in
//! atomically; a destination that survives a rebuild is the same object, updated in place,
//! so open connections, round-robin position and outlier ejections carry over.
//!
//! Subsets: a subset the service's DestinationRule defines selects the endpoints carrying its
//! labels (and the remote gateways with endpoints of it behind them, weighted by those);
//! any other subset name is read by convention as the endpoints' `version` label (the label
//! Istio subsets are conventionally defined on); `_` (empty) is every endpoint.
//!
//! Routes: a connection to a service whose VirtualService has a `tcp` (or `tls`) route
//! matching it (destination port, the caller's labels) goes to one of that route's
//! destinations, chosen by weight with a smooth weighted round robin, so the shares hold
//! exactly over any run of connections rather than on average.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use arc_swap::ArcSwap;
use isthmus_proto::drain;
use isthmus_proto::model::{
    EndpointKind, Health, L4Route, LoadBalancer, Locality, Scope, ServiceView, Subset,
    TrafficPolicy, ViewResource,
};
use isthmus_proto::program::ReadyPart;
use isthmus_proto::subscription::{self, LocalView, SyncState};
use isthmus_proto::traffic::TcpKeepalive;
use isthmus_proto::SpiffeId;
use serde::Serialize;

use crate::balancer::{self, Balancer, FailureOutcome, OutlierConfig, Policy};
use crate::metrics::istio;
use crate::metrics::Metrics;

/// The endpoint label a non-empty subset selects on.
pub const SUBSET_LABEL: &str = "version";
/// The label on a Service or ServiceEntry that keeps its connections off the pooled tunnels:
/// `"false"` has every caller connect to its endpoints with mTLS of their own, as without
/// tunnels (say, for an app that must see each caller's own TCP connection).
pub const TUNNEL_LABEL: &str = "networking.isthmus.io/tunnel";

/// Whether callers may take tunnels to `svc`'s endpoints (its [`TUNNEL_LABEL`]); a value
/// other than `true` or `false` is reported and leaves the tunnels on.
fn tunnels_allowed(svc: &isthmus_proto::model::Service) -> bool {
    match svc.labels.get(TUNNEL_LABEL).map(String::as_str) {
        None | Some("true") => true,
        Some("false") => false,
        Some(other) => {
            tracing::warn!(
                service = %svc.hostname,
                label = TUNNEL_LABEL,
                value = other,
                "the label is neither \"true\" nor \"false\"; tunnels stay allowed"
            );
            true
        }
    }
}
/// Connections to one service port at once (Envoy's circuit-breaker default is 1,024 per
/// cluster; an east-west gateway fans in a whole network's clients, so more). The VM agent
/// and the gateway both take this default.
pub const DEFAULT_MAX_CONNECTIONS_PER_DESTINATION: usize = 16_384;
/// How often the route follower looks at the sync state even when no view arrived, so the
/// catalog gauges (staleness) stay current through registry outages.
const FOLLOW_TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// Which endpoints of a view a table routes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Only workloads on the caller's own network (the east-west gateway: it never sends
    /// a connection on to another network).
    LocalWorkloads,
    /// Local workloads directly and remote networks through their gateways (a workload's
    /// outbound).
    Mesh,
}

/// How destinations pick and bound their endpoints.
#[derive(Debug, Clone)]
pub struct RouteOptions {
    pub reach: Reach,
    pub policy: Policy,
    pub outlier: OutlierConfig,
    /// The caller's locality, for locality-priority load balancing.
    pub locality: Locality,
    /// Connections open to one destination at once; more are refused.
    pub max_connections_per_destination: usize,
}

impl Default for RouteOptions {
    fn default() -> Self {
        Self {
            reach: Reach::Mesh,
            policy: Policy::RoundRobin,
            outlier: OutlierConfig::default(),
            locality: Locality::default(),
            max_connections_per_destination: DEFAULT_MAX_CONNECTIONS_PER_DESTINATION,
        }
    }
}

/// What a destination is called: the SNI key's parts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct DestinationKey {
    pub hostname: String,
    pub port: u16,
    /// Empty: every endpoint.
    pub subset: String,
}

impl std::fmt::Display for DestinationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let subset = if self.subset.is_empty() {
            ""
        } else {
            &self.subset
        };
        write!(f, "{}:{}", self.hostname, self.port)?;
        if !subset.is_empty() {
            write!(f, "/{subset}")?;
        }
        Ok(())
    }
}

/// One place a connection to a destination can go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    /// Stable across view updates (the workload's uid, or the gateway's).
    pub uid: String,
    pub addr: SocketAddr,
    /// A remote network's gateway (the connection carries the SNI key through it) rather
    /// than the workload itself.
    pub via_gateway: bool,
    pub network: String,
    #[serde(serialize_with = "display")]
    pub locality: Locality,
    #[serde(serialize_with = "display_all")]
    pub identities: Vec<SpiffeId>,
    pub weight: u32,
    /// Where the endpoint's proxy accepts tunnels (HBONE) on its address; 0: it accepts
    /// none, connect to `addr` with mTLS.
    pub tunnel_port: u16,
}

fn display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn display_all<T: std::fmt::Display, S: serde::Serializer>(
    v: &[T],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|x| x.to_string()))
}

struct Endpoints {
    /// Shared with the connections that picked them: a pick hands out a reference, not a
    /// copy of the target's names and identities.
    targets: Vec<Arc<Target>>,
    /// Each target's index by its uid, for a destination with many targets
    /// ([`INDEXED_FROM`]); a few are found by comparing each, which spares most
    /// destinations (one endpoint, or two or three) a map and a copy of every uid.
    /// Boxed, so a destination without one holds a pointer rather than a map's 48 bytes.
    #[allow(clippy::box_collection)]
    by_uid: Option<Box<HashMap<String, usize>>>,
    balancer: Balancer,
}

/// From this many targets on, a destination finds a target by its uid in a map.
const INDEXED_FROM: usize = 16;

impl Endpoints {
    fn index_of(&self, uid: &str) -> Option<usize> {
        match &self.by_uid {
            Some(by_uid) => by_uid.get(uid).copied(),
            None => self.targets.iter().position(|t| t.uid == uid),
        }
    }
}

/// One service port (and subset) and the endpoints serving it.
pub struct Destination {
    pub key: DestinationKey,
    /// The service's hostname, name and namespace, as the metric labels name it.
    pub service: istio::Service,
    /// Whether other networks may reach it through this network's gateway.
    exported: Mutex<bool>,
    /// Every identity the service's endpoints run as: what a client accepts from the server.
    identities: Mutex<Vec<SpiffeId>>,
    endpoints: Mutex<Endpoints>,
    /// Connections open to this destination, held by [`Slot`]s.
    open: AtomicUsize,
    /// The most open at once: the proxy's setting, or the DestinationRule's
    /// `maxConnections`.
    max_connections: AtomicUsize,
    /// The DestinationRule's `connectTimeout`, in ms (0: the proxy's own).
    connect_timeout_ms: AtomicU64,
    /// The DestinationRule's `tcpKeepalive`, for the sockets connected to its endpoints.
    tcp_keepalive: Mutex<Option<TcpKeepalive>>,
}

/// One of a destination's open connections (its share of the connection limit), given
/// back on drop.
#[derive(Debug)]
pub struct Slot(Arc<Destination>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destination")
            .field("key", &self.key)
            .finish()
    }
}

impl Destination {
    /// `caller` is `opts.locality`, shared by the table's destinations.
    fn new(
        key: DestinationKey,
        service: istio::Service,
        opts: &RouteOptions,
        caller: &Arc<Locality>,
    ) -> Self {
        Self {
            key,
            service,
            exported: Mutex::new(true),
            identities: Mutex::new(Vec::new()),
            endpoints: Mutex::new(Endpoints {
                targets: Vec::new(),
                by_uid: None,
                balancer: Balancer::new(opts.policy, opts.outlier, caller.clone(), Vec::new()),
            }),
            open: AtomicUsize::new(0),
            max_connections: AtomicUsize::new(opts.max_connections_per_destination),
            connect_timeout_ms: AtomicU64::new(0),
            tcp_keepalive: Mutex::new(None),
        }
    }

    /// A slot for one more connection, unless the limit is reached.
    pub fn take_slot(self: &Arc<Self>) -> Option<Slot> {
        let max = self.max_connections();
        self.open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.clone()))
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// The DestinationRule's connect timeout, when it sets one.
    pub fn connect_timeout(&self) -> Option<std::time::Duration> {
        match self.connect_timeout_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(std::time::Duration::from_millis(ms)),
        }
    }

    /// Applies `policy` (the DestinationRule's, effective for this port and subset) over
    /// the proxy's own settings in `opts`: load balancing, outlier ejection, the connection
    /// limit, the connect timeout and TCP keepalive. Endpoints keep their state; connections open beyond
    /// a lowered limit stay, and new ones wait for the count to fall below it.
    fn apply(&self, policy: &TrafficPolicy, opts: &RouteOptions) {
        let lb = match policy.load_balancer {
            Some(LoadBalancer::RoundRobin) => Policy::RoundRobin,
            Some(LoadBalancer::LeastConnections) => Policy::LeastConnections,
            Some(LoadBalancer::Random) => Policy::Random,
            None => opts.policy,
        };
        let mut outlier = opts.outlier;
        if let Some(o) = &policy.outlier {
            match o.consecutive_errors {
                // Istio's 0: no ejection on consecutive errors.
                Some(0) => outlier.consecutive_failures = u32::MAX,
                Some(n) => outlier.consecutive_failures = n,
                None => {}
            }
            if let Some(ms) = o.base_ejection_ms {
                outlier.base_ejection = std::time::Duration::from_millis(ms);
                outlier.max_ejection = outlier.max_ejection.max(outlier.base_ejection);
            }
            if let Some(p) = o.max_ejection_percent {
                outlier.max_ejection_percent = p;
            }
        }
        self.endpoints
            .lock()
            .expect("destination poisoned")
            .balancer
            .configure(lb, outlier, policy.locality.clone().unwrap_or_default());
        let max = policy
            .max_connections
            .map_or(opts.max_connections_per_destination, |n| n as usize);
        self.max_connections.store(max, Ordering::SeqCst);
        self.connect_timeout_ms
            .store(policy.connect_timeout_ms.unwrap_or(0), Ordering::Relaxed);
        *self.tcp_keepalive.lock().expect("destination poisoned") = policy.tcp_keepalive;
    }

    /// The DestinationRule's TCP keepalive, when it sets one.
    pub fn tcp_keepalive(&self) -> Option<TcpKeepalive> {
        *self.tcp_keepalive.lock().expect("destination poisoned")
    }

    fn set(&self, targets: Vec<Target>, identities: Vec<SpiffeId>, exported: bool) {
        *self.exported.lock().expect("destination poisoned") = exported;
        *self.identities.lock().expect("destination poisoned") = identities;
        let mut e = self.endpoints.lock().expect("destination poisoned");
        e.balancer.update(
            targets
                .iter()
                .map(|t| balancer::Endpoint {
                    id: t.uid.clone(),
                    locality: t.locality.clone(),
                    weight: t.weight,
                })
                .collect(),
        );
        e.by_uid = (targets.len() >= INDEXED_FROM).then(|| {
            Box::new(
                targets
                    .iter()
                    .enumerate()
                    // Of a uid twice, the first, as comparing each would find.
                    .rev()
                    .map(|(i, t)| (t.uid.clone(), i))
                    .collect(),
            )
        });
        // Not `into_iter().map(Arc::new).collect()`: that collects in place, into the
        // allocation sized for the targets themselves, and keeps it (for one target, 736
        // bytes held for an 8-byte pointer, per destination).
        let mut shared = Vec::with_capacity(targets.len());
        shared.extend(targets.into_iter().map(Arc::new));
        e.targets = shared;
    }

    /// The DestinationRule's `localityLbSetting` in force (the default when none).
    pub fn locality(&self) -> balancer::LocalityLb {
        self.endpoints
            .lock()
            .expect("destination poisoned")
            .balancer
            .locality()
            .clone()
    }

    /// The connection limit.
    pub fn max_connections(&self) -> usize {
        self.max_connections.load(Ordering::SeqCst)
    }

    pub fn exported(&self) -> bool {
        *self.exported.lock().expect("destination poisoned")
    }

    pub fn identities(&self) -> Vec<SpiffeId> {
        self.identities
            .lock()
            .expect("destination poisoned")
            .clone()
    }

    pub fn targets(&self) -> Vec<Arc<Target>> {
        self.endpoints
            .lock()
            .expect("destination poisoned")
            .targets
            .clone()
    }

    /// Picks a target that is not ejected and not in `tried`.
    pub fn pick(&self, now: Instant, tried: &[Arc<Target>]) -> Option<Arc<Target>> {
        let mut e = self.endpoints.lock().expect("destination poisoned");
        let exclude: Vec<usize> = tried.iter().filter_map(|t| e.index_of(&t.uid)).collect();
        let i = e.balancer.pick(now, &exclude)?;
        Some(e.targets[i].clone())
    }

    pub fn on_connected(&self, uid: &str) {
        let mut e = self.endpoints.lock().expect("destination poisoned");
        if let Some(i) = e.index_of(uid) {
            e.balancer.on_connected(i);
        }
    }

    pub fn on_close(&self, uid: &str) {
        let mut e = self.endpoints.lock().expect("destination poisoned");
        if let Some(i) = e.index_of(uid) {
            e.balancer.on_close(i);
        }
    }

    /// None when the target left the view meanwhile.
    pub fn on_connect_failed(&self, uid: &str, now: Instant) -> Option<FailureOutcome> {
        let mut e = self.endpoints.lock().expect("destination poisoned");
        let i = e.index_of(uid)?;
        Some(e.balancer.on_connect_failed(i, now))
    }

    fn dump(&self, now: Instant) -> DestinationDump {
        let e = self.endpoints.lock().expect("destination poisoned");
        DestinationDump {
            key: self.key.clone(),
            exported: self.exported(),
            identities: self.identities().iter().map(|i| i.to_string()).collect(),
            open_connections: self.open_connections(),
            endpoints: e
                .targets
                .iter()
                .enumerate()
                .map(|(i, t)| EndpointDump {
                    target: Target::clone(t),
                    active: e.balancer.active(i),
                    ejected: e.balancer.is_ejected(i, now),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct EndpointDump {
    #[serde(flatten)]
    pub target: Target,
    pub active: u32,
    pub ejected: bool,
}

#[derive(Debug, Serialize)]
pub struct DestinationDump {
    pub key: DestinationKey,
    pub exported: bool,
    pub identities: Vec<String>,
    pub open_connections: usize,
    pub endpoints: Vec<EndpointDump>,
}

/// Why a destination lookup found nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("no service {0} in this network's view")]
    UnknownService(String),
    #[error("service {hostname} has no port {port}")]
    UnknownPort { hostname: String, port: u16 },
    #[error("service {hostname} has no subset {subset} (neither in its DestinationRule nor as a {SUBSET_LABEL} label of its endpoints)")]
    UnknownSubset { hostname: String, subset: String },
    #[error("the route of {hostname}:{port} goes to {destination}, which {why}")]
    RoutedNowhere {
        hostname: String,
        port: u16,
        destination: String,
        why: String,
    },
}

impl LookupError {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            LookupError::UnknownService(_) => "unknown_service",
            LookupError::UnknownPort { .. } => "unknown_port",
            LookupError::UnknownSubset { .. } => "unknown_subset",
            LookupError::RoutedNowhere { .. } => "routed_nowhere",
        }
    }
}

/// Every destination of one view. A destination is built from its service's view on first
/// use (a lookup, or a route resolving to it) and kept from then on, across rebuilds: a
/// proxy holds the services of the whole view, but most callers reach a few of them, and
/// a built destination (its endpoints as targets, its balancer, its identities) costs
/// several times what the view already holds for it.
#[derive(Debug, Default)]
pub struct RouteTable {
    version: String,
    /// What destinations are built with: the proxy's settings, and the caller's locality
    /// (shared by all of them).
    opts: RouteOptions,
    caller: Arc<Locality>,
    /// Each service of the view, found by its hostname: what its destinations are built
    /// from, and what tells an unknown service from an unknown port or subset.
    services: HashSet<ByHost>,
    /// How many destinations the view names (each service port with each of its subsets),
    /// built or not.
    available: usize,
    /// The destinations built so far, each found by its own key (a map would hold a
    /// second copy of every key).
    built: Mutex<HashSet<Keyed>>,
    /// Service addresses (cluster VIPs and allocated VIPs) -> their service, for traffic
    /// that names a VIP rather than a hostname.
    addresses: HashMap<IpAddr, Arc<ServiceView>>,
    /// hostname -> the routes of its VirtualService that this caller may take.
    routes: HashMap<String, Arc<Routes>>,
}

/// A service in the table's set, which compares and hashes as its hostname, so the set is
/// searched by hostname without a copy of it.
#[derive(Debug)]
struct ByHost(Arc<ServiceView>);

impl PartialEq for ByHost {
    fn eq(&self, other: &Self) -> bool {
        self.0.service.hostname == other.0.service.hostname
    }
}

impl Eq for ByHost {}

impl std::hash::Hash for ByHost {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.service.hostname.hash(state);
    }
}

impl std::borrow::Borrow<str> for ByHost {
    fn borrow(&self) -> &str {
        &self.0.service.hostname
    }
}

/// A destination in the table's set, which compares and hashes as its key, so the set is
/// searched by key.
#[derive(Debug)]
struct Keyed(Arc<Destination>);

impl PartialEq for Keyed {
    fn eq(&self, other: &Self) -> bool {
        self.0.key == other.0.key
    }
}

impl Eq for Keyed {}

impl std::hash::Hash for Keyed {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.key.hash(state);
    }
}

impl std::borrow::Borrow<DestinationKey> for Keyed {
    fn borrow(&self) -> &DestinationKey {
        &self.0.key
    }
}

/// A hostname's `tcp`/`tls` routes, each with its weighted choice among its destinations.
#[derive(Debug)]
struct Routes {
    routes: Vec<(L4Route, WeightedChoice)>,
}

/// A smooth weighted round robin (nginx's): over any `total` consecutive picks each
/// destination is chosen exactly its weight's times, spread evenly.
#[derive(Debug)]
struct WeightedChoice {
    weights: Vec<i64>,
    current: Mutex<Vec<i64>>,
}

impl WeightedChoice {
    fn new(weights: Vec<i64>) -> Self {
        let current = Mutex::new(vec![0; weights.len()]);
        Self { weights, current }
    }

    /// The index chosen next; None when every weight is 0.
    fn pick(&self) -> Option<usize> {
        let total: i64 = self.weights.iter().sum();
        if total == 0 {
            return None;
        }
        let mut current = self.current.lock().expect("route choice poisoned");
        for (c, w) in current.iter_mut().zip(&self.weights) {
            *c += w;
        }
        let (best, _) = current
            .iter()
            .enumerate()
            .filter(|(i, _)| self.weights[*i] > 0)
            .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))?;
        current[best] -= total;
        Some(best)
    }
}

impl RouteTable {
    /// Builds the table of `view`. The destinations `previous` had built that the view
    /// still names are carried over: the same objects, updated in place. The rest are
    /// built when first used.
    pub fn build(view: &LocalView, previous: &RouteTable, opts: &RouteOptions) -> RouteTable {
        let mut table = RouteTable {
            version: view.version.clone(),
            opts: opts.clone(),
            caller: Arc::new(opts.locality.clone()),
            ..Default::default()
        };
        for res in view.resources.values() {
            let ViewResource::Service(sv) = res else {
                continue;
            };
            table.add_service(sv);
            table.add_routes(sv, previous);
        }
        // A destination a connection builds in `previous` after this point is built again
        // in this table on its next use, without the state it gathered meanwhile.
        // A destination hashes and compares as its key, which never changes.
        #[allow(clippy::mutable_key_type)]
        let carried = previous
            .built()
            .iter()
            .filter_map(|d| {
                let sv = table.services.get(d.0.key.hostname.as_str())?;
                serves(&sv.0, d.0.key.port, &d.0.key.subset).ok()?;
                table.fill(&sv.0, &d.0);
                Some(Keyed(d.0.clone()))
            })
            .collect();
        table.built = Mutex::new(carried);
        table
    }

    fn built(&self) -> std::sync::MutexGuard<'_, HashSet<Keyed>> {
        self.built.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The routes of `sv`'s VirtualService, the weighted choices of `previous` kept where
    /// the routes are the same.
    fn add_routes(&mut self, sv: &ServiceView, previous: &RouteTable) {
        let mine: Vec<&L4Route> = sv.routes.iter().collect();
        if mine.is_empty() {
            return;
        }
        let host = &sv.service.hostname;
        let same = previous.routes.get(host).filter(|p| {
            p.routes.len() == mine.len() && p.routes.iter().zip(&mine).all(|((a, _), b)| a == *b)
        });
        let routes = match same {
            Some(p) => p.clone(),
            None => Arc::new(Routes {
                routes: mine
                    .into_iter()
                    .map(|r| {
                        let weights = r.destinations.iter().map(|d| i64::from(d.weight)).collect();
                        (r.clone(), WeightedChoice::new(weights))
                    })
                    .collect(),
            }),
        };
        self.routes.insert(host.clone(), routes);
    }

    /// Whether `hostname` has `tls` routes, which match on the server name the app sends:
    /// a caller reads its ClientHello first ([`crate::client_hello`]) only then.
    pub fn wants_sni(&self, hostname: &str) -> bool {
        self.routes
            .get(hostname)
            .is_some_and(|rs| rs.routes.iter().any(|(r, _)| !r.sni_hosts.is_empty()))
    }

    /// The destination a new connection to `hostname:port` from a caller labelled `source`
    /// goes to: with no subset named, the destination its first matching route picks (by
    /// weight), else the service port itself; with a subset, that subset. With the server
    /// name the app sent (`sni`), its first matching `tls` route comes before the `tcp`
    /// ones, as in Istio; without one, only `tcp` routes match.
    pub fn resolve(
        &self,
        hostname: &str,
        port: u16,
        subset: &str,
        source: &BTreeMap<String, String>,
        sni: Option<&str>,
    ) -> Result<Arc<Destination>, LookupError> {
        let route = self
            .routes
            .get(hostname)
            .filter(|_| subset.is_empty())
            .and_then(|rs| {
                let tls = rs
                    .routes
                    .iter()
                    .filter(|(r, _)| !r.sni_hosts.is_empty())
                    .find(|(r, _)| sni.is_some() && r.matches(port, source, sni));
                tls.or_else(|| {
                    rs.routes
                        .iter()
                        .find(|(r, _)| r.sni_hosts.is_empty() && r.matches(port, source, None))
                })
            });
        let Some((route, choice)) = route else {
            return self.lookup(hostname, port, subset);
        };
        let nowhere = |destination: String, why: String| LookupError::RoutedNowhere {
            hostname: hostname.to_string(),
            port,
            destination,
            why,
        };
        let Some(i) = choice.pick() else {
            return Err(nowhere(
                "no destination".into(),
                "has weight 0 everywhere".into(),
            ));
        };
        let d = &route.destinations[i];
        let to_port = if d.port == 0 { port } else { d.port };
        self.lookup(&d.host, to_port, &d.subset).map_err(|e| {
            let name = DestinationKey {
                hostname: d.host.clone(),
                port: to_port,
                subset: d.subset.clone(),
            };
            nowhere(name.to_string(), format!("is not routable here: {e}"))
        })
    }

    /// Indexes `sv` by its hostname and its addresses.
    fn add_service(&mut self, sv: &Arc<ServiceView>) {
        let svc = &sv.service;
        let addresses = svc.addresses.iter().map(|a| &a.address);
        for a in addresses.chain(&svc.allocated_addresses) {
            if let Ok(ip) = a.parse::<IpAddr>() {
                self.addresses.insert(ip, sv.clone());
            }
        }
        self.available += port_numbers(sv).len() * subsets_of(sv).len();
        // The last of a hostname wins, as in a map.
        if let Some(gone) = self.services.replace(ByHost(sv.clone())) {
            self.available -= port_numbers(&gone.0).len() * subsets_of(&gone.0).len();
        }
    }

    /// Sets `dest` (a destination of `sv`) to what `sv` says of its port and subset: its
    /// endpoints as targets, the identities it accepts, and its traffic policy.
    fn fill(&self, sv: &ServiceView, dest: &Destination) {
        let svc = &sv.service;
        let (port, subset) = (dest.key.port, dest.key.subset.as_str());
        // A gateway carries only what callers of every namespace may see: the SNI key does
        // not name the caller's namespace.
        let exported = svc.scope == Scope::Mesh && svc.export_to.is_public();
        // Identities the service names as its servers' (`subjectAltNames`): accepted from
        // every endpoint beside the endpoint's own, as Istio accepts a service's accounts.
        let sans: Vec<SpiffeId> = svc
            .subject_alt_names
            .iter()
            .filter_map(|san| SpiffeId::parse(san).ok())
            .collect();
        let identities: Vec<SpiffeId> = sv
            .endpoints
            .iter()
            .flat_map(|e| e.identities.iter().cloned())
            .chain(sans.iter().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let defined = sv.subsets.iter().find(|s| s.name == subset);
        let policy = sv.policy.effective(defined.map(|s| &s.policy), port);
        let mut targets = targets_of(sv, port, subset, defined, self.opts.reach);
        for t in targets.iter_mut().filter(|t| !t.identities.is_empty()) {
            for san in &sans {
                if !t.identities.contains(san) {
                    t.identities.push(san.clone());
                }
            }
        }
        dest.set(targets, identities, exported);
        dest.apply(&policy, &self.opts);
    }

    /// A new destination of `sv` for `key`, filled.
    fn destination(&self, sv: &ServiceView, key: DestinationKey) -> Arc<Destination> {
        let svc = &sv.service;
        let service = istio::Service {
            hostname: svc.hostname.clone(),
            name: svc.name.clone(),
            namespace: svc.namespace.clone(),
        };
        let dest = Arc::new(Destination::new(key, service, &self.opts, &self.caller));
        self.fill(sv, &dest);
        dest
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// How many destinations the view names, built or not.
    pub fn len(&self) -> usize {
        self.available
    }

    pub fn is_empty(&self) -> bool {
        self.available == 0
    }

    /// How many destinations have been built (used, or carried over from a table in which
    /// they were).
    pub fn built_len(&self) -> usize {
        self.built().len()
    }

    /// The destination for a hostname, port and subset (empty for all endpoints), built
    /// on its first use.
    pub fn lookup(
        &self,
        hostname: &str,
        port: u16,
        subset: &str,
    ) -> Result<Arc<Destination>, LookupError> {
        let key = DestinationKey {
            hostname: hostname.to_string(),
            port,
            subset: subset.to_string(),
        };
        let mut built = self.built();
        if let Some(d) = built.get(&key) {
            return Ok(d.0.clone());
        }
        let sv = self
            .services
            .get(hostname)
            .ok_or_else(|| LookupError::UnknownService(hostname.to_string()))?;
        serves(&sv.0, port, subset)?;
        let dest = self.destination(&sv.0, key);
        built.insert(Keyed(dest.clone()));
        Ok(dest)
    }

    /// The hostname a service address (VIP) belongs to.
    pub fn hostname_of(&self, ip: IpAddr) -> Option<&str> {
        self.addresses
            .get(&ip)
            .map(|sv| sv.service.hostname.as_str())
    }

    /// Every service address (VIP) in the table: what the VM agent captures.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.addresses.keys().copied()
    }

    /// Every destination the view names with its endpoints and their state, for
    /// `/config_dump`. One not built yet is shown as it would be built (no connections,
    /// none ejected) and stays unbuilt.
    pub fn dump(&self) -> Vec<DestinationDump> {
        let now = Instant::now();
        let built = self.built();
        let mut all = Vec::with_capacity(self.available);
        for sv in &self.services {
            for port in port_numbers(&sv.0) {
                for subset in subsets_of(&sv.0) {
                    let key = DestinationKey {
                        hostname: sv.0.service.hostname.clone(),
                        port,
                        subset,
                    };
                    all.push(match built.get(&key) {
                        Some(d) => d.0.dump(now),
                        None => self.destination(&sv.0, key).dump(now),
                    });
                }
            }
        }
        all.sort_by(|a, b| a.key.cmp(&b.key));
        all
    }
}

/// Every port number `sv` names, a number named twice as often as it is named.
fn ports_named(sv: &ServiceView) -> impl Iterator<Item = u16> + '_ {
    sv.service.ports.iter().map(|p| p.number)
}

/// Every subset `sv` names, some more than once: every endpoint (`""`), each its
/// DestinationRule defines, and each endpoint's [`SUBSET_LABEL`] value.
fn subsets_named(sv: &ServiceView) -> impl Iterator<Item = &str> + '_ {
    std::iter::once("")
        .chain(sv.subsets.iter().map(|s| s.name.as_str()))
        .chain(
            sv.endpoints
                .iter()
                .filter_map(|e| e.labels.get(SUBSET_LABEL).map(String::as_str)),
        )
}

/// The port numbers `sv` has destinations for (a number named twice is one).
fn port_numbers(sv: &ServiceView) -> BTreeSet<u16> {
    ports_named(sv).collect()
}

/// The subsets `sv` has destinations for, each once (see [`subsets_named`]).
fn subsets_of(sv: &ServiceView) -> BTreeSet<String> {
    subsets_named(sv).map(str::to_string).collect()
}

/// Whether `sv` has a destination for `port` and `subset` (one of [`port_numbers`] and one
/// of [`subsets_of`]), or what it lacks. It scans instead of building those sets: a table
/// rebuild asks this of every destination it carries over.
fn serves(sv: &ServiceView, port: u16, subset: &str) -> Result<(), LookupError> {
    let svc = &sv.service;
    if !ports_named(sv).any(|p| p == port) {
        return Err(LookupError::UnknownPort {
            hostname: svc.hostname.clone(),
            port,
        });
    }
    if !subsets_named(sv).any(|s| s == subset) {
        return Err(LookupError::UnknownSubset {
            hostname: svc.hostname.clone(),
            subset: subset.to_string(),
        });
    }
    Ok(())
}

/// Rebuilds `routes` whenever the Watch client publishes a new view, keeps the catalog
/// gauges current, and reports `ready` once a view from the registry is in use. Runs until
/// `shutdown`; the last table stays in place through registry outages.
///
/// The table (and Istio's catalog of peers) is built on the blocking pool: with 10,000
/// services that takes tens of milliseconds, during which a runtime of one worker (the VM
/// agent's default) would otherwise serve no connection. Connections keep the old table
/// until the new one is stored.
pub async fn follow(
    sync: tokio::sync::watch::Receiver<Arc<SyncState>>,
    routes: Arc<ArcSwap<RouteTable>>,
    opts: RouteOptions,
    metrics: Arc<Metrics>,
    ready: ReadyPart,
    shutdown: drain::Watch,
) {
    let ready = Mutex::new(Some(ready));
    let (routes, metrics, ready) = (&routes, &metrics, &ready);
    let turn = move |state: Arc<SyncState>, view_changed: bool| {
        let build = view_changed.then(|| {
            let (view, routes, opts) = (state.view.clone(), routes.clone(), opts.clone());
            tokio::task::spawn_blocking(move || {
                let table = RouteTable::build(&view, &routes.load(), &opts);
                (table, istio::Catalog::build(&view))
            })
        });
        async move {
            if let Some(build) = build {
                match build.await {
                    Ok((table, catalog)) => {
                        tracing::info!(
                            version = table.version(),
                            destinations = table.len(),
                            built = table.built_len(),
                            "routing table rebuilt"
                        );
                        metrics.destinations.set(table.len() as i64);
                        routes.store(Arc::new(table));
                        metrics.istio.set_catalog(catalog);
                    }
                    // A panic while building: the last table stays in use.
                    Err(e) => tracing::error!(
                        version = state.view.version,
                        "rebuilding the routing table failed, the last one stays in use: {e}"
                    ),
                }
            }
            if state.synced() {
                ready.lock().unwrap_or_else(PoisonError::into_inner).take();
            }
            metrics.catalog.observe(&state);
        }
    };
    subscription::follow(sync, shutdown, Some(FOLLOW_TICK), turn).await;
}

/// The healthy endpoints of `sv` for one service port and subset (`defined` when the
/// service's DestinationRule defines it), as connect targets.
fn targets_of(
    sv: &ServiceView,
    port: u16,
    subset: &str,
    defined: Option<&Subset>,
    reach: Reach,
) -> Vec<Target> {
    let tunnels = tunnels_allowed(&sv.service);
    sv.endpoints
        .iter()
        .filter(|e| e.health == Health::Healthy)
        .filter(|e| match reach {
            Reach::LocalWorkloads => e.kind == EndpointKind::Workload,
            Reach::Mesh => true,
        })
        .filter_map(|e| {
            // The weight this endpoint carries for the subset, if it serves it: a defined
            // subset's weight behind a gateway is what the registry counted there; a
            // subset by convention passes every gateway, whose side applies it.
            let weight = match (subset.is_empty(), defined, e.kind) {
                (true, _, _) => e.weight,
                (false, Some(s), EndpointKind::Workload) => {
                    if s.selects(&e.labels) {
                        e.weight
                    } else {
                        return None;
                    }
                }
                (false, Some(s), EndpointKind::Gateway) => *e.subset_weights.get(&s.name)?,
                (false, None, EndpointKind::Gateway) => e.weight,
                (false, None, EndpointKind::Workload) => {
                    if e.labels.get(SUBSET_LABEL).map(String::as_str) == Some(subset) {
                        e.weight
                    } else {
                        return None;
                    }
                }
            };
            Some((e, weight))
        })
        .filter_map(|(e, weight)| {
            // The proxy connects by address: an endpoint known only by a DNS name (a
            // `resolution: DNS` ServiceEntry's) is not a connect target here.
            let ip = e.address.ip()?;
            let to = *e.ports.get(&port)?;
            Some(Target {
                uid: e.uid.clone(),
                addr: SocketAddr::new(ip, to),
                via_gateway: e.kind == EndpointKind::Gateway,
                network: e.network.clone(),
                locality: e.locality.clone(),
                identities: e.identities.clone(),
                weight: weight.max(1),
                tunnel_port: if tunnels { e.tunnel_port } else { 0 },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
