//! Backend processes of a guest test: started with their log, waited for until their
//! socket listens, stopped cleanly or killed.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::process::{command_line, set_pdeathsig};
use super::skip::tail_file;

/// [`GuestTest::spawn_backend`](super::GuestTest::spawn_backend) without the `GuestTest`: for threads that restart backends
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

/// A backend process started by [`GuestTest::spawn_backend`](super::GuestTest::spawn_backend). Killed
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
