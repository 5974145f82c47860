//! The systemd notification protocol (`sd_notify(3)`), spoken directly so the agent needs no
//! libsystemd: one datagram of `KEY=value` lines to the socket named by `NOTIFY_SOCKET`.
//! The agent is a `Type=notify` service; it says READY once its certificate, catalog and
//! DNS are up, pings the watchdog while its data plane is healthy, and writes STATUS lines
//! an operator reads in `systemctl status`.
//!
//! Without `NOTIFY_SOCKET` (not started by systemd, or started by hand) every call is a
//! no-op that succeeds, so the agent runs the same anywhere.
//!
//! A notification is a courtesy to the service manager, never something the agent waits
//! for: the socket is non-blocking, so a send returns at once. When systemd's queue is full
//! the notification is dropped, counted in [`Notifier::dropped`], and the error returned for
//! the caller to log; the next status or watchdog ping replaces it.
//!
//! An environment that systemd did not write (a `WATCHDOG_USEC` that is not a number, a
//! socket address that is not a path) is an error naming every bad variable and its value,
//! not a warning: a watchdog that silently never arms, or a READY that never arrives, would
//! only show up later as a restart loop. A caller that prefers to run anyway can fall back to
//! [`Notifier::disabled`].

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use isthmus_proto::config::{ConfigProblems, FieldProblem};

/// Where systemd listens: an absolute path, or an abstract socket name after `@`.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// The watchdog timeout in microseconds (`WatchdogSec=`).
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// The process the watchdog is meant for; when unset, whoever reads `WATCHDOG_USEC`.
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";
/// The variables above. Child processes (such as `nft`) should be started without them so
/// they never mistake the agent's watchdog for their own.
pub const ENV_VARS: [&str; 3] = [NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID];

/// Removes [`ENV_VARS`] from what `cmd` passes to its child: every process the agent starts
/// (`nft`, exec probes) is started through this.
pub fn without_notify_env(cmd: &mut std::process::Command) -> &mut std::process::Command {
    for var in ENV_VARS {
        cmd.env_remove(var);
    }
    cmd
}

/// The longest notification systemd accepts: it reads one pipe buffer's worth
/// (`PIPE_BUF`) and ignores a longer datagram entirely.
pub const MAX_MESSAGE_LEN: usize = 4096;
/// `STATUS=` text is cut to this many bytes, so that it always fits in one notification
/// beside other fields and reads as one line in `systemctl status`.
pub const MAX_STATUS_LEN: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(
        "invalid systemd notification environment: {} (these are set by systemd for a \
         Type=notify service; unset them to run without systemd)",
        FieldProblem::join(&.0.problems)
    )]
    Env(ConfigProblems),
    #[error("cannot create the socket for systemd notifications: {0}")]
    Socket(#[source] io::Error),
}

/// Sends notifications to systemd. Shared by reference (`Arc`) between the tasks that
/// report; every method takes `&self`.
#[derive(Debug)]
pub struct Notifier {
    target: Option<Target>,
    /// The full watchdog timeout, when systemd runs a watchdog for this process.
    watchdog_timeout: Option<Duration>,
    dropped: AtomicU64,
}

