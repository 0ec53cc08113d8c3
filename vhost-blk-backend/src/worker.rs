//! The per-queue-group worker: pops chains, parses them, executes them on the disk's I/O
//! engine (io_uring or inline, see `vhost_user_device::engine`) with iovecs pointing
//! straight into guest memory, and completes them when the kernel is done.
//!
//! Every operation owns its buffers (guest memory snapshot, bounce buffer, the buffer of
//! zeros) while the engine has it and hands them back with its completion: a request's
//! buffers live in its `InFlight` record only between operations.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_device::counter::add_single_writer;
use vhost_user_device::engine::{Completion, Engine, Op, Pushed};
use vhost_user_device::rate_limit::RateLimitedLog;
use vhost_user_device::{
    AlignedBuf, Chain, ChainWriter, GuestMem, IovecList, PassEnd, QueueWorker, Ring, RingPass,
    Rings, Segment,
};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::pin::PinnedMemory;
use crate::request::{parse, ByteRange, Parsed, Request};
use crate::shared::{max_request_bytes, BlkQueueStats, BlkShared, Gate};
use crate::spec::{features, status};
use crate::throttle::Dir;

/// The rings a completion may go to: all of the worker's (events, completions) or the
/// one `process_queue` is serving.
trait RingsOf {
    fn ring(&mut self, queue: u16) -> Option<&mut Ring>;
}

impl RingsOf for Rings {
    fn ring(&mut self, queue: u16) -> Option<&mut Ring> {
        self.get_mut(queue)
    }
}

impl RingsOf for Ring {
    fn ring(&mut self, queue: u16) -> Option<&mut Ring> {
        (self.index() == queue).then_some(self)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

/// How a write-zeroes request zeroes its ranges. A success status must mean the ranges
/// read back as zeros, so when a method is unsupported here (EOPNOTSUPP) the request moves
/// on to the next one, down to writing zeros, which works everywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ZeroMethod {
    /// FALLOC_FL_PUNCH_HOLE (the guest allowed deallocation).
    Punch,
    /// FALLOC_FL_ZERO_RANGE: zeroed and still allocated.
    ZeroRange,
    /// A hole, then allocated again (tmpfs has no ZERO_RANGE), linked in order.
    PunchAlloc,
    /// Writes from a shared buffer of zeros (ramfs; block devices without write-zeroes).
    Write,
}

/// Write-zeroes state of one request.
#[derive(Default)]
struct Zeroing {
    method: Option<ZeroMethod>,
    /// Pieces still to write (method Write), each at most ZERO_WRITE_MAX bytes.
    to_write: std::collections::VecDeque<ByteRange>,
    /// An operation of the current method returned EOPNOTSUPP.
    unsupported: bool,
    /// An operation was cancelled because the one it was linked to failed.
    cancelled: bool,
}

/// The buffer of zeros writes point into (every iovec of a zero write points at it).
const ZERO_BUF: usize = 1 << 20;
/// One zero write covers at most this much (64 iovecs of the buffer).
const ZERO_WRITE_MAX: u64 = 64 << 20;

/// A request handed to the kernel.
struct InFlight {
    queue: u16,
    head: u16,
    status_addr: u64,
    kind: Kind,
    /// Operations not yet completed.
    pending: u32,
    status: u8,
    /// Bytes still to transfer for reads/writes (short transfers are resubmitted).
    remaining: u64,
    offset: u64,
    used_len: u32,
    /// Reads and writes: the buffers, here while no operation of the request is in the
    /// engine (an operation carries them meanwhile). A bounce buffer when O_DIRECT
    /// cannot use the guest's buffers as they are.
    bufs: Option<IovecList>,
    /// Reads and writes: the guest's buffers (dirty logging, bounce copies).
    data: Vec<Segment>,
    /// Discard and write-zeroes: the byte ranges.
    ranges: Vec<ByteRange>,
    /// Writes: the byte range, as the request asked (short transfers move `offset`).
    write_range: ByteRange,
    /// Write-zeroes: how the ranges are being zeroed now, and what that learned.
    zeroing: Zeroing,
    /// Keeps guest memory mapped while the kernel may touch it.
    mem: Arc<GuestMem>,
    /// When its I/O started (the queue's latency histogram).
    started: Instant,
}

impl InFlight {
    /// A request of `kind` for chain `head` of `queue` (status byte at `status_addr`),
    /// nothing submitted yet, status OK so far.
    fn new(queue: u16, head: u16, status_addr: u64, kind: Kind, mem: &Arc<GuestMem>) -> Self {
        InFlight {
            queue,
            head,
            status_addr,
            kind,
            pending: 0,
            status: status::OK,
            remaining: 0,
            offset: 0,
            used_len: 1,
            bufs: None,
            data: Vec::new(),
            ranges: Vec::new(),
            write_range: ByteRange { offset: 0, len: 0 },
            zeroing: Zeroing::default(),
            mem: mem.clone(),
            started: Instant::now(),
        }
    }
}

/// A request parsed and held back by the I/O throttle: taken from its ring, not started.
/// At most one per queue (its ring is not read further until it starts).
struct Parked {
    queue: u16,
    head: u16,
    parsed: Parsed,
    since: Instant,
}

/// The virtio-blk queue worker.
pub struct BlkWorker {
    shared: Arc<BlkShared>,
    /// The disk's I/O engine. It owns every operation it has, buffers included, until
    /// the operation completes (and leaks them if dropped before: see its Drop).
    engine: Engine,
    /// Operations the engine did at once (inline), waiting to be handled like reaped
    /// completions.
    done: VecDeque<Completion>,
    /// Zeros for write-zeroes requests that must write them; allocated on first use.
    zeroes: Option<Arc<AlignedBuf>>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    in_flight: Vec<(u16, usize)>,
    /// The most requests this worker had in flight on one queue: the device-wide peak is
    /// only written when this grows.
    in_flight_peak: u64,
    chain: Chain,
    completions: Vec<Completion>,
    to_notify: Vec<u16>,
    log: RateLimitedLog,
    /// Queues that stopped taking chains with some left: at their in-flight limit, or
    /// at the per-call budget. They are taken up again through `more`.
    held: Vec<u16>,
    /// Written to come back to the held queues after the other events are served (and
    /// by the gate when it opens or the I/O limits change).
    more: Arc<EventFd>,
    /// How long a teardown waits for requests still in the kernel (see `Drop`).
    teardown_bound: Duration,
    /// The most data bytes one read or write may carry (`shared::max_request_bytes`).
    max_request: u64,
    /// The driver acked SIZE_MAX: it promised to stay within `max_request`.
    size_max_acked: bool,
    /// Requests waiting for the I/O throttle.
    parked: Vec<Parked>,
    /// A non-blocking CLOCK_MONOTONIC timerfd, armed while requests are parked: when it
    /// fires the worker asks the throttle again.
    timer: OwnedFd,
    /// When `timer` fires (None: disarmed).
    timer_deadline: Option<Instant>,
    /// Writes done on the disk whose completion waits for the mirroring round of their
    /// ticket (`--copy-mode write-blocking`, see [`crate::mirror`]).
    mirror_held: Vec<(u64, InFlight)>,
    /// `--pin-guest-memory`: the guest memory the engine has registered as fixed
    /// buffers, and this worker's share of the locked-memory budget.
    pinned: PinnedMemory,
    /// The engine's fixed-buffer operations already added to the device's counter.
    fixed_ios_counted: u64,
}

/// Chains one call of `process_queue` takes at most, so that a guest that keeps its ring
/// full cannot keep the worker from its completions and commands.
const BUDGET: usize = 256;
/// Operations handed to the kernel at a time while a ring is being read. Submitting once
/// per ring pass held the first requests back until the last was parsed, and io_uring
/// plugs a submission of more than two, so the disk got each pass as one burst. On the
/// project's test machine (a virtio disk, 4k randread QD32, `bench compare blk`) the
/// disk's own await was 311 µs against host fio's 251 and we reached 0.80× fio's IOPS;
/// in pairs the awaits are equal and we reach 0.92-1.0×, for about 0.2 µs more CPU per
/// I/O in system calls (still below fio's own).
const SUBMIT_EVERY: usize = 2;
/// How long a worker being torn down waits for requests still in the kernel before it
/// leaks their memory instead (see `Drop for BlkWorker`). Long: a disk that takes this
/// long is already in trouble, and leaking is the last resort.
const TEARDOWN_BOUND: Duration = Duration::from_secs(30);
/// Index of `more` in [`QueueWorker::event_fds`].
const MORE_FD: usize = 0;
/// Index of the throttle's timer in [`QueueWorker::event_fds`].
const TIMER_FD: usize = 1;
/// Index of the engine's completion fd in [`QueueWorker::event_fds`] (io_uring only).
const ENGINE_FD: usize = 2;

/// A non-blocking CLOCK_MONOTONIC timerfd (created at worker setup, in the main thread).
fn new_timer() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What a request draws from the throttle's buckets. Reads and writes: one request and
/// their data bytes; write-zeroes: one write request and no bytes (no data crosses).
/// Flush, discard, get-id and refused requests are not throttled (as in QEMU, whose
/// throttling sees only reads and writes).
fn throttle_cost(request: &Result<Request, crate::request::RequestError>) -> Option<(Dir, u64)> {
    match request {
        Ok(Request::Read { data, .. }) => Some((Dir::Read, data_bytes(data))),
        Ok(Request::Write { data, .. }) => Some((Dir::Write, data_bytes(data))),
        Ok(Request::WriteZeroes { .. }) => Some((Dir::Write, 0)),
        _ => None,
    }
}

const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

impl BlkWorker {
    /// A worker for `queues`, with its own I/O engine (the kind the disk was given), for
    /// a driver that acked `acked_features`.
    pub fn new(shared: Arc<BlkShared>, queues: &[u16], acked_features: u64) -> io::Result<Self> {
        let entries = u32::from(shared.queue_size).clamp(16, 4096);
        let more = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        shared.gate.register(&more);
        let engine = Engine::new(shared.disk.engine, shared.disk.file().as_fd(), entries)?;
        Ok(Self {
            max_request: max_request_bytes(shared.queue_size),
            size_max_acked: acked_features & features::SIZE_MAX != 0,
            engine,
            done: VecDeque::new(),
            zeroes: None,
            shared,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: queues.iter().map(|&q| (q, 0)).collect(),
            in_flight_peak: 0,
            chain: Chain::default(),
            completions: Vec::with_capacity(64),
            to_notify: Vec::new(),
            log: RateLimitedLog::new(),
            held: Vec::new(),
            more,
            teardown_bound: TEARDOWN_BOUND,
            parked: Vec::new(),
            timer: new_timer()?,
            timer_deadline: None,
            mirror_held: Vec::new(),
            pinned: PinnedMemory::default(),
            fixed_ios_counted: 0,
        })
    }

