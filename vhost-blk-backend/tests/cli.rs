//! The vhost-blk-backend program: QEMU's backend program conventions, errors a user can
//! act on, a clean exit on SIGTERM with I/O completed.

mod common;

use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vhost::VhostBackend;
use vhost_blk_backend::spec::{req_type, status};
use vhost_tests::control::{queue_cell, stats_command, table_line};
use vhost_tests::frontend::{wait_eventfd, FrontendOptions, TestFrontend};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-blk-backend");

fn image(dir: &std::path::Path, size: usize) -> std::path::PathBuf {
    let p = dir.join("disk.img");
    std::fs::write(&p, pattern_range(0, size)).unwrap();
    p
}

fn wait_for_socket(p: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.exists() {
        assert!(
            Instant::now() < deadline,
            "backend never created {}",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn print_capabilities_is_json_for_libvirt() {
    let out = Command::new(BIN)
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        s.trim(),
        r#"{"type": "block", "features": ["read-only", "blk-file"]}"#
    );
}

#[test]
fn help_explains_every_flag() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let s = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--socket-path",
        "--fd",
        "--print-capabilities",
        "--blk-file",
        "--read-only",
        "--num-queues",
        "--queue-size",
        "--serial",
        "--cache",
        "--block-size",
        "--poll-us",
        "--io-engine",
        "--dirty-granularity",
        "--dirty-bitmap",
        "--control-socket",
        "--sandbox",
        "--iops-limit",
        "--iops-read-limit",
        "--iops-write-limit",
        "--bandwidth-limit",
        "--bandwidth-read-limit",
        "--bandwidth-write-limit",
        "--iops-burst",
        "--iops-read-burst",
        "--iops-write-burst",
        "--bandwidth-burst",
        "--bandwidth-read-burst",
        "--bandwidth-write-burst",
    ] {
        assert!(s.contains(flag), "--help lacks {flag}");
    }
    assert!(
        s.contains("VHOST_USER_CONNECTED"),
        "--help must name the events"
    );
    let out = Command::new(BIN)
        .args(["stats", "--help"])
        .output()
        .unwrap();
    let sub = String::from_utf8(out.stdout).unwrap();
    assert!(
        sub.contains("--control-socket") && sub.contains("--json"),
        "{sub}"
    );
    assert!(
        s.contains("32 MiB per TiB"),
        "--help must say what the bitmap costs"
    );
}

#[test]
fn bad_command_lines_fail_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--blk-file", "/nonexistent/disk.img", "--socket-path"],
            "cannot open /nonexistent/disk.img",
        ),
        (
            &[
                "--dirty-granularity",
                "3000",
                "--blk-file",
                "/dev/null",
                "--socket-path",
            ],
            "must be a power of two between 512 and 67108864 bytes",
        ),
        (
            &[
                "--dirty-granularity",
                "4q",
                "--blk-file",
                "/dev/null",
                "--socket-path",
            ],
            "unknown unit",
        ),
        (
            &["--blk-file", "/dev/null", "--socket-path"],
            "neither a regular file nor a block device",
        ),
        (
            &["--blk-file", "x", "--queue-size", "100", "--socket-path"],
            "not a power of two",
        ),
        (
            &["--blk-file", "x", "--block-size", "1000", "--socket-path"],
            "not one of",
        ),
        (
            &["--blk-file", "x", "--num-queues", "0", "--socket-path"],
            "0 is not in 1..=64",
        ),
        (
            &["--blk-file", "x", "--io-engine", "fast", "--socket-path"],
            "invalid value 'fast' for '--io-engine <ENGINE>'",
        ),
        (
            &[
                "--blk-file",
                "/dev/null",
                "--iops-limit",
                "100",
                "--iops-read-limit",
                "10",
                "--socket-path",
            ],
            "iops cannot be combined with iops_rd",
        ),
        (
            &[
                "--blk-file",
                "/dev/null",
                "--bandwidth-limit",
                "1M",
                "--bandwidth-burst",
                "1k",
                "--socket-path",
            ],
            "bps_max (1024) must not be smaller than bps (1048576)",
        ),
        (
            &[
                "--blk-file",
                "/dev/null",
                "--bandwidth-write-limit",
                "2Q",
                "--socket-path",
            ],
            "unknown unit",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(BIN)
            .args(*args)
            .arg(&sock)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(want),
            "{args:?}: stderr {err:?} lacks {want:?}"
        );
    }
}

