//! Traffic capture with nftables: the rules that send the VM's mesh traffic through the
//! agent, and nothing else.
//!
//! Everything the agent adds lives in one table, `inet isthmus`, so removing the capture
//! is deleting that table, and an operator sees at a glance what the agent did (`nft list
//! table inet isthmus`). The table holds:
//!
//! - two sets, `mesh4` and `mesh6`: the mesh's service addresses (VIPs), replaced as the
//!   catalog changes ([`set_destinations`](crate::capture::set_destinations));
//! - chain `output` (NAT, hook output): the app's outbound TCP to a mesh address is
//!   redirected to the agent's outbound listener, and DNS (UDP and TCP port 53) to the
//!   VM's resolvers to the agent's DNS proxy;
//! - chain `prerouting` (NAT, hook prerouting): TCP arriving for the app's ports is
//!   redirected to the agent's inbound mTLS listener.
//!
//! The agent's own connections must not be captured, or it would proxy to itself in a
//! loop: it puts [`CapturePlan::mark`](crate::capture::CapturePlan::mark) on its sockets
//! (`SO_MARK`) and the output chain lets that mark through first. The proxies read where a
//! redirected connection was going with
//! [`isthmus_proxy::original_dst::original_destination`].
//!
//! Where the listeners must be, because of how REDIRECT rewrites a destination:
//!
//! - in the output hook the new destination is the loopback address (127.0.0.1, or ::1 for
//!   IPv6), so the outbound listener and the DNS proxy listen on loopback (on ::1 as well
//!   where IPv6 destinations or resolvers are captured);
//! - in the prerouting hook it is the primary address of the interface the packet came in
//!   on, so the inbound listener listens on the wildcard address.
//!
//! A locally generated packet is routed *before* the output hook: a VIP with no route
//! (no default route, say) fails with "network unreachable" in `connect` and never reaches
//! the redirect. VIPs must be routable, as they are on any VM with a default route.
//!
//! The functions here run `nft` as a child process and wait for it, so they block: call
//! them from a blocking context (`spawn_blocking`). A child process is created by, and
//! inherits the network namespace of, the calling *thread*: from a thread that entered
//! another namespace (`setns`), they act on that namespace. The tests rely on this.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Command, ExitStatus, Stdio};

use isthmus_proto::config::ConfigProblems;
use serde::Serialize;

/// The nftables table that holds everything the agent adds (family `inet`: IPv4 and IPv6).
pub const TABLE: &str = "isthmus";
/// The table's family.
pub const FAMILY: &str = "inet";
/// The set of IPv4 mesh addresses captured outbound.
pub const SET_V4: &str = "mesh4";
/// The set of IPv6 mesh addresses captured outbound.
pub const SET_V6: &str = "mesh6";
/// The chain that captures the VM's outbound traffic (app connections and DNS).
pub const CHAIN_OUTPUT: &str = "output";
/// The chain that captures inbound connections to the app's ports.
pub const CHAIN_PREROUTING: &str = "prerouting";

/// The socket mark (`SO_MARK`) that exempts the agent's own traffic ("isti" on a phone
/// keypad, roughly). A mark rather than the agent's uid (`meta skuid`): the agent and the
/// app may both run as root, and a uid exemption would then exempt the app too. It must
/// not collide with marks the host uses for policy routing (`ip rule fwmark`).
pub const DEFAULT_MARK: u32 = 0x1571;

/// The `nft` command, found on `PATH`.
const NFT: &str = "nft";
/// Addresses per `add element` command: keeps each line of the script reasonable whatever
/// the size of the mesh (nft takes thousands per line, but errors then point nowhere).
const ELEMENTS_PER_COMMAND: usize = 1024;
/// NAT chains take their redirects at the standard destination NAT priority ("dstnat",
/// which nft accepts by name only in some hooks, hence the number).
const NAT_PRIORITY: i32 = -100;
/// What to do when nftables cannot be used at all.
const FALLBACK_HINT: &str = "run with --capture none to use explicit listeners instead";

