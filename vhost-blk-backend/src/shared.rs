//! What the device and its queue workers share: the limits the device advertises and the
//! workers enforce, the counters, the disk and its migration state ([`BlkShared`]), and the
//! gate that holds requests while the image is not ready.
//!
//! It lives apart from `device` (what the driver is offered, how workers are built) and
//! `worker` (the data path) so that each of those depends on it and neither on the other.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use vmm_sys_util::eventfd::EventFd;

use crate::dirty::DirtyBitmap;
use crate::dirty_file::{Checkpoint, DirtyFile};
use crate::disk::Disk;
use crate::mirror::Mirror;
use crate::pin::PinBudget;
use crate::request::DiskGeometry;
use crate::spec::{Config, ID_BYTES, SECTOR_SIZE};
use crate::throttle::{Limits, Throttle};

/// Largest discard / write-zeroes segment we advertise, in sectors (2 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Most discard / write-zeroes segments per request.
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// The kernel's limit on iovecs per readv/writev.
pub const MAX_IOVECS: usize = 1024;
/// Largest data segment we advertise (VIRTIO_BLK_F_SIZE_MAX): 128 KiB.
///
/// Linux's virtio_blk makes seg_max its max_segments and size_max its max_segment_size
/// and leaves the request size itself unlimited (max_hw_sectors), so one request carries
/// at most seg_max × size_max bytes; that product bounds what one request can make us
/// allocate (a bounce buffer when O_DIRECT cannot use the guest's buffers in place).
/// 128 KiB is at least the page size of every Linux guest (64 KiB on some arm64 and
/// ppc64 kernels; older kernels raise a smaller segment limit to the page size, which
/// would break the promise), and with `seg_max` below it allows requests of 15.75 MiB
/// (128-entry ring) to 31.75 MiB, far above what Linux sends by default (max_sectors_kb
/// is 1280 KiB), so guests do not split more than before.
pub const SIZE_MAX_BYTES: u32 = 128 << 10;
/// Most data segments per request we advertise (SEG_MAX), whatever the ring size: QEMU's
/// own virtio-blk default (its default 256-entry ring minus the header and status
/// descriptors). Enough for a 1 MiB request in scattered 4 KiB pages.
pub const SEG_MAX_CAP: u32 = 254;

/// The seg_max we advertise for rings of `queue_size` entries: a request's data
/// descriptors plus its header and status must fit the ring (without indirect tables).
pub fn seg_max(queue_size: u16) -> u32 {
    u32::from(queue_size.saturating_sub(2)).clamp(1, SEG_MAX_CAP)
}

/// The most data bytes one read or write may carry: seg_max × size_max (see
/// SIZE_MAX_BYTES). Larger requests are refused when the driver acked SIZE_MAX, and
/// never get a bounce buffer.
pub fn max_request_bytes(queue_size: u16) -> u64 {
    u64::from(seg_max(queue_size)) * u64::from(SIZE_MAX_BYTES)
}
/// Device counters, readable from the process.
#[derive(Debug, Default)]
pub struct BlkStats {
    /// Flush requests.
    pub flushes: AtomicU64,
    /// Requests refused after parsing (bad header, range, direction, limits...).
    pub bad_requests: AtomicU64,
    /// Requests that failed in the kernel.
    pub io_errors: AtomicU64,
    /// Chains without a status byte, returned unanswered.
    pub dropped: AtomicU64,
    /// O_DIRECT requests that needed a bounce buffer (unaligned guest buffers).
    pub bounced: AtomicU64,
    /// Reads and writes issued on an io_uring fixed buffer (`--pin-guest-memory`).
    pub fixed_buffer_ios: AtomicU64,
    /// Read/write requests refused for carrying more data than the advertised limit
    /// (seg_max × size_max; see `max_request_bytes`).
    pub too_large: AtomicU64,
    /// The most requests ever in flight at once on one queue.
    pub in_flight_peak: AtomicU64,
    /// Requests still in the kernel when their worker was torn down (it waits for them).
    pub teardown_waited: AtomicU64,
    /// Of those, requests that did not complete within the teardown bound: their memory
    /// (guest memory mapping, bounce buffer) was leaked rather than freed under the kernel.
    pub teardown_leaked: AtomicU64,
    /// Requests that had to wait for the I/O throttle (`--iops-limit` & co.).
    pub throttled: AtomicU64,
    /// Their total wait, in microseconds.
    pub throttle_wait_us: AtomicU64,
    /// Requests the I/O throttle holds now: taken from their rings, not started (a
    /// hand-over has them start before it closes the gate).
    pub parked: AtomicU64,
}

