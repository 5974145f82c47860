//! The Kubernetes source against real API servers: a registry watches clusters through the
//! shipped reader role (RBAC on, so the role is proven sufficient), objects are created,
//! changed and deleted through the API as a cluster's controllers would, and each network's
//! view is read over the Watch as a proxy reads it.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use isthmus_proto::model::{service_view_key, EndpointKind, Health, NodeKind, ViewEndpoint};
use isthmus_proto::model::{ServiceView, ViewResource};
use isthmus_proto::subscription::{LocalView, Subscription};
use isthmus_registry::app::{LocalCluster, RegistryConfig};
use isthmus_tests::harness::kube::{self, KubeApi, KubeOptions, READER_NAMESPACE};
use isthmus_tests::{eventually, http_get, metric, node, TestRegistry, NETWORK};
use serde_json::Value;

/// How long one expected change may take to reach the view (generous: the machines are
/// shared; nothing here measures speed).
const STEP: Duration = Duration::from_secs(60);
const WEB: &str = "web.shop.svc.cluster.local";

/// A registry watching `api` as its own cluster (`cluster-a`), through the reader role.
async fn registry_for(
    api: &KubeApi,
    dir: &Path,
    adjust: impl FnOnce(&mut RegistryConfig),
) -> TestRegistry {
    let kubeconfig = dir.join("reader.kubeconfig");
    api.reader_kubeconfig(&kubeconfig).await.unwrap();
    TestRegistry::start_with(&[], |cfg| {
        cfg.kubernetes.local = Some(LocalCluster::Kubeconfig(kubeconfig));
        cfg.kubernetes.probe_interval = Duration::from_millis(300);
        adjust(cfg);
    })
    .await
    .unwrap()
}

async fn subscriber(reg: &TestRegistry, ns: &str, cluster: &str) -> Subscription {
    let creds = reg.credentials(ns, "client").await.unwrap();
    let mut n = node(
        &format!("{ns}-client-{cluster}"),
        NodeKind::Workload,
        NETWORK,
    );
    n.cluster = cluster.to_string();
    let mut sub = reg.subscribe(&creds, &n).await.unwrap();
    sub.next().await.unwrap();
    sub
}

/// Receives updates until `pred` holds on the view; returns the keys removed meanwhile.
async fn until(
    sub: &mut Subscription,
    what: &str,
    pred: impl Fn(&LocalView) -> bool,
) -> Vec<String> {
    let mut removed = Vec::new();
    while !pred(&sub.view) {
        let update = tokio::time::timeout(STEP, sub.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{what}: not in the view in time; view: {:#?}",
                    sub.view.resources.keys()
                )
            })
            .expect("stream open");
        removed.extend(update.removed);
    }
    removed
}

fn service<'a>(view: &'a LocalView, host: &str) -> Option<&'a ServiceView> {
    match view.resources.get(&service_view_key(host)) {
        Some(ViewResource::Service(sv)) => Some(sv),
        _ => None,
    }
}

fn endpoints(view: &LocalView, host: &str) -> Vec<ViewEndpoint> {
    service(view, host)
        .map(|s| s.endpoints.clone())
        .unwrap_or_default()
}

fn addresses(view: &LocalView, host: &str) -> Vec<String> {
    let mut a: Vec<String> = endpoints(view, host)
        .iter()
        .map(|e| e.address.to_string())
        .collect();
    a.sort();
    a
}

async fn clusters(reg: &TestRegistry) -> Value {
    let (code, body) = http_get(reg.admin_addr(), "/debug/clusters").await.unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn cluster_status(reg: &TestRegistry, id: &str) -> Value {
    clusters(reg).await["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cluster"] == id)
        .cloned()
        .unwrap_or(Value::Null)
}

fn pod(name: &str, ns: &str, sa: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nspec:\n  serviceAccountName: {sa}\n  nodeName: node-1\n  containers: [{{name: app, image: registry.example/app:1}}]\n"
    )
}

fn kube_service(name: &str, ns: &str, annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}, annotations: {{{annotations}}}}}\nspec:\n  selector: {{app: {name}}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n  - {{name: api, port: 9090, appProtocol: grpc}}\n"
    )
}