/// What to capture and where to send it. Served on `/config_dump`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CapturePlan {
    /// The agent's outbound listener (on loopback): mesh-bound TCP goes there.
    pub outbound_port: u16,
    /// The agent's inbound mTLS listener (on the wildcard address): the app's captured
    /// ports go there.
    pub inbound_port: u16,
    /// The agent's DNS proxy (on loopback): DNS to `dns_servers` goes there.
    pub dns_port: u16,
    /// The agent's socket mark; packets carrying it are never captured. Not zero: every
    /// unmarked packet has mark zero.
    pub mark: u32,
    /// The app's ports whose inbound TCP is captured; empty captures no inbound traffic.
    pub inbound_ports: Vec<u16>,
    /// Ports never captured inbound (SSH, say), even when also in `inbound_ports`.
    pub exclude_inbound_ports: Vec<u16>,
    /// Destination ports never captured outbound, even to a mesh address.
    pub exclude_outbound_ports: Vec<u16>,
    /// The resolvers whose DNS is captured (the nameservers of /etc/resolv.conf); empty
    /// captures no DNS.
    pub dns_servers: Vec<IpAddr>,
    /// Exempts every socket of this uid as well, when the agent runs as a dedicated user.
    pub exempt_uid: Option<u32>,
    /// Capture inbound TCP to every port but the excluded ones (a pod's sidecar, as Istio
    /// captures `*`), instead of `inbound_ports` only.
    pub inbound_all: bool,
}

/// What the capture rules cover so far: the app ports captured inbound (`None` until
/// first applied, and without capture), and how many service addresses outbound (`None`
/// until first applied). Registration waits on it before its first health report, so peers
/// never reach the app around the agent; readiness waits for the addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureProgress {
    pub ports: Option<Vec<u16>>,
    pub addresses: Option<usize>,
}

impl CapturePlan {
    /// What is wrong with the plan, every problem at once; empty when it can be installed.
    pub fn problems(&self) -> ConfigProblems {
        let mut p = ConfigProblems::default();
        p.check(self.mark != 0, "mark", || {
            "0 is the mark of every unmarked packet; exempting it would capture nothing".into()
        });
        for (field, port) in [
            ("outbound-port", self.outbound_port),
            ("inbound-port", self.inbound_port),
            ("dns-port", self.dns_port),
        ] {
            p.check(port != 0, field, || {
                "0 is not a port a listener can be found on".into()
            });
            p.check(
                port == 0 || !self.inbound_ports.contains(&port),
                "inbound-ports",
                || {
                    format!(
                        "{port} is the agent's own {field}; capturing it would expose the \
                         agent's listener through the inbound path"
                    )
                },
            );
        }
        p.check(!self.inbound_ports.contains(&0), "inbound-ports", || {
            "0 is not a port".into()
        });
        p
    }

    /// The rules of each chain, in order.
    fn chains(&self) -> [Chain; 2] {
        [
            Chain {
                name: CHAIN_OUTPUT,
                hook: "output",
                rules: self.output_rules(),
            },
            Chain {
                name: CHAIN_PREROUTING,
                hook: "prerouting",
                rules: self.prerouting_rules(),
            },
        ]
    }

