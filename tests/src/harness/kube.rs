//! A real Kubernetes API server for the tests: one etcd and one kube-apiserver (built from
//! `tests/kube`, see [`peers`]) on loopback, each on free ports with its own temporary
//! directory, both stopped by PID when the [`KubeApi`] drops.
//!
//! The API server is started as a real cluster's is, so that what a cluster checks is
//! checked: TLS from a generated CA, service-account tokens signed with a generated key,
//! token authentication with an admin in `system:masters`, `Node,RBAC` authorization and
//! the admission plugins (the defaults plus `NodeRestriction`). What a cluster's other
//! components would do, the harness does itself, or the tests do:
//!
//! - there is no kube-controller-manager: [`KubeApi::create_namespace`] also creates the
//!   namespace's `default` ServiceAccount; no EndpointSlice, garbage or namespace
//!   controller runs, so tests write EndpointSlices themselves and
//!   [`KubeApi::delete_namespace`] finalizes the namespace by hand;
//! - there is no kubelet: [`KubeApi::set_pod_status`] writes a pod's IP and readiness
//!   through the status subresource, as a kubelet does, and a pod bound to a node
//!   (`spec.nodeName`) is only removed by a forced delete.
//!
//! Istio's CRDs (`tests/kube/istio-crds.yaml`, vendored unchanged) and isthmus's Network
//! CRD (`deploy/kubernetes/crds/network.yaml`) are installed and Established before
//! [`KubeApi::start`] returns. `--min-request-timeout` is short, so a watch that names no
//! `timeoutSeconds` of its own ends after 15-30 s and is re-established (kube-rs's
//! `watcher` sends one, 290 s by default: set `watcher::Config::timeout` lower to see
//! re-watches in a test), and [`KubeOptions::watch_cache`] off together with
//! [`KubeApi::compact_etcd`] makes the next re-watch from an old resourceVersion fail with
//! 410 Gone. [`KubeApi::stop_apiserver`] and [`KubeApi::start_apiserver`] take the API
//! server away and bring it back on the same port, etcd keeping the data.
//!
//! A Kubernetes test starts with `if !kube::available() { return; }` (skips only where `go`
//! is missing outside CI). Keep one `KubeApi` per test and run a binary's checks in
//! sequence where they can share one: each pair costs a few seconds to start and a few
//! hundred MB. Never keep a `KubeApi` in a `static`: statics are not dropped, so its
//! processes would outlive the test binary. After a failed test its directory, with the
//! peers' logs, is kept and named on stderr.

mod http;
pub(crate) mod peers;
mod pki;

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine;
use serde_json::json;

pub use http::Response;
pub use peers::{available, bin_dir, peers, Peers};

use super::process::{free_port, ServerProcess};

/// The namespace of the registry's reader account, as in `deploy/kubernetes/rbac.yaml`.
pub const READER_NAMESPACE: &str = "isthmus-system";
/// The registry's reader service account, as in `deploy/kubernetes/rbac.yaml`.
pub const READER_SERVICE_ACCOUNT: &str = "isthmus-reader";
/// The service-account token issuer and audience (a real cluster's default).
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// Services' ClusterIPs come from here; the `kubernetes` Service takes its first address.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// Server-side timeout of a watch is random between this and twice this; short, so that
/// tests see watches re-established (a real cluster's default is 1800 s).
pub const MIN_REQUEST_TIMEOUT_SECS: u32 = 15;
/// How long a peer gets to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// The Kubernetes release's default admission plugins are on anyway; these are named so
/// they stay on whatever that default becomes (NodeRestriction is not a default).
const ADMISSION_PLUGINS: &str = "NamespaceLifecycle,LimitRanger,ServiceAccount,NodeRestriction,\
     DefaultStorageClass,DefaultTolerationSeconds,PodSecurity,Priority,ResourceQuota,\
     MutatingAdmissionWebhook,ValidatingAdmissionPolicy,ValidatingAdmissionWebhook";