/// An EndpointSlice of Service `svc` with one ready endpoint per `(address, pod)`.
fn slice(name: &str, ns: &str, svc: &str, members: &[(&str, Option<&str>)], ready: bool) -> String {
    let mut eps = String::new();
    for (address, pod) in members {
        eps.push_str(&format!(
            "- addresses: [{address}]\n  conditions: {{ready: {ready}, serving: {ready}, terminating: false}}\n  nodeName: node-1\n"
        ));
        if let Some(p) = pod {
            eps.push_str(&format!(
                "  targetRef: {{kind: Pod, name: {p}, namespace: {ns}}}\n"
            ));
        }
    }
    if members.is_empty() {
        eps.push_str("[]\n");
    }
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: {ns}, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080, protocol: TCP}}\n- {{name: api, port: 9090, protocol: TCP}}\nendpoints:{}{eps}",
        if members.is_empty() { " " } else { "\n" }
    )
}

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-1\n  labels: {topology.kubernetes.io/region: eu-west, topology.kubernetes.io/zone: eu-west-1a, topology.istio.io/subzone: rack-3}\n";

/// Namespace `shop` with a pod `web-0` (service account `web`) on node-1, ready at `ip`.
async fn shop_with_pod(api: &KubeApi, ip: &str) {
    api.create_namespace("shop", &[]).await.unwrap();
    api.create_service_account("shop", "web").await.unwrap();
    api.apply(NODE).await.unwrap();
    api.apply(&pod("web-0", "shop", "web", "app: web, version: v1"))
        .await
        .unwrap();
    api.set_pod_status("shop", "web-0", ip.parse::<IpAddr>().unwrap(), true)
        .await
        .unwrap();
}

async fn cluster_ip(api: &KubeApi, ns: &str, name: &str) -> String {
    api.kubectl(&[
        "get",
        "service",
        name,
        "-n",
        ns,
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])
    .await
    .unwrap()
}

