//! `isthmusctl cluster secret` and `isthmusctl clusters` against real API servers: the
//! Secret written for cluster B with B's admin credentials, applied in cluster A, makes a
//! registry watching A watch B through the reader role alone; `isthmusctl clusters` then
//! shows both clusters as the registry's admin reports them. The built binary is run, as
//! an operator runs it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use isthmus_proto::model::{service_view_key, NodeKind, ViewResource};
use isthmus_registry::app::LocalCluster;
use isthmus_tests::harness::kube::{self, KubeApi, READER_NAMESPACE};
use isthmus_tests::harness::process::workspace_binary;
use isthmus_tests::{eventually, http_get, node, TestRegistry, NETWORK};
use serde_json::Value;

/// How long one expected change may take (generous: the machines are shared; nothing
/// here measures speed).
const STEP: Duration = Duration::from_secs(90);
const WEB: &str = "web.shop.svc.cluster.local";
/// The address of cluster B's one endpoint of `web`.
const B_ENDPOINT: &str = "10.245.0.5";

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs the built `isthmusctl` without blocking the runtime the registry runs on.
async fn isthmusctl(bin: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(bin)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start isthmusctl");
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(stdin.unwrap_or_default().as_bytes())
        .await
        .unwrap();
    drop(pipe);
    let out = tokio::time::timeout(STEP, child.wait_with_output())
        .await
        .expect("isthmusctl ended in time")
        .unwrap();
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Service `web` in namespace `shop` of `api`, with one ready endpoint at `address`.
async fn web_service(api: &KubeApi, address: &str) {
    api.create_namespace("shop", &[]).await.unwrap();
    api.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n",
    )
    .await
    .unwrap();
    api.apply(&format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080, protocol: TCP}}\nendpoints:\n- addresses: [{address}]\n  conditions: {{ready: true}}\n"
    ))
    .await
    .unwrap();
}

/// A registry watching `a` as its own cluster through the reader role (Secrets in
/// `isthmus-system` of A add clusters).
async fn registry_for(a: &KubeApi, dir: &Path) -> TestRegistry {
    let kubeconfig = dir.join("a-reader.kubeconfig");
    a.reader_kubeconfig(&kubeconfig).await.unwrap();
    TestRegistry::start_with(&[], |cfg| {
        cfg.kubernetes.local = Some(LocalCluster::Kubeconfig(kubeconfig));
        cfg.kubernetes.probe_interval = Duration::from_millis(300);
    })
    .await
    .unwrap()
}

async fn clusters_json(reg: &TestRegistry) -> Value {
    let (code, body) = http_get(reg.admin_addr(), "/debug/clusters").await.unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The table's rows (header first), each split into its cells.
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .take_while(|l| !l.is_empty())
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(String::from)
                .collect()
        })
        .collect()
}

/// The Secret checks that need no registry: what it carries, and what it leaves out.
async fn check_secret(a: &KubeApi, b: &KubeApi) {
    let stored = a
        .kubectl(&[
            "get",
            "secret",
            "istio-remote-secret-cluster-b",
            "-n",
            READER_NAMESPACE,
            "-o",
            "json",
        ])
        .await
        .unwrap();
    let secret: Value = serde_json::from_str(&stored).unwrap();
    let meta = &secret["metadata"];
    assert_eq!(meta["labels"]["istio/multiCluster"], "true", "{secret:#}");
    assert_eq!(
        meta["annotations"]["networking.istio.io/cluster"], "cluster-b",
        "{secret:#}"
    );
    assert_eq!(
        meta["annotations"]["topology.istio.io/network"], NETWORK,
        "{secret:#}"
    );
    let data = secret["data"].as_object().unwrap();
    assert_eq!(
        data.keys().collect::<Vec<_>>(),
        ["cluster-b"],
        "one key, the cluster's id"
    );
    let kubeconfig = base64::engine::general_purpose::STANDARD
        .decode(data["cluster-b"].as_str().unwrap())
        .unwrap();
    let kubeconfig = String::from_utf8(kubeconfig).unwrap();
    assert!(kubeconfig.contains(&b.url()), "{kubeconfig}");
    assert!(
        kubeconfig.contains("certificate-authority-data:"),
        "{kubeconfig}"
    );
    assert!(kubeconfig.contains("token:"), "{kubeconfig}");
    assert!(
        !kubeconfig.contains(b.admin_token()),
        "the admin's token must not leave: {kubeconfig}"
    );
    assert!(
        !kubeconfig.contains("exec") && !kubeconfig.contains("auth-provider"),
        "{kubeconfig}"
    );
}

