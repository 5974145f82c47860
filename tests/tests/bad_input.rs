//! Operators' mistakes at start, one per case: each program given one bad flag or file
//! refuses to start, exits non-zero, and says which flag or file is wrong and why, once (no
//! cause repeated, no line said twice) and without a backtrace or a panic, even with
//! `RUST_BACKTRACE=1` set. The running programs' bad inputs (ports, resources, requests) are
//! tested beside each program's other tests, in functions named `bad_input_*`.

use std::path::{Path, PathBuf};
use std::process::Command;

use isthmus_tests::harness::process::workspace_binary;
use isthmus_tests::harness::registry::init_ca;

struct Files {
    _dir: tempfile::TempDir,
    root: PathBuf,
    ca_dir: PathBuf,
    garbage: PathBuf,
    empty: PathBuf,
    foreign_root: PathBuf,
    empty_dir: PathBuf,
}

impl Files {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        init_ca(&d.join("ca"), "example.org", "c1", false);
        let garbage = d.join("garbage.pem");
        std::fs::write(&garbage, "this is not PEM\n").unwrap();
        let empty = d.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        // A CA certificate that names no trust domain: not a mesh root.
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let foreign = params.self_signed(&key).unwrap();
        let foreign_root = d.join("foreign-root.pem");
        std::fs::write(&foreign_root, foreign.pem()).unwrap();
        let empty_dir = d.join("empty-dir");
        std::fs::create_dir(&empty_dir).unwrap();
        Self {
            root: d.join("ca/root-cert.pem"),
            ca_dir: d.join("ca/c1"),
            garbage,
            empty,
            foreign_root,
            empty_dir,
            _dir: dir,
        }
    }
}

struct Case {
    name: &'static str,
    program: (&'static str, &'static str),
    args: Vec<String>,
    /// Each must appear in what the program says.
    says: Vec<&'static str>,
}

/// `fixed`, then each default whose flag `extra` does not name, then `extra`.
fn flags(fixed: &[&str], defaults: &[(&str, &str)], extra: &[&str]) -> Vec<String> {
    let mut a = s(fixed);
    for (flag, value) in defaults {
        if !extra.contains(flag) {
            a.extend(s(&[flag, value]));
        }
    }
    a.extend(s(extra));
    a
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|a| a.to_string()).collect()
}

const GATEWAY: (&str, &str) = ("isthmus-gateway", "isthmus-gateway");
const REGISTRY: (&str, &str) = ("isthmus-registry", "isthmus-registry");
const CTL: (&str, &str) = ("isthmus-registry", "isthmusctl");
const DNS: (&str, &str) = ("isthmus-dns", "isthmus-dns");
const AGENT: (&str, &str) = ("isthmus-vm-agent", "isthmus-vm-agent");
const SAMPLE: (&str, &str) = ("isthmus-sample-app", "sample-app");

