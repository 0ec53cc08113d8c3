//! A QEMU the test runs and steers itself, for live migration (two or more QEMUs per
//! test): the guest's console is a pipe the test writes commands into and a log it
//! follows for `@@RESULT` lines, and QMP is a socket in the test directory.
//!
//! [`qemu_migrate`] runs QEMU's own migration from one [`Vm`] to another started with
//! `-incoming`, and waits for its outcome.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vhost_user_device::control::QmpClient;

use crate::guest::{
    command_line, parse_console, socket_listening, tail_file, GuestBoot, GuestTest, LineReader,
};

/// One QEMU process with its console and QMP.
pub struct Vm {
    /// Names its files: `<name>.console.log`, `<name>.qemu-stderr.log`, `<name>.qmp`.
    pub name: String,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    /// The guest's console output.
    pub console_log: PathBuf,
    /// QEMU's stderr.
    pub stderr_log: PathBuf,
    qmp_path: PathBuf,
    qmp: Option<QmpClient>,
    reader: LineReader,
    /// `@@RESULT` pairs seen so far on this VM's console (a later key overrides).
    pub results: BTreeMap<String, String>,
    /// The guest script's exit status (`@@GUEST-EXIT@@`), once printed.
    pub guest_exit: Option<i32>,
    status: Option<ExitStatus>,
}

impl Vm {
    /// Starts QEMU for `boot` on the prepared `initrd` (one initrd for every QEMU of a
    /// migration: both ends must load the same ROMs), plus `extra` arguments (`-incoming`).
    pub fn start(
        t: &GuestTest,
        name: &str,
        boot: &GuestBoot,
        initrd: &Path,
        extra: &[String],
    ) -> io::Result<Vm> {
        let console_log = t.path(&format!("{name}.console.log"));
        let stderr_log = t.path(&format!("{name}.qemu-stderr.log"));
        let qmp_path = t.path(&format!("{name}.qmp"));
        let _ = std::fs::remove_file(&qmp_path);
        let mut cmd = t.qemu_command(boot, initrd);
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(File::create(&console_log)?)
            .stderr(File::create(&stderr_log)?);
        let line = command_line(&cmd);
        std::fs::write(t.path(&format!("{name}.qemu-cmd.txt")), &line)?;
        let mut child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start QEMU ({line}): {e}")))?;
        eprintln!("vm {name}: QEMU pid {}", child.id());
        let stdin = child.stdin.take();
        Ok(Vm {
            name: name.to_string(),
            child: Some(child),
            stdin,
            reader: LineReader::new(&console_log),
            console_log,
            stderr_log,
            qmp_path,
            qmp: None,
            results: BTreeMap::new(),
            guest_exit: None,
            status: None,
        })
    }

