//! The catalog: every resource the sources know, indexed so that one change finds the
//! services it touches without scanning the whole catalog. Pure data, no I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use isthmus_proto::model::{
    DestinationRule, Network, OwnedResource, Resource, Service, VirtualService, Workload,
};

/// The origin prefix of what a registry imports from the registries it peers with
/// (`peer:<name>/`): such resources are never exported again, so peering cannot loop.
pub const PEER_ORIGIN_PREFIX: &str = "peer:";

/// What a change touched, for the views to recompute.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Change {
    pub hostnames: BTreeSet<String>,
    /// A network (its gateways) changed: every remote entry may change.
    pub networks: BTreeSet<String>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.hostnames.is_empty() && self.networks.is_empty()
    }

    pub fn merge(&mut self, other: Change) {
        self.hostnames.extend(other.hostnames);
        self.networks.extend(other.networks);
    }
}

/// `namespace/label=value`: one allocation per index entry instead of three.
fn label_key(ns: &str, k: &str, v: &str) -> String {
    format!("{ns}/{k}={v}")
}

#[derive(Debug, Default)]
pub struct Catalog {
    resources: BTreeMap<String, OwnedResource>,
    /// hostname -> keys of the Service resources defining it (one per cluster and namespace;
    /// keys sort by cluster, then namespace).
    service_defs: HashMap<String, BTreeSet<String>>,
    /// `ns/label=value` -> keys of the services whose selector has that pair, so that a
    /// workload finds the services selecting it without scanning its namespace.
    services_by_selector: HashMap<String, BTreeSet<String>>,
    /// `ns/label=value` -> workload keys.
    workloads_by_label: HashMap<String, BTreeSet<String>>,
    /// hostname -> workloads that name it explicitly.
    workloads_by_host: HashMap<String, BTreeSet<String>>,
    /// hostname -> keys of the DestinationRules for it.
    rules_by_host: HashMap<String, BTreeSet<String>>,
    /// hostname -> keys of the VirtualServices routing it.
    routes_by_host: HashMap<String, BTreeSet<String>>,
}

impl Catalog {
    pub fn len(&self) -> usize {
        self.resources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&OwnedResource> {
        self.resources.get(key)
    }

    /// Resources with their catalog keys, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &OwnedResource)> {
        self.resources.iter()
    }

    pub fn resources(&self) -> impl Iterator<Item = &OwnedResource> {
        self.resources.values()
    }

    pub fn networks(&self) -> impl Iterator<Item = &Network> {
        self.resources.values().filter_map(|r| match &*r.resource {
            Resource::Network(n) => Some(n),
            _ => None,
        })
    }

    pub fn network(&self, id: &str) -> Option<&Network> {
        match self
            .resources
            .get(&format!("Network//{id}"))
            .map(|r| &*r.resource)
        {
            Some(Resource::Network(n)) => Some(n),
            _ => None,
        }
    }

    pub fn hostnames(&self) -> impl Iterator<Item = &String> {
        self.service_defs.keys()
    }

    /// The Service resources defining `hostname`, in key order.
    pub fn service_defs(&self, hostname: &str) -> Vec<&Service> {
        self.service_defs
            .get(hostname)
            .into_iter()
            .flatten()
            .filter_map(|k| match self.resources.get(k).map(|r| &*r.resource) {
                Some(Resource::Service(s)) => Some(s),
                _ => None,
            })
            .collect()
    }

    /// The definitions of `hostname` by namespace (each namespace's are one service, whatever
    /// the clusters they come from; two namespaces' are two services, as in Istio).
    pub fn service_defs_by_namespace(&self, hostname: &str) -> BTreeMap<&str, Vec<&Service>> {
        let mut out: BTreeMap<&str, Vec<&Service>> = BTreeMap::new();
        for s in self.service_defs(hostname) {
            out.entry(s.namespace.as_str()).or_default().push(s);
        }
        out
    }

    /// The Service resources defining `hostname` with their keys, in key order.
    pub fn service_def_entries(&self, hostname: &str) -> Vec<(&String, &Service)> {
        self.service_defs
            .get(hostname)
            .into_iter()
            .flatten()
            .filter_map(|k| match self.resources.get(k).map(|r| &*r.resource) {
                Some(Resource::Service(s)) => Some((k, s)),
                _ => None,
            })
            .collect()
    }

    /// The DestinationRules for `hostname`, in key order.
    pub fn destination_rules(&self, hostname: &str) -> Vec<&DestinationRule> {
        self.rules_by_host
            .get(hostname)
            .into_iter()
            .flatten()
            .filter_map(|k| match self.resources.get(k).map(|r| &*r.resource) {
                Some(Resource::DestinationRule(d)) => Some(d.as_ref()),
                _ => None,
            })
            .collect()
    }

