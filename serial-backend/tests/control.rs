//! The control socket of the real serial-backend (default sandbox): a known workload
//! through the frontend harness shows exactly in query-stats (per device and per port),
//! the `stats` subcommand and the Prometheus endpoint, the VMM's connect and disconnect
//! arrive as events, and SIGTERM with a control client connected exits 0.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{has, pattern, Driver};
use serde_json::{json, Value};
use serial_backend::spec::{event, queue};
use vhost_tests::control::{port_cell, queue_cell, stats_command, table_line, wait_for_path};
use vhost_tests::guest_net::KillOnDrop;
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

/// Polls query-stats until `done` holds on it (what the host side did is counted by the
/// worker shortly after the host saw it); returns it.
fn stats_when(c: &mut QmpClient, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = stats(c);
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "never {what}: {s}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn client(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).expect("connect to the port's socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// The counters that are kept both per port and for the device.
const PER_PORT: [&str; 7] = [
    "tx-bytes",
    "rx-bytes",
    "tx-dropped",
    "console-dropped",
    "host-write-errors",
    "connects",
    "disconnects",
];

/// A known workload on three ports: a socket console written to without a client (its
/// backlog overflows, then a client connects and gets the backlog), a file port, and a
/// socket port with data both ways and a client that comes and goes. Every port's
/// counters are exact, the device's are their sums, and the `stats` table and the
/// Prometheus endpoint show the same.
#[test]
fn per_port_counters_are_exact_and_add_up_to_the_device_counters() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // Killed if an assertion fails: a live backend would keep the test's output open.
    let mut child = KillOnDrop(
        Command::new(BIN)
            .arg("--socket-path")
            .arg(p("serial.sock"))
            .args(["--max-ports", "3", "--console"])
            .arg(format!("socket={}", p("console.sock").display()))
            .arg("--port")
            .arg(format!("name=org.example.log,file={}", p("log").display()))
            .arg("--port")
            .arg(format!(
                "name=org.example.sock,socket={}",
                p("port2.sock").display()
            ))
            .arg("--control-socket")
            .arg(p("ctl.sock"))
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_for_path(&p("ctl.sock"));
    wait_for_path(&p("serial.sock"));
    let mut c = QmpClient::connect(&p("ctl.sock")).unwrap();
    let mut d = Driver::connect_socket(&p("serial.sock"), 3);
    d.handshake(3);
    d.send_ctrl(2, event::PORT_OPEN, 1);

    // Port 2: a client, 3000 bytes guest → host, 777 host → guest.
    let mut c2 = client(&p("port2.sock"));
    d.wait_ctrl("port 2's client", |m| has(m, 2, event::PORT_OPEN, 1));
    let to_host = pattern(1, 3000);
    let n = d.write_port(2, &to_host, 500);
    assert_eq!(d.wait_tx(2, n, Duration::from_secs(10)), n);
    let mut got = vec![0u8; to_host.len()];
    c2.read_exact(&mut got).unwrap();
    assert_eq!(got, to_host);
    let to_guest = pattern(2, 777);
    c2.write_all(&to_guest).unwrap();
    assert_eq!(d.read_port(2, 777, Duration::from_secs(10)), to_guest);

    // Port 1: 1000 bytes into the file.
    let n = d.write_port(1, &pattern(3, 1000), 100);
    assert_eq!(d.wait_tx(1, n, Duration::from_secs(10)), n);

    // Port 0: 70000 bytes with no one connected; the backlog keeps the last 64 KiB.
    let console_out = pattern(4, 70_000);
    let n = d.write_port(0, &console_out, 7000);
    assert_eq!(d.wait_tx(0, n, Duration::from_secs(10)), n);
    let mut c0 = client(&p("console.sock"));
    let mut got = vec![0u8; 65_536];
    c0.read_exact(&mut got).unwrap();
    assert_eq!(got, console_out[70_000 - 65_536..]);

    // Port 2's client goes.
    drop(c2);
    d.wait_ctrl("port 2's client gone", |m| has(m, 2, event::PORT_OPEN, 0));
    let s = stats_when(&mut c, "all counted", |s| {
        s["disconnects"] == 1 && s["tx-bytes"] == 65_536 + 1000 + 3000
    });
    let ports = s["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 3, "{s}");
    let expect = [
        json!({"port": 0, "tx-bytes": 65_536, "rx-bytes": 0, "tx-dropped": 0,
               "host-write-errors": 0, "console-dropped": 70_000 - 65_536,
               "connects": 1, "disconnects": 0, "guest-open": 0}),
        json!({"port": 1, "name": "org.example.log", "tx-bytes": 1000, "rx-bytes": 0,
               "tx-dropped": 0, "host-write-errors": 0, "guest-open": 0}),
        json!({"port": 2, "name": "org.example.sock", "tx-bytes": 3000, "rx-bytes": 777,
               "tx-dropped": 0, "host-write-errors": 0, "connects": 1, "disconnects": 1,
               "guest-open": 1}),
    ];
    for (got, want) in ports.iter().zip(&expect) {
        assert_eq!(got, want);
    }
    for k in PER_PORT {
        let sum: u64 = ports.iter().filter_map(|p| p[k].as_u64()).sum();
        assert_eq!(s[k], sum, "{k}: device {} != sum of ports {sum}", s[k]);
    }
    assert_eq!(s["rx-bytes"], 777, "{s}");
    assert_eq!(s["console-dropped"], 4464, "{s}");
    assert_eq!(s["connects"], 2, "{s}");

    let table = stats_command(BIN, &p("ctl.sock"), false);
    assert_eq!(table_line(&table, "tx-bytes"), ["tx-bytes", "69536"]);
    assert_eq!(port_cell(&table, 2, "name"), "org.example.sock", "{table}");
    assert_eq!(port_cell(&table, 2, "tx-bytes"), "3000", "{table}");
    assert_eq!(port_cell(&table, 2, "rx-bytes"), "777", "{table}");
    assert_eq!(port_cell(&table, 2, "disconnects"), "1", "{table}");
    assert_eq!(port_cell(&table, 0, "console-dropped"), "4464", "{table}");
    assert_eq!(port_cell(&table, 1, "connects"), "-", "{table}");
    assert_eq!(queue_cell(&table, 5, "role"), "port1-tx", "{table}");
    assert_eq!(queue_cell(&table, 5, "chains"), "10", "{table}");

    let scrape = {
        let mut m = std::net::TcpStream::connect(metrics).unwrap();
        m.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut out = String::new();
        m.read_to_string(&mut out).unwrap();
        out
    };
    for line in [
        "serial_backend_tx_bytes_total 69536",
        "serial_backend_port_tx_bytes_total{port=\"0\"} 65536",
        "serial_backend_port_console_dropped_total{port=\"0\"} 4464",
        "serial_backend_port_tx_bytes_total{port=\"1\",name=\"org.example.log\"} 1000",
        "serial_backend_port_tx_bytes_total{port=\"2\",name=\"org.example.sock\"} 3000",
        "serial_backend_port_rx_bytes_total{port=\"2\",name=\"org.example.sock\"} 777",
        "serial_backend_port_connects_total{port=\"2\",name=\"org.example.sock\"} 1",
        "serial_backend_port_disconnects_total{port=\"2\",name=\"org.example.sock\"} 1",
        "# TYPE serial_backend_port_guest_open gauge",
        "serial_backend_port_guest_open{port=\"2\",name=\"org.example.sock\"} 1",
        "serial_backend_port_guest_open{port=\"1\",name=\"org.example.log\"} 0",
    ] {
        assert!(
            scrape.lines().any(|l| l == line),
            "no {line:?} in\n{scrape}"
        );
    }
    // Per-port samples are labelled by port, not by position.
    assert!(!scrape.contains("index="), "{scrape}");

    vhost_tests::control::sigterm_expect_clean_exit(&mut child.0);
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
