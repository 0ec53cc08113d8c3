//! Block migration between two real vhost-blk-backend processes, driven the way an
//! operator does it: the destination started with `--incoming`, the source's control
//! socket driven by `vhost-blk-backend migrate ...`, `migrate-status`, `migrate-complete`.
//! A read sent to the destination before the migration waits, and completes after the
//! hand-over with the source's data; the images compare equal; the control socket
//! answers bad commands with a QMP error.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use vhost_blk_backend::spec::{req_type, status};
use vhost_tests::frontend::{FrontendOptions, TestFrontend};
use vhost_user_device::control::QmpClient;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-blk-backend");
const SIZE: usize = 16 << 20;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn start(args: &[&str], sock: &Path) -> Proc {
    let child = Command::new(BIN)
        .args(args)
        .arg("--socket-path")
        .arg(sock)
        .stderr(Stdio::null())
        .spawn()
        .expect("start the backend");
    wait_for(sock);
    Proc(child)
}

fn cli(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run the client")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn an_operator_moves_a_disk_between_two_backends() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let (src_img, dst_img): (PathBuf, PathBuf) = (d.join("src.img"), d.join("dst.img"));
    std::fs::write(&src_img, pattern_range(0, SIZE)).unwrap();
    std::fs::write(&dst_img, vec![0u8; SIZE]).unwrap();
    let (src_sock, dst_sock, ctl, mig) = (
        d.join("src.sock"),
        d.join("dst.sock"),
        d.join("ctl.sock"),
        d.join("mig.sock"),
    );
    let _dst = start(
        &[
            "--blk-file",
            s(&dst_img),
            "--serial",
            "disk0",
            "--incoming",
            &format!("unix:{}", s(&mig)),
        ],
        &dst_sock,
    );
    let _src = start(
        &[
            "--blk-file",
            s(&src_img),
            "--serial",
            "disk0",
            "--control-socket",
            s(&ctl),
        ],
        &src_sock,
    );
    wait_for(&ctl);
    wait_for(&mig);
    // The guest on the source writes; a guest on the destination reads before the move.
    let mut fe = TestFrontend::connect(&src_sock, FrontendOptions::default()).unwrap();
    assert_eq!(write(&mut fe, 8, &[0xab; 4096]), status::OK);
    let mut fd = TestFrontend::connect(&dst_sock, FrontendOptions::default()).unwrap();
    let held = blk_req(&mut fd, req_type::IN, 8, 4096);
    fd.submit(0, &held.chain(true));

    // The control socket refuses nonsense and keeps serving.
    let mut q = QmpClient::connect(&ctl).unwrap();
    let e = q
        .execute("migrate", json!({"uri": 5}))
        .unwrap()
        .unwrap_err();
    assert!(e.desc.contains("'uri' expects a string"), "{}", e.desc);
    let e = q
        .execute("migrate", json!({"uri": "tcp:127.0.0.1:1"}))
        .unwrap()
        .unwrap_err();
    assert!(e.desc.contains("--migration-insecure"), "{}", e.desc);
    let e = q
        .execute("migrate-complete", json!({}))
        .unwrap()
        .unwrap_err();
    assert!(e.desc.contains("no migration job"), "{}", e.desc);

    // migrate ... --wait ready: prints the job id, returns once ready.
    let out = cli(&[
        "migrate",
        "--control-socket",
        s(&ctl),
        "--to",
        &format!("unix:{}", s(&mig)),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "migrate failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first: Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(first["id"], "migrate0");
    let last: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["status"], "ready", "{stdout}");
    // A second migrate while one runs is refused.
    let e = q
        .execute("migrate", json!({"uri": format!("unix:{}", s(&mig))}))
        .unwrap()
        .unwrap_err();
    assert!(e.desc.contains("still running"), "{}", e.desc);
    // The held read has not been served.
    assert_eq!(fd.queues[0].used_idx(&fd.mem), 0);

    // Hand over.
    let out = cli(&["migrate-complete", "--control-socket", s(&ctl)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let out = cli(&["migrate-status", "--control-socket", s(&ctl), "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        if v["status"] == "concluded" {
            break v;
        }
        assert!(Instant::now() < deadline, "never concluded: {v}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.get("error").is_none(), "{status}");
    assert!(status["downtime-ms"].as_f64().is_some(), "{status}");
    // The destination serves now: the held read completes with the source's data.
    fd.wait(0, 1)
        .expect("the held read completes after the hand-over");
    assert_eq!(held.status(&fd), status::OK);
    assert_eq!(fd.read(held.data, 4096), vec![0xab; 4096]);
    assert!(
        std::fs::read(&src_img).unwrap() == std::fs::read(&dst_img).unwrap(),
        "the images differ"
    );
    // The table form works too.
    let out = cli(&["migrate-status", "--control-socket", s(&ctl)]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("concluded") && table.contains("bytes total"),
        "{table}"
    );
}
