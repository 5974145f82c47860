//! The registry under test, started in-process on loopback with its own CA (made by the
//! real `isthmusctl ca init`), store and resources directory, and the small helpers every
//! test uses with it: credentials, Watch streams, VM registration, the admin port, metrics,
//! polling, and the YAML of the resources tests write.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use isthmus_proto::certs;
use isthmus_proto::grpc;
use isthmus_proto::identity::{SpiffeId, TrustDomain};
use isthmus_proto::model::{Node, NodeKind};
use isthmus_proto::subscription::Subscription;
use isthmus_proto::tls::{self, Credentials, ServerIdentity, TrustBundle};
use isthmus_registry::app::{self, RegistryConfig, RegistryHandle};
use isthmus_registry::ca::{self, init, token, CaMaterial};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::vm;

pub const TRUST_DOMAIN: &str = "cluster.local";
pub const CLUSTER: &str = "cluster-a";
pub const NETWORK: &str = "network-a";

/// A registry under test and everything it was started from.
pub struct TestRegistry {
    pub dir: tempfile::TempDir,
    pub cfg: RegistryConfig,
    pub handle: Option<RegistryHandle>,
}

impl TestRegistry {
    pub fn ca_root(&self) -> PathBuf {
        self.dir.path().join("ca").join(ca::ROOT_CERT_FILE)
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.cfg.ca_dir.clone()
    }

    pub fn resources_dir(&self) -> PathBuf {
        self.dir.path().join("resources")
    }

    /// A config on loopback with fast polling, a fresh CA and empty dirs.
    pub fn config(dir: &Path) -> RegistryConfig {
        init_ca(&dir.join("ca"), TRUST_DOMAIN, CLUSTER, false);
        Self::config_with_ca(dir)
    }

    /// [`Self::config`] for a directory whose `ca/` is there already.
    fn config_with_ca(dir: &Path) -> RegistryConfig {
        std::fs::create_dir_all(dir.join("resources")).unwrap();
        let mut cfg = RegistryConfig::new(
            CLUSTER,
            NETWORK,
            dir.join("ca").join(CLUSTER),
            dir.join("data"),
        );
        cfg.resources = Some(dir.join("resources"));
        cfg.grpc_addr = "127.0.0.1:0".parse().unwrap();
        cfg.admin_addr = "127.0.0.1:0".parse().unwrap();
        cfg.resource_poll = Duration::from_millis(100);
        cfg.ca_reload = Duration::from_millis(100);
        cfg.listener.handshake_timeout = Duration::from_secs(2);
        cfg
    }

    /// Starts a registry with `resources` (file name, YAML) in its resources directory.
    pub async fn start(resources: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_with(resources, |_| {}).await
    }

    /// As [`Self::start`], with the config adjusted first (e.g. to listen where network
    /// namespaces can reach it).
    pub async fn start_with(
        resources: &[(&str, &str)],
        adjust: impl FnOnce(&mut RegistryConfig),
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut cfg = Self::config(dir.path());
        adjust(&mut cfg);
        if cfg.kubernetes.local.is_some() && cfg.webhook.addr.is_none() {
            // A registry with its own cluster serves the injection webhook: on loopback
            // and port 0 here, so parallel tests do not fight over 15017, with a
            // certificate the API server accepts for `https://127.0.0.1:<port>`.
            cfg.webhook.addr = Some("127.0.0.1:0".parse().unwrap());
            cfg.webhook.dns_names = vec![
                "isthmus-registry.isthmus-system.svc".into(),
                "127.0.0.1".into(),
            ];
        }
        for (name, yaml) in resources {
            std::fs::write(dir.path().join("resources").join(name), yaml)?;
        }
        let handle = app::run(cfg.clone()).await?;
        Ok(Self {
            dir,
            cfg,
            handle: Some(handle),
        })
    }

    /// Another registry of `first`'s set: a copy of its CA files (the files every registry
    /// of a set has), its own directories and ports, and the config adjusted first (to
    /// share `first`'s store, say).
    pub async fn start_peer_of(
        first: &TestRegistry,
        adjust: impl FnOnce(&mut RegistryConfig),
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        copy_dir(&first.dir.path().join("ca"), &dir.path().join("ca"))?;
        let mut cfg = Self::config_with_ca(dir.path());
        adjust(&mut cfg);
        Self::run_in(dir, cfg).await
    }