/// Counters of one request queue (the device-wide [`BlkStats`] count the same requests
/// for all queues; reads, writes, their bytes and what is in flight are only counted here
/// and summed by [`BlkShared::totals`]).
///
/// The queue's worker is the only thread that adds to them, on the data path, without a
/// locked instruction ([`vhost_user_device::counter::add_single_writer`]), except
/// `in_flight`, which a hand-over decides on.
#[derive(Debug, Default)]
pub struct BlkQueueStats {
    /// Requests handed to the kernel and not yet retired (a locked add, with Release
    /// after retiring marks the dirty bitmap: see [`BlkShared::in_flight`]).
    pub in_flight: AtomicU64,
    /// Read requests submitted.
    pub reads: AtomicU64,
    /// Write requests submitted.
    pub writes: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Flush requests.
    pub flushes: AtomicU64,
    /// Requests refused after parsing.
    pub bad_requests: AtomicU64,
    /// Requests that failed in the kernel.
    pub io_errors: AtomicU64,
    /// Latency of the requests that went to the disk (reads, writes, flushes, discards,
    /// write-zeroes): from the start of their I/O (after any throttle wait) to their
    /// completion to the guest (after any wait for active mirroring).
    pub latency: vhost_user_device::histogram::LatencyHistogram,
}

/// Device-wide sums of the per-queue request counters ([`BlkShared::totals`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoTotals {
    /// Read requests submitted.
    pub reads: u64,
    /// Write requests submitted.
    pub writes: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
}

/// Options the device is built from (the command line).
#[derive(Clone, Debug)]
pub struct BlkOptions {
    /// Number of request queues.
    pub num_queues: u16,
    /// Ring size (power of two).
    pub queue_size: u16,
    /// Logical block size shown to the guest.
    pub block_size: u32,
    /// GET_ID answer (up to 20 bytes).
    pub serial: String,
    /// Adaptive polling window of each queue worker in microseconds (0: never poll).
    pub poll_us: u32,
    /// Where completed writes, discards and write-zeroes are marked (the persistent one
    /// from `--dirty-bitmap`); None: a new, clean one at 4 KiB granularity.
    pub dirty: Option<Arc<DirtyBitmap>>,
    /// `--pin-guest-memory`: register guest memory as io_uring fixed buffers (see
    /// [`crate::pin`]).
    pub pin_guest_memory: bool,
}

/// State shared by the device and its workers.
#[derive(Debug)]
pub struct BlkShared {
    /// The backing disk.
    pub disk: Disk,
    /// What request parsing checks against.
    pub geometry: DiskGeometry,
    /// GET_ID answer, zero padded.
    pub serial: [u8; ID_BYTES],
    /// Writeback cache on (the guest may switch it off through CONFIG_WCE).
    pub writeback: AtomicBool,
    /// Ring size.
    pub queue_size: u16,
    /// Number of queues.
    pub num_queues: u16,
    /// Logical block size.
    pub block_size: u32,
    /// Counters.
    pub stats: BlkStats,
    /// Counters per request queue.
    pub queue_stats: Vec<BlkQueueStats>,
    /// Adaptive polling window of each queue worker (None: sleep whenever idle).
    pub poll: Option<std::time::Duration>,
    /// Blocks changed since the last sync (block migration).
    pub dirty: Arc<DirtyBitmap>,
    /// Holds requests while the image is not ready (incoming migration).
    pub gate: Gate,
    /// Checkpoint and incoming-sync state.
    pub sync: Mutex<SyncState>,
    /// What the VMM is doing (LOG_ALL, rings started).
    pub vmm: Mutex<VmmState>,
    /// The disk was handed over to a destination: requests are held until the VM runs
    /// here again (rings restarted: the VMM's migration failed).
    pub handed_over: AtomicBool,
    /// After a hand-over: tells the destination its copy is stale (the source took the
    /// disk back). Set by the migration job; called at most once.
    pub revoke: Mutex<Option<Revoke>>,
    /// Active mirroring (a migration job in write-blocking mode): writes complete only
    /// once their blocks are on the destination.
    pub mirror: Mirror,
    /// The I/O limits of the disk, shared by every queue (`set-io-throttle` changes them).
    pub throttle: Mutex<Throttle>,
    /// Some limit is set (else the workers do not look at `throttle`).
    pub throttle_on: AtomicBool,
    /// `--pin-guest-memory` in effect: the locked-memory budget the workers register
    /// guest memory within (None: no fixed buffers).
    pub pin: Option<PinBudget>,
}

