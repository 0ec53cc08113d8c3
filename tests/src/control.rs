//! The programs' `stats` subcommand, for the tests of each backend's control socket.

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
    let head = table_line(table, "queue");
    let row = table_line(table, &queue.to_string());
    assert_eq!(head.len(), row.len(), "{table}");
    let i = head
        .iter()
        .position(|h| *h == column)
        .unwrap_or_else(|| panic!("no column {column} in\n{table}"));
    row[i]
}
