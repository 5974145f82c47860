//! The agent's configuration: one typed struct, every default a named constant, every bad
//! value reported at once with its flag's name.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use isthmus_proto::config::ConfigProblems;
use isthmus_proto::model::Locality;
use isthmus_proxy::outbound::OutboundTarget;
use serde::Serialize;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/isthmus";
pub const DEFAULT_BUNDLE_DIR: &str = "/etc/isthmus";
/// Inbound mTLS: every address, since peers and gateways connect from the network.
pub const DEFAULT_INBOUND_ADDR: &str = "0.0.0.0:15006";
/// Outbound capture: loopback, where nftables' REDIRECT of locally made connections lands.
pub const DEFAULT_OUTBOUND_ADDR: &str = "127.0.0.1:15001";
pub const DEFAULT_DNS_ADDR: &str = "127.0.0.1:15053";
/// Admin (`/config_dump`, `/logging`, `/debug/*`) on loopback: all but `/metrics` and
/// health answer loopback peers only, whatever the address.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
/// `/metrics` for scrapers on the network (Istio's merged-metrics port).
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15020";
pub const DEFAULT_HEALTH_ADDR: &str = "0.0.0.0:15021";
/// Ports never captured in either direction unless the operator says otherwise: SSH, so a
/// mistake in the mesh never locks the operator out of the VM.
pub const DEFAULT_EXCLUDED_PORTS: &[u16] = &[22];
/// Where the app listens, as the agent's inbound reaches it.
pub const DEFAULT_APP_HOST: Ipv4Addr = Ipv4Addr::LOCALHOST;
pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";
/// Below systemd's stop timeout in the shipped unit (30 s), with room for deregistration.
pub const DEFAULT_DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// The proxy core's own defaults: the agent runs the same data path as the gateway.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = isthmus_proxy::upstream::DEFAULT_CONNECT_TIMEOUT;
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = isthmus_proxy::inbound::DEFAULT_HANDSHAKE_TIMEOUT;
pub const DEFAULT_MAX_CONNECTIONS: usize = isthmus_proxy::inbound::DEFAULT_MAX_CONNECTIONS;
/// A VM agent carries one VM's traffic: one worker, which runs the current-thread scheduler
/// (`program::runtime`), costs the least CPU per connection and the least memory. A VM
/// whose mesh traffic needs more than a core raises it (`--worker-threads`); see
/// ARCHITECTURE.md for what each costs.
pub const DEFAULT_WORKER_THREADS: usize = 1;
/// The mark on the agent's own sockets, which the capture rules let pass.
pub use crate::capture::DEFAULT_MARK;

/// What [`AgentConfig::validate`]'s problems are about.
pub const CONFIG_SOURCE: &str = "the agent's configuration";

/// The files the agent keeps in its state directory.
pub const CERT_SUBDIR: &str = "certs";
pub const SNAPSHOT_FILE: &str = "catalog.snapshot";
pub const GROUP_FILE: &str = "workload-group.pb";

/// How the VM's traffic reaches the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    /// nftables REDIRECT of outbound TCP to mesh addresses, inbound TCP to the app's ports,
    /// and DNS to the resolvers of resolv.conf.
    Nftables,
    /// No rules: the app talks to explicit listeners (`--outbound-listener`), and the
    /// inbound listens on the VM's address at each app port (the app on loopback only).
    None,
    /// The rules were installed before the agent started, by `capture-init` in a pod's init
    /// container (which has `NET_ADMIN`; the sidecar has not): the agent listens where they
    /// point and never changes them.
    Preinstalled,
}

impl CaptureMode {
    /// Whether nftables rules send traffic to the agent's listeners.
    pub fn captures(self) -> bool {
        matches!(self, Self::Nftables | Self::Preinstalled)
    }
}

/// One explicit outbound listener: plaintext from the app on `listen`, mTLS to `target`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutboundListener {
    pub listen: SocketAddr,
    pub hostname: String,
    pub port: u16,
}

