//! The files an operator installs: the VM agent's systemd unit and its sysusers.d snippet,
//! and the Dockerfiles of the program images.
//! These checks pin what the agent relies on (notify protocol, watchdog, cleanup after any
//! exit, one capability, a read-only system but for its state) so that dropping or
//! weakening a directive fails here rather than on a VM.

use std::path::PathBuf;
use std::time::Duration;

use isthmus_proto::config::parse_duration;
use isthmus_vm_agent::config::DEFAULT_DRAIN_DEADLINE;

const AGENT: &str = "/usr/local/bin/isthmus-vm-agent";

fn deploy_file(name: &str) -> (PathBuf, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/systemd")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    (path, text)
}

/// A unit file as systemd reads it: `[Section]` headers, `Key=value` lines, `#`/`;`
/// comments, backslash continuations.
struct Unit {
    entries: Vec<(String, String, String)>,
}

impl Unit {
    fn parse(text: &str) -> Self {
        let mut entries = Vec::new();
        let mut section = String::new();
        let mut pending = String::new();
        for raw in text.lines() {
            let line = raw.trim();
            if pending.is_empty() && (line.is_empty() || line.starts_with(['#', ';'])) {
                continue;
            }
            if let Some(continued) = line.strip_suffix('\\') {
                pending.push_str(continued);
                pending.push(' ');
                continue;
            }
            pending.push_str(line);
            let line = std::mem::take(&mut pending);
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_string();
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not a Key=value line: {line:?}"));
            assert!(!section.is_empty(), "{key} before any [Section]");
            entries.push((
                section.clone(),
                key.trim().to_string(),
                value.trim().to_string(),
            ));
        }
        assert!(pending.is_empty(), "the file ends in a continuation");
        Self { entries }
    }

    fn values(&self, section: &str, key: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(s, k, _)| s == section && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    }

    /// A single-valued setting: the last assignment wins, as in systemd.
    fn get(&self, section: &str, key: &str) -> &str {
        self.values(section, key)
            .pop()
            .unwrap_or_else(|| panic!("[{section}] {key}= is missing"))
    }

    /// A list setting: space-separated items over every assignment, an empty assignment
    /// resetting the list, as in systemd.
    fn list(&self, section: &str, key: &str) -> Vec<String> {
        let mut items = Vec::new();
        for value in self.values(section, key) {
            if value.is_empty() {
                items.clear();
            }
            items.extend(value.split_whitespace().map(str::to_string));
        }
        items
    }

    fn duration(&self, section: &str, key: &str) -> Duration {
        let value = self.get(section, key);
        parse_duration(value).unwrap_or_else(|e| panic!("[{section}] {key}={value}: {e}"))
    }
}

fn agent_unit() -> Unit {
    Unit::parse(&deploy_file("isthmus-vm-agent.service").1)
}

#[test]
fn the_agent_is_a_notify_service_with_a_watchdog_that_always_restarts() {
    let unit = agent_unit();
    let s = "Service";
    assert_eq!(unit.get(s, "Type"), "notify");
    assert_eq!(unit.get(s, "NotifyAccess"), "main");
    assert_eq!(unit.duration(s, "WatchdogSec"), Duration::from_secs(30));
    assert_eq!(unit.get(s, "Restart"), "always");
    assert_eq!(unit.duration(s, "RestartSec"), Duration::from_secs(2));
    // A first start waits for the registry; it needs more than a moment, but not forever.
    let start = unit.duration(s, "TimeoutStartSec");
    assert!(
        start >= Duration::from_secs(30) && start <= Duration::from_secs(300),
        "TimeoutStartSec={start:?}"
    );
    // Never give up restarting.
    assert_eq!(unit.get("Unit", "StartLimitIntervalSec"), "0");
    assert_eq!(unit.get("Install", "WantedBy"), "multi-user.target");
}

