//! Per-network views (split horizon). For each network the registry keeps views for
//! workloads, in which every endpoint on another network is replaced by that network's
//! gateways weighted by the healthy endpoints behind them, and one view for that network's
//! gateways, which holds only local endpoints (a gateway never routes to another gateway).
//!
//! Visibility is Istio's: a workload view is kept per namespace of its subscribers and holds
//! for each hostname the one definition that namespace sees (see [`chosen_namespace`]); the
//! gateway view (and an operator's) serves every namespace and holds the definition a caller
//! of any namespace may reach. A definition not exported to every namespace is served on its
//! own network only: the SNI key a caller sends through a gateway does not name the caller's
//! namespace, so a gateway cannot tell whether the caller may see it.
//!
//! A catalog change recomputes only the touched keys, once per view: the work is the size
//! of the change times the number of views, whatever the number of subscribers. Each view
//! keeps its entries already converted to protobuf, a version counter and a bounded history
//! of which keys changed at which version; subscribers read from it at their own pace.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use isthmus_proto::model::{
    network_view_key, service_view_key, Address, EndpointKind, ExportTo, Health, Labels, Network,
    Node, NodeKind, OwnedResource, Scope, Service, ServicePort, ServiceView, Subset, ViewEndpoint,
    ViewResource, Workload,
};
use isthmus_proto::{pb, SpiffeId};
use tokio::sync::watch;

use crate::catalog::{Catalog, Change};
use crate::vips::{self, VipChange, VipTable};

/// Versions of history a view keeps for resuming subscribers; older resumes get a snapshot.
pub const DEFAULT_HISTORY_VERSIONS: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ViewKey {
    pub network: String,
    /// The gateway variant: local endpoints only.
    pub gateway: bool,
    /// The namespace whose visibility the view follows; None: every namespace (gateways
    /// and operators).
    pub namespace: Option<String>,
    /// The subscriber's cluster, for cluster-local services: a proxy of cluster A sees only
    /// cluster A's endpoints of them, and none of a cluster-local service only B defines.
    /// None: every cluster's (gateways, which never carry cluster-local traffic, and
    /// operators).
    pub cluster: Option<String>,
    /// What this registry exports to the registries peered with it (see
    /// [`build_export_view`]); `network`, `namespace` and `cluster` are unused.
    pub export: bool,
}

impl ViewKey {
    /// The view of workloads on `network` in `namespace` (None: every namespace).
    pub fn workload(network: impl Into<String>, namespace: Option<String>) -> Self {
        Self {
            network: network.into(),
            gateway: false,
            namespace,
            cluster: None,
            export: false,
        }
    }

    /// The same view, for a subscriber of `cluster` (see [`ViewKey::cluster`]).
    pub fn in_cluster(mut self, cluster: &str) -> Self {
        self.cluster = (!cluster.is_empty()).then(|| cluster.to_string());
        self
    }

    /// The view of the gateways of `network`.
    pub fn gateway(network: impl Into<String>) -> Self {
        Self {
            network: network.into(),
            gateway: true,
            namespace: None,
            cluster: None,
            export: false,
        }
    }

    /// The view other registries import (see [`build_export_view`]).
    pub fn export() -> Self {
        Self {
            network: String::new(),
            gateway: false,
            namespace: None,
            cluster: None,
            export: true,
        }
    }

    /// The view a subscriber gets: a gateway's, serving every namespace; an operator's,
    /// seeing every namespace; else the view of the namespace its certificate names (the
    /// verified identity, never a name the subscriber merely claims).
    pub fn for_subscriber(node: &Node, identity: &SpiffeId) -> Self {
        match node.kind {
            NodeKind::Gateway => Self::gateway(node.network.clone()),
            NodeKind::Ctl => Self::workload(node.network.clone(), None),
            NodeKind::Peer => Self::export(),
            NodeKind::Workload | NodeKind::Dns | NodeKind::Vm => Self::workload(
                node.network.clone(),
                identity.namespace().map(str::to_string),
            )
            .in_cluster(&node.cluster),
        }
    }
}

impl std::fmt::Display for ViewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.export {
            return write!(f, "export to peers");
        }
        write!(
            f,
            "{}/{}",
            self.network,
            if self.gateway { "gateway" } else { "workload" }
        )?;
        if let Some(ns) = &self.namespace {
            write!(f, "/{ns}")?;
        }
        match &self.cluster {
            Some(c) => write!(f, " (cluster {c})"),
            None => Ok(()),
        }
    }
}

