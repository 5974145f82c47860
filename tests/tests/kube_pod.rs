//! A pod as a mesh member, end to end, without a kubelet: the real API server, the
//! registry's webhook and CA, and the agent binary in sidecar mode.
//!
//! The "pod" is a network namespace in network A. What a kubelet would do is done by the
//! test, from the pod as the API server stored it: the Pod is created through the API (so
//! through the registry's injection webhook), its init container's `capture-init` is run
//! with the arguments the injector wrote, its sidecar is run with the injected environment
//! (the downward API resolved by hand) as uid 1337, with a service-account token from the
//! TokenRequest API bound to the Pod and the root from the ConfigMap the registry published;
//! its IP and readiness go in through the status subresource. A VM in network B then calls
//! the pod's Kubernetes service by name and the pod's app calls the VM's service by name,
//! through both gateways, each side seeing the other's service-account identity.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use isthmus_registry::app::LocalCluster;
use isthmus_tests::harness::agent::{agent_binary, group_yaml, Vm};
use isthmus_tests::harness::kube::{self, KubeApi};
use isthmus_tests::harness::mesh::{id, on, yaml, EchoApp, Mesh, APP_PORT, SVC_PORT};
use isthmus_tests::harness::netns::Net;
use isthmus_tests::harness::pod::{self, Mounts};
use isthmus_tests::{eventually, http_get};
use serde_json::Value;

const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 8);
const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 9);
const WAIT: Duration = Duration::from_secs(60);

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\n";

/// The pod's service: port 9080 to the app's 8080.
const WEB_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  selector: {app: web}\n  ports:\n  - {name: tcp-web, port: 9080, targetPort: 8080}\n";

/// The app's pod as a user writes it: one container, a named port, a readiness probe on it.
const WEB_POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: shop, labels: {app: web}}\nspec:\n  serviceAccountName: web\n  nodeName: node-1\n  containers:\n  - name: app\n    image: example/web:1\n    ports: [{name: http, containerPort: 8080}]\n    readinessProbe: {tcpSocket: {port: http}, periodSeconds: 2}\n";

