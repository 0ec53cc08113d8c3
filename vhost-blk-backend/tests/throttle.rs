//! I/O throttling of the real program: `--iops-limit` and `--bandwidth-write-limit` hold
//! a closed loop of requests to the limit, and `set-io-throttle` on the control socket
//! changes it while requests run. Requests over the limit wait; none fails.
//!
//! These check that the limit is the limit (within 5 %), not how fast the backend is
//! (that is bench's job). Each run starts with a short warm-up that uses up the burst.
//! The bursts are a second's worth: on a loaded host the test process or the worker may
//! be off the CPU for a while, and the burst lets the loop catch up afterwards (with the
//! default tenth of a second, a longer stall is lost for good and the rate falls short
//! of the limit for reasons that are not the backend's).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use vhost_blk_backend::spec::{req_type, status};
use vhost_tests::control::{sigterm_expect_clean_exit, wait_for_path};
use vhost_tests::frontend::{FrontendOptions, TestFrontend};
use vhost_user_device::control::QmpClient;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-blk-backend");
const DEPTH: usize = 8;
const WARM_UP: Duration = Duration::from_millis(500);

/// The program on an 8 MiB image with a control socket and `extra` arguments.
struct Backend {
    child: Child,
    sock: PathBuf,
    ctl: PathBuf,
    _dir: tempfile::TempDir,
}

impl Backend {
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::write(&img, pattern_range(0, 8 << 20)).unwrap();
        let sock = dir.path().join("blk.sock");
        let ctl = dir.path().join("ctl.sock");
        let child = Command::new(BIN)
            .arg("--blk-file")
            .arg(&img)
            .arg("--socket-path")
            .arg(&sock)
            .arg("--control-socket")
            .arg(&ctl)
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_path(&ctl);
        wait_for_path(&sock);
        Self {
            child,
            sock,
            ctl,
            _dir: dir,
        }
    }

    fn qmp(&self) -> QmpClient {
        QmpClient::connect(&self.ctl).unwrap()
    }

    fn socket(&self) -> &Path {
        &self.sock
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// DEPTH requests of `len` bytes (reads, or writes when `write`) kept in flight on
/// queue `q`: each completion is checked and the request posted again. Runs the warm-up,
/// then counts the completions of `window`; returns completions per second.
struct Loop {
    reqs: Vec<BlkReq>,
    /// Head -> request.
    heads: Vec<Option<usize>>,
    write: bool,
    q: u16,
}

impl Loop {
    fn start(fe: &mut TestFrontend, len: u32, write: bool) -> Self {
        Self::start_on(fe, 0, len, write)
    }

    fn start_on(fe: &mut TestFrontend, q: u16, len: u32, write: bool) -> Self {
        let type_ = if write { req_type::OUT } else { req_type::IN };
        let reqs: Vec<BlkReq> = (0..DEPTH as u64)
            .map(|i| {
                let r = blk_req(fe, type_, i * u64::from(len / 512), len);
                if write {
                    fe.write(r.data, &vec![i as u8; len as usize]);
                }
                r
            })
            .collect();
        let mut l = Self {
            reqs,
            heads: vec![None; usize::from(fe.queues[usize::from(q)].size)],
            write,
            q,
        };
        for i in 0..DEPTH {
            l.post(fe, i);
        }
        l
    }

    fn post(&mut self, fe: &mut TestFrontend, i: usize) {
        fe.write(self.reqs[i].status, &[0xff]);
        let head = fe.submit(self.q, &self.reqs[i].chain(!self.write));
        self.heads[usize::from(head)] = Some(i);
    }

    /// Completions in `d`, each checked and posted again.
    fn run_for(&mut self, fe: &mut TestFrontend, d: Duration) -> u64 {
        let end = Instant::now() + d;
        let mut n = 0;
        while Instant::now() < end {
            let used = fe.queues[usize::from(self.q)]
                .wait_used(
                    &fe.mem,
                    1,
                    end.saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1)),
                )
                .unwrap_or_default();
            // All of them first: posting again reuses the heads just freed.
            let done: Vec<usize> = used
                .iter()
                .map(|u| self.heads[u.id as usize].take().expect("a posted head"))
                .collect();
            for i in done {
                assert_eq!(
                    self.reqs[i].status(fe),
                    status::OK,
                    "a throttled request failed"
                );
                n += 1;
                self.post(fe, i);
            }
        }
        n
    }

    /// Per second over `window`, after the warm-up.
    fn rate(&mut self, fe: &mut TestFrontend, window: Duration) -> f64 {
        self.run_for(fe, WARM_UP);
        self.run_for(fe, window) as f64 / window.as_secs_f64()
    }
}

fn within_5_percent(what: &str, got: f64, want: f64) {
    eprintln!("{what}: {got:.1}/s, limit {want}/s");
    assert!(
        (got - want).abs() <= want * 0.05,
        "{what}: {got:.1}/s, limit {want}/s"
    );
}