#[derive(Debug)]
pub struct HistoryEntry {
    pub seq: u64,
    pub keys: Vec<String>,
    pub at: Instant,
}

/// A digest of a view's whole content: the XOR of a hash of every entry, so that it is
/// updated per changed key and equal content gives an equal digest whatever the order of
/// changes that led to it.
pub type Digest = [u8; 16];

fn entry_hash(key: &str, entry: &Entry) -> Digest {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(key.as_bytes());
    ctx.update(&[0]);
    ctx.update(&entry.0);
    let mut out = [0u8; 16];
    out.copy_from_slice(&ctx.finish().as_ref()[..16]);
    out
}

fn xor(acc: &mut Digest, h: &Digest) {
    acc.iter_mut().zip(h).for_each(|(a, b)| *a ^= b);
}

/// A view entry as the Watch sends it: the `pb::ViewResource`, encoded. Encoded, an entry is
/// a fraction of its decoded size (a protobuf endpoint decoded is about 1.2 KB, mostly map
/// nodes and small strings; encoded, about 150 bytes), so a view of 100,000 endpoints is
/// kept in ~15 MB rather than ~100 MB; entries are decoded a part at a time as they are sent.
/// Encoding is deterministic (ordered maps), so equal entries are equal bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Entry(Arc<[u8]>);

impl Entry {
    pub fn encode(resource: &pb::ViewResource) -> Self {
        Entry(prost::Message::encode_to_vec(resource).into())
    }

    /// The resource. Never fails: the bytes are the view's own encoding.
    pub fn decode(&self) -> pb::ViewResource {
        <pb::ViewResource as prost::Message>::decode(&self.0[..])
            .expect("a view entry decodes: the view encoded it")
    }

    pub fn encoded_len(&self) -> usize {
        self.0.len()
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.decode(), f)
    }
}

#[derive(Debug, Default)]
pub struct ViewState {
    pub seq: u64,
    pub digest: Digest,
    pub entries: BTreeMap<String, Entry>,
    pub history: VecDeque<HistoryEntry>,
}

/// Where a subscriber says it is, from the version it last applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resume {
    /// A sequence number of this very view (same view id).
    pub seq: Option<u64>,
    /// The content digest at that version, from any view id (e.g. before a registry restart).
    pub digest: Option<Digest>,
}

impl Resume {
    pub fn at(seq: u64) -> Self {
        Self {
            seq: Some(seq),
            digest: None,
        }
    }
}

/// What a subscriber needs, with the version it brings it to.
#[derive(Debug)]
pub enum Catchup {
    UpToDate {
        version: String,
        seq: u64,
    },
    Delta {
        version: String,
        seq: u64,
        upserts: Vec<Entry>,
        removals: Vec<String>,
        /// When the oldest change in this delta was published.
        oldest_change: Option<Instant>,
    },
    Snapshot {
        version: String,
        seq: u64,
        entries: Vec<Entry>,
    },
}

impl ViewState {
    /// Whether history reaches back to `from` (every change after it is recorded).
    fn can_resume_from(&self, from: u64) -> bool {
        if from > self.seq {
            return false;
        }
        match self.history.front() {
            Some(h) => from + 1 >= h.seq,
            None => from == self.seq,
        }
    }

    fn delta_since(&self, from: u64) -> (Vec<Entry>, Vec<String>, Option<Instant>) {
        let mut keys = BTreeSet::new();
        let mut oldest = None;
        for h in self.history.iter().filter(|h| h.seq > from) {
            oldest.get_or_insert(h.at);
            keys.extend(h.keys.iter());
        }
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        for k in keys {
            match self.entries.get(k) {
                Some(e) => upserts.push(e.clone()),
                None => removals.push(k.clone()),
            }
        }
        (upserts, removals, oldest)
    }
}

#[derive(Debug)]
pub struct View {
    pub key: ViewKey,
    /// Random per view and per registry run: a sequence number from another view or another
    /// run never passes for one of ours (its digest still may).
    pub id: String,
    pub state: RwLock<ViewState>,
    notify: watch::Sender<u64>,
    history_limit: usize,
}

