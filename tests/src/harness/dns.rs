//! DNS test helpers: a real `unbound` on loopback serving `local-data`, the real `dig`, and
//! a DNS proxy config pointed at a test registry.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use isthmus_dns::config::{Config, RegistrySettings};
use isthmus_proto::tls::ROOT_CERT_FILE;

use super::process::ServerProcess;
use super::registry::{TestRegistry, CLUSTER, NETWORK, TRUST_DOMAIN};

/// Whether a program is on PATH.
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// Whether a test that needs `program` can run. Without it the test is skipped with a
/// message on a developer's machine, and fails loudly in CI (`CI` set), where the package
/// must have been installed.
pub fn require(program: &str, package: &str) -> bool {
    if have(program) {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{program} is not installed but CI is set: install the Debian package {package} (.ci/run lists it)");
    }
    eprintln!("SKIPPED: {program} is not installed (apt-get install {package}); set CI=true to make this a failure");
    false
}

pub use super::process::free_port;

/// A loopback address where nothing answers DNS: queries to it are refused at once.
pub fn dead_upstream() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A real unbound on loopback, authoritative for the zones given as `local-data`; every
/// other name is NXDOMAIN (it never recurses off the machine). Stopped by PID when dropped,
/// also when the test fails.
pub struct Unbound {
    child: ServerProcess,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Unbound {
    /// `zones` are (zone, negative TTL); `records` are `local-data` lines
    /// (`"www.example.test. 300 IN A 192.0.2.1"`).
    pub fn start(zones: &[(&str, u32)], records: &[String]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let mut conf = format!(
            "server:\n  interface: 127.0.0.1@{port}\n  port: {port}\n  do-daemonize: no\n  chroot: \"\"\n  username: \"\"\n  directory: \"{dir}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"{dir}/unbound.log\"\n  verbosity: 0\n  do-ip6: no\n  num-threads: 1\n  access-control: 127.0.0.0/8 allow\n  module-config: \"iterator\"\n  local-zone: \".\" static\n",
            dir = dir.path().display()
        );
        for (zone, negative_ttl) in zones {
            conf.push_str(&format!(
                "  local-zone: \"{zone}.\" static\n  local-data: \"{zone}. 3600 IN SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 {negative_ttl}\"\n"
            ));
        }
        for r in records {
            conf.push_str(&format!("  local-data: '{r}'\n"));
        }
        conf.push_str("remote-control:\n  control-enable: no\n");
        let path = dir.path().join("unbound.conf");
        std::fs::write(&path, conf)?;
        let child = Command::new("unbound")
            .arg("-d")
            .arg("-c")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting unbound")?;
        let mut me = Self {
            child: ServerProcess::new(child),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        };
        me.wait_ready(zones.first().map(|z| z.0).unwrap_or("example.test"))?;
        Ok(me)
    }

    fn wait_ready(&mut self, zone: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(self.dir.path().join("unbound.log"))
                    .unwrap_or_default();
                anyhow::bail!("unbound exited at start ({status}):\n{log}");
            }
            if let Ok(d) = dig_at(self.addr, &[zone, "SOA", "+time=1", "+tries=1"]) {
                if d.status == "NOERROR" {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        anyhow::bail!("unbound on {} did not answer within 10s", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// An A query (class IN, recursion desired) for `name` with `id`, as raw bytes: what a
/// test or a benchmark sends when it reads the answer's header itself.
pub fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// What `dig` printed, in the parts tests look at.
#[derive(Debug, Clone)]
pub struct Dig {
    /// NOERROR, NXDOMAIN, SERVFAIL, ...
    pub status: String,
    /// The header flags: qr, aa, rd, ra, tc.
    pub flags: Vec<String>,
    /// The data of each answer record (`10.0.0.1`), in order.
    pub answers: Vec<String>,
    /// Record types of the answers.
    pub answer_types: Vec<String>,
    /// TTLs of the answers.
    pub ttls: Vec<u32>,
    pub output: String,
}

/// [`dig_at`] from async code (on a blocking thread); a `dig` that cannot run fails the test.
pub async fn dig(addr: SocketAddr, args: &[&str]) -> Dig {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        dig_at(addr, &args)
    })
    .await
    .expect("dig task")
    .expect("dig runs")
}

/// Runs `dig @addr -p port ARGS`.
pub fn dig_at(addr: SocketAddr, args: &[&str]) -> anyhow::Result<Dig> {
    let out = Command::new("dig")
        .arg(format!("@{}", addr.ip()))
        .arg("-p")
        .arg(addr.port().to_string())
        .args(args)
        .output()
        .context("running dig")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .map(str::to_string)
        .with_context(|| format!("no status in dig output:\n{text}"))?;
    let flags = text
        .split(";; flags: ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    let mut answers = Vec::new();
    let mut answer_types = Vec::new();
    let mut ttls = Vec::new();
    let mut in_answer = false;
    for line in text.lines() {
        if line.starts_with(";; ANSWER SECTION") {
            in_answer = true;
            continue;
        }
        if in_answer {
            if line.trim().is_empty() {
                break;
            }
            let parts: Vec<&str> = line.split_whitespace().collect();
            if parts.len() >= 5 {
                ttls.push(parts[1].parse().unwrap_or(0));
                answer_types.push(parts[3].to_string());
                answers.push(parts[4..].join(" "));
            }
        }
    }
    Ok(Dig {
        status,
        flags,
        answers,
        answer_types,
        ttls,
        output: text,
    })
}

/// A DNS proxy config on loopback, port 0, subscribed to `reg` with credentials written to
/// `dir`.
pub async fn proxy_config(reg: &TestRegistry, dir: &Path) -> anyhow::Result<Config> {
    let cert_dir: PathBuf = dir.join("dns-certs");
    reg.credentials_dir("isthmus-system", "isthmus-dns", &cert_dir)
        .await?;
    let mut cfg = Config::new(
        NETWORK,
        CLUSTER,
        RegistrySettings {
            addr: reg.grpc_addr().to_string(),
            root_cert: cert_dir.join(ROOT_CERT_FILE),
            cert_dir,
            trust_domain: TRUST_DOMAIN.into(),
        },
    );
    cfg.listen = "127.0.0.1:0".parse()?;
    cfg.admin_addr = Some("127.0.0.1:0".parse()?);
    cfg.metrics_addr = Some("127.0.0.1:0".parse()?);
    cfg.resolv_conf = dir.join("no-resolv.conf");
    Ok(cfg)
}
