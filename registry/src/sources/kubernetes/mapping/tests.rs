use std::collections::HashMap;
use std::sync::Arc;

use super::*;

#[derive(Default)]
struct Objects {
    pods: HashMap<(String, String), Arc<Pod>>,
    nodes: HashMap<String, Arc<Node>>,
    namespaces: HashMap<String, Arc<Namespace>>,
}

impl Lookup for Objects {
    fn pod(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.pods.get(&(namespace.into(), name.into())).cloned()
    }
    fn node(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes.get(name).cloned()
    }
    fn namespace(&self, name: &str) -> Option<Arc<Namespace>> {
        self.namespaces.get(name).cloned()
    }
}

fn ctx() -> ClusterContext {
    ClusterContext {
        cluster: "c1".into(),
        network: "net-1".into(),
        domain: "cluster.local".into(),
        trust_domain: TrustDomain::new("cluster.local").unwrap(),
        cluster_local_hosts: vec!["*.kube-system.svc.cluster.local".into()],
        stale_since_ms: 0,
    }
}

fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).unwrap()
}

fn kube_service(ns: &str, name: &str, spec: serde_json::Value) -> KubeService {
    from_json(serde_json::json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }))
}

fn slice(ns: &str, svc: &str, endpoints: serde_json::Value) -> Arc<EndpointSlice> {
    Arc::new(from_json(serde_json::json!({
        "metadata": {"name": format!("{svc}-x"), "namespace": ns,
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": endpoints,
    })))
}

fn workloads(resources: &[Resource]) -> Vec<&Workload> {
    resources
        .iter()
        .filter_map(|r| match r {
            Resource::Workload(w) => Some(w),
            _ => None,
        })
        .collect()
}

#[test]
fn protocols_come_from_app_protocol_then_the_port_name() {
    assert_eq!(protocol(Some("kubernetes.io/h2c"), "web", None), "HTTP2");
    assert_eq!(protocol(Some("grpc"), "tcp-x", None), "GRPC");
    assert_eq!(protocol(None, "http-web", None), "HTTP");
    assert_eq!(protocol(None, "https", None), "HTTPS");
    assert_eq!(protocol(None, "redis", None), "Redis");
    assert_eq!(protocol(None, "web", None), "TCP");
    assert_eq!(
        protocol(Some("unknown.example/x"), "mongo-db", None),
        "Mongo"
    );
    assert_eq!(protocol(None, "dns", Some("UDP")), "UDP");
}

#[test]
fn a_service_maps_to_its_hostname_cluster_ip_and_ports() {
    let svc = kube_service(
        "shop",
        "web",
        serde_json::json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                      {"name": "metrics", "port": 9090, "targetPort": "metrics"}]}),
    );
    let s = service(&ctx(), &svc).unwrap();
    assert_eq!(s.hostname, "web.shop.svc.cluster.local");
    assert_eq!((s.cluster.as_str(), s.name.as_str()), ("c1", "web"));
    assert_eq!(s.addresses.len(), 1);
    assert_eq!(s.addresses[0].address, "10.96.0.10");
    assert_eq!(s.resolution, Resolution::Static);
    assert_eq!(s.scope, Scope::Mesh);
    // A named target port is resolved per endpoint by its slice, so the service says 0.
    let targets: Vec<(u16, u16)> = s.ports.iter().map(|p| (p.number, p.target_port)).collect();
    assert_eq!(targets, [(80, 8080), (9090, 0)]);
}

#[test]
fn headless_external_name_cluster_local_and_export_to() {
    let headless = kube_service("shop", "db", serde_json::json!({"clusterIP": "None"}));
    let s = service(&ctx(), &headless).unwrap();
    assert!(s.addresses.is_empty());
    assert_eq!(s.resolution, Resolution::None);
    let alias = kube_service(
        "shop",
        "ext",
        serde_json::json!({"type": "ExternalName", "externalName": "db.example.com"}),
    );
    assert!(service(&ctx(), &alias).is_none());
    let dns = kube_service("kube-system", "kube-dns", serde_json::json!({}));
    assert_eq!(service(&ctx(), &dns).unwrap().scope, Scope::ClusterLocal);
    let mut annotated = kube_service("shop", "cache", serde_json::json!({}));
    annotated.metadata.annotations = Some(
        [
            (labels::CLUSTER_LOCAL.to_string(), "true".to_string()),
            (labels::EXPORT_TO.to_string(), ".".to_string()),
        ]
        .into(),
    );
    let s = service(&ctx(), &annotated).unwrap();
    assert_eq!(s.scope, Scope::ClusterLocal);
    assert!(s.export_to.visible_to("shop") && !s.export_to.visible_to("other"));
}