/// The engine `auto` picks for a file in `dir`, with its reason as the backend logs it,
/// from what the kernel says `dir` is (asked here rather than of the backend's own check).
fn auto_engine(dir: &std::path::Path) -> &'static str {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: a zeroed statfs is a valid out buffer; `c` is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut st) }, 0);
    match st.f_type {
        libc::TMPFS_MAGIC => "I/O engine mapped (auto: the file is on tmpfs)",
        // 0x858458f6: RAMFS_MAGIC (not in the libc crate).
        libc::HUGETLBFS_MAGIC | 0x8584_58f6 => "I/O engine inline (auto: the file is in memory",
        _ => "I/O engine io_uring (auto: the file is not in memory)",
    }
}

/// The I/O engine is said at start, with why: `auto` on tmpfs (/dev/shm) and on /var/tmp
/// (a disk file system unless this machine mounts tmpfs there: the expectation follows
/// what the kernel says /var/tmp is; /tmp is tmpfs on many machines), and choices from the
/// command line. `mapped` for a file not on tmpfs is refused at start, saying why.
#[test]
fn the_io_engine_is_chosen_and_logged() {
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let var = tempfile::tempdir_in("/var/tmp").unwrap();
    let shm_want = auto_engine(shm.path());
    assert!(shm_want.contains("mapped"), "/dev/shm is tmpfs");
    for (dir, args, want) in [
        (shm.path(), &[][..], shm_want),
        (var.path(), &[][..], auto_engine(var.path())),
        (
            var.path(),
            &["--io-engine", "inline"][..],
            "I/O engine inline (--io-engine)",
        ),
        (
            shm.path(),
            &["--io-engine", "inline"][..],
            "I/O engine inline (--io-engine)",
        ),
    ] {
        let img = image(dir, 1 << 20);
        let sock = dir.join("engine.sock");
        let mut child = Command::new(BIN)
            .args(["--blk-file"])
            .arg(&img)
            .args(args)
            .arg("--socket-path")
            .arg(&sock)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_socket(&sock);
        child.kill().unwrap();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(want),
            "{args:?}: stderr {err:?} lacks {want:?}"
        );
        let _ = std::fs::remove_file(&sock);
    }
    if auto_engine(var.path()).contains("mapped") {
        return;
    }
    let img = image(var.path(), 1 << 20);
    let out = Command::new(BIN)
        .args(["--blk-file"])
        .arg(&img)
        .args(["--io-engine", "mapped", "--socket-path"])
        .arg(var.path().join("refused.sock"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mapped on a disk file started");
    assert!(
        err.contains("--io-engine mapped needs a file on tmpfs"),
        "stderr {err:?}"
    );
}

/// Serves a write and a read, then SIGTERM while connected: the backend finishes and exits
/// 0 with the write on disk. With `control`, a control socket too, with a client connected.
fn sigterm_exits_cleanly(control: bool) {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 1 << 20);
    let sock = dir.path().join("blk.sock");
    let ctl = dir.path().join("ctl.sock");
    let mut cmd = Command::new(BIN);
    cmd.args(["--blk-file"])
        .arg(&img)
        .arg("--socket-path")
        .arg(&sock)
        .stderr(Stdio::piped());
    if control {
        cmd.arg("--control-socket").arg(&ctl);
    }
    let mut child = cmd.spawn().unwrap();
    wait_for_socket(&sock);
    let mut fe = TestFrontend::connect(&sock, FrontendOptions::default()).unwrap();
    assert_eq!(write(&mut fe, 2, &[0x42; 4096]), status::OK);
    let (data, st) = read(&mut fe, 2, 4096);
    assert_eq!((st, data), (status::OK, vec![0x42; 4096]));
    let _client = control.then(|| {
        wait_for_socket(&ctl);
        let mut c = vhost_user_device::control::QmpClient::connect(&ctl).unwrap();
        let st = c.execute("query-status", serde_json::json!({})).unwrap();
        assert_eq!(st.unwrap()["status"], "running");
        c
    });
    vhost_tests::control::sigterm_expect_clean_exit(&mut child);
    let on_disk = std::fs::read(&img).unwrap();
    assert_eq!(&on_disk[1024..1024 + 4096], &[0x42; 4096][..]);
    if control {
        assert!(!ctl.exists(), "the control socket was left behind");
    }
}

