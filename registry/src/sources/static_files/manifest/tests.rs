use std::collections::BTreeMap;
use std::path::Path;

use isthmus_proto::model::*;
use isthmus_proto::{SpiffeId, TrustDomain};

use crate::sources::static_files::{
    parse_file, read_file, DocumentOutcome, ResourceError, SourceDefaults,
};

fn defaults() -> SourceDefaults {
    SourceDefaults {
        cluster: "cluster-a".into(),
        network: "network-a".into(),
        trust_domain: TrustDomain::new("cluster.local").unwrap(),
        domain: "cluster.local".into(),
    }
}

fn parse(text: &str) -> Vec<Resource> {
    parse_file(Path::new("test.yaml"), text, &defaults()).unwrap_or_else(|errors| {
        panic!(
            "unexpected errors:\n{}",
            errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}

fn parse_errors(text: &str) -> Vec<ResourceError> {
    match parse_file(Path::new("bad.yaml"), text, &defaults()) {
        Ok(resources) => panic!("expected errors, got {resources:#?}"),
        Err(errors) => errors,
    }
}

/// What a file that must load defines, and the warnings it loads with (as `--validate` and
/// the source's scan report them).
fn parse_with_warnings(text: &str) -> (Vec<Resource>, Vec<ResourceError>) {
    let resources = parse(text);
    let warnings = read_file(Path::new("test.yaml"), text, &defaults())
        .into_iter()
        .flat_map(|d| match d.outcome {
            DocumentOutcome::Loaded { warnings, .. } => warnings,
            other => panic!("document {}: {other:?}", d.document),
        })
        .collect();
    (resources, warnings)
}

/// `(field, message)` of each warning, for compact assertions.
fn fields_and_messages(warnings: &[ResourceError]) -> Vec<(&str, &str)> {
    warnings
        .iter()
        .map(|w| (w.field.as_str(), w.message.as_str()))
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn id(ns: &str, sa: &str) -> Option<SpiffeId> {
    Some(SpiffeId::parse(&format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")).unwrap())
}

// ---- conversion ----------------------------------------------------------------------------

#[test]
fn service_entry_with_selector_becomes_one_service_per_host() {
    let resources = parse(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: reviews
  namespace: shop
  labels:
    team: books
spec:
  hosts:
  - reviews.shop.svc.cluster.local
  - "*.reviews.example.com"
  addresses:
  - 240.240.0.10
  - 2001:db8::/64
  ports:
  - number: 9080
    name: http
    protocol: http
    targetPort: 8080
  - number: 9443
    name: https
    protocol: HTTPS
  location: MESH_INTERNAL
  resolution: STATIC
  workloadSelector:
    labels:
      app: reviews
  exportTo: ["."]
"#,
    );
    let service = |hostname: &str| {
        Resource::Service(Service {
            hostname: hostname.into(),
            namespace: "shop".into(),
            name: "reviews".into(),
            cluster: "cluster-a".into(),
            ports: vec![
                ServicePort {
                    name: "http".into(),
                    number: 9080,
                    protocol: "HTTP".into(),
                    target_port: 8080,
                },
                ServicePort {
                    name: "https".into(),
                    number: 9443,
                    protocol: "HTTPS".into(),
                    target_port: 0,
                },
            ],
            addresses: vec![
                ServiceAddress {
                    cluster: String::new(),
                    address: "240.240.0.10".into(),
                },
                ServiceAddress {
                    cluster: String::new(),
                    address: "2001:db8::/64".into(),
                },
            ],
            allocated_addresses: vec![],
            subject_alt_names: vec![],
            resolution: Resolution::Static,
            // `.`: seen by its own namespace (Istio's meaning), in every cluster.
            scope: Scope::Mesh,
            export_to: ExportTo::Namespaces(["shop".to_string()].into()),
            labels: labels(&[("team", "books")]).into(),
            selector: labels(&[("app", "reviews")]).into(),
        })
    };
    assert_eq!(
        resources,
        vec![
            service("reviews.shop.svc.cluster.local"),
            service("*.reviews.example.com")
        ]
    );
}

#[test]
fn service_entry_inline_endpoints_become_workloads_of_every_host() {
    let resources = parse(
        r#"
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: db
spec:
  hosts: [db.example.internal, postgres.example.internal]
  ports:
  - {number: 5432, name: tcp-postgres, protocol: tls}
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints:
  - address: 10.1.0.5
    labels: {role: primary}
    locality: eu-west/eu-west-1a
  - address: 10.2.0.5
    network: network-b
    weight: 3
    serviceAccount: postgres
    ports: {tcp-postgres: 15432}
"#,
    );
    assert_eq!(resources.len(), 4, "{resources:#?}");
    let Resource::Service(svc) = &resources[0] else {
        panic!("{:?}", resources[0])
    };
    assert_eq!(svc.resolution, Resolution::Static);
    assert_eq!(svc.scope, Scope::Mesh);
    assert_eq!(svc.namespace, "default");
    let hosts = vec![
        "db.example.internal".to_string(),
        "postgres.example.internal".to_string(),
    ];
    assert_eq!(
        resources[2],
        Resource::Workload(Workload {
            uid: "cluster-a/default/db-0".into(),
            name: "db-0".into(),
            namespace: "default".into(),
            address: Address::parse("10.1.0.5").unwrap(),
            network: "network-a".into(),
            cluster: "cluster-a".into(),
            locality: Locality::parse("eu-west/eu-west-1a"),
            identity: id("default", "default"),
            labels: labels(&[("role", "primary")]).into(),
            ports: BTreeMap::new(),
            weight: 1,
            health: Health::Healthy,
            origin: Origin::WorkloadEntry,
            last_confirmed_ms: 0,
            services: hosts.clone(),
            service_account: "default".into(),
            stale_since_ms: 0,
            tunnel_port: 0,
        })
    );
    assert_eq!(
        resources[3],
        Resource::Workload(Workload {
            uid: "cluster-a/default/db-1".into(),
            name: "db-1".into(),
            namespace: "default".into(),
            address: Address::parse("10.2.0.5").unwrap(),
            network: "network-b".into(),
            cluster: "cluster-a".into(),
            locality: Locality::default(),
            identity: id("default", "postgres"),
            labels: Default::default(),
            ports: [("tcp-postgres".to_string(), 15432)].into(),
            weight: 3,
            health: Health::Healthy,
            origin: Origin::WorkloadEntry,
            last_confirmed_ms: 0,
            services: hosts,
            service_account: "postgres".into(),
            stale_since_ms: 0,
            tunnel_port: 0,
        })
    );
}

#[test]
fn workload_entry_converts_with_istio_semantics() {
    let resources = parse(
        r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: reviews-b-1
  namespace: shop
  labels:
    app: reviews
    version: v1
spec:
  address: 10.0.0.11
  ports:
    http: 9080
  labels:
    version: v2
  network: network-b
  locality: us-east/us-east-1b/rack-7
  weight: 5
  serviceAccount: reviews
"#,
    );
    assert_eq!(
        resources,
        vec![Resource::Workload(Workload {
            uid: "cluster-a/shop/reviews-b-1".into(),
            name: "reviews-b-1".into(),
            namespace: "shop".into(),
            address: Address::parse("10.0.0.11").unwrap(),
            network: "network-b".into(),
            cluster: "cluster-a".into(),
            locality: Locality {
                region: "us-east".into(),
                zone: "us-east-1b".into(),
                subzone: "rack-7".into(),
            },
            identity: id("shop", "reviews"),
            // metadata labels and spec labels both select; the entry's own win.
            labels: labels(&[("app", "reviews"), ("version", "v2")]).into(),
            ports: [("http".to_string(), 9080)].into(),
            weight: 5,
            health: Health::Healthy,
            origin: Origin::WorkloadEntry,
            last_confirmed_ms: 0,
            services: vec![],
            service_account: "reviews".into(),
            stale_since_ms: 0,
            tunnel_port: 0,
        })]
    );
}

#[test]
fn workload_entry_captured_by_ztunnel_takes_tunnels_on_the_hbone_port() {
    let entry = |redirection: &str| {
        let resources = parse(&format!(
            r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: ecs-web
  annotations:
    ambient.istio.io/redirection: {redirection}
spec:
  address: 10.0.0.12
  ports:
    http: 8080
"#
        ));
        let Resource::Workload(w) = &resources[0] else {
            panic!("{resources:?}")
        };
        w.clone()
    };
    let captured = entry("enabled");
    assert_eq!(captured.tunnel_port, 15008);
    assert_eq!(captured.ports, [("http".to_string(), 8080)].into());
    assert_eq!(entry("pending").tunnel_port, 0, "not captured yet");
}

#[test]
fn workload_entry_takes_network_and_locality_from_well_known_labels() {
    let resources = parse(
        r#"
apiVersion: isthmus.io/v1alpha1
kind: WorkloadEntry
metadata:
  name: legacy
  labels:
    topology.istio.io/network: network-c
spec:
  address: legacy.corp.example.com
  labels:
    topology.kubernetes.io/region: eu-west
    topology.kubernetes.io/zone: eu-west-1c
"#,
    );
    let Resource::Workload(w) = &resources[0] else {
        panic!("{resources:?}")
    };
    assert_eq!(w.network, "network-c");
    assert_eq!(w.locality, Locality::parse("eu-west/eu-west-1c"));
    assert_eq!(w.address, "legacy.corp.example.com");
    assert_eq!(w.namespace, "default");
    assert_eq!(w.weight, 1);
    assert_eq!(w.identity, id("default", "default"));

    // Without either, the registry's default network applies.
    let resources = parse(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: plain}\nspec: {address: 10.9.9.9}\n",
    );
    let Resource::Workload(w) = &resources[0] else {
        panic!("{resources:?}")
    };
    assert_eq!(w.network, "network-a");
    assert!(w.locality.is_empty());
}

#[test]
fn workload_group_converts_with_probe_defaults() {
    let resources = parse(
        r#"
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata:
  name: vm-web
  namespace: shop
  labels:
    owner: web-team
spec:
  metadata:
    labels:
      app: web
    annotations:
      example.com/note: anything goes here
  template:
    ports:
      http: 8080
    labels:
      version: v1
    serviceAccount: web
    network: network-b
  probe:
    initialDelaySeconds: 2
    httpGet:
      path: /healthz
      port: 8080
"#,
    );
    assert_eq!(
        resources,
        vec![Resource::WorkloadGroup(Box::new(WorkloadGroup {
            name: "vm-web".into(),
            namespace: "shop".into(),
            labels: labels(&[("owner", "web-team")]),
            template: Workload {
                uid: String::new(),
                name: String::new(),
                namespace: "shop".into(),
                address: Address::None,
                network: "network-b".into(),
                cluster: "cluster-a".into(),
                locality: Locality::default(),
                identity: id("shop", "web"),
                labels: labels(&[("app", "web"), ("version", "v1")]).into(),
                ports: [("http".to_string(), 8080)].into(),
                weight: 1,
                health: Health::Healthy,
                origin: Origin::Vm,
                last_confirmed_ms: 0,
                services: vec![],
                service_account: "web".into(),
                stale_since_ms: 0,
                tunnel_port: 0,
            },
            probe: Some(Probe {
                initial_delay_seconds: 2,
                period_seconds: 10,
                timeout_seconds: 1,
                success_threshold: 1,
                failure_threshold: 3,
                action: ProbeAction::HttpGet {
                    path: "/healthz".into(),
                    port: 8080,
                    host: String::new(),
                    scheme: HttpScheme::Http,
                    headers: vec![],
                },
            }),
        }))]
    );
}

#[test]
fn workload_group_probe_kinds() {
    let group = |probe: &str| {
        let text = format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {{name: g}}\nspec:\n  template: {{}}\n  probe:\n{probe}"
        );
        match parse(&text).pop() {
            Some(Resource::WorkloadGroup(g)) => g.probe.unwrap(),
            other => panic!("{other:?}"),
        }
    };
    let tcp =
        group("    periodSeconds: 10\n    failureThreshold: 1\n    tcpSocket: {port: 3306}\n");
    assert_eq!(
        tcp.action,
        ProbeAction::TcpSocket {
            host: String::new(),
            port: 3306
        }
    );
    assert_eq!((tcp.period_seconds, tcp.failure_threshold), (10, 1));
    let exec = group("    exec: {command: [/bin/check, --quick]}\n");
    assert_eq!(
        exec.action,
        ProbeAction::Exec {
            command: vec!["/bin/check".into(), "--quick".into()]
        }
    );
}

#[test]
fn network_converts_with_default_ports() {
    let resources = parse(
        r#"
apiVersion: isthmus.io/v1alpha1
kind: Network
metadata:
  name: network-b
spec:
  gateways:
  - address: 198.51.100.10
    locality: us-east/us-east-1a
  - address: 2001:db8::10
    sniPort: 443
    tunnelPort: 4433
  cidrs: [10.0.0.0/16, "2001:db8:1::/48"]
"#,
    );
    assert_eq!(
        resources,
        vec![Resource::Network(Network {
            id: "network-b".into(),
            gateways: vec![
                Gateway {
                    address: "198.51.100.10".parse().unwrap(),
                    sni_port: 15443,
                    tunnel_port: 15008,
                    locality: Locality::parse("us-east/us-east-1a"),
                },
                Gateway {
                    address: "2001:db8::10".parse().unwrap(),
                    sni_port: 443,
                    tunnel_port: 4433,
                    locality: Locality::default(),
                },
            ],
            cidrs: vec!["10.0.0.0/16".into(), "2001:db8:1::/48".into()],
        })]
    );
    // A network with nothing but a name is valid: its workloads are reachable only directly.
    let bare = parse("apiVersion: isthmus.io/v1alpha1\nkind: Network\nmetadata: {name: flat}\n");
    assert_eq!(bare.len(), 1);
}

#[test]
fn multi_document_files_skip_empty_documents() {
    let resources = parse(
        r#"# a comment before the first separator makes an empty document
---
apiVersion: isthmus.io/v1alpha1
kind: Network
metadata: {name: network-a}
---
---
# only a comment
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: one, namespace: shop}
spec: {address: 10.0.0.1}
...
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: two, namespace: shop}
spec: {address: 10.0.0.2}
"#,
    );
    let keys: Vec<String> = resources.iter().map(Resource::key).collect();
    assert_eq!(
        keys,
        [
            "Network//network-a",
            "Workload/cluster-a/shop/one",
            "Workload/cluster-a/shop/two"
        ]
    );
    assert!(parse("").is_empty());
    assert!(parse("---\n---\n").is_empty());
}

// ---- traffic rules -------------------------------------------------------------------------

fn the_destination_rule(resources: Vec<Resource>) -> DestinationRule {
    match resources.as_slice() {
        [Resource::DestinationRule(d)] => (**d).clone(),
        other => panic!("{other:#?}"),
    }
}

fn the_virtual_service(resources: Vec<Resource>) -> VirtualService {
    match resources.as_slice() {
        [Resource::VirtualService(v)] => (**v).clone(),
        other => panic!("{other:#?}"),
    }
}

fn destination(host: &str, subset: &str, port: u16, weight: u32) -> RouteDestination {
    RouteDestination {
        host: host.into(),
        subset: subset.into(),
        port,
        weight,
    }
}

/// A VirtualService `vs` in namespace `shop` whose spec is `spec` (indented two spaces).
fn virtual_service_doc(spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: vs, namespace: shop}}\nspec:\n{spec}"
    )
}

