//! The Kubernetes harness against the real API server it starts: the CRDs it installs
//! (Istio's and our Network) accept what a cluster accepts and refuse what it refuses, a
//! pod's status is written as a kubelet writes it, RBAC confines the shipped reader role,
//! tokens and CAs are checked, the API server stops and comes back with its data, and a
//! compaction expires old resourceVersions. The Kubernetes source's tests build on each of
//! these; here they are checked on their own, so a harness fault is not taken for a source
//! fault.

use std::time::Instant;

use isthmus_tests::harness::kube::{self, KubeApi, KubeOptions, READER_NAMESPACE};

const SERVICE_ENTRY_V1: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: apps}
spec:
  hosts: [db.example.internal]
  ports: [{number: 5432, name: tcp-postgres, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 10.1.0.5}]
"#;

const SERVICE_ENTRY_V1BETA1: &str = r#"
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: legacy, namespace: apps}
spec:
  hosts: [legacy.example.internal]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
"#;

const NETWORK: &str = r#"
apiVersion: isthmus.io/v1alpha1
kind: Network
metadata: {name: network-b}
spec:
  gateways:
  - {address: 192.0.2.20, sniPort: 15443, locality: eu-west/eu-west-1a}
  cidrs: [10.20.0.0/16]
"#;

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: apps, labels: {app: web}}
spec:
  containers: [{name: web, image: registry.example/web:1}]
"#;

const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: apps}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc12
  namespace: apps
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.1.2.3]
  conditions: {ready: true, serving: true, terminating: false}
  targetRef: {kind: Pod, name: web-0, namespace: apps}
  nodeName: node-1
---
apiVersion: v1
kind: Node
metadata:
  name: node-1
  labels: {topology.kubernetes.io/region: eu-west, topology.kubernetes.io/zone: eu-west-1a}
"#;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The checks share one API server: each pair costs seconds to start.
#[tokio::test]
async fn harness_cluster_checks_what_a_cluster_checks() {
    if !kube::available() {
        return;
    }
    let started = Instant::now();
    let mut api = KubeApi::start("cluster-a").await.unwrap();
    eprintln!(
        "etcd + kube-apiserver + CRDs ready in {:.1?}",
        started.elapsed()
    );
    api.create_namespace("apps", &[("topology.istio.io/network", "network-a")])
        .await
        .unwrap();

    istio_and_isthmus_kinds(&api).await;
    pod_status_as_a_kubelet_writes_it(&api).await;
    services_endpoint_slices_and_nodes(&api).await;
    reader_role_is_confined(&api).await;
    credentials_are_checked(&api).await;
    namespaces_come_and_go(&api).await;

    let (apiserver, etcd) = api.pids();
    eprintln!(
        "RSS: kube-apiserver {} MiB, etcd {} MiB",
        rss_kib(apiserver.unwrap()) / 1024,
        rss_kib(etcd) / 1024
    );
    api.stop_apiserver();
    let refused = api.kubectl(&["get", "pods", "-n", "apps"]).await;
    assert!(
        refused.is_err(),
        "the API server answered while stopped: {refused:?}"
    );
    let restarted = Instant::now();
    api.start_apiserver().await.unwrap();
    eprintln!("kube-apiserver restarted in {:.1?}", restarted.elapsed());
    let ip = api
        .kubectl(&[
            "get",
            "pod",
            "web-0",
            "-n",
            "apps",
            "-o",
            "jsonpath={.status.podIP}",
        ])
        .await
        .unwrap();
    assert_eq!(ip, "10.1.2.3", "etcd kept the pod across the restart");
}