#[test]
fn sigterm_exits_cleanly_after_serving() {
    sigterm_exits_cleanly(false);
}

/// The control socket's thread is stopped without a system call the sandboxed main thread
/// may not make (it used to connect to its own socket: SIGSYS, exit 159).
#[test]
fn sigterm_exits_cleanly_with_a_control_socket() {
    sigterm_exits_cleanly(true);
}

#[test]
fn listens_on_an_inherited_fd() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 1 << 20);
    let sock = dir.path().join("inherited.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fd = listener.as_raw_fd();
    // Clear CLOEXEC so the child inherits it.
    // SAFETY: fcntl on our own fd.
    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    let mut child = Command::new(BIN)
        .arg("--blk-file")
        .arg(&img)
        .args(["--fd", &fd.to_string(), "--read-only"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(listener);
    let mut fe = TestFrontend::connect(&sock, FrontendOptions::default()).unwrap();
    let (data, st) = read(&mut fe, 0, 512);
    assert_eq!((st, data), (status::OK, pattern_range(0, 512)));
    let r = blk_req(&mut fe, req_type::OUT, 0, 512);
    assert_eq!(run(&mut fe, 0, &r, false).1, status::IOERR);
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

/// CPU seconds (user + system, all threads) of process `pid`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no memory effects.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[test]
fn adaptive_polling_serves_and_then_sleeps() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 1 << 20);
    let sock = dir.path().join("blk.sock");
    let mut child = Command::new(BIN)
        .args(["--poll-us", "20000", "--blk-file"])
        .arg(&img)
        .arg("--socket-path")
        .arg(&sock)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&sock);
    let mut fe = TestFrontend::connect(&sock, FrontendOptions::default()).unwrap();
    for i in 0..50u64 {
        assert_eq!(write(&mut fe, i * 8, &[i as u8; 4096]), status::OK);
        let (data, st) = read(&mut fe, i * 8, 4096);
        assert_eq!((st, data), (status::OK, vec![i as u8; 4096]));
    }
    // Idle (still connected, rings running): the 20 ms polling window ends and the
    // worker sleeps. A worker that kept polling would burn about a second here.
    std::thread::sleep(Duration::from_millis(200));
    let cpu0 = cpu_seconds(child.id());
    std::thread::sleep(Duration::from_secs(1));
    let idle_cpu = cpu_seconds(child.id()) - cpu0;
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        idle_cpu < 0.2,
        "backend used {idle_cpu} s of CPU in 1 s of idle"
    );
    drop(fe);
}

