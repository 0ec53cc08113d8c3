//! The worker of one queue pair: transmit (guest → tap) and receive (tap → guest).
//!
//! - TX: chains are popped in batches, their headers checked, and each frame written to the
//!   tap queue with one writev straight from guest memory, the whole batch through one
//!   io_uring submission. The 12-byte virtio-net header goes to the tap unchanged (the tap's
//!   vnet header has the same size), so checksum offload and TSO/UFO reach the host stack.
//!   When the tap answers EAGAIN the chain is kept and retried once the tap is writable.
//! - RX: the tap is read with readv straight into the guest's receive buffers (the tap
//!   writes the virtio-net header itself); with MRG_RXBUF enough buffers for the largest
//!   frame are gathered first and the frame's buffers are published with one used-index
//!   update. Buffers popped but not used yet stay in a cache; when the ring stops they are
//!   given back (`Ring::give_back`), so the guest loses none.
//! - Backpressure: without guest buffers the tap's EPOLLIN interest is dropped until the
//!   guest kicks; with unsent frames EPOLLOUT is added. The tap fd sits in the worker's
//!   own epoll, whose fd is the one the layer waits on.
//!
//! Everything the kernel writes into guest memory (readv) is marked in the dirty log by
//! hand before the used ring publishes it; header and used-ring writes go through
//! vm-memory and are logged by the layer.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_device::iovec::IovecError;
use vhost_user_device::memory::host_iovecs;
use vhost_user_device::rate_limit::RateLimitedLog;
use vhost_user_device::{
    Chain, ChainReader, ChainWriter, GuestMem, IovecList, PassEnd, QueueWorker, Ring, RingPass,
    Rings,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::shared::NetShared;
use crate::spec::{
    features, hdr_len, tap_offloads, tun, NetHdr, ETH_OVERHEAD, HDR_LEN, HDR_NUM_BUFFERS,
    MAX_FRAME_LEN,
};
use crate::stats::{DropReason, QueueCounters};
use crate::uring::{TxBufs, TxUring};

/// Chains per TX batch (one io_uring submission).
const TX_BATCH: usize = 64;
/// Frames received before the guest is interrupted in a long burst.
const RX_NOTIFY_EVERY: usize = 64;
/// Frames one direction may move per call before the other gets its turn (Linux vhost-net
/// uses the same packet weight): one worker serves both rings of a pair, and a direction
/// that always has work (a flooding peer, a busy-polling driver) must not starve the other.
/// TX counts every chain it takes, dropped ones too.
const BUDGET: usize = 256;
/// `epoll` data of the tap fd and of the "more work" eventfd.
const TOKEN_TAP: u64 = 0;
const TOKEN_MORE: u64 = 1;
/// The kernel's limit on iovecs per readv/writev.
const MAX_IOVECS: usize = 1024;
/// How long a stopping ring waits for a full tap before giving frames back unsent.
const TX_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// VHOST_F_LOG_ALL (dirty logging on/off, not a device feature).
const VHOST_F_LOG_ALL: u64 = 1 << 26;

/// A receive buffer (chain) taken from the avail ring and not used yet.
struct RxBuf {
    chain: Chain,
    /// Writable bytes; 0 for a chain the guest got wrong (returned unused at once).
    cap: u64,
}

/// A TX chain ready to write: its buffers in guest memory (which they keep mapped) and
/// frame length.
struct TxFrame {
    chain: Chain,
    /// Taken by the write (the engine owns them until it completes). A frame the tap
    /// could not take yet is rebuilt against the memory of the next try (`process_tx`).
    bufs: Option<IovecList>,
    len: usize,
}

impl TxBufs for TxFrame {
    fn bufs(&mut self) -> &mut Option<IovecList> {
        &mut self.bufs
    }
}

/// The worker of queue pair `pair` (queues 2*pair and 2*pair + 1).
pub struct PairWorker {
    shared: Arc<NetShared>,
    pair: u16,
    rxq: u16,
    txq: u16,
    fd: RawFd,
    epoll: Epoll,
    /// Events registered for the tap fd in `epoll` (empty: not registered).
    interest: EventSet,
    acked: u64,
    mrg: bool,
    /// The virtio-net header size the driver's features imply (12 or the legacy 10).
    hdr_len: usize,
    /// Receive capacity to gather before reading a frame (MRG_RXBUF).
    rx_need: u64,
    rx_cache: VecDeque<RxBuf>,
    rx_starved: bool,
    /// Unusable receive buffers this call may still return before yielding: a guest that
    /// posts nothing else must not keep the worker (see `BUDGET`).
    rx_bad_left: usize,
    /// A frame read while the guest had too few buffers: (total length, bytes that went
    /// into guest buffers); the rest is in `rx_overflow`.
    rx_partial: Option<(u64, u64)>,
    rx_overflow: Vec<u8>,
    rx_enabled: bool,
    tx_enabled: bool,
    tx_pending: VecDeque<TxFrame>,
    tx_frames: Vec<TxFrame>,
    tx_results: Vec<i32>,
    uring: TxUring,
    chain: Chain,
    iovecs: Vec<libc::iovec>,
    log: RateLimitedLog,
    /// Written when a direction stopped at its budget with work left, so the worker comes
    /// back (after serving the other events) without waiting for a kick or the tap.
    more: EventFd,
    /// TX stopped at its budget with chains left on the ring.
    tx_more: bool,
    /// RX stopped at its budget with frames possibly left on the tap.
    rx_more: bool,
}

// SAFETY: the raw RX iovec scratch vector only holds pointers into guest memory while a
// read is in progress on this thread; the worker moves to its thread once, as a whole.
// (TX buffers are `IovecList`s, Send on their own.)
unsafe impl Send for PairWorker {}

impl PairWorker {
    /// A worker for `pair`, with the features the driver acked.
    pub fn new(shared: Arc<NetShared>, pair: u16, acked: u64) -> io::Result<Self> {
        let tap = shared
            .tap
            .queues
            .get(usize::from(pair))
            .ok_or_else(|| io::Error::other(format!("no tap queue for queue pair {pair}")))?;
        let fd = tap.fd();
        let uring = TxUring::new(TX_BATCH as u32, tap.as_fd())?;
        let epoll = Epoll::new()?;
        let (mrg, hdr, rx_need) = rx_params(&shared, acked);
        let mut w = Self {
            pair,
            rxq: 2 * pair,
            txq: 2 * pair + 1,
            fd,
            epoll,
            interest: EventSet::empty(),
            acked,
            mrg,
            hdr_len: hdr,
            rx_need,
            rx_cache: VecDeque::new(),
            rx_starved: false,
            rx_bad_left: BUDGET,
            rx_partial: None,
            rx_overflow: Vec::new(),
            rx_enabled: false,
            tx_enabled: false,
            tx_pending: VecDeque::new(),
            tx_frames: Vec::with_capacity(TX_BATCH),
            tx_results: Vec::with_capacity(TX_BATCH),
            uring,
            chain: Chain::default(),
            iovecs: Vec::with_capacity(64),
            log: RateLimitedLog::new(),
            more: EventFd::new(EFD_NONBLOCK)?,
            tx_more: false,
            rx_more: false,
            shared,
        };
        w.epoll.ctl(
            ControlOperation::Add,
            w.more.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_MORE),
        )?;
        // Watch the tap from the start: frames the kernel steers to this queue while its
        // rings are not running make us detach the queue (see `sync_attached`).
        w.set_interest(EventSet::IN);
        Ok(w)
    }

    /// Follows the features the ring was started with. Workers live as long as the
    /// connection, and a driver may negotiate again without RESET_DEVICE (stop the rings,
    /// SET_FEATURES, start them): merging, header size and tap offloads must follow.
    fn follow_features(&mut self, acked: u64) {
        // LOG_ALL comes and goes with migration and changes nothing here.
        let relevant = |f: u64| f & !VHOST_F_LOG_ALL;
        if relevant(acked) == relevant(self.acked) {
            return;
        }
        log::debug!(
            "pair {}: features {:#x} -> {acked:#x}",
            self.pair,
            self.acked
        );
        self.acked = acked;
        (self.mrg, self.hdr_len, self.rx_need) = rx_params(&self.shared, acked);
        if let Err(e) = self.shared.apply_features(acked) {
            let pair = self.pair;
            self.log
                .warn(|| format!("tap queue {pair}: cannot follow new features: {e}"));
        }
    }

    fn counters(&self, q: u16) -> Option<&QueueCounters> {
        self.shared.stats.queue(q)
    }

    fn count_drop(&self, q: u16, why: DropReason) {
        if let Some(c) = self.counters(q) {
            c.drop(why);
        }
    }

    fn set_interest(&mut self, want: EventSet) {
        if want == self.interest {
            return;
        }
        let res = if want.is_empty() {
            self.epoll
                .ctl(ControlOperation::Delete, self.fd, EpollEvent::default())
        } else if self.interest.is_empty() {
            self.epoll.ctl(
                ControlOperation::Add,
                self.fd,
                EpollEvent::new(want, TOKEN_TAP),
            )
        } else {
            self.epoll.ctl(
                ControlOperation::Modify,
                self.fd,
                EpollEvent::new(want, TOKEN_TAP),
            )
        };
        match res {
            Ok(()) => self.interest = want,
            Err(e) => self
                .log
                .warn(|| format!("tap queue {}: epoll_ctl failed: {e}", self.pair)),
        }
    }

    /// Attaches the tap queue while one of our rings runs and the driver uses the pair;
    /// detaches it otherwise so the kernel steers frames to queues that are read.
    fn sync_attached(&mut self) {
        let active = self.pair < self.shared.active_pairs.load(Ordering::Relaxed);
        let want = active && (self.rx_enabled || self.tx_enabled);
        self.shared.set_attached(self.pair, want);
    }

    fn update_interest(&mut self) {
        let attached = self.shared.is_attached(self.pair);
        let mut want = EventSet::empty();
        if attached && self.rx_enabled && !self.rx_starved {
            want |= EventSet::IN;
        }
        if attached && !self.tx_pending.is_empty() {
            want |= EventSet::OUT;
        }
        self.set_interest(want);
    }

    // ---- transmit -------------------------------------------------------------------

    /// Checks a TX chain and builds its iovecs; on error the drop reason.
    fn prepare_tx(
        &self,
        mem: &Arc<GuestMem>,
        chain: Chain,
    ) -> Result<TxFrame, (Chain, DropReason)> {
        let total = chain.readable_len();
        let hlen = self.hdr_len;
        if total < hlen as u64 {
            return Err((chain, DropReason::ShortChain));
        }
        if total > (hlen + MAX_FRAME_LEN) as u64 {
            return Err((chain, DropReason::TooLong));
        }
        // A legacy 10-byte header parses with num_buffers 0, which TX ignores.
        let mut hdr = [0u8; HDR_LEN];
        if ChainReader::new(mem, &chain)
            .read_exact(&mut hdr[..hlen])
            .is_err()
        {
            return Err((chain, DropReason::BadAddress));
        }
        let frame_len = total as usize - hlen;
        if NetHdr::parse(&hdr).check_tx(self.acked, frame_len).is_err() {
            return Err((chain, DropReason::BadHeader));
        }
        let readable = chain.segments.iter().filter(|s| !s.writable);
        let bufs = match IovecList::from_guest_whole(mem, readable) {
            Ok(bufs) => bufs,
            Err(IovecError::TooMany(_)) => return Err((chain, DropReason::TooLong)),
            Err(IovecError::OutsideMemory { .. }) => return Err((chain, DropReason::BadAddress)),
        };
        Ok(TxFrame {
            chain,
            bufs: Some(bufs),
            len: frame_len,
        })
    }

    /// Writes `self.tx_frames` to the tap; completes them or keeps them in `tx_pending`.
    /// Returns how many chains went to the used ring.
    fn write_frames(&mut self, ring: &mut Ring, mem: &Arc<GuestMem>) -> usize {
        if self.tx_frames.is_empty() {
            return 0;
        }
        let res = self
            .uring
            .writev_batch(&mut self.tx_frames, &mut self.tx_results);
        if let Err(e) = res {
            self.log
                .warn(|| format!("tap queue {}: io_uring failed: {e}", self.pair));
            self.tx_results.clear();
            self.tx_results.resize(self.tx_frames.len(), -libc::EIO);
        }
        let mut completed = 0;
        let txq = self.txq;
        let mut frames = std::mem::take(&mut self.tx_frames);
        let results = std::mem::take(&mut self.tx_results);
        for (frame, &r) in frames.drain(..).zip(results.iter()) {
            if r == -libc::EAGAIN {
                self.tx_pending.push_back(frame);
                continue;
            }
            if r >= 0 {
                if let Some(c) = self.shared.stats.queue(txq) {
                    c.packet(frame.len);
                }
            } else {
                let why = if r == -libc::EINVAL {
                    DropReason::TapRejected
                } else {
                    DropReason::TapError
                };
                self.count_drop(txq, why);
                let pair = self.pair;
                self.log.warn(|| {
                    format!(
                        "tap queue {pair}: frame of {} bytes dropped: {}",
                        frame.len,
                        io::Error::from_raw_os_error(-r)
                    )
                });
            }
            ring.add_used(mem, frame.chain.head, 0);
            completed += 1;
        }
        self.tx_frames = frames;
        self.tx_results = results;
        completed
    }

    /// Asks to be called again: a direction stopped at its budget.
    fn schedule_more(&mut self) {
        if self.more.write(1).is_err() {
            self.log
                .warn(|| "cannot signal the worker's own eventfd".to_string());
        }
    }

    /// Sends what the TX ring holds (pending frames first), taking at most `BUDGET` chains
    /// (frames sent or dropped).
    fn process_tx(&mut self, ring: &mut Ring) {
        self.follow_features(ring.acked_features());
        let mem = ring.memory();
        let mut completed = 0;
        self.tx_more = false;
        if !self.tx_pending.is_empty() {
            // Rebuild iovecs against the current memory snapshot.
            let pending: Vec<TxFrame> = self.tx_pending.drain(..).collect();
            for f in pending {
                match self.prepare_tx(&mem, f.chain) {
                    Ok(f) => self.tx_frames.push(f),
                    Err((chain, why)) => {
                        self.count_drop(self.txq, why);
                        ring.add_used(&mem, chain.head, 0);
                        completed += 1;
                    }
                }
            }
            completed += self.write_frames(ring, &mem);
        }
        // The budget counts every chain taken, dropped ones too: a guest whose frames are
        // all dropped (and never sent) must not keep the worker either.
        let mut pass = RingPass::new(BUDGET);
        while self.tx_pending.is_empty() {
            while self.tx_frames.len() < TX_BATCH && pass.pop(ring, &mem, &mut self.chain) {
                let chain = std::mem::take(&mut self.chain);
                match self.prepare_tx(&mem, chain) {
                    Ok(f) => self.tx_frames.push(f),
                    Err((chain, why)) => {
                        self.count_drop(self.txq, why);
                        let pair = self.pair;
                        self.log.warn(|| {
                            format!(
                                "tx queue {pair}: dropping frame (head {}): {why:?}",
                                chain.head
                            )
                        });
                        ring.add_used(&mem, chain.head, 0);
                        completed += 1;
                    }
                }
            }
            if !self.tx_frames.is_empty() {
                completed += self.write_frames(ring, &mem);
            }
            // Hand each batch back at once: a driver waiting on used_event must not wait
            // for the whole ring to drain before it can refill it.
            if completed > 0 {
                ring.notify(&mem);
                completed = 0;
            }
            if !self.tx_pending.is_empty() {
                // The tap is full: wait for EPOLLOUT with guest kicks off.
                pass.hold(ring, &mem);
                if let Some(c) = self.counters(self.txq) {
                    c.waited();
                }
                break;
            }
            // The pass ended (the ring empty with kicks on, the budget, the round): this
            // batch was its last.
            if pass.end() != PassEnd::Open {
                break;
            }
        }
        if completed > 0 {
            ring.notify(&mem);
        }
        if pass.end() == PassEnd::Budget {
            // Kicks stay off: we come back through `more`.
            self.tx_more = true;
            self.schedule_more();
        }
    }

    // ---- receive --------------------------------------------------------------------

    /// Returns the invalid buffers of the cache to the guest (unused), wherever they are.
    /// They hold no data of a frame (those are never marked invalid) and are not part of
    /// a frame's used-ring batch, so they may come back before buffers taken earlier: an
    /// invalid buffer behind the first part of a frame must not block the buffers behind
    /// it (the frame would wait for them forever while the ring says "more").
    fn flush_bad(&mut self, ring: &mut Ring, mem: &GuestMem) -> usize {
        let mut n = 0;
        self.rx_cache.retain(|b| {
            if b.cap == 0 {
                ring.add_used(mem, b.chain.head, 0);
                n += 1;
                false
            } else {
                true
            }
        });
        self.rx_bad_left = self.rx_bad_left.saturating_sub(n);
        n
    }

    /// Usable capacity of the cache (all of it with MRG_RXBUF, else the first buffer).
    fn cache_capacity(&self) -> u64 {
        if self.mrg {
            self.rx_cache.iter().map(|b| b.cap).sum()
        } else {
            self.rx_cache.front().map_or(0, |b| b.cap)
        }
    }

    /// Pops RX chains into the cache until it holds `target` bytes (MRG_RXBUF) or one
    /// usable buffer, the ring is empty or this call returned its share of unusable
    /// buffers. Returns the capacity.
    fn fill_rx(&mut self, ring: &mut Ring, mem: &GuestMem, target: u64, used: &mut usize) -> u64 {
        loop {
            *used += self.flush_bad(ring, mem);
            let cap = self.cache_capacity();
            let enough = if self.mrg { cap >= target } else { cap > 0 };
            if enough || self.rx_bad_left == 0 {
                return cap;
            }
            if !ring.pop(mem, &mut self.chain) {
                return cap;
            }
            let chain = std::mem::take(&mut self.chain);
            let cap = if chain.segments.iter().any(|s| !s.writable) {
                0
            } else {
                chain.writable_len()
            };
            let cap = if cap < self.hdr_len as u64 {
                self.count_drop(self.rxq, DropReason::RxBufferTooSmall);
                let pair = self.pair;
                self.log.warn(|| {
                    format!(
                        "rx queue {pair}: receive buffer (head {}) unusable: {} writable bytes",
                        chain.head, cap
                    )
                });
                0
            } else {
                cap
            };
            self.rx_cache.push_back(RxBuf { chain, cap });
        }
    }

    /// Builds `self.iovecs` over the usable front of the cache; returns (capacity,
    /// buffers covered). Buffers whose memory is gone are marked invalid.
    fn build_rx_iovecs(&mut self, mem: &GuestMem) -> (u64, usize) {
        'again: loop {
            self.iovecs.clear();
            let mut cap = 0u64;
            let mut count = 0;
            for (i, b) in self.rx_cache.iter_mut().enumerate() {
                if b.cap == 0 || (!self.mrg && count == 1) || (self.mrg && cap >= self.rx_need) {
                    break;
                }
                let before = self.iovecs.len();
                for s in &b.chain.segments {
                    if host_iovecs(mem, s.addr, u64::from(s.len), &mut self.iovecs).is_err() {
                        b.cap = 0;
                        if i == 0 {
                            continue 'again;
                        }
                        self.iovecs.truncate(before);
                        return (cap, count);
                    }
                }
                if self.iovecs.len() > MAX_IOVECS - 1 {
                    self.iovecs.truncate(before);
                    if count == 0 {
                        b.cap = 0;
                        continue 'again;
                    }
                    break;
                }
                cap += b.cap;
                count += 1;
            }
            return (cap, count);
        }
    }

    /// Marks `len` bytes from the start of `chain` dirty.
    fn mark_dirty(ring: &Ring, chain: &Chain, mut len: u64) {
        for s in &chain.segments {
            if len == 0 {
                break;
            }
            let take = len.min(u64::from(s.len));
            ring.dirty_log().mark(s.addr, take as usize);
            len -= take;
        }
    }

    /// After a fill that came up short: true to try again (buffers raced in), false to
    /// stop (waiting for a kick, or for `more` when the call used its budget).
    fn retry_after_short_fill(
        &mut self,
        ring: &mut Ring,
        mem: &GuestMem,
        last: &mut Option<u16>,
    ) -> bool {
        if self.rx_bad_left == 0 {
            self.rx_more = true;
            self.schedule_more();
            return false;
        }
        if !self.starve(ring, mem) {
            return false;
        }
        // The ring says "more" but nothing could be taken since it last said so (an avail
        // ring the guest broke): asking again would spin. Wait for the next kick.
        let at = ring.next_avail();
        if *last == Some(at) {
            self.rx_starved = true;
            return false;
        }
        *last = Some(at);
        true
    }

    /// Out of receive buffers: re-enables kicks. Returns true if buffers raced in.
    fn starve(&mut self, ring: &mut Ring, mem: &GuestMem) -> bool {
        if ring.enable_notification(mem) {
            return true;
        }
        if !self.rx_starved {
            if let Some(c) = self.counters(self.rxq) {
                c.waited();
            }
        }
        self.rx_starved = true;
        log::trace!("pair {}: waiting for receive buffers", self.pair);
        false
    }

    /// Finishes a frame that overflowed the buffers posted when it was read, once the
    /// guest posted enough (the overflow is copied; everything else stayed zero-copy).
    /// Returns false while buffers are still missing.
    fn complete_partial(&mut self, ring: &mut Ring, mem: &GuestMem, used: &mut usize) -> bool {
        let Some((total, guest_cap)) = self.rx_partial.as_ref().map(|p| (p.0, p.1)) else {
            return true;
        };
        let cap = self.fill_rx(ring, mem, total, used);
        if cap < total {
            return false;
        }
        let mut overflow = std::mem::take(&mut self.rx_overflow);
        let data = &overflow[..(total - guest_cap) as usize];
        // Copy into the buffers from byte `guest_cap` on, through vm-memory (logged).
        let mut pos = 0u64;
        let mut written = 0usize;
        for b in &self.rx_cache {
            if written == data.len() {
                break;
            }
            let end = pos + b.cap;
            let from = guest_cap + written as u64;
            if from < end {
                let off = (from - pos) as usize;
                let take = ((end - from) as usize).min(data.len() - written);
                let mut w = ChainWriter::new(mem, &b.chain);
                if w.skip(off as u64).is_ok() {
                    let _ = w.write_all(&data[written..written + take]);
                }
                written += take;
            }
            pos = end;
        }
        overflow.clear();
        self.rx_overflow = overflow;
        self.rx_partial = None;
        *used += self.deliver(ring, mem, total);
        true
    }

    /// Receives frames while the tap has them and the guest has buffers, at most
    /// `BUDGET` frames.
    fn process_rx(&mut self, ring: &mut Ring) {
        self.follow_features(ring.acked_features());
        let mem = ring.memory();
        let mut used = 0usize;
        let mut frames = 0usize;
        let mut last_retry = None;
        self.rx_more = false;
        self.rx_bad_left = BUDGET;
        ring.disable_notification(&mem);
        loop {
            if frames >= BUDGET {
                self.rx_more = true;
                self.schedule_more();
                break;
            }
            if !self.complete_partial(ring, &mem, &mut used) {
                if self.retry_after_short_fill(ring, &mem, &mut last_retry) {
                    continue;
                }
                break;
            }
            let cap = self.fill_rx(ring, &mem, self.rx_need, &mut used);
            if cap == 0 {
                if self.retry_after_short_fill(ring, &mem, &mut last_retry) {
                    continue;
                }
                break;
            }
            let (cap, count) = self.build_rx_iovecs(&mem);
            if count == 0 {
                continue;
            }
            // Room for what does not fit the guest's buffers (detects and keeps it).
            self.rx_overflow.resize(HDR_LEN + MAX_FRAME_LEN + 1, 0);
            self.iovecs.push(libc::iovec {
                iov_base: self.rx_overflow.as_mut_ptr().cast(),
                iov_len: self.rx_overflow.len(),
            });
            // SAFETY: the iovecs point into guest memory kept mapped by `mem` and into our
            // own overflow buffer; the kernel writes at most their total length.
            let n = unsafe {
                libc::readv(
                    self.fd,
                    self.iovecs.as_ptr(),
                    self.iovecs.len() as libc::c_int,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => {}
                    Some(libc::EINTR) => continue,
                    Some(libc::EBADFD) => {
                        // The queue was detached (driver uses fewer pairs).
                    }
                    _ => {
                        self.count_drop(self.rxq, DropReason::TapError);
                        let pair = self.pair;
                        self.log
                            .warn(|| format!("tap queue {pair}: read failed: {e}"));
                    }
                }
                break;
            }
            let n = n as u64;
            log::trace!(
                "pair {}: read {n} bytes into {count} buffer(s) of {cap}",
                self.pair
            );
            // Whatever the kernel wrote into guest memory is dirty, used or not.
            let mut left = n.min(cap);
            for b in self.rx_cache.iter().take(count) {
                Self::mark_dirty(ring, &b.chain, left.min(b.cap));
                left = left.saturating_sub(b.cap);
            }
            // Dropped frames count against the budget too: a tap full of them must not
            // keep the worker from TX.
            if n < self.hdr_len as u64 {
                self.count_drop(self.rxq, DropReason::TapError);
                frames += 1;
                continue;
            }
            if n > cap {
                if !self.mrg || n > cap + (HDR_LEN + MAX_FRAME_LEN) as u64 {
                    frames += 1;
                    self.count_drop(self.rxq, DropReason::RxTruncated);
                    let pair = self.pair;
                    self.log.warn(|| {
                        format!(
                            "rx queue {pair}: frame of {n}+ bytes does not fit a {cap}-byte buffer"
                        )
                    });
                    continue;
                }
                // Keep the rest until the guest posts more buffers.
                self.rx_overflow.truncate((n - cap) as usize);
                self.rx_partial = Some((n, cap));
                continue;
            }
            used += self.deliver(ring, &mem, n);
            frames += 1;
            if frames.is_multiple_of(RX_NOTIFY_EVERY) {
                ring.notify(&mem);
            }
        }
        if used > 0 {
            ring.notify(&mem);
        }
    }

    /// Publishes a received frame of `n` bytes (header included) from the cache front.
    fn deliver(&mut self, ring: &mut Ring, mem: &GuestMem, n: u64) -> usize {
        let mut batch: Vec<(u16, u32)> = Vec::with_capacity(4);
        let mut left = n;
        let mut first: Option<Chain> = None;
        while left > 0 {
            let Some(b) = self.rx_cache.pop_front() else {
                break;
            };
            let take = left.min(b.cap);
            left -= take;
            batch.push((b.chain.head, take as u32));
            if first.is_none() {
                first = Some(b.chain);
            }
        }
        let num = batch.len() as u16;
        if let Some(chain) = first.as_ref().filter(|_| self.hdr_len == HDR_LEN) {
            // Through vm-memory: logged by the layer. The legacy 10-byte header has no
            // num_buffers: those bytes are the frame's.
            let mut w = ChainWriter::new(mem, chain);
            if w.skip(HDR_NUM_BUFFERS as u64).is_ok() {
                let _ = w.write_all(&num.to_le_bytes());
            }
        }
        ring.add_used_batch(mem, &batch);
        if let Some(c) = self.counters(self.rxq) {
            c.packet((n as usize).saturating_sub(self.hdr_len));
            if num > 1 {
                c.merged_frame();
            }
        }
        batch.len()
    }

    /// Gives every cached receive buffer back to the avail ring (the ring stops).
    fn return_rx_cache(&mut self, rings: &mut Rings) {
        if self.rx_cache.is_empty() {
            return;
        }
        if self.rx_partial.take().is_some() {
            self.count_drop(self.rxq, DropReason::RxTruncated);
        }
        if let Some(ring) = rings.get_mut(self.rxq) {
            let mem = ring.memory();
            // Unused, they go back to the avail ring where the ring allows it, and are
            // completed unused (length 0) where it does not (see `Ring::give_back`):
            // either way the driver has them back.
            if ring.give_back(&mem, self.rx_cache.iter().map(|b| &b.chain)) > 0 {
                ring.notify(&mem);
            }
        }
        self.rx_cache.clear();
    }

    /// The ring stops and the tap stays full: gives the pending TX frames back unsent
    /// (`Ring::give_back`). Those that can go back to the avail ring are sent by whoever
    /// runs the ring next; the others are completed unsent (length 0) and counted as
    /// abandoned.
    fn abandon_tx(&mut self, rings: &mut Rings) {
        let Some(ring) = rings.get_mut(self.txq) else {
            self.tx_pending.clear();
            return;
        };
        let mem = ring.memory();
        let abandoned = ring.give_back(&mem, self.tx_pending.iter().map(|f| &f.chain));
        self.tx_pending.clear();
        if abandoned > 0 {
            if let Some(c) = self.shared.stats.queue(self.txq) {
                for _ in 0..abandoned {
                    c.drop(DropReason::TxAbandoned);
                }
            }
            ring.notify(&mem);
        }
    }

    fn refresh(&mut self, rings: &mut Rings) {
        self.rx_enabled = rings.get_mut(self.rxq).is_some_and(|r| r.is_enabled());
        self.tx_enabled = rings.get_mut(self.txq).is_some_and(|r| r.is_enabled());
        self.sync_attached();
    }
}

