//! `bench load serial`: data through one port of a vhost-user virtio-console backend, both
//! directions at once, every byte checked.
//!
//! The load generator is the VMM and the guest's virtio-console driver in one process
//! (the `vhost-tests` frontend) and, on the host side, the client of the port's unix
//! socket (`serial-backend --port name=NAME,socket=PATH` or `--console socket=PATH`):
//!
//! - the MULTIPORT handshake as Linux does it: DEVICE_READY, PORT_READY for every
//!   DEVICE_ADD, the port found by its PORT_NAME (or port 0), then PORT_OPEN;
//! - guest → host: transmit buffers of `--chunk` bytes, up to 64 in flight; a host thread
//!   reads the socket;
//! - host → guest: a host thread writes the socket; 64 receive buffers of 4 KiB are kept
//!   posted on the port;
//! - each direction is one stream: a 16-byte preamble (magic and a per-run seed), then a
//!   pattern of the seed and the byte's position. The receiver skips whatever comes before
//!   the preamble (output an earlier session left in the backend: it keeps up to 1 MiB of a
//!   stopped ring, and a console's backlog) and counts it as stale; after it every byte
//!   must be the pattern's, in order, none missing;
//! - at the end both writers stop and everything written must arrive within 10 s.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Args;
use serial_backend::spec::{event, queue, Control, CONTROL_SIZE, DEFAULT_MAX_PORTS};
use vhost_tests::frontend::{Buf, FrontendOptions, HarnessError, TestFrontend};

use crate::load::blk::{parse_duration, parse_size};

/// VIRTIO_CONSOLE_F_MULTIPORT.
const MULTIPORT: u64 = serial_backend::spec::features::MULTIPORT;
/// Transmit buffers in flight at most.
const TX_BUFS: usize = 64;
/// Receive buffers kept posted on the port, and their size.
const RX_BUFS: usize = 64;
const RX_BUF: u32 = 4096;
/// Control receive buffers, and their size (a PORT_NAME message carries the name).
const CTRL_BUFS: usize = 32;
const CTRL_BUF: u32 = 512;
/// How long the handshake and the final drain may take.
const HANDSHAKE: Duration = Duration::from_secs(10);
const DRAIN: Duration = Duration::from_secs(10);
/// Start of a stream: this magic, then the stream's seed (little endian).
const MAGIC: [u8; 8] = *b"VSERLOAD";

/// Options of `bench load serial`.
#[derive(Args, Debug, Clone)]
pub struct SerialLoadArgs {
    /// The backend's vhost-user socket.
    #[arg(long)]
    pub socket: PathBuf,
    /// The port's host side: the unix socket the backend listens on for it.
    #[arg(long)]
    pub port_socket: PathBuf,
    /// The port's name (PORT_NAME, e.g. org.example.data); default: port 0, the first
    /// console.
    #[arg(long)]
    pub port_name: Option<String>,
    /// How long to move data, e.g. 10s, 500ms.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub runtime: Duration,
    /// Bytes per guest transmit buffer and per host write.
    #[arg(long, default_value = "16k", value_parser = parse_size)]
    pub chunk: u64,
    /// Ring size to negotiate.
    #[arg(long, default_value_t = 256)]
    pub queue_size: u16,
}

/// Errors of the serial load generator.
#[derive(Debug, thiserror::Error)]
pub enum SerialLoadError {
    /// Talking to the backend (vhost-user, guest memory) failed.
    #[error("{0}")]
    Harness(#[from] HarnessError),
    /// Bad option, or a backend that does not fit.
    #[error("{0}")]
    Usage(String),
    /// The port's host socket failed.
    #[error("port socket: {0}")]
    Host(io::Error),
    /// The backend closed the vhost-user connection (it exited or was killed).
    #[error("the backend closed the connection")]
    Disconnected,
    /// Something did not happen in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// Data arrived that is not what was sent.
    #[error("{dir}: {why}")]
    Verify {
        /// "guest -> host" or "host -> guest".
        dir: &'static str,
        /// The first difference.
        why: String,
    },
}

/// What a run moved.
#[derive(Clone, Debug)]
pub struct SerialReport {
    /// The port's id.
    pub port: u32,
    /// The measured time (until both writers stopped).
    pub elapsed: Duration,
    /// Bytes the guest sent that the host received and checked.
    pub to_host: u64,
    /// Bytes the host sent that the guest received and checked.
    pub to_guest: u64,
    /// Bytes of earlier sessions the host skipped before this run's stream.
    pub stale_to_host: u64,
    /// Bytes of earlier sessions the guest skipped before this run's stream.
    pub stale_to_guest: u64,
}

impl fmt::Display for SerialReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        write!(
            f,
            "serial port {} ({:.2} s): guest -> host {:.1} MB/s ({} bytes), host -> guest {:.1} MB/s ({} bytes), every byte checked; stale bytes of earlier sessions skipped: {} to the host, {} to the guest",
            self.port,
            secs,
            self.to_host as f64 / secs / 1e6,
            self.to_host,
            self.to_guest as f64 / secs / 1e6,
            self.to_guest,
            self.stale_to_host,
            self.stale_to_guest
        )
    }
}

