//! The injection contract point by point, on plain JSON; the review's answers to good and
//! bad input; the serving certificate and the caBundle patch.

use base64::Engine;
use serde_json::{json, Value};

use super::metrics::InjectMetrics;
use super::pod::*;
use super::review::{answer, Answer};
use super::*;

fn settings() -> InjectSettings {
    InjectSettings::new("cluster-a", "network-a", "isthmus-system")
}

fn web_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {
            "serviceAccountName": "web",
            "containers": [{
                "name": "web",
                "image": "nginx",
                "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9090, "name": "grpc"}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 3},
                "livenessProbe": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 5},
                "startupProbe": {"grpc": {"port": 9090, "service": "web.Health"}},
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }, {
                "name": "helper",
                "image": "busybox",
                "livenessProbe": {"exec": {"command": ["true"]}},
            }],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    })
}

/// Applies a JSONPatch of `add` operations (what the injector emits) as the API server
/// would: `add` on an existing member replaces it.
fn apply(pod: &Value, patch: &[Value]) -> Value {
    let mut out = pod.clone();
    for op in patch {
        assert_eq!(op["op"], "add", "unexpected op {op}");
        let path = op["path"].as_str().unwrap();
        let mut parts: Vec<String> = path[1..]
            .split('/')
            .map(|p| p.replace("~1", "/").replace("~0", "~"))
            .collect();
        let last = parts.pop().unwrap();
        let mut at = &mut out;
        for p in &parts {
            at = at
                .get_mut(p.as_str())
                .unwrap_or_else(|| panic!("no {p} in {path}"));
        }
        at.as_object_mut()
            .unwrap()
            .insert(last, op["value"].clone());
    }
    out
}

fn injected(pod: &Value) -> Value {
    match inject(pod, "shop", &settings()).unwrap() {
        Injection::Patch(patch) => apply(pod, &patch),
        other => panic!("not injected: {other:?}"),
    }
}

fn env_of(container: &Value, name: &str) -> Value {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no env {name} in {container}"))
}

fn container<'a>(pod: &'a Value, list: &str, name: &str) -> &'a Value {
    pod["spec"][list]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {list} {name}"))
}

