//! Istio's standard TCP metrics on real traffic: a VM in network A (the `web` group, its
//! agent capturing outbound) calls the `ratings` VM in network B by its mesh name, through
//! B's east-west gateway, and each of the three programs on the way is scraped on its
//! `/metrics` as Prometheus scrapes it. What a Kiali graph needs must be there: the
//! reporter each program is, the workloads, apps, versions, namespaces and principals of
//! both ends, the service, connections opened and closed as many as were made, and the
//! bytes each way exactly as the client sent and received them.
//!
//! As root these always run (and in CI they must: they fail if namespaces cannot be made);
//! elsewhere they skip with a message.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use isthmus_tests::eventually;
use isthmus_tests::harness::agent::Vm;
use isthmus_tests::harness::mesh::{host, id, on, yaml, Mesh, APP_PORT, SVC_PORT};
use isthmus_tests::harness::netns::Net;
use isthmus_tests::harness::registry::{http_get, metric_sum as sum, CLUSTER};

const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 7);
const RATINGS_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 8);
const WAIT: Duration = Duration::from_secs(60);
/// Connections the client makes.
const CALLS: u64 = 3;
/// What the client sends on each: one HTTP request the sample app answers and then closes.
const REQUEST: &str = "GET / HTTP/1.1\r\nHost: ratings\r\nConnection: close\r\n\r\n";

/// A WorkloadGroup `name` in `shop` whose VMs carry `app: <name>` and `version: <version>`,
/// run as service account `name` and serve `tcp` on the app port.
fn group(name: &str, version: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  metadata:\n    labels:\n      app: {name}\n      version: {version}\n  template:\n    serviceAccount: {name}\n    ports:\n      tcp: {APP_PORT}\n"
    )
}

/// One program's Istio counters for the series matching `labels`.
#[derive(Debug, PartialEq, Eq)]
struct Counts {
    opened: u64,
    closed: u64,
    received: u64,
    sent: u64,
}

fn counts(text: &str, labels: &[(&str, &str)]) -> Counts {
    Counts {
        opened: sum(text, "istio_tcp_connections_opened_total", labels),
        closed: sum(text, "istio_tcp_connections_closed_total", labels),
        received: sum(text, "istio_tcp_received_bytes_total", labels),
        sent: sum(text, "istio_tcp_sent_bytes_total", labels),
    }
}

