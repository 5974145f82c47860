//! Sidecar injection through a real API server: the shipped webhook configuration is
//! registered (pointed at the in-process registry on loopback), the registry sets its
//! caBundle to the mesh root and publishes the root-cert ConfigMap into labelled
//! namespaces, and pods created through the API server come back injected, or unchanged
//! where they opt out, live elsewhere, or are injected already. With the registry stopped,
//! `failurePolicy: Fail` refuses pods naming the webhook and `Ignore` lets them through
//! uninjected. The registry writes with exactly the shipped roles (RBAC on).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use isthmus_tests::harness::kube::{self, KubeApi};
use isthmus_tests::harness::pod;
use isthmus_tests::{eventually, http_get, init_ca, metric, TestRegistry};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one expected change may take (generous: the machines are shared; nothing here
/// measures speed).
const STEP: Duration = Duration::from_secs(60);
const WEBHOOK_CONFIG: &str = "isthmus-sidecar-injector";
const WEBHOOK: &str = "sidecar-injector.isthmus.io";

/// A registry watching `api` as its own cluster through the `isthmus-registry` service
/// account with the shipped roles (reader + registry).
async fn registry_for(api: &KubeApi, dir: &Path) -> TestRegistry {
    let kubeconfig = dir.join("registry.kubeconfig");
    pod::registry_kubeconfig(api, &kubeconfig).await.unwrap();
    TestRegistry::start_with(&[], |cfg| {
        cfg.kubernetes.local = Some(isthmus_registry::app::LocalCluster::Kubeconfig(kubeconfig));
        cfg.kubernetes.probe_interval = Duration::from_millis(300);
    })
    .await
    .unwrap()
}

/// Installs the shipped webhook configuration, pointed at `addr` instead of the Service.
async fn register_webhook(api: &KubeApi, addr: SocketAddr) {
    pod::register_webhook(api, addr).await.unwrap();
}

fn root_pem(reg: &TestRegistry) -> String {
    std::fs::read_to_string(reg.ca_root()).unwrap()
}

/// Waits until the registry has set the webhook's caBundle to the mesh root.
async fn ca_bundle_is_root(api: &KubeApi, root: &str) {
    let got = eventually(STEP, || async {
        let b64 = api
            .kubectl(&[
                "get",
                "mutatingwebhookconfiguration",
                WEBHOOK_CONFIG,
                "-o",
                "jsonpath={.webhooks[0].clientConfig.caBundle}",
            ])
            .await
            .ok()?;
        let pem = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .ok()?;
        (pem == root.as_bytes()).then_some(())
    })
    .await;
    assert!(
        got.is_some(),
        "the registry did not set caBundle to the mesh root"
    );
}

fn pod(name: &str, ns: &str, annotations: Value, labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": annotations},
        "spec": {
            "containers": [{
                "name": "web",
                "image": "registry.example/web:1",
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
                "livenessProbe": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 3},
            }],
        },
    })
}

async fn create(api: &KubeApi, object: &Value) -> anyhow::Result<String> {
    api.kubectl_as(
        api.admin_kubeconfig(),
        &["create", "-f", "-"],
        Some(&object.to_string()),
    )
    .await
}

async fn get_pod(api: &KubeApi, ns: &str, name: &str) -> Value {
    let out = api
        .kubectl(&["get", "pod", name, "-n", ns, "-o", "json"])
        .await
        .unwrap();
    serde_json::from_str(&out).unwrap()
}