/// splitmix64 of the seed and the word's index: the pattern's 8-byte word `i`.
fn pattern_word(seed: u64, i: u64) -> [u8; 8] {
    let mut z = seed.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)).to_le_bytes()
}

/// Fills `buf` with the pattern of `seed` from stream position `pos` on.
fn fill(seed: u64, pos: u64, buf: &mut [u8]) {
    let mut i = 0;
    while i < buf.len() {
        let p = pos + i as u64;
        let w = pattern_word(seed, p / 8);
        let start = (p % 8) as usize;
        let n = (8 - start).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&w[start..start + n]);
        i += n;
    }
}

fn preamble(seed: u64) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[..8].copy_from_slice(&MAGIC);
    p[8..].copy_from_slice(&seed.to_le_bytes());
    p
}

/// The receiving end of one stream: skips bytes until the preamble, then checks every
/// byte against the pattern.
struct StreamCheck {
    seed: u64,
    synced: bool,
    /// Unsynced: the last bytes seen (a preamble may span two reads).
    window: Vec<u8>,
    /// Bytes skipped before the preamble.
    stale: u64,
    /// Pattern bytes checked.
    pos: u64,
    scratch: Vec<u8>,
}

impl StreamCheck {
    fn new(seed: u64) -> Self {
        Self {
            seed,
            synced: false,
            window: Vec::new(),
            stale: 0,
            pos: 0,
            scratch: Vec::new(),
        }
    }

    fn feed(&mut self, data: &[u8]) -> Result<(), String> {
        if self.synced {
            return self.check(data);
        }
        self.window.extend_from_slice(data);
        let pre = preamble(self.seed);
        if let Some(i) = self.window.windows(pre.len()).position(|w| w == pre) {
            self.stale += i as u64;
            let rest = self.window.split_off(i + pre.len());
            self.window = Vec::new();
            self.synced = true;
            return self.check(&rest);
        }
        let drop = self.window.len().saturating_sub(pre.len() - 1);
        self.stale += drop as u64;
        self.window.drain(..drop);
        Ok(())
    }

    fn check(&mut self, data: &[u8]) -> Result<(), String> {
        self.scratch.resize(data.len(), 0);
        fill(self.seed, self.pos, &mut self.scratch);
        if let Some(i) = data.iter().zip(&self.scratch).position(|(a, b)| a != b) {
            return Err(format!(
                "byte {} of the stream is {:#04x}, expected {:#04x}",
                self.pos + i as u64,
                data[i],
                self.scratch[i]
            ));
        }
        self.pos += data.len() as u64;
        Ok(())
    }
}

/// The guest driver's state.
struct Guest {
    fe: TestFrontend,
    port: u32,
    ctrl_tx: u64,
    /// Control receive buffers by head.
    ctrl_rx: Vec<(u16, u64)>,
    /// Port receive buffers by head.
    rx: Vec<(u16, u64)>,
    /// Transmit buffers not in flight, and those in flight by head.
    tx_free: Vec<u64>,
    tx_busy: Vec<(u16, u64)>,
    /// Control messages received: (message, payload).
    ctrl: Vec<(Control, Vec<u8>)>,
    /// Set once the port's PORT_NAME / DEVICE_ADD arrived.
    names: Vec<(u32, String)>,
    added: Vec<u32>,
}

impl Guest {
    fn post(fe: &mut TestFrontend, q: u16, gpa: u64, len: u32) -> u16 {
        let dq = &mut fe.queues[usize::from(q)];
        let head = dq.add_chain(&fe.mem, &[Buf::wo(gpa, len)]);
        dq.publish(&fe.mem, head);
        head
    }

