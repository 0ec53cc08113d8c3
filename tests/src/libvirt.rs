//! libvirt for the guest tests, with no daemon: one `virsh` session on libvirt's
//! embedded QEMU driver (`qemu:///embed?root=DIR`), which loads the same QEMU driver
//! `virtqemud`/`libvirtd` would, keeps every file it makes under DIR and runs the
//! domain's QEMU itself. The session stays open while the domain runs, because the
//! driver in it is what watches the QEMU monitor (a guest powering off is turned into
//! `on_poweroff`); a domain left running when virsh exits would have no one to do that.
//!
//! Also: filling a domain XML template from `deploy/libvirt/` with a test's paths.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::guest::workspace_dir;

/// What went wrong talking to libvirt.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// virsh could not be started (not installed: `tests/guest/setup.sh` installs it).
    #[error("cannot start virsh ({0}); install libvirt-clients and libvirt-daemon-driver-qemu (tests/guest/setup.sh)")]
    Spawn(std::io::Error),
    /// A virsh command failed; `output` is everything it printed.
    #[error("virsh `{command}` failed:\n{output}")]
    Command {
        /// The command.
        command: String,
        /// Its output (stdout and stderr).
        output: String,
    },
    /// virsh did not finish a command in time, or exited.
    #[error("virsh `{command}`: {what}; so far:\n{output}")]
    Stuck {
        /// The command.
        command: String,
        /// Timed out or exited.
        what: String,
        /// What it printed meanwhile.
        output: String,
    },
    /// Writing a file (configuration, domain XML) failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A template no longer contains a string the test replaces.
    #[error("{template}: no `{missing}` to replace; the example and the test drifted apart")]
    Template {
        /// The template.
        template: PathBuf,
        /// What was not found.
        missing: String,
    },
}

/// `qemu.conf` of the embedded driver (`<root>/etc/qemu.conf`):
/// * QEMU runs as root: the tests' backends (root) create their sockets 0755, which
///   only root can connect to, and the QEMU 11 wrapper enters a chroot;
/// * so libvirt chowns nothing for it (`dynamic_ownership = 0`) and notes no owners in
///   extended attributes (`remember_owner = 0`): the shared guest kernel is left alone;
/// * QEMU's stdout/stderr go straight to `<root>/log/qemu/<name>.log`, not through
///   virtlogd (a service of its own, which nothing starts here);
/// * QEMU runs in the test's own mount namespace (`namespaces = []`): libvirt's private
///   /dev for it could not make a pty in the chroot `scripts/fresh-check.sh` runs the
///   tests in ("Failed to create PTY"), and the tests need no device isolation.
pub const EMBED_QEMU_CONF: &str = "user = \"root\"\ngroup = \"root\"\n\
    dynamic_ownership = 0\nremember_owner = 0\nstdio_handler = \"file\"\n\
    namespaces = []\n";

/// One `virsh` process on `qemu:///embed?root=<root>`, fed commands on its stdin.
/// stdout and stderr arrive merged, line by line, and are copied to a log file.
pub struct EmbeddedVirsh {
    root: PathBuf,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seq: u64,
    /// Domains defined through this session, undefined (destroyed first) on drop.
    domains: Vec<String>,
}

/// Default time a virsh command may take (the first `define` probes the emulator's
/// capabilities: a few seconds, more on a loaded machine).
pub const VIRSH_TIMEOUT: Duration = Duration::from_secs(120);

