//! `bench load blk` against our vhost-blk-backend: the load generator moves real data and
//! its --verify mode checks every block it wrote, on a disk file system (io_uring) and on
//! tmpfs (inline I/O). Counts, not timings, are asserted.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhost_tests::guest::locate_binary;

struct Backend(Child);

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_backend(dir: &Path) -> (Backend, std::path::PathBuf) {
    let bin = locate_binary("vhost-blk-backend", "VHOST_BLK_BACKEND").expect("backend binary");
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(64 << 20))
        .expect("image");
    let sock = dir.join("blk.sock");
    let child = Command::new(bin)
        .arg("--blk-file")
        .arg(&image)
        .arg("--socket-path")
        .arg(&sock)
        .stderr(Stdio::null())
        .spawn()
        .expect("start backend");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "backend socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Backend(child), sock)
}

/// Runs the load generator and returns the number of blocks it verified.
fn load(sock: &Path, pid: u32, rw: &str) -> u64 {
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "load",
            "blk",
            "--rw",
            rw,
            "--iodepth",
            "8",
            "--runtime",
            "500ms",
        ])
        .args(["--queue-size", "64", "--verify", "--bs", "8k"])
        .arg("--socket")
        .arg(sock)
        .arg("--pid")
        .arg(pid.to_string())
        .output()
        .expect("run bench");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "bench failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("IOPS") && text.contains("backend CPU"),
        "{text}"
    );
    text.trim_end()
        .split(", ")
        .find_map(|p| p.strip_suffix(" blocks verified"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

fn check_in(dir: &Path) {
    let (be, sock) = start_backend(dir);
    let pid = be.0.id();
    // Writes, then every written block read back and checked.
    assert!(load(&sock, pid, "randwrite") > 0);
    // Mixed: reads of blocks written earlier in the run are checked as they complete.
    assert!(load(&sock, pid, "randrw") > 0);
    assert!(load(&sock, pid, "write") > 0);
}

#[test]
fn verify_passes_on_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    check_in(dir.path());
}

#[test]
fn verify_passes_in_memory() {
    let dir = tempfile::tempdir_in("/dev/shm").expect("tempdir in /dev/shm");
    check_in(dir.path());
}
