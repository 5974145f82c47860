use std::fs;
use std::path::{Path, PathBuf};

use isthmus_proto::model::*;
use isthmus_proto::TrustDomain;

use super::*;

fn defaults() -> SourceDefaults {
    SourceDefaults {
        cluster: "cluster-a".into(),
        network: "network-a".into(),
        trust_domain: TrustDomain::new("cluster.local").unwrap(),
        domain: "cluster.local".into(),
    }
}

// ---- the source ----------------------------------------------------------------------------

fn workload_entry(name: &str, address: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{address: {address}}}\n"
    )
}

fn write(dir: &Path, rel: &str, text: &str) {
    let path = dir.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

/// `origin -> key` pairs of the effective set, for compact assertions.
fn contents(source: &StaticSource) -> Vec<(String, String)> {
    source
        .resources()
        .into_iter()
        .map(|r| (r.origin, r.resource.key()))
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn address_of(source: &StaticSource, name: &str) -> String {
    source
        .resources()
        .into_iter()
        .find_map(|r| match std::sync::Arc::unwrap_or_clone(r.resource) {
            Resource::Workload(w) if w.name == name => Some(w.address.to_string()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no workload {name}"))
}

fn source(dir: &Path) -> StaticSource {
    StaticSource::new(dir.to_path_buf(), defaults())
}

#[test]
fn scan_follows_added_modified_and_deleted_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(dir, "a.yaml", &workload_entry("a", "10.0.0.1"));
    let mut src = source(dir);
    assert_eq!(src.dir(), dir);

    let first = src.scan();
    assert!(first.changed && first.errors.is_empty(), "{first:?}");
    assert_eq!(
        contents(&src),
        pairs(&[("static:a.yaml", "Workload/cluster-a/shop/a")])
    );

    write(dir, "sub/b.yml", &workload_entry("b", "10.0.0.2"));
    assert!(src.scan().changed);
    assert_eq!(
        contents(&src),
        pairs(&[
            ("static:a.yaml", "Workload/cluster-a/shop/a"),
            ("static:sub/b.yml", "Workload/cluster-a/shop/b")
        ])
    );

    // Same size, same name: only the content differs.
    write(dir, "a.yaml", &workload_entry("a", "10.0.0.9"));
    assert!(src.scan().changed);
    assert_eq!(address_of(&src, "a"), "10.0.0.9");

    fs::remove_file(dir.join("a.yaml")).unwrap();
    assert!(src.scan().changed);
    assert_eq!(
        contents(&src),
        pairs(&[("static:sub/b.yml", "Workload/cluster-a/shop/b")])
    );
}

#[test]
fn an_unchanged_directory_reports_no_change() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "a.yaml", &workload_entry("a", "10.0.0.1"));
    write(tmp.path(), "broken.yaml", "kind: [");
    let mut src = source(tmp.path());
    assert!(src.scan().changed);
    let again = src.scan();
    assert!(!again.changed);
    // A broken file stays reported on every scan, not only the one that found it.
    assert_eq!(again.errors.len(), 1, "{again:?}");
    assert_eq!(src.errors(), again.errors.as_slice());
    // Rewriting identical bytes is not a change either.
    write(tmp.path(), "a.yaml", &workload_entry("a", "10.0.0.1"));
    assert!(!src.scan().changed);
}

#[test]
fn an_empty_directory_scans_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let mut src = source(tmp.path());
    let result = src.scan();
    assert!(!result.changed && result.errors.is_empty(), "{result:?}");
    assert!(src.resources().is_empty());
}

#[test]
fn a_broken_edit_keeps_the_last_good_resources_until_fixed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(dir, "a.yaml", &workload_entry("a", "10.0.0.1"));
    let mut src = source(dir);
    src.scan();

    write(dir, "a.yaml", &workload_entry("a", "10.0.0.300"));
    let broken = src.scan();
    assert!(!broken.changed, "a broken file must not change the catalog");
    assert_eq!(address_of(&src, "a"), "10.0.0.1");
    assert_eq!(broken.errors.len(), 1, "{broken:?}");
    let shown = broken.errors[0].to_string();
    assert!(
        shown.starts_with(&format!(
            "{} (document 1): spec.address: ",
            dir.join("a.yaml").display()
        )),
        "{shown}"
    );
    assert!(shown.contains("10.0.0.300"), "{shown}");

    write(dir, "a.yaml", &workload_entry("a", "10.0.0.3"));
    let fixed = src.scan();
    assert!(fixed.changed && fixed.errors.is_empty(), "{fixed:?}");
    assert!(src.errors().is_empty());
    assert_eq!(address_of(&src, "a"), "10.0.0.3");
}