#[test]
fn init_container_captures_with_the_contract_args() {
    let pod = injected(&web_pod());
    let init = &pod["spec"]["initContainers"][0];
    assert_eq!(init["name"], "isthmus-init");
    assert_eq!(
        init["image"],
        format!("isthmus/vm-agent:{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        init["args"],
        json!([
            "capture-init",
            "--uid=1337",
            "--inbound-port=15006",
            "--outbound-port=15001",
            "--dns-port=15053",
            "--capture-cidr=240.240.0.0/16,10.96.0.0/12",
            "--exclude-inbound-ports=15020,15021",
            "--exclude-outbound-ports=",
        ])
    );
    let sc = &init["securityContext"];
    assert_eq!(sc["runAsUser"], 0);
    assert_eq!(sc["runAsNonRoot"], false);
    assert_eq!(sc["capabilities"]["add"], json!(["NET_ADMIN", "NET_RAW"]));
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
}

#[test]
fn init_container_runs_before_the_pods_own() {
    let mut pod = web_pod();
    pod["spec"]["initContainers"] = json!([{"name": "migrate", "image": "tool"}]);
    let out = injected(&pod);
    let names: Vec<&str> = out["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["isthmus-init", "migrate"]);
}

#[test]
fn sidecar_has_env_ports_probe_security_and_mounts() {
    let pod = injected(&web_pod());
    let containers = pod["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 3);
    let proxy = &containers[2];
    assert_eq!(proxy["name"], "isthmus-proxy");
    assert_eq!(proxy["args"], json!(["sidecar"]));
    assert_eq!(
        env_of(proxy, "ISTHMUS_REGISTRY")["value"],
        "isthmus-registry.isthmus-system.svc:15012"
    );
    assert_eq!(env_of(proxy, "ISTHMUS_CLUSTER")["value"], "cluster-a");
    assert_eq!(env_of(proxy, "ISTHMUS_NETWORK")["value"], "network-a");
    for (name, path) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ("INSTANCE_IP", "status.podIP"),
    ] {
        assert_eq!(
            env_of(proxy, name)["valueFrom"]["fieldRef"]["fieldPath"],
            path
        );
    }
    assert_eq!(
        proxy["ports"],
        json!([
            {"name": "http-health", "containerPort": 15021, "protocol": "TCP"},
            {"name": "http-metrics", "containerPort": 15020, "protocol": "TCP"},
        ])
    );
    assert_eq!(
        proxy["readinessProbe"]["httpGet"],
        json!({"path": "/healthz/ready", "port": 15021, "scheme": "HTTP"})
    );
    let sc = &proxy["securityContext"];
    assert_eq!(sc["runAsUser"], 1337);
    assert_eq!(sc["runAsGroup"], 1337);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    let mounts: Vec<(String, String)> = proxy["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["mountPath"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        mounts,
        [
            (
                "isthmus-token".to_string(),
                "/var/run/secrets/tokens".to_string()
            ),
            (
                "isthmus-ca-root".to_string(),
                "/var/run/secrets/isthmus".to_string()
            ),
            ("isthmus-state".to_string(), "/var/lib/isthmus".to_string()),
        ]
    );
}

#[test]
fn volumes_are_added_beside_the_pods_own() {
    let pod = injected(&web_pod());
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    assert_eq!(volumes[0], json!({"name": "data", "emptyDir": {}}));
    assert_eq!(
        volumes[1],
        json!({"name": "isthmus-token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": "isthmus-ca", "expirationSeconds": 43200, "path": "isthmus-token"}}]}})
    );
    assert_eq!(
        volumes[2],
        json!({"name": "isthmus-ca-root", "configMap": {"name": "isthmus-ca-root-cert"}})
    );
    assert_eq!(volumes[3], json!({"name": "isthmus-state", "emptyDir": {}}));
}

#[test]
fn probes_are_rewritten_to_the_sidecar_with_named_ports_resolved() {
    let pod = injected(&web_pod());
    let web = container(&pod, "containers", "web");
    assert_eq!(
        web["readinessProbe"],
        json!({"httpGet": {"path": "/app-health/web/readyz", "port": 15021, "scheme": "HTTP"}, "periodSeconds": 3})
    );
    assert_eq!(
        web["livenessProbe"],
        json!({"httpGet": {"path": "/app-health/web/livez", "port": 15021, "scheme": "HTTP"}, "timeoutSeconds": 5})
    );
    assert_eq!(
        web["startupProbe"],
        json!({"httpGet": {"path": "/app-health/web/startupz", "port": 15021, "scheme": "HTTP"}})
    );
    // Everything else of the container is kept as sent.
    assert_eq!(web["terminationMessagePolicy"], "FallbackToLogsOnError");
    // An exec probe runs inside the container: unchanged.
    let helper = container(&pod, "containers", "helper");
    assert_eq!(
        helper["livenessProbe"],
        json!({"exec": {"command": ["true"]}})
    );

    let proxy = container(&pod, "containers", "isthmus-proxy");
    let probers: Value = serde_json::from_str(
        env_of(proxy, "ISTHMUS_APP_PROBERS")["value"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        probers,
        json!({
            "/app-health/web/readyz": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP", "httpHeaders": []}, "timeoutSeconds": 1},
            "/app-health/web/livez": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 5},
            "/app-health/web/startupz": {"grpc": {"port": 9090, "service": "web.Health"}, "timeoutSeconds": 1},
        })
    );
}