    /// Runs a QMP command (connecting first if need be): its return value, or the error
    /// as text.
    pub fn qmp(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        if self.qmp.is_none() {
            let deadline = Instant::now() + Duration::from_secs(30);
            let c = loop {
                match QmpClient::connect(&self.qmp_path) {
                    Ok(c) => break c,
                    Err(_) if Instant::now() < deadline && self.running() => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => {
                        return Err(format!(
                            "{}: QMP {}: {e}",
                            self.name,
                            self.qmp_path.display()
                        ))
                    }
                }
            };
            self.qmp = Some(c);
        }
        let c = self.qmp.as_mut().ok_or("no QMP connection")?;
        match c.execute(cmd, args) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(format!("{}: QMP {cmd}: {}", self.name, e.desc)),
            Err(e) => {
                self.qmp = None;
                Err(format!("{}: QMP {cmd}: {e}", self.name))
            }
        }
    }

    /// Types `line` on the guest's console (the guest script reads it on stdin).
    pub fn send_line(&mut self, line: &str) -> Result<(), String> {
        let w = self.stdin.as_mut().ok_or("the console is closed")?;
        w.write_all(format!("{line}\n").as_bytes())
            .and_then(|()| w.flush())
            .map_err(|e| format!("{}: writing to the console: {e}", self.name))
    }

    /// Whether QEMU still runs (reaps it if it ended).
    pub fn running(&mut self) -> bool {
        crate::guest::still_running(&mut self.child, &mut self.status)
    }

    /// Reads the console lines that arrived since the last call into [`Vm::results`].
    pub fn poll(&mut self) {
        let (results, exit) = (&mut self.results, &mut self.guest_exit);
        self.reader.poll(&mut |line: &str| {
            let (r, e) = parse_console(line);
            results.extend(r);
            if e.is_some() {
                *exit = e;
            }
        });
    }

    /// A result seen on the console.
    pub fn result(&self, key: &str) -> Option<&str> {
        self.results.get(key).map(String::as_str)
    }

    /// A numeric result (0 when not reported yet).
    pub fn result_u64(&self, key: &str) -> u64 {
        self.result(key).and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    /// Follows the console until `done` holds for the results, QEMU exits or `timeout`
    /// passes (both errors, with the console's tail).
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&BTreeMap<String, String>) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll();
            if done(&self.results) {
                return Ok(());
            }
            if !self.running() {
                self.poll();
                if done(&self.results) {
                    return Ok(());
                }
                return Err(format!(
                    "{}: QEMU exited ({:?}) before {what}\n{}",
                    self.name,
                    self.status,
                    self.tails()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: no {what} after {timeout:?}\n{}",
                    self.name,
                    self.tails()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the guest reported `key` (a counter) `more` above the first value this
    /// VM's console showed (on a migration's destination, the first it reports there):
    /// proof the guest kept going. Returns the value reached.
    pub fn wait_progress(
        &mut self,
        key: &str,
        more: u64,
        timeout: Duration,
    ) -> Result<u64, String> {
        let num = |r: &BTreeMap<String, String>| r.get(key).and_then(|v| v.parse::<u64>().ok());
        self.wait_for(&format!("a first {key}"), timeout, |r| num(r).is_some())?;
        let want = self.result_u64(key) + more;
        self.wait_for(&format!("{key} >= {want}"), timeout, |r| {
            num(r).unwrap_or(0) >= want
        })?;
        Ok(self.result_u64(key))
    }

    /// Waits for QEMU to exit on its own (the guest powered off).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        while self.running() {
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: still running after {timeout:?}\n{}",
                    self.name,
                    self.tails()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.poll();
        self.status
            .ok_or_else(|| format!("{}: no exit status", self.name))
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        self.qmp = None;
        self.stdin = None;
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            self.status = c.wait().ok();
        }
    }

    /// `quit` over QMP (a source after its migration), then waits for the exit.
    pub fn quit(&mut self) -> Result<(), String> {
        // QEMU may close the connection before it answers.
        let _ = self.qmp("quit", json!({}));
        self.wait_exit(Duration::from_secs(30)).map(|_| ())
    }

    /// The tails of the console and of QEMU's stderr, for messages.
    pub fn tails(&self) -> String {
        format!(
            "--- {} console (tail) ---\n{}\n--- {} stderr (tail) ---\n{}",
            self.name,
            tail_file(&self.console_log, 30),
            self.name,
            tail_file(&self.stderr_log, 15)
        )
    }

    /// QEMU's stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What one QEMU migration did.
#[derive(Debug, Clone)]
pub struct QemuMigration {
    /// From `migrate` to `completed`.
    pub took: Duration,
    /// QEMU's own `downtime` (ms), if it reported one.
    pub downtime_ms: Option<u64>,
}

/// Starts QEMU's migration of `src` to `uri` (where a QEMU started with `-incoming` listens,
/// or is about to: a `unix:` socket is waited for) at `max_bandwidth` bytes/s.
pub fn qemu_migrate_start(src: &mut Vm, uri: &str, max_bandwidth: u64) -> Result<(), String> {
    if let Some(path) = uri.strip_prefix("unix:") {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket_listening(Path::new(path)) {
            if Instant::now() > deadline {
                return Err(format!(
                    "nobody listens on {path}: is the destination QEMU up?"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    src.qmp(
        "migrate-set-parameters",
        json!({"max-bandwidth": max_bandwidth}),
    )?;
    src.qmp("migrate", json!({"uri": uri}))?;
    Ok(())
}

/// Polls `query-migrate` on `src` until QEMU says `completed` (Ok) or `failed` /
/// `cancelled` (Err), `timeout` at most.
pub fn qemu_migrate_wait(src: &mut Vm, timeout: Duration) -> Result<QemuMigration, String> {
    let started = Instant::now();
    loop {
        let q = src.qmp("query-migrate", json!({}))?;
        match q["status"].as_str() {
            Some("completed") => {
                return Ok(QemuMigration {
                    took: started.elapsed(),
                    downtime_ms: q["downtime"].as_u64(),
                })
            }
            Some("failed") | Some("cancelled") => {
                return Err(format!("QEMU's migration ended: {q}"))
            }
            _ => {}
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "QEMU's migration did not complete in {timeout:?}: {q}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// [`qemu_migrate_start`] then [`qemu_migrate_wait`].
pub fn qemu_migrate(src: &mut Vm, uri: &str, timeout: Duration) -> Result<QemuMigration, String> {
    let t = Instant::now();
    qemu_migrate_start(src, uri, 4 << 30)?;
    let mut m = qemu_migrate_wait(src, timeout)?;
    m.took = t.elapsed();
    Ok(m)
}