async fn istio_and_isthmus_kinds(api: &KubeApi) {
    api.apply(SERVICE_ENTRY_V1).await.unwrap();
    api.apply(SERVICE_ENTRY_V1BETA1).await.unwrap();
    let hosts = api
        .kubectl(&[
            "get",
            "serviceentries.v1.networking.istio.io",
            "db",
            "-n",
            "apps",
            "-o",
            "jsonpath={.spec.hosts}",
        ])
        .await
        .unwrap();
    assert_eq!(hosts, r#"["db.example.internal"]"#);
    let legacy = api
        .request(
            "GET",
            "/apis/networking.istio.io/v1beta1/namespaces/apps/serviceentries/legacy",
            None,
        )
        .await
        .unwrap();
    assert_eq!(legacy.status, 200, "{}", legacy.body);
    assert!(
        legacy.body.contains("legacy.example.internal"),
        "{}",
        legacy.body
    );

    let invalid = SERVICE_ENTRY_V1
        .replace("name: db,", "name: bad,")
        .replace("STATIC", "SOMETIMES");
    let refused = api.apply(&invalid).await.unwrap_err().to_string();
    assert!(refused.contains("spec.resolution"), "{refused}");

    api.apply(NETWORK).await.unwrap();
    let gateways = api
        .kubectl(&[
            "get",
            "networks.isthmus.io",
            "network-b",
            "-o",
            "jsonpath={.spec.gateways[0].address}",
        ])
        .await
        .unwrap();
    assert_eq!(gateways, "192.0.2.20");
    let named = NETWORK.replace("192.0.2.20", "gw.example");
    let refused = api.apply(&named).await.unwrap_err().to_string();
    assert!(refused.contains("must be an IP address"), "{refused}");
    let host_bits = NETWORK.replace("10.20.0.0/16", "10.20.0.1/16");
    let refused = api.apply(&host_bits).await.unwrap_err().to_string();
    assert!(refused.contains("must be a CIDR"), "{refused}");
    let bad_port = NETWORK.replace("sniPort: 15443", "sniPort: 70000");
    let refused = api.apply(&bad_port).await.unwrap_err().to_string();
    assert!(refused.contains("sniPort"), "{refused}");
}

/// What no controller does here, a test does: EndpointSlices are written, not derived; the
/// API server itself still allocates ClusterIPs.
async fn services_endpoint_slices_and_nodes(api: &KubeApi) {
    api.apply(SERVICE).await.unwrap();
    let ip = api
        .kubectl(&[
            "get",
            "service",
            "web",
            "-n",
            "apps",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .await
        .unwrap();
    assert!(
        ip.starts_with("10.96."),
        "a ClusterIP from {}: {ip}",
        kube::SERVICE_CIDR
    );
    let slices = api
        .kubectl(&[
            "get",
            "endpointslices",
            "-n",
            "apps",
            "-l",
            "kubernetes.io/service-name=web",
            "-o",
            "jsonpath={.items[*].endpoints[*].addresses[*]}",
        ])
        .await
        .unwrap();
    assert_eq!(slices, "10.1.2.3", "only the slice the test wrote");
    let zone = api
        .kubectl(&[
            "get",
            "node",
            "node-1",
            "-o",
            r#"jsonpath={.metadata.labels.topology\.kubernetes\.io/zone}"#,
        ])
        .await
        .unwrap();
    assert_eq!(zone, "eu-west-1a");
}

async fn pod_status_as_a_kubelet_writes_it(api: &KubeApi) {
    api.apply(POD).await.unwrap();
    // The ServiceAccount admission plugin needs the namespace's default account, which the
    // harness made: the pod names it.
    let pod_field = |jsonpath: &'static str| async move {
        api.kubectl(&["get", "pod", "web-0", "-n", "apps", "-o", jsonpath])
            .await
            .unwrap()
    };
    assert_eq!(
        pod_field("jsonpath={.spec.serviceAccountName}").await,
        "default"
    );
    api.set_pod_status("apps", "web-0", "10.1.2.3".parse().unwrap(), true)
        .await
        .unwrap();
    let status =
        pod_field(r#"jsonpath={.status.podIP} {.status.conditions[?(@.type=="Ready")].status}"#)
            .await;
    assert_eq!(status, "10.1.2.3 True");
    api.set_pod_status("apps", "web-0", "10.1.2.3".parse().unwrap(), false)
        .await
        .unwrap();
    let ready = pod_field(r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#).await;
    assert_eq!(ready, "False");
}

async fn reader_role_is_confined(api: &KubeApi) {
    let kubeconfig = api.dir().join("reader.kubeconfig");
    api.reader_kubeconfig(&kubeconfig).await.unwrap();
    let reader = |args: &'static [&'static str]| api.kubectl_as(&kubeconfig, args, None);
    for kind in [
        "pods",
        "services",
        "endpointslices",
        "serviceentries.networking.istio.io",
        "workloadentries.networking.istio.io",
        "workloadgroups.networking.istio.io",
        "destinationrules.networking.istio.io",
        "virtualservices.networking.istio.io",
    ] {
        let listed = api
            .kubectl_as(&kubeconfig, &["get", kind, "-A"], None)
            .await;
        assert!(listed.is_ok(), "the reader cannot list {kind}: {listed:?}");
    }
    for kind in ["nodes", "namespaces", "networks.isthmus.io"] {
        let listed = api.kubectl_as(&kubeconfig, &["get", kind], None).await;
        assert!(listed.is_ok(), "the reader cannot list {kind}: {listed:?}");
    }
    reader(&["get", "secrets", "-n", READER_NAMESPACE])
        .await
        .unwrap();
    let create = api
        .kubectl_as(&kubeconfig, &["apply", "-f", "-"], Some(POD))
        .await;
    let create = create.unwrap_err().to_string();
    assert!(create.contains("forbidden"), "{create}");
    let secrets = reader(&["get", "secrets", "-n", "apps"])
        .await
        .unwrap_err()
        .to_string();
    assert!(secrets.contains("forbidden"), "{secrets}");
    let all_secrets = reader(&["get", "secrets", "-A"])
        .await
        .unwrap_err()
        .to_string();
    assert!(all_secrets.contains("forbidden"), "{all_secrets}");

    // A narrower role, without pods, for an account of its own.
    let narrow = api.dir().join("narrow.kubeconfig");
    api.service_account_kubeconfig(&narrow, READER_NAMESPACE, "narrow-reader", NARROW_ROLE)
        .await
        .unwrap();
    api.kubectl_as(&narrow, &["get", "services", "-A"], None)
        .await
        .unwrap();
    let pods = api.kubectl_as(&narrow, &["get", "pods", "-A"], None).await;
    let pods = pods.unwrap_err().to_string();
    assert!(pods.contains("forbidden"), "{pods}");
}

const NARROW_ROLE: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: narrow-reader}
rules:
- {apiGroups: [""], resources: [services], verbs: [get, list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: narrow-reader}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: narrow-reader}
subjects: [{kind: ServiceAccount, name: narrow-reader, namespace: isthmus-system}]
"#;

/// Without a namespace controller the harness finalizes a deleted namespace itself.
async fn namespaces_come_and_go(api: &KubeApi) {
    api.create_namespace("short-lived", &[("team", "a")])
        .await
        .unwrap();
    let label = api
        .kubectl(&[
            "get",
            "namespace",
            "short-lived",
            "-o",
            "jsonpath={.metadata.labels.team}",
        ])
        .await
        .unwrap();
    assert_eq!(label, "a");
    api.kubectl(&["get", "serviceaccount", "default", "-n", "short-lived"])
        .await
        .unwrap();
    api.delete_namespace("short-lived").await.unwrap();
    let gone = api.kubectl(&["get", "namespace", "short-lived"]).await;
    let gone = gone.unwrap_err().to_string();
    assert!(gone.contains("NotFound"), "{gone}");
}

async fn credentials_are_checked(api: &KubeApi) {
    let expired = api
        .expired_token(READER_NAMESPACE, "isthmus-reader")
        .await
        .unwrap();
    let path = api.dir().join("expired.kubeconfig");
    api.write_kubeconfig(&path, &expired).unwrap();
    let refused = api.kubectl_as(&path, &["get", "pods", "-A"], None).await;
    let refused = refused.unwrap_err().to_string();
    assert!(refused.contains("Unauthorized"), "{refused}");

    let other_ca = isthmus_proto::test_pki::TestCa::new("elsewhere.example").root_pem();
    let path = api.dir().join("wrong-ca.kubeconfig");
    api.write_kubeconfig_with(&path, api.admin_token(), &other_ca)
        .unwrap();
    let refused = api.kubectl_as(&path, &["get", "pods", "-A"], None).await;
    let refused = refused.unwrap_err().to_string();
    assert!(refused.contains("certificate"), "{refused}");
}

/// Without the watch cache, a compaction expires every older resourceVersion: a list at
/// one is refused and a watch from one ends at once with 410 Gone, which is what makes a
/// client relist.
#[tokio::test]
async fn compaction_expires_old_resource_versions() {
    if !kube::available() {
        return;
    }
    let api = KubeApi::start_with("cluster-c", KubeOptions { watch_cache: false })
        .await
        .unwrap();
    api.create_namespace("before", &[]).await.unwrap();
    let rv = api
        .kubectl(&[
            "get",
            "namespace",
            "before",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ])
        .await
        .unwrap();
    let list = format!("/api/v1/namespaces?resourceVersion={rv}&resourceVersionMatch=Exact");
    let watch = format!("/api/v1/namespaces?watch=true&resourceVersion={rv}&timeoutSeconds=2");
    let old = api.request("GET", &list, None).await.unwrap();
    assert_eq!(old.status, 200, "before compaction: {}", old.body);

    api.create_namespace("after", &[]).await.unwrap();
    let revision = api.compact_etcd().await.unwrap();
    assert!(revision > rv.parse::<i64>().unwrap());
    let old = api.request("GET", &list, None).await.unwrap();
    assert_eq!(old.status, 410, "after compaction: {}", old.body);
    assert!(old.body.contains("Expired"), "{}", old.body);
    let watched = api.request("GET", &watch, None).await.unwrap();
    assert!(
        watched.body.contains(r#""type":"ERROR""#) && watched.body.contains(r#""code":410"#),
        "a watch from a compacted version: {}",
        watched.body
    );

    // A test that fails with the cluster in scope stops its peers and keeps their logs.
    let dir = api.dir().to_path_buf();
    let (apiserver, etcd) = api.pids();
    let failed = std::thread::spawn(move || {
        let _api = api;
        panic!("(expected) a test failing with its KubeApi in scope");
    })
    .join();
    assert!(failed.is_err());
    for pid in [apiserver.unwrap(), etcd] {
        let proc = std::path::PathBuf::from(format!("/proc/{pid}"));
        assert!(!proc.exists(), "process {pid} outlived its KubeApi");
    }
    assert!(
        dir.join("apiserver.log").is_file(),
        "the logs were not kept"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