#[test]
fn http_probe_keeps_scheme_host_and_headers() {
    let mut pod = web_pod();
    pod["spec"]["containers"][0]["readinessProbe"] = json!({"httpGet": {
        "path": "/r", "port": 8443, "scheme": "HTTPS", "host": "127.0.0.1",
        "httpHeaders": [{"name": "X-Probe", "value": "1"}]}, "timeoutSeconds": 2});
    let out = injected(&pod);
    let proxy = container(&out, "containers", "isthmus-proxy");
    let probers: Value = serde_json::from_str(
        env_of(proxy, "ISTHMUS_APP_PROBERS")["value"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        probers["/app-health/web/readyz"],
        json!({"httpGet": {"path": "/r", "port": 8443, "scheme": "HTTPS", "host": "127.0.0.1",
            "httpHeaders": [{"name": "X-Probe", "value": "1"}]}, "timeoutSeconds": 2})
    );
}

#[test]
fn no_probers_env_without_rewritten_probes() {
    let pod =
        json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app", "image": "x"}]}});
    let out = injected(&pod);
    let proxy = container(&out, "containers", "isthmus-proxy");
    assert!(proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["name"] != "ISTHMUS_APP_PROBERS"));
}

#[test]
fn unknown_named_probe_port_is_refused_with_the_name() {
    let mut pod = web_pod();
    pod["spec"]["containers"][0]["readinessProbe"] = json!({"httpGet": {"port": "admin"}});
    let err = inject(&pod, "shop", &settings()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, InjectError::BadProbe { .. }), "{msg}");
    assert!(
        msg.contains("container web, readinessProbe") && msg.contains("\"admin\""),
        "{msg}"
    );
    assert!(msg.contains("http=8080"), "{msg}");
}

