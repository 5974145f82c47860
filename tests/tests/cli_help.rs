//! Every flag of every program and subcommand says what it is for in `--help`: an operator
//! reads `--help`, not the source. The check runs each binary's `--help` (and each
//! subcommand's, recursively) and requires a description beside or under every option, not
//! counting clap's `[env: …]`, `[default: …]` and `[possible values: …]` notes.

use isthmus_tests::harness::process::{workspace_binary, PROGRAMS};

fn help(bin: &std::path::Path, args: &[String]) -> String {
    let out = std::process::Command::new(bin)
        .args(args)
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(
        out.status.success(),
        "{} {} --help failed: {}",
        bin.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 help")
}

/// The subcommands listed under `Commands:`, less `help`.
fn subcommands(text: &str) -> Vec<String> {
    text.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(String::from)
        .collect()
}

fn is_option_line(l: &str) -> bool {
    let indent = l.len() - l.trim_start().len();
    (2..=6).contains(&indent) && l.trim_start().starts_with('-')
}

/// Removes clap's bracketed notes (`[default: 5s]`, `[env: X=]`, …).
fn without_notes(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find('[') {
        let note = &rest[start + 1..];
        let is_note = ["env:", "default:", "possible values:", "aliases:"]
            .iter()
            .any(|p| note.starts_with(p));
        match (is_note, note.find(']')) {
            (true, Some(end)) => {
                out.push_str(&rest[..start]);
                rest = &note[end + 1..];
            }
            _ => {
                out.push_str(&rest[..=start]);
                rest = note;
            }
        }
    }
    out.push_str(rest);
    out.trim().to_string()
}

/// The options of one help text that have no description.
fn undescribed(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let starts: Vec<usize> = (0..lines.len())
        .filter(|&i| is_option_line(lines[i]))
        .collect();
    let mut missing = Vec::new();
    for (k, &i) in starts.iter().enumerate() {
        let end = starts.get(k + 1).copied().unwrap_or(lines.len());
        let line = lines[i].trim_start();
        // Same-line form: `--flag <X>  Description`.
        let (flag, same) = match line.find("  ") {
            Some(p) => (&line[..p], &line[p..]),
            None => (line, ""),
        };
        let below: Vec<&str> = lines[i + 1..end]
            .iter()
            .take_while(|l| l.starts_with("          "))
            .map(|l| l.trim())
            .collect();
        let description = without_notes(&format!("{same} {}", below.join(" ")));
        if description.is_empty() {
            missing.push(flag.trim().to_string());
        }
    }
    missing
}

fn walk(bin: &std::path::Path, args: Vec<String>, missing: &mut Vec<String>) {
    let text = help(bin, &args);
    let name = bin.file_name().unwrap().to_string_lossy();
    for flag in undescribed(&text) {
        missing.push(format!("{name} {} {flag}", args.join(" ")));
    }
    for sub in subcommands(&text) {
        let mut next = args.clone();
        next.push(sub);
        walk(bin, next, missing);
    }
}

#[test]
fn every_flag_has_a_description() {
    let mut missing = Vec::new();
    for (package, bin) in PROGRAMS {
        walk(&workspace_binary(package, bin), Vec::new(), &mut missing);
    }
    assert!(
        missing.is_empty(),
        "flags without a description:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_check_finds_a_flag_without_a_description() {
    let text = "Options:\n      --network <NETWORK>\n          This proxy's network\n      \
                --cluster <CLUSTER>\n          [env: ISTHMUS_CLUSTER=] [default: \"\"]\n  \
                -q, --quiet  Say less\n      --bare <X>\n  -h, --help\n          Print help\n";
    assert_eq!(undescribed(text), vec!["--cluster <CLUSTER>", "--bare <X>"]);
}
