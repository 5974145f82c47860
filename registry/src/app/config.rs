//! The registry's configuration: one typed struct with a named default for every setting,
//! checked in one pass that reports every problem at once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use isthmus_proto::config::{format_duration, ConfigProblems};
use isthmus_proto::grpc::ListenerOptions;
use isthmus_proto::identity::{validate_dns_label, TrustDomain};

use crate::ca::service::CaPolicy;
use crate::ca::CaMaterial;
use crate::inject::{self, InjectSettings};
use crate::sources::peers::PeerSpec;
use crate::sources::static_files::{DocumentOutcome, SourceDefaults, StaticSource};
use crate::sources::vm_registrations::DEFAULT_VM_GRACE;
use crate::store::EtcdConfig;
use crate::vips::DEFAULT_VIP_GRACE;

pub const DEFAULT_GRPC_ADDR: &str = "0.0.0.0:15012";
pub const DEFAULT_ADMIN_ADDR: &str = "0.0.0.0:15014";
/// How often the resources directory is re-read.
pub const DEFAULT_RESOURCE_POLL: Duration = crate::sources::static_files::POLL_INTERVAL;
/// The trust domain `--validate` reads resources with when neither the flag nor the CA
/// names one (the CA's problem is reported on its own).
const FALLBACK_TRUST_DOMAIN: &str = "cluster.local";

#[derive(Debug, Clone)]
pub struct RegistryConfig {
    pub cluster: String,
    pub network: String,
    pub trust_domain: Option<TrustDomain>,
    pub ca_dir: PathBuf,
    /// Where the embedded store keeps its file (unused with [`StoreSettings::Etcd`]).
    pub data_dir: PathBuf,
    /// Which store the registry keeps its state in.
    pub store: StoreSettings,
    pub resources: Option<PathBuf>,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub resource_poll: Duration,
    pub ca_reload: Duration,
    pub ca_policy: CaPolicy,
    /// The audience a pod's service-account token must be projected for to get a
    /// certificate (checked with a TokenReview in the pod's cluster).
    pub ca_token_audience: String,
    pub listener: ListenerOptions,
    /// How long a released VIP stays reserved for its hostname.
    pub vip_grace: Duration,
    /// How long a registered VM's entry stays after its agent's stream ended.
    pub vm_grace: Duration,
    /// The Kubernetes clusters to watch, if any.
    pub kubernetes: KubernetesConfig,
    /// The sidecar injection webhook and what it injects.
    pub webhook: WebhookConfig,
    /// Other clusters' registries whose exported services this one imports.
    pub peers: Vec<PeerSpec>,
}

/// The registry's store: the embedded file (the default) or an etcd cluster shared by a
/// set of registries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StoreSettings {
    #[default]
    Embedded,
    Etcd(EtcdConfig),
}

/// The sidecar injection webhook's settings (see `inject`).
#[derive(Debug, Clone, Default)]
pub struct WebhookConfig {
    /// Where the webhook listens. `None`: on [`inject::DEFAULT_WEBHOOK_ADDR`], and only
    /// when the registry has its own cluster, so registries without Kubernetes do not
    /// take the port.
    pub addr: Option<SocketAddr>,
    /// A serving certificate chain and key kept by the operator; without them the cluster
    /// intermediate issues one for `dns_names`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Names (IP addresses become IP SANs) of the issued serving certificate; empty:
    /// `isthmus-registry.<system namespace>.svc`.
    pub dns_names: Vec<String>,
    /// The MutatingWebhookConfiguration whose `caBundle` the registry keeps at the mesh
    /// root; empty: [`inject::DEFAULT_WEBHOOK_CONFIG_NAME`].
    pub config_name: String,
    /// The sidecar's image; `None`: [`inject::default_image`].
    pub image: Option<String>,
    /// The registry's address as pods reach it; `None`: the Service in the system namespace.
    pub registry_address: Option<String>,
    /// CIDRs the sidecar captures; empty: [`inject::DEFAULT_CAPTURE_CIDRS`].
    pub capture_cidrs: Vec<String>,
}

impl WebhookConfig {
    /// Where to serve the webhook, if at all.
    pub fn listen_addr(&self, kubernetes: &KubernetesConfig) -> Option<SocketAddr> {
        self.addr.or_else(|| {
            kubernetes.local.as_ref().map(|_| {
                inject::DEFAULT_WEBHOOK_ADDR
                    .parse()
                    .expect("default address")
            })
        })
    }