impl OutboundListener {
    /// `LISTEN=HOST:PORT`, e.g. `127.0.0.1:9080=reviews.shop.svc.cluster.local:9080`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (listen, target) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not LISTEN=HOST:PORT"))?;
        let listen: SocketAddr = listen
            .parse()
            .map_err(|_| format!("{listen:?} is not an IP:PORT to listen on"))?;
        let (hostname, port) = target
            .rsplit_once(':')
            .ok_or_else(|| format!("{target:?} is not HOST:PORT"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{port:?} is not a port (1-65535)"))?;
        if hostname.is_empty() {
            return Err(format!("{target:?} names no service host"));
        }
        Ok(Self {
            listen,
            hostname: hostname.to_string(),
            port,
        })
    }

    pub fn target(&self) -> OutboundTarget {
        OutboundTarget {
            hostname: self.hostname.clone(),
            port: self.port,
            subset: String::new(),
            sni: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentConfig {
    /// The onboarding bundle: agent.yaml, root-cert.pem, token.
    pub bundle_dir: PathBuf,
    /// Key, certificates, the last catalog snapshot and the group template.
    pub state_dir: PathBuf,
    /// The VM's address as other workloads reach it; `None`: the source address of the
    /// route towards the registry.
    pub address: Option<IpAddr>,
    pub capture: CaptureMode,
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub dns_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub health_addr: Option<SocketAddr>,
    /// `/metrics` alone, for scrapers on the network.
    pub metrics_addr: Option<SocketAddr>,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub outbound_listeners: Vec<OutboundListener>,
    pub app_host: IpAddr,
    /// Who may call the app (allow/deny by principal and namespace); `None`: every
    /// identity of the trust domain.
    pub authz_policy: Option<PathBuf>,
    /// Added to the group template's labels.
    pub labels: BTreeMap<String, String>,
    #[serde(serialize_with = "serialize_locality")]
    pub locality: Locality,
    pub resolv_conf: PathBuf,
    /// The mark on the agent's own sockets, which capture leaves alone.
    pub mark: u32,
    pub drain_deadline: Duration,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub max_connections: usize,
    /// The port of the tunnel listener (HBONE), on the VM's address; 0: no tunnels, in
    /// either direction.
    pub tunnel_port: u16,
    /// Which transports the tunnels take: QUIC raced against HTTP/2 (the default), or one
    /// alone; with HTTP/2 alone no QUIC listener is started.
    pub tunnel_transports: isthmus_proxy::tunnel::pool::Transports,
    /// Sidecar mode: the pod the agent serves (`None` on a VM).
    pub pod: Option<crate::pod::PodConfig>,
}

fn serialize_locality<S: serde::Serializer>(l: &Locality, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&l.to_string())
}

impl AgentConfig {
    pub fn new(bundle_dir: impl Into<PathBuf>, state_dir: impl Into<PathBuf>) -> Self {
        let addr = |s: &str| s.parse().expect("literal address");
        Self {
            bundle_dir: bundle_dir.into(),
            state_dir: state_dir.into(),
            address: None,
            capture: CaptureMode::Nftables,
            inbound_addr: addr(DEFAULT_INBOUND_ADDR),
            outbound_addr: addr(DEFAULT_OUTBOUND_ADDR),
            dns_addr: addr(DEFAULT_DNS_ADDR),
            admin_addr: Some(addr(DEFAULT_ADMIN_ADDR)),
            health_addr: Some(addr(DEFAULT_HEALTH_ADDR)),
            metrics_addr: Some(addr(DEFAULT_METRICS_ADDR)),
            exclude_inbound_ports: DEFAULT_EXCLUDED_PORTS.to_vec(),
            exclude_outbound_ports: DEFAULT_EXCLUDED_PORTS.to_vec(),
            outbound_listeners: Vec::new(),
            app_host: IpAddr::V4(DEFAULT_APP_HOST),
            authz_policy: None,
            labels: BTreeMap::new(),
            locality: Locality::default(),
            resolv_conf: DEFAULT_RESOLV_CONF.into(),
            mark: DEFAULT_MARK,
            drain_deadline: DEFAULT_DRAIN_DEADLINE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            tunnel_port: isthmus_proxy::tunnel::DEFAULT_PORT,
            tunnel_transports: Default::default(),
            pod: None,
        }
    }

    pub fn cert_dir(&self) -> PathBuf {
        self.state_dir.join(CERT_SUBDIR)
    }

    pub fn snapshot_path(&self) -> PathBuf {
        self.state_dir.join(SNAPSHOT_FILE)
    }

    pub fn group_path(&self) -> PathBuf {
        self.state_dir.join(GROUP_FILE)
    }

    /// Every problem at once, each naming its flag.
    pub fn validate(&self) -> Result<(), ConfigProblems> {
        let mut p = ConfigProblems::new(CONFIG_SOURCE);
        if let Some(ip) = self.address {
            p.check(
                !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast()),
                "--address",
                || format!("{ip} cannot be the VM's address; give the address other workloads reach the VM at"),
            );
        }
        let ports = self.check_listeners(&mut p);
        for l in &self.outbound_listeners {
            p.check(
                !ports.contains_key(&l.listen),
                "--outbound-listener",
                || format!("{} is already used by another listener", l.listen),
            );
        }
        for (flag, d) in [
            ("--drain-deadline", self.drain_deadline),
            ("--connect-timeout", self.connect_timeout),
            ("--handshake-timeout", self.handshake_timeout),
        ] {
            p.check(!d.is_zero(), flag, || "must be more than 0".into());
        }
        p.check(self.max_connections != 0, "--max-connections", || {
            "must be at least 1".into()
        });
        for key in self.labels.keys() {
            p.check(!key.is_empty(), "--label", || {
                "a label needs a key (KEY=VALUE)".into()
            });
        }
        match &self.pod {
            Some(pod) => pod.check(&mut p),
            None => p.check(
                self.capture != CaptureMode::Preinstalled,
                "--capture",
                || {
                    "preinstalled is for a pod's sidecar, whose init container installs the \
                 rules; on a VM use nftables or none"
                        .into()
                },
            ),
        }
        p.into_result()
    }

    /// The listeners' addresses: fixed where capture points at them, loopback where
    /// REDIRECT lands, none used twice. Returns the addresses in use, by flag.
    fn check_listeners(&self, p: &mut ConfigProblems) -> BTreeMap<SocketAddr, &'static str> {
        let nftables = self.capture.captures();
        let mut ports: BTreeMap<SocketAddr, &'static str> = BTreeMap::new();
        for (flag, addr) in [
            ("--inbound-addr", Some(self.inbound_addr)),
            ("--outbound-addr", Some(self.outbound_addr)),
            ("--dns-addr", Some(self.dns_addr)),
            ("--admin-addr", self.admin_addr),
            ("--health-addr", self.health_addr),
            ("--metrics-addr", self.metrics_addr),
        ] {
            let Some(addr) = addr else { continue };
            let captured = matches!(flag, "--inbound-addr" | "--outbound-addr" | "--dns-addr");
            p.check(!(captured && addr.port() == 0 && nftables), flag, || {
                "port 0 cannot be captured to; give a fixed port (or --capture none)".into()
            });
            if addr.port() != 0 {
                if let Some(other) = ports.insert(addr, flag) {
                    p.push(flag, format!("{addr} is also {other}"));
                }
            }
        }
        for (flag, addr) in [
            ("--outbound-addr", self.outbound_addr),
            ("--dns-addr", self.dns_addr),
        ] {
            p.check(!nftables || addr.ip().is_loopback(), flag, || {
                format!("{addr} must be a loopback address: REDIRECT sends captured {} to 127.0.0.1 (::1)",
                    if flag == "--dns-addr" { "queries" } else { "connections" })
            });
        }
        ports
    }
}

/// `KEY=VALUE`.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// A comma-separated list of ports, e.g. `22,2222`; empty means none.
pub fn parse_ports(s: &str) -> Result<Vec<u16>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|n| *n != 0)
                .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
        })
        .collect()
}

