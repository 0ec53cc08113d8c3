//! qemu-storage-daemon, the peer of `bench compare migrate`: started with a QMP socket
//! and a log, its block nodes added over QMP, stopped when dropped.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use super::log_tail;
use super::qmp::Qmp;
use crate::compare::CompareError;

pub(super) fn qsd_version() -> Result<String, CompareError> {
    let out = Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .map_err(|e| {
            CompareError::Run(format!(
                "cannot run qemu-storage-daemon (Debian package qemu-utils): {e}"
            ))
        })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("qemu-storage-daemon (version unknown)")
        .to_string())
}

/// Escapes a value for a QEMU command-line option (a comma is written twice).
fn qemu_opt(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// A qemu-storage-daemon process with its QMP connection; stopped when dropped.
pub(super) struct Qsd {
    child: Child,
    pub(super) qmp: Qmp,
    log: PathBuf,
}

impl Qsd {
    /// Starts a daemon with only a QMP monitor; everything else is added over QMP, whose
    /// JSON needs no escaping of file names. Its stderr (warnings such as backup's note on
    /// the target's cluster size) goes to `<name>.log`, shown when it fails.
    pub(super) fn start(work: &Path, name: &str) -> Result<Self, CompareError> {
        let sock = work.join(format!("{name}-qmp.sock"));
        let log = work.join(format!("{name}.log"));
        let _ = std::fs::remove_file(&sock);
        let mut child = Command::new("qemu-storage-daemon")
            .arg("--chardev")
            .arg(format!(
                "socket,id=qmp,path={},server=on,wait=off",
                qemu_opt(&sock)
            ))
            .args(["--monitor", "chardev=qmp"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .map_err(|e| CompareError::Run(format!("cannot start qemu-storage-daemon: {e}")))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            if let Ok(s) = UnixStream::connect(&sock) {
                break s;
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(CompareError::Run(format!(
                    "qemu-storage-daemon ({name}) exited with {st}: {}",
                    log_tail(&log)
                )));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CompareError::Run(format!(
                    "qemu-storage-daemon ({name}) never opened {}",
                    sock.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut qsd = Qsd {
            child,
            qmp: Qmp::new(stream, name)?,
            log,
        };
        qsd.qmp.handshake().map_err(|e| qsd.with_log(e))?;
        Ok(qsd)
    }

    /// Adds the error's daemon log, for errors QMP alone does not explain.
    pub(super) fn with_log(&self, e: CompareError) -> CompareError {
        CompareError::Run(format!("{e} (daemon log: {})", log_tail(&self.log)))
    }

    /// A `file` node on `path` with the options `bench compare blk` gives the daemon.
    pub(super) fn add_file_node(&mut self, node: &str, path: &Path) -> Result<(), CompareError> {
        self.qmp
            .execute(
                "blockdev-add",
                json!({"driver": "file", "node-name": node, "filename": path, "aio": "io_uring", "cache": {"direct": true}}),
            )
            .map(drop)
    }

    /// An `nbd` client node on the destination's export `dst` at 127.0.0.1:`port`.
    pub(super) fn add_nbd_node(&mut self, node: &str, port: u16) -> Result<(), CompareError> {
        self.qmp
            .execute(
                "blockdev-add",
                json!({"driver": "nbd", "node-name": node, "export": "dst",
                       "server": {"type": "inet", "host": "127.0.0.1", "port": port.to_string()}}),
            )
            .map(drop)
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        // SIGTERM lets the daemon close its exports and images; SIGKILL if it hangs.
        crate::compare::terminate(&mut self.child, Duration::from_secs(5));
    }
}