#[test]
fn status_annotation_and_tls_mode_label_mark_the_pod() {
    let pod = injected(&web_pod());
    let status: Value = serde_json::from_str(
        pod["metadata"]["annotations"]["sidecar.isthmus.io/status"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(status["containers"], json!(["isthmus-proxy"]));
    assert_eq!(status["initContainers"], json!(["isthmus-init"]));
    assert_eq!(
        status["volumes"],
        json!(["isthmus-token", "isthmus-ca-root", "isthmus-state"])
    );
    assert_eq!(
        pod["metadata"]["labels"]["security.istio.io/tlsMode"],
        "istio"
    );
    assert_eq!(
        pod["metadata"]["labels"]["app"], "web",
        "the pod's labels are kept"
    );
    assert_eq!(
        pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
        "web"
    );
}

#[test]
fn injecting_twice_changes_nothing() {
    let once = injected(&web_pod());
    assert_eq!(
        inject(&once, "shop", &settings()).unwrap(),
        Injection::Skip(SkipReason::AlreadyInjected)
    );
    // The status annotation alone marks an injected pod, and so does the sidecar alone.
    let mut annotated = web_pod();
    annotated["metadata"]["annotations"] = json!({"sidecar.isthmus.io/status": "{}"});
    assert_eq!(
        inject(&annotated, "shop", &settings()).unwrap(),
        Injection::Skip(SkipReason::AlreadyInjected)
    );
    let mut with_proxy = web_pod();
    with_proxy["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "isthmus-proxy", "image": "x"}));
    assert_eq!(
        inject(&with_proxy, "shop", &settings()).unwrap(),
        Injection::Skip(SkipReason::AlreadyInjected)
    );
}

#[test]
fn opt_out_by_label_or_annotation_in_both_spellings() {
    for key in ["sidecar.isthmus.io/inject", "sidecar.istio.io/inject"] {
        for place in ["labels", "annotations"] {
            let mut pod = web_pod();
            pod["metadata"][place][key] = json!("false");
            match inject(&pod, "shop", &settings()).unwrap() {
                Injection::Skip(SkipReason::OptedOut { key: k }) => assert!(k.contains(key)),
                other => panic!("{place} {key}: {other:?}"),
            }
        }
    }
    // isthmus's own key wins over Istio's.
    let mut pod = web_pod();
    pod["metadata"]["annotations"] = json!({
        "sidecar.isthmus.io/inject": "true",
        "sidecar.istio.io/inject": "false",
    });
    assert!(matches!(
        inject(&pod, "shop", &settings()).unwrap(),
        Injection::Patch(_)
    ));
}

#[test]
fn host_network_pods_are_not_injected() {
    let mut pod = web_pod();
    pod["spec"]["hostNetwork"] = json!(true);
    let out = inject(&pod, "shop", &settings()).unwrap();
    assert_eq!(out, Injection::Skip(SkipReason::HostNetwork));
}

#[test]
fn ignored_namespaces_are_not_injected() {
    for ns in ["isthmus-system", "kube-system"] {
        assert_eq!(
            inject(&web_pod(), ns, &settings()).unwrap(),
            Injection::Skip(SkipReason::IgnoredNamespace(ns.into()))
        );
    }
}

#[test]
fn exclude_annotations_extend_the_init_args() {
    let mut pod = web_pod();
    pod["metadata"]["annotations"] = json!({
        "traffic.sidecar.isthmus.io/excludeInboundPorts": "8081, 15021,9000",
        "traffic.sidecar.istio.io/excludeOutboundPorts": "5432",
    });
    let out = injected(&pod);
    let args = out["spec"]["initContainers"][0]["args"].as_array().unwrap();
    assert!(
        args.contains(&json!("--exclude-inbound-ports=15020,15021,8081,9000")),
        "{args:?}"
    );
    assert!(
        args.contains(&json!("--exclude-outbound-ports=5432")),
        "{args:?}"
    );
    // Istio's inbound key too.
    let mut pod = web_pod();
    pod["metadata"]["annotations"] =
        json!({"traffic.sidecar.istio.io/excludeInboundPorts": "7070"});
    let args = injected(&pod)["spec"]["initContainers"][0]["args"].clone();
    assert!(args
        .as_array()
        .unwrap()
        .contains(&json!("--exclude-inbound-ports=15020,15021,7070")));
}

#[test]
fn bad_exclude_annotation_is_refused_naming_it() {
    for value in ["80,http", "0", "70000", "*"] {
        let mut pod = web_pod();
        pod["metadata"]["annotations"] =
            json!({"traffic.sidecar.isthmus.io/excludeOutboundPorts": value});
        let err = inject(&pod, "shop", &settings()).unwrap_err();
        assert!(
            err.to_string()
                .contains("traffic.sidecar.isthmus.io/excludeOutboundPorts"),
            "{err}"
        );
    }
}

#[test]
fn capture_cidrs_registry_and_image_come_from_the_settings() {
    let mut s = settings();
    s.capture_cidrs = vec!["10.0.0.0/8".into()];
    s.image = "example/agent:1".into();
    s.registry_address = "registry.example:15012".into();
    let pod = match inject(&web_pod(), "shop", &s).unwrap() {
        Injection::Patch(p) => apply(&web_pod(), &p),
        other => panic!("{other:?}"),
    };
    let init = &pod["spec"]["initContainers"][0];
    assert!(init["args"]
        .as_array()
        .unwrap()
        .contains(&json!("--capture-cidr=10.0.0.0/8")));
    assert_eq!(init["image"], "example/agent:1");
    let proxy = container(&pod, "containers", "isthmus-proxy");
    assert_eq!(proxy["image"], "example/agent:1");
    assert_eq!(
        env_of(proxy, "ISTHMUS_REGISTRY")["value"],
        "registry.example:15012"
    );
}

#[test]
fn the_pods_network_label_sets_its_network() {
    let mut pod = web_pod();
    pod["metadata"]["labels"]["topology.istio.io/network"] = json!("network-b");
    let out = injected(&pod);
    let proxy = container(&out, "containers", "isthmus-proxy");
    assert_eq!(env_of(proxy, "ISTHMUS_NETWORK")["value"], "network-b");
}

#[test]
fn names_the_injector_needs_must_be_free() {
    let mut pod = web_pod();
    pod["spec"]["volumes"] = json!([{"name": "isthmus-state", "emptyDir": {}}]);
    let err = inject(&pod, "shop", &settings()).unwrap_err();
    assert!(
        err.to_string().contains("a volume \"isthmus-state\""),
        "{err}"
    );
}

#[test]
fn unreadable_pods_are_refused_with_the_field() {
    let cases = [
        (json!({"metadata": {"name": "p"}}), "no spec"),
        (
            json!({"spec": {"containers": []}}),
            "spec.containers is empty",
        ),
        (json!({"spec": {"containers": "web"}}), "spec.containers"),
        (
            json!({"spec": {"containers": [{"name": "a", "ports": [{"containerPort": "x"}]}]}}),
            "spec.containers[0].ports[0].containerPort",
        ),
    ];
    for (pod, expect) in cases {
        let err = inject(&pod, "shop", &settings()).unwrap_err();
        assert!(matches!(err, InjectError::BadPod(_)), "{err}");
        assert!(err.to_string().contains(expect), "{expect}: {err}");
    }
}

fn review_of(object: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "object": object,
        },
    }))
    .unwrap()
}

