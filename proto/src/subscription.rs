//! The subscriber side of Watch: open a stream, apply the snapshot and deltas to a local
//! copy of the view, acknowledge each version, resume from the last one after a reconnect.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;

use crate::model::{ModelError, Node, ViewResource};
use crate::pb;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("the registry refused the Watch: {code:?}: {message}")]
    Refused { code: tonic::Code, message: String },
    /// The TLS handshake failed (TLS 1.3 reports a refused client certificate only once
    /// the first request is under way).
    #[error("TLS handshake with the registry failed: {cause}")]
    Tls { cause: String },
    #[error("the Watch stream ended")]
    Closed,
    #[error("the registry sent a resource this client cannot read: {0}")]
    BadResource(#[from] ModelError),
}

impl From<tonic::Status> for WatchError {
    fn from(s: tonic::Status) -> Self {
        if let Some(cause) = crate::tls::failure::cause_in(&s) {
            return WatchError::Tls { cause };
        }
        WatchError::Refused {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// The subscriber's copy of its view.
#[derive(Debug, Clone, Default)]
pub struct LocalView {
    pub version: String,
    pub resources: BTreeMap<String, ViewResource>,
}

impl LocalView {
    /// The view as bytes to keep on disk (a protobuf `WatchResponse` snapshot), so a
    /// program can start from it when the registry is unreachable.
    pub fn encode(&self) -> Vec<u8> {
        use prost::Message;
        pb::WatchResponse {
            version: self.version.clone(),
            snapshot: true,
            upserts: self.resources.values().map(Into::into).collect(),
            removals: Vec::new(),
            more: false,
        }
        .encode_to_vec()
    }

    /// A view [`encode`](Self::encode)d earlier; a damaged file is an error, never a
    /// partial view.
    ///
    /// Each resource is decoded and made a model resource before the next: decoding the
    /// whole message first held every resource twice at once (its wire form's strings and
    /// lists beside the model's), and the wire form's freed memory was left scattered among
    /// the model's, where the allocator cannot give it back.
    ///
    /// Takes the bytes whole (a file's `Vec<u8>` is no copy): each resource is decoded from
    /// a slice of them.
    pub fn decode(bytes: impl Into<bytes::Bytes>) -> Result<Self, SnapshotError> {
        use prost::Message;
        let raw = RawResponse::decode(bytes.into())?;
        if !raw.snapshot || raw.more {
            return Err(SnapshotError::NotASnapshot);
        }
        let resources = raw
            .upserts
            .into_iter()
            .map(|r| {
                let r = pb::ViewResource::decode(r)?;
                Ok((r.key.clone(), ViewResource::try_from(r)?))
            })
            .collect::<Result<Vec<_>, SnapshotError>>()?;
        Ok(LocalView {
            version: raw.version,
            resources: view_map(resources),
        })
    }
}

/// A `WatchResponse` with its resources left encoded (a message and a byte string are the
/// same on the wire), to decode one at a time.
#[derive(Clone, PartialEq, prost::Message)]
struct RawResponse {
    #[prost(string, tag = "1")]
    version: String,
    #[prost(bool, tag = "2")]
    snapshot: bool,
    #[prost(bytes = "bytes", repeated, tag = "3")]
    upserts: Vec<bytes::Bytes>,
    #[prost(bool, tag = "5")]
    more: bool,
}

/// A view's resources as a map, built at once: its nodes come out full, where inserting
/// the same resources one by one in key order (as a snapshot sends them) leaves most nodes
/// about half full. Of a key twice, the last wins, as with inserts.
fn view_map(resources: Vec<(String, ViewResource)>) -> BTreeMap<String, ViewResource> {
    resources.into_iter().collect()
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a catalog snapshot: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("not a catalog snapshot: a partial or incremental response")]
    NotASnapshot,
    #[error("a resource in the snapshot is invalid: {0}")]
    Invalid(#[from] ModelError),
}

/// What one complete version changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    pub version: String,
    pub snapshot: bool,
    pub upserted: Vec<String>,
    pub removed: Vec<String>,
    /// Responses (parts) this version arrived in.
    pub parts: usize,
}

/// One open Watch stream.
pub struct Subscription {
    requests: mpsc::Sender<pb::WatchRequest>,
    responses: Streaming<pb::WatchResponse>,
    /// The view as of the last version applied. Shared with what the stream's owner
    /// publishes: an update copies it only while the last one is still in use, so at rest
    /// a program holds one copy of its view.
    pub view: Arc<LocalView>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("version", &self.view.version)
            .finish()
    }
}

impl Subscription {
    /// Subscribes as `node`; with `resume`, the view and version a previous stream left.
    pub async fn open(
        channel: Channel,
        node: &Node,
        resume: Option<Arc<LocalView>>,
    ) -> Result<Self, WatchError> {
        let view = resume.unwrap_or_default();
        let (tx, rx) = mpsc::channel(4);
        tx.send(pb::WatchRequest {
            request: Some(pb::watch_request::Request::Subscribe(pb::Subscribe {
                node: Some(node.into()),
                resume_version: view.version.clone(),
            })),
        })
        .await
        .map_err(|_| WatchError::Closed)?;
        let mut client = pb::watch_client::WatchClient::new(channel)
            .max_decoding_message_size(crate::grpc::DEFAULT_MAX_MESSAGE_BYTES);
        let responses = client.watch(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Self {
            requests: tx,
            responses,
            view,
        })
    }

