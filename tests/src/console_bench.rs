//! Throughput of one virtio-console port in a real guest, both directions, for
//! serial-backend (vhost-user, QEMU 11's `vhost-user-test-device-pci`) and for QEMU's
//! built-in virtio-serial with a socket chardev: the same guest script, QEMU and port
//! name, so the device implementation is the only difference.
//!
//! Shared by the ignored `guest_console_bench` test and `bench compare serial`.
//!
//! One boot measures both directions through one open port (`console-bench.sh`):
//! 1. guest → host: the guest writes N MiB of zeros; the host times its reads from the
//!    first byte to the N-th (the guest's start-up is not counted);
//! 2. host → guest: the host writes N MiB, the guest reads all of it and answers with a
//!    line on the same port; the host times from its first write to that line (one
//!    round trip of a few bytes on top of N MiB).
//!
//! Both are timed on the host clock: under TCG the guest's clock is as good, but the
//! host's needs no trust in the guest.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::guest::{GuestBoot, GuestStartError, GuestTest};
use crate::guest_console::{connect_retry, qemu_for_console, use_qemu, vhost_user_console_args};

/// Name of the benchmark port in the guest (`/sys/class/virtio-ports/*/name`).
pub const PORT_NAME: &str = "org.bench";

/// serial-backend processes started so far, numbering their log files.
static BACKEND_RUNS: AtomicU32 = AtomicU32::new(0);

/// The line the guest sends back once it has read everything the host sent.
const DONE: &[u8] = b"@@BENCH-DONE\n";

/// Which device implementation carries the port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleImpl {
    /// serial-backend over vhost-user (`vhost-user-test-device-pci,virtio-id=3`).
    SerialBackend,
    /// QEMU's own `virtio-serial-pci` + `virtserialport` on a socket chardev.
    QemuVirtioSerial,
}

impl ConsoleImpl {
    /// Every implementation, ours first.
    pub const ALL: [ConsoleImpl; 2] = [ConsoleImpl::SerialBackend, ConsoleImpl::QemuVirtioSerial];

    /// Short name for logs and tables.
    pub fn name(self) -> &'static str {
        match self {
            ConsoleImpl::SerialBackend => "serial-backend",
            ConsoleImpl::QemuVirtioSerial => "QEMU virtio-serial",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            ConsoleImpl::SerialBackend => "vhost",
            ConsoleImpl::QemuVirtioSerial => "qemu",
        }
    }
}

/// One boot's measurement.
#[derive(Clone, Copy, Debug)]
pub struct ConsoleThroughput {
    /// Bytes moved in each direction.
    pub bytes: u64,
    /// Guest → host, MB/s (10^6 bytes).
    pub guest_to_host_mbs: f64,
    /// Host → guest, MB/s (10^6 bytes).
    pub host_to_guest_mbs: f64,
}

/// Why a console measurement failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleBenchError {
    /// Guests cannot run here or the session could not be opened.
    #[error("{0}")]
    Start(#[from] GuestStartError),
    /// No QEMU >= 10.2 (needed for `vhost-user-test-device-pci`).
    #[error("{0}")]
    NoQemu(String),
    /// serial-backend could not be started or never listened.
    #[error("serial-backend: {0}")]
    Backend(String),
    /// Host-side I/O: files, sockets, starting QEMU.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The guest script failed, or QEMU did (the text has the logs' tails).
    #[error("guest failed: {0}")]
    Guest(String),
    /// The host side of the port saw fewer bytes or no answer.
    #[error("{impl_name}: {what}")]
    Transfer {
        /// Which implementation.
        impl_name: &'static str,
        /// What went wrong.
        what: String,
    },
}

/// Opens a guest session `name` that boots with QEMU >= 10.2 (see [`qemu_for_console`]).
pub fn console_guest(name: &str) -> Result<GuestTest, ConsoleBenchError> {
    let mut t = GuestTest::try_start(name)?;
    let q = qemu_for_console().map_err(ConsoleBenchError::NoQemu)?;
    use_qemu(&mut t, q);
    Ok(t)
}

/// [`console_guest`], or `None` after a loud skip when the machine cannot run it (not
/// root, no QEMU >= 10.2); any other failure fails the test.
pub fn console_guest_or_skip(name: &str) -> Option<GuestTest> {
    match console_guest(name) {
        Ok(t) => Some(t),
        Err(
            e @ (ConsoleBenchError::NoQemu(_)
            | ConsoleBenchError::Start(crate::guest::GuestStartError::Unavailable(_))),
        ) => {
            crate::guest::report_skip(name, &e.to_string());
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// What the host side of the port measured.
struct HostSide {
    received: u64,
    rx_secs: f64,
    tx_secs: f64,
}

/// Host side of one boot: read `bytes` (timed from the first byte), then write `bytes`
/// and wait for the guest's [`DONE`] line (timed from the first write).
fn host_side(path: &Path, bytes: u64) -> std::io::Result<HostSide> {
    let mut s = connect_retry(path, Duration::from_secs(60))?;
    // A guest that dies leaves the socket open (serial-backend keeps its side): the
    // caller stops the backend, and these bound the wait in any case.
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    s.set_write_timeout(Some(Duration::from_secs(300)))?;
    let mut buf = vec![0u8; 1 << 16];
    let mut received = 0u64;
    let mut first = None;
    while received < bytes {
        let want = usize::try_from(bytes - received).map_or(buf.len(), |r| r.min(buf.len()));
        let k = s.read(&mut buf[..want])?;
        if k == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        received += k as u64;
    }
    let rx_secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    if received < bytes {
        return Ok(HostSide {
            received,
            rx_secs,
            tx_secs: 0.0,
        });
    }
    let zeros = vec![0u8; 1 << 16];
    let t0 = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(zeros.len(), |l| l.min(zeros.len()));
        s.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    let mut got = Vec::new();
    while !got.ends_with(DONE) {
        let k = s.read(&mut buf)?;
        if k == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "port closed before the guest's done line",
            ));
        }
        got.extend_from_slice(&buf[..k]);
    }
    Ok(HostSide {
        received,
        rx_secs,
        tx_secs: t0.elapsed().as_secs_f64(),
    })
}