impl EmbeddedVirsh {
    /// Creates `root` (removing what an earlier run left there), writes its
    /// `etc/qemu.conf` ([`EMBED_QEMU_CONF`]) and starts virsh on it; its output goes
    /// to `log`. Keep `root` short: the domain's monitor socket lives under it, and a
    /// unix socket path has at most 107 bytes.
    pub fn start(root: &Path, log: &Path) -> Result<EmbeddedVirsh, LibvirtError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LibvirtError::Io { path, source }
        };
        let _ = fs::remove_dir_all(root);
        fs::create_dir_all(root.join("etc")).map_err(io(root))?;
        let conf = root.join("etc/qemu.conf");
        fs::write(&conf, EMBED_QEMU_CONF).map_err(io(&conf))?;
        let mut log_file = fs::File::create(log).map_err(io(log))?;

        let uri = format!("qemu:///embed?root={}", root.display());
        // sh merges stderr (errors, libvirt's log lines) into the one pipe we read, so
        // a command's messages arrive before the marker that ends it.
        let mut child = Command::new("sh")
            .args(["-c", "exec virsh -c \"$0\" 2>&1"])
            .arg(&uri)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(LibvirtError::Spawn)?;
        let stdout = child.stdout.take().ok_or_else(|| {
            LibvirtError::Spawn(std::io::Error::other("virsh has no stdout pipe"))
        })?;
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            // Until EOF (virsh exited) or the session is gone; bytes that are not UTF-8
            // (a guest's console output, say) must not end the session.
            while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                buf.clear();
                let _ = writeln!(log_file, "{line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut v = EmbeddedVirsh {
            root: root.to_path_buf(),
            child,
            stdin,
            lines,
            seq: 0,
            domains: Vec::new(),
        };
        // `uri` fails when virsh could not open the connection (no QEMU driver module).
        v.run("uri")?;
        Ok(v)
    }

    /// QEMU's log of domain `name` (its command line, then its stderr).
    pub fn qemu_log(&self, name: &str) -> PathBuf {
        self.root.join("log/qemu").join(format!("{name}.log"))
    }

    /// Runs one virsh command (`define /path/x.xml`, `domstate --reason vm1`) with
    /// [`VIRSH_TIMEOUT`] and returns what it printed. An `error:` line is a failure.
    pub fn run(&mut self, command: &str) -> Result<String, LibvirtError> {
        self.run_timeout(command, VIRSH_TIMEOUT)
    }

    /// [`EmbeddedVirsh::run`] with a time limit of its own.
    pub fn run_timeout(
        &mut self,
        command: &str,
        timeout: Duration,
    ) -> Result<String, LibvirtError> {
        self.seq += 1;
        let marker = format!("@@VIRSH-DONE-{}", self.seq);
        let stuck = |what: String, output: &[String]| LibvirtError::Stuck {
            command: command.to_string(),
            what,
            output: output.join("\n"),
        };
        let sent = match self.stdin.as_mut() {
            Some(stdin) => writeln!(stdin, "{command}\necho {marker}").and_then(|_| stdin.flush()),
            None => Err(std::io::Error::other("stdin closed")),
        };
        if let Err(e) = sent {
            return Err(stuck(format!("cannot write to virsh: {e}"), &[]));
        }
        let deadline = Instant::now() + timeout;
        let mut output = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.trim() == marker => break,
                // The prompt and the echo of what we typed.
                Ok(line) if line.starts_with("virsh #") => {}
                Ok(line) => output.push(line),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(stuck(format!("no answer within {timeout:?}"), &output))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(stuck("virsh exited".to_string(), &output))
                }
            }
        }
        // virsh's own errors start with `error:`; libvirt's logged ones read
        // `<time>: <tid>: error : ...`.
        if output
            .iter()
            .any(|l| l.starts_with("error:") || l.contains(": error : "))
        {
            return Err(LibvirtError::Command {
                command: command.to_string(),
                output: output.join("\n"),
            });
        }
        Ok(output.join("\n"))
    }

    /// `virsh define xml` (remembered, so dropping the session undefines it).
    pub fn define(&mut self, xml: &Path, name: &str) -> Result<String, LibvirtError> {
        let out = self.run(&format!("define {}", xml.display()))?;
        self.domains.push(name.to_string());
        Ok(out)
    }

    /// `virsh domstate --reason name`: e.g. `running (booted)`, `shut off (shutdown)`.
    pub fn domstate(&mut self, name: &str) -> Result<String, LibvirtError> {
        Ok(self
            .run(&format!("domstate --reason {name}"))?
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("")
            .to_string())
    }

    /// Waits until domain `name` is shut off (polling `domstate` every second) and returns
    /// its state line; `Err` with the last state after `timeout`.
    pub fn wait_shut_off(&mut self, name: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.domstate(name).map_err(|e| e.to_string())?;
            if state.starts_with("shut off") {
                return Ok(state);
            }
            if Instant::now() > deadline {
                return Err(format!("domain {name} still `{state}` after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Destroys (if running) and undefines every domain defined in this session, and
    /// ends virsh. Errors are collected, not returned early: everything is attempted.
    pub fn close(mut self) -> Result<(), String> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), String> {
        let mut errors = Vec::new();
        for name in std::mem::take(&mut self.domains) {
            match self.domstate(&name) {
                Ok(s) if s.starts_with("shut off") => {}
                Ok(_) => {
                    if let Err(e) = self.run(&format!("destroy {name}")) {
                        errors.push(e.to_string());
                    }
                }
                Err(e) => errors.push(e.to_string()),
            }
            if let Err(e) = self.run(&format!("undefine {name}")) {
                errors.push(e.to_string());
            }
            self.kill_leftover_qemu(&name);
        }
        // EOF on stdin ends virsh.
        self.stdin = None;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    errors.push("virsh did not exit on EOF; killed".to_string());
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("\n"))
        }
    }

    /// QEMU outlives the virsh that started it (libvirt daemonizes it): if domain
    /// `name`'s QEMU is still there after `destroy` (or virsh died), kill it.
    fn kill_leftover_qemu(&self, name: &str) {
        kill_root_qemu(
            &self.root,
            &self.root.join("run/qemu").join(format!("{name}.pid")),
        );
    }
}

