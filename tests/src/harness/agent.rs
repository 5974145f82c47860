//! The VM agent in topology tests: a VM namespace behind a network of the two-network
//! [`Mesh`], its onboarding bundle (written as `isthmusctl vm onboard` writes it), the
//! sample app, and the real `isthmus-vm-agent` binary run inside the VM as an operator
//! runs it.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use isthmus_registry::onboard::{self, OnboardOptions};
use serde_json::Value;
use tokio::runtime::Runtime;

use super::mesh::{network, on, yaml, Mesh, APP_PORT, SVC_PORT};
use super::netns::{ChildGuard, Net, Netns};
use super::process::workspace_binary;
use super::registry::{eventually, http_get, CLUSTER};

/// The agent's admin and health ports inside a VM (loopback of the VM's namespace).
pub const ADMIN: &str = "127.0.0.1:15000";
pub const HEALTH: &str = "127.0.0.1:15021";
/// Where a VM's resolv.conf points: an address in its network that the agent captures.
pub const RESOLVER: &str = "10.10.0.53";

pub fn agent_binary() -> PathBuf {
    workspace_binary("isthmus-vm-agent", "isthmus-vm-agent")
}

/// A YAML WorkloadGroup `name` in `shop` whose VMs carry `app: <app>`, run as `sa` and
/// serve `tcp` on `port`; with `probe`, an HTTP readiness probe of `/healthz` every second
/// that fails after two misses.
pub fn group_yaml(name: &str, app: &str, sa: &str, port: u16, probe: bool) -> String {
    let probe = if probe {
        format!(
            "  probe:\n    periodSeconds: 1\n    timeoutSeconds: 1\n    failureThreshold: 2\n    httpGet:\n      path: /healthz\n      port: {port}\n"
        )
    } else {
        String::new()
    };
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  metadata:\n    labels:\n      app: {app}\n  template:\n    serviceAccount: {sa}\n    ports:\n      tcp: {port}\n{probe}"
    )
}