    /// Receives the next complete version, applies it and acknowledges it.
    pub async fn next(&mut self) -> Result<Update, WatchError> {
        let update = self.receive().await?;
        self.ack(&update.version).await?;
        Ok(update)
    }

    /// Receives and applies the next complete version without acknowledging it. A version
    /// in several parts is applied only once its last part arrived, so a stream that breaks
    /// halfway leaves the view (and the version to resume from) as it was.
    pub async fn receive(&mut self) -> Result<Update, WatchError> {
        // Decode everything before touching the view: a bad resource changes nothing. Each
        // part is made model resources as it arrives, rather than holding every part's
        // wire form until the last.
        let mut update = Update::default();
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        loop {
            let resp = self.responses.message().await?.ok_or(WatchError::Closed)?;
            update.parts += 1;
            update.snapshot |= resp.snapshot;
            update.version = resp.version;
            for r in resp.upserts {
                let key = r.key.clone();
                upserts.push((key, ViewResource::try_from(r)?));
            }
            removals.extend(resp.removals);
            if !resp.more {
                break;
            }
        }
        let view = Arc::make_mut(&mut self.view);
        if update.snapshot {
            update.upserted = upserts.iter().map(|(key, _)| key.clone()).collect();
            view.resources = view_map(upserts);
        } else {
            for (key, res) in upserts {
                view.resources.insert(key.clone(), res);
                update.upserted.push(key);
            }
        }
        for k in removals {
            view.resources.remove(&k);
            update.removed.push(k);
        }
        view.version = update.version.clone();
        Ok(update)
    }

    pub async fn ack(&mut self, version: &str) -> Result<(), WatchError> {
        self.requests
            .send(pb::WatchRequest {
                request: Some(pb::watch_request::Request::Ack(pb::Ack {
                    version: version.to_string(),
                })),
            })
            .await
            .map_err(|_| WatchError::Closed)
    }

    /// Sends a raw request (for tests of protocol errors).
    pub async fn send_raw(&mut self, req: pb::WatchRequest) -> Result<(), WatchError> {
        self.requests
            .send(req)
            .await
            .map_err(|_| WatchError::Closed)
    }
}

/// How a [`WatchClient`] retries: a [`Backoff`](crate::backoff::Backoff) between these.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            backoff_min: crate::backoff::DEFAULT_MIN,
            backoff_max: crate::backoff::DEFAULT_MAX,
        }
    }
}

