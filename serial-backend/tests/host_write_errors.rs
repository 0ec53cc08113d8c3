//! A host side that fails every write (not "would block": an error) must not hold the
//! guest's buffer forever, nor spin: the bytes are dropped, counted and logged, and the
//! buffer goes back to the guest. The real program, with its stdout a pipe nobody reads
//! any more (EPIPE on every write: Rust ignores SIGPIPE); its control socket counts every
//! failed write and dropped byte, for the port and the device.

mod common;

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use serial_backend::spec::event;
use vhost_user_device::control::QmpClient;

const BIN: &str = env!("CARGO_BIN_EXE_serial-backend");

/// CPU time (user + system, clock ticks) of process `pid`.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command's closing parenthesis; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

#[test]
fn a_console_whose_stdout_is_gone_returns_the_buffers_and_does_not_spin() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("serial.sock");
    let ctl = dir.path().join("ctl.sock");
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two fds, which are owned right below.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds are fresh from pipe2 and owned only here.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut child = Command::new(BIN)
        .args(["--console", "stdio", "--max-ports", "1", "--socket-path"])
        .arg(&sock)
        .arg("--control-socket")
        .arg(&ctl)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::from(wr))
        .stderr(Stdio::piped())
        .spawn()
        .expect("serial-backend");
    // Nobody will read what the backend writes to stdout.
    drop(rd);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() || !ctl.exists() {
        assert!(Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }

    let mut d = Driver::connect_socket(&sock, 1);
    d.handshake(1);
    d.send_ctrl(0, event::PORT_OPEN, 1);
    let n = d.write_port(0, b"into the void\n", 4);
    let returned = d.wait_tx(0, n, Duration::from_secs(5));
    let t0 = cpu_ticks(child.id());
    std::thread::sleep(Duration::from_millis(500));
    let busy = cpu_ticks(child.id()) - t0;
    // And the next writes too.
    let m = d.write_port(0, b"and again\n", 3);
    let returned_later = d.wait_tx(0, m, Duration::from_secs(5));
    // Each of the 8 chains (14 and 10 bytes in 4- and 3-byte pieces) failed once.
    let stats = QmpClient::connect(&ctl)
        .and_then(|mut c| c.execute("query-stats", json!({})))
        .map(|r| r.unwrap_or_default());

    child.kill().unwrap();
    let _ = child.wait();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(returned, n, "tx buffers not returned; backend log:\n{err}");
    assert_eq!(returned_later, m, "later tx buffers not returned:\n{err}");
    // Half a second is 50 ticks; a spinning worker burns them all.
    assert!(busy < 20, "backend used {busy} ticks in 0.5 s idle:\n{err}");
    assert!(
        err.contains("host write failed"),
        "no warning logged:\n{err}"
    );
    let s = stats.unwrap_or_else(|e| panic!("query-stats: {e}\n{err}"));
    for k in ["host-write-errors", "tx-dropped", "tx-bytes"] {
        assert_eq!(s[k], s["ports"][0][k], "{k}: {s}");
    }
    assert_eq!(s["host-write-errors"], 8, "{s}");
    assert_eq!(s["tx-dropped"], 24, "{s}");
    assert_eq!(s["tx-bytes"], 0, "{s}");
}
