//! Peering between clusters' registries, in-process on loopback: east (cluster-a on
//! network-a) and west (cluster-b on network-b), each with its own store and its own
//! intermediate under the mesh root, import what the other exports; north (cluster-c)
//! peers with west only. Each sees the other's services behind the other network's
//! gateway, with the origin `peer:<name>/`; a peer stopped leaves its services in place,
//! marked stale since it was lost, and a peer back resumes without a full resend; north
//! sees west's own services and never what west imported from east (no re-export).

use std::time::Duration;

use isthmus_proto::model::{EndpointKind, NodeKind, ServiceView, ViewResource};
use isthmus_registry::admin::view_resources;
use isthmus_registry::sources::peers::PeerSpec;
use isthmus_registry::views::ViewKey;
use isthmus_tests::yaml::{docs, network, service, workload};
use isthmus_tests::{eventually, host, http_get, metric, node, TestRegistry};

const WAIT: Duration = Duration::from_secs(20);

/// Service `name` as a proxy of `reg`'s own cluster and network in `shop` sees it.
fn seen(reg: &TestRegistry, name: &str) -> Option<ServiceView> {
    let key = ViewKey::workload(reg.cfg.network.clone(), Some("shop".into()))
        .in_cluster(&reg.cfg.cluster);
    let (_, resources) = view_resources(&reg.handle().views, &key);
    resources.into_iter().find_map(|r| match r {
        ViewResource::Service(sv) if sv.service.hostname == host(name, "shop") => {
            Some((*sv).clone())
        }
        _ => None,
    })
}

/// The one endpoint `reg`'s proxies get for `name`, once it is there.
async fn endpoint_of(reg: &TestRegistry, name: &str) -> isthmus_proto::model::ViewEndpoint {
    eventually(WAIT, || async {
        seen(reg, name).and_then(|sv| sv.endpoints.first().cloned())
    })
    .await
    .unwrap_or_else(|| panic!("{} never saw {name}", reg.cfg.cluster))
}

fn peer(name: &str, reg: &TestRegistry) -> PeerSpec {
    PeerSpec::parse(&format!("{name}={}", reg.grpc_addr())).expect("peer spec")
}

