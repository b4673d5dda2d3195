//! Child-process plumbing shared by the throwaway servers: finding binaries,
//! signalling, bounded waits and reading the tail of a log.

use super::HarnessError;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Finds `name` in the first of `dirs` that has it, then on `PATH`.
pub(super) fn find_binary(name: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    dirs.iter()
        .chain(path_dirs.iter())
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Sends `signal` to the child. A child that already exited is not an error.
pub(super) fn signal(child: &Child, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions; a stale pid of our own
    // un-reaped child cannot have been reused, since we have not waited on it.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Waits for the child to exit, up to `timeout`; kills it with SIGKILL after that.
pub(super) fn wait_or_kill(child: &mut Child, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Polls `ready` every 20 ms until it holds, and hands the child back. Gives
/// up when `timeout` passes or the child exits (it will never be ready then):
/// the child is killed and the error carries the tail of its log.
pub(super) fn ready_or_kill(
    mut child: Child,
    what: &str,
    timeout: Duration,
    log: &Path,
    mut ready: impl FnMut() -> bool,
) -> Result<Child, HarnessError> {
    let deadline = Instant::now() + timeout;
    let exit = loop {
        if ready() {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            break format!(" ({status})");
        }
        if Instant::now() >= deadline {
            break String::new();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    Err(HarnessError::NotReady {
        what: format!("{what}{exit}"),
        timeout,
        log: log_tail(log, 20),
    })
}

/// The last `lines` lines of a log file, for error messages.
fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The numeric uid and gid of a user, asked of `id` so NSS is honoured.
pub(super) fn user_ids(user: &str) -> Result<(u32, u32), HarnessError> {
    let ask = |flag: &str| -> Result<u32, HarnessError> {
        let output = std::process::Command::new("id")
            .args([flag, user])
            .output()
            .map_err(HarnessError::io("running id"))?;
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .map_err(|_| HarnessError::NotFound {
                what: format!("user {user}"),
                hint: "initdb refuses to run as root; install Debian's postgresql, which creates the postgres user"
                    .into(),
            })
    };
    Ok((ask("-u")?, ask("-g")?))
}

/// Asks the kernel to SIGKILL the child when the thread that spawned it exits,
/// so a test run killed from outside leaves no server behind.
pub(super) fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe and the closure allocates nothing.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// A bare HTTP/1.0 GET on loopback: (status, body).
pub(super) fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(300))
            .ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}