fn cases(f: &Files) -> Vec<Case> {
    // Each program's flags, all good but the case's: a default stands unless the case
    // names its flag. The gateway gets a token so that no certificate is needed.
    let gateway_with = |extra: &[&str]| {
        let fixed = [
            "--cert-dir",
            &p(&f.empty_dir),
            "--token",
            "unused",
            "--validate",
        ];
        flags(
            &fixed,
            &[("--network", "net-a"), ("--root", &p(&f.root))],
            extra,
        )
    };
    let gateway_root = |root: &Path| gateway_with(&["--root", &p(root)]);
    let ca_dir = p(&f.ca_dir);
    let registry = |extra: &[&str]| {
        let defaults = [
            ("--cluster", "c1"),
            ("--network", "net-a"),
            ("--ca-dir", &ca_dir),
        ];
        flags(&["--validate"], &defaults, extra)
    };
    let dns = |extra: &[&str]| {
        let mut a = s(&["--network", "net-a", "--cert-dir"]);
        a.push(p(&f.empty_dir));
        a.extend(["--root".to_string(), p(&f.root), "--validate".to_string()]);
        a.extend(s(extra));
        a
    };
    vec![
        Case {
            name: "gateway root that is not PEM",
            program: GATEWAY,
            args: gateway_root(&f.garbage),
            says: vec!["--root", "garbage.pem"],
        },
        Case {
            name: "gateway root that is empty",
            program: GATEWAY,
            args: gateway_root(&f.empty),
            says: vec!["--root", "empty.pem"],
        },
        Case {
            name: "gateway root that does not exist",
            program: GATEWAY,
            args: gateway_root(&f.empty_dir.join("root-cert.pem")),
            says: vec!["--root", "no such file"],
        },
        Case {
            name: "gateway root that is not a mesh root",
            program: GATEWAY,
            args: gateway_root(&f.foreign_root),
            says: vec!["--root", "not a mesh root"],
        },
        Case {
            name: "gateway registry address without a port",
            program: GATEWAY,
            args: gateway_with(&["--registry", "registry.example"]),
            says: vec!["--registry", "not a host:port address"],
        },
        Case {
            name: "gateway locality of four parts",
            program: GATEWAY,
            args: gateway_with(&["--locality", "eu/eu-1/a/b"]),
            says: vec!["--locality", "region/zone/subzone"],
        },
        Case {
            name: "gateway locality with an empty part",
            program: GATEWAY,
            args: gateway_with(&["--locality", "eu//a"]),
            says: vec!["--locality", "a part is empty"],
        },
        Case {
            name: "gateway network that is not a DNS label",
            program: GATEWAY,
            args: gateway_with(&["--network", "Net_A"]),
            says: vec!["--network", "Net_A"],
        },
        Case {
            name: "gateway trust domain that disagrees with the root",
            program: GATEWAY,
            args: gateway_with(&["--trust-domain", "other.org"]),
            says: vec!["--trust-domain", "other.org", "example.org"],
        },
        Case {
            name: "gateway connect timeout of zero",
            program: GATEWAY,
            args: gateway_with(&["--connect-timeout", "0s"]),
            says: vec!["--connect-timeout", "more than 0"],
        },
        Case {
            name: "gateway duration with an unknown unit",
            program: GATEWAY,
            args: gateway_with(&["--connect-timeout", "5parsecs"]),
            says: vec!["--connect-timeout", "unknown unit"],
        },
        Case {
            name: "gateway with no connections allowed",
            program: GATEWAY,
            args: gateway_with(&["--max-connections", "0"]),
            says: vec!["--max-connections", "at least 1"],
        },
        Case {
            name: "gateway listeners on one port",
            program: GATEWAY,
            args: gateway_with(&[
                "--sni-addr",
                "127.0.0.1:15443",
                "--health-addr",
                "127.0.0.1:15443",
            ]),
            says: vec!["--health-addr", "each listener needs its own port"],
        },
        Case {
            name: "gateway ejection ceiling below its base",
            program: GATEWAY,
            args: gateway_with(&[
                "--outlier-base-ejection",
                "30s",
                "--outlier-max-ejection",
                "10s",
            ]),
            says: vec![
                "--outlier-max-ejection",
                "shorter than --outlier-base-ejection",
            ],
        },
        Case {
            name: "gateway balancing policy that does not exist",
            program: GATEWAY,
            args: gateway_with(&["--lb-policy", "fastest"]),
            says: vec!["--lb-policy", "fastest"],
        },
        Case {
            name: "registry CA directory without a CA",
            program: REGISTRY,
            args: registry(&["--ca-dir", &p(&f.empty_dir)]),
            says: vec!["--ca-dir", "ca-cert.pem"],
        },
        Case {
            name: "registry cluster that is not a DNS label",
            program: REGISTRY,
            args: registry(&["--cluster", "C_1"]),
            says: vec!["--cluster", "C_1"],
        },
        Case {
            name: "registry trust domain that disagrees with its CA",
            program: REGISTRY,
            args: registry(&["--trust-domain", "other.org"]),
            says: vec!["other.org", "example.org"],
        },
        Case {
            name: "registry resources directory that does not exist",
            program: REGISTRY,
            args: registry(&["--resources", &p(&f.empty_dir.join("missing"))]),
            says: vec!["--resources", "missing"],
        },
        Case {
            name: "isthmusctl token that would be expired when printed",
            program: CTL,
            args: s(&[
                "token",
                "create",
                "--ca-dir",
                &ca_dir,
                "--namespace",
                "ns",
                "--service-account",
                "sa",
                "--ttl",
                "0s",
            ]),
            says: vec!["--ttl"],
        },
        Case {
            name: "isthmusctl token for a CA directory without a CA",
            program: CTL,
            args: s(&[
                "token",
                "create",
                "--ca-dir",
                &p(&f.empty_dir),
                "--namespace",
                "ns",
                "--service-account",
                "sa",
            ]),
            says: vec!["empty-dir"],
        },
        Case {
            name: "isthmusctl catalog without credentials",
            program: CTL,
            args: s(&[
                "catalog",
                "--registry",
                "127.0.0.1:15012",
                "--root",
                &p(&f.root),
                "--network",
                "net-a",
            ]),
            says: vec!["--cert-dir", "mTLS"],
        },
        Case {
            name: "isthmusctl catalog with a credentials directory that holds none",
            program: CTL,
            args: s(&[
                "catalog",
                "--registry",
                "127.0.0.1:15012",
                "--root",
                &p(&f.root),
                "--network",
                "net-a",
                "--cert-dir",
                &p(&f.empty_dir),
            ]),
            says: vec!["--cert-dir", "cert-chain.pem"],
        },
        Case {
            name: "DNS proxy TTL of zero",
            program: DNS,
            args: dns(&["--ttl", "0s"]),
            says: vec!["ttl"],
        },
        Case {
            name: "DNS proxy forwarding to itself",
            program: DNS,
            args: dns(&["--listen", "127.0.0.1:5353", "--upstream", "127.0.0.1:5353"]),
            says: vec!["upstream", "forwarding loop"],
        },
        Case {
            name: "DNS proxy with no queries allowed in flight",
            program: DNS,
            args: dns(&["--max-inflight", "0"]),
            says: vec!["max-inflight", "at least 1"],
        },
        Case {
            name: "VM agent bundle directory without a bundle",
            program: AGENT,
            args: s(&["run", "--bundle", &p(&f.empty_dir), "--validate"]),
            says: vec!["agent.yaml", "isthmusctl vm onboard"],
        },
        Case {
            name: "VM agent bundle that is a file",
            program: AGENT,
            args: s(&["run", "--bundle", &p(&f.garbage), "--validate"]),
            says: vec!["garbage.pem"],
        },
        Case {
            name: "sample app address without a port",
            program: SAMPLE,
            args: s(&["--listen", "127.0.0.1"]),
            says: vec!["--listen", "127.0.0.1"],
        },
    ]
}