    fn output_rules(&self) -> Vec<String> {
        let mut rules = vec![format!("meta mark {:#010x} return", self.mark)];
        if let Some(uid) = self.exempt_uid {
            rules.push(format!("meta skuid {uid} return"));
        }
        // DNS comes before the loopback exemption: a local stub resolver (127.0.0.53 of
        // systemd-resolved) is reached over loopback, and its queries are still captured.
        let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) =
            self.dns_servers.iter().partition(|ip| ip.is_ipv4());
        for (match_family, servers) in [("ip", v4), ("ip6", v6)] {
            if servers.is_empty() {
                continue;
            }
            let servers = set_literal(servers);
            for proto in ["udp", "tcp"] {
                rules.push(format!(
                    "{match_family} daddr {servers} {proto} dport 53 redirect to :{}",
                    self.dns_port
                ));
            }
        }
        // Traffic that stays on this machine is not mesh traffic, even to a mesh address
        // (the VM's own workload address, say): the app reaches itself directly.
        rules.push("oifname \"lo\" return".to_string());
        if !self.exclude_outbound_ports.is_empty() {
            rules.push(format!(
                "tcp dport {} return",
                set_literal(self.exclude_outbound_ports.iter().copied())
            ));
        }
        for (match_family, set) in [("ip", SET_V4), ("ip6", SET_V6)] {
            rules.push(format!(
                "{match_family} daddr @{set} meta l4proto tcp redirect to :{}",
                self.outbound_port
            ));
        }
        rules
    }

    fn prerouting_rules(&self) -> Vec<String> {
        // Loopback traffic (the app to itself, and what the output chain redirected) had
        // its destination decided in the output hook already.
        let mut rules = vec!["iifname \"lo\" return".to_string()];
        if self.inbound_ports.is_empty() && !self.inbound_all {
            return rules;
        }
        if !self.exclude_inbound_ports.is_empty() {
            rules.push(format!(
                "tcp dport {} return",
                set_literal(self.exclude_inbound_ports.iter().copied())
            ));
        }
        if self.inbound_all {
            rules.push(format!(
                "meta l4proto tcp redirect to :{}",
                self.inbound_port
            ));
        } else {
            rules.push(format!(
                "tcp dport {} redirect to :{}",
                set_literal(self.inbound_ports.iter().copied()),
                self.inbound_port
            ));
        }
        rules
    }
}

/// One NAT chain of the table.
struct Chain {
    name: &'static str,
    hook: &'static str,
    rules: Vec<String>,
}

/// `{ a, b }`, sorted and without duplicates (which nft would refuse in an interval set).
fn set_literal<T: Ord + std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let items: BTreeSet<T> = items.into_iter().collect();
    let items: Vec<String> = items.iter().map(ToString::to_string).collect();
    format!("{{ {} }}", items.join(", "))
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("the capture plan cannot be installed: {0}")]
    Plan(ConfigProblems),
    #[error(
        "{what}: cannot run `{NFT}`: {source}; is nftables installed (the nft command on \
         PATH)? {FALLBACK_HINT}"
    )]
    NftUnavailable {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: `nft {args}` failed ({status}): {stderr}; {hint}")]
    NftFailed {
        what: &'static str,
        args: String,
        status: ExitStatus,
        /// What nft said, trimmed.
        stderr: String,
        hint: &'static str,
    },
}

/// The complete script for `plan`, for `nft -f -`: it creates the table if missing, deletes
/// it, and creates it anew, all in one transaction, so applying it again replaces the
/// capture atomically (no moment without rules). The sets start empty: follow with
/// [`set_destinations`].
pub fn render(plan: &CapturePlan) -> String {
    let mut s = String::new();
    s.push_str(&format!("add table {FAMILY} {TABLE}\n"));
    s.push_str(&format!("delete table {FAMILY} {TABLE}\n"));
    s.push_str(&format!("table {FAMILY} {TABLE} {{\n"));
    for (set, ty) in [(SET_V4, "ipv4_addr"), (SET_V6, "ipv6_addr")] {
        s.push_str(&format!(
            "\tset {set} {{\n\t\ttype {ty}\n\t\tflags interval\n\t}}\n"
        ));
    }
    for chain in plan.chains() {
        s.push_str(&format!(
            "\tchain {} {{\n\t\ttype nat hook {} priority {NAT_PRIORITY}; policy accept;\n",
            chain.name, chain.hook
        ));
        for rule in &chain.rules {
            s.push_str(&format!("\t\t{rule}\n"));
        }
        s.push_str("\t}\n");
    }
    s.push_str("}\n");
    s
}

/// Installs (or replaces) the capture for `plan`, with empty destination sets.
pub fn install(plan: &CapturePlan) -> Result<(), CaptureError> {
    install_with(plan, &[], &[])
}

