//! The etcd store: the registry's tables as keys under one prefix in an etcd cluster, so
//! that several registries can share one state (`--store etcd --etcd-endpoints …`).
//!
//! Layout: `<prefix><table>/<key>` (prefix `/isthmus/` by default), values as the registry
//! writes them. Every method is one etcd request:
//!
//! - `apply` is one transaction (atomic), split into several, in order, only when the batch
//!   is larger than etcd's `--max-txn-ops` (128 by default). Within a batch the last write
//!   to a key wins, as in the embedded store (etcd refuses a transaction naming a key
//!   twice, so earlier writes to the same key are folded away first).
//! - `insert_if_absent` is a transaction that writes only if the key was never created
//!   (`create_revision == 0`): across every registry of a set, one redeemer of a bootstrap
//!   token wins.
//! - `list` reads the table's range at one revision, in pages, so a big catalog neither
//!   exceeds a gRPC message nor mixes two points in time.
//!
//! When etcd cannot be reached, writes fail with [`StoreError::Unwritable`] naming the
//! endpoints and the cause; the store reports itself unwritable (the registry turns
//! not-ready for writes) and [`Store::recover`] probes etcd until it answers again.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use isthmus_proto::backoff::Backoff;
use tokio::sync::{mpsc, watch};

use super::backend::{Op, Store, StoreChange, StoreError, Table, VipWrite, WriteHealth};
use super::RECOVERY_INTERVAL;

pub const DEFAULT_PREFIX: &str = "/isthmus/";
/// etcd's default `--max-txn-ops`: a larger batch is written as several transactions.
pub const MAX_TXN_OPS: usize = 128;
/// The pause before a request that never left is sent to the next endpoint.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// Keys per page when a table is listed.
const LIST_PAGE: i64 = 1000;
/// How long a connection to an endpoint may take before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one request may take before it fails (and the store turns unwritable).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Replies from etcd may be as large as etcd's own limit on a response.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Where the etcd cluster is and how to authenticate to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs (`http://host:2379`, or `https://` with [`EtcdConfig::tls`]).
    pub endpoints: Vec<String>,
    /// Every key this registry set writes starts with it; two meshes can share one etcd
    /// under different prefixes.
    pub prefix: String,
    pub tls: Option<EtcdTls>,
    /// How long this registry's held entries (VM registrations) outlive it: the TTL of its
    /// etcd lease, renewed every third of it. The registry sets it to `--vm-grace`.
    pub lease_ttl: Duration,
}

/// The lease TTL unless the registry says otherwise (the VM grace period's default).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

/// TLS to etcd: the CA that signed etcd's serving certificates and, when etcd asks for
/// client certificates (`--client-cert-auth`), this registry's certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub client: Option<(PathBuf, PathBuf)>,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: DEFAULT_PREFIX.to_string(),
            tls: None,
            lease_ttl: DEFAULT_LEASE_TTL,
        }
    }

    /// What the operator reads in errors: `etcd at http://a:2379,http://b:2379`.
    fn shown(&self) -> String {
        format!("etcd at {}", self.endpoints.join(","))
    }

    /// Checks what can be checked before connecting: endpoints given and well formed, TLS
    /// files readable, a prefix that cannot overlap another mesh's. A problem comes with
    /// the flag it is about.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.endpoints.is_empty() {
            return Err((
                "--etcd-endpoints",
                "is empty: name at least one etcd client URL".into(),
            ));
        }
        for e in &self.endpoints {
            let scheme_ok = e.starts_with("http://") || e.starts_with("https://");
            if !scheme_ok || e.parse::<tonic::transport::Uri>().is_err() {
                return Err((
                    "--etcd-endpoints",
                    format!("{e:?} is not a client URL (http://host:2379 or https://host:2379)"),
                ));
            }
            if e.starts_with("https://") && self.tls.is_none() {
                return Err((
                    "--etcd-ca",
                    format!("{e} is https: name the CA that signed etcd's serving certificate"),
                ));
            }
        }
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') {
            return Err((
                "--etcd-prefix",
                format!(
                    "{:?} must start and end with '/' (say /isthmus/), so that one prefix is \
                     never the start of another",
                    self.prefix
                ),
            ));
        }
        if let Some(tls) = &self.tls {
            tls_options(tls)?;
        }
        Ok(())
    }
}