#[test]
fn destination_rule_with_short_host_reads_its_subsets() {
    let rule = the_destination_rule(parse(
        r#"
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: reviews
  namespace: shop
spec:
  host: reviews
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels:
      version: v2
      track: canary
  exportTo: [".", books]
"#,
    ));
    assert_eq!(
        rule,
        DestinationRule {
            name: "reviews".into(),
            namespace: "shop".into(),
            host: "reviews.shop.svc.cluster.local".into(),
            subsets: vec![
                Subset {
                    name: "v1".into(),
                    labels: labels(&[("version", "v1")]),
                    policy: TrafficPolicy::default(),
                },
                Subset {
                    name: "v2".into(),
                    labels: labels(&[("version", "v2"), ("track", "canary")]),
                    policy: TrafficPolicy::default(),
                },
            ],
            policy: TrafficPolicy::default(),
            export_to: ExportTo::Namespaces(["shop".to_string(), "books".to_string()].into()),
        }
    );
}

#[test]
fn traffic_rule_hosts_resolve_as_istio_resolves_short_names() {
    let host_of = |host: &str| {
        let text = format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: r, namespace: shop}}\nspec: {{host: {host:?}}}\n"
        );
        the_destination_rule(parse(&text)).host
    };
    assert_eq!(host_of("reviews"), "reviews.shop.svc.cluster.local");
    assert_eq!(host_of("reviews.books"), "reviews.books.svc.cluster.local");
    assert_eq!(
        host_of("Reviews.Books.svc.cluster.local"),
        "reviews.books.svc.cluster.local"
    );
    assert_eq!(host_of("api.example.com"), "api.example.com");
    // A trailing dot says the name is complete as written.
    assert_eq!(host_of("example.com."), "example.com");
    // The default namespace when the rule names none.
    let rule = the_destination_rule(parse(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: r}\nspec: {host: web}\n",
    ));
    assert_eq!(rule.host, "web.default.svc.cluster.local");
    assert_eq!(rule.export_to, ExportTo::Public);
}

