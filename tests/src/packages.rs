//! Harness of the Debian package tests (`tests/tests/packages.rs`): builds the packages
//! with `scripts/package.sh`, gets the cached bookworm roots of `tests/packages/root.sh`,
//! runs commands in a throw-away copy of a root (chroot), and boots a root under
//! `systemd-nspawn --boot` (PID 1 of this machine need not be systemd) to run commands
//! in the booted system.
//!
//! Work directory: `$VHOST_PACKAGES_WORK` (default `/var/tmp/vhost-packages`; on disk,
//! not tmpfs: the block backend's image lives there and must take O_DIRECT).

use std::fs;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use crate::guest::workspace_dir;

/// The three programs, each with its directory under /etc/vhost-dataplane/ and the
/// name of its vhost-user socket in /run/vhost-dataplane/VM/.
pub const PROGRAMS: [(&str, &str); 3] = [
    ("vhost-blk-backend", "blk"),
    ("vhost-net-backend", "net"),
    ("serial-backend", "serial"),
];

/// PATH inside the roots.
const ROOT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The work directory.
pub fn work_dir() -> PathBuf {
    std::env::var_os("VHOST_PACKAGES_WORK")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/vhost-packages"))
}

/// A fresh directory for one test's files under the work directory (removed on drop).
pub fn run_dir(test: &str) -> io::Result<tempfile::TempDir> {
    let runs = work_dir().join("runs");
    fs::create_dir_all(&runs)?;
    tempfile::Builder::new()
        .prefix(&format!("{test}-"))
        .tempdir_in(runs)
}

/// Whether the process runs as root (chroot, nspawn, apt).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The packages (`scripts/package.sh --fast`: a release build, then cargo-deb), built
/// once per test process; their paths, in [`PROGRAMS`]' order.
pub fn debs() -> Result<&'static [PathBuf], String> {
    static DEBS: OnceLock<Result<Vec<PathBuf>, String>> = OnceLock::new();
    DEBS.get_or_init(|| {
        let script = workspace_dir().join("scripts/package.sh");
        let out = Command::new(&script)
            .arg("--fast")
            .current_dir(workspace_dir())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed ({}):\n{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let debs: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| workspace_dir().join(l.trim()))
            .collect();
        for ((program, _), deb) in PROGRAMS.iter().zip(&debs) {
            let name = deb.file_name().map(|n| n.to_string_lossy().into_owned());
            if !name.is_some_and(|n| n.starts_with(&format!("{program}_")) && n.ends_with(".deb")) {
                return Err(format!(
                    "package.sh printed {debs:?}, not one .deb per program"
                ));
            }
        }
        Ok(debs)
    })
    .as_deref()
    .map_err(Clone::clone)
}

/// Which cached root of `tests/packages/root.sh`.
#[derive(Clone, Copy, Debug)]
pub enum RootKind {
    /// Minbase with apt's lists and man-db; systemd's packages in apt's cache only.
    Clean,
    /// The clean root with systemd installed, to boot.
    Boot,
}

