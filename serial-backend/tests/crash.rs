//! serial-backend SIGKILLed and restarted under a stream of records, with the frontend
//! harness playing QEMU and the guest's virtio-console driver (no VM: QEMU 11.1's
//! `vhost-user-test-device-pci` aborts when it reconnects to a restarted backend, see
//! `tests/tests/guest_crash.rs`).
//!
//! The driver behaves like Linux's: DEVICE_READY, PORT_READY for each DEVICE_ADD (also for
//! a port it already has), PORT_OPEN 1 for a console port, writes to a named port only
//! while the host side is open, and keeps going while the backend is dead (the rings fill
//! up). The frontend reconnects as QEMU does (`TestFrontend::reconnect`: the same memory,
//! each ring restarted at its used index).
//!
//! `serial_backend_sigkill_records_once`: the driver writes 64-byte records (one chain
//! each, numbered) to a named port while the backend is SIGKILLed and restarted at random
//! moments, `VHOST_CRASH_SERIAL_KILLS` times (default 10; `VHOST_CRASH_SEED` repeats a run).
//! The host reads the port's socket, connecting again after each restart. Checked: records
//! arrive again within 5 s of each restart; every record arrives, in order, and the only
//! repeat is the one a restart cannot avoid (`vhost_tests::records`: a connection's first
//! record equal to the last one the previous connection received, at most one per kill);
//! after the restarts host input reaches the guest on the named port and on the console
//! (a restarted backend must learn the port state a driver gave its predecessor), the
//! guest's console output reaches the host, and the guest hears that the host client left.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serial_backend::spec::{event, queue, Control};
use vhost_tests::frontend::{Buf, FrontendOptions, TestFrontend};
use vhost_tests::guest::socket_listening;
use vhost_tests::kill_plan::{env_u32, Rng};
use vhost_tests::records::{read_console, read_records, record, send_on_port, RecordLog};

const PORT: u32 = 1;
const PORT_NAME: &str = "org.test.crash";
const RX_BUF: u32 = 4096;
const RING: u16 = 256;

/// A serial-backend process; SIGKILLed when dropped.
struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn start(dir: &Path, n: u32) -> Proc {
        let log = dir.join(format!("backend-{n}.log"));
        let out = File::create(&log).expect("backend log");
        let err = out.try_clone().expect("backend log");
        let sock = dir.join("vhost.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_serial-backend"))
            .arg("--socket-path")
            .arg(&sock)
            .args(["--max-ports", "2"])
            .arg("--console")
            .arg(format!("socket={}", dir.join("con0.sock").display()))
            .arg("--port")
            .arg(format!(
                "name={PORT_NAME},socket={}",
                dir.join("port.sock").display()
            ))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start serial-backend");
        let mut p = Proc {
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket_listening(&sock) {
            assert!(
                Instant::now() < deadline && p.running(),
                "backend-{n} not listening:\n{}",
                std::fs::read_to_string(&p.log).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(5));
        }
        p
    }

    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; the exit status (within 10 s).
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let pid = libc::pid_t::try_from(c.id()).ok()?;
        // SAFETY: kill(2) on our own, not yet reaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port as the driver knows it.
#[derive(Default)]
struct DrvPort {
    name: Option<String>,
    console: bool,
    /// The device said the host side is open (PORT_OPEN from the device).
    host_connected: bool,
    /// What the device delivered on the port's receive queue.
    rx: Vec<u8>,
}

/// A tiny Linux-like virtio-console driver with MULTIPORT.
struct Drv {
    fe: TestFrontend,
    /// Posted receive buffers: (queue, head) -> gpa.
    rx_bufs: HashMap<(u16, u16), u64>,
    /// Transmit buffers in flight: (queue, head) -> gpa, and the free ones per queue.
    tx_bufs: HashMap<(u16, u16), u64>,
    tx_pool: HashMap<u16, Vec<u64>>,
    ports: HashMap<u32, DrvPort>,
    /// Every control message the device sent.
    ctrl: Vec<Control>,
    /// The next record to write; records stop once `stopped`.
    next_seq: u64,
    stopped: bool,
}

