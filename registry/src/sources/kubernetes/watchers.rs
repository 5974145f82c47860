//! One cluster's watchers: a `kube` watcher with a reflector per kind, feeding one channel
//! with what changed. The reflector stores are what the mapping reads; the channel only says
//! which objects to map again. A relist (after a watch expired with 410 Gone, or the API
//! server restarted) fills the reflector's buffer and swaps it in whole at the end, and is
//! reported as one `Listed`, so it never looks like a delete and a re-add.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use isthmus_proto::program::error_chain;

use super::mapping::{labels, Lookup};

/// The kinds of Istio's API the source reads from a cluster, with isthmus' own Network.
pub const ISTIO_GROUP: &str = "networking.istio.io";
pub const ISTIO_KINDS: &[&str] = &[
    "ServiceEntry",
    "WorkloadEntry",
    "WorkloadGroup",
    "DestinationRule",
    "VirtualService",
];
pub const ISTHMUS_GROUP: &str = "isthmus.io";
pub const ISTHMUS_KINDS: &[&str] = &["Network"];

/// What a watcher tells the cluster's loop.
#[derive(Debug)]
pub enum Msg {
    /// An object was added, changed or deleted.
    Changed(&'static str, Touched),
    /// A complete list of the kind is in its store (first sync, or a relist).
    Listed(&'static str),
    /// The watcher failed; it retries with back-off.
    Failed(&'static str, String),
}

/// Which object an event touched, as far as the mapping cares.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Touched {
    Service {
        namespace: String,
        name: String,
    },
    Pod {
        namespace: String,
        name: String,
    },
    Node,
    Namespace(String),
    /// An Istio or isthmus object, by kind.
    Object {
        kind: &'static str,
        namespace: String,
        name: String,
    },
}

/// The reflector stores of one cluster.
#[derive(Clone)]
pub struct Stores {
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    pub pods: Store<Pod>,
    pub nodes: Store<Node>,
    pub namespaces: Store<Namespace>,
    /// Per kind of Istio or isthmus object the cluster serves.
    pub objects: Vec<ObjectStore>,
}

/// The store of one kind of Istio or isthmus object, with the API resource it is read as.
#[derive(Clone)]
pub struct ObjectStore {
    pub kind: &'static str,
    pub resource: ApiResource,
    pub store: Store<DynamicObject>,
}

impl ObjectStore {
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<DynamicObject>> {
        let r = reflector::ObjectRef::new_with(name, self.resource.clone());
        let r = if namespace.is_empty() {
            r
        } else {
            r.within(namespace)
        };
        self.store.get(&r)
    }
}

impl Lookup for Stores {
    fn pod(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.pods
            .get(&reflector::ObjectRef::new(name).within(namespace))
    }
    fn node(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes.get(&reflector::ObjectRef::new(name))
    }
    fn namespace(&self, name: &str) -> Option<Arc<Namespace>> {
        self.namespaces.get(&reflector::ObjectRef::new(name))
    }
}

impl Stores {
    /// Objects per kind, for the cluster's status.
    pub fn counts(&self) -> Vec<(&'static str, usize)> {
        let mut out = vec![
            ("Service", self.services.len()),
            ("EndpointSlice", self.slices.len()),
            ("Pod", self.pods.len()),
            ("Node", self.nodes.len()),
            ("Namespace", self.namespaces.len()),
        ];
        out.extend(self.objects.iter().map(|o| (o.kind, o.store.len())));
        out
    }
}

/// Starts the watchers of one cluster; they run until `tasks` is dropped or aborted.
/// `objects` are the Istio and isthmus kinds the cluster serves, as discovered.
pub fn start(
    client: &Client,
    objects: &[(&'static str, ApiResource)],
    timeout: std::time::Duration,
    tx: mpsc::UnboundedSender<Msg>,
    tasks: &mut JoinSet<()>,
) -> Stores {
    let config = watcher::Config::default().timeout(timeout.as_secs().clamp(1, 3600) as u32);
    let tasks = &mut Watchers { tasks, config };
    let services = watch(
        tasks,
        "Service",
        Api::all(client.clone()),
        (),
        tx.clone(),
        |s: &Service| Touched::Service {
            namespace: s.metadata.namespace.clone().unwrap_or_default(),
            name: s.metadata.name.clone().unwrap_or_default(),
        },
    );
    let slices = watch(
        tasks,
        "EndpointSlice",
        Api::all(client.clone()),
        (),
        tx.clone(),
        |s: &EndpointSlice| Touched::Service {
            namespace: s.metadata.namespace.clone().unwrap_or_default(),
            name: s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(labels::SERVICE_NAME).cloned())
                .unwrap_or_default(),
        },
    );
    let pods = watch(
        tasks,
        "Pod",
        Api::all(client.clone()),
        (),
        tx.clone(),
        |p: &Pod| Touched::Pod {
            namespace: p.metadata.namespace.clone().unwrap_or_default(),
            name: p.metadata.name.clone().unwrap_or_default(),
        },
    );
    let nodes = watch(
        tasks,
        "Node",
        Api::all(client.clone()),
        (),
        tx.clone(),
        |_: &Node| Touched::Node,
    );
    let namespaces = watch(
        tasks,
        "Namespace",
        Api::all(client.clone()),
        (),
        tx.clone(),
        |n: &Namespace| Touched::Namespace(n.metadata.name.clone().unwrap_or_default()),
    );
    let objects = objects
        .iter()
        .map(|(kind, ar)| {
            let kind: &'static str = kind;
            let store = watch(
                tasks,
                kind,
                Api::all_with(client.clone(), ar),
                ar.clone(),
                tx.clone(),
                move |o: &DynamicObject| Touched::Object {
                    kind,
                    namespace: o.metadata.namespace.clone().unwrap_or_default(),
                    name: o.metadata.name.clone().unwrap_or_default(),
                },
            );
            ObjectStore {
                kind,
                resource: ar.clone(),
                store,
            }
        })
        .collect();
    Stores {
        services,
        slices,
        pods,
        nodes,
        namespaces,
        objects,
    }
}

/// One watcher and its reflector: events go to the store first, then (as a `Touched`) to
/// the cluster's loop.
/// Where the watchers run, and how they watch.
struct Watchers<'a> {
    tasks: &'a mut JoinSet<()>,
    config: watcher::Config,
}

fn watch<K>(
    w: &mut Watchers<'_>,
    kind: &'static str,
    api: Api<K>,
    dyntype: K::DynamicType,
    tx: mpsc::UnboundedSender<Msg>,
    touched: impl Fn(&K) -> Touched + Send + 'static,
) -> Store<K>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let writer: Writer<K> = Writer::new(dyntype);
    let store = writer.as_reader();
    let stream = reflector::reflector(
        writer,
        watcher::watcher(api, w.config.clone()).default_backoff(),
    );
    w.tasks.spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let msg = match event {
                Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => {
                    Msg::Changed(kind, touched(&o))
                }
                Ok(watcher::Event::InitDone) => Msg::Listed(kind),
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
                Err(e) => Msg::Failed(kind, error_chain(&e)),
            };
            if tx.send(msg).is_err() {
                return;
            }
        }
    });
    store
}

/// The kinds of `group` (among `kinds`) the cluster serves, each at the version the cluster
/// prefers. A group the cluster does not serve at all gives none (its CRDs are not
/// installed); any other failure is an error.
pub async fn discover(
    client: &Client,
    group: &str,
    kinds: &[&'static str],
) -> Result<Vec<(&'static str, ApiResource)>, String> {
    let g = match kube::discovery::group(client, group).await {
        Ok(g) => g,
        Err(kube::Error::Discovery(kube::error::DiscoveryError::MissingApiGroup(_))) => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(error_chain(&e)),
    };
    Ok(kinds
        .iter()
        .filter_map(|k| g.recommended_kind(k).map(|(ar, _)| (*k, ar)))
        .collect())
}
