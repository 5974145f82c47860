//! Who talks to whom: `isthmusctl graph` drawn from real proxies' `/metrics`, and the
//! Grafana dashboard (`deploy/grafana/isthmus.json`) checked against the metrics the
//! programs really export.
//!
//! The graph test is a topology test: a VM in network A (the `web` group, its agent
//! capturing outbound) calls the `ratings` VM in network B through B's east-west gateway,
//! then `isthmusctl graph` runs inside network A, as an operator's machine there would,
//! against the web agent's and B's gateway's metrics ports, and the ratings agent's, which
//! cannot be reached from A (workload addresses are private to their network). As root
//! these always run (and in CI they must: they fail if namespaces cannot be made);
//! elsewhere they skip with a message.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use std::sync::Arc;

use isthmus_gateway::GatewayConfig;
use isthmus_proto::sni::SniKey;
use isthmus_proto::subscription::RegistrySettings;
use isthmus_proto::tls::{self, ServerIdentity};
use isthmus_proxy::authz::AuthorizationPolicy;
use isthmus_proxy::inbound::Mode;
use isthmus_tests::harness::agent::Vm;
use isthmus_tests::harness::dns::proxy_config;
use isthmus_tests::harness::mesh::{self, host, yaml, Mesh, Workload, APP_PORT, SVC_PORT};
use isthmus_tests::harness::netns::Net;
use isthmus_tests::harness::process::workspace_binary;
use isthmus_tests::{eventually, http_get, TestRegistry, CLUSTER, TRUST_DOMAIN};
use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 7);
const RATINGS_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 8);
/// The agents' and gateways' metrics port (their default; the harness's gateways too).
const METRICS_PORT: u16 = 15020;
const WAIT: Duration = Duration::from_secs(60);
/// Connections the client makes.
const CALLS: u64 = 2;
const REQUEST: &str = "GET / HTTP/1.1\r\nHost: ratings\r\nConnection: close\r\n\r\n";

/// A WorkloadGroup `name` in `shop` whose VMs carry `app: <name>`, run as service account
/// `name` and serve `tcp` on the app port.
fn group(name: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  metadata:\n    labels:\n      app: {name}\n  template:\n    serviceAccount: {name}\n    ports:\n      tcp: {APP_PORT}\n"
    )
}

fn isthmusctl() -> PathBuf {
    workspace_binary("isthmus-registry", "isthmusctl")
}