impl View {
    fn new(key: ViewKey, history_limit: usize) -> Self {
        Self {
            key,
            id: hex::encode(rand::random::<[u8; 6]>()),
            state: RwLock::new(ViewState::default()),
            notify: watch::channel(0).0,
            history_limit,
        }
    }

    /// `<view id>.<sequence>.<content digest>`.
    pub fn version_of(&self, st: &ViewState) -> String {
        format!("{}.{}.{}", self.id, st.seq, hex::encode(st.digest))
    }

    pub fn version(&self) -> String {
        self.version_of(&self.state.read().expect("view lock"))
    }

    /// Reads a version a subscriber sends back (as its resume point or an ack).
    pub fn parse_version(&self, v: &str) -> Resume {
        let mut parts = v.split('.');
        let (Some(id), Some(seq), Some(digest), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Resume::default();
        };
        let digest = hex::decode(digest)
            .ok()
            .and_then(|d| Digest::try_from(d.as_slice()).ok());
        let seq = if id == self.id {
            seq.parse().ok()
        } else {
            None
        };
        Resume { seq, digest }
    }

    /// What a subscriber at `resume` needs: the changes since its version while history
    /// reaches back to it; nothing when its content equals ours (even from before a registry
    /// restart); else a snapshot.
    pub fn catchup(&self, resume: &Resume) -> Catchup {
        let st = self.state.read().expect("view lock");
        let version = self.version_of(&st);
        if let Some(from) = resume.seq.filter(|f| st.can_resume_from(*f)) {
            if from == st.seq {
                return Catchup::UpToDate {
                    version,
                    seq: st.seq,
                };
            }
            let (upserts, removals, oldest_change) = st.delta_since(from);
            return Catchup::Delta {
                version,
                seq: st.seq,
                upserts,
                removals,
                oldest_change,
            };
        }
        if resume.digest == Some(st.digest) {
            return Catchup::UpToDate {
                version,
                seq: st.seq,
            };
        }
        Catchup::Snapshot {
            version,
            seq: st.seq,
            entries: st.entries.values().cloned().collect(),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    pub fn seq(&self) -> u64 {
        self.state.read().expect("view lock").seq
    }

    /// Replaces the entries under `keys` (None removes) and publishes a version when
    /// anything actually changed. Returns whether it published.
    fn publish(&self, updates: Vec<(String, Option<Entry>)>) -> bool {
        let mut st = self.state.write().expect("view lock");
        let mut changed = Vec::new();
        for (k, v) in updates {
            let old = st.entries.get(&k).cloned();
            if old == v {
                continue;
            }
            if let Some(old) = &old {
                let h = entry_hash(&k, old);
                xor(&mut st.digest, &h);
            }
            match v {
                Some(v) => {
                    let h = entry_hash(&k, &v);
                    xor(&mut st.digest, &h);
                    st.entries.insert(k.clone(), v);
                }
                None => {
                    st.entries.remove(&k);
                }
            }
            changed.push(k);
        }
        if changed.is_empty() {
            return false;
        }
        st.seq += 1;
        let seq = st.seq;
        st.history.push_back(HistoryEntry {
            seq,
            keys: changed,
            at: Instant::now(),
        });
        while st.history.len() > self.history_limit {
            st.history.pop_front();
        }
        drop(st);
        self.notify.send_replace(seq);
        true
    }
}

/// The catalog, the VIP allocations, and every view built from them.
#[derive(Debug)]
pub struct Views {
    inner: Mutex<Inner>,
    history_limit: usize,
}

#[derive(Debug, Default)]
struct Inner {
    catalog: Catalog,
    /// Kept beside the catalog, under the same lock, so a view entry always carries the
    /// VIPs of the catalog state it was built from.
    vips: VipTable,
    views: HashMap<ViewKey, Arc<View>>,
}

impl Default for Views {
    fn default() -> Self {
        Self::new(DEFAULT_HISTORY_VERSIONS)
    }
}

impl Views {
    pub fn new(history_limit: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            history_limit,
        }
    }

    /// Applies resource upserts and removals (by key) and VIP allocation changes (already
    /// stored), and updates every view.
    pub fn apply(
        &self,
        upserts: Vec<OwnedResource>,
        removals: Vec<String>,
        vip_changes: Vec<VipChange>,
    ) -> Change {
        let mut inner = self.inner.lock().expect("views lock");
        let mut change = Change::default();
        for c in vip_changes {
            match inner.vips.apply(&c) {
                Ok(()) => {
                    change.hostnames.insert(c.hostname().to_string());
                }
                // Plans never conflict with the table they came from; this would be a bug.
                Err(e) => tracing::error!(error = %e, "VIP change not applied"),
            }
        }
        for key in removals {
            change.merge(inner.catalog.remove(&key));
        }
        for r in upserts {
            change.merge(inner.catalog.upsert(r));
        }
        if !change.is_empty() {
            let Inner {
                catalog,
                vips,
                views,
            } = &*inner;
            for view in views.values() {
                refresh(catalog, vips, view, &change);
            }
        }
        change
    }

    /// The view for `key`, built on first use.
    pub fn view(&self, key: &ViewKey) -> Arc<View> {
        let mut inner = self.inner.lock().expect("views lock");
        if let Some(v) = inner.views.get(key) {
            return v.clone();
        }
        let view = Arc::new(View::new(key.clone(), self.history_limit));
        let all = Change {
            hostnames: inner.catalog.hostnames().cloned().collect(),
            networks: inner.catalog.networks().map(|n| n.id.clone()).collect(),
        };
        refresh(&inner.catalog, &inner.vips, &view, &all);
        inner.views.insert(key.clone(), view.clone());
        view
    }

    /// Whether `network` is one the registry knows: it has a Network resource, or a
    /// subscriber in it has a view. The admin port builds views only for these, so that a
    /// stray query cannot make the registry build and keep views for made-up networks.
    pub fn knows_network(&self, network: &str) -> bool {
        let inner = self.inner.lock().expect("views lock");
        inner.catalog.network(network).is_some() || inner.views.keys().any(|k| k.network == network)
    }

    /// Every network the registry knows (see [`Self::knows_network`]).
    pub fn known_networks(&self) -> Vec<String> {
        let inner = self.inner.lock().expect("views lock");
        let mut out: BTreeSet<String> = inner.catalog.networks().map(|n| n.id.clone()).collect();
        out.extend(inner.views.keys().map(|k| k.network.clone()));
        out.into_iter().collect()
    }

    pub fn views(&self) -> Vec<Arc<View>> {
        let inner = self.inner.lock().expect("views lock");
        let mut v: Vec<_> = inner.views.values().cloned().collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// Runs `f` with read access to the catalog.
    pub fn with_catalog<T>(&self, f: impl FnOnce(&Catalog) -> T) -> T {
        f(&self.inner.lock().expect("views lock").catalog)
    }

    /// Runs `f` with read access to the catalog and the VIP allocations.
    pub fn with_catalog_and_vips<T>(&self, f: impl FnOnce(&Catalog, &VipTable) -> T) -> T {
        let inner = self.inner.lock().expect("views lock");
        f(&inner.catalog, &inner.vips)
    }

    /// Runs `f` with read access to the VIP allocations.
    pub fn with_vips<T>(&self, f: impl FnOnce(&VipTable) -> T) -> T {
        f(&self.inner.lock().expect("views lock").vips)
    }

    /// The resources whose origin starts with `prefix`.
    pub fn resources_with_origin(&self, prefix: &str) -> Vec<OwnedResource> {
        self.with_catalog(|c| {
            c.resources()
                .filter(|r| r.origin.starts_with(prefix))
                .cloned()
                .collect()
        })
    }
}

/// Recomputes the keys `change` touched in `view`.
fn refresh(catalog: &Catalog, vips: &VipTable, view: &View, change: &Change) {
    let mut hostnames: BTreeSet<String> = change.hostnames.clone();
    let mut updates = Vec::new();
    if !change.networks.is_empty() {
        // A gateway appeared, moved or vanished: any remote entry may change.
        hostnames.extend(catalog.hostnames().cloned());
        for id in &change.networks {
            let entry = catalog
                .network(id)
                .filter(|_| !view.key.export || catalog.is_own(&format!("Network//{id}")))
                .map(|n| pb::ViewResource::from(&ViewResource::Network(Arc::new(n.clone()))))
                .map(|r| Entry::encode(&r));
            updates.push((network_view_key(id), entry));
        }
    }
    // Each entry is encoded as soon as it is built: building a whole view (its first
    // subscriber, a gateway change) never holds it decoded.
    for h in &hostnames {
        let entry = build_service_view(catalog, vips, h, &view.key)
            .map(|sv| pb::ViewResource::from(&ViewResource::Service(Arc::new(sv))))
            .map(|r| Entry::encode(&r));
        updates.push((service_view_key(h), entry));
    }
    view.publish(updates);
}

/// What the definitions of one hostname in one namespace export: the union over clusters.
fn export_of(defs: &[&Service]) -> ExportTo {
    defs.iter()
        .map(|d| &d.export_to)
        .fold(ExportTo::Nobody, |acc, e| acc.union(e))
}

/// The namespace whose definitions of a hostname a view for `audience` holds, when several
/// namespaces define it (`by_ns`: namespace -> its definitions), with the same preference as
/// Istio's sidecar scope: the audience's own namespace; else one that names the audience in
/// its `exportTo`; else one exported to every namespace. Istio takes the oldest definition
/// among equals; the catalog keeps no creation time, so the first namespace by name is
/// taken, the same in every registry. An audience of every namespace (a gateway, an
/// operator) gets a definition exported to every namespace, else any definition that is
/// exported at all, which such a view holds but does not route beyond its network.
pub fn chosen_namespace<'a>(
    by_ns: &BTreeMap<&'a str, Vec<&Service>>,
    audience: Option<&str>,
) -> Option<&'a str> {
    let exports: Vec<(&'a str, ExportTo)> = by_ns
        .iter()
        .map(|(ns, defs)| (*ns, export_of(defs)))
        .collect();
    let first = |pred: &dyn Fn(&str, &ExportTo) -> bool| {
        exports
            .iter()
            .find(|(ns, e)| pred(ns, e))
            .map(|(ns, _)| *ns)
    };
    match audience {
        Some(me) => first(&|ns, e| ns == me && e.visible_to(me))
            .or_else(|| first(&|_, e| !e.is_public() && e.visible_to(me)))
            .or_else(|| first(&|_, e| e.is_public())),
        None => first(&|_, e| e.is_public()).or_else(|| first(&|_, e| *e != ExportTo::Nobody)),
    }
}

/// Merges the definitions of one hostname in one namespace (namespace sameness across
/// clusters): ports, addresses and subject alt names are the union, the first definition (by key) names the
/// rest. The allocated addresses are the hostname's active VIPs when these definitions want
/// one; the registry's table is the only authority for them, whatever a source wrote.
fn merged_service(defs: &[&Service], vips: &VipTable) -> Option<Service> {
    let (first, rest) = defs.split_first()?;
    let mut svc = (*first).clone();
    // The selector is how the registry finds the endpoints, which the entry lists: no
    // subscriber reads it, and every proxy would keep a map of it per service.
    svc.selector.clear();
    svc.allocated_addresses = vips
        .active(&first.hostname)
        .filter(|_| vips::wants_vip(defs))
        .map(|a| a.addresses())
        .unwrap_or_default();
    svc.export_to = export_of(defs);
    for d in rest {
        for p in &d.ports {
            if !svc.ports.iter().any(|q| q.number == p.number) {
                svc.ports.push(p.clone());
            }
        }
        for a in &d.addresses {
            if !svc.addresses.contains(a) {
                svc.addresses.push(a.clone());
            }
        }
        for san in &d.subject_alt_names {
            if !svc.subject_alt_names.contains(san) {
                svc.subject_alt_names.push(san.clone());
            }
        }
        for (k, v) in &d.labels {
            if svc.labels.get(k).is_none() {
                svc.labels.insert(k.clone(), v.clone());
            }
        }
        if d.scope == Scope::Mesh {
            svc.scope = Scope::Mesh;
        }
    }
    svc.ports.sort_by_key(|p| p.number);
    Some(svc)
}

fn port_map(ports: &[ServicePort], f: impl Fn(&ServicePort) -> u16) -> BTreeMap<u16, u16> {
    ports.iter().map(|p| (p.number, f(p))).collect()
}

/// The view of one service from `key.network`, as `key.namespace` sees it.
pub fn build_service_view(
    catalog: &Catalog,
    vips: &VipTable,
    hostname: &str,
    key: &ViewKey,
) -> Option<ServiceView> {
    if key.export {
        return build_export_view(catalog, vips, hostname);
    }
    let by_ns = catalog.service_defs_by_namespace(hostname);
    let ns = chosen_namespace(&by_ns, key.namespace.as_deref())?;
    let defs = &by_ns[ns];
    let service = merged_service(defs, vips)?;
    let cluster_local = defs.iter().all(|d| d.scope == Scope::ClusterLocal);
    // A cluster-local service is its own cluster's business: another cluster's proxies
    // neither see it nor its endpoints.
    let home = |cluster: &str| match &key.cluster {
        Some(c) => c == cluster,
        None => defs.iter().any(|d| d.cluster == cluster),
    };
    if cluster_local
        && key
            .cluster
            .as_ref()
            .is_some_and(|c| !defs.iter().any(|d| &d.cluster == c))
    {
        return None;
    }
    // Only what every namespace may see goes through gateways (see the module doc).
    let beyond_network = !cluster_local && service.export_to.is_public();
    let audience = key.namespace.as_deref();
    let rule = chosen_for(catalog.destination_rules(hostname), audience, ns, |d| {
        (&d.namespace, &d.export_to)
    });
    let subsets = rule.map(|d| d.subsets.clone()).unwrap_or_default();
    let policy = rule.map(|d| d.policy.clone()).unwrap_or_default();
    let routes = chosen_for(catalog.virtual_services(hostname), audience, ns, |v| {
        (&v.namespace, &v.export_to)
    })
    .map(|v| v.routes.clone())
    .unwrap_or_default();
    let mut endpoints = Vec::new();
    let mut remote: BTreeMap<&str, Behind> = BTreeMap::new();
    for w in catalog.endpoints(hostname, ns) {
        if w.network == key.network {
            if cluster_local && !home(&w.cluster) {
                continue;
            }
            endpoints.push(workload_endpoint(w, &service));
        } else if !key.gateway && beyond_network && w.health == Health::Healthy {
            remote
                .entry(w.network.as_str())
                .or_default()
                .add(w, &subsets);
        }
    }
    for (net, behind) in remote {
        // A network without a gateway is unreachable from here: hand out nothing for it.
        let Some(network) = catalog.network(net) else {
            continue;
        };
        endpoints.extend(gateway_endpoints(network, &service, behind));
    }
    sort_endpoints(&mut endpoints);
    Some(ServiceView {
        service,
        endpoints,
        subsets,
        routes,
        policy: policy.into(),
    })
}

/// Of the traffic resources (DestinationRules, VirtualServices) for one hostname, the one a
/// view for `audience` (None: every namespace) applies, as Istio chooses among those visible
/// to the caller: the audience's own namespace's, else the service's namespace's, else the
/// first by key.
fn chosen_for<'a, T>(
    all: Vec<&'a T>,
    audience: Option<&str>,
    service_ns: &str,
    scope: impl Fn(&T) -> (&String, &ExportTo),
) -> Option<&'a T> {
    let visible: Vec<&T> = all
        .into_iter()
        .filter(|t| audience.is_none_or(|a| scope(t).1.visible_to(a)))
        .collect();
    let in_ns = |ns: &str| visible.iter().find(|t| scope(t).0 == ns).copied();
    audience
        .and_then(in_ns)
        .or_else(|| in_ns(service_ns))
        .or_else(|| visible.first().copied())
}