#[tokio::test]
async fn a_cluster_s_services_pods_and_istio_objects_reach_the_view() {
    if !kube::available() {
        return;
    }
    let api = KubeApi::start("cluster-a").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    shop_with_pod(&api, "10.244.0.5").await;
    api.apply(&kube_service("web", "shop", "")).await.unwrap();
    api.apply(&slice(
        "web-1",
        "shop",
        "web",
        &[("10.244.0.5", Some("web-0"))],
        true,
    ))
    .await
    .unwrap();
    let reg = registry_for(&api, dir.path(), |_| {}).await;
    let mut sub = subscriber(&reg, "shop", "cluster-a").await;

    // The Service and its endpoint, mapped as istiod maps them.
    until(&mut sub, "web's endpoint", |v| {
        addresses(v, WEB) == ["10.244.0.5"]
    })
    .await;
    let sv = service(&sub.view, WEB).unwrap().clone();
    let vip = cluster_ip(&api, "shop", "web").await;
    assert!(
        sv.service
            .addresses
            .iter()
            .any(|a| a.address == vip && a.cluster == "cluster-a"),
        "the ClusterIP {vip} is cluster-a's address: {:?}",
        sv.service.addresses
    );
    let protocols: Vec<(&str, &str)> = sv
        .service
        .ports
        .iter()
        .map(|p| (p.name.as_str(), p.protocol.as_str()))
        .collect();
    assert_eq!(protocols, [("http", "HTTP"), ("api", "GRPC")]);
    let e = &sv.endpoints[0];
    assert_eq!(e.kind, EndpointKind::Workload);
    assert_eq!(e.ports.get(&80), Some(&8080));
    assert_eq!(e.ports.get(&9090), Some(&9090));
    assert_eq!(
        e.identities[0].as_str(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(
        (
            e.locality.region.as_str(),
            e.locality.zone.as_str(),
            e.locality.subzone.as_str()
        ),
        ("eu-west", "eu-west-1a", "rack-3")
    );
    assert_eq!(e.labels.get("version").map(String::as_str), Some("v1"));
    assert_eq!(
        (e.cluster.as_str(), e.health, e.stale_since_ms),
        ("cluster-a", Health::Healthy, 0)
    );

    // A node moved to another zone: its endpoints' locality follows.
    api.apply(&NODE.replace("eu-west-1a", "eu-west-1b"))
        .await
        .unwrap();
    until(&mut sub, "the node's new zone", |v| {
        endpoints(v, WEB).first().map(|e| e.locality.zone.clone()) == Some("eu-west-1b".into())
    })
    .await;
    // A pod relabelled, an endpoint no longer ready, then gone; the Service deleted.
    api.apply(&pod("web-0", "shop", "web", "app: web, version: v2"))
        .await
        .unwrap();
    until(&mut sub, "the pod's new label", |v| {
        endpoints(v, WEB)
            .first()
            .and_then(|e| e.labels.get("version").cloned())
            == Some("v2".into())
    })
    .await;
    api.apply(&slice(
        "web-1",
        "shop",
        "web",
        &[("10.244.0.5", Some("web-0"))],
        false,
    ))
    .await
    .unwrap();
    until(&mut sub, "the endpoint unhealthy", |v| {
        endpoints(v, WEB).first().map(|e| e.health) == Some(Health::Unhealthy)
    })
    .await;
    api.apply(&slice("web-1", "shop", "web", &[], true))
        .await
        .unwrap();
    until(&mut sub, "no endpoints", |v| {
        service(v, WEB).is_some() && endpoints(v, WEB).is_empty()
    })
    .await;
    api.delete("service", Some("shop"), "web").await.unwrap();
    until(&mut sub, "web deleted", |v| service(v, WEB).is_none()).await;

    // Istio's own objects, as the cluster stores them (v1 and v1beta1), and our Network.
    api.apply(ISTIO_OBJECTS).await.unwrap();
    until(&mut sub, "the ServiceEntry's selected WorkloadEntry", |v| {
        addresses(v, "db.shop.internal") == ["10.10.0.7"]
    })
    .await;
    // The cluster's DestinationRule and VirtualService of it (v1 and v1beta1).
    until(&mut sub, "db's traffic rules", |v| {
        service(v, "db.shop.internal").is_some_and(|sv| {
            sv.subsets.iter().map(|s| s.name.as_str()).eq(["primary"])
                && sv.policy.max_connections == Some(20)
                && sv.routes.len() == 1
                && sv.routes[0].destinations[0].subset == "primary"
                && sv.routes[0].destinations[0].weight == 100
        })
    })
    .await;
    // A namespace labelled onto another network: its endpoints are reached through that
    // network's gateway, which the cluster's Network object defines.
    api.create_namespace("edge", &[("topology.istio.io/network", "network-b")])
        .await
        .unwrap();
    api.apply(&kube_service("api", "edge", "")).await.unwrap();
    api.apply(&slice(
        "api-1",
        "edge",
        "api",
        &[("10.250.0.9", None)],
        true,
    ))
    .await
    .unwrap();
    until(
        &mut sub,
        "edge's endpoint behind network-b's gateway",
        |v| {
            endpoints(v, "api.edge.svc.cluster.local").iter().any(|e| {
                e.kind == EndpointKind::Gateway && e.address.ip() == Some([192, 0, 2, 20].into())
            })
        },
    )
    .await;

    // A WorkloadGroup in the cluster is in the catalog for VMs to register from, and goes
    // when it is deleted.
    let group = "WorkloadGroup/shop/db-vms";
    let in_catalog = |key: &'static str| {
        let views = reg.handle().views.clone();
        move || {
            let found = views.with_catalog(|c| c.get(key).map(|r| r.origin.clone()));
            async move { found }
        }
    };
    let origin = eventually(STEP, in_catalog(group)).await;
    assert_eq!(origin.as_deref(), Some("kube:cluster-a/"));
    api.delete("workloadgroup", Some("shop"), "db-vms")
        .await
        .unwrap();
    let gone = eventually(STEP, || {
        let f = in_catalog(group);
        async move { f().await.is_none().then_some(()) }
    })
    .await;
    assert!(
        gone.is_some(),
        "the deleted WorkloadGroup is still in the catalog"
    );

    let status = cluster_status(&reg, "cluster-a").await;
    assert_eq!(status["synced"], true, "{status:#}");
    assert_eq!(status["summary"], "synced", "{status:#}");
    assert!(
        status["kinds"]["Pod"]["objects"].as_u64() >= Some(1),
        "{status:#}"
    );
    assert_eq!(
        status["kinds"]["ServiceEntry"]["not_installed"], false,
        "{status:#}"
    );
    let metrics = reg.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "isthmus_registry_cluster_synced{cluster=\"cluster-a\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert!(reg.handle().readiness.is_ready());
}

const ISTIO_OBJECTS: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: shop}
spec:
  hosts: [db.shop.internal]
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]
  resolution: STATIC
  workloadSelector: {labels: {app: db}}