fn response(a: Answer) -> Value {
    match a {
        Answer::Review(v) => {
            assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
            assert_eq!(v["kind"], "AdmissionReview");
            assert_eq!(v["response"]["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
            v["response"].clone()
        }
        Answer::BadRequest(m) => panic!("bad request: {m}"),
    }
}

#[test]
fn review_answers_with_a_base64_json_patch_and_counts_it() {
    let metrics = InjectMetrics::default();
    let r = response(answer(&review_of(web_pod()), &settings(), &metrics));
    assert_eq!(r["allowed"], true);
    assert_eq!(r["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(r["patch"].as_str().unwrap())
        .unwrap();
    let patch: Vec<Value> = serde_json::from_slice(&bytes).unwrap();
    let pod = apply(&web_pod(), &patch);
    assert_eq!(pod, injected(&web_pod()));
    assert_eq!(metrics.injections.get(), 1);
}

#[test]
fn review_of_skipped_pods_allows_without_patch_and_warns_for_host_network() {
    let metrics = InjectMetrics::default();
    let mut pod = web_pod();
    pod["spec"]["hostNetwork"] = json!(true);
    let r = response(answer(&review_of(pod), &settings(), &metrics));
    assert_eq!(r["allowed"], true);
    assert!(r.get("patch").is_none());
    assert!(r["warnings"][0].as_str().unwrap().contains("hostNetwork"));
    let label = metrics::ReasonLabels {
        reason: "host_network",
    };
    assert_eq!(metrics.skips.get_or_create(&label).get(), 1);

    let mut pod = web_pod();
    pod["metadata"]["labels"]["sidecar.isthmus.io/inject"] = json!("false");
    let r = response(answer(&review_of(pod), &settings(), &metrics));
    assert_eq!(r["allowed"], true);
    assert!(r.get("patch").is_none() && r.get("warnings").is_none());
}

#[test]
fn garbage_is_a_bad_request_naming_what_is_wrong() {
    let metrics = InjectMetrics::default();
    let cases: [(&[u8], &str); 6] = [
        (b"hello", "not an AdmissionReview"),
        (b"", "not an AdmissionReview"),
        (b"[1,2]", "not an AdmissionReview"),
        (
            br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"u","kind":{"version":"v1","kind":"Pod"}}}"#,
            "expected apiVersion admission.k8s.io/v1",
        ),
        (
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
            "has no request",
        ),
        (
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":7}}"#,
            "request.uid",
        ),
    ];
    for (body, expect) in cases {
        match answer(body, &settings(), &metrics) {
            Answer::BadRequest(m) => assert!(m.contains(expect), "{expect}: {m}"),
            other => panic!("{}: {other:?}", String::from_utf8_lossy(body)),
        }
    }
    let label = metrics::ReasonLabels {
        reason: "not_a_review",
    };
    assert_eq!(metrics.errors.get_or_create(&label).get(), 6);
}

#[test]
fn a_review_of_something_else_is_refused_in_the_review() {
    let metrics = InjectMetrics::default();
    let mut body: Value = serde_json::from_slice(&review_of(web_pod())).unwrap();
    body["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let r = response(answer(
        &serde_json::to_vec(&body).unwrap(),
        &settings(),
        &metrics,
    ));
    assert_eq!(r["allowed"], false);
    assert!(r["status"]["message"]
        .as_str()
        .unwrap()
        .contains("not apps/v1/Deployment"));

    let r = response(answer(
        &review_of(json!({"spec": {"containers": 3}})),
        &settings(),
        &metrics,
    ));
    assert_eq!(r["allowed"], false);
    assert_eq!(r["status"]["code"], 400);
    assert!(r["status"]["message"]
        .as_str()
        .unwrap()
        .contains("spec.containers"));
}

#[test]
fn issued_serving_certificate_names_dns_and_ip() {
    use x509_parser::prelude::*;
    let dir = tempfile::tempdir().unwrap();
    crate::ca::init::init(
        &crate::ca::init::InitOptions {
            trust_domain: isthmus_proto::identity::TrustDomain::new("cluster.local").unwrap(),
            clusters: vec!["cluster-a".into()],
            out: dir.path().to_path_buf(),
            rotate: false,
        },
        ::time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let material = crate::ca::CaMaterial::load(&dir.path().join("cluster-a"), None).unwrap();
    let names = vec![
        "isthmus-registry.isthmus-system.svc".to_string(),
        "127.0.0.1".to_string(),
    ];
    let (chain, _key, _) =
        server::issue(&material, &names, ::time::OffsetDateTime::now_utc()).unwrap();
    assert_eq!(chain.len(), 2, "leaf and intermediate");
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    let sans = leaf.subject_alternative_name().unwrap().unwrap();
    let found: Vec<String> = sans
        .value
        .general_names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect();
    assert!(
        found
            .iter()
            .any(|n| n.contains("isthmus-registry.isthmus-system.svc")),
        "{found:?}"
    );
    assert!(
        sans.value
            .general_names
            .iter()
            .any(|n| matches!(n, GeneralName::IPAddress(ip) if *ip == [127, 0, 0, 1])),
        "{found:?}"
    );
    let (_, inter) = X509Certificate::from_der(&chain[1]).unwrap();
    assert_eq!(leaf.issuer(), inter.subject());
    assert!(leaf.verify_signature(Some(inter.public_key())).is_ok());
}

#[test]
fn ca_bundle_patch_only_when_stale() {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let root = b"-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n";
    let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": "isthmus-sidecar-injector"},
        "webhooks": [{
            "name": "sidecar-injector.isthmus.io",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "clientConfig": {"url": "https://127.0.0.1:1/inject"},
        }],
    }))
    .unwrap();
    let patch = cluster::ca_bundle_patch(&config, root).expect("stale bundle");
    assert_eq!(patch["webhooks"][0]["name"], "sidecar-injector.isthmus.io");
    let encoded = base64::engine::general_purpose::STANDARD.encode(root);
    assert_eq!(patch["webhooks"][0]["clientConfig"]["caBundle"], encoded);
    let mut current = config;
    current.webhooks.as_mut().unwrap()[0]
        .client_config
        .ca_bundle = Some(k8s_openapi::ByteString(root.to_vec()));
    assert_eq!(cluster::ca_bundle_patch(&current, root), None);
}

#[test]
fn root_configmap_carries_the_publishers_label() {
    let cm = cluster::root_configmap("PEM", None);
    assert_eq!(cm.metadata.name.as_deref(), Some("isthmus-ca-root-cert"));
    assert_eq!(
        cm.metadata.labels.unwrap()[cluster::PUBLISHER_LABEL],
        cluster::PUBLISHER_LABEL_VALUE
    );
    assert_eq!(cm.data.unwrap()["root-cert.pem"], "PEM");
}
