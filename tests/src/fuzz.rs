//! Fuzz target bodies: every parser of untrusted input the registry has. Each takes raw
//! bytes and must neither panic nor hang. The cargo-fuzz targets in `fuzz/` call these
//! (coverage-guided, on a nightly toolchain), and `tests/fuzz_smoke.rs` runs them over
//! generated and mutated inputs on every `cargo test`.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use isthmus_proto::identity::{SpiffeId, TrustDomain};
use isthmus_proto::model::Node;
use isthmus_proto::pb;
use isthmus_proto::tls::{self, ClientAuth, TrustBundle};
use isthmus_registry::ca::{self, token, CaMaterial};
use isthmus_registry::sources::static_files::{parse_file, SourceDefaults};
use prost::Message;

struct Fixture {
    material: CaMaterial,
    server: Arc<rustls::ServerConfig>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::init_ca(dir.path(), "cluster.local", "fuzz", false);
        let material = CaMaterial::load(&dir.path().join("fuzz"), None).expect("ca");
        let id = SpiffeId::parse("spiffe://cluster.local/ns/isthmus-system/sa/isthmus-registry")
            .unwrap();
        let creds = material
            .self_credentials(
                &id,
                Duration::from_secs(3600),
                ::time::OffsetDateTime::now_utc(),
            )
            .expect("creds");
        let bundle = TrustBundle::new(material.root_der(), "cluster.local", &[]).expect("bundle");
        let server = Arc::new(
            tls::server_config(&creds, &bundle, ClientAuth::Optional, &[tls::ALPN_H2])
                .expect("server config"),
        );
        // The material is in memory now: the directory goes, rather than outliving the
        // process in this never-dropped fixture.
        drop(dir);
        Fixture { material, server }
    })
}

/// SPIFFE ID parsing; a parsed ID prints back to the input.
pub fn spiffe_id(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(id) = SpiffeId::parse(s) {
            assert_eq!(id.as_str(), s);
            let _ = id.workload_parts();
        }
    }
}

/// A resource file as the static source reads it.
pub fn static_resources(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let defaults = SourceDefaults {
            cluster: "cluster-a".into(),
            network: "network-a".into(),
            trust_domain: TrustDomain::new("cluster.local").unwrap(),
            domain: "cluster.local".into(),
        };
        match parse_file(Path::new("fuzz.yaml"), text, &defaults) {
            Ok(_) => {}
            Err(errors) => assert!(
                !errors.is_empty(),
                "a refused file names at least one error"
            ),
        }
    }
}

/// A bootstrap token as the CA receives it.
pub fn bootstrap_token(data: &[u8]) {
    if let Ok(t) = std::str::from_utf8(data) {
        let _ = token::verify(&fixture().material, t, ::time::OffsetDateTime::now_utc());
    }
}

/// A CertificateRequest off the wire, through CSR parsing and the signing checks.
pub fn certificate_request(data: &[u8]) {
    let Ok(req) = pb::CertificateRequest::decode(data) else {
        return;
    };
    if let Ok(id) = ca::csr_identity(&req.csr_pem) {
        let _ = fixture().material.sign_csr(
            &req.csr_pem,
            &id,
            ca::DEFAULT_LEAF_TTL,
            ::time::OffsetDateTime::now_utc(),
        );
    }
}

/// A WatchRequest off the wire, through the subscriber's self-description.
pub fn watch_request(data: &[u8]) {
    let Ok(req) = pb::WatchRequest::decode(data) else {
        return;
    };
    if let Some(pb::watch_request::Request::Subscribe(s)) = req.request {
        if let Some(n) = s.node {
            let _ = Node::try_from(n);
        }
    }
}

/// A RegisterRequest off the wire, through the Hello's checks and the entry built from a
/// WorkloadGroup: an accepted Hello gives an entry at its own address, named after its group.
pub fn register_request(data: &[u8]) {
    use isthmus_proto::model::{Workload, WorkloadGroup};
    use isthmus_proto::registration::RegisterRequest;
    let Ok(req) = pb::RegisterRequest::decode(data) else {
        return;
    };
    let Ok(RegisterRequest::Hello(hello)) = RegisterRequest::try_from(req) else {
        return;
    };
    let group = WorkloadGroup {
        name: "vm-web".into(),
        namespace: "shop".into(),
        template: Workload {
            namespace: "shop".into(),
            network: "network-a".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            service_account: "web".into(),
            ..Default::default()
        },
        ..Default::default()
    };
    let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
    if let Ok((w, _)) = isthmus_registry::registration::entry_from_group(
        &group,
        &hello,
        id,
        std::time::SystemTime::now(),
    ) {
        assert_eq!(w.address.ip(), Some(hello.address));
        assert!(w.name.starts_with(&hello.group));
        assert_eq!(w.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(w.tunnel_port, hello.tunnel_port);
    }
}

/// A VM agent's `agent.yaml`; what is accepted reads back the same once written.
pub fn agent_bundle(data: &[u8]) {
    use isthmus_proto::bundle::AgentBundle;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("agent.yaml");
    if let Ok(bundle) = AgentBundle::from_yaml(path, text) {
        assert_eq!(
            AgentBundle::from_yaml(path, &bundle.to_yaml()).unwrap(),
            bundle
        );
    }
}

/// Bytes arriving on the registry's TLS port before and during the handshake.
pub fn tls_front_door(data: &[u8]) {
    let Ok(mut conn) = rustls::ServerConnection::new(fixture().server.clone()) else {
        return;
    };
    let mut rd = data;
    while !rd.is_empty() {
        match conn.read_tls(&mut rd) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if conn.process_new_packets().is_err() {
                    break;
                }
            }
        }
    }
}