/// What a [`WatchClient`] knows, published after every change.
#[derive(Debug, Clone, Default)]
pub struct SyncState {
    /// The last complete view; kept through disconnects (serve from it when the registry is
    /// unreachable).
    pub view: Arc<LocalView>,
    pub connected: bool,
    /// When the view was last confirmed by the registry (a snapshot, a delta or a resume).
    pub last_sync: Option<SystemTime>,
    /// Full snapshots received; a reconnect that resumed does not add one.
    pub snapshots: u64,
    /// Reconnects that resumed without a full resend.
    pub resumes: u64,
    pub last_error: Option<String>,
    /// The registry of the set this client follows (the last one that answered), when the
    /// client knows its `--registry` set.
    pub registry: Option<String>,
}

impl SyncState {
    pub fn synced(&self) -> bool {
        self.last_sync.is_some()
    }

    /// The catalog part of every program's `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        serde_json::json!({
            "version": self.view.version,
            "connected": self.connected,
            "synced": self.synced(),
            "last_error": self.last_error,
            "snapshots": self.snapshots,
            "resumes": self.resumes,
            "registry": self.registry,
        })
    }
}

/// The one loop every consumer of a view runs (the routing table, the DNS names, the
/// agent's capture and snapshot): `on_turn` is called with the newest state at once, after
/// every change the Watch client publishes, and every `tick` when one is given (so age
/// gauges stay current), with `view_changed` true when the view itself is new since the
/// last turn. It returns at `shutdown` or when the client is gone.
pub async fn follow<F, Fut>(
    sync: watch::Receiver<Arc<SyncState>>,
    shutdown: crate::drain::Watch,
    tick: Option<Duration>,
    on_turn: F,
) where
    F: FnMut(Arc<SyncState>, bool) -> Fut,
    Fut: Future<Output = ()>,
{
    // A second trigger that never fires (its sender lives as long as the loop).
    let (_never_sent, never) = watch::channel(());
    follow_with(sync, never, shutdown, tick, on_turn).await;
}

