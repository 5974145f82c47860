//! The embedded store: one redb file in `--data-dir`.
//!
//! redb is a pure-Rust, ACID, copy-on-write B-tree database in a single file, actively
//! maintained, with no C dependencies and no background compaction threads: a registry
//! gets durable state with nothing to install or operate. Each commit is fsync'd, so a
//! redeemed token is on disk before the certificate it paid for is returned.

// redb's own error is large (160 bytes); it only travels from a blocking call to the
// store's method that turns it into a `StoreError`, once per operation.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::watch;

use super::backend::{Op, Store, StoreError, Table, WriteHealth};

pub const DB_FILE: &str = "isthmus.redb";
/// redb's page cache. The catalog lives in memory anyway (the store is read at start and
/// written through), so a small cache is enough and keeps the registry's footprint honest.
pub const CACHE_BYTES: usize = 32 * 1024 * 1024;
/// How often an unwritable store is reopened to see whether writes succeed again. After one
/// failed write (a full disk, say) redb refuses every later operation until the database
/// is opened anew.
pub const RECOVERY_INTERVAL: Duration = Duration::from_secs(2);
/// What a recovery writes beside the store (and removes) to see that the disk takes writes
/// again: a few of redb's pages' worth, so that a disk with room for a header but not for
/// a commit is not taken for a recovered one.
const PROBE_BYTES: usize = 256 * 1024;

fn def(table: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(table.name())
}

fn builder() -> redb::Builder {
    let mut b = redb::Builder::new();
    b.set_cache_size(CACHE_BYTES);
    b
}

