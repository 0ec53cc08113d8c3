//! Sequence-numbered records through a console port whose backend is SIGKILLed and
//! restarted: the host side of the serial crash tests (`serial-backend/tests/crash.rs`
//! with the frontend harness, `tests/tests/guest_crash.rs` with a guest).
//!
//! A record is one 64-byte line, `seq NNNNNNNN xxx…x\n`, written by the guest side with one
//! write (one chain) each, numbered from 0. [`read_records`] connects to the port's unix
//! socket, reads until the backend dies (end of file), connects to the restarted backend,
//! and so on, checking every record as it arrives ([`RecordLog`]).
//!
//! What a restarted backend can promise (see serial-backend's README, "Restarts"): a chain
//! is written to the host connection and then marked used; a SIGKILL between the two (a
//! kill that lands during the write lets the write finish first) leaves the chain to be
//! taken again by the next backend, which writes it to the next connection. So every
//! record arrives, in order, and a record may arrive twice only as the *first* record of a
//! connection, equal to the last record an earlier connection received.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Bytes of one record, `\n` included.
pub const RECORD: usize = 64;

/// Record `seq`.
pub fn record(seq: u64) -> [u8; RECORD] {
    let mut r = [b'x'; RECORD];
    let head = format!("seq {:08} ", seq % 100_000_000);
    r[..head.len()].copy_from_slice(head.as_bytes());
    r[RECORD - 1] = b'\n';
    r
}

/// The sequence number of a record line (without its `\n`), or `None` if it is not one.
pub fn parse_record(line: &[u8]) -> Option<u64> {
    if line.len() != RECORD - 1 || !line.starts_with(b"seq ") || line[12] != b' ' {
        return None;
    }
    if !line[13..].iter().all(|&b| b == b'x') || !line[4..12].iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(&line[4..12]).ok()?.parse().ok()
}

/// One host connection to the port's socket.
#[derive(Debug)]
pub struct Connection {
    /// When we connected.
    pub opened: Instant,
    /// When its first record arrived.
    pub first_record: Option<Instant>,
    /// Records it received (doubled ones included).
    pub records: u64,
    /// Its first record.
    pub first: Option<u64>,
    /// Its last record.
    pub last: Option<u64>,
}

/// Everything the host read, checked record by record.
#[derive(Debug, Default)]
pub struct RecordLog {
    /// Connections so far, in order.
    pub conns: Vec<Connection>,
    /// The next sequence number due.
    pub next: u64,
    /// Records received in order (each sequence number once): `0..next` without the gaps.
    pub records: u64,
    /// Records received a second time as the first record of a connection, equal to the
    /// last record an earlier connection received: (connection, seq). The window a restart
    /// cannot close (module doc).
    pub doubled: Vec<(usize, u64)>,
    /// Any other sequence number than the next due: (connection, expected, got). A gap
    /// (got > expected) is a lost record; got < expected a duplicate or a reordering.
    pub out_of_order: Vec<(usize, u64, u64)>,
    /// Lines that are not records, and bytes after a connection's last `\n` (torn).
    pub bad: Vec<(usize, String)>,
    /// The current connection, for writing to the guest.
    pub writer: Option<UnixStream>,
}

impl RecordLog {
    fn record(&mut self, conn: usize, seq: u64) {
        let earlier_last = self.conns[..conn].iter().rev().find_map(|c| c.last);
        let c = &mut self.conns[conn];
        let first_in_conn = c.records == 0;
        c.first_record.get_or_insert_with(Instant::now);
        c.records += 1;
        c.first.get_or_insert(seq);
        c.last = Some(seq);
        if seq == self.next {
            self.next += 1;
            self.records += 1;
        } else if first_in_conn && seq + 1 == self.next && earlier_last == Some(seq) {
            self.doubled.push((conn, seq));
        } else {
            self.out_of_order.push((conn, self.next, seq));
            // Resynchronise, so that one fault is reported once.
            self.next = self.next.max(seq + 1);
        }
    }

    /// Records received in all, doubled ones included.
    pub fn received(&self) -> u64 {
        self.conns.iter().map(|c| c.records).sum()
    }

    /// When the first record arrived on connection `conn` or a later one.
    pub fn first_record_since(&self, conn: usize) -> Option<Instant> {
        self.conns.get(conn..)?.iter().find_map(|c| c.first_record)
    }