    fn count(&mut self, queue: u16, delta: isize) {
        if let Some((_, n)) = self.in_flight.iter_mut().find(|(q, _)| *q == queue) {
            *n = n.saturating_add_signed(delta);
            let n = *n as u64;
            if let Some(q) = self.shared.queue_stats.get(usize::from(queue)) {
                // Added to, not overwritten with `n`: requests a previous worker of this
                // queue leaked at teardown stay counted (a hand-over must not think the
                // kernel is done with the disk). A locked add although this worker is the
                // queue's only writer: a hand-over decides on this count, so it does not
                // rest on that rule as the statistics do. Release: a hand-over that sees
                // the request gone sees its dirty marks (retire marks first).
                let d = delta.unsigned_abs() as u64;
                if delta >= 0 {
                    q.in_flight.fetch_add(d, Ordering::Release);
                } else {
                    q.in_flight.fetch_sub(d, Ordering::Release);
                }
            }
            if n > self.in_flight_peak {
                self.in_flight_peak = n;
                self.shared
                    .stats
                    .in_flight_peak
                    .fetch_max(n, Ordering::Relaxed);
            }
        }
    }

    fn alloc_slot(&mut self, req: InFlight) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(req);
                i
            }
            None => {
                self.slots.push(Some(req));
                self.slots.len() - 1
            }
        }
    }

    /// Completes a request that needs no I/O (or was refused) right away.
    fn complete_now(
        &mut self,
        ring: &mut Ring,
        mem: &GuestMem,
        head: u16,
        status_addr: u64,
        st: u8,
        used_len: u32,
    ) {
        if mem.write_obj(st, GuestAddress(status_addr)).is_err() {
            self.shared
                .stats
                .bad_requests
                .fetch_add(1, Ordering::Relaxed);
        }
        ring.add_used(mem, head, used_len);
    }

    /// Asks the throttle whether `parsed` may start now (charging it if so); else how
    /// long until it may ask again.
    fn may_start(&self, parsed: &Parsed) -> Result<(), Duration> {
        if !self.shared.throttle_on.load(Ordering::Relaxed) {
            return Ok(());
        }
        let Some((dir, bytes)) = throttle_cost(&parsed.request) else {
            return Ok(());
        };
        self.shared
            .throttle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .request(dir, bytes, Instant::now())
    }

    /// Arms the timer to fire in `wait`, unless it fires earlier already.
    fn arm_timer(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        if self.timer_deadline.is_some_and(|d| d <= deadline) {
            return;
        }
        // Never all zero: that would disarm it.
        let wait = wait.max(Duration::from_micros(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: wait.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: libc::c_long::from(wait.subsec_nanos() as i32),
            },
        };
        // SAFETY: a valid timerfd and itimerspec; the old value is not asked for.
        let r = unsafe {
            libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut())
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            self.log
                .warn(|| format!("cannot arm the I/O throttle's timer: {e}"));
            return;
        }
        self.timer_deadline = Some(deadline);
    }

    /// Starts the request in `self.chain`. Returns Some(true) if it completed
    /// immediately, Some(false) if it went to the kernel, None if the throttle holds it
    /// (parked; the timer is armed).
    fn start(&mut self, ring: &mut Ring, mem: &Arc<GuestMem>) -> Option<bool> {
        let head = self.chain.head;
        let queue = ring.index();
        let Some(parsed) = parse(mem, &self.chain, &self.shared.geometry) else {
            // No writable byte for the status: give the chain back unanswered.
            self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            self.log.warn(|| {
                format!("queue {queue}: request without a status byte (head {head}) dropped")
            });
            ring.add_used(mem, head, 0);
            return Some(true);
        };
        if let Err(wait) = self.may_start(&parsed) {
            self.shared.stats.throttled.fetch_add(1, Ordering::Relaxed);
            self.shared.stats.parked.fetch_add(1, Ordering::AcqRel);
            self.parked.push(Parked {
                queue,
                head,
                parsed,
                since: Instant::now(),
            });
            self.arm_timer(wait);
            return None;
        }
        Some(self.start_parsed(ring, mem, head, parsed))
    }

    /// Starts the parked request of `p`'s queue, counting its wait.
    fn start_parked(&mut self, ring: &mut Ring, mem: &Arc<GuestMem>, p: Parked) -> bool {
        let waited = p.since.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
        self.shared
            .stats
            .throttle_wait_us
            .fetch_add(waited, Ordering::Relaxed);
        let started = self.start_parsed(ring, mem, p.head, p.parsed);
        // After the start: a hand-over that sees no request parked sees this one in
        // flight (or done).
        self.shared.stats.parked.fetch_sub(1, Ordering::AcqRel);
        started
    }

    /// Starts a parsed request. Returns true if it completed immediately.
    fn start_parsed(
        &mut self,
        ring: &mut Ring,
        mem: &Arc<GuestMem>,
        head: u16,
        parsed: Parsed,
    ) -> bool {
        let queue = ring.index();
        let status_addr = parsed.status_addr;
        let request = match parsed.request {
            Ok(r) => r,
            Err(e) => {
                self.shared
                    .stats
                    .bad_requests
                    .fetch_add(1, Ordering::Relaxed);
                self.count_queue(queue, |q| &q.bad_requests, 1);
                self.log
                    .warn(|| format!("queue {queue}: refusing request (head {head}): {e}"));
                self.complete_now(ring, mem, head, status_addr, e.status(), 1);
                return true;
            }
        };
        let base = |kind| InFlight::new(queue, head, status_addr, kind, mem);
        match request {
            Request::GetId { data } => {
                use std::io::Write;
                // As much of the serial as the buffers hold; a buffer that cannot be
                // written ends it (the used length says how much arrived).
                let mut id = ChainWriter::over(mem, &data);
                let _ = id.write_all(&self.shared.serial);
                let written = id.bytes_written() as u32;
                self.complete_now(ring, mem, head, status_addr, status::OK, written + 1);
                true
            }
            Request::Read { offset, data } | Request::Write { offset, data } if data.is_empty() => {
                let _ = offset;
                self.complete_now(ring, mem, head, status_addr, status::OK, 1);
                true
            }
            Request::Read { data, .. } | Request::Write { data, .. }
                if self.size_max_acked && data_bytes(&data) > self.max_request =>
            {
                // The driver knows the limit (SIZE_MAX and SEG_MAX): a request beyond it
                // is a broken or hostile driver's.
                self.refuse_too_large(queue, head, data_bytes(&data));
                self.complete_now(ring, mem, head, status_addr, status::IOERR, 1);
                true
            }
            Request::Read { offset, data } => {
                let mut req = base(Kind::Read);
                self.prepare_rw(&mut req, mem, offset, data, false);
                self.submit_request(ring, mem, req)
            }
            Request::Write { offset, data } => {
                let mut req = base(Kind::Write);
                self.prepare_rw(&mut req, mem, offset, data, true);
                self.submit_request(ring, mem, req)
            }
            Request::Flush => {
                self.shared.stats.flushes.fetch_add(1, Ordering::Relaxed);
                self.count_queue(queue, |q| &q.flushes, 1);
                let req = base(Kind::Flush);
                self.submit_ops(ring, mem, req, |_| vec![(Op::Flush, false)])
            }
            Request::Discard { ranges } => {
                let mut req = base(Kind::Discard);
                req.ranges = ranges;
                self.submit_ops(ring, mem, req, |req| {
                    req.ranges.iter().map(|r| (punch(r), false)).collect()
                })
            }
            Request::WriteZeroes { ranges, unmap } => {
                let mut req = base(Kind::WriteZeroes);
                let disk = &self.shared.disk;
                let method = if disk.zero_by_writing() {
                    ZeroMethod::Write
                } else if unmap {
                    ZeroMethod::Punch
                } else if disk.zero_range_unsupported() {
                    ZeroMethod::PunchAlloc
                } else {
                    ZeroMethod::ZeroRange
                };
                req.ranges = ranges;
                if method == ZeroMethod::Write {
                    if !self.start_zero_writes(&mut req) {
                        self.complete_now(ring, mem, head, status_addr, status::IOERR, 1);
                        return true;
                    }
                    return self.submit_request(ring, mem, req);
                }
                req.zeroing.method = Some(method);
                self.submit_ops(ring, mem, req, |req| zero_ops(&req.ranges, method))
            }
        }
    }

    /// `--pin-guest-memory`: registers `mem` with the engine's io_uring if it is new
    /// (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG published another table). Operations on
    /// the old memory still in the kernel keep their registration until they complete.
    #[inline]
    fn follow_memory(&mut self, mem: &Arc<GuestMem>) {
        let (Some(budget), Some(uring)) = (&self.shared.pin, self.engine.uring_mut()) else {
            return;
        };
        self.pinned
            .follow(budget, uring, mem, self.shared.num_queues);
    }

    /// Adds the engine's fixed-buffer reads and writes since the last call to the
    /// device's counter.
    #[inline]
    fn count_fixed_ios(&mut self) {
        if self.shared.pin.is_none() {
            return;
        }
        if let Some(u) = self.engine.uring_mut() {
            let n = u.fixed_ops();
            let new = n.saturating_sub(self.fixed_ios_counted);
            if new > 0 {
                self.fixed_ios_counted = n;
                self.shared
                    .stats
                    .fixed_buffer_ios
                    .fetch_add(new, Ordering::Relaxed);
            }
        }
    }

    /// Adds `n` to the counter `which` picks of queue `queue`.
    fn count_queue(&self, queue: u16, which: impl Fn(&BlkQueueStats) -> &AtomicU64, n: u64) {
        if let Some(q) = self.shared.queue_stats.get(usize::from(queue)) {
            // This worker is the queue's only writer.
            add_single_writer(which(q), n);
        }
    }

    /// Counts and logs (rate-limited) a read or write refused for its size.
    fn refuse_too_large(&mut self, queue: u16, head: u16, bytes: u64) {
        let stats = &self.shared.stats;
        stats.too_large.fetch_add(1, Ordering::Relaxed);
        stats.bad_requests.fetch_add(1, Ordering::Relaxed);
        self.count_queue(queue, |q| &q.bad_requests, 1);
        let max = self.max_request;
        self.log.warn(|| {
            format!(
                "queue {queue}: refusing request (head {head}) of {bytes} bytes, more than \
                 the {max} a request may carry (seg_max × size_max)"
            )
        });
    }

    /// Builds the iovecs of a read or write (or a bounce buffer when O_DIRECT cannot use
    /// the guest's buffers as they are).
    fn prepare_rw(
        &mut self,
        req: &mut InFlight,
        mem: &Arc<GuestMem>,
        offset: u64,
        data: Vec<Segment>,
        write: bool,
    ) {
        let total: u64 = data.iter().map(|s| u64::from(s.len)).sum();
        req.offset = offset;
        req.remaining = total;
        req.write_range = ByteRange { offset, len: total };
        req.used_len = if write {
            1
        } else {
            (total as u32).saturating_add(1)
        };
        let disk = &self.shared.disk;
        let guest = match IovecList::from_guest(mem, &data) {
            Ok(list) => list,
            Err(_) => {
                req.status = status::IOERR;
                req.data = data;
                return;
            }
        };
        let aligned = guest.is_aligned(disk.mem_align)
            && offset.is_multiple_of(disk.offset_align)
            && total.is_multiple_of(disk.offset_align);
        if aligned {
            req.bufs = Some(guest);
        } else if total > self.max_request {
            // A driver that did not ack SIZE_MAX may send larger requests; they are served
            // in place when aligned, but a bounce buffer is never larger than the limit
            // (a guest could otherwise have us allocate up to 4 GiB per request).
            self.refuse_too_large(req.queue, req.head, total);
            req.status = status::IOERR;
        } else {
            self.shared.stats.bounced.fetch_add(1, Ordering::Relaxed);
            // Page aligned, which is enough for O_DIRECT anywhere.
            match AlignedBuf::new(total as usize) {
                Some(mut b) => {
                    if write {
                        let mut at = 0usize;
                        for s in &data {
                            let end = at + s.len as usize;
                            if mem
                                .read_slice(&mut b.as_mut_slice()[at..end], GuestAddress(s.addr))
                                .is_err()
                            {
                                req.status = status::IOERR;
                            }
                            at = end;
                        }
                    }
                    req.bufs = Some(IovecList::owned(b));
                }
                None => req.status = status::IOERR,
            }
        }
        req.data = data;
    }

    /// The read or write of what is left of `req`, carrying its buffers.
    fn rw_op(req: &mut InFlight, dsync: bool) -> Op {
        let bufs = req.bufs.take().unwrap_or_else(IovecList::empty);
        if req.kind == Kind::Read {
            Op::Read {
                offset: req.offset,
                bufs,
            }
        } else {
            Op::Write {
                offset: req.offset,
                bufs,
                flags: if dsync { libc::RWF_DSYNC } else { 0 },
            }
        }
    }

    /// Gives `op` of the request in `slot` to the engine; an operation done at once
    /// waits in `done` to be handled like a reaped completion.
    fn push_op(&mut self, op: Op, slot: usize, link: bool) -> io::Result<()> {
        match self.engine.push(op, slot as u64, link)? {
            Pushed::Submitted => {}
            Pushed::Done(c) => self.done.push_back(c),
        }
        Ok(())
    }

    fn submit_request(&mut self, ring: &mut Ring, mem: &GuestMem, mut req: InFlight) -> bool {
        if req.status != status::OK {
            self.complete_now(ring, mem, req.head, req.status_addr, req.status, 1);
            return true;
        }
        if req.kind == Kind::Read {
            self.count_queue(req.queue, |q| &q.reads, 1);
            self.count_queue(req.queue, |q| &q.read_bytes, req.remaining);
        } else if req.kind == Kind::Write {
            self.count_queue(req.queue, |q| &q.writes, 1);
            self.count_queue(req.queue, |q| &q.write_bytes, req.remaining);
        }
        let dsync = !self.shared.writeback.load(Ordering::Relaxed);
        let op = Self::rw_op(&mut req, dsync);
        req.pending = 1;
        let queue = req.queue;
        let slot = self.alloc_slot(req);
        if let Err(e) = self.push_op(op, slot, false) {
            self.fail_unsubmitted(ring, mem, slot, 1, &e);
            return true;
        }
        self.count(queue, 1);
        false
    }

    fn submit_ops(
        &mut self,
        ring: &mut Ring,
        mem: &GuestMem,
        mut req: InFlight,
        ops: impl FnOnce(&InFlight) -> Vec<(Op, bool)>,
    ) -> bool {
        let ops = ops(&req);
        if ops.is_empty() {
            self.complete_now(ring, mem, req.head, req.status_addr, status::OK, 1);
            return true;
        }
        let total = ops.len() as u32;
        req.pending = total;
        let queue = req.queue;
        let slot = self.alloc_slot(req);
        for (pushed, (op, link)) in ops.into_iter().enumerate() {
            if let Err(e) = self.push_op(op, slot, link) {
                self.fail_unsubmitted(ring, mem, slot, total - pushed as u32, &e);
                return true;
            }
        }
        self.count(queue, 1);
        false
    }

    /// A push failed because io_uring_enter itself failed. `unpushed` operations of the
    /// request (the failed one included) will never complete; those already queued will,
    /// so the request finishes (with IOERR) when they do, or now if there are none.
    /// Asks the worker loop to come back to the held queues.
    fn schedule_more(&mut self) {
        if self.more.write(1).is_err() {
            self.log
                .warn(|| "cannot signal the worker's own eventfd".to_string());
        }
    }

    fn fail_unsubmitted(
        &mut self,
        ring: &mut Ring,
        mem: &GuestMem,
        slot: usize,
        unpushed: u32,
        e: &io::Error,
    ) {
        self.log.warn(|| format!("I/O submission failed: {e}"));
        let Some(req) = self.slots.get_mut(slot).and_then(|s| s.as_mut()) else {
            return;
        };
        req.status = status::IOERR;
        req.pending = req.pending.saturating_sub(unpushed);
        if req.pending > 0 {
            self.count(ring.index(), 1);
        } else if let Some(req) = self.slots[slot].take() {
            self.free.push(slot);
            self.complete_now(ring, mem, req.head, req.status_addr, status::IOERR, 1);
        }
    }

    /// Handles one completion; returns the request when it is finished.
    fn on_completion(&mut self, c: Completion) -> Option<InFlight> {
        let (slot, res) = (usize::try_from(c.user_data).ok()?, c.result);
        let dsync = !self.shared.writeback.load(Ordering::Relaxed);
        let req = self.slots.get_mut(slot)?.as_mut()?;
        req.pending = req.pending.saturating_sub(1);
        // The buffers come back with the operation.
        if let Some(bufs) = c.op.into_bufs() {
            req.bufs = Some(bufs);
        }
        if req.kind == Kind::WriteZeroes && req.zeroing.method != Some(ZeroMethod::Write) {
            return self.on_zeroing_completion(slot, res);
        }
        let transfer = matches!(req.kind, Kind::Read | Kind::Write | Kind::WriteZeroes);
        let failed = match req.kind {
            _ if transfer && res > 0 && (res as u64) < req.remaining => {
                // Short transfer: continue where the kernel stopped.
                let n = res as u64;
                req.remaining -= n;
                req.offset += n;
                if let Some(bufs) = req.bufs.as_mut() {
                    bufs.advance(n);
                }
                let op = Self::rw_op(req, dsync);
                req.pending += 1;
                if self.push_op(op, slot, false).is_ok() {
                    return None;
                }
                // The buffers went with the operation that never reached the kernel.
                let req = self.slots.get_mut(slot)?.as_mut()?;
                req.pending -= 1;
                Some(libc::EIO)
            }
            // A zero write finished its piece: on to the next one, if any.
            Kind::WriteZeroes if res >= 0 && (res as u64) == req.remaining => {
                match req.zeroing.to_write.pop_front() {
                    None => None,
                    Some(piece) => {
                        let Some(zeroes) = self.zeroes.as_ref() else {
                            return self.fail_and_take(slot, libc::EIO);
                        };
                        set_zero_write(req, zeroes, piece);
                        let op = Self::rw_op(req, dsync);
                        req.pending += 1;
                        if self.push_op(op, slot, false).is_ok() {
                            return None;
                        }
                        let req = self.slots.get_mut(slot)?.as_mut()?;
                        req.pending -= 1;
                        Some(libc::EIO)
                    }
                }
            }
            _ if transfer && res >= 0 && (res as u64) == req.remaining => None,
            // End of file inside the disk's size: the image shrank under us.
            _ if transfer && res == 0 => Some(libc::EIO),
            // Discard is a hint: a file system that cannot punch holes did nothing wrong.
            Kind::Discard if res == -libc::EOPNOTSUPP => None,
            _ if res < 0 => Some(-res),
            _ => None,
        };
        match failed {
            Some(errno) => self.fail_and_take(slot, errno),
            None => self.take_if_done(slot),
        }
    }

    /// Marks the request failed with `errno` (logged) and returns it if it is finished.
    fn fail_and_take(&mut self, slot: usize, errno: i32) -> Option<InFlight> {
        let req = self.slots.get_mut(slot)?.as_mut()?;
        req.status = status::IOERR;
        let kind = req.kind;
        self.log
            .warn(|| format!("{kind:?} failed: {}", io::Error::from_raw_os_error(errno)));
        self.take_if_done(slot)
    }

    /// A completion of a write-zeroes fallocate. When every operation of the current
    /// method is back and one said EOPNOTSUPP, remember that for the disk and zero the
    /// ranges again with the next method (ZERO_RANGE, then punch + allocate, then writes).
    fn on_zeroing_completion(&mut self, slot: usize, res: i32) -> Option<InFlight> {
        let req = self.slots.get_mut(slot)?.as_mut()?;
        match res {
            r if r >= 0 => {}
            r if r == -libc::EOPNOTSUPP => req.zeroing.unsupported = true,
            // The allocate linked to a punch that failed: decided by the punch's result.
            r if r == -libc::ECANCELED => req.zeroing.cancelled = true,
            r => return self.fail_and_take(slot, -r),
        }
        if req.pending > 0 {
            return None;
        }
        let z = &mut req.zeroing;
        if !z.unsupported {
            return if z.cancelled {
                self.fail_and_take(slot, libc::ECANCELED)
            } else {
                self.take_if_done(slot)
            };
        }
        if req.status != status::OK {
            return self.take_if_done(slot);
        }
        z.unsupported = false;
        z.cancelled = false;
        let disk = &self.shared.disk;
        let next = match z.method {
            Some(ZeroMethod::ZeroRange) => {
                disk.zero_range_unsupported.store(true, Ordering::Relaxed);
                if disk.zero_by_writing() {
                    ZeroMethod::Write
                } else {
                    ZeroMethod::PunchAlloc
                }
            }
            _ => {
                if !disk.zero_by_writing.swap(true, Ordering::Relaxed) {
                    let path = disk.path().display().to_string();
                    log::info!("{path}: fallocate cannot zero here; writing zeros instead");
                }
                ZeroMethod::Write
            }
        };
        let mut req = self.slots.get_mut(slot)?.take()?;
        if next == ZeroMethod::Write {
            if !self.start_zero_writes(&mut req) {
                req.status = status::IOERR;
                self.free.push(slot);
                return Some(req);
            }
            let dsync = !self.shared.writeback.load(Ordering::Relaxed);
            let op = Self::rw_op(&mut req, dsync);
            req.pending = 1;
            self.slots[slot] = Some(req);
            if self.push_op(op, slot, false).is_err() {
                return self.fail_queued(slot, 0);
            }
            return None;
        }
        req.zeroing.method = Some(next);
        let ops = zero_ops(&req.ranges, next);
        req.pending = ops.len() as u32;
        self.slots[slot] = Some(req);
        for (pushed, (op, link)) in ops.into_iter().enumerate() {
            if self.push_op(op, slot, link).is_err() {
                return self.fail_queued(slot, pushed as u32);
            }
        }
        None
    }

    /// A push failed after `queued` operations of the request went in: it fails once
    /// those are back (at once if there are none).
    fn fail_queued(&mut self, slot: usize, queued: u32) -> Option<InFlight> {
        self.slots.get_mut(slot)?.as_mut()?.pending = queued;
        self.fail_and_take(slot, libc::EIO)
    }

    /// Switches `req` to writing zeros: splits its ranges into pieces and points its iovecs
    /// at the first. False when the buffer of zeros cannot be allocated.
    fn start_zero_writes(&mut self, req: &mut InFlight) -> bool {
        if self.zeroes.is_none() {
            self.zeroes = AlignedBuf::new(ZERO_BUF).map(Arc::new);
        }
        let Some(zeroes) = self.zeroes.as_ref() else {
            return false;
        };
        let z = &mut req.zeroing;
        z.method = Some(ZeroMethod::Write);
        z.to_write.clear();
        for r in req.ranges.iter() {
            let mut at = 0;
            while at < r.len {
                let len = (r.len - at).min(ZERO_WRITE_MAX);
                z.to_write.push_back(ByteRange {
                    offset: r.offset + at,
                    len,
                });
                at += len;
            }
        }
        match z.to_write.pop_front() {
            Some(first) => {
                set_zero_write(req, zeroes, first);
                true
            }
            // No ranges: nothing to write (the caller completes it as done).
            None => {
                req.remaining = 0;
                true
            }
        }
    }

    fn take_if_done(&mut self, slot: usize) -> Option<InFlight> {
        if self.slots.get(slot)?.as_ref()?.pending > 0 {
            return None;
        }
        let req = self.slots[slot].take()?;
        self.free.push(slot);
        Some(req)
    }

    /// A request left the kernel: it is no longer in flight, and every block it may have
    /// changed is dirty from now on (before the guest sees the completion; a failed write
    /// may have changed some of its blocks too).
    fn retire(&mut self, req: &InFlight) {
        // Marked before the request stops counting as in flight: a hand-over waits for
        // nothing in flight, then takes the dirty blocks for its last pass, which must
        // see these.
        let dirty = &self.shared.dirty;
        match req.kind {
            Kind::Write => dirty.mark(req.write_range.offset, req.write_range.len),
            Kind::Discard | Kind::WriteZeroes => {
                for r in &req.ranges {
                    dirty.mark(r.offset, r.len);
                }
            }
            Kind::Read | Kind::Flush => {}
        }
        self.count(req.queue, -1);
    }

    /// A request left the kernel: retire it, then complete it to the guest, unless it
    /// changed the disk while a migration mirrors writes: then it waits for its round.
    fn finish(&mut self, rings: &mut impl RingsOf, req: InFlight) {
        self.retire(&req);
        if matches!(req.kind, Kind::Write | Kind::Discard | Kind::WriteZeroes) {
            if let Some(ticket) = self.shared.mirror.ticket() {
                self.mirror_held.push((ticket, req));
                return;
            }
        }
        self.complete_to_guest(rings, req);
    }

    /// Completes the held writes whose round is on the destination, and tells the guest.
    fn release_mirrored(&mut self, rings: &mut impl RingsOf) {
        if self.mirror_held.is_empty() {
            return;
        }
        for (ticket, req) in std::mem::take(&mut self.mirror_held) {
            if self.shared.mirror.is_mirrored(ticket) {
                self.complete_to_guest(rings, req);
            } else {
                self.mirror_held.push((ticket, req));
            }
        }
        self.notify_completed(rings);
    }

    /// Writes back a retired request: dirty log, bounce copy, status, used ring.
    fn complete_to_guest(&mut self, rings: &mut impl RingsOf, req: InFlight) {
        let Some(ring) = rings.ring(req.queue) else {
            // The layer stops a ring only once its requests are done (see its drain), so
            // this is a bug; the disk change is recorded (retire) even then.
            let (queue, head) = (req.queue, req.head);
            self.log.warn(|| {
                format!("queue {queue}: request (head {head}) completed after its ring stopped")
            });
            return;
        };
        let mem = &req.mem;
        let mut st = req.status;
        if st == status::OK && req.kind == Kind::Read {
            match req.bufs.as_ref().and_then(IovecList::owned_buf) {
                Some(b) => {
                    // Copied through vm-memory, which logs the pages itself.
                    let mut at = 0usize;
                    for s in &req.data {
                        let end = at + s.len as usize;
                        let copied = b
                            .as_slice()
                            .get(at..end)
                            .is_some_and(|src| mem.write_slice(src, GuestAddress(s.addr)).is_ok());
                        if !copied {
                            st = status::IOERR;
                        }
                        at = end;
                    }
                }
                None => {
                    // The kernel wrote guest memory behind vm-memory's back: log it by hand,
                    // before the used ring makes the data visible.
                    for s in &req.data {
                        ring.dirty_log().mark(s.addr, s.len as usize);
                    }
                }
            }
        }
        if st != status::OK {
            self.shared.stats.io_errors.fetch_add(1, Ordering::Relaxed);
            self.count_queue(req.queue, |q| &q.io_errors, 1);
        }
        let _ = mem.write_obj(st, GuestAddress(req.status_addr));
        let used_len = if st == status::OK { req.used_len } else { 1 };
        ring.add_used(mem, req.head, used_len);
        if let Some(q) = self.shared.queue_stats.get(usize::from(req.queue)) {
            q.latency.record(req.started.elapsed());
        }
        if !self.to_notify.contains(&req.queue) {
            self.to_notify.push(req.queue);
        }
    }

    fn reap_all(&mut self, rings: &mut Rings) {
        loop {
            self.completions.clear();
            let mut batch = std::mem::take(&mut self.completions);
            if let Err(e) = self.engine.reap(&mut batch) {
                self.log
                    .warn(|| format!("io_uring completion wait failed: {e}"));
            }
            if batch.is_empty() {
                self.completions = batch;
                break;
            }
            for c in batch.drain(..) {
                if let Some(req) = self.on_completion(c) {
                    self.finish(rings, req);
                }
            }
            self.completions = batch;
        }
        self.handle_done(rings);
        if let Err(e) = self.engine.submit() {
            self.log.warn(|| format!("io_uring submit failed: {e}"));
        }
        self.notify_completed(rings);
    }

    /// Handles the operations the engine did at once (and those that handling them did
    /// at once in turn).
    fn handle_done(&mut self, rings: &mut impl RingsOf) {
        while let Some(c) = self.done.pop_front() {
            if let Some(req) = self.on_completion(c) {
                self.finish(rings, req);
            }
        }
    }

    /// Signals the queues that got completions.
    fn notify_completed(&mut self, rings: &mut impl RingsOf) {
        for q in std::mem::take(&mut self.to_notify) {
            if let Some(ring) = rings.ring(q) {
                let mem = ring.memory();
                ring.notify(&mem);
            }
        }
    }

    /// Drain with writes held for mirroring and nothing in the kernel: wait (a little,
    /// the layer's drain calls again) for the job's next round.
    fn wait_for_mirror(&mut self, rings: &mut impl RingsOf) {
        if let Some(first) = self.mirror_held.iter().map(|(t, _)| *t).min() {
            self.shared
                .mirror
                .wait_mirrored(first, Duration::from_millis(10));
        }
        self.release_mirrored(rings);
    }
}