    /// The registry of another cluster of `first`'s mesh, as multi-primary clusters run
    /// theirs: `first`'s root with an intermediate of its own (what `isthmusctl ca init`
    /// adds for each cluster), its own store, ports and `resources`, and the config
    /// adjusted first (to peer it, say).
    pub async fn start_cluster_of(
        first: &TestRegistry,
        cluster: &str,
        network: &str,
        resources: &[(&str, &str)],
        adjust: impl FnOnce(&mut RegistryConfig),
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        copy_dir(&first.dir.path().join("ca"), &dir.path().join("ca"))?;
        init_ca(&dir.path().join("ca"), TRUST_DOMAIN, cluster, false);
        let mut cfg = Self::config_with_ca(dir.path());
        cfg.cluster = cluster.to_string();
        cfg.network = network.to_string();
        cfg.ca_dir = dir.path().join("ca").join(cluster);
        for (name, yaml) in resources {
            std::fs::write(dir.path().join("resources").join(name), yaml)?;
        }
        adjust(&mut cfg);
        Self::run_in(dir, cfg).await
    }

    /// Runs a registry of `cfg` on `dir`.
    async fn run_in(dir: tempfile::TempDir, cfg: RegistryConfig) -> anyhow::Result<Self> {
        let handle = app::run(cfg.clone()).await?;
        Ok(Self {
            dir,
            cfg,
            handle: Some(handle),
        })
    }

    pub fn handle(&self) -> &RegistryHandle {
        self.handle.as_ref().expect("registry running")
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.handle().grpc_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.handle().admin_addr
    }

    /// Where the injection webhook listens (registries with their own cluster serve it).
    pub fn webhook_addr(&self) -> Option<SocketAddr> {
        self.handle().webhook_addr
    }

