//! Child processes of the harness: tied to the test thread that started them, killed
//! when dropped, rendered for logs; and what `/proc` says about a running backend.

use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

/// Kills (SIGKILL) and reaps the child when dropped.
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    /// Kills and reaps the child now (if it is still ours).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Children die with the thread that started them (test threads end when the
/// test ends), so nothing outlives an interrupted test run.
pub(super) fn set_pdeathsig(cmd: &mut Command) {
    // SAFETY: the closure only calls prctl, which is async-signal-safe and
    // touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A shell-like rendering of a command, for logs.
pub fn command_line(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// `VmRSS` of a process in KiB (from `/proc/PID/status`).
pub fn proc_rss_kib(pid: u32) -> io::Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no VmRSS in /proc/{pid}/status")))
}

/// Number of open file descriptors of a process (entries of `/proc/PID/fd`).
pub fn proc_fd_count(pid: u32) -> io::Result<usize> {
    Ok(fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// The targets of a process's open file descriptors (`/proc/PID/fd/*`), sorted: for
/// messages when the count is off.
pub fn proc_fd_targets(pid: u32) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    let t = fs::read_link(e.path())
                        .map(|t| t.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    format!("{}->{t}", e.file_name().to_string_lossy())
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