    /// The VirtualServices routing `hostname`, in key order.
    pub fn virtual_services(&self, hostname: &str) -> Vec<&VirtualService> {
        self.routes_by_host
            .get(hostname)
            .into_iter()
            .flatten()
            .filter_map(|k| match self.resources.get(k).map(|r| &*r.resource) {
                Some(Resource::VirtualService(v)) => Some(v.as_ref()),
                _ => None,
            })
            .collect()
    }

    fn workload(&self, key: &str) -> Option<&Workload> {
        match self.resources.get(key).map(|r| &*r.resource) {
            Some(Resource::Workload(w)) => Some(w),
            _ => None,
        }
    }

    /// Every workload serving `hostname` under its definitions in `namespace` (a workload
    /// serves only services of its own namespace).
    pub fn endpoints(&self, hostname: &str, namespace: &str) -> Vec<&Workload> {
        self.endpoint_entries(hostname, namespace)
            .into_iter()
            .map(|(_, w)| w)
            .collect()
    }

    /// [`Self::endpoints`] with their keys, in key order.
    pub fn endpoint_entries(&self, hostname: &str, namespace: &str) -> Vec<(&String, &Workload)> {
        let mut keys: BTreeSet<&String> = BTreeSet::new();
        for svc in self
            .service_defs(hostname)
            .into_iter()
            .filter(|s| s.namespace == namespace)
        {
            if let Some(explicit) = self.workloads_by_host.get(hostname) {
                keys.extend(explicit.iter().filter(|k| {
                    self.workload(k)
                        .is_some_and(|w| w.namespace == svc.namespace)
                }));
            }
            if svc.selector.is_empty() {
                continue;
            }
            // Intersect the label index sets, smallest first.
            let mut sets: Vec<&BTreeSet<String>> = Vec::new();
            for (k, v) in &svc.selector {
                match self
                    .workloads_by_label
                    .get(&label_key(&svc.namespace, k, v))
                {
                    Some(s) => sets.push(s),
                    None => {
                        sets.clear();
                        break;
                    }
                }
            }
            sets.sort_by_key(|s| s.len());
            if let Some((first, rest)) = sets.split_first() {
                keys.extend(first.iter().filter(|k| rest.iter().all(|s| s.contains(*k))));
            }
        }
        keys.into_iter()
            .filter_map(|k| self.workload(k).map(|w| (k, w)))
            .collect()
    }

    /// Whether the resource under `key` is this registry's own: from its sources, not
    /// imported from a peered registry (see [`PEER_ORIGIN_PREFIX`]).
    pub fn is_own(&self, key: &str) -> bool {
        self.resources
            .get(key)
            .is_some_and(|r| !r.origin.starts_with(PEER_ORIGIN_PREFIX))
    }

