//! A multi-network mesh on one machine, built from Linux network namespaces, for tests that
//! need real network boundaries (the east-west gateway, the VM agent).
//!
//! # Layout
//!
//! Each [`Topology`] claims an index `N` (1..=250) and creates three namespaces, plus one
//! per VM added with [`Topology::add_vm`]:
//!
//! ```text
//!   root namespace (the test process, the registry)
//!     istNh 198.18.N.1/24
//!        |
//!   istNw ("wan"): bridge br0 ── vh (to the root namespace)
//!                             ├─ va ── wan0 198.18.N.10/24  in istNa (network A; A's gateway)
//!                             └─ vb ── wan0 198.18.N.20/24  in istNb (network B; B's gateway)
//!
//!   istNa, istNb: lo up; wl0 holds workload addresses (Netns::add_ip), e.g. 10.10.0.5/32
//!
//!   VMs (Topology::add_vm(Net::A, "web", 10.10.0.7)), the k-th VM of a network:
//!   istNa: vmK 169.254.1.1/32 ── eth0 10.10.0.7/32  in istNaK (the VM)
//!          route 10.10.0.7/32 dev vmK src 198.18.N.10        default via 169.254.1.1 onlink
//!          ip_forward=1 (this namespace only)
//!          table inet isthmus-harness: masquerade what a VM sends out of wan0
//! ```
//!
//! Only 198.18.N.0/24 (from the RFC 2544 benchmarking range, so it never clashes with a
//! real network) is routed between namespaces, and none of them has a default route. So
//! across networks only the gateways' addresses are reachable: a workload address in B is
//! unreachable from A (connecting fails at once with "network unreachable"), exactly the
//! situation an east-west gateway exists for. Because A and B are separate namespaces,
//! they may hold the same workload addresses, as overlapping pod networks do.
//!
//! The root namespace's 198.18.N.1 is how processes in A and B reach a control plane (a
//! registry) running in the test process, bound to 0.0.0.0 or to [`Topology::host_addr`].
//! The root namespace does not forward (nothing here turns its `ip_forward` on), so the
//! namespaces cannot reach anything beyond it.
//!
//! # VMs
//!
//! A VM is a namespace of its own behind its network's namespace, as a machine behind a
//! router: one veth pair, `eth0` in the VM holding its address as a /32 with a default
//! route to the link-local next hop 169.254.1.1 ([`VM_NEXT_HOP`]) that the network side
//! `vmK` holds, and a /32 route back to the VM in the network namespace. Its processes
//! reach, like the network's own, every address of the network namespace (the gateway's
//! `wan0` address, `wl0` workload addresses: delivered locally, they see the VM's own
//! address as the peer), and, through the network namespace, which forwards, what its
//! network reaches over the wan: the host address and the other network's gateway. Since
//! VM addresses may be the same in A and B, nothing outside a network can route back to
//! them, so what a VM sends out of `wan0` is masqueraded to the network's wan address
//! (198.18.N.10 or .20) by the nftables table `inet isthmus-harness` in the network
//! namespace (never the name of a table the VM agent manages). Other networks' workload
//! addresses stay unreachable from a VM ("network unreachable", from its network
//! namespace). The first VM of a network turns forwarding on in that namespace alone
//! (the root's `ip_forward` is never touched) and installs the table; a topology without
//! VMs has neither. VMs need `nft` (nftables) besides `ip`.
//!
//! Connections from the network namespace to a VM come from the network's wan address
//! (the route's `src`), or from the workload address a process bound.
//!
//! # Name resolution
//!
//! `ip netns exec` (hence every [`Netns::command`]) bind-mounts the files of
//! `/etc/netns/<name>/` over their namesakes in `/etc` for the process it starts, so
//! [`Netns::set_resolv_conf`] gives the processes of one namespace their own
//! `/etc/resolv.conf` (a VM whose agent captures DNS to its nameservers, say). Threads of
//! [`Netns::run`] and [`Netns::runtime`] only enter the network namespace and read the
//! machine's `/etc/resolv.conf`.
//!
//! # Running code inside a namespace
//!
//! A socket belongs to the namespace of the thread that created it. [`Netns::runtime`]
//! gives a tokio runtime whose threads have all entered the namespace, [`Netns::run`] runs a
//! closure on a thread inside it, and [`Netns::command`] builds a process that runs inside it
//! (start it with [`Topology::spawn`] so it is killed with the topology).
//!
//! Beware that `Runtime::block_on` polls its future on the *calling* thread, which is not in
//! the namespace: spawn the socket work onto the runtime (`rt.block_on(rt.spawn(fut))`) or
//! use [`block_on_in`].
//!
//! # Uniqueness and teardown
//!
//! Tests run in parallel threads of one binary, and other test processes may run beside it,
//! so every name carries the index, and an index is claimed by creating `istNw`: `ip netns
//! add` creates the namespace file exclusively, so two claimants can never both win, and
//! whoever holds `istNw` owns every `istN<letter>*` name (leftovers of `istNa`, `istNb`,
//! `istNh` and VMs from a killed run are removed when the index is claimed again). Within a
//! process indices are handed out round robin, so a just-released index is not reused at
//! once.
//!
//! Dropping the [`Topology`], also while unwinding from a panic, kills the processes started
//! with [`Topology::spawn`] and any other process left in its namespaces, deletes the
//! root-namespace end of the veth (explicitly: namespaces are destroyed asynchronously, and
//! only once nothing holds them), deletes the namespaces (VMs first, `istNw` last, with them
//! their interfaces and nftables tables) and removes `/etc/netns/<name>/` of each. Claiming
//! an index also removes leftover VM namespaces and `/etc/netns/istN*` directories of a run
//! that was killed.
//!
//! Runtimes from [`Netns::runtime`] belong to the caller, who must drop them before the
//! topology: their threads hold the namespace alive otherwise. Dropping a runtime inside an
//! async context (in a `#[tokio::test]`) panics; use `Runtime::shutdown_background` there.
//!
//! # Requirements
//!
//! Root (CAP_SYS_ADMIN and CAP_NET_ADMIN), the `ip` command (iproute2), and a kernel with
//! network namespaces, veth and bridge. A `dummy` interface is used for workload addresses
//! where the kernel has it; otherwise (kernels built without it) a veth pair whose both ends
//! stay in the namespace serves the same purpose. Without root or `ip`,
//! [`Topology::create`] skips the test with a message, unless `CI=true`, where it fails.

