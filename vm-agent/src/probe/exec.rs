//! The `exec` probe: the command runs without a shell, stdin and stdout closed, and passes when
//! it exits 0. It runs in a process group of its own, so that on timeout the agent kills the
//! command and whatever it started (the group is the command's own PID), then reaps it; a
//! probe never leaves a process behind.

use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;

/// This much of the command's stderr is kept for the failure's reason.
const MAX_REASON: usize = 200;
/// Stderr beyond this is read and dropped, so a chatty command never blocks on a full pipe.
const MAX_STDERR: usize = 4096;
/// How long stderr is still read once the command has exited.
const STDERR_GRACE: Duration = Duration::from_millis(100);

/// The exec probe's command: no stdin or stdout, stderr kept for the reason, its own process
/// group, and not the agent's systemd variables (a probe must never ping the agent's
/// watchdog).
pub(super) fn command(program: &str, args: &[String]) -> tokio::process::Command {
    let mut cmd = std::process::Command::new(program);
    crate::notify::without_notify_env(&mut cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut cmd = tokio::process::Command::from(cmd);
    // If the probe itself is dropped (the group changed, shutdown), the command goes too.
    cmd.kill_on_drop(true);
    cmd
}

/// Runs `command` once, allowing it `timeout`; `Err` says why it failed.
pub(super) async fn run(command: &[String], timeout: Duration) -> Result<(), String> {
    let Some((program, args)) = command.split_first() else {
        return Err("exec probe without a command".into());
    };
    let mut child = self::command(program, args)
        .spawn()
        .map_err(|e| format!("exec {program}: {e}"))?;
    let pid = child.id();
    let stderr = child.stderr.take();
    // Read in a task of its own: a process the command left behind may hold the pipe open
    // after the command has exited, and its exit is what counts.
    let mut stderr = tokio::spawn(read_stderr(stderr));
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(format!("exec {program}: {e}")),
        Err(_) => {
            if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                // The whole group: the command and whatever it started. (It may be gone
                // already, having exited just now: nothing to do then.)
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            // Kills the command by its PID if the group kill missed it, and reaps it.
            let _ = child.kill().await;
            stderr.abort();
            return Err(format!(
                "exec {program}: still running after {timeout:?}; killed it (pid {})",
                pid.unwrap_or_default()
            ));
        }
    };
    if status.success() {
        stderr.abort();
        return Ok(());
    }
    let err = match tokio::time::timeout(STDERR_GRACE, &mut stderr).await {
        Ok(Ok(err)) => err,
        _ => {
            stderr.abort();
            Vec::new()
        }
    };
    let err = String::from_utf8_lossy(&err);
    let err: String = err.trim().chars().take(MAX_REASON).collect();
    Err(if err.is_empty() {
        format!("exec {program}: {status}")
    } else {
        format!("exec {program}: {status}: {err}")
    })
}

async fn read_stderr(stderr: Option<tokio::process::ChildStderr>) -> Vec<u8> {
    let mut kept = Vec::new();
    let Some(mut s) = stderr else {
        return kept;
    };
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = MAX_STDERR.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}