#[test]
fn an_emptied_file_keeps_its_resources_until_it_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(dir, "a.yaml", &workload_entry("a", "10.0.0.1"));
    let mut src = source(dir);
    src.scan();

    // A torn write: the file is there, but empty.
    write(dir, "a.yaml", "");
    let torn = src.scan();
    assert!(
        !torn.changed,
        "an emptied file must not delete its resources"
    );
    assert_eq!(address_of(&src, "a"), "10.0.0.1");
    assert_eq!(torn.errors.len(), 1, "{torn:?}");
    let shown = torn.errors[0].to_string();
    assert!(
        shown.contains("is empty") && shown.contains("remove the file"),
        "{shown}"
    );

    // Content back: loaded again; then removing the file deletes deliberately.
    write(dir, "a.yaml", &workload_entry("a", "10.0.0.2"));
    assert!(src.scan().errors.is_empty());
    assert_eq!(address_of(&src, "a"), "10.0.0.2");
    std::fs::remove_file(dir.join("a.yaml")).unwrap();
    assert!(src.scan().changed);
    assert!(src.resources().is_empty());

    // A new file that is empty from the start is harmless: nothing, and no error.
    write(dir, "b.yaml", "\n");
    let r = src.scan();
    assert!(r.errors.is_empty(), "{r:?}");
}

#[test]
fn deeply_nested_yaml_is_refused_before_parsing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(dir, "a.yaml", &workload_entry("a", "10.0.0.1"));
    let mut src = source(dir);
    src.scan();
    let bomb = format!("a: {}{}", "[".repeat(100_000), "]".repeat(100_000));
    write(dir, "a.yaml", &bomb);
    let r = src.scan();
    assert_eq!(r.errors.len(), 1, "{r:?}");
    let shown = r.errors[0].to_string();
    assert!(
        shown.contains("100000 levels deep") && shown.contains("refused before parsing"),
        "{shown}"
    );
    assert_eq!(
        address_of(&src, "a"),
        "10.0.0.1",
        "the last good state stays"
    );
}

#[test]
fn a_file_broken_from_the_start_contributes_only_its_valid_documents() {
    let tmp = tempfile::tempdir().unwrap();
    write(
        tmp.path(),
        "a.yaml",
        &format!(
            "{}---\nnot: [valid\n---\n{}",
            workload_entry("a", "10.0.0.1"),
            workload_entry("b", "10.0.0.2")
        ),
    );
    let mut src = source(tmp.path());
    let result = src.scan();
    assert_eq!(address_of(&src, "a"), "10.0.0.1");
    assert_eq!(
        address_of(&src, "b"),
        "10.0.0.2",
        "a syntax error costs only its document"
    );
    assert_eq!(src.resources().len(), 2);
    assert_eq!(result.errors.len(), 1);
    assert_eq!(result.errors[0].document, Some(2));
}

#[test]
fn the_same_key_from_two_files_is_an_error_naming_both_and_the_first_keeps_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(dir, "z-first.yaml", &workload_entry("web", "10.0.0.1"));
    let mut src = source(dir);
    src.scan();

    // Sorts before the first file, so only ownership (not path order) can keep the first.
    write(
        dir,
        "a-second.yaml",
        &format!(
            "{}---\n{}",
            workload_entry("other", "10.0.0.5"),
            workload_entry("web", "10.0.0.2")
        ),
    );
    let result = src.scan();
    assert_eq!(result.errors.len(), 1, "{result:?}");
    let shown = result.errors[0].to_string();
    let first = dir.join("z-first.yaml");
    let second = dir.join("a-second.yaml");
    assert!(
        shown.starts_with(&format!(
            "{} (document 2): metadata.name: Workload/cluster-a/shop/web",
            second.display()
        )),
        "{shown}"
    );
    assert!(shown.contains(&first.display().to_string()), "{shown}");
    assert_eq!(address_of(&src, "web"), "10.0.0.1");
    // The rest of the second file is served.
    assert_eq!(address_of(&src, "other"), "10.0.0.5");

    // When the first file lets go, the second file's definition takes over.
    fs::remove_file(&first).unwrap();
    let result = src.scan();
    assert!(result.changed && result.errors.is_empty(), "{result:?}");
    assert_eq!(address_of(&src, "web"), "10.0.0.2");
    assert_eq!(
        contents(&src),
        pairs(&[
            ("static:a-second.yaml", "Workload/cluster-a/shop/other"),
            ("static:a-second.yaml", "Workload/cluster-a/shop/web")
        ])
    );
}