/// Tells a destination its copy is stale, with the reason (set by the migration job,
/// which owns the connection; the device only calls it).
pub struct Revoke(pub Box<dyn FnOnce(&str) + Send>);

impl std::fmt::Debug for Revoke {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Revoke")
    }
}

impl BlkShared {
    /// Requests handed to the kernel and not yet retired, all queues. Acquire: who sees
    /// a request gone also sees the dirty marks its retirement made.
    pub fn in_flight(&self) -> u64 {
        // Saturating: a counter gone wrong must read as busy, never wrap the sum to 0.
        self.queue_stats
            .iter()
            .map(|q| q.in_flight.load(Ordering::Acquire))
            .fold(0, u64::saturating_add)
    }

    /// Reads, writes and their bytes over all queues.
    pub fn totals(&self) -> IoTotals {
        let mut t = IoTotals::default();
        for q in &self.queue_stats {
            t.reads += q.reads.load(Ordering::Relaxed);
            t.writes += q.writes.load(Ordering::Relaxed);
            t.read_bytes += q.read_bytes.load(Ordering::Relaxed);
            t.write_bytes += q.write_bytes.load(Ordering::Relaxed);
        }
        t
    }

    /// The state of a device serving `disk` as `opts` say.
    pub fn new(disk: Disk, opts: &BlkOptions) -> Self {
        let size = disk.size;
        let mut serial = [0u8; ID_BYTES];
        let bytes = opts.serial.as_bytes();
        let n = bytes.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&bytes[..n]);
        let geometry = DiskGeometry {
            size: disk.size,
            read_only: disk.read_only,
            max_discard_seg: MAX_DISCARD_SEGMENTS,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_SEGMENTS,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_data_segments: MAX_IOVECS,
        };
        let pin = PinBudget::for_disk(&disk, opts.pin_guest_memory);
        BlkShared {
            pin,
            disk,
            geometry,
            serial,
            writeback: AtomicBool::new(true),
            queue_size: opts.queue_size,
            num_queues: opts.num_queues,
            block_size: opts.block_size,
            stats: BlkStats::default(),
            queue_stats: (0..opts.num_queues)
                .map(|_| BlkQueueStats::default())
                .collect(),
            poll: (opts.poll_us > 0)
                .then(|| std::time::Duration::from_micros(u64::from(opts.poll_us))),
            dirty: opts
                .dirty
                .clone()
                .unwrap_or_else(|| Arc::new(DirtyBitmap::at_default_granularity(size))),
            gate: Gate::new_open(),
            sync: Mutex::new(SyncState {
                // Without --dirty-bitmap the identity lives as long as the process.
                checkpoint: Checkpoint::new_identity().unwrap_or(Checkpoint {
                    image_id: [0; 16],
                    generation: 0,
                }),
                file: None,
                incomplete: false,
            }),
            vmm: Mutex::new(VmmState::default()),
            handed_over: AtomicBool::new(false),
            revoke: Mutex::new(None),
            mirror: Mirror::new(),
            throttle: Mutex::new(Throttle::new(Limits::default(), std::time::Instant::now())),
            throttle_on: AtomicBool::new(false),
        }
    }

    /// The VM runs here again after the disk was handed over (the VMM's migration
    /// failed): tell the destination its copy is stale, and serve the disk. The dirty
    /// bitmap records what changes from now on, so the next sync sends exactly that.
    pub fn take_back(&self, why: &str) {
        if !self.handed_over.swap(false, Ordering::AcqRel) {
            return;
        }
        let revoke = self.revoke.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(Revoke(revoke)) = revoke {
            revoke(why);
        }
        self.gate.open();
    }

    /// Sets the I/O limits (checked by the caller with `Limits::check`).
    pub fn set_io_limits(&self, limits: Limits) {
        let mut t = self.throttle.lock().unwrap_or_else(|e| e.into_inner());
        t.set_limits(limits, std::time::Instant::now());
        self.throttle_on
            .store(!limits.unlimited(), Ordering::Relaxed);
        drop(t);
        // Requests parked under the old limits may go now (their timer may be far off).
        self.gate.wake();
    }

    /// The I/O limits in force.
    pub fn io_limits(&self) -> Limits {
        self.throttle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .limits()
    }
}

