//! A started virtqueue as a worker sees it: the split ring, its eventfds, the guest memory
//! it lives in, inflight tracking and the dirty log.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::EventFd;

use crate::chain::{self, Chain, ChainError, Origin};
use crate::counter::add_single_writer;
use crate::dirty_log::DirtyLog;
use crate::inflight::InflightQueue;
use crate::memory::{GuestMem, GuestMemAtomic};
use crate::packed::{PackedFault, PackedRing, Popped, VIRTIO_F_RING_PACKED};
use crate::rate_limit::RateLimitedLog;

/// Counters of one queue, shared with whoever reports statistics. The thread holding the
/// ring is the only one that adds to them ([`crate::counter::add_single_writer`]).
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Chains taken from the avail ring (or resubmitted).
    pub chains: AtomicU64,
    /// Chains put on the used ring.
    pub completed: AtomicU64,
    /// Interrupts sent to the guest.
    pub notifications: AtomicU64,
    /// Malformed chains (bad indices, loops, addresses outside memory, bad indirect tables).
    pub bad_chains: AtomicU64,
    /// Chains resubmitted from the inflight region after a reconnect.
    pub resubmitted: AtomicU64,
    /// Times the ring was found broken (avail index more than the ring size ahead of the
    /// device, an avail ring virtio-queue refuses or memory that cannot be read) and parked
    /// until the frontend restarts it.
    pub broken: AtomicU64,
}

/// The driver asks for no interrupts (avail ring flags; used without event_idx).
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Malformed chains [`Ring::pop`] skips in one round (see [`Ring::begin_round`]).
///
/// Skipping a malformed chain costs a walk of up to a whole descriptor table (an indirect
/// one holds up to 65535 entries), and a guest can fill a ring of 32768 entries with such
/// chains. Without a bound one kick would keep the worker on that ring for all of them,
/// with its other rings, its completions and the protocol thread's commands (a
/// GET_VRING_BASE waiting for its reply) left waiting. 64 keeps a round short and costs a
/// well-behaved guest nothing: it never posts a malformed chain.
pub const BAD_CHAINS_PER_ROUND: u32 = 64;

/// One log for broken rings across all queues and connections: a frontend that restarts a
/// broken ring in a loop must not flood the host log either.
static BROKEN_LOG: Mutex<RateLimitedLog> = Mutex::new(RateLimitedLog::new());

/// Why a started ring can no longer be processed (the frontend must restart it).
#[derive(Debug, thiserror::Error)]
pub enum RingFault {
    /// The driver claims more new chains than the ring holds: a broken or hostile driver.
    #[error(
        "avail index {avail} is {ahead} entries ahead of the device (at {next}), more than \
         the ring size {size}"
    )]
    TooFarAhead {
        /// The avail index the driver wrote.
        avail: u16,
        /// The device's next avail index.
        next: u16,
        /// How far ahead that is.
        ahead: u16,
        /// Ring size.
        size: u16,
    },
    /// virtio-queue refused the ring (e.g. an avail ring at guest address 0) or could not
    /// read it.
    #[error("virtio-queue cannot use the ring: {0}")]
    Queue(#[source] virtio_queue::Error),
    /// The avail ring announced an entry that could not be read (the memory went away, or
    /// the avail index went back).
    #[error("avail ring entry {0} cannot be read")]
    Entry(u16),
    /// A packed ring that cannot be read or has a chain without an end.
    #[error("packed ring: {0}")]
    Packed(#[from] PackedFault),
}

/// A started ring, owned by exactly one worker thread while started.
pub struct Ring {
    index: u16,
    queue: Queue,
    /// The packed ring when VIRTIO_F_RING_PACKED was negotiated; `queue` then only holds
    /// the size (see [`crate::packed`]).
    packed: Option<PackedRing>,
    mem: GuestMemAtomic,
    log: Arc<DirtyLog>,
    pub(crate) kick: EventFd,
    call: Option<EventFd>,
    /// The frontend's VRING_ERR eventfd, signalled when the ring breaks.
    err: Option<EventFd>,
    pub(crate) enabled: bool,
    /// Found broken: parked (nothing popped, no more work reported) until restarted.
    broken: bool,
    /// Malformed chains skipped in the current round.
    bad_in_round: u32,
    /// The round skipped its share of malformed chains: nothing more is popped or
    /// reported as work until the next round, which the worker starts on its own.
    round_spent: bool,
    /// The avail index last read; chains up to it are known to be there, so the avail
    /// index is read again only once the device caught up with it.
    known_avail: u16,
    inflight: Option<InflightQueue>,
    resubmit: VecDeque<u16>,
    acked_features: u64,
    event_idx: bool,
    /// Used elements published since the last notification decision (event_idx).
    added_since_notify: u16,
    /// Used elements were published since the ring started (see [`Ring::resync_call`]).
    published: bool,
    stats: Arc<QueueStats>,
    bad_chain_log: RateLimitedLog,
}

/// The rings a worker owns, by position in its group.
pub struct Rings {
    pub(crate) slots: Vec<(u16, Option<Ring>)>,
}

impl Rings {
    /// No ring started yet for any of `queues`.
    pub(crate) fn new(queues: Vec<u16>) -> Self {
        Self {
            slots: queues.into_iter().map(|q| (q, None)).collect(),
        }
    }

    /// A group of rings already started, for a harness that drives a
    /// [`crate::QueueWorker`] itself instead of through the layer's worker thread (fuzz
    /// targets, tests).
    pub fn from_started(rings: impl IntoIterator<Item = Ring>) -> Self {
        Self {
            slots: rings.into_iter().map(|r| (r.index(), Some(r))).collect(),
        }
    }

    /// The started ring of `queue`, if this worker owns it.
    pub fn get_mut(&mut self, queue: u16) -> Option<&mut Ring> {
        self.slots
            .iter_mut()
            .find(|(q, _)| *q == queue)
            .and_then(|(_, r)| r.as_mut())
    }

    pub(crate) fn slot_of(&self, queue: u16) -> Option<usize> {
        self.slots.iter().position(|(q, _)| *q == queue)
    }

    /// Iterates over the started rings.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Ring> {
        self.slots.iter_mut().filter_map(|(_, r)| r.as_mut())
    }
}