/// The receive parameters (merging, header size, capacity to gather before reading a
/// frame) for the features `acked`.
fn rx_params(shared: &NetShared, acked: u64) -> (bool, usize, u64) {
    let mrg = acked & features::MRG_RXBUF != 0;
    let gso = tap_offloads(acked) & (tun::TUN_F_TSO4 | tun::TUN_F_TSO6 | tun::TUN_F_UFO);
    let frame = if gso != 0 {
        MAX_FRAME_LEN
    } else {
        usize::from(shared.opts.mtu.unwrap_or(1500).max(1500)) + ETH_OVERHEAD
    };
    let hlen = hdr_len(acked);
    (mrg, hlen, (hlen + frame) as u64)
}

impl QueueWorker for PairWorker {
    fn event_fds(&self) -> Vec<RawFd> {
        vec![self.epoll.as_raw_fd()]
    }

    fn process_queue(&mut self, queue: u16, rings: &mut Rings) {
        let Some(ring) = rings.get_mut(queue) else {
            return;
        };
        if queue == self.rxq {
            self.rx_enabled = ring.is_enabled();
            self.sync_attached();
            // A kick on the RX ring: the guest posted buffers.
            self.rx_starved = false;
            if self.shared.is_attached(self.pair) {
                self.process_rx(ring);
            }
        } else if queue == self.txq {
            self.tx_enabled = ring.is_enabled();
            self.sync_attached();
            self.process_tx(ring);
        }
        self.update_interest();
    }

