//! The result of one guest boot and its verdict.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use super::skip::tail_file;

/// QEMU prints this when a vhost device could not be started and it silently
/// emulates the device itself (or leaves it dead): always a test failure.
pub const VHOST_FALLBACK: &str = "falling back on userspace virtio";

/// Result of one guest boot.
#[derive(Debug, Clone)]
pub struct GuestOutcome {
    pub label: String,
    pub script: PathBuf,
    pub dir: PathBuf,
    /// Status of the guest script (`@@GUEST-EXIT@@` line); `None` if the
    /// guest never got there (timeout, panic, QEMU error).
    pub exit_status: Option<i32>,
    /// QEMU's exit status; `None` on timeout (killed).
    pub qemu_status: Option<ExitStatus>,
    pub timed_out: bool,
    /// All `@@RESULT key=value` pairs (a later key overrides an earlier one).
    pub results: BTreeMap<String, String>,
    pub console: String,
    pub qemu_stderr: String,
    pub wall: Duration,
    pub console_log: PathBuf,
    pub stderr_log: PathBuf,
}

impl GuestOutcome {
    /// `Ok` when the guest script exited 0 and QEMU did not fall back on
    /// userspace virtio; otherwise a description with log tails.
    pub fn check(&self) -> Result<(), String> {
        let problem = if self.timed_out {
            Some(format!("timed out after {:.0}s", self.wall.as_secs_f64()))
        } else if self.qemu_stderr.contains(VHOST_FALLBACK) {
            Some(format!("QEMU stderr says \"{VHOST_FALLBACK}\""))
        } else {
            match self.exit_status {
                None => Some(format!(
                    "QEMU ended ({}) without a guest exit status",
                    status_str(self.qemu_status)
                )),
                Some(0) => None,
                Some(n) => Some(format!("guest script exited with status {n}")),
            }
        };
        match problem {
            None => Ok(()),
            Some(p) => Err(format!(
                "{}: {}: {p}\nlogs: {}\n--- console (tail) ---\n{}\n--- qemu stderr (tail) ---\n{}",
                self.label,
                self.script.display(),
                self.dir.display(),
                tail_file(&self.console_log, 30),
                tail_file(&self.stderr_log, 15)
            )),
        }
    }

    /// Panics (with logs) unless [`GuestOutcome::check`] is `Ok`.
    #[track_caller]
    pub fn assert_success(&self) {
        if let Err(e) = self.check() {
            panic!("{e}");
        }
    }

    /// A result value; panics if the guest did not report it.
    #[track_caller]
    pub fn result(&self, key: &str) -> &str {
        match self.results.get(key) {
            Some(v) => v,
            None => panic!(
                "{}: guest reported no `{key}`; results: {:?}\nconsole: {}",
                self.label,
                self.results,
                self.console_log.display()
            ),
        }
    }

    /// A numeric result value; panics if missing or not a number.
    #[track_caller]
    pub fn result_u64(&self, key: &str) -> u64 {
        let v = self.result(key);
        v.parse()
            .unwrap_or_else(|_| panic!("{}: result {key}={v:?} is not a number", self.label))
    }
}

pub(super) fn status_str(st: Option<ExitStatus>) -> String {
    st.map_or_else(|| "killed by the harness".to_string(), |s| s.to_string())
}