/// Installs (or replaces) the capture for `plan` with `v4` and `v6` in its destination sets,
/// all in one transaction: a reinstall (the app's ports changed) never leaves a moment
/// when the mesh's addresses are not captured.
pub fn install_with(
    plan: &CapturePlan,
    v4: &[Ipv4Addr],
    v6: &[Ipv6Addr],
) -> Result<(), CaptureError> {
    let problems = plan.problems();
    if !problems.is_empty() {
        return Err(CaptureError::Plan(problems));
    }
    let script = render(plan) + &render_destinations(v4, v6);
    nft(
        &["-f", "-"],
        Some(&script),
        "installing the traffic capture rules",
        "does the agent have CAP_NET_ADMIN, and does the kernel have nf_tables with NAT \
         (nft_nat, nft_redirect)? run with --capture none to use explicit listeners instead",
    )?;
    Ok(())
}

/// The script that replaces the contents of both sets (addresses, or ranges).
fn render_destinations<A, B>(v4: &[A], v6: &[B]) -> String
where
    A: Ord + std::fmt::Display,
    B: Ord + std::fmt::Display,
{
    fn add<T: Ord + std::fmt::Display>(s: &mut String, set: &str, addrs: &[T]) {
        let sorted: Vec<&T> = addrs.iter().collect::<BTreeSet<_>>().into_iter().collect();
        for chunk in sorted.chunks(ELEMENTS_PER_COMMAND) {
            s.push_str(&format!(
                "add element {FAMILY} {TABLE} {set} {}\n",
                set_literal(chunk.iter())
            ));
        }
    }
    let mut s =
        format!("flush set {FAMILY} {TABLE} {SET_V4}\nflush set {FAMILY} {TABLE} {SET_V6}\n");
    add(&mut s, SET_V4, v4);
    add(&mut s, SET_V6, v6);
    s
}

/// Replaces the mesh destinations captured outbound with `v4` and `v6`, both sets in one
/// transaction: a connection sees either the old addresses or the new ones. Empty lists
/// capture nothing.
pub fn set_destinations(v4: &[Ipv4Addr], v6: &[Ipv6Addr]) -> Result<(), CaptureError> {
    nft(
        &["-f", "-"],
        Some(&render_destinations(v4, v6)),
        "replacing the captured mesh addresses",
        "is the capture installed (nft list table inet isthmus)? the table may have been \
         removed by a firewall reload",
    )?;
    Ok(())
}

/// Replaces the captured destinations with whole address ranges: what a pod's init step
/// captures once (the mesh's VIP range and the cluster's service CIDR), since the sidecar
/// itself has no right to change the rules later.
pub fn set_ranges(ranges: &[Cidr]) -> Result<(), CaptureError> {
    let (v4, v6): (Vec<Cidr>, Vec<Cidr>) = ranges.iter().copied().partition(Cidr::is_ipv4);
    nft(
        &["-f", "-"],
        Some(&render_destinations(&v4, &v6)),
        "capturing the mesh address ranges",
        "is the capture installed (nft list table inet isthmus)?",
    )?;
    Ok(())
}

/// An address range, `ADDR/PREFIX` (a bare address is a /32 or /128), held with its host
/// bits cleared: nftables refuses an interval element with host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Whether `ip` is in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not ADDRESS/PREFIX (e.g. 10.96.0.0/12)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Ok(Self { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A comma-separated list of ranges; empty means none.
pub fn parse_cidrs(s: &str) -> Result<Vec<Cidr>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::parse)
        .collect()
}

/// Whether the agent's table exists.
pub fn installed() -> Result<bool, CaptureError> {
    let out = nft(
        &["list", "tables", FAMILY],
        None,
        "listing the nftables tables",
        "does the agent have CAP_NET_ADMIN?",
    )?;
    Ok(out
        .lines()
        .any(|l| l.split_whitespace().eq(["table", FAMILY, TABLE])))
}

/// Removes everything the agent added: `Ok(true)` when there was a table to remove,
/// `Ok(false)` when there was none. Safe to call any number of times.
pub fn cleanup() -> Result<bool, CaptureError> {
    if !installed()? {
        return Ok(false);
    }
    // `add` first, so the transaction cannot fail if the table went in the meantime.
    nft(
        &["-f", "-"],
        Some(&format!(
            "add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"
        )),
        "removing the traffic capture rules",
        "does the agent have CAP_NET_ADMIN? remove them by hand with `nft delete table inet \
         isthmus`",
    )?;
    Ok(true)
}