/// One VM: its namespace, its files, and a runtime inside it.
pub struct Vm {
    pub name: String,
    pub net: Net,
    pub ip: Ipv4Addr,
    pub ns: Netns,
    /// Bundle, state and logs live under here.
    pub dir: PathBuf,
    pub group: String,
    pub sa: String,
    rt: Option<Runtime>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Vm {
    /// A VM `name` at `ip` in `net`, onboarded into WorkloadGroup `group` (service account
    /// `sa`), with a resolv.conf naming [`RESOLVER`].
    pub fn create(m: &Mesh, net: Net, name: &str, ip: Ipv4Addr, group: &str, sa: &str) -> Vm {
        let vm = Self::create_bare(m, net, name, ip, group, sa);
        vm.onboard(m, Duration::from_secs(600));
        vm
    }

    /// As [`Vm::create`], without an onboarding bundle (a pod's namespace, say).
    pub fn create_bare(m: &Mesh, net: Net, name: &str, ip: Ipv4Addr, group: &str, sa: &str) -> Vm {
        let ns = m.topo.add_vm(net, name, ip);
        ns.set_resolv_conf(&format!(
            "nameserver {RESOLVER}\noptions timeout:2 attempts:1\n"
        ));
        let dir = m.dir.path().join(format!("vm-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let rt = ns.runtime();
        Vm {
            name: name.to_string(),
            net,
            ip,
            ns,
            dir,
            group: group.to_string(),
            sa: sa.to_string(),
            rt: Some(rt),
        }
    }

    pub fn bundle_dir(&self) -> PathBuf {
        self.dir.join("bundle")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn rt(&self) -> &Runtime {
        self.rt.as_ref().unwrap()
    }

    /// Writes a fresh bundle (a new one-time token valid for `ttl`).
    pub fn onboard(&self, m: &Mesh, ttl: Duration) {
        onboard::onboard(
            &OnboardOptions {
                registry: m.registry_set.clone(),
                ca_dir: m.reg.ca_dir(),
                group: self.group.clone(),
                namespace: "shop".into(),
                service_account: self.sa.clone(),
                network: network(self.net).into(),
                out: self.bundle_dir(),
                token_ttl: ttl,
                trust_domain: None,
            },
            time::OffsetDateTime::now_utc(),
        )
        .expect("onboard");
    }

    /// The agent as an operator runs it, with `args` added (and `env`), logging into
    /// [`Vm::log_path`] (appended across restarts).
    pub fn start_agent(&self, m: &Mesh, args: &[&str], env: &[(&str, &str)]) -> ChildGuard {
        let cmd = self.agent_command(&agent_binary(), args, env);
        m.topo.spawn(cmd).expect("start the agent")
    }

    /// The command [`Vm::start_agent`] runs, with the agent `binary` given (benchmark
    /// drivers run the one next to them rather than building it).
    pub fn agent_command(
        &self,
        binary: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> std::process::Command {
        let mut cmd = self.logged_command(binary, env);
        cmd.args(["run", "--bundle"])
            .arg(self.bundle_dir())
            .arg("--state-dir")
            .arg(self.state_dir())
            .args([
                "--admin-addr",
                ADMIN,
                "--health-addr",
                HEALTH,
                "--drain-deadline",
                "2s",
                "--connect-timeout",
                "2s",
            ])
            .args(args);
        cmd
    }

    /// `program` inside the VM with `env`, its output appended to [`Vm::log_path`]; the
    /// caller adds the arguments.
    pub fn logged_command(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        env: &[(&str, &str)],
    ) -> std::process::Command {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = self.ns.command(program);
        cmd.env("LOG_FORMAT", "plain")
            .env("RUST_LOG", "info,isthmus_vm_agent=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        cmd
    }

    /// Waits until the agent's `/healthz/ready` answers 200; panics with its log if not.
    pub async fn wait_ready(&self) {
        let health: SocketAddr = HEALTH.parse().unwrap();
        let ready = on(self.rt(), async move {
            eventually(Duration::from_secs(60), || async {
                matches!(http_get(health, "/healthz/ready").await, Ok((200, _))).then_some(())
            })
            .await
        })
        .await;
        assert!(
            ready.is_some(),
            "the agent in {} never became ready:\n{}",
            self.name,
            self.log()
        );
    }

    /// GET `path` on the agent's admin port, as JSON.
    pub async fn admin(&self, path: &str) -> Value {
        let admin: SocketAddr = ADMIN.parse().unwrap();
        let path = path.to_string();
        let (status, body) = on(self.rt(), async move { http_get(admin, &path).await })
            .await
            .unwrap_or_else(|e| panic!("admin of {}: {e}\n{}", self.name, self.log()));
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    /// The agent's Prometheus text.
    pub async fn metrics(&self) -> String {
        let admin: SocketAddr = ADMIN.parse().unwrap();
        on(self.rt(), async move { http_get(admin, "/metrics").await })
            .await
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// The sample app (an HTTP server answering `hello from <name>`) on `port` in the VM;
    /// with `healthy_file`, `/healthz` answers 503 while that file is missing.
    pub fn start_app(&self, m: &Mesh, port: u16, healthy_file: Option<&Path>) -> ChildGuard {
        let mut cmd = self
            .ns
            .command(workspace_binary("isthmus-sample-app", "sample-app"));
        cmd.args(["--listen", &format!("0.0.0.0:{port}"), "--name", &self.name]);
        if let Some(f) = healthy_file {
            cmd.arg("--healthy-file").arg(f);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        m.topo.spawn(cmd).expect("start the sample app")
    }

    /// Runs `script` with `sh -c` inside the VM (so with its resolv.conf), bounded in
    /// time: (exit success, stdout, stderr).
    pub fn sh(&self, script: &str) -> (bool, String, String) {
        sh_in(&self.ns, script)
    }

    /// The nftables tables in the VM's namespace.
    pub fn nft_tables(&self) -> String {
        self.sh("nft list tables").1
    }

    /// `isthmus-vm-agent cleanup` inside the VM.
    pub fn cleanup(&self) -> (bool, String) {
        let out = self
            .ns
            .command(agent_binary())
            .arg("cleanup")
            .stdin(Stdio::null())
            .output()
            .expect("cleanup");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }
}

/// The catalog of a VM scene: web, the VM's group (with a readiness probe when `probe`)
/// and service; reviews, a workload in network B.
pub fn web_vm_catalog(probe: bool) -> Vec<String> {
    vec![
        group_yaml("web", "web", "web", APP_PORT, probe),
        yaml::service("web", "shop", SVC_PORT),
        yaml::service("reviews", "shop", SVC_PORT),
        yaml::workload(
            "reviews-b1",
            "shop",
            "reviews",
            "10.10.0.5",
            APP_PORT,
            "network-b",
        ),
    ]
}

/// `sh -c script` in namespace `ns` (a VM's, from any thread), bounded to 20 s: (success,
/// stdout, stderr).
pub fn sh_in(ns: &Netns, script: &str) -> (bool, String, String) {
    let out = ns
        .command("timeout")
        .args(["20", "sh", "-c", script])
        .stdin(Stdio::null())
        .output()
        .expect("run in the VM");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The registry's cluster, for bundles.
pub const VM_CLUSTER: &str = CLUSTER;