/// Kills the child when a test fails before it could stop it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The report's scenario against the real program: a frontend sets the avail index the
/// ring size + 5 ahead and leaves it there. The backend used to spin on the ring (a full
/// core), then ignore the next connection and SIGTERM.
#[test]
fn a_ring_far_ahead_is_parked_and_the_backend_stays_serviceable() {
    const PROMPT: Duration = Duration::from_secs(10);
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 1 << 20);
    let sock = dir.path().join("blk.sock");
    let log_path = dir.path().join("stderr.log");
    let mut child = KillOnDrop(
        Command::new(BIN)
            .args(["--blk-file"])
            .arg(&img)
            .arg("--socket-path")
            .arg(&sock)
            .env("RUST_LOG", "warn")
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    wait_for_socket(&sock);
    let mut fe = TestFrontend::connect(&sock, FrontendOptions::default()).unwrap();
    let err = fe.set_vring_err(0).unwrap();
    assert_eq!(write(&mut fe, 2, &[0x42; 4096]), status::OK);
    let dq = &mut fe.queues[0];
    let bad = dq.avail_idx().wrapping_add(dq.size + 5);
    dq.force_avail_idx(&fe.mem, bad);
    dq.notify();

    // (a) No spinning: the backend sleeps like an idle one (it used to burn 1 s per s).
    std::thread::sleep(Duration::from_millis(200));
    let cpu0 = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(1));
    let cpu = cpu_seconds(pid) - cpu0;
    assert!(
        cpu < 0.2,
        "backend used {cpu:.2} s of CPU in 1 s with a broken ring"
    );
    // (b) Reported to the frontend.
    assert!(wait_eventfd(&err, PROMPT), "VRING_ERR was not signalled");
    // (c) Stopping the ring is answered, with the index the device stopped at.
    let base = fe.within(PROMPT, |fe| fe.fe.get_vring_base(0));
    assert_eq!(base.expect("GET_VRING_BASE"), 1);
    drop(fe);
    // ... and the next frontend is served.
    let mut fe = TestFrontend::connect_within(&sock, FrontendOptions::default(), PROMPT)
        .expect("second connection");
    let (data, st) = read(&mut fe, 2, 4096);
    assert_eq!((st, data), (status::OK, vec![0x42; 4096]));
    assert_eq!(write(&mut fe, 16, &[0x43; 512]), status::OK);

    // (d) SIGTERM still ends it cleanly.
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + PROMPT;
    let code = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "backend did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(code.success(), "exit status {code:?}");
    drop(fe);
    // Logged once, not once per kick or per pass over the ring.
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(
        log.matches("ring is broken").count(),
        1,
        "backend log:\n{log}"
    );
}