/// Holds the guest's requests while the image is not ready to be served (a destination
/// before its incoming sync has landed, a source handing the disk over): they wait in the
/// ring, they do not fail.
///
/// A worker takes requests only inside a [`GatePass`] ([`Gate::enter`]), and a source
/// handing over waits, after [`Gate::close`], until no pass is left ([`Gate::is_quiet`])
/// and nothing is in flight. The pass is counted before the gate is looked at, and the
/// gate closed before the passes are counted (all SeqCst), so either the worker sees the
/// gate closed or the job sees its pass: no request starts unseen after the job looked.
/// (Looking at the gate alone, a worker that found it open an instant before it closed
/// could start a write after the job's last pass: a completed write the destination
/// would not have.)
#[derive(Debug)]
pub struct Gate {
    open: AtomicBool,
    /// Passes held: workers taking requests from their rings.
    passes: AtomicUsize,
    /// The workers' own eventfds, written when the gate opens so they take up the rings
    /// they held.
    wakers: Mutex<Vec<Weak<EventFd>>>,
}

/// A worker's leave to take requests, while it lives (see [`Gate`]).
#[must_use]
#[derive(Debug)]
pub struct GatePass(Arc<BlkShared>);

impl Drop for GatePass {
    fn drop(&mut self) {
        // Release: what the worker did under the pass (requests counted in flight, blocks
        // marked dirty) is seen by whoever sees the pass gone.
        self.0.gate.passes.fetch_sub(1, Ordering::Release);
    }
}

impl Gate {
    /// An open gate (the usual case).
    pub fn new_open() -> Self {
        Self {
            open: AtomicBool::new(true),
            passes: AtomicUsize::new(0),
            wakers: Mutex::new(Vec::new()),
        }
    }

    /// A worker is about to take requests from `shared`'s rings: a pass while the gate is
    /// open, None when it is closed (the requests wait).
    pub fn enter(shared: &Arc<BlkShared>) -> Option<GatePass> {
        let gate = &shared.gate;
        gate.passes.fetch_add(1, Ordering::SeqCst);
        if gate.open.load(Ordering::SeqCst) {
            Some(GatePass(shared.clone()))
        } else {
            gate.passes.fetch_sub(1, Ordering::Release);
            None
        }
    }

    /// No worker holds a pass. After [`Gate::close`], once quiet, no request starts
    /// until the gate opens again: with nothing in flight, the image no longer changes.
    pub fn is_quiet(&self) -> bool {
        self.passes.load(Ordering::SeqCst) == 0
    }

    /// Whether requests may be served.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Holds requests from now on (those a worker is taking under a pass still start).
    pub fn close(&self) {
        self.open.store(false, Ordering::SeqCst);
    }

    /// Serves requests from now on, and wakes the workers holding some.
    pub fn open(&self) {
        self.open.store(true, Ordering::Release);
        self.wake();
    }

    /// Wakes every worker: they look at their held and throttled requests again.
    pub fn wake(&self) {
        let mut wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        wakers.retain(|w| match w.upgrade() {
            Some(efd) => {
                let _ = efd.write(1);
                true
            }
            None => false,
        });
    }

    /// Registers a worker's eventfd to be written when the gate opens (or the I/O limits
    /// change).
    pub fn register(&self, waker: &Arc<EventFd>) {
        let mut wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        wakers.retain(|w| w.strong_count() > 0);
        wakers.push(Arc::downgrade(waker));
    }
}

/// Where the image stands for block migration: the checkpoint of its last completed sync
/// and whether an incoming sync is unfinished.
#[derive(Debug)]
pub struct SyncState {
    /// Image identity and sync generation.
    pub checkpoint: Checkpoint,
    /// The persistent bitmap file (`--dirty-bitmap`), written at every checkpoint.
    pub file: Option<DirtyFile>,
    /// An incoming sync started and did not complete: the image is not to be served.
    pub incomplete: bool,
}