/// Teardown (the worker thread ends: connection closed, device reset, worker failure).
///
/// Requests still in the kernel read or write guest memory, bounce buffers and the buffer
/// of zeros, all of which their operations own inside the engine. Closing an io_uring
/// does not wait for them: the kernel finishes or cancels them later, in its own time, and
/// a write blocked in the file system (frozen, stuck NFS) reads its buffer only when it
/// resumes. So the drop waits for every operation, completing what comes back as far as
/// can be done without the rings (in-flight count, block bitmap; the guest is not told,
/// and with an inflight region the requests stay marked in flight there for a
/// reconnecting backend to resubmit). The wait is bounded (`teardown_bound`): past it the
/// engine, dropped with operations left, leaks them and their memory rather than free
/// it; the worker counts and logs them.
impl Drop for BlkWorker {
    fn drop(&mut self) {
        // The ring goes with the worker (or is leaked with its operations): either way
        // this worker's registration ends here as far as the budget goes.
        if let Some(budget) = &self.shared.pin {
            self.pinned.release(budget);
        }
        self.shared
            .stats
            .parked
            .fetch_sub(self.parked.len() as u64, Ordering::AcqRel);
        let pending = self.slots.iter().flatten().count();
        if pending > 0 {
            self.shared
                .stats
                .teardown_waited
                .fetch_add(pending as u64, Ordering::Relaxed);
            log::warn!(
                "{pending} request(s) still in the kernel at worker teardown; waiting for \
                 them (at most {:?}) before freeing their memory",
                self.teardown_bound
            );
            self.wait_for_the_kernel();
        }
        let left = self.slots.iter().flatten().count();
        if left == 0 {
            return;
        }
        self.shared
            .stats
            .teardown_leaked
            .fetch_add(left as u64, Ordering::Relaxed);
        log::error!(
            "{left} request(s) did not leave the kernel within {:?} of the worker's \
             teardown; leaking their guest memory mappings and buffers, and the io_uring, \
             rather than freeing memory the kernel may still use",
            self.teardown_bound
        );
    }
}