#[test]
fn destination_rule_duplicate_subset_names_are_refused() {
    let errors = parse_errors(
        r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v1, labels: {version: v3}}
"#,
    );
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        vec![
            "bad.yaml (document 1): spec.subsets[2].name: \"v1\" is the name of another subset \
             (spec.subsets[0]); subset names must be unique"
        ]
    );
}

#[test]
fn traffic_rule_errors_name_their_field() {
    let dr = |spec: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: r, namespace: shop}}\nspec: {spec}\n")
    };
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "wildcard rule host",
            dr("{host: \"*.example.com\"}"),
            "spec.host",
            "wildcard hosts are not supported by isthmus yet",
        ),
        ("no rule host", dr("{subsets: []}"), "spec.host", "is required"),
        (
            "subset without name",
            dr("{host: web, subsets: [{labels: {version: v1}}]}"),
            "spec.subsets[0].name",
            "is required",
        ),
        (
            "subset name not a DNS label",
            dr("{host: web, subsets: [{name: V_1}]}"),
            "spec.subsets[0].name",
            "\"V_1\"",
        ),
        (
            "bad subset label",
            dr("{host: web, subsets: [{name: v1, labels: {version: \"a b\"}}]}"),
            "spec.subsets[0].labels.version",
            "\"a b\"",
        ),
        (
            "unknown rule field",
            dr("{host: web, hosts: [web]}"),
            "spec.hosts",
            "unknown field `hosts`",
        ),
        (
            "traffic policy not a mapping",
            dr("{host: web, trafficPolicy: [tls]}"),
            "spec.trafficPolicy",
            "invalid type",
        ),
        (
            "wildcard virtual service host",
            virtual_service_doc("  hosts: [\"*\"]\n  tcp: [{route: [{destination: {host: web}}]}]\n"),
            "spec.hosts[0]",
            "wildcard hosts are not supported by isthmus yet",
        ),
        (
            "no virtual service hosts",
            virtual_service_doc("  tcp: [{route: [{destination: {host: web}}]}]\n"),
            "spec.hosts",
            "at least one host is required",
        ),
        (
            "no routes at all",
            virtual_service_doc("  hosts: [web]\n"),
            "spec",
            "one of http, tls or tcp is required",
        ),
        (
            "route without destinations",
            virtual_service_doc("  hosts: [web]\n  tcp: [{match: [{port: 80}]}]\n"),
            "spec.tcp[0].route",
            "at least one destination is required",
        ),
        (
            "destination without host",
            virtual_service_doc("  hosts: [web]\n  tcp: [{route: [{destination: {subset: v1}}]}]\n"),
            "spec.tcp[0].route[0].destination.host",
            "is required",
        ),
        (
            "wildcard destination host",
            virtual_service_doc("  hosts: [web]\n  tcp: [{route: [{destination: {host: \"*.example.com\"}}]}]\n"),
            "spec.tcp[0].route[0].destination.host",
            "wildcard hosts are not supported by isthmus yet",
        ),
        (
            "bad destination port",
            virtual_service_doc("  hosts: [web]\n  tcp: [{route: [{destination: {host: web, port: {number: 70000}}}]}]\n"),
            "spec.tcp[0].route[0].destination.port.number",
            "70000 is not a valid port",
        ),
        (
            "bad match port",
            virtual_service_doc("  hosts: [web]\n  tcp: [{match: [{port: 65536}], route: [{destination: {host: web}}]}]\n"),
            "spec.tcp[0].match[0].port",
            "65536 is not a valid port",
        ),
        (
            "sniHosts in a tcp match",
            virtual_service_doc("  hosts: [web]\n  tcp: [{match: [{sniHosts: [web]}], route: [{destination: {host: web}}]}]\n"),
            "spec.tcp[0].match[0].sniHosts",
            "unknown field `sniHosts`",
        ),
        (
            "tls route without match",
            virtual_service_doc("  hosts: [web]\n  tls: [{route: [{destination: {host: web}}]}]\n"),
            "spec.tls[0].match",
            "at least one match with sniHosts is required",
        ),
        (
            "tls match without sniHosts",
            virtual_service_doc("  hosts: [web]\n  tls: [{match: [{port: 443}], route: [{destination: {host: web}}]}]\n"),
            "spec.tls[0].match[0].sniHosts",
            "at least one SNI host is required",
        ),
        (
            "SNI host of another service",
            virtual_service_doc("  hosts: [web]\n  tls: [{match: [{sniHosts: [db.example.com]}], route: [{destination: {host: web}}]}]\n"),
            "spec.tls[0].match[0].sniHosts[0]",
            "\"db.example.com\" is not one of the VirtualService's hosts",
        ),
        (
            "negative weight",
            virtual_service_doc("  hosts: [web]\n  tcp: [{route: [{destination: {host: web}, weight: -1}]}]\n"),
            "spec.tcp[0].route[0].weight",
            "-1",
        ),
    ];
    for (what, doc, field, needle) in cases {
        let errors = parse_file(Path::new("bad.yaml"), &doc, &defaults())
            .err()
            .unwrap_or_else(|| panic!("{what}: expected errors"));
        assert!(
            errors
                .iter()
                .any(|e| e.field == field && e.message.contains(needle)),
            "{what}: no error at {field} containing {needle:?}; got {errors:#?}"
        );
    }
}

/// A DestinationRule `r` in namespace `shop` for host `web`, with `rest` (indented two
/// spaces) after the host in its spec.
fn destination_rule_doc(rest: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: r, namespace: shop}}\nspec:\n  host: web\n{rest}"
    )
}