fn web_slice(ready: bool) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports:\n- {{name: tcp-web, port: 8080, protocol: TCP}}\nendpoints:\n- addresses: [\"{POD_IP}\"]\n  conditions: {{ready: {ready}}}\n  nodeName: node-1\n  targetRef: {{kind: Pod, name: web-0, namespace: shop}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_and_a_vm_call_each_other_by_name_with_their_own_identities() {
    if !kube::available() {
        return;
    }
    let api = KubeApi::start("pod-e2e").await.unwrap();
    let files = tempfile::tempdir().unwrap();
    let kubeconfig = files.path().join("registry.kubeconfig");
    pod::registry_kubeconfig(&api, &kubeconfig).await.unwrap();
    let catalog = [
        group_yaml("db", "db", "db", APP_PORT, false),
        yaml::service("db", "shop", SVC_PORT),
    ];
    let Some(m) = Mesh::start_with("pod-e2e", &catalog, |cfg| {
        // With its own cluster the harness's registry serves the webhook on loopback.
        cfg.kubernetes.local = Some(LocalCluster::Kubeconfig(kubeconfig.clone()));
    })
    .await
    else {
        return;
    };
    let _gateways = [m.gateway(Net::A).await, m.gateway(Net::B).await];

    // The namespace is labelled for injection; the webhook is registered as a platform
    // team would, pointing at the registry.
    api.create_namespace("shop", &[("isthmus-injection", "enabled")])
        .await
        .unwrap();
    api.create_service_account("shop", "web").await.unwrap();
    api.apply(NODE).await.unwrap();
    api.apply(WEB_SERVICE).await.unwrap();
    let webhook = m
        .reg
        .webhook_addr()
        .expect("the registry serves the webhook");
    pod::register_webhook(&api, webhook).await.unwrap();
    let pod = pod::create_injected(&api, WEB_POD, "shop", "web-0", WAIT)
        .await
        .unwrap();
    // Injected: the app's probe now points at the sidecar's health port.
    let app = pod::container(&pod, "app");
    assert_eq!(
        app["readinessProbe"]["httpGet"]["path"], "/app-health/app/readyz",
        "{app:#}"
    );

    // The kubelet's part: the namespace, the mounts, the init container, the sidecar.
    let pod_ns = Vm::create_bare(&m, Net::A, "pod-web", POD_IP, "web-0", "web");
    pod_ns.ns.set_resolv_conf(&format!(
        "nameserver {}\noptions timeout:2 attempts:1\n",
        isthmus_tests::harness::agent::RESOLVER
    ));
    let root_pem = pod::published_root(&api, "shop", WAIT)
        .await
        .expect("the registry publishes the root into the injected namespace");
    let token = pod::pod_token(&api, "shop", "web", "web-0").await.unwrap();
    let mounts = Mounts::new(&token, &root_pem);
    let agent = agent_binary();
    pod::run_init(&pod_ns, &pod, &agent).unwrap();
    let _app = on(pod_ns.rt(), async move {
        EchoApp::start(SocketAddr::new([0, 0, 0, 0].into(), APP_PORT), "web-0").await
    })
    .await
    .unwrap();
    let _sidecar = m
        .topo
        .spawn(pod::sidecar_command(
            &m, &pod_ns, &pod, POD_IP, &mounts, &agent,
        ))
        .unwrap();
    pod_ns.wait_ready().await;
    let dump = pod_ns.admin("/config_dump").await;
    assert_eq!(
        dump["identity"]["spiffe_id"],
        id("web").to_string(),
        "the pod's certificate is its service account's"
    );

    // The kubelet's probe, from the node (network A), reaches the app's probe through the
    // sidecar; a plain connection to the app's port is captured into mTLS and never
    // reaches the app.
    let probe = SocketAddr::new(POD_IP.into(), 15021);
    let (status, body) = on(m.rt(Net::A), async move {
        http_get(probe, "/app-health/app/readyz").await
    })
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let plain = m
        .topo
        .netns(Net::A)
        .command("timeout")
        .args([
            "5",
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{POD_IP}/{APP_PORT}; head -1 <&3"),
        ])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&plain.stdout).contains("web-0"),
        "plain text from the network must not reach the app"
    );

    // Ready: the kubelet reports it and the endpoint slice follows.
    api.set_pod_status("shop", "web-0", POD_IP.into(), true)
        .await
        .unwrap();
    api.apply(&web_slice(true)).await.unwrap();

    // A VM in network B.
    let vm = Vm::create(&m, Net::B, "db", VM_IP, "db", "db");
    let _db = vm.start_app(&m, APP_PORT, None);
    let _vm_agent = vm.start_agent(&m, &[], &[]);
    vm.wait_ready().await;

    // The VM calls the pod's Kubernetes service by name: through A's gateway into the
    // pod's sidecar and on to its app.
    let called = eventually(WAIT, || async {
        let (ok, out, _) =
            vm.sh("exec bash -c 'exec 3<>/dev/tcp/web.shop.svc.cluster.local/9080; head -1 <&3'");
        (ok && out.trim() == "web-0").then_some(())
    })
    .await;
    assert!(
        called.is_some(),
        "the VM never reached the pod:\nVM:\n{}\nPOD:\n{}",
        vm.log(),
        pod_ns.log()
    );
    // And the pod's app calls the VM's service by name.
    let (ok, out, err) = pod_ns.sh(
        "exec bash -c 'exec 3<>/dev/tcp/db.shop.svc.cluster.local/9080; printf \"GET / HTTP/1.0\\r\\n\\r\\n\" >&3; cat <&3'",
    );
    assert!(
        ok && out.contains("hello from db"),
        "{out} {err}\nPOD:\n{}",
        pod_ns.log()
    );

    // An address in the captured service range that the catalog does not know (a plain
    // server in network A, as the API server's ClusterIP would be) is passed through as it
    // is, not refused.
    let outside: SocketAddr = "10.96.200.1:7000".parse().unwrap();
    m.topo.netns(Net::A).add_ip(outside.ip());
    let _outside = on(m.rt(Net::A), async move {
        EchoApp::start(outside, "outside-the-mesh").await
    })
    .await
    .unwrap();
    let (ok, out, err) = pod_ns.sh("exec bash -c 'exec 3<>/dev/tcp/10.96.200.1/7000; head -1 <&3'");
    assert!(
        ok && out.trim() == "outside-the-mesh",
        "{out} {err}\nPOD:\n{}",
        pod_ns.log()
    );
    let passed = eventually(WAIT, || async {
        let conns = pod_ns.admin("/debug/connections").await;
        conns
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["service"] == "PassthroughCluster")
            .cloned()
    })
    .await
    .expect("the sidecar recorded the passed-through connection");
    assert_eq!(passed["endpoint"], outside.to_string(), "{passed}");

    // Each side saw the other's own identity.
    for (agent, direction, want) in [
        (&pod_ns, "inbound", id("db")),
        (&pod_ns, "outbound", id("db")),
        (&vm, "inbound", id("web")),
        (&vm, "outbound", id("web")),
    ] {
        let seen = eventually(WAIT, || async {
            let conns = agent.admin("/debug/connections").await;
            conns
                .as_array()
                .unwrap()
                .iter()
                .find(|c| {
                    c["direction"] == direction
                        && c["result"] == "ok"
                        && c["service"] != "PassthroughCluster"
                })
                .map(|c| c["peer_identity"].clone())
        })
        .await;
        assert_eq!(
            seen,
            Some(Value::String(want.to_string())),
            "{} {direction}",
            agent.name
        );
    }
}
