//! WorkloadGroup probes, form by form: each one Istio accepts loads as the agent will run it,
//! each one it refuses (and each one that could never pass) is refused with its field named.

use std::path::Path;

use isthmus_proto::model::{HttpHeader, HttpScheme, Probe, ProbeAction, Resource};
use isthmus_proto::TrustDomain;

use crate::sources::static_files::{parse_file, ResourceError, SourceDefaults};

/// A WorkloadGroup whose `probe:` is `probe` (a YAML flow mapping), read as the source does.
fn load(probe: &str) -> Result<Vec<Resource>, Vec<ResourceError>> {
    let text = format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {{name: g, namespace: shop}}\nspec:\n  template: {{}}\n  probe: {probe}\n"
    );
    let defaults = SourceDefaults {
        cluster: "cluster-a".into(),
        network: "network-a".into(),
        trust_domain: TrustDomain::new("cluster.local").unwrap(),
        domain: "cluster.local".into(),
    };
    parse_file(Path::new("probe.yaml"), &text, &defaults)
}

fn accepted(probe: &str) -> Probe {
    match load(probe) {
        Ok(mut resources) => match resources.pop() {
            Some(Resource::WorkloadGroup(g)) => g.probe.expect("the group has its probe"),
            other => panic!("{probe}: {other:?}"),
        },
        Err(errors) => panic!("{probe}: refused: {errors:#?}"),
    }
}

/// Asserts `probe` is refused at `field` with a message containing `why`.
fn refused(probe: &str, field: &str, why: &str) {
    let errors = load(probe).expect_err(probe);
    assert!(
        errors
            .iter()
            .any(|e| e.field == field && e.message.contains(why)),
        "{probe}: wanted {field}: ..{why}.., got {errors:#?}"
    );
}

fn timings(p: &Probe) -> [u32; 5] {
    [
        p.initial_delay_seconds,
        p.period_seconds,
        p.timeout_seconds,
        p.success_threshold,
        p.failure_threshold,
    ]
}

#[test]
fn an_https_probe_with_a_host_and_headers_loads_whole() {
    let p = accepted(
        "{httpGet: {path: /ready, port: 8443, host: app.internal, scheme: HTTPS, httpHeaders: [{name: Host, value: web.example.com}, {name: X-Probe, value: 'a b'}]}}",
    );
    assert_eq!(
        p.action,
        ProbeAction::HttpGet {
            path: "/ready".into(),
            port: 8443,
            host: "app.internal".into(),
            scheme: HttpScheme::Https,
            headers: vec![
                HttpHeader {
                    name: "Host".into(),
                    value: "web.example.com".into()
                },
                HttpHeader {
                    name: "X-Probe".into(),
                    value: "a b".into()
                },
            ],
        }
    );
}

#[test]
fn http_get_forms_istio_accepts() {
    let http = |probe: &str| match accepted(probe).action {
        ProbeAction::HttpGet {
            path, scheme, host, ..
        } => (path, scheme, host),
        other => panic!("{other:?}"),
    };
    // No scheme and an empty one are HTTP; no path and an empty one are "/".
    assert_eq!(
        http("{httpGet: {port: 80}}"),
        ("/".into(), HttpScheme::Http, String::new())
    );
    assert_eq!(
        http("{httpGet: {port: 80, path: '', scheme: ''}}"),
        ("/".into(), HttpScheme::Http, String::new())
    );
    assert_eq!(
        http("{httpGet: {port: 80, scheme: HTTP}}").1,
        HttpScheme::Http
    );
    // Istio checks no path: one without the leading '/', or with a query, is kept as written
    // (the agent sends it as the kubelet does).
    assert_eq!(
        http("{httpGet: {port: 80, path: healthz}}").0,
        "healthz".to_string()
    );
    assert_eq!(
        http("{httpGet: {port: 80, path: '/ready?full=1'}}").0,
        "/ready?full=1".to_string()
    );
    // Hosts: IPv4, IPv6, a DNS name in any case and with its final dot.
    for host in ["10.0.0.7", "::1", "App.Internal", "app.internal."] {
        assert_eq!(
            http(&format!("{{httpGet: {{port: 80, host: '{host}'}}}}")).2,
            host.to_string()
        );
    }
    // Headers may be empty or null; a header's value may be empty.
    accepted("{httpGet: {port: 80, httpHeaders: []}}");
    accepted("{httpGet: {port: 80, httpHeaders: null}}");
    accepted("{httpGet: {port: 80, httpHeaders: [{name: X-Empty}]}}");
}

#[test]
fn tcp_exec_and_grpc_probes_load() {
    assert_eq!(
        accepted("{tcpSocket: {port: 3306, host: db.internal}}").action,
        ProbeAction::TcpSocket {
            host: "db.internal".into(),
            port: 3306
        }
    );
    assert_eq!(
        accepted("{exec: {command: [/bin/check, --quick]}}").action,
        ProbeAction::Exec {
            command: vec!["/bin/check".into(), "--quick".into()]
        }
    );
    assert_eq!(
        accepted("{grpc: {port: 9090, service: shop.Cart}}").action,
        ProbeAction::Grpc {
            port: 9090,
            service: "shop.Cart".into()
        }
    );
    assert_eq!(
        accepted("{grpc: {port: 9090}}").action,
        ProbeAction::Grpc {
            port: 9090,
            service: String::new()
        }
    );
}