#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    cfg: EtcdConfig,
    health: watch::Sender<WriteHealth>,
    /// The revision of this registry's last write of each followed key whose change the
    /// feed has not reported yet (`superseded`), by etcd key.
    own: Mutex<HashMap<String, i64>>,
    /// The revision the first `list` read at: the feed starts just after it.
    listed: AtomicI64,
    /// This registry's lease, granted on the first held write.
    lease: Arc<LeaseHolder>,
    /// Dropped with the store: ends the lease's keep-alive task.
    _keepalive_stop: watch::Sender<()>,
}

/// This registry's etcd lease and its renewals.
struct LeaseHolder {
    id: tokio::sync::Mutex<Option<i64>>,
    generation: watch::Sender<u64>,
    stop: watch::Receiver<()>,
    ttl: Duration,
}

/// Whether the change feed reports `table`'s changes (the views hold them); redeemed tokens
/// and address claims are only ever checked in the store.
fn followed(table: Table) -> bool {
    matches!(table, Table::Catalog | Table::Vips)
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.cfg.endpoints)
            .field("prefix", &self.inner.cfg.prefix)
            .finish()
    }
}

impl EtcdStore {
    /// Connects and checks that etcd answers; a registry does not start on an etcd it
    /// cannot reach, since it would have no catalog to serve.
    pub async fn connect(cfg: EtcdConfig) -> Result<Self, StoreError> {
        cfg.validate()
            .map_err(|(flag, why)| StoreError::Settings(format!("{flag}: {why}")))?;
        let shown = cfg.shown();
        let open_err = |why: String| StoreError::Unreachable {
            at: shown.clone(),
            why,
        };
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some(tls) = &cfg.tls {
            let tls = tls_options(tls)
                .map_err(|(flag, why)| StoreError::Settings(format!("{flag}: {why}")))?;
            options = options.with_tls(tls);
        }
        let client = Client::connect(&cfg.endpoints, Some(options))
            .await
            .map_err(|e| open_err(describe(&e)))?;
        let (keepalive_stop, stop) = watch::channel(());
        let lease = Arc::new(LeaseHolder {
            id: tokio::sync::Mutex::new(None),
            generation: watch::channel(0).0,
            stop,
            ttl: cfg.lease_ttl.max(Duration::from_secs(2)),
        });
        let store = Self {
            inner: Arc::new(Inner {
                client,
                cfg,
                health: watch::channel(WriteHealth::Writable).0,
                own: Mutex::default(),
                listed: AtomicI64::new(0),
                lease,
                _keepalive_stop: keepalive_stop,
            }),
        };
        store.probe().await.map_err(open_err)?;
        Ok(store)
    }

    /// One cheap read, to see that etcd answers with a leader.
    async fn probe(&self) -> Result<(), String> {
        self.get_raw(
            self.key_of(Table::Catalog, ""),
            Some(GetOptions::new().with_count_only()),
        )
        .await
        .map(drop)
        .map_err(|e| describe(&e))
    }

    fn table_prefix(&self, table: Table) -> String {
        format!("{}{}/", self.inner.cfg.prefix, table.name())
    }

    fn key_of(&self, table: Table, key: &str) -> String {
        format!("{}{key}", self.table_prefix(table))
    }