    fn send_ctrl(&mut self, id: u32, ev: u16, value: u16) -> Result<(), SerialLoadError> {
        let m = Control {
            id,
            event: ev,
            value,
        }
        .to_bytes();
        self.fe.write(self.ctrl_tx, &m);
        self.fe
            .submit(queue::CONTROL_TX, &[Buf::ro(self.ctrl_tx, m.len() as u32)]);
        self.fe.wait(queue::CONTROL_TX, 1)?;
        Ok(())
    }

    /// Takes control messages; re-posts their buffers.
    fn poll_ctrl(&mut self) {
        let q = queue::CONTROL_RX;
        let used = self.fe.queues[usize::from(q)].take_used(&self.fe.mem);
        let mut repost = Vec::new();
        for u in used {
            let Some(i) = self.ctrl_rx.iter().position(|&(h, _)| u32::from(h) == u.id) else {
                continue;
            };
            let (_, gpa) = self.ctrl_rx.swap_remove(i);
            let m = self.fe.read(gpa, (u.len.min(CTRL_BUF)) as usize);
            if let Some(c) = Control::parse(&m) {
                match c.event {
                    event::DEVICE_ADD => self.added.push(c.id),
                    event::PORT_NAME => {
                        let name = String::from_utf8_lossy(&m[CONTROL_SIZE..]);
                        self.names
                            .push((c.id, name.trim_end_matches('\0').to_string()));
                    }
                    _ => {}
                }
                self.ctrl.push((c, m[CONTROL_SIZE..].to_vec()));
            }
            repost.push(gpa);
        }
        if !repost.is_empty() {
            for gpa in repost {
                let head = Self::post(&mut self.fe, q, gpa, CTRL_BUF);
                self.ctrl_rx.push((head, gpa));
            }
            self.fe.queues[usize::from(q)].notify();
        }
    }

    /// Feeds what arrived on the port to `check`; re-posts the buffers.
    fn poll_rx(&mut self, check: &mut StreamCheck) -> Result<(), SerialLoadError> {
        let q = queue::rx(self.port);
        let used = self.fe.queues[usize::from(q)].take_used(&self.fe.mem);
        if used.is_empty() {
            return Ok(());
        }
        // Take every buffer before re-posting any: a re-post may reuse a head just freed.
        let mut bufs = Vec::with_capacity(used.len());
        for u in &used {
            if let Some(i) = self.rx.iter().position(|&(h, _)| u32::from(h) == u.id) {
                bufs.push((self.rx.swap_remove(i).1, u.len.min(RX_BUF)));
            }
        }
        for (gpa, len) in bufs {
            check
                .feed(&self.fe.read(gpa, len as usize))
                .map_err(|why| SerialLoadError::Verify {
                    dir: "host -> guest",
                    why,
                })?;
            let head = Self::post(&mut self.fe, q, gpa, RX_BUF);
            self.rx.push((head, gpa));
        }
        self.fe.queues[usize::from(q)].notify();
        Ok(())
    }

    /// Frees the transmit buffers the backend is done with.
    fn poll_tx(&mut self) {
        let q = queue::tx(self.port);
        for u in self.fe.queues[usize::from(q)].take_used(&self.fe.mem) {
            if let Some(i) = self.tx_busy.iter().position(|&(h, _)| u32::from(h) == u.id) {
                let (_, gpa) = self.tx_busy.swap_remove(i);
                self.tx_free.push(gpa);
            }
        }
    }

    /// Sends `data` from a free transmit buffer (no kick); false if none is free.
    fn send(&mut self, data: &[u8]) -> bool {
        let Some(gpa) = self.tx_free.pop() else {
            return false;
        };
        self.fe.write(gpa, data);
        let q = usize::from(queue::tx(self.port));
        let dq = &mut self.fe.queues[q];
        let head = dq.add_chain(&self.fe.mem, &[Buf::ro(gpa, data.len() as u32)]);
        dq.publish(&self.fe.mem, head);
        self.tx_busy.push((head, gpa));
        true
    }