#[test]
fn seed_serves_store_resources_for_a_file_invalid_at_first_scan() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(dir, "broken.yaml", &workload_entry("a", "not an address"));
    write(dir, "fine.yaml", &workload_entry("b", "10.0.0.2"));
    let stored = |origin: &str, name: &str, address: &str| OwnedResource {
        origin: origin.into(),
        resource: std::sync::Arc::new(Resource::Workload(Workload {
            name: name.into(),
            namespace: "shop".into(),
            cluster: "cluster-a".into(),
            address: Address::parse(address).unwrap(),
            ..Workload::default()
        })),
    };
    let mut src = source(dir);
    src.seed(vec![
        stored("static:broken.yaml", "a", "10.0.0.1"),
        // Superseded: the file is valid, so what it says now wins.
        stored("static:fine.yaml", "b", "10.9.9.9"),
        // The file is gone: its resources go with it.
        stored("static:deleted.yaml", "c", "10.0.0.3"),
        // Another source's resource is not ours to serve.
        stored("kube:cluster-b", "d", "10.0.0.4"),
    ]);
    let result = src.scan();
    assert!(result.changed);
    assert_eq!(result.errors.len(), 1, "{result:?}");
    assert_eq!(
        contents(&src),
        pairs(&[
            ("static:broken.yaml", "Workload/cluster-a/shop/a"),
            ("static:fine.yaml", "Workload/cluster-a/shop/b")
        ])
    );
    assert_eq!(address_of(&src, "a"), "10.0.0.1");
    assert_eq!(address_of(&src, "b"), "10.0.0.2");

    // Once fixed, the file's own content replaces the seed.
    write(dir, "broken.yaml", &workload_entry("a", "10.0.0.7"));
    assert!(src.scan().changed);
    assert_eq!(address_of(&src, "a"), "10.0.0.7");
}

#[test]
fn hidden_and_foreign_files_are_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(dir, "a.yaml", &workload_entry("a", "10.0.0.1"));
    write(dir, ".hidden.yaml", &workload_entry("h", "10.0.0.2"));
    write(dir, ".git/config.yaml", &workload_entry("g", "10.0.0.3"));
    write(dir, "README.md", "not yaml");
    write(dir, "a.yaml.bak", "not: [yaml");
    write(dir, "deep/er/c.yml", &workload_entry("c", "10.0.0.4"));
    let mut src = source(dir);
    let result = src.scan();
    assert!(result.errors.is_empty(), "{result:?}");
    assert_eq!(
        contents(&src),
        pairs(&[
            ("static:a.yaml", "Workload/cluster-a/shop/a"),
            ("static:deep/er/c.yml", "Workload/cluster-a/shop/c")
        ])
    );
}

#[cfg(unix)]
#[test]
fn a_configmap_style_symlink_swap_is_seen_once() {
    use std::os::unix::fs::symlink;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // What the kubelet does: files in a timestamped hidden directory, `..data` pointing at it,
    // and a visible symlink per key through `..data`.
    write(
        dir,
        "..2024_01_01/web.yaml",
        &workload_entry("web", "10.0.0.1"),
    );
    symlink("..2024_01_01", dir.join("..data")).unwrap();
    symlink("..data/web.yaml", dir.join("web.yaml")).unwrap();
    let mut src = source(dir);
    let result = src.scan();
    assert!(result.errors.is_empty(), "{result:?}");
    assert_eq!(
        contents(&src),
        pairs(&[("static:web.yaml", "Workload/cluster-a/shop/web")])
    );

    // The update: a new directory, then an atomic rename of a new `..data` link over the old.
    write(
        dir,
        "..2024_01_02/web.yaml",
        &workload_entry("web", "10.0.0.2"),
    );
    symlink("..2024_01_02", dir.join("..data_tmp")).unwrap();
    fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    fs::remove_dir_all(dir.join("..2024_01_01")).unwrap();
    assert!(src.scan().changed);
    assert_eq!(address_of(&src, "web"), "10.0.0.2");
}

