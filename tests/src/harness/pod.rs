//! A pod without a kubelet: what the kubelet would do for an injected pod, done from the
//! Pod as the API server stored it. The pod is a VM-style network namespace ([`Vm`]
//! without a bundle); its init container's `capture-init` runs with the arguments the
//! injector wrote; its sidecar runs with the injected environment (the downward API
//! resolved by hand) as uid 1337, with the mounts the kubelet would make: a projected
//! service-account token, the `isthmus-ca-root-cert` ConfigMap, an `emptyDir` for state.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use super::agent::Vm;
use super::kube::KubeApi;
use super::mesh::Mesh;
use super::registry::eventually;

/// The sidecar's uid, as the injector sets it.
pub const SIDECAR_UID: u32 = 1337;
/// The injected containers.
pub const INIT_CONTAINER: &str = "isthmus-init";
pub const SIDECAR_CONTAINER: &str = "isthmus-proxy";
/// The audience of the CA's service-account tokens.
pub const CA_AUDIENCE: &str = "isthmus-ca";

/// A file of the shipped `deploy/kubernetes/`.
pub fn deploy_file(name: &str) -> anyhow::Result<String> {
    let path = super::kube::peers::workspace()
        .join("deploy/kubernetes")
        .join(name);
    std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Writes to `path` a kubeconfig of the `isthmus-registry` service account holding
/// exactly the shipped roles (the reader's and the registry's own: root ConfigMaps, the
/// webhook's caBundle), installed first.
pub async fn registry_kubeconfig(api: &KubeApi, path: &Path) -> anyhow::Result<()> {
    let rbac = format!(
        "{}\n---\n{}",
        deploy_file("rbac.yaml")?,
        deploy_file("registry-rbac.yaml")?
    );
    api.service_account_kubeconfig(path, "isthmus-system", "isthmus-registry", &rbac)
        .await
}

/// Installs the shipped webhook configuration, pointed at `addr` (the registry on
/// loopback) instead of the registry's Service.
pub async fn register_webhook(api: &KubeApi, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    api.apply(&deploy_file("webhook.yaml")?).await?;
    let patch = serde_json::json!([{"op": "replace", "path": "/webhooks/0/clientConfig",
        "value": {"url": format!("https://{addr}/inject")}}]);
    api.kubectl(&[
        "patch",
        "mutatingwebhookconfiguration",
        "isthmus-sidecar-injector",
        "--type=json",
        "-p",
        &patch.to_string(),
    ])
    .await
    .map(drop)
}

/// Creates Pod `manifest` (`ns`/`name`) through the API server until it is stored injected
/// (the API server loads webhook configurations asynchronously, and the registry sets the
/// caBundle a moment after it starts), and returns it as stored.
pub async fn create_injected(
    api: &KubeApi,
    manifest: &str,
    ns: &str,
    name: &str,
    wait: Duration,
) -> anyhow::Result<Value> {
    let last = std::sync::Mutex::new(String::new());
    let injected = eventually(wait, || async {
        let _ = api
            .kubectl(&[
                "delete",
                "pod",
                name,
                "-n",
                ns,
                "--ignore-not-found",
                "--wait=false",
            ])
            .await;
        if let Err(e) = api.apply(manifest).await {
            *last.lock().unwrap() = e.to_string();
            return None;
        }
        let pod = stored_pod(api, ns, name).await.ok()?;
        let containers = strings_of_names(&pod["spec"]["containers"]);
        if containers.iter().any(|c| c == SIDECAR_CONTAINER) {
            return Some(pod);
        }
        *last.lock().unwrap() = format!("stored without the sidecar: {containers:?}");
        None
    })
    .await;
    injected.ok_or_else(|| {
        anyhow::anyhow!(
            "pod {ns}/{name} was never stored injected: {}",
            last.into_inner().unwrap_or_default()
        )
    })
}

fn strings_of_names(list: &Value) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|c| c["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Pod `name` in `ns` as the API server stores it.
pub async fn stored_pod(api: &KubeApi, ns: &str, name: &str) -> anyhow::Result<Value> {
    let json = api
        .kubectl(&["get", "pod", name, "-n", ns, "-o", "json"])
        .await?;
    Ok(serde_json::from_str(&json)?)
}

/// The container `name` of a stored pod (init containers included).
pub fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|k| pod["spec"][k].as_array())
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in the stored pod: {pod:#}"))
}

/// A container's environment as the kubelet would give it: values as written, the
/// downward API's field references resolved from the pod (`ip` is its status.podIP).
pub fn environment(pod: &Value, c: &Value, ip: Ipv4Addr) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap().to_string();
        if let Some(v) = e["value"].as_str() {
            env.push((name, v.to_string()));
            continue;
        }
        let field = e["valueFrom"]["fieldRef"]["fieldPath"]
            .as_str()
            .unwrap_or_else(|| panic!("env {name} is neither a value nor a field: {e}"));
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let value = match field {
            "metadata.name" => text(&pod["metadata"]["name"]),
            "metadata.namespace" => text(&pod["metadata"]["namespace"]),
            "spec.serviceAccountName" => text(&pod["spec"]["serviceAccountName"]),
            "status.podIP" => ip.to_string(),
            other => panic!("env {name}: field {other} is not resolved by this harness"),
        };
        env.push((name, value));
    }
    env
}