    fn handle_event(&mut self, _fd_index: usize, rings: &mut Rings) {
        let mut events = [EpollEvent::default(); 2];
        let n = self.epoll.wait(0, &mut events).unwrap_or(0);
        let mut ready = EventSet::empty();
        let mut more = false;
        for e in &events[..n] {
            if e.data() == TOKEN_MORE {
                let _ = self.more.read();
                more = true;
            } else {
                ready = EventSet::from_bits_truncate(e.events);
            }
        }
        self.refresh(rings);
        log::trace!("pair {}: tap events {ready:?}", self.pair);
        if (more && self.tx_more)
            || (ready.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP)
                && !self.tx_pending.is_empty())
        {
            if let Some(tx) = rings.get_mut(self.txq) {
                if tx.is_enabled() {
                    self.process_tx(tx);
                }
            }
        }
        if (more && self.rx_more) || ready.intersects(EventSet::IN | EventSet::ERROR) {
            if let Some(rx) = rings.get_mut(self.rxq) {
                if rx.is_enabled() {
                    self.process_rx(rx);
                }
            }
        }
        self.update_interest();
    }

    fn in_flight(&self, queue: u16) -> usize {
        if queue == self.rxq {
            self.rx_cache.len()
        } else if queue == self.txq {
            self.tx_pending.len()
        } else {
            0
        }
    }

    fn wait_completions(&mut self, rings: &mut Rings) -> io::Result<()> {
        self.return_rx_cache(rings);
        if self.tx_pending.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + TX_DRAIN_TIMEOUT;
        while !self.tx_pending.is_empty() && Instant::now() < deadline {
            let mut pfd = libc::pollfd {
                fd: self.fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            if let Some(tx) = rings.get_mut(self.txq) {
                let mem = tx.memory();
                let pending: Vec<TxFrame> = self.tx_pending.drain(..).collect();
                let mut done = 0;
                for f in pending {
                    match self.prepare_tx(&mem, f.chain) {
                        Ok(f) => self.tx_frames.push(f),
                        Err((chain, why)) => {
                            self.count_drop(self.txq, why);
                            tx.add_used(&mem, chain.head, 0);
                            done += 1;
                        }
                    }
                }
                done += self.write_frames(tx, &mem);
                if done > 0 {
                    tx.notify(&mem);
                }
            } else {
                break;
            }
        }
        self.abandon_tx(rings);
        self.update_interest();
        Ok(())
    }
}
