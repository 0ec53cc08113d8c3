//! The control socket of the real vhost-net-backend (default sandbox) on a tap in a
//! private network namespace (root): 10 TX frames and 3 RX frames through the frontend
//! harness show exactly in query-stats and the `stats` subcommand, the VMM's connect and
//! disconnect arrive as events, and SIGTERM with a control client connected exits 0.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use vhost_net_backend::spec::NetHdr;
use vhost_tests::control::{queue_cell, stats_command, table_line, wait_for_path};
use vhost_tests::frontend::{FrontendOptions, TestFrontend};
use vhost_user_device::control::QmpClient;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-net-backend");

/// Kills the backend if the test fails before it exits.
struct Backend(std::process::Child);

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn control_socket_counts_frames_and_reports_the_vmm() {
    if !enter_netns("control_socket_counts_frames_and_reports_the_vmm") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let ctl = dir.path().join("ctl.sock");
    // Spawned from this thread: the child is in its network namespace.
    let child = Command::new(BIN)
        .args(["--tap", TAP, "--queue-size", "128"])
        .arg("--socket-path")
        .arg(&sock)
        .arg("--control-socket")
        .arg(&ctl)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Backend(child);
    wait_for_path(&ctl);
    wait_for_path(&sock);
    set_link(TAP, 9000, HOST_MAC);
    let mut c = QmpClient::connect(&ctl).unwrap();
    let st = c.execute("query-status", json!({})).unwrap().unwrap();
    assert_eq!(st["status"], "running");
    assert_eq!(st["program"], "vhost-net-backend");
    assert_eq!(st["tap"], TAP);
    assert_eq!(st["vmm-connected"], false);

    let mut fe = TestFrontend::connect(
        &sock,
        FrontendOptions {
            num_queues: 3,
            queue_size: 128,
            event_idx: true,
            ..Default::default()
        },
    )
    .unwrap();
    let psock = PacketSocket::open(TAP, false);
    let (tx_len, rx_len) = (
        test_frame(HOST_MAC, GUEST_MAC, 0, 300).len(),
        test_frame(GUEST_MAC, HOST_MAC, 0, 200).len(),
    );
    for i in 0..10u32 {
        send_tx(
            &mut fe,
            0,
            NetHdr::default(),
            &test_frame(HOST_MAC, GUEST_MAC, 0x5000 + i, 300),
        );
    }
    fe.wait(1, 10).expect("tx completions");
    for i in 0..10u32 {
        psock
            .recv_matching(Duration::from_secs(5), |f| has_tag(f, 0x5000 + i))
            .unwrap_or_else(|| panic!("tx frame {i} on the tap"));
    }
    let bufs = post_rx(&mut fe, 0, 16, 2048);
    let mut pending = Vec::new();
    for i in 0..3u32 {
        let frame = test_frame(GUEST_MAC, HOST_MAC, 0x6000 + i, 200);
        psock.send(None, &frame).expect("inject");
        let (_, _, data) = recv_rx(&mut fe, 0, &bufs, &mut pending);
        assert_eq!(data, frame);
    }

    let s = c.execute("query-stats", json!({})).unwrap().unwrap();
    let q = s["queues"].as_array().unwrap();
    assert_eq!(q.len(), 3, "{s}");
    assert_eq!(q[1]["role"], "tx0");
    assert_eq!(q[1]["packets"], 10, "{s}");
    assert_eq!(q[1]["bytes"], 10 * tx_len, "{s}");
    assert_eq!(q[1]["drops"], 0, "{s}");
    assert_eq!(q[1]["chains"], 10, "{s}");
    assert_eq!(q[1]["completed"], 10, "{s}");
    assert_eq!(q[0]["role"], "rx0");
    assert_eq!(q[0]["packets"], 3, "{s}");
    assert_eq!(q[0]["bytes"], 3 * rx_len, "{s}");
    // The device holds the RX buffers it took and has not filled yet.
    assert_eq!(q[0]["completed"], 3, "{s}");
    let held = q[0]["chains"].as_u64().unwrap() - 3;
    assert!(held <= 13, "{s}");
    assert_eq!(q[0]["in-flight"], held, "{s}");
    assert_eq!(q[2]["role"], "ctrl");
    let p = &s["queue-pairs"][0];
    assert_eq!(
        (&p["tx-packets"], &p["tx-bytes"]),
        (&json!(10), &json!(10 * tx_len)),
        "{s}"
    );
    assert_eq!(
        (&p["rx-packets"], &p["rx-bytes"]),
        (&json!(3), &json!(3 * rx_len)),
        "{s}"
    );

    let j: Value = serde_json::from_str(stats_command(BIN, &ctl, true).trim()).unwrap();
    assert_eq!(j["queues"][1]["packets"], 10);
    let table = stats_command(BIN, &ctl, false);
    assert_eq!(
        table_line(&table, "queue-pairs.0.tx-packets"),
        ["queue-pairs.0.tx-packets", "10"]
    );
    assert_eq!(queue_cell(&table, 1, "packets"), "10", "{table}");
    assert_eq!(queue_cell(&table, 1, "role"), "tx0", "{table}");

    drop(fe);
    vhost_tests::control::expect_connect_and_close_events(&mut c, 1);

    vhost_tests::control::sigterm_expect_clean_exit(&mut child.0);
    assert!(!ctl.exists(), "the control socket was left behind");
}

#[test]
fn help_names_the_control_socket_and_the_stats_subcommand() {
    vhost_tests::control::help_names_the_control_socket(BIN);
}

/// The capability file QEMU and libvirt read (vhost-user/50-vhost-net-backendRAM.json) follows QEMU's
/// schema and agrees with --print-capabilities.
#[test]
fn the_capability_file_matches_the_schema_and_print_capabilities() {
    vhost_tests::capabilities::check(
        BIN,
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("vhost-user/50-vhost-net-backend.json"),
        "vhost-net-backend",
    );
}
