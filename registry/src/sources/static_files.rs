//! The static source: a directory of YAML manifests (Istio's `ServiceEntry`, `WorkloadEntry`,
//! `WorkloadGroup`, `DestinationRule` and `VirtualService`, and isthmus' `Network`) that an
//! operator edits by hand or mounts from a ConfigMap. It owns turning those files into
//! catalog resources, keeping the last good version of each file when an edit breaks it, and
//! refusing the same resource from two files.
//!
//! The directory is polled rather than watched with inotify. A ConfigMap volume updates by
//! writing a new hidden directory and swapping the `..data` symlink; watches on the old files
//! then see nothing, and editors that save by rename defeat them in the same way. Polling
//! `stat` is cheap and sees every kind of swap: a file is re-read only when its size, mtime or
//! inode moves (or its mtime is too recent to trust), and re-parsed only when its content
//! hash does.

mod manifest;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use isthmus_proto::model::{OwnedResource, Resource};
use tracing::{info, warn};

use manifest::{FileReading, Located, Outcome};
pub use manifest::{ResourceError, SourceDefaults};

/// Every resource from this source has an origin `static:<path relative to the directory>`.
pub const ORIGIN_PREFIX: &str = "static:";

/// How often the registry should call [`StaticSource::scan`]: a ConfigMap update reaches the
/// volume within about a minute anyway, so a couple of seconds adds nothing an operator notices.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Files above this size are refused unread: a catalog file is kilobytes, and a runaway
/// generator should not take the registry's memory with it.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// A file whose mtime is this close to the moment we read it may be written again within the
/// same mtime tick without its size changing; such a file is re-read (and hashed) on the next
/// scan instead of trusted (git's "racy clean" problem).
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// Parses one file's text into model resources, or every error found in it (all of them, not
/// just the first). The source itself takes a file document by document (see
/// [`read_file`]); this is the strict reading `--validate` and the tests use for one file.
pub fn parse_file(
    path: &Path,
    text: &str,
    defaults: &SourceDefaults,
) -> Result<Vec<Resource>, Vec<ResourceError>> {
    let reading = manifest::parse(path, text, defaults);
    let errors = reading.errors();
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(reading
        .located
        .into_iter()
        .map(|l| Arc::unwrap_or_clone(l.resource))
        .collect())
}

/// One file's reading, document by document: what loaded, what was ignored (kinds isthmus
/// does not read) and what was refused, with why.
pub fn read_file(path: &Path, text: &str, defaults: &SourceDefaults) -> Vec<DocumentSummary> {
    summaries(&manifest::parse(path, text, defaults))
}

fn summaries(reading: &FileReading) -> Vec<DocumentSummary> {
    reading
        .documents
        .iter()
        .map(|d| DocumentSummary {
            document: d.document,
            item: d.item,
            object: d.object.clone(),
            outcome: match &d.outcome {
                Outcome::Loaded {
                    resources,
                    warnings,
                } => DocumentOutcome::Loaded {
                    resources: *resources,
                    warnings: warnings.clone(),
                },
                Outcome::Ignored(why) => DocumentOutcome::Ignored {
                    reason: why.clone(),
                },
                Outcome::Refused(errors) => DocumentOutcome::Refused {
                    errors: errors.clone(),
                },
            },
        })
        .collect()
}

/// What became of one document of a file (or one item of a `List`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentSummary {
    /// 1-based position of the document in its file.
    pub document: usize,
    /// The item's index inside a `List` document.
    pub item: Option<usize>,
    /// `kind namespace/name`, as far as the document says.
    pub object: String,
    pub outcome: DocumentOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DocumentOutcome {
    /// Loaded, with what Istio's validation would warn about.
    Loaded {
        resources: usize,
        warnings: Vec<ResourceError>,
    },
    /// A kind isthmus does not read; the reason says which and what it reads.
    Ignored {
        reason: String,
    },
    Refused {
        errors: Vec<ResourceError>,
    },
}

impl DocumentSummary {
    /// `document 2` or `document 2, items[3]`.
    pub fn position(&self) -> String {
        match self.item {
            Some(i) => format!("document {}, items[{i}]", self.document),
            None => format!("document {}", self.document),
        }
    }
}

fn file_error(path: &Path, message: String) -> ResourceError {
    ResourceError {
        file: path.to_path_buf(),
        document: None,
        field: String::new(),
        message,
    }
}