    fn kv(&self) -> etcd_client::KvClient {
        self.inner
            .client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// A read, tried again on another endpoint while the failure says the request never
    /// left (a member that is down: the client's balancer learns it from a refused
    /// connection). Any other failure is returned at once: a write that may have been
    /// applied is never sent twice.
    async fn get_raw(
        &self,
        key: impl Into<Vec<u8>>,
        opts: Option<GetOptions>,
    ) -> Result<etcd_client::GetResponse, etcd_client::Error> {
        let key = key.into();
        self.retried(|mut kv| {
            let (key, opts) = (key.clone(), opts.clone());
            async move { kv.get(key, opts).await }
        })
        .await
    }

    /// A transaction, tried again as [`Self::get_raw`] is.
    async fn txn_raw(&self, txn: Txn) -> Result<etcd_client::TxnResponse, etcd_client::Error> {
        self.retried(|mut kv| {
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
    }

    async fn retried<T, F, Fut>(&self, mut call: F) -> Result<T, etcd_client::Error>
    where
        F: FnMut(etcd_client::KvClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let tries = self.inner.cfg.endpoints.len() * 2 + 1;
        let mut attempt = 1;
        loop {
            match call(self.kv()).await {
                Err(e) if attempt < tries && never_sent(&e) => {
                    attempt += 1;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                done => return done,
            }
        }
    }

    /// Turns an etcd error into the store's: unreachable (the store turns unwritable) or a
    /// refusal of this request.
    fn failed(&self, op: &'static str, table: Table, e: etcd_client::Error) -> StoreError {
        let why = describe(&e);
        if unreachable(&e) {
            self.inner.health.send_if_modified(|h| match h {
                WriteHealth::Unwritable { .. } => false,
                WriteHealth::Writable => {
                    *h = WriteHealth::Unwritable { why: why.clone() };
                    true
                }
            });
            return self.unwritable(why);
        }
        StoreError::Backend { op, table, why }
    }

    fn unwritable(&self, why: String) -> StoreError {
        StoreError::Unwritable {
            path: self.inner.cfg.shown(),
            why,
            retry_s: RECOVERY_INTERVAL.as_secs(),
        }
    }
}

fn tls_options(tls: &EtcdTls) -> Result<TlsOptions, (&'static str, String)> {
    let read = |p: &PathBuf, flag: &'static str| {
        std::fs::read(p).map_err(|e| (flag, format!("cannot read {}: {e}", p.display())))
    };
    let mut o =
        TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca, "--etcd-ca")?));
    if let Some((cert, key)) = &tls.client {
        o = o.identity(Identity::from_pem(
            read(cert, "--etcd-cert")?,
            read(key, "--etcd-key")?,
        ));
    }
    Ok(o)
}

/// Whether `e` says etcd could not be reached (rather than that it refused the request).
fn unreachable(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        // A connection that fails comes back as `Unknown` ("transport error"); etcd's own
        // refusals say "etcdserver: …".
        etcd_client::Error::GRpcStatus(s) => match s.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => true,
            Code::Unknown => !s.message().starts_with("etcdserver:"),
            _ => false,
        },
        _ => false,
    }
}

/// Whether `e` says the request never reached etcd (no connection could be made), so
/// sending it again cannot apply it twice.
fn never_sent(e: &etcd_client::Error) -> bool {
    let why = describe(e);
    why.contains("tcp connect error") || why.contains("Connection refused")
}

/// etcd's error in the operator's words; a gRPC status shows its message, which names the
/// cause ("etcdserver: no leader", "too many operations in txn request").
fn describe(e: &etcd_client::Error) -> String {
    let (mut why, mut source) = match e {
        etcd_client::Error::GRpcStatus(s) => {
            (s.message().to_string(), std::error::Error::source(s))
        }
        other => (other.to_string(), std::error::Error::source(other)),
    };
    // The causes underneath ("tcp connect error: Connection refused").
    while let Some(s) = source {
        let next = s.to_string();
        if !why.contains(&next) {
            why.push_str(": ");
            why.push_str(&next);
        }
        source = s.source();
    }
    why
}

