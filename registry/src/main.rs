//! `isthmus-registry`: parses flags and runs the registry (see `app.rs`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use isthmus_proto::config::ConfigProblems;
use isthmus_proto::config::DurationFlag;
use isthmus_proto::program;
use isthmus_proto::TrustDomain;
use isthmus_registry::app::{
    self, KubernetesConfig, LocalCluster, RegistryConfig, StoreSettings, WebhookConfig,
    DEFAULT_ADMIN_ADDR, DEFAULT_CLUSTER_DOMAIN, DEFAULT_CLUSTER_SYNC_DEADLINE, DEFAULT_GRPC_ADDR,
    DEFAULT_SYSTEM_NAMESPACE,
};
use isthmus_registry::ca::kubernetes::DEFAULT_TOKEN_AUDIENCE;
use isthmus_registry::ca::{DEFAULT_LEAF_TTL, DEFAULT_MAX_LEAF_TTL};
use isthmus_registry::inject;
use isthmus_registry::sources::kubernetes::DEFAULT_PROBE_INTERVAL;
use isthmus_registry::sources::peers::PeerSpec;
use isthmus_registry::sources::vm_registrations::DEFAULT_VM_GRACE;
use isthmus_registry::store::{EtcdConfig, EtcdTls, DEFAULT_ETCD_PREFIX};
use isthmus_registry::vips::DEFAULT_VIP_GRACE;

/// The isthmus control plane: catalog, per-network views, Watch and the mesh CA.
#[derive(Debug, Parser)]
#[command(name = "isthmus-registry", version)]
struct Args {
    /// This registry's cluster (a DNS label); resources without one belong to it.
    #[arg(long, env = "ISTHMUS_CLUSTER")]
    cluster: String,
    /// This registry's network; workloads without one are on it.
    #[arg(long, env = "ISTHMUS_NETWORK")]
    network: String,
    /// The cluster's CA directory (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem),
    /// as written by `isthmusctl ca init`; reloaded when the files change.
    #[arg(long, env = "ISTHMUS_CA_DIR")]
    ca_dir: PathBuf,
    /// Where the embedded store keeps its file.
    #[arg(
        long,
        env = "ISTHMUS_DATA_DIR",
        default_value = "/var/lib/isthmus-registry"
    )]
    data_dir: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    /// A directory of ServiceEntry / WorkloadEntry / WorkloadGroup / Network YAML files,
    /// watched for changes.
    #[arg(long, env = "ISTHMUS_RESOURCES")]
    resources: Option<PathBuf>,
    /// The trust domain; by default read from the CA certificate's spiffe:// URI SAN.
    #[arg(long, env = "ISTHMUS_TRUST_DOMAIN")]
    trust_domain: Option<String>,
    /// gRPC (Watch, Registration, CA) over mTLS.
    #[arg(long, default_value = DEFAULT_GRPC_ADDR)]
    grpc_addr: SocketAddr,
    /// Monitoring and admin HTTP: /metrics, /healthz and /readyz for anyone; /debug/* and
    /// /logging for loopback peers only (others get 403). From another host, tunnel to the
    /// host's loopback: ssh -L 15014:127.0.0.1:15014 HOST, or kubectl -n isthmus-system
    /// port-forward deploy/isthmus-registry 15014.
    #[arg(long, default_value = DEFAULT_ADMIN_ADDR)]
    admin_addr: SocketAddr,
    /// Default leaf certificate lifetime.
    #[arg(long, default_value_t = DurationFlag(DEFAULT_LEAF_TTL))]
    cert_ttl: DurationFlag,
    /// Longest leaf certificate lifetime a caller may ask for.
    #[arg(long, default_value_t = DurationFlag(DEFAULT_MAX_LEAF_TTL))]
    max_cert_ttl: DurationFlag,
    /// The audience a pod's service-account token must be projected for to get a
    /// certificate (the CA checks it with a TokenReview in the pod's cluster).
    #[arg(long, env = "ISTHMUS_CA_TOKEN_AUDIENCE", default_value = DEFAULT_TOKEN_AUDIENCE)]
    ca_token_audience: String,
    /// How often the resources directory is re-read.
    #[arg(long, default_value_t = DurationFlag(app::DEFAULT_RESOURCE_POLL))]
    resource_poll: DurationFlag,
    /// How long a deleted service's VIPs stay reserved for it before another may get them.
    #[arg(long, default_value_t = DurationFlag(DEFAULT_VIP_GRACE))]
    vip_grace: DurationFlag,
    /// How long a registered VM's entry stays (unhealthy) after its agent's stream ended
    /// without deregistering, for the agent to reconnect.
    #[arg(long, default_value_t = DurationFlag(DEFAULT_VM_GRACE))]
    vm_grace: DurationFlag,
    /// Import the services another cluster's registry exports, with the gateways of their
    /// networks (repeatable): `[NAME=]HOST:PORT[,HOST:PORT…]`, the peer's gRPC address or its
    /// set of registries; NAME (by default the first address) marks what it brings
    /// (`peer:NAME/`). Both registries need certificates from the same root.
    #[arg(
        long = "peer",
        env = "ISTHMUS_PEERS",
        value_delimiter = ';',
        value_name = "[NAME=]ADDR"
    )]
    peers: Vec<String>,
    /// Check the configuration and the resource files, print every problem, and exit.
    #[arg(long)]
    validate: bool,
    #[command(flatten)]
    kube: KubeArgs,
    #[command(flatten)]
    webhook: WebhookArgs,
}