impl BlkWorker {
    /// Reaps until no operation is in the kernel or `teardown_bound` has passed.
    fn wait_for_the_kernel(&mut self) {
        let deadline = Instant::now() + self.teardown_bound;
        let mut batch = Vec::new();
        while self.slots.iter().any(Option::is_some) {
            if let Err(e) = self.engine.submit() {
                self.log
                    .warn(|| format!("teardown: io_uring submit failed: {e}"));
            }
            self.engine.clear_event();
            if let Err(e) = self.engine.reap(&mut batch) {
                self.log
                    .warn(|| format!("teardown: io_uring reap failed: {e}"));
            }
            batch.extend(self.done.drain(..));
            let progress = !batch.is_empty();
            for c in batch.drain(..) {
                // Short transfers and further write-zeroes pieces are resubmitted as
                // usual: the request is done only when the kernel is done with it.
                if let Some(req) = self.on_completion(c) {
                    self.retire(&req);
                }
            }
            if progress {
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            let Some(fd) = self.engine.event_fd() else {
                // Nothing can come back from an engine without operations in the kernel.
                return;
            };
            // Sleep until a completion (the eventfd) or, at the latest, the deadline.
            let ms = (deadline - now).as_millis().clamp(1, 100) as i32;
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, ms) };
        }
    }
}