    pub fn config_name(&self) -> &str {
        if self.config_name.is_empty() {
            inject::DEFAULT_WEBHOOK_CONFIG_NAME
        } else {
            &self.config_name
        }
    }

    /// The names of the issued serving certificate.
    pub fn dns_names(&self, system_namespace: &str) -> Vec<String> {
        if self.dns_names.is_empty() {
            vec![inject::default_webhook_dns_name(system_namespace)]
        } else {
            self.dns_names.clone()
        }
    }

    fn check(&self, problems: &mut ConfigProblems) {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) | (None, Some(_)) => problems.push(
                "--webhook-cert",
                "--webhook-cert and --webhook-key go together: give both or neither",
            ),
            _ => {}
        }
        for (flag, file) in [
            ("--webhook-cert", &self.cert_file),
            ("--webhook-key", &self.key_file),
        ] {
            if let Some(path) = file {
                problems.check(path.is_file(), flag, || {
                    format!("{}: no such file", path.display())
                });
            }
        }
        for name in &self.dns_names {
            if name.parse::<std::net::IpAddr>().is_err() {
                if let Err(e) = crate::validate::check_dns_name("--webhook-dns-name", name, false) {
                    problems.push("--webhook-dns-name", e.message().to_string());
                }
            }
        }
        if !self.config_name.is_empty() {
            if let Err(e) =
                crate::validate::check_dns_name("--webhook-config-name", &self.config_name, false)
            {
                problems.push("--webhook-config-name", e.message().to_string());
            }
        }
        for cidr in &self.capture_cidrs {
            if let Err(e) = crate::validate::parse_cidr(cidr) {
                problems.push("--inject-capture-cidr", e.message().to_string());
            }
        }
        if let Some(image) = &self.image {
            problems.check(
                !image.trim().is_empty() && !image.contains(char::is_whitespace),
                "--inject-image",
                || format!("{image:?} is not an image reference"),
            );
        }
        if let Some(addr) = &self.registry_address {
            let ok = addr
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            problems.check(ok, "--inject-registry-address", || {
                format!("{addr:?} is not host:port")
            });
        }
    }
}

/// Where the registry's own cluster's API is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalCluster {
    Kubeconfig(PathBuf),
    /// The service account and API server of the pod the registry runs in.
    InCluster,
}

/// The Kubernetes source's settings (see `sources::kubernetes`).
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    /// The registry's own cluster (`--cluster`, `--network`), if it watches one.
    pub local: Option<LocalCluster>,
    /// A directory of kubeconfig files, one remote cluster each (named by the file).
    pub remote_kubeconfigs: Option<PathBuf>,
    /// Whether remote-cluster Secrets in `system_namespace` of the local cluster add clusters.
    pub remote_secrets: bool,
    pub system_namespace: String,
    /// Cluster id -> network, for remote clusters.
    pub cluster_networks: BTreeMap<String, String>,
    pub domain: String,
    /// Host patterns kept inside their cluster; Istio's defaults when `None`.
    pub cluster_local_hosts: Option<Vec<String>>,
    /// How long readiness waits for the clusters' first sync.
    pub sync_deadline: Duration,
    /// Drop an unreachable cluster's endpoints after this long (never when `None`).
    pub stale_after: Option<Duration>,
    pub probe_interval: Duration,
    /// How long each watch request lasts before it is renewed.
    pub watch_timeout: Duration,
}

pub const DEFAULT_SYSTEM_NAMESPACE: &str = "isthmus-system";
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
/// Istio waits as long for remote clusters before it serves (`PILOT_REMOTE_CLUSTER_TIMEOUT`).
pub const DEFAULT_CLUSTER_SYNC_DEADLINE: Duration = Duration::from_secs(30);

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            local: None,
            remote_kubeconfigs: None,
            remote_secrets: true,
            system_namespace: DEFAULT_SYSTEM_NAMESPACE.into(),
            cluster_networks: BTreeMap::new(),
            domain: DEFAULT_CLUSTER_DOMAIN.into(),
            cluster_local_hosts: None,
            sync_deadline: DEFAULT_CLUSTER_SYNC_DEADLINE,
            stale_after: None,
            probe_interval: crate::sources::kubernetes::DEFAULT_PROBE_INTERVAL,
            watch_timeout: crate::sources::kubernetes::DEFAULT_WATCH_TIMEOUT,
        }
    }
}