use std::ffi::OsStr;
use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Output};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Where `ip netns` keeps the namespace files.
const NETNS_DIR: &str = "/var/run/netns";
/// The interface that holds workload addresses in A and B.
const WORKLOAD_LINK: &str = "wl0";
/// The bridge in the wan namespace.
const BRIDGE: &str = "br0";
/// The number of indices, hence of topologies that can exist at once on a machine.
const MAX_INDEX: usize = 250;
/// Where `ip netns exec` finds the files it bind-mounts over `/etc` for a namespace.
const ETC_NETNS_DIR: &str = "/etc/netns";
/// A VM's interface.
const VM_LINK: &str = "eth0";
/// The network's wan interface, out of which VM traffic is masqueraded.
const WAN_LINK: &str = "wan0";
/// The nftables table of the network namespaces that have VMs; never the agent's.
pub const NFT_TABLE: &str = "inet isthmus-harness";
/// The next hop of a VM's default route: held by the network namespace's end of every
/// VM's veth.
pub const VM_NEXT_HOP: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// One of the two networks of a [`Topology`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Net {
    A,
    B,
}

impl Net {
    /// The letter of the network's names: `a` in `istNa`.
    pub fn letter(self) -> char {
        match self {
            Net::A => 'a',
            Net::B => 'b',
        }
    }
}