impl BlkShared {
    /// The config space as the driver sees it now.
    pub fn config(&self) -> Config {
        let s = self;
        let align = s.block_size / SECTOR_SIZE as u32;
        let (discard_sectors, discard_seg) = if s.disk.read_only {
            (0, 0)
        } else {
            (MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS)
        };
        Config {
            capacity: s.disk.size / SECTOR_SIZE,
            size_max: SIZE_MAX_BYTES,
            seg_max: seg_max(s.queue_size),
            blk_size: s.block_size,
            min_io_size: 1,
            writeback: u8::from(s.writeback.load(Ordering::Relaxed)),
            num_queues: s.num_queues,
            max_discard_sectors: discard_sectors,
            max_discard_seg: discard_seg,
            discard_sector_alignment: align,
            max_write_zeroes_sectors: discard_sectors,
            max_write_zeroes_seg: discard_seg,
            write_zeroes_may_unmap: 1,
            ..Default::default()
        }
    }
}

/// What the VMM is doing, as far as block migration cares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmmState {
    /// LOG_ALL is on: the VMM is migrating the VM's RAM.
    pub log_all: bool,
    /// Started rings (bit per queue).
    pub started: u64,
    /// A ring has run on this connection.
    pub ever_started: bool,
}

impl VmmState {
    /// The VMM is migrating and has paused the guest (every ring stopped): the moment
    /// to hand the disk over.
    pub fn switching_over(&self) -> bool {
        self.log_all && self.ever_started && self.started == 0
    }
}

/// The unit tests' shared state: `image` (which exists), one queue of 16, 512-byte blocks.
#[cfg(test)]
pub(crate) fn test_shared(image: &std::path::Path) -> Arc<BlkShared> {
    test_shared_queues(image, 1)
}

/// [`test_shared`] with `num_queues` queues.
#[cfg(test)]
pub(crate) fn test_shared_queues(image: &std::path::Path, num_queues: u16) -> Arc<BlkShared> {
    let disk = Disk::open(image, false, crate::CacheMode::None, 512).expect("disk");
    Arc::new(BlkShared::new(
        disk,
        &BlkOptions {
            num_queues,
            queue_size: 16,
            block_size: 512,
            serial: String::new(),
            poll_us: 0,
            dirty: None,
            pin_guest_memory: false,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1 MiB image in `dir`.
    fn image(dir: &std::path::Path) -> std::path::PathBuf {
        let image = dir.join("disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(1 << 20))
            .expect("image");
        image
    }

    fn shared(dir: &std::path::Path) -> Arc<BlkShared> {
        test_shared(&image(dir))
    }

    #[test]
    fn requests_in_flight_are_summed_over_queues_and_a_wrong_count_reads_as_busy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = test_shared_queues(&image(dir.path()), 2);
        assert_eq!(s.in_flight(), 0);
        s.queue_stats[0].in_flight.store(3, Ordering::Release);
        s.queue_stats[1].in_flight.store(2, Ordering::Release);
        assert_eq!(s.in_flight(), 5);
        // A counter that went below zero must not wrap the sum to 0 (a hand-over waits
        // for 0).
        s.queue_stats[0]
            .in_flight
            .store(u64::MAX, Ordering::Release);
        s.queue_stats[1].in_flight.store(1, Ordering::Release);
        assert_eq!(s.in_flight(), u64::MAX);
    }

    #[test]
    fn a_pass_is_had_only_while_open_and_a_closed_gate_is_quiet_once_passes_are_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = shared(dir.path());
        assert!(s.gate.is_quiet());
        let pass = Gate::enter(&s).expect("a pass at an open gate");
        s.gate.close();
        // A worker that got its pass before the close may still be starting requests.
        assert!(!s.gate.is_quiet(), "a pass taken before the close counts");
        assert!(Gate::enter(&s).is_none(), "no pass once closed");
        assert!(!s.gate.is_quiet(), "a refused pass leaves no count behind");
        drop(pass);
        assert!(s.gate.is_quiet());
        s.gate.open();
        let _pass = Gate::enter(&s).expect("a pass once open again");
        assert!(!s.gate.is_quiet());
    }
}
