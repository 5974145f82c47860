//! Mesh scenarios for the proxy core and the east-west gateway: sample apps that say who
//! they are, workloads (the proxy core's inbound in front of an app), a workload's
//! outbound side following the registry, gateways in-process or as real processes, and
//! the YAML that puts them in the catalog.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use isthmus_gateway::GatewayConfig;
use isthmus_gateway::GatewayHandle;
use isthmus_proto::admin::Readiness;
use isthmus_proto::drain;
use isthmus_proto::identity::TrustDomain;
use isthmus_proto::model::{Locality, Node, NodeKind};
use isthmus_proto::subscription::{RegistrySettings, SyncState, WatchClient, WatchOptions};
use isthmus_proto::tls::{self, Credentials, ServerIdentity};
use isthmus_proto::SpiffeId;
use isthmus_proxy::admission::Admission;
use isthmus_proxy::authz::AuthorizationPolicy;
use isthmus_proxy::balancer::OutlierConfig;
use isthmus_proxy::connection::Tracker;
use isthmus_proxy::inbound::{self, AppTarget, Inbound, InboundConnection, Mode};
use isthmus_proxy::metrics::Metrics;
use isthmus_proxy::outbound::{ClientTls, Outbound, OutboundStream, OutboundTarget};
use isthmus_proxy::routes::{self, RouteOptions, RouteTable, Target};
use isthmus_proxy::upstream::ConnectOptions;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use tokio::runtime::Runtime;

use super::netns::{Net, Topology};
use super::registry::{TestRegistry, CLUSTER, TRUST_DOMAIN};

/// A plain TCP app: greets every connection with `<name>\n`, then echoes what it reads,
/// and once the client has shut down its write half records what it received.
/// Stops (and refuses new connections) when dropped.
pub struct EchoApp {
    pub addr: SocketAddr,
    /// One entry per connection whose client finished sending, in the order they finished.
    pub received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

/// What one connection sent an [`EchoApp`] (after its greeting).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub bytes: u64,
    pub sha256: Vec<u8>,
}

/// The echo app's read size.
const ECHO_CHUNK: usize = 64 << 10;

impl EchoApp {
    /// Binds `addr` on the current runtime (so, in a network namespace, on its runtime).
    pub async fn start(addr: SocketAddr, name: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let greeting = format!("{name}\n").into_bytes();
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let record = received.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let greeting = greeting.clone();
                let record = record.clone();
                tokio::spawn(async move {
                    if s.write_all(&greeting).await.is_err() {
                        return;
                    }
                    // Reads only once the last read is written back: the client must read
                    // while it writes, or both wait once the path's buffers are full.
                    let mut buf = vec![0u8; ECHO_CHUNK];
                    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
                    let mut bytes = 0u64;
                    loop {
                        let n = match s.read(&mut buf).await {
                            Ok(0) => break,
                            Ok(n) => n,
                            Err(_) => return,
                        };
                        digest.update(&buf[..n]);
                        bytes += n as u64;
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                    record.lock().unwrap().push(Received {
                        bytes,
                        sha256: digest.finish().as_ref().to_vec(),
                    });
                    let _ = s.shutdown().await;
                });
            }
        });
        Ok(Self {
            addr,
            received,
            task,
        })
    }
}