/// Data bytes of a read or write.
fn data_bytes(data: &[Segment]) -> u64 {
    data.iter().map(|s| u64::from(s.len)).sum()
}

fn punch(r: &ByteRange) -> Op {
    Op::Fallocate {
        mode: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
        offset: r.offset,
        len: r.len,
    }
}

/// The fallocate operations zeroing `ranges` with `method` (not Write), with their links.
fn zero_ops(ranges: &[ByteRange], method: ZeroMethod) -> Vec<(Op, bool)> {
    let fallocate = |mode, r: &ByteRange| Op::Fallocate {
        mode: mode | FALLOC_FL_KEEP_SIZE,
        offset: r.offset,
        len: r.len,
    };
    let mut ops = Vec::with_capacity(ranges.len() * 2);
    for r in ranges {
        match method {
            ZeroMethod::Punch | ZeroMethod::Write => ops.push((punch(r), false)),
            ZeroMethod::ZeroRange => ops.push((fallocate(FALLOC_FL_ZERO_RANGE, r), false)),
            ZeroMethod::PunchAlloc => {
                ops.push((punch(r), true));
                ops.push((fallocate(0, r), false));
            }
        }
    }
    ops
}

/// Points `req`'s buffers at the buffer of zeros, as often as the piece `piece` needs.
fn set_zero_write(req: &mut InFlight, zeroes: &Arc<AlignedBuf>, piece: ByteRange) {
    req.offset = piece.offset;
    req.remaining = piece.len;
    req.bufs = Some(IovecList::repeated(zeroes, piece.len));
}