/// A JSON array of strings.
pub fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|s| s.as_str().unwrap_or_default().to_string())
        .collect()
}

/// The mesh root published in namespace `ns` (the `isthmus-ca-root-cert` ConfigMap), if
/// any.
pub async fn configmap_root(api: &KubeApi, ns: &str) -> Option<String> {
    api.kubectl(&[
        "get",
        "configmap",
        "isthmus-ca-root-cert",
        "-n",
        ns,
        "-o",
        "jsonpath={.data.root-cert\\.pem}",
    ])
    .await
    .ok()
}

/// The mesh root the registry published into namespace `ns`, once it is there.
pub async fn published_root(api: &KubeApi, ns: &str, wait: Duration) -> Option<String> {
    eventually(wait, || async {
        configmap_root(api, ns)
            .await
            .filter(|pem| pem.contains("BEGIN CERTIFICATE"))
    })
    .await
}

/// A token for `sa` with the CA's audience, bound to Pod `pod` (as the kubelet's projected
/// token is: it stops working when the pod is deleted), from the TokenRequest API.
pub async fn pod_token(api: &KubeApi, ns: &str, sa: &str, pod: &str) -> anyhow::Result<String> {
    api.create_bound_token(ns, sa, "1h", CA_AUDIENCE, Some(pod))
        .await
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// What the kubelet mounts for the sidecar: the projected token, the ConfigMap's root, and
/// an `emptyDir` the sidecar's uid owns.
pub struct Mounts {
    dir: tempfile::TempDir,
}

impl Mounts {
    pub fn new(token: &str, root_pem: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o755);
        let mounts = Self { dir };
        for d in [mounts.token_dir(), mounts.root_dir()] {
            std::fs::create_dir(&d).unwrap();
            chmod(&d, 0o755);
        }
        mounts.write_token(token);
        std::fs::write(mounts.root_dir().join("root-cert.pem"), root_pem).unwrap();
        chmod(&mounts.root_dir().join("root-cert.pem"), 0o644);
        mounts.empty_state();
        mounts
    }

    fn token_dir(&self) -> PathBuf {
        self.dir.path().join("tokens")
    }

    pub fn token(&self) -> PathBuf {
        self.token_dir().join("isthmus-token")
    }

    /// Replaces the token, as the kubelet rotates it.
    pub fn write_token(&self, token: &str) {
        std::fs::write(self.token(), token).unwrap();
        chmod(&self.token(), 0o644);
    }

    pub fn root_dir(&self) -> PathBuf {
        self.dir.path().join("isthmus")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A fresh, empty `emptyDir` (a new pod), owned by the sidecar's uid.
    pub fn empty_state(&self) {
        let state = self.state();
        if state.exists() {
            std::fs::remove_dir_all(&state).unwrap();
        }
        std::fs::create_dir(&state).unwrap();
        let id = Some(nix::unistd::Uid::from_raw(SIDECAR_UID));
        nix::unistd::chown(&state, id, Some(nix::unistd::Gid::from_raw(SIDECAR_UID))).unwrap();
        chmod(&state, 0o700);
    }
}

/// Runs the stored pod's init container in the pod's namespace, as the kubelet would;
/// returns what it printed, or why it failed.
pub fn run_init(pod_ns: &Vm, pod: &Value, agent: &Path) -> Result<String, String> {
    let init = container(pod, INIT_CONTAINER);
    let args = strings(&init["args"]);
    let out = pod_ns
        .ns
        .command(agent)
        .args(&args)
        .output()
        .map_err(|e| format!("running {}: {e}", agent.display()))?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    match out.status.success() {
        true => Ok(text),
        false => Err(format!("capture-init {args:?} failed: {text}")),
    }
}

/// The stored pod's sidecar in the pod's namespace as uid 1337 with the injected
/// environment and the kubelet's `mounts`. Only the registry's address is replaced: the
/// injected one is the registry Service's cluster DNS name, and there is no kube-dns here.
pub fn sidecar_command(
    m: &Mesh,
    pod_ns: &Vm,
    pod: &Value,
    ip: Ipv4Addr,
    mounts: &Mounts,
    agent: &Path,
) -> Command {
    let sidecar = container(pod, SIDECAR_CONTAINER);
    let mut env = environment(pod, sidecar, ip);
    env.retain(|(k, _)| k != "ISTHMUS_REGISTRY");
    env.push(("ISTHMUS_REGISTRY".into(), m.registry_set.clone()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut cmd = pod_ns.logged_command("setpriv", &env);
    cmd.arg(format!("--reuid={SIDECAR_UID}"))
        .arg(format!("--regid={SIDECAR_UID}"))
        .args(["--clear-groups", "--"])
        .arg(agent)
        .args(strings(&sidecar["args"]))
        .arg("--token")
        .arg(mounts.token())
        .arg("--root-dir")
        .arg(mounts.root_dir())
        .arg("--state-dir")
        .arg(mounts.state())
        .args(["--drain-deadline", "2s", "--connect-timeout", "2s"]);
    cmd
}