/// `isthmusctl graph` inside `net`'s namespace, bounded in time.
fn graph_in(m: &Mesh, net: Net, args: &[String]) -> Output {
    m.topo
        .netns(net)
        .command("timeout")
        .arg("60")
        .arg(isthmusctl())
        .arg("graph")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run isthmusctl graph")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_graph_shows_a_call_across_networks_through_the_gateway() {
    let catalog = vec![
        group("web"),
        group("ratings"),
        yaml::service("ratings", "shop", SVC_PORT),
    ];
    let Some(m) = Mesh::start("graph", &catalog).await else {
        return;
    };
    let _gateways = [m.gateway(Net::A).await, m.gateway(Net::B).await];
    let ratings = Vm::create(&m, Net::B, "ratings", RATINGS_IP, "ratings", "ratings");
    let _ratings_app = ratings.start_app(&m, APP_PORT, None);
    let _ratings_agent = ratings.start_agent(&m, &[], &[]);
    let web = Vm::create(&m, Net::A, "web", WEB_IP, "web", "web");
    let _web_agent = web.start_agent(&m, &[], &[]);
    ratings.wait_ready().await;
    web.wait_ready().await;

    let script = format!(
        "exec bash -c 'exec 3<>/dev/tcp/{}/{SVC_PORT} && printf \"{}\" >&3 && cat <&3 | wc -c'",
        host("ratings"),
        REQUEST.replace('\r', "\\r").replace('\n', "\\n")
    );
    for call in 0..CALLS {
        let got = eventually(WAIT, || async {
            let (ok, out, _) = web.sh(&script);
            let n: u64 = out.trim().parse().ok()?;
            (ok && n > 0).then_some(())
        })
        .await;
        assert!(
            got.is_some(),
            "call {call} got no answer:\n{}\n{}",
            web.log(),
            ratings.log()
        );
    }

    let web_url = format!("http://{WEB_IP}:{METRICS_PORT}/metrics");
    let gateway_url = format!(
        "http://{}:{METRICS_PORT}/metrics",
        m.topo.gateway_addr(Net::B)
    );
    // In network B: not reachable from A.
    let ratings_url = format!("http://{RATINGS_IP}:{METRICS_PORT}/metrics");
    let urls = [web_url.as_str(), gateway_url.as_str(), ratings_url.as_str()].join(",");
    let service = host("ratings");
    let web_node = format!("network-a/{CLUSTER}/shop/web");
    let service_node = format!("network-b/{service}");
    let gateway_node = format!("network-b/{CLUSTER}/istio-system/gateway-network-b");
    let ratings_node = format!("network-b/{CLUSTER}/shop/ratings");

    // The text: web -> ratings across the networks, through the gateway, with the
    // connections made (a graph drawn as soon as the calls ended may miss nothing: the
    // counters move when a connection opens).
    let out = graph_in(&m, Net::A, &["--metrics".into(), urls.clone()]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    println!("isthmusctl graph:\n{stdout}\n{stderr}");
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let row = |from: &str, to: &str| -> Vec<String> {
        stdout
            .lines()
            .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
            .find(|c| c.len() == 7 && c[0] == from && c[1] == to)
            .unwrap_or_else(|| panic!("no edge {from} -> {to}:\n{stdout}\n{stderr}"))
    };
    let across = row(&web_node, &service_node);
    // Agents take the pooled tunnel to the gateway by default: QUIC, or HTTP/2 where it
    // won the race.
    let transport = across[2].clone();
    assert!(
        transport == "quic-gateway" || transport == "hbone-gateway",
        "{stdout}"
    );
    let connections: u64 = across[3].parse().unwrap();
    assert!(connections >= CALLS, "{stdout}");
    let (sent, received): (u64, u64) = (across[4].parse().unwrap(), across[5].parse().unwrap());
    assert!(
        sent >= CALLS * REQUEST.len() as u64 && received > 0,
        "{stdout}"
    );
    // B's gateway's hop, and the workload that answered.
    let hop = row(&gateway_node, &service_node);
    assert_eq!(hop[2], "direct", "{stdout}");
    assert!(hop[3].parse::<u64>().unwrap() >= CALLS, "{stdout}");
    let answered = row(&service_node, &ratings_node);
    assert!(answered[3].parse::<u64>().unwrap() >= CALLS, "{stdout}");
    // The proxy A cannot reach is named with its cause, and the rest is still drawn.
    assert!(
        stderr.contains(&ratings_url) && stdout.contains("unreachable"),
        "{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains(&format!("{web_url}  ")) && stdout.contains(&web_node),
        "{stdout}"
    );

    // DOT: the same edge, dashed (through a gateway), the networks as frames.
    let out = graph_in(
        &m,
        Net::A,
        &[
            "--metrics".into(),
            urls.clone(),
            "--output".into(),
            "dot".into(),
        ],
    );
    let dot = text(&out.stdout);
    println!("isthmusctl graph --output dot:\n{dot}");
    assert!(out.status.success(), "{dot}\n{}", text(&out.stderr));
    assert!(dot.starts_with("digraph isthmus {"), "{dot}");
    for frame in ["network network-a", "network network-b"] {
        assert!(dot.contains(&format!("label=\"{frame}\"")), "{dot}");
    }
    let id = |label: &str| {
        dot.lines()
            .find(|l| l.contains("shape=") && l.contains(&format!("label=\"{label}\"")))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("no node {label}:\n{dot}"))
            .to_string()
    };
    let edge = format!(
        "{} -> {} [label=\"{transport}\\n",
        id("shop/web"),
        id(&service)
    );
    let line = dot
        .lines()
        .find(|l| l.trim_start().starts_with(&edge))
        .unwrap_or_else(|| panic!("no edge {edge}:\n{dot}"));
    assert!(line.contains("style=dashed"), "{line}");
    if which("dot") {
        let out = graph_in(
            &m,
            Net::A,
            &[
                "--metrics".into(),
                urls.clone(),
                "--output".into(),
                "svg".into(),
            ],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stdout).contains("<svg"), "{}", text(&out.stdout));
    }

    // Rates between two scrapes: one more call in between is a rate above zero.
    let rates = m.topo.netns(Net::A).command("timeout");
    let mut rates = rates;
    rates
        .arg("60")
        .arg(isthmusctl())
        .args(["graph", "--interval", "3s", "--metrics", &web_url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = rates.spawn().expect("isthmusctl graph --interval");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, _, _) = web.sh(&script);
    assert!(ok, "the call between the scrapes failed:\n{}", web.log());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let row = stdout
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|c| c.len() == 7 && c[0] == web_node && c[1] == service_node)
        .unwrap_or_else(|| panic!("{stdout}"));
    let rate: f64 = row[3].parse().unwrap();
    assert!(rate > 0.0 && rate < CALLS as f64, "{stdout}");
    assert!(stdout.contains("CONNECTIONS/S"), "{stdout}");
}

/// Whether `program` is on PATH.
fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