    /// A one-line summary for the test log.
    pub fn summary(&self) -> String {
        format!(
            "{} records in order over {} connections, {} doubled {:?}, {} out of order {:?}, \
             {} bad lines {:?}",
            self.records,
            self.conns.len(),
            self.doubled.len(),
            self.doubled.iter().take(8).collect::<Vec<_>>(),
            self.out_of_order.len(),
            self.out_of_order.iter().take(8).collect::<Vec<_>>(),
            self.bad.len(),
            self.bad.iter().take(3).collect::<Vec<_>>()
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads records from the unix socket at `path` into `log` until `done` is set: connects
/// (again after every end of file), and checks each record as it arrives.
pub fn read_records(path: PathBuf, log: Arc<Mutex<RecordLog>>, done: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 1 << 16];
    while !done.load(Ordering::SeqCst) {
        let Ok(mut s) = UnixStream::connect(&path) else {
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
        let conn = {
            let mut l = lock(&log);
            l.conns.push(Connection {
                opened: Instant::now(),
                first_record: None,
                records: 0,
                first: None,
                last: None,
            });
            l.writer = s.try_clone().ok();
            l.conns.len() - 1
        };
        let mut line: Vec<u8> = Vec::with_capacity(RECORD);
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let mut l = lock(&log);
                    for &b in &buf[..n] {
                        if b != b'\n' {
                            line.push(b);
                            continue;
                        }
                        match parse_record(&line) {
                            Some(seq) => l.record(conn, seq),
                            None => l
                                .bad
                                .push((conn, String::from_utf8_lossy(&line).into_owned())),
                        }
                        line.clear();
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if done.load(Ordering::SeqCst) {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let mut l = lock(&log);
        l.writer = None;
        if !line.is_empty() {
            let torn = format!(
                "{} bytes torn: {}",
                line.len(),
                String::from_utf8_lossy(&line)
            );
            l.bad.push((conn, torn));
        }
    }
}

/// Writes `data` on the current connection of `log` (the host → guest direction).
pub fn send_on_port(log: &Mutex<RecordLog>, data: &[u8]) -> Result<(), String> {
    let w = lock(log).writer.as_ref().map(UnixStream::try_clone);
    match w {
        Some(Ok(mut w)) => w.write_all(data).map_err(|e| e.to_string()),
        Some(Err(e)) => Err(e.to_string()),
        None => Err("no connection to the port".into()),
    }
}

/// The host side of a console: collects what arrives on the unix socket at `path`
/// (connecting again after every end of file) into `seen` until `done`, and answers once:
/// when `seen` holds a whole line containing `trigger`, writes `reply`.
pub fn read_console(
    path: PathBuf,
    seen: Arc<Mutex<String>>,
    done: Arc<AtomicBool>,
    trigger: &str,
    reply: &[u8],
) {
    let mut buf = vec![0u8; 4096];
    let mut replied = false;
    while !done.load(Ordering::SeqCst) {
        let Ok(mut s) = UnixStream::connect(&path) else {
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let mut text = lock(&seen);
                    text.push_str(&String::from_utf8_lossy(&buf[..n]));
                    let whole_line = text
                        .split_once(trigger)
                        .is_some_and(|(_, rest)| rest.contains('\n'));
                    if !replied && whole_line {
                        replied = s.write_all(reply).is_ok();
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if done.load(Ordering::SeqCst) {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with(conns: &[&[u64]]) -> RecordLog {
        let mut l = RecordLog::default();
        for (i, seqs) in conns.iter().enumerate() {
            l.conns.push(Connection {
                opened: Instant::now(),
                first_record: None,
                records: 0,
                first: None,
                last: None,
            });
            for &s in *seqs {
                l.record(i, s);
            }
        }
        l
    }

    #[test]
    fn records_round_trip() {
        for seq in [0, 7, 99_999_999] {
            let r = record(seq);
            assert_eq!(r.len(), RECORD);
            assert_eq!(parse_record(&r[..RECORD - 1]), Some(seq));
        }
        assert_eq!(parse_record(b"seq 0000000x"), None);
        let mut r = record(5);
        r[20] = b'y';
        assert_eq!(parse_record(&r[..RECORD - 1]), None);
    }

    #[test]
    fn only_a_connections_first_record_may_repeat_the_last_one() {
        let l = log_with(&[&[0, 1, 2], &[2, 3], &[], &[3, 4]]);
        assert_eq!(l.records, 5);
        assert_eq!(l.doubled, vec![(1, 2), (3, 3)]);
        assert!(l.out_of_order.is_empty());
        // Not the first record of its connection.
        let l = log_with(&[&[0, 1], &[2, 2]]);
        assert_eq!(l.out_of_order, vec![(1, 3, 2)]);
        // Not the last record received.
        let l = log_with(&[&[0, 1, 2], &[1, 2, 3]]);
        assert_eq!(l.out_of_order.len(), 2);
        // A gap.
        let l = log_with(&[&[0, 1], &[3]]);
        assert_eq!(l.out_of_order, vec![(1, 2, 3)]);
    }
}