/// The real program under its default sandbox with a control socket: a known workload
/// (10 writes and 5 reads of 4 KiB on queue 0) shows exactly in query-stats and in the
/// `stats` subcommand (table and JSON), the VMM's connect and disconnect arrive as events
/// in order, query-status follows the connection, and SIGTERM with the client still
/// connected exits 0.
#[test]
fn control_socket_counts_a_known_workload_and_reports_the_vmm() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 1 << 20);
    let sock = dir.path().join("blk.sock");
    let ctl = dir.path().join("ctl.sock");
    // A free port for --metrics-addr (released just before the backend binds it).
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut child = Command::new(BIN)
        .arg("--blk-file")
        .arg(&img)
        .arg("--socket-path")
        .arg(&sock)
        .arg("--control-socket")
        .arg(&ctl)
        .arg("--metrics-addr")
        .arg(metrics.to_string())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(&ctl);
    wait_for_socket(&sock);
    let mut c = vhost_user_device::control::QmpClient::connect(&ctl).unwrap();
    let st = c
        .execute("query-status", serde_json::json!({}))
        .unwrap()
        .unwrap();
    assert_eq!(st["status"], "running");
    assert_eq!(st["program"], "vhost-blk-backend");
    assert_eq!(st["vmm-connected"], false);
    assert_eq!(st["connections"], 0);
    assert_eq!(st["size"], 1 << 20);

    let mut fe = TestFrontend::connect(&sock, FrontendOptions::default()).unwrap();
    for i in 0..10u64 {
        assert_eq!(write(&mut fe, i * 8, &[i as u8; 4096]), status::OK);
    }
    for i in 0..5u64 {
        let (data, st) = read(&mut fe, i * 8, 4096);
        assert_eq!((st, data), (status::OK, vec![i as u8; 4096]));
    }
    let st = c
        .execute("query-status", serde_json::json!({}))
        .unwrap()
        .unwrap();
    assert_eq!(
        (&st["vmm-connected"], &st["connections"]),
        (&serde_json::json!(true), &serde_json::json!(1))
    );
    let s = c
        .execute("query-stats", serde_json::json!({}))
        .unwrap()
        .unwrap();
    assert_eq!(s["writes"], 10, "{s}");
    assert_eq!(s["write-bytes"], 40960, "{s}");
    assert_eq!(s["reads"], 5, "{s}");
    assert_eq!(s["read-bytes"], 20480, "{s}");
    assert_eq!(s["in-flight"], 0, "{s}");
    assert_eq!(s["bad-requests"], 0, "{s}");
    let q = s["queues"].as_array().unwrap();
    assert_eq!(q.len(), 1, "{s}");
    assert_eq!(q[0]["queue"], 0);
    assert_eq!(q[0]["chains"], 15, "{s}");
    assert_eq!(q[0]["completed"], 15, "{s}");
    assert_eq!(q[0]["in-flight"], 0, "{s}");
    assert_eq!(q[0]["bad-chains"], 0, "{s}");
    assert_eq!(q[0]["writes"], 10, "{s}");
    assert_eq!(q[0]["write-bytes"], 40960, "{s}");
    assert_eq!(q[0]["reads"], 5, "{s}");
    assert_eq!(q[0]["read-bytes"], 20480, "{s}");
    assert_eq!(q[0]["io-errors"], 0, "{s}");
    // Every one of the 15 requests has its latency in the histogram (µs bins).
    let h = &q[0]["latency-histogram"];
    let bins: Vec<u64> = serde_json::from_value(h["bins"].clone()).unwrap();
    assert_eq!(bins.iter().sum::<u64>(), 15, "{h}");
    assert_eq!(
        bins.len(),
        h["boundaries-us"].as_array().unwrap().len() + 1,
        "{h}"
    );
    assert!(h["sum-us"].as_u64().unwrap() > 0, "{h}");

    // The same counters for Prometheus.
    let scrape = {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(metrics).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    };
    for line in [
        "vhost_blk_backend_writes_total 10",
        "vhost_blk_backend_write_bytes_total 40960",
        "vhost_blk_backend_reads_total 5",
        "vhost_blk_backend_in_flight 0",
        "vhost_blk_backend_queue_chains_total{queue=\"0\"} 15",
        "vhost_blk_backend_queue_write_bytes_total{queue=\"0\"} 40960",
        "# TYPE vhost_blk_backend_queue_latency_seconds histogram",
        "vhost_blk_backend_queue_latency_seconds_count{queue=\"0\"} 15",
        "vhost_blk_backend_queue_latency_seconds_bucket{le=\"+Inf\",queue=\"0\"} 15",
    ] {
        assert!(
            scrape.lines().any(|l| l == line),
            "no {line:?} in\n{scrape}"
        );
    }

    let json: serde_json::Value =
        serde_json::from_str(stats_command(BIN, &ctl, true).trim()).unwrap();
    assert_eq!(json["writes"], 10);
    assert_eq!(json["queues"][0]["chains"], 15);
    let table = stats_command(BIN, &ctl, false);
    assert_eq!(table_line(&table, "writes"), ["writes", "10"]);
    assert_eq!(table_line(&table, "write-bytes"), ["write-bytes", "40960"]);
    assert_eq!(queue_cell(&table, 0, "chains"), "15", "{table}");
    assert_eq!(queue_cell(&table, 0, "completed"), "15", "{table}");
    assert_eq!(queue_cell(&table, 0, "write-bytes"), "40960", "{table}");
    assert_eq!(
        queue_cell(&table, 0, "latency-histogram.count"),
        "15",
        "{table}"
    );
    assert_ne!(
        queue_cell(&table, 0, "latency-histogram.p99-us"),
        "-",
        "{table}"
    );

    drop(fe);
    vhost_tests::control::expect_connect_and_close_events(&mut c, 1);
    let st = c
        .execute("query-status", serde_json::json!({}))
        .unwrap()
        .unwrap();
    assert_eq!(st["vmm-connected"], false);

    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let code = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(code.success(), "exit status {code:?}; stderr:\n{err}");
    assert!(!ctl.exists());
}