/// What one [`StaticSource::scan`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanResult {
    /// Whether [`StaticSource::resources`] differs from before the scan.
    pub changed: bool,
    /// Every current problem, including those of files that did not change.
    pub errors: Vec<ResourceError>,
    /// Every document currently ignored (a kind isthmus does not read), in every file.
    pub ignored: Vec<IgnoredDocument>,
    /// What Istio's validation would warn about in the documents that loaded.
    pub warnings: Vec<ResourceError>,
}

/// A document the source does not read, and why; Display is "FILE (document N): OBJECT:
/// ignored: REASON".
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IgnoredDocument {
    pub file: PathBuf,
    /// `document 2`, or `document 2, items[3]` inside a `List`.
    pub position: String,
    /// `kind namespace/name`, as far as the document says.
    pub object: String,
    pub reason: String,
}

impl std::fmt::Display for IgnoredDocument {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}: ignored: {}",
            self.file.display(),
            self.position,
            self.object,
            self.reason
        )
    }
}

/// The static source. Synchronous and free of timers: the registry calls [`Self::scan`] every
/// [`POLL_INTERVAL`] from a blocking task.
#[derive(Debug)]
pub struct StaticSource {
    dir: PathBuf,
    defaults: SourceDefaults,
    /// Keyed by path relative to `dir`.
    files: BTreeMap<PathBuf, FileState>,
    /// Store-provided resources per file, consulted only during the first scan.
    seeded: BTreeMap<PathBuf, Vec<Located>>,
    scanned: bool,
    /// Catalog key -> the file that holds it; lets the first holder keep a contested key.
    owners: BTreeMap<String, PathBuf>,
    effective: BTreeMap<String, OwnedResource>,
    duplicate_errors: Vec<ResourceError>,
    /// Workloads on a network no Network resource (and not the registry's own) defines.
    network_warnings: Vec<ResourceError>,
    errors: Vec<ResourceError>,
}

#[derive(Debug, Default)]
struct FileState {
    /// `None` when the file could not be read; the next scan then tries again.
    stamp: Option<Stamp>,
    read_at: Option<SystemTime>,
    hash: Option<[u8; 32]>,
    /// The resources in force from this file: those of its documents that loaded, plus,
    /// while any document is refused, what it defined before that no loaded document defines.
    good: Option<Vec<Located>>,
    errors: Vec<ResourceError>,
    /// What the last reading made of each document; empty when the file could not be read.
    documents: Vec<DocumentSummary>,
}

/// What `stat` says about a file; if none of it moved, neither did the content (see
/// [`RACY_WINDOW`] for the exception).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    /// A ConfigMap swap gives every file a new inode even when size and mtime match.
    inode: u64,
}

impl Stamp {
    fn of(md: &fs::Metadata) -> Self {
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(md);
        #[cfg(not(unix))]
        let inode = 0;
        Self {
            len: md.len(),
            modified: md.modified().ok(),
            inode,
        }
    }
}

impl FileState {
    /// Whether an unchanged stamp can be trusted to mean unchanged content.
    fn settled(&self, stamp: &Stamp) -> bool {
        match (stamp.modified, self.read_at) {
            (Some(modified), Some(read_at)) => read_at
                .duration_since(modified)
                .is_ok_and(|age| age >= RACY_WINDOW),
            _ => false,
        }
    }
}