fn stats(b: &Backend) -> serde_json::Value {
    b.qmp().execute("query-stats", json!({})).unwrap().unwrap()
}

#[test]
fn iops_limit_holds_a_closed_loop_of_reads_to_it() {
    let mut b = Backend::start(&["--iops-limit", "500", "--iops-burst", "500"]);
    let st = b.qmp().execute("query-status", json!({})).unwrap().unwrap();
    assert_eq!(st["io-throttle"]["iops"], 500, "{st}");
    assert_eq!(st["io-throttle"]["bps"], 0, "{st}");
    let mut fe = TestFrontend::connect(b.socket(), FrontendOptions::default()).unwrap();
    let mut l = Loop::start(&mut fe, 4096, false);
    let iops = l.rate(&mut fe, Duration::from_secs(10));
    within_5_percent("4 KiB reads at depth 8, --iops-limit 500", iops, 500.0);
    let s = stats(&b);
    assert!(s["throttled"].as_u64().unwrap() > 4000, "{s}");
    assert!(s["throttle-wait-ms"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["io-errors"], 0, "{s}");
    // Closing with requests held by the throttle: they are served (the ring stop
    // drains them), and the program exits cleanly.
    drop(fe);
    sigterm_expect_clean_exit(&mut b.child);
}

#[test]
fn bandwidth_limit_holds_a_closed_loop_of_writes_to_it() {
    let b = Backend::start(&[
        "--bandwidth-write-limit",
        "2M",
        "--bandwidth-write-burst",
        "2M",
    ]);
    let mut fe = TestFrontend::connect(b.socket(), FrontendOptions::default()).unwrap();
    let mut l = Loop::start(&mut fe, 64 << 10, true);
    let bps = l.rate(&mut fe, Duration::from_secs(6)) * f64::from(64u32 << 10);
    within_5_percent(
        "64 KiB writes at depth 8, --bandwidth-write-limit 2M",
        bps,
        f64::from(2u32 << 20),
    );
}

#[test]
fn set_io_throttle_changes_the_limit_at_run_time() {
    let mut b = Backend::start(&["--iops-limit", "300", "--iops-burst", "300"]);
    let mut fe = TestFrontend::connect(b.socket(), FrontendOptions::default()).unwrap();
    let mut l = Loop::start(&mut fe, 4096, false);
    let before = l.rate(&mut fe, Duration::from_secs(4));
    within_5_percent("--iops-limit 300", before, 300.0);
    let mut c = b.qmp();
    // Bad arguments are refused and change nothing.
    for bad in [
        json!({"iops": 600, "iops_rd": 10}),
        json!({"iops": -1}),
        json!({"iops_max": 100}),
        json!({"nope": 1}),
    ] {
        let r = c.execute("set-io-throttle", bad.clone()).unwrap();
        assert!(r.is_err(), "{bad} was accepted");
    }
    let r = c
        .execute("set-io-throttle", json!({"iops": 600, "iops_max": 600}))
        .unwrap();
    assert_eq!(r.unwrap(), json!({}));
    let st = c.execute("query-status", json!({})).unwrap().unwrap();
    assert_eq!(st["io-throttle"]["iops"], 600, "{st}");
    assert_eq!(st["io-throttle"]["iops_max"], 600, "{st}");
    let after = l.rate(&mut fe, Duration::from_secs(4));
    within_5_percent("after set-io-throttle iops=600", after, 600.0);
    // 1 byte/s: the first request puts the bucket in debt for more than an hour, and
    // the next one is parked with its timer that far off.
    c.execute(
        "set-io-throttle",
        json!({"iops": 0, "iops_max": 0, "bps": 1}),
    )
    .unwrap()
    .unwrap();
    l.run_for(&mut fe, Duration::from_millis(300));
    // 0: unlimited, at once: the parked request does not wait for its timer.
    c.execute("set-io-throttle", json!({"bps": 0}))
        .unwrap()
        .unwrap();
    let st = c.execute("query-status", json!({})).unwrap().unwrap();
    assert!(
        st["io-throttle"]
            .as_object()
            .unwrap()
            .values()
            .all(|v| v == 0),
        "{st}"
    );
    let free = l.rate(&mut fe, Duration::from_secs(1));
    assert!(free > 660.0, "{free}/s without a limit");
    drop(fe);
    sigterm_expect_clean_exit(&mut b.child);
}

/// One limit for the disk: two queues (two workers), each with its closed loop, share it.
#[test]
fn the_limit_is_shared_by_the_queues() {
    let b = Backend::start(&[
        "--num-queues",
        "2",
        "--iops-limit",
        "400",
        "--iops-burst",
        "400",
    ]);
    let mut fe = TestFrontend::connect(
        b.socket(),
        FrontendOptions {
            num_queues: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let mut loops = [
        Loop::start_on(&mut fe, 0, 4096, false),
        Loop::start_on(&mut fe, 1, 4096, false),
    ];
    // Both loops in turns of 5 ms (their requests keep going in between).
    let mut run = |fe: &mut TestFrontend, d: Duration| {
        let end = Instant::now() + d;
        let mut n = [0u64; 2];
        while Instant::now() < end {
            for (i, l) in loops.iter_mut().enumerate() {
                n[i] += l.run_for(fe, Duration::from_millis(5));
            }
        }
        n
    };
    run(&mut fe, WARM_UP);
    let window = Duration::from_secs(5);
    let n = run(&mut fe, window);
    let total = (n[0] + n[1]) as f64 / window.as_secs_f64();
    within_5_percent("two queues, --iops-limit 400", total, 400.0);
    assert!(n[0] > 0 && n[1] > 0, "a queue was starved: {n:?}");
}

/// Runs `BIN set-io-throttle --control-socket CTL args...`.
fn set_io_throttle(ctl: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("set-io-throttle")
        .arg("--control-socket")
        .arg(ctl)
        .args(args)
        .output()
        .unwrap()
}

/// The `set-io-throttle` subcommand: the flags of the command line, applied over the
/// limits in force (which it prints); a refused combination or a bad value fails with a
/// message in the flags' words and changes nothing.
#[test]
fn the_set_io_throttle_subcommand_changes_and_prints_the_limits() {
    let mut b = Backend::start(&["--iops-limit", "300"]);
    let io_throttle = |b: &Backend| {
        let st = b.qmp().execute("query-status", json!({})).unwrap().unwrap();
        st["io-throttle"].clone()
    };
    let out = set_io_throttle(
        &b.ctl,
        &[
            "--iops-limit",
            "0",
            "--iops-read-limit",
            "800",
            "--iops-read-burst",
            "1000",
            "--bandwidth-write-limit",
            "20M",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = json!({
        "iops": 0, "iops_rd": 800, "iops_wr": 0, "bps": 0, "bps_rd": 0, "bps_wr": 20 << 20,
        "iops_max": 0, "iops_rd_max": 1000, "iops_wr_max": 0, "bps_max": 0,
        "bps_rd_max": 0, "bps_wr_max": 0,
    });
    assert_eq!(io_throttle(&b), want);
    // The printed table: every limit, with its flag and value.
    let line = |name: &str| -> Vec<String> {
        stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} in\n{stdout}"))
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    assert_eq!(line("iops_rd"), ["iops_rd", "--iops-read-limit", "800"]);
    assert_eq!(
        line("bps_wr"),
        ["bps_wr", "--bandwidth-write-limit", "20971520"]
    );
    assert_eq!(line("iops"), ["iops", "--iops-limit", "0", "(unlimited)"]);
    assert_eq!(stdout.lines().count(), 12, "{stdout}");

    // Only what is given changes; --json prints query-status' io-throttle.
    let out = set_io_throttle(&b.ctl, &["--bandwidth-write-burst", "32M", "--json"]);
    assert!(out.status.success());
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut want = want;
    want["bps_wr_max"] = json!(32 << 20);
    assert_eq!(printed, want);
    assert_eq!(io_throttle(&b), want);

    // Refused by the backend: exit 1, the reason in the flags' words, nothing changed.
    for (args, reason) in [
        (
            &["--iops-limit", "100"][..],
            "--iops-limit cannot be combined with --iops-read-limit or --iops-write-limit",
        ),
        (
            &["--iops-read-burst", "10"][..],
            "--iops-read-burst (10) must not be smaller than --iops-read-limit (800)",
        ),
        (
            &["--iops-burst", "50"][..],
            "--iops-burst needs --iops-limit",
        ),
    ] {
        let out = set_io_throttle(&b.ctl, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&format!(
                "error: the backend refused the limits: {reason} ("
            )),
            "{args:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
        assert_eq!(io_throttle(&b), want, "{args:?} changed the limits");
    }
    // A value that is not one: the command line's error (exit 2), nothing sent.
    for (args, reason) in [
        (&["--bandwidth-limit", "12x"][..], "unknown unit"),
        (
            &["--iops-limit=-1"][..],
            "invalid value '-1' for '--iops-limit",
        ),
        (&["--iops-limit", "many"][..], "invalid digit"),
    ] {
        let out = set_io_throttle(&b.ctl, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(reason), "{args:?}: {err}");
    }
    assert_eq!(io_throttle(&b), want);

    // No backend: a message naming the socket.
    let out = set_io_throttle(&b.ctl.with_extension("gone"), &["--iops-limit", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot use the control socket") && err.contains("ctl.gone"),
        "{err}"
    );
    sigterm_expect_clean_exit(&mut b.child);
}
