//! One guest test ([`GuestTest`]): its run directory, the locks that keep guests one at
//! a time on this machine, and its boots (QEMU started, console followed, outcome parsed).

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use super::backend::{spawn_backend_in, Backend};
use super::boot::GuestBoot;
use super::console::{parse_console, LineReader};
use super::env::{ensure_setup, env_flag, GuestEnv};
use super::initramfs::build_initrd;
use super::outcome::{status_str, GuestOutcome};
use super::process::{command_line, ChildGuard};
use super::skip::{loud, report_skip, tail_file, unix_time};

/// Serialises guest tests within this process (2-core machines: one guest
/// at a time).
static GUEST_LOCK: Mutex<()> = Mutex::new(());

/// Cross-process lock (flock) so concurrent `cargo test` runs sharing the
/// work directory do not boot guests at the same time either.
struct FileLock(File);

impl FileLock {
    fn acquire(path: &Path) -> io::Result<FileLock> {
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        // SAFETY: flock on a valid, owned fd; blocks until the lock is ours.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(FileLock(f))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: unlocking our own fd; closing it would release it anyway.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Why [`GuestTest::try_start`] could not open a guest session.
#[derive(Debug, thiserror::Error)]
pub enum GuestStartError {
    /// Guests cannot run on this machine (no QEMU or kernel, set-up failed,
    /// `VHOST_GUEST_SKIP`): tests skip, programs report it.
    #[error("guests cannot run here: {0}")]
    Unavailable(String),
    /// The per-session run directory could not be created.
    #[error("cannot create run directory {}: {source}", path.display())]
    RunDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// One guest test: owns a per-test directory (`<work>/runs/<name>-<time>-<pid>`)
/// holding disk images, sockets and every log. On failure (panic) its `Drop`
/// prints where the logs are and their tails; on success disk images are
/// deleted (logs are kept).
pub struct GuestTest {
    pub env: &'static GuestEnv,
    name: String,
    dir: PathBuf,
    boots: u32,
    scratch: Vec<PathBuf>,
    started: Instant,
    // Dropped last (fields drop in declaration order).
    _flock: Option<FileLock>,
    _lock: MutexGuard<'static, ()>,
}

impl GuestTest {
    /// Sets up (once per process) and takes the guest lock. `None` means the
    /// test must return early: the skip has already been reported loudly.
    pub fn start(name: &str) -> Option<GuestTest> {
        match Self::try_start(name) {
            Ok(t) => Some(t),
            Err(GuestStartError::Unavailable(reason)) => {
                report_skip(name, &reason);
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// [`GuestTest::start`] for programs (the benchmarks): a machine that cannot run
    /// guests is an error for the caller to report, not a test skip.
    pub fn try_start(name: &str) -> Result<GuestTest, GuestStartError> {
        let lock = GUEST_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let env = ensure_setup().map_err(GuestStartError::Unavailable)?;
        let flock = FileLock::acquire(&env.work.join(".guest-tests.lock")).ok();
        let dir =
            env.work
                .join("runs")
                .join(format!("{name}-{}-{}", unix_time(), std::process::id()));
        fs::create_dir_all(&dir).map_err(|source| GuestStartError::RunDir {
            path: dir.clone(),
            source,
        })?;
        eprintln!("guest test {name}: logs in {}", dir.display());
        Ok(GuestTest {
            env,
            name: name.to_string(),
            dir,
            boots: 0,
            scratch: Vec::new(),
            started: Instant::now(),
            _flock: flock,
            _lock: lock,
        })
    }

    /// The per-test directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A path inside the per-test directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Creates a sparse disk image of `size` bytes in the test directory
    /// (deleted when the test passes).
    pub fn create_image(&mut self, name: &str, size: u64) -> io::Result<PathBuf> {
        let p = self.path(name);
        let f = File::create(&p)?;
        f.set_len(size)?;
        self.scratch.push(p.clone());
        Ok(p)
    }

    /// Starts a backend process; stdout and stderr go to `<dir>/<name>.log`
    /// (the command line is written first). `RUST_LOG` defaults to `info`.
    /// The process is killed when the returned [`Backend`] is dropped.
    pub fn spawn_backend(&self, name: &str, cmd: Command) -> io::Result<Backend> {
        spawn_backend_in(&self.dir, &self.name, name, cmd)
    }

    /// Writes the initrd for `boot` (base initramfs + the test script cpio) to `out`.
    pub fn build_initrd(&self, boot: &GuestBoot, out: &Path) -> io::Result<()> {
        build_initrd(&self.env.initramfs, boot, out)
    }

    /// Boots a guest and waits for it (see [`GuestTest::boot_with`]).
    pub fn boot(&mut self, boot: &GuestBoot) -> GuestOutcome {
        self.boot_with(boot, |_| {})
    }

    /// Boots a guest running `boot.script`, waits until QEMU exits or the
    /// timeout expires (then kills it), and parses the console.
    /// `on_line` is called for every complete console line while the guest
    /// runs (e.g. to act on a `@@RESULT` marker). Panics only on harness
    /// errors (cannot write files / start QEMU); check the outcome with
    /// [`GuestOutcome::assert_success`].
    pub fn boot_with(&mut self, boot: &GuestBoot, on_line: impl FnMut(&str)) -> GuestOutcome {
        self.try_boot_with(boot, on_line)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`GuestTest::boot`] for programs: harness errors are returned, not panics.
    pub fn try_boot(&mut self, boot: &GuestBoot) -> io::Result<GuestOutcome> {
        self.try_boot_with(boot, |_| {})
    }

    /// [`GuestTest::boot_with`] returning harness errors (cannot write the initrd or
    /// the logs, cannot start or wait for QEMU) instead of panicking; a guest that
    /// fails is still an `Ok` outcome to check.
    pub fn try_boot_with(
        &mut self,
        boot: &GuestBoot,
        mut on_line: impl FnMut(&str),
    ) -> io::Result<GuestOutcome> {
        self.boots += 1;
        let label = format!("boot{}", self.boots);
        let console_log = self.path(&format!("{label}.console.log"));
        let stderr_log = self.path(&format!("{label}.qemu-stderr.log"));
        let initrd = self.path(&format!("{label}.initrd"));
        build_initrd(&self.env.initramfs, boot, &initrd).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot build initrd {}: {e}", initrd.display()),
            )
        })?;

        let mut cmd = self.qemu_command(boot, &initrd);
        cmd.stdin(Stdio::null())
            .stdout(File::create(&console_log)?)
            .stderr(File::create(&stderr_log)?);
        let cmdline = command_line(&cmd);
        let _ = fs::write(self.path(&format!("{label}.qemu-cmd.txt")), &cmdline);

        let start = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start QEMU ({cmdline}): {e}")))?;
        let mut qemu = ChildGuard(Some(child));
        let mut reader = LineReader::new(&console_log);
        let mut timed_out = false;
        let qemu_status = loop {
            reader.poll(&mut on_line);
            match qemu.0.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(st))) => break Some(st),
                Some(Ok(None)) => {}
                Some(Err(e)) => {
                    return Err(io::Error::new(e.kind(), format!("waiting for QEMU: {e}")))
                }
                None => break None,
            }
            if start.elapsed() > boot.timeout {
                timed_out = true;
                qemu.kill();
                break None;
            }
            thread::sleep(Duration::from_millis(50));
        };
        qemu.0 = None;
        reader.poll(&mut on_line);
        reader.finish(&mut on_line);
        let wall = start.elapsed();
        let _ = fs::remove_file(&initrd);

        let console = fs::read(&console_log)
            .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
            .unwrap_or_default();
        let qemu_stderr = fs::read_to_string(&stderr_log).unwrap_or_default();
        let (results, exit_status) = parse_console(&console);
        let out = GuestOutcome {
            label: format!("{} {label}", self.name),
            script: boot.script.clone(),
            dir: self.dir.clone(),
            exit_status,
            qemu_status,
            timed_out,
            results,
            console,
            qemu_stderr,
            wall,
            console_log,
            stderr_log,
        };
        eprintln!(
            "guest test {} {label}: {} exit={:?} qemu={} timed_out={} wall={:.1}s",
            self.name,
            boot.script.display(),
            out.exit_status,
            status_str(out.qemu_status),
            out.timed_out,
            wall.as_secs_f64()
        );
        Ok(out)
    }
}

impl Drop for GuestTest {
    fn drop(&mut self) {
        if thread::panicking() {
            let mut msg = format!(
                "\n======== guest test `{}` FAILED; logs kept in {} ========\n",
                self.name,
                self.dir.display()
            );
            let mut files: Vec<PathBuf> = fs::read_dir(&self.dir)
                .map(|rd| rd.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            files.sort();
            for f in files.iter().filter(|f| {
                f.extension() == Some(OsStr::new("log")) || f.extension() == Some(OsStr::new("txt"))
            }) {
                let _ = write!(
                    msg,
                    "---- {} (tail) ----\n{}\n",
                    f.display(),
                    tail_file(f, 25)
                );
            }
            msg.push_str("========\n");
            loud(&msg);
        } else {
            if !env_flag("VHOST_GUEST_KEEP") {
                for p in &self.scratch {
                    let _ = fs::remove_file(p);
                }
            }
            eprintln!(
                "guest test {}: passed in {:.1}s",
                self.name,
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}