/// [`follow`] with a second trigger: a turn also follows every change of `also` (the VM
/// agent's capture follows its group template as well as the view; `on_turn` reads it
/// through its own receiver). Returns, too, when `also`'s sender is gone.
pub async fn follow_with<T, F, Fut>(
    mut sync: watch::Receiver<Arc<SyncState>>,
    mut also: watch::Receiver<T>,
    shutdown: crate::drain::Watch,
    tick: Option<Duration>,
    mut on_turn: F,
) where
    F: FnMut(Arc<SyncState>, bool) -> Fut,
    Fut: Future<Output = ()>,
{
    let stop = shutdown.signaled();
    tokio::pin!(stop);
    let mut ticker = tick.map(tokio::time::interval);
    let mut seen: Option<Arc<LocalView>> = None;
    also.borrow_and_update();
    loop {
        let state = sync.borrow_and_update().clone();
        let view_changed = seen.as_ref().is_none_or(|v| !Arc::ptr_eq(v, &state.view));
        seen = Some(state.view.clone());
        tokio::select! {
            biased;
            _ = &mut stop => return,
            _ = on_turn(state, view_changed) => {}
        }
        tokio::select! {
            _ = &mut stop => return,
            r = sync.changed() => if r.is_err() { return },
            r = also.changed() => if r.is_err() { return },
            _ = async {
                match ticker.as_mut() {
                    Some(t) => { t.tick().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    }
}

type Connect = Box<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<Channel, crate::grpc::ConnectError>> + Send>>
        + Send
        + Sync,
>;

/// Keeps a view of the registry current across disconnects and registry restarts: it
/// reconnects with exponential back-off and resumes from its last version, which the
/// registry honours from its history or, after a restart, by content digest.
pub struct WatchClient {
    connect: Connect,
    node: Node,
    opts: WatchOptions,
    state: watch::Sender<Arc<SyncState>>,
    /// The `--registry` set `connect` reaches, to say which registry is followed and to
    /// move off one whose stream was lost (see [`crate::registries`]).
    set: Option<String>,
}

impl std::fmt::Debug for WatchClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchClient")
            .field("node", &self.node)
            .finish()
    }
}

impl WatchClient {
    /// `connect` makes a fresh channel for every attempt, so it can pick up a renewed
    /// certificate; `initial` is a view persisted by an earlier run, served until the
    /// registry answers.
    pub fn new<F, Fut>(
        connect: F,
        node: Node,
        initial: Option<LocalView>,
        opts: WatchOptions,
    ) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Channel, crate::grpc::ConnectError>> + Send + 'static,
    {
        let state = SyncState {
            view: Arc::new(initial.unwrap_or_default()),
            ..Default::default()
        };
        Self {
            connect: Box::new(move || Box::pin(connect())),
            node,
            opts,
            state: watch::channel(Arc::new(state)).0,
            set: None,
        }
    }

    /// Tells the client the `--registry` set its `connect` reaches (through
    /// [`crate::grpc::connect`]): it then reports which registry it follows, and after a
    /// lost stream the next connect tries another registry of the set first.
    pub fn following(mut self, set: &str) -> Self {
        self.set = Some(set.to_string());
        self
    }

    pub fn state(&self) -> watch::Receiver<Arc<SyncState>> {
        self.state.subscribe()
    }

    /// Marks the initial view as confirmed by the registry at `when` (a snapshot persisted
    /// by an earlier run), so that it is served as synced until the registry answers; the
    /// sync age then tells how old it is.
    pub fn restored_at(self, when: SystemTime) -> Self {
        self.state.send_modify(|s| {
            if !s.view.resources.is_empty() {
                let mut next = (**s).clone();
                next.last_sync = Some(when);
                *s = Arc::new(next);
            }
        });
        self
    }

    fn publish(&self, f: impl FnOnce(&mut SyncState)) {
        self.state.send_modify(|s| {
            let mut next = (**s).clone();
            f(&mut next);
            *s = Arc::new(next);
        });
    }

    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: crate::drain::Watch) {
        let stop = shutdown.signaled();
        tokio::pin!(stop);
        let mut backoff =
            crate::backoff::Backoff::new(self.opts.backoff_min, self.opts.backoff_max);
        let mut last_unreachable: Option<String> = None;
        loop {
            let resume = self.state.borrow().view.clone();
            let attempt = async {
                let channel = (self.connect)().await.map_err(|e| e.to_string())?;
                Subscription::open(channel, &self.node, Some(resume))
                    .await
                    .map_err(|e| e.to_string())
            };
            let result = tokio::select! {
                _ = &mut stop => return,
                r = attempt => r,
            };
            match result {
                Ok(mut sub) => loop {
                    let next = tokio::select! {
                        _ = &mut stop => return,
                        n = sub.next() => n,
                    };
                    match next {
                        Ok(update) => {
                            backoff.reset();
                            last_unreachable = None;
                            let view = sub.view.clone();
                            let registry =
                                self.set.as_deref().and_then(crate::registries::followed);
                            self.publish(|s| {
                                s.registry = registry;
                                if update.snapshot {
                                    s.snapshots += 1;
                                } else if !s.connected {
                                    // The first answer on a new stream, and not a snapshot.
                                    s.resumes += 1;
                                }
                                s.view = view;
                                s.connected = true;
                                s.last_sync = Some(SystemTime::now());
                                s.last_error = None;
                            });
                        }
                        Err(e) => {
                            let registry = self.state.borrow().registry.clone();
                            if let (Some(set), Some(addr)) = (&self.set, &registry) {
                                crate::registries::lost(set, addr);
                            }
                            tracing::warn!(error = %e, registry = registry.as_deref().unwrap_or("?"), "registry watch interrupted; serving the last view and reconnecting (another registry of the set first)");
                            self.publish(|s| {
                                s.connected = false;
                                s.last_error = Some(e.to_string());
                            });
                            break;
                        }
                    }
                },
                Err(e) => {
                    // Said at warn once per distinct cause (a program waiting for its first
                    // catalog must say why), then at debug while it repeats.
                    if last_unreachable.as_deref() != Some(e.as_str()) {
                        tracing::warn!(error = %e, retry_in = ?backoff.peek(), "cannot reach the registry; retrying");
                        last_unreachable = Some(e.clone());
                    } else {
                        tracing::debug!(error = %e, "cannot reach the registry");
                    }
                    self.publish(|s| {
                        s.connected = false;
                        s.last_error = Some(e);
                    });
                }
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = backoff.wait() => {}
            }
        }
    }
}

/// The registry's gRPC address when none is given: a registry on the same host.
pub const DEFAULT_REGISTRY_ADDR: &str = "127.0.0.1:15012";
/// The trust domain when none is given (Istio's default).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The flags every data-plane program takes to reach the registry, written once.
#[derive(Debug, Clone, clap::Args)]
pub struct RegistryFlags {
    /// The registry's gRPC address (host:port); for a set of registries several,
    /// comma-separated, or a name that resolves to each of them. One is followed at a
    /// time; on losing it the program moves to another.
    #[arg(long, default_value = DEFAULT_REGISTRY_ADDR)]
    pub registry: String,
    /// The mesh root certificate.
    #[arg(long)]
    pub root: std::path::PathBuf,
    /// Directory with this program's key.pem and cert-chain.pem.
    #[arg(long)]
    pub cert_dir: std::path::PathBuf,
    /// The mesh's trust domain; by default the one the root certificate names.
    #[arg(long)]
    pub trust_domain: Option<String>,
}

impl RegistryFlags {
    /// The settings, with the trust domain the root certificate names unless
    /// `--trust-domain` says one; a `--trust-domain` that disagrees with the root is a
    /// configuration problem naming both. An unreadable root is left to the program's own
    /// check of `--root` (the trust domain then falls back to the default).
    pub fn settings(self) -> Result<RegistrySettings, crate::config::ConfigProblems> {
        let from_root = crate::tls::read_certs(&self.root)
            .ok()
            .and_then(|certs| crate::tls::trust_domain_of_ca(certs.first()?));
        let trust_domain = match (self.trust_domain, from_root) {
            (Some(flag), Some(root)) if flag != root => {
                let mut p = crate::config::ConfigProblems::default();
                p.push(
                    "--trust-domain",
                    format!(
                        "{flag:?} disagrees with the root certificate {}, which is the root of \
                         trust domain {root:?}: drop the flag or use the mesh's root",
                        self.root.display()
                    ),
                );
                return Err(p);
            }
            (Some(flag), _) => flag,
            (None, Some(root)) => root,
            (None, None) => DEFAULT_TRUST_DOMAIN.to_string(),
        };
        Ok(RegistrySettings {
            addr: self.registry,
            root_cert: self.root,
            cert_dir: self.cert_dir,
            trust_domain,
        })
    }
}

/// How a program reaches the registry's Watch.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RegistrySettings {
    pub addr: String,
    /// The mesh root certificate (`root-cert.pem`).
    pub root_cert: std::path::PathBuf,
    /// `key.pem` and `cert-chain.pem`, re-read on every connect so a renewal is picked up.
    pub cert_dir: std::path::PathBuf,
    pub trust_domain: String,
}

