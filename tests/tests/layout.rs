//! The workspace's shape, checked: no module of any crate imports, through others, a module
//! that imports it back (an import cycle hides which code depends on which), and the proxy
//! core depends on nothing of any program. Modules are compared as files and as subtrees
//! (`sources` with everything under it), so a cycle through a child module counts too.
//!
//! The check reads the sources as text: it follows `crate::` and `super::` paths (in `use`
//! items, with one level of braces, and in expressions), ignores comments and the
//! `#[cfg(test)] mod tests` part of a file, and ignores a module's edges to its own ancestors
//! and descendants (a parent declaring a child and the child naming the parent's types is
//! how Rust modules are built, not a cycle).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// Member directories from the root Cargo.toml's `members = [...]`.
fn members(root: &Path) -> Vec<PathBuf> {
    let toml = std::fs::read_to_string(root.join("Cargo.toml")).expect("root Cargo.toml");
    let start = toml.find("members").expect("members");
    let list = &toml[start..];
    let list = &list[list.find('[').unwrap() + 1..list.find(']').unwrap()];
    list.split(',')
        .map(|s| s.trim().trim_matches('"'))
        .filter(|s| !s.is_empty())
        .map(|s| root.join(s))
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            // Binaries are programs of their own, not modules of the library.
            if p.file_name().is_some_and(|n| n == "bin") {
                continue;
            }
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn module_of(src: &Path, file: &Path) -> Option<Module> {
    let rel = file.strip_prefix(src).ok()?.with_extension("");
    let mut parts: Module = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    if parts.last().is_some_and(|p| p == "tests") {
        return None;
    }
    Some(parts)
}

/// The file's text without comments, string literals and its unit-test module.
fn code_of(file: &Path) -> String {
    let text = std::fs::read_to_string(file).expect("a source file");
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_str = false;
        let mut prev = ' ';
        let mut kept = String::new();
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if !in_str && c == '/' && chars.get(i + 1) == Some(&'/') {
                break;
            }
            if c == '"' && prev != '\\' {
                in_str = !in_str;
            } else if !in_str {
                kept.push(c);
            }
            prev = if prev == '\\' && c == '\\' { ' ' } else { c };
            i += 1;
        }
        out.push_str(&kept);
        out.push('\n');
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Every path the code names from `crate::` or `super::`, as (base, segments).
fn paths_named(code: &str) -> Vec<(&'static str, Vec<String>)> {
    let mut out = Vec::new();
    for (base, word) in [("crate", "crate::"), ("super", "super::")] {
        let mut at = 0;
        while let Some(i) = code[at..].find(word) {
            let start = at + i;
            at = start + word.len();
            if start > 0 && code[..start].chars().last().is_some_and(is_ident) {
                continue;
            }
            let rest = &code[at..];
            // `crate::a::b::{c, d::e}` or `crate::a::b`
            let end = rest
                .find(|c: char| !(is_ident(c) || c == ':' || c == '{'))
                .unwrap_or(rest.len());
            let head = &rest[..end];
            if let Some(brace) = head.find('{') {
                let prefix: Vec<String> = split_path(&head[..brace]);
                let close = rest[brace..].find('}').map_or(rest.len(), |j| brace + j);
                for item in rest[brace + 1..close].split(',') {
                    let mut p = prefix.clone();
                    p.extend(split_path(item.trim()));
                    out.push((base, p));
                }
            } else {
                out.push((base, split_path(head)));
            }
        }
    }
    out
}

fn split_path(s: &str) -> Vec<String> {
    s.split("::")
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty() && p != "self" && p.chars().all(is_ident))
        .collect()
}

fn related(a: &Module, b: &Module) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// The module graph of one crate: module -> modules it names.
fn graph(crate_dir: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let src = crate_dir.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeMap<Module, PathBuf> = files
        .iter()
        .filter_map(|f| module_of(&src, f).map(|m| (m, f.clone())))
        .collect();
    let resolve = |path: &[String]| -> Option<Module> {
        (1..=path.len())
            .rev()
            .map(|k| path[..k].to_vec())
            .find(|m| modules.contains_key(m))
    };
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (m, file) in &modules {
        let code = code_of(file);
        let set = edges.entry(m.clone()).or_default();
        for (base, path) in paths_named(&code) {
            let full = if base == "super" {
                let mut p: Module = m[..m.len().saturating_sub(1)].to_vec();
                p.extend(path);
                p
            } else {
                path
            };
            if let Some(t) = resolve(&full) {
                if &t != m && !related(&t, m) {
                    set.insert(t);
                }
            }
        }
    }
    edges
}