/// Where the registry keeps its state: the embedded file, or etcd for a set of registries
/// sharing one state.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Store")]
struct StoreArgs {
    /// `embedded` (one file in --data-dir; one registry) or `etcd` (several registries on
    /// one etcd cluster; needs --etcd-endpoints).
    #[arg(long = "store", env = "ISTHMUS_STORE", value_enum, default_value_t = StoreKind::Embedded)]
    kind: StoreKind,
    /// etcd client URLs, comma-separated or repeated (http://etcd-0:2379, or https:// with
    /// --etcd-ca).
    #[arg(
        long = "etcd-endpoints",
        env = "ISTHMUS_ETCD_ENDPOINTS",
        value_delimiter = ',',
        value_name = "URL"
    )]
    etcd_endpoints: Vec<String>,
    /// Every key the registries write starts with this; meshes sharing one etcd use
    /// different prefixes.
    #[arg(long, env = "ISTHMUS_ETCD_PREFIX", default_value = DEFAULT_ETCD_PREFIX)]
    etcd_prefix: String,
    /// The CA certificate (PEM) that signed etcd's serving certificates.
    #[arg(long, env = "ISTHMUS_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// This registry's client certificate (PEM), when etcd asks for one
    /// (--client-cert-auth).
    #[arg(long, env = "ISTHMUS_ETCD_CERT", requires_all = ["etcd_key", "etcd_ca"])]
    etcd_cert: Option<PathBuf>,
    /// The key of --etcd-cert (PEM).
    #[arg(long, env = "ISTHMUS_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    Embedded,
    Etcd,
}

impl StoreArgs {
    fn into_settings(self, problems: &mut ConfigProblems) -> StoreSettings {
        match self.kind {
            StoreKind::Embedded => {
                let etcd_flags = !self.etcd_endpoints.is_empty()
                    || self.etcd_ca.is_some()
                    || self.etcd_cert.is_some()
                    || self.etcd_prefix != DEFAULT_ETCD_PREFIX;
                problems.check(!etcd_flags, "--store", || {
                    "is embedded, but --etcd-* flags are given: add --store etcd to use etcd"
                        .to_string()
                });
                StoreSettings::Embedded
            }
            StoreKind::Etcd => {
                let mut etcd = EtcdConfig::new(self.etcd_endpoints);
                etcd.prefix = self.etcd_prefix;
                etcd.tls = self.etcd_ca.map(|ca| EtcdTls {
                    ca,
                    client: self.etcd_cert.zip(self.etcd_key),
                });
                StoreSettings::Etcd(etcd)
            }
        }
    }
}

