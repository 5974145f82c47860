//! Pooled tunnels between two VMs' agents on one network: the `web` VM calls the `ratings`
//! VM by its mesh name, as an app does (capture carries it), and every connection rides one
//! QUIC tunnel between the two agents (`web` takes QUIC alone, so the transport is known):
//! one handshake for all of them, each connection a stream, authorized at `ratings` as
//! `web`'s identity, and a bulk transfer of 100 MiB each way while echoing arrives whole.
//! A VM whose agent takes HTTP/2 alone (`--tunnel-transports h2`) rides an HBONE tunnel to
//! the same agent, and one whose agent runs with `--tunnel-port 0` still reaches `ratings`
//! with mTLS of its own: the tunnel is taken only where both ends speak it.
//!
//! As root these always run (and in CI they must: they fail if namespaces cannot be made);
//! elsewhere they skip with a message.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use isthmus_tests::eventually;
use isthmus_tests::harness::agent::Vm;
use isthmus_tests::harness::mesh::{
    bulk_echo, echo, host, id, on, read_line, yaml, EchoApp, Mesh, APP_PORT, SVC_PORT,
};
use isthmus_tests::harness::netns::Net;
use isthmus_tests::harness::registry::metric_sum;
use tokio::net::TcpStream;

const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 7);
const RATINGS_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 8);
const LEGACY_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 9);
const HTTP2_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 10);
const WAIT: Duration = Duration::from_secs(60);
/// Connections `web` makes, one after another.
const CALLS: u64 = 20;
/// Each way, through the tunnel.
const BULK: u64 = 100 << 20;

fn group(name: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  metadata:\n    labels:\n      app: {name}\n  template:\n    serviceAccount: {name}\n    ports:\n      tcp: {APP_PORT}\n"
    )
}

/// The service address `vm` resolves the mesh name `ratings` to.
fn vip(vm: &Vm) -> IpAddr {
    let name = host("ratings");
    let got = (0..100).find_map(|_| {
        let (ok, out, _) = vm.sh(&format!("getent ahostsv4 {name}"));
        let ip = out.split_whitespace().next().and_then(|s| s.parse().ok());
        if !ok || ip.is_none() {
            std::thread::sleep(Duration::from_millis(200));
        }
        ip
    });
    got.unwrap_or_else(|| panic!("{name} never resolved in {}:\n{}", vm.name, vm.log()))
}