/// Whether `dir` is where the agent keeps state (created 0700 when missing).
pub fn prepare_state_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let meta = std::fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other("not a directory"));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), "the state directory is readable by others; the key inside is not, but consider chmod 0700");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbound_listeners_parse_and_name_what_is_wrong() {
        let l =
            OutboundListener::parse("127.0.0.1:9080=reviews.shop.svc.cluster.local:9080").unwrap();
        assert_eq!(l.listen, "127.0.0.1:9080".parse().unwrap());
        assert_eq!(l.hostname, "reviews.shop.svc.cluster.local");
        assert_eq!(l.port, 9080);
        for (bad, want) in [
            ("127.0.0.1:9080", "not LISTEN=HOST:PORT"),
            ("localhost:1=a:1", "not an IP:PORT"),
            ("127.0.0.1:1=reviews", "not HOST:PORT"),
            ("127.0.0.1:1=reviews:0", "not a port"),
            ("127.0.0.1:1=:80", "names no service"),
        ] {
            let err = OutboundListener::parse(bad).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn every_bad_setting_is_named_at_once() {
        let mut c = AgentConfig::new("/b", "/s");
        c.address = Some("127.0.0.1".parse().unwrap());
        c.outbound_addr = "0.0.0.0:15001".parse().unwrap();
        c.dns_addr = "127.0.0.1:15000".parse().unwrap();
        c.drain_deadline = Duration::ZERO;
        let all = c.validate().unwrap_err().to_string();
        for want in [
            "--address",
            "--outbound-addr",
            "--admin-addr: 127.0.0.1:15000 is also --dns-addr",
            "--drain-deadline",
        ] {
            assert!(all.contains(want), "{want} missing in {all}");
        }
        assert!(AgentConfig::new("/b", "/s").validate().is_ok());
    }

    #[test]
    fn ports_and_labels() {
        assert_eq!(parse_ports("22, 2222").unwrap(), vec![22, 2222]);
        assert_eq!(parse_ports("").unwrap(), Vec::<u16>::new());
        assert!(parse_ports("22,x").unwrap_err().contains("\"x\""));
        assert_eq!(
            parse_label("version=v2").unwrap(),
            ("version".into(), "v2".into())
        );
        assert!(parse_label("=v").is_err());
    }
}