/// A named network namespace (`ip netns` style, a file under `/var/run/netns`).
#[derive(Debug, Clone)]
pub struct Netns {
    name: String,
    /// The interface [`Netns::add_ip`] puts addresses on.
    addr_link: &'static str,
}

impl Netns {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file, `/var/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// Adds `ip` (as a /32 or /128) to the workload interface `wl0` in A and B (to the
    /// bridge in wan, to `eth0` in a VM). Workload addresses are not routed outside their
    /// namespace. An IPv6 address is usable (routed locally) when this returns.
    pub fn add_ip(&self, ip: IpAddr) {
        let cidr = match ip {
            IpAddr::V4(v4) => format!("{v4}/32"),
            IpAddr::V6(v6) => format!("{v6}/128"),
        };
        let mut args = vec![
            "-n",
            &self.name,
            "addr",
            "add",
            &cidr,
            "dev",
            self.addr_link,
        ];
        if ip.is_ipv6() {
            // No duplicate address detection: the address is usable (bindable) at once.
            args.push("nodad");
        }
        ip_ok(&args);
        if let IpAddr::V6(v6) = ip {
            self.wait_local(v6);
        }
    }

    /// Waits until the kernel routes IPv6 `ip` locally. Even without DAD an address stays
    /// tentative (it binds, but a connection to it leaves by the interface and fails with
    /// "no route to host") until the kernel has seen its link operationally up, which it
    /// learns asynchronously: late on a busy machine.
    fn wait_local(&self, ip: std::net::Ipv6Addr) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = ip.to_string();
        loop {
            let out = ip_output(&["-n", &self.name, "-6", "route", "get", &addr])
                .unwrap_or_else(|e| panic!("`ip route get` in {}: {e}", self.name));
            if String::from_utf8_lossy(&out.stdout).starts_with("local ") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{addr} in {} is still not routed locally after 10 s",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A multi-thread tokio runtime (2 workers, all drivers) every thread of which, workers
    /// and blocking pool alike, has entered this namespace, so sockets created by tasks and
    /// blocking closures on it live in the namespace.
    ///
    /// `block_on` runs its future on the calling thread, outside the namespace: spawn the
    /// work onto the runtime, or use [`block_on_in`]. Drop the runtime before the
    /// [`Topology`] (`shutdown_background` in async contexts).
    pub fn runtime(&self) -> tokio::runtime::Runtime {
        let fd = Arc::new(self.open());
        let name = self.name.clone();
        let enter = move || {
            if let Err(e) = setns(&*fd, CloneFlags::CLONE_NEWNET) {
                // Unwinding ends the thread before it can run anything outside the
                // namespace; the runtime then lacks a thread, and the test times out.
                panic!("runtime thread cannot enter network namespace {name}: {e}");
            }
        };
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name(format!("{}-rt", self.name))
            .on_thread_start(enter)
            .build()
            .unwrap_or_else(|e| panic!("building a runtime for {}: {e}", self.name))
    }

    /// Runs `f` on a fresh thread inside the namespace (to bind a std socket, say) and
    /// returns its result; a panic in `f` is resumed on the caller.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let fd = self.open();
        let name = &self.name;
        let joined = std::thread::scope(|s| {
            std::thread::Builder::new()
                .name(format!("{name}-run"))
                .spawn_scoped(s, move || {
                    setns(&fd, CloneFlags::CLONE_NEWNET)
                        .unwrap_or_else(|e| panic!("entering network namespace {name}: {e}"));
                    drop(fd);
                    f()
                })
                .expect("spawning a thread")
                .join()
        });
        joined.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// A command that runs `program` inside the namespace, as `ip netns exec <name>
    /// <program>`. `ip` execs the program, so the child's PID is the program's. Start it
    /// with [`Topology::spawn`] so that it dies with the topology.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Writes `/etc/netns/<name>/resolv.conf`, which `ip netns exec` bind-mounts over
    /// `/etc/resolv.conf` for the processes of [`Netns::command`] (not for [`Netns::run`] or
    /// [`Netns::runtime`]). Removed with the topology.
    pub fn set_resolv_conf(&self, text: &str) {
        let dir = self.etc_dir();
        let file = dir.join("resolv.conf");
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&file, text))
            .unwrap_or_else(|e| panic!("writing {}: {e}", file.display()));
    }

    /// `/etc/netns/<name>`.
    pub fn etc_dir(&self) -> PathBuf {
        PathBuf::from(ETC_NETNS_DIR).join(&self.name)
    }

    fn open(&self) -> File {
        File::open(self.path()).unwrap_or_else(|e| panic!("opening {}: {e}", self.path().display()))
    }
}