impl QueueWorker for BlkWorker {
    fn event_fds(&self) -> Vec<RawFd> {
        // Order matters: MORE_FD, TIMER_FD and ENGINE_FD are indices into this.
        let mut fds = vec![self.more.as_raw_fd(), self.timer.as_raw_fd()];
        fds.extend(self.engine.event_fd());
        fds
    }

    fn poll_duration(&self) -> Option<std::time::Duration> {
        self.shared.poll
    }

    fn process_queue(&mut self, queue: u16, rings: &mut Rings) {
        let Some(ring) = rings.get_mut(queue) else {
            return;
        };
        let mem = ring.memory();
        // A driver cannot have more chains outstanding than its ring holds; one that
        // re-posts heads still in flight gets no more than that.
        // Every request this call starts, it starts under the pass (see Gate).
        let Some(_pass) = Gate::enter(&self.shared) else {
            // The image is not ready (an incoming sync, a hand-over): the requests wait
            // in the ring until the gate opens and writes `more`.
            if !self.held.contains(&queue) {
                self.held.push(queue);
            }
            return;
        };
        // New guest memory is registered before any request on it is pushed.
        self.follow_memory(&mem);
        let limit = usize::from(self.shared.queue_size);
        let mut completed_now = false;
        let mut taken = 0usize;
        // A request the throttle held goes first (the ring keeps its order behind it).
        if let Some(i) = self.parked.iter().position(|p| p.queue == queue) {
            if let Err(wait) = self.may_start(&self.parked[i].parsed) {
                self.arm_timer(wait);
                return;
            }
            let p = self.parked.swap_remove(i);
            taken += 1;
            completed_now |= self.start_parked(ring, &mem, p);
            self.handle_done(ring);
        }
        let mut pass = RingPass::new(BUDGET - taken);
        loop {
            if self.in_flight(queue) >= limit {
                // Kicks stay off: we come back through `more` when completions make room.
                pass.hold(ring, &mem);
                if !self.held.contains(&queue) {
                    self.held.push(queue);
                }
                break;
            }
            if !pass.pop(ring, &mem, &mut self.chain) {
                if pass.end() == PassEnd::Budget {
                    // Kicks stay off: we come back through `more`, right after the
                    // other events.
                    if !self.held.contains(&queue) {
                        self.held.push(queue);
                    }
                    self.schedule_more();
                }
                break;
            }
            let started = self.start(ring, &mem);
            if self.engine.unsubmitted() >= SUBMIT_EVERY {
                if let Err(e) = self.engine.submit() {
                    self.log.warn(|| format!("io_uring submit failed: {e}"));
                }
            }
            // What the engine did at once (inline) completes now, before the next chain:
            // the in-flight limit counts only what is really in flight.
            if !self.done.is_empty() {
                self.handle_done(ring);
            }
            match started {
                Some(done) => completed_now |= done,
                // Held by the throttle: kicks stay off, the timer brings us back.
                None => break,
            }
        }
        if let Err(e) = self.engine.submit() {
            self.log.warn(|| format!("io_uring submit failed: {e}"));
        }
        self.count_fixed_ios();
        // Requests finished on the way (by the engine or refused) were added to the used
        // ring: one notification for all of them.
        if let Some(i) = self.to_notify.iter().position(|&q| q == queue) {
            self.to_notify.swap_remove(i);
            completed_now = true;
        }
        if completed_now {
            ring.notify(&mem);
        }
    }

