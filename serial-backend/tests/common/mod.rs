//! An in-process serial-backend and a tiny virtio-console driver on the frontend harness.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serial_backend::ports::HostKind;
use serial_backend::shared::Shared;
use serial_backend::spec::{event, queue, Control};
use serial_backend::{PortSpec, SerialDevice};
use vhost_tests::frontend::{Buf, FrontendOptions, TestFrontend};
use vhost_tests::in_process::InProcessServer;

/// A console port (port 0 if it is the first) on `kind`.
pub fn console(kind: HostKind) -> PortSpec {
    PortSpec {
        name: None,
        console: true,
        kind,
    }
}

/// A named port on `kind`.
pub fn named(name: &str, kind: HostKind) -> PortSpec {
    PortSpec {
        name: Some(name.into()),
        console: false,
        kind,
    }
}

pub struct TestBackend {
    // First, so that it is dropped (the server stopped) before the directory goes.
    server: InProcessServer,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub shared: Arc<Shared>,
    pub max_ports: u32,
    pub stats: Vec<Arc<vhost_user_device::QueueStats>>,
}

impl TestBackend {
    /// `specs` gets the temp dir to put sockets and files in.
    pub fn start(max_ports: u32, specs: impl FnOnce(&Path) -> Vec<PortSpec>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("vhost.sock");
        let device = SerialDevice::new(&specs(dir.path()), max_ports).expect("device");
        let shared = device.shared().clone();
        let server = InProcessServer::start(device, &socket);
        Self {
            stats: server.stats().to_vec(),
            server,
            dir,
            socket,
            shared,
            max_ports,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn stat(
        &self,
        f: impl Fn(&serial_backend::SerialStats) -> &std::sync::atomic::AtomicU64,
    ) -> u64 {
        f(&self.shared.stats).load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counter `which` of the `i`th port of the spec list.
    pub fn port_stat(&self, i: usize, which: serial_backend::Counter) -> u64 {
        self.shared.ports[i].stats.get(which)
    }
}

pub const RX_BUF: u32 = 4096;

/// The guest driver side.
pub struct Driver {
    pub fe: TestFrontend,
    /// (queue, head) -> buffer gpa of posted device-writable buffers.
    rx: HashMap<(u16, u16), u64>,
    /// Bytes received per port, not yet taken by the test.
    pub data: HashMap<u32, Vec<u8>>,
    pub ctrl: Vec<(Control, Vec<u8>)>,
}

impl Driver {
    pub fn connect(b: &TestBackend) -> Self {
        Self::connect_socket(&b.socket, b.max_ports)
    }

    /// A driver for a backend (in this process or another) listening on `socket` and
    /// offering `max_ports` port ids.
    pub fn connect_socket(socket: &Path, max_ports: u32) -> Self {
        let opts = FrontendOptions {
            mem_size: 64 << 20,
            num_queues: queue::count(max_ports),
            queue_size: 256,
            ..Default::default()
        };
        let fe = TestFrontend::connect(socket, opts).expect("connect");
        let mut d = Self {
            fe,
            rx: HashMap::new(),
            data: HashMap::new(),
            ctrl: Vec::new(),
        };
        d.post_rx(queue::CONTROL_RX, 32);
        d
    }

    pub fn post_rx(&mut self, q: u16, n: usize) {
        for _ in 0..n {
            let gpa = self.fe.alloc(u64::from(RX_BUF));
            let dq = &mut self.fe.queues[usize::from(q)];
            let head = dq.add_chain(&self.fe.mem, &[Buf::wo(gpa, RX_BUF)]);
            dq.publish(&self.fe.mem, head);
            self.rx.insert((q, head), gpa);
        }
        self.fe.queues[usize::from(q)].notify();
    }

    /// Re-posts a used rx buffer.
    fn repost(&mut self, q: u16, gpa: u64) {
        let dq = &mut self.fe.queues[usize::from(q)];
        let head = dq.add_chain(&self.fe.mem, &[Buf::wo(gpa, RX_BUF)]);
        dq.publish(&self.fe.mem, head);
        dq.notify();
        self.rx.insert((q, head), gpa);
    }

    /// Takes what the device put on rx queue `q`; returns the buffers' contents.
    fn take_rx(&mut self, q: u16) -> Vec<Vec<u8>> {
        let used = self.fe.queues[usize::from(q)].take_used(&self.fe.mem);
        // Take every buffer before reposting any: a repost may reuse a head just freed.
        let bufs: Vec<(u64, u32)> = used
            .iter()
            .map(|u| {
                (
                    self.rx.remove(&(q, u.id as u16)).expect("known rx head"),
                    u.len,
                )
            })
            .collect();
        let mut out = Vec::new();
        for (gpa, len) in bufs {
            out.push(self.fe.read(gpa, len as usize));
            self.repost(q, gpa);
        }
        out
    }

    pub fn send_ctrl(&mut self, id: u32, ev: u16, value: u16) {
        self.send_ctrl_raw(
            &Control {
                id,
                event: ev,
                value,
            }
            .to_bytes(),
        );
    }

    pub fn send_ctrl_raw(&mut self, bytes: &[u8]) {
        let gpa = self.fe.alloc(bytes.len().max(1) as u64);
        self.fe.write(gpa, bytes);
        self.fe
            .submit(queue::CONTROL_TX, &[Buf::ro(gpa, bytes.len() as u32)]);
        self.fe
            .wait(queue::CONTROL_TX, 1)
            .expect("control message consumed");
    }

    /// Polls every rx queue (control and ports) once.
    pub fn poll(&mut self) {
        for m in self.take_rx(queue::CONTROL_RX) {
            let c = Control::parse(&m).expect("control message of 8+ bytes");
            self.ctrl.push((c, m[8..].to_vec()));
        }
        for id in 0..50u32 {
            let q = queue::rx(id);
            if usize::from(q) >= self.fe.queues.len() {
                break;
            }
            for m in self.take_rx(q) {
                self.data.entry(id).or_default().extend(m);
            }
        }
    }

    /// Waits until `pred` holds on the received control messages; returns and clears them.
    pub fn wait_ctrl(
        &mut self,
        what: &str,
        pred: impl Fn(&[(Control, Vec<u8>)]) -> bool,
    ) -> Vec<(Control, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.poll();
            if pred(&self.ctrl) {
                return std::mem::take(&mut self.ctrl);
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; got {:?}",
                self.ctrl
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// DEVICE_READY, then PORT_READY for every DEVICE_ADD; returns all messages seen.
    pub fn handshake(&mut self, nports: usize) -> Vec<(Control, Vec<u8>)> {
        self.send_ctrl(0, event::DEVICE_READY, 1);
        let adds = self.wait_ctrl("DEVICE_ADD", |m| {
            m.iter()
                .filter(|(c, _)| c.event == event::DEVICE_ADD)
                .count()
                >= nports
        });
        let mut all = adds.clone();
        for (c, _) in adds.iter().filter(|(c, _)| c.event == event::DEVICE_ADD) {
            self.post_rx(queue::rx(c.id), 16);
            self.send_ctrl(c.id, event::PORT_READY, 1);
        }
        std::thread::sleep(Duration::from_millis(100));
        self.poll();
        all.extend(std::mem::take(&mut self.ctrl));
        all
    }

    /// Guest writes `data` on port `id` in chunks of `chunk`; does not wait.
    pub fn write_port(&mut self, id: u32, data: &[u8], chunk: usize) -> usize {
        let mut n = 0;
        for c in data.chunks(chunk) {
            let gpa = self.fe.alloc(c.len() as u64);
            self.fe.write(gpa, c);
            self.fe
                .submit(queue::tx(id), &[Buf::ro(gpa, c.len() as u32)]);
            n += 1;
        }
        n
    }

    /// Waits for `n` tx completions on port `id`.
    pub fn wait_tx(&mut self, id: u32, n: usize, timeout: Duration) -> usize {
        let q = usize::from(queue::tx(id));
        match self.fe.queues[q].wait_used(&self.fe.mem, n, timeout) {
            Ok(u) => u.len(),
            Err(_) => 0,
        }
    }

    /// Takes exactly `len` bytes received on port `id` (waits up to `timeout`).
    pub fn read_port(&mut self, id: u32, len: usize, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll();
            let have = self.data.get(&id).map_or(0, |d| d.len());
            if have >= len {
                let d = self.data.get_mut(&id).expect("data");
                return d.drain(..len).collect();
            }
            assert!(
                Instant::now() < deadline,
                "port {id}: got {have} of {len} bytes"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    let mut x = u32::from(seed) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

pub fn has(m: &[(Control, Vec<u8>)], id: u32, ev: u16, value: u16) -> bool {
    m.iter()
        .any(|(c, _)| c.id == id && c.event == ev && c.value == value)
}