    /// Sleeps until the backend signals one of the port's queues or the control queue, or
    /// `ms` passed; fails if the backend hung up.
    fn sleep(&mut self, ms: i32) -> Result<(), SerialLoadError> {
        let qs = [
            queue::CONTROL_RX,
            queue::rx(self.port),
            queue::tx(self.port),
        ];
        let mut pfds: Vec<libc::pollfd> = qs
            .iter()
            .map(|&q| libc::pollfd {
                fd: self.fe.queues[usize::from(q)].call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // The backend never writes to the vhost-user socket unasked: any event on it
        // means it went away.
        pfds.push(libc::pollfd {
            fd: self.fe.fe.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        });
        // SAFETY: pfds is a valid array of pollfd.
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if pfds[qs.len()].revents != 0 {
            return Err(SerialLoadError::Disconnected);
        }
        for &q in &qs {
            let _ = self.fe.queues[usize::from(q)].call.read();
        }
        Ok(())
    }
}

/// A per-run seed: the time and our pid.
fn run_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 40)
}

/// Connects, negotiates MULTIPORT and opens the port; returns the driver.
fn open_port(a: &SerialLoadArgs) -> Result<Guest, SerialLoadError> {
    let tx_bytes = TX_BUFS as u64 * a.chunk.next_multiple_of(4096);
    let bufs = tx_bytes + (RX_BUFS as u64 + CTRL_BUFS as u64 + 1) * 4096;
    // Rings sit at 0x1000 + q * 128 KiB (up to 64 queues); the harness allocates the
    // buffers above them.
    let mem_size = (10 << 20) + bufs.next_multiple_of(1 << 20);
    let max_queues = queue::count(DEFAULT_MAX_PORTS);
    let opts = FrontendOptions {
        mem_size,
        num_queues: max_queues,
        queue_size: a.queue_size,
        ..Default::default()
    };
    let mut fe = TestFrontend::handshake(&a.socket, &opts)?;
    if fe.features & MULTIPORT == 0 {
        return Err(SerialLoadError::Usage(
            "the backend does not offer VIRTIO_CONSOLE_F_MULTIPORT".into(),
        ));
    }
    let cfg = fe.config(0, 8)?;
    let max_ports = cfg
        .get(4..8)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| SerialLoadError::Usage("short config space".into()))?;
    let nq = queue::count(max_ports.min(DEFAULT_MAX_PORTS));
    for q in 0..nq {
        fe.add_queue(q)?;
        fe.start_queue(q)?;
    }
    let ctrl_tx = fe.alloc(u64::from(CTRL_BUF));
    let mut ctrl_rx = Vec::with_capacity(CTRL_BUFS);
    for _ in 0..CTRL_BUFS {
        let gpa = fe.alloc(u64::from(CTRL_BUF));
        ctrl_rx.push((Guest::post(&mut fe, queue::CONTROL_RX, gpa, CTRL_BUF), gpa));
    }
    fe.queues[usize::from(queue::CONTROL_RX)].notify();
    let tx_free = (0..TX_BUFS).map(|_| fe.alloc(a.chunk)).collect();
    let mut g = Guest {
        fe,
        port: 0,
        ctrl_tx,
        ctrl_rx,
        rx: Vec::new(),
        tx_free,
        tx_busy: Vec::new(),
        ctrl: Vec::new(),
        names: Vec::new(),
        added: Vec::new(),
    };
    g.send_ctrl(0, event::DEVICE_READY, 1)?;
    // Every DEVICE_ADD comes at once; wait for a quiet moment after the first.
    let deadline = Instant::now() + HANDSHAKE;
    let mut quiet_since = Instant::now();
    let mut seen = 0;
    loop {
        g.poll_ctrl();
        if g.ctrl.len() != seen {
            seen = g.ctrl.len();
            quiet_since = Instant::now();
        }
        if !g.added.is_empty() && quiet_since.elapsed() > Duration::from_millis(200) {
            break;
        }
        if Instant::now() > deadline {
            return Err(SerialLoadError::Timeout("DEVICE_ADD".into()));
        }
        g.sleep(10)?;
    }
    for id in g.added.clone() {
        g.send_ctrl(id, event::PORT_READY, 1)?;
    }
    g.port = match &a.port_name {
        None => 0,
        Some(name) => loop {
            g.poll_ctrl();
            if let Some(&(id, _)) = g.names.iter().find(|(_, n)| n == name) {
                break id;
            }
            if Instant::now() > deadline {
                return Err(SerialLoadError::Usage(format!(
                    "no port named {name:?} (the backend named {:?})",
                    g.names
                )));
            }
            g.sleep(10)?;
        },
    };
    if !g.added.contains(&g.port) {
        return Err(SerialLoadError::Usage(format!(
            "the backend did not add port {}",
            g.port
        )));
    }
    let rxq = queue::rx(g.port);
    for _ in 0..RX_BUFS {
        let gpa = g.fe.alloc(u64::from(RX_BUF));
        let head = Guest::post(&mut g.fe, rxq, gpa, RX_BUF);
        g.rx.push((head, gpa));
    }
    g.fe.queues[usize::from(rxq)].notify();
    g.send_ctrl(g.port, event::PORT_OPEN, 1)?;
    Ok(g)
}