---
apiVersion: networking.istio.io/v1beta1
kind: WorkloadEntry
metadata: {name: db-vm, namespace: shop}
spec: {address: 10.10.0.7, labels: {app: db}, serviceAccount: db}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: db-vms, namespace: shop}
spec:
  metadata: {labels: {app: db}}
  template: {serviceAccount: db, ports: {tcp-pg: 5432}}
---
apiVersion: isthmus.io/v1alpha1
kind: Network
metadata: {name: network-b}
spec:
  gateways: [{address: 192.0.2.20}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db, namespace: shop}
spec:
  host: db.shop.internal
  subsets: [{name: primary, labels: {app: db}}]
  trafficPolicy: {connectionPool: {tcp: {maxConnections: 20}}}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: db, namespace: shop}
spec:
  hosts: [db.shop.internal]
  tcp:
  - route: [{destination: {host: db.shop.internal, subset: primary}}]
"#;

/// A remote-cluster Secret as Istio writes one: the kubeconfig of `cluster` under its id.
fn remote_secret(cluster: &str, kubeconfig: &Path, network: &str) -> String {
    use base64::Engine;
    let text = std::fs::read_to_string(kubeconfig).unwrap();
    let data = base64::engine::general_purpose::STANDARD.encode(text);
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: istio-remote-secret-{cluster}\n  namespace: {READER_NAMESPACE}\n  labels: {{istio/multiCluster: \"true\"}}\n  annotations: {{topology.istio.io/network: {network}}}\ndata:\n  {cluster}: {data}\n"
    )
}

#[tokio::test]
async fn clusters_join_by_secret_and_file_merge_by_namespace_and_fail_alone() {
    if !kube::available() {
        return;
    }
    let (a, b) = tokio::join!(KubeApi::start("cluster-a"), KubeApi::start("cluster-b"));
    let (a, b) = (a.unwrap(), b.unwrap());
    let dir = tempfile::tempdir().unwrap();
    for (api, ip) in [(&a, "10.244.0.5"), (&b, "10.245.0.5")] {
        shop_with_pod(api, ip).await;
        api.apply(&kube_service("web", "shop", "")).await.unwrap();
        api.apply(&slice("web-1", "shop", "web", &[(ip, Some("web-0"))], true))
            .await
            .unwrap();
        let local = "networking.isthmus.io/cluster-local: \"true\"";
        api.apply(&kube_service("cache", "shop", local))
            .await
            .unwrap();
        api.apply(&slice(
            "cache-1",
            "shop",
            "cache",
            &[(ip, Some("web-0"))],
            true,
        ))
        .await
        .unwrap();
    }
    // Cluster B joins through a Secret in A, with the shipped reader role in B.
    let b_reader = dir.path().join("b.kubeconfig");
    b.reader_kubeconfig(&b_reader).await.unwrap();
    // Bad credentials come from a directory of kubeconfigs: each such cluster fails on
    // its own, with its reason, and the others carry on.
    let remotes = dir.path().join("remotes");
    std::fs::create_dir(&remotes).unwrap();
    let admin = b.admin_token().to_string();
    b.write_kubeconfig_with(&remotes.join("wrong-ca.yaml"), &admin, a.ca_pem())
        .unwrap();
    let expired = b
        .expired_token(READER_NAMESPACE, "isthmus-reader")
        .await
        .unwrap();
    b.write_kubeconfig(&remotes.join("expired.yaml"), &expired)
        .unwrap();
    const NO_PODS: &str = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: narrow, namespace: isthmus-system}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: narrow}\nrules:\n- apiGroups: ['']\n  resources: [services, nodes, namespaces]\n  verbs: [get, list, watch]\n- apiGroups: [discovery.k8s.io]\n  resources: [endpointslices]\n  verbs: [get, list, watch]\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {name: narrow}\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: narrow}\nsubjects: [{kind: ServiceAccount, name: narrow, namespace: isthmus-system}]\n";
    b.service_account_kubeconfig(
        &remotes.join("narrow.yaml"),
        READER_NAMESPACE,
        "narrow",
        NO_PODS,
    )
    .await
    .unwrap();
    let reg = registry_for(&a, dir.path(), |cfg| {
        cfg.kubernetes.remote_kubeconfigs = Some(remotes.clone());
        cfg.kubernetes.sync_deadline = Duration::from_secs(20);
    })
    .await;
    a.apply(&remote_secret("cluster-b", &b_reader, NETWORK))
        .await
        .unwrap();

    // Namespace sameness: one service, both clusters' endpoints.
    let mut sub_a = subscriber(&reg, "shop", "cluster-a").await;
    until(&mut sub_a, "web in both clusters", |v| {
        addresses(v, WEB) == ["10.244.0.5", "10.245.0.5"]
    })
    .await;
    let mut clusters_of: Vec<String> = endpoints(&sub_a.view, WEB)
        .iter()
        .map(|e| e.cluster.clone())
        .collect();
    clusters_of.sort();
    assert_eq!(clusters_of, ["cluster-a", "cluster-b"]);
    // Cluster-local: each cluster's proxies see their own cluster's endpoints only.
    let cache = "cache.shop.svc.cluster.local";
    until(&mut sub_a, "cache, cluster-a's only", |v| {
        addresses(v, cache) == ["10.244.0.5"]
    })
    .await;
    let mut sub_b = subscriber(&reg, "shop", "cluster-b").await;
    until(&mut sub_b, "cache, cluster-b's only", |v| {
        addresses(v, cache) == ["10.245.0.5"]
    })
    .await;

    // The bad clusters: not synced, each with its cause; readiness stopped waiting for
    // them at the deadline, naming them until then.
    for (id, cause) in [
        ("wrong-ca", "certificate"),
        ("expired", "Unauthorized"),
        ("narrow", "forbidden"),
    ] {
        let named = eventually(STEP, || async {
            let s = cluster_status(&reg, id).await;
            s["summary"]
                .as_str()
                .is_some_and(|t| t.contains(cause))
                .then_some(())
        })
        .await;
        let status = cluster_status(&reg, id).await;
        assert!(
            named.is_some(),
            "{id}: no error naming {cause:?}: {status:#}"
        );
        assert_eq!(status["synced"], false, "{status:#}");
    }
    let narrow = cluster_status(&reg, "narrow").await;
    assert!(
        narrow["kinds"]["Pod"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("pods is forbidden")),
        "{narrow:#}"
    );
    eventually(STEP, || async {
        reg.handle().readiness.is_ready().then_some(())
    })
    .await
    .expect("ready once the deadline passed");

    // The Secret deleted: cluster B and its endpoints go.
    a.delete(
        "secret",
        Some(READER_NAMESPACE),
        "istio-remote-secret-cluster-b",
    )
    .await
    .unwrap();
    until(&mut sub_a, "web in cluster-a only", |v| {
        addresses(v, WEB) == ["10.244.0.5"]
    })
    .await;
    assert_eq!(cluster_status(&reg, "cluster-b").await, Value::Null);
    // A kubeconfig file removed: that cluster is gone too.
    std::fs::remove_file(remotes.join("expired.yaml")).unwrap();
    eventually(STEP, || async {
        (cluster_status(&reg, "expired").await == Value::Null).then_some(())
    })
    .await
    .expect("the removed file's cluster is gone");
}