#[test]
fn endpoints_take_identity_labels_network_and_locality_from_pod_node_and_namespace() {
    let mut objects = Objects::default();
    objects.pods.insert(
        ("shop".into(), "web-0".into()),
        Arc::new(from_json(serde_json::json!({
            "metadata": {"name": "web-0", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"serviceAccountName": "web", "nodeName": "n1", "containers": []},
        }))),
    );
    objects.nodes.insert(
        "n1".into(),
        Arc::new(from_json(serde_json::json!({
            "metadata": {"name": "n1", "labels": {
                "topology.kubernetes.io/region": "r", "topology.kubernetes.io/zone": "z",
                "topology.istio.io/subzone": "s"}},
        }))),
    );
    objects.namespaces.insert(
        "shop".into(),
        Arc::new(from_json(serde_json::json!({
            "metadata": {"name": "shop", "labels": {"topology.istio.io/network": "net-2"}},
        }))),
    );
    let svc = kube_service(
        "shop",
        "web",
        serde_json::json!({"clusterIP": "10.96.0.10",
        "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}),
    );
    let slices = [slice(
        "shop",
        "web",
        serde_json::json!([
            {"addresses": ["10.0.0.5"], "conditions": {"ready": true},
             "targetRef": {"kind": "Pod", "name": "web-0", "namespace": "shop"}},
            {"addresses": ["10.0.0.6"], "conditions": {"ready": false, "serving": true,
             "terminating": true}, "zone": "z2"},
            {"addresses": ["10.0.0.7"]},
        ]),
    )];
    let out = map_service(&ctx(), &svc, &slices, &objects);
    let ws = workloads(&out);
    assert_eq!(ws.len(), 3);
    let at = |a: &str| {
        *ws.iter()
            .find(|w| w.address == Address::Ip(a.parse().unwrap()))
            .unwrap()
    };
    let pod = at("10.0.0.5");
    assert_eq!(
        pod.identity.as_ref().unwrap().as_str(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(
        pod.network, "net-2",
        "the namespace's label wins over the cluster's"
    );
    assert_eq!(
        (
            pod.locality.region.as_str(),
            pod.locality.zone.as_str(),
            pod.locality.subzone.as_str()
        ),
        ("r", "z", "s")
    );
    assert_eq!(pod.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(pod.ports.get("http"), Some(&8080));
    assert_eq!((pod.origin, pod.health), (Origin::Pod, Health::Healthy));
    assert_eq!(pod.services, ["web.shop.svc.cluster.local"]);
    assert_eq!(pod.name, "web.web-0");
    let draining = at("10.0.0.6");
    assert_eq!(draining.health, Health::Unhealthy);
    assert_eq!(draining.locality.zone, "z2");
    assert!(draining.identity.is_none());
    // An unset `ready` means ready.
    assert_eq!(at("10.0.0.7").health, Health::Healthy);
}

#[test]
fn publish_not_ready_addresses_makes_every_endpoint_ready_and_stale_marks_every_one() {
    let svc = kube_service(
        "shop",
        "db",
        serde_json::json!({"clusterIP": "None", "publishNotReadyAddresses": true}),
    );
    let slices = [slice(
        "shop",
        "db",
        serde_json::json!([{"addresses": ["10.0.0.9"], "conditions": {"ready": false}}]),
    )];
    let mut c = ctx();
    c.stale_since_ms = 1234;
    let out = map_service(&c, &svc, &slices, &Objects::default());
    let ws = workloads(&out);
    assert_eq!(ws[0].health, Health::Healthy);
    assert_eq!(ws[0].stale_since_ms, 1234);
}

#[test]
fn a_pod_captured_by_ztunnel_or_with_an_isthmus_sidecar_takes_tunnels_on_the_hbone_port() {
    let mut objects = Objects::default();
    for (name, annotations) in [
        (
            "web-0",
            serde_json::json!({"ambient.istio.io/redirection": "enabled"}),
        ),
        (
            "web-1",
            serde_json::json!({"ambient.istio.io/redirection": "pending"}),
        ),
        ("web-2", serde_json::json!({})),
        (
            "web-3",
            serde_json::json!({"sidecar.isthmus.io/status": "{}"}),
        ),
    ] {
        objects.pods.insert(
            ("shop".into(), name.into()),
            Arc::new(from_json(serde_json::json!({
                "metadata": {"name": name, "namespace": "shop", "annotations": annotations},
                "spec": {"containers": []},
            }))),
        );
    }
    let svc = kube_service(
        "shop",
        "web",
        serde_json::json!({"clusterIP": "10.96.0.10",
        "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}),
    );
    let slices = [slice(
        "shop",
        "web",
        serde_json::json!([
            {"addresses": ["10.0.0.5"], "targetRef": {"kind": "Pod", "name": "web-0"}},
            {"addresses": ["10.0.0.6"], "targetRef": {"kind": "Pod", "name": "web-1"}},
            {"addresses": ["10.0.0.7"], "targetRef": {"kind": "Pod", "name": "web-2"}},
            {"addresses": ["10.0.0.8"]},
            {"addresses": ["10.0.0.9"], "targetRef": {"kind": "Pod", "name": "web-3"}},
        ]),
    )];
    let out = map_service(&ctx(), &svc, &slices, &objects);
    let mut ports: Vec<(String, u16)> = workloads(&out)
        .iter()
        .map(|w| (w.address.to_string(), w.tunnel_port))
        .collect();
    ports.sort();
    assert_eq!(
        ports,
        [
            ("10.0.0.5".to_string(), 15008),
            ("10.0.0.6".to_string(), 0),
            ("10.0.0.7".to_string(), 0),
            ("10.0.0.8".to_string(), 0),
            ("10.0.0.9".to_string(), 15008),
        ]
    );
    // The app's own ports are unchanged: the tunnel carries connections to them.
    assert!(workloads(&out)
        .iter()
        .all(|w| w.ports.get("http") == Some(&8080)));
}