/// Runs `fut` on `rt`'s threads (which, for a [`Netns::runtime`], are inside the namespace)
/// and blocks the calling thread until it finishes; a panic in `fut` is resumed here.
pub fn block_on_in<F>(rt: &tokio::runtime::Runtime, fut: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match rt.block_on(rt.spawn(fut)) {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("task on the namespace runtime did not finish: {e}"),
    }
}

/// Networks A and B and the wan between them; see the [module docs](self).
pub struct Topology {
    /// `N` in every name and in 198.18.N.0/24.
    pub index: u8,
    pub a: Netns,
    pub b: Netns,
    pub wan: Netns,
    test_name: String,
    host_link: String,
    children: Mutex<Vec<Weak<Mutex<ChildSlot>>>>,
    /// Every VM, in the order added (tracked before it is built, so a failure half-way is
    /// cleaned up too).
    vms: Mutex<Vec<Vm>>,
}

/// A VM of a [`Topology`].
#[derive(Debug, Clone)]
struct Vm {
    net: Net,
    name: String,
    netns: Netns,
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology")
            .field("index", &self.index)
            .field("test_name", &self.test_name)
            .finish_non_exhaustive()
    }
}

impl Topology {
    /// Creates a fresh topology for `test_name`. `None` (after printing why the test is
    /// skipped) when not root or `ip` is missing or namespaces cannot be created; with
    /// `CI=true` that panics instead. Panics if the setup fails half-way, after removing
    /// what it had created.
    pub fn create(test_name: &str) -> Option<Topology> {
        if let Some(missing) = missing_requirement() {
            return skip(test_name, &missing);
        }
        let index = match claim_index() {
            Ok(index) => index,
            Err(Unavailable(why)) => return skip(test_name, &why),
        };
        let name = |suffix: char| format!("ist{index}{suffix}");
        let topo = Topology {
            index,
            a: Netns {
                name: name('a'),
                addr_link: WORKLOAD_LINK,
            },
            b: Netns {
                name: name('b'),
                addr_link: WORKLOAD_LINK,
            },
            wan: Netns {
                name: name('w'),
                addr_link: BRIDGE,
            },
            test_name: test_name.to_string(),
            host_link: name('h'),
            children: Mutex::new(Vec::new()),
            vms: Mutex::new(Vec::new()),
        };
        // From here on a panic drops `topo`, which removes whatever exists.
        topo.build();
        eprintln!("{test_name}: network namespace topology {index}");
        Some(topo)
    }

