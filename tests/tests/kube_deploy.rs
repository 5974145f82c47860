//! What a platform team applies, against real API servers: `deploy/kubernetes` rendered by
//! kubectl's kustomize is accepted by the API server's schemas and admission (server-side
//! dry run, then for real) and lands as written, its pods pass the namespace's `restricted`
//! Pod Security level, and the registry and gateway accept the flags their Deployments give
//! them; and `deploy/multicluster.sh` brings two clusters up and down: the
//! objects and remote-cluster Secrets land in each, a second `up` changes nothing, bad input
//! is refused before anything changes, the wait names the pods that cannot start (there are
//! no nodes here), and `down` removes what `up` installed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use isthmus_tests::harness::kube::{self, KubeApi};
use isthmus_tests::harness::process::workspace_binary;
use serde_json::Value;

const NS: &str = "isthmus-system";
const MANAGED_BY: &str = "app.kubernetes.io/managed-by=isthmus-multicluster";
/// A guard against a hung script, not a measure of anything: the machines are shared.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(600);

/// The workspace's root (the tests crate's parent).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the workspace")
        .to_path_buf()
}

fn manifests() -> PathBuf {
    workspace().join("deploy/kubernetes")
}

async fn get_json(api: &KubeApi, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = api.kubectl(&all).await.unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("kubectl {args:?}: {e}: {out}"))
}