/// Waits until `scrape` shows `CALLS` connections closed for `labels`; returns the text.
async fn settled<F, Fut>(what: &str, labels: &[(&str, &str)], scrape: F) -> String
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let text = eventually(WAIT, || async {
        let text = scrape().await;
        (counts(&text, labels).closed >= CALLS).then_some(text)
    })
    .await;
    match text {
        Some(t) => t,
        None => panic!(
            "{what}: never {CALLS} connections closed with {labels:?}:\n{}",
            scrape().await
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_three_programs_report_what_a_kiali_graph_needs() {
    let catalog = vec![
        group("web", "v1"),
        group("ratings", "v2"),
        yaml::service("ratings", "shop", SVC_PORT),
    ];
    let Some(m) = Mesh::start("istio-metrics", &catalog).await else {
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

    // The client speaks HTTP over a plain socket to the mesh name; capture carries it.
    let script = format!(
        "exec bash -c 'exec 3<>/dev/tcp/{}/{SVC_PORT} && printf \"{}\" >&3 && cat <&3 | wc -c'",
        host("ratings"),
        REQUEST.replace('\r', "\\r").replace('\n', "\\n")
    );
    let mut response_bytes = 0;
    for call in 0..CALLS {
        let got = eventually(WAIT, || async {
            let (ok, out, _) = web.sh(&script);
            let n: u64 = out.trim().parse().ok()?;
            (ok && n > 0).then_some(n)
        })
        .await;
        let n = got.unwrap_or_else(|| {
            panic!(
                "call {call} got no answer:\n{}\n{}",
                web.log(),
                ratings.log()
            )
        });
        response_bytes += n;
    }
    let request_bytes = CALLS * REQUEST.len() as u64;
    let (web_id, ratings_id) = (id("web").to_string(), id("ratings").to_string());
    let service = host("ratings");

    // The client's agent: the source. It knows itself from its group, and the server by
    // the identity it verified (the workload is behind another network's gateway).
    let source_labels = [
        ("reporter", "source"),
        ("source_workload", "web"),
        ("source_canonical_service", "web"),
        ("source_canonical_revision", "v1"),
        ("source_workload_namespace", "shop"),
        ("source_principal", web_id.as_str()),
        ("source_app", "web"),
        ("source_version", "v1"),
        ("source_cluster", CLUSTER),
        ("destination_service", service.as_str()),
        ("destination_service_namespace", "shop"),
        ("destination_service_name", "ratings"),
        ("destination_workload_namespace", "shop"),
        ("destination_principal", ratings_id.as_str()),
        ("request_protocol", "tcp"),
        ("response_flags", "-"),
        ("connection_security_policy", "unknown"),
    ];
    let text = settled("the client's agent", &source_labels, || web.metrics()).await;
    assert_eq!(
        counts(&text, &source_labels),
        Counts {
            opened: CALLS,
            closed: CALLS,
            received: request_bytes,
            sent: response_bytes,
        },
        "{text}"
    );

    // The server's agent: the destination. It knows itself from its group, and the client
    // by its verified identity.
    let destination_labels = [
        ("reporter", "destination"),
        ("source_workload_namespace", "shop"),
        ("source_principal", web_id.as_str()),
        ("destination_service", service.as_str()),
        ("destination_service_name", "ratings"),
        ("destination_service_namespace", "shop"),
        ("destination_workload", "ratings"),
        ("destination_canonical_service", "ratings"),
        ("destination_canonical_revision", "v2"),
        ("destination_workload_namespace", "shop"),
        ("destination_principal", ratings_id.as_str()),
        ("destination_app", "ratings"),
        ("destination_version", "v2"),
        ("destination_cluster", CLUSTER),
        ("request_protocol", "tcp"),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let text = settled("the server's agent", &destination_labels, || {
        ratings.metrics()
    })
    .await;
    assert_eq!(
        counts(&text, &destination_labels),
        Counts {
            opened: CALLS,
            closed: CALLS,
            received: request_bytes,
            sent: response_bytes,
        },
        "{text}"
    );
    // Our own names are still there beside Istio's.
    assert!(
        text.contains("isthmus_vm_agent_connections_total{"),
        "{text}"
    );

    // B's gateway: a source, as Istio's gateways are; the destination from the catalog,
    // no principal on either side (it terminates no TLS). Its bytes are the TLS records it
    // splices, so more than the app's, and the same as its own byte counters.
    let admin = SocketAddr::new(m.topo.gateway_addr(Net::B).into(), 15020);
    let mesh = &m;
    let scrape_gateway = || async move {
        on(
            mesh.rt(Net::B),
            async move { http_get(admin, "/metrics").await },
        )
        .await
        .map(|(_, body)| body)
        .unwrap_or_default()
    };
    let gateway_labels = [
        ("reporter", "source"),
        ("source_workload", "gateway-network-b"),
        ("source_workload_namespace", "istio-system"),
        ("source_principal", "unknown"),
        ("source_cluster", CLUSTER),
        ("destination_service", service.as_str()),
        ("destination_workload", "ratings"),
        ("destination_app", "ratings"),
        ("destination_version", "v2"),
        ("destination_principal", "unknown"),
        ("response_flags", "-"),
        ("connection_security_policy", "unknown"),
    ];
    let text = settled("B's gateway", &gateway_labels, scrape_gateway).await;
    let c = counts(&text, &gateway_labels);
    assert_eq!((c.opened, c.closed), (CALLS, CALLS), "{text}");
    assert!(
        c.received > request_bytes && c.sent > response_bytes,
        "{c:?}\n{text}"
    );
    let ours = |flow: &str| {
        sum(
            &text,
            "isthmus_gateway_bytes_total",
            &[("service", service.as_str()), ("flow", flow)],
        )
    };
    assert_eq!(
        (c.received, c.sent),
        (ours("to_upstream"), ours("from_upstream")),
        "{text}"
    );
}