#[test]
fn absent_timing_takes_kubernetes_defaults_and_zero_means_what_it_means_in_istio() {
    // initialDelay, period, timeout, success, failure.
    assert_eq!(
        timings(&accepted("{tcpSocket: {port: 80}}")),
        [0, 10, 1, 1, 3]
    );
    // Istio's agent: 0 is unset; thresholds have a minimum of 1, period 10 s, timeout 1 s.
    assert_eq!(
        timings(&accepted(
            "{initialDelaySeconds: 0, periodSeconds: 0, timeoutSeconds: 0, successThreshold: 0, failureThreshold: 0, tcpSocket: {port: 80}}"
        )),
        [0, 10, 1, 1, 1]
    );
    assert_eq!(
        timings(&accepted(
            "{initialDelaySeconds: 5, periodSeconds: 2, timeoutSeconds: 3, successThreshold: 2, failureThreshold: 4, tcpSocket: {port: 80}}"
        )),
        [5, 2, 3, 2, 4]
    );
    // The schema's int32 ceiling is allowed, one more is not.
    assert_eq!(
        accepted("{periodSeconds: 2147483647, tcpSocket: {port: 80}}").period_seconds,
        2147483647
    );
    refused(
        "{periodSeconds: 2147483648, tcpSocket: {port: 80}}",
        "spec.probe.periodSeconds",
        "int32",
    );
}

#[test]
fn a_negative_timing_field_is_refused_by_name() {
    for key in [
        "initialDelaySeconds",
        "periodSeconds",
        "timeoutSeconds",
        "successThreshold",
        "failureThreshold",
    ] {
        refused(
            &format!("{{{key}: -1, tcpSocket: {{port: 80}}}}"),
            &format!("spec.probe.{key}"),
            "negative",
        );
    }
}

#[test]
fn exactly_one_method() {
    refused("{}", "spec.probe", "none is given");
    refused("{periodSeconds: 3}", "spec.probe", "none is given");
    refused(
        "{httpGet: {port: 80}, grpc: {port: 80}}",
        "spec.probe",
        "httpGet and grpc are given",
    );
    refused(
        "{tcpSocket: {port: 80}, exec: {command: [x]}}",
        "spec.probe",
        "exactly one of httpGet, tcpSocket, exec or grpc",
    );
}

#[test]
fn http_get_forms_istio_refuses() {
    refused(
        "{httpGet: {path: /}}",
        "spec.probe.httpGet.port",
        "required",
    );
    refused("{httpGet: {port: 0}}", "spec.probe.httpGet.port", "0");
    refused(
        "{httpGet: {port: 70000}}",
        "spec.probe.httpGet.port",
        "70000",
    );
    // Istio takes the scheme exactly as HTTP or HTTPS.
    for scheme in ["https", "http", "FTP"] {
        refused(
            &format!("{{httpGet: {{port: 80, scheme: {scheme}}}}}"),
            "spec.probe.httpGet.scheme",
            "use HTTP or HTTPS",
        );
    }
    // Its webhook's header rule: letters, digits and '-' (so not '_', which its CRD allows).
    for name in ["X_Probe", "bad name", "X:Probe", "''"] {
        refused(
            &format!("{{httpGet: {{port: 80, httpHeaders: [{{name: {name}, value: v}}]}}}}"),
            "spec.probe.httpGet.httpHeaders[0].name",
            "not a header name",
        );
    }
    refused(
        "{httpGet: {port: 80, httpHeaders: [{value: v}]}}",
        "spec.probe.httpGet.httpHeaders[0].name",
        "not a header name",
    );
}

#[test]
fn probes_that_could_never_pass_are_refused() {
    // Istio would load these; no try of any of them can succeed.
    refused(
        "{httpGet: {port: 80, httpHeaders: [{name: X-A, value: ok}, {name: X-B, value: \"a\\r\\nb\"}]}}",
        "spec.probe.httpGet.httpHeaders[1].value",
        "control character",
    );
    refused(
        "{httpGet: {port: 80, host: 'not a host!'}}",
        "spec.probe.httpGet.host",
        "neither an IP address nor a DNS name",
    );
    refused(
        "{tcpSocket: {port: 80, host: '[::1]'}}",
        "spec.probe.tcpSocket.host",
        "neither an IP address nor a DNS name",
    );
    refused(
        "{grpc: {service: shop.Cart}}",
        "spec.probe.grpc.port",
        "required",
    );
    refused("{grpc: {port: 0}}", "spec.probe.grpc.port", "0");
}

#[test]
fn tcp_and_exec_forms_istio_refuses() {
    refused(
        "{tcpSocket: {host: db}}",
        "spec.probe.tcpSocket.port",
        "required",
    );
    refused("{exec: {}}", "spec.probe.exec.command", "required");
    refused(
        "{exec: {command: []}}",
        "spec.probe.exec.command",
        "required",
    );
    // Istio's schema: every item of the command is at least one character.
    refused(
        "{exec: {command: [/bin/check, '']}}",
        "spec.probe.exec.command[1]",
        "empty",
    );
}
