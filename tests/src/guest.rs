//! QEMU guest harness: boots a small Debian-kernel busybox guest with
//! vhost-user devices attached, runs a guest-side shell script in it and
//! collects its results.
//!
//! The shell side lives in `tests/guest/` (next to this crate's manifest):
//! `setup.sh` installs QEMU and friends and unpacks a guest kernel,
//! `build-initramfs.sh` builds the (cached) base initramfs, and
//! `scripts/*.sh` are the guest-side test scripts. They print
//! `@@RESULT key=value` lines, which end up in [`GuestOutcome::results`].
//!
//! Typical use from an integration test:
//!
//! ```no_run
//! use vhost_tests::guest::{BlkBackend, BlkOpts, GuestBoot, GuestTest};
//! let Some(mut t) = GuestTest::start("my_test") else { return }; // loud skip
//! let img = t.create_image("disk.img", 64 << 20).unwrap();
//! let sock = t.path("blk.sock");
//! let blk = BlkBackend::from_env().unwrap();
//! let mut be = t.spawn_backend("backend", blk.command(&sock, &img, &BlkOpts::default())).unwrap();
//! be.wait_for_socket(&sock, std::time::Duration::from_secs(10)).unwrap();
//! let out = t.boot(&GuestBoot::new("boot-only.sh").qemu_args(vhost_user_blk_args(&sock, 1)));
//! out.assert_success();
//! # use vhost_tests::guest::vhost_user_blk_args;
//! ```
//!
//! Environment knobs:
//! * `VHOST_GUEST_WORK`: work directory (default `/var/tmp/vhost-guest`);
//!   must support O_DIRECT (not tmpfs).
//! * `VHOST_GUEST_SKIP=1`: skip every guest test (loudly).
//! * `VHOST_GUEST_REQUIRE=1`: a skip becomes a test failure (for CI).
//! * `VHOST_GUEST_KEEP=1`: keep disk images of passing tests.
//! * `GUEST_ACCEL=auto|kvm|tcg`, `GUEST_KERNEL_SUITE`, `QEMU`, `QSD`,
//!   `GUEST_VERBOSE=1` (full kernel log on the console): see
//!   `tests/guest/common.sh`.
//! * `VHOST_GUEST_BLK_IMPL=vhost-blk-backend|qsd`, `VHOST_BLK_BACKEND=PATH`:
//!   see [`BlkBackend::from_env`].

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// Console line prefix of guest results: `@@RESULT key=value [key=value...]`.
pub const RESULT_PREFIX: &str = "@@RESULT";
/// Console line printed by the guest's `/init` after the script: `@@GUEST-EXIT@@ <status>`.
pub const EXIT_PREFIX: &str = "@@GUEST-EXIT@@";
/// QEMU prints this when a vhost device could not be started and it silently
/// emulates the device itself (or leaves it dead): always a test failure.
pub const VHOST_FALLBACK: &str = "falling back on userspace virtio";

/// Default wall-clock limit for one guest boot (TCG on a loaded 2-core host).
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// `tests/guest/`: the shell side of the harness.
pub fn harness_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("guest")
}

/// A guest-side script from `tests/guest/scripts/`.
pub fn guest_script(name: &str) -> PathBuf {
    harness_dir().join("scripts").join(name)
}

/// The Cargo workspace root (parent of this crate).
pub fn workspace_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Work directory: `$VHOST_GUEST_WORK` or `/var/tmp/vhost-guest`.
pub fn work_dir() -> PathBuf {
    match std::env::var_os("VHOST_GUEST_WORK") {
        Some(w) if !w.is_empty() => PathBuf::from(w),
        _ => PathBuf::from("/var/tmp/vhost-guest"),
    }
}

fn env_flag(name: &str) -> bool {
    matches!(std::env::var(name), Ok(v) if !v.is_empty() && v != "0")
}

/// QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    fn qemu_args(self) -> &'static [&'static str] {
        match self {
            Accel::Kvm => &["-enable-kvm", "-cpu", "host"],
            Accel::Tcg => &["-accel", "tcg", "-cpu", "max"],
        }
    }
}