    fn handle_event(&mut self, fd_index: usize, rings: &mut Rings) {
        if fd_index == TIMER_FD {
            let mut expirations = [0u8; 8];
            // SAFETY: reads at most 8 bytes into the buffer; non-blocking.
            let _ = unsafe {
                libc::read(
                    self.timer.as_raw_fd(),
                    expirations.as_mut_ptr().cast(),
                    expirations.len(),
                )
            };
            self.timer_deadline = None;
            let queues: Vec<u16> = self.parked.iter().map(|p| p.queue).collect();
            for queue in queues {
                if let Some(ring) = rings.get_mut(queue) {
                    if ring.is_enabled() && !ring.is_broken() {
                        self.process_queue(queue, rings);
                    }
                }
            }
            return;
        }
        if fd_index == MORE_FD {
            let _ = self.more.read();
            // A mirroring round landed (or mirroring stopped): complete what waited.
            self.release_mirrored(rings);
            // The held queues, and those with a parked request (the limits changed).
            let mut queues = std::mem::take(&mut self.held);
            for p in &self.parked {
                if !queues.contains(&p.queue) {
                    queues.push(p.queue);
                }
            }
            for queue in queues {
                if let Some(ring) = rings.get_mut(queue) {
                    if ring.is_enabled() && !ring.is_broken() {
                        self.process_queue(queue, rings);
                    }
                }
            }
            return;
        }
        debug_assert_eq!(fd_index, ENGINE_FD);
        self.engine.clear_event();
        self.reap_all(rings);
        // Completions made room on a queue held at its in-flight limit.
        let limit = usize::from(self.shared.queue_size);
        if self.held.iter().any(|&q| self.in_flight(q) < limit) {
            self.schedule_more();
        }
    }

    fn in_flight(&self, queue: u16) -> usize {
        self.in_flight
            .iter()
            .find(|(q, _)| *q == queue)
            .map_or(0, |(_, n)| *n)
            + self.parked.iter().filter(|p| p.queue == queue).count()
            + self
                .mirror_held
                .iter()
                .filter(|(_, r)| r.queue == queue)
                .count()
    }

