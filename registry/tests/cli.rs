//! The binaries as an operator runs them: `isthmusctl` and `isthmus-registry` as separate
//! processes, checked by exit status and what they print.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const CTL: &str = env!("CARGO_BIN_EXE_isthmusctl");
const REGISTRY: &str = env!("CARGO_BIN_EXE_isthmus-registry");

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin).args(args).output().expect("run binary")
}

/// A mesh CA for trust domain cluster.local with one cluster's intermediate, under `ca`.
fn ca_init(ca: &Path, cluster: &str) {
    let out = run(
        CTL,
        &[
            "ca",
            "init",
            "--trust-domain",
            "cluster.local",
            "--cluster",
            cluster,
            "--out",
            ca.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Stops the registry by its PID when the test ends, however it ends.
struct Registry(Child);

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ready(admin: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(admin) else {
        return false;
    };
    let _ = s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200")
}

fn start_registry(dir: &Path, resources: &Path) -> (Registry, SocketAddr) {
    let (grpc, admin) = (free_addr(), free_addr());
    let child = Command::new(REGISTRY)
        .args(["--cluster", "cluster-a", "--network", "network-a"])
        .arg("--ca-dir")
        .arg(dir.join("ca/cluster-a"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--resources")
        .arg(resources)
        .args([
            "--grpc-addr",
            &grpc.to_string(),
            "--admin-addr",
            &admin.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start isthmus-registry");
    let reg = Registry(child);
    let t = Instant::now();
    while !ready(admin) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "registry not ready within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (reg, grpc)
}

#[test]
fn operator_workflow_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = dir.join("ca");
    ca_init(&ca, "cluster-a");
    assert!(ca.join("cluster-a/ca-key.pem").exists());
    // A second init refuses to overwrite and says how to rotate.
    let out = run(
        CTL,
        &[
            "ca",
            "init",
            "--trust-domain",
            "cluster.local",
            "--cluster",
            "cluster-a",
            "--out",
            ca.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--rotate"),
        "{}",
        text(&out.stderr)
    );

    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let (_reg, grpc) = start_registry(dir, &examples);
    let grpc = grpc.to_string();
    let root = ca.join("root-cert.pem");
    let root = root.to_str().unwrap();

    let out = run(
        CTL,
        &[
            "token",
            "create",
            "--ca-dir",
            ca.join("cluster-a").to_str().unwrap(),
            "--namespace",
            "shop",
            "--service-account",
            "web",
            "--ttl",
            "10m",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_string();
    assert!(token.starts_with("ist1."));

    let creds = dir.join("web");
    let out = run(
        CTL,
        &[
            "cert",
            "request",
            "--registry",
            &grpc,
            "--root",
            root,
            "--token",
            &token,
            "--out",
            creds.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("spiffe://cluster.local/ns/shop/sa/web"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(creds.join("key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }

    // The same token again: refused, and the message says why and what to do.
    let out = run(
        CTL,
        &[
            "cert",
            "request",
            "--registry",
            &grpc,
            "--root",
            root,
            "--token",
            &token,
            "--out",
            dir.join("again").to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("already been used") && err.contains("isthmusctl token create"),
        "{err}"
    );

    // Renewal with the certificate instead of a token.
    let out = run(
        CTL,
        &[
            "cert",
            "request",
            "--registry",
            &grpc,
            "--root",
            root,
            "--cert-dir",
            creds.to_str().unwrap(),
            "--out",
            dir.join("renewed").to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    // The view of network-a, as JSON and as a table.
    let out = run(
        CTL,
        &[
            "catalog",
            "--registry",
            &grpc,
            "--root",
            root,
            "--cert-dir",
            creds.to_str().unwrap(),
            "--network",
            "network-a",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reviews = doc["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["hostname"] == "reviews.shop.svc.cluster.local")
        .expect("reviews in the view");
    let gateway_weight: u64 = reviews["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "gateway")
        .map(|e| e["weight"].as_u64().unwrap())
        .sum();
    assert_eq!(
        gateway_weight, 6,
        "network-b's six endpoints stand behind its gateways"
    );
    let out = run(
        CTL,
        &[
            "catalog",
            "--registry",
            &grpc,
            "--root",
            root,
            "--cert-dir",
            creds.to_str().unwrap(),
            "--network",
            "network-b",
            "--kind",
            "gateway",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(
        table.contains("SERVICE reviews.shop.svc.cluster.local") && !table.contains("gateway  "),
        "{table}"
    );

    // A network nobody names is an error that lists the ones that exist, not an empty view.
    let out = run(
        CTL,
        &[
            "catalog",
            "--registry",
            &grpc,
            "--root",
            root,
            "--cert-dir",
            creds.to_str().unwrap(),
            "--network",
            "network-typo",
        ],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("\"network-typo\"") && err.contains("network-a, network-b"),
        "{err}"
    );

    // Without a certificate the view is not served.
    let out = run(
        CTL,
        &[
            "catalog",
            "--registry",
            &grpc,
            "--root",
            root,
            "--network",
            "network-a",
        ],
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--cert-dir"));
}

#[test]
fn validate_names_every_bad_file_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = dir.join("ca");
    ca_init(&ca, "c1");
    let res = dir.join("res");
    std::fs::create_dir_all(&res).unwrap();
    std::fs::write(
        res.join("bad.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: x\n  namespace: shop\nspec:\n  hosts: [x.shop.svc.cluster.local]\n  ports:\n  - number: 70000\n    name: http\n    protocol: HTTP\n",
    )
    .unwrap();
    let args = |res: &Path| {
        vec![
            "--cluster".to_string(),
            "c1".into(),
            "--network".into(),
            "n1".into(),
            "--ca-dir".into(),
            ca.join("c1").to_string_lossy().to_string(),
            "--resources".into(),
            res.to_string_lossy().to_string(),
            "--validate".into(),
        ]
    };
    let out = Command::new(REGISTRY).args(args(&res)).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("bad.yaml") && err.contains("spec.ports[0].number") && err.contains("70000"),
        "{err}"
    );

    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let out = Command::new(REGISTRY)
        .args(args(&examples))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("configuration is valid"));

    // A bad flag value is named too.
    let out = Command::new(REGISTRY)
        .args([
            "--cluster",
            "Bad_Cluster",
            "--network",
            "n1",
            "--ca-dir",
            "/nonexistent",
            "--validate",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("--cluster") && err.contains("--ca-dir"),
        "{err}"
    );
}

#[test]
fn vm_onboard_writes_a_bundle_the_agent_reads() {
    use isthmus_proto::bundle::AgentBundle;

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = dir.join("ca");
    ca_init(&ca, "cluster-a");
    let out_dir = dir.join("vm-bundle");
    let onboard = |ttl: &str, out_dir: &Path| {
        run(
            CTL,
            &[
                "vm",
                "onboard",
                "--registry",
                "10.0.0.2:15012",
                "--ca-dir",
                ca.join("cluster-a").to_str().unwrap(),
                "--group",
                "vm-web",
                "--namespace",
                "shop",
                "--service-account",
                "web",
                "--network",
                "network-a",
                "--out",
                out_dir.to_str().unwrap(),
                "--token-ttl",
                ttl,
            ],
        )
    };

    // Past the longest token lifetime: refused, named, nothing written.
    let out = onboard("25h", &out_dir);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("--token-ttl") && err.contains("24h"), "{err}");
    assert!(!out_dir.exists());

    let out = onboard("30m", &out_dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    for file in ["agent.yaml", "root-cert.pem", "token"] {
        assert!(
            printed.contains(&out_dir.join(file).display().to_string()),
            "{file}: {printed}"
        );
    }
    assert!(printed.contains("next:"), "{printed}");

    let bundle = AgentBundle::load(&out_dir).unwrap();
    assert_eq!(
        bundle,
        AgentBundle {
            registry: "10.0.0.2:15012".into(),
            trust_domain: "cluster.local".into(),
            cluster: "cluster-a".into(),
            network: "network-a".into(),
            group: "vm-web".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
        }
    );
    assert_eq!(
        std::fs::read(out_dir.join("root-cert.pem")).unwrap(),
        std::fs::read(ca.join("root-cert.pem")).unwrap()
    );
    let token = AgentBundle::read_token(&out_dir).unwrap().unwrap();
    let claims = isthmus_proto::token::parse(&token).unwrap().claims;
    assert_eq!(
        claims.identity().unwrap().as_str(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(claims.cluster, "cluster-a");
    assert!(
        (claims.exp - claims.iat - 1800).abs() <= 1,
        "lives --token-ttl: {claims:?}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out_dir.join("token"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }

    // The agent's reader names a missing file and a bad field.
    std::fs::remove_file(out_dir.join("root-cert.pem")).unwrap();
    let err = AgentBundle::load(&out_dir).unwrap_err().to_string();
    assert!(
        err.contains(&out_dir.join("root-cert.pem").display().to_string()),
        "{err}"
    );
    std::fs::copy(ca.join("root-cert.pem"), out_dir.join("root-cert.pem")).unwrap();
    let config = out_dir.join("agent.yaml");
    let yaml = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        yaml.replace("network: network-a", "network: Net_A"),
    )
    .unwrap();
    let err = AgentBundle::load(&out_dir).unwrap_err().to_string();
    assert!(
        err.starts_with(&config.display().to_string()) && err.contains("network: "),
        "{err}"
    );
}

#[test]
fn validate_reports_every_document_of_a_directory_of_mixed_files() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = tmp.path().join("ca");
    ca_init(&ca, "c1");
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/istio-compat");
    let out = Command::new(REGISTRY)
        .args(["--cluster", "c1", "--network", "network-a", "--ca-dir"])
        .arg(ca.join("c1"))
        .arg("--resources")
        .arg(&corpus)
        .arg("--validate")
        .output()
        .unwrap();
    // The corpus holds documents Istio refuses, so the directory is not valid as a whole.
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    let line = |needle: &str| {
        report
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{report}"))
            .to_string()
    };
    assert!(
        line("mixed-kinds.yaml (document 1): ServiceEntry bookinfo/reviews")
            .ends_with("loaded (1 resources)")
    );
    // A VirtualService is read for its L4 routes; its HTTP routes are reported, not
    // dropped silently.
    assert!(
        line("mixed-kinds.yaml (document 2): VirtualService bookinfo/reviews")
            .ends_with("loaded (1 resources)")
    );
    assert!(line("warning: spec.http").contains("HTTP routes are not honoured"));
    assert!(
        line("mixed-kinds.yaml (document 4): Sidecar bookinfo/default")
            .contains("ignored: Sidecar")
    );
    assert!(line("one-bad-document.yaml (document 2)").ends_with("refused"));
    assert!(
        line("kubectl-get-list.yaml (document 1, items[2]): DestinationRule bookinfo/ratings")
            .ends_with("loaded (1 resources)")
    );
    assert!(line("warning: spec.hosts[0]").contains("partial wildcard"));
    assert!(line("error: items[3].spec.hosts[0]").contains("bad_host.example.com"));
    let summary = line(" documents: ");
    assert!(
        summary.contains(" loaded, ")
            && summary.contains(" ignored, ")
            && summary.contains(" refused"),
        "{summary}"
    );
    // The refused documents are named on stderr as well, by file, document and field.
    let err = text(&out.stderr);
    assert!(
        err.contains("one-bad-document.yaml (document 2)") && err.contains("invalid YAML"),
        "{err}"
    );
}

#[test]
fn a_damaged_store_stops_the_start_with_the_file_named_and_is_left_as_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ca_init(&dir.join("ca"), "cluster-a");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let store = data.join("isthmus.redb");
    // What an interrupted copy or a full disk leaves: the file, with nothing in it.
    std::fs::write(&store, b"").unwrap();
    let out = Command::new(REGISTRY)
        .args(["--cluster", "cluster-a", "--network", "network-a"])
        .arg("--ca-dir")
        .arg(dir.join("ca/cluster-a"))
        .arg("--data-dir")
        .arg(&data)
        .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    // A clear refusal (exit 1), not a panic (101) nor a fresh store.
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains(&store.display().to_string())
            && err.contains("is damaged: it is empty (0 bytes)")
            && err.contains("Restore it from a backup"),
        "{err}"
    );
    assert_eq!(
        std::fs::metadata(&store).unwrap().len(),
        0,
        "the file was replaced"
    );
}
