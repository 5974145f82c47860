//! What every start-up phase after the identity reads: the checked configuration and
//! bundle, who and where the VM is, the systemd notifier, the metrics registry, readiness,
//! the current credentials and group template, and the two stop signals. Built once in `app::run` and
//! lent to each phase, so a phase's signature names only what it adds.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use isthmus_proto::admin::Readiness;
use isthmus_proto::bundle::AgentBundle;
use isthmus_proto::drain;
use isthmus_proto::identity::SpiffeId;
use isthmus_proto::model::WorkloadGroup;
use isthmus_proto::registration::Hello;
use isthmus_proto::subscription::RegistrySettings;
use isthmus_proto::tls::{Credentials, TrustBundle};
use isthmus_proxy::metrics::Metrics;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use super::check::Checked;
use super::identity::Identity;
use crate::config::AgentConfig;
use crate::metrics::AgentMetrics;
use crate::notify::Notifier;
use crate::registration;

pub(crate) struct Inputs {
    pub config: AgentConfig,
    /// The identity the bundle registers as.
    pub identity: SpiffeId,
    pub bundle: AgentBundle,
    pub settings: RegistrySettings,
    pub trust: TrustBundle,
    pub notifier: Arc<Notifier>,
    /// The VM's registered address.
    pub address: IpAddr,
    /// What the VM registers as; its entry name also names the VM's Watch node.
    pub hello: Hello,
    /// The one metrics registry: the proxy core's, the agent's and the DNS proxy's.
    pub registry: Arc<Mutex<Registry>>,
    pub metrics: Arc<Metrics>,
    pub agent_metrics: AgentMetrics,
    pub readiness: Readiness,
    /// The current credentials (renewal publishes new ones).
    pub creds: watch::Receiver<Arc<Credentials>>,
    /// The group template (the registry's, or the one kept from an earlier run).
    pub group: watch::Receiver<Option<WorkloadGroup>>,
    /// Stops the listeners' accepting.
    pub accept: drain::Watch,
    /// Stops everything else.
    pub shutdown: drain::Watch,
}

/// What only `run` holds: where renewal and registration publish, and the stop triggers.
pub(crate) struct Publishers {
    pub creds: watch::Sender<Arc<Credentials>>,
    pub group: watch::Sender<Option<WorkloadGroup>>,
    /// Fired first at shutdown: the listeners stop accepting.
    pub accept: drain::Trigger,
    /// Fired after the drain: everything else stops.
    pub rest: drain::Trigger,
}

impl Inputs {
    pub(crate) fn new(config: AgentConfig, checked: Checked, id: &Identity) -> (Self, Publishers) {
        let (rest, shutdown) = drain::channel();
        let (accept, accept_watch) = drain::channel();
        let (creds_tx, creds) = watch::channel(Arc::new(id.creds.clone()));
        let (group_tx, group) = watch::channel(registration::load_group(&config.group_path()));
        let mut registry = Registry::default();
        isthmus_proto::limits::register(registry.sub_registry_with_prefix("isthmus"));
        let metrics = Arc::new(Metrics::register(&mut registry, crate::metrics::PREFIX));
        // The source network of what the outbound reports (isthmus_tcp_connections_opened).
        metrics.istio.set_network(&checked.bundle.network);
        let inputs = Self {
            hello: hello(&checked.bundle, &config, id.address),
            metrics,
            agent_metrics: AgentMetrics::register(&mut registry),
            registry: Arc::new(Mutex::new(registry)),
            readiness: Readiness::default(),
            address: id.address,
            identity: checked.identity,
            bundle: checked.bundle,
            settings: checked.settings,
            trust: checked.trust,
            notifier: checked.notifier,
            config,
            creds,
            group,
            accept: accept_watch,
            shutdown,
        };
        let publishers = Publishers {
            creds: creds_tx,
            group: group_tx,
            accept,
            rest,
        };
        (inputs, publishers)
    }
}

/// What the VM registers as: its group, namespace and address, with the flags' labels,
/// locality and tunnel port.
fn hello(bundle: &AgentBundle, config: &AgentConfig, address: IpAddr) -> Hello {
    Hello {
        network: bundle.network.clone(),
        locality: config.locality.clone(),
        labels: config.labels.clone(),
        tunnel_port: config.tunnel_port,
        ..Hello::new(&bundle.group, &bundle.namespace, address)
    }
}