/// Waits until the registry has cluster B synced and B's endpoint of `web` in a view.
async fn wait_for_cluster_b(reg: &TestRegistry) {
    let synced = eventually(STEP, || async {
        let all = clusters_json(reg).await;
        let states: Vec<(String, bool)> = all["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["cluster"].as_str().unwrap().to_string(),
                    c["synced"] == true,
                )
            })
            .collect();
        (states
            == [
                ("cluster-a".to_string(), true),
                ("cluster-b".to_string(), true),
            ])
        .then_some(())
    })
    .await;
    assert!(
        synced.is_some(),
        "cluster-b not synced through the Secret: {:#}",
        clusters_json(reg).await
    );
    let creds = reg.credentials("shop", "client").await.unwrap();
    let mut sub = reg
        .subscribe(&creds, &node("shop-client", NodeKind::Workload, NETWORK))
        .await
        .unwrap();
    let has_b = |view: &isthmus_proto::subscription::LocalView| match view
        .resources
        .get(&service_view_key(WEB))
    {
        Some(ViewResource::Service(sv)) => sv
            .endpoints
            .iter()
            .any(|e| e.address == B_ENDPOINT && e.cluster == "cluster-b"),
        _ => false,
    };
    loop {
        tokio::time::timeout(STEP, sub.next())
            .await
            .expect("cluster-b's web endpoint in the view in time")
            .unwrap();
        if has_b(&sub.view) {
            break;
        }
    }
}

fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    addr
}

#[tokio::test]
async fn a_secret_from_isthmusctl_joins_a_cluster_and_isthmusctl_clusters_shows_it() {
    if !kube::available() {
        return;
    }
    let ctl: PathBuf = workspace_binary("isthmus-registry", "isthmusctl");
    let (a, b) = tokio::join!(KubeApi::start("cluster-a"), KubeApi::start("cluster-b"));
    let (a, b) = (a.unwrap(), b.unwrap());
    let dir = tempfile::tempdir().unwrap();
    web_service(&b, B_ENDPOINT).await;
    let reg = registry_for(&a, dir.path()).await;

    // B's admin writes the Secret; A's admin applies it.
    let b_admin = b.admin_kubeconfig().to_str().unwrap();
    let secret = isthmusctl(
        &ctl,
        &[
            "cluster",
            "secret",
            "--kubeconfig",
            b_admin,
            "--name",
            "cluster-b",
            "--network",
            NETWORK,
            "--token-duration",
            "48h",
        ],
        None,
    )
    .await;
    assert!(secret.ok, "{}", secret.stderr);
    eprintln!(
        "$ isthmusctl cluster secret --kubeconfig B --name cluster-b --network {NETWORK} --token-duration 48h\n--- stderr:\n{}--- stdout:\n{}",
        secret.stderr, secret.stdout
    );
    assert!(
        secret.stderr.contains("expires at") && secret.stderr.contains("asked for 2d"),
        "{}",
        secret.stderr
    );
    a.kubectl_as(
        a.admin_kubeconfig(),
        &["apply", "-f", "-"],
        Some(&secret.stdout),
    )
    .await
    .unwrap();
    check_secret(&a, &b).await;
    // The reader role was installed in B by the command, not by the harness.
    b.kubectl(&["get", "clusterrolebinding", "isthmus-reader"])
        .await
        .unwrap();
    wait_for_cluster_b(&reg).await;

    // `isthmusctl clusters` shows what /debug/clusters says.
    let admin = reg.admin_addr().to_string();
    let table = isthmusctl(&ctl, &["clusters", "--admin", &admin], None).await;
    assert!(table.ok, "{}", table.stderr);
    eprintln!("$ isthmusctl clusters --admin {admin}\n{}", table.stdout);
    let json = isthmusctl(&ctl, &["clusters", "--admin", &admin, "--json"], None).await;
    assert!(json.ok, "{}", json.stderr);
    eprintln!(
        "$ isthmusctl clusters --admin {admin} --json\n{}",
        json.stdout
    );
    let served: Value = serde_json::from_str(&json.stdout).expect("--json is JSON");
    let rows = rows(&table.stdout);
    assert_eq!(rows[0], isthmus_registry::ctl::CLUSTER_COLUMNS);
    assert_eq!(rows.len(), 3, "{}", table.stdout);
    for (row, c) in rows[1..].iter().zip(served["clusters"].as_array().unwrap()) {
        let objects = |kind: &str| c["kinds"][kind]["objects"].to_string();
        assert_eq!(row[0], c["cluster"].as_str().unwrap());
        assert_eq!(row[1], c["network"].as_str().unwrap());
        assert_eq!(row[2], "synced", "{}", table.stdout);
        assert_eq!(
            row[3..6],
            [objects("Service"), objects("EndpointSlice"), objects("Pod")]
        );
        assert!(row[6].ends_with(" ago"), "{}", table.stdout);
        assert_eq!(row[7], "-", "not stale: {}", table.stdout);
    }
    assert_eq!(rows[2][0], "cluster-b");
    assert_eq!(
        rows[2][3], "2",
        "B's services: kubernetes and web: {}",
        table.stdout
    );

    // No registry at the address: it says which address, and why, and fails.
    let closed = closed_port();
    let down = isthmusctl(&ctl, &["clusters", "--admin", &closed], None).await;
    eprintln!("$ isthmusctl clusters --admin {closed}\n{}", down.stderr);
    assert!(!down.ok);
    assert!(
        down.stderr.contains(&closed) && down.stderr.contains("refused"),
        "{}",
        down.stderr
    );
}