/// The host's writer: the preamble, then the pattern in `chunk`-byte writes until `stop`.
/// Returns the pattern bytes written.
fn host_writer(
    mut s: UnixStream,
    seed: u64,
    chunk: usize,
    stop: Arc<AtomicBool>,
) -> JoinHandle<io::Result<u64>> {
    std::thread::spawn(move || {
        s.write_all(&preamble(seed))?;
        let mut buf = vec![0u8; chunk];
        let mut pos = 0u64;
        while !stop.load(Ordering::Relaxed) {
            fill(seed, pos, &mut buf);
            s.write_all(&buf)?;
            pos += buf.len() as u64;
        }
        Ok(pos)
    })
}

/// The host's reader: checks the guest's stream until `target` pattern bytes arrived (set
/// once the guest has stopped) or `abort`. Returns the check's state.
fn host_reader(
    mut s: UnixStream,
    seed: u64,
    target: Arc<AtomicU64>,
    abort: Arc<AtomicBool>,
) -> JoinHandle<Result<StreamCheck, SerialLoadError>> {
    std::thread::spawn(move || {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(SerialLoadError::Host)?;
        let mut check = StreamCheck::new(seed);
        let mut buf = vec![0u8; 64 << 10];
        while check.pos < target.load(Ordering::Relaxed) && !abort.load(Ordering::Relaxed) {
            match s.read(&mut buf) {
                Ok(0) => {
                    return Err(SerialLoadError::Host(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the backend closed the port socket",
                    )))
                }
                Ok(n) => check
                    .feed(&buf[..n])
                    .map_err(|why| SerialLoadError::Verify {
                        dir: "guest -> host",
                        why,
                    })?,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(SerialLoadError::Host(e)),
            }
        }
        Ok(check)
    })
}

/// Runs the load and reports.
pub fn run(a: &SerialLoadArgs) -> Result<SerialReport, SerialLoadError> {
    if a.chunk == 0 || a.chunk > 1 << 20 {
        return Err(SerialLoadError::Usage(
            "--chunk must be between 1 byte and 1 MiB".into(),
        ));
    }
    let min_queue = TX_BUFS.max(RX_BUFS).max(CTRL_BUFS);
    if usize::from(a.queue_size) < min_queue {
        return Err(SerialLoadError::Usage(format!(
            "--queue-size must be at least {min_queue}"
        )));
    }
    let chunk = a.chunk as usize;
    let mut g = open_port(a)?;
    let host = UnixStream::connect(&a.port_socket).map_err(SerialLoadError::Host)?;
    let seed = run_seed();
    let (to_guest_seed, to_host_seed) = (seed, !seed);
    let stop = Arc::new(AtomicBool::new(false));
    let abort = Arc::new(AtomicBool::new(false));
    let target = Arc::new(AtomicU64::new(u64::MAX));
    let writer = host_writer(
        host.try_clone().map_err(SerialLoadError::Host)?,
        to_guest_seed,
        chunk,
        stop.clone(),
    );
    let reader = host_reader(
        host.try_clone().map_err(SerialLoadError::Host)?,
        to_host_seed,
        target.clone(),
        abort.clone(),
    );
    let res = guest_loop(
        a,
        &mut g,
        chunk,
        to_guest_seed,
        to_host_seed,
        &stop,
        &writer,
    );
    let (elapsed, sent, mut to_guest) = match res {
        Ok(v) => v,
        Err(e) => {
            stop.store(true, Ordering::Relaxed);
            abort.store(true, Ordering::Relaxed);
            // A writer that failed first says why (e.g. the backend closed the socket).
            if writer.is_finished() {
                if let Ok(Err(we)) = writer.join() {
                    return Err(SerialLoadError::Host(we));
                }
            }
            let _ = host.shutdown(std::net::Shutdown::Both);
            return Err(e);
        }
    };
    target.store(sent, Ordering::Relaxed);
    let written = writer
        .join()
        .map_err(|_| SerialLoadError::Usage("host writer panicked".into()))?
        .map_err(SerialLoadError::Host)?;
    // Everything the host wrote must reach the guest.
    let deadline = Instant::now() + DRAIN;
    while to_guest.pos < written {
        if Instant::now() > deadline {
            abort.store(true, Ordering::Relaxed);
            return Err(SerialLoadError::Timeout(format!(
                "host -> guest: {} of {written} bytes arrived",
                to_guest.pos
            )));
        }
        g.poll_ctrl();
        g.poll_rx(&mut to_guest)?;
        g.sleep(10)?;
    }
    // And everything the guest sent must reach the host.
    let watchdog = {
        let abort = abort.clone();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(DRAIN) {
                abort.store(true, Ordering::Relaxed);
            }
        });
        tx
    };
    let to_host = reader
        .join()
        .map_err(|_| SerialLoadError::Usage("host reader panicked".into()))??;
    drop(watchdog);
    if to_host.pos < sent {
        return Err(SerialLoadError::Timeout(format!(
            "guest -> host: {} of {sent} bytes arrived",
            to_host.pos
        )));
    }
    g.send_ctrl(g.port, event::PORT_OPEN, 0)?;
    Ok(SerialReport {
        port: g.port,
        elapsed,
        to_host: to_host.pos,
        to_guest: to_guest.pos,
        stale_to_host: to_host.stale,
        stale_to_guest: to_guest.stale,
    })
}