impl Drop for EchoApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A workload: the proxy core's inbound (mTLS, authorization) in front of an [`EchoApp`],
/// recording the identity of every peer it let through.
pub struct Workload {
    /// The mTLS address other workloads and gateways connect to.
    pub addr: SocketAddr,
    /// What its app greets with.
    pub name: String,
    pub app: EchoApp,
    pub peers: Arc<Mutex<Vec<Option<SpiffeId>>>>,
    pub inbound: Arc<Inbound>,
    trigger: drain::Trigger,
    serving: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Workload {
    /// Starts on the current runtime: the app on an ephemeral port of `app_ip`, the inbound
    /// listener on `addr`.
    pub async fn start(
        addr: SocketAddr,
        name: &str,
        creds: &Credentials,
        reg_bundle: &tls::TrustBundle,
        policy: AuthorizationPolicy,
        mode: Mode,
    ) -> anyhow::Result<Self> {
        let app = EchoApp::start(SocketAddr::new(addr.ip(), 0), name).await?;
        let peers: Arc<Mutex<Vec<Option<SpiffeId>>>> = Arc::default();
        let seen = peers.clone();
        let metrics = Arc::new(Metrics::default());
        let inbound = Arc::new(Inbound {
            tls: Arc::new(ArcSwap::from_pointee(Inbound::server_config(
                creds, reg_bundle,
            )?)),
            admission: Admission::new(&policy),
            policy: Arc::new(ArcSwap::from_pointee(policy)),
            mode,
            app: AppTarget::Fixed(app.addr),
            metrics,
            tracker: Tracker::new(),
            handshake_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            max_connections: 1024,
            on_connection: Some(Arc::new(move |c: &InboundConnection| {
                seen.lock().unwrap().push(c.peer.clone());
            })),
        });
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (trigger, shutdown) = drain::channel();
        let serving = tokio::spawn(inbound::serve(listener, inbound.clone(), shutdown));
        Ok(Self {
            addr,
            name: name.to_string(),
            app,
            peers,
            inbound,
            trigger,
            serving: Mutex::new(Some(serving)),
        })
    }

    /// Stops accepting and returns once the listener is closed (the port refuses
    /// connections from then on).
    pub async fn stop(&self) {
        self.trigger.fire();
        let serving = self.serving.lock().unwrap().take();
        if let Some(task) = serving {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }

    pub fn app_name(&self) -> String {
        self.name.clone()
    }

    pub fn last_peer(&self) -> Option<SpiffeId> {
        self.peers.lock().unwrap().last().cloned().flatten()
    }
}

/// A workload's outbound side: a routing table that follows the registry's view of its
/// network, and mTLS origination with its certificate.
pub struct Client {
    pub outbound: Arc<Outbound>,
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub sync: watch::Receiver<Arc<SyncState>>,
    _trigger: drain::Trigger,
}

impl Client {
    /// Subscribes as a workload of `network` (with a connect that goes to `registry`, which
    /// the current runtime must be able to reach).
    pub async fn start(
        bundle: tls::TrustBundle,
        registry: SocketAddr,
        network: &str,
        creds: Credentials,
        opts: RouteOptions,
    ) -> anyhow::Result<Self> {
        let cfg = Arc::new(tls::client_config(
            Some(&creds),
            &bundle,
            ServerIdentity::TrustDomain,
            &[tls::ALPN_H2],
        )?);
        let node = Node {
            id: format!("client-{network}-{}", creds.identity),
            kind: NodeKind::Workload,
            network: network.to_string(),
            cluster: CLUSTER.to_string(),
            ..Default::default()
        };
        let client = WatchClient::new(
            move || {
                let cfg = cfg.clone();
                async move { isthmus_proto::grpc::connect(&registry.to_string(), cfg).await }
            },
            node,
            None,
            WatchOptions {
                backoff_min: Duration::from_millis(50),
                backoff_max: Duration::from_millis(500),
            },
        );
        let sync = client.state();
        let (trigger, shutdown) = drain::channel();
        tokio::spawn(client.run(shutdown.clone()));
        let metrics = Arc::new(Metrics::default());
        let routes = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
        tokio::spawn(routes::follow(
            sync.clone(),
            routes.clone(),
            opts,
            metrics.clone(),
            Readiness::default().part("catalog"),
            shutdown,
        ));
        let outbound = Arc::new(Outbound {
            routes: routes.clone(),
            tls: Arc::new(ArcSwap::from_pointee(ClientTls::new(creds, bundle))),
            metrics,
            tracker: Tracker::new(),
            connect: ConnectOptions {
                timeout: Duration::from_secs(2),
                attempts: 3,
                mark: None,
            },
            source_labels: Default::default(),
            tunnel: None,
        });
        Ok(Self {
            outbound,
            routes,
            sync,
            _trigger: trigger,
        })
    }

    /// Waits until the destination has `n` targets.
    pub async fn wait_for_targets(&self, hostname: &str, port: u16, n: usize) {
        let ok = super::registry::eventually(Duration::from_secs(20), || async {
            let t = self.routes.load().lookup(hostname, port, "").ok()?;
            (t.targets().len() == n).then_some(())
        })
        .await;
        assert!(
            ok.is_some(),
            "{hostname}:{port} never had {n} targets: {:?}",
            self.routes
                .load()
                .lookup(hostname, port, "")
                .map(|d| d.targets())
        );
    }

    /// Connects through the proxy core and reads the app's greeting: (greeting, stream).
    pub async fn call(
        &self,
        hostname: &str,
        port: u16,
    ) -> anyhow::Result<(String, OutboundStream)> {
        let mut s = self
            .outbound
            .connect(&OutboundTarget {
                hostname: hostname.to_string(),
                port,
                subset: String::new(),
                sni: None,
            })
            .await?;
        let greeting = read_line(&mut s.stream).await?;
        Ok((greeting, s))
    }
}

/// One `\n`-terminated line (without it), bounded in time.
pub async fn read_line<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> anyhow::Result<String> {
    let mut line = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut b = [0u8; 1];
        loop {
            let n = s.read(&mut b).await?;
            if n == 0 || b[0] == b'\n' {
                return Ok::<_, std::io::Error>(());
            }
            line.push(b[0]);
        }
    })
    .await??;
    Ok(String::from_utf8(line)?)
}

