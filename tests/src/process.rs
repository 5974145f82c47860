//! Child processes the tests and benchmark drivers start (servers, peers, proxies): each is
//! stopped by its own PID when its handle drops, however the caller ends — SIGTERM first,
//! so it can shut down cleanly, then SIGKILL if it lingers — and always reaped.

use std::ops::{Deref, DerefMut};
use std::process::Child;
use std::time::{Duration, Instant};

/// How long a process gets after SIGTERM before it is killed.
const GRACE: Duration = Duration::from_secs(5);

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

/// The value after `name` on the command line, or `default` (benchmark drivers' flags).
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}