#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    /// `None` between closing a failed database and opening it again.
    db: RwLock<Option<Database>>,
    health: watch::Sender<WriteHealth>,
    /// When a reopen was last tried, so that refused writes do not reopen the file each time.
    last_recovery: Mutex<Option<Instant>>,
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
                match check_copy(&path) {
                    Ok(()) => {}
                    Err(CheckFailure::Copy(e)) => {
                        return Err(open_err(format!(
                            "cannot copy it to check it: {}",
                            describe_io(&e, &path)
                        )))
                    }
                    Err(CheckFailure::Damage(why)) => return Err(damaged(why)),
                }
                db
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => builder()
                .create(&path)
                .map_err(|e| open_err(e.to_string()))?,
            Err(e) => return Err(open_err(e.to_string())),
        };
        // Create every table up front so that reads never meet a missing table.
        create_tables(&db).map_err(|e| open_err(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                db: RwLock::new(Some(db)),
                health: watch::channel(WriteHealth::Writable).0,
                last_recovery: Mutex::new(None),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn blocking<T, F>(
        &self,
        op: &'static str,
        table: Table,
        write: bool,
        f: F,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, redb::Error> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.run(op, table, write, f))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

impl Inner {
    /// Runs `f` on the database. While writes fail, a write is refused at once (after a
    /// reopen, when one is due); a failure of the disk under `f` makes the store unwritable.
    fn run<T>(
        &self,
        op: &'static str,
        table: Table,
        write: bool,
        f: impl FnOnce(&Database) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        if !self.is_writable() && self.recovery_due() {
            let _ = self.reopen();
        }
        if write && !self.is_writable() {
            return Err(self.unwritable());
        }
        let db = self.db.read().unwrap_or_else(|p| p.into_inner());
        let Some(db) = db.as_ref() else {
            return Err(self.unwritable());
        };
        f(db).map_err(|e| match disk_failure(&e, &self.path) {
            Some(why) => {
                self.mark_unwritable(why);
                self.unwritable()
            }
            None => StoreError::Backend {
                op,
                table,
                why: e.to_string(),
            },
        })
    }

    fn is_writable(&self) -> bool {
        matches!(*self.health.borrow(), WriteHealth::Writable)
    }

    fn recovery_due(&self) -> bool {
        let last = self.last_recovery.lock().unwrap_or_else(|p| p.into_inner());
        last.is_none_or(|at| at.elapsed() >= RECOVERY_INTERVAL)
    }

    fn mark_unwritable(&self, why: String) {
        self.health.send_if_modified(|h| match h {
            // The first cause stays: what follows ("previous I/O error") only repeats it.
            WriteHealth::Unwritable { .. } => false,
            WriteHealth::Writable => {
                *h = WriteHealth::Unwritable { why };
                true
            }
        });
    }

    fn unwritable(&self) -> StoreError {
        let why = match &*self.health.borrow() {
            WriteHealth::Unwritable { why } => why.clone(),
            WriteHealth::Writable => "the database is being reopened".to_string(),
        };
        StoreError::Unwritable {
            path: self.path.display().to_string(),
            why,
            retry_s: RECOVERY_INTERVAL.as_secs(),
        }
    }

    /// Closes the database and opens it again (redb refuses everything after one failed
    /// write until then), then checks that the disk takes a write. Writable again on
    /// success; the cause of the failure otherwise.
    fn reopen(&self) -> Result<(), StoreError> {
        *self.last_recovery.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        // The old one goes first: the file is locked by whichever database has it open.
        *slot = None;
        let failed = |why: String| {
            self.health
                .send_replace(WriteHealth::Unwritable { why: why.clone() });
            self.unwritable()
        };
        probe_disk(&self.path).map_err(|e| failed(describe_io(&e, &self.path)))?;
        let path = self.path.clone();
        let db = match std::panic::catch_unwind(move || builder().open(&path)) {
            Ok(Ok(db)) => db,
            Ok(Err(e)) => {
                let e = redb::Error::from(e);
                let why = disk_failure(&e, &self.path)
                    .unwrap_or_else(|| format!("it cannot be opened again ({e})"));
                return Err(failed(why));
            }
            Err(_) => return Err(failed(PANICKED.into())),
        };
        let committed = create_tables(&db);
        *slot = Some(db);
        match committed {
            Ok(()) => {
                self.health.send_replace(WriteHealth::Writable);
                Ok(())
            }
            Err(e) => {
                let why = disk_failure(&e, &self.path).unwrap_or_else(|| e.to_string());
                Err(failed(why))
            }
        }
    }
}

/// Creates every table that is missing, in one commit.
fn create_tables(db: &Database) -> Result<(), redb::Error> {
    let tx = db.begin_write()?;
    for t in Table::ALL {
        tx.open_table(def(t))?;
    }
    tx.commit()?;
    Ok(())
}

/// Writes [`PROBE_BYTES`] beside the store, syncs and removes them.
fn probe_disk(store: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let probe = store.with_extension("redb.probe");
    let written = std::fs::File::create(&probe).and_then(|mut f| {
        f.write_all(&vec![0u8; PROBE_BYTES])?;
        f.sync_all()
    });
    let _ = std::fs::remove_file(&probe);
    written
}

/// The operator's words for a failure of the disk under the store (`None` when `e` is not
/// one): a full disk or quota names the filesystem to free space on.
fn disk_failure(e: &redb::Error, path: &Path) -> Option<String> {
    match e {
        redb::Error::Io(io) => Some(describe_io(io, path)),
        redb::Error::PreviousIo => {
            Some("an earlier write failed and the database must be reopened (an I/O error)".into())
        }
        _ => None,
    }
}

fn describe_io(e: &std::io::Error, path: &Path) -> String {
    let dir = path.parent().unwrap_or(path).display();
    match e.kind() {
        std::io::ErrorKind::StorageFull => {
            format!("the disk holding {dir} is full ({e}): free space on it")
        }
        std::io::ErrorKind::QuotaExceeded => {
            format!("the disk quota for {dir} is exhausted ({e}): free space or raise the quota")
        }
        _ => format!("I/O error on {dir} ({e})"),
    }
}

const PANICKED: &str = "the database library could not read it (see the message above)";

/// Checks a copy of the store file at `path`: it opens, every row reads, a write commits and
/// redb's integrity check passes. redb panics on some damaged files (a truncated one, say)
/// instead of returning an error, which would be a crash loop under systemd; a panic here is
/// read as damage. The copy is removed afterwards.
fn check_copy(path: &Path) -> Result<(), CheckFailure> {
    let copy = path.with_extension("redb.check");
    if let Err(e) = std::fs::copy(path, &copy) {
        let _ = std::fs::remove_file(&copy);
        return Err(CheckFailure::Copy(e));
    }
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
        Ok(result) => result.map_err(CheckFailure::Damage),
        Err(_) => Err(CheckFailure::Damage(PANICKED.into())),
    }
}

/// Why [`check_copy`] failed: the copy could not be made (a full disk is not a damaged
/// store), or the store is damaged.
enum CheckFailure {
    Copy(std::io::Error),
    Damage(String),
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

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_string();
        self.blocking("get", table, false, move |db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(def(table))?;
            let v = t.get(key.as_str())?;
            Ok(v.map(|v| v.value().to_vec()))
        })
        .await
    }

    async fn list(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.blocking("list", table, false, move |db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(def(table))?;
            let mut out = Vec::new();
            for item in t.iter()? {
                let (k, v) = item?;
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
        self.blocking("apply", table, true, move |db| {
            let tx = db.begin_write()?;
            {
                let mut t = tx.open_table(def(table))?;
                for op in &ops {
                    match op {
                        Op::Put(k, v) => {
                            t.insert(k.as_str(), v.as_slice())?;
                        }
                        Op::Delete(k) => {
                            t.remove(k.as_str())?;
                        }
                    }
                }
            }
            tx.commit()?;
            Ok(())
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
        self.blocking("insert_if_absent", table, true, move |db| {
            // redb serialises write transactions, so check-then-insert inside one is atomic.
            let tx = db.begin_write()?;
            let wrote = {
                let mut t = tx.open_table(def(table))?;
                let exists = t.get(key.as_str())?.is_some();
                if !exists {
                    t.insert(key.as_str(), value.as_slice())?;
                }
                !exists
            };
            tx.commit()?;
            Ok(wrote)
        })
        .await
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn write_health(&self) -> watch::Receiver<WriteHealth> {
        self.inner.health.subscribe()
    }

    async fn recover(&self) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            if inner.is_writable() {
                Ok(())
            } else {
                inner.reopen()
            }
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
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