/// Sends `msg` and reads the echo back.
pub async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    msg: &str,
) -> anyhow::Result<String> {
    s.write_all(format!("{msg}\n").as_bytes()).await?;
    s.flush().await?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line)).await??;
    Ok(line.trim_end().to_string())
}

/// What [`bulk_echo`] sent, and what came back.
#[derive(Debug)]
pub struct BulkEcho {
    pub sent: Received,
    pub echoed: Received,
}

/// Chunk of [`bulk_echo`]'s writes.
const BULK_CHUNK: usize = 256 << 10;

/// Sends `bytes` of pseudo-random data to an [`EchoApp`] through `stream` while reading the
/// echo back, then ends its write half and reads until the app closes; returns the size and
/// SHA-256 of both. The pattern holds for any amount:
///
/// - the echo comes back while the client is still writing (the app writes back before it
///   reads more, so a client that wrote everything first would wait forever once the bytes in
///   flight filled every buffer on the path);
/// - the writer flushes before it waits for the last echo: a TLS stream's `write` returns
///   once its bytes are sealed into the session's buffer, and if the socket was full at that
///   moment they stay in the process until the next write, flush or shutdown.
pub async fn bulk_echo<S>(stream: S, bytes: u64) -> std::io::Result<BulkEcho>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use rand::{RngCore, SeedableRng};

    let mut block = vec![0u8; BULK_CHUNK];
    rand::rngs::StdRng::seed_from_u64(bytes).fill_bytes(&mut block);
    let (mut r, mut w) = tokio::io::split(stream);
    let send = async {
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        let mut left = bytes;
        let mut index = 0u64;
        while left > 0 {
            // Each chunk numbered, so that chunks swapped or repeated change the digest.
            block[..8].copy_from_slice(&index.to_le_bytes());
            let n = left.min(BULK_CHUNK as u64) as usize;
            w.write_all(&block[..n]).await?;
            digest.update(&block[..n]);
            left -= n as u64;
            index += 1;
        }
        w.flush().await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(Received {
            bytes,
            sha256: digest.finish().as_ref().to_vec(),
        })
    };
    let receive = async {
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; BULK_CHUNK];
        let mut got = 0u64;
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            digest.update(&buf[..n]);
            got += n as u64;
        }
        Ok::<_, std::io::Error>(Received {
            bytes: got,
            sha256: digest.finish().as_ref().to_vec(),
        })
    };
    let (sent, echoed) = tokio::try_join!(send, receive)?;
    Ok(BulkEcho { sent, echoed })
}