#[test]
fn destination_rule_traffic_policies_are_honoured() {
    let (resources, warnings) = parse_with_warnings(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      simple: LEAST_REQUEST
    connectionPool:
      tcp:
        maxConnections: 100
        connectTimeout: 250ms
    outlierDetection:
      consecutive5xxErrors: 3
      baseEjectionTime: 15s
      maxEjectionPercent: 50
      interval: 10s
    portLevelSettings:
    - port: {number: 9080}
      connectionPool:
        tcp: {maxConnections: 5}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      connectionPool:
        tcp: {maxConnections: 2}
"#,
    );
    let rule = the_destination_rule(resources);
    assert_eq!(
        rule.policy,
        TrafficPolicy {
            load_balancer: Some(LoadBalancer::LeastConnections),
            max_connections: Some(100),
            connect_timeout_ms: Some(250),
            outlier: Some(OutlierPolicy {
                consecutive_errors: Some(3),
                base_ejection_ms: Some(15_000),
                max_ejection_percent: Some(50),
            }),
            ports: [(
                9080,
                TrafficPolicy {
                    max_connections: Some(5),
                    ..Default::default()
                },
            )]
            .into(),
            locality: None,
            tcp_keepalive: None,
        }
    );
    assert_eq!(
        rule.subsets,
        vec![Subset {
            name: "v1".into(),
            labels: labels(&[("version", "v1")]),
            policy: TrafficPolicy {
                max_connections: Some(2),
                ..Default::default()
            },
        }]
    );
    assert_eq!(
        fields_and_messages(&warnings),
        vec![(
            "spec.trafficPolicy.outlierDetection.interval",
            "not honoured by isthmus yet (ignored): isthmus ejects an endpoint on the failures \
             themselves, with no periodic sweep"
        )]
    );
}

#[test]
fn destination_rule_policy_values_read_as_istio_writes_them() {
    let policy_of = |policy: &str| {
        let (resources, _) = parse_with_warnings(&destination_rule_doc(&format!(
            "  trafficPolicy: {policy}\n"
        )));
        the_destination_rule(resources).policy
    };
    let timeout = |t: &str| {
        policy_of(&format!(
            "{{connectionPool: {{tcp: {{connectTimeout: {t:?}}}}}}}"
        ))
        .connect_timeout_ms
    };
    assert_eq!(timeout("1s"), Some(1_000));
    assert_eq!(timeout("1.5s"), Some(1_500));
    assert_eq!(timeout("0.001s"), Some(1));
    assert_eq!(timeout("2m"), Some(120_000));
    assert_eq!(timeout("1h"), Some(3_600_000));
    assert_eq!(timeout("1m30s"), Some(90_000));
    let balancer =
        |simple: &str| policy_of(&format!("{{loadBalancer: {{simple: {simple}}}}}")).load_balancer;
    assert_eq!(balancer("ROUND_ROBIN"), Some(LoadBalancer::RoundRobin));
    assert_eq!(balancer("LEAST_CONN"), Some(LoadBalancer::LeastConnections));
    assert_eq!(
        balancer("LEAST_REQUEST"),
        Some(LoadBalancer::LeastConnections)
    );
    assert_eq!(balancer("RANDOM"), Some(LoadBalancer::Random));
    assert_eq!(balancer("UNSPECIFIED"), None);
    // A failed connect is a gateway error and a 5xx at once: the smaller count ejects first;
    // 0 turns one count off, leaving the other.
    let errors = |counts: &str| {
        policy_of(&format!("{{outlierDetection: {{{counts}}}}}"))
            .outlier
            .and_then(|o| o.consecutive_errors)
    };
    assert_eq!(errors("consecutiveGatewayErrors: 4"), Some(4));
    assert_eq!(
        errors("consecutiveGatewayErrors: 4, consecutive5xxErrors: 7"),
        Some(4)
    );
    assert_eq!(
        errors("consecutiveGatewayErrors: 9, consecutive5xxErrors: 7"),
        Some(7)
    );
    assert_eq!(
        errors("consecutiveGatewayErrors: 0, consecutive5xxErrors: 7"),
        Some(7)
    );
    // Only fields isthmus does not honour: no outlier policy at all.
    assert_eq!(
        policy_of("{outlierDetection: {interval: 5s}}").outlier,
        None
    );
    assert!(policy_of("{tls: {mode: ISTIO_MUTUAL}}").is_empty());
}

#[test]
fn destination_rule_locality_settings_are_read_and_checked() {
    use isthmus_proto::traffic::{LocalityLb, LocalityLevel};
    let (resources, warnings) = parse_with_warnings(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        failover:
        - {from: eu-west, to: eu-central}
        failoverPriority:
        - topology.kubernetes.io/region
        - topology.kubernetes.io/zone
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer:
        localityLbSetting:
          distribute:
          - from: eu-west/zone-a/*
            to: {"eu-west/zone-a/*": 80, "eu-west/zone-b/*": 20}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer:
        localityLbSetting:
          enabled: false
          failoverPriority: [topology.istio.io/network]
"#,
    );
    let rule = the_destination_rule(resources);
    assert_eq!(
        rule.policy.locality,
        Some(LocalityLb {
            failover: vec![("eu-west".into(), "eu-central".into())],
            failover_priority: vec![LocalityLevel::Region, LocalityLevel::Zone],
            ..Default::default()
        })
    );
    assert_eq!(
        rule.subsets[0].policy.locality,
        Some(LocalityLb {
            distribute: vec![(
                "eu-west/zone-a/*".into(),
                vec![
                    ("eu-west/zone-a/*".into(), 80),
                    ("eu-west/zone-b/*".into(), 20)
                ],
            )],
            ..Default::default()
        })
    );
    assert_eq!(
        rule.subsets[1].policy.locality,
        Some(LocalityLb {
            disabled: true,
            ..Default::default()
        })
    );
    let warned = fields_and_messages(&warnings);
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert_eq!(
        warned[0].0,
        "spec.subsets[1].trafficPolicy.loadBalancer.localityLbSetting.failoverPriority[0]"
    );
    assert!(warned[0]
        .1
        .contains("\"topology.istio.io/network\" is not a locality label"));

    let errors: Vec<String> = parse_errors(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        failover:
        - {from: eu-west, to: eu-west}
        - {from: eu-west/zone-a, to: us}
        - {from: eu-west}
        distribute:
        - from: "eu-*/zone-a"
          to: {"eu-west/*": 70, "us/*": 20}
        - to: {"*": 100}
"#,
    )
    .iter()
    .map(|e| e.to_string())
    .collect();
    for needle in [
        "localityLbSetting: distribute and failover are alternatives",
        "failover[0]: from and to are both \"eu-west\"",
        "failover[1].from: \"eu-west/zone-a\" is not a region",
        "failover[2]: needs both from and to",
        "distribute[0].from: \"eu-*/zone-a\" is not a locality",
        "distribute[0].to: the shares add up to 90",
        "distribute[1].from: is required",
    ] {
        assert!(
            errors.iter().any(|e| e.contains(needle)),
            "{needle:?} not in {errors:#?}"
        );
    }
}

