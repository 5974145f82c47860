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

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, TlsOptions, Txn,
    TxnOp,
};
use tokio::sync::watch;

use super::backend::{Op, Store, StoreError, Table, WriteHealth};
use super::RECOVERY_INTERVAL;

pub const DEFAULT_PREFIX: &str = "/isthmus/";
/// etcd's default `--max-txn-ops`: a larger batch is written as several transactions.
pub const MAX_TXN_OPS: usize = 128;
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
}

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
        let store = Self {
            inner: Arc::new(Inner {
                client,
                cfg,
                health: watch::channel(WriteHealth::Writable).0,
            }),
        };
        store.probe().await.map_err(open_err)?;
        Ok(store)
    }

    pub fn config(&self) -> &EtcdConfig {
        &self.inner.cfg
    }

    /// One cheap read, to see that etcd answers with a leader.
    async fn probe(&self) -> Result<(), String> {
        let mut kv = self.inner.client.kv_client();
        kv.get(
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
        let key = match op {
            Op::Put(k, _) | Op::Delete(k) => k.clone(),
        };
        last.insert(key, i);
    }
    ops.into_iter()
        .enumerate()
        .filter(|(i, op)| {
            let key = match op {
                Op::Put(k, _) | Op::Delete(k) => k,
            };
            last.get(key) == Some(i)
        })
        .map(|(_, op)| op)
        .collect()
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let resp = self
            .kv()
            .get(self.key_of(table, key), None)
            .await
            .map_err(|e| self.failed("get", table, e))?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = self.table_prefix(table);
        let mut kv = self.kv();
        let mut out = Vec::new();
        let mut from = prefix.clone().into_bytes();
        let end = prefix_end(prefix.as_bytes());
        let mut revision = 0;
        loop {
            let opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE)
                .with_revision(revision);
            let mut resp = kv
                .get(from.clone(), Some(opts))
                .await
                .map_err(|e| self.failed("list", table, e))?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
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
        if !matches!(*self.inner.health.borrow(), WriteHealth::Writable) {
            return Err(self.unwritable(self.write_health_why()));
        }
        let ops = fold(ops);
        let mut kv = self.kv();
        for chunk in ops.chunks(MAX_TXN_OPS) {
            let txn_ops: Vec<TxnOp> = chunk
                .iter()
                .map(|op| match op {
                    Op::Put(k, v) => TxnOp::put(self.key_of(table, k), v.clone(), None),
                    Op::Delete(k) => TxnOp::delete(self.key_of(table, k), None),
                })
                .collect();
            kv.txn(Txn::new().and_then(txn_ops))
                .await
                .map_err(|e| self.failed("apply", table, e))?;
        }
        Ok(())
    }

    async fn insert_if_absent(
        &self,
        table: Table,
        key: &str,
        value: Vec<u8>,
    ) -> Result<bool, StoreError> {
        if !matches!(*self.inner.health.borrow(), WriteHealth::Writable) {
            return Err(self.unwritable(self.write_health_why()));
        }
        let k = self.key_of(table, key);
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                k.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(k, value, None)]);
        let resp = self
            .kv()
            .txn(txn)
            .await
            .map_err(|e| self.failed("insert_if_absent", table, e))?;
        Ok(resp.succeeded())
    }

    fn kind(&self) -> &'static str {
        "etcd"
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
    fn write_health_why(&self) -> String {
        match &*self.inner.health.borrow() {
            WriteHealth::Unwritable { why } => why.clone(),
            WriteHealth::Writable => String::new(),
        }
    }
}

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