/// How to start the API server.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// The API server's watch cache (`--watch-cache`). On (a real cluster's default), lists
    /// and watches at recent versions are served from memory even after an etcd
    /// compaction; off, they are served by etcd, so after [`KubeApi::compact_etcd`] a watch
    /// resumed from an older version gets 410 Gone, as after a long disconnection from a
    /// busy cluster.
    pub watch_cache: bool,
}

impl Default for KubeOptions {
    fn default() -> Self {
        Self { watch_cache: true }
    }
}

/// An etcd and a kube-apiserver on loopback acting as cluster `name`'s API.
pub struct KubeApi {
    // Dropped in this order: the API server, then etcd, then their directory.
    apiserver: Option<ServerProcess>,
    etcd: ServerProcess,
    name: String,
    peers: &'static Peers,
    apiserver_args: Vec<OsString>,
    addr: SocketAddr,
    etcd_addr: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    pki: pki::Pki,
    admin_token: String,
    admin_kubeconfig: PathBuf,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for KubeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApi")
            .field("name", &self.name)
            .field("url", &self.url())
            .field("etcd", &self.etcd_addr)
            .finish_non_exhaustive()
    }
}

impl Drop for KubeApi {
    /// After a failed test, keeps the peers' directory (their logs, data and keys) and
    /// says where it is; the fields then stop the processes.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "cluster {}: kept etcd's and kube-apiserver's logs and data in {}",
                self.name,
                self.dir.path().display()
            );
        }
    }
}

/// The last lines of a peer's log, for an error saying why it did not start.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Starts `program` with `args`, its output appended to `log`.
fn spawn(program: &Path, args: &[OsString], log: &Path) -> anyhow::Result<ServerProcess> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    Ok(ServerProcess::new(child))
}

impl KubeApi {
    /// Starts cluster `name`'s API with the default options.
    pub async fn start(name: &str) -> anyhow::Result<KubeApi> {
        Self::start_with(name, KubeOptions::default()).await
    }

