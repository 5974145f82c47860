//! The Istio compatibility corpus (`tests/istio-compat/*.yaml`, see its README): every
//! document says in a `# expect:` comment what Istio's validation makes of it, and this test
//! checks that the static source makes the same of it — loaded (with the resources it
//! defines and the warnings Istio gives), ignored, or refused with the reason named. All
//! mismatches of all files are reported at once.

use std::path::{Path, PathBuf};

use isthmus_proto::TrustDomain;
use isthmus_registry::sources::static_files::{
    read_file, DocumentOutcome, DocumentSummary, SourceDefaults,
};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/istio-compat")
}

fn defaults() -> SourceDefaults {
    SourceDefaults {
        cluster: "cluster-a".into(),
        network: "network-a".into(),
        trust_domain: TrustDomain::new("cluster.local").unwrap(),
        domain: "cluster.local".into(),
    }
}

/// The `# expect:` lines of each document, in file order (text before the first `---` is a
/// header, not a document).
fn expectations(text: &str) -> Vec<Vec<String>> {
    text.split("\n---\n")
        .skip(1)
        .map(|doc| {
            doc.lines()
                .filter_map(|l| l.strip_prefix("# expect: "))
                .map(str::to_string)
                .collect()
        })
        .collect()
}

/// Whether one document's (or item's) outcome is what `expect` says; the mismatch otherwise.
fn check(expect: &str, got: &DocumentSummary) -> Result<(), String> {
    let words: Vec<&str> = expect.split_whitespace().collect();
    match (words.as_slice(), &got.outcome) {
        (["ignored"], DocumentOutcome::Ignored { .. }) => Ok(()),
        (
            ["loaded", n, rest @ ..],
            DocumentOutcome::Loaded {
                resources,
                warnings,
            },
        ) => {
            if n.parse::<usize>().ok() != Some(*resources) {
                return Err(format!("defined {resources} resources"));
            }
            match rest {
                [] if warnings.is_empty() => Ok(()),
                ["warns", field] if warnings.iter().any(|w| w.field == *field) => Ok(()),
                _ => Err(format!("warnings {warnings:?}")),
            }
        }
        (["refused", field, ..], DocumentOutcome::Refused { errors }) => {
            let field = if *field == "-" { "" } else { field };
            let needle = words[2..].join(" ");
            if errors
                .iter()
                .any(|e| e.field == field && e.message.contains(&needle))
            {
                Ok(())
            } else {
                Err(format!("refused with {errors:#?}"))
            }
        }
        (_, outcome) => Err(format!("{outcome:?}")),
    }
}

#[test]
fn every_corpus_document_is_read_as_istio_reads_it() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "the corpus is missing: {files:?}");
    let mut failures = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let expected = expectations(&text);
        let got = read_file(file, &text, &defaults());
        let name = file.file_name().unwrap().to_string_lossy();
        for (i, expects) in expected.iter().enumerate() {
            let document = i + 1;
            let outcomes: Vec<&DocumentSummary> =
                got.iter().filter(|d| d.document == document).collect();
            if expects.is_empty() || expects.len() != outcomes.len() {
                failures.push(format!(
                    "{name} document {document}: {} expectations for {} outcomes: {outcomes:#?}",
                    expects.len(),
                    outcomes.len()
                ));
                continue;
            }
            for (expect, outcome) in expects.iter().zip(outcomes) {
                checked += 1;
                if let Err(why) = check(expect, outcome) {
                    failures.push(format!(
                        "{name} ({}) {}: expected {expect:?}, got {why}",
                        outcome.position(),
                        outcome.object
                    ));
                }
            }
        }
        if got.iter().any(|d| d.document > expected.len()) {
            failures.push(format!("{name}: a document without an expectation"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} documents read differently from Istio:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