    /// Hostnames a workload serves, as the catalog stands.
    fn hostnames_served_by(&self, w: &Workload) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = w
            .services
            .iter()
            .filter(|h| self.service_defs.contains_key(*h))
            .cloned()
            .collect();
        for (k, v) in &w.labels {
            for key in self
                .services_by_selector
                .get(&label_key(&w.namespace, k, v))
                .into_iter()
                .flatten()
            {
                if let Some(Resource::Service(s)) = self.resources.get(key).map(|r| &*r.resource) {
                    if !out.contains(&s.hostname) && w.serves(s) {
                        out.insert(s.hostname.clone());
                    }
                }
            }
        }
        out
    }

    /// Inserts or replaces a resource; returns what it touched (empty if it was identical).
    pub fn upsert(&mut self, r: OwnedResource) -> Change {
        let key = r.resource.key();
        if self.resources.get(&key) == Some(&r) {
            return Change::default();
        }
        let mut change = self.remove(&key);
        match &*r.resource {
            Resource::Network(n) => {
                change.networks.insert(n.id.clone());
            }
            Resource::Service(s) => {
                self.service_defs
                    .entry(s.hostname.clone())
                    .or_default()
                    .insert(key.clone());
                for (k, v) in &s.selector {
                    self.services_by_selector
                        .entry(label_key(&s.namespace, k, v))
                        .or_default()
                        .insert(key.clone());
                }
                change.hostnames.insert(s.hostname.clone());
            }
            Resource::Workload(w) => {
                for (k, v) in &w.labels {
                    self.workloads_by_label
                        .entry(label_key(&w.namespace, k, v))
                        .or_default()
                        .insert(key.clone());
                }
                for h in &w.services {
                    self.workloads_by_host
                        .entry(h.clone())
                        .or_default()
                        .insert(key.clone());
                }
                change.hostnames.extend(self.hostnames_served_by(w));
            }
            Resource::WorkloadGroup(_) => {}
            Resource::DestinationRule(d) => {
                self.rules_by_host
                    .entry(d.host.clone())
                    .or_default()
                    .insert(key.clone());
                change.hostnames.insert(d.host.clone());
            }
            Resource::VirtualService(v) => {
                for h in &v.hosts {
                    self.routes_by_host
                        .entry(h.clone())
                        .or_default()
                        .insert(key.clone());
                    change.hostnames.insert(h.clone());
                }
            }
        }
        self.resources.insert(key, r);
        change
    }

    /// Removes a resource; returns what it touched.
    pub fn remove(&mut self, key: &str) -> Change {
        let mut change = Change::default();
        let Some(old) = self.resources.get(key) else {
            return change;
        };
        match &*old.resource {
            Resource::Network(n) => {
                change.networks.insert(n.id.clone());
            }
            Resource::Service(s) => {
                change.hostnames.insert(s.hostname.clone());
                let (host, ns, selector) =
                    (s.hostname.clone(), s.namespace.clone(), s.selector.clone());
                remove_from(&mut self.service_defs, &host, key);
                for (k, v) in &selector {
                    remove_from(&mut self.services_by_selector, &label_key(&ns, k, v), key);
                }
            }
            Resource::Workload(w) => {
                change.hostnames.extend(self.hostnames_served_by(w));
                let w = w.clone();
                for (k, v) in &w.labels {
                    remove_from(
                        &mut self.workloads_by_label,
                        &label_key(&w.namespace, k, v),
                        key,
                    );
                }
                for h in &w.services {
                    remove_from(&mut self.workloads_by_host, h, key);
                }
            }
            Resource::WorkloadGroup(_) => {}
            Resource::DestinationRule(d) => {
                let host = d.host.clone();
                remove_from(&mut self.rules_by_host, &host, key);
                change.hostnames.insert(host);
            }
            Resource::VirtualService(v) => {
                let hosts = v.hosts.clone();
                for h in hosts {
                    remove_from(&mut self.routes_by_host, &h, key);
                    change.hostnames.insert(h);
                }
            }
        }
        self.resources.remove(key);
        change
    }
}