#[derive(Debug)]
struct Target {
    /// Unbound: systemd identifies the sender by the credentials the kernel attaches.
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// A notifier that does nothing: no systemd to tell.
    pub fn disabled() -> Self {
        Self {
            target: None,
            watchdog_timeout: None,
            dropped: AtomicU64::new(0),
        }
    }

    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the process
    /// environment; see [`Notifier::from_vars`].
    pub fn from_env() -> Result<Self, NotifyError> {
        let mut problems = ConfigProblems::default();
        let mut read = |name: &str| match std::env::var(name) {
            Ok(value) => Some(value),
            Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(value)) => {
                problems.push(name, format!("{value:?} is not valid UTF-8"));
                None
            }
        };
        let socket = read(NOTIFY_SOCKET);
        let usec = read(WATCHDOG_USEC);
        let pid = read(WATCHDOG_PID);
        Self::parse(
            socket.as_deref(),
            usec.as_deref(),
            pid.as_deref(),
            std::process::id(),
            problems,
        )
    }

    /// A notifier from the values of `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`
    /// (`None` when unset; an empty value counts as unset), for the process `our_pid`.
    ///
    /// The watchdog applies only when `WATCHDOG_PID` is unset or equals `our_pid`, and only
    /// when there is a socket to ping. Every invalid value is reported, with its variable,
    /// in one [`NotifyError::Env`].
    pub fn from_vars(
        notify_socket: Option<&str>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        our_pid: u32,
    ) -> Result<Self, NotifyError> {
        Self::parse(
            notify_socket,
            watchdog_usec,
            watchdog_pid,
            our_pid,
            ConfigProblems::default(),
        )
    }

    fn parse(
        notify_socket: Option<&str>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        our_pid: u32,
        mut problems: ConfigProblems,
    ) -> Result<Self, NotifyError> {
        fn set(v: Option<&str>) -> Option<&str> {
            v.filter(|v| !v.is_empty())
        }

        let addr = set(notify_socket).and_then(|value| {
            parse_socket_addr(value)
                .map_err(|why| problems.push(NOTIFY_SOCKET, why))
                .ok()
        });

        let timeout = set(watchdog_usec).and_then(|value| match value.parse::<u64>() {
            // 0 means "no watchdog" and u64::MAX "infinity" to systemd; it never sends either.
            Ok(usec) if usec > 0 && usec < u64::MAX => Some(Duration::from_micros(usec)),
            _ => {
                problems.push(
                    WATCHDOG_USEC,
                    format!("{value:?} is not a number of microseconds greater than zero"),
                );
                None
            }
        });

        let for_us = match set(watchdog_pid) {
            None => true,
            Some(value) => match value.parse::<u32>() {
                Ok(pid) if pid > 0 => pid == our_pid,
                _ => {
                    problems.push(WATCHDOG_PID, format!("{value:?} is not a process id"));
                    false
                }
            },
        };

        if !problems.is_empty() {
            return Err(NotifyError::Env(problems));
        }
        let Some(addr) = addr else {
            return Ok(Self::disabled());
        };
        let socket = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
        socket.set_nonblocking(true).map_err(NotifyError::Socket)?;
        Ok(Self {
            target: Some(Target { socket, addr }),
            watchdog_timeout: timeout.filter(|_| for_us),
            dropped: AtomicU64::new(0),
        })
    }

    /// Whether notifications go anywhere (`NOTIFY_SOCKET` was set).
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often to call [`Notifier::watchdog`]: half the watchdog timeout, as
    /// `sd_watchdog_enabled(3)` recommends, or `None` when systemd runs no watchdog for this
    /// process (or notifications are disabled).
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog_timeout.map(|t| t / 2)
    }

    /// How many notifications could not be sent (systemd's queue full, or the socket gone).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// `READY=1`: startup is complete.
    pub fn ready(&self) -> io::Result<()> {
        self.send(&[("READY", "1")])
    }

    /// `STATUS=…`: one line for `systemctl status`. Line breaks become spaces and text past
    /// [`MAX_STATUS_LEN`] bytes is cut.
    pub fn status(&self, status: &str) -> io::Result<()> {
        self.send(&[("STATUS", truncate(status, MAX_STATUS_LEN))])
    }

    /// `STOPPING=1`: shutdown has begun (draining).
    pub fn stopping(&self) -> io::Result<()> {
        self.send(&[("STOPPING", "1")])
    }

    /// `WATCHDOG=1`: still healthy. Sent whenever there is a socket, as `sd_notify` does;
    /// systemd ignores it when it runs no watchdog for us.
    pub fn watchdog(&self) -> io::Result<()> {
        self.send(&[("WATCHDOG", "1")])
    }

    /// `WATCHDOG=trigger`: act as if the watchdog had expired (the agent knows it is stuck,
    /// so systemd applies the unit's restart policy now rather than at the timeout).
    pub fn watchdog_trigger(&self) -> io::Result<()> {
        self.send(&[("WATCHDOG", "trigger")])
    }

    /// One notification of several fields, e.g. `[("READY", "1"), ("STATUS", "serving")]`.
    ///
    /// Line breaks in values become spaces (a value is one line of the protocol). A key
    /// that is empty or contains `=`, a line break or NUL, or a message longer than
    /// [`MAX_MESSAGE_LEN`], is `InvalidInput` — checked even when notifications are
    /// disabled, so a bad call shows up outside systemd too. Never blocks: a notification
    /// systemd has no room for is dropped, counted and returned as `WouldBlock`.
    pub fn send(&self, fields: &[(&str, &str)]) -> io::Result<()> {
        let message = encode(fields)?;
        let Some(target) = &self.target else {
            return Ok(());
        };
        match target.socket.send_to_addr(message.as_bytes(), &target.addr) {
            Ok(_) => Ok(()),
            Err(e) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }
}