/// The refusals of `cluster secret`, each naming what failed; and a registry watching no
/// cluster says how to add one.
#[tokio::test]
async fn isthmusctl_names_what_failed_and_an_empty_registry_says_how_to_add_clusters() {
    if !kube::available() {
        return;
    }
    let ctl = workspace_binary("isthmus-registry", "isthmusctl");
    let b = KubeApi::start("cluster-b").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let b_admin = b.admin_kubeconfig().to_str().unwrap().to_string();
    let missing = dir.path().join("missing.yaml").display().to_string();
    let reader = dir.path().join("reader.kubeconfig");
    b.reader_kubeconfig(&reader).await.unwrap();
    let reader = reader.display().to_string();
    let cases: [(&str, &[&str], &[&str]); 3] = [
        (&missing, &[], &["cannot read kubeconfig", &missing]),
        (
            &b_admin,
            &["--context", "nope"],
            &["no context \"nope\"", "cluster-b"],
        ),
        // The reader itself may not install roles: the API's refusal is named.
        (
            &reader,
            &[],
            &["cannot apply the reader role's", "forbidden", "403"],
        ),
    ];
    for (kubeconfig, extra, expected) in cases {
        let mut args = vec![
            "cluster",
            "secret",
            "--kubeconfig",
            kubeconfig,
            "--name",
            "cluster-b",
        ];
        args.extend(extra);
        let out = isthmusctl(&ctl, &args, None).await;
        eprintln!("isthmusctl cluster secret {extra:?}: {}", out.stderr);
        assert!(!out.ok && out.stdout.is_empty(), "{}", out.stdout);
        for e in expected {
            assert!(out.stderr.contains(e), "expected {e:?} in: {}", out.stderr);
        }
    }

    let reg = TestRegistry::start(&[]).await.unwrap();
    let admin = reg.admin_addr().to_string();
    let out = isthmusctl(&ctl, &["clusters", "--admin", &admin], None).await;
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "no Kubernetes clusters are watched (see --kubeconfig, --remote-kubeconfigs)\n"
    );
}