/// The rendered objects as JSON values (kubectl's kustomize, converted by kubectl itself).
async fn rendered(api: &KubeApi) -> Vec<Value> {
    let yaml = api
        .kubectl(&["kustomize", manifests().to_str().unwrap()])
        .await
        .unwrap();
    let json = api
        .kubectl_as(
            api.admin_kubeconfig(),
            &["create", "--dry-run=client", "-o", "json", "-f", "-"],
            Some(&yaml),
        )
        .await
        .unwrap();
    // One JSON document per object, one after the other.
    serde_json::Deserializer::from_str(&json)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("kubectl's JSON: {e}: {json}"))
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered objects"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_kustomization_renders_and_the_api_server_accepts_every_object() {
    if !kube::available() {
        return;
    }
    let api = KubeApi::start("deploy").await.unwrap();
    let yaml = api
        .kubectl(&["kustomize", manifests().to_str().unwrap()])
        .await
        .unwrap();
    let objects = rendered(&api).await;
    let kinds: Vec<(&str, &str)> = objects
        .iter()
        .map(|o| {
            (
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    for expected in [
        ("Namespace", NS),
        ("CustomResourceDefinition", "networks.isthmus.io"),
        ("ClusterRole", "isthmus-reader"),
        ("ServiceAccount", "isthmus-registry"),
        ("ClusterRoleBinding", "isthmus-registry-reader"),
        ("Deployment", "isthmus-registry"),
        ("Service", "isthmus-registry"),
        ("ServiceAccount", "isthmus-eastwestgateway"),
        ("Deployment", "isthmus-eastwestgateway"),
        ("Service", "isthmus-eastwestgateway"),
        ("MutatingWebhookConfiguration", "isthmus-sidecar-injector"),
    ] {
        assert!(kinds.contains(&expected), "{expected:?} not in {kinds:?}");
    }

    // A server-side dry run checks every object against the schemas and admission without
    // storing it. Namespaced objects need their namespace to exist for admission, so the
    // namespace alone is created first.
    let namespace = find(&objects, "Namespace", NS);
    api.apply(&namespace.to_string()).await.unwrap();
    let dry = api
        .kubectl_as(
            api.admin_kubeconfig(),
            &[
                "apply",
                "--server-side",
                "--field-manager=isthmus",
                "--dry-run=server",
                "-f",
                "-",
            ],
            Some(&yaml),
        )
        .await
        .unwrap();
    assert_eq!(
        dry.lines().count(),
        objects.len(),
        "every object checked: {dry}"
    );
    let none = api
        .kubectl(&["get", "deployments,services", "-n", NS, "-o", "name"])
        .await
        .unwrap();
    assert!(none.trim().is_empty(), "the dry run stored {none}");

    let applied = api
        .kubectl_as(
            api.admin_kubeconfig(),
            &[
                "apply",
                "--server-side",
                "--field-manager=isthmus",
                "-f",
                "-",
            ],
            Some(&yaml),
        )
        .await
        .unwrap();
    assert_eq!(applied.lines().count(), objects.len(), "{applied}");

    // The gateway's Service: a LoadBalancer with the tunnel on both TCP and UDP 15008.
    let gw = get_json(
        &api,
        &["get", "service", "isthmus-eastwestgateway", "-n", NS],
    )
    .await;
    assert_eq!(gw["spec"]["type"], "LoadBalancer");
    let mut ports: Vec<(i64, String, i64)> = gw["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["port"].as_i64().unwrap(),
                p["protocol"].as_str().unwrap().to_string(),
                p["targetPort"].as_i64().unwrap(),
            )
        })
        .collect();
    ports.sort();
    assert_eq!(
        ports,
        [
            (15008, "TCP".to_string(), 15008),
            (15008, "UDP".to_string(), 15008),
            (15021, "TCP".to_string(), 15021),
            (15443, "TCP".to_string(), 15443),
        ]
    );

    // The registry's Service: gRPC, monitoring, and the webhook on 443.
    let reg = get_json(&api, &["get", "service", "isthmus-registry", "-n", NS]).await;
    let mut ports: Vec<(i64, i64)> = reg["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["port"].as_i64().unwrap(),
                p["targetPort"].as_i64().unwrap(),
            )
        })
        .collect();
    ports.sort();
    assert_eq!(ports, [(443, 15017), (15012, 15012), (15014, 15014)]);

    // The registry's Deployment as stored: non-root, read-only, its CA from cacerts, the
    // probes on the monitoring port, its cluster from the generated ConfigMap.
    let deploy = get_json(&api, &["get", "deployment", "isthmus-registry", "-n", NS]).await;
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "isthmus-registry");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    let c = &pod["containers"][0];
    assert_eq!(
        c["image"],
        format!("isthmus/registry:{}", workspace_version())
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(c["resources"]["requests"]["memory"].is_string());
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], 15014);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], 15014);
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for arg in [
        "--cluster=$(ISTHMUS_CLUSTER)",
        "--network=$(ISTHMUS_NETWORK)",
        "--in-cluster",
        "--ca-dir=/etc/cacerts",
    ] {
        assert!(args.contains(&arg), "{arg} not in {args:?}");
    }
    let cacerts = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "cacerts")
        .expect("a cacerts volume");
    assert_eq!(cacerts["secret"]["secretName"], "cacerts");
    let config_map = c["env"][0]["valueFrom"]["configMapKeyRef"]["name"]
        .as_str()
        .unwrap();
    let cm = get_json(&api, &["get", "configmap", config_map, "-n", NS]).await;
    assert_eq!(cm["data"]["cluster"], "cluster1");

    // The webhook as the contract has it.
    let hook = get_json(
        &api,
        &[
            "get",
            "mutatingwebhookconfiguration",
            "isthmus-sidecar-injector",
        ],
    )
    .await;
    let w = &hook["webhooks"][0];
    assert_eq!(w["name"], "sidecar-injector.isthmus.io");
    assert_eq!(w["clientConfig"]["service"]["name"], "isthmus-registry");
    assert_eq!(w["clientConfig"]["service"]["path"], "/inject");

    // The registry and gateway pods as a ReplicaSet would create them: the namespace
    // enforces Pod Security's `restricted` level, so admission refuses any pod that is not
    // non-root, without privilege escalation, with every capability dropped.
    let labels = get_json(&api, &["get", "namespace", NS]).await;
    assert_eq!(
        labels["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
    for name in ["isthmus-registry", "isthmus-eastwestgateway"] {
        let pod = pod_from_template(&api, name, &format!("{name}-probe")).await;
        api.kubectl_as(
            api.admin_kubeconfig(),
            &["create", "--dry-run=server", "-f", "-"],
            Some(&pod.to_string()),
        )
        .await
        .unwrap_or_else(|e| panic!("a pod of {name} is refused: {e}"));
    }
    // And a root pod is refused there, so the check above is the namespace's policy at work.
    let root_pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "root", "namespace": NS},
        "spec": {
            "serviceAccountName": "isthmus-registry",
            "containers": [{"name": "c", "image": "x", "securityContext": {"runAsUser": 0}}],
        },
    });
    let refused = api
        .kubectl_as(
            api.admin_kubeconfig(),
            &["create", "--dry-run=server", "-f", "-"],
            Some(&root_pod.to_string()),
        )
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("violates PodSecurity"),
        "{refused}"
    );

    // The programs accept the flags the Deployments give them, as the kubelet would
    // expand them, each mounted volume standing in a directory here.
    let ca = tempfile::tempdir().unwrap();
    let isthmusctl = workspace_binary("isthmus-registry", "isthmusctl");
    let init = std::process::Command::new(&isthmusctl)
        .args([
            "ca",
            "init",
            "--trust-domain",
            "cluster.local",
            "--cluster",
            "cluster1",
            "--out",
        ])
        .arg(ca.path())
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    let token = std::process::Command::new(&isthmusctl)
        .args([
            "token",
            "create",
            "--namespace",
            NS,
            "--service-account",
            "isthmus-eastwestgateway",
            "--ca-dir",
        ])
        .arg(ca.path().join("cluster1"))
        .output()
        .unwrap();
    assert!(token.status.success(), "{token:?}");
    let token = String::from_utf8(token.stdout).unwrap();
    for (deployment, package, bin) in [
        ("isthmus-registry", "isthmus-registry", "isthmus-registry"),
        (
            "isthmus-eastwestgateway",
            "isthmus-gateway",
            "isthmus-gateway",
        ),
    ] {
        let d = get_json(&api, &["get", "deployment", deployment, "-n", NS]).await;
        let scratch = tempfile::tempdir().unwrap();
        let args = container_args(&api, &d, &ca.path().join("cluster1"), scratch.path()).await;
        let out = std::process::Command::new(workspace_binary(package, bin))
            .args(&args)
            .arg("--validate")
            .env("ISTHMUS_TOKEN", token.trim())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{bin} {args:?} --validate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The first container's args of Deployment `d` as its pod would run them: `$(VAR)`
/// expanded from the env (ConfigMap keys read from the cluster), and each volume's mount
/// path replaced by a directory here: Secret `cacerts` by the cluster CA directory
/// `cacerts`, any other volume by an empty directory under `scratch`.
async fn container_args(api: &KubeApi, d: &Value, cacerts: &Path, scratch: &Path) -> Vec<String> {
    let pod = &d["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let mut env = BTreeMap::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let Some(r) = e["valueFrom"]["configMapKeyRef"].as_object() else {
            continue;
        };
        let cm = get_json(
            api,
            &["get", "configmap", r["name"].as_str().unwrap(), "-n", NS],
        )
        .await;
        let value = cm["data"][r["key"].as_str().unwrap()].as_str().unwrap();
        env.insert(e["name"].as_str().unwrap().to_string(), value.to_string());
    }
    let mut mounts = Vec::new();
    for m in c["volumeMounts"].as_array().unwrap() {
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap();
        let local = if volume["secret"]["secretName"] == "cacerts" {
            cacerts.to_path_buf()
        } else {
            let dir = scratch.join(m["name"].as_str().unwrap());
            std::fs::create_dir_all(&dir).unwrap();
            dir
        };
        mounts.push((m["mountPath"].as_str().unwrap().to_string(), local));
    }
    c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let mut arg = a.as_str().unwrap().to_string();
            for (name, value) in &env {
                arg = arg.replace(&format!("$({name})"), value);
            }
            // `--flag=PATH`: the one mount PATH is under, replaced once.
            let Some((flag, value)) = arg.split_once('=') else {
                return arg;
            };
            let under = mounts.iter().find_map(|(path, local)| {
                let rest = value.strip_prefix(path.as_str())?;
                (rest.is_empty() || rest.starts_with('/'))
                    .then(|| format!("{}{rest}", local.display()))
            });
            match under {
                Some(local) => format!("{flag}={local}"),
                None => arg,
            }
        })
        .collect()
}