    fn build(&self) {
        let (w, a, b, host) = (
            self.wan.name(),
            self.a.name(),
            self.b.name(),
            self.host_link.as_str(),
        );
        // Leftovers of a run that was killed before it could tear down; holding `w`, this
        // index is ours.
        let _ = ip(&["link", "del", host]);
        for ns in owned_entries(NETNS_DIR, self.index) {
            if ns != w {
                let _ = ip(&["netns", "del", &ns]);
            }
        }
        for dir in owned_entries(ETC_NETNS_DIR, self.index) {
            let _ = std::fs::remove_dir_all(PathBuf::from(ETC_NETNS_DIR).join(dir));
        }
        ip_ok(&["netns", "add", a]);
        ip_ok(&["netns", "add", b]);

        ip_ok(&["-n", w, "link", "set", "lo", "up"]);
        ip_ok(&["-n", w, "link", "add", BRIDGE, "type", "bridge"]);
        ip_ok(&["-n", w, "link", "set", BRIDGE, "up"]);

        ip_ok(&[
            "link", "add", host, "type", "veth", "peer", "name", "vh", "netns", w,
        ]);
        ip_ok(&["-n", w, "link", "set", "vh", "master", BRIDGE, "up"]);
        let host_cidr = format!("{}/24", self.host_addr());
        ip_ok(&["addr", "add", &host_cidr, "dev", host]);
        ip_ok(&["link", "set", host, "up"]);

        for (net, port) in [(Net::A, "va"), (Net::B, "vb")] {
            let ns = self.netns(net).name();
            ip_ok(&["-n", ns, "link", "set", "lo", "up"]);
            ip_ok(&[
                "-n", w, "link", "add", port, "type", "veth", "peer", "name", WAN_LINK, "netns", ns,
            ]);
            ip_ok(&["-n", w, "link", "set", port, "master", BRIDGE, "up"]);
            let cidr = format!("{}/24", self.gateway_addr(net));
            ip_ok(&["-n", ns, "addr", "add", &cidr, "dev", WAN_LINK]);
            ip_ok(&["-n", ns, "link", "set", WAN_LINK, "up"]);

            let dummy = ["-n", ns, "link", "add", WORKLOAD_LINK, "type", "dummy"];
            if ip(&dummy).is_err() {
                // Kernels built without the dummy driver: a veth pair kept inside the
                // namespace holds addresses just as well.
                let peer = format!("{WORKLOAD_LINK}p");
                ip_ok(&[
                    "-n",
                    ns,
                    "link",
                    "add",
                    WORKLOAD_LINK,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &peer,
                ]);
                ip_ok(&["-n", ns, "link", "set", &peer, "up"]);
            }
            ip_ok(&["-n", ns, "link", "set", WORKLOAD_LINK, "up"]);
        }
    }

    /// The test this topology was created for.
    pub fn test_name(&self) -> &str {
        &self.test_name
    }

