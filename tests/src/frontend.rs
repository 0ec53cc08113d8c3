//! A vhost-user frontend that drives a backend without a VM.
//!
//! It plays both the VMM and the guest driver: guest RAM is a memfd mapped here and handed
//! to the backend with SET_MEM_TABLE, and each queue is a split ring laid out in that memory
//! and filled by hand, so a test can build any descriptor chain, well formed or hostile.
//! With [`FrontendOptions::packed`] the queues are packed rings instead
//! ([`crate::frontend_packed`]), driven through the same calls.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use crate::frontend_packed::RING_PACKED;
use crate::frontend_packed::{PackedDesc, PackedDriver};

/// VRING_DESC_F_NEXT.
pub const F_NEXT: u16 = 1;
/// VRING_DESC_F_WRITE.
pub const F_WRITE: u16 = 2;
/// VRING_DESC_F_INDIRECT.
pub const F_INDIRECT: u16 = 4;
/// VHOST_F_LOG_ALL.
pub const LOG_ALL: u64 = 1 << 26;
/// VIRTIO_RING_F_EVENT_IDX.
pub const EVENT_IDX: u64 = 1 << 29;
/// VIRTIO_RING_F_INDIRECT_DESC.
pub const INDIRECT_DESC: u64 = 1 << 28;
/// VHOST_USER_F_PROTOCOL_FEATURES.
pub const PROTOCOL_FEATURES: u64 = 1 << 30;

/// Harness errors.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A vhost-user request failed.
    #[error("vhost-user: {0}")]
    Vhost(#[from] vhost::Error),
    /// An OS call failed.
    #[error("io: {0}")]
    Io(#[from] io::Error),
    /// Guest memory access failed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The backend did not complete requests in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, HarnessError>;

fn memfd(name: &std::ffi::CStr, size: u64) -> Result<File> {
    // SAFETY: valid C string; result checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: fresh descriptor we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size)?;
    Ok(f)
}

/// One buffer of a chain.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    /// Guest-physical address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

impl Buf {
    /// A device-readable buffer.
    pub fn ro(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: false,
        }
    }
    /// A device-writable buffer.
    pub fn wo(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: true,
        }
    }
}

/// A used-ring element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Head index.
    pub id: u32,
    /// Bytes written by the device.
    pub len: u32,
}

/// The driver side of one split ring, or of a packed one ([`FrontendOptions::packed`]):
/// chains, publishing, used elements and kicks work on both; the calls that name split
/// ring fields (`reserve`, `force_avail_idx`, `set_used_event`, `avail_event`,
/// `set_avail_flags`, `used_flags`) are for split rings only.
pub struct DriverQueue {
    /// Queue index.
    pub index: u16,
    /// Ring size.
    pub size: u16,
    /// Descriptor table GPA.
    pub desc: u64,
    /// Avail ring GPA.
    pub avail: u64,
    /// Used ring GPA.
    pub used: u64,
    free: Vec<u16>,
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
    /// Kick eventfd (we write it).
    pub kick: EventFd,
    /// Call eventfd (the backend writes it).
    pub call: EventFd,
    /// The packed ring's driver state, if the queue is packed (then `free` and `chains`
    /// hold buffer ids, `avail_idx` and `last_used` count chains published and taken).
    packed: Option<PackedDriver>,
}

impl DriverQueue {
    fn write_u16(mem: &GuestMemoryMmap, gpa: u64, v: u16) {
        let _ = mem.write_obj(v.to_le(), GuestAddress(gpa));
    }

    fn read_u16(mem: &GuestMemoryMmap, gpa: u64) -> u16 {
        fence(Ordering::Acquire);
        u16::from_le(mem.read_obj(GuestAddress(gpa)).unwrap_or(0))
    }

    /// Writes descriptor `idx` raw.
    pub fn write_desc(
        &mut self,
        mem: &GuestMemoryMmap,
        idx: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        if let Some(p) = self.packed.as_mut() {
            // A packed ring has no table: this is buffer `idx`, one descriptor long.
            p.set_chain(idx, vec![PackedDesc { addr, len, flags }]);
            return;
        }
        write_desc_at(mem, self.desc, idx, addr, len, flags, next);
    }

    /// Whether this is a packed ring.
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    fn take_descs(&mut self, n: usize) -> Vec<u16> {
        assert!(self.free.len() >= n, "test ring out of descriptors");
        let at = self.free.len() - n;
        self.free.split_off(at)
    }

