//! The control socket of the real serial-backend (default sandbox): a known workload
//! through the frontend harness shows exactly in query-stats and the `stats`
//! subcommand, the VMM's connect and disconnect arrive as events, and SIGTERM with a
//! control client connected exits 0.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Driver;
use serde_json::{json, Value};
use serial_backend::spec::{event, queue};
use vhost_tests::control::{queue_cell, stats_command, table_line, wait_for_path};
use vhost_user_device::control::QmpClient;

const BIN: &str = env!("CARGO_BIN_EXE_serial-backend");

fn stats(c: &mut QmpClient) -> Value {
    c.execute("query-stats", json!({})).unwrap().unwrap()
}

#[test]
fn control_socket_counts_port_writes_and_reports_the_vmm() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("serial.sock");
    let ctl = dir.path().join("ctl.sock");
    let log = dir.path().join("log.txt");
    let mut child = Command::new(BIN)
        .arg("--socket-path")
        .arg(&sock)
        .args(["--max-ports", "2", "--port"])
        .arg(format!("name=org.example.log,file={}", log.display()))
        .arg("--control-socket")
        .arg(&ctl)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_path(&ctl);
    wait_for_path(&sock);
    let mut c = QmpClient::connect(&ctl).unwrap();
    let st = c.execute("query-status", json!({})).unwrap().unwrap();
    assert_eq!(st["status"], "running");
    assert_eq!(st["program"], "serial-backend");
    assert_eq!(st["vmm-connected"], false);
    assert_eq!(st["max-ports"], 2);
    assert_eq!(st["ports"][0]["name"], "org.example.log");

    let mut d = Driver::connect_socket(&sock, 2);
    let m = d.handshake(1);
    assert!(m
        .iter()
        .any(|(c, _)| c.event == event::DEVICE_ADD && c.id == 1));
    // 10 writes of 100 bytes on port 1 (queue 5).
    let data: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
    assert_eq!(d.write_port(1, &data, 100), 10);
    assert_eq!(d.wait_tx(1, 10, Duration::from_secs(10)), 10);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&log).map_or(0, |m| m.len()) < 1000 {
        assert!(
            Instant::now() < deadline,
            "the port's file never got the writes"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(std::fs::read(&log).unwrap(), data);

    let s = stats(&mut c);
    assert_eq!(s["tx-bytes"], 1000, "{s}");
    assert_eq!(s["rx-bytes"], 0, "{s}");
    // DEVICE_READY and one PORT_READY.
    assert_eq!(s["control-in"], 2, "{s}");
    assert_eq!(s["bad-input"], 0, "{s}");
    let q = s["queues"].as_array().unwrap();
    assert_eq!(q.len(), usize::from(queue::count(2)), "{s}");
    let tx = usize::from(queue::tx(1));
    assert_eq!(q[tx]["role"], "port1-tx");
    assert_eq!(q[tx]["chains"], 10, "{s}");
    assert_eq!(q[tx]["completed"], 10, "{s}");
    assert_eq!(q[tx]["in-flight"], 0, "{s}");
    let ctx = usize::from(queue::CONTROL_TX);
    assert_eq!(q[ctx]["role"], "control-tx");
    assert_eq!(q[ctx]["chains"], 2, "{s}");
    assert_eq!(q[usize::from(queue::tx(0))]["chains"], 0, "{s}");

    let j: Value = serde_json::from_str(stats_command(BIN, &ctl, true).trim()).unwrap();
    assert_eq!(j["tx-bytes"], 1000);
    assert_eq!(j["queues"][tx]["chains"], 10);
    let table = stats_command(BIN, &ctl, false);
    assert_eq!(table_line(&table, "tx-bytes"), ["tx-bytes", "1000"]);
    assert_eq!(queue_cell(&table, tx, "chains"), "10", "{table}");
    assert_eq!(queue_cell(&table, tx, "role"), "port1-tx", "{table}");

    drop(d);
    vhost_tests::control::expect_connect_and_close_events(&mut c, 1);
    // A second VMM connection is number 2.
    let d = Driver::connect_socket(&sock, 2);
    let ev = c.next_event().unwrap();
    assert_eq!(ev["event"], "VHOST_USER_CONNECTED", "{ev}");
    assert_eq!(ev["data"]["connection"], 2);
    let st = c.execute("query-status", json!({})).unwrap().unwrap();
    assert_eq!(
        (&st["vmm-connected"], &st["connections"]),
        (&json!(true), &json!(2))
    );

    // SIGTERM with the VMM and a control client connected: exit 0, socket removed.
    vhost_tests::control::sigterm_expect_clean_exit(&mut child);
    assert!(!ctl.exists(), "the control socket was left behind");
    drop(d);
}

#[test]
fn help_names_the_control_socket_and_the_stats_subcommand() {
    vhost_tests::control::help_names_the_control_socket(BIN);
}

#[test]
fn stats_without_a_backend_fails_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("stats")
        .arg("--control-socket")
        .arg(dir.path().join("nobody.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("error: control socket") && err.contains("nobody.sock"),
        "{err}"
    );
}

/// The capability file QEMU and libvirt read (vhost-user/50-serial-backendRAM.json) follows QEMU's
/// schema and agrees with --print-capabilities.
#[test]
fn the_capability_file_matches_the_schema_and_print_capabilities() {
    vhost_tests::capabilities::check(
        BIN,
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("vhost-user/50-serial-backend.json"),
        "serial-backend",
    );
}
