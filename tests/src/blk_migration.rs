//! What tests of vhost-blk-backend's block migration share: TLS credentials in QEMU's
//! tls-creds-x509 layout made on the spot, a free loopback port, a TCP relay a test can
//! cut mid-stream, and the `migrate` / `migrate-status` subcommands.

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use serde_json::Value;

/// A CA and a server and a client certificate signed by it (for `localhost` and
/// `127.0.0.1`) in `dir`, with QEMU's file names: `ca-cert.pem`, `server-cert.pem`,
/// `server-key.pem`, `client-cert.pem`, `client-key.pem`.
pub fn make_tls_creds(dir: &Path, ca_name: &str) -> Result<(), String> {
    let e = |what: &str, err: &dyn std::fmt::Display| format!("{what}: {err}");
    std::fs::create_dir_all(dir).map_err(|err| e("creating the credentials directory", &err))?;
    let ca_key = KeyPair::generate().map_err(|err| e("CA key", &err))?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(|err| e("CA", &err))?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    let ca_cert = ca
        .self_signed(&ca_key)
        .map_err(|err| e("CA certificate", &err))?;
    let issuer = Issuer::new(ca, ca_key);
    let write = |name: &str, text: String| {
        std::fs::write(dir.join(name), text).map_err(|err| e(name, &err))
    };
    write("ca-cert.pem", ca_cert.pem())?;
    for side in ["server", "client"] {
        let key = KeyPair::generate().map_err(|err| e("key", &err))?;
        let mut p = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .map_err(|err| e(side, &err))?;
        p.distinguished_name.push(DnType::CommonName, side);
        let cert = p
            .signed_by(&key, &issuer)
            .map_err(|err| e("signing", &err))?;
        write(&format!("{side}-cert.pem"), cert.pem())?;
        write(&format!("{side}-key.pem"), key.serialize_pem())?;
    }
    Ok(())
}

/// A loopback TCP port nobody listened on a moment ago.
pub fn free_tcp_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A TCP relay on a loopback port to `target`: every connection it accepts is copied
/// both ways to a new connection to `target`, until [`Relay::cut`] breaks them all (new
/// connections are relayed again after that: a retry goes through).
pub struct Relay {
    /// Where it listens.
    pub port: u16,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    /// Starts relaying `127.0.0.1:<port>` to `target` (`host:port`).
    pub fn start(target: &str) -> io::Result<Relay> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c2, b2, s2, target) = (
            conns.clone(),
            bytes.clone(),
            stop.clone(),
            target.to_string(),
        );
        std::thread::spawn(move || {
            for a in l.incoming() {
                if s2.load(Ordering::Acquire) {
                    break;
                }
                let Ok(a) = a else { continue };
                let Ok(b) = TcpStream::connect(&target) else {
                    let _ = a.shutdown(Shutdown::Both);
                    continue;
                };
                let pipe = |from: &TcpStream, to: &TcpStream| -> io::Result<()> {
                    let (mut r, mut w) = (from.try_clone()?, to.try_clone()?);
                    let b = b2.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let n = match io::Read::read(&mut r, &mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if io::Write::write_all(&mut w, &buf[..n]).is_err() {
                                break;
                            }
                            b.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        let _ = w.shutdown(Shutdown::Write);
                    });
                    Ok(())
                };
                if pipe(&a, &b).and_then(|()| pipe(&b, &a)).is_err() {
                    continue;
                }
                let mut v = c2.lock().unwrap_or_else(|e| e.into_inner());
                v.push(a);
                v.push(b);
            }
        });
        Ok(Relay {
            port,
            conns,
            bytes,
            stop,
        })
    }

    /// `tcp:127.0.0.1:<port>`.
    pub fn uri(&self) -> String {
        format!("tcp:127.0.0.1:{}", self.port)
    }

    /// Bytes relayed so far (both ways).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Breaks every connection relayed so far (both ends see the stream end).
    pub fn cut(&self) {
        let mut v = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for c in v.drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.cut();
        // Wake the accept loop so it sees the stop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// `--copy-mode` of `migrate`: every guest migration test runs with each mode the
/// backend has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMode {
    /// Dirty passes in the background until the hand-over.
    Background,
    /// Guest writes mirrored as they complete, once the job is ready.
    WriteBlocking,
}

impl CopyMode {
    /// The argument's value.
    pub fn as_arg(self) -> &'static str {
        match self {
            CopyMode::Background => "background",
            CopyMode::WriteBlocking => "write-blocking",
        }
    }

    /// A short name, for test directories.
    pub fn short(self) -> &'static str {
        match self {
            CopyMode::Background => "bg",
            CopyMode::WriteBlocking => "wb",
        }
    }
}

/// Runs `bin migrate --control-socket ctl --to to --copy-mode M [extra...]` (JSON lines
/// on stdout, as it prints them when not on a terminal): Ok(stdout) when it exits 0.
pub fn migrate_cli(
    bin: &Path,
    ctl: &Path,
    to: &str,
    mode: CopyMode,
    extra: &[&str],
) -> Result<String, String> {
    let out = Command::new(bin)
        .arg("migrate")
        .arg("--control-socket")
        .arg(ctl)
        .args(["--to", to, "--copy-mode", mode.as_arg()])
        .args(extra)
        .output()
        .map_err(|e| format!("cannot run {} migrate: {e}", bin.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "migrate --to {to} {extra:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `bin migrate-status --control-socket ctl --json`: the job as `query-migrate` shows
/// it (whatever the exit status: a failed job exits 1 and still prints it).
pub fn migrate_status(bin: &Path, ctl: &Path) -> Result<Value, String> {
    let out = Command::new(bin)
        .arg("migrate-status")
        .arg("--control-socket")
        .arg(ctl)
        .arg("--json")
        .output()
        .map_err(|e| format!("cannot run {} migrate-status: {e}", bin.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).map_err(|e| {
        format!(
            "migrate-status printed no JSON ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}
