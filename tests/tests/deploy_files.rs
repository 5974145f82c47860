//! The files an operator installs: the VM agent's systemd unit and its sysusers.d snippet.
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