#[test]
fn the_agent_runs_from_its_bundle_and_state_and_cleans_up_after_any_exit() {
    let unit = agent_unit();
    assert_eq!(
        unit.get("Service", "ExecStart"),
        format!("{AGENT} run --bundle /etc/isthmus --state-dir /var/lib/isthmus")
    );
    // No `-` prefix: a failing cleanup must show as a failure.
    assert_eq!(
        unit.get("Service", "ExecStopPost"),
        format!("{AGENT} cleanup")
    );
}

#[test]
fn stopping_leaves_time_to_drain() {
    let unit = agent_unit();
    assert_eq!(unit.get("Service", "KillSignal"), "SIGTERM");
    let stop = unit.duration("Service", "TimeoutStopSec");
    assert!(
        stop >= DEFAULT_DRAIN_DEADLINE + Duration::from_secs(5),
        "TimeoutStopSec={stop:?} leaves no margin over the {DEFAULT_DRAIN_DEADLINE:?} drain"
    );
}

#[test]
fn the_agent_runs_as_its_own_user_with_only_net_admin() {
    let unit = agent_unit();
    let s = "Service";
    assert_eq!(unit.get(s, "User"), "isthmus");
    assert_eq!(unit.get(s, "Group"), "isthmus");
    assert_eq!(unit.get(s, "DynamicUser"), "no");
    assert_eq!(unit.list(s, "CapabilityBoundingSet"), ["CAP_NET_ADMIN"]);
    assert_eq!(unit.list(s, "AmbientCapabilities"), ["CAP_NET_ADMIN"]);
    assert_eq!(unit.get(s, "NoNewPrivileges"), "yes");

    // The user exists on an installed system: the sysusers.d snippet creates it.
    let (_, sysusers) = deploy_file("isthmus.conf");
    let user_lines: Vec<Vec<&str>> = sysusers
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| !f.is_empty())
        .collect();
    assert!(
        user_lines
            .iter()
            .any(|f| f.len() >= 2 && f[0] == "u" && f[1] == unit.get(s, "User")),
        "isthmus.conf creates no user {:?}: {user_lines:?}",
        unit.get(s, "User")
    );
}

#[test]
fn the_file_system_is_read_only_but_for_the_state_directory() {
    let unit = agent_unit();
    let s = "Service";
    for (key, value) in [
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("StateDirectory", "isthmus"),
        ("StateDirectoryMode", "0700"),
        ("LimitNOFILE", "65536"),
    ] {
        assert_eq!(unit.get(s, key), value, "{key}=");
    }
    assert_eq!(unit.list(s, "ReadWritePaths"), ["/var/lib/isthmus"]);
    assert!(unit
        .list(s, "ReadOnlyPaths")
        .contains(&"/etc/isthmus".to_string()));

    // What ExecStart= names is where the sandbox lets it read and write.
    let exec = unit.get(s, "ExecStart").to_string();
    let flag = |name: &str| {
        let words: Vec<&str> = exec.split_whitespace().collect();
        let i = words.iter().position(|w| *w == name).unwrap();
        words[i + 1].to_string()
    };
    assert!(unit
        .list(s, "ReadWritePaths")
        .contains(&flag("--state-dir")));
    assert!(unit.list(s, "ReadOnlyPaths").contains(&flag("--bundle")));

    let families = unit.list(s, "RestrictAddressFamilies");
    for needed in ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"] {
        assert!(families.contains(&needed.to_string()), "{needed} missing");
    }
    assert!(!families.iter().any(|f| f.starts_with('~')), "{families:?}");
}

