//! The machine's idle setting, for every table header, and `--guest-halt-poll-ns`, which
//! sets it for one run and puts the old value back.
//!
//! Why it matters: in a VM whose cpuidle governor is `haltpoll`, an idle vCPU polls for
//! up to `guest_halt_poll_ns` before it halts. With 0 it halts at once, and waking a
//! process on it (the backend, when the load generator kicks) costs a halt exit and an
//! IPI through the hypervisor: ~30 µs on this machine, which is most of a QD1 latency of
//! a two-process set-up (load generator + backend) and hardly touches single-process fio.
//! So a table says which setting it was measured under, and a run can choose it.
//!
//! Every path is relative to a sysfs root given as a parameter ([`SYSFS`] in the bench,
//! a temporary directory in the tests): no test touches the real /sys.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::Mutex;

use clap::Args;

/// The real sysfs root.
pub const SYSFS: &str = "/sys";
/// The cpuidle driver in use ("haltpoll", "intel_idle", "acpi_idle", ...).
const DRIVER: &str = "devices/system/cpu/cpuidle/current_driver";
/// The cpuidle governor in use (writable; `current_governor_ro` on kernels that only
/// show it).
const GOVERNOR: &str = "devices/system/cpu/cpuidle/current_governor";
const GOVERNOR_RO: &str = "devices/system/cpu/cpuidle/current_governor_ro";
/// The haltpoll governor's longest poll before a vCPU halts, in ns (a module parameter,
/// present when the governor is built in or loaded).
pub const PARAM: &str = "module/haltpoll/parameters/guest_halt_poll_ns";
/// The kernel's default for [`PARAM`] (drivers/cpuidle/governors/haltpoll.c).
pub const KERNEL_DEFAULT_NS: u64 = 200_000;

/// `--guest-halt-poll-ns`, shared by the comparisons that take it.
#[derive(Args, Debug, Clone, Default)]
pub struct HaltPollArgs {
    /// Set the kernel's /sys/module/haltpoll/parameters/guest_halt_poll_ns to NS for this
    /// run; the previous value is put back when the run ends, also on an error, a panic,
    /// Ctrl-C (SIGINT), SIGTERM or SIGHUP. In a VM with the haltpoll cpuidle governor it
    /// is how long an idle vCPU polls before it halts: with 0 every wake-up of a process
    /// on the other, idle vCPU (the backend, when the load generator kicks it) costs a
    /// halt exit and an IPI, ~30 µs here, which dominates QD1 latency of any
    /// two-process set-up while one-process fio hardly pays it. The kernel's default is
    /// 200000. Needs root and the haltpoll governor (a KVM guest); refused before
    /// anything is measured otherwise. The table header records the value used. Without
    /// the flag the setting is left as it is (and recorded too).
    #[arg(long, value_name = "NS")]
    pub guest_halt_poll_ns: Option<u32>,
}

impl HaltPollArgs {
    /// Applies the flag (if given) to the real sysfs; keep the guard alive for the run.
    pub fn apply(&self) -> Result<Option<HaltPollGuard>, HaltPollError> {
        self.guest_halt_poll_ns
            .map(|ns| HaltPollGuard::set(Path::new(SYSFS), u64::from(ns)))
            .transpose()
    }

    /// The flag as typed, for the "Command:" part of a header ("" without it).
    pub fn command_suffix(&self) -> String {
        self.guest_halt_poll_ns
            .map(|ns| format!(" --guest-halt-poll-ns {ns}"))
            .unwrap_or_default()
    }
}