/// One boot of `t`'s guest (set up by [`console_guest`]) with one `which` port moving `mib`
/// MiB each way. `serial_backend` is the binary (used for [`ConsoleImpl::SerialBackend`]).
pub fn console_throughput(
    t: &mut GuestTest,
    which: ConsoleImpl,
    serial_backend: &Path,
    mib: u64,
) -> Result<ConsoleThroughput, ConsoleBenchError> {
    let bytes = mib << 20;
    let port_sock: PathBuf = t.path(&format!("bench-{}.sock", which.tag()));
    let _ = std::fs::remove_file(&port_sock);
    let mut backend = None;
    let qemu_args = match which {
        ConsoleImpl::SerialBackend => {
            let sock = t.path("bench-vhost-user.sock");
            let _ = std::fs::remove_file(&sock);
            let mut cmd = Command::new(serial_backend);
            cmd.arg("--socket-path")
                .arg(&sock)
                // The named port gets id 1 (0 is kept for a console): 2 ports, 6 queues.
                .arg("--max-ports")
                .arg("2")
                .arg("--port")
                .arg(format!("name={PORT_NAME},socket={}", port_sock.display()));
            // One log per boot (`serial-backend-bench-N.log`), not one overwritten.
            let n = BACKEND_RUNS.fetch_add(1, Ordering::Relaxed) + 1;
            let mut b = t.spawn_backend(&format!("serial-backend-bench-{n}"), cmd)?;
            b.wait_for_socket(&sock, Duration::from_secs(15))
                .map_err(ConsoleBenchError::Backend)?;
            backend = Some(b);
            vhost_user_console_args(&sock, 2)
        }
        ConsoleImpl::QemuVirtioSerial => vec![
            "-device".into(),
            "virtio-serial-pci".into(),
            "-chardev".into(),
            format!(
                "socket,id=s0,path={},server=on,wait=off",
                port_sock.display()
            ),
            "-device".into(),
            format!("virtserialport,chardev=s0,name={PORT_NAME}"),
        ],
    };
    let p = port_sock.clone();
    let host = std::thread::spawn(move || host_side(&p, bytes));
    let out = t.try_boot(
        &GuestBoot::new("console-bench.sh")
            .env("PORT_NAME", PORT_NAME)
            .env("BENCH_MIB", mib)
            .qemu_args(qemu_args)
            .timeout(Duration::from_secs(400)),
    );
    // Closes the port's host side, so a host thread still waiting (guest failed) ends.
    let stopped = backend.as_mut().map(|b| b.stop());
    let host = host.join();
    let out = out?;
    out.check().map_err(ConsoleBenchError::Guest)?;
    match stopped {
        Some(Ok(st)) if !st.success() => {
            return Err(ConsoleBenchError::Backend(format!(
                "exited with {st} after SIGTERM"
            )))
        }
        Some(Err(e)) => return Err(ConsoleBenchError::Backend(e)),
        _ => {}
    }
    let transfer = |what: String| ConsoleBenchError::Transfer {
        impl_name: which.name(),
        what,
    };
    let h = host
        .map_err(|_| transfer("host thread panicked".into()))?
        .map_err(|e| transfer(format!("host side of the port: {e}")))?;
    if h.received != bytes {
        return Err(transfer(format!(
            "guest → host: {} of {bytes} bytes",
            h.received
        )));
    }
    let mbs = |secs: f64| {
        if secs > 0.0 {
            bytes as f64 / secs / 1e6
        } else {
            0.0
        }
    };
    let r = ConsoleThroughput {
        bytes,
        guest_to_host_mbs: mbs(h.rx_secs),
        host_to_guest_mbs: mbs(h.tx_secs),
    };
    eprintln!(
        "console bench {}: {mib} MiB guest → host {:.1} MB/s ({:.2} s), host → guest {:.1} MB/s ({:.2} s); guest dd {} s / {} s",
        which.name(),
        r.guest_to_host_mbs,
        h.rx_secs,
        r.host_to_guest_mbs,
        h.tx_secs,
        out.results.get("tx_secs").map_or("?", String::as_str),
        out.results.get("rx_secs").map_or("?", String::as_str),
    );
    Ok(r)
}