/// Why [`RegistrySettings::connect`] has no channel.
#[derive(Debug, thiserror::Error)]
pub enum RegistryConnectError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Connect(#[from] crate::grpc::ConnectError),
}

impl RegistrySettings {
    /// A gRPC channel to the registry, verified as a server of the trust domain by the
    /// root in `root_cert`; with `creds`, the client authenticates with them (mTLS),
    /// without, it is anonymous (a bootstrap token request).
    pub async fn connect(
        &self,
        creds: Option<&crate::tls::Credentials>,
    ) -> Result<Channel, RegistryConnectError> {
        use crate::tls::{self, ServerIdentity, TrustBundle};
        let bundle = TrustBundle::from_pem_file(&self.root_cert, &self.trust_domain)?;
        let cfg = tls::client_config(creds, &bundle, ServerIdentity::TrustDomain, &[tls::ALPN_H2])?;
        Ok(crate::grpc::connect(&self.addr, Arc::new(cfg)).await?)
    }
}

impl WatchClient {
    /// A client that connects over mTLS with the credentials in `registry.cert_dir`.
    /// Unreadable credentials fail here; later, every connect re-reads them (to pick up a
    /// renewal) and keeps the last good ones if the files are mid-rewrite.
    pub fn over_mtls(
        registry: &RegistrySettings,
        node: Node,
        initial: Option<LocalView>,
        opts: WatchOptions,
    ) -> Result<Self, crate::tls::TlsError> {
        use crate::tls::{self, Credentials, ServerIdentity, TrustBundle};
        let bundle = TrustBundle::from_pem_file(&registry.root_cert, &registry.trust_domain)?;
        let tls_config = move |cert_dir: &std::path::Path| {
            let creds = Credentials::from_dir(cert_dir)?;
            tls::client_config(
                Some(&creds),
                &bundle,
                ServerIdentity::TrustDomain,
                &[tls::ALPN_H2],
            )
            .map(Arc::new)
        };
        let last_good = Arc::new(std::sync::Mutex::new(tls_config(&registry.cert_dir)?));
        let addr = registry.addr.clone();
        let cert_dir = registry.cert_dir.clone();
        let set = registry.addr.clone();
        Ok(WatchClient::new(
            move || {
                let cfg = match tls_config(&cert_dir) {
                    Ok(cfg) => {
                        *last_good.lock().expect("tls config poisoned") = cfg.clone();
                        cfg
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "keeping the previous credentials");
                        last_good.lock().expect("tls config poisoned").clone()
                    }
                };
                let addr = addr.clone();
                async move { crate::grpc::connect(&addr, cfg).await }
            },
            node,
            initial,
            opts,
        )
        .following(&set))
    }
}