async fn peers_status(reg: &TestRegistry) -> serde_json::Value {
    let (status, body) = http_get(reg.admin_addr(), "/debug/peers").await.unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// `isthmusctl peers` against `reg`'s admin, as an operator runs it: its stdout.
async fn isthmusctl_peers(reg: &TestRegistry) -> String {
    let ctl = isthmus_tests::harness::process::workspace_binary("isthmus-registry", "isthmusctl");
    let admin = reg.admin_addr().to_string();
    let out = tokio::process::Command::new(ctl)
        .args(["peers", "--admin", &admin])
        .output()
        .await
        .expect("isthmusctl runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

async fn origin_of(reg: &TestRegistry, key_part: &str) -> Vec<String> {
    let (_, body) = http_get(reg.admin_addr(), "/debug/resources")
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["key"].as_str().unwrap().contains(key_part))
        .map(|r| r["origin"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peered_registries_see_each_others_services_through_the_gateways_and_never_reexport() {
    let east_files = docs(&[
        network("network-a", &["192.0.2.1"]),
        service("reviews", "shop", 9080),
        workload("reviews-a1", "shop", "reviews", "10.1.0.5", "network-a"),
    ]);
    let west_files = docs(&[
        network("network-b", &["198.51.100.1"]),
        service("ratings", "shop", 9080),
        workload("ratings-b1", "shop", "ratings", "10.2.0.5", "network-b"),
    ]);
    let mut east = TestRegistry::start(&[("mesh.yaml", &east_files)])
        .await
        .unwrap();
    let mut west = TestRegistry::start_cluster_of(
        &east,
        "cluster-b",
        "network-b",
        &[("mesh.yaml", &west_files)],
        |cfg| {
            cfg.peers = vec![peer("east", &east)];
        },
    )
    .await
    .unwrap();
    // east learns west's address now: restarted on its own store, peering with it.
    east.stop_keeping_port().await;
    east.cfg.peers = vec![peer("west", &west)];
    east.start_again().await.unwrap();

    // Each sees the other's service behind the other network's gateway.
    let ratings = endpoint_of(&east, "ratings").await;
    assert_eq!(ratings.kind, EndpointKind::Gateway);
    assert_eq!(ratings.address.to_string(), "198.51.100.1");
    assert_eq!(ratings.network, "network-b");
    assert_eq!(ratings.stale_since_ms, 0);
    assert_eq!(
        ratings
            .identities
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>(),
        ["spiffe://cluster.local/ns/shop/sa/ratings"],
        "the identity behind the gateway comes with the import"
    );
    let reviews = endpoint_of(&west, "reviews").await;
    assert_eq!(reviews.address.to_string(), "192.0.2.1");
    // With their origin.
    assert_eq!(
        origin_of(&east, "ratings").await,
        ["peer:west/", "peer:west/"]
    );
    assert_eq!(origin_of(&east, "Network//network-b").await, ["peer:west/"]);
    // east's own service keeps its own origin and its own VIP; the import gets one of east's.
    let ratings_sv = seen(&east, "ratings").unwrap();
    assert_eq!(ratings_sv.service.cluster, "cluster-b");
    assert_eq!(
        ratings_sv.service.allocated_addresses.len(),
        2,
        "east allocates VIPs for what it imports"
    );

    // The peer's sync state.
    let st = peers_status(&east).await;
    let w = &st["peers"][0];
    assert_eq!(w["peer"], "west");
    assert_eq!(w["connected"], true, "{st}");
    assert_eq!(w["synced"], true, "{st}");
    assert_eq!(w["services"], 1, "{st}");
    assert_eq!(w["networks"], 1, "{st}");
    assert_eq!(w["clusters"], serde_json::json!(["cluster-b"]), "{st}");
    assert_eq!(w["following"], west.grpc_addr().to_string(), "{st}");
    assert_eq!(w["summary"], "synced");
    let table = isthmusctl_peers(&east).await;
    let row = table.lines().nth(1).unwrap_or_default();
    assert!(row.starts_with("west") && row.contains("synced"), "{table}");
    assert!(row.contains(&west.grpc_addr().to_string()), "{table}");
    let m = east.metrics().await;
    assert_eq!(
        metric(&m, "isthmus_registry_peer_synced{peer=\"west\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "isthmus_registry_peer_services{peer=\"west\"}"),
        Some(1.0),
        "{m}"
    );

    // A third registry peered with west sees west's own services only.
    let north = TestRegistry::start_cluster_of(&east, "cluster-c", "network-c", &[], |cfg| {
        cfg.peers = vec![peer("west", &west)];
    })
    .await
    .unwrap();
    let from_west = endpoint_of(&north, "ratings").await;
    assert_eq!(from_west.address.to_string(), "198.51.100.1");
    assert!(
        seen(&west, "reviews").is_some() && seen(&north, "reviews").is_none(),
        "west re-exported what it imported from east"
    );
    assert!(
        origin_of(&north, "network-a").await.is_empty(),
        "east's network reached north"
    );

    // west stopped: east keeps ratings, marked stale since then.
    let before_stop = isthmus_registry::sources::kubernetes::now_ms();
    west.stop_keeping_port().await;
    let stale = eventually(WAIT, || async {
        seen(&east, "ratings")
            .and_then(|sv| sv.endpoints.first().cloned())
            .filter(|e| e.stale_since_ms != 0)
    })
    .await
    .expect("west's endpoints never marked stale");
    assert!(stale.stale_since_ms >= before_stop, "{stale:?}");
    let st = peers_status(&east).await;
    assert_eq!(st["peers"][0]["connected"], false, "{st}");
    assert!(
        st["peers"][0]["summary"]
            .as_str()
            .unwrap()
            .starts_with("stale for"),
        "{st}"
    );
    let m = east.metrics().await;
    assert_eq!(
        metric(&m, "isthmus_registry_peer_connected{peer=\"west\"}"),
        Some(0.0),
        "{m}"
    );
    let table = isthmusctl_peers(&east).await;
    let row = table.lines().nth(1).unwrap_or_default();
    assert!(
        row.starts_with("west") && row.contains("stale for"),
        "{table}"
    );

    // west back on its own store: current again, resumed by content digest (no resend).
    west.start_again().await.unwrap();
    eventually(WAIT, || async {
        seen(&east, "ratings")
            .and_then(|sv| sv.endpoints.first().cloned())
            .filter(|e| e.stale_since_ms == 0)
    })
    .await
    .expect("west's endpoints never current again");
    let st = peers_status(&east).await;
    assert_eq!(st["peers"][0]["snapshots"], 1, "{st}");
    assert!(st["peers"][0]["resumes"].as_u64().unwrap() >= 1, "{st}");

    // A service west drops leaves east (and north) too.
    west.write_resource(
        "mesh.yaml",
        &docs(&[network("network-b", &["198.51.100.1"])]),
    );
    let gone = eventually(WAIT, || async {
        (seen(&east, "ratings").is_none() && seen(&north, "ratings").is_none()).then_some(())
    })
    .await;
    assert!(gone.is_some(), "a service the peer dropped stayed");
    assert!(origin_of(&east, "Workload/cluster-b").await.is_empty());
    drop(north);
}

#[tokio::test]
async fn only_a_registry_may_subscribe_as_a_peer() {
    let reg = TestRegistry::start(&[]).await.unwrap();
    let creds = reg.credentials("shop", "web").await.unwrap();
    let err = reg
        .subscribe(&creds, &node("sneaky", NodeKind::Peer, "network-a"))
        .await
        .expect_err("a workload imported the export");
    let msg = format!("{err:#}");
    assert!(msg.contains("only a registry"), "{msg}");
    assert!(
        msg.contains("spiffe://cluster.local/ns/shop/sa/web"),
        "{msg}"
    );
    let m = reg.metrics().await;
    assert_eq!(
        metric(
            &m,
            "isthmus_registry_watch_refused_total{kind=\"peer_not_allowed\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

#[test]
fn peer_flags_name_what_is_wrong() {
    assert_eq!(
        PeerSpec::parse("west=10.0.0.1:15012,10.0.0.2:15012").unwrap(),
        PeerSpec {
            name: "west".into(),
            addresses: "10.0.0.1:15012,10.0.0.2:15012".into()
        }
    );
    assert_eq!(
        PeerSpec::parse("10.0.0.1:15012").unwrap().name,
        "10.0.0.1:15012"
    );
    let e = PeerSpec::parse("we/st=10.0.0.1:15012").unwrap_err();
    assert!(e.contains("name \"we/st\""), "{e}");
    let e = PeerSpec::parse("west=").unwrap_err();
    assert!(e.contains("west="), "{e}");
}

/// Two clusters in two networks (network namespaces), each with its own registry and store
/// and each network's gateway following its own cluster's registry, the registries peered:
/// a workload of each cluster calls the other cluster's service through the other network's
/// gateway, end-to-end mTLS with the callee's identity verified. Needs root; in CI it must
/// run, elsewhere it skips with a message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_route_to_each_others_services_through_their_gateways() {
    use isthmus_tests::harness::mesh::{
        gateway_credentials, id, on, yaml as mesh_yaml, Client, Mesh, APP_PORT, SNI_PORT, SVC_PORT,
    };
    use isthmus_tests::harness::netns::Net;
    use std::net::{IpAddr, SocketAddr};

    let Some(mut m) = Mesh::start("peering", &[]).await else {
        return;
    };
    let gw = |net: Net| -> mesh_yaml::SocketAddrLike {
        SocketAddr::new(m.topo.gateway_addr(net).into(), SNI_PORT).into()
    };
    // east (the mesh's registry) holds network-a and ratings there; west, network-b and
    // reviews there.
    m.reg.write_resource(
        "mesh.yaml",
        &docs(&[
            mesh_yaml::network("network-a", &[gw(Net::A)]),
            mesh_yaml::service("ratings", "shop", SVC_PORT),
            mesh_yaml::workload(
                "ratings-a1",
                "shop",
                "ratings",
                "10.10.0.6",
                APP_PORT,
                "network-a",
            ),
        ]),
    );
    let west_files = docs(&[
        mesh_yaml::network("network-b", &[gw(Net::B)]),
        mesh_yaml::service("reviews", "shop", SVC_PORT),
        mesh_yaml::workload(
            "reviews-b1",
            "shop",
            "reviews",
            "10.10.0.5",
            APP_PORT,
            "network-b",
        ),
    ]);
    let host_ip = IpAddr::V4(m.topo.host_addr());
    let east_addr = m.registry_addr;
    let west = TestRegistry::start_cluster_of(
        &m.reg,
        "cluster-b",
        "network-b",
        &[("mesh.yaml", &west_files)],
        |cfg| {
            cfg.grpc_addr = SocketAddr::new(host_ip, 0);
            cfg.peers = vec![PeerSpec::parse(&format!("east={east_addr}")).unwrap()];
        },
    )
    .await
    .unwrap();
    m.reg.stop_keeping_port().await;
    m.reg.cfg.peers = vec![peer("west", &west)];
    m.reg.start_again().await.unwrap();

    // Network A's gateway follows east; network B's follows west, with west's certificate.
    let _gw_a = m.gateway(Net::A).await;
    let cert_dir = gateway_credentials(&west, "network-b", m.dir.path()).await;
    let mut cfg = m.gateway_config(Net::B, cert_dir);
    cfg.registry.addr = west.grpc_addr().to_string();
    cfg.registry.root_cert = west.ca_root();
    let gw_b = on(m.rt(Net::B), async move { isthmus_gateway::run(cfg).await })
        .await
        .expect("network-b's gateway");
    assert!(
        eventually(WAIT, || async { gw_b.is_ready().then_some(()) })
            .await
            .is_some(),
        "network-b's gateway never became ready"
    );

    // ratings in A with east's certificate, reviews in B with west's.
    let _ratings = m
        .workload(
            Net::A,
            "10.10.0.6",
            "ratings-a1",
            "ratings",
            Default::default(),
        )
        .await;
    m.topo.netns(Net::B).add_ip("10.10.0.5".parse().unwrap());
    let reviews_creds = west.credentials("shop", "reviews").await.unwrap();
    let bundle = west.bundle();
    let _reviews = on(m.rt(Net::B), async move {
        isthmus_tests::harness::mesh::Workload::start(
            SocketAddr::new("10.10.0.5".parse().unwrap(), APP_PORT),
            "reviews-b1",
            &reviews_creds,
            &bundle,
            Default::default(),
            isthmus_proxy::inbound::Mode::Strict,
        )
        .await
    })
    .await
    .expect("reviews in network B");

    // A client of each cluster, following its own registry.
    let web_a = m.client(Net::A, "web").await;
    let (web_b_creds, bundle) = (
        west.credentials("shop", "web").await.unwrap(),
        west.bundle(),
    );
    let west_addr = west.grpc_addr();
    let web_b = std::sync::Arc::new(
        on(m.rt(Net::B), async move {
            Client::start(
                bundle,
                west_addr,
                "network-b",
                web_b_creds,
                Default::default(),
            )
            .await
        })
        .await
        .expect("client in network B"),
    );

    let mut calls = Vec::new();
    for (net, client, name, answer) in [
        (Net::A, &web_a, "reviews", "reviews-b1"),
        (Net::B, &web_b, "ratings", "ratings-a1"),
    ] {
        let call = eventually(WAIT, || async { m.call(net, client, name).await.ok() })
            .await
            .unwrap_or_else(|| panic!("{name} never answered from {net:?}"));
        assert_eq!(call.greeting, answer);
        assert_eq!(call.server, Some(id(name)), "{call:?}");
        calls.push(call);
    }
    // Through the other network's gateway.
    let gw_addr = |net: Net| m.topo.gateway_addr(net).to_string();
    assert!(
        format!("{:?}", calls[0].target).contains(&gw_addr(Net::B)),
        "{:?}",
        calls[0].target
    );
    assert!(
        format!("{:?}", calls[1].target).contains(&gw_addr(Net::A)),
        "{:?}",
        calls[1].target
    );
}
