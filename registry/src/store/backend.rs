//! What every store is: a durable map of named tables with atomic batches, the one trait
//! the registry's state goes through, and its error.

use std::fmt;

/// The tables a store holds; each is a map from string keys to opaque bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// Catalog resources, keyed by `Resource::key()`, protobuf `CatalogResource` values.
    Catalog,
    /// Redeemed bootstrap tokens, keyed by token id; value is the token's expiry (unix secs).
    RedeemedTokens,
    /// Allocated service VIPs.
    Vips,
    /// On a shared store: each allocated address, keyed by itself, with the hostname that
    /// holds it, so that two registries of a set never hand one address to two hostnames.
    VipAddresses,
}

impl Table {
    pub const ALL: [Table; 4] = [
        Table::Catalog,
        Table::RedeemedTokens,
        Table::Vips,
        Table::VipAddresses,
    ];

    /// The table named `name` (as [`Table::name`] spells it).
    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Table::Catalog => "catalog",
            Table::RedeemedTokens => "redeemed_tokens",
            Table::Vips => "vips",
            Table::VipAddresses => "vip_addresses",
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One write of an atomic batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(String, Vec<u8>),
    Delete(String),
}

impl Op {
    /// The key it writes.
    pub fn key(&self) -> &str {
        match self {
            Op::Put(k, _) | Op::Delete(k) => k,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {why} (is another registry using this --data-dir?)")]
    Open { path: String, why: String },
    /// A store on the network (etcd) did not answer at start.
    #[error(
        "cannot reach the store, {at}: {why} (is etcd running there, and are --etcd-endpoints \
         and --etcd-ca, --etcd-cert and --etcd-key right?)"
    )]
    Unreachable { at: String, why: String },
    /// The store's settings are wrong; nothing was tried.
    #[error("{0}")]
    Settings(String),
    /// The file is there but is not a store this registry can trust; nothing was changed.
    #[error(
        "the store {path} is damaged: {why}. Nothing was changed. Restore it from a backup; or, \
         to start over with an empty store, move it away (bootstrap tokens already spent become \
         usable again and VIP allocations are forgotten)"
    )]
    Damaged { path: String, why: String },
    #[error("store {op} on table {table} failed: {why}")]
    Backend {
        op: &'static str,
        table: Table,
        why: String,
    },
    /// Writes fail for a reason outside the registry (a full disk, an I/O error); they are
    /// refused until a retry succeeds, without a restart.
    #[error(
        "cannot write to the store {path}: {why}; writes are refused until it is fixed (retried every \
         {retry_s} s, no restart needed)"
    )]
    Unwritable {
        path: String,
        why: String,
        retry_s: u64,
    },
    #[error("store task failed: {0}")]
    Task(String),
}

/// One write of the VIP table, with what it claims or releases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VipWrite {
    /// A hostname's first allocation (or one with new addresses): written only if the
    /// hostname has none stored and no other hostname holds any of `addresses`.
    New {
        hostname: String,
        value: Vec<u8>,
        addresses: Vec<String>,
    },
    /// A new state of an allocation already stored with the same addresses.
    Update { hostname: String, value: Vec<u8> },
    /// The allocation goes, and its addresses back to the pool: only if it is still stored
    /// as `expected` (no other registry of the set changed it since).
    Free {
        hostname: String,
        expected: Vec<u8>,
        addresses: Vec<String>,
    },
}

impl VipWrite {
    pub fn hostname(&self) -> &str {
        match self {
            VipWrite::New { hostname, .. }
            | VipWrite::Update { hostname, .. }
            | VipWrite::Free { hostname, .. } => hostname,
        }
    }

    /// The plain write of the VIP table, without claims or conditions.
    pub fn op(&self) -> Op {
        match self {
            VipWrite::New {
                hostname, value, ..
            }
            | VipWrite::Update { hostname, value } => Op::Put(hostname.clone(), value.clone()),
            VipWrite::Free { hostname, .. } => Op::Delete(hostname.clone()),
        }
    }
}