/// The graph with every module cut to its first `depth` segments (0: unchanged).
fn collapse(
    edges: &BTreeMap<Module, BTreeSet<Module>>,
    depth: usize,
) -> BTreeMap<Module, BTreeSet<Module>> {
    if depth == 0 {
        return edges.clone();
    }
    let cut = |m: &Module| m[..m.len().min(depth)].to_vec();
    let mut out: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (a, bs) in edges {
        let ca = cut(a);
        out.entry(ca.clone()).or_default();
        for b in bs {
            let cb = cut(b);
            if ca != cb && !related(&ca, &cb) {
                out.entry(ca.clone()).or_default().insert(cb);
            }
        }
    }
    out
}

/// Strongly connected components of more than one module (Tarjan).
fn cycles(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct State<'a> {
        edges: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<Module, usize>,
        low: BTreeMap<Module, usize>,
        stack: Vec<Module>,
        on: BTreeSet<Module>,
        out: Vec<Vec<Module>>,
    }
    fn visit(s: &mut State<'_>, v: &Module) {
        let n = s.index.len();
        s.index.insert(v.clone(), n);
        s.low.insert(v.clone(), n);
        s.stack.push(v.clone());
        s.on.insert(v.clone());
        let next: Vec<Module> = s.edges.get(v).into_iter().flatten().cloned().collect();
        for w in next {
            if !s.index.contains_key(&w) {
                visit(s, &w);
                let lw = s.low[&w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on.contains(&w) {
                let iw = s.index[&w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = s.stack.pop().unwrap();
                s.on.remove(&w);
                let done = &w == v;
                comp.push(w);
                if done {
                    break;
                }
            }
            if comp.len() > 1 {
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    let all: Vec<Module> = edges.keys().cloned().collect();
    for v in &all {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out
}

fn describe(
    crate_dir: &Path,
    comp: &[Module],
    edges: &BTreeMap<Module, BTreeSet<Module>>,
) -> String {
    let name = |m: &Module| m.join("::");
    let inside: BTreeSet<&Module> = comp.iter().collect();
    let arrows: Vec<String> = comp
        .iter()
        .flat_map(|a| {
            edges[a]
                .iter()
                .filter(|b| inside.contains(b))
                .map(move |b| format!("{} -> {}", name(a), name(b)))
        })
        .collect();
    format!(
        "{}: {}",
        crate_dir.file_name().unwrap().to_string_lossy(),
        arrows.join(", ")
    )
}

#[test]
fn no_module_import_cycle_in_any_crate() {
    let root = workspace();
    let mut found = Vec::new();
    let mut modules = 0;
    for dir in members(&root) {
        let edges = graph(&dir);
        modules += edges.len();
        for depth in [0, 1, 2] {
            let g = collapse(&edges, depth);
            for comp in cycles(&g) {
                let d = describe(&dir, &comp, &g);
                if !found.contains(&d) {
                    found.push(d);
                }
            }
        }
    }
    assert!(
        modules > 50,
        "read only {modules} modules: is the workspace where it was?"
    );
    assert!(found.is_empty(), "import cycles:\n{}", found.join("\n"));
}

#[test]
fn the_checker_finds_a_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("sources")).unwrap();
    std::fs::write(
        src.join("lib.rs"),
        "pub mod registration;\npub mod sources;\n",
    )
    .unwrap();
    std::fs::write(
        src.join("registration.rs"),
        "use crate::sources::vm::{Holder, Lease};\n",
    )
    .unwrap();
    std::fs::write(src.join("sources/mod.rs"), "pub mod vm;\n").unwrap();
    std::fs::write(
        src.join("sources/vm.rs"),
        "// crate::nothing in a comment\nfn f() { let _ = crate::registration::metrics(); }\n",
    )
    .unwrap();
    let edges = graph(dir.path());
    let found = cycles(&edges);
    assert_eq!(found.len(), 1, "{edges:?}");
    let mut comp = found[0].clone();
    comp.sort();
    assert_eq!(
        comp,
        vec![
            vec!["registration".to_string()],
            vec!["sources".to_string(), "vm".to_string()]
        ]
    );
}

/// The proxy core is shared by the gateway and the VM agent: it may depend on `proto`
/// and on no program.
#[test]
fn the_proxy_core_depends_on_no_program() {
    let root = workspace();
    let toml = std::fs::read_to_string(root.join("proxy/Cargo.toml")).expect("proxy/Cargo.toml");
    for program in [
        "isthmus-gateway",
        "isthmus-registry",
        "isthmus-dns",
        "isthmus-vm-agent",
    ] {
        assert!(
            !toml.contains(program),
            "the proxy core depends on {program}"
        );
    }
    let agent = std::fs::read_to_string(root.join("vm-agent/Cargo.toml")).unwrap();
    assert!(
        !agent.contains("isthmus-gateway"),
        "the VM agent links the east-west gateway program instead of the proxy core"
    );
}