fn sort_endpoints(endpoints: &mut [ViewEndpoint]) {
    endpoints.sort_by(|a, b| {
        (a.kind as u8, &a.network, &a.address, &a.uid).cmp(&(
            b.kind as u8,
            &b.network,
            &b.address,
            &b.uid,
        ))
    });
}

/// A workload as an endpoint of `service`, reached directly (through its own tunnel port, when
/// it has one).
fn workload_endpoint(w: &Workload, service: &Service) -> ViewEndpoint {
    ViewEndpoint {
        kind: EndpointKind::Workload,
        address: w.address.clone(),
        ports: port_map(&service.ports, |p| w.port_for(p)),
        network: w.network.clone(),
        cluster: w.cluster.clone(),
        locality: w.locality.clone(),
        identities: w.identity.iter().cloned().collect(),
        weight: w.effective_weight(),
        health: w.health,
        labels: w.labels.clone(),
        uid: w.uid.clone(),
        tunnel_port: w.tunnel_port,
        stale_since_ms: w.stale_since_ms,
        subset_weights: BTreeMap::new(),
    }
}

/// What this registry exports to the registries peered with it: of its own definitions
/// (never what it imported itself, so peering cannot loop), the one a caller of any
/// namespace reaches, unless it is cluster-local; with every one of its own endpoints as
/// the workload it is, on its own network, healthy or not. The importing registry puts them
/// in its catalog and builds its views from them, so its proxies reach them through the
/// gateways of their networks (also exported) like any other remote endpoint. No VIPs: the
/// importing registry allocates its own.
pub fn build_export_view(
    catalog: &Catalog,
    vips: &VipTable,
    hostname: &str,
) -> Option<ServiceView> {
    let mut by_ns: BTreeMap<&str, Vec<&Service>> = BTreeMap::new();
    for (k, s) in catalog.service_def_entries(hostname) {
        if catalog.is_own(k) {
            by_ns.entry(s.namespace.as_str()).or_default().push(s);
        }
    }
    let ns = chosen_namespace(&by_ns, None)?;
    let defs = &by_ns[ns];
    if defs.iter().all(|d| d.scope == Scope::ClusterLocal) {
        return None;
    }
    let mut service = merged_service(defs, vips)?;
    service.allocated_addresses.clear();
    let mut endpoints: Vec<ViewEndpoint> = catalog
        .endpoint_entries(hostname, ns)
        .into_iter()
        .filter(|(k, _)| catalog.is_own(k))
        .map(|(_, w)| workload_endpoint(w, &service))
        .collect();
    sort_endpoints(&mut endpoints);
    Some(ServiceView {
        service,
        endpoints,
        ..Default::default()
    })
}