impl Drv {
    fn connect(sock: &Path) -> Drv {
        let opts = FrontendOptions {
            mem_size: 64 << 20,
            num_queues: queue::count(2),
            queue_size: RING,
            ..Default::default()
        };
        let fe = TestFrontend::connect(sock, opts).expect("connect");
        let mut d = Drv {
            fe,
            rx_bufs: HashMap::new(),
            tx_bufs: HashMap::new(),
            tx_pool: HashMap::new(),
            ports: HashMap::new(),
            ctrl: Vec::new(),
            next_seq: 0,
            stopped: false,
        };
        d.post_rx(queue::CONTROL_RX, 64);
        d.send_ctrl(0, event::DEVICE_READY, 1);
        d
    }

    fn post_rx(&mut self, q: u16, n: usize) {
        for _ in 0..n {
            let gpa = self.fe.alloc(u64::from(RX_BUF));
            self.repost(q, gpa);
        }
        self.fe.queues[usize::from(q)].notify();
    }

    fn repost(&mut self, q: u16, gpa: u64) {
        let dq = &mut self.fe.queues[usize::from(q)];
        let head = dq.add_chain(&self.fe.mem, &[Buf::wo(gpa, RX_BUF)]);
        dq.publish(&self.fe.mem, head);
        self.rx_bufs.insert((q, head), gpa);
    }

    /// Queues `data` (at most a page) on transmit queue `q`; false if the ring is full.
    fn tx(&mut self, q: u16, data: &[u8]) -> bool {
        if self.fe.queues[usize::from(q)].free_descs() == 0 {
            return false;
        }
        let gpa = match self.tx_pool.get_mut(&q).and_then(Vec::pop) {
            Some(g) => g,
            None => self.fe.alloc(4096),
        };
        self.fe.write(gpa, data);
        let dq = &mut self.fe.queues[usize::from(q)];
        let head = dq.add_chain(&self.fe.mem, &[Buf::ro(gpa, data.len() as u32)]);
        dq.publish(&self.fe.mem, head);
        self.tx_bufs.insert((q, head), gpa);
        true
    }

    fn send_ctrl(&mut self, id: u32, ev: u16, value: u16) {
        let c = Control {
            id,
            event: ev,
            value,
        };
        assert!(
            self.tx(queue::CONTROL_TX, &c.to_bytes()),
            "control ring full"
        );
        self.fe.queues[usize::from(queue::CONTROL_TX)].notify();
    }

    /// Takes the used buffers of receive queue `q`, reposts them; their contents.
    fn take_rx(&mut self, q: u16) -> Vec<Vec<u8>> {
        let used = self.fe.queues[usize::from(q)].take_used(&self.fe.mem);
        let mut bufs = Vec::new();
        for u in &used {
            let gpa = self
                .rx_bufs
                .remove(&(q, u.id as u16))
                .expect("a known receive buffer");
            bufs.push((gpa, u.len));
        }
        let mut out = Vec::new();
        for (gpa, len) in bufs {
            out.push(self.fe.read(gpa, len as usize));
            self.repost(q, gpa);
        }
        if !out.is_empty() {
            self.fe.queues[usize::from(q)].notify();
        }
        out
    }

    fn reclaim_tx(&mut self, q: u16) {
        for u in self.fe.queues[usize::from(q)].take_used(&self.fe.mem) {
            if let Some(gpa) = self.tx_bufs.remove(&(q, u.id as u16)) {
                self.tx_pool.entry(q).or_default().push(gpa);
            }
        }
    }