// ---- The two-network mesh of topology tests ----

/// The service port of mesh scenarios.
pub const SVC_PORT: u16 = 9080;
/// The port their apps listen on.
pub const APP_PORT: u16 = 8080;
pub const SNI_PORT: u16 = 15443;

/// `<name>.shop.svc.cluster.local`.
pub fn host(name: &str) -> String {
    format!("{name}.shop.svc.cluster.local")
}

/// The identity of service account `sa` in `shop`.
pub fn id(sa: &str) -> SpiffeId {
    SpiffeId::workload(&TrustDomain::new(TRUST_DOMAIN).unwrap(), "shop", sa).unwrap()
}

/// The catalog's name of `net`.
pub fn network(net: Net) -> &'static str {
    match net {
        Net::A => "network-a",
        Net::B => "network-b",
    }
}

/// Runs `fut` on `rt` (inside its namespace) and waits for it from the test's runtime.
pub async fn on<T: Send + 'static>(
    rt: &Runtime,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    rt.spawn(fut).await.expect("task in namespace panicked")
}

/// A two-network mesh: the topology, a runtime in each network, and the registry.
pub struct Mesh {
    pub reg: TestRegistry,
    pub registry_addr: SocketAddr,
    /// What gateways, agents and pods are given as `--registry`: the registry's address,
    /// or with [`Mesh::start_set`] every registry of the set, comma-separated.
    pub registry_set: String,
    pub dir: tempfile::TempDir,
    rt_a: Option<Runtime>,
    rt_b: Option<Runtime>,
    pub topo: Topology,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // Runtimes cannot be dropped from async code; their threads must also leave
        // before the namespaces go.
        for rt in [self.rt_a.take(), self.rt_b.take()].into_iter().flatten() {
            rt.shutdown_background();
        }
    }
}

impl Mesh {
    /// None (with a message) where namespaces cannot be made outside CI.
    pub async fn start(name: &str, catalog: &[String]) -> Option<Mesh> {
        Self::start_with(name, catalog, |_| {}).await
    }

    /// As [`Mesh::start`], with the registry's config adjusted first.
    pub async fn start_with(
        name: &str,
        catalog: &[String],
        adjust: impl FnOnce(&mut isthmus_registry::app::RegistryConfig),
    ) -> Option<Mesh> {
        let topo = Topology::create(name)?;
        let host_ip = IpAddr::V4(topo.host_addr());
        let reg = TestRegistry::start_with(&[], |cfg| {
            cfg.grpc_addr = SocketAddr::new(host_ip, 0);
            adjust(cfg);
        })
        .await
        .expect("registry");
        let registry_addr = reg.grpc_addr();
        let mut docs = vec![
            yaml::network(
                "network-a",
                &[SocketAddr::new(topo.gateway_addr(Net::A).into(), SNI_PORT).into()],
            ),
            yaml::network(
                "network-b",
                &[SocketAddr::new(topo.gateway_addr(Net::B).into(), SNI_PORT).into()],
            ),
        ];
        docs.extend(catalog.iter().cloned());
        reg.write_resource("mesh.yaml", &docs.join("---\n"));
        let rt_a = topo.netns(Net::A).runtime();
        let rt_b = topo.netns(Net::B).runtime();
        Some(Mesh {
            reg,
            registry_addr,
            registry_set: registry_addr.to_string(),
            dir: tempfile::tempdir().unwrap(),
            rt_a: Some(rt_a),
            rt_b: Some(rt_b),
            topo,
        })
    }