/// Everything needed to boot guests, resolved once per test process.
#[derive(Debug, Clone)]
pub struct GuestEnv {
    pub work: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub accel: Accel,
    pub qemu: PathBuf,
    pub qsd: PathBuf,
}

static GUEST_ENV: OnceLock<Result<GuestEnv, String>> = OnceLock::new();

/// Runs `setup.sh` and `build-initramfs.sh` once per test process (both are
/// cheap when nothing changed) and resolves kernel/initramfs/QEMU paths.
/// `Err` holds the reason guest tests cannot run (the caller skips).
pub fn ensure_setup() -> Result<&'static GuestEnv, String> {
    GUEST_ENV
        .get_or_init(setup_inner)
        .as_ref()
        .map_err(Clone::clone)
}

fn run_script(script: &str, log: &Path) -> Result<(), String> {
    let path = harness_dir().join(script);
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let start = Instant::now();
    let status = Command::new("bash")
        .arg(&path)
        .env("VHOST_GUEST_WORK", work_dir())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    if status.success() {
        eprintln!(
            "guest harness: {script} ok ({:.1}s)",
            start.elapsed().as_secs_f64()
        );
        Ok(())
    } else {
        Err(format!(
            "{} failed ({status}); log {}:\n{}",
            path.display(),
            log.display(),
            tail_file(log, 15)
        ))
    }
}

fn setup_inner() -> Result<GuestEnv, String> {
    if env_flag("VHOST_GUEST_SKIP") {
        return Err("VHOST_GUEST_SKIP is set".into());
    }
    let work = work_dir();
    fs::create_dir_all(&work)
        .map_err(|e| format!("cannot create work dir {}: {e}", work.display()))?;
    let log = work.join("setup.log");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        run_script("setup.sh", &log)?;
    } else {
        eprintln!("guest harness: not root, not running setup.sh (apt); using what is there");
    }
    // Builds when inputs changed (needs root), else a cheap no-op.
    run_script("build-initramfs.sh", &log)?;

    let out = Command::new("bash")
        .arg(harness_dir().join("paths.sh"))
        .env("VHOST_GUEST_WORK", &work)
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run paths.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "paths.sh failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let kv: BTreeMap<String, String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let get = |k: &str| kv.get(k).cloned().unwrap_or_default();
    let env = GuestEnv {
        work,
        kernel: PathBuf::from(get("kernel")),
        initramfs: PathBuf::from(get("initramfs")),
        accel: if get("accel") == "kvm" {
            Accel::Kvm
        } else {
            Accel::Tcg
        },
        qemu: PathBuf::from(get("qemu")),
        qsd: PathBuf::from(get("qsd")),
    };
    if !is_executable(&env.qemu) {
        return Err(format!(
            "QEMU not found ({}); run tests/guest/setup.sh as root",
            env.qemu.display()
        ));
    }
    for p in [&env.kernel, &env.initramfs] {
        if !p.is_file() {
            return Err(format!("missing {}; run tests/guest/setup.sh", p.display()));
        }
    }
    prune_old_runs(&env.work.join("runs"), Duration::from_secs(3 * 24 * 3600));
    eprintln!(
        "guest harness: accel={:?} kernel={} qemu={}",
        env.accel,
        env.kernel.display(),
        env.qemu.display()
    );
    Ok(env)
}