    /// The root namespace's address on the wan, 198.18.N.1: where processes in A and B
    /// reach services of the test process.
    pub fn host_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.index, 1)
    }

    /// The wan address of a network's gateway: 198.18.N.10 for A, 198.18.N.20 for B. The
    /// only addresses of a network reachable from the other.
    pub fn gateway_addr(&self, net: Net) -> Ipv4Addr {
        let host = match net {
            Net::A => 10,
            Net::B => 20,
        };
        Ipv4Addr::new(198, 18, self.index, host)
    }

    pub fn netns(&self, net: Net) -> &Netns {
        match net {
            Net::A => &self.a,
            Net::B => &self.b,
        }
    }

    /// The root namespace's end of the veth to the wan, `istNh`.
    pub fn host_link(&self) -> &str {
        &self.host_link
    }

    /// Adds a VM named `name` (unique in the topology) with address `ip` to network `net`:
    /// a namespace `istN<a|b>K` (K counting the network's VMs from 0) whose `eth0` holds
    /// `ip`/32, routed through the network's namespace as the [module docs](self#vms)
    /// describe. The VM reaches its network's addresses (its gateway's, its workloads'), the
    /// host address and the other network's gateway, masqueraded on the wan; never another
    /// network's workloads. [`Netns::add_ip`] on the VM adds addresses to `eth0` (not
    /// routed from the network). Removed with the topology.
    ///
    /// Panics if `nft` is missing (check with [`super::dns::require`]`("nft", "nftables")`
    /// first, to skip), if `name` is taken, or if the setup fails.
    pub fn add_vm(&self, net: Net, name: &str, ip: Ipv4Addr) -> Netns {
        assert!(
            super::dns::have("nft"),
            "{}: VMs need `nft` (apt-get install nftables)",
            self.test_name
        );
        let mut vms = self.vms.lock().unwrap_or_else(PoisonError::into_inner);
        assert!(
            vms.iter().all(|vm| vm.name != name),
            "{}: there is a VM named {name} already",
            self.test_name
        );
        let k = vms.iter().filter(|vm| vm.net == net).count();
        let vm = Netns {
            name: format!("ist{}{}{k}", self.index, net.letter()),
            addr_link: VM_LINK,
        };
        vms.push(Vm {
            net,
            name: name.to_string(),
            netns: vm.clone(),
        });
        if k == 0 {
            self.route_vms(net);
        }

        let (ns, v) = (self.netns(net).name(), vm.name());
        let port = format!("vm{k}");
        let next_hop = VM_NEXT_HOP.to_string();
        let cidr = format!("{ip}/32");
        let src = self.gateway_addr(net).to_string();
        ip_ok(&["netns", "add", v]);
        ip_ok(&["-n", v, "link", "set", "lo", "up"]);
        ip_ok(&[
            "-n", ns, "link", "add", &port, "type", "veth", "peer", "name", VM_LINK, "netns", v,
        ]);
        // The same next hop on every VM's veth: each VM sees one router, the network.
        ip_ok(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{next_hop}/32"),
            "dev",
            &port,
            "scope",
            "link",
        ]);
        ip_ok(&["-n", ns, "link", "set", &port, "up"]);
        ip_ok(&["-n", ns, "route", "add", &cidr, "dev", &port, "src", &src]);
        ip_ok(&["-n", v, "addr", "add", &cidr, "dev", VM_LINK]);
        ip_ok(&["-n", v, "link", "set", VM_LINK, "up"]);
        ip_ok(&[
            "-n", v, "route", "add", "default", "via", &next_hop, "dev", VM_LINK, "onlink",
        ]);
        eprintln!(
            "{}: VM {name} ({ip}) in namespace {v}, on network {}",
            self.test_name,
            net.letter().to_ascii_uppercase()
        );
        vm
    }

    /// Lets a network's namespace carry its VMs' traffic: forwarding on there (only), and
    /// what a VM sends out of the wan masqueraded to the network's wan address, since
    /// nothing outside can route back to VM addresses.
    fn route_vms(&self, net: Net) {
        let ns = self.netns(net);
        ns.run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))
            .unwrap_or_else(|e| panic!("turning forwarding on in {}: {e}", ns.name()));
        // `fib saddr type != local`: forwarded packets only, not the namespace's own.
        let rules = format!(
            "table {NFT_TABLE} {{
                chain postrouting {{
                    type nat hook postrouting priority srcnat; policy accept;
                    oifname \"{WAN_LINK}\" fib saddr type != local masquerade
                }}
            }}
            "
        );
        nft_ok(ns, &rules);
    }

    /// Starts `cmd` (typically from [`Netns::command`]); the process is killed when the
    /// guard or this topology is dropped, whichever comes first.
    pub fn spawn(&self, mut cmd: Command) -> std::io::Result<ChildGuard> {
        let child = cmd.spawn()?;
        let pid = child.id();
        let slot = Arc::new(Mutex::new(ChildSlot {
            child,
            status: None,
        }));
        let mut children = self.children.lock().unwrap_or_else(PoisonError::into_inner);
        children.retain(|c| c.strong_count() > 0);
        children.push(Arc::downgrade(&slot));
        Ok(ChildGuard { pid, slot })
    }

    /// `ip netns pids`: processes in a namespace, other than this one.
    fn pids_in(&self, ns: &Netns) -> Vec<i32> {
        let own = std::process::id() as i32;
        ip_output(&["netns", "pids", ns.name()])
            .map(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .filter(|&p| p != own)
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Processes hold a namespace (and so its interfaces) alive after `ip netns del`.
        let children = std::mem::take(
            self.children
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for slot in children.iter().filter_map(Weak::upgrade) {
            slot.lock().unwrap_or_else(PoisonError::into_inner).reap();
        }
        // VMs first, wan last.
        let vms = std::mem::take(self.vms.get_mut().unwrap_or_else(PoisonError::into_inner));
        let all: Vec<&Netns> = vms
            .iter()
            .map(|vm| &vm.netns)
            .chain([&self.a, &self.b, &self.wan])
            .collect();
        // Whatever else runs there: grandchildren, commands spawned without `spawn`. They
        // are not our children, so they are not reaped here.
        for ns in &all {
            for pid in self.pids_in(ns) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        // Deleting a namespace destroys its interfaces only later, in the kernel's own
        // time; deleting this end now takes its peer in wan with it. VM veths have no end
        // here.
        let _ = ip(&["link", "del", &self.host_link]);
        // The /etc/netns directories first: once `istNw` is gone, the index (and its
        // names) may be someone else's.
        for ns in &all {
            match std::fs::remove_dir_all(ns.etc_dir()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => eprintln!(
                    "{}: cannot remove {}: {e}",
                    self.test_name,
                    ns.etc_dir().display()
                ),
                _ => {}
            }
        }
        for ns in &all {
            let _ = ip(&["netns", "del", ns.name()]);
        }
        let left: Vec<&str> = all
            .iter()
            .filter(|ns| ns.path().exists() || ns.etc_dir().exists())
            .map(|ns| ns.name())
            .collect();
        let link_left = ip(&["link", "show", "dev", &self.host_link]).is_ok();
        if !left.is_empty() || link_left {
            eprintln!(
                "{}: teardown of topology {} left namespaces or their /etc/netns directories \
                 {left:?}{}",
                self.test_name,
                self.index,
                if link_left {
                    format!(" and interface {}", self.host_link)
                } else {
                    String::new()
                }
            );
        }
    }
}

struct ChildSlot {
    child: Child,
    /// Set once reaped; afterwards the PID may belong to another process.
    status: Option<ExitStatus>,
}

impl ChildSlot {
    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// SIGKILL unless already reaped, and reap.
    fn reap(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        self.status
    }
}

/// A process started by [`Topology::spawn`]: SIGKILLed and reaped when dropped (or when its
/// topology is dropped, if that comes first). Signals are sent only while the process has
/// not been reaped, so they can never reach another process that reused the PID.
pub struct ChildGuard {
    pid: u32,
    slot: Arc<Mutex<ChildSlot>>,
}

impl std::fmt::Debug for ChildGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildGuard")
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, ChildSlot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `signal`; `ESRCH` once the process has been reaped.
    pub fn signal(&self, signal: Signal) -> nix::Result<()> {
        let slot = self.slot();
        if slot.status.is_some() {
            return Err(nix::errno::Errno::ESRCH);
        }
        kill(Pid::from_raw(self.pid as i32), signal)
    }

    /// The exit status if the process has exited (reaping it).
    pub fn try_wait(&self) -> Option<ExitStatus> {
        self.slot().try_wait()
    }

    /// Waits at most `timeout` for the process to exit.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL (unless it already exited) and reap.
    pub fn kill(&self) -> Option<ExitStatus> {
        self.slot().reap()
    }

    /// The child's stdin, if it was piped and not taken yet.
    pub fn take_stdin(&self) -> Option<ChildStdin> {
        self.slot().child.stdin.take()
    }

    /// The child's stdout, if it was piped and not taken yet.
    pub fn take_stdout(&self) -> Option<ChildStdout> {
        self.slot().child.stdout.take()
    }

    /// The child's stderr, if it was piped and not taken yet.
    pub fn take_stderr(&self) -> Option<ChildStderr> {
        self.slot().child.stderr.take()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.slot().reap();
    }
}

/// Why namespaces cannot be used here.
struct Unavailable(String);

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// `None` in CI (after panicking), with the skip message printed otherwise.
fn skip(test_name: &str, why: &str) -> Option<Topology> {
    if in_ci() {
        panic!("{test_name}: network namespaces are needed but {why}, and CI=true: run the tests as root with iproute2 installed");
    }
    eprintln!("SKIPPED: {test_name}: network namespaces are needed but {why}; set CI=true to make this a failure");
    None
}

fn missing_requirement() -> Option<String> {
    if !super::dns::have("ip") {
        return Some("`ip` is not installed (apt-get install iproute2)".to_string());
    }
    match effective_uid() {
        Some(0) => None,
        Some(uid) => Some(format!("the tests run as uid {uid}, not root")),
        None => Some("the effective uid is unknown (no /proc/self/status)".to_string()),
    }
}

/// The effective uid, from the second field of `Uid:` in `/proc/self/status`.
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Where the next claim in this process starts; also serializes claims within the process.
static NEXT_INDEX: Mutex<Option<usize>> = Mutex::new(None);

/// Claims the first free index from a round-robin cursor (random at first, so concurrent
/// test processes do not all contend for index 1), by creating `istNw`.
fn claim_index() -> Result<u8, Unavailable> {
    use rand::Rng;
    let mut next = NEXT_INDEX.lock().unwrap_or_else(PoisonError::into_inner);
    let start = *next.get_or_insert_with(|| rand::thread_rng().gen_range(0..MAX_INDEX));
    for i in 0..MAX_INDEX {
        let slot = (start + i) % MAX_INDEX;
        let index = slot + 1;
        let wan = format!("ist{index}w");
        match ip(&["netns", "add", &wan]) {
            Ok(()) => {
                *next = Some((slot + 1) % MAX_INDEX);
                return Ok(u8::try_from(index).expect("index fits a u8"));
            }
            Err(e) if e.contains("File exists") => continue,
            Err(e) => return Err(Unavailable(format!("`ip netns add` fails ({e})"))),
        }
    }
    panic!(
        "all {MAX_INDEX} topology indices are taken (ist1w..ist{MAX_INDEX}w exist): leftovers? \
         `ip netns list`; remove them with `ip -all netns del` if nothing else uses namespaces"
    )
}

fn ip_output(args: &[&str]) -> std::io::Result<Output> {
    Command::new("ip")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
}

/// Runs `ip args`; the error says which command failed and what it printed.
fn ip(args: &[&str]) -> Result<(), String> {
    let cmdline = format!("`ip {}`", args.join(" "));
    match ip_output(args) {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "{cmdline} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("{cmdline} could not run: {e}")),
    }
}

fn ip_ok(args: &[&str]) {
    if let Err(e) = ip(args) {
        panic!("setting up network namespaces: {e}");
    }
}

/// Runs `nft -f -` with `rules` inside `ns`; panics with what nft printed if it fails.
fn nft_ok(ns: &Netns, rules: &str) {
    use std::io::Write as _;
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running nft in {}: {e}", ns.name()));
    let written = child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(rules.as_bytes());
    let out = child.wait_with_output().expect("waiting for nft");
    if let Err(e) = written {
        panic!("writing rules to nft in {}: {e}", ns.name());
    }
    assert!(
        out.status.success(),
        "setting up network namespaces: `nft -f -` in {} failed ({}): {}\nrules: {rules}",
        ns.name(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Whether `name` is one of topology `index`'s: `ist<index>` followed by a letter (so
/// `ist1a0` is topology 1's, `ist12a` is not).
pub fn owned_by(index: u8, name: &str) -> bool {
    name.strip_prefix(&format!("ist{index}"))
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_alphabetic()))
}

/// The entries of `dir` that belong to topology `index` (see [`owned_by`]).
fn owned_entries(dir: &str, index: u8) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|name| owned_by(index, name))
                .collect()
        })
        .unwrap_or_default()
}