#[cfg(unix)]
#[test]
fn a_vanished_directory_keeps_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("catalog");
    write(&dir, "a.yaml", &workload_entry("a", "10.0.0.1"));
    let mut src = source(&dir);
    src.scan();
    fs::remove_dir_all(&dir).unwrap();
    let result = src.scan();
    assert!(!result.changed);
    assert_eq!(result.errors.len(), 1);
    assert!(
        result.errors[0]
            .message
            .contains("cannot read the directory"),
        "{result:?}"
    );
    assert_eq!(
        contents(&src),
        pairs(&[("static:a.yaml", "Workload/cluster-a/shop/a")])
    );
}

#[cfg(unix)]
#[test]
fn a_dangling_symlink_is_reported_and_keeps_its_resources() {
    use std::os::unix::fs::symlink;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(dir, "real/a.yaml", &workload_entry("a", "10.0.0.1"));
    symlink("real-a.yaml", dir.join("a.yaml")).unwrap();
    fs::rename(dir.join("real/a.yaml"), dir.join("real-a.yaml")).unwrap();
    let mut src = source(dir);
    src.scan();
    assert_eq!(
        contents(&src),
        pairs(&[("static:a.yaml", "Workload/cluster-a/shop/a")])
    );
    fs::remove_file(dir.join("real-a.yaml")).unwrap();
    let result = src.scan();
    assert!(!result.changed);
    assert_eq!(result.errors.len(), 1, "{result:?}");
    assert!(
        result.errors[0].message.contains("cannot read the file"),
        "{result:?}"
    );
    assert_eq!(
        contents(&src),
        pairs(&[("static:a.yaml", "Workload/cluster-a/shop/a")])
    );
}

#[test]
fn oversized_and_non_utf8_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fs::write(dir.join("latin1.yaml"), b"metadata: {name: caf\xe9}\n").unwrap();
    let big = vec![b'#'; MAX_FILE_BYTES as usize + 1];
    fs::write(dir.join("big.yaml"), big).unwrap();
    let mut src = source(dir);
    let result = src.scan();
    let shown: Vec<String> = result.errors.iter().map(ToString::to_string).collect();
    assert_eq!(shown.len(), 2, "{shown:#?}");
    assert!(shown[0].contains("big.yaml: is larger than"), "{shown:#?}");
    assert!(shown[1].contains("latin1.yaml: is not UTF-8"), "{shown:#?}");
}

// ---- the sample catalog --------------------------------------------------------------------

#[test]
fn deploy_examples_parse_without_errors() {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples"));
    let mut src = source(&dir);
    let result = src.scan();
    assert!(
        result.errors.is_empty(),
        "{}",
        result
            .errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let resources: Vec<Resource> = src
        .resources()
        .into_iter()
        .map(|r| std::sync::Arc::unwrap_or_clone(r.resource))
        .collect();
    let count = |kind: &str| resources.iter().filter(|r| r.kind() == kind).count();
    assert_eq!(count("Network"), 2);
    assert_eq!(count("Service"), 4);
    assert_eq!(count("Workload"), 13);
    assert_eq!(count("WorkloadGroup"), 1);

    let services: Vec<&Service> = resources
        .iter()
        .filter_map(|r| match r {
            Resource::Service(s) => Some(s),
            _ => None,
        })
        .collect();
    let workloads: Vec<&Workload> = resources
        .iter()
        .filter_map(|r| match r {
            Resource::Workload(w) => Some(w),
            _ => None,
        })
        .collect();
    let endpoints = |host: &str, network: &str| {
        let svc = services.iter().find(|s| s.hostname == host).unwrap();
        workloads
            .iter()
            .filter(|w| w.serves(svc) && w.network == network)
            .count()
    };
    assert_eq!(endpoints("reviews.shop.svc.cluster.local", "network-a"), 3);
    assert_eq!(endpoints("reviews.shop.svc.cluster.local", "network-b"), 6);
    assert_eq!(endpoints("ratings.shop.svc.cluster.local", "network-a"), 0);
    assert!(endpoints("ratings.shop.svc.cluster.local", "network-b") > 0);
    let networks: BTreeMap<&str, usize> = resources
        .iter()
        .filter_map(|r| match r {
            Resource::Network(n) => Some((n.id.as_str(), n.gateways.len())),
            _ => None,
        })
        .collect();
    assert_eq!(networks, [("network-a", 1), ("network-b", 2)].into());
}

#[test]
fn a_refused_document_keeps_what_it_defined_before_and_the_others_apply() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut src = source(dir);
    write(
        dir,
        "a.yaml",
        &format!(
            "{}---\n{}",
            workload_entry("a", "10.0.0.1"),
            workload_entry("b", "10.0.0.2")
        ),
    );
    assert!(src.scan().errors.is_empty());
    // Document 1 is broken by an edit while document 2 changes: the edit of document 2
    // applies, and document 1's workload stays as it was.
    write(
        dir,
        "a.yaml",
        &format!(
            "{}---\n{}",
            workload_entry("a", "10.0.0.300"),
            workload_entry("b", "10.0.0.22")
        ),
    );
    let r = src.scan();
    assert!(r.changed);
    assert_eq!(r.errors.len(), 1, "{r:?}");
    assert_eq!(r.errors[0].document, Some(1));
    assert_eq!(address_of(&src, "a"), "10.0.0.1");
    assert_eq!(address_of(&src, "b"), "10.0.0.22");
    // Fixed: the file is read as written, and what it no longer defines goes.
    write(dir, "a.yaml", &workload_entry("b", "10.0.0.23"));
    assert!(src.scan().errors.is_empty());
    assert_eq!(address_of(&src, "b"), "10.0.0.23");
    assert_eq!(src.resources().len(), 1);
}

