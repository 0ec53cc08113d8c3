//! DPDK's testpmd as a second frontend (virtio-user, `--vdev net_virtio_user0,path=SOCK`):
//! the real binary runs on a tap inside a network namespace the test creates; testpmd
//! forwards in `io` mode on its single port (what it receives it sends back), so frames
//! injected on the tap's host side come back out of it. Every frame must come back, and
//! testpmd's forward statistics and the backend's counters must agree.
//!
//! Needs root and `dpdk-testpmd` (`$DPDK_TESTPMD`, else PATH; Debian ships it in
//! `dpdk-dev`); otherwise a loud SKIPPED. Runs with `--no-huge`: DPDK then backs its
//! memory with a memfd the backend can map, so no hugepages are needed.

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vhost_tests::guest_net::{KillOnDrop, NetNs};

const TAP: &str = "dptap0";
const FRAMES: u32 = 500;
const TAG_BASE: u32 = 0xd0d0_0000;
const PAYLOAD: usize = 100;
const PROBE_BASE: u32 = 0xd0d1_0000;

fn testpmd() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DPDK_TESTPMD").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("dpdk-testpmd"))
            .find(|p| p.is_file())
    })
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// `RX-packets` and `TX-packets` of testpmd's accumulated forward statistics.
fn accumulated(out: &str) -> Option<(u64, u64)> {
    let sect = &out[out.find("Accumulated forward statistics")?..];
    let num = |key: &str| -> Option<u64> {
        let rest = &sect[sect.find(key)? + key.len()..];
        rest.split_whitespace().next()?.parse().ok()
    };
    Some((num("RX-packets:")?, num("TX-packets:")?))
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn testpmd_io_forwarding_through_the_backend() {
    let _ = env_logger::builder().is_test(true).try_init();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        vhost_tests::guest::report_skip("testpmd_io_forwarding", "needs root");
        return;
    }
    let Some(testpmd) = testpmd() else {
        vhost_tests::guest::report_skip(
            "testpmd_io_forwarding",
            "dpdk-testpmd not found (tests/guest/setup-dpdk.sh installs it; or set DPDK_TESTPMD)",
        );
        return;
    };
    let ns = NetNs::create("dpdk").expect("netns");
    // A quiet namespace: no IPv6 chatter on the tap, so every frame counted is ours.
    for k in ["all", "default"] {
        ns.run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{k}.disable_ipv6=1"),
        ])
        .expect("sysctl");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("net.sock");
    let be_log = dir.path().join("backend.log");
    let f = File::create(&be_log).expect("log");
    let mut be = KillOnDrop(
        ns.command(env!("CARGO_BIN_EXE_vhost-net-backend"))
            .arg("--socket-path")
            .arg(&sock)
            .args(["--tap", TAP])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("log"))
            .stderr(f)
            .spawn()
            .expect("start vhost-net-backend"),
    );
    wait_for("the backend's socket", Duration::from_secs(10), || {
        sock.exists() || be.0.try_wait().ok().flatten().is_some()
    });
    assert!(sock.exists(), "backend exited:\n{}", read(&be_log));
    ns.run(&["ip", "link", "set", TAP, "up"]).expect("tap up");

    // testpmd, non-interactive: forwards until a line arrives on stdin.
    let prefix = format!("vhn{}", std::process::id());
    // testpmd's runtime files (/var/run/dpdk/PREFIX), removed even if the test fails.
    struct RunDir(String);
    impl Drop for RunDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{}", self.0));
        }
    }
    let _run_dir = RunDir(prefix.clone());
    let pmd_log = dir.path().join("testpmd.log");
    let f = File::create(&pmd_log).expect("log");
    let mut pmd = KillOnDrop(
        Command::new(&testpmd)
            .args(["-l", "0-1", "--no-pci", "--no-huge", "-m", "256"])
            .args(["--file-prefix", &prefix, "--log-level", "lib.eal:warning"])
            .arg("--vdev")
            .arg(format!(
                "net_virtio_user0,path={},queues=1,queue_size=256",
                sock.display()
            ))
            .args([
                "--",
                "--forward-mode=io",
                "--nb-cores=1",
                "--rxq=1",
                "--txq=1",
            ])
            .args(["--total-num-mbufs=8192", "--no-lsc-interrupt"])
            .stdin(Stdio::piped())
            .stdout(f.try_clone().expect("log"))
            .stderr(f)
            .spawn()
            .expect("start testpmd"),
    );
    // testpmd's stdout is block-buffered in a file: probe frames tell when it forwards.
    let sock_tap = packet_socket_in_netns(&ns.name, TAP, false);
    sock_tap.set_rcvbuf(8 << 20);
    let src = [0x02, 0, 0, 0, 0, 0x01];
    let mut probes = 0u32;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(st)) = pmd.0.try_wait() {
            panic!("testpmd exited ({st}):\n{}", read(&pmd_log));
        }
        assert!(
            Instant::now() < deadline,
            "testpmd never forwarded a frame:\n{}\nbackend:\n{}",
            read(&pmd_log),
            read(&be_log)
        );
        let probe = test_frame([0xff; 6], src, PROBE_BASE + probes, PAYLOAD);
        sock_tap.send(None, &probe).expect("inject probe");
        probes += 1;
        let echo = sock_tap.recv_matching(Duration::from_millis(300), |f| {
            has_tag_in(f, PROBE_BASE, 1000)
        });
        if echo.is_some() {
            break;
        }
    }

    for i in 0..FRAMES {
        let frame = test_frame([0xff; 6], src, TAG_BASE + i, PAYLOAD);
        sock_tap.send(None, &frame).expect("inject");
        if i % 32 == 31 {
            // Stay below the tap's queue (txqueuelen) while the backend drains it.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let mut echoed = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while echoed.len() < FRAMES as usize && Instant::now() < deadline {
        let got = sock_tap.recv_matching(Duration::from_millis(500), |f| {
            has_tag_in(f, TAG_BASE, FRAMES)
        });
        if let Some((_, f)) = got {
            echoed.insert(u32::from_le_bytes([f[14], f[15], f[16], f[17]]));
        }
    }

    // Enter: testpmd stops forwarding, prints its statistics and exits.
    if let Some(stdin) = pmd.0.stdin.as_mut() {
        let _ = stdin.write_all(b"\n");
    }
    wait_for("testpmd to exit", Duration::from_secs(20), || {
        pmd.0.try_wait().ok().flatten().is_some()
    });
    let out = read(&pmd_log);
    // SAFETY: plain kill(2) of our own child (SIGTERM: clean exit, counters logged).
    unsafe { libc::kill(be.0.id() as i32, libc::SIGTERM) };
    wait_for("the backend to exit", Duration::from_secs(10), || {
        be.0.try_wait().ok().flatten().is_some()
    });
    let be_out = read(&be_log);

    assert_eq!(
        echoed.len(),
        FRAMES as usize,
        "frames echoed back through testpmd\ntestpmd:\n{out}\nbackend:\n{be_out}"
    );
    let (rx, tx) = accumulated(&out).unwrap_or_else(|| panic!("no statistics:\n{out}"));
    eprintln!(
        "testpmd forwarded RX {rx} / TX {tx}; echoed {}",
        echoed.len()
    );
    // Probes that arrived before testpmd started forwarding are flushed uncounted (or
    // lost before its rings were up); everything after was forwarded.
    assert_eq!(rx, tx, "{out}");
    assert!(
        (u64::from(FRAMES) + 1..=u64::from(FRAMES + probes)).contains(&rx),
        "{FRAMES} frames + {probes} probe(s) injected, testpmd received {rx}\n{out}"
    );
    // The backend's counters: TX is exactly what testpmd sent; RX is what testpmd
    // received plus probes it flushed from its rings before forwarding started.
    let (be_rx, be_rx_bytes) = backend_counter(&be_out, "rx0");
    let (be_tx, be_tx_bytes) = backend_counter(&be_out, "tx0");
    let frame_len = 14 + PAYLOAD as u64;
    assert_eq!(be_tx, tx, "backend TX vs testpmd TX:\n{be_out}");
    assert_eq!(be_tx_bytes, tx * frame_len);
    assert!(
        (rx..=rx + u64::from(probes)).contains(&be_rx),
        "backend RX {be_rx} vs testpmd RX {rx} ({probes} probes):\n{be_out}"
    );
    assert_eq!(be_rx_bytes, be_rx * frame_len);
}

/// (packets, bytes) of queue `q` ("rx0") in the counters the backend logs at exit.
fn backend_counter(log: &str, q: &str) -> (u64, u64) {
    let key = format!("({q}): packets ");
    let at = log
        .rfind(&key)
        .unwrap_or_else(|| panic!("no {q} counters:\n{log}"));
    let w: Vec<&str> = log[at + key.len()..].split_whitespace().take(3).collect();
    match w.as_slice() {
        [p, "bytes", b] => (p.parse().expect("packets"), b.parse().expect("bytes")),
        _ => panic!("bad {q} counters:\n{log}"),
    }
}

/// Whether `frame` is a test frame whose tag is in `base..base + n`.
fn has_tag_in(frame: &[u8], base: u32, n: u32) -> bool {
    frame.len() >= 18
        && frame[12..14] == ETHERTYPE.to_be_bytes()
        && (base..base + n).contains(&u32::from_le_bytes([
            frame[14], frame[15], frame[16], frame[17],
        ]))
}