/// The batch with earlier writes to a key folded into the last one, in the order of each
/// key's last write.
fn fold(ops: Vec<Op>) -> Vec<Op> {
    let mut last = std::collections::HashMap::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        last.insert(op.key().to_string(), i);
    }
    ops.into_iter()
        .enumerate()
        .filter(|(i, op)| last.get(op.key()) == Some(i))
        .map(|(_, op)| op)
        .collect()
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let resp = self
            .get_raw(self.key_of(table, key), None)
            .await
            .map_err(|e| self.failed("get", table, e))?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = self.table_prefix(table);
        let mut out = Vec::new();
        let mut from = prefix.clone().into_bytes();
        let end = prefix_end(prefix.as_bytes());
        let mut revision = 0;
        loop {
            let opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE)
                .with_revision(revision);
            let mut resp = self
                .get_raw(from.clone(), Some(opts))
                .await
                .map_err(|e| self.failed("list", table, e))?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
                let _ = self.inner.listed.compare_exchange(
                    0,
                    revision,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            let Some(last) = kvs.last() else { break };
            // The next page starts just after the last key of this one.
            from = last.key().to_vec();
            from.push(0);
            for kv in kvs {
                let key = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
                out.push((key, kv.value().to_vec()));
            }
            if !more {
                break;
            }
        }
        Ok(out)
    }

    async fn apply(&self, table: Table, ops: Vec<Op>) -> Result<(), StoreError> {
        self.writable()?;
        self.write_chunks("apply", table, &fold(ops), None).await
    }

    async fn insert_if_absent(
        &self,
        table: Table,
        key: &str,
        value: Vec<u8>,
    ) -> Result<bool, StoreError> {
        self.writable()?;
        let k = self.key_of(table, key);
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                k.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(k, value, None)]);
        let resp = self
            .txn_raw(txn)
            .await
            .map_err(|e| self.failed("insert_if_absent", table, e))?;
        if resp.succeeded() {
            if let Some(revision) = resp.header().map(|h| h.revision()) {
                self.written(table, [key], revision);
            }
        }
        Ok(resp.succeeded())
    }

    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn shared(&self) -> bool {
        true
    }

    async fn write_vips(&self, writes: Vec<VipWrite>) -> Result<Vec<String>, StoreError> {
        self.writable()?;
        let mut lost = Vec::new();
        let (new, rest): (Vec<VipWrite>, Vec<VipWrite>) = writes
            .into_iter()
            .partition(|w| matches!(w, VipWrite::New { .. }));
        // New allocations in groups, each one transaction on all of its conditions; a group
        // that fails is tried one allocation at a time, to find which lost.
        for group in new.chunks(VIP_GROUP) {
            if self.vip_txn(group).await? {
                continue;
            }
            for w in group {
                if !self.vip_txn(std::slice::from_ref(w)).await? && !self.stored_as(w).await? {
                    lost.push(w.hostname().to_string());
                }
            }
        }
        for w in rest {
            if !self.vip_txn(std::slice::from_ref(&w)).await? {
                lost.push(w.hostname().to_string());
            }
        }
        Ok(lost)
    }

    async fn apply_held(&self, table: Table, ops: Vec<Op>) -> Result<Vec<String>, StoreError> {
        self.writable()?;
        let lease = self.lease(table).await?;
        let mut not_held = Vec::new();
        let (puts, deletes): (Vec<Op>, Vec<Op>) = fold(ops)
            .into_iter()
            .partition(|op| matches!(op, Op::Put(..)));
        self.write_chunks("apply_held", table, &puts, Some(lease))
            .await?;
        // A delete per key, each on the condition that the entry is still under this
        // registry's lease (etcd's transactions take one condition set).
        for op in deletes {
            let Op::Delete(k) = op else { continue };
            let full = self.key_of(table, &k);
            let txn = Txn::new()
                .when(vec![Compare::lease(full.clone(), CompareOp::Equal, lease)])
                .and_then(vec![TxnOp::delete(full, None)]);
            let resp = self
                .txn_raw(txn)
                .await
                .map_err(|e| self.failed("apply_held", table, e))?;
            if resp.succeeded() {
                if let Some(revision) = resp.header().map(|h| h.revision()) {
                    self.written(table, [k.as_str()], revision);
                }
            } else {
                not_held.push(k);
            }
        }
        Ok(not_held)
    }

    fn lease_generation(&self) -> Option<watch::Receiver<u64>> {
        Some(self.inner.lease.generation.subscribe())
    }

    fn follow(&self) -> Option<mpsc::Receiver<StoreChange>> {
        let (tx, rx) = mpsc::channel(FEED_CAPACITY);
        let store = self.clone();
        tokio::spawn(async move { store.feed(tx).await });
        Some(rx)
    }

    fn superseded(&self, table: Table, key: &str, revision: i64) -> bool {
        let full = self.key_of(table, key);
        let mut own = self.inner.own.lock().unwrap_or_else(|p| p.into_inner());
        match own.get(&full) {
            Some(&mine) if mine == revision => {
                // The feed reached this registry's own write: every later change is newer.
                own.remove(&full);
                true
            }
            Some(&mine) => mine > revision,
            None => false,
        }
    }

    fn write_health(&self) -> watch::Receiver<WriteHealth> {
        self.inner.health.subscribe()
    }

    async fn recover(&self) -> Result<(), StoreError> {
        match self.probe().await {
            Ok(()) => {
                self.inner.health.send_replace(WriteHealth::Writable);
                Ok(())
            }
            Err(why) => {
                self.inner
                    .health
                    .send_replace(WriteHealth::Unwritable { why: why.clone() });
                Err(self.unwritable(why))
            }
        }
    }
}

