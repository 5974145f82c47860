//! Child processes the tests and benchmark drivers start (servers, peers, proxies): each is
//! stopped by its own PID when its handle drops, however the caller ends — SIGTERM first,
//! so it can shut down cleanly, then SIGKILL if it lingers — and always reaped.

use std::net::{TcpListener, UdpSocket};
use std::ops::{Deref, DerefMut};
use std::process::Child;
use std::time::{Duration, Instant};

/// How long a process gets after SIGTERM before it is killed.
const GRACE: Duration = Duration::from_secs(5);

/// A loopback port free at the moment for both TCP and UDP, for a server a test starts.
///
/// It is picked below the kernel's ephemeral range: a port the kernel hands out
/// (`bind(0)`) can be handed out again, to any process's outgoing connection, before the
/// server binds it (or binds it again on a restart); one below that range is only ever
/// taken by a listener that asks for it by number.
pub fn free_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768)
        .max(2048);
    loop {
        let port = 1024 + rand::random::<u16>() % (low - 1024);
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
}

#[derive(Debug)]
pub struct ServerProcess(Child);

impl ServerProcess {
    pub fn new(child: Child) -> Self {
        Self(child)
    }
}

impl Deref for ServerProcess {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for ServerProcess {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.0.try_wait() {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The workspace's programs, as (package, binary).
pub const PROGRAMS: &[(&str, &str)] = &[
    ("isthmus-gateway", "isthmus-gateway"),
    ("isthmus-dns", "isthmus-dns"),
    ("isthmus-registry", "isthmus-registry"),
    ("isthmus-registry", "isthmusctl"),
    ("isthmus-vm-agent", "isthmus-vm-agent"),
    ("isthmus-sample-app", "sample-app"),
];

/// The workspace binary `bin` of `package`, next to the running test's executable; built
/// first (a no-op when it is fresh), so a test never runs a stale build of another crate.
///
/// Every program is built in one `cargo build`, once per test process: each `cargo build
/// -p X` alone resolves the features of shared dependencies for X only, so building the
/// programs one package at a time compiled those dependencies (Kubernetes' types among
/// them) once per package on a fresh checkout.
pub fn workspace_binary(package: &str, bin: &str) -> std::path::PathBuf {
    static BUILT: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    assert!(
        PROGRAMS.contains(&(package, bin)),
        "{package}/{bin} is not one of the workspace's programs (harness::process::PROGRAMS)"
    );
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps");
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !*built {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "-q"]);
        for (package, bin) in PROGRAMS {
            cmd.args(["-p", package, "--bin", bin]);
        }
        if dir.file_name().and_then(|n| n.to_str()) == Some("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("cargo build");
        assert!(status.success(), "cannot build the workspace's programs");
        *built = true;
    }
    dir.join(bin)
}