    /// Builds a chain of direct descriptors; returns its head (not yet published).
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, bufs: &[Buf]) -> u16 {
        if let Some(p) = self.packed.as_mut() {
            let id = self.free.pop().expect("test ring out of buffer ids");
            let descs = bufs
                .iter()
                .map(|b| PackedDesc {
                    addr: b.addr,
                    len: b.len,
                    flags: if b.write { F_WRITE } else { 0 },
                })
                .collect();
            p.set_chain(id, descs);
            self.chains[usize::from(id)] = vec![id];
            return id;
        }
        let ids = self.take_descs(bufs.len().max(1));
        for (i, b) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let flags = if b.write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            let next = if last { 0 } else { ids[i + 1] };
            self.write_desc(mem, ids[i], b.addr, b.len, flags, next);
        }
        let head = ids[0];
        self.chains[usize::from(head)] = ids;
        head
    }

    /// Builds a chain of one indirect descriptor whose table (at `table`) holds `bufs`.
    pub fn add_indirect(&mut self, mem: &GuestMemoryMmap, table: u64, bufs: &[Buf]) -> u16 {
        if let Some(p) = self.packed.as_mut() {
            // Packed indirect tables: consecutive `{addr, len, id, flags}` descriptors.
            for (i, b) in bufs.iter().enumerate() {
                let at = table + 16 * i as u64;
                let flags: u16 = if b.write { F_WRITE } else { 0 };
                let _ = mem.write_obj(b.addr.to_le(), GuestAddress(at));
                let _ = mem.write_obj(b.len.to_le(), GuestAddress(at + 8));
                let _ = mem.write_obj(0u16, GuestAddress(at + 12));
                let _ = mem.write_obj(flags.to_le(), GuestAddress(at + 14));
            }
            let id = self.free.pop().expect("test ring out of buffer ids");
            let len = (bufs.len() * 16) as u32;
            p.set_chain(
                id,
                vec![PackedDesc {
                    addr: table,
                    len,
                    flags: F_INDIRECT,
                }],
            );
            self.chains[usize::from(id)] = vec![id];
            return id;
        }
        for (i, b) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let flags = if b.write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            write_desc_at(
                mem,
                table,
                i as u16,
                b.addr,
                b.len,
                flags,
                if last { 0 } else { i as u16 + 1 },
            );
        }
        let ids = self.take_descs(1);
        self.write_desc(mem, ids[0], table, (bufs.len() * 16) as u32, F_INDIRECT, 0);
        let head = ids[0];
        self.chains[usize::from(head)] = ids;
        head
    }

    /// Reserves `n` descriptors for a hand-built (possibly hostile) chain.
    pub fn reserve(&mut self, n: usize) -> Vec<u16> {
        let ids = self.take_descs(n);
        self.chains[usize::from(ids[0])] = ids.clone();
        ids
    }

    /// Publishes `head` on the avail ring (without kicking).
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        if let Some(p) = self.packed.as_mut() {
            p.publish(mem, head);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            return;
        }
        let slot = self.avail_idx % self.size;
        Self::write_u16(mem, self.avail + 4 + 2 * u64::from(slot), head);
        fence(Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Self::write_u16(mem, self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
    }

    /// Publishes several heads with one avail-index update (without kicking), as a driver
    /// does for a burst. Unlike [`DriverQueue::publish`] the heads need not come from
    /// [`DriverQueue::add_chain`]: a driver that owns fixed descriptors (one per buffer,
    /// written once with [`DriverQueue::write_desc`]) republishes them as they come back,
    /// with [`DriverQueue::take_used_into`], and never touches the free list.
    pub fn publish_many(&mut self, mem: &GuestMemoryMmap, heads: &[u16]) {
        if heads.is_empty() {
            return;
        }
        if self.packed.is_some() {
            for &head in heads {
                self.publish(mem, head);
            }
            return;
        }
        for (i, &head) in heads.iter().enumerate() {
            let slot = self.avail_idx.wrapping_add(i as u16) % self.size;
            Self::write_u16(mem, self.avail + 4 + 2 * u64::from(slot), head);
        }
        fence(Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(heads.len() as u16);
        Self::write_u16(mem, self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
    }

    /// Appends the used elements that appeared since the last call to `out`, without
    /// allocating and without returning descriptors to the free list (for fixed
    /// descriptors, see [`DriverQueue::publish_many`]). Returns how many were added.
    pub fn take_used_into(&mut self, mem: &GuestMemoryMmap, out: &mut Vec<Used>) -> usize {
        if let Some(p) = self.packed.as_mut() {
            let mut n = 0;
            while let Some((id, len)) = p.take_used(mem) {
                out.push(Used {
                    id: u32::from(id),
                    len,
                });
                self.last_used = self.last_used.wrapping_add(1);
                n += 1;
            }
            return n;
        }
        let idx = self.used_idx(mem);
        let n = usize::from(idx.wrapping_sub(self.last_used));
        for _ in 0..n {
            let slot = u64::from(self.last_used % self.size);
            let at = self.used + 4 + 8 * slot;
            let id = u32::from_le(mem.read_obj(GuestAddress(at)).unwrap_or(u32::MAX));
            let len = u32::from_le(mem.read_obj(GuestAddress(at + 4)).unwrap_or(0));
            out.push(Used { id, len });
            self.last_used = self.last_used.wrapping_add(1);
        }
        n
    }

    /// Descriptors not in any chain (what [`DriverQueue::add_chain`] can still take).
    pub fn free_descs(&self) -> usize {
        self.free.len()
    }

    /// The used index consumed so far (by `take_used*`).
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Kicks the backend.
    pub fn notify(&self) {
        let _ = self.kick.write(1);
    }

    /// The avail index published so far.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Writes `idx` as the avail index without publishing anything, as a broken or
    /// hostile driver might (e.g. more than the ring size ahead of what the device took).
    pub fn force_avail_idx(&mut self, mem: &GuestMemoryMmap, idx: u16) {
        self.avail_idx = idx;
        fence(Ordering::Release);
        Self::write_u16(mem, self.avail + 2, idx);
        fence(Ordering::SeqCst);
    }

    /// The used index in guest memory (packed: the used elements taken plus those
    /// waiting, the same count).
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        if let Some(p) = &self.packed {
            return self.last_used.wrapping_add(p.used_waiting(mem));
        }
        Self::read_u16(mem, self.used + 2)
    }

    /// The SET_VRING_BASE that restarts this ring on a backend that replaced one which
    /// died: the used index (split; as QEMU does), or both sides at the device's used
    /// position with their wrap counters (packed: [`PackedDriver::restart_base`]).
    pub fn restart_base(&self, mem: &GuestMemoryMmap) -> u32 {
        match &self.packed {
            Some(p) => p.restart_base(mem),
            None => u32::from(self.used_idx(mem)),
        }
    }

    /// Sets `used_event` (for event_idx): interrupt only once used passes it.
    pub fn set_used_event(&self, mem: &GuestMemoryMmap, v: u16) {
        Self::write_u16(mem, self.avail + 4 + 2 * u64::from(self.size), v);
        fence(Ordering::SeqCst);
    }

    /// `avail_event` as written by the backend (for event_idx).
    pub fn avail_event(&self, mem: &GuestMemoryMmap) -> u16 {
        Self::read_u16(mem, self.used + 4 + 8 * u64::from(self.size))
    }

    /// Writes the avail ring's flags (VRING_AVAIL_F_NO_INTERRUPT = 1: the driver asks for
    /// no interrupts; without event_idx a device should then not signal).
    pub fn set_avail_flags(&self, mem: &GuestMemoryMmap, flags: u16) {
        Self::write_u16(mem, self.avail, flags);
        fence(Ordering::SeqCst);
    }

    /// The used ring's flags (VRING_USED_F_NO_NOTIFY = 1).
    pub fn used_flags(&self, mem: &GuestMemoryMmap) -> u16 {
        Self::read_u16(mem, self.used)
    }

    /// Takes used elements that appeared since the last call; frees their descriptors.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<Used> {
        let mut out = Vec::new();
        if self.packed.is_some() {
            self.take_used_into(mem, &mut out);
            for u in &out {
                if let Some(chain) = self.chains.get_mut(u.id as usize) {
                    self.free.append(chain);
                }
            }
            return out;
        }
        let idx = self.used_idx(mem);
        while self.last_used != idx {
            let slot = u64::from(self.last_used % self.size);
            let at = self.used + 4 + 8 * slot;
            let id = u32::from_le(mem.read_obj(GuestAddress(at)).unwrap_or(u32::MAX));
            let len = u32::from_le(mem.read_obj(GuestAddress(at + 4)).unwrap_or(0));
            if let Some(chain) = self.chains.get_mut(id as usize) {
                self.free.append(chain);
            }
            out.push(Used { id, len });
            self.last_used = self.last_used.wrapping_add(1);
        }
        out
    }

    /// Waits until `n` more used elements appeared (sleeping on the call eventfd).
    pub fn wait_used(
        &mut self,
        mem: &GuestMemoryMmap,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Used>> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            got.extend(self.take_used(mem));
            if got.len() >= n {
                return Ok(got);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(HarnessError::Timeout(format!(
                    "{n} used elements on queue {} (got {})",
                    self.index,
                    got.len()
                )));
            }
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // Poll in short slices: with event_idx the backend may rightly not signal.
            let ms = left.as_millis().min(5) as i32;
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, ms) };
            let _ = self.call.read();
        }
    }
}