    /// A mesh on a set of `size` registries sharing one store (`adjust` says which: etcd),
    /// each reachable from the namespaces; the first is [`Mesh::reg`], the others are
    /// returned, and [`Mesh::registry_set`] names them all.
    pub async fn start_set(
        name: &str,
        catalog: &[String],
        size: usize,
        adjust: impl Fn(&mut isthmus_registry::app::RegistryConfig),
    ) -> Option<(Mesh, Vec<TestRegistry>)> {
        let mut m = Self::start_with(name, catalog, &adjust).await?;
        let host_ip = IpAddr::V4(m.topo.host_addr());
        let mut others = Vec::new();
        for _ in 1..size {
            let peer = TestRegistry::start_peer_of(&m.reg, |cfg| {
                cfg.grpc_addr = SocketAddr::new(host_ip, 0);
                adjust(cfg);
                // One registry reads the files; the set shares what it stores.
                cfg.resources = None;
            })
            .await
            .expect("registry of the set");
            others.push(peer);
        }
        m.registry_set = std::iter::once(m.registry_addr)
            .chain(others.iter().map(|r| r.grpc_addr()))
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",");
        Some((m, others))
    }

    pub fn rt(&self, net: Net) -> &Runtime {
        match net {
            Net::A => self.rt_a.as_ref().unwrap(),
            Net::B => self.rt_b.as_ref().unwrap(),
        }
    }

    pub fn gateway_config(&self, net: Net, cert_dir: PathBuf) -> GatewayConfig {
        let mut cfg = GatewayConfig::new(
            network(net),
            CLUSTER,
            RegistrySettings {
                addr: self.registry_set.clone(),
                root_cert: self.reg.ca_root(),
                cert_dir,
                trust_domain: TRUST_DOMAIN.into(),
            },
        );
        cfg.sni_addr = SocketAddr::new(self.topo.gateway_addr(net).into(), SNI_PORT);
        // Admin on the namespace's loopback (it answers loopback peers only), metrics on
        // the wan address, as a gateway is deployed.
        cfg.admin_addr = Some(SocketAddr::from(([127, 0, 0, 1], 15000)));
        cfg.metrics_addr = Some(SocketAddr::new(self.topo.gateway_addr(net).into(), 15020));
        cfg.health_addr = Some(SocketAddr::new(self.topo.gateway_addr(net).into(), 15021));
        cfg.connect_timeout = Duration::from_secs(1);
        cfg.outlier_failures = 2;
        cfg.outlier_base_ejection = Duration::from_secs(5);
        cfg
    }

    /// The east-west gateway of `net`, in-process inside the namespace.
    /// `net`'s gateway, in-process, once it is ready (its first view is in use), as a
    /// readiness probe would gate traffic to it: a client in another network can learn a
    /// route before this gateway does, and a gateway without the route closes the handshake.
    pub async fn gateway(&self, net: Net) -> GatewayHandle {
        let cert_dir = gateway_credentials(&self.reg, network(net), self.dir.path()).await;
        let cfg = self.gateway_config(net, cert_dir);
        let gw = on(self.rt(net), async move { isthmus_gateway::run(cfg).await })
            .await
            .expect("gateway");
        let ready = super::registry::eventually(Duration::from_secs(20), || async {
            gw.is_ready().then_some(())
        })
        .await;
        assert!(
            ready.is_some(),
            "{}'s gateway never became ready",
            network(net)
        );
        gw
    }

    /// A workload of service `sa` at `ip` in `net` (its app greets with `name`).
    pub async fn workload(
        &self,
        net: Net,
        ip: &str,
        name: &str,
        sa: &str,
        policy: AuthorizationPolicy,
    ) -> Workload {
        let ip: IpAddr = ip.parse().unwrap();
        self.topo.netns(net).add_ip(ip);
        let creds = self.reg.credentials("shop", sa).await.unwrap();
        let bundle = self.reg.bundle();
        let name = name.to_string();
        on(self.rt(net), async move {
            Workload::start(
                SocketAddr::new(ip, APP_PORT),
                &name,
                &creds,
                &bundle,
                policy,
                Mode::Strict,
            )
            .await
        })
        .await
        .expect("workload")
    }

    /// A client workload (service account `sa`) in `net`.
    pub async fn client(&self, net: Net, sa: &str) -> Arc<Client> {
        self.client_at(net, sa, Locality::default()).await
    }

    /// A client workload as [`Self::client`], in `locality`.
    pub async fn client_at(&self, net: Net, sa: &str, locality: Locality) -> Arc<Client> {
        let creds = self.reg.credentials("shop", sa).await.unwrap();
        let bundle = self.reg.bundle();
        let registry = self.registry_addr;
        let opts = RouteOptions {
            outlier: OutlierConfig {
                consecutive_failures: 2,
                base_ejection: Duration::from_secs(5),
                max_ejection: Duration::from_secs(30),
                ..Default::default()
            },
            locality,
            ..Default::default()
        };
        let net_name = network(net).to_string();
        Arc::new(
            on(self.rt(net), async move {
                Client::start(bundle, registry, &net_name, creds, opts).await
            })
            .await
            .expect("client"),
        )
    }

    /// One call from `client` (in `net`) to `name`: who answered, who the client
    /// verified, where the TCP connection went; the echo is checked too.
    pub async fn call(&self, net: Net, client: &Arc<Client>, name: &str) -> anyhow::Result<Call> {
        let client = client.clone();
        let hostname = host(name);
        on(self.rt(net), async move {
            let (greeting, mut s) = client.call(&hostname, SVC_PORT).await?;
            let echoed = echo(&mut s.stream, "across").await?;
            anyhow::ensure!(echoed == "across", "echo came back as {echoed:?}");
            Ok(Call {
                greeting,
                server: s.server_identity.clone(),
                target: Target::clone(&s.target),
            })
        })
        .await
    }
}