/// What the program said, or why the case failed.
fn run(case: &Case) -> Result<(), String> {
    let bin = workspace_binary(case.program.0, case.program.1);
    let out = Command::new(&bin)
        .args(&case.args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LOG")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let mut wrong = Vec::new();
    if out.status.success() {
        wrong.push("it exited 0".to_string());
    }
    for needle in &case.says {
        if !said.contains(needle) {
            wrong.push(format!("it does not say {needle:?}"));
        }
    }
    for noise in [
        "panicked",
        "Stack backtrace",
        "Caused by:",
        "RUST_BACKTRACE",
    ] {
        if said.contains(noise) {
            wrong.push(format!("it says {noise:?}"));
        }
    }
    if let Some(os) = said.find("(os error ") {
        let cause = &said[os..os + said[os..].find(')').unwrap_or(0) + 1];
        if said.matches(cause).count() > 1 {
            wrong.push(format!("it repeats {cause:?}"));
        }
    }
    let mut lines: Vec<&str> = said.lines().filter(|l| !l.trim().is_empty()).collect();
    lines.sort();
    if let Some(w) = lines.windows(2).find(|w| w[0] == w[1]) {
        wrong.push(format!("it says {:?} twice", w[0]));
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}\n  {} {}\n  said: {}",
            case.name,
            wrong.join(", "),
            case.program.1,
            case.args.join(" "),
            said.trim_end().replace('\n', "\n        ")
        ))
    }
}

#[test]
fn bad_input_every_program_refuses_a_bad_flag_or_file_naming_it_once() {
    let files = Files::new();
    let cases = cases(&files);
    let failures: Vec<String> = cases.iter().filter_map(|c| run(c).err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases did not hold:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