/// Whether `p` is an executable regular file.
pub fn is_executable(p: &Path) -> bool {
    fs::metadata(p)
        .map(|m| m.is_file() && m.mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn prune_old_runs(runs: &Path, age: Duration) {
    let Ok(rd) = fs::read_dir(runs) else { return };
    for e in rd.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .map(|t| t.elapsed().unwrap_or_default() > age)
            .unwrap_or(false);
        if old {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Writes straight to the process's stderr, bypassing libtest's output
/// capture, so the text shows up even for passing tests.
fn loud(msg: &str) {
    let mut e = io::stderr().lock();
    let _ = e.write_all(msg.as_bytes());
    let _ = e.flush();
}

/// Reports a skipped guest test: a banner on the real stderr, a line in
/// `<work>/SKIPPED.txt`, and a panic instead when `VHOST_GUEST_REQUIRE=1`.
pub fn report_skip(test: &str, reason: &str) {
    let bar = "#".repeat(72);
    loud(&format!(
        "\n{bar}\n## SKIPPED: guest test `{test}`: {reason}\n\
         ## (set VHOST_GUEST_REQUIRE=1 to turn this into a failure)\n{bar}\n"
    ));
    let mut dir = work_dir();
    if fs::create_dir_all(&dir).is_err() {
        dir = std::env::temp_dir();
    }
    let file = dir.join("SKIPPED.txt");
    if let Ok(mut f) = File::options().create(true).append(true).open(&file) {
        let first = reason.lines().next().unwrap_or("");
        let _ = writeln!(f, "{} SKIPPED {test}: {first}", unix_time());
        loud(&format!("## skip recorded in {}\n", file.display()));
    }
    if env_flag("VHOST_GUEST_REQUIRE") {
        panic!("guest test `{test}` cannot run and VHOST_GUEST_REQUIRE is set: {reason}");
    }
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Last `n` lines of a (text) file, for error messages.
pub fn tail_file(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(b) => {
            let s = String::from_utf8_lossy(&b).replace('\r', "");
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

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

    /// The QEMU command line for `boot` with `initrd` (accelerator, machine, shared
    /// memfd RAM, kernel, console on stdio, the boot's extra arguments); stdio is left
    /// to the caller. Used by [`GuestTest::boot_with`] and by tests that run QEMU
    /// themselves (live migration needs two).
    pub fn qemu_command(&self, boot: &GuestBoot, initrd: &Path) -> Command {
        let mem = format!("{}M", boot.mem_mib);
        let mut cmd = Command::new(&self.env.qemu);
        cmd.args(self.env.accel.qemu_args())
            .args(["-machine", "q35", "-m", &mem])
            // maxcpus >= 2: with a plain -smp 1 a TCG guest can miss a
            // completion interrupt and hang.
            .arg("-smp")
            .arg(format!("{},maxcpus={}", boot.cpus, boot.cpus.max(2)))
            .arg("-object")
            .arg(format!("memory-backend-memfd,id=mem,size={mem},share=on"))
            .args(["-numa", "node,memdev=mem"])
            .args(["-nodefaults", "-no-user-config", "-nographic"])
            .args(["-serial", "stdio", "-no-reboot"])
            .arg("-kernel")
            .arg(&self.env.kernel)
            .arg("-initrd")
            .arg(initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 mitigations=off {} {}",
                // GUEST_VERBOSE=1: the whole kernel log on the console.
                if env_flag("GUEST_VERBOSE") {
                    ""
                } else {
                    "quiet"
                },
                boot.append
            ))
            .args(&boot.qemu_args);
        set_pdeathsig(&mut cmd);
        cmd
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

/// What to boot: a guest script plus files, environment and QEMU arguments.
#[derive(Debug, Clone)]
pub struct GuestBoot {
    pub script: PathBuf,
    pub files: Vec<PathBuf>,
    pub env: Vec<(String, String)>,
    pub qemu_args: Vec<String>,
    pub timeout: Duration,
    pub mem_mib: u32,
    pub cpus: u32,
    pub append: String,
}

impl GuestBoot {
    /// `script` is a name in `tests/guest/scripts/` or a path. The guest runs
    /// it as `/test/run.sh`; `scripts/lib.sh` is always copied to `/test/lib.sh`.
    pub fn new(script: impl AsRef<Path>) -> GuestBoot {
        let s = script.as_ref();
        let script = if s.components().count() == 1 {
            guest_script(&s.to_string_lossy())
        } else {
            s.to_path_buf()
        };
        GuestBoot {
            script,
            files: vec![guest_script("lib.sh")],
            env: Vec::new(),
            qemu_args: Vec::new(),
            timeout: DEFAULT_BOOT_TIMEOUT,
            mem_mib: 512,
            cpus: 1,
            append: String::new(),
        }
    }

    /// Variable exported to the guest script.
    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Extra file copied into the guest's `/test/` (by file name).
    pub fn file(mut self, path: impl Into<PathBuf>) -> Self {
        self.files.push(path.into());
        self
    }

    pub fn qemu_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.qemu_args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }

    pub fn mem_mib(mut self, n: u32) -> Self {
        self.mem_mib = n;
        self
    }

    /// Extra kernel command line.
    pub fn append(mut self, s: &str) -> Self {
        self.append = s.to_string();
        self
    }
}

/// QEMU arguments attaching a vhost-user-blk device (QEMU is the client, the
/// backend must already listen on `socket`).
pub fn vhost_user_blk_args(socket: &Path, num_queues: u16) -> Vec<String> {
    let s = socket.to_string_lossy();
    assert!(
        !s.contains(','),
        "socket path must not contain ',': {s} (QEMU option syntax)"
    );
    vec![
        "-chardev".into(),
        format!("socket,id=blk0,path={s}"),
        "-device".into(),
        format!("vhost-user-blk-pci,chardev=blk0,num-queues={num_queues}"),
    ]
}

/// [`vhost_user_blk_args`] with `reconnect-ms` on the chardev: QEMU reconnects to a
/// restarted backend (and hands it the inflight region it kept) instead of losing the disk.
pub fn vhost_user_blk_reconnect_args(
    socket: &Path,
    num_queues: u16,
    reconnect_ms: u32,
) -> Vec<String> {
    let mut a = vhost_user_blk_args(socket, num_queues);
    a[1].push_str(&format!(",reconnect-ms={reconnect_ms}"));
    a
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

fn status_str(st: Option<ExitStatus>) -> String {
    st.map_or_else(|| "killed by the harness".to_string(), |s| s.to_string())
}

/// Parses `@@RESULT` pairs and the `@@GUEST-EXIT@@` status from a console log.
pub fn parse_console(console: &str) -> (BTreeMap<String, String>, Option<i32>) {
    let mut results = BTreeMap::new();
    let mut exit = None;
    for line in console.lines() {
        if let Some(i) = line.find(RESULT_PREFIX) {
            for kv in line[i + RESULT_PREFIX.len()..].split_whitespace() {
                if let Some((k, v)) = kv.split_once('=') {
                    results.insert(k.to_string(), v.to_string());
                }
            }
        } else if let Some(i) = line.find(EXIT_PREFIX) {
            exit = line[i + EXIT_PREFIX.len()..]
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok());
        }
    }
    (results, exit)
}

/// Follows a growing console log and hands out complete lines.
pub(crate) struct LineReader {
    path: PathBuf,
    pos: u64,
    partial: Vec<u8>,
}

impl LineReader {
    pub(crate) fn new(path: &Path) -> Self {
        LineReader {
            path: path.to_path_buf(),
            pos: 0,
            partial: Vec::new(),
        }
    }

    pub(crate) fn poll(&mut self, on_line: &mut impl FnMut(&str)) {
        let Ok(mut f) = File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.pos)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if let Ok(n) = f.read_to_end(&mut buf) {
            self.pos += n as u64;
        }
        for &b in &buf {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.partial).replace('\r', "");
                on_line(&line);
                self.partial.clear();
            } else {
                self.partial.push(b);
            }
        }
    }

    fn finish(&mut self, on_line: &mut impl FnMut(&str)) {
        if !self.partial.is_empty() {
            let line = String::from_utf8_lossy(&self.partial).replace('\r', "");
            on_line(&line);
            self.partial.clear();
        }
    }
}

/// Kills (SIGKILL) and reaps the child when dropped.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn kill(&mut self) {
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
fn set_pdeathsig(cmd: &mut Command) {
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

/// Per-boot initrd: the base initramfs (gzip'd cpio), zero padding to a
/// 4-byte boundary, then an uncompressed newc cpio holding `/test/run.sh`,
/// `/test/env` and the extra files. The kernel unpacks concatenated
/// archives in order.
fn build_initrd(base: &Path, boot: &GuestBoot, out: &Path) -> io::Result<()> {
    let mut w = io::BufWriter::new(File::create(out)?);
    let mut b = File::open(base)?;
    let len = io::copy(&mut b, &mut w)?;
    w.write_all(&vec![0u8; ((4 - len % 4) % 4) as usize])?;

    let mut cpio = CpioWriter::default();
    cpio.entry("test", 0o040755, &[]);
    cpio.entry("test/run.sh", 0o100755, &fs::read(&boot.script)?);
    let mut env = String::new();
    for (k, v) in &boot.env {
        assert!(
            !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad guest env name {k:?}"
        );
        // busybox sh sources this with `set -a`: single-quote the value.
        let _ = writeln!(env, "{k}='{}'", v.replace('\'', r"'\''"));
    }
    cpio.entry("test/env", 0o100644, env.as_bytes());
    for f in &boot.files {
        let name = f
            .file_name()
            .ok_or_else(|| io::Error::other(format!("no file name: {}", f.display())))?;
        let data =
            fs::read(f).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", f.display())))?;
        cpio.entry(&format!("test/{}", name.to_string_lossy()), 0o100755, &data);
    }
    w.write_all(&cpio.finish())?;
    w.flush()
}

/// Minimal newc ("070701") cpio archive writer.
#[derive(Default)]
struct CpioWriter {
    buf: Vec<u8>,
    ino: u32,
}

impl CpioWriter {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,                                               // uid
            0,                                               // gid
            if mode & 0o170000 == 0o040000 { 2 } else { 1 }, // nlink
            0,                                               // mtime
            u32::try_from(data.len()).expect("cpio file too large"),
            0, // devmajor
            0, // devminor
            0, // rdevmajor
            0, // rdevminor
            u32::try_from(name.len() + 1).expect("name too long"),
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.buf
    }
}

/// [`GuestTest::spawn_backend`] without the `GuestTest`: for threads that restart backends
/// while the test's guest runs. `dir` is the test directory, `test` its name (for messages).
/// The child gets `PR_SET_PDEATHSIG`: it dies when the *thread* that spawned it ends.
pub fn spawn_backend_in(
    dir: &Path,
    test: &str,
    name: &str,
    mut cmd: Command,
) -> io::Result<Backend> {
    let log = dir.join(format!("{name}.log"));
    let mut f = File::create(&log)?;
    writeln!(f, "# {}", command_line(&cmd))?;
    let f2 = f.try_clone()?;
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    cmd.env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2);
    set_pdeathsig(&mut cmd);
    let child = cmd.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot start {}: {e}", command_line(&cmd)),
        )
    })?;
    eprintln!(
        "guest test {}: started {name} pid {} ({})",
        test,
        child.id(),
        command_line(&cmd)
    );
    Ok(Backend {
        name: name.to_string(),
        child: Some(child),
        log,
        status: None,
    })
}

