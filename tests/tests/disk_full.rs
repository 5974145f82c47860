//! A full disk under the registry's store: writes are refused with a status that names the
//! disk, `/readyz` and a gauge say so, and once space is freed writes succeed again without
//! a restart. The store lives on a small tmpfs the test mounts (root only; skipped with a
//! message elsewhere, a failure under `CI=true`) and unmounts when it ends.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use isthmus_tests::{eventually, http_get, metric, yaml, TestRegistry, NETWORK};

/// A tmpfs of `size` mounted on a fresh directory, unmounted (lazily, so that a file still
/// open cannot keep it) on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        nix::mount::mount(
            Some("isthmus-test"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size},mode=0700").as_str()),
        )
        .expect("mount tmpfs");
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Whether the test can mount: root. Panics under `CI=true` when not.
fn can_mount(test: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: mounting a tmpfs needs root, and CI=true: run the tests as root");
    }
    eprintln!("SKIPPED: {test}: mounting a tmpfs needs root; set CI=true to make this a failure");
    false
}

/// Fills the filesystem of `dir` with one file until it takes no more; returns the file.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    for chunk in [64 * 1024, 4096, 512] {
        let block = vec![0xa5u8; chunk];
        while f.write_all(&block).is_ok() {}
    }
    let _ = f.sync_all();
    path
}

/// Redeems a fresh bootstrap token: a write of the store (the token is spent).
async fn redeem(reg: &TestRegistry, sa: &str) -> Result<(), tonic::Status> {
    reg.redeem(sa, reg.token("shop", sa, Duration::from_secs(600)))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_a_full_disk_refuses_writes_by_name_and_recovers_without_restart() {
    if !can_mount("disk_full") {
        return;
    }
    let disk = Tmpfs::mount("8m");
    let data_dir = disk.path().join("data");
    let mut reg = TestRegistry::start_with(&[], |cfg| cfg.data_dir = data_dir.clone())
        .await
        .unwrap();
    redeem(&reg, "before")
        .await
        .expect("a write before the disk fills");
    let (status, _) = http_get(reg.admin_addr(), "/readyz").await.unwrap();
    assert_eq!(status, 200);

    let filler = fill(disk.path());
    // A catalog file big enough that storing it needs pages the disk no longer has.
    let entries: Vec<String> = (0..3000)
        .map(|i| {
            yaml::workload(
                &format!("w-{i}"),
                "shop",
                "reviews",
                &format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256),
                NETWORK,
            )
        })
        .collect();
    reg.write_resource("big.yaml", &yaml::docs(&entries));

    // Writes are refused with a status that names the disk; readiness and the gauge say so.
    let refusal = eventually(Duration::from_secs(30), || async {
        redeem(&reg, "while-full").await.err()
    })
    .await
    .expect("a write on a full disk is refused");
    assert_eq!(refusal.code(), tonic::Code::Unavailable, "{refusal:?}");
    let message = refusal.message();
    assert!(
        message.contains("is full")
            && message.contains(&data_dir.display().to_string())
            && message.contains("writes are refused"),
        "{message}"
    );
    // Readiness follows the store's health in its own task: it says so at once on an idle
    // machine, a moment later on a busy one.
    let (status, body) = eventually(Duration::from_secs(10), || async {
        let (status, body) = http_get(reg.admin_addr(), "/readyz").await.ok()?;
        (status == 503).then_some((status, body))
    })
    .await
    .expect("/readyz says not ready while writes are refused");
    println!("refused: {message}\n/readyz: {status} {body}");
    assert!(
        body.contains("store writes") && body.contains("is full"),
        "{body}"
    );
    let m = reg.metrics().await;
    assert_eq!(
        metric(&m, "isthmus_registry_store_writable"),
        Some(0.0),
        "{m}"
    );
    // Reads and the rest keep serving: the CA's trust bundle and the admin port answer.
    assert!(reg
        .metrics()
        .await
        .contains("isthmus_registry_store_writable"));

    // Space back: ready again and writes succeed, with no restart.
    std::fs::remove_file(&filler).unwrap();
    let ready = eventually(Duration::from_secs(30), || async {
        let (status, _) = http_get(reg.admin_addr(), "/readyz").await.ok()?;
        (status == 200).then_some(())
    })
    .await;
    assert!(ready.is_some(), "ready again once space is freed");
    assert_eq!(
        metric(&reg.metrics().await, "isthmus_registry_store_writable"),
        Some(1.0)
    );
    redeem(&reg, "after")
        .await
        .expect("a write after space is freed");
    reg.stop().await;
}