/// Whether the capture for `plan` is in place, for the watchdog: `Err` says what is
/// missing. It checks the table, its two chains and their hooks, and that each chain has
/// the number of rules the agent put there (so a chain flushed by someone else is noticed);
/// it does not read the sets.
pub fn check(plan: &CapturePlan) -> Result<(), String> {
    let cannot = |e: CaptureError| format!("cannot check the traffic capture: {e}");
    if !installed().map_err(cannot)? {
        return Err(format!(
            "the nftables table {FAMILY} {TABLE} is gone (a firewall reload? `nft flush \
             ruleset` removes it): traffic is not captured"
        ));
    }
    // Terse: without the sets' elements, which may be thousands.
    let listing = nft(
        &["-t", "list", "table", FAMILY, TABLE],
        None,
        "listing the capture table",
        "does the agent have CAP_NET_ADMIN?",
    )
    .map_err(cannot)?;
    let found = parse_chains(&listing);
    let mut problems = Vec::new();
    for want in plan.chains() {
        match found.iter().find(|c| c.name == want.name) {
            None => problems.push(format!("chain {} is missing", want.name)),
            Some(got) => {
                if got.hook.as_deref() != Some(want.hook) {
                    problems.push(format!(
                        "chain {} is not attached to the {} hook (found {:?})",
                        want.name, want.hook, got.hook
                    ));
                }
                if got.rules != want.rules.len() {
                    problems.push(format!(
                        "chain {} has {} rule(s), the agent installed {}",
                        want.name,
                        got.rules,
                        want.rules.len()
                    ));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the nftables table {FAMILY} {TABLE} was changed by someone else: {}",
            problems.join("; ")
        ))
    }
}

/// A chain as `nft list table` shows it.
#[derive(Debug, PartialEq, Eq)]
struct ListedChain {
    name: String,
    /// The hook from the `type ... hook <hook> ...` line; `None` for a regular chain.
    hook: Option<String>,
    rules: usize,
}

/// The chains of a `nft list table` listing (nft prints one chain header per line, one
/// rule per line, and a closing brace alone on its line).
fn parse_chains(listing: &str) -> Vec<ListedChain> {
    let mut chains = Vec::new();
    let mut current: Option<ListedChain> = None;
    for line in listing.lines().map(str::trim) {
        match &mut current {
            None => {
                if let Some(name) = line
                    .strip_prefix("chain ")
                    .and_then(|rest| rest.strip_suffix('{'))
                {
                    current = Some(ListedChain {
                        name: name.trim().to_string(),
                        hook: None,
                        rules: 0,
                    });
                }
            }
            Some(chain) => {
                if line == "}" {
                    chains.extend(current.take());
                } else if line.starts_with("type ") {
                    let mut words = line.split_whitespace();
                    chain.hook = words
                        .by_ref()
                        .find(|w| *w == "hook")
                        .and_then(|_| words.next())
                        .map(str::to_string);
                } else if !line.is_empty() {
                    chain.rules += 1;
                }
            }
        }
    }
    chains
}

/// `nft --version` ("nftables v1.0.6 (Lester Gooch #5)"): whether nft can be run at all.
pub fn nft_version() -> Result<String, CaptureError> {
    let out = nft(
        &["--version"],
        None,
        "reading the nftables version",
        "is nftables installed?",
    )?;
    Ok(out.trim().to_string())
}

/// Runs `nft args`, feeding `stdin` if given; its stdout on success.
/// `nft`, started without the agent's systemd variables.
fn nft_command() -> Command {
    let mut cmd = Command::new(NFT);
    crate::notify::without_notify_env(&mut cmd);
    cmd
}

fn nft(
    args: &[&str],
    stdin: Option<&str>,
    what: &'static str,
    hint: &'static str,
) -> Result<String, CaptureError> {
    let mut child = nft_command()
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CaptureError::NftUnavailable { what, source })?;
    let fed = match (stdin, child.stdin.take()) {
        (Some(text), Some(mut pipe)) => {
            // nft reads the whole script before it writes anything, so this cannot block
            // on a full stdout pipe; a failed write shows up as nft's own error below.
            let r = pipe.write_all(text.as_bytes());
            drop(pipe);
            r
        }
        _ => Ok(()),
    };
    let out = child
        .wait_with_output()
        .map_err(|source| CaptureError::NftUnavailable { what, source })?;
    if out.status.success() {
        if let Err(source) = fed {
            return Err(CaptureError::NftUnavailable { what, source });
        }
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    Err(CaptureError::NftFailed {
        what,
        args: args.join(" "),
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        hint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nft_runs_without_the_agents_systemd_variables() {
        crate::notify::tests::assert_no_notify_env(&nft_command());
    }

    fn plan() -> CapturePlan {
        CapturePlan {
            outbound_port: 15001,
            inbound_port: 15006,
            dns_port: 15053,
            mark: DEFAULT_MARK,
            inbound_ports: vec![9090, 8080, 8080],
            exclude_inbound_ports: vec![22],
            exclude_outbound_ports: vec![22, 15012],
            dns_servers: vec![
                "10.0.0.2".parse().unwrap(),
                "127.0.0.53".parse().unwrap(),
                "fd00::53".parse().unwrap(),
            ],
            exempt_uid: None,
            inbound_all: false,
        }
    }

    /// A plan that captures nothing but outbound mesh traffic.
    fn bare() -> CapturePlan {
        CapturePlan {
            inbound_ports: vec![],
            exclude_inbound_ports: vec![],
            exclude_outbound_ports: vec![],
            dns_servers: vec![],
            ..plan()
        }
    }

    /// The rules of a chain in a rendered script, trimmed, without the `type` line.
    fn chain_rules(script: &str, chain: &str) -> Vec<String> {
        let start = script
            .find(&format!("chain {chain} {{"))
            .unwrap_or_else(|| panic!("no chain {chain} in\n{script}"));
        script[start..]
            .lines()
            .skip(2)
            .map(str::trim)
            .take_while(|l| *l != "}")
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn the_script_replaces_the_whole_table() {
        let s = render(&plan());
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "add table inet isthmus");
        assert_eq!(lines[1], "delete table inet isthmus");
        assert_eq!(lines[2], "table inet isthmus {");
        assert!(s.contains("set mesh4 {\n\t\ttype ipv4_addr\n\t\tflags interval\n"));
        assert!(s.contains("set mesh6 {\n\t\ttype ipv6_addr\n\t\tflags interval\n"));
        assert!(s.contains("chain output {\n\t\ttype nat hook output priority -100;"));
        assert!(s.contains("chain prerouting {\n\t\ttype nat hook prerouting priority -100;"));
    }

    #[test]
    fn output_exempts_the_mark_then_captures_dns_then_mesh_addresses() {
        let rules = chain_rules(&render(&plan()), "output");
        assert_eq!(
            rules,
            [
                "meta mark 0x00001571 return",
                "ip daddr { 10.0.0.2, 127.0.0.53 } udp dport 53 redirect to :15053",
                "ip daddr { 10.0.0.2, 127.0.0.53 } tcp dport 53 redirect to :15053",
                "ip6 daddr { fd00::53 } udp dport 53 redirect to :15053",
                "ip6 daddr { fd00::53 } tcp dport 53 redirect to :15053",
                "oifname \"lo\" return",
                "tcp dport { 22, 15012 } return",
                "ip daddr @mesh4 meta l4proto tcp redirect to :15001",
                "ip6 daddr @mesh6 meta l4proto tcp redirect to :15001",
            ]
        );
    }

    #[test]
    fn prerouting_captures_app_ports_except_the_excluded() {
        let rules = chain_rules(&render(&plan()), "prerouting");
        assert_eq!(
            rules,
            [
                "iifname \"lo\" return",
                "tcp dport { 22 } return",
                "tcp dport { 8080, 9090 } redirect to :15006",
            ]
        );
    }

    #[test]
    fn empty_lists_leave_their_rules_out() {
        let s = render(&bare());
        assert!(!s.contains("dport 53"), "{s}");
        assert!(!s.contains("{  }") && !s.contains("{ }"), "{s}");
        assert_eq!(
            chain_rules(&s, "output"),
            [
                "meta mark 0x00001571 return",
                "oifname \"lo\" return",
                "ip daddr @mesh4 meta l4proto tcp redirect to :15001",
                "ip6 daddr @mesh6 meta l4proto tcp redirect to :15001",
            ]
        );
        // Exclusions without captured ports would be noise.
        let only_excluded = CapturePlan {
            exclude_inbound_ports: vec![22],
            ..bare()
        };
        assert_eq!(
            chain_rules(&render(&only_excluded), "prerouting"),
            ["iifname \"lo\" return"]
        );
        // Only IPv6 resolvers: no IPv4 DNS rule.
        let v6_dns = CapturePlan {
            dns_servers: vec!["::1".parse().unwrap()],
            ..bare()
        };
        let s = render(&v6_dns);
        assert!(!s.contains("ip daddr {"), "{s}");
        assert!(
            s.contains("ip6 daddr { ::1 } udp dport 53 redirect to :15053"),
            "{s}"
        );
    }

    #[test]
    fn a_dedicated_uid_is_exempt_after_the_mark() {
        let p = CapturePlan {
            exempt_uid: Some(998),
            ..bare()
        };
        let rules = chain_rules(&render(&p), "output");
        assert_eq!(rules[0], "meta mark 0x00001571 return");
        assert_eq!(rules[1], "meta skuid 998 return");
    }

    #[test]
    fn a_pod_captures_every_inbound_port_but_the_excluded() {
        let p = CapturePlan {
            inbound_ports: vec![],
            inbound_all: true,
            exclude_inbound_ports: vec![15021, 15020],
            ..plan()
        };
        let rules = chain_rules(&render(&p), "prerouting");
        assert_eq!(
            rules,
            [
                "iifname \"lo\" return",
                "tcp dport { 15020, 15021 } return",
                "meta l4proto tcp redirect to :15006",
            ]
        );
    }

    #[test]
    fn ranges_parse_with_host_bits_cleared_and_name_what_is_wrong() {
        let c: Cidr = "10.96.3.4/12".parse().unwrap();
        assert_eq!(c.to_string(), "10.96.0.0/12");
        assert!(c.contains("10.111.255.1".parse().unwrap()));
        assert!(!c.contains("10.112.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        assert_eq!(
            "240.240.0.9".parse::<Cidr>().unwrap().to_string(),
            "240.240.0.9/32"
        );
        assert_eq!(
            "2001:2::1/48".parse::<Cidr>().unwrap().to_string(),
            "2001:2::/48"
        );
        assert_eq!(
            "0.0.0.0/0".parse::<Cidr>().unwrap().to_string(),
            "0.0.0.0/0"
        );
        assert_eq!(
            parse_cidrs("240.240.0.0/16, 10.96.0.0/12,").unwrap().len(),
            2
        );
        assert!(parse_cidrs("").unwrap().is_empty());
        for (bad, want) in [
            ("10.0.0.0/33", "0 to 32"),
            ("ten/8", "ADDRESS/PREFIX"),
            ("::/129", "0 to 128"),
        ] {
            let err = parse_cidrs(bad).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
        }
        let script = render_destinations(&[c], &["2001:2::/48".parse::<Cidr>().unwrap()]);
        assert!(
            script.contains("add element inet isthmus mesh4 { 10.96.0.0/12 }"),
            "{script}"
        );
        assert!(
            script.contains("add element inet isthmus mesh6 { 2001:2::/48 }"),
            "{script}"
        );
    }

    #[test]
    fn a_plan_that_would_capture_wrongly_is_refused() {
        assert!(plan().problems().is_empty());
        let bad = CapturePlan {
            mark: 0,
            dns_port: 0,
            inbound_ports: vec![8080, 15001, 0],
            ..plan()
        };
        let problems = bad.problems().to_string();
        for needle in [
            "mark: 0",
            "dns-port: 0",
            "15001 is the agent's own outbound-port",
            "inbound-ports: 0",
        ] {
            assert!(problems.contains(needle), "{needle} in {problems}");
        }
        let err = install(&bad).unwrap_err();
        assert!(
            matches!(err, CaptureError::Plan(ref p) if p.len() == 4),
            "{err}"
        );
    }

    #[test]
    fn destinations_are_flushed_then_added_in_chunks() {
        assert_eq!(
            render_destinations::<Ipv4Addr, Ipv6Addr>(&[], &[]),
            "flush set inet isthmus mesh4\nflush set inet isthmus mesh6\n"
        );
        let v4: Vec<Ipv4Addr> = (0..2500u32)
            .map(|i| Ipv4Addr::from(0x0a00_0000 + i))
            .collect();
        let mut with_dup = v4.clone();
        with_dup.push(v4[0]);
        let v6: [Ipv6Addr; 2] = ["fd00::2".parse().unwrap(), "fd00::1".parse().unwrap()];
        let s = render_destinations(&with_dup, &v6);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 2 + 3 + 1, "{}", &s[..200]);
        assert!(lines[2].starts_with("add element inet isthmus mesh4 { 10.0.0.0, 10.0.0.1,"));
        let elements: usize = lines[2..5]
            .iter()
            .map(|l| l.matches(", ").count() + 1)
            .sum();
        assert_eq!(elements, 2500, "each address once");
        assert_eq!(
            lines[5],
            "add element inet isthmus mesh6 { fd00::1, fd00::2 }"
        );
    }

    #[test]
    fn listed_chains_are_parsed() {
        let listing = "table inet isthmus {\n\tset mesh4 {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t}\n\n\tchain output {\n\t\ttype nat hook output priority -100; policy accept;\n\t\tmeta mark 0x00001571 return\n\t\toifname \"lo\" return\n\t}\n\n\tchain prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t}\n\tchain other {\n\t}\n}\n";
        assert_eq!(
            parse_chains(listing),
            [
                ListedChain {
                    name: "output".into(),
                    hook: Some("output".into()),
                    rules: 2
                },
                ListedChain {
                    name: "prerouting".into(),
                    hook: Some("prerouting".into()),
                    rules: 0
                },
                ListedChain {
                    name: "other".into(),
                    hook: None,
                    rules: 0
                },
            ]
        );
    }

    #[test]
    fn the_plan_serializes_for_config_dump() {
        let json = serde_json::to_value(plan()).unwrap();
        assert_eq!(json["mark"], DEFAULT_MARK);
        assert_eq!(json["dns_servers"][2], "fd00::53");
        assert_eq!(json["exempt_uid"], serde_json::Value::Null);
    }

    /// Whether `nft -c` can check scripts here: it needs nft and root (check mode still
    /// asks the kernel).
    fn nft_checkable() -> bool {
        if nft_version().is_err() {
            eprintln!("skipping: nft is not installed");
            return false;
        }
        let root = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("Uid:"))?.to_string();
                line.split_whitespace().nth(2).map(|u| u == "0")
            })
            .unwrap_or(false);
        if !root {
            eprintln!("skipping: nft -c needs root");
        }
        root
    }

    /// nft itself accepts every script we render (check mode: nothing is applied).
    #[test]
    fn nft_accepts_the_rendered_scripts() {
        if !nft_checkable() {
            return;
        }
        let plans = [
            plan(),
            bare(),
            CapturePlan {
                exempt_uid: Some(0),
                dns_servers: vec!["::1".parse().unwrap()],
                ..plan()
            },
            CapturePlan {
                exempt_uid: Some(1337),
                inbound_all: true,
                ..plan()
            },
        ];
        for p in &plans {
            let script = render(p);
            if let Err(e) = nft(&["-c", "-f", "-"], Some(&script), "checking", "") {
                panic!("{e}\n{script}");
            }
        }
        // The destination script refers to the table, so it is checked together with one.
        let v4: Vec<Ipv4Addr> = (0..3000u32)
            .map(|i| Ipv4Addr::from(0x0a00_0000 + i))
            .collect();
        let script =
            render(&bare()) + &render_destinations(&v4, &["fd00::1".parse::<Ipv6Addr>().unwrap()]);
        if let Err(e) = nft(&["-c", "-f", "-"], Some(&script), "checking", "") {
            panic!("{e}");
        }
    }
}