fn parse_socket_addr(value: &str) -> Result<SocketAddr, String> {
    let unusable = |why: io::Error| format!("{value:?} is not a usable socket address: {why}");
    if let Some(name) = value.strip_prefix('@') {
        SocketAddr::from_abstract_name(name.as_bytes()).map_err(unusable)
    } else if value.starts_with('/') {
        SocketAddr::from_pathname(value).map_err(unusable)
    } else {
        Err(format!(
            "{value:?} is neither an absolute path nor an abstract socket name starting with @ \
             (other address kinds, such as vsock, are not supported)"
        ))
    }
}

fn encode(fields: &[(&str, &str)]) -> io::Result<String> {
    let mut message = String::new();
    for (key, value) in fields {
        if key.is_empty() || key.contains(['=', '\n', '\r', '\0']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{key:?} is not a notification field name"),
            ));
        }
        if !message.is_empty() {
            message.push('\n');
        }
        message.push_str(key);
        message.push('=');
        message.extend(value.chars().filter_map(|c| match c {
            '\n' | '\r' => Some(' '),
            '\0' => None,
            c => Some(c),
        }));
    }
    if message.len() > MAX_MESSAGE_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a notification of {} bytes is longer than systemd accepts ({MAX_MESSAGE_LEN})",
                message.len()
            ),
        ));
    }
    Ok(message)
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A socket standing in for systemd's, bound at `path` in a fresh directory.
    fn systemd_socket() -> (tempfile::TempDir, UnixDatagram, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (dir, socket, path.to_str().unwrap().to_string())
    }

    fn received(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; MAX_MESSAGE_LEN + 1];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    fn nothing_more(socket: &UnixDatagram) {
        socket.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 16];
        let err = socket.recv(&mut buf).expect_err("no further notification");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    fn notifier(path: &str) -> Notifier {
        Notifier::from_vars(Some(path), None, None, std::process::id()).unwrap()
    }

    fn problems(err: NotifyError) -> Vec<FieldProblem> {
        match err {
            NotifyError::Env(problems) => problems.problems,
            other => panic!("expected an environment error, got {other}"),
        }
    }

    #[test]
    fn each_notification_is_one_datagram_of_exact_bytes() {
        let (_dir, systemd, path) = systemd_socket();
        let n = notifier(&path);
        assert!(n.is_enabled());

        n.ready().unwrap();
        assert_eq!(received(&systemd), "READY=1");
        n.status("catalog: 12 services, registry reachable")
            .unwrap();
        assert_eq!(
            received(&systemd),
            "STATUS=catalog: 12 services, registry reachable"
        );
        n.stopping().unwrap();
        assert_eq!(received(&systemd), "STOPPING=1");
        n.watchdog().unwrap();
        assert_eq!(received(&systemd), "WATCHDOG=1");
        n.watchdog_trigger().unwrap();
        assert_eq!(received(&systemd), "WATCHDOG=trigger");
        n.send(&[("READY", "1"), ("STATUS", "serving")]).unwrap();
        assert_eq!(received(&systemd), "READY=1\nSTATUS=serving");
        nothing_more(&systemd);
        assert_eq!(n.dropped(), 0);
    }

    #[test]
    fn status_is_one_bounded_line() {
        let (_dir, systemd, path) = systemd_socket();
        let n = notifier(&path);

        n.status("registry unreachable\nserving from snapshot\r\n")
            .unwrap();
        assert_eq!(
            received(&systemd),
            "STATUS=registry unreachable serving from snapshot  "
        );

        // Cut on a character boundary: 'é' is two bytes and would straddle the limit.
        let long = format!("{}é{}", "a".repeat(MAX_STATUS_LEN - 1), "b".repeat(5000));
        n.status(&long).unwrap();
        let got = received(&systemd);
        assert_eq!(got, format!("STATUS={}", "a".repeat(MAX_STATUS_LEN - 1)));
    }

    #[test]
    fn bad_fields_are_refused_even_without_systemd() {
        let (_dir, systemd, path) = systemd_socket();
        for n in [notifier(&path), Notifier::disabled()] {
            for key in ["", "A=B", "A\nB", "A\0"] {
                let err = n.send(&[(key, "1")]).unwrap_err();
                assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "key {key:?}");
            }
            let huge = "x".repeat(MAX_MESSAGE_LEN);
            let err = n.send(&[("STATUS", &huge)]).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            assert!(err.to_string().contains("4096"), "{err}");
        }
        nothing_more(&systemd);
    }

    #[test]
    fn abstract_socket() {
        let name = format!(
            "isthmus-notify-test-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        );
        let systemd =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        systemd
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let n = notifier(&format!("@{name}"));
        n.ready().unwrap();
        assert_eq!(received(&systemd), "READY=1");
    }

    #[test]
    fn without_notify_socket_everything_is_a_no_op() {
        for socket in [None, Some("")] {
            let n = Notifier::from_vars(socket, Some("30000000"), None, 42).unwrap();
            assert!(!n.is_enabled());
            assert_eq!(n.watchdog_interval(), None);
            n.ready().unwrap();
            n.status("hello").unwrap();
            n.stopping().unwrap();
            n.watchdog().unwrap();
            n.watchdog_trigger().unwrap();
            n.send(&[("READY", "1"), ("STATUS", "x")]).unwrap();
            assert_eq!(n.dropped(), 0);
        }
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout() {
        let (_dir, _systemd, path) = systemd_socket();
        let n = Notifier::from_vars(Some(&path), Some("30000000"), None, 42).unwrap();
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(15)));
        let n = Notifier::from_vars(Some(&path), Some("30000000"), Some("42"), 42).unwrap();
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(15)));
        let n = Notifier::from_vars(Some(&path), None, Some("42"), 42).unwrap();
        assert_eq!(n.watchdog_interval(), None);
    }

    #[test]
    fn a_watchdog_for_another_process_is_not_ours() {
        let (_dir, _systemd, path) = systemd_socket();
        let n = Notifier::from_vars(Some(&path), Some("30000000"), Some("43"), 42).unwrap();
        assert!(n.is_enabled());
        assert_eq!(n.watchdog_interval(), None);
    }

    #[test]
    fn garbage_is_an_error_naming_the_variable_and_value() {
        let (_dir, _systemd, path) = systemd_socket();
        for usec in ["soon", "-5", "0", "18446744073709551615", "1.5"] {
            let err = Notifier::from_vars(Some(&path), Some(usec), None, 42).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(WATCHDOG_USEC), "{text}");
            assert!(text.contains(&format!("{usec:?}")), "{text}");
        }

        // Every bad variable at once, not just the first.
        let err =
            Notifier::from_vars(Some("run/notify"), Some("30s"), Some("self"), 42).unwrap_err();
        let fields: Vec<String> = problems(err).into_iter().map(|p| p.field).collect();
        assert_eq!(fields, [NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID]);
    }

    /// The child is started without the agent's systemd variables, whatever the agent's own
    /// environment holds.
    pub(crate) fn assert_no_notify_env(cmd: &std::process::Command) {
        for var in ENV_VARS {
            let set = cmd
                .get_envs()
                .find(|(k, _)| *k == std::ffi::OsStr::new(var))
                .map(|(_, v)| v);
            assert_eq!(set, Some(None), "{var} is not removed for the child");
        }
    }

    #[test]
    fn children_do_not_inherit_the_notify_variables() {
        let mut cmd = std::process::Command::new("true");
        assert_no_notify_env(without_notify_env(&mut cmd));

        let long = format!("/{}", "x".repeat(200));
        let err = Notifier::from_vars(Some(&long), None, None, 42).unwrap_err();
        assert_eq!(problems(err)[0].field, NOTIFY_SOCKET);
        let err = Notifier::from_vars(Some("vsock:2:1234"), None, None, 42).unwrap_err();
        assert!(err.to_string().contains("vsock"), "{err}");
    }

    #[test]
    fn a_full_queue_drops_without_blocking() {
        let (_dir, systemd, path) = systemd_socket();
        let n = notifier(&path);
        // Nobody reads: the receiver's queue fills and a send must fail at once, not wait.
        let started = std::time::Instant::now();
        let mut sent = 0;
        let err = loop {
            match n.watchdog() {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent < 1_000_000, "the queue never filled");
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(n.dropped(), 1);
        assert!(started.elapsed() < Duration::from_secs(5));
        // What was queued is intact.
        assert_eq!(received(&systemd), "WATCHDOG=1");
    }

    #[test]
    fn a_missing_socket_is_a_counted_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone");
        let n = notifier(path.to_str().unwrap());
        assert!(n.ready().is_err());
        assert_eq!(n.dropped(), 1);
    }
}