/// Creates the pod, retrying while the API server has not yet loaded the webhook
/// configuration as last changed (it reloads them asynchronously), and returns it as
/// stored.
async fn create_injected(api: &KubeApi, object: &Value) -> Value {
    let (ns, name) = (
        object["metadata"]["namespace"].as_str().unwrap(),
        object["metadata"]["name"].as_str().unwrap(),
    );
    let last = std::sync::Mutex::new(String::new());
    let created = eventually(STEP, || async {
        match create(api, object).await {
            Ok(_) => Some(()),
            Err(e) => {
                *last.lock().unwrap() = e.to_string();
                None
            }
        }
    })
    .await;
    let last = last.into_inner().unwrap();
    assert!(
        created.is_some(),
        "pod {ns}/{name} was never admitted: {last}"
    );
    get_pod(api, ns, name).await
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .map(|a| {
            a.iter()
                .map(|c| c["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn not_injected(stored: &Value) {
    assert_eq!(names(&stored["spec"]["containers"]), ["web"], "{stored:#}");
    assert!(stored["spec"]["initContainers"].is_null(), "{stored:#}");
    assert!(
        stored["metadata"]["annotations"]["sidecar.isthmus.io/status"].is_null(),
        "{stored:#}"
    );
    assert_eq!(
        stored["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"],
        "/ready"
    );
}

/// An API server with namespace `shop` labelled for injection and the `plain` ones not, a
/// registry watching it, and the shipped webhook configuration pointed at the registry,
/// whose caBundle the registry has set.
async fn injecting_cluster(plain: &[&str]) -> (KubeApi, TestRegistry, tempfile::TempDir) {
    let api = KubeApi::start("cluster-a").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    api.create_namespace("shop", &[("isthmus-injection", "enabled")])
        .await
        .unwrap();
    for ns in plain {
        api.create_namespace(ns, &[]).await.unwrap();
    }
    let reg = registry_for(&api, dir.path()).await;
    let addr = reg
        .webhook_addr()
        .expect("a registry with a cluster serves the webhook");
    register_webhook(&api, addr).await;
    ca_bundle_is_root(&api, &root_pem(&reg)).await;
    (api, reg, dir)
}

#[tokio::test]
async fn pods_created_through_the_api_server_are_injected() {
    if !kube::available() {
        return;
    }
    let (api, reg, _dir) = injecting_cluster(&["plain"]).await;
    let root = root_pem(&reg);

    // The mesh root in the labelled namespace only.
    let published = eventually(STEP, || async {
        pod::configmap_root(&api, "shop")
            .await
            .filter(|r| *r == root)
    })
    .await;
    assert!(published.is_some(), "no isthmus-ca-root-cert in shop");
    assert_eq!(pod::configmap_root(&api, "plain").await, None);

    // A pod of the labelled namespace is stored injected.
    let stored = create_injected(
        &api,
        &pod("web-1", "shop", json!({}), json!({"app": "web"})),
    )
    .await;
    let spec = &stored["spec"];
    assert_eq!(
        names(&spec["containers"]),
        ["web", "isthmus-proxy"],
        "{stored:#}"
    );
    assert_eq!(names(&spec["initContainers"]), ["isthmus-init"]);
    let init = &spec["initContainers"][0];
    assert_eq!(init["args"][0], "capture-init");
    assert!(init["args"]
        .as_array()
        .unwrap()
        .contains(&json!("--capture-cidr=240.240.0.0/16,10.96.0.0/12")));
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        json!(["NET_ADMIN", "NET_RAW"])
    );
    let volumes = names(&spec["volumes"]);
    for v in ["isthmus-token", "isthmus-ca-root", "isthmus-state"] {
        assert!(volumes.contains(&v.to_string()), "{volumes:?}");
    }
    let token = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "isthmus-token")
        .unwrap();
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "isthmus-ca"
    );
    let web = &spec["containers"][0];
    assert_eq!(
        web["readinessProbe"]["httpGet"],
        json!({"path": "/app-health/web/readyz", "port": 15021, "scheme": "HTTP"})
    );
    assert_eq!(
        web["livenessProbe"]["httpGet"],
        json!({"path": "/app-health/web/livez", "port": 15021, "scheme": "HTTP"})
    );
    let proxy = &spec["containers"][1];
    let probers = proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "ISTHMUS_APP_PROBERS")
        .expect("ISTHMUS_APP_PROBERS");
    let probers = probers["value"].as_str().unwrap();
    // The sidecar reads what the injector wrote.
    if let Err(e) = isthmus_vm_agent::pod::AppProbers::parse(probers) {
        panic!("the agent cannot read ISTHMUS_APP_PROBERS {probers}: {e}");
    }
    let probers: Value = serde_json::from_str(probers).unwrap();
    assert_eq!(
        probers["/app-health/web/readyz"],
        json!({"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP", "httpHeaders": []}, "timeoutSeconds": 1})
    );
    assert_eq!(
        probers["/app-health/web/livez"],
        json!({"tcpSocket": {"port": 8080}, "timeoutSeconds": 3})
    );
    assert_eq!(
        stored["metadata"]["labels"]["security.istio.io/tlsMode"],
        "istio"
    );
    assert!(stored["metadata"]["annotations"]["sidecar.isthmus.io/status"].is_string());

    // Opted out (annotation, and Istio's label), or in a namespace without the label:
    // stored as sent.
    let opted = pod(
        "web-opt-out",
        "shop",
        json!({"sidecar.isthmus.io/inject": "false"}),
        json!({}),
    );
    create(&api, &opted).await.unwrap();
    not_injected(&get_pod(&api, "shop", "web-opt-out").await);
    let istio_opted = pod(
        "web-istio-opt-out",
        "shop",
        json!({}),
        json!({"sidecar.istio.io/inject": "false"}),
    );
    create(&api, &istio_opted).await.unwrap();
    not_injected(&get_pod(&api, "shop", "web-istio-opt-out").await);
    create(&api, &pod("web-plain", "plain", json!({}), json!({})))
        .await
        .unwrap();
    not_injected(&get_pod(&api, "plain", "web-plain").await);

    // A pod spec that is injected already comes back as sent: nothing doubled.
    let mut again = stored.clone();
    again["metadata"] = json!({
        "name": "web-again",
        "namespace": "shop",
        "labels": stored["metadata"]["labels"],
        "annotations": stored["metadata"]["annotations"],
    });
    again.as_object_mut().unwrap().remove("status");
    let token_volume = again["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| !v["name"].as_str().unwrap().starts_with("kube-api-access"))
        .cloned()
        .collect::<Vec<_>>();
    again["spec"]["volumes"] = json!(token_volume);
    // The service-account admission adds its own volume and mounts again, and the
    // priority admission refuses a pod that names its priority itself.
    let spec = again["spec"].as_object_mut().unwrap();
    for field in ["nodeName", "priority", "preemptionPolicy"] {
        spec.remove(field);
    }
    for list in ["containers", "initContainers"] {
        for c in again["spec"][list].as_array_mut().unwrap() {
            let mounts: Vec<Value> = c["volumeMounts"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|m| !m["name"].as_str().unwrap().starts_with("kube-api-access"))
                .collect();
            c["volumeMounts"] = json!(mounts);
        }
    }
    create(&api, &again).await.unwrap();
    let stored_again = get_pod(&api, "shop", "web-again").await;
    assert_eq!(
        names(&stored_again["spec"]["containers"]),
        ["web", "isthmus-proxy"]
    );
    assert_eq!(
        names(&stored_again["spec"]["initContainers"]),
        ["isthmus-init"]
    );
    assert_eq!(
        stored_again["spec"]["containers"][0]["readinessProbe"],
        stored["spec"]["containers"][0]["readinessProbe"]
    );

    // A hostNetwork pod is admitted without the sidecar.
    let mut host = pod("web-host", "shop", json!({}), json!({}));
    host["spec"]["hostNetwork"] = json!(true);
    create(&api, &host).await.unwrap();
    not_injected(&get_pod(&api, "shop", "web-host").await);

    // The ConfigMap comes back after a deletion.
    api.delete("configmap", Some("shop"), "isthmus-ca-root-cert")
        .await
        .unwrap();
    let back = eventually(STEP, || async {
        pod::configmap_root(&api, "shop")
            .await
            .filter(|r| *r == root)
    })
    .await;
    assert!(back.is_some(), "isthmus-ca-root-cert was not re-created");

    // A namespace labelled later gets it too.
    api.create_namespace("late", &[("isthmus-injection", "enabled")])
        .await
        .unwrap();
    let late = eventually(STEP, || async {
        pod::configmap_root(&api, "late")
            .await
            .filter(|r| *r == root)
    })
    .await;
    assert!(
        late.is_some(),
        "no isthmus-ca-root-cert in a newly labelled namespace"
    );

    // A new mesh root (the cluster's whole CA replaced on disk) reaches the ConfigMaps and
    // the caBundle, and the webhook, now serving a certificate of the new intermediate, is
    // still trusted by the API server.
    let other = tempfile::tempdir().unwrap();
    init_ca(other.path(), "cluster.local", "cluster-a", false);
    let new_root = std::fs::read_to_string(other.path().join("cluster-a/root-cert.pem")).unwrap();
    assert_ne!(new_root, root);
    for file in [
        "root-cert.pem",
        "cert-chain.pem",
        "ca-key.pem",
        "ca-cert.pem",
    ] {
        let tmp = reg.ca_dir().join(format!("{file}.new"));
        std::fs::copy(other.path().join("cluster-a").join(file), &tmp).unwrap();
        std::fs::rename(&tmp, reg.ca_dir().join(file)).unwrap();
    }
    for ns in ["shop", "late"] {
        let updated = eventually(STEP, || async {
            pod::configmap_root(&api, ns)
                .await
                .filter(|r| *r == new_root)
        })
        .await;
        assert!(
            updated.is_some(),
            "{ns}'s isthmus-ca-root-cert kept the old root"
        );
    }
    ca_bundle_is_root(&api, &new_root).await;
    let rotated = create_injected(&api, &pod("web-rotated", "shop", json!({}), json!({}))).await;
    assert_eq!(
        names(&rotated["spec"]["containers"]),
        ["web", "isthmus-proxy"]
    );

    let metrics = reg.metrics().await;
    assert!(
        metric(&metrics, "isthmus_sidecar_injections_total").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "isthmus_sidecar_injection_skips_total{reason=\"opted_out\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "isthmus_sidecar_injection_skips_total{reason=\"already_injected\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn a_webhook_that_is_down_fails_closed_unless_the_policy_is_ignore() {
    if !kube::available() {
        return;
    }
    let (api, mut reg, _dir) = injecting_cluster(&[]).await;
    let stored = create_injected(&api, &pod("web-1", "shop", json!({}), json!({}))).await;
    assert_eq!(
        names(&stored["spec"]["containers"]),
        ["web", "isthmus-proxy"]
    );

    reg.stop().await;
    let err = create(&api, &pod("web-2", "shop", json!({}), json!({})))
        .await
        .expect_err("failurePolicy Fail admits no pod while the webhook is down");
    let err = err.to_string();
    assert!(err.contains(WEBHOOK), "{err}");
    assert!(
        api.kubectl(&["get", "pod", "web-2", "-n", "shop"])
            .await
            .is_err(),
        "the refused pod was stored"
    );

    let ignore = json!([{"op": "replace", "path": "/webhooks/0/failurePolicy", "value": "Ignore"}]);
    api.kubectl(&[
        "patch",
        "mutatingwebhookconfiguration",
        WEBHOOK_CONFIG,
        "--type=json",
        "-p",
        &ignore.to_string(),
    ])
    .await
    .unwrap();
    let stored = create_injected(&api, &pod("web-3", "shop", json!({}), json!({}))).await;
    not_injected(&stored);
}

/// POSTs `body` to the webhook over TLS, trusting only the mesh root: (status, body).
async fn post(addr: SocketAddr, root: &Path, body: &[u8]) -> (u16, String) {
    let mut roots = rustls::RootCertStore::empty();
    for c in isthmus_proto::tls::read_certs(root).unwrap() {
        roots.add(c).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(isthmus_proto::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("the webhook's certificate verifies against the mesh root for 127.0.0.1");
    let head = format!(
        "POST /inject HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    // A body over the limit is answered before it is read whole.
    let _ = tls.write_all(body).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(STEP, tls.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn garbage_posted_to_the_webhook_gets_400_naming_what_is_wrong() {
    // No registry without a cluster serves the webhook unless told where.
    let plain = TestRegistry::start(&[]).await.unwrap();
    assert_eq!(plain.webhook_addr(), None);

    let reg = TestRegistry::start_with(&[], |cfg| {
        cfg.webhook.addr = Some("127.0.0.1:0".parse().unwrap());
        cfg.webhook.dns_names = vec!["127.0.0.1".into()];
    })
    .await
    .unwrap();
    let addr = reg.webhook_addr().unwrap();
    let root = reg.ca_root();

    let (status, body) = post(addr, &root, b"not json at all").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not an AdmissionReview"), "{body}");

    let (status, body) = post(
        addr,
        &root,
        br#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"}}"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("expected apiVersion admission.k8s.io/v1"),
        "{body}"
    );

    let big = vec![b' '; 5 * 1024 * 1024];
    let (status, body) = post(addr, &root, &big).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("over the webhook's limit"), "{body}");

    // A review whose object is not a pod it can read: allowed=false with the field.
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u-1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": "shop",
            "operation": "CREATE",
            "object": {"spec": {"containers": {"name": "web"}}},
        },
    });
    let (status, body) = post(addr, &root, review.to_string().as_bytes()).await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["response"]["uid"], "u-1");
    assert_eq!(answer["response"]["allowed"], false);
    assert!(
        answer["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("spec.containers"),
        "{body}"
    );

    let (_, metrics) = http_get(reg.admin_addr(), "/metrics").await.unwrap();
    assert_eq!(
        metric(
            &metrics,
            "isthmus_sidecar_injection_errors_total{reason=\"not_a_review\"}"
        ),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "isthmus_sidecar_injection_errors_total{reason=\"too_large\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}