    fn wait_completions(&mut self, rings: &mut Rings) -> io::Result<()> {
        // A ring stops (drain): requests the throttle holds start now, whatever the
        // limits (as QEMU's drain restarts its throttled requests).
        if !self.parked.is_empty() {
            for p in std::mem::take(&mut self.parked) {
                let Some(ring) = rings.get_mut(p.queue) else {
                    self.parked.push(p);
                    continue;
                };
                let mem = ring.memory();
                let mut completed = self.start_parked(ring, &mem, p);
                self.handle_done(ring);
                if let Some(i) = self.to_notify.iter().position(|&q| q == ring.index()) {
                    self.to_notify.swap_remove(i);
                    completed = true;
                }
                if completed {
                    ring.notify(&mem);
                }
            }
            if !self.slots.iter().any(Option::is_some) {
                return Ok(());
            }
        }
        if !self.slots.iter().any(Option::is_some) {
            // Nothing in the kernel: what is left waits for the mirroring job.
            if !self.mirror_held.is_empty() {
                self.wait_for_mirror(rings);
            }
            return Ok(());
        }
        self.engine.submit_and_wait(1)?;
        self.engine.clear_event();
        self.reap_all(rings);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use std::path::PathBuf;
    use std::sync::mpsc;

    use vhost::vhost_user::message::VhostUserMemoryRegion;
    use vhost_user_device::dirty_log::DirtyLog;
    use vhost_user_device::memory::MemoryTable;
    use vm_memory::GuestAddressSpace;

    use vhost_tests::freeze::FreezableFs;

    const LEN: u32 = 64 << 10;
    /// 1 MiB of guest memory (a memfd mapping, as a frontend's would be).
    fn guest_memory() -> Arc<GuestMem> {
        // SAFETY: valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"blk-worker-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(1 << 20).expect("size");
        let mut table = MemoryTable::new(DirtyLog::new());
        table
            .add_region(
                &VhostUserMemoryRegion::new(0, 1 << 20, 0x7000_0000_0000, 0),
                file,
            )
            .expect("region");
        table.atomic().memory().into_inner()
    }

    /// A worker on an image in `fs`, with one write of LEN bytes of `fill` from guest
    /// memory submitted (the guest memory is referenced only by the request).
    fn worker_with_a_write(image: &std::path::Path, fill: u8, bound: Duration) -> BlkWorker {
        let shared = crate::shared::test_shared(image);
        let mut w = BlkWorker::new(shared, &[0], 0).expect("worker");
        w.teardown_bound = bound;
        let mem = guest_memory();
        mem.write_slice(&vec![fill; LEN as usize], GuestAddress(0x1000))
            .expect("fill guest memory");
        let mut req = InFlight::new(0, 0, 0, Kind::Write, &mem);
        let seg = Segment {
            addr: 0x1000,
            len: LEN,
            writable: false,
        };
        w.prepare_rw(&mut req, &mem, 0, vec![seg], true);
        assert_eq!(req.status, status::OK);
        req.pending = 1;
        let op = BlkWorker::rw_op(&mut req, false);
        let slot = w.alloc_slot(req);
        w.push_op(op, slot, false).expect("push");
        w.count(0, 1);
        w.engine.submit().expect("submit");
        w
    }

    fn image_in(fs: &FreezableFs) -> PathBuf {
        let image = fs.path().join("disk.img");
        File::create(&image)
            .and_then(|f| f.set_len(1 << 20))
            .expect("image");
        image
    }

    fn read_image(image: &std::path::Path) -> Vec<u8> {
        let mut v = vec![0u8; LEN as usize];
        use std::os::unix::fs::FileExt;
        File::open(image)
            .and_then(|f| f.read_exact_at(&mut v, 0))
            .expect("read image");
        v
    }

    fn skip_unless_root(name: &str) -> bool {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED {name}: needs root (mounts and freezes an ext4 on a loop device)");
            return true;
        }
        false
    }

    /// A worker torn down (connection closed, reset, failure) while a write waits in the
    /// kernel must not free the guest memory the write reads from: its drop waits for the
    /// write, and the data written is the guest's.
    #[test]
    fn a_worker_torn_down_with_a_write_in_the_kernel_waits_for_it() {
        if skip_unless_root("a_worker_torn_down_with_a_write_in_the_kernel_waits_for_it") {
            return;
        }
        let mut fs = FreezableFs::new();
        let image = image_in(&fs);
        fs.freeze();
        let (tx, rx) = mpsc::channel();
        let path = image.clone();
        // Built, used and dropped on one thread, like the worker thread (a DEFER_TASKRUN
        // ring belongs to the thread that enabled it). Not joined before the thaw: a
        // thread that submitted io_uring work cannot exit while that work is in the kernel.
        let t = std::thread::spawn(move || {
            let w = worker_with_a_write(&path, 0x5a, Duration::from_secs(20));
            let shared = w.shared.clone();
            let _ = tx.send(None);
            drop(w);
            let _ = tx.send(Some(shared));
        });
        assert!(rx.recv().expect("write submitted").is_none());
        let early = rx.recv_timeout(Duration::from_millis(500)).ok().flatten();
        let dropped_early = early.is_some();
        fs.thaw();
        let shared = match early {
            Some(shared) => shared,
            None => match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(Some(shared)) => shared,
                _ => panic!("the worker drop did not return after the thaw"),
            },
        };
        t.join().expect("worker thread");
        assert!(
            !dropped_early,
            "the worker was dropped (guest memory unmapped) with a write still in the kernel"
        );
        assert_eq!(shared.stats.teardown_waited.load(Ordering::Relaxed), 1);
        assert_eq!(shared.stats.teardown_leaked.load(Ordering::Relaxed), 0);
        assert_eq!(shared.in_flight(), 0);
        assert!(shared.dirty.is_dirty(0), "the written block is marked");
        assert_eq!(read_image(&image), vec![0x5a; LEN as usize]);
    }

    /// When the write outlasts the bound, the drop gives up waiting but leaks the memory
    /// (and the ring) instead of freeing it: after the thaw the kernel still reads the
    /// guest's data from it, and the process is unharmed.
    #[test]
    fn a_teardown_that_outlasts_its_bound_leaks_instead_of_freeing() {
        if skip_unless_root("a_teardown_that_outlasts_its_bound_leaks_instead_of_freeing") {
            return;
        }
        let mut fs = FreezableFs::new();
        let image = image_in(&fs);
        fs.freeze();
        let path = image.clone();
        let started = Instant::now();
        let (tx, rx) = mpsc::channel();
        let t = std::thread::spawn(move || {
            let w = worker_with_a_write(&path, 0xa5, Duration::from_millis(300));
            let shared = w.shared.clone();
            drop(w);
            let _ = tx.send(shared);
        });
        let shared = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the worker drop returned");
        let took = started.elapsed();
        assert_eq!(
            shared.stats.teardown_leaked.load(Ordering::Relaxed),
            1,
            "the request still in the kernel was not leaked (dropped after {took:?})"
        );
        assert!(took >= Duration::from_millis(300), "gave up after {took:?}");
        fs.thaw();
        t.join().expect("worker thread");
        let deadline = Instant::now() + Duration::from_secs(10);
        while read_image(&image) != vec![0xa5; LEN as usize] {
            assert!(
                Instant::now() < deadline,
                "the write did not land with the guest's data after the thaw"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
