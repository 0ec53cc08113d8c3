//! A guest test that cannot run on this machine skips loudly: a banner on the real
//! stderr, a line in `<work>/SKIPPED.txt` (the count CI shows), a failure with
//! `VHOST_GUEST_REQUIRE=1`. And the log helpers every message of the harness uses.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use super::env::{env_flag, work_dir};

/// Writes straight to the process's stderr, bypassing libtest's output
/// capture, so the text shows up even for passing tests.
pub(super) fn loud(msg: &str) {
    let mut e = io::stderr().lock();
    let _ = e.write_all(msg.as_bytes());
    let _ = e.flush();
}

/// Reports a skipped guest test: a banner on the real stderr, a line in
/// `<work>/SKIPPED.txt`, and a panic instead when `VHOST_GUEST_REQUIRE=1`.
pub fn report_skip(test: &str, reason: &str) {
    let bar = "#".repeat(72);
    loud(&format!(
        "\n{bar}\n## SKIPPED: guest test `{test}`: {reason}\n\
         ## (set VHOST_GUEST_REQUIRE=1 to turn this into a failure)\n{bar}\n"
    ));
    let mut dir = work_dir();
    if fs::create_dir_all(&dir).is_err() {
        dir = std::env::temp_dir();
    }
    let file = dir.join("SKIPPED.txt");
    if let Ok(mut f) = File::options().create(true).append(true).open(&file) {
        let first = reason.lines().next().unwrap_or("");
        let _ = writeln!(f, "{} SKIPPED {test}: {first}", unix_time());
        loud(&format!("## skip recorded in {}\n", file.display()));
    }
    if env_flag("VHOST_GUEST_REQUIRE") {
        panic!("guest test `{test}` cannot run and VHOST_GUEST_REQUIRE is set: {reason}");
    }
}

pub(super) fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Last `n` lines of a (text) file, for error messages.
pub fn tail_file(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(b) => {
            let s = String::from_utf8_lossy(&b).replace('\r', "");
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}