/// Why `--guest-halt-poll-ns` could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum HaltPollError {
    /// The parameter does not exist: no haltpoll governor on this kernel.
    #[error("--guest-halt-poll-ns: {} does not exist: this kernel has no haltpoll cpuidle governor (it serves KVM guests: `modprobe cpuidle-haltpoll`, or boot with cpuidle_haltpoll.force=1 on a guest without it); run without --guest-halt-poll-ns", path.display())]
    Missing {
        /// The parameter file.
        path: PathBuf,
    },
    /// The parameter exists (the haltpoll governor is built in) but another governor
    /// runs, and only haltpoll reads it: setting it would change nothing.
    #[error("--guest-halt-poll-ns: this machine idles with {governor}, and only the haltpoll governor reads guest_halt_poll_ns: the run would not have the setting it asks for (its idle vCPUs behave as they do without the flag); run without --guest-halt-poll-ns")]
    OtherGovernor {
        /// What idles this machine instead ("the menu governor", "no cpuidle driver").
        governor: String,
    },
    /// The parameter could not be read.
    #[error("--guest-halt-poll-ns: cannot read {}: {source}", path.display())]
    Read {
        /// The parameter file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The parameter holds something that is not a number.
    #[error("--guest-halt-poll-ns: {} holds {text:?}, not a number of nanoseconds; not touching it", path.display())]
    Unparsable {
        /// The parameter file.
        path: PathBuf,
        /// What it holds.
        text: String,
    },
    /// The new value could not be written.
    #[error("--guest-halt-poll-ns: cannot write {ns} to {}: {source}{}", path.display(), if source.kind() == std::io::ErrorKind::PermissionDenied { " (writing a kernel parameter needs root)" } else { "" })]
    Write {
        /// The parameter file.
        path: PathBuf,
        /// The value.
        ns: u64,
        /// The error.
        source: std::io::Error,
    },
    /// The kernel did not keep the value written.
    #[error("--guest-halt-poll-ns: wrote {ns} to {} but it reads {got:?} back", path.display())]
    NotKept {
        /// The parameter file.
        path: PathBuf,
        /// The value written.
        ns: u64,
        /// What it reads.
        got: String,
    },
}

/// The machine's idle setting; `None` where the file is absent or unreadable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdleSetting {
    /// cpuidle driver.
    pub driver: Option<String>,
    /// cpuidle governor.
    pub governor: Option<String>,
    /// The haltpoll governor's `guest_halt_poll_ns`.
    pub guest_halt_poll_ns: Option<u64>,
}

/// What `--guest-halt-poll-ns` did to the setting of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetByFlag {
    /// The value set.
    pub ns: u64,
    /// The value before (put back at the end).
    pub previous: String,
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// "200 µs" for whole microseconds, else "1500 ns".
fn duration_text(ns: u64) -> String {
    if ns.is_multiple_of(1000) {
        format!("{} µs", ns / 1000)
    } else {
        format!("{ns} ns")
    }
}

impl IdleSetting {
    /// Reads the setting under the sysfs root `sysfs`; absent files are `None`, never an
    /// error (a description must not stop a run).
    pub fn read(sysfs: &Path) -> Self {
        IdleSetting {
            driver: read_trimmed(&sysfs.join(DRIVER)),
            governor: read_trimmed(&sysfs.join(GOVERNOR))
                .or_else(|| read_trimmed(&sysfs.join(GOVERNOR_RO))),
            guest_halt_poll_ns: read_trimmed(&sysfs.join(PARAM)).and_then(|s| s.parse().ok()),
        }
    }

    /// One phrase for a header: "idle: haltpoll, guest_halt_poll_ns=0 (vCPUs halt at
    /// once; kernel default 200000)"; `flag` when `--guest-halt-poll-ns` set it.
    pub fn describe(&self, flag: Option<&SetByFlag>) -> String {
        let mut s = String::from("idle: ");
        match (&self.driver, &self.governor) {
            (Some(d), Some(g)) if d == g => s.push_str(d),
            (Some(d), Some(g)) => s.push_str(&format!("{d} driver, {g} governor")),
            (Some(d), None) => s.push_str(d),
            (None, Some(g)) => s.push_str(&format!("{g} governor")),
            (None, None) => s.push_str("unknown"),
        }
        let Some(ns) = self.guest_halt_poll_ns else {
            return s;
        };
        let what = if ns == 0 {
            "vCPUs halt at once".to_string()
        } else {
            format!("idle vCPUs poll up to {} before halting", duration_text(ns))
        };
        let mut remarks = Vec::new();
        match flag {
            Some(f) => remarks.push(format!(
                "set by --guest-halt-poll-ns {} for this run, {} before",
                f.ns, f.previous
            )),
            None if ns != KERNEL_DEFAULT_NS => {
                remarks.push(format!("kernel default {KERNEL_DEFAULT_NS}"));
            }
            None => {}
        }
        // The parameter exists whenever the governor is built in, but only the haltpoll
        // governor reads it.
        match &self.governor {
            Some(g) if g != "haltpoll" => {
                remarks.insert(0, format!("unused by the {g} governor"));
            }
            _ => remarks.insert(0, what),
        }
        s.push_str(&format!(
            ", guest_halt_poll_ns={ns} ({})",
            remarks.join("; ")
        ));
        s
    }
}