/// The sidecar injection webhook (served with a cluster of its own, or with
/// `--webhook-addr`) and what it injects.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Sidecar injection")]
struct WebhookArgs {
    /// Serve the mutating admission webhook (TLS, `POST /inject`) here [default:
    /// 0.0.0.0:15017 when --kubeconfig or --in-cluster is given; otherwise not served].
    #[arg(long)]
    webhook_addr: Option<SocketAddr>,
    /// The webhook's serving certificate chain (PEM); without it the cluster intermediate
    /// issues one for --webhook-dns-name and the registry keeps the webhook configuration's
    /// caBundle at the mesh root.
    #[arg(long, requires = "webhook_key")]
    webhook_cert: Option<PathBuf>,
    /// The key of --webhook-cert (PEM).
    #[arg(long, requires = "webhook_cert")]
    webhook_key: Option<PathBuf>,
    /// A name of the issued serving certificate (repeatable; an IP address becomes an IP
    /// SAN) [default: isthmus-registry.<system namespace>.svc].
    #[arg(long = "webhook-dns-name", value_name = "NAME")]
    webhook_dns_names: Vec<String>,
    /// The MutatingWebhookConfiguration whose caBundle the registry keeps at the mesh root.
    #[arg(long, default_value = inject::DEFAULT_WEBHOOK_CONFIG_NAME)]
    webhook_config_name: String,
    /// The image of the injected init container and sidecar [default:
    /// isthmus/vm-agent:<version>].
    #[arg(long)]
    inject_image: Option<String>,
    /// The registry's gRPC address as injected sidecars reach it [default:
    /// isthmus-registry.<system namespace>.svc:15012].
    #[arg(long)]
    inject_registry_address: Option<String>,
    /// A CIDR whose traffic injected pods capture (repeatable) [default: 240.240.0.0/16 and
    /// 10.96.0.0/12, the mesh VIPs and the usual service CIDR].
    #[arg(long = "inject-capture-cidr", value_name = "CIDR")]
    inject_capture_cidrs: Vec<String>,
}

impl WebhookArgs {
    fn into_config(self) -> WebhookConfig {
        WebhookConfig {
            addr: self.webhook_addr,
            cert_file: self.webhook_cert,
            key_file: self.webhook_key,
            dns_names: self.webhook_dns_names,
            config_name: self.webhook_config_name,
            image: self.inject_image,
            registry_address: self.inject_registry_address,
            capture_cidrs: self.inject_capture_cidrs,
        }
    }
}

/// The Kubernetes clusters to watch (none unless one of the first three is given).
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Kubernetes clusters")]
struct KubeArgs {
    /// Watch this registry's own cluster (`--cluster`, `--network`) through this kubeconfig.
    #[arg(long, env = "ISTHMUS_KUBECONFIG", conflicts_with = "in_cluster")]
    kubeconfig: Option<PathBuf>,
    /// Watch this registry's own cluster through the pod's service account.
    #[arg(long)]
    in_cluster: bool,
    /// A directory of kubeconfig files, one remote cluster each, named by the file
    /// (`cluster-b.yaml` is cluster `cluster-b`); watched for changes.
    #[arg(long, env = "ISTHMUS_REMOTE_KUBECONFIGS")]
    remote_kubeconfigs: Option<PathBuf>,
    /// Do not add the remote clusters of Secrets labelled `istio/multiCluster=true` in the
    /// system namespace of this registry's own cluster.
    #[arg(long)]
    no_remote_secrets: bool,
    /// Where remote-cluster Secrets are read from.
    #[arg(long, default_value = DEFAULT_SYSTEM_NAMESPACE)]
    system_namespace: String,
    /// A remote cluster's network, as CLUSTER=NETWORK (repeatable); otherwise a cluster is on
    /// this registry's network, unless its namespaces or pods say otherwise.
    #[arg(long = "cluster-network", value_name = "CLUSTER=NETWORK")]
    cluster_networks: Vec<String>,
    /// The clusters' DNS domain.
    #[arg(long, default_value = DEFAULT_CLUSTER_DOMAIN)]
    cluster_domain: String,
    /// A host (exact, or `*.suffix`) whose services never leave their cluster (repeatable;
    /// replaces the defaults `*.kube-system.svc.<domain>` and `kubernetes.default.svc.<domain>`).
    #[arg(long = "cluster-local-host", value_name = "HOST")]
    cluster_local_hosts: Vec<String>,
    /// How long readiness waits for every cluster's first sync; then the registry is ready
    /// and says which clusters lag.
    #[arg(long, default_value_t = DurationFlag(DEFAULT_CLUSTER_SYNC_DEADLINE))]
    cluster_sync_deadline: DurationFlag,
    /// Drop an unreachable cluster's endpoints after this long (by default they stay, marked
    /// stale with their age, until the cluster is back).
    #[arg(long)]
    cluster_stale_after: Option<DurationFlag>,
    /// How often each cluster's API server is probed.
    #[arg(long, default_value_t = DurationFlag(DEFAULT_PROBE_INTERVAL))]
    cluster_probe_interval: DurationFlag,
}

