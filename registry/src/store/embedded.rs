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
    /// Opens the store in `dir`, creating it when there is none. A store file that is there
    /// but cannot be trusted (empty, truncated, overwritten) is refused and left as it is:
    /// replacing it with a fresh store would silently make spent bootstrap tokens usable
    /// again and hand out VIPs anew.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(DB_FILE);
        let shown = path.display().to_string();
        let open_err = |why: String| StoreError::Open {
            path: shown.clone(),
            why,
        };
        let damaged = |why: String| StoreError::Damaged {
            path: shown.clone(),
            why,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        let builder = || {
            let mut b = redb::Builder::new();
            b.set_cache_size(CACHE_BYTES);
            b
        };
        let db = match std::fs::metadata(&path) {
            Ok(md) if md.len() == 0 => {
                return Err(damaged(
                    "it is empty (0 bytes), as an interrupted copy or a full disk can leave it"
                        .into(),
                ))
            }
            Ok(_) => {
                // Opened first, so that the file is locked against another registry while
                // it is checked; redb panics on some damaged files (a truncated one, say)
                // instead of returning an error, which would be a crash loop under systemd.
                let db = match std::panic::catch_unwind(|| builder().open(&path)) {
                    Ok(Ok(db)) => db,
                    Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => {
                        return Err(open_err("the database is already open".into()))
                    }
                    Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(e))))
                        if e.kind() != std::io::ErrorKind::InvalidData =>
                    {
                        return Err(open_err(e.to_string()))
                    }
                    Ok(Err(e)) => {
                        return Err(damaged(format!(
                            "it is not a store the registry can read ({e})"
                        )))
                    }
                    Err(_) => return Err(damaged(PANICKED.into())),
                };
                // Checked on a copy, so that checking never writes to the store itself.
                check_copy(&path).map_err(damaged)?;
                db
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => builder()
                .create(&path)
                .map_err(|e| open_err(e.to_string()))?,
            Err(e) => return Err(open_err(e.to_string())),
        };
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

const PANICKED: &str = "the database library could not read it (see the message above)";

/// Checks a copy of the store file at `path`: it opens, every row reads, a write commits and
/// redb's integrity check passes. redb panics on some damaged files (a truncated one, say)
/// instead of returning an error, which would be a crash loop under systemd; a panic here is
/// read as damage. The copy is removed afterwards.
fn check_copy(path: &Path) -> Result<(), String> {
    let copy = path.with_extension("redb.check");
    std::fs::copy(path, &copy).map_err(|e| format!("cannot copy it to check it: {e}"))?;
    let checked = std::panic::catch_unwind(|| -> Result<(), String> {
        let mut db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .open(&copy)
            .map_err(|e| e.to_string())?;
        read_everything(&db)?;
        let tx = db.begin_write().map_err(|e| e.to_string())?;
        for t in Table::ALL {
            tx.open_table(def(t)).map_err(|e| e.to_string())?;
        }
        tx.commit().map_err(|e| e.to_string())?;
        match db.check_integrity() {
            Ok(true) => Ok(()),
            Ok(false) => Err("it fails the database's integrity check".into()),
            Err(e) => Err(e.to_string()),
        }
    });
    let _ = std::fs::remove_file(&copy);
    match checked {
        Ok(result) => result,
        Err(_) => Err(PANICKED.into()),
    }
}

/// Reads every row of every table that exists.
fn read_everything(db: &Database) -> Result<(), String> {
    let tx = db.begin_read().map_err(|e| e.to_string())?;
    for t in Table::ALL {
        let table = match tx.open_table(def(t)) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => continue,
            Err(e) => return Err(format!("table {}: {e}", t.name())),
        };
        for row in table
            .iter()
            .map_err(|e| format!("table {}: {e}", t.name()))?
        {
            let (k, v) = row.map_err(|e| format!("table {}: {e}", t.name()))?;
            std::hint::black_box((k.value().len(), v.value().len()));
        }
    }
    Ok(())
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

    /// A store with a sample in it, closed; returns its file's bytes.
    async fn written_store(dir: &Path) -> Vec<u8> {
        {
            let store = EmbeddedStore::open(dir).unwrap();
            crate::store::battery::write_durable_sample(&store).await;
        }
        std::fs::read(dir.join(DB_FILE)).unwrap()
    }

    #[tokio::test]
    async fn a_damaged_store_is_refused_naming_the_file_and_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let good = written_store(dir.path()).await;
        let file = dir.path().join(DB_FILE);
        let mut padded = good[..good.len() / 2].to_vec();
        padded.resize(good.len(), 0);
        let mut garbage = good.clone();
        garbage[..512].fill(0x5a);
        for (what, bytes, needle) in [
            ("empty", Vec::new(), "it is empty (0 bytes)"),
            ("truncated", good[..good.len() / 3].to_vec(), "damaged"),
            ("zero-padded", padded, "damaged"),
            ("overwritten header", garbage, "damaged"),
        ] {
            std::fs::write(&file, &bytes).unwrap();
            let err = EmbeddedStore::open(dir.path())
                .map(|_| ())
                .expect_err(what)
                .to_string();
            assert!(
                err.contains(&file.display().to_string())
                    && err.contains(needle)
                    && err.contains("Restore it from a backup"),
                "{what}: {err}"
            );
            assert_eq!(
                std::fs::read(&file).unwrap(),
                bytes,
                "{what}: the file was changed"
            );
        }
        // The good bytes back: it opens, with its contents.
        std::fs::write(&file, &good).unwrap();
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