/// One call's outcome: who answered, who the client verified, where TCP went.
#[derive(Debug)]
pub struct Call {
    pub greeting: String,
    pub server: Option<SpiffeId>,
    pub target: Target,
}

/// Writes `isthmusctl cert request`-style credentials for a gateway into `dir`.
pub async fn gateway_credentials(reg: &TestRegistry, network: &str, dir: &Path) -> PathBuf {
    let d = dir.join(format!("gateway-{network}"));
    std::fs::create_dir_all(&d).unwrap();
    reg.credentials_dir("istio-system", &format!("gateway-{network}"), &d)
        .await
        .expect("gateway credentials");
    d
}

/// YAML for the catalog of mesh scenarios.
pub mod yaml {
    /// A Network with gateways given as `ip:port`.
    pub fn network(id: &str, gateways: &[SocketAddrLike]) -> String {
        let gws: String = gateways
            .iter()
            .map(|g| format!("  - address: {}\n    sniPort: {}\n", g.0, g.1))
            .collect();
        format!("apiVersion: isthmus.io/v1alpha1\nkind: Network\nmetadata:\n  name: {id}\nspec:\n  gateways:\n{gws}")
    }

    /// `(ip, port)` of a gateway.
    #[derive(Debug, Clone)]
    pub struct SocketAddrLike(pub String, pub u16);

    impl From<std::net::SocketAddr> for SocketAddrLike {
        fn from(a: std::net::SocketAddr) -> Self {
            SocketAddrLike(a.ip().to_string(), a.port())
        }
    }

    /// A ServiceEntry selecting workloads labelled `app: <name>`, with one TCP port named
    /// `tcp`.
    pub fn service(name: &str, ns: &str, port: u16) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  hosts:\n  - {name}.{ns}.svc.cluster.local\n  ports:\n  - number: {port}\n    name: tcp\n    protocol: TCP\n  resolution: STATIC\n  workloadSelector:\n    labels:\n      app: {name}\n"
        )
    }

    /// A WorkloadEntry of service `app` (service account `app`) at `address`, whose `tcp`
    /// port is `port`.
    pub fn workload(
        name: &str,
        ns: &str,
        app: &str,
        address: &str,
        port: u16,
        network: &str,
    ) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  address: {address}\n  network: {network}\n  ports:\n    tcp: {port}\n  labels:\n    app: {app}\n  serviceAccount: {app}\n"
        )
    }
}

/// Connects a raw TCP client, for tests that speak to a listener byte by byte.
pub async fn raw_connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).unwrap();
    s
}