impl EtcdStore {
    /// Writes `ops` (folded: one per key) in transactions of at most [`MAX_TXN_OPS`], in
    /// order; puts go under `lease` when one is given.
    async fn write_chunks(
        &self,
        op: &'static str,
        table: Table,
        ops: &[Op],
        lease: Option<i64>,
    ) -> Result<(), StoreError> {
        for chunk in ops.chunks(MAX_TXN_OPS) {
            let txn_ops: Vec<TxnOp> = chunk
                .iter()
                .map(|op| match op {
                    Op::Put(k, v) => TxnOp::put(
                        self.key_of(table, k),
                        v.clone(),
                        lease.map(|l| PutOptions::new().with_lease(l)),
                    ),
                    Op::Delete(k) => TxnOp::delete(self.key_of(table, k), None),
                })
                .collect();
            let resp = self
                .txn_raw(Txn::new().and_then(txn_ops))
                .await
                .map_err(|e| self.failed(op, table, e))?;
            if let Some(revision) = resp.header().map(|h| h.revision()) {
                self.written(table, chunk.iter().map(Op::key), revision);
            }
        }
        Ok(())
    }

    /// One transaction writing `writes` if every one's condition holds; whether it did.
    async fn vip_txn(&self, writes: &[VipWrite]) -> Result<bool, StoreError> {
        let table = Table::Vips;
        let mut when = Vec::new();
        let mut then = Vec::new();
        let mut written = Vec::new();
        for w in writes {
            let key = self.key_of(table, w.hostname());
            written.push(w.hostname());
            match w {
                VipWrite::New {
                    hostname,
                    value,
                    addresses,
                } => {
                    when.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
                    then.push(TxnOp::put(key, value.clone(), None));
                    for a in addresses {
                        let claim = self.key_of(Table::VipAddresses, a);
                        when.push(Compare::create_revision(claim.clone(), CompareOp::Equal, 0));
                        then.push(TxnOp::put(claim, hostname.clone(), None));
                    }
                }
                VipWrite::Update { value, .. } => then.push(TxnOp::put(key, value.clone(), None)),
                VipWrite::Free {
                    hostname,
                    expected,
                    addresses,
                } => {
                    when.push(Compare::value(
                        key.clone(),
                        CompareOp::Equal,
                        expected.clone(),
                    ));
                    then.push(TxnOp::delete(key, None));
                    for a in addresses {
                        let claim = self.key_of(Table::VipAddresses, a);
                        when.push(Compare::value(
                            claim.clone(),
                            CompareOp::Equal,
                            hostname.clone(),
                        ));
                        then.push(TxnOp::delete(claim, None));
                    }
                }
            }
        }
        let resp = self
            .txn_raw(Txn::new().when(when).and_then(then))
            .await
            .map_err(|e| self.failed("write_vips", table, e))?;
        if resp.succeeded() {
            if let Some(revision) = resp.header().map(|h| h.revision()) {
                self.written(table, written, revision);
            }
        }
        Ok(resp.succeeded())
    }

    /// Whether `w`'s allocation is stored exactly as it would write it (another registry
    /// of the set, reading the same catalog, made the same allocation first).
    async fn stored_as(&self, w: &VipWrite) -> Result<bool, StoreError> {
        let VipWrite::New {
            hostname, value, ..
        } = w
        else {
            return Ok(false);
        };
        Ok(self.get(Table::Vips, hostname).await?.as_ref() == Some(value))
    }