/// What a network's gateway stands for in a view: the healthy endpoints of the service on
/// that network.
#[derive(Default)]
struct Behind<'a> {
    weight: u32,
    identities: BTreeSet<&'a SpiffeId>,
    /// The oldest `stale_since_ms` among them (0 when all are current).
    stale_since_ms: i64,
    /// The weight of each subset (of the service's DestinationRule) among them.
    subsets: BTreeMap<String, u32>,
}

impl<'a> Behind<'a> {
    fn add(&mut self, w: &'a Workload, subsets: &[Subset]) {
        self.weight += w.effective_weight();
        for s in subsets.iter().filter(|s| s.selects(&w.labels)) {
            *self.subsets.entry(s.name.clone()).or_default() += w.effective_weight();
        }
        self.identities.extend(w.identity.iter());
        if w.stale_since_ms != 0
            && (self.stale_since_ms == 0 || w.stale_since_ms < self.stale_since_ms)
        {
            self.stale_since_ms = w.stale_since_ms;
        }
    }
}

/// Splits the weight behind a network over its gateways (the remainder to the first ones),
/// dropping gateways left with nothing.
fn gateway_endpoints(network: &Network, service: &Service, behind: Behind) -> Vec<ViewEndpoint> {
    let Behind {
        weight,
        identities,
        stale_since_ms,
        subsets,
    } = behind;
    let identities: Vec<SpiffeId> = identities.into_iter().cloned().collect();
    let n = network.gateways.len() as u32;
    if n == 0 {
        return Vec::new();
    }
    // The remainder of a split to the first gateways.
    let share = |total: u32, i: usize| total / n + u32::from((i as u32) < total % n);
    network
        .gateways
        .iter()
        .enumerate()
        .filter_map(|(i, g)| {
            let w = share(weight, i);
            (w > 0).then(|| ViewEndpoint {
                kind: EndpointKind::Gateway,
                address: Address::Ip(g.address),
                ports: port_map(&service.ports, |_| g.sni_port),
                network: network.id.clone(),
                cluster: String::new(),
                locality: g.locality.clone(),
                identities: identities.clone(),
                weight: w,
                health: Health::Healthy,
                labels: Labels::default(),
                uid: format!("gateway/{}/{}", network.id, g.address),
                tunnel_port: g.tunnel_port,
                stale_since_ms,
                subset_weights: subsets
                    .iter()
                    .map(|(s, total)| (s.clone(), share(*total, i)))
                    .filter(|(_, w)| *w > 0)
                    .collect(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