#[test]
fn without_a_reachable_proxy_the_graph_fails_naming_each_url_and_cause() {
    // A port nobody listens on, and one that answers something that is not metrics.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let page = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let page_addr = page.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for s in page.incoming() {
            let Ok(mut s) = s else { return };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n{\"status\": \"ok\"}");
        }
    });
    let dead_url = format!("http://{dead_addr}/metrics");
    let page_url = format!("http://{page_addr}/metrics");
    let out = std::process::Command::new(isthmusctl())
        .args(["graph", "--metrics", &format!("{dead_url},{page_url}")])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("{dead_url}: cannot connect to {dead_addr}")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{page_url}: not Prometheus text: line 1")),
        "{stderr}"
    );
}

// ---- The Grafana dashboard ----

fn dashboard_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/isthmus.json")
}

/// The metric names a program's exposition describes, as PromQL names them: a counter's
/// `_total`, a histogram's `_bucket`, `_sum` and `_count`, a gauge's own name.
fn exported_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_string());
            }
        }
    }
    names
}

/// PromQL's words that are not metric names: functions, aggregations, keywords.
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "topk",
    "bottomk",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "rate",
    "irate",
    "increase",
    "delta",
    "histogram_quantile",
    "clamp_min",
    "clamp_max",
    "abs",
    "time",
    "vector",
    "scalar",
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "label_replace",
    "max_over_time",
    "min_over_time",
    "avg_over_time",
    "sum_over_time",
    "absent",
    "le",
];

/// The metric names in a PromQL expression: identifiers outside label matchers
/// (`{...}`), grouping lists (`by (...)`), strings and range selectors (`[...]`), that are
/// not PromQL words nor `$variables`.
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    let mut last_word = String::new();
    while i < chars.len() {
        let c = chars[i];
        if c == '{' || c == '[' || c == '"' {
            let close = match c {
                '{' => '}',
                '[' => ']',
                _ => '"',
            };
            i += 1;
            while i < chars.len() && chars[i] != close {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            continue;
        }
        if c == '(' && matches!(last_word.as_str(), "by" | "without" | "on" | "ignoring") {
            while i < chars.len() && chars[i] != ')' {
                i += 1;
            }
            i += 1;
            last_word.clear();
            continue;
        }
        if c == '$' {
            // A dashboard variable ($__rate_interval, ${datasource}).
            i += 1;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | '{' | '}'))
            {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let is_number_suffix = start > 0 && chars[start - 1].is_ascii_digit();
            if !PROMQL_WORDS.contains(&word.as_str()) && !is_number_suffix {
                names.insert(word.clone());
            }
            last_word = word;
            continue;
        }
        if !c.is_whitespace() {
            last_word.clear();
        }
        i += 1;
    }
    names
}

/// Every `expr` in the dashboard's panels (and rows' panels), with the panel's title.
fn expressions(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack: Vec<&Value> = dashboard["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = stack.pop() {
        if let Some(inner) = p["panels"].as_array() {
            stack.extend(inner);
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push((p["title"].as_str().unwrap_or("").to_string(), e.to_string()));
            }
        }
    }
    out
}

#[test]
fn promql_names_are_told_from_functions_labels_and_variables() {
    let names = promql_metric_names(
        "histogram_quantile(0.99, sum by (le, service) (rate(isthmus_gateway_upstream_connect_duration_seconds_bucket{job=~\"$job\", x=\"a b\"}[$__rate_interval]))) / on (service) group_left sum(isthmus_gateway_destinations) + 1e3",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        [
            "isthmus_gateway_destinations",
            "isthmus_gateway_upstream_connect_duration_seconds_bucket"
        ]
    );
}

/// One TLS session through the gateway's SNI port to `reviews` (echoed), and one
/// connection it refuses (not TLS): the traffic whose families a program describes only
/// once it has counted something.
async fn traffic_through(reg: &TestRegistry, sni: std::net::SocketAddr) {
    let client = reg.credentials("shop", "web").await.unwrap();
    let cfg = tls::client_config(
        Some(&client),
        &reg.bundle(),
        ServerIdentity::OneOf(vec![mesh::id("reviews")]),
        &[],
    )
    .unwrap();
    let name = ServerName::try_from(SniKey::new(9080, "", &host("reviews")).to_string()).unwrap();
    let tcp = TcpStream::connect(sni).await.unwrap();
    let mut s = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .expect("a TLS session through the gateway in time")
    .expect("a TLS session through the gateway");
    assert_eq!(mesh::read_line(&mut s).await.unwrap(), "reviews-1");
    assert_eq!(mesh::echo(&mut s, "ping").await.unwrap(), "ping");
    drop(s);
    let mut plain = TcpStream::connect(sni).await.unwrap();
    plain.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    let _ = plain.read_to_end(&mut rest).await;
}

