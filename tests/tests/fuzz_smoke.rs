//! Runs every fuzz target body over seeds and bounded numbers of generated and mutated
//! inputs, so that `cargo test` catches a crash even where no fuzzer runs. The real fuzzing
//! is `cargo +nightly fuzz run <target>` in `fuzz/`.

use isthmus_proto::pb;
use isthmus_tests::fuzz;
use prost::Message;
use rand::{Rng, SeedableRng};

const ROUNDS: usize = 2000;

fn mutate(rng: &mut rand::rngs::StdRng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..rng.gen_range(1..8) {
        match rng.gen_range(0..5) {
            0 if !v.is_empty() => {
                let i = rng.gen_range(0..v.len());
                v[i] = rng.gen();
            }
            1 if !v.is_empty() => {
                let i = rng.gen_range(0..v.len());
                v.remove(i);
            }
            2 => {
                let i = rng.gen_range(0..=v.len());
                v.insert(i, rng.gen());
            }
            3 if !v.is_empty() => {
                let a = rng.gen_range(0..v.len());
                let b = rng.gen_range(a..v.len());
                let chunk = v[a..=b].to_vec();
                let at = rng.gen_range(0..=v.len());
                v.splice(at..at, chunk);
            }
            _ => v.truncate(rng.gen_range(0..=v.len())),
        }
    }
    v
}

fn run(target: fn(&[u8]), seeds: &[Vec<u8>]) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x0001_5745);
    for s in seeds {
        target(s);
    }
    for i in 0..ROUNDS {
        let input = if i % 4 == 0 || seeds.is_empty() {
            (0..rng.gen_range(0..256)).map(|_| rng.gen()).collect()
        } else {
            mutate(&mut rng, &seeds[i % seeds.len()])
        };
        target(&input);
    }
}

#[test]
fn spiffe_id() {
    let seeds = [
        "spiffe://cluster.local/ns/shop/sa/web",
        "spiffe://td",
        "spiffe://a.b-c_d/x/y.z",
        "spiffe://td/ns/../sa/x",
    ];
    run(
        fuzz::spiffe_id,
        &seeds
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect::<Vec<_>>(),
    );
}

#[test]
fn static_resources() {
    let mut seeds = Vec::new();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    for entry in walk(&dir) {
        seeds.push(std::fs::read(entry).unwrap());
    }
    // Inputs that made the YAML library panic.
    seeds.push(b"a: *unknown_anchor\nb: 1\n".to_vec());
    seeds.push(b"- &a [*a]\n".to_vec());
    run(fuzz::static_resources, &seeds);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "yaml") {
            out.push(p);
        }
    }
    out
}

#[test]
fn bootstrap_token() {
    let seeds = [
        "ist1.eyJ0ZCI6ImNsdXN0ZXIubG9jYWwifQ.AAAA",
        "ist1..",
        "ist1.e30.e30",
    ];
    run(
        fuzz::bootstrap_token,
        &seeds
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect::<Vec<_>>(),
    );
}

#[test]
fn certificate_request() {
    let id = isthmus_proto::SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
    let (_, csr) = isthmus_proto::certs::generate_key_and_csr(&id).unwrap();
    let req = pb::CertificateRequest {
        csr_pem: csr,
        bootstrap_token: String::new(),
        ttl_seconds: 3600,
        ..Default::default()
    };
    run(fuzz::certificate_request, &[req.encode_to_vec()]);
}

#[test]
fn watch_request() {
    let node = isthmus_tests::node("n", isthmus_proto::model::NodeKind::Gateway, "network-a");
    let req = pb::WatchRequest {
        request: Some(pb::watch_request::Request::Subscribe(pb::Subscribe {
            node: Some((&node).into()),
            resume_version: "abc.3".into(),
        })),
    };
    run(fuzz::watch_request, &[req.encode_to_vec()]);
}

#[test]
fn register_request() {
    use isthmus_proto::registration::{HealthReport, RegisterRequest};
    let mut hello = isthmus_tests::harness::vm::with_labels(
        isthmus_tests::harness::vm::hello("vm-web", "shop", "10.1.0.5", "network-a"),
        &[("version", "v2")],
    );
    let v4 = pb::RegisterRequest::from(&RegisterRequest::Hello(hello.clone())).encode_to_vec();
    hello.address = "2001:db8::5".parse().unwrap();
    let v6 = pb::RegisterRequest::from(&RegisterRequest::Hello(hello)).encode_to_vec();
    let health = pb::RegisterRequest::from(&RegisterRequest::Health(HealthReport {
        healthy: true,
        reason: "ok".into(),
    }))
    .encode_to_vec();
    run(fuzz::register_request, &[v4, v6, health]);
}

#[test]
fn agent_bundle() {
    let seed = "registry: 10.0.0.2:15012\ntrustDomain: cluster.local\ncluster: cluster-a\nnetwork: network-a\ngroup: vm-web\nnamespace: shop\nserviceAccount: web\n";
    run(
        fuzz::agent_bundle,
        &[seed.as_bytes().to_vec(), b"registry: [a, *b]\n".to_vec()],
    );
}

#[test]
fn tls_front_door() {
    // A real ClientHello as a seed.
    let mut client = rustls::ClientConnection::new(
        std::sync::Arc::new(
            rustls::ClientConfig::builder_with_provider(isthmus_proto::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        ),
        "registry.isthmus".try_into().unwrap(),
    )
    .unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    run(
        fuzz::tls_front_door,
        &[hello, b"GET / HTTP/1.1\r\n\r\n".to_vec()],
    );
}

#[test]
fn dns_query() {
    // A query for a mesh name, one with EDNS, and a header claiming many records.
    let mut seeds = vec![
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web\x04shop\x03svc\x07cluster\x05local\x00\x00\x01\x00\x01".to_vec(),
        b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01\x01a\x04wild\x07example\x03com\x00\x00\x1c\x00\x01\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x00".to_vec(),
        b"\x00\x01\x01\x00\xff\xff\xff\xff\xff\xff\xff\xff\xc0\x0c".to_vec(),
    ];
    seeds.push(seeds[0][..20].to_vec());
    run(fuzz::dns_query, &seeds);
}

#[test]
fn client_hello() {
    let hello = |sni: &str| {
        let cfg = rustls::ClientConfig::builder_with_provider(isthmus_proto::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut c = rustls::ClientConnection::new(
            std::sync::Arc::new(cfg),
            sni.to_string().try_into().unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        c.write_tls(&mut out).unwrap();
        out
    };
    let mut seeds = Vec::new();
    for split in [1u8, 7, 255] {
        let mut s = vec![split];
        s.extend(hello("outbound_.9080_._.reviews.shop.svc.cluster.local"));
        seeds.push(s);
    }
    run(fuzz::client_hello, &seeds);
}