impl KubernetesConfig {
    /// Whether any cluster is to be watched.
    pub fn enabled(&self) -> bool {
        self.local.is_some() || self.remote_kubeconfigs.is_some()
    }

    fn check(&self, problems: &mut ConfigProblems) {
        if let Some(LocalCluster::Kubeconfig(path)) = &self.local {
            problems.check(path.is_file(), "--kubeconfig", || {
                format!("{}: no such file", path.display())
            });
        }
        if let Some(dir) = &self.remote_kubeconfigs {
            problems.check(dir.is_dir(), "--remote-kubeconfigs", || {
                format!("{}: not a directory", dir.display())
            });
        }
        for (id, net) in &self.cluster_networks {
            if let Err(e) = validate_dns_label("cluster", id) {
                problems.push("--cluster-network", e.to_string());
            }
            if let Err(e) = validate_dns_label("network", net) {
                problems.push("--cluster-network", e.to_string());
            }
        }
        if let Err(e) = validate_dns_label("namespace", &self.system_namespace) {
            problems.push("--system-namespace", e.to_string());
        }
        if let Err(e) = crate::validate::check_dns_name("--cluster-domain", &self.domain, false) {
            problems.push("--cluster-domain", e.message().to_string());
        }
    }
}

impl RegistryConfig {
    /// A config with the defaults for everything but the required settings.
    pub fn new(cluster: &str, network: &str, ca_dir: PathBuf, data_dir: PathBuf) -> Self {
        Self {
            cluster: cluster.to_string(),
            network: network.to_string(),
            trust_domain: None,
            ca_dir,
            data_dir,
            store: StoreSettings::Embedded,
            resources: None,
            grpc_addr: DEFAULT_GRPC_ADDR.parse().expect("default address"),
            admin_addr: DEFAULT_ADMIN_ADDR.parse().expect("default address"),
            resource_poll: DEFAULT_RESOURCE_POLL,
            ca_reload: crate::ca::DEFAULT_RELOAD_INTERVAL,
            ca_policy: CaPolicy::default(),
            ca_token_audience: crate::ca::kubernetes::DEFAULT_TOKEN_AUDIENCE.into(),
            listener: ListenerOptions::default(),
            vip_grace: DEFAULT_VIP_GRACE,
            vm_grace: DEFAULT_VM_GRACE,
            kubernetes: KubernetesConfig::default(),
            webhook: WebhookConfig::default(),
            peers: Vec::new(),
        }
    }

    /// What the webhook injects, from the flags and the registry's cluster and network.
    pub fn inject_settings(&self) -> InjectSettings {
        let k = &self.kubernetes;
        let mut s = InjectSettings::new(&self.cluster, &self.network, &k.system_namespace);
        // The sidecar's token is for the CA: the audience the CA requires.
        s.token_audience = self.ca_token_audience.clone();
        if let Some(image) = &self.webhook.image {
            s.image = image.clone();
        }
        if let Some(addr) = &self.webhook.registry_address {
            s.registry_address = addr.clone();
        }
        if !self.webhook.capture_cidrs.is_empty() {
            // Canonical form; a bad CIDR was reported by `check`.
            s.capture_cidrs = self
                .webhook
                .capture_cidrs
                .iter()
                .filter_map(|c| crate::validate::parse_cidr(c).ok())
                .collect();
        }
        s
    }

    /// Checks every setting and reports all problems at once.
    pub fn validate(&self) -> Result<(), ConfigProblems> {
        let mut problems = ConfigProblems::new("the registry's configuration");
        self.check(&mut problems);
        problems.into_result()
    }