    pub async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
    }

    /// Stops, remembering the gRPC port so that [`Self::start_again`] listens there again
    /// (clients configured with the address find it after an outage).
    pub async fn stop_keeping_port(&mut self) {
        self.cfg.grpc_addr = self.grpc_addr();
        self.stop().await;
    }

    /// Starts again on the same directories after [`Self::stop_keeping_port`].
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        self.handle = Some(app::run(self.cfg.clone()).await?);
        Ok(())
    }

    /// Stops and starts again on the same directories (new ports).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        self.handle = Some(app::run(self.cfg.clone()).await?);
        Ok(())
    }

    pub fn material(&self) -> CaMaterial {
        CaMaterial::load(&self.ca_dir(), None).expect("CA material")
    }

    pub fn token(&self, ns: &str, sa: &str, ttl: Duration) -> String {
        token::create(
            &self.material(),
            &self.cfg.cluster,
            ns,
            sa,
            ttl,
            ::time::OffsetDateTime::now_utc(),
        )
        .expect("token")
    }

    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::from_pem_file(&self.ca_root(), TRUST_DOMAIN).expect("bundle")
    }

    /// A gRPC channel to the registry, presenting `creds` if given.
    pub async fn channel(
        &self,
        creds: Option<&Credentials>,
    ) -> anyhow::Result<tonic::transport::Channel> {
        let cfg = tls::client_config(
            creds,
            &self.bundle(),
            ServerIdentity::TrustDomain,
            &[tls::ALPN_H2],
        )?;
        Ok(grpc::connect(&self.grpc_addr().to_string(), Arc::new(cfg)).await?)
    }

    /// Requests a certificate with a fresh token, as a new workload would.
    pub async fn credentials(&self, ns: &str, sa: &str) -> anyhow::Result<Credentials> {
        let id = SpiffeId::workload(&TrustDomain::new(TRUST_DOMAIN)?, ns, sa)?;
        let (key, csr) = certs::generate_key_and_csr(&id)?;
        let issued = certs::request_certificate(
            self.channel(None).await?,
            csr,
            Some(self.token(ns, sa, Duration::from_secs(600))),
            0,
        )
        .await?;
        Ok(Credentials::from_pem(&issued.chain_pems.concat(), &key)?)
    }

    /// Requests a certificate as [`Self::credentials`] does and writes it to `dir` the way
    /// `isthmusctl cert request` does (`key.pem`, `cert-chain.pem`, `root-cert.pem`).
    pub async fn credentials_dir(&self, ns: &str, sa: &str, dir: &Path) -> anyhow::Result<()> {
        let id = SpiffeId::workload(&TrustDomain::new(TRUST_DOMAIN)?, ns, sa)?;
        let (key, csr) = certs::generate_key_and_csr(&id)?;
        let issued = certs::request_certificate(
            self.channel(None).await?,
            csr,
            Some(self.token(ns, sa, Duration::from_secs(600))),
            0,
        )
        .await?;
        certs::write_credentials(dir, &key, &issued.chain_pems, &issued.root_pem)?;
        Ok(())
    }

    /// Asks for a certificate for `shop/<sa>` with the bootstrap `token` (a write of the
    /// store: the token is spent), returning the CA's answer as it is.
    pub async fn redeem(&self, sa: &str, token: String) -> Result<(), tonic::Status> {
        let id =
            SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/{sa}")).expect("identity");
        let (_, csr) = certs::generate_key_and_csr(&id).expect("key and CSR");
        let channel = self
            .channel(None)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        isthmus_proto::pb::certificates_client::CertificatesClient::new(channel)
            .create_certificate(isthmus_proto::pb::CertificateRequest {
                csr_pem: csr,
                bootstrap_token: token,
                ttl_seconds: 0,
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    /// Registers a VM as its agent would, presenting `creds`.
    pub async fn register_vm(
        &self,
        creds: Option<&Credentials>,
        hello: &isthmus_proto::registration::Hello,
    ) -> Result<vm::Registrar, tonic::Status> {
        let channel = self
            .channel(creds)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        vm::Registrar::register(channel, hello).await
    }

    pub async fn subscribe(
        &self,
        creds: &Credentials,
        node: &Node,
    ) -> anyhow::Result<Subscription> {
        Ok(Subscription::open(self.channel(Some(creds)).await?, node, None).await?)
    }

    pub async fn metrics(&self) -> String {
        http_get(self.admin_addr(), "/metrics")
            .await
            .expect("metrics")
            .1
    }

    /// Writes a resource file and waits until the registry has applied it (or reported it).
    pub fn write_resource(&self, name: &str, yaml: &str) {
        let path = self.resources_dir().join(name);
        let tmp = path.with_extension("tmp-write");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }
}

/// `isthmusctl ca init` for one cluster (`rotate` replaces its intermediate).
pub fn init_ca(out: &Path, trust_domain: &str, cluster: &str, rotate: bool) {
    init::init(
        &init::InitOptions {
            trust_domain: TrustDomain::new(trust_domain).expect("trust domain"),
            clusters: vec![cluster.to_string()],
            out: out.to_path_buf(),
            rotate,
        },
        ::time::OffsetDateTime::now_utc(),
    )
    .expect("ca init");
}

pub fn node(id: &str, kind: NodeKind, network: &str) -> Node {
    Node {
        id: id.to_string(),
        kind,
        network: network.to_string(),
        cluster: CLUSTER.to_string(),
        ..Default::default()
    }
}

/// The value of a metric line (`name{labels} value`), if present.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The sum of `metric` over every series whose labels include all of `labels`.
pub fn metric_sum(text: &str, metric: &str, labels: &[(&str, &str)]) -> u64 {
    let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| wanted.iter().all(|w| l.contains(w.as_str())))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Copies the directory tree `from` to `to`, keeping file modes (keys stay 0600).
fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// A minimal HTTP/1.0 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    http_request(addr, "GET", path).await
}

/// A minimal HTTP/1.0 request without a body (`POST /logging?level=debug`, say).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .context("http timeout")??;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Polls `f` until it returns Some, for at most `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// YAML for the resources tests write.
pub mod yaml {
    pub fn network(id: &str, gateways: &[&str]) -> String {
        let gws: String = gateways
            .iter()
            .map(|g| format!("  - address: {g}\n    sniPort: 15443\n    tunnelPort: 15008\n"))
            .collect();
        format!("apiVersion: isthmus.io/v1alpha1\nkind: Network\nmetadata:\n  name: {id}\nspec:\n  gateways:\n{gws}")
    }

    pub fn service(name: &str, ns: &str, port: u32) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  hosts:\n  - {name}.{ns}.svc.cluster.local\n  ports:\n  - number: {port}\n    name: http\n    protocol: HTTP\n  resolution: STATIC\n  workloadSelector:\n    labels:\n      app: {name}\n"
        )
    }

    /// A WorkloadGroup whose VMs carry `app: <app>`, run as `sa`, and serve `http` on 8080;
    /// with `probe`, an HTTP readiness probe (so a VM starts unhealthy until it reports).
    pub fn workload_group(name: &str, ns: &str, app: &str, sa: &str, probe: bool) -> String {
        let probe = if probe {
            "  probe:\n    periodSeconds: 5\n    httpGet:\n      path: /healthz\n      port: 8080\n"
        } else {
            ""
        };
        format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  metadata:\n    labels:\n      app: {app}\n  template:\n    serviceAccount: {sa}\n    ports:\n      http: 8080\n{probe}"
        )
    }

    pub fn workload(name: &str, ns: &str, app: &str, address: &str, network: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  address: {address}\n  network: {network}\n  labels:\n    app: {app}\n  serviceAccount: {app}\n"
        )
    }

    /// Several documents in one file.
    pub fn docs(parts: &[String]) -> String {
        parts.join("---\n")
    }
}

/// The hostname the yaml helpers give a service.
pub fn host(name: &str, ns: &str) -> String {
    format!("{name}.{ns}.svc.cluster.local")
}