/// Whether `child` still runs; if it ended, it is reaped (`None`) and its exit status
/// kept in `status`. A process whose state cannot be read counts as running.
pub fn still_running(
    child: &mut Option<std::process::Child>,
    status: &mut Option<std::process::ExitStatus>,
) -> bool {
    if let Some(c) = child.as_mut() {
        match c.try_wait() {
            Ok(None) => return true,
            Ok(Some(st)) => {
                *status = Some(st);
                *child = None;
            }
            Err(_) => return true,
        }
    }
    false
}

/// A backend process started by [`GuestTest::spawn_backend`]. Killed
/// (SIGKILL) on drop unless already stopped.
pub struct Backend {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Backend {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether the process still runs (reaps it if it ended).
    pub fn is_running(&mut self) -> bool {
        still_running(&mut self.child, &mut self.status)
    }

    /// Exit status once the process has ended.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.status
    }

    /// Waits until a listening unix socket is bound at `socket` (checked in
    /// /proc/net/unix without connecting, so the backend never sees a stray
    /// client), failing early if the process exits.
    pub fn wait_for_socket(&mut self, socket: &Path, timeout: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if socket_listening(socket) {
                return Ok(());
            }
            if !self.is_running() {
                return Err(format!(
                    "{} exited ({:?}) before listening on {}; log {}:\n{}",
                    self.name,
                    self.status,
                    socket.display(),
                    self.log.display(),
                    tail_file(&self.log, 20)
                ));
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "{} not listening on {} after {timeout:?}; log {}:\n{}",
                    self.name,
                    socket.display(),
                    self.log.display(),
                    tail_file(&self.log, 20)
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait up to `timeout` for the exit (SIGKILL after that,
    /// reported as an error).
    pub fn stop_timeout(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let Some(mut c) = self.child.take() else {
            return self
                .status
                .ok_or_else(|| format!("{} was never started", self.name));
        };
        if let Ok(Some(st)) = c.try_wait() {
            self.status = Some(st);
            return Ok(st);
        }
        let pid = libc::pid_t::try_from(c.id()).map_err(|e| e.to_string())?;
        // SAFETY: plain kill(2) on our own, not yet reaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            match c.try_wait() {
                Ok(Some(st)) => {
                    self.status = Some(st);
                    return Ok(st);
                }
                Ok(None) if start.elapsed() < timeout => thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = c.kill();
                    let st = c.wait().ok();
                    self.status = st;
                    return Err(format!(
                        "{} did not exit within {timeout:?} of SIGTERM; killed",
                        self.name
                    ));
                }
            }
        }
    }

