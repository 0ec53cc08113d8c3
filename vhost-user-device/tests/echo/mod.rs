//! An echo device served in-process, for testing the layer through its socket only.
//!
//! Each chain's readable bytes are copied into its writable part (as much as fits) and the
//! chain is completed with the number of bytes written, so a test can check on data that a
//! chain went through the layer whole. Nothing else is device logic: whatever a test sees
//! (interrupts, used indices, dirty pages, resubmissions, drains) is the layer's doing.
//!
//! [`EchoControl::hold`] keeps popped chains in flight until [`EchoControl::release`], like
//! a device whose I/O is still in the kernel: what the layer must then wait for (a ring
//! stop, GET_VRING_BASE) can be tested without timing luck.
//!
//! The tests talk to the backend over its socket with the `vhost-tests` frontend harness;
//! the only things they share with it in-process are the counters ([`QueueStats`]) and the
//! [`EchoControl`].
#![allow(dead_code)]

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::VhostUserProtocolFeatures;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use vhost_tests::in_process::InProcessServer;
use vhost_user_device::device::read_config_bytes;
use vhost_user_device::{
    Chain, DeviceError, GuestMem, PassEnd, QueueStats, QueueWorker, RingPass, Rings,
    VhostUserDevice,
};

/// Largest ring the echo device accepts.
pub const MAX_QUEUE_SIZE: u16 = 256;

/// What a test controls of a running echo device.
pub struct EchoControl {
    /// Keep popped chains in flight (not on the used ring) until [`EchoControl::release`].
    hold: AtomicBool,
    /// Chains held in flight now, over all queues.
    held: AtomicUsize,
    /// Written by [`EchoControl::release`]; the worker completes what it holds.
    release: EventFd,
}

impl EchoControl {
    /// From now on, popped chains stay in flight until released.
    pub fn hold(&self) {
        self.hold.store(true, Ordering::SeqCst);
    }

    /// Stops holding and completes every chain held so far.
    pub fn release(&self) {
        self.hold.store(false, Ordering::SeqCst);
        self.release.write(1).expect("write release eventfd");
    }

