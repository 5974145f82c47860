//! The Kubernetes peers' binaries — kube-apiserver, kubectl and etcd, built from the Go
//! module in `tests/kube` into `<workspace>/target/kube` — found, and built when missing or
//! stale, once per test process.
//!
//! The build itself is `tests/kube/build.sh`, the one copy of the command `.ci/run` also
//! runs: it takes a file lock, skips the build when every binary is newer than the module's
//! inputs, and renames finished binaries into place, so parallel test binaries neither build
//! twice at once nor see a half-written file. Without `go` the Kubernetes tests are skipped
//! on a developer's machine (with a message saying why) and fail in CI (`CI` set); a failed
//! build fails them everywhere, with Go's own error.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The three binaries a [`super::KubeApi`] runs.
#[derive(Debug)]
pub struct Peers {
    pub apiserver: PathBuf,
    pub kubectl: PathBuf,
    pub etcd: PathBuf,
}

/// Why the peers cannot run.
#[derive(Debug, Clone)]
enum Unavailable {
    /// `go` is not installed and no binaries were built before.
    NoGo(String),
    /// `go` is there but the build failed.
    BuildFailed(String),
}

static PEERS: OnceLock<Result<Peers, Unavailable>> = OnceLock::new();

/// The workspace's root (the tests crate's parent).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the workspace")
        .to_path_buf()
}

/// Where the binaries are built.
pub fn bin_dir() -> PathBuf {
    workspace().join("target").join("kube")
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Whether the Kubernetes tests can run here. Builds the peers if needed (once per
/// process). `false`, after printing why, only when `go` is missing outside CI; a missing
/// `go` under `CI=true` or a failed build panics with the error. A Kubernetes test starts
/// with `if !kube::available() { return; }`.
pub fn available() -> bool {
    match ensure() {
        Ok(_) => true,
        Err(Unavailable::NoGo(why)) if !in_ci() => {
            eprintln!("SKIPPED: {why}; set CI=true to make this a failure");
            false
        }
        Err(Unavailable::NoGo(why)) => {
            panic!("{why} (CI is set, so this fails instead of skipping; .ci/run checks for go)")
        }
        Err(Unavailable::BuildFailed(why)) => panic!("{why}"),
    }
}

/// The built peers, or why there are none.
pub fn peers() -> anyhow::Result<&'static Peers> {
    match ensure() {
        Ok(p) => Ok(p),
        Err(Unavailable::NoGo(why) | Unavailable::BuildFailed(why)) => Err(anyhow::anyhow!(why)),
    }
}

fn ensure() -> &'static Result<Peers, Unavailable> {
    PEERS.get_or_init(build)
}

fn build() -> Result<Peers, Unavailable> {
    let dir = bin_dir();
    let peers = Peers {
        apiserver: dir.join("kube-apiserver"),
        kubectl: dir.join("kubectl"),
        etcd: dir.join("etcd"),
    };
    let script = workspace().join("tests/kube/build.sh");
    let started = std::time::Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .output()
        .map_err(|e| Unavailable::BuildFailed(format!("running {}: {e}", script.display())))?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    match out.status.code() {
        Some(0) => {
            let took = started.elapsed();
            if took.as_secs() >= 2 {
                eprintln!(
                    "built the Kubernetes peers into {} in {took:.0?}",
                    dir.display()
                );
            }
            Ok(peers)
        }
        // build.sh's "go is not installed".
        Some(127) => {
            let all_there = [&peers.apiserver, &peers.kubectl, &peers.etcd]
                .iter()
                .all(|p| p.is_file());
            if all_there && !in_ci() {
                eprintln!(
                    "warning: {stderr}; using the binaries already in {}, which may be stale",
                    dir.display()
                );
                Ok(peers)
            } else {
                Err(Unavailable::NoGo(stderr))
            }
        }
        _ => Err(Unavailable::BuildFailed(format!(
            "building the Kubernetes test peers ({} {}) failed ({}):\n{stderr}",
            script.display(),
            dir.display(),
            out.status
        ))),
    }
}