/// The guest's side for `--runtime`: keeps the transmit buffers full and takes what
/// arrives; then stops the host writer and sends no more, and waits until its transmit
/// buffers are all back (written to the host socket). Returns the time, the pattern bytes
/// sent and the receive check.
fn guest_loop(
    a: &SerialLoadArgs,
    g: &mut Guest,
    chunk: usize,
    to_guest_seed: u64,
    to_host_seed: u64,
    stop: &AtomicBool,
    writer: &JoinHandle<io::Result<u64>>,
) -> Result<(Duration, u64, StreamCheck), SerialLoadError> {
    let mut to_guest = StreamCheck::new(to_guest_seed);
    let mut buf = vec![0u8; chunk];
    let txq = usize::from(queue::tx(g.port));
    if !g.send(&preamble(to_host_seed)) {
        return Err(SerialLoadError::Usage("no transmit buffer".into()));
    }
    g.fe.queues[txq].notify();
    let mut sent = 0u64;
    let start = Instant::now();
    while start.elapsed() < a.runtime {
        g.poll_ctrl();
        g.poll_tx();
        let mut kick = false;
        while !g.tx_free.is_empty() {
            fill(to_host_seed, sent, &mut buf);
            g.send(&buf);
            sent += chunk as u64;
            kick = true;
        }
        if kick {
            g.fe.queues[txq].notify();
        }
        g.poll_rx(&mut to_guest)?;
        if writer.is_finished() {
            // It ended before being told: its error is reported by the caller.
            stop.store(true, Ordering::Relaxed);
            return Err(SerialLoadError::Host(io::Error::other(
                "the host writer stopped early",
            )));
        }
        g.sleep(5)?;
    }
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    // Keep receiving (the writer may be blocked on a full socket) until the writer is done
    // and every transmit buffer is back.
    let deadline = Instant::now() + DRAIN;
    while !writer.is_finished() || !g.tx_busy.is_empty() {
        if Instant::now() > deadline {
            return Err(SerialLoadError::Timeout(format!(
                "the end of the run ({} transmit buffers not returned, host writer {})",
                g.tx_busy.len(),
                if writer.is_finished() {
                    "done"
                } else {
                    "blocked"
                }
            )));
        }
        g.poll_ctrl();
        g.poll_tx();
        g.poll_rx(&mut to_guest)?;
        g.sleep(5)?;
    }
    Ok((elapsed, sent, to_guest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_the_same_in_any_pieces() {
        let mut whole = vec![0u8; 1000];
        fill(7, 3, &mut whole);
        let mut pieces = vec![0u8; 1000];
        let mut at = 0;
        for n in [1, 7, 8, 13, 971] {
            fill(7, 3 + at as u64, &mut pieces[at..at + n]);
            at += n;
        }
        assert_eq!(whole, pieces);
        let mut other = vec![0u8; 1000];
        fill(8, 3, &mut other);
        assert_ne!(whole, other);
    }

    #[test]
    fn check_skips_stale_bytes_and_finds_a_split_preamble() {
        let seed = 42;
        let mut stream = b"old output of an earlier session".to_vec();
        // An earlier run's preamble (another seed) is stale too.
        stream.extend_from_slice(&preamble(41));
        stream.extend_from_slice(&preamble(seed));
        let mut data = vec![0u8; 5000];
        fill(seed, 0, &mut data);
        stream.extend_from_slice(&data);
        let mut c = StreamCheck::new(seed);
        for piece in stream.chunks(5) {
            c.feed(piece).expect("clean stream");
        }
        assert_eq!(c.stale, 32 + 16);
        assert_eq!(c.pos, 5000);
    }

    #[test]
    fn check_catches_a_lost_or_changed_byte() {
        let seed = 9;
        let mut data = vec![0u8; 300];
        fill(seed, 0, &mut data);
        let mut lost = preamble(seed).to_vec();
        lost.extend_from_slice(&data[..100]);
        lost.extend_from_slice(&data[101..]);
        let e = StreamCheck::new(seed).feed(&lost).unwrap_err();
        assert!(e.contains("byte 100 "), "{e}");
        let mut changed = preamble(seed).to_vec();
        changed.extend_from_slice(&data);
        changed[16 + 200] ^= 1;
        let mut c = StreamCheck::new(seed);
        assert!(c.feed(&changed[..100]).is_ok());
        let e = c.feed(&changed[100..]).unwrap_err();
        assert!(e.contains("byte 200 "), "{e}");
    }

    /// The load generator against our backend in-process, three sessions on one named
    /// socket port: a clean run; a guest that writes while no host client is connected
    /// and then disconnects (the backend keeps what it took of that output for the next
    /// client); a run that must skip that output and then see its own stream intact.
    #[test]
    fn load_generator_moves_data_through_our_backend() {
        use serial_backend::ports::HostKind;
        use serial_backend::{PortSpec, SerialDevice};
        use vhost_tests::in_process::InProcessServer;

        let dir = tempfile::tempdir().expect("tempdir");
        let port_socket = dir.path().join("data.sock");
        let specs = vec![
            PortSpec {
                name: None,
                console: true,
                kind: HostKind::Socket(dir.path().join("con.sock")),
            },
            PortSpec {
                name: Some("org.bench.data".into()),
                console: false,
                kind: HostKind::Socket(port_socket.clone()),
            },
        ];
        let device = SerialDevice::new(&specs, 4).expect("device");
        let socket = dir.path().join("vhost.sock");
        let server = InProcessServer::start(device, &socket);
        let args = SerialLoadArgs {
            socket,
            port_socket,
            port_name: Some("org.bench.data".into()),
            runtime: Duration::from_millis(500),
            chunk: 16 << 10,
            queue_size: 256,
        };

        let r = run(&args).expect("first run");
        eprintln!("{r}");
        assert_eq!(r.port, 1);
        assert!(r.to_host > 0 && r.to_guest > 0, "{r}");
        assert_eq!((r.stale_to_host, r.stale_to_guest), (0, 0), "{r}");

        // A session that ends abruptly with output no host client took.
        let left = {
            let mut g = open_port(&args).expect("open the port");
            let mut data = vec![0u8; 10_000];
            fill(5, 0, &mut data);
            let mut n = 0;
            for c in data.chunks(4000) {
                assert!(g.send(c));
                n += c.len() as u64;
            }
            g.fe.queues[usize::from(queue::tx(g.port))].notify();
            std::thread::sleep(Duration::from_millis(200));
            n
        };

        let r = run(&args).expect("run after an abrupt session");
        eprintln!("{r}");
        assert!(r.to_host > 0 && r.to_guest > 0, "{r}");
        // What the backend had taken from the ring and not yet written (at least the
        // first buffer; the rest may still have been on the ring, gone with the guest).
        assert!(r.stale_to_host > 0 && r.stale_to_host <= left, "{r}");
        drop(server);
    }
}