/// Everything needed to start a ring, gathered by the protocol handler.
pub struct RingSetup {
    /// Queue index.
    pub index: u16,
    /// Ring size negotiated with SET_VRING_NUM.
    pub size: u16,
    /// Largest size the device allows.
    pub max_size: u16,
    /// Guest-physical addresses of descriptor table, avail ring, used ring.
    pub desc: u64,
    /// Avail ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// SET_VRING_BASE: the avail index to start from (split), or both indices with their
    /// wrap counters (packed: [`crate::packed::PackedBase`]).
    pub base: u32,
    /// VIRTIO_RING_F_EVENT_IDX negotiated.
    pub event_idx: bool,
    /// All acked virtio features.
    pub acked_features: u64,
    /// Kick eventfd.
    pub kick: EventFd,
    /// Call eventfd, if any.
    pub call: Option<EventFd>,
    /// Error eventfd (SET_VRING_ERR), if any.
    pub err: Option<EventFd>,
    /// Whether the ring starts enabled.
    pub enabled: bool,
    /// Inflight tracking, if the frontend set up a region.
    pub inflight: Option<InflightQueue>,
    /// Guest memory.
    pub mem: GuestMemAtomic,
    /// Dirty log.
    pub log: Arc<DirtyLog>,
    /// Counters.
    pub stats: Arc<QueueStats>,
}

/// Why a ring could not start.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The size or addresses are not acceptable to virtio-queue.
    #[error("queue {index}: invalid ring configuration: {reason}")]
    Invalid {
        /// Queue index.
        index: u16,
        /// What was wrong.
        reason: String,
    },
}

impl Ring {
    /// Builds and validates a ring; reads the used index from guest memory and applies
    /// inflight recovery.
    pub fn start(mut setup: RingSetup) -> Result<Self, RingError> {
        let index = setup.index;
        let invalid = |reason: String| RingError::Invalid { index, reason };
        let mut queue = Queue::new(setup.max_size).map_err(|e| invalid(e.to_string()))?;
        queue
            .try_set_size(setup.size)
            .map_err(|e| invalid(format!("size {}: {e}", setup.size)))?;
        if setup.acked_features & VIRTIO_F_RING_PACKED != 0 {
            return Self::start_packed(setup, queue);
        }
        let base = u16::try_from(setup.base)
            .map_err(|_| invalid(format!("vring base {:#x} above 0xffff", setup.base)))?;
        queue
            .try_set_desc_table_address(GuestAddress(setup.desc))
            .map_err(|e| invalid(format!("descriptor table {:#x}: {e}", setup.desc)))?;
        queue
            .try_set_avail_ring_address(GuestAddress(setup.avail))
            .map_err(|e| invalid(format!("avail ring {:#x}: {e}", setup.avail)))?;
        queue
            .try_set_used_ring_address(GuestAddress(setup.used))
            .map_err(|e| invalid(format!("used ring {:#x}: {e}", setup.used)))?;
        queue.set_event_idx(setup.event_idx);
        queue.set_ready(true);
        let mem = setup.mem.memory();
        if !queue.is_valid(&*mem) {
            return Err(invalid("rings are not inside guest memory".into()));
        }
        let used_idx = queue
            .used_idx(&*mem, Ordering::Acquire)
            .map_err(|e| invalid(format!("cannot read used index: {e}")))?
            .0;
        queue.set_next_used(used_idx);
        queue.set_next_avail(base);
        let mut inflight = setup.inflight.take();
        let mut resubmit = VecDeque::new();
        if let Some(infl) = inflight.as_mut() {
            let rec = infl.recover(used_idx);
            if let Some(next) = rec.next_avail {
                if next != base {
                    log::info!(
                        "queue {index}: continuing from avail index {next} (frontend said {}), \
                         resubmitting {} in-flight request(s)",
                        base,
                        rec.resubmit.len()
                    );
                }
                queue.set_next_avail(next);
            }
            resubmit.extend(rec.resubmit);
        }
        drop(mem);
        let known_avail = queue.next_avail();
        Ok(Self::assemble(
            setup,
            queue,
            None,
            known_avail,
            inflight,
            resubmit,
        ))
    }

    /// The started ring from its checked parts (split: `packed` None; packed: no inflight
    /// region, nothing to resubmit).
    fn assemble(
        setup: RingSetup,
        queue: Queue,
        packed: Option<PackedRing>,
        known_avail: u16,
        inflight: Option<InflightQueue>,
        resubmit: VecDeque<u16>,
    ) -> Self {
        Self {
            index: setup.index,
            queue,
            packed,
            mem: setup.mem,
            log: setup.log,
            kick: setup.kick,
            call: setup.call,
            err: setup.err,
            enabled: setup.enabled,
            broken: false,
            bad_in_round: 0,
            round_spent: false,
            known_avail,
            inflight,
            resubmit,
            acked_features: setup.acked_features,
            event_idx: setup.event_idx,
            added_since_notify: 0,
            published: false,
            stats: setup.stats,
            bad_chain_log: RateLimitedLog::new(),
        }
    }

    /// [`Ring::start`] for a packed ring: `queue` carries only the size.
    ///
    /// Inflight tracking is split-only: the INFLIGHT_SHMFD region of a packed ring has
    /// another layout (vhost-user.rst's `QueueRegionPacked`), which is not implemented. The
    /// frontend asks for the region before it acks the ring format, so it is not refused;
    /// the packed ring runs without it, and says so: requests in flight when this
    /// process dies are not resubmitted by the next.
    fn start_packed(setup: RingSetup, queue: Queue) -> Result<Self, RingError> {
        let index = setup.index;
        let mem = setup.mem.memory();
        let packed = PackedRing::new(
            &mem,
            setup.size,
            setup.desc,
            setup.avail,
            setup.used,
            setup.base,
            setup.event_idx,
        )
        .map_err(|e| RingError::Invalid {
            index,
            reason: e.to_string(),
        })?;
        drop(mem);
        if setup.inflight.is_some() {
            log::warn!(
                "queue {index}: packed ring: inflight tracking (INFLIGHT_SHMFD) is implemented \
                 for split rings only: if this backend dies under I/O, its successor cannot \
                 resubmit what was in flight and the guest's I/O on this queue may hang; use \
                 split rings (QEMU: packed=off, the default) where backend restarts matter"
            );
        }
        Ok(Self::assemble(
            setup,
            queue,
            Some(packed),
            0,
            None,
            VecDeque::new(),
        ))
    }

    /// Whether this is a packed ring (VIRTIO_F_RING_PACKED).
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// What GET_VRING_BASE reports: the next avail index (split), or both indices with
    /// their wrap counters (packed).
    pub fn vring_base(&self) -> u32 {
        match &self.packed {
            Some(p) => p.base().to_vring_base(),
            None => u32::from(self.queue.next_avail()),
        }
    }

    /// Queue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Ring size.
    pub fn size(&self) -> u16 {
        self.queue.size()
    }

    /// Acked virtio features.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the ring is enabled (a started but disabled ring must not be processed).
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The avail index we will read next. On a packed ring, which has no such index,
    /// the count of chains taken (less those given back), which moves the same way.
    pub fn next_avail(&self) -> u16 {
        match &self.packed {
            Some(p) => p.popped(),
            None => self.queue.next_avail(),
        }
    }