/// The DNS proxy's request path on raw client bytes (UDP and TCP limits): it must answer or
/// drop, and an answer carries the query's ID.
pub fn dns_query(data: &[u8]) {
    use isthmus_dns::server::{Step, Transport};
    let resolver = dns_resolver();
    for transport in [Transport::Udp, Transport::Tcp] {
        match resolver.begin(data, transport) {
            Step::Reply(b) => {
                assert!(b.len() >= 12, "an answer is at least a header");
                assert_eq!(b[..2], data[..2], "an answer carries the query's ID");
                assert!(b[2] & 0x80 != 0, "an answer has the response bit");
            }
            Step::Drop | Step::Forward(_) => {}
        }
    }
}

fn dns_resolver() -> &'static isthmus_dns::server::Resolver {
    use isthmus_dns::cache::{Cache, CacheLimits};
    use isthmus_dns::forwarder::{Forwarder, UpstreamMode};
    use isthmus_dns::metrics::Metrics;
    use isthmus_dns::names::{Locale, NameTable};
    use isthmus_proto::model::{Resolution, Service, ServiceAddress, ServiceView, ViewResource};
    use isthmus_proto::subscription::LocalView;
    static R: OnceLock<isthmus_dns::server::Resolver> = OnceLock::new();
    R.get_or_init(|| {
        let view = LocalView {
            version: "fuzz".into(),
            resources: ["web.shop.svc.cluster.local", "*.wild.example.com"]
                .iter()
                .map(|h| {
                    let r = ViewResource::Service(Arc::new(ServiceView {
                        service: Service {
                            hostname: h.to_string(),
                            addresses: vec![ServiceAddress {
                                cluster: String::new(),
                                address: "10.96.0.1".into(),
                            }],
                            resolution: Resolution::Static,
                            ..Default::default()
                        },
                        endpoints: vec![],
                        ..Default::default()
                    }));
                    (r.key(), r)
                })
                .collect(),
        };
        let locale = Locale {
            network: "net".into(),
            cluster: "c".into(),
            namespace: "shop".into(),
            cluster_domain: "cluster.local".into(),
            ipv6: true,
        };
        let metrics = Arc::new(Metrics::register(
            &mut prometheus_client::registry::Registry::default(),
        ));
        isthmus_dns::server::Resolver::new(
            Arc::new(arc_swap::ArcSwap::from_pointee(NameTable::build(
                &view, &locale, true,
            ))),
            Cache::new(CacheLimits {
                max_entries: 16,
                max_ttl: Duration::from_secs(60),
                max_negative_ttl: Duration::from_secs(60),
            }),
            Forwarder::new(
                vec![],
                UpstreamMode::Sequential,
                Duration::from_secs(1),
                metrics.clone(),
            ),
            metrics,
            16,
            Duration::from_secs(30),
            1232,
            "cluster.local",
        )
    })
}

/// The first bytes of a connection to the gateway's SNI port, fed in the pieces the input
/// itself chooses (its first byte sets the piece size), then the SNI key parse.
pub fn client_hello(data: &[u8]) {
    use isthmus_proto::sni::SniKey;
    use isthmus_proxy::client_hello::{ClientHelloReader, Hello, MAX_CLIENT_HELLO};
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let piece = usize::from(split).max(1);
    let mut reader = ClientHelloReader::new();
    for chunk in rest.chunks(piece) {
        match reader.feed(chunk) {
            Ok(Hello::NeedMore) => continue,
            Ok(Hello::ServerName(name)) => {
                if let Ok(key) = SniKey::parse(&name) {
                    assert_eq!(SniKey::parse(&key.to_string()).as_ref(), Ok(&key));
                }
                break;
            }
            Err(_) => break,
        }
    }
    assert!(reader.received().len() <= MAX_CLIENT_HELLO + 64);
}