/// Connects to a backend's socket, retrying for a while if nobody listens yet (as
/// `Frontend::connect` does).
fn connect_socket(path: &Path) -> Result<UnixStream> {
    let mut retries = 5;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused && retries > 0 => {
                retries -= 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A pipe: (read end, write end), close-on-exec.
fn pipe() -> io::Result<(File, std::os::fd::OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds on success; checked.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two fresh descriptors we own.
    Ok(unsafe {
        (
            File::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

/// Loads `state` into the backend behind `fe` as a VMM's migration destination does
/// (before the rings start): SET_DEVICE_STATE_FD(LOAD) with a pipe it then writes and
/// closes, then CHECK_DEVICE_STATE, whose error (the backend refused the state) is
/// returned.
pub fn load_device_state(fe: &mut Frontend, state: &[u8]) -> Result<()> {
    use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};
    let (read_end, write_end) = pipe()?;
    let read_end = std::os::fd::OwnedFd::from(read_end);
    fe.set_device_state_fd(
        VhostTransferStateDirection::LOAD,
        VhostTransferStatePhase::STOPPED,
        read_end,
    )?;
    let mut w = File::from(write_end);
    io::Write::write_all(&mut w, state)?;
    drop(w);
    fe.check_device_state()?;
    Ok(())
}

/// Waits up to `timeout` for `efd` to be signalled; consumes the count. Returns whether it
/// was.
pub fn wait_eventfd(efd: &EventFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: efd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0 && efd.read().is_ok()
}

fn write_desc_at(
    mem: &GuestMemoryMmap,
    table: u64,
    idx: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let at = table + 16 * u64::from(idx);
    let _ = mem.write_obj(addr.to_le(), GuestAddress(at));
    let _ = mem.write_obj(len.to_le(), GuestAddress(at + 8));
    let _ = mem.write_obj(flags.to_le(), GuestAddress(at + 12));
    let _ = mem.write_obj(next.to_le(), GuestAddress(at + 14));
}

/// Options for [`TestFrontend::connect`].
#[derive(Clone, Debug)]
pub struct FrontendOptions {
    /// Guest RAM size.
    pub mem_size: u64,
    /// Queues to set up.
    pub num_queues: u16,
    /// Ring size.
    pub queue_size: u16,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// Set up an inflight region (GET_INFLIGHT_FD) before starting rings.
    pub inflight: bool,
    /// Negotiate VIRTIO_F_RING_PACKED and lay the queues out as packed rings.
    pub packed: bool,
    /// Virtio features to ack at most (of those offered; `None`: all offered). A driver
    /// that wants a plain device (the net load generator: no offloads) masks here;
    /// VHOST_USER_F_PROTOCOL_FEATURES is kept whenever offered, LOG_ALL never acked.
    pub features: Option<u64>,
    /// Protocol features to ack at most (of those offered; `None`: all offered). E.g.
    /// without STATUS, which DPDK's vhost library would wait on (SET_STATUS DRIVER_OK)
    /// before it starts the device.
    pub protocol_features: Option<VhostUserProtocolFeatures>,
}

impl Default for FrontendOptions {
    fn default() -> Self {
        Self {
            mem_size: 32 << 20,
            num_queues: 1,
            queue_size: 128,
            event_idx: false,
            inflight: false,
            packed: false,
            features: None,
            protocol_features: None,
        }
    }
}

/// The frontend's dirty log.
pub struct DirtyLogView {
    file: File,
    size: u64,
}

impl DirtyLogView {
    /// Whether the page holding `gpa` is marked.
    pub fn is_dirty(&self, gpa: u64) -> bool {
        let page = gpa / 4096;
        let mut b = [0u8; 1];
        use std::os::unix::fs::FileExt;
        if self.file.read_exact_at(&mut b, page / 8).is_err() {
            return false;
        }
        b[0] & (1 << (page % 8)) != 0
    }

    /// All marked pages.
    pub fn dirty_pages(&self) -> Vec<u64> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; self.size as usize];
        let _ = self.file.read_exact_at(&mut buf, 0);
        let mut out = Vec::new();
        for (i, b) in buf.iter().enumerate() {
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    out.push(i as u64 * 8 + bit);
                }
            }
        }
        out
    }

    /// Clears the log (as a VMM does after each sync).
    pub fn clear(&self) {
        use std::os::unix::fs::FileExt;
        let _ = self.file.write_all_at(&vec![0u8; self.size as usize], 0);
    }
}

/// Guest memory each queue's rings get (descriptor table, avail and used rings).
const RING_SPAN: u64 = 0x20000;

/// Where queue `q`'s rings start in the harness's guest memory; `ring_base(n)` is the end
/// of the rings of queues 0..n, above which buffers are allocated.
fn ring_base(q: u16) -> u64 {
    0x1000 + u64::from(q) * RING_SPAN
}

/// A connected test frontend with guest memory and rings.
pub struct TestFrontend {
    /// The vhost-user connection.
    pub fe: Frontend,
    /// Guest RAM as the driver sees it.
    pub mem: GuestMemoryMmap,
    /// Driver-side rings.
    pub queues: Vec<DriverQueue>,
    /// Virtio features acked.
    pub features: u64,
    /// Protocol features acked.
    pub protocol: VhostUserProtocolFeatures,
    /// Inflight region (if set up): the fd and its geometry, kept like a VMM would.
    pub inflight: Option<(File, vhost::vhost_user::message::VhostUserInflight)>,
    /// The connection's socket (a second handle on it), for [`TestFrontend::within`].
    sock: UnixStream,
    next_free: u64,
    opts: FrontendOptions,
}

impl TestFrontend {
    /// Connects and performs the whole handshake; rings are started and enabled.
    pub fn connect(path: &Path, opts: FrontendOptions) -> Result<Self> {
        let mut fe = Self::handshake(path, &opts)?;
        if opts.inflight {
            fe.setup_inflight()?;
        }
        for q in 0..opts.num_queues {
            fe.add_queue(q)?;
            fe.start_queue(q)?;
        }
        Ok(fe)
    }

    /// [`TestFrontend::connect`], failing with a timeout if the backend has not completed
    /// the handshake within `timeout` (a backend that stopped answering makes the test fail
    /// instead of hanging it; the attempt is then left behind on its own thread).
    pub fn connect_within(path: &Path, opts: FrontendOptions, timeout: Duration) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let path = path.to_path_buf();
        std::thread::spawn(move || {
            let _ = tx.send(Self::connect(&path, opts));
        });
        rx.recv_timeout(timeout)
            .map_err(|_| HarnessError::Timeout("the backend to answer the handshake".into()))?
    }

    /// Connects, negotiates and sends the memory table, without touching rings.
    pub fn handshake(path: &Path, opts: &FrontendOptions) -> Result<Self> {
        let sock = connect_socket(path)?;
        let mut fe = Frontend::from_stream(sock.try_clone()?, u64::from(opts.num_queues.max(1)));
        let offered = fe.get_features()?;
        fe.set_owner()?;
        let offered_proto = fe.get_protocol_features()?;
        let proto = opts
            .protocol_features
            .map_or(offered_proto, |want| offered_proto & want);
        fe.set_protocol_features(proto)?;
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let mut features = offered & !LOG_ALL;
        if let Some(want) = opts.features {
            features &= want | PROTOCOL_FEATURES;
        }
        if !opts.event_idx {
            features &= !EVENT_IDX;
        }
        if !opts.packed {
            features &= !RING_PACKED;
        } else if features & RING_PACKED == 0 {
            return Err(HarnessError::Memory(
                "the backend does not offer VIRTIO_F_RING_PACKED".into(),
            ));
        }
        fe.set_features(features)?;
        let memfd = memfd(c"test-guest-ram", opts.mem_size)?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            opts.mem_size as usize,
            Some(FileOffset::new(memfd, 0)),
        )])
        .map_err(|e| HarnessError::Memory(e.to_string()))?;
        let region = mem
            .find_region(GuestAddress(0))
            .ok_or_else(|| HarnessError::Memory("no region".into()))?;
        let info = VhostUserMemoryRegionInfo::from_guest_region(region)?;
        fe.set_mem_table(&[info])?;
        Ok(Self {
            fe,
            mem,
            queues: Vec::new(),
            features,
            protocol: proto,
            inflight: None,
            sock,
            // Buffers go above the rings (see `ring_base`), and above 1 MiB.
            next_free: ring_base(opts.num_queues).max(1 << 20),
            opts: opts.clone(),
        })
    }

    /// Connects to a new backend at `path` (one restarted after the last died) with the same
    /// guest memory, rings and driver state, as QEMU's vhost-user frontends do when their
    /// chardev reconnects (`reconnect-ms`): the handshake with the features acked before,
    /// the same memory table (and inflight region, if any), and every ring started again.
    /// A dead backend cannot say where its rings stood (GET_VRING_BASE), so QEMU restarts
    /// each ring at its used index (`virtio_queue_restore_last_avail_idx`): chains the dead
    /// backend took and never put on the used ring are taken again. So does this.
    pub fn reconnect(&mut self, path: &Path) -> Result<()> {
        self.reconnect_with(path, |_| Ok(()))
    }

    /// [`TestFrontend::reconnect`], running `before_rings` once the memory table is
    /// sent and before any ring starts (where a VMM migrating the VM here loads the
    /// device state: [`load_device_state`]).
    pub fn reconnect_with(
        &mut self,
        path: &Path,
        before_rings: impl FnOnce(&mut Frontend) -> Result<()>,
    ) -> Result<()> {
        self.reconnect_inner(path, before_rings, None)
    }

    fn reconnect_inner(
        &mut self,
        path: &Path,
        before_rings: impl FnOnce(&mut Frontend) -> Result<()>,
        bases: Option<&[u32]>,
    ) -> Result<()> {
        // The old connection is gone (a backend that is still alive sees the hang-up).
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        let sock = connect_socket(path)?;
        let mut fe =
            Frontend::from_stream(sock.try_clone()?, u64::from(self.opts.num_queues.max(1)));
        let offered = fe.get_features()?;
        fe.set_owner()?;
        let offered_proto = fe.get_protocol_features()?;
        fe.set_protocol_features(self.protocol & offered_proto)?;
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        fe.set_features(self.features & offered)?;
        let region = self
            .mem
            .find_region(GuestAddress(0))
            .ok_or_else(|| HarnessError::Memory("no region".into()))?;
        let info = VhostUserMemoryRegionInfo::from_guest_region(region)?;
        fe.set_mem_table(&[info])?;
        self.fe = fe;
        self.sock = sock;
        if let Some((file, info)) = self.inflight.take() {
            self.set_inflight(file, info)?;
        }
        before_rings(&mut self.fe)?;
        for q in 0..self.queues.len() {
            let base = match bases {
                Some(b) => b[q],
                None => self.queues[q].restart_base(&self.mem),
            };
            self.send_ring_setup(q as u16, base, true)?;
        }
        Ok(())
    }

    /// Connects to a new backend at `path` as [`TestFrontend::reconnect`] does, but
    /// starts each ring at the base given (what GET_VRING_BASE returned from the previous
    /// backend: a VMM stopping a device and starting it on another). `bases` holds one
    /// per queue.
    pub fn reconnect_at(&mut self, path: &Path, bases: &[u32]) -> Result<()> {
        assert_eq!(bases.len(), self.queues.len(), "one base per queue");
        self.reconnect_inner(path, |_| Ok(()), Some(bases))
    }

    /// Stops every ring (GET_VRING_BASE) and returns their bases.
    pub fn stop_queues(&mut self) -> Result<Vec<u32>> {
        let mut bases = Vec::new();
        for q in 0..self.queues.len() {
            bases.push(self.fe.get_vring_base(q)?);
        }
        Ok(bases)
    }

    /// Stops every ring (GET_VRING_BASE) and saves the device state as a VMM's migration
    /// source does: SET_DEVICE_STATE_FD(SAVE) with a pipe, read to its end, then
    /// CHECK_DEVICE_STATE.
    pub fn save_device_state(&mut self) -> Result<Vec<u8>> {
        use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};
        for q in 0..self.queues.len() {
            self.fe.get_vring_base(q)?;
        }
        let (mut read_end, write_end) = pipe()?;
        self.fe.set_device_state_fd(
            VhostTransferStateDirection::SAVE,
            VhostTransferStatePhase::STOPPED,
            write_end,
        )?;
        let mut state = Vec::new();
        io::Read::read_to_end(&mut read_end, &mut state)?;
        self.fe.check_device_state()?;
        Ok(state)
    }

    /// Runs `f` (requests to the backend), failing with a timeout if it has not returned
    /// after `timeout`: the connection is then shut down, so a request waiting for the
    /// reply of a backend that stopped answering fails instead of hanging the test. (A
    /// socket read timeout would not do: the vhost crate retries reads that time out.) The
    /// connection is unusable after a timeout.
    pub fn within<T, E>(
        &mut self,
        timeout: Duration,
        f: impl FnOnce(&mut Self) -> std::result::Result<T, E>,
    ) -> Result<T>
    where
        HarnessError: From<E>,
    {
        let sock = self.sock.try_clone()?;
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            let fired = matches!(
                wait.recv_timeout(timeout),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            );
            if fired {
                let _ = sock.shutdown(std::net::Shutdown::Both);
            }
            fired
        });
        let out = f(self);
        drop(done);
        if watchdog.join().unwrap_or(true) {
            return Err(HarnessError::Timeout(format!(
                "the backend to answer within {timeout:?}"
            )));
        }
        Ok(out?)
    }

    /// Gives queue `q` an error eventfd (SET_VRING_ERR) and returns it.
    pub fn set_vring_err(&mut self, q: u16) -> Result<EventFd> {
        let err = EventFd::new(EFD_NONBLOCK)?;
        self.fe.set_vring_err(usize::from(q), &err)?;
        Ok(err)
    }

    /// Asks the backend for an inflight region and hands it back (as QEMU does).
    pub fn setup_inflight(&mut self) -> Result<()> {
        let req = vhost::vhost_user::message::VhostUserInflight::new(
            0,
            0,
            self.opts.num_queues,
            self.opts.queue_size,
        );
        let (info, file) = self.fe.get_inflight_fd(&req)?;
        self.fe.set_inflight_fd(&info, file.as_raw_fd())?;
        self.inflight = Some((file, info));
        Ok(())
    }

    /// Hands an existing inflight region to the backend (reconnect after a crash).
    pub fn set_inflight(
        &mut self,
        file: File,
        info: vhost::vhost_user::message::VhostUserInflight,
    ) -> Result<()> {
        self.fe.set_inflight_fd(&info, file.as_raw_fd())?;
        self.inflight = Some((file, info));
        Ok(())
    }

    /// Lays out queue `q` in guest memory (rings at a fixed place per queue index: see
    /// [`ring_base`]). A packed ring uses the descriptor table's place for its ring and
    /// the avail and used rings' for the driver's and the device's event areas.
    pub fn add_queue(&mut self, q: u16) -> Result<()> {
        let size = self.opts.queue_size;
        let base = ring_base(q);
        if 16 * u64::from(size) + 6 + 2 * u64::from(size) + 4095 + 6 + 8 * u64::from(size)
            > RING_SPAN
        {
            return Err(HarnessError::Memory(format!(
                "queue size {size} does not fit the harness's {RING_SPAN}-byte ring slots"
            )));
        }
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 4095) & !4095;
        let dq = DriverQueue {
            index: q,
            size,
            desc,
            avail,
            used,
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); usize::from(size)],
            avail_idx: 0,
            last_used: 0,
            kick: EventFd::new(EFD_NONBLOCK)?,
            call: EventFd::new(EFD_NONBLOCK)?,
            packed: self.opts.packed.then(|| PackedDriver::new(size, desc)),
        };
        // Zero the ring headers (and a packed ring, whose flags say what is available).
        for gpa in [avail, used] {
            let _ = self.mem.write_slice(&[0u8; 8], GuestAddress(gpa));
        }
        if self.opts.packed {
            let _ = self
                .mem
                .write_slice(&vec![0u8; 16 * usize::from(size)], GuestAddress(desc));
        }
        if self.queues.len() <= usize::from(q) {
            self.queues.push(dq);
        } else {
            self.queues[usize::from(q)] = dq;
        }
        Ok(())
    }

    fn uaddr(&self, gpa: u64) -> Result<u64> {
        let host = self
            .mem
            .get_host_address(GuestAddress(gpa))
            .map_err(|e| HarnessError::Memory(e.to_string()))?;
        Ok(host as u64)
    }

    /// Sends SET_VRING_NUM/ADDR/BASE/CALL/KICK/ENABLE for queue `q` with base `base`.
    pub fn start_queue_at(&mut self, q: u16, base: u16) -> Result<()> {
        self.send_ring_setup(q, u32::from(base), true)
    }

    /// [`TestFrontend::start_queue_at`] with a 32-bit base (a packed ring's: both
    /// indices with their wrap counters).
    pub fn start_queue_at_base(&mut self, q: u16, base: u32) -> Result<()> {
        self.send_ring_setup(q, base, true)
    }

    /// Starts queue `q` at `base` in QEMU's order for vhost-user-blk-pci after a
    /// (re)connection: NUM, ADDR, BASE, KICK, ENABLE, and no call fd yet (QEMU sends
    /// SET_VRING_CALL only when it unmasks the guest notifiers after the device started:
    /// [`TestFrontend::set_call`]).
    pub fn start_queue_without_call(&mut self, q: u16, base: u16) -> Result<()> {
        self.send_ring_setup(q, u32::from(base), false)
    }

    /// NUM, ADDR, BASE, then CALL if `with_call`, then KICK and ENABLE for queue `q`.
    fn send_ring_setup(&mut self, q: u16, base: u32, with_call: bool) -> Result<()> {
        let (desc, avail, used, size) = {
            let dq = &self.queues[usize::from(q)];
            (dq.desc, dq.avail, dq.used, dq.size)
        };
        let i = usize::from(q);
        self.fe.set_vring_num(i, size)?;
        let cfg = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: self.uaddr(desc)?,
            used_ring_addr: self.uaddr(used)?,
            avail_ring_addr: self.uaddr(avail)?,
            log_addr: None,
        };
        self.fe.set_vring_addr(i, &cfg)?;
        match u16::try_from(base) {
            Ok(b) => self.fe.set_vring_base(i, b)?,
            Err(_) => self.set_vring_base_u32(q, base)?,
        }
        if with_call {
            self.fe.set_vring_call(i, &self.queues[i].call)?;
        }
        self.fe.set_vring_kick(i, &self.queues[i].kick)?;
        self.fe.set_vring_enable(i, true)?;
        Ok(())
    }

    /// SET_VRING_BASE with a 32-bit value, which the vhost crate's frontend cannot send
    /// (it takes a u16): written on the socket by hand, and the REPLY_ACK read back when
    /// negotiated.
    fn set_vring_base_u32(&mut self, q: u16, base: u32) -> Result<()> {
        use std::io::{Read, Write};
        const SET_VRING_BASE: u32 = 10;
        const VERSION: u32 = 1;
        const NEED_REPLY: u32 = 1 << 3;
        let ack = self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK);
        let flags = VERSION | if ack { NEED_REPLY } else { 0 };
        let mut msg = Vec::with_capacity(20);
        for v in [SET_VRING_BASE, flags, 8, u32::from(q), base] {
            msg.extend_from_slice(&v.to_ne_bytes());
        }
        self.sock.write_all(&msg)?;
        if ack {
            let mut reply = [0u8; 20];
            self.sock.read_exact(&mut reply)?;
            let mut status = [0u8; 8];
            status.copy_from_slice(&reply[12..]);
            if u64::from_ne_bytes(status) != 0 {
                return Err(HarnessError::Memory(format!(
                    "the backend refused SET_VRING_BASE {base:#x} for queue {q}"
                )));
            }
        }
        Ok(())
    }

    /// SET_VRING_CALL with queue `q`'s call eventfd.
    pub fn set_call(&mut self, q: u16) -> Result<()> {
        let i = usize::from(q);
        self.fe.set_vring_call(i, &self.queues[i].call)?;
        Ok(())
    }

    /// Starts queue `q` from avail index 0.
    pub fn start_queue(&mut self, q: u16) -> Result<()> {
        self.start_queue_at(q, 0)
    }

    /// Allocates `len` bytes of guest memory (page aligned), zeroed.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let at = self.next_free;
        self.next_free = (at + len + 4095) & !4095;
        assert!(
            self.next_free <= self.opts.mem_size,
            "test guest memory exhausted"
        );
        let _ = self
            .mem
            .write_slice(&vec![0u8; len as usize], GuestAddress(at));
        at
    }

    /// Writes guest memory.
    pub fn write(&self, gpa: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .expect("test wrote outside guest memory");
    }

    /// Reads guest memory.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(gpa))
            .expect("test read outside guest memory");
        v
    }

    /// Submits a chain of `bufs` on queue `q` and kicks; returns the head.
    pub fn submit(&mut self, q: u16, bufs: &[Buf]) -> u16 {
        let dq = &mut self.queues[usize::from(q)];
        let head = dq.add_chain(&self.mem, bufs);
        dq.publish(&self.mem, head);
        dq.notify();
        head
    }

    /// Waits for `n` completions on queue `q` (5 s timeout).
    pub fn wait(&mut self, q: u16, n: usize) -> Result<Vec<Used>> {
        self.queues[usize::from(q)].wait_used(&self.mem, n, Duration::from_secs(5))
    }

    /// Reads `size` bytes of config space.
    pub fn config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>> {
        let buf = vec![0u8; size as usize];
        let (_, data) = self
            .fe
            .get_config(offset, size, VhostUserConfigFlags::WRITABLE, &buf)?;
        Ok(data)
    }

    /// Turns on dirty logging: a log memfd covering all guest memory, then LOG_ALL.
    pub fn enable_dirty_log(&mut self) -> Result<DirtyLogView> {
        let pages = self.opts.mem_size.div_ceil(4096) + 1024;
        let size = pages.div_ceil(8).div_ceil(4096) * 4096;
        let file = memfd(c"test-dirty-log", size)?;
        self.fe.set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: size,
                mmap_offset: 0,
                mmap_handle: file.as_raw_fd(),
            }),
        )?;
        self.fe.set_features(self.features | LOG_ALL)?;
        Ok(DirtyLogView { file, size })
    }

    /// Turns dirty logging off (LOG_ALL cleared).
    pub fn disable_dirty_log(&mut self) -> Result<()> {
        self.fe.set_features(self.features)?;
        Ok(())
    }

    /// Adds a second memory region at `gpa` of `size` bytes with ADD_MEM_REG; returns the
    /// driver's view of it.
    pub fn add_region(&mut self, gpa: u64, size: u64) -> Result<GuestMemoryMmap> {
        let file = memfd(c"test-guest-ram-2", size)?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(gpa),
            size as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| HarnessError::Memory(e.to_string()))?;
        let region = mem
            .find_region(GuestAddress(gpa))
            .ok_or_else(|| HarnessError::Memory("no region".into()))?;
        let info = VhostUserMemoryRegionInfo::from_guest_region(region)?;
        self.fe.add_mem_region(&info)?;
        Ok(mem)
    }

    /// Sends REM_MEM_REG for the region of `mem` (the driver's view returned by
    /// [`TestFrontend::add_region`], or [`TestFrontend::mem`]) that starts at `gpa`.
    pub fn remove_region(&mut self, mem: &GuestMemoryMmap, gpa: u64) -> Result<()> {
        let info = region_info(mem, gpa)?;
        self.fe.remove_mem_region(&info)?;
        Ok(())
    }

    /// Sends ADD_MEM_REG for an existing region of `mem` starting at `gpa` (hot-plugging
    /// back a region removed with [`TestFrontend::remove_region`]).
    pub fn readd_region(&mut self, mem: &GuestMemoryMmap, gpa: u64) -> Result<()> {
        let info = region_info(mem, gpa)?;
        self.fe.add_mem_region(&info)?;
        Ok(())
    }
}

fn region_info(mem: &GuestMemoryMmap, gpa: u64) -> Result<VhostUserMemoryRegionInfo> {
    let region = mem
        .find_region(GuestAddress(gpa))
        .ok_or_else(|| HarnessError::Memory(format!("no region at {gpa:#x}")))?;
    Ok(VhostUserMemoryRegionInfo::from_guest_region(region)?)
}
