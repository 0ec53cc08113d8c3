//! The test as a guest's network peer (from inside a namespace, see
//! [`crate::guest_net::NetNs::spawn_in`]): a TCP stream of numbered lines both ways and a
//! ping, each reply or line stamped with when it arrived, so a test can tell that traffic
//! went on across an event (a live migration's switch-over).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::guest_net::NetNs;

/// Now, in unix seconds (the stamps of [`StreamLog`] and [`Pinger`]).
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// What the test, as the guest's network peer, saw of the TCP stream.
#[derive(Debug, Default)]
pub struct StreamLog {
    /// Every `seq N` line from the guest, with when it arrived (unix seconds).
    pub lines: Vec<(f64, u64)>,
    /// Bytes the peer sent.
    pub sent: u64,
    /// Hex sha256 of what the peer sent.
    pub sent_sha: String,
}

/// How far the stream got, while it runs (shared with the peer's thread).
#[derive(Debug, Default)]
pub struct StreamProgress {
    /// Lines from the guest so far.
    pub lines: AtomicU64,
    /// When the latest arrived (unix milliseconds; 0: none yet).
    last_at_ms: AtomicU64,
}

impl StreamProgress {
    /// When the latest line arrived (unix seconds; 0 before the first).
    pub fn last_at(&self) -> f64 {
        self.last_at_ms.load(Ordering::Acquire) as f64 / 1000.0
    }

    fn line(&self, at: f64) {
        self.lines.fetch_add(1, Ordering::AcqRel);
        self.last_at_ms
            .store((at * 1000.0) as u64, Ordering::Release);
    }
}

/// The peer's side of the stream the guest serves on `addr` (`seq N` lines; run it in
/// the namespace): connects (the guest may still be booting: retries for 3 minutes), reads
/// the numbered lines (in order, none missing, or an error) into `progress` too, and
/// sends a `peer N` line every 100 ms, until `stop`; then closes its side and reads to the
/// end.
pub fn peer_stream(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    progress: Arc<StreamProgress>,
) -> Result<StreamLog, String> {
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut s = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline && !stop.load(Ordering::Acquire) => {
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(format!("cannot connect to the guest at {addr}: {e}")),
        }
    };
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    let mut log = StreamLog::default();
    let mut sha = Sha256::new();
    let mut partial = Vec::new();
    let mut buf = [0u8; 4096];
    let mut next_send = Instant::now();
    let mut n_sent = 0u64;
    let mut closing: Option<Instant> = None;
    loop {
        if closing.is_none() && stop.load(Ordering::Acquire) {
            s.shutdown(std::net::Shutdown::Write)
                .map_err(|e| e.to_string())?;
            closing = Some(Instant::now());
        }
        if closing.is_none() && Instant::now() >= next_send {
            let line = format!("peer {n_sent}\n");
            s.write_all(line.as_bytes())
                .map_err(|e| format!("sending to the guest: {e}"))?;
            sha.update(line.as_bytes());
            log.sent += line.len() as u64;
            n_sent += 1;
            next_send += Duration::from_millis(100);
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                partial.extend_from_slice(&buf[..n]);
                while let Some(i) = partial.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = partial.drain(..=i).collect();
                    let text = String::from_utf8_lossy(&line);
                    let n: u64 = text
                        .trim()
                        .strip_prefix("seq ")
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| format!("unexpected line from the guest: {text:?}"))?;
                    let want = log.lines.len() as u64;
                    if n != want {
                        return Err(format!("line {n} from the guest, expected {want}"));
                    }
                    let now = unix_now();
                    log.lines.push((now, n));
                    progress.line(now);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("the stream broke: {e}")),
        }
        if closing.is_some_and(|c| c.elapsed() > Duration::from_secs(60)) {
            return Err("the guest did not close the stream after ours".into());
        }
    }
    log.sent_sha = sha.finalize().iter().map(|x| format!("{x:02x}")).collect();
    Ok(log)
}

/// `busybox ping -i 0.2` from the namespace (busybox: the harness needs it anyway, and
/// it flushes every line), each reply stamped with its arrival (unix seconds).
pub struct Pinger {
    child: Child,
    lines: Arc<Mutex<Vec<(f64, String)>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Pinger {
    /// Starts pinging `ip` from `ns`.
    pub fn start(ns: &NetNs, ip: &str) -> Result<Pinger, String> {
        let mut child = ns
            .command("busybox")
            .args(["ping", "-i", "0.2", ip])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start busybox ping: {e}"))?;
        let out = child.stdout.take().ok_or("ping has no stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        let reader = std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                l2.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((unix_now(), l));
            }
        });
        Ok(Pinger {
            child,
            lines,
            reader: Some(reader),
        })
    }

    /// When the replies so far arrived.
    pub fn replies(&self) -> Vec<f64> {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, l)| l.contains("bytes from"))
            .map(|&(t, _)| t)
            .collect()
    }

    /// SIGINT (ping prints its summary and exits); the replies' arrival times and the
    /// whole output.
    pub fn stop(mut self) -> (Vec<f64>, String) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let text = self
            .lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        (self.replies(), text)
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl StreamLog {
    /// The longest time between two lines from the guest, in seconds.
    pub fn longest_gap(&self) -> f64 {
        self.lines
            .windows(2)
            .map(|w| w[1].0 - w[0].0)
            .fold(0.0, f64::max)
    }
}