/// The cached root (prepared on first use; see `tests/packages/root.sh`).
pub fn prepared_root(kind: RootKind) -> Result<PathBuf, String> {
    let script = workspace_dir().join("tests/packages/root.sh");
    let arg = match kind {
        RootKind::Clean => "clean",
        RootKind::Boot => "boot",
    };
    let out = Command::new(&script)
        .arg(arg)
        .env("VHOST_PACKAGES_WORK", work_dir())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {arg} failed ({}):\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// A command's result, with what it printed, for assertions and messages.
#[derive(Debug)]
pub struct Ran {
    /// The shell script that ran.
    pub script: String,
    /// Exit status (a signal counts as 128 + its number).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Ran {
    fn from_output(script: &str, out: Output) -> Ran {
        Ran {
            script: script.to_string(),
            code: out
                .status
                .code()
                .or_else(|| out.status.signal().map(|s| 128 + s))
                .unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Its standard output, trimmed; panics, with everything it printed, if it failed.
    pub fn ok(&self) -> &str {
        assert_eq!(
            self.code, 0,
            "`{}` failed with {}:\n--- stdout\n{}\n--- stderr\n{}",
            self.script, self.code, self.stdout, self.stderr
        );
        self.stdout.trim()
    }
}

/// A throw-away copy of a prepared root, for commands run in it with chroot.
pub struct Chroot {
    dir: tempfile::TempDir,
}

impl Chroot {
    /// Copies `root` (cp -a) into a fresh directory under `parent`.
    pub fn copy_of(root: &Path, parent: &Path) -> io::Result<Chroot> {
        let dir = tempfile::Builder::new()
            .prefix("root-")
            .tempdir_in(parent)?;
        let status = Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", root.display()))
            .arg(dir.path())
            .status()?;
        if !status.success() {
            return Err(io::Error::other(format!(
                "cp -a {} {}: {status}",
                root.display(),
                dir.path().display()
            )));
        }
        Ok(Chroot { dir })
    }

    /// A path inside the root, as the host sees it.
    pub fn path(&self, inside: &str) -> PathBuf {
        self.dir.path().join(inside.trim_start_matches('/'))
    }

    /// Runs `script` with bash as root in the root: /proc, /dev, a fresh /run and /tmp,
    /// in private mount and PID namespaces (nothing it starts outlives it).
    pub fn run(&self, script: &str) -> Ran {
        let out = Command::new("unshare")
            .args(["--mount", "--pid", "--fork", "--propagation", "private"])
            .args(["bash", "-c"])
            .arg(
                r#"set -e; R=$1; shift
                mount --bind "$R" "$R"
                mount -t proc proc "$R/proc"
                mount --rbind /dev "$R/dev"
                mount -t tmpfs -o mode=755 tmpfs "$R/run"
                mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
                exec chroot "$R" "$@""#,
            )
            .arg("sh")
            .arg(self.dir.path())
            .args(["/usr/bin/env", "-i", ROOT_PATH, "LANG=C", "HOME=/root"])
            .args(["DEBIAN_FRONTEND=noninteractive", "bash", "-c", script])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(out) => Ran::from_output(script, out),
            Err(e) => Ran {
                script: script.to_string(),
                code: -1,
                stdout: String::new(),
                stderr: format!("cannot run unshare: {e}"),
            },
        }
    }
}

/// A directory of the host mounted into a booted container.
pub struct Bind<'a> {
    /// On the host.
    pub host: &'a Path,
    /// In the container.
    pub inside: &'a str,
    /// Read-only.
    pub read_only: bool,
}

/// A root booted with `systemd-nspawn --boot --volatile=overlay` (its changes go to a
/// tmpfs and vanish with it; the root stays as it was). Halted on drop.
pub struct Container {
    nspawn: Child,
    leader: u32,
    log: PathBuf,
}

impl Container {
    /// Boots `root` and waits until its systemd has finished starting up. `log` receives
    /// the console (systemd's boot messages). An error says why it could not boot (this
    /// machine cannot run systemd in a container): the caller skips.
    pub fn boot(root: &Path, binds: &[Bind], log: &Path) -> Result<Container, String> {
        let name = format!("vhost-pkg-{}", std::process::id());
        let console = fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let console_err = console
            .try_clone()
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let mut cmd = Command::new("systemd-nspawn");
        // No systemd on the host to register with or to make a scope unit: stay in our
        // own cgroup.
        cmd.args(["--register=no", "--keep-unit", "--boot"])
            .arg(format!("--machine={name}"))
            .arg(format!("--directory={}", root.display()))
            .args(["--volatile=overlay", "--console=read-only"]);
        for b in binds {
            let flag = if b.read_only { "--bind-ro" } else { "--bind" };
            cmd.arg(format!("{flag}={}:{}", b.host.display(), b.inside));
        }
        let nspawn = cmd
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(console_err)
            .spawn()
            .map_err(|e| format!("cannot run systemd-nspawn: {e}"))?;
        let mut c = Container {
            nspawn,
            leader: 0,
            log: log.to_path_buf(),
        };
        c.leader = c.find_leader(Duration::from_secs(30))?;
        // `--wait` returns once start-up is over: running, or degraded if a unit failed.
        // Asked too early, systemctl answers at once that it cannot tell: ask again.
        let deadline = Instant::now() + Duration::from_secs(60);
        let up = loop {
            let up = c.run("timeout 120 systemctl is-system-running --wait");
            if !systemd_still_starting(&up) || Instant::now() > deadline {
                break up;
            }
            thread::sleep(Duration::from_millis(100));
        };
        if !matches!(up.stdout.trim(), "running" | "degraded") {
            return Err(format!(
                "the container's systemd did not finish starting up ({}: {}{})\n{}",
                up.code,
                up.stdout.trim(),
                up.stderr.trim(),
                c.log_tail()
            ));
        }
        Ok(c)
    }

    /// The container's PID 1: the child of systemd-nspawn that runs systemd.
    fn find_leader(&mut self, timeout: Duration) -> Result<u32, String> {
        let deadline = Instant::now() + timeout;
        let pid = self.nspawn.id();
        loop {
            if let Ok(Some(status)) = self.nspawn.try_wait() {
                return Err(format!(
                    "systemd-nspawn exited at once ({status})\n{}",
                    self.log_tail()
                ));
            }
            let children = fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
                .collect::<Vec<_>>()
                .join(" ");
            for child in children.split_whitespace() {
                let comm = fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
                if comm.trim() == "systemd" {
                    if let Ok(p) = child.parse() {
                        return Ok(p);
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no systemd started in the container within {timeout:?}\n{}",
                    self.log_tail()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of the console log.
    pub fn log_tail(&self) -> String {
        format!(
            "--- {} (last lines)\n{}",
            self.log.display(),
            crate::guest::tail_file(&self.log, 30)
        )
    }

    /// Runs `script` with bash as root in the container (its namespaces, its root).
    pub fn run(&self, script: &str) -> Ran {
        // --root and --wd explicitly: entering the mount namespace alone leaves a caller
        // that is itself in a chroot (scripts/fresh-check.sh) in its own root.
        let out = Command::new("nsenter")
            .arg(format!("--target={}", self.leader))
            .args(["--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup"])
            .args(["--root", "--wd", "/usr/bin/env", "-i", ROOT_PATH])
            .args(["LANG=C", "HOME=/root"])
            .args(["DEBIAN_FRONTEND=noninteractive", "bash", "-c", script])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(out) => Ran::from_output(script, out),
            Err(e) => Ran {
                script: script.to_string(),
                code: -1,
                stdout: String::new(),
                stderr: format!("cannot run nsenter: {e}"),
            },
        }
    }

    /// A path in the container as the host can open it (sockets included), through
    /// /proc/PID/root of its PID 1.
    pub fn host_path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.leader)).join(inside.trim_start_matches('/'))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGTERM asks systemd-nspawn to halt the container cleanly; SIGKILL if it hangs.
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.nspawn.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        // Killing the container's PID 1 ends every process of its PID namespace.
        if self.leader != 0 {
            // SAFETY: plain kill(2) on the container's PID 1, a child of our child.
            unsafe { libc::kill(self.leader as libc::pid_t, libc::SIGKILL) };
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// Whether `systemctl is-system-running --wait` answered before systemd could: it cannot
/// connect until systemd listens on its private socket, and it says `offline` (exit 1, at
/// once) until systemd has mounted /run and created /run/systemd/system, which is what
/// systemctl takes as "booted with systemd". Both are the first instants of the boot: ask
/// again.
fn systemd_still_starting(up: &Ran) -> bool {
    up.stderr.contains("Failed to connect to bus") || up.stdout.trim() == "offline"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(code: i32, stdout: &str, stderr: &str) -> Ran {
        Ran {
            script: "systemctl is-system-running --wait".to_string(),
            code,
            stdout: stdout.to_string(),
            stderr: stderr.to_string(),
        }
    }

    #[test]
    fn systemctl_asked_before_systemd_set_up_run_is_asked_again() {
        // What CI saw on 2026-12-06: asked an instant after PID 1 became systemd.
        assert!(systemd_still_starting(&answer(1, "offline\n", "")));
        assert!(systemd_still_starting(&answer(
            1,
            "",
            "Failed to connect to bus: No such file or directory\n"
        )));
    }

    #[test]
    fn a_finished_or_failed_start_up_is_an_answer() {
        for (code, out) in [(0, "running\n"), (1, "degraded\n"), (1, "maintenance\n")] {
            assert!(!systemd_still_starting(&answer(code, out, "")), "{out}");
        }
    }
}