    /// Adds every problem with these settings to `problems` (which may already hold those
    /// found while reading the flags).
    pub fn check(&self, problems: &mut ConfigProblems) {
        if let Err(e) = validate_dns_label("cluster", &self.cluster) {
            problems.push("--cluster", e.to_string());
        }
        if let Err(e) = validate_dns_label("network", &self.network) {
            problems.push("--network", e.to_string());
        }
        let (ttl, max) = (self.ca_policy.default_ttl, self.ca_policy.max_ttl);
        problems.check(ttl <= max, "--cert-ttl", || {
            format!(
                "{} is above --max-cert-ttl ({})",
                format_duration(ttl),
                format_duration(max)
            )
        });
        problems.check(
            !self.ca_token_audience.trim().is_empty(),
            "--ca-token-audience",
            || "must not be empty: pods' tokens are projected for a named audience".to_string(),
        );
        if let Err(e) = CaMaterial::load(&self.ca_dir, self.trust_domain.as_ref()) {
            problems.push("--ca-dir", e.to_string());
        }
        if let Some(dir) = &self.resources {
            problems.check(dir.is_dir(), "--resources", || {
                format!("{}: not a directory", dir.display())
            });
        }
        let mut names = std::collections::BTreeSet::new();
        for p in &self.peers {
            problems.check(names.insert(p.name.as_str()), "--peer", || {
                format!(
                    "the name {:?} is given to two peers: name them NAME=ADDR",
                    p.name
                )
            });
        }
        if let StoreSettings::Etcd(etcd) = &self.store {
            if let Err((flag, why)) = etcd.validate() {
                problems.push(flag, why);
            }
        }
        self.kubernetes.check(problems);
        self.webhook.check(problems);
    }

    pub(super) fn source_defaults(&self, td: TrustDomain) -> SourceDefaults {
        SourceDefaults {
            cluster: self.cluster.clone(),
            network: self.network.clone(),
            trust_domain: td,
            domain: self.kubernetes.domain.clone(),
        }
    }
}

/// What `--validate` found in the resources directory: a line per document (loaded,
/// ignored or refused, with why), the resources that would load, and every problem.
#[derive(Debug)]
pub struct ResourcesReport {
    pub documents: Vec<String>,
    pub resources: usize,
    pub problems: ConfigProblems,
}

/// Reads the resources directory as `--validate` does: what became of every document, and
/// every problem named by file, document and field.
pub fn validate_resources(cfg: &RegistryConfig) -> ResourcesReport {
    let mut problems = ConfigProblems::new("the resources".to_string());
    // A missing directory is already the configuration's own problem (--resources).
    let Some(dir) = cfg.resources.as_ref().filter(|d| d.is_dir()) else {
        return ResourcesReport {
            documents: Vec::new(),
            resources: 0,
            problems,
        };
    };
    let td = match (
        &cfg.trust_domain,
        CaMaterial::load(&cfg.ca_dir, cfg.trust_domain.as_ref()),
    ) {
        (Some(td), _) => td.clone(),
        (None, Ok(m)) => m.trust_domain.clone(),
        (None, Err(_)) => TrustDomain::new(FALLBACK_TRUST_DOMAIN).expect("valid"),
    };
    let mut source = StaticSource::new(dir.clone(), cfg.source_defaults(td));
    let scan = source.scan();
    problems = ConfigProblems::new(format!("the resources in {}", dir.display()));
    problems.extend(scan.errors.iter().map(|e| e.problem()));
    let (mut loaded, mut ignored, mut refused) = (0, 0, 0);
    let mut documents = Vec::new();
    for (file, d) in source.documents() {
        let at = format!("{} ({}): {}", file.display(), d.position(), d.object);
        match d.outcome {
            DocumentOutcome::Loaded {
                resources,
                warnings,
            } => {
                loaded += 1;
                documents.push(format!("{at}: loaded ({resources} resources)"));
                for w in warnings {
                    documents.push(format!("  warning: {}: {}", w.field, w.message));
                }
            }
            DocumentOutcome::Ignored { reason } => {
                ignored += 1;
                documents.push(format!("{at}: ignored: {reason}"));
            }
            DocumentOutcome::Refused { errors } => {
                refused += 1;
                documents.push(format!("{at}: refused"));
                for e in errors {
                    documents.push(format!("  error: {}: {}", e.field, e.message));
                }
            }
        }
    }
    // Warnings about how documents relate (a workload on a network nothing defines).
    for w in source.network_warnings() {
        documents.push(format!("warning: {w}"));
    }
    documents.push(format!(
        "{} documents: {loaded} loaded, {ignored} ignored, {refused} refused",
        loaded + ignored + refused
    ));
    ResourcesReport {
        documents,
        resources: source.resources().len(),
        problems,
    }
}