    /// This registry's lease: granted on first use, then kept alive by a task until the
    /// store is dropped.
    async fn lease(&self, table: Table) -> Result<i64, StoreError> {
        let holder = &self.inner.lease;
        let mut id = holder.id.lock().await;
        if let Some(id) = *id {
            return Ok(id);
        }
        let tries = self.inner.cfg.endpoints.len() * 2 + 1;
        let mut attempt = 1;
        let granted = loop {
            let ttl = holder.ttl.as_secs() as i64;
            match self.inner.client.lease_client().grant(ttl, None).await {
                Ok(g) => break g.id(),
                Err(e) if attempt < tries && never_sent(&e) => {
                    attempt += 1;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(e) => return Err(self.failed("lease_grant", table, e)),
            }
        };
        *id = Some(granted);
        tracing::info!(
            store = "etcd",
            lease = format!("{granted:x}"),
            ttl_s = holder.ttl.as_secs(),
            "holding an etcd lease for this registry's VM registrations"
        );
        let (client, holder) = (self.inner.client.clone(), holder.clone());
        tokio::spawn(async move { keep_alive(client, holder, granted).await });
        Ok(granted)
    }

    /// Remembers this registry's write of `keys` at `revision`, for `superseded`.
    fn written<'a>(&self, table: Table, keys: impl IntoIterator<Item = &'a str>, revision: i64) {
        if !followed(table) {
            return;
        }
        let mut own = self.inner.own.lock().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            own.insert(self.key_of(table, k), revision);
        }
    }

    /// The change feed: an etcd watch on the prefix from just after the first list,
    /// re-established after a failure from the next revision not yet reported (with
    /// back-off), and a `Resync` when etcd compacted that revision away. Ends when the
    /// receiver is dropped.
    async fn feed(self, tx: mpsc::Sender<StoreChange>) {
        let mut next = self.inner.listed.load(Ordering::SeqCst) + 1;
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            let ended = tokio::select! {
                _ = tx.closed() => return,
                ended = self.watch_from(&mut next, &tx, &mut backoff) => ended,
            };
            match ended {
                WatchEnded::ReceiverGone => return,
                WatchEnded::Compacted => {
                    // What was missed is gone from etcd's history: the follower reads the
                    // store whole again, and the feed goes on from now.
                    match self.current_revision().await {
                        Ok(now) => next = now + 1,
                        Err(why) => {
                            tracing::warn!(store = "etcd", %why, "cannot read etcd's revision to resume the change feed");
                            next = 0;
                        }
                    }
                    if tx.send(StoreChange::Resync).await.is_err() {
                        return;
                    }
                }
                WatchEnded::Failed(why) => {
                    tracing::warn!(store = "etcd", %why, from_revision = next, "etcd change feed lost; re-establishing");
                }
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// One watch, until it fails; `next` follows the revisions reported.
    async fn watch_from(
        &self,
        next: &mut i64,
        tx: &mpsc::Sender<StoreChange>,
        backoff: &mut Backoff,
    ) -> WatchEnded {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision((*next).max(0))
            .with_progress_notify();
        let mut stream = match self
            .inner
            .client
            .watch_client()
            .watch(self.inner.cfg.prefix.clone(), Some(opts))
            .await
        {
            Ok(s) => s,
            Err(e) => return WatchEnded::Failed(describe(&e)),
        };
        loop {
            let resp = match stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => return WatchEnded::Failed("etcd ended the watch".into()),
                Err(e) => return WatchEnded::Failed(describe(&e)),
            };
            if resp.compact_revision() > 0 {
                tracing::warn!(
                    store = "etcd",
                    from_revision = *next,
                    compacted_to = resp.compact_revision(),
                    "etcd compacted the history the change feed was reading; reading the store again"
                );
                return WatchEnded::Compacted;
            }
            if resp.canceled() {
                return WatchEnded::Failed(format!(
                    "etcd cancelled the watch: {}",
                    resp.cancel_reason()
                ));
            }
            backoff.reset();
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let revision = kv.mod_revision();
                *next = revision + 1;
                let Some((table, key)) = self.split_key(kv.key()) else {
                    continue;
                };
                if !followed(table) {
                    continue;
                }
                let value = match ev.event_type() {
                    EventType::Put => Some(kv.value().to_vec()),
                    EventType::Delete => None,
                };
                let change = StoreChange::Key {
                    table,
                    key,
                    value,
                    revision,
                };
                if tx.send(change).await.is_err() {
                    return WatchEnded::ReceiverGone;
                }
            }
        }
    }

    /// The table and key of an etcd key under the prefix.
    fn split_key(&self, full: &[u8]) -> Option<(Table, String)> {
        let rest = full.strip_prefix(self.inner.cfg.prefix.as_bytes())?;
        let rest = std::str::from_utf8(rest).ok()?;
        let (table, key) = rest.split_once('/')?;
        Some((Table::from_name(table)?, key.to_string()))
    }

    async fn current_revision(&self) -> Result<i64, String> {
        let resp = self
            .get_raw(
                self.key_of(Table::Catalog, ""),
                Some(GetOptions::new().with_count_only()),
            )
            .await
            .map_err(|e| describe(&e))?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    /// Refuses a write at once while the store is unwritable (the recovery probe makes it
    /// writable again), naming the cause.
    fn writable(&self) -> Result<(), StoreError> {
        match &*self.inner.health.borrow() {
            WriteHealth::Writable => Ok(()),
            WriteHealth::Unwritable { why } => Err(self.unwritable(why.clone())),
        }
    }
}