/// systemd's own check of the unit, where systemd is installed: every directive known and
/// well-formed. The binary does not exist here, so it points ExecStart= and ExecStopPost= at
/// `true` (only existence is checked).
#[test]
fn systemd_accepts_the_unit() {
    let Ok(status) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!("systemd-analyze not installed; skipping systemd's own check");
        return;
    };
    assert!(status.status.success());
    let (_, text) = deploy_file("isthmus-vm-agent.service");
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("isthmus-vm-agent.service");
    let truth = ["/usr/bin/true", "/bin/true"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("true(1)");
    std::fs::write(&unit, text.replace(AGENT, truth)).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

/// One Dockerfile per program image (`deploy/docker/<image>.Dockerfile`), read as the
/// instructions Docker runs: no Docker engine is needed to check what each builds, from
/// what, and as whom it runs.
mod dockerfiles {
    use std::path::PathBuf;

    use isthmus_tests::harness::process::PROGRAMS;

    /// The contract's images and the binaries each must hold.
    const IMAGES: &[(&str, &[&str])] = &[
        ("registry", &["isthmus-registry", "isthmusctl"]),
        ("gateway", &["isthmus-gateway"]),
        ("vm-agent", &["isthmus-vm-agent"]),
        ("dns", &["isthmus-dns"]),
    ];

    struct Dockerfile {
        name: String,
        /// Instructions with their continuation lines joined, comments dropped.
        instructions: Vec<(String, String)>,
    }

    impl Dockerfile {
        fn read(image: &str) -> Self {
            let path = docker_dir().join(format!("{image}.Dockerfile"));
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            let mut instructions = Vec::new();
            let mut pending = String::new();
            for raw in text.lines() {
                let line = raw.trim();
                if pending.is_empty() && (line.is_empty() || line.starts_with('#')) {
                    continue;
                }
                if let Some(more) = line.strip_suffix('\\') {
                    pending.push_str(more);
                    pending.push(' ');
                    continue;
                }
                pending.push_str(line);
                let full = std::mem::take(&mut pending);
                let (op, rest) = full.split_once(' ').unwrap_or((&full, ""));
                instructions.push((op.to_uppercase(), rest.trim().to_string()));
            }
            Self {
                name: path.display().to_string(),
                instructions,
            }
        }

        fn all(&self, op: &str) -> Vec<&str> {
            self.instructions
                .iter()
                .filter(|(o, _)| o == op)
                .map(|(_, a)| a.as_str())
                .collect()
        }

        /// The instructions of the last stage (after its FROM).
        fn runtime(&self) -> &[(String, String)] {
            let last = self
                .instructions
                .iter()
                .rposition(|(o, _)| o == "FROM")
                .unwrap_or_else(|| panic!("{}: no FROM", self.name));
            &self.instructions[last..]
        }

        /// The default of `ARG name=default`.
        fn arg_default(&self, name: &str) -> String {
            self.all("ARG")
                .iter()
                .find_map(|a| a.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("{}: no ARG {name}=...", self.name))
                .to_string()
        }
    }

    fn docker_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/docker")
    }

    /// The `--bin` names of the builder's `cargo build`, with its `-p` package.
    fn built(d: &Dockerfile) -> (String, Vec<String>) {
        let run = d
            .all("RUN")
            .into_iter()
            .find(|r| r.contains("cargo build"))
            .unwrap_or_else(|| panic!("{}: no cargo build", d.name));
        // The cargo command alone: `mkdir -p` and the copy follow it.
        let cargo = run.split("&&").find(|c| c.contains("cargo build")).unwrap();
        let words: Vec<&str> = cargo.split_whitespace().collect();
        let after = |flag: &str| -> Vec<String> {
            words
                .windows(2)
                .filter(|w| w[0] == flag)
                .map(|w| w[1].to_string())
                .collect()
        };
        let packages = after("-p");
        assert_eq!(packages.len(), 1, "{}: one package per image", d.name);
        // The VM agent ships its size-optimized profile (see Cargo.toml), the rest `dist`.
        let profile = if packages[0] == "isthmus-vm-agent" {
            "dist-agent"
        } else {
            "dist"
        };
        assert!(
            after("--profile") == [profile] && words.contains(&"--locked"),
            "{}: images ship the {profile} profile, locked: {run}",
            d.name
        );
        assert!(
            run.contains(&format!(" target/{profile}/")),
            "{}: copies what it built",
            d.name
        );
        (packages[0].clone(), after("--bin"))
    }

    #[test]
    fn every_image_has_a_dockerfile_and_nothing_else_is_there() {
        let mut found: Vec<String> = std::fs::read_dir(docker_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter_map(|f| f.strip_suffix(".Dockerfile").map(str::to_string))
            .collect();
        found.sort();
        let mut expected: Vec<String> = IMAGES.iter().map(|(i, _)| i.to_string()).collect();
        expected.sort();
        assert_eq!(found, expected);
    }

    #[test]
    fn each_builds_existing_binaries_in_a_rust_stage_and_copies_only_those() {
        for (image, bins) in IMAGES {
            let d = Dockerfile::read(image);
            assert!(d.all("FROM").len() >= 2, "{}: not multi-stage", d.name);
            assert_eq!(d.all("FROM")[0], "${RUST_IMAGE} AS build", "{}", d.name);
            assert!(
                d.arg_default("RUST_IMAGE").starts_with("rust:"),
                "{}",
                d.name
            );
            let (package, built_bins) = built(&d);
            assert_eq!(&built_bins, bins, "{}", d.name);
            for bin in &built_bins {
                assert!(
                    PROGRAMS.contains(&(package.as_str(), bin.as_str())),
                    "{}: {package}/{bin} is not a program of the workspace",
                    d.name
                );
            }
            let copied: Vec<String> = d
                .runtime()
                .iter()
                .filter(|(o, _)| o == "COPY")
                .map(|(_, a)| {
                    let words: Vec<&str> = a.split_whitespace().collect();
                    assert_eq!(words[0], "--from=build", "{}: {a}", d.name);
                    words[1].trim_start_matches("/out/").to_string()
                })
                .collect();
            assert_eq!(&copied, bins, "{}", d.name);
            let entry = d.runtime().iter().find(|(o, _)| o == "ENTRYPOINT").unwrap();
            assert_eq!(
                entry.1,
                format!("[\"/usr/local/bin/{}\"]", bins[0]),
                "{}",
                d.name
            );
            // The context is the workspace; its build output stays out of it.
            let ignore = docker_dir().join(format!("{image}.Dockerfile.dockerignore"));
            let ignored = std::fs::read_to_string(&ignore)
                .unwrap_or_else(|e| panic!("reading {}: {e}", ignore.display()));
            assert!(ignored.lines().any(|l| l.trim() == "target"), "{ignored}");
        }
    }

    #[test]
    fn each_runs_as_a_non_root_user_on_a_base_named_without_a_registry_host() {
        for (image, _) in IMAGES {
            let d = Dockerfile::read(image);
            let runtime = d.runtime();
            assert_eq!(runtime[0].1, "${RUNTIME_IMAGE}", "{}", d.name);
            let base = d.arg_default("RUNTIME_IMAGE");
            let first = base.split('/').next().unwrap();
            assert!(
                !base.contains('/') || !(first.contains('.') || first.contains(':')),
                "{}: {base} names a registry host; operators set their mirror with --build-arg",
                d.name
            );
            let users: Vec<&str> = runtime
                .iter()
                .filter(|(o, _)| o == "USER")
                .map(|(_, a)| a.as_str())
                .collect();
            let user = users
                .last()
                .unwrap_or_else(|| panic!("{}: no USER", d.name));
            let uid: u32 = user
                .split(':')
                .next()
                .unwrap()
                .parse()
                .unwrap_or_else(|_| panic!("{}: USER {user} is not numeric", d.name));
            // The sidecar's uid is the one the pod's capture rules exempt (1337); the
            // others run as distroless's nonroot user.
            let expected = if *image == "vm-agent" { 1337 } else { 65532 };
            assert_eq!(uid, expected, "{}", d.name);
            if *image == "vm-agent" {
                let installs_nft = runtime
                    .iter()
                    .any(|(o, a)| o == "RUN" && a.contains("install") && a.contains("nftables"));
                assert!(installs_nft, "{}: the agent needs the nft binary", d.name);
            } else {
                assert!(base.starts_with("distroless/"), "{}: {base}", d.name);
            }
        }
    }
}
