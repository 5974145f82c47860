//! The embedded store: one redb file in `--data-dir`.
//!
//! redb is a pure-Rust, ACID, copy-on-write B-tree database in a single file, actively
//! maintained, with no C dependencies and no background compaction threads: a registry
//! gets durable state with nothing to install or operate. Each commit is fsync'd, so a
//! redeemed token is on disk before the certificate it paid for is returned.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition};

use super::backend::{Op, Store, StoreError, Table};

pub const DB_FILE: &str = "isthmus.redb";
/// redb's page cache. The catalog lives in memory anyway (the store is read at start and
/// written through), so a small cache is enough and keeps the registry's footprint honest.
pub const CACHE_BYTES: usize = 32 * 1024 * 1024;

fn def(table: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(table.name())
}

#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(DB_FILE);
        let open_err = |why: String| StoreError::Open {
            path: path.display().to_string(),
            why,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| open_err(e.to_string()))?;
        // Create every table up front so that reads never meet a missing table.
        let tx = db.begin_write().map_err(|e| open_err(e.to_string()))?;
        for t in Table::ALL {
            tx.open_table(def(t)).map_err(|e| open_err(e.to_string()))?;
        }
        tx.commit().map_err(|e| open_err(e.to_string()))?;
        Ok(Self {
            db: Arc::new(db),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

fn backend(op: &'static str, table: Table) -> impl Fn(String) -> StoreError {
    move |why| StoreError::Backend { op, table, why }
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_string();
        self.blocking(move |db| {
            let e = backend("get", table);
            let tx = db.begin_read().map_err(|x| e(x.to_string()))?;
            let t = tx.open_table(def(table)).map_err(|x| e(x.to_string()))?;
            let v = t.get(key.as_str()).map_err(|x| e(x.to_string()))?;
            Ok(v.map(|v| v.value().to_vec()))
        })
        .await
    }

    async fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.blocking(move |db| {
            let e = backend("list", table);
            let tx = db.begin_read().map_err(|x| e(x.to_string()))?;
            let t = tx.open_table(def(table)).map_err(|x| e(x.to_string()))?;
            let mut out = Vec::new();
            for item in t.iter().map_err(|x| e(x.to_string()))? {
                let (k, v) = item.map_err(|x| e(x.to_string()))?;
                out.push((k.value().to_string(), v.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }

    async fn apply(&self, table: Table, ops: Vec<Op>) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        self.blocking(move |db| {
            let e = backend("apply", table);
            let tx = db.begin_write().map_err(|x| e(x.to_string()))?;
            {
                let mut t = tx.open_table(def(table)).map_err(|x| e(x.to_string()))?;
                for op in &ops {
                    match op {
                        Op::Put(k, v) => {
                            t.insert(k.as_str(), v.as_slice())
                                .map_err(|x| e(x.to_string()))?;
                        }
                        Op::Delete(k) => {
                            t.remove(k.as_str()).map_err(|x| e(x.to_string()))?;
                        }
                    }
                }
            }
            tx.commit().map_err(|x| e(x.to_string()))
        })
        .await
    }

    async fn insert_if_absent(
        &self,
        table: Table,
        key: &str,
        value: Vec<u8>,
    ) -> Result<bool, StoreError> {
        let key = key.to_string();
        self.blocking(move |db| {
            let e = backend("insert_if_absent", table);
            // redb serialises write transactions, so check-then-insert inside one is atomic.
            let tx = db.begin_write().map_err(|x| e(x.to_string()))?;
            let wrote = {
                let mut t = tx.open_table(def(table)).map_err(|x| e(x.to_string()))?;
                let exists = t.get(key.as_str()).map_err(|x| e(x.to_string()))?.is_some();
                if !exists {
                    t.insert(key.as_str(), value.as_slice())
                        .map_err(|x| e(x.to_string()))?;
                }
                !exists
            };
            tx.commit().map_err(|x| e(x.to_string()))?;
            Ok(wrote)
        })
        .await
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn battery() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        crate::store::battery::run(&store).await;
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            crate::store::battery::write_durable_sample(&store).await;
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        crate::store::battery::check_durable_sample(&store).await;
    }

    #[test]
    fn second_open_of_the_same_dir_is_refused_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let _first = EmbeddedStore::open(dir.path()).unwrap();
        let err = EmbeddedStore::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("--data-dir"), "{err}");
    }
}

#[cfg(test)]
mod race {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_redeemers_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(super::EmbeddedStore::open(dir.path()).unwrap());
        crate::store::battery::concurrent_insert_if_absent(store).await;
    }
}