#[test]
fn destination_rule_policies_warn_about_each_field_not_honoured() {
    let (resources, warnings) = parse_with_warnings(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      simple: PASSTHROUGH
      localityLbSetting: {enabled: true}
    connectionPool:
      tcp:
        maxConnections: 100
        tcpKeepalive: {time: 7200s}
        idleTimeout: 1h
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
    outlierDetection:
      consecutiveErrors: 5
      minHealthPercent: 20
    tls: {mode: ISTIO_MUTUAL}
    portLevelSettings:
    - port: {number: 9080}
      tls: {mode: DISABLE}
    tunnel: {protocol: CONNECT, targetHost: proxy, targetPort: 8080}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer: {simple: ROUND_ROBIN, warmupDurationSecs: 60s}
      proxyProtocol: {version: V2}
  workloadSelector:
    matchLabels: {app: web}
"#,
    );
    let rule = the_destination_rule(resources);
    assert_eq!(
        rule.policy.load_balancer, None,
        "PASSTHROUGH is not honoured"
    );
    assert_eq!(rule.policy.max_connections, Some(100));
    assert_eq!(
        rule.policy.tcp_keepalive,
        Some(isthmus_proto::traffic::TcpKeepalive {
            time_ms: Some(7_200_000),
            ..Default::default()
        })
    );
    assert_eq!(
        rule.policy.locality,
        Some(isthmus_proto::traffic::LocalityLb::default()),
        "enabled: true is the default locality preference"
    );
    assert_eq!(rule.policy.outlier, None);
    assert_eq!(rule.policy.ports, [(9080, TrafficPolicy::default())].into());
    assert_eq!(
        rule.subsets[0].policy.load_balancer,
        Some(LoadBalancer::RoundRobin)
    );
    let ignored = "not honoured by isthmus yet (ignored)";
    assert_eq!(
        fields_and_messages(&warnings),
        vec![
            (
                "spec.trafficPolicy.loadBalancer.simple",
                "not honoured by isthmus yet (ignored): isthmus always picks an endpoint, \
                 rather than connecting to the address the caller dialled"
            ),
            ("spec.trafficPolicy.connectionPool.tcp.idleTimeout", ignored),
            ("spec.trafficPolicy.connectionPool.http", ignored),
            (
                "spec.trafficPolicy.outlierDetection.minHealthPercent",
                ignored
            ),
            (
                "spec.trafficPolicy.outlierDetection.consecutiveErrors",
                "not honoured by isthmus yet (ignored): deprecated by Istio; use \
                 consecutiveGatewayErrors or consecutive5xxErrors"
            ),
            ("spec.trafficPolicy.tls", ignored),
            ("spec.trafficPolicy.portLevelSettings[0].tls", ignored),
            ("spec.trafficPolicy.tunnel", ignored),
            (
                "spec.subsets[0].trafficPolicy.loadBalancer.warmupDurationSecs",
                ignored
            ),
            ("spec.subsets[0].trafficPolicy.proxyProtocol", ignored),
            (
                "spec.workloadSelector",
                "not honoured by isthmus yet (ignored): the rule applies to every caller"
            ),
        ]
    );
    assert_eq!(
        warnings[2].to_string(),
        "test.yaml (document 1): spec.trafficPolicy.connectionPool.http: not honoured by isthmus yet (ignored)"
    );
}

#[test]
fn destination_rule_policy_errors_name_their_path() {
    let cases: Vec<(&str, &str, &str, &str)> = vec![
        // (what, the spec after its host, field, a piece of the message)
        (
            "unknown load balancer",
            "  trafficPolicy: {loadBalancer: {simple: FASTEST}}\n",
            "spec.trafficPolicy.loadBalancer.simple",
            "\"FASTEST\" is not a load balancer; use ROUND_ROBIN, LEAST_REQUEST, LEAST_CONN, \
             RANDOM, PASSTHROUGH or UNSPECIFIED",
        ),
        (
            "simple and consistentHash",
            "  trafficPolicy: {loadBalancer: {simple: RANDOM, consistentHash: {useSourceIp: true}}}\n",
            "spec.trafficPolicy.loadBalancer",
            "alternatives",
        ),
        (
            "negative connections",
            "  trafficPolicy: {connectionPool: {tcp: {maxConnections: -4}}}\n",
            "spec.trafficPolicy.connectionPool.tcp.maxConnections",
            "-4 is not a valid number of connections",
        ),
        (
            "connections past int32",
            "  trafficPolicy: {connectionPool: {tcp: {maxConnections: 2147483648}}}\n",
            "spec.trafficPolicy.connectionPool.tcp.maxConnections",
            "2147483648 is not a valid number of connections",
        ),
        (
            "not a duration",
            "  trafficPolicy: {connectionPool: {tcp: {connectTimeout: fast}}}\n",
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
            "\"fast\" is not a duration; write a number and a unit, as 250ms, 1.5s, 2m or 1h",
        ),
        (
            "keepalive probes out of range",
            "  trafficPolicy: {connectionPool: {tcp: {tcpKeepalive: {probes: 0}}}}\n",
            "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive.probes",
            "0 is not a number of probes from 1 to 127",
        ),
        (
            "keepalive time past the kernel's",
            "  trafficPolicy: {connectionPool: {tcp: {tcpKeepalive: {time: 10h}}}}\n",
            "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive.time",
            "longer than the kernel's 32767 s",
        ),
        (
            "a number, not a duration",
            "  trafficPolicy: {connectionPool: {tcp: {connectTimeout: 10}}}\n",
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
            "invalid type",
        ),
        (
            "below 1ms",
            "  trafficPolicy: {connectionPool: {tcp: {connectTimeout: 0s}}}\n",
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
            "\"0s\" is shorter than 1ms, the least Istio accepts",
        ),
        (
            "finer than 1ms",
            "  trafficPolicy: {connectionPool: {tcp: {connectTimeout: 1.5ms}}}\n",
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
            "\"1.5ms\" is not a whole number of milliseconds",
        ),
        (
            "negative duration",
            "  trafficPolicy: {outlierDetection: {baseEjectionTime: -30s}}\n",
            "spec.trafficPolicy.outlierDetection.baseEjectionTime",
            "\"-30s\" is negative",
        ),
        (
            "bad duration in a field not honoured",
            "  trafficPolicy: {outlierDetection: {interval: soon}}\n",
            "spec.trafficPolicy.outlierDetection.interval",
            "\"soon\" is not a duration",
        ),
        (
            "ejection percent",
            "  trafficPolicy: {outlierDetection: {maxEjectionPercent: 150}}\n",
            "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
            "150 is not a percentage (0-100)",
        ),
        (
            "negative error count",
            "  trafficPolicy: {outlierDetection: {consecutive5xxErrors: -1}}\n",
            "spec.trafficPolicy.outlierDetection.consecutive5xxErrors",
            "-1",
        ),
        (
            "port listed twice",
            "  trafficPolicy:\n    portLevelSettings:\n    - {port: {number: 9080}, connectionPool: {tcp: {maxConnections: 5}}}\n    - {port: {number: 9080}, loadBalancer: {simple: RANDOM}}\n",
            "spec.trafficPolicy.portLevelSettings[1].port.number",
            "port 9080 has its settings already (spec.trafficPolicy.portLevelSettings[0]); \
             list each port once",
        ),
        (
            "port settings without a port",
            "  trafficPolicy: {portLevelSettings: [{loadBalancer: {simple: RANDOM}}]}\n",
            "spec.trafficPolicy.portLevelSettings[0].port",
            "is required",
        ),
        (
            "not a port",
            "  trafficPolicy: {portLevelSettings: [{port: {number: 70000}, loadBalancer: {simple: RANDOM}}]}\n",
            "spec.trafficPolicy.portLevelSettings[0].port.number",
            "70000 is not a valid port",
        ),
        (
            "a port's values",
            "  trafficPolicy: {portLevelSettings: [{port: {number: 80}, connectionPool: {tcp: {maxConnections: -1}}}]}\n",
            "spec.trafficPolicy.portLevelSettings[0].connectionPool.tcp.maxConnections",
            "-1 is not a valid number of connections",
        ),
        (
            "unknown field in connectionPool.tcp",
            "  trafficPolicy: {connectionPool: {tcp: {maxConnection: 5}}}\n",
            "spec.trafficPolicy.connectionPool.tcp.maxConnection",
            "unknown field `maxConnection`",
        ),
        (
            "unknown field in a policy",
            "  trafficPolicy: {loadBalancing: {simple: RANDOM}}\n",
            "spec.trafficPolicy.loadBalancing",
            "unknown field `loadBalancing`",
        ),
        (
            "unknown field in a subset's policy",
            "  subsets:\n  - name: v1\n    trafficPolicy: {outlierDetection: {consecutive5xx: 3}}\n",
            "spec.subsets[0].trafficPolicy.outlierDetection.consecutive5xx",
            "unknown field `consecutive5xx`",
        ),
        (
            "unknown field in a port selector",
            "  trafficPolicy: {portLevelSettings: [{port: {name: http}}]}\n",
            "spec.trafficPolicy.portLevelSettings[0].port.name",
            "unknown field `name`",
        ),
        (
            "a subset's values",
            "  subsets:\n  - name: v1\n    trafficPolicy: {loadBalancer: {simple: round_robin}}\n",
            "spec.subsets[0].trafficPolicy.loadBalancer.simple",
            "\"round_robin\" is not a load balancer",
        ),
        (
            "warned section of the wrong type",
            "  trafficPolicy: {connectionPool: {http: 5}}\n",
            "spec.trafficPolicy.connectionPool.http",
            "invalid type",
        ),
    ];
    for (what, rest, field, needle) in cases {
        let errors = parse_file(
            Path::new("bad.yaml"),
            &destination_rule_doc(rest),
            &defaults(),
        )
        .err()
        .unwrap_or_else(|| panic!("{what}: expected errors"));
        assert!(
            errors
                .iter()
                .any(|e| e.field == field && e.message.contains(needle)),
            "{what}: no error at {field} containing {needle:?}; got {errors:#?}"
        );
    }
}