impl StaticSource {
    pub fn new(dir: PathBuf, defaults: SourceDefaults) -> Self {
        Self {
            dir,
            defaults,
            files: BTreeMap::new(),
            seeded: BTreeMap::new(),
            scanned: false,
            owners: BTreeMap::new(),
            effective: BTreeMap::new(),
            duplicate_errors: Vec::new(),
            network_warnings: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// Seeds "last good" state (e.g. from the persistent store at startup): resources whose
    /// origin is this source's origin for a file; used only for files that are invalid on the
    /// first scan, so a registry restarted while a file is broken still serves what it served
    /// before. Resources of other origins are ignored, as is a call after the first scan.
    pub fn seed(&mut self, previous: Vec<OwnedResource>) {
        if self.scanned {
            warn!(
                dir = %self.dir.display(),
                "static source seeded after its first scan; ignoring the seed"
            );
            return;
        }
        for r in previous {
            let Some(rel) = r.origin.strip_prefix(ORIGIN_PREFIX) else {
                continue;
            };
            self.seeded
                .entry(PathBuf::from(rel))
                .or_default()
                .push(Located {
                    resource: r.resource,
                    document: None,
                    field: String::new(),
                });
        }
    }

    /// Re-reads the directory (cheap when nothing changed). A valid file replaces that file's
    /// resources; an invalid file keeps its last good resources and reports errors; a deleted
    /// file removes its resources. The same catalog key from two files is an error naming both
    /// files, and the file that had it first keeps it. An unreadable directory changes nothing:
    /// a volume that failed to mount must not empty the catalog.
    pub fn scan(&mut self) -> ScanResult {
        let now = SystemTime::now();
        let mut walk_errors = Vec::new();
        let mut dirty = !self.scanned;
        match walk(&self.dir) {
            Err(e) => walk_errors.push(file_error(
                &self.dir,
                format!("cannot read the directory: {e}; keeping the resources read before"),
            )),
            Ok(walked) => {
                for (rel, e) in &walked.unreadable {
                    walk_errors.push(file_error(
                        &self.dir.join(rel),
                        format!(
                            "cannot read the directory: {e}; \
                             keeping the resources read from it before"
                        ),
                    ));
                }
                for rel in &walked.files {
                    dirty |= self.refresh(rel, now);
                }
                let gone: Vec<PathBuf> = self
                    .files
                    .keys()
                    .filter(|rel| !walked.files.contains(*rel))
                    .filter(|rel| {
                        !walked
                            .unreadable
                            .iter()
                            .any(|(dir, _)| rel.starts_with(dir))
                    })
                    .cloned()
                    .collect();
                for rel in gone {
                    info!(
                        file = %self.dir.join(&rel).display(),
                        "static file removed; dropping its resources"
                    );
                    self.files.remove(&rel);
                    dirty = true;
                }
            }
        }
        if !self.scanned {
            self.scanned = true;
            self.seeded.clear();
        }
        let changed = dirty && self.recompute();

        let mut errors = walk_errors;
        errors.extend(self.files.values().flat_map(|f| f.errors.iter().cloned()));
        errors.extend(self.duplicate_errors.iter().cloned());
        errors.sort_by(|a, b| a.file.cmp(&b.file).then(a.document.cmp(&b.document)));
        for e in errors.iter().filter(|e| !self.errors.contains(e)) {
            warn!("{e}");
        }
        self.errors = errors;
        ScanResult {
            changed,
            errors: self.errors.clone(),
            ignored: self.ignored(),
            warnings: self.warnings(),
        }
    }

    /// Brings one file's state up to date; returns whether its resources may have changed.
    fn refresh(&mut self, rel: &Path, now: SystemTime) -> bool {
        let path = self.dir.join(rel);
        let state = self.files.entry(rel.to_path_buf()).or_default();
        let stamp = fs::metadata(&path).map(|md| Stamp::of(&md)).ok();
        if let (Some(stamp), Some(old)) = (stamp, state.stamp) {
            if stamp == old && state.settled(&stamp) {
                return false;
            }
        }
        let outcome = match read_bounded(&path) {
            Err(message) => {
                state.stamp = None;
                state.hash = None;
                Err(vec![file_error(&path, message)])
            }
            Ok(bytes) => {
                state.stamp = stamp;
                state.read_at = Some(now);
                let hash = sha256(&bytes);
                if state.hash == Some(hash) {
                    return false;
                }
                state.hash = Some(hash);
                match String::from_utf8(bytes) {
                    Err(e) => Err(vec![file_error(
                        &path,
                        format!(
                            "is not UTF-8 text (invalid byte at offset {})",
                            e.utf8_error().valid_up_to()
                        ),
                    )]),
                    // An empty file that had resources is most likely a torn or unfinished
                    // write: it is refused like an unreadable one (its last good state stays)
                    // and deleting the resources takes removing the file.
                    Ok(text) if text.trim().is_empty() && state.good.as_ref().is_some_and(|g| !g.is_empty()) => {
                        Err(vec![file_error(
                            &path,
                            format!(
                                "is empty (a torn or unfinished write?): its {} resources stay in force until it has content again; remove the file to delete them",
                                state.good.as_ref().map_or(0, |g| g.len())
                            ),
                        )])
                    }
                    Ok(text) => Ok(manifest::parse(&path, &text, &self.defaults)),
                }
            }
        };
        match outcome {
            Ok(reading) => {
                let errors = reading.errors();
                let documents = summaries(&reading);
                for d in documents.iter().filter(|d| !state.documents.contains(d)) {
                    match &d.outcome {
                        DocumentOutcome::Ignored { reason } => {
                            info!(file = %path.display(), document = %d.position(), "ignored: {reason}");
                        }
                        // Warnings are logged by whoever reads the scan, once each.
                        DocumentOutcome::Loaded { .. } | DocumentOutcome::Refused { .. } => {}
                    }
                }
                state.documents = documents;
                let mut good = reading.located;
                if errors.is_empty() {
                    if !state.errors.is_empty() {
                        info!(file = %path.display(), "static file is valid again");
                    }
                } else {
                    // A refused document may be an edit of one that loaded before: what the
                    // file defined before and no loaded document defines now stays in force
                    // until the file reads cleanly (deleting takes a file without errors).
                    let previous = state.good.take().or_else(|| self.seeded.remove(rel));
                    let defined: BTreeSet<String> = good.iter().map(|l| l.resource.key()).collect();
                    let kept: Vec<Located> = previous
                        .into_iter()
                        .flatten()
                        .filter(|l| !defined.contains(&l.resource.key()))
                        .collect();
                    if !kept.is_empty() {
                        warn!(
                            file = %path.display(),
                            resources = kept.len(),
                            "static file has refused documents; the resources it defined before \
                             that its valid documents do not define stay in force until it is fixed"
                        );
                    }
                    good.extend(kept);
                }
                info!(file = %path.display(), resources = good.len(), "static file loaded");
                state.errors = errors;
                state.good = Some(good);
                true
            }
            Err(errors) => {
                state.documents.clear();
                state.errors = errors;
                match (&state.good, self.seeded.remove(rel)) {
                    (None, Some(seed)) => {
                        warn!(
                            file = %path.display(),
                            resources = seed.len(),
                            "static file is invalid; serving its resources from the store until it is fixed"
                        );
                        state.good = Some(seed);
                        true
                    }
                    _ => false,
                }
            }
        }
    }

    /// Rebuilds the effective set from every file's good resources; returns whether it changed.
    fn recompute(&mut self) -> bool {
        let mut providers: BTreeMap<String, Vec<(&PathBuf, &Located)>> = BTreeMap::new();
        for (rel, file) in &self.files {
            for located in file.good.iter().flatten() {
                providers
                    .entry(located.resource.key())
                    .or_default()
                    .push((rel, located));
            }
        }
        let mut owners = BTreeMap::new();
        let mut effective = BTreeMap::new();
        let mut duplicates = Vec::new();
        // Documents that lost a key to another file: refused, so what else they define (a
        // ServiceEntry's inline endpoints, say) is not kept on its own either.
        let mut losing: BTreeSet<(&PathBuf, Option<usize>)> = BTreeSet::new();
        // Each key with the file that keeps it, and whether that file alone defines it.
        let mut kept: Vec<(String, &PathBuf, &Located, bool)> = Vec::new();
        for (key, list) in providers {
            let keeper = self
                .owners
                .get(&key)
                .and_then(|owner| list.iter().position(|(rel, _)| *rel == owner))
                .unwrap_or(0);
            let (owner, located) = list[keeper];
            for (i, (rel, other)) in list.iter().enumerate() {
                if i != keeper {
                    losing.insert((rel, other.document));
                    duplicates.push(ResourceError {
                        file: self.dir.join(rel),
                        document: other.document,
                        field: other.field.clone(),
                        message: format!(
                            "{key} is also defined in {}, which keeps it; remove one of the two \
                             (nothing else of this document is taken either)",
                            self.dir.join(owner).display()
                        ),
                    });
                }
            }
            kept.push((key, owner, located, list.len() == 1));
        }
        for (key, owner, located, alone) in kept {
            // A key only a losing document defines goes with that document.
            if alone && located.document.is_some() && losing.contains(&(owner, located.document)) {
                continue;
            }
            effective.insert(
                key.clone(),
                OwnedResource {
                    origin: origin(owner),
                    resource: located.resource.clone(),
                },
            );
            owners.insert(key, owner.clone());
        }
        let changed = effective != self.effective;
        self.effective = effective;
        self.owners = owners;
        self.duplicate_errors = duplicates;
        self.network_warnings = self.unknown_networks();
        changed
    }

    /// The effective resources, each with origin `static:<path relative to dir>`.
    pub fn resources(&self) -> Vec<OwnedResource> {
        self.effective.values().cloned().collect()
    }

    pub fn errors(&self) -> &[ResourceError] {
        &self.errors
    }

    /// What the last reading of each file made of each of its documents, by file path.
    pub fn documents(&self) -> Vec<(PathBuf, DocumentSummary)> {
        self.files
            .iter()
            .flat_map(|(rel, f)| {
                f.documents
                    .iter()
                    .map(move |d| (self.dir.join(rel), d.clone()))
            })
            .collect()
    }

    fn warnings(&self) -> Vec<ResourceError> {
        self.files
            .values()
            .flat_map(|f| &f.documents)
            .flat_map(|d| match &d.outcome {
                DocumentOutcome::Loaded { warnings, .. } => warnings.clone(),
                _ => Vec::new(),
            })
            .chain(self.network_warnings.iter().cloned())
            .collect()
    }

    /// Workloads on a network nothing defines, as of the last scan (see
    /// [`Self::unknown_networks`]).
    pub fn network_warnings(&self) -> &[ResourceError] {
        &self.network_warnings
    }

    /// A warning for each workload on a network that neither a Network resource of this
    /// source nor the registry's own `--network` names: nothing routes to it from other
    /// networks (most likely a typo in `network` or `topology.istio.io/network`).
    fn unknown_networks(&self) -> Vec<ResourceError> {
        let known: BTreeSet<&str> = self
            .effective
            .values()
            .filter_map(|r| match &*r.resource {
                Resource::Network(n) => Some(n.id.as_str()),
                _ => None,
            })
            .chain([self.defaults.network.as_str()])
            .collect();
        let mut out = Vec::new();
        for (rel, file) in &self.files {
            for l in file.good.iter().flatten() {
                let Resource::Workload(w) = &*l.resource else {
                    continue;
                };
                if known.contains(w.network.as_str()) {
                    continue;
                }
                out.push(ResourceError {
                    file: self.dir.join(rel),
                    document: l.document,
                    field: l.field.clone(),
                    message: format!(
                        "workload {}/{} is on network {:?}, which no Network resource defines \
                         (known: {}): it is unreachable from other networks",
                        w.namespace,
                        w.name,
                        w.network,
                        known.iter().copied().collect::<Vec<_>>().join(", ")
                    ),
                });
            }
        }
        out
    }

    fn ignored(&self) -> Vec<IgnoredDocument> {
        self.documents()
            .into_iter()
            .filter_map(|(file, d)| match &d.outcome {
                DocumentOutcome::Ignored { reason } => Some(IgnoredDocument {
                    position: d.position(),
                    object: d.object.clone(),
                    reason: reason.clone(),
                    file,
                }),
                _ => None,
            })
            .collect()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn origin(rel: &Path) -> String {
    format!("{ORIGIN_PREFIX}{}", rel.display())
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    let file = fs::File::open(path)
        .map_err(|e| format!("cannot read the file: {e}; keeping the resources read before"))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the file: {e}; keeping the resources read before"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "is larger than {MAX_FILE_BYTES} bytes; split it into several files"
        ));
    }
    Ok(bytes)
}

struct Walk {
    /// Manifest files, relative to the root.
    files: BTreeSet<PathBuf>,
    /// Subdirectories that could not be listed, relative to the root; their files are kept.
    unreadable: Vec<(PathBuf, io::Error)>,
}

/// Lists the manifests under `root`: `.yaml`/`.yml` files, recursively, following symlinks,
/// skipping hidden entries. Skipping hidden entries is also what keeps a ConfigMap volume's
/// `..data` and `..<timestamp>` directories from being read a second time. Errs only when
/// `root` itself cannot be listed.
fn walk(root: &Path) -> io::Result<Walk> {
    let mut walked = Walk {
        files: BTreeSet::new(),
        unreadable: Vec::new(),
    };
    // Symlinked directories can form a loop; each real directory is listed once.
    let mut visited = BTreeSet::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        let dir = root.join(&rel);
        if let Ok(real) = fs::canonicalize(&dir) {
            if !visited.insert(real) {
                continue;
            }
        }
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if rel.as_os_str().is_empty() => return Err(e),
            Err(e) => {
                walked.unreadable.push((rel, e));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    walked.unreadable.push((rel.clone(), e));
                    continue;
                }
            };
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let child = rel.join(&name);
            match fs::metadata(entry.path()) {
                Ok(md) if md.is_dir() => pending.push(child),
                // Reading a FIFO or a device would block the scan or never end.
                Ok(md) if !md.is_file() => {}
                // A dangling symlink named like a manifest is listed so that reading it reports
                // the problem, instead of the file silently vanishing from the catalog.
                _ if is_manifest(&child) => {
                    walked.files.insert(child);
                }
                _ => {}
            }
        }
    }
    Ok(walked)
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}