/// SIGKILLs the QEMU whose pid `pidfile` (one of the driver's `<root>/run/qemu/<domain>.pid`)
/// holds, if that process is still there and is the QEMU of this root (its command line
/// names a file under `root`), never anyone else's.
fn kill_root_qemu(root: &Path, pidfile: &Path) {
    let Some(pid) = fs::read_to_string(pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<libc::pid_t>().ok())
    else {
        return;
    };
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let root_str = root.to_string_lossy();
    if pid > 1 && String::from_utf8_lossy(&cmdline).contains(root_str.as_ref()) {
        eprintln!(
            "libvirt: QEMU pid {pid} of {} outlived its domain; killing it",
            root.display()
        );
        // SAFETY: kill(2) on a pid whose command line we just checked.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Cleans up after runs that died without doing it themselves (a SIGKILLed test leaves
/// its domain's QEMU running, as libvirt daemonized it): every directory `<dir>/<prefix>*`
/// whose driver pid file (`run/qemu/driver.pid`, the virsh that held the root) names no
/// live process has its QEMUs killed and is removed. A root in use is left alone.
pub fn sweep_stale_roots(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let root = e.path();
        let state = root.join("run/qemu");
        let holder = fs::read_to_string(state.join("driver.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        if holder.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists()) {
            continue;
        }
        for f in fs::read_dir(&state).into_iter().flatten().flatten() {
            let name = f.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".pid") && name != "driver.pid" {
                kill_root_qemu(&root, &f.path());
            }
        }
        eprintln!("libvirt: removing the stale root {}", root.display());
        let _ = fs::remove_dir_all(&root);
    }
}

impl Drop for EmbeddedVirsh {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            if let Err(e) = self.shutdown() {
                eprintln!("libvirt: cleaning up: {e}");
            }
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// `deploy/libvirt/<name>`: the example domain XMLs.
pub fn example_xml(name: &str) -> PathBuf {
    workspace_dir().join("deploy/libvirt").join(name)
}

/// `template` with each `(from, to)` replaced (every occurrence); a `from` that is not
/// there is an error, so the example cannot change under the test unnoticed.
pub fn fill_template(template: &Path, subs: &[(&str, String)]) -> Result<String, LibvirtError> {
    let mut xml = fs::read_to_string(template).map_err(|source| LibvirtError::Io {
        path: template.to_path_buf(),
        source,
    })?;
    for (from, to) in subs {
        if !xml.contains(from) {
            return Err(LibvirtError::Template {
                template: template.to_path_buf(),
                missing: (*from).to_string(),
            });
        }
        xml = xml.replace(from, to);
    }
    Ok(xml)
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn the_examples_have_what_the_tests_replace() {
        for f in ["vm1.xml", "vm1-console.xml"] {
            let p = example_xml(f);
            let subs = [
                ("<name>vm1</name>", "<name>x</name>".to_string()),
                ("/run/vm1/blk.sock", "/b".to_string()),
                ("/run/vm1/net.sock", "/n".to_string()),
            ];
            let xml = fill_template(&p, &subs).unwrap();
            assert!(xml.contains("<name>x</name>") && !xml.contains("/run/vm1/blk.sock"));
        }
        let e = fill_template(&example_xml("vm1.xml"), &[("no such text", String::new())]);
        assert!(matches!(e, Err(LibvirtError::Template { .. })), "{e:?}");
    }
}