/// One call from inside `vm`: connect to `ratings`, read its greeting, echo a line.
async fn call(vm: &Vm, to: SocketAddr, line: String) -> anyhow::Result<()> {
    on(vm.rt(), async move {
        let mut s = TcpStream::connect(to).await?;
        let greeting = read_line(&mut s).await?;
        anyhow::ensure!(greeting == "ratings", "greeted by {greeting:?}");
        let back = echo(&mut s, &line).await?;
        anyhow::ensure!(back == line, "echoed {back:?}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_on_one_network_share_one_tunnel_and_a_vm_without_tunnels_still_connects() {
    let catalog = vec![
        group("web"),
        group("ratings"),
        group("legacy"),
        group("h2"),
        yaml::service("ratings", "shop", SVC_PORT),
    ];
    let Some(m) = Mesh::start("tunnel", &catalog).await else {
        return;
    };
    let ratings = Vm::create(&m, Net::A, "ratings", RATINGS_IP, "ratings", "ratings");
    let app = on(ratings.rt(), async {
        EchoApp::start(
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), APP_PORT),
            "ratings",
        )
        .await
    })
    .await
    .expect("the echo app starts");
    let _ratings_agent = ratings.start_agent(&m, &[], &[]);
    let web = Vm::create(&m, Net::A, "web", WEB_IP, "web", "web");
    let _web_agent = web.start_agent(&m, &["--tunnel-transports", "quic"], &[]);
    ratings.wait_ready().await;
    web.wait_ready().await;
    let to = SocketAddr::new(vip(&web), SVC_PORT);

    // The first call waits for the catalog to name ratings' endpoint; the rest follow.
    let first = eventually(WAIT, || async {
        call(&web, to, "call 0".into()).await.ok()
    })
    .await;
    assert!(
        first.is_some(),
        "web never reached ratings:\n{}\n{}",
        web.log(),
        ratings.log()
    );
    for i in 1..CALLS {
        call(&web, to, format!("call {i}"))
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e}\n{}", web.log()));
    }

    let client = web.metrics().await;
    let handshakes_on = |text: &str, role, transport| {
        metric_sum(
            text,
            "isthmus_vm_agent_tunnel_handshakes_total",
            &[("role", role), ("transport", transport), ("result", "ok")],
        )
    };
    let handshakes = |text: &str, role| handshakes_on(text, role, "quic");
    assert_eq!(
        handshakes(&client, "client"),
        1,
        "one tunnel for every call:\n{client}"
    );
    assert_eq!(
        metric_sum(
            &client,
            "isthmus_vm_agent_tunnel_streams_total",
            &[("role", "client")]
        ),
        CALLS,
        "{client}"
    );
    assert_eq!(
        metric_sum(
            &client,
            "isthmus_tcp_connections_opened_total",
            &[("transport", "quic")]
        ),
        CALLS,
        "{client}"
    );
    let server = ratings.metrics().await;
    assert_eq!(handshakes(&server, "server"), 1, "{server}");

    // At ratings each stream is an inbound connection of web's verified identity, to the
    // app port the stream named.
    let conns = ratings.admin("/debug/connections").await;
    let streams: Vec<_> = conns
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["destination"] == format!("{RATINGS_IP}:{APP_PORT}"))
        .collect();
    assert!(!streams.is_empty(), "{conns:#}");
    for c in &streams {
        assert_eq!(c["peer_identity"], id("web").to_string(), "{c:#}");
        assert_eq!(c["result"], "ok", "{c:#}");
    }

    // 100 MiB each way while echoing, over the same tunnel.
    let transfer = on(web.rt(), async move {
        let mut s = TcpStream::connect(to).await?;
        anyhow::ensure!(read_line(&mut s).await? == "ratings");
        Ok(bulk_echo(s, BULK).await?)
    });
    // A bound against a hang, not a speed limit.
    let bulk = tokio::time::timeout(Duration::from_secs(600), transfer)
        .await
        .expect("the bulk echo stalled")
        .expect("the bulk echo failed");
    assert_eq!(bulk.sent.bytes, BULK);
    assert_eq!(
        bulk.echoed, bulk.sent,
        "the echo differs from what was sent"
    );
    assert!(
        app.received.lock().unwrap().contains(&bulk.sent),
        "the app received something else"
    );
    let client = web.metrics().await;
    assert_eq!(handshakes(&client, "client"), 1, "still the one tunnel");
    // Counted per peer: web names ratings' tunnel address, ratings names web's identity.
    let ratings_tunnel = format!("{RATINGS_IP}:15008");
    let web_id = id("web").to_string();
    let bytes = |text: &str, role, peer: &str, flow| {
        metric_sum(
            text,
            "isthmus_vm_agent_tunnel_bytes_total",
            &[
                ("role", role),
                ("transport", "quic"),
                ("peer", peer),
                ("flow", flow),
            ],
        )
    };
    for flow in ["sent", "received"] {
        assert!(
            bytes(&client, "client", &ratings_tunnel, flow) >= BULK,
            "web's {flow} bytes to {ratings_tunnel}:\n{client}"
        );
    }
    let server = ratings.metrics().await;
    for flow in ["sent", "received"] {
        assert!(
            bytes(&server, "server", &web_id, flow) >= BULK,
            "ratings' {flow} bytes from {web_id}:\n{server}"
        );
    }

    // A VM whose agent takes HTTP/2 alone rides an HBONE tunnel to the same agent.
    let h2 = Vm::create(&m, Net::A, "h2", HTTP2_IP, "h2", "h2");
    let _h2_agent = h2.start_agent(&m, &["--tunnel-transports", "h2"], &[]);
    h2.wait_ready().await;
    let to_h2 = SocketAddr::new(vip(&h2), SVC_PORT);
    let reached = eventually(WAIT, || async {
        call(&h2, to_h2, "over HTTP/2".into()).await.ok()
    })
    .await;
    assert!(reached.is_some(), "h2 never reached ratings:\n{}", h2.log());
    let text = h2.metrics().await;
    assert_eq!(handshakes_on(&text, "client", "hbone"), 1, "{text}");
    assert_eq!(
        metric_sum(
            &text,
            "isthmus_tcp_connections_opened_total",
            &[("transport", "hbone")]
        ),
        1,
        "{text}"
    );
    assert_eq!(
        handshakes_on(&ratings.metrics().await, "server", "hbone"),
        1,
        "ratings served the HTTP/2 tunnel beside the QUIC one"
    );

    // A VM whose agent takes no tunnels reaches ratings over mTLS of its own.
    let legacy = Vm::create(&m, Net::A, "legacy", LEGACY_IP, "legacy", "legacy");
    let _legacy_agent = legacy.start_agent(&m, &["--tunnel-port", "0"], &[]);
    legacy.wait_ready().await;
    let to = SocketAddr::new(vip(&legacy), SVC_PORT);
    let reached = eventually(WAIT, || async {
        call(&legacy, to, "plain mTLS".into()).await.ok()
    })
    .await;
    assert!(
        reached.is_some(),
        "legacy never reached ratings:\n{}",
        legacy.log()
    );
    let text = legacy.metrics().await;
    assert_eq!(
        metric_sum(
            &text,
            "isthmus_tcp_connections_opened_total",
            &[("transport", "direct")]
        ),
        1,
        "{text}"
    );
    assert_eq!(
        metric_sum(&text, "isthmus_vm_agent_tunnel_handshakes_total", &[]),
        0,
        "{text}"
    );
}