/// Cluster-a with `web` (one pod, one endpoint) and a registry watching it, with a
/// subscriber in `shop` that has seen the endpoint.
async fn web_in_one_cluster(
    options: KubeOptions,
    adjust: impl FnOnce(&mut RegistryConfig),
) -> (KubeApi, tempfile::TempDir, TestRegistry, Subscription) {
    let api = KubeApi::start_with("cluster-a", options).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    shop_with_pod(&api, "10.244.0.5").await;
    api.apply(&kube_service("web", "shop", "")).await.unwrap();
    let endpoint = [("10.244.0.5", Some("web-0"))];
    api.apply(&slice("web-1", "shop", "web", &endpoint, true))
        .await
        .unwrap();
    let reg = registry_for(&api, dir.path(), adjust).await;
    let mut sub = subscriber(&reg, "shop", "cluster-a").await;
    until(&mut sub, "web's endpoint", |v| {
        addresses(v, WEB) == ["10.244.0.5"]
    })
    .await;
    (api, dir, reg, sub)
}

#[tokio::test]
async fn an_unreachable_cluster_goes_stale_and_a_relist_churns_nothing() {
    if !kube::available() {
        return;
    }
    let options = KubeOptions { watch_cache: false };
    let (mut api, _dir, reg, mut sub) = web_in_one_cluster(options, |cfg| {
        cfg.kubernetes.watch_timeout = Duration::from_secs(2);
    })
    .await;
    let before = service(&sub.view, WEB).cloned();

    // A watch that expires: other objects move etcd on, etcd is compacted, and the next
    // re-watch of every kind gets 410 Gone and lists again - with nothing to tell anyone.
    for i in 0..5 {
        api.kubectl(&["create", "configmap", &format!("filler-{i}"), "-n", "shop"])
            .await
            .unwrap();
    }
    let lists_before = lists(&reg, "Service").await;
    api.compact_etcd().await.unwrap();
    let relisted = eventually(STEP, || async {
        (lists(&reg, "Service").await > lists_before).then_some(())
    })
    .await;
    assert!(
        relisted.is_some(),
        "no relist after the compaction: {:#}",
        cluster_status(&reg, "cluster-a").await
    );
    // Anything sent would be in flight by now; a marker change flushes the stream.
    api.apply(&kube_service("marker", "shop", ""))
        .await
        .unwrap();
    let removed = until(&mut sub, "the marker", |v| {
        service(v, "marker.shop.svc.cluster.local").is_some()
    })
    .await;
    assert!(removed.is_empty(), "a relist removed {removed:?}");
    assert_eq!(
        service(&sub.view, WEB).cloned(),
        before,
        "a relist changed web"
    );

    // The API server stops: its endpoints stay, marked stale since then.
    api.stop_apiserver();
    until(&mut sub, "web marked stale", |v| {
        endpoints(v, WEB)
            .first()
            .is_some_and(|e| e.stale_since_ms > 0)
    })
    .await;
    let status = cluster_status(&reg, "cluster-a").await;
    assert!(
        status["summary"].as_str().unwrap().starts_with("stale for"),
        "{status:#}"
    );
    assert!(metric(
        &reg.metrics().await,
        "isthmus_registry_cluster_stale_seconds{cluster=\"cluster-a\"}"
    )
    .is_some());
    // Back: current again, and nothing was removed on the way.
    api.start_apiserver().await.unwrap();
    let removed = until(&mut sub, "web current again", |v| {
        endpoints(v, WEB)
            .first()
            .is_some_and(|e| e.stale_since_ms == 0)
    })
    .await;
    assert!(removed.is_empty(), "the outage removed {removed:?}");
    assert_eq!(addresses(&sub.view, WEB), ["10.244.0.5"]);
}

async fn lists(reg: &TestRegistry, kind: &str) -> u64 {
    cluster_status(reg, "cluster-a").await["kinds"][kind]["lists"]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test]
async fn a_cluster_stale_past_the_limit_is_dropped_and_comes_back_when_reachable() {
    if !kube::available() {
        return;
    }
    let (mut api, _dir, reg, mut sub) = web_in_one_cluster(KubeOptions::default(), |cfg| {
        cfg.kubernetes.stale_after = Some(Duration::from_secs(2));
    })
    .await;
    api.stop_apiserver();
    until(&mut sub, "web dropped", |v| service(v, WEB).is_none()).await;
    let status = cluster_status(&reg, "cluster-a").await;
    assert_eq!(status["dropped"], true, "{status:#}");
    assert!(
        status["summary"].as_str().unwrap().starts_with("dropped"),
        "{status:#}"
    );
    api.start_apiserver().await.unwrap();
    until(&mut sub, "web back", |v| {
        endpoints(v, WEB)
            .first()
            .is_some_and(|e| e.stale_since_ms == 0)
    })
    .await;
    assert_eq!(cluster_status(&reg, "cluster-a").await["dropped"], false);
}
