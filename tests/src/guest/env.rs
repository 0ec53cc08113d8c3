//! What the machine has for guests: the harness's directories, the one-time set-up
//! (`tests/guest/setup.sh`, `build-initramfs.sh`, `paths.sh`) resolving QEMU, the guest
//! kernel and initramfs and the accelerator, and where the project's binaries are.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use super::skip::tail_file;

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

pub(super) fn env_flag(name: &str) -> bool {
    matches!(std::env::var(name), Ok(v) if !v.is_empty() && v != "0")
}

/// QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
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

pub(super) fn find_in_path(name: &str) -> Option<PathBuf> {
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