    /// A snapshot of guest memory; keep it for as long as the kernel may touch buffers.
    pub fn memory(&self) -> Arc<GuestMem> {
        self.mem.memory().into_inner()
    }

    /// The dirty log, for writes made behind vm-memory's back (io_uring).
    pub fn dirty_log(&self) -> &Arc<DirtyLog> {
        &self.log
    }

    /// Counters.
    pub fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }

    /// Whether the ring was found broken and is parked until the frontend restarts it.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Starts a new round: [`Ring::pop`] may skip another [`BAD_CHAINS_PER_ROUND`]
    /// malformed chains. The layer's worker calls this before each `process_queue` it
    /// makes (kick, start, enable, and its own return to a ring whose round was spent),
    /// so devices need not; chains a device pops on its own events count towards the
    /// round in progress.
    pub fn begin_round(&mut self) {
        self.bad_in_round = 0;
        self.round_spent = false;
    }

    /// Whether this round skipped its share of malformed chains and chains may be left:
    /// [`Ring::pop`] and [`Ring::enable_notification`] report nothing until the next
    /// round, which the layer's worker starts without waiting for a kick. A device that
    /// acts on "the ring is empty" (rather than only stopping) must check this.
    pub fn round_spent(&self) -> bool {
        self.round_spent
    }

    /// Suppresses guest kicks while we drain the ring.
    pub fn disable_notification(&mut self, mem: &GuestMem) {
        if let (false, Some(p)) = (self.broken, &self.packed) {
            p.disable_notification(mem);
        } else if !self.broken {
            let _ = self.queue.disable_notification(mem);
        }
    }

    /// Re-enables kicks; returns true if new chains arrived meanwhile (process again).
    /// Never true for a broken ring: callers loop on it, and a ring [`Ring::pop`] cannot
    /// take from would otherwise be reported as having work for ever. Nor once the round
    /// is spent ([`Ring::round_spent`]): the chains left would be reported as work and
    /// the caller would loop through them all in this round after all. Kicks then stay
    /// as the caller left them (off while it drains): the worker comes back on its own.
    pub fn enable_notification(&mut self, mem: &GuestMem) -> bool {
        if self.broken || self.round_spent {
            return false;
        }
        if let Some(p) = &self.packed {
            return match p.enable_notification(mem) {
                Ok(more) => more,
                Err(fault) => {
                    self.park(fault.into());
                    false
                }
            };
        }
        match self.queue.enable_notification(mem) {
            Ok(more) => more,
            Err(e) => {
                self.park(RingFault::Queue(e));
                false
            }
        }
    }

    /// Takes the next chain: first chains to resubmit after a reconnect, then the avail
    /// ring. Malformed chains are returned to the guest with length 0, counted and logged,
    /// and the next chain is tried, up to [`BAD_CHAINS_PER_ROUND`] in a round: then the
    /// round is spent ([`Ring::round_spent`]) and nothing more is taken until the next
    /// ([`Ring::begin_round`]). A ring that cannot be read at all is parked
    /// ([`Ring::is_broken`]) and yields nothing more.
    pub fn pop(&mut self, mem: &GuestMem, chain: &mut Chain) -> bool {
        if self.broken || self.round_spent {
            return false;
        }
        if self.packed.is_some() {
            return self.pop_packed(mem, chain);
        }
        loop {
            let at = self.queue.next_avail();
            let (head, resubmitted) = match self.resubmit.pop_front() {
                Some(h) => (h, true),
                None => match self.next_avail_head(mem) {
                    Ok(Some(h)) => (h, false),
                    Ok(None) => return false,
                    Err(fault) => {
                        self.park(fault);
                        return false;
                    }
                },
            };
            if !resubmitted {
                if let Some(infl) = self.inflight.as_mut() {
                    infl.begin(head);
                }
            } else {
                add_single_writer(&self.stats.resubmitted, 1);
            }
            add_single_writer(&self.stats.chains, 1);
            match chain::walk(mem, self.queue.desc_table(), self.queue.size(), head, chain) {
                Ok(()) => {
                    chain.origin = if resubmitted {
                        Origin::Resubmitted
                    } else {
                        Origin::Avail(at)
                    };
                    return true;
                }
                Err(e) => {
                    self.reject_chain(mem, head, e);
                    self.bad_in_round += 1;
                    if self.bad_in_round >= BAD_CHAINS_PER_ROUND {
                        self.round_spent = true;
                        return false;
                    }
                }
            }
        }
    }

    /// [`Ring::pop`] on a packed ring (no resubmissions: see [`Ring::start_packed`]).
    fn pop_packed(&mut self, mem: &GuestMem, chain: &mut Chain) -> bool {
        let Some(packed) = self.packed.as_mut() else {
            return false;
        };
        loop {
            let at = packed.popped();
            let popped = packed.pop(mem, chain);
            match popped {
                Ok(Popped::Empty) => return false,
                Ok(Popped::Chain) => {
                    chain.origin = Origin::Avail(at);
                    add_single_writer(&self.stats.chains, 1);
                    return true;
                }
                Ok(Popped::Bad { id, count, error }) => {
                    add_single_writer(&self.stats.chains, 1);
                    self.stats.bad_chains.fetch_add(1, Ordering::Relaxed);
                    let index = self.index;
                    self.bad_chain_log.warn(|| {
                        format!("queue {index}: dropping malformed chain (buffer id {id}): {error}")
                    });
                    if packed.add_used_counted(mem, id, 0, count).is_ok() {
                        self.added_since_notify = self.added_since_notify.wrapping_add(1);
                        add_single_writer(&self.stats.completed, 1);
                    }
                    self.bad_in_round += 1;
                    if self.bad_in_round >= BAD_CHAINS_PER_ROUND {
                        self.round_spent = true;
                        return false;
                    }
                }
                Err(fault) => {
                    self.park(fault.into());
                    return false;
                }
            }
        }
    }

    /// The head of the next chain on the avail ring; None if the ring is empty.
    ///
    /// virtio-queue's `pop_descriptor_chain` answers None both for an empty ring and for one
    /// it refuses (avail index more than the ring size ahead, avail ring at address 0,
    /// unreadable memory), while `enable_notification` keeps reporting work on the latter:
    /// callers popping until empty would spin. So emptiness is decided here from the avail
    /// index, and any failure after that is a fault.
    fn next_avail_head(&mut self, mem: &GuestMem) -> Result<Option<u16>, RingFault> {
        let next = self.queue.next_avail();
        if next == self.known_avail {
            let avail = self
                .queue
                .avail_idx(mem, Ordering::Acquire)
                .map_err(RingFault::Queue)?
                .0;
            let ahead = avail.wrapping_sub(next);
            if ahead == 0 {
                return Ok(None);
            }
            let size = self.queue.size();
            if ahead > size {
                return Err(RingFault::TooFarAhead {
                    avail,
                    next,
                    ahead,
                    size,
                });
            }
            self.known_avail = avail;
        }
        let mut iter = self.queue.iter(mem).map_err(RingFault::Queue)?;
        match iter.next() {
            Some(c) => Ok(Some(c.head_index())),
            None => Err(RingFault::Entry(next)),
        }
    }

    /// Parks a broken ring: counted, logged, reported to the frontend (VRING_ERR), and
    /// left alone until the frontend restarts it (a new ring replaces this one).
    fn park(&mut self, fault: RingFault) {
        self.broken = true;
        self.stats.broken.fetch_add(1, Ordering::Relaxed);
        let index = self.index;
        BROKEN_LOG
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .warn(|| {
                format!("queue {index}: ring is broken ({fault}); parked until the frontend restarts it")
            });
        if let Some(err) = &self.err {
            let _ = err.write(1);
        }
    }

    fn reject_chain(&mut self, mem: &GuestMem, head: u16, e: ChainError) {
        self.stats.bad_chains.fetch_add(1, Ordering::Relaxed);
        let index = self.index;
        self.bad_chain_log
            .warn(|| format!("queue {index}: dropping malformed chain (head {head}): {e}"));
        if head < self.queue.size() {
            self.add_used(mem, head, 0);
        }
    }

    /// Puts `head` on the used ring with `len` bytes written.
    pub fn add_used(&mut self, mem: &GuestMem, head: u16, len: u32) {
        if self.packed.is_some() {
            return self.add_used_batch(mem, &[(head, len)]);
        }
        if let Some(infl) = self.inflight.as_mut() {
            infl.before_used(head);
        }
        if let Err(e) = self.queue.add_used(mem, head, len) {
            let index = self.index;
            self.bad_chain_log
                .warn(|| format!("queue {index}: cannot write used ring: {e}"));
            return;
        }
        if let Some(infl) = self.inflight.as_mut() {
            infl.after_used(head, self.queue.next_used());
        }
        self.added_since_notify = self.added_since_notify.wrapping_add(1);
        add_single_writer(&self.stats.completed, 1);
    }

    /// Puts several chains on the used ring and publishes them with one used-index update,
    /// so the driver sees them together (virtio-net's mergeable receive buffers need this:
    /// the driver reads `num_buffers` buffers as soon as it sees the first).
    pub fn add_used_batch(&mut self, mem: &GuestMem, used: &[(u16, u32)]) {
        use vm_memory::Bytes;
        if let Some(p) = self.packed.as_mut() {
            match p.add_used(mem, used) {
                Ok(added) => {
                    self.added_since_notify = self.added_since_notify.wrapping_add(added);
                    add_single_writer(&self.stats.completed, u64::from(added));
                }
                Err(e) => {
                    let index = self.index;
                    self.bad_chain_log
                        .warn(|| format!("queue {index}: cannot write used ring: {e}"));
                }
            }
            return;
        }
        let size = self.queue.size();
        let ring = self.queue.used_ring();
        let mut next = self.queue.next_used();
        for &(head, len) in used {
            if head >= size {
                continue;
            }
            if let Some(infl) = self.inflight.as_mut() {
                infl.before_used(head);
            }
            let slot = u64::from(next % size);
            let at = GuestAddress(ring + 4 + 8 * slot);
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            elem[4..].copy_from_slice(&len.to_le_bytes());
            if mem.write_slice(&elem, at).is_err() {
                let index = self.index;
                self.bad_chain_log
                    .warn(|| format!("queue {index}: cannot write used ring"));
                return;
            }
            next = next.wrapping_add(1);
        }
        std::sync::atomic::fence(Ordering::Release);
        if mem
            .store(next.to_le(), GuestAddress(ring + 2), Ordering::Release)
            .is_err()
        {
            return;
        }
        let added = next.wrapping_sub(self.queue.next_used());
        self.added_since_notify = self.added_since_notify.wrapping_add(added);
        self.queue.set_next_used(next);
        for &(head, _) in used {
            if let Some(infl) = self.inflight.as_mut() {
                infl.after_used(head, next);
            }
        }
        add_single_writer(&self.stats.completed, u64::from(added));
    }

    /// Gives back chains taken with [`Ring::pop`] that the device did not use (nothing
    /// written to them, not on the used ring), e.g. receive buffers cached for frames that
    /// never came when the ring stops. Returns how many were completed with length 0
    /// instead of going back unseen: the caller notifies the guest if any were.
    ///
    /// Chains resubmitted from the inflight region go back to the front of the
    /// resubmission queue. Chains from the avail ring go back by rewinding the avail
    /// index, which returns exactly the last positions taken: so only those of the given
    /// chains that are the last positions taken, without a gap, go back that way. A gap is
    /// a chain the device completed after them, or a malformed chain `pop` skipped on its
    /// way (already on the used ring: rewinding over it would walk and complete it a second
    /// time, and give the driver a head it does not own). The chains before a gap are put
    /// on the used ring with length 0, which gives them back to the driver just as well.
    /// Chains not taken from this ring ([`Origin::Detached`]) are ignored.
    pub fn give_back<'a>(
        &mut self,
        mem: &GuestMem,
        chains: impl IntoIterator<Item = &'a Chain>,
    ) -> usize {
        // On a packed ring, the count of chains taken (see `next_avail`).
        let next = self.next_avail();
        // (how far back from `next`, head) of the chains from the avail ring.
        let mut avail: Vec<(u16, u16)> = Vec::new();
        let mut resubmitted: Vec<u16> = Vec::new();
        for c in chains {
            match c.origin {
                Origin::Avail(at) => avail.push((next.wrapping_sub(at), c.head)),
                Origin::Resubmitted => resubmitted.push(c.head),
                Origin::Detached => {}
            }
        }
        for head in resubmitted.into_iter().rev() {
            self.resubmit.push_front(head);
        }
        avail.sort_unstable();
        avail.dedup_by_key(|(back, _)| *back);
        // The run of positions next-1, next-2, ... goes back by rewinding.
        let rewind = avail
            .iter()
            .enumerate()
            .take_while(|(i, (back, _))| usize::from(*back) == i + 1)
            .count();
        for &(_, head) in &avail[..rewind] {
            if let Some(infl) = self.inflight.as_mut() {
                // Taken again later, recorded again then.
                infl.abandon(head);
            }
        }
        match self.packed.as_mut() {
            // Back over the last `rewind` chains taken, malformed ones included (which
            // the gap rule above never rewinds over).
            Some(p) => {
                for _ in 0..rewind {
                    p.undo_pop();
                }
            }
            None => self.queue.set_next_avail(next.wrapping_sub(rewind as u16)),
        }
        // Oldest first, as they were taken.
        for &(_, head) in avail[rewind..].iter().rev() {
            self.add_used(mem, head, 0);
        }
        avail.len() - rewind
    }

    /// Interrupts the guest if the ring's notification rules ask for it.
    ///
    /// With event_idx this is the kernel's rule (vring_need_event): interrupt when the
    /// driver's `used_event` lies among the used elements published since the last call.
    /// We keep the count ourselves because [`Ring::add_used_batch`] bypasses virtio-queue.
    /// Without event_idx the driver's only say is VRING_AVAIL_F_NO_INTERRUPT in the avail
    /// ring's flags (virtio 1.2, 2.7.7.2): honoured, so a driver polling its used ring is
    /// not interrupted for every batch.
    pub fn notify(&mut self, mem: &GuestMem) {
        use vm_memory::Bytes;
        let added = std::mem::take(&mut self.added_since_notify);
        if added > 0 {
            self.published = true;
        }
        let needed = if let Some(p) = self.packed.as_mut() {
            p.needs_interrupt(mem, added)
        } else if self.event_idx {
            std::sync::atomic::fence(Ordering::SeqCst);
            let at = self.queue.avail_ring() + 4 + 2 * u64::from(self.queue.size());
            match mem.load::<u16>(GuestAddress(at), Ordering::Acquire) {
                Ok(raw) => {
                    let used_event = u16::from_le(raw);
                    let new = self.queue.next_used();
                    new.wrapping_sub(used_event).wrapping_sub(1) < added
                }
                Err(_) => true,
            }
        } else {
            // The used index we published must be visible before we read the flags, or a
            // driver clearing NO_INTERRUPT right after checking the used ring would miss
            // both the interrupt and the new entries (Linux vhost's vhost_notify has the
            // same barrier, paired with the driver's when it enables interrupts).
            std::sync::atomic::fence(Ordering::SeqCst);
            match mem.load::<u16>(GuestAddress(self.queue.avail_ring()), Ordering::Acquire) {
                Ok(raw) => u16::from_le(raw) & VRING_AVAIL_F_NO_INTERRUPT == 0,
                // Unreadable flags: interrupt rather than risk a driver waiting for ever.
                Err(_) => true,
            }
        };
        if needed {
            if let Some(call) = &self.call {
                // Counted before the write: a reader woken by the interrupt sees it counted.
                self.stats.notifications.fetch_add(1, Ordering::Release);
                let _ = call.write(1);
            }
        }
    }

    /// A new call eventfd for a started ring: see [`Ring::resync_call`].
    pub(crate) fn set_call(&mut self, call: Option<EventFd>) {
        self.call = call;
        self.resync_call();
    }

    /// Interrupts the guest once, on the call fd the ring has now, if the used ring is not
    /// fresh: at ring start and whenever the call fd changes on a started ring.
    ///
    /// Used elements may be in guest memory whose interrupt the driver never got: a
    /// backend killed after publishing them and before signalling (or before it had a call
    /// fd at all), or a ring that completed requests before SET_VRING_CALL arrived. QEMU
    /// restarting vhost-user-blk-pci on a new backend sends SET_VRING_KICK and
    /// SET_VRING_ENABLE before SET_VRING_CALL, so requests resubmitted from the inflight
    /// region can complete with no call fd; and a backend killed in that window leaves its
    /// successor nothing to complete. Either way the guest waits for ever. libvhost-user
    /// signals every SET_VRING_CALL for the same reason. A spurious interrupt only costs
    /// the driver a look at its used ring; a fresh ring (used index 0) gets none, and a
    /// driver that asked for no interrupts (VRING_AVAIL_F_NO_INTERRUPT, without
    /// event_idx) polls anyway.
    pub(crate) fn resync_call(&mut self) {
        use vm_memory::Bytes;
        let Some(call) = &self.call else { return };
        if let Some(p) = &self.packed {
            if (p.is_fresh() && !self.published) || p.interrupts_disabled(&self.mem.memory()) {
                return;
            }
            self.stats.notifications.fetch_add(1, Ordering::Release);
            let _ = call.write(1);
            return;
        }
        if self.queue.next_used() == 0 && !self.published {
            return;
        }
        if !self.event_idx {
            let mem = self.mem.memory();
            if let Ok(raw) =
                mem.load::<u16>(GuestAddress(self.queue.avail_ring()), Ordering::Acquire)
            {
                if u16::from_le(raw) & VRING_AVAIL_F_NO_INTERRUPT != 0 {
                    return;
                }
            }
        }
        self.stats.notifications.fetch_add(1, Ordering::Release);
        let _ = call.write(1);
    }

    /// A new VRING_ERR eventfd. The worker may have parked the ring before it got this
    /// from the protocol thread although the frontend's SET_VRING_ERR came first: the
    /// frontend must hear of the break either way.
    pub(crate) fn set_err(&mut self, err: Option<EventFd>) {
        if self.broken {
            if let Some(e) = &err {
                let _ = e.write(1);
            }
        }
        self.err = err;
    }

    /// Chains waiting to be resubmitted from the inflight region.
    pub fn has_resubmits(&self) -> bool {
        !self.resubmit.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::FromRawFd;

    use vhost::vhost_user::message::VhostUserMemoryRegion;
    use vm_memory::Bytes;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use crate::memory::MemoryTable;

    const SIZE: u16 = 256;
    const DESC: u64 = 0;
    const AVAIL: u64 = 0x1000;
    pub(crate) const USED: u64 = 0x2000;
    /// Guest memory size; anything at or above is outside it.
    const MEM: u64 = 0x10000;

    fn memfd(len: u64) -> File {
        // SAFETY: valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"ring-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh descriptor we own.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    /// A started ring of SIZE entries in 64 KiB of guest memory.
    fn ring() -> Ring {
        ring_of(SIZE)
    }

    /// A started ring of `size` entries (at most SIZE) in 64 KiB of guest memory: the
    /// descriptor table at DESC, avail at AVAIL, used at USED. Also the worker tests' ring.
    pub(crate) fn ring_of(size: u16) -> Ring {
        ring_with(size, None)
    }

    /// As [`ring_of`], for queue `index`.
    pub(crate) fn ring_of_queue(index: u16, size: u16) -> Ring {
        ring_at(index, size, None)
    }

    /// A started ring of `size` entries (at most SIZE) recovering from `inflight`.
    fn ring_with(size: u16, inflight: Option<InflightQueue>) -> Ring {
        ring_at(0, size, inflight)
    }

    fn ring_at(index: u16, size: u16, inflight: Option<InflightQueue>) -> Ring {
        let mut table = MemoryTable::new(DirtyLog::new());
        table
            .add_region(
                &VhostUserMemoryRegion::new(0, MEM, 0x7000_0000_0000, 0),
                memfd(MEM),
            )
            .unwrap();
        Ring::start(RingSetup {
            index,
            size,
            max_size: size,
            desc: DESC,
            avail: AVAIL,
            used: USED,
            base: 0,
            event_idx: false,
            acked_features: 0,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: None,
            err: None,
            enabled: true,
            inflight,
            mem: table.atomic(),
            log: DirtyLog::new(),
            stats: Arc::new(QueueStats::default()),
        })
        .unwrap()
    }

    /// Writes descriptor `i`: one buffer, no NEXT.
    pub(crate) fn desc(mem: &GuestMem, i: u16, addr: u64, len: u32) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(DESC + 16 * u64::from(i)))
            .unwrap();
    }

    /// Publishes heads 0..n on the avail ring.
    pub(crate) fn publish(mem: &GuestMem, n: u16) {
        for i in 0..n {
            mem.write_obj(i.to_le(), GuestAddress(AVAIL + 4 + 2 * u64::from(i)))
                .unwrap();
        }
        mem.write_obj(n.to_le(), GuestAddress(AVAIL + 2)).unwrap();
    }

    pub(crate) fn used_idx(mem: &GuestMem) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(USED + 2)).unwrap())
    }

    /// A guest that fills its ring with malformed chains gets only a bounded share of one
    /// round: `pop` and `enable_notification` then report nothing more (the device loops
    /// `pop` until it fails and `enable_notification` says no more), so the worker can
    /// serve its other rings and commands before it comes back for the rest.
    #[test]
    fn one_round_skips_a_bounded_number_of_malformed_chains() {
        let mut ring = ring();
        let mem = ring.memory();
        let bad = 100u16;
        for i in 0..bad {
            desc(&mem, i, MEM + 4096, 16);
        }
        desc(&mem, bad, 0x8000, 16);
        publish(&mem, bad + 1);
        let mut chain = Chain::default();
        ring.disable_notification(&mem);
        assert!(
            !ring.pop(&mem, &mut chain),
            "one pop went through {} malformed chains to the good one (head {})",
            ring.stats().bad_chains.load(Ordering::Relaxed),
            chain.head
        );
        let share = BAD_CHAINS_PER_ROUND as u16;
        assert_eq!(
            ring.stats().bad_chains.load(Ordering::Relaxed),
            u64::from(share)
        );
        assert_eq!(ring.next_avail(), share);
        assert_eq!(used_idx(&mem), share, "each skipped chain is returned");
        assert!(ring.round_spent());
        assert!(
            !ring.enable_notification(&mem),
            "the rest of the ring must not be reported as work within the round"
        );
        assert!(!ring.pop(&mem, &mut chain), "a spent round stays spent");
        assert_eq!(ring.next_avail(), share);
        // The next round takes the rest: the other malformed chains, then the good one.
        ring.begin_round();
        assert!(!ring.round_spent());
        assert!(ring.pop(&mem, &mut chain));
        assert_eq!(chain.head, bad);
        assert_eq!(
            ring.stats().bad_chains.load(Ordering::Relaxed),
            u64::from(bad)
        );
        assert_eq!(used_idx(&mem), bad, "each malformed chain is returned once");
        assert!(!ring.pop(&mem, &mut chain));
        assert!(
            !ring.round_spent(),
            "an empty ring does not spend the round"
        );
        assert!(!ring.enable_notification(&mem));
    }

    /// A chain that is walked as malformed: its one descriptor lies outside guest memory.
    fn malformed(mem: &GuestMem, i: u16) {
        desc(mem, i, MEM + 4096, 16);
    }

    /// Heads on the used ring, oldest first.
    fn used_heads(mem: &GuestMem) -> Vec<u16> {
        (0..used_idx(mem))
            .map(|i| {
                let at = GuestAddress(USED + 4 + 8 * u64::from(i));
                u32::from_le(mem.read_obj::<u32>(at).unwrap()) as u16
            })
            .collect()
    }

    /// Pops every chain the ring offers now; their heads.
    fn pop_all(ring: &mut Ring, mem: &GuestMem) -> Vec<u16> {
        let mut chain = Chain::default();
        let mut heads = Vec::new();
        while ring.pop(mem, &mut chain) {
            heads.push(chain.head);
        }
        heads
    }

    /// Pops `n` chains and keeps them.
    fn pop_n(ring: &mut Ring, mem: &GuestMem, n: usize) -> Vec<Chain> {
        (0..n)
            .map(|_| {
                let mut chain = Chain::default();
                assert!(ring.pop(mem, &mut chain));
                chain
            })
            .collect()
    }

    /// Chains given back unused are taken again, in their order, and none reaches the
    /// used ring: the guest sees nothing of the round trip.
    #[test]
    fn chains_given_back_are_offered_again_in_order() {
        let mut ring = ring();
        let mem = ring.memory();
        for i in 0..4 {
            desc(&mem, i, 0x8000 + 0x100 * u64::from(i), 16);
        }
        publish(&mem, 4);
        let chains = pop_n(&mut ring, &mem, 3);
        assert_eq!(chains[2].origin(), Origin::Avail(2));
        // The device used the first and gives back the other two.
        ring.add_used(&mem, chains[0].head, 16);
        assert_eq!(ring.give_back(&mem, &chains[1..]), 0);
        assert_eq!(ring.next_avail(), 1);
        assert_eq!(pop_all(&mut ring, &mem), vec![1, 2, 3]);
        assert_eq!(used_heads(&mem), vec![0]);
    }

    /// Undoing two pops by rewinding the avail ring over both (what `undo_pop` did, once
    /// per chain) re-offers the malformed chain `pop` skipped between them, already on the
    /// used ring: it was completed twice and the first chain never came back. Giving
    /// back rewinds only over the last chain and completes the first with length 0.
    #[test]
    fn giving_back_over_a_skipped_malformed_chain_completes_it_once() {
        let mut ring = ring();
        let mem = ring.memory();
        desc(&mem, 0, 0x8000, 16);
        malformed(&mem, 1);
        desc(&mem, 2, 0x9000, 16);
        publish(&mem, 3);
        let chains = pop_n(&mut ring, &mem, 2);
        assert_eq!(chains[1].head, 2, "pop skipped the malformed chain");
        assert_eq!(used_heads(&mem), vec![1]);
        assert_eq!(
            ring.give_back(&mem, &chains),
            1,
            "the first chain is completed"
        );
        assert_eq!(
            used_heads(&mem),
            vec![1, 0],
            "the malformed chain is completed once"
        );
        assert_eq!(
            pop_all(&mut ring, &mem),
            vec![2],
            "the last chain is offered again"
        );
        assert_eq!(used_heads(&mem), vec![1, 0]);
        assert_eq!(ring.stats().bad_chains.load(Ordering::Relaxed), 1);
    }

    /// A chain completed after the ones given back is a gap too: rewinding over it would
    /// hand the driver's head out twice.
    #[test]
    fn a_chain_completed_after_those_given_back_stops_the_rewind() {
        let mut ring = ring();
        let mem = ring.memory();
        for i in 0..3 {
            desc(&mem, i, 0x8000 + 0x100 * u64::from(i), 16);
        }
        publish(&mem, 3);
        let chains = pop_n(&mut ring, &mem, 3);
        ring.add_used(&mem, chains[2].head, 16);
        assert_eq!(ring.give_back(&mem, &chains[..2]), 2);
        assert_eq!(ring.next_avail(), 3);
        assert_eq!(used_heads(&mem), vec![2, 0, 1]);
        assert!(pop_all(&mut ring, &mem).is_empty());
    }

    /// A resubmitted chain (an earlier backend left it in flight) did not come from the
    /// avail ring: it goes back to the resubmission queue, and the avail index stays.
    #[test]
    fn a_resubmitted_chain_given_back_is_resubmitted_again() {
        use crate::inflight::InflightRegion;
        let (region, _file) = InflightRegion::create(1, SIZE).unwrap();
        let mut area = region.queue(0, SIZE).unwrap();
        let _ = area.recover(0);
        // A crashed backend had taken heads 5 and 6 (avail positions 0 and 1).
        area.set_entry(5, 1, true);
        area.set_entry(6, 2, true);
        let mut ring = ring_with(SIZE, Some(area));
        let mem = ring.memory();
        for i in 0..8 {
            desc(&mem, i, 0x8000 + 0x100 * u64::from(i), 16);
        }
        assert!(ring.has_resubmits());
        assert_eq!(
            ring.next_avail(),
            2,
            "recovery continues after the two taken"
        );
        let chains = pop_n(&mut ring, &mem, 1);
        assert_eq!(
            (chains[0].head, chains[0].origin()),
            (5, Origin::Resubmitted)
        );
        assert_eq!(ring.give_back(&mem, &chains), 0);
        assert_eq!(ring.next_avail(), 2, "the avail ring is not rewound");
        assert_eq!(pop_all(&mut ring, &mem), vec![5, 6]);
        assert_eq!(ring.stats().resubmitted.load(Ordering::Relaxed), 3);
    }

    /// Chains rewound onto the avail ring are no longer in flight: a backend restarted
    /// on the same inflight region takes them from the avail ring, not as resubmissions
    /// too (which would run them twice).
    #[test]
    fn chains_given_back_leave_the_inflight_region() {
        use crate::inflight::InflightRegion;
        let (region, _file) = InflightRegion::create(1, SIZE).unwrap();
        let mut ring = ring_with(SIZE, region.queue(0, SIZE));
        let mem = ring.memory();
        for i in 0..3 {
            desc(&mem, i, 0x8000 + 0x100 * u64::from(i), 16);
        }
        publish(&mem, 3);
        let chains = pop_n(&mut ring, &mem, 3);
        ring.add_used(&mem, chains[0].head, 16);
        assert_eq!(ring.give_back(&mem, &chains[1..]), 0);
        drop(ring);
        // A restart on the same region, the used index as the first ring left it.
        let mut area = region.queue(0, SIZE).unwrap();
        let recovery = area.recover(used_idx(&mem));
        assert_eq!(recovery.resubmit, Vec::<u16>::new());
        assert_eq!(recovery.next_avail, Some(1));
    }

    /// A started ring of SIZE entries whose used index (and avail base) starts at
    /// `start`, with event_idx as given and a call eventfd, which is returned.
    fn notifying_ring(event_idx: bool, start: u16) -> (Ring, EventFd) {
        let mut table = MemoryTable::new(DirtyLog::new());
        table
            .add_region(
                &VhostUserMemoryRegion::new(0, MEM, 0x7000_0000_0000, 0),
                memfd(MEM),
            )
            .unwrap();
        let mem = table.atomic().memory().into_inner();
        // Where an earlier session left the used ring (the device continues from it).
        mem.write_obj(start.to_le(), GuestAddress(USED + 2))
            .unwrap();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let ring = Ring::start(RingSetup {
            index: 0,
            size: SIZE,
            max_size: SIZE,
            desc: DESC,
            avail: AVAIL,
            used: USED,
            base: u32::from(start),
            event_idx,
            acked_features: 0,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: Some(call.try_clone().unwrap()),
            err: None,
            enabled: true,
            inflight: None,
            mem: table.atomic(),
            log: DirtyLog::new(),
            stats: Arc::new(QueueStats::default()),
        })
        .unwrap();
        (ring, call)
    }

    /// Interrupts signalled on `call` since the last look.
    fn interrupts(call: &EventFd) -> u64 {
        call.read().unwrap_or(0)
    }

    /// The driver's `used_event` (event_idx): interrupt once the used index passes it.
    fn set_used_event(mem: &GuestMem, v: u16) {
        mem.write_obj(v.to_le(), GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE)))
            .unwrap();
    }

    /// The avail ring's flags (VRING_AVAIL_F_NO_INTERRUPT).
    fn set_avail_flags(mem: &GuestMem, flags: u16) {
        mem.write_obj(flags.to_le(), GuestAddress(AVAIL)).unwrap();
    }

    /// Used element `slot` as (id, len).
    fn used_elem(mem: &GuestMem, slot: u16) -> (u32, u32) {
        let at = USED + 4 + 8 * u64::from(slot);
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }

    #[test]
    fn without_event_idx_notify_interrupts_unless_the_driver_said_no_interrupt() {
        let (mut ring, call) = notifying_ring(false, 0);
        let mem = ring.memory();
        ring.add_used(&mem, 3, 100);
        ring.notify(&mem);
        assert_eq!(interrupts(&call), 1);
        assert_eq!(used_idx(&mem), 1);
        assert_eq!(used_elem(&mem, 0), (3, 100));
        set_avail_flags(&mem, VRING_AVAIL_F_NO_INTERRUPT);
        ring.add_used(&mem, 4, 0);
        ring.add_used_batch(&mem, &[(5, 1), (6, 2)]);
        ring.notify(&mem);
        assert_eq!(interrupts(&call), 0, "interrupted under NO_INTERRUPT");
        assert_eq!(used_idx(&mem), 4, "completions published all the same");
        // Other flag bits do not ask for silence.
        set_avail_flags(&mem, 0x8000);
        ring.add_used(&mem, 7, 0);
        ring.notify(&mem);
        assert_eq!(interrupts(&call), 1);
        assert_eq!(ring.stats().notifications.load(Ordering::Relaxed), 2);
        assert_eq!(ring.stats().completed.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn with_event_idx_notify_interrupts_once_the_used_index_passes_used_event() {
        let (mut ring, call) = notifying_ring(true, 0);
        let mem = ring.memory();
        // The driver wants to hear after the 3rd completion (used_event 2).
        set_used_event(&mem, 2);
        for head in 0..2 {
            ring.add_used(&mem, head, 0);
            ring.notify(&mem);
            assert_eq!(interrupts(&call), 0, "interrupt after completion {head}");
        }
        ring.add_used(&mem, 2, 0);
        ring.notify(&mem);
        assert_eq!(
            interrupts(&call),
            1,
            "no interrupt when used passed used_event"
        );
        // Without new completions since, nothing more, even with used_event still passed.
        ring.notify(&mem);
        assert_eq!(interrupts(&call), 0, "interrupt without a new completion");
        // NO_INTERRUPT is not how an event_idx driver asks: used_event alone decides.
        set_avail_flags(&mem, VRING_AVAIL_F_NO_INTERRUPT);
        set_used_event(&mem, 3);
        ring.add_used(&mem, 3, 0);
        ring.notify(&mem);
        assert_eq!(interrupts(&call), 1);
        // A used_event ahead of the used index: not yet.
        set_used_event(&mem, 10);
        ring.add_used(&mem, 4, 0);
        ring.notify(&mem);
        assert_eq!(interrupts(&call), 0);
    }

    /// One decision per batch: a batch published with one used-index update (or several
    /// completions between two notify calls) interrupts once if `used_event` lies anywhere
    /// among them, and not if it lies before them (a driver that has not caught up) or
    /// after them.
    #[test]
    fn a_batch_gets_one_notification_decision_over_all_its_entries() {
        let (mut ring, call) = notifying_ring(true, 0);
        let mem = ring.memory();
        // used_event at the first, middle and last entry of the batch 0..4.
        let mut next = 0u16;
        for pos in [0u16, 2, 3] {
            set_used_event(&mem, next + pos);
            let batch: Vec<(u16, u32)> = (0..4).map(|i| (next + i, u32::from(i))).collect();
            ring.add_used_batch(&mem, &batch);
            next += 4;
            assert_eq!(used_idx(&mem), next);
            ring.notify(&mem);
            assert_eq!(
                interrupts(&call),
                1,
                "used_event at entry {pos} of the batch"
            );
        }
        // Behind the batch, or ahead of it: no interrupt.
        for behind in [true, false] {
            // The batch's entries are next..next + 4; the used index becomes next + 4.
            let used_event = if behind { next - 1 } else { next + 4 };
            set_used_event(&mem, used_event);
            ring.add_used_batch(&mem, &[(20, 0), (21, 0), (22, 0), (23, 0)]);
            next += 4;
            ring.notify(&mem);
            assert_eq!(
                interrupts(&call),
                0,
                "used_event {used_event}, batch ended at {next}"
            );
        }
        // Single completions and a batch between two notify calls count together.
        set_used_event(&mem, next);
        ring.add_used(&mem, 30, 0);
        ring.add_used_batch(&mem, &[(31, 0), (32, 0)]);
        ring.notify(&mem);
        assert_eq!(interrupts(&call), 1);
        set_used_event(&mem, next + 4);
        ring.add_used_batch(&mem, &[(33, 0), (34, 0)]);
        ring.add_used(&mem, 35, 0);
        ring.notify(&mem);
        assert_eq!(
            interrupts(&call),
            1,
            "used_event reached by the last single completion"
        );
        assert_eq!(used_idx(&mem), next + 6);
    }

    #[test]
    fn add_used_batch_publishes_every_entry_with_one_index_update() {
        let (mut ring, call) = notifying_ring(false, 0);
        let mem = ring.memory();
        ring.add_used_batch(&mem, &[(9, 4096), (2, 1), (200, 0)]);
        assert_eq!(used_idx(&mem), 3);
        assert_eq!(
            (0..3).map(|s| used_elem(&mem, s)).collect::<Vec<_>>(),
            vec![(9, 4096), (2, 1), (200, 0)]
        );
        // A head outside the ring is not published (the rest is).
        ring.add_used_batch(&mem, &[(SIZE, 7), (1, 8)]);
        assert_eq!(used_idx(&mem), 4);
        assert_eq!(used_elem(&mem, 3), (1, 8));
        // ... and counted as completed only for what was published.
        assert_eq!(ring.stats().completed.load(Ordering::Relaxed), 4);
        // An empty batch publishes nothing.
        ring.add_used_batch(&mem, &[]);
        assert_eq!(used_idx(&mem), 4);
        // Without event_idx, one interrupt for everything published.
        ring.notify(&mem);
        assert_eq!(interrupts(&call), 1);
    }

    /// The used index is 16 bits and wraps: a batch across 65535 -> 0 lands in the right
    /// slots (the index modulo the ring size), and the event_idx decision holds across the
    /// wrap.
    #[test]
    fn the_used_index_wraps_in_batches_and_in_the_notification_decision() {
        let start = u16::MAX - 1;
        let (mut ring, call) = notifying_ring(true, start);
        let mem = ring.memory();
        set_used_event(&mem, u16::MAX);
        ring.add_used_batch(&mem, &[(11, 1), (12, 2), (13, 3)]);
        assert_eq!(used_idx(&mem), 1, "65534 + 3 wraps to 1");
        // 65534 and 65535 are the last two slots of a 256-entry ring, 0 the first.
        assert_eq!(used_elem(&mem, SIZE - 2), (11, 1));
        assert_eq!(used_elem(&mem, SIZE - 1), (12, 2));
        assert_eq!(used_elem(&mem, 0), (13, 3));
        ring.notify(&mem);
        assert_eq!(
            interrupts(&call),
            1,
            "used_event 65535 passed by the wrapping batch"
        );
        // used_event 1 lies ahead of the used index (1): passed by the next completion only.
        set_used_event(&mem, 1);
        ring.add_used(&mem, 14, 4);
        assert_eq!(used_idx(&mem), 2);
        assert_eq!(used_elem(&mem, 1), (14, 4));
        ring.notify(&mem);
        assert_eq!(interrupts(&call), 1);
        // used_event 0, one entry behind the last one: no interrupt for the next.
        set_used_event(&mem, 0);
        ring.add_used(&mem, 15, 0);
        ring.notify(&mem);
        assert_eq!(interrupts(&call), 0);
    }
}