    /// [`Backend::stop_timeout`] with 10 s.
    pub fn stop(&mut self) -> Result<ExitStatus, String> {
        self.stop_timeout(Duration::from_secs(10))
    }

    /// Stops the backend and asserts a clean exit (status 0).
    #[track_caller]
    pub fn stop_expect_clean(&mut self) {
        match self.stop() {
            Ok(st) if st.success() => {}
            Ok(st) => panic!(
                "{} exited with {st} (signal {:?}) after SIGTERM, want 0; log {}:\n{}",
                self.name,
                st.signal(),
                self.log.display(),
                tail_file(&self.log, 20)
            ),
            Err(e) => panic!(
                "{e}; log {}:\n{}",
                self.log.display(),
                tail_file(&self.log, 20)
            ),
        }
    }

    /// SIGKILL now (no chance to clean up) and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            self.status = c.wait().ok();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A project binary for a guest test: `$env_var` if set (it must be executable), else the
/// newest `name` in `{<target dir of this test binary>,$CARGO_TARGET_DIR,<workspace>/target}/
/// {release,debug}`.
pub fn locate_binary(name: &str, env_var: &str) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(env_var).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(format!("{env_var}={} is not an executable", p.display()))
        };
    }
    let mut target_dirs = Vec::new();
    // <target>/<profile>/deps/<test binary>
    if let Ok(exe) = std::env::current_exe() {
        if let Some(t) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
            target_dirs.push(t.to_path_buf());
        }
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        target_dirs.push(PathBuf::from(t));
    }
    target_dirs.push(workspace_dir().join("target"));
    let mut candidates: Vec<(SystemTime, PathBuf)> = target_dirs
        .iter()
        .flat_map(|t| ["release", "debug"].map(|p| t.join(p).join(name)))
        .filter(|p| is_executable(p))
        .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    candidates.sort();
    candidates.pop().map(|(_, p)| p).ok_or_else(|| {
        format!(
            "{name} not found in {target_dirs:?}/{{release,debug}}; build it \
             (cargo build -p {name}) or set {env_var}"
        )
    })
}