/// The capability file QEMU and libvirt read (vhost-user/50-vhost-blk-backendRAM.json) follows QEMU's
/// schema and agrees with --print-capabilities.
#[test]
fn the_capability_file_matches_the_schema_and_print_capabilities() {
    vhost_tests::capabilities::check(
        BIN,
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("vhost-user/50-vhost-blk-backend.json"),
        "vhost-blk-backend",
    );
}

/// The mapped engine in the real program, under its seccomp filter: on a sparse tmpfs
/// image (data in its first 2 MiB only) reads of data (copies through the mapping),
/// reads of the hole (system calls, after a mincore probe), writes into both, all
/// checked against the image; the hole stays unallocated where nothing was written.
#[test]
fn a_sparse_tmpfs_image_is_served_through_the_mapping_under_the_sandbox() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let img = dir.path().join("sparse.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(8 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &pattern_range(0, 2 << 20), 0).unwrap();
    let sock = dir.path().join("mapped.sock");
    // Killed if the test fails before it asks the backend to exit.
    let mut child = vhost_tests::guest::ChildGuard(Some(
        Command::new(BIN)
            .args(["--blk-file"])
            .arg(&img)
            .arg("--socket-path")
            .arg(&sock)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    wait_for_socket(&sock);
    let mut fe = TestFrontend::connect(&sock, FrontendOptions::default()).unwrap();
    let blocks = f.metadata().unwrap().blocks();
    // Data, across pages and twice (the second time the chunk is known).
    for _ in 0..2 {
        let (data, st) = read(&mut fe, 1000, 64 << 10);
        assert_eq!(st, status::OK);
        assert!(data == pattern_range(1000 * 512, 64 << 10));
    }
    // The hole, in two chunks (4 and 5.5 MiB in one, 7 MiB in the next), more times
    // than the re-probe count.
    for i in 0..300u64 {
        let sector = (4 << 20) / 512 + (i % 3) * 3072;
        let (data, st) = read(&mut fe, sector, 4096);
        assert_eq!(st, status::OK);
        assert!(data.iter().all(|&b| b == 0), "zeros at sector {sector}");
    }
    assert_eq!(
        f.metadata().unwrap().blocks(),
        blocks,
        "reading the hole allocated it"
    );
    // Writes into the data and into the hole, read back through the program and on disk.
    assert_eq!(write(&mut fe, 8, &[0x5a; 4096]), status::OK);
    assert_eq!(write(&mut fe, (6 << 20) / 512, &[0xa5; 8192]), status::OK);
    assert_eq!(read(&mut fe, 8, 4096), (vec![0x5a; 4096], status::OK));
    assert_eq!(
        read(&mut fe, (6 << 20) / 512, 8192),
        (vec![0xa5; 8192], status::OK)
    );
    let on_disk = std::fs::read(&img).unwrap();
    assert_eq!(&on_disk[4096..8192], &[0x5a; 4096][..]);
    assert_eq!(&on_disk[6 << 20..(6 << 20) + 8192], &[0xa5; 8192][..]);
    let err = vhost_tests::control::sigterm_expect_clean_exit(child.0.as_mut().unwrap());
    assert!(err.contains("I/O engine mapped"), "stderr {err:?}");
    assert!(!err.contains("cannot map"), "stderr {err:?}");
}
