//! The guest's console: the markers its `/init` and scripts print, and a reader that
//! follows the growing console log line by line.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Console line prefix of guest results: `@@RESULT key=value [key=value...]`.
pub const RESULT_PREFIX: &str = "@@RESULT";
/// Console line printed by the guest's `/init` after the script: `@@GUEST-EXIT@@ <status>`.
pub const EXIT_PREFIX: &str = "@@GUEST-EXIT@@";

/// Parses `@@RESULT` pairs and the `@@GUEST-EXIT@@` status from a console log.
pub fn parse_console(console: &str) -> (BTreeMap<String, String>, Option<i32>) {
    let mut results = BTreeMap::new();
    let mut exit = None;
    for line in console.lines() {
        if let Some(i) = line.find(RESULT_PREFIX) {
            for kv in line[i + RESULT_PREFIX.len()..].split_whitespace() {
                if let Some((k, v)) = kv.split_once('=') {
                    results.insert(k.to_string(), v.to_string());
                }
            }
        } else if let Some(i) = line.find(EXIT_PREFIX) {
            exit = line[i + EXIT_PREFIX.len()..]
                .split_whitespace()
                .next()
                .and_then(|s| s.parse().ok());
        }
    }
    (results, exit)
}

/// Follows a growing console log and hands out complete lines.
pub(crate) struct LineReader {
    path: PathBuf,
    pos: u64,
    partial: Vec<u8>,
}

impl LineReader {
    pub(crate) fn new(path: &Path) -> Self {
        LineReader {
            path: path.to_path_buf(),
            pos: 0,
            partial: Vec::new(),
        }
    }

    pub(crate) fn poll(&mut self, on_line: &mut impl FnMut(&str)) {
        let Ok(mut f) = File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.pos)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if let Ok(n) = f.read_to_end(&mut buf) {
            self.pos += n as u64;
        }
        for &b in &buf {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.partial).replace('\r', "");
                on_line(&line);
                self.partial.clear();
            } else {
                self.partial.push(b);
            }
        }
    }

    pub(crate) fn finish(&mut self, on_line: &mut impl FnMut(&str)) {
        if !self.partial.is_empty() {
            let line = String::from_utf8_lossy(&self.partial).replace('\r', "");
            on_line(&line);
            self.partial.clear();
        }
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn parses_console() {
        let c = "noise\n@@RESULT a=1 b=x\n[ 1.0] kernel @@RESULT c=3\n@@RESULT a=2\n@@GUEST-EXIT@@ 4 uptime=5.0\n";
        let (r, e) = parse_console(c);
        assert_eq!(r.get("a").map(String::as_str), Some("2"));
        assert_eq!(r.get("b").map(String::as_str), Some("x"));
        assert_eq!(r.get("c").map(String::as_str), Some("3"));
        assert_eq!(e, Some(4));
        assert_eq!(parse_console("no exit\n").1, None);
    }
}