/// A change to a store several registries share, as its change feed reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChange {
    /// `key` of `table` holds `value` as of `revision` (`None`: it was deleted).
    Key {
        table: Table,
        key: String,
        value: Option<Vec<u8>>,
        revision: i64,
    },
    /// The feed lost its place (the store compacted the history it was reading): whatever
    /// follows the store must read it whole again.
    Resync,
}

/// Whether a store's writes succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteHealth {
    Writable,
    /// Writes fail; `why` names the cause and the file or disk ("the disk holding … is
    /// full").
    Unwritable {
        why: String,
    },
}

/// A durable map of tables. Every method is atomic on its own; `apply` is atomic for the
/// whole batch.
#[async_trait::async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    async fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    async fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    async fn apply(&self, table: Table, ops: Vec<Op>) -> Result<(), StoreError>;
    /// Writes `value` under `key` only if `key` is absent; returns whether it wrote.
    async fn insert_if_absent(
        &self,
        table: Table,
        key: &str,
        value: Vec<u8>,
    ) -> Result<bool, StoreError>;
    /// A short name for logs and metrics (`"embedded"`).
    fn kind(&self) -> &'static str;

    /// Follows whether writes succeed. A store that cannot lose its writability on its own
    /// keeps the default: always writable.
    fn write_health(&self) -> tokio::sync::watch::Receiver<WriteHealth> {
        tokio::sync::watch::channel(WriteHealth::Writable).1
    }

    /// Tries to make an unwritable store writable again (reopening it, say); `Ok` once
    /// writes succeed.
    async fn recover(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Writes VIP allocations. On a shared store each write is conditional (see
    /// [`VipWrite`]), and the hostnames of those whose condition failed are returned, not
    /// written: another registry of the set got there first. A store only this registry
    /// writes takes them all in one batch (the registry's writer lock already keeps
    /// addresses unique).
    async fn write_vips(&self, writes: Vec<VipWrite>) -> Result<Vec<String>, StoreError> {
        self.apply(Table::Vips, writes.iter().map(VipWrite::op).collect())
            .await
            .map(|()| Vec::new())
    }

    /// Whether several registries share this store (each then writes only what it holds,
    /// and follows the rest).
    fn shared(&self) -> bool {
        false
    }

    /// Writes entries this registry holds for as long as it lives (VM registrations). On a
    /// shared store a put is attached to this registry's lease, so its entries vanish with
    /// it when it stops renewing (a crash), and a delete removes an entry only while this
    /// registry holds it: one another registry took over stays. Returns the keys not
    /// deleted for that reason. Elsewhere the same as `apply`.
    async fn apply_held(&self, table: Table, ops: Vec<Op>) -> Result<Vec<String>, StoreError> {
        self.apply(table, ops).await.map(|()| Vec::new())
    }

    /// On a shared store: a number that changes each time this registry's lease was lost
    /// and replaced (etcd unreachable past its TTL), after which the entries it holds must
    /// be written again. `None` elsewhere.
    fn lease_generation(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// For a store several registries share: every change to the catalog and VIP tables,
    /// this registry's own included, in the store's order, starting just after what the
    /// first `list` read. `None` for a store only this registry writes (the default).
    fn follow(&self) -> Option<tokio::sync::mpsc::Receiver<StoreChange>> {
        None
    }

    /// Whether a change the feed reports at `revision` is already in this registry's views:
    /// it is this registry's own write of `key`, or older than that write.
    fn superseded(&self, _table: Table, _key: &str, _revision: i64) -> bool {
        false
    }

    async fn put(&self, table: Table, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.apply(table, vec![Op::Put(key.to_string(), value)])
            .await
    }

    async fn delete(&self, table: Table, key: &str) -> Result<(), StoreError> {
        self.apply(table, vec![Op::Delete(key.to_string())]).await
    }
}