fn remove_from<K: std::hash::Hash + Eq + Clone>(
    map: &mut HashMap<K, BTreeSet<String>>,
    k: &K,
    v: &str,
) {
    if let Some(set) = map.get_mut(k) {
        set.remove(v);
        if set.is_empty() {
            map.remove(k);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use isthmus_proto::model::{ServicePort, Workload};

    pub(crate) fn svc(host: &str, ns: &str, cluster: &str, app: &str) -> OwnedResource {
        OwnedResource {
            origin: "test".into(),
            resource: std::sync::Arc::new(Resource::Service(Service {
                hostname: host.into(),
                namespace: ns.into(),
                name: host.split('.').next().unwrap().into(),
                cluster: cluster.into(),
                ports: vec![ServicePort {
                    name: "http".into(),
                    number: 80,
                    protocol: "HTTP".into(),
                    target_port: 8080,
                }],
                selector: [("app".to_string(), app.to_string())].into(),
                ..Default::default()
            })),
        }
    }

    pub(crate) fn wl(name: &str, ns: &str, app: &str, addr: &str, network: &str) -> OwnedResource {
        OwnedResource {
            origin: "test".into(),
            resource: std::sync::Arc::new(Resource::Workload(Workload {
                uid: format!("c/{ns}/{name}"),
                name: name.into(),
                namespace: ns.into(),
                address: isthmus_proto::model::Address::parse(addr).unwrap(),
                network: network.into(),
                cluster: "c".into(),
                labels: [("app".to_string(), app.to_string())].into(),
                weight: 1,
                identity: Some(
                    isthmus_proto::SpiffeId::parse(&format!("spiffe://td/ns/{ns}/sa/{app}"))
                        .unwrap(),
                ),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn selector_membership_follows_labels_and_namespaces() {
        let mut c = Catalog::default();
        c.upsert(svc("web.shop", "shop", "c", "web"));
        let ch = c.upsert(wl("w1", "shop", "web", "10.0.0.1", "a"));
        assert_eq!(ch.hostnames, ["web.shop".to_string()].into());
        c.upsert(wl("w2", "other", "web", "10.0.0.2", "a"));
        c.upsert(wl("w3", "shop", "db", "10.0.0.3", "a"));
        let eps: Vec<_> = c
            .endpoints("web.shop", "shop")
            .iter()
            .map(|w| w.name.clone())
            .collect();
        assert_eq!(eps, vec!["w1"]);
        // Relabel w3 into the service: the change names the service.
        let ch = c.upsert(wl("w3", "shop", "web", "10.0.0.3", "a"));
        assert!(ch.hostnames.contains("web.shop"));
        assert_eq!(c.endpoints("web.shop", "shop").len(), 2);
        // Relabel out again.
        let ch = c.upsert(wl("w3", "shop", "db", "10.0.0.3", "a"));
        assert!(ch.hostnames.contains("web.shop"));
        assert_eq!(c.endpoints("web.shop", "shop").len(), 1);
        // Identical upsert touches nothing.
        assert!(c
            .upsert(wl("w1", "shop", "web", "10.0.0.1", "a"))
            .is_empty());
        let ch = c.remove("Workload/c/shop/w1");
        assert!(ch.hostnames.contains("web.shop"));
        assert!(c.endpoints("web.shop", "shop").is_empty());
    }

    #[test]
    fn multi_label_selectors_need_every_label() {
        let mut c = Catalog::default();
        let mut front = wl("w1", "shop", "web", "10.0.0.1", "a");
        let mut back = wl("w2", "shop", "web", "10.0.0.2", "a");
        if let Resource::Workload(w) = std::sync::Arc::make_mut(&mut front.resource) {
            w.labels.insert("tier".into(), "front".into());
        }
        if let Resource::Workload(w) = std::sync::Arc::make_mut(&mut back.resource) {
            w.labels.insert("tier".into(), "back".into());
        }
        c.upsert(front);
        c.upsert(back.clone());
        let mut s = svc("web-front.shop", "shop", "c", "web");
        if let Resource::Service(svc) = std::sync::Arc::make_mut(&mut s.resource) {
            svc.selector.insert("tier".into(), "front".into());
        }
        c.upsert(s);
        let names: Vec<_> = c
            .endpoints("web-front.shop", "shop")
            .iter()
            .map(|w| w.name.clone())
            .collect();
        assert_eq!(names, vec!["w1"]);
        // Moving w2 to the front tier touches the service; its old labels did not match.
        if let Resource::Workload(w) = std::sync::Arc::make_mut(&mut back.resource) {
            w.labels.insert("tier".into(), "front".into());
        }
        assert!(c.upsert(back).hostnames.contains("web-front.shop"));
        assert_eq!(c.endpoints("web-front.shop", "shop").len(), 2);
        c.remove("Service/c/shop/web-front.shop/web-front");
        assert!(
            c.upsert(wl("w3", "shop", "web", "10.0.0.3", "a"))
                .is_empty(),
            "no service selects it any more"
        );
    }

    #[test]
    fn same_hostname_from_two_clusters_is_one_service() {
        let mut c = Catalog::default();
        c.upsert(svc("web.shop", "shop", "c1", "web"));
        c.upsert(svc("web.shop", "shop", "c2", "web"));
        c.upsert(wl("w1", "shop", "web", "10.0.0.1", "a"));
        assert_eq!(c.service_defs("web.shop").len(), 2);
        assert_eq!(c.endpoints("web.shop", "shop").len(), 1);
        c.remove("Service/c1/shop/web.shop/web");
        assert_eq!(c.service_defs("web.shop").len(), 1);
        assert_eq!(c.endpoints("web.shop", "shop").len(), 1);
        c.remove("Service/c2/shop/web.shop/web");
        assert!(c.endpoints("web.shop", "shop").is_empty());
        assert_eq!(c.hostnames().count(), 0);
    }

    #[test]
    fn same_hostname_from_two_namespaces_is_two_services() {
        let mut c = Catalog::default();
        c.upsert(svc("db.example.com", "shop", "c1", "db"));
        c.upsert(svc("db.example.com", "books", "c1", "db"));
        c.upsert(svc("db.example.com", "books", "c2", "db"));
        c.upsert(wl("s1", "shop", "db", "10.0.0.1", "a"));
        c.upsert(wl("b1", "books", "db", "10.0.0.2", "a"));
        assert_eq!(
            c.service_defs("db.example.com").len(),
            3,
            "no definition replaces another"
        );
        let by_ns = c.service_defs_by_namespace("db.example.com");
        assert_eq!(by_ns.keys().copied().collect::<Vec<_>>(), ["books", "shop"]);
        assert_eq!(by_ns["books"].len(), 2);
        fn names(c: &Catalog, ns: &str) -> Vec<String> {
            c.endpoints("db.example.com", ns)
                .iter()
                .map(|w| w.name.clone())
                .collect()
        }
        assert_eq!(names(&c, "shop"), ["s1"]);
        assert_eq!(names(&c, "books"), ["b1"]);
        assert!(names(&c, "other").is_empty());
        let ch = c.remove("Service/c1/shop/db.example.com/db");
        assert!(ch.hostnames.contains("db.example.com"));
        assert!(names(&c, "shop").is_empty());
        assert_eq!(names(&c, "books"), ["b1"]);
    }
}
