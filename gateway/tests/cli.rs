//! `isthmus-gateway` as an operator runs it: flags checked before anything starts, every
//! bad one named.

use std::process::Command;

const GATEWAY: &str = env!("CARGO_BIN_EXE_isthmus-gateway");

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(GATEWAY)
        .args(args)
        .output()
        .expect("run binary");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn validate_names_every_bad_setting() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root-cert.pem");
    let certs = dir.path().join("certs");
    let (ok, text) = run(&[
        "--network",
        "Network_B",
        "--root",
        root.to_str().unwrap(),
        "--cert-dir",
        certs.to_str().unwrap(),
        "--connect-attempts",
        "0",
        "--outlier-base-ejection",
        "10m",
        "--outlier-max-ejection",
        "1m",
        "--validate",
    ]);
    assert!(!ok, "{text}");
    for expected in [
        "Network_B",
        "root-cert.pem: no such file",
        "cert-dir",
        "--token",
        "connect-attempts",
        "outlier-max-ejection",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} not named in:\n{text}"
        );
    }
}

#[test]
fn unknown_policy_and_bad_durations_are_refused_by_name() {
    let (ok, text) = run(&[
        "--network",
        "b",
        "--root",
        "r",
        "--cert-dir",
        "c",
        "--lb-policy",
        "fastest",
    ]);
    assert!(!ok);
    assert!(
        text.contains("--lb-policy") && text.contains("least-connections"),
        "{text}"
    );
    let (ok, text) = run(&[
        "--network",
        "b",
        "--root",
        "r",
        "--cert-dir",
        "c",
        "--drain-deadline",
        "soon",
    ]);
    assert!(!ok);
    assert!(text.contains("--drain-deadline"), "{text}");
}

#[test]
fn a_valid_configuration_validates() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root-cert.pem");
    // A mesh root: a CA certificate naming its trust domain.
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from("spiffe://example.org").unwrap(),
    )];
    let key = rcgen::KeyPair::generate().unwrap();
    std::fs::write(&root, params.self_signed(&key).unwrap().pem()).unwrap();
    let (ok, text) = run(&[
        "--network",
        "network-b",
        "--root",
        root.to_str().unwrap(),
        "--cert-dir",
        dir.path().to_str().unwrap(),
        "--token",
        "ist1.x.y",
        "--validate",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("configuration is valid"));
}
