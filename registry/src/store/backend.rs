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
}

impl Table {
    pub const ALL: [Table; 3] = [Table::Catalog, Table::RedeemedTokens, Table::Vips];

    pub fn name(&self) -> &'static str {
        match self {
            Table::Catalog => "catalog",
            Table::RedeemedTokens => "redeemed_tokens",
            Table::Vips => "vips",
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

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {why} (is another registry using this --data-dir?)")]
    Open { path: String, why: String },
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
    #[error("store task failed: {0}")]
    Task(String),
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

    async fn put(&self, table: Table, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.apply(table, vec![Op::Put(key.to_string(), value)])
            .await
    }

    async fn delete(&self, table: Table, key: &str) -> Result<(), StoreError> {
        self.apply(table, vec![Op::Delete(key.to_string())]).await
    }
}