/// Renews the lease every third of its TTL until the store is dropped. When etcd says the
/// lease is gone (it was unreachable past the TTL, or someone revoked it), a new one is
/// granted and the generation bumped, so that the registry writes its entries again.
async fn keep_alive(client: Client, holder: Arc<LeaseHolder>, mut id: i64) {
    let mut stop = holder.stop.clone();
    let period = holder.ttl / 3;
    let mut lease = client.lease_client();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let renewed = async {
            let (mut keeper, mut stream) = lease.keep_alive(id).await?;
            keeper.keep_alive().await?;
            Ok::<_, etcd_client::Error>(stream.message().await?.map(|r| r.ttl()))
        }
        .await;
        let gone = match &renewed {
            Ok(Some(ttl)) => *ttl <= 0,
            // The stream ended without an answer: etcd closes it for a lease it no longer has.
            Ok(None) => true,
            Err(etcd_client::Error::LeaseKeepAliveError(why)) => why.contains("not found"),
            Err(etcd_client::Error::GRpcStatus(s)) => {
                s.code() == tonic::Code::NotFound || s.message().contains("lease not found")
            }
            Err(_) => false,
        };
        match renewed {
            _ if gone => {
                tracing::warn!(store = "etcd", lease = format!("{id:x}"), "this registry's etcd lease is gone (etcd was unreachable past its TTL, or it was revoked): its VM registrations are written again under a new one");
                match lease.grant(holder.ttl.as_secs() as i64, None).await {
                    Ok(granted) => {
                        id = granted.id();
                        *holder.id.lock().await = Some(id);
                        holder.generation.send_modify(|g| *g += 1);
                    }
                    Err(e) => {
                        // The next held write grants one (and renews it from a task of its
                        // own); the bump makes the registry write its entries again.
                        tracing::warn!(store = "etcd", error = %describe(&e), "cannot grant a new etcd lease; granting one at the next write");
                        *holder.id.lock().await = None;
                        holder.generation.send_modify(|g| *g += 1);
                        return;
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(store = "etcd", lease = format!("{id:x}"), error = %describe(&e), "cannot renew this registry's etcd lease; retrying");
            }
        }
    }
}

/// Why one watch of the change feed ended.
enum WatchEnded {
    ReceiverGone,
    Compacted,
    Failed(String),
}

/// New VIP allocations per transaction: three conditions and three writes each, within
/// etcd's default of 128 operations per transaction.
const VIP_GROUP: usize = 40;

/// Changes the feed holds for a follower that is busy applying earlier ones.
const FEED_CAPACITY: usize = 4096;

/// The smallest key greater than every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: to the end of the keyspace.
    vec![0]
}

#[cfg(test)]
mod tests;