/// [`locate_binary`] for programs installed next to the project's binaries (`bench`):
/// `$env_var` if set, else `name` in the running program's own directory (so a release
/// `bench` runs release backends from the same build), else [`locate_binary`]'s search.
pub fn locate_sibling_binary(name: &str, env_var: &str) -> Result<PathBuf, String> {
    if std::env::var_os(env_var).is_some_and(|p| !p.is_empty()) {
        return locate_binary(name, env_var);
    }
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| is_executable(p));
    match sibling {
        Some(p) => Ok(p),
        None => locate_binary(name, env_var),
    }
}

/// Whether a unix socket bound at `path` is listening (/proc/net/unix
/// `Flags` has `__SO_ACCEPTCON`).
pub fn socket_listening(path: &Path) -> bool {
    let is_socket = fs::metadata(path)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false);
    if !is_socket {
        return false;
    }
    let Ok(table) = fs::read_to_string("/proc/net/unix") else {
        return true; // no /proc: the bound socket file is the best we have
    };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8
            && f[7] == want
            && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
    })
}

/// Options of a vhost-user-blk backend, mirroring `vhost-blk-backend`'s CLI.
#[derive(Debug, Clone, Default)]
pub struct BlkOpts {
    pub read_only: bool,
    pub num_queues: Option<u16>,
    pub queue_size: Option<u16>,
    pub serial: Option<String>,
    /// `none` or `writeback`.
    pub cache: Option<String>,
    /// 512 or 4096.
    pub block_size: Option<u32>,
}