#[test]
fn virtual_service_tcp_route_splits_by_weight() {
    let (resources, warnings) = parse_with_warnings(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  exportTo: ["."]
  tcp:
  - match:
    - port: 9080
      sourceLabels: {app: web}
    route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination:
        host: reviews.canary
        subset: v2
        port: {number: 9090}
      weight: 10
"#,
    );
    assert!(warnings.is_empty(), "{warnings:#?}");
    assert_eq!(
        the_virtual_service(resources),
        VirtualService {
            name: "reviews".into(),
            namespace: "shop".into(),
            hosts: vec!["reviews.shop.svc.cluster.local".into()],
            routes: vec![L4Route {
                ports: vec![9080],
                sni_hosts: vec![],
                source_labels: labels(&[("app", "web")]),
                destinations: vec![
                    destination("reviews.shop.svc.cluster.local", "v1", 0, 90),
                    destination("reviews.canary.svc.cluster.local", "v2", 9090, 10),
                ],
            }],
            export_to: ExportTo::Namespaces(["shop".to_string()].into()),
        }
    );
}

#[test]
fn virtual_service_weights_must_sum_to_100() {
    let route = |destinations: &str| {
        virtual_service_doc(&format!(
            "  hosts: [web]\n  tcp:\n  - route:\n{destinations}"
        ))
    };
    let errors = parse_errors(&route(
        "    - {destination: {host: web, subset: v1}, weight: 90}\n    - {destination: {host: web, subset: v2}, weight: 20}\n",
    ));
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        vec!["bad.yaml (document 1): spec.tcp[0].route: the weights sum to 110; they must sum to 100"]
    );
    let errors = parse_errors(&route(
        "    - {destination: {host: web, subset: v1}, weight: 100}\n    - {destination: {host: web, subset: v2}}\n",
    ));
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].field, "spec.tcp[0].route[1].weight");
    assert!(
        errors[0]
            .message
            .contains("is required when a route has several destinations"),
        "{errors:#?}"
    );
    let errors = parse_errors(&route("    - {destination: {host: web}, weight: 50}\n"));
    assert_eq!(errors[0].field, "spec.tcp[0].route", "{errors:#?}");

    // A drained destination (weight 0) is a weight; a lone destination takes everything.
    let vs = the_virtual_service(parse(&route(
        "    - {destination: {host: web, subset: v1}, weight: 100}\n    - {destination: {host: web, subset: v2}, weight: 0}\n",
    )));
    let weights: Vec<u32> = vs.routes[0].destinations.iter().map(|d| d.weight).collect();
    assert_eq!(weights, [100, 0]);
    let vs = the_virtual_service(parse(&route("    - destination: {host: web}\n")));
    assert_eq!(
        vs.routes[0].destinations,
        [destination("web.shop.svc.cluster.local", "", 0, 100)]
    );
}

#[test]
fn virtual_service_match_entries_become_routes() {
    let (resources, warnings) = parse_with_warnings(&virtual_service_doc(
        r#"  hosts: [db]
  tcp:
  - match:
    - port: 5432
    - sourceLabels: {app: reporting}
    - port: 5433
      destinationSubnets: [10.0.0.0/8]
      sourceNamespace: batch
    - port: 5434
      gateways: [edge-gateway]
    route:
    - destination: {host: db, subset: replica}
  - route:
    - destination: {host: db, subset: primary}
"#,
    ));
    let vs = the_virtual_service(resources);
    let replica = vec![destination("db.shop.svc.cluster.local", "replica", 0, 100)];
    let primary = vec![destination("db.shop.svc.cluster.local", "primary", 0, 100)];
    assert_eq!(
        vs.routes,
        vec![
            L4Route {
                ports: vec![5432],
                destinations: replica.clone(),
                ..Default::default()
            },
            L4Route {
                source_labels: labels(&[("app", "reporting")]),
                destinations: replica.clone(),
                ..Default::default()
            },
            L4Route {
                ports: vec![5433],
                destinations: replica,
                ..Default::default()
            },
            // No match: every connection.
            L4Route {
                destinations: primary,
                ..Default::default()
            },
        ]
    );
    let fields: Vec<&str> = warnings.iter().map(|w| w.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.tcp[0].match[2].destinationSubnets",
            "spec.tcp[0].match[2].sourceNamespace",
            "spec.tcp[0].match[3].gateways",
        ]
    );
    assert!(
        warnings[0]
            .message
            .starts_with("not honoured by isthmus yet (ignored)"),
        "{warnings:#?}"
    );
    assert!(
        warnings[2].message.contains("edge-gateway"),
        "{warnings:#?}"
    );
}

#[test]
fn virtual_service_tls_routes_match_sni_hosts_and_come_first() {
    let vs = the_virtual_service(parse(&virtual_service_doc(
        r#"  hosts: [api.example.com, web]
  tcp:
  - route:
    - destination: {host: web}
  tls:
  - match:
    - sniHosts: [API.example.com]
      port: 443
      sourceLabels: {app: client}
    - sniHosts: [web.shop.svc.cluster.local]
    route:
    - destination: {host: api.example.com, port: {number: 8443}}
"#,
    )));
    let api = vec![destination("api.example.com", "", 8443, 100)];
    assert_eq!(
        vs.routes,
        vec![
            L4Route {
                ports: vec![443],
                sni_hosts: vec!["api.example.com".into()],
                source_labels: labels(&[("app", "client")]),
                destinations: api.clone(),
            },
            L4Route {
                sni_hosts: vec!["web.shop.svc.cluster.local".into()],
                destinations: api,
                ..Default::default()
            },
            L4Route {
                destinations: vec![destination("web.shop.svc.cluster.local", "", 0, 100)],
                ..Default::default()
            },
        ]
    );
    assert_eq!(vs.hosts, ["api.example.com", "web.shop.svc.cluster.local"]);
}

#[test]
fn virtual_service_http_routes_load_with_a_warning() {
    let (resources, warnings) = parse_with_warnings(&virtual_service_doc(
        r#"  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v2}
      weight: 10
"#,
    ));
    let vs = the_virtual_service(resources);
    assert!(vs.routes.is_empty(), "{vs:#?}");
    assert_eq!(
        fields_and_messages(&warnings),
        [(
            "spec.http",
            "isthmus carries TCP; HTTP routes are not honoured (ignored)"
        )]
    );
}