#[test]
fn kinds_isthmus_does_not_read_are_reported_as_ignored_not_as_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut src = source(dir);
    write(
        dir,
        "app.yaml",
        &format!(
            "{}---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: web, namespace: shop}}\nspec: {{selector: {{istio: ingressgateway}}}}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec: {{}}\n",
            workload_entry("a", "10.0.0.1")
        ),
    );
    let r = src.scan();
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(address_of(&src, "a"), "10.0.0.1");
    let ignored: Vec<String> = r.ignored.iter().map(ToString::to_string).collect();
    assert_eq!(ignored.len(), 2, "{ignored:#?}");
    assert!(
        ignored[0].contains("app.yaml (document 2): Gateway shop/web: ignored: Gateway (networking.istio.io/v1) is not a kind isthmus reads"),
        "{ignored:#?}"
    );
    assert!(
        ignored[1].contains("(document 3): Deployment web: ignored"),
        "{ignored:#?}"
    );
}

#[test]
fn a_document_that_loses_a_key_to_another_file_keeps_nothing_else_either() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let entry = |addresses: &[&str]| {
        let endpoints: Vec<String> = addresses
            .iter()
            .map(|a| format!("  - address: {a}\n"))
            .collect();
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: db, namespace: shop}}\nspec:\n  hosts: [db.example.internal]\n  ports: [{{number: 5432, name: tcp, protocol: TCP}}]\n  resolution: STATIC\n  endpoints:\n{}",
            endpoints.concat()
        )
    };
    write(dir, "a.yaml", &entry(&["10.0.0.1"]));
    let mut src = source(dir);
    assert!(src.scan().errors.is_empty());
    // The same entry in another file, with a second endpoint: its service is a duplicate,
    // and its extra endpoint (a key no one else defines) must not be stored on its own.
    write(dir, "b.yaml", &entry(&["10.0.0.1", "10.0.0.2"]));
    let r = src.scan();
    assert_eq!(r.errors.len(), 2, "{r:?}");
    assert!(
        r.errors[0]
            .message
            .contains("nothing else of this document is taken"),
        "{r:?}"
    );
    assert_eq!(address_of(&src, "db-0"), "10.0.0.1");
    assert!(
        !src.resources()
            .iter()
            .any(|r| r.resource.key() == "Workload/cluster-a/shop/db-1"),
        "{:#?}",
        src.resources()
    );
}

#[test]
fn a_workload_on_a_network_nothing_defines_is_warned_about() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(
        dir,
        "net.yaml",
        "apiVersion: isthmus.io/v1alpha1\nkind: Network\nmetadata: {name: network-b}\nspec:\n  gateways: [{address: 192.0.2.10}]\n",
    );
    write(
        dir,
        "vms.yaml",
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: ok, namespace: shop}\nspec: {address: 10.0.0.1, network: network-b}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: typo, namespace: shop}\nspec: {address: 10.0.0.2, network: netwrk-b}\n",
    );
    let mut src = source(dir);
    let r = src.scan();
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(r.warnings.len(), 1, "{r:?}");
    let shown = r.warnings[0].to_string();
    assert!(
        shown.contains("vms.yaml (document 2)")
            && shown.contains("\"netwrk-b\"")
            && shown.contains("known: network-a, network-b"),
        "{shown}"
    );
    // Both still load: the entry is valid on its own.
    assert_eq!(address_of(&src, "typo"), "10.0.0.2");
}