    fn control(&mut self, c: Control, extra: &[u8]) {
        self.ctrl.push(c);
        match c.event {
            event::DEVICE_ADD => {
                if let Entry::Vacant(e) = self.ports.entry(c.id) {
                    e.insert(DrvPort::default());
                    self.post_rx(queue::rx(c.id), 32);
                }
                // Linux answers PORT_READY also for a port it already has.
                self.send_ctrl(c.id, event::PORT_READY, 1);
            }
            event::CONSOLE_PORT if c.value == 1 => {
                let p = self.ports.entry(c.id).or_default();
                if !p.console {
                    p.console = true;
                    // init_port_console: the console is open from now on.
                    self.send_ctrl(c.id, event::PORT_OPEN, 1);
                }
            }
            event::PORT_NAME => {
                let p = self.ports.entry(c.id).or_default();
                if p.name.is_none() {
                    p.name = Some(String::from_utf8_lossy(extra).into_owned());
                    if c.id == PORT {
                        // A guest program opens the port.
                        self.send_ctrl(c.id, event::PORT_OPEN, 1);
                    }
                }
            }
            event::PORT_OPEN => self.ports.entry(c.id).or_default().host_connected = c.value != 0,
            _ => {}
        }
    }

    /// One round: control messages, received data, completed transmits, new records.
    fn step(&mut self) {
        for m in self.take_rx(queue::CONTROL_RX) {
            let c = Control::parse(&m).expect("control message of 8+ bytes");
            self.control(c, &m[8..]);
        }
        for id in [0, PORT] {
            for m in self.take_rx(queue::rx(id)) {
                self.ports.entry(id).or_default().rx.extend(m);
            }
        }
        for q in [queue::CONTROL_TX, queue::tx(0), queue::tx(PORT)] {
            self.reclaim_tx(q);
        }
        let open = self.ports.get(&PORT).is_some_and(|p| p.host_connected);
        if open && !self.stopped {
            let q = queue::tx(PORT);
            let mut n = 0;
            while n < 64 && self.tx(q, &record(self.next_seq)) {
                self.next_seq += 1;
                n += 1;
            }
            if n > 0 {
                self.fe.queues[usize::from(q)].notify();
            }
        }
        thread::sleep(Duration::from_micros(200));
    }