/// The catalog-sync gauges every subscriber exports (under its own prefix).
#[derive(Debug, Clone, Default)]
pub struct SyncMetrics {
    pub synced: prometheus_client::metrics::gauge::Gauge,
    pub connected: prometheus_client::metrics::gauge::Gauge,
    pub age_seconds: prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>,
    /// 1 for the registry of the set followed, 0 for one followed before.
    pub registry: prometheus_client::metrics::family::Family<
        RegistryLabels,
        prometheus_client::metrics::gauge::Gauge,
    >,
    followed: Arc<std::sync::Mutex<Option<String>>>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RegistryLabels {
    pub address: String,
}

impl SyncMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self::default();
        m.register_into(registry);
        m
    }

    pub fn register_into(&self, registry: &mut prometheus_client::registry::Registry) {
        let m = self;
        registry.register(
            "catalog_synced",
            "1 once a view from the registry is in use",
            m.synced.clone(),
        );
        registry.register(
            "catalog_connected",
            "1 while the Watch stream to the registry is up",
            m.connected.clone(),
        );
        registry.register(
            "catalog_sync_age_seconds",
            "Seconds since the registry last confirmed the view (-1 before the first sync)",
            m.age_seconds.clone(),
        );
        registry.register(
            "catalog_registry",
            "1 for the registry of the --registry set this program follows, 0 for one it followed before",
            m.registry.clone(),
        );
    }

    pub fn observe(&self, state: &SyncState) {
        self.synced.set(i64::from(state.synced()));
        self.connected.set(i64::from(state.connected));
        self.age_seconds.set(match state.last_sync {
            Some(t) => SystemTime::now()
                .duration_since(t)
                .unwrap_or_default()
                .as_secs_f64(),
            None => -1.0,
        });
        let mut followed = self.followed.lock().unwrap_or_else(|p| p.into_inner());
        if *followed != state.registry {
            let gauge = |address: &String| {
                self.registry.get_or_create(&RegistryLabels {
                    address: address.clone(),
                })
            };
            if let Some(before) = followed.as_ref() {
                gauge(before).set(0);
            }
            if let Some(now) = state.registry.as_ref() {
                gauge(now).set(1);
            }
            *followed = state.registry.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::telemetry::tests::Captured;

    #[test]
    fn the_trust_domain_comes_from_the_root_and_a_disagreeing_flag_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root-cert.pem");
        std::fs::write(&root, crate::test_pki::TestCa::new("mesh.test").root_pem()).unwrap();
        let flags = |td: Option<&str>, root: &std::path::Path| RegistryFlags {
            registry: DEFAULT_REGISTRY_ADDR.into(),
            root: root.to_path_buf(),
            cert_dir: dir.path().to_path_buf(),
            trust_domain: td.map(str::to_string),
        };
        assert_eq!(
            flags(None, &root).settings().unwrap().trust_domain,
            "mesh.test"
        );
        assert_eq!(
            flags(Some("mesh.test"), &root)
                .settings()
                .unwrap()
                .trust_domain,
            "mesh.test"
        );
        let err = flags(Some("cluster.local"), &root)
            .settings()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--trust-domain")
                && err.contains("\"cluster.local\"")
                && err.contains("\"mesh.test\""),
            "{err}"
        );
        // No readable root: the default, and the program's own check names --root.
        let missing = dir.path().join("nope.pem");
        assert_eq!(
            flags(None, &missing).settings().unwrap().trust_domain,
            DEFAULT_TRUST_DOMAIN
        );
    }

    #[test]
    fn an_unreachable_registry_is_said_at_warn_once_per_cause() {
        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .finish();
        let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = attempts.clone();
        let client = WatchClient::new(
            move || {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async {
                    Err(crate::grpc::ConnectError::BadAddress {
                        addr: "registry.invalid".into(),
                    })
                }
            },
            crate::model::Node {
                id: "gw".into(),
                kind: crate::model::NodeKind::Gateway,
                network: "net-a".into(),
                cluster: String::new(),
                locality: Default::default(),
            },
            None,
            WatchOptions {
                backoff_min: Duration::from_millis(1),
                backoff_max: Duration::from_millis(2),
            },
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tracing::subscriber::with_default(subscriber, || {
            rt.block_on(async {
                let (trigger, shutdown) = crate::drain::channel();
                let task = tokio::spawn(client.run(shutdown));
                while attempts.load(std::sync::atomic::Ordering::SeqCst) < 5 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                trigger.fire();
                task.await.unwrap();
            })
        });
        let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        let warns = text
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("cannot reach the registry"))
            .count();
        assert_eq!(warns, 1, "{text}");
        assert!(
            text.contains("registry.invalid"),
            "the cause is named: {text}"
        );
        assert!(
            text.lines().filter(|l| l.contains("DEBUG")).count() >= 3,
            "repeats at debug: {text}"
        );
    }

    async fn next_turn(
        turns: &mut tokio::sync::mpsc::UnboundedReceiver<(String, bool)>,
    ) -> (String, bool) {
        tokio::time::timeout(Duration::from_secs(5), turns.recv())
            .await
            .expect("a turn")
            .expect("the loop is running")
    }

    #[tokio::test]
    async fn follow_with_turns_on_either_trigger_and_stops() {
        let (sync_tx, sync) = watch::channel(Arc::new(SyncState::default()));
        let (group_tx, group) = watch::channel(0u32);
        let (trigger, shutdown) = crate::drain::channel();
        let (turns_tx, mut turns) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(follow_with(
            sync,
            group,
            shutdown,
            None,
            move |state: Arc<SyncState>, view_changed| {
                let _ = turns_tx.send((state.view.version.clone(), view_changed));
                std::future::ready(())
            },
        ));
        // At once, with the view new.
        assert_eq!(next_turn(&mut turns).await, (String::new(), true));
        // After a change of the second trigger: the same view.
        group_tx.send_replace(1);
        assert_eq!(next_turn(&mut turns).await, (String::new(), false));
        // After a new view.
        let view = LocalView {
            version: "v2".into(),
            ..Default::default()
        };
        sync_tx.send_replace(Arc::new(SyncState {
            view: Arc::new(view),
            ..Default::default()
        }));
        assert_eq!(next_turn(&mut turns).await, ("v2".to_string(), true));
        trigger.fire();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops at shutdown")
            .unwrap();
    }
}