/// A pod with Deployment `deployment`'s template, named `name`, as its ReplicaSet would
/// create it.
async fn pod_from_template(api: &KubeApi, deployment: &str, name: &str) -> Value {
    let d = get_json(api, &["get", "deployment", deployment, "-n", NS]).await;
    let t = &d["spec"]["template"];
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": t["metadata"]["labels"]},
        "spec": t["spec"],
    })
}

/// The version in `[workspace.package]`, which the images' tags follow.
fn workspace_version() -> String {
    let cargo = read(&workspace().join("Cargo.toml"));
    let package = cargo
        .split("[workspace.package]")
        .nth(1)
        .expect("a [workspace.package] table");
    package
        .lines()
        .find_map(|l| l.strip_prefix("version = "))
        .expect("a workspace version")
        .trim_matches('"')
        .to_string()
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs `deploy/multicluster.sh` with the built kubectl and isthmusctl.
async fn script(args: &[&str]) -> Run {
    let peers = kube::peers().unwrap();
    let isthmusctl = workspace_binary("isthmus-registry", "isthmusctl");
    let child = tokio::process::Command::new("bash")
        .arg(workspace().join("deploy/multicluster.sh"))
        .args(args)
        .env("KUBECTL", &peers.kubectl)
        .env("ISTHMUSCTL", isthmusctl)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(SCRIPT_TIMEOUT, child.wait_with_output())
        .await
        .expect("multicluster.sh ended")
        .unwrap();
    let run = Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!(
        "multicluster.sh {}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        run.stdout,
        run.stderr
    );
    run
}

/// Every object labelled as the script's in `api`, as `kind/namespace/name` -> resourceVersion.
async fn managed_objects(api: &KubeApi) -> BTreeMap<String, String> {
    let kinds = "namespaces,customresourcedefinitions,clusterroles,clusterrolebindings,\
                 mutatingwebhookconfigurations,roles,rolebindings,serviceaccounts,secrets,\
                 configmaps,deployments,services";
    let list = get_json(api, &["get", kinds, "-A", "-l", MANAGED_BY]).await;
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let m = &o["metadata"];
            (
                format!(
                    "{}/{}/{}",
                    o["kind"].as_str().unwrap(),
                    m["namespace"].as_str().unwrap_or(""),
                    m["name"].as_str().unwrap()
                ),
                m["resourceVersion"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn assert_refused(run: &Run, what: &str) {
    assert!(!run.ok, "accepted: {}", run.stdout);
    assert!(
        run.stderr.contains(what),
        "the error does not say {what:?}: {}",
        run.stderr
    );
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_bring_up_script_installs_two_clusters_idempotently_and_removes_them() {
    if !kube::available() {
        return;
    }
    let (a, b) = tokio::try_join!(KubeApi::start("east"), KubeApi::start("west")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("mesh");
    let root_s = root.to_str().unwrap();
    let ka = a.admin_kubeconfig().to_str().unwrap().to_string();
    let kb = b.admin_kubeconfig().to_str().unwrap().to_string();
    let east = format!("east={ka}:net-east");
    let west = format!("west={kb}:net-west");
    let (east, west) = (east.as_str(), west.as_str());

    // Bad input: refused, naming what is wrong, before anything changes.
    let missing = dir.path().join("missing.kubeconfig");
    let missing_s = format!("west={}", missing.display());
    let missing_s = missing_s.as_str();
    let unreachable = dir.path().join("unreachable.kubeconfig");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    std::fs::write(
        &unreachable,
        read(a.admin_kubeconfig()).replace(&a.url(), &format!("https://{closed}")),
    )
    .unwrap();
    let unreachable_s = format!("west={}", unreachable.display());
    let same_server = format!("west={ka}");
    let bad_label = format!("West_1={kb}");
    // A kubeconfig that reaches west, but as the registry's reader, not an administrator.
    let reader = dir.path().join("reader.kubeconfig");
    b.reader_kubeconfig(&reader).await.unwrap();
    let reader_s = format!("west={}", reader.display());
    let reader_s = reader_s.as_str();
    let (unreachable_s, same_server, bad_label) = (
        unreachable_s.as_str(),
        same_server.as_str(),
        bad_label.as_str(),
    );
    // East is fine each time; the second --cluster (or the other argument) is not.
    let owned = |args: &[&str]| -> Vec<String> { args.iter().map(|a| a.to_string()).collect() };
    let with_east = |more: &[&str]| -> Vec<String> {
        let mut args = owned(&["up", "--root", root_s, "--cluster", east]);
        args.extend(owned(more));
        args
    };
    let second = |spec: &str| with_east(&["--cluster", spec]);
    for (args, what) in [
        (second(missing_s), "does not exist"),
        (second(unreachable_s), "does not answer"),
        (second(reader_s), "is not a cluster administrator"),
        (second(east), "cluster name 'east' is given twice"),
        (second(same_server), "have the same API server"),
        (second(bad_label), "'West_1' is not a DNS label"),
        (
            with_east(&["--wait", "soon"]),
            "--wait soon: not a duration",
        ),
        (owned(&["up", "--cluster", east]), "--root DIR is required"),
        (
            owned(&["sideways", "--root", root_s]),
            "unknown command 'sideways'",
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = script(&args).await;
        assert_refused(&run, what);
    }
    assert!(!root.exists(), "a refused run wrote the mesh root");
    for api in [&a, &b] {
        assert!(
            managed_objects(api).await.is_empty(),
            "a refused run changed cluster {}",
            api.name()
        );
    }

    // Up, without waiting (no nodes: no registry ever runs here).
    let up = ["up", "--root", root_s, "--cluster", east, "--cluster", west];
    let mut no_wait = up.to_vec();
    no_wait.push("--no-wait");
    let first = script(&no_wait).await;
    assert!(first.ok, "up failed: {}", first.stderr);
    assert!(
        first
            .stdout
            .contains("not waiting for the registries (--no-wait)"),
        "{}",
        first.stdout
    );
    assert!(
        first
            .stdout
            .contains("isthmusctl clusters --admin 127.0.0.1:15014"),
        "up does not say how to check sync: {}",
        first.stdout
    );
    for (api, me, other, network) in [
        (&a, "east", "west", "net-east"),
        (&b, "west", "east", "net-west"),
    ] {
        let objects = managed_objects(api).await;
        for expected in [
            format!("Deployment/{NS}/isthmus-registry"),
            format!("Deployment/{NS}/isthmus-eastwestgateway"),
            format!("Service/{NS}/isthmus-eastwestgateway"),
            format!("Secret/{NS}/cacerts"),
            format!("Secret/{NS}/isthmus-eastwestgateway-token"),
            format!("Secret/{NS}/istio-remote-secret-{other}"),
            "MutatingWebhookConfiguration//isthmus-sidecar-injector".to_string(),
            format!("Namespace//{NS}"),
        ] {
            assert!(
                objects.contains_key(&expected),
                "cluster {me}: no {expected} in {objects:?}"
            );
        }
        // The cluster's own intermediate, from the mesh root.
        let cacerts = get_json(api, &["get", "secret", "cacerts", "-n", NS]).await;
        let ca = base64_decode(cacerts["data"]["ca-cert.pem"].as_str().unwrap());
        assert_eq!(ca, read(&root.join(me).join("ca-cert.pem")));
        let root_cert = base64_decode(cacerts["data"]["root-cert.pem"].as_str().unwrap());
        assert_eq!(root_cert, read(&root.join("root-cert.pem")));
        // The cluster's id and network, as the registry's flags read them.
        let deploy = get_json(api, &["get", "deployment", "isthmus-registry", "-n", NS]).await;
        let cm_name = deploy["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]
            ["configMapKeyRef"]["name"]
            .as_str()
            .unwrap()
            .to_string();
        let cm = get_json(api, &["get", "configmap", &cm_name, "-n", NS]).await;
        assert_eq!(cm["data"]["cluster"], me);
        assert_eq!(cm["data"]["network"], network);
        // The remote secret names the other cluster, with a kubeconfig of its API server.
        let remote = get_json(
            api,
            &[
                "get",
                "secret",
                &format!("istio-remote-secret-{other}"),
                "-n",
                NS,
            ],
        )
        .await;
        assert_eq!(
            remote["metadata"]["annotations"]["networking.istio.io/cluster"],
            other
        );
        assert_eq!(remote["metadata"]["labels"]["istio/multiCluster"], "true");
        let kubeconfig = base64_decode(remote["data"][other].as_str().unwrap());
        let other_api = if other == "east" { &a } else { &b };
        assert!(kubeconfig.contains(&other_api.url()), "{kubeconfig}");
    }
    let ca_files: Vec<String> = ["root-cert.pem", "east/ca-cert.pem", "west/ca-cert.pem"]
        .iter()
        .map(|f| read(&root.join(f)))
        .collect();

    // The registry keeps the webhook's caBundle at the mesh root, under its own field
    // manager; up must neither undo that nor conflict with it.
    let ca_bundle = base64::engine::general_purpose::STANDARD.encode(&ca_files[0]);
    let patch = serde_json::json!([{
        "op": "add",
        "path": "/webhooks/0/clientConfig/caBundle",
        "value": ca_bundle,
    }]);
    a.kubectl(&[
        "patch",
        "mutatingwebhookconfiguration",
        "isthmus-sidecar-injector",
        "--type=json",
        "--field-manager=isthmus-registry",
        "-p",
        &patch.to_string(),
    ])
    .await
    .unwrap();

    // A second up changes nothing.
    let before = (managed_objects(&a).await, managed_objects(&b).await);
    let second = script(&no_wait).await;
    assert!(second.ok, "second up failed: {}", second.stderr);
    assert!(
        second.stdout.contains("cluster east: unchanged"),
        "{}",
        second.stdout
    );
    assert!(
        second.stdout.contains("cluster west: unchanged"),
        "{}",
        second.stdout
    );
    let after = (managed_objects(&a).await, managed_objects(&b).await);
    assert_eq!(before, after, "the second up changed objects");
    let ca_after: Vec<String> = ["root-cert.pem", "east/ca-cert.pem", "west/ca-cert.pem"]
        .iter()
        .map(|f| read(&root.join(f)))
        .collect();
    assert_eq!(ca_files, ca_after, "the second up minted new CA files");
    let hook = get_json(
        &a,
        &[
            "get",
            "mutatingwebhookconfiguration",
            "isthmus-sidecar-injector",
        ],
    )
    .await;
    assert_eq!(
        hook["webhooks"][0]["clientConfig"]["caBundle"], ca_bundle,
        "up reset the caBundle the registry keeps"
    );

    // Waiting: no nodes, so no registry becomes ready. In west a pod exists, as its
    // ReplicaSet controller would have created it; in east none does (no controller runs).
    let pod = pod_from_template(&b, "isthmus-registry", "isthmus-registry-7d4b9-x2x9q").await;
    b.apply(&pod.to_string()).await.unwrap();
    let mut short = up.to_vec();
    short.extend(["--wait", "3s"]);
    let waited = script(&short).await;
    assert!(
        !waited.ok,
        "the wait succeeded without nodes: {}",
        waited.stdout
    );
    assert!(
        waited
            .stderr
            .contains("cluster east: no pod of deployment isthmus-system/isthmus-registry exists"),
        "{}",
        waited.stderr
    );
    assert!(
        waited.stderr.contains(
            "cluster west: pod isthmus-system/isthmus-registry-7d4b9-x2x9q is not scheduled to any node"
        ),
        "{}",
        waited.stderr
    );
    b.delete("pod", Some(NS), "isthmus-registry-7d4b9-x2x9q")
        .await
        .unwrap();

    // Down removes what up installed, in both clusters, and keeps the mesh root.
    let down = script(&[
        "down",
        "--root",
        root_s,
        "--cluster",
        east,
        "--cluster",
        west,
    ])
    .await;
    assert!(down.ok, "down failed: {}", down.stderr);
    for api in [&a, &b] {
        let left: Vec<String> = managed_objects(api)
            .await
            .into_keys()
            .filter(|k| k != &format!("Namespace//{NS}"))
            .collect();
        assert!(left.is_empty(), "cluster {}: left {left:?}", api.name());
        // No namespace controller runs here to finish the deletion: the namespace is
        // terminating.
        let ns = get_json(api, &["get", "namespace", NS]).await;
        assert!(
            ns["metadata"]["deletionTimestamp"].is_string(),
            "cluster {}: namespace not deleted: {ns}",
            api.name()
        );
    }
    assert_eq!(
        read(&root.join("root-cert.pem")),
        ca_files[0],
        "down touched the root"
    );
}

fn base64_decode(s: &str) -> String {
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(s).unwrap()).unwrap()
}