#[test]
fn virtual_service_bound_to_a_gateway_only_defines_no_routes() {
    let doc = |gateways: &str| {
        virtual_service_doc(&format!(
            "  hosts: [web]\n  gateways: {gateways}\n  tcp:\n  - route:\n    - destination: {{host: web}}\n"
        ))
    };
    let (resources, warnings) = parse_with_warnings(&doc("[my-gateway]"));
    let vs = the_virtual_service(resources);
    assert!(vs.routes.is_empty(), "{vs:#?}");
    assert_eq!(vs.hosts, ["web.shop.svc.cluster.local"]);
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert_eq!(warnings[0].field, "spec.gateways");
    assert!(
        warnings[0]
            .message
            .contains("my-gateway: routes bound to ingress gateways are not honoured")
            && warnings[0].message.contains("it defines no routes"),
        "{warnings:#?}"
    );

    // With mesh listed, the routes apply to mesh traffic and the gateway is warned about.
    let (resources, warnings) = parse_with_warnings(&doc("[mesh, my-gateway]"));
    assert_eq!(the_virtual_service(resources).routes.len(), 1);
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].message.contains("mesh traffic only"),
        "{warnings:#?}"
    );
    let (resources, warnings) = parse_with_warnings(&doc("[mesh]"));
    assert_eq!(the_virtual_service(resources).routes.len(), 1);
    assert!(warnings.is_empty(), "{warnings:#?}");
}

#[test]
fn traffic_rules_are_read_under_the_api_versions_of_istio_kinds() {
    for api_version in [
        "networking.istio.io/v1",
        "networking.istio.io/v1beta1",
        "networking.istio.io/v1alpha3",
        "isthmus.io/v1alpha1",
    ] {
        let text = format!(
            "apiVersion: {api_version}\nkind: DestinationRule\nmetadata: {{name: r, namespace: shop}}\nspec: {{host: web}}\n---\napiVersion: {api_version}\nkind: VirtualService\nmetadata: {{name: r, namespace: shop}}\nspec: {{hosts: [web], tcp: [{{route: [{{destination: {{host: web}}}}]}}]}}\n"
        );
        let keys: Vec<String> = parse(&text).iter().map(Resource::key).collect();
        assert_eq!(
            keys,
            ["DestinationRule/shop/r", "VirtualService/shop/r"],
            "{api_version}"
        );
    }
}

// ---- errors --------------------------------------------------------------------------------

const GOOD_DOC: &str =
    "apiVersion: isthmus.io/v1alpha1\nkind: Network\nmetadata: {name: network-a}\n";

const SERVICE_ENTRY: &str = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: web
  namespace: shop
spec:
  hosts: [web.shop.svc.cluster.local]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  workloadSelector:
    labels: {app: web}
"#;

/// Each bad input sits in document 2 of its file, after a valid one, so the table also proves
/// that the error points at the right document.
#[test]
fn every_validation_error_names_file_document_field_and_value() {
    let se = |from: &str, to: &str| {
        assert!(SERVICE_ENTRY.contains(from), "{from}");
        SERVICE_ENTRY.replacen(from, to, 1)
    };
    let we = |spec: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: w, namespace: shop}}\nspec: {spec}\n")
    };
    let net = |spec: &str| {
        format!(
            "apiVersion: isthmus.io/v1alpha1\nkind: Network\nmetadata: {{name: n}}\nspec: {spec}\n"
        )
    };
    let cases: Vec<(&str, String, &str, &str)> = vec![
        // (what, document, field, a piece of the message naming the bad value)
        (
            "bad port",
            se("number: 80", "number: 70000"),
            "spec.ports[0].number",
            "70000 is not a valid port",
        ),
        (
            "zero port",
            se("number: 80", "number: 0"),
            "spec.ports[0].number",
            "0 is not a valid port",
        ),
        (
            "unknown field",
            se("hosts:", "hostz:"),
            "spec.hostz",
            "unknown field `hostz`",
        ),
        (
            "unknown field in a list",
            se("protocol: HTTP}", "protocol: HTTP, weight: 2}"),
            "spec.ports[0].weight",
            "unknown field `weight`",
        ),
        (
            "wrong type",
            se("number: 80", "number: eighty"),
            "spec.ports[0].number",
            "\"eighty\"",
        ),
        (
            "negative number",
            se("number: 80", "number: -80"),
            "spec.ports[0].number",
            "-80",
        ),
        (
            "missing name",
            se("  name: web\n", ""),
            "metadata.name",
            "is required",
        ),
        (
            "bad host",
            se("[web.shop.svc.cluster.local]", "[web_1.shop.example.com]"),
            "spec.hosts[0]",
            "\"web_1.shop.example.com\"",
        ),
        (
            "wildcard in the middle",
            se("[web.shop.svc.cluster.local]", "[web.*.example.com]"),
            "spec.hosts[0]",
            "\"web.*.example.com\"",
        ),
        (
            "upper-case namespace",
            se("namespace: shop", "namespace: Shop"),
            "metadata.namespace",
            "\"Shop\"",
        ),
        (
            "bad protocol",
            se("protocol: HTTP", "protocol: QUIC"),
            "spec.ports[0].protocol",
            "\"QUIC\"",
        ),
        (
            "bad port name",
            se("name: http", "name: HTTP_1"),
            "spec.ports[0].name",
            "\"HTTP_1\"",
        ),
        (
            "bad resolution",
            se("hosts:", "resolution: dns\n  hosts:"),
            "spec.resolution",
            "\"dns\"",
        ),
        (
            "endpoints and selector",
            se(
                "  workloadSelector:",
                "  endpoints: [{address: 10.0.0.1}]\n  workloadSelector:",
            ),
            "spec.endpoints",
            "not both",
        ),
        (
            "bad address",
            se("hosts:", "addresses: [10.0.0.0/33]\n  hosts:"),
            "spec.addresses[0]",
            "\"10.0.0.0/33\"",
        ),
        (
            "bad label value",
            we("{address: 10.0.0.1, labels: {app: \"web app\"}}"),
            "spec.labels.app",
            "\"web app\"",
        ),
        (
            "bad label key",
            se(
                "namespace: shop",
                "namespace: shop\n  labels: {\"bad key\": x}",
            ),
            "metadata.labels.bad key",
            "\"bad key\"",
        ),
        (
            "bad IP",
            we("{address: 10.0.0.300}"),
            "spec.address",
            "\"10.0.0.300\"",
        ),
        (
            "hostname endpoint of a STATIC entry",
            se(
                "  workloadSelector:\n    labels: {app: web}\n",
                "  endpoints: [{address: web.example.com}]\n",
            ),
            "spec.endpoints[0].address",
            "\"web.example.com\" is not an IP address",
        ),
        (
            "bad locality",
            we("{address: 10.0.0.1, locality: a/b/c/d}"),
            "spec.locality",
            "\"a/b/c/d\"",
        ),
        (
            "bad network",
            we("{address: 10.0.0.1, network: Net_B}"),
            "spec.network",
            "\"Net_B\"",
        ),
        (
            "bad service account",
            we("{address: 10.0.0.1, serviceAccount: Web}"),
            "spec.serviceAccount",
            "\"Web\"",
        ),
        (
            "bad workload port",
            we("{address: 10.0.0.1, ports: {http: 99999}}"),
            "spec.ports.http",
            "99999",
        ),
        (
            "gateway by name",
            net("{gateways: [{address: gw.example.com}]}"),
            "spec.gateways[0].address",
            "\"gw.example.com\"",
        ),
        (
            "bad gateway port",
            net("{gateways: [{address: 192.0.2.1, sniPort: 65536}]}"),
            "spec.gateways[0].sniPort",
            "65536",
        ),
        (
            "bad cidr",
            net("{cidrs: [10.1.0.0/8]}"),
            "spec.cidrs[0]",
            "\"10.1.0.0/8\"",
        ),
        (
            "wrong apiVersion",
            net("{}").replace("isthmus.io/v1alpha1", "networking.istio.io/v1"),
            "apiVersion",
            "\"networking.istio.io/v1\"",
        ),
        (
            "namespaced network",
            net("{}").replace("{name: n}", "{name: n, namespace: shop}"),
            "metadata.namespace",
            "\"shop\"",
        ),
        (
            "unknown top-level field",
            format!("{GOOD_DOC}colour: blue\n"),
            "colour",
            "unknown field",
        ),
    ];
    for (what, doc, field, needle) in cases {
        let text = format!("{GOOD_DOC}---\n{doc}");
        let errors = parse_file(Path::new("bad.yaml"), &text, &defaults())
            .err()
            .unwrap_or_else(|| panic!("{what}: expected errors"));
        let error = errors
            .iter()
            .find(|e| e.field == field)
            .unwrap_or_else(|| panic!("{what}: no error at {field}; got {errors:#?}"));
        assert_eq!(error.file, Path::new("bad.yaml"), "{what}");
        assert_eq!(error.document, Some(2), "{what}: {error}");
        let shown = error.to_string();
        assert!(
            shown.starts_with(&format!("bad.yaml (document 2): {field}: ")),
            "{what}: {shown}"
        );
        assert!(
            shown.contains(needle),
            "{what}: {shown:?} does not contain {needle:?}"
        );
    }
}