    /// Chains held in flight now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// Waits until `n` chains are held (the worker popped them), failing after 5 s.
    pub fn wait_held(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.held() < n {
            assert!(
                Instant::now() < deadline,
                "{} chain(s) held, waited for {n}",
                self.held()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The echo device: `num_queues` queues, one worker each, inflight tracking offered.
pub struct EchoDevice {
    num_queues: u16,
    control: Arc<EchoControl>,
}

impl VhostUserDevice for EchoDevice {
    fn name(&self) -> &str {
        "echo"
    }

    fn num_queues(&self) -> u16 {
        self.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        0
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // Echoing a chain again gives the same bytes: safe to resubmit.
        VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn read_config(&self, offset: u32, buf: &mut [u8]) -> Result<(), DeviceError> {
        read_config_bytes(&[], 0, offset, buf)
    }

    fn create_worker(
        &self,
        _queues: &[u16],
        _acked_features: u64,
    ) -> Result<Box<dyn QueueWorker>, DeviceError> {
        Ok(Box::new(EchoWorker {
            control: self.control.clone(),
            chain: Chain::default(),
            held: Vec::new(),
        }))
    }
}

/// A chain popped and not yet completed.
struct Held {
    queue: u16,
    chain: Chain,
}

struct EchoWorker {
    control: Arc<EchoControl>,
    chain: Chain,
    held: Vec<Held>,
}

/// Copies the chain's readable bytes into its writable part; returns the bytes written.
fn echo(mem: &GuestMem, chain: &Chain) -> u32 {
    let mut data = Vec::new();
    for s in chain.segments.iter().filter(|s| !s.writable) {
        let mut buf = vec![0u8; s.len as usize];
        mem.read_slice(&mut buf, GuestAddress(s.addr))
            .expect("the layer checked the chain is inside guest memory");
        data.extend_from_slice(&buf);
    }
    let mut written = 0usize;
    for s in chain.segments.iter().filter(|s| s.writable) {
        if written == data.len() {
            break;
        }
        let n = (s.len as usize).min(data.len() - written);
        mem.write_slice(&data[written..written + n], GuestAddress(s.addr))
            .expect("the layer checked the chain is inside guest memory");
        written += n;
    }
    written as u32
}

impl EchoWorker {
    /// Completes every held chain of the rings this worker owns.
    fn complete_held(&mut self, rings: &mut Rings) {
        for h in std::mem::take(&mut self.held) {
            self.control.held.fetch_sub(1, Ordering::SeqCst);
            if let Some(ring) = rings.get_mut(h.queue) {
                let mem = ring.memory();
                let len = echo(&mem, &h.chain);
                ring.add_used(&mem, h.chain.head, len);
                ring.notify(&mem);
            }
        }
    }
}

impl QueueWorker for EchoWorker {
    fn event_fds(&self) -> Vec<RawFd> {
        vec![self.control.release.as_raw_fd()]
    }

    fn process_queue(&mut self, queue: u16, rings: &mut Rings) {
        let Some(ring) = rings.get_mut(queue) else {
            return;
        };
        let mem = ring.memory();
        let mut completed = false;
        // No budget: the tests' own frontend is the only driver (a real device's budget
        // would need a way back, as blk's `more`). A pass can still end as `Budget` when
        // the avail index moves back and forth under it: then simply look again.
        loop {
            let mut pass = RingPass::new(usize::MAX);
            while pass.pop(ring, &mem, &mut self.chain) {
                if self.control.hold.load(Ordering::SeqCst) {
                    self.held.push(Held {
                        queue: ring.index(),
                        chain: self.chain.clone(),
                    });
                    self.control.held.fetch_add(1, Ordering::SeqCst);
                } else {
                    let len = echo(&mem, &self.chain);
                    ring.add_used(&mem, self.chain.head, len);
                    completed = true;
                }
            }
            if pass.end() != PassEnd::Budget {
                break;
            }
        }
        if completed {
            ring.notify(&mem);
        }
    }

    fn handle_event(&mut self, _fd_index: usize, rings: &mut Rings) {
        let _ = self.control.release.read();
        self.complete_held(rings);
    }

    fn in_flight(&self, queue: u16) -> usize {
        self.held.iter().filter(|h| h.queue == queue).count()
    }

    fn wait_completions(&mut self, rings: &mut Rings) -> io::Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.control.release.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 100) };
        if n > 0 {
            let _ = self.control.release.read();
            self.complete_held(rings);
        }
        Ok(())
    }
}

/// A running echo backend listening on a socket in a temporary directory.
pub struct EchoBackend {
    /// The server (stopped when dropped).
    pub server: InProcessServer,
    /// Hold and release completions.
    pub control: Arc<EchoControl>,
    /// Holds the socket; removed last.
    pub dir: tempfile::TempDir,
}

impl EchoBackend {
    /// Starts an echo device with `num_queues` queues.
    pub fn start(num_queues: u16) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let control = Arc::new(EchoControl {
            hold: AtomicBool::new(false),
            held: AtomicUsize::new(0),
            release: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        });
        let device = EchoDevice {
            num_queues,
            control: control.clone(),
        };
        let server = InProcessServer::start(device, &dir.path().join("echo.sock"));
        Self {
            server,
            control,
            dir,
        }
    }

    /// The socket a frontend connects to.
    pub fn socket(&self) -> &Path {
        self.server.socket()
    }

    /// Per-queue counters (kept across connections).
    pub fn stats(&self, q: usize) -> &QueueStats {
        &self.server.stats()[q]
    }

    /// Interrupts counted on queue `q`.
    pub fn notifications(&self, q: usize) -> u64 {
        self.stats(q).notifications.load(Ordering::SeqCst)
    }
}

/// `len` bytes of a pattern that differs per `seed` and never contains zero.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}