/// Which vhost-user-blk backend implementation the tests drive.
#[derive(Debug, Clone)]
pub enum BlkBackend {
    /// The project's `vhost-blk-backend` binary.
    VhostBlk(PathBuf),
    /// `qemu-storage-daemon` (reference implementation; for validating the
    /// harness itself).
    Qsd(PathBuf),
}

impl BlkBackend {
    /// `VHOST_GUEST_BLK_IMPL=qsd` selects qemu-storage-daemon (`$QSD` or from
    /// PATH); otherwise `vhost-blk-backend` located by
    /// [`BlkBackend::locate_vhost_blk_backend`].
    pub fn from_env() -> Result<BlkBackend, String> {
        match std::env::var("VHOST_GUEST_BLK_IMPL").as_deref() {
            Ok("qsd") | Ok("qemu-storage-daemon") => {
                let qsd = std::env::var_os("QSD")
                    .map(PathBuf::from)
                    .or_else(|| find_in_path("qemu-storage-daemon"))
                    .unwrap_or_else(|| PathBuf::from("qemu-storage-daemon"));
                if is_executable(&qsd) {
                    Ok(BlkBackend::Qsd(qsd))
                } else {
                    Err(format!(
                        "qemu-storage-daemon not found at {}",
                        qsd.display()
                    ))
                }
            }
            Ok("") | Ok("vhost-blk-backend") | Err(_) => {
                Self::locate_vhost_blk_backend().map(BlkBackend::VhostBlk)
            }
            Ok(other) => Err(format!(
                "VHOST_GUEST_BLK_IMPL={other:?}: want vhost-blk-backend or qsd"
            )),
        }
    }

    /// `$VHOST_BLK_BACKEND`, else the newest existing
    /// `{<target dir of this test binary>,$CARGO_TARGET_DIR,<workspace>/target}/{release,debug}/vhost-blk-backend`.
    pub fn locate_vhost_blk_backend() -> Result<PathBuf, String> {
        locate_binary("vhost-blk-backend", "VHOST_BLK_BACKEND")
    }