#[test]
fn every_error_in_a_file_is_reported_not_just_the_first() {
    let text = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: web
  namespace: Shop
spec:
  hosts: [web.shop.svc.cluster.local, bad_host]
  ports:
  - {number: 70000, name: http, protocol: HTTP}
  - {number: 81, name: http2, protocol: QUIC}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: w
  colour: blue
  labels: {version: 2}
spec:
  adress: 10.0.0.1
  ports: {http: eighty}
"#;
    let errors = parse_errors(text);
    let got: Vec<(Option<usize>, &str)> = errors
        .iter()
        .map(|e| (e.document, e.field.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            (Some(1), "metadata.namespace"),
            (Some(1), "spec.hosts[1]"),
            (Some(1), "spec.ports[0].number"),
            (Some(1), "spec.ports[1].protocol"),
            (Some(2), "metadata.colour"),
            (Some(2), "metadata.labels.version"),
            (Some(2), "spec.adress"),
            (Some(2), "spec.ports.http"),
        ],
        "{errors:#?}"
    );
}

#[test]
fn yaml_syntax_error_names_file_and_line() {
    let text = format!("{GOOD_DOC}---\napiVersion: isthmus.io/v1alpha1\nkind: Network\nmetadata:\n  name: [network-b\n");
    let errors = parse_errors(&text);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    let shown = errors[0].to_string();
    assert!(
        shown.starts_with("bad.yaml (document 2): invalid YAML: "),
        "{shown}"
    );
    assert!(shown.contains("line 8"), "{shown}");

    for text in [
        "a: 'unterminated\n",
        "key: *unknown_anchor\n---\nb: 1\n",
        "- a\nb: c\n",
        "a: 1\na: 2\n",
    ] {
        let errors = parse_errors(text);
        assert!(
            errors[0].message.starts_with("invalid YAML"),
            "{text:?}: {errors:#?}"
        );
        assert!(errors[0].message.contains("line"), "{text:?}: {errors:#?}");
    }
}

#[test]
fn documents_that_are_not_resources_are_refused() {
    for (text, needle) in [
        ("- a\n- b\n", "found a list"),
        ("just a string\n", "found the string"),
        (
            "kind: Network\nmetadata: {name: x}\n",
            "apiVersion: is required",
        ),
        (
            "apiVersion: isthmus.io/v1alpha1\nmetadata: {name: x}\n",
            "kind: is required",
        ),
        (
            "apiVersion: isthmus.io/v1alpha1\nkind: ServiceEntry\nmetadata: {name: x}\n",
            "spec: is required",
        ),
        (
            "apiVersion: isthmus.io/v1alpha1\nkind: [Network]\nmetadata: {name: x}\n",
            "kind: must be a string",
        ),
    ] {
        let errors = parse_errors(text);
        let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            shown.iter().any(|s| s.contains(needle)),
            "{text:?}: {shown:#?}"
        );
    }
}

#[test]
fn istio_cross_field_rules() {
    let cases = [
        (
            "resolution NONE with endpoints",
            "hosts: [x.example.com]\n  resolution: NONE\n  endpoints: [{address: 10.0.0.1}]",
            "spec.resolution",
        ),
        (
            "DNS wildcard without endpoints",
            "hosts: [\"*.example.com\"]\n  resolution: DNS",
            "spec.hosts[0]",
        ),
        ("no hosts", "hosts: []", "spec.hosts"),
        (
            "endpoint port not declared",
            "hosts: [a.example.com]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  endpoints: [{address: 10.0.0.1, ports: {grpc: 9000}}]",
            "spec.endpoints[0].ports.grpc",
        ),
        (
            "duplicate port number",
            "hosts: [a.example.com]\n  ports: [{number: 80, name: http, protocol: HTTP}, {number: 80, name: web, protocol: HTTP}]",
            "spec.ports[1].number",
        ),
        ("empty selector", "hosts: [a.example.com]\n  workloadSelector: {labels: {}}", "spec.workloadSelector.labels"),
        ("bad location", "hosts: [a.example.com]\n  location: INTERNAL", "spec.location"),
    ];
    for (what, spec, field) in cases {
        let text = format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: x}}\nspec:\n  {spec}\n");
        let errors = parse_file(Path::new("bad.yaml"), &text, &defaults())
            .err()
            .unwrap_or_else(|| panic!("{what}: expected errors"));
        assert!(
            errors.iter().any(|e| e.field == field),
            "{what}: {errors:#?}"
        );
    }
    // DNS endpoints may be names, and a DNS wildcard with endpoints is fine.
    parse("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: x}\nspec:\n  hosts: [\"*.example.com\"]\n  resolution: DNS_ROUND_ROBIN\n  endpoints: [{address: egress.example.com}]\n");

    let probe = |p: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata: {{name: g}}\nspec:\n  template: {{}}\n  probe: {p}\n")
    };
    for (what, text, field) in [
        (
            "two probe actions",
            probe("{httpGet: {port: 80}, tcpSocket: {port: 80}}"),
            "spec.probe",
        ),
        ("no probe action", probe("{periodSeconds: 3}"), "spec.probe"),
        (
            "probe port missing",
            probe("{httpGet: {path: /}}"),
            "spec.probe.httpGet.port",
        ),
        (
            "negative period",
            probe("{periodSeconds: -1, exec: {command: [/bin/true]}}"),
            "spec.probe.periodSeconds",
        ),
    ] {
        let errors = parse_errors(&text);
        assert!(
            errors.iter().any(|e| e.field == field),
            "{what}: {errors:#?}"
        );
    }
}

#[test]
fn the_same_key_twice_in_one_file_is_an_error() {
    let doc = "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w}\nspec: {address: 10.0.0.1}\n";
    let errors = parse_errors(&format!("{doc}---\n{doc}"));
    assert_eq!(errors.len(), 1);
    assert_eq!(
        errors[0].to_string(),
        "bad.yaml (document 2): metadata.name: Workload/cluster-a/default/w is already defined in document 1 (metadata.name)"
    );
}

#[test]
fn display_without_document_or_field() {
    let e = ResourceError {
        file: "dir/x.yaml".into(),
        document: None,
        field: String::new(),
        message: "cannot read the file".into(),
    };
    assert_eq!(e.to_string(), "dir/x.yaml: cannot read the file");
}