    /// Starts cluster `name`'s API: etcd, then the API server, then the CRDs and the
    /// `default` namespace's ServiceAccount.
    pub async fn start_with(name: &str, options: KubeOptions) -> anyhow::Result<KubeApi> {
        let peers = peers()?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("kube-{name}-"))
            .tempdir()?;
        let service_ip: IpAddr = "10.96.0.1".parse()?;
        let pki = pki::generate(name, service_ip)?;
        let admin_token = hex_token();
        write_files(dir.path(), &pki, &admin_token)?;
        let started = Instant::now();
        let (etcd, etcd_addr) = start_etcd(peers, dir.path()).await?;
        let etcd_ready = started.elapsed();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let apiserver_args = apiserver_args(dir.path(), addr, etcd_addr, &options);
        let mut api = KubeApi {
            apiserver: None,
            etcd,
            name: name.to_string(),
            peers,
            apiserver_args,
            addr,
            etcd_addr,
            tls: http::tls_client(&pki.ca_pem)?,
            pki,
            admin_token,
            admin_kubeconfig: dir.path().join("admin.kubeconfig"),
            dir,
        };
        api.write_kubeconfig(&api.admin_kubeconfig, &api.admin_token)?;
        api.start_apiserver()
            .await
            .with_context(|| format!("cluster {name}'s kube-apiserver"))?;
        let apiserver_ready = started.elapsed() - etcd_ready;
        api.install_crds().await?;
        api.create_service_account("default", "default").await?;
        eprintln!(
            "cluster {name}: etcd ready in {etcd_ready:.1?}, kube-apiserver in {apiserver_ready:.1?}, \
             CRDs established after {:.1?} in all ({})",
            started.elapsed(),
            api.dir().display()
        );
        Ok(api)
    }

    /// The cluster's name (its kubeconfig's cluster, context and user).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The API server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The cluster CA, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.pki.ca_pem
    }

    /// A bearer token of a `system:masters` user.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// A kubeconfig with the cluster CA, the server and the admin token.
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// The directory of the peers' data, keys and logs (`etcd.log`, `apiserver.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a kubeconfig for this cluster that authenticates with `token`.
    pub fn write_kubeconfig(&self, path: &Path, token: &str) -> anyhow::Result<()> {
        self.write_kubeconfig_with(path, token, &self.pki.ca_pem)
    }

    /// Writes a kubeconfig for this cluster that authenticates with `token` and trusts
    /// `ca_pem` (another CA's, to test a refusal). Cluster, user and context are named
    /// after the cluster; the CA is inline, as in a remote-cluster Secret.
    pub fn write_kubeconfig_with(
        &self,
        path: &Path,
        token: &str,
        ca_pem: &str,
    ) -> anyhow::Result<()> {
        let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
        let name = &self.name;
        // JSON is YAML: every kubeconfig reader takes it.
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": name, "cluster": {
                "server": self.url(),
                "certificate-authority-data": ca,
            }}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
            "current-context": name,
        });
        std::fs::write(path, serde_json::to_string_pretty(&config)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Runs the built kubectl as the admin; its stdout, or an error carrying its stderr.
    pub async fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.kubectl_as(&self.admin_kubeconfig, args, None).await
    }

    /// Runs kubectl with `kubeconfig`, feeding `stdin` if given.
    pub async fn kubectl_as(
        &self,
        kubeconfig: &Path,
        args: &[&str],
        stdin: Option<&str>,
    ) -> anyhow::Result<String> {
        use tokio::io::AsyncWriteExt;
        let mut cmd = tokio::process::Command::new(&self.peers.kubectl);
        cmd.arg("--kubeconfig")
            .arg(kubeconfig)
            // A private discovery cache: another cluster on this port in an earlier run
            // had other kinds.
            .arg("--cache-dir")
            .arg(self.dir.path().join("kubectl-cache"))
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("starting kubectl")?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes()).await?;
        }
        let out = child.wait_with_output().await?;
        if !out.status.success() {
            bail!(
                "kubectl {} ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates or updates the objects in `manifest` (YAML or JSON, several documents
    /// allowed) with server-side apply, as the admin.
    pub async fn apply(&self, manifest: &str) -> anyhow::Result<String> {
        self.kubectl_as(
            &self.admin_kubeconfig,
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(manifest),
        )
        .await
    }

    /// Deletes one object; `namespace` is `None` for a cluster-scoped kind. Does not wait
    /// for finalizers. A pod bound to a node stays terminating (no kubelet): force it with
    /// `kubectl(&["delete", "pod", .., "--grace-period=0", "--force"])`.
    pub async fn delete(
        &self,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> anyhow::Result<()> {
        let mut args = vec!["delete", kind, name, "--wait=false"];
        if let Some(ns) = namespace {
            args.extend(["-n", ns]);
        }
        self.kubectl(&args).await.map(drop)
    }

    /// Creates (or relabels) namespace `ns` with `labels`, and its `default`
    /// ServiceAccount, which a controller-manager would create.
    pub async fn create_namespace(&self, ns: &str, labels: &[(&str, &str)]) -> anyhow::Result<()> {
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let namespace = json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": ns, "labels": labels},
        });
        self.apply(&namespace.to_string()).await?;
        self.create_service_account(ns, "default").await
    }

    /// Deletes namespace `ns` and then finalizes it, as the namespace controller would
    /// once the namespace is empty: delete what is in it first, or it stays in etcd.
    pub async fn delete_namespace(&self, ns: &str) -> anyhow::Result<()> {
        self.delete("namespace", None, ns).await?;
        let finalize = json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": ns},
            "spec": {"finalizers": []},
        });
        let path = format!("/api/v1/namespaces/{ns}/finalize");
        self.kubectl_as(
            &self.admin_kubeconfig,
            &["replace", "--raw", &path, "-f", "-"],
            Some(&finalize.to_string()),
        )
        .await
        .map(drop)
    }

    /// Creates ServiceAccount `name` in `ns` (which must exist).
    pub async fn create_service_account(&self, ns: &str, name: &str) -> anyhow::Result<()> {
        let sa = json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": ns},
        });
        self.apply(&sa.to_string()).await.map(drop)
    }

    /// Sets a pod's IP and readiness through the status subresource, as its kubelet would:
    /// phase Running, `podIP`/`podIPs`, and the Ready and ContainersReady conditions.
    pub async fn set_pod_status(
        &self,
        ns: &str,
        name: &str,
        pod_ip: IpAddr,
        ready: bool,
    ) -> anyhow::Result<()> {
        let status = if ready { "True" } else { "False" };
        let condition = |kind: &str| json!({"type": kind, "status": status});
        let patch = json!({"status": {
            "phase": "Running",
            "podIP": pod_ip.to_string(),
            "podIPs": [{"ip": pod_ip.to_string()}],
            "conditions": [condition("Ready"), condition("ContainersReady")],
        }});
        self.kubectl(&[
            "patch",
            "pod",
            name,
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch.to_string(),
        ])
        .await
        .map(drop)
    }

    /// A token for ServiceAccount `sa` in `ns` from the TokenRequest API.
    pub async fn create_token(&self, ns: &str, sa: &str, duration: &str) -> anyhow::Result<String> {
        let duration = format!("--duration={duration}");
        let token = self
            .kubectl(&["create", "token", sa, "-n", ns, &duration])
            .await?;
        Ok(token.trim().to_string())
    }

    /// A token for ServiceAccount `sa` in `ns` from the TokenRequest API for `audience`,
    /// bound to Pod `bound_pod` of `ns` when given (the token then stops authenticating
    /// once that pod is deleted, as a projected token does).
    pub async fn create_bound_token(
        &self,
        ns: &str,
        sa: &str,
        duration: &str,
        audience: &str,
        bound_pod: Option<&str>,
    ) -> anyhow::Result<String> {
        let duration = format!("--duration={duration}");
        let audience = format!("--audience={audience}");
        let mut args = vec!["create", "token", sa, "-n", ns, &duration, &audience];
        let pod;
        if let Some(name) = bound_pod {
            pod = format!("--bound-object-name={name}");
            args.extend(["--bound-object-kind=Pod", &pod]);
        }
        Ok(self.kubectl(&args).await?.trim().to_string())
    }

    /// A token for ServiceAccount `sa` in `ns` (which must exist), signed with the
    /// cluster's key like a TokenRequest token, that expired an hour ago.
    pub async fn expired_token(&self, ns: &str, sa: &str) -> anyhow::Result<String> {
        let uid = self
            .kubectl(&[
                "get",
                "serviceaccount",
                sa,
                "-n",
                ns,
                "-o",
                "jsonpath={.metadata.uid}",
            ])
            .await?;
        let who = pki::TokenSubject {
            issuer: ISSUER,
            audience: ISSUER,
            namespace: ns,
            service_account: sa,
            uid: uid.trim(),
        };
        pki::expired_token(&self.pki, &who, Duration::from_secs(3600))
    }

    /// Installs `deploy/kubernetes/rbac.yaml` and writes to `path` a kubeconfig whose
    /// token (from the TokenRequest API) is the `isthmus-reader` account's: exactly the
    /// permissions shipped for the registry.
    pub async fn reader_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        let rbac_file = peers::workspace().join("deploy/kubernetes/rbac.yaml");
        let rbac = std::fs::read_to_string(&rbac_file)
            .with_context(|| format!("reading {}", rbac_file.display()))?;
        self.service_account_kubeconfig(path, READER_NAMESPACE, READER_SERVICE_ACCOUNT, &rbac)
            .await
    }

    /// Creates namespace `ns` and ServiceAccount `sa` in it, applies `rbac` (roles and
    /// bindings for that account: a narrower role than the shipped one, say) and writes
    /// to `path` a kubeconfig with a TokenRequest token of the account.
    pub async fn service_account_kubeconfig(
        &self,
        path: &Path,
        ns: &str,
        sa: &str,
        rbac: &str,
    ) -> anyhow::Result<()> {
        self.create_namespace(ns, &[]).await?;
        self.create_service_account(ns, sa).await?;
        self.apply(rbac).await?;
        let token = self.create_token(ns, sa, "24h").await?;
        self.write_kubeconfig(path, &token)
    }

    /// A request to the API server as the admin, over TLS checked against the cluster CA.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<Response> {
        http::request(
            self.addr,
            Some(&self.tls),
            method,
            path,
            Some(&self.admin_token),
            body,
        )
        .await
    }

    /// Creates many objects fast, as the admin: POSTs every `(collection path, JSON body)`
    /// with up to `parallel` requests in flight (one connection each) and fails on the first
    /// refusal, naming the object. For thousands of objects this is far quicker than
    /// [`Self::apply`], which runs kubectl and reads each object back.
    pub async fn create_all(
        &self,
        objects: Vec<(String, String)>,
        parallel: usize,
    ) -> anyhow::Result<()> {
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for (path, body) in objects {
            let slot = slots.clone().acquire_owned().await?;
            let (addr, tls, token) = (self.addr, self.tls.clone(), self.admin_token.clone());
            tasks.spawn(async move {
                let _slot = slot;
                let r = http::request(addr, Some(&tls), "POST", &path, Some(&token), Some(&body))
                    .await
                    .with_context(|| format!("POST {path}"))?;
                anyhow::ensure!(
                    (200..300).contains(&r.status),
                    "POST {path} ({}): {}",
                    r.status,
                    r.body
                );
                Ok(())
            });
            // Reap finished requests as we go, so the first refusal stops the rest.
            while let Some(done) = tasks.try_join_next() {
                done??;
            }
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        Ok(())
    }

    /// Stops the API server (SIGTERM, then SIGKILL after a grace period); etcd keeps
    /// running with the cluster's data.
    pub fn stop_apiserver(&mut self) {
        self.apiserver.take();
    }

    /// (Re)starts the API server with the same port and flags and waits until `/readyz`
    /// answers ok.
    pub async fn start_apiserver(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.apiserver.is_none(),
            "the API server is already running"
        );
        let log = self.dir.path().join("apiserver.log");
        let mut process = spawn(&self.peers.apiserver, &self.apiserver_args, &log)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = process.try_wait()? {
                bail!("kube-apiserver exited ({status}):\n{}", log_tail(&log));
            }
            match self.request("GET", "/readyz", None).await {
                Ok(r) if r.status == 200 => break,
                _ if Instant::now() > deadline => {
                    bail!(
                        "kube-apiserver not ready after {START_TIMEOUT:?}:\n{}",
                        log_tail(&log)
                    )
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        self.apiserver = Some(process);
        Ok(())
    }

    /// Whether the API server is running (not stopped by [`Self::stop_apiserver`]).
    pub fn apiserver_running(&self) -> bool {
        self.apiserver.is_some()
    }

    /// PIDs of the API server (if running) and etcd, to measure them.
    pub fn pids(&self) -> (Option<u32>, u32) {
        (self.apiserver.as_ref().map(|p| p.id()), self.etcd.id())
    }

    /// Compacts etcd up to its current revision and returns that revision: every older
    /// resourceVersion is gone, so a list or watch from one gets 410 Gone (with
    /// [`KubeOptions::watch_cache`] off also for watches the cache would have served).
    pub async fn compact_etcd(&self) -> anyhow::Result<i64> {
        let probe = json!({"key": base64::engine::general_purpose::STANDARD.encode("/registry")});
        let r = http::request(
            self.etcd_addr,
            None,
            "POST",
            "/v3/kv/range",
            None,
            Some(&probe.to_string()),
        )
        .await?;
        let parsed: serde_json::Value = serde_json::from_str(&r.body)
            .with_context(|| format!("etcd's range answer ({}): {}", r.status, r.body))?;
        let revision: i64 = parsed["header"]["revision"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no revision in etcd's answer: {}", r.body))?;
        let compact = json!({"revision": revision.to_string(), "physical": true});
        let r = http::request(
            self.etcd_addr,
            None,
            "POST",
            "/v3/kv/compaction",
            None,
            Some(&compact.to_string()),
        )
        .await?;
        anyhow::ensure!(
            r.status == 200,
            "etcd refused the compaction ({}): {}",
            r.status,
            r.body
        );
        Ok(revision)
    }

    async fn install_crds(&self) -> anyhow::Result<()> {
        let root = peers::workspace();
        let istio = root.join("tests/kube/istio-crds.yaml");
        let ours = root.join("deploy/kubernetes/crds/network.yaml");
        // Server-side: Istio's CRDs are too large for the last-applied annotation.
        self.kubectl(&[
            "apply",
            "--server-side",
            "-f",
            path_str(&istio)?,
            "-f",
            path_str(&ours)?,
        ])
        .await?;
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=120s",
            "crd",
            "--all",
        ])
        .await
        .map(drop)
    }
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// 32 random bytes, hex.
fn hex_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The CA, serving certificate, service-account key and static token file.
fn write_files(dir: &Path, pki: &pki::Pki, admin_token: &str) -> anyhow::Result<()> {
    std::fs::write(dir.join("ca.crt"), &pki.ca_pem)?;
    std::fs::write(dir.join("apiserver.crt"), &pki.serving_cert_pem)?;
    std::fs::write(dir.join("apiserver.key"), &pki.serving_key_pem)?;
    std::fs::write(dir.join("sa.key"), &pki.sa_key_pem)?;
    std::fs::write(dir.join("sa.pub"), &pki.sa_pub_pem)?;
    // token,user,uid,"group,..."
    std::fs::write(
        dir.join("tokens.csv"),
        format!("{admin_token},admin,admin,\"system:masters\"\n"),
    )?;
    Ok(())
}

/// The API server's flags: those of a real cluster's, on loopback.
fn apiserver_args(
    dir: &Path,
    addr: SocketAddr,
    etcd: SocketAddr,
    options: &KubeOptions,
) -> Vec<OsString> {
    let file = |name: &str| dir.join(name).into_os_string();
    let flag = |name: &str, value: OsString| {
        let mut f = OsString::from(format!("--{name}="));
        f.push(value);
        f
    };
    vec![
        flag("etcd-servers", format!("http://{etcd}").into()),
        flag("bind-address", addr.ip().to_string().into()),
        flag("advertise-address", addr.ip().to_string().into()),
        flag("secure-port", addr.port().to_string().into()),
        flag("tls-cert-file", file("apiserver.crt")),
        flag("tls-private-key-file", file("apiserver.key")),
        flag("client-ca-file", file("ca.crt")),
        flag("token-auth-file", file("tokens.csv")),
        flag("service-account-key-file", file("sa.pub")),
        flag("service-account-signing-key-file", file("sa.key")),
        flag("service-account-issuer", ISSUER.into()),
        flag("api-audiences", ISSUER.into()),
        flag("authorization-mode", "Node,RBAC".into()),
        flag("enable-admission-plugins", ADMISSION_PLUGINS.into()),
        flag("service-cluster-ip-range", SERVICE_CIDR.into()),
        flag(
            "min-request-timeout",
            MIN_REQUEST_TIMEOUT_SECS.to_string().into(),
        ),
        flag("watch-cache", options.watch_cache.to_string().into()),
        // The `kubernetes` Service's endpoints would name the advertised address, which the
        // reconciler refuses on loopback; nothing in a test dials the API server through it.
        flag("endpoint-reconciler-type", "none".into()),
        flag("profiling", "false".into()),
        // Nothing in a test reads the API server's own logs but a person after a failure.
        flag("v", "1".into()),
    ]
}

/// Starts etcd on two free loopback ports and waits until it answers `/health`; on a
/// port taken in between, tries again.
async fn start_etcd(peers: &Peers, dir: &Path) -> anyhow::Result<(ServerProcess, SocketAddr)> {
    let log = dir.join("etcd.log");
    let mut last = None;
    for _ in 0..3 {
        let client = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let peer = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let args: Vec<OsString> = vec![
            format!("--data-dir={}", dir.join("etcd").display()).into(),
            format!("--listen-client-url=http://{client}").into(),
            format!("--listen-peer-url=http://{peer}").into(),
        ];
        let mut process = spawn(&peers.etcd, &args, &log)?;
        match wait_etcd(&mut process, client).await {
            Ok(()) => return Ok((process, client)),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .expect("tried")
        .context(format!("etcd:\n{}", log_tail(&log))))
}

async fn wait_etcd(process: &mut ServerProcess, client: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = process.try_wait()? {
            bail!("etcd exited ({status})");
        }
        if let Ok(r) = http::request(client, None, "GET", "/health", None, None).await {
            if r.status == 200 && r.body.contains("true") {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("etcd not healthy after {START_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