    pub fn name(&self) -> &'static str {
        match self {
            BlkBackend::VhostBlk(_) => "vhost-blk-backend",
            BlkBackend::Qsd(_) => "qemu-storage-daemon",
        }
    }

    /// Whether `BlkOpts::serial` reaches the guest.
    pub fn supports_serial(&self) -> bool {
        matches!(self, BlkBackend::VhostBlk(_))
    }

    /// The command serving `image` on `socket` (a stale socket file is
    /// removed first).
    pub fn command(&self, socket: &Path, image: &Path, o: &BlkOpts) -> Command {
        let _ = fs::remove_file(socket);
        match self {
            BlkBackend::VhostBlk(bin) => {
                let mut c = Command::new(bin);
                c.arg("--socket-path").arg(socket);
                c.arg("--blk-file").arg(image);
                if o.read_only {
                    c.arg("--read-only");
                }
                if let Some(n) = o.num_queues {
                    c.arg("--num-queues").arg(n.to_string());
                }
                if let Some(n) = o.queue_size {
                    c.arg("--queue-size").arg(n.to_string());
                }
                if let Some(s) = &o.serial {
                    c.arg("--serial").arg(s);
                }
                if let Some(m) = &o.cache {
                    c.arg("--cache").arg(m);
                }
                if let Some(b) = o.block_size {
                    c.arg("--block-size").arg(b.to_string());
                }
                c
            }
            BlkBackend::Qsd(bin) => {
                let img = image.to_string_lossy();
                let sock = socket.to_string_lossy();
                assert!(!img.contains(',') && !sock.contains(','), "',' in path");
                let direct = if o.cache.as_deref() == Some("writeback") {
                    "off"
                } else {
                    "on"
                };
                let ro = if o.read_only { "on" } else { "off" };
                let mut export = format!(
                    "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},\
                     writable={},num-queues={}",
                    if o.read_only { "off" } else { "on" },
                    o.num_queues.unwrap_or(1)
                );
                if let Some(b) = o.block_size {
                    let _ = write!(export, ",logical-block-size={b}");
                }
                let mut c = Command::new(bin);
                c.arg("--blockdev").arg(format!(
                    "driver=file,node-name=f0,filename={img},cache.direct={direct},\
                     aio=threads,discard=unmap,read-only={ro}"
                ));
                c.arg("--export").arg(export);
                c
            }
        }
    }
}

/// Hex sha256 of `len` bytes of `path` at `offset` (short files fail).
pub fn sha256_file_range(path: &Path, offset: u64, len: u64) -> io::Result<String> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut h = Sha256::new();
    let mut left = len;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        f.read_exact(&mut buf[..n])?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(hex(&h.finalize()))
}

/// Whether `len` bytes of `path` at `offset` are all zero (a memcmp per
/// MiB: fast even in unoptimised test builds, unlike hashing).
pub fn file_range_is_zero(path: &Path, offset: u64, len: u64) -> io::Result<bool> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let zeros = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        f.read_exact(&mut buf[..n])?;
        if buf[..n] != zeros[..n] {
            return Ok(false);
        }
        left -= n as u64;
    }
    Ok(true)
}

/// Hex sha256 of a whole file.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let len = fs::metadata(path)?.len();
    sha256_file_range(path, 0, len)
}

/// Hex sha256 of `len` zero bytes.
pub fn sha256_zeros(len: u64) -> String {
    let mut h = Sha256::new();
    let buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        h.update(&buf[..n]);
        left -= n as u64;
    }
    hex(&h.finalize())
}

fn hex(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

/// Writes `len` pseudo-random bytes (xorshift64*, from `seed`) into `path`
/// at `offset`; returns their hex sha256.
pub fn write_random(path: &Path, offset: u64, len: u64, seed: u64) -> io::Result<String> {
    let mut f = OpenOptions::new().write(true).open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut state = seed | 1;
    let mut h = Sha256::new();
    let mut left = len;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        for chunk in buf[..n].chunks_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let v = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        f.write_all(&buf[..n])?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(hex(&h.finalize()))
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn parses_console() {
        let c = "noise\n@@RESULT a=1 b=x\n[ 1.0] kernel @@RESULT c=3\n@@RESULT a=2\n@@GUEST-EXIT@@ 4 uptime=5.0\n";
        let (r, e) = parse_console(c);
        assert_eq!(r.get("a").map(String::as_str), Some("2"));
        assert_eq!(r.get("b").map(String::as_str), Some("x"));
        assert_eq!(r.get("c").map(String::as_str), Some("3"));
        assert_eq!(e, Some(4));
        assert_eq!(parse_console("no exit\n").1, None);
    }

    #[test]
    fn cpio_is_aligned() {
        let mut c = CpioWriter::default();
        c.entry("test", 0o040755, &[]);
        c.entry("test/x", 0o100644, b"abc");
        let b = c.finish();
        assert_eq!(b.len() % 4, 0);
        assert!(b.starts_with(b"070701"));
        assert!(b.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn zeros_hash() {
        assert_eq!(
            sha256_zeros(0),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