/// The real machine's idle setting, described; says so when a live
/// `--guest-halt-poll-ns` guard set it.
pub fn describe_current() -> String {
    let sysfs = Path::new(SYSFS);
    IdleSetting::read(sysfs).describe(set_by_flag(&sysfs.join(PARAM)).as_ref())
}

/// Live guards, oldest first: (id, parameter file, what they set).
static LIVE: Mutex<Vec<(u64, PathBuf, SetByFlag)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// What the newest live guard on `param` set (None without one).
fn set_by_flag(param: &Path) -> Option<SetByFlag> {
    let live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    live.iter()
        .rev()
        .find(|(_, p, _)| p == param)
        .map(|(_, _, f)| f.clone())
}

/// Sets `guest_halt_poll_ns` and puts the old value back when dropped (on return, `?`
/// and unwinding). Ctrl-C, SIGTERM and SIGHUP (where the process had their default
/// action) restore it too, then end the process as the signal would have.
pub struct HaltPollGuard {
    id: u64,
    path: PathBuf,
    previous: String,
    /// Whether the new value was written (nothing to put back otherwise).
    changed: bool,
    /// The signal restore this guard installed (only the outermost guard does).
    signals: Option<SignalRestore>,
}

impl std::fmt::Debug for HaltPollGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HaltPollGuard")
            .field("path", &self.path)
            .field("previous", &self.previous)
            .field("changed", &self.changed)
            .field("restores_on_signal", &self.signals.is_some())
            .finish()
    }
}

impl HaltPollGuard {
    /// Writes `ns` to the parameter under the sysfs root `sysfs`, after reading the
    /// value to put back; checks the kernel kept it.
    pub fn set(sysfs: &Path, ns: u64) -> Result<Self, HaltPollError> {
        let path = sysfs.join(PARAM);
        let previous = match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(HaltPollError::Missing { path })
            }
            Err(source) => return Err(HaltPollError::Read { path, source }),
        };
        if previous.parse::<u64>().is_err() {
            return Err(HaltPollError::Unparsable {
                path,
                text: previous,
            });
        }
        // An unknown governor (no cpuidle sysfs) is given the benefit of the doubt; with
        // the driver `none` no governor runs at all.
        let idle = IdleSetting::read(sysfs);
        let unused = match (idle.driver.as_deref(), idle.governor) {
            (Some("none"), g) => Some(format!(
                "no cpuidle driver (governor {})",
                g.as_deref().unwrap_or("unknown")
            )),
            (_, Some(g)) if g != "haltpoll" => Some(format!("the {g} governor")),
            _ => None,
        };
        if let Some(governor) = unused {
            return Err(HaltPollError::OtherGovernor { governor });
        }
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        // Installed before the write: a signal in between puts back a value that is
        // still there, which is harmless.
        let signals = SignalRestore::install(&path, &previous);
        let mut guard = HaltPollGuard {
            id,
            path,
            previous,
            changed: false,
            signals,
        };
        if let Err(source) = write_param(&guard.path, &ns.to_string()) {
            return Err(HaltPollError::Write {
                path: guard.path.clone(),
                ns,
                source,
            });
        }
        guard.changed = true;
        let got = read_trimmed(&guard.path).unwrap_or_default();
        if got != ns.to_string() {
            return Err(HaltPollError::NotKept {
                path: guard.path.clone(),
                ns,
                got,
            });
        }
        eprintln!(
            "guest_halt_poll_ns set to {ns} for this run (was {}; put back at the end)",
            guard.previous
        );
        LIVE.lock().unwrap_or_else(|e| e.into_inner()).push((
            id,
            guard.path.clone(),
            SetByFlag {
                ns,
                previous: guard.previous.clone(),
            },
        ));
        Ok(guard)
    }
}

impl Drop for HaltPollGuard {
    fn drop(&mut self) {
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(id, _, _)| *id != self.id);
        if self.changed {
            match write_param(&self.path, &self.previous) {
                Ok(()) => eprintln!("guest_halt_poll_ns put back to {}", self.previous),
                Err(e) => eprintln!(
                    "bench: WARNING: could not put {} back to {}: {e}; do it by hand: echo {} > {}",
                    self.path.display(),
                    self.previous,
                    self.previous,
                    self.path.display()
                ),
            }
        }
        // After the write: a signal until here still finds the restore in place.
        self.signals.take();
    }
}

/// Writes a parameter file without creating it (a missing one is an error).
fn write_param(path: &Path, value: &str) -> std::io::Result<()> {
    let mut f = OpenOptions::new().write(true).truncate(true).open(path)?;
    f.write_all(format!("{value}\n").as_bytes())
}