    /// Steps until `pred` holds or `timeout` passes; whether it held.
    fn until(&mut self, timeout: Duration, mut pred: impl FnMut(&Drv) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            self.step();
            if pred(self) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
        }
    }

    fn rx_text(&self, id: u32) -> String {
        self.ports
            .get(&id)
            .map(|p| String::from_utf8_lossy(&p.rx).into_owned())
            .unwrap_or_default()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn serial_backend_sigkill_records_once() {
    const NAME: &str = "serial_backend_sigkill_records_once";
    let kills = env_u32("VHOST_CRASH_SERIAL_KILLS", 10);
    let resume_limit = Duration::from_secs(5);
    let mut rng = Rng::from_env(NAME);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let sock = dir.join("vhost.sock");
    let logs = || {
        (0..=kills)
            .map(|n| dir.join(format!("backend-{n}.log")))
            .filter_map(|p| std::fs::read_to_string(&p).ok().map(|s| (p, s)))
            .map(|(p, s)| format!("--- {}\n{}", p.display(), s))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut be = Proc::start(dir, 0);
    let done = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(RecordLog::default()));
    let console = Arc::new(Mutex::new(String::new()));
    let port_thread = {
        let (p, l, d) = (dir.join("port.sock"), log.clone(), done.clone());
        thread::spawn(move || read_records(p, l, d))
    };
    let console_thread = {
        let (p, c, d) = (dir.join("con0.sock"), console.clone(), done.clone());
        thread::spawn(move || read_console(p, c, d, "hvc0-hello", b"hvc0-reply\n"))
    };

    let mut drv = Drv::connect(&sock);
    assert!(
        drv.until(Duration::from_secs(10), |d| d.next_seq > 0),
        "no records written: port 1 never opened on the host side; control {:?}",
        drv.ctrl
    );
    let started = Instant::now();
    let mut resume = Vec::new();
    for k in 1..=kills {
        let before = lock(&log).received();
        drv.until(rng.millis(50, 500), |_| false);
        // Records flow before each kill (and so after the previous restart).
        assert!(
            drv.until(Duration::from_secs(5), |_| lock(&log).received() > before),
            "no records arrived before kill {k}: {}\n{}",
            lock(&log).summary(),
            logs()
        );
        be.kill();
        let killed = Instant::now();
        let conns = lock(&log).conns.len();
        be = Proc::start(dir, k);
        drv.fe
            .reconnect(&sock)
            .unwrap_or_else(|e| panic!("reconnect after kill {k}: {e}\n{}", logs()));
        let resumed = drv.until(Duration::from_secs(20), |_| {
            lock(&log).first_record_since(conns).is_some()
        });
        let at = lock(&log).first_record_since(conns);
        match at.filter(|_| resumed) {
            Some(t) => resume.push(t.saturating_duration_since(killed)),
            None => panic!(
                "no records within 20 s of kill {k}: {}\n{}",
                lock(&log).summary(),
                logs()
            ),
        }
    }

    // Host → guest on the named port, through the last backend.
    send_on_port(&log, b"stop\n").unwrap_or_else(|e| panic!("sending stop: {e}"));
    let stop_seen = drv.until(Duration::from_secs(5), |d| {
        d.rx_text(PORT).contains("stop\n")
    });
    drv.stopped = true;
    // Every record written is taken and on the host.
    let written = drv.next_seq;
    let all_used = drv.until(Duration::from_secs(10), |d| {
        d.fe.queues[usize::from(queue::tx(PORT))].free_descs() == usize::from(RING)
            && lock(&log).next >= written
    });
    // The console both ways.
    drv.tx(queue::tx(0), b"hvc0-hello\n");
    drv.fe.queues[usize::from(queue::tx(0))].notify();
    let console_in = drv.until(Duration::from_secs(5), |d| {
        d.rx_text(0).contains("hvc0-reply\n")
    });
    let console_out = lock(&console).contains("hvc0-hello\n");
    // The host client leaves: the guest hears of it.
    done.store(true, Ordering::SeqCst);
    port_thread.join().expect("port reader");
    console_thread.join().expect("console reader");
    let host_closed = drv.until(Duration::from_secs(5), |d| {
        d.ports.get(&PORT).is_some_and(|p| !p.host_connected)
    });
    let final_exit = be.stop();

    let l = lock(&log);
    let mut ms: Vec<u128> = resume.iter().map(Duration::as_millis).collect();
    ms.sort_unstable();
    eprintln!(
        "{NAME}: {kills} kills in {:.1}s; {written} records written, {}; records resumed \
         after median {} ms, max {} ms",
        started.elapsed().as_secs_f64(),
        l.summary(),
        ms.get(ms.len() / 2).copied().unwrap_or(0),
        ms.last().copied().unwrap_or(0)
    );
    if l.conns.len() <= 16 {
        eprintln!(
            "{NAME}: connections (records, first, last): {:?}",
            l.conns
                .iter()
                .map(|c| (c.records, c.first, c.last))
                .collect::<Vec<_>>()
        );
    }
    assert!(
        l.out_of_order.is_empty() && l.bad.is_empty(),
        "records lost, repeated or reordered: {}",
        l.summary()
    );
    assert!(
        all_used && l.records == written && l.next == written,
        "{written} records written, the host has {} (all taken: {all_used})",
        l.records
    );
    assert!(
        l.doubled.len() <= kills as usize,
        "{} records doubled for {kills} kills",
        l.doubled.len()
    );
    let slowest = resume.iter().max().copied().unwrap_or_default();
    assert!(
        slowest <= resume_limit,
        "records resumed only after {slowest:?} (limit {resume_limit:?})"
    );
    assert!(
        stop_seen,
        "host input on the named port never reached the guest after the restarts (got {:?}); \
         control messages {:?}",
        drv.rx_text(PORT),
        drv.ctrl
    );
    assert!(console_out, "console output: {:?}", lock(&console));
    assert!(
        console_in,
        "console input never reached the guest after the restarts (got {:?})",
        drv.rx_text(0)
    );
    assert!(
        host_closed,
        "the guest never heard that the host client left"
    );
    assert!(
        final_exit.is_some_and(|s| s.success()),
        "last backend after SIGTERM: {final_exit:?}\n{}",
        logs()
    );
}
