//! What the tests of each backend's control socket share: the `stats` subcommand, the
//! connect and disconnect events, a clean exit on SIGTERM, the help text.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Waits until `p` exists (a socket a starting program creates).
pub fn wait_for_path(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `BIN stats --control-socket CTL [--json]`, which must succeed; its stdout.
pub fn stats_command(bin: &str, ctl: &Path, json: bool) -> String {
    let mut cmd = Command::new(bin);
    cmd.arg("stats").arg("--control-socket").arg(ctl);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().expect("run the stats subcommand");
    assert!(
        out.status.success(),
        "stats failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// The line of `table` whose first word is `first`, split into words.
pub fn table_line<'a>(table: &'a str, first: &str) -> Vec<&'a str> {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(first))
        .unwrap_or_else(|| panic!("no {first} line in\n{table}"))
        .split_whitespace()
        .collect()
}

/// The cell of the queue table in column `column` on the row of queue `queue`.
pub fn queue_cell<'a>(table: &'a str, queue: usize, column: &str) -> &'a str {
    table_cell(table, "queue", &queue.to_string(), column)
}

/// The cell of the port table (serial) in column `column` on the row of port `port`.
pub fn port_cell<'a>(table: &'a str, port: u32, column: &str) -> &'a str {
    table_cell(table, "port", &port.to_string(), column)
}

/// The cell in column `column` of the table whose header starts with `key_column`, on
/// its row whose first cell is `key` (a table ends at a blank line).
pub fn table_cell<'a>(table: &'a str, key_column: &str, key: &str, column: &str) -> &'a str {
    let mut lines = table
        .lines()
        .skip_while(|l| l.split_whitespace().next() != Some(key_column));
    let head: Vec<&str> = lines
        .next()
        .unwrap_or_else(|| panic!("no {key_column} table in\n{table}"))
        .split_whitespace()
        .collect();
    let row: Vec<&str> = lines
        .take_while(|l| !l.trim().is_empty())
        .find(|l| l.split_whitespace().next() == Some(key))
        .unwrap_or_else(|| panic!("no {key_column} {key} row in\n{table}"))
        .split_whitespace()
        .collect();
    assert_eq!(head.len(), row.len(), "{table}");
    let i = head
        .iter()
        .position(|h| *h == column)
        .unwrap_or_else(|| panic!("no column {column} in the {key_column} table\n{table}"));
    row[i]
}

/// SIGTERM to `child`, then waits (10 s at most) for it to exit 0; returns its stderr
/// (which must be piped). A non-zero exit fails the test with the stderr.
pub fn sigterm_expect_clean_exit(child: &mut std::process::Child) -> String {
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(s) = child.try_wait().expect("wait for the backend") {
            break s;
        }
        assert!(Instant::now() < deadline, "backend did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut err).expect("read stderr");
    }
    assert!(code.success(), "exit status {code:?}; stderr:\n{err}");
    err
}

/// The next two events on `c` are VHOST_USER_CONNECTED and VHOST_USER_DISCONNECTED of
/// connection `n`, closed by the frontend.
pub fn expect_connect_and_close_events(c: &mut vhost_user_device::control::QmpClient, n: u64) {
    let ev = c.next_event().expect("an event");
    assert_eq!(ev["event"], "VHOST_USER_CONNECTED", "{ev}");
    assert_eq!(ev["data"]["connection"], n);
    let ev = c.next_event().expect("an event");
    assert_eq!(ev["event"], "VHOST_USER_DISCONNECTED", "{ev}");
    assert_eq!(ev["data"]["connection"], n);
    assert_eq!(ev["data"]["reason"], "the frontend closed the connection");
}

/// `bin --help` names --control-socket and the stats subcommand, and `bin stats --help`
/// names --control-socket and --json.
pub fn help_names_the_control_socket(bin: &str) {
    let help = |args: &[&str]| {
        let out = Command::new(bin).args(args).output().expect("run --help");
        String::from_utf8(out.stdout).expect("utf-8 help")
    };
    let s = help(&["--help"]);
    assert!(s.contains("--control-socket") && s.contains("stats"), "{s}");
    let s = help(&["stats", "--help"]);
    assert!(
        s.contains("--control-socket") && s.contains("--json"),
        "{s}"
    );
}