/// What a signal handler writes back: a C path and the bytes to write, prepared in
/// advance because the handler may only make async-signal-safe calls (open, write,
/// close, signal, raise).
struct Restore {
    path: CString,
    value: Vec<u8>,
}

/// The restore of the outermost live guard; taken (swapped out) by whoever uses it
/// first: the handler, or the guard's drop, which frees it.
static PENDING: AtomicPtr<Restore> = AtomicPtr::new(std::ptr::null_mut());

/// Signals that end the run while a guard is live.
const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Handlers installed by a guard and the actions they replaced.
struct SignalRestore {
    replaced: Vec<(libc::c_int, libc::sigaction)>,
}

extern "C" fn restore_and_reraise(sig: libc::c_int) {
    let p = PENDING.swap(std::ptr::null_mut(), Ordering::SeqCst);
    if !p.is_null() {
        // SAFETY: `p` came from Box::into_raw in `install` and is only freed by whoever
        // swapped it out of PENDING, which is this handler now; it is never freed here
        // (the process ends).
        let r = unsafe { &*p };
        // SAFETY: open/write/close with a valid C string and buffer; all
        // async-signal-safe.
        unsafe {
            let fd = libc::open(r.path.as_ptr(), libc::O_WRONLY | libc::O_TRUNC);
            if fd >= 0 {
                libc::write(fd, r.value.as_ptr().cast(), r.value.len());
                libc::close(fd);
            }
        }
    }
    // SAFETY: back to the default action, then the signal again: it is blocked while
    // this handler runs and ends the process as it would have without us once we return.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

impl SignalRestore {
    /// Installs the handler for every signal whose action is the default, unless an
    /// outer guard already did (it restores the older value, the one to end with).
    fn install(path: &Path, previous: &str) -> Option<Self> {
        let c_path = CString::new(path.as_os_str().as_bytes()).ok()?;
        let restore = Box::into_raw(Box::new(Restore {
            path: c_path,
            value: format!("{previous}\n").into_bytes(),
        }));
        if PENDING
            .compare_exchange(
                std::ptr::null_mut(),
                restore,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_err()
        {
            // SAFETY: not published; still ours.
            drop(unsafe { Box::from_raw(restore) });
            return None;
        }
        let mut replaced = Vec::new();
        for sig in SIGNALS {
            // SAFETY: zeroed sigaction structs are valid "no action" values; sigaction
            // with valid pointers; the handler only makes async-signal-safe calls.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) != 0
                    || old.sa_sigaction != libc::SIG_DFL
                {
                    // Ignored (nohup) or handled by someone else: left alone.
                    continue;
                }
                let mut new: libc::sigaction = std::mem::zeroed();
                new.sa_sigaction = restore_and_reraise as extern "C" fn(libc::c_int) as usize;
                libc::sigemptyset(&mut new.sa_mask);
                if libc::sigaction(sig, &new, &mut old) == 0 {
                    replaced.push((sig, old));
                }
            }
        }
        Some(SignalRestore { replaced })
    }
}

impl Drop for SignalRestore {
    fn drop(&mut self) {
        for (sig, old) in &self.replaced {
            // SAFETY: puts back the action sigaction gave us.
            unsafe { libc::sigaction(*sig, old, std::ptr::null_mut()) };
        }
        let p = PENDING.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: swapped out by us, so no handler holds it; from Box::into_raw.
            drop(unsafe { Box::from_raw(p) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysfs root with the given files (path relative to the root, content).
    fn fake_sysfs(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (rel, content) in files {
            let p = dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        dir
    }

    fn param(root: &tempfile::TempDir) -> String {
        std::fs::read_to_string(root.path().join(PARAM)).unwrap()
    }

    #[test]
    fn describes_haltpoll_set_to_halt_at_once() {
        let root = fake_sysfs(&[
            (DRIVER, "haltpoll\n"),
            (GOVERNOR, "haltpoll\n"),
            (PARAM, "0\n"),
        ]);
        let s = IdleSetting::read(root.path());
        assert_eq!(
            s,
            IdleSetting {
                driver: Some("haltpoll".into()),
                governor: Some("haltpoll".into()),
                guest_halt_poll_ns: Some(0),
            }
        );
        assert_eq!(
            s.describe(None),
            "idle: haltpoll, guest_halt_poll_ns=0 (vCPUs halt at once; kernel default 200000)"
        );
        assert_eq!(
            s.describe(Some(&SetByFlag {
                ns: 0,
                previous: "200000".into()
            })),
            "idle: haltpoll, guest_halt_poll_ns=0 (vCPUs halt at once; set by --guest-halt-poll-ns 0 for this run, 200000 before)"
        );
    }

    #[test]
    fn describes_the_kernel_default_and_other_values() {
        let root = fake_sysfs(&[
            (DRIVER, "haltpoll\n"),
            (GOVERNOR_RO, "haltpoll\n"),
            (PARAM, "200000\n"),
        ]);
        let s = IdleSetting::read(root.path());
        assert_eq!(
            s.describe(None),
            "idle: haltpoll, guest_halt_poll_ns=200000 (idle vCPUs poll up to 200 µs before halting)"
        );
        let s = IdleSetting {
            guest_halt_poll_ns: Some(1500),
            ..s
        };
        assert_eq!(
            s.describe(None),
            "idle: haltpoll, guest_halt_poll_ns=1500 (idle vCPUs poll up to 1500 ns before halting; kernel default 200000)"
        );
    }

    #[test]
    fn absent_or_odd_files_never_fail() {
        let root = fake_sysfs(&[]);
        let s = IdleSetting::read(root.path());
        assert_eq!(s, IdleSetting::default());
        assert_eq!(s.describe(None), "idle: unknown");

        // Bare metal: a driver and governor, no haltpoll parameter.
        let root = fake_sysfs(&[(DRIVER, "intel_idle\n"), (GOVERNOR, "menu\n")]);
        assert_eq!(
            IdleSetting::read(root.path()).describe(None),
            "idle: intel_idle driver, menu governor"
        );
        // The parameter exists but another governor runs; a garbled value is left out.
        let root = fake_sysfs(&[(DRIVER, "haltpoll\n"), (GOVERNOR, "menu\n"), (PARAM, "0\n")]);
        assert_eq!(
            IdleSetting::read(root.path()).describe(None),
            "idle: haltpoll driver, menu governor, guest_halt_poll_ns=0 (unused by the menu governor; kernel default 200000)"
        );
        let root = fake_sysfs(&[(DRIVER, "acpi_idle\n"), (PARAM, "x\n")]);
        assert_eq!(
            IdleSetting::read(root.path()).describe(None),
            "idle: acpi_idle"
        );
    }

    #[test]
    fn guard_sets_and_puts_back_on_drop() {
        let root = fake_sysfs(&[(PARAM, "0\n")]);
        {
            let _g = HaltPollGuard::set(root.path(), 200_000).unwrap();
            assert_eq!(param(&root), "200000\n");
            let flag = set_by_flag(&root.path().join(PARAM)).unwrap();
            assert_eq!(
                flag,
                SetByFlag {
                    ns: 200_000,
                    previous: "0".into()
                }
            );
        }
        assert_eq!(param(&root), "0\n");
        assert_eq!(set_by_flag(&root.path().join(PARAM)), None);
    }

    #[test]
    fn guard_puts_back_on_an_error_path_and_a_panic() {
        fn measure(root: &Path) -> Result<(), String> {
            let _g = HaltPollGuard::set(root, 50_000).map_err(|e| e.to_string())?;
            assert_eq!(
                std::fs::read_to_string(root.join(PARAM)).unwrap(),
                "50000\n"
            );
            Err("the backend went away".into())
        }
        let root = fake_sysfs(&[(PARAM, "7\n")]);
        assert_eq!(measure(root.path()), Err("the backend went away".into()));
        assert_eq!(param(&root), "7\n");

        let r = std::panic::catch_unwind(|| {
            let _g = HaltPollGuard::set(root.path(), 1).unwrap();
            panic!("boom");
        });
        assert!(r.is_err());
        assert_eq!(param(&root), "7\n");
    }

    #[test]
    fn nested_guards_end_with_the_first_value() {
        let root = fake_sysfs(&[(PARAM, "0\n")]);
        let outer = HaltPollGuard::set(root.path(), 100).unwrap();
        {
            let _inner = HaltPollGuard::set(root.path(), 200).unwrap();
            assert_eq!(param(&root), "200\n");
        }
        assert_eq!(param(&root), "100\n");
        drop(outer);
        assert_eq!(param(&root), "0\n");
    }

    #[test]
    fn refuses_clearly_before_touching_anything() {
        let root = fake_sysfs(&[]);
        let e = HaltPollGuard::set(root.path(), 200_000).unwrap_err();
        assert!(matches!(e, HaltPollError::Missing { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("does not exist"), "{msg}");
        assert!(msg.contains("haltpoll"), "{msg}");
        assert!(!root.path().join(PARAM).exists(), "created the parameter");

        let root = fake_sysfs(&[(PARAM, "lots\n")]);
        let e = HaltPollGuard::set(root.path(), 1).unwrap_err();
        assert!(matches!(e, HaltPollError::Unparsable { .. }), "{e:?}");
        assert_eq!(param(&root), "lots\n");

        // A directory where the file should be: cannot be written.
        let root = fake_sysfs(&[]);
        std::fs::create_dir_all(root.path().join(PARAM)).unwrap();
        let e = HaltPollGuard::set(root.path(), 1).unwrap_err();
        assert!(matches!(e, HaltPollError::Read { .. }), "{e:?}");
    }

    /// The parameter exists whenever the haltpoll governor is built in, but only that
    /// governor reads it: under another one the flag would change nothing, and a table
    /// headed "--guest-halt-poll-ns 200000" would claim a condition the run did not have.
    #[test]
    fn refuses_a_machine_whose_governor_does_not_read_the_parameter() {
        let root = fake_sysfs(&[(DRIVER, "none\n"), (GOVERNOR, "menu\n"), (PARAM, "0\n")]);
        let e = HaltPollGuard::set(root.path(), 200_000).unwrap_err();
        assert!(matches!(e, HaltPollError::OtherGovernor { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("menu"), "{msg}");
        assert!(msg.contains("run without --guest-halt-poll-ns"), "{msg}");
        assert_eq!(param(&root), "0\n", "touched the parameter");
        // No cpuidle driver: no governor runs, whatever the file says.
        let root = fake_sysfs(&[(DRIVER, "none\n"), (GOVERNOR, "haltpoll\n"), (PARAM, "0\n")]);
        let e = HaltPollGuard::set(root.path(), 200_000).unwrap_err();
        assert!(e.to_string().contains("no cpuidle driver"), "{e}");
        assert_eq!(param(&root), "0\n", "touched the parameter");
        // The haltpoll governor (read-only file on some kernels) is accepted.
        let root = fake_sysfs(&[(GOVERNOR_RO, "haltpoll\n"), (PARAM, "0\n")]);
        let g = HaltPollGuard::set(root.path(), 5).unwrap();
        assert_eq!(param(&root), "5\n");
        drop(g);
        assert_eq!(param(&root), "0\n");
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = HaltPollError::Write {
            path: PathBuf::from("/sys/module/haltpoll/parameters/guest_halt_poll_ns"),
            ns: 200_000,
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        let msg = e.to_string();
        assert!(
            msg.starts_with("--guest-halt-poll-ns: cannot write 200000 to /sys/module/haltpoll/parameters/guest_halt_poll_ns: "),
            "{msg}"
        );
        assert!(
            msg.ends_with("(writing a kernel parameter needs root)"),
            "{msg}"
        );
        let e = HaltPollError::Write {
            path: PathBuf::from("p"),
            ns: 1,
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        };
        assert!(!e.to_string().contains("root"), "{e}");
    }

    /// Set in the child run of `a_signal_puts_back_then_ends_the_process`: its sysfs root.
    const SIGNAL_CHILD: &str = "BENCH_HALT_POLL_SIGNAL_CHILD";

    #[test]
    fn a_signal_puts_back_then_ends_the_process() {
        use std::os::unix::process::ExitStatusExt as _;
        if let Some(root) = std::env::var_os(SIGNAL_CHILD) {
            // The child (this test binary run again): set, then SIGTERM as `kill` sends.
            let _g = HaltPollGuard::set(Path::new(&root), 123).unwrap();
            // SAFETY: raise(3) on this process.
            unsafe { libc::raise(libc::SIGTERM) };
            std::thread::sleep(std::time::Duration::from_secs(10));
            panic!("still alive 10 s after SIGTERM");
        }
        let root = fake_sysfs(&[(PARAM, "0\n")]);
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "compare::halt_poll::tests::a_signal_puts_back_then_ends_the_process",
                "--nocapture",
            ])
            .env(SIGNAL_CHILD, root.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("guest_halt_poll_ns set to 123 for this run (was 0"),
            "{stderr}"
        );
        assert_eq!(out.status.signal(), Some(libc::SIGTERM), "{out:?}");
        assert_eq!(param(&root), "0\n");
    }
}