/// The dashboard reads only names the programs export: the registry, a gateway and a DNS
/// proxy run in this process, the gateway carries a connection and refuses one, and each
/// is scraped on its `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_reads_only_metrics_the_programs_export() {
    let raw = std::fs::read_to_string(dashboard_path()).expect("deploy/grafana/isthmus.json");
    let dashboard: Value = serde_json::from_str(&raw).expect("the dashboard is JSON");
    // A Prometheus data source chosen by the user.
    let vars = dashboard["templating"]["list"]
        .as_array()
        .expect("templating");
    assert!(
        vars.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "no ${{datasource}} variable of type prometheus"
    );
    let exprs = expressions(&dashboard);
    assert!(exprs.len() >= 10, "{exprs:?}");

    let reg = TestRegistry::start(&[("svc.yaml", &yaml::service("reviews", "shop", 9080))])
        .await
        .unwrap();
    let server = reg.credentials("shop", "reviews").await.unwrap();
    let workload = Workload::start(
        "127.0.0.1:0".parse().unwrap(),
        "reviews-1",
        &server,
        &reg.bundle(),
        AuthorizationPolicy::default(),
        Mode::Strict,
    )
    .await
    .unwrap();
    reg.write_resource(
        "wl.yaml",
        &yaml::workload(
            "reviews-1",
            "shop",
            "reviews",
            "127.0.0.1",
            workload.addr.port(),
            "network-a",
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let cert_dir = mesh::gateway_credentials(&reg, "network-a", dir.path()).await;
    let mut cfg = GatewayConfig::new(
        "network-a",
        CLUSTER,
        RegistrySettings {
            addr: reg.grpc_addr().to_string(),
            root_cert: reg.ca_root(),
            cert_dir,
            trust_domain: TRUST_DOMAIN.into(),
        },
    );
    let lo: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    cfg.sni_addr = lo;
    cfg.tunnel_addr = Some(lo);
    cfg.admin_addr = Some(lo);
    cfg.metrics_addr = Some(lo);
    cfg.health_addr = Some(lo);
    let gw = isthmus_gateway::run(cfg).await.unwrap();
    let dns = isthmus_dns::run(proxy_config(&reg, dir.path()).await.unwrap())
        .await
        .unwrap();
    let routed = eventually(WAIT, || async {
        let table = gw.routes.load();
        let d = table.lookup(&host("reviews"), 9080, "").ok()?;
        (d.targets().len() == 1).then_some(())
    })
    .await;
    assert!(routed.is_some(), "the gateway never routed reviews");
    traffic_through(&reg, gw.sni_addr).await;
    let gateway_metrics = gw.metrics_addr.unwrap();
    let counted = eventually(WAIT, || async {
        let (_, body) = http_get(gateway_metrics, "/metrics").await.ok()?;
        (body.contains("isthmus_gateway_connections_total{")
            && body.contains("isthmus_gateway_connections_refused_total{"))
        .then_some(())
    })
    .await;
    assert!(counted.is_some(), "the gateway never counted the traffic");

    let mut exported = BTreeSet::new();
    for (program, addr) in [
        ("registry", reg.admin_addr()),
        ("gateway", gw.metrics_addr.unwrap()),
        ("dns proxy", dns.metrics_addr.unwrap()),
    ] {
        let (status, body) = http_get(addr, "/metrics").await.unwrap();
        assert_eq!(status, 200, "{program}: {body}");
        exported.extend(exported_names(&body));
    }
    // Each program's own families are there (the check below is not vacuous).
    for prefix in [
        "isthmus_registry_",
        "isthmus_gateway_",
        "isthmus_dns_",
        "istio_tcp_",
    ] {
        assert!(
            exported.iter().any(|n| n.starts_with(prefix)),
            "no {prefix}* in {exported:?}"
        );
    }
    let mut unknown = Vec::new();
    let mut used = BTreeSet::new();
    for (title, expr) in &exprs {
        for name in promql_metric_names(expr) {
            if !exported.contains(&name) {
                unknown.push(format!("{title}: {name} in {expr}"));
            }
            used.insert(name);
        }
    }
    assert!(
        unknown.is_empty(),
        "the dashboard reads metrics no program exports:\n{}\nexported: {exported:?}",
        unknown.join("\n")
    );
    for prefix in [
        "isthmus_registry_",
        "isthmus_gateway_",
        "isthmus_dns_",
        "istio_tcp_",
    ] {
        assert!(
            used.iter().any(|n| n.starts_with(prefix)),
            "the dashboard shows nothing of {prefix}*"
        );
    }
    println!("dashboard metrics: {used:?}");
    dns.shutdown().await;
    gw.shutdown().await;
}
