//! A real etcd cluster for the tests of the registry's etcd store: Debian's `etcd` (package
//! `etcd-server`), one or more members on loopback ports, data in a temporary directory.
//! Members can be stopped and started again (same ports, same data) to play an outage or a
//! lost member; every member is stopped by its PID when the cluster drops.
//!
//! Where `etcd` is not installed, [`EtcdCluster::start`] says so and returns `None`, except
//! under CI (`CI=true`), where it panics: `.ci/run` installs it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::process::{free_port, ServerProcess};
use super::registry::{eventually, http_get};

/// How long a member gets to report itself healthy.
const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    process: Option<ServerProcess>,
}

#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    bin: PathBuf,
    dir: tempfile::TempDir,
}

fn etcd_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
}

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

impl EtcdCluster {
    /// Starts a cluster of `size` members and waits until every one is healthy.
    pub async fn start(test: &str, size: usize) -> Option<EtcdCluster> {
        let Some(bin) = etcd_binary() else {
            assert!(
                !std::env::var("CI").is_ok_and(|v| v == "true"),
                "{test}: etcd is not installed, and CI=true: .ci/run installs Debian's etcd-server"
            );
            eprintln!(
                "SKIPPED: {test}: etcd is not installed (apt-get install etcd-server); set CI=true \
                 to make this a failure"
            );
            return None;
        };
        let members = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_addr(),
                peer: free_addr(),
                process: None,
            })
            .collect();
        let mut cluster = EtcdCluster {
            members,
            bin,
            dir: tempfile::tempdir().expect("temp dir"),
        };
        // Every member first: a member of a new cluster waits for its peers to be healthy.
        for i in 0..size {
            cluster.spawn(i);
        }
        for i in 0..size {
            cluster.wait_healthy(i).await;
        }
        Some(cluster)
    }

    /// The client URLs, as `--etcd-endpoints` takes them.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://{}", m.client))
            .collect()
    }

    fn spawn(&mut self, i: usize) {
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .expect("etcd log");
        let child = Command::new(&self.bin)
            .arg(format!("--name={}", m.name))
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join(&m.name).display()
            ))
            .arg(format!("--listen-client-urls=http://{}", m.client))
            .arg(format!("--advertise-client-urls=http://{}", m.client))
            .arg(format!("--listen-peer-urls=http://{}", m.peer))
            .arg(format!("--initial-advertise-peer-urls=http://{}", m.peer))
            .arg(format!("--initial-cluster={initial_cluster}"))
            .arg("--initial-cluster-state=new")
            .arg(format!(
                "--initial-cluster-token=isthmus-test-{}",
                std::process::id()
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log"))
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.members[i].process = Some(ServerProcess::new(child));
    }

    async fn wait_healthy(&mut self, i: usize) {
        let client = self.members[i].client;
        let healthy = eventually(START_TIMEOUT, || async {
            let (status, body) = http_get(client, "/health").await.ok()?;
            (status == 200 && body.contains("true")).then_some(())
        })
        .await;
        if healthy.is_none() {
            let log = self
                .dir
                .path()
                .join(format!("{}.log", self.members[i].name));
            panic!(
                "etcd member {} not healthy after {START_TIMEOUT:?}:\n{}",
                self.members[i].name,
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }

    /// Stops member `i` (SIGTERM, by its PID), keeping its data.
    pub fn stop_member(&mut self, i: usize) {
        self.members[i].process = None;
    }

    /// Starts member `i` again on its ports and data, and waits until it is healthy.
    pub async fn start_member(&mut self, i: usize) {
        self.spawn(i);
        self.wait_healthy(i).await;
    }

    /// Stops every member.
    pub fn stop(&mut self) {
        for i in 0..self.members.len() {
            self.stop_member(i);
        }
    }

    /// Starts every member again and waits until the cluster is healthy.
    pub async fn start_again(&mut self) {
        for i in 0..self.members.len() {
            self.spawn(i);
        }
        for i in 0..self.members.len() {
            self.wait_healthy(i).await;
        }
    }
}