impl KubeArgs {
    fn into_config(self, problems: &mut ConfigProblems) -> KubernetesConfig {
        let mut cluster_networks = BTreeMap::new();
        for pair in &self.cluster_networks {
            match pair.split_once('=') {
                Some((c, n)) if !c.is_empty() && !n.is_empty() => {
                    cluster_networks.insert(c.to_string(), n.to_string());
                }
                _ => problems.push(
                    "--cluster-network",
                    format!("{pair:?} is not CLUSTER=NETWORK"),
                ),
            }
        }
        KubernetesConfig {
            local: match (self.kubeconfig, self.in_cluster) {
                (Some(path), _) => Some(LocalCluster::Kubeconfig(path)),
                (None, true) => Some(LocalCluster::InCluster),
                (None, false) => None,
            },
            remote_kubeconfigs: self.remote_kubeconfigs,
            remote_secrets: !self.no_remote_secrets,
            system_namespace: self.system_namespace,
            cluster_networks,
            domain: self.cluster_domain,
            cluster_local_hosts: (!self.cluster_local_hosts.is_empty())
                .then_some(self.cluster_local_hosts),
            sync_deadline: self.cluster_sync_deadline.0,
            stale_after: self.cluster_stale_after.map(|d| d.0),
            probe_interval: self.cluster_probe_interval.0,
            ..KubernetesConfig::default()
        }
    }
}

impl Args {
    /// The registry's config from the flags, and every problem with them.
    fn into_config(self) -> (RegistryConfig, ConfigProblems) {
        let mut problems = ConfigProblems::new("isthmus-registry");
        let mut cfg = RegistryConfig::new(&self.cluster, &self.network, self.ca_dir, self.data_dir);
        if let Some(td) = &self.trust_domain {
            match TrustDomain::new(td) {
                Ok(td) => cfg.trust_domain = Some(td),
                Err(e) => problems.push("--trust-domain", e.to_string()),
            }
        }
        cfg.store = self.store.into_settings(&mut problems);
        cfg.resources = self.resources;
        cfg.grpc_addr = self.grpc_addr;
        cfg.admin_addr = self.admin_addr;
        cfg.ca_policy.default_ttl = self.cert_ttl.0;
        cfg.ca_policy.max_ttl = self.max_cert_ttl.0;
        cfg.ca_token_audience = self.ca_token_audience;
        cfg.resource_poll = self.resource_poll.0;
        cfg.vip_grace = self.vip_grace.0;
        cfg.vm_grace = self.vm_grace.0;
        cfg.kubernetes = self.kube.into_config(&mut problems);
        cfg.webhook = self.webhook.into_config();
        for p in &self.peers {
            match PeerSpec::parse(p) {
                Ok(spec) => cfg.peers.push(spec),
                Err(e) => problems.push("--peer", e),
            }
        }
        cfg.check(&mut problems);
        (cfg, problems)
    }
}

/// Exit status for a configuration that cannot run (as with a usage error).
const EXIT_INVALID_CONFIG: u8 = 2;

fn main() -> ExitCode {
    isthmus_proto::telemetry::init();
    let args = Args::parse();
    let validate_only = args.validate;
    let (cfg, mut problems) = args.into_config();
    if validate_only {
        let report = app::validate_resources(&cfg);
        for line in &report.documents {
            println!("{line}");
        }
        problems.extend(report.problems.problems);
        if problems.is_empty() {
            println!("configuration is valid; {} resources", report.resources);
            return ExitCode::SUCCESS;
        }
    }
    if !problems.is_empty() {
        eprintln!("isthmus-registry: invalid configuration:");
        for p in &problems.problems {
            eprintln!("  {p}");
        }
        return ExitCode::from(EXIT_INVALID_CONFIG);
    }
    isthmus_proto::limits::raise_fd_limit("isthmus-registry");
    let rt = match program::runtime(program::RuntimeSize::default()) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("isthmus-registry: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        match app::run(cfg).await {
            Ok(handle) => {
                program::run_until_signal(handle).await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("isthmus-registry: {}", program::error_chain(e.as_ref()));
                ExitCode::FAILURE
            }
        }
    })
}
