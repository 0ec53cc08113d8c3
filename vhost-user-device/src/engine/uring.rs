//! The io_uring engine: submission with back-pressure, completion reaping, an eventfd the
//! worker's epoll waits on (completions never busy-poll), and the in-flight map that owns
//! every operation (its buffers with it) from submission until its completion is reaped.

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::fixed::{chunks_of, FixedError, FixedTable, FIXED_SLOTS};
use super::{Completion, Op};
use crate::iovec::IOV_MAX;
use crate::memory::GuestMem;
use std::sync::Arc;

/// Which kind of io_uring [`Uring::new`] sets up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingMode {
    /// DEFER_TASKRUN + SINGLE_ISSUER where the kernel has them, else a plain ring.
    PreferDeferred,
    /// A plain ring (what kernels before 6.1 get).
    Plain,
}

/// Times `push` hands a full submission queue to the kernel before giving up.
const MAX_FULL_RETRIES: usize = 16;
/// EBUSY answers `submit` takes (moving completions out of the CQ each time) before it
/// reports the error.
const MAX_BUSY_RETRIES: usize = 16;
/// CQ-sized batches one reap moves out of an overflowed plain ring at most; the rest comes
/// with the next reap (the eventfd is written so that the worker comes back for it).
const MAX_FLUSH_ROUNDS: usize = 1024;

/// io_uring_enter(2) flag: wait for / post completions (the crate keeps `sys` private).
const IORING_ENTER_GETEVENTS: u32 = 1;

/// An operation the kernel has (or will have): the engine's key for it is its index in
/// the in-flight map, which is what the SQE carries as user_data.
struct InFlight {
    user_data: u64,
    op: Op,
}

/// An io_uring with one file registered as fixed file 0.
///
/// Where the kernel has it (6.1+), the ring is set up with DEFER_TASKRUN and SINGLE_ISSUER:
/// completions are then posted when the worker asks for them (in [`Uring::reap`]) instead
/// of interrupting the worker thread with task work at arbitrary points, which on a
/// 2-core machine under paravirtualisation costs more than the I/O itself. Such a ring
/// belongs to one thread; it is created disabled (the worker is built on the control
/// thread) and enabled by the first call on the worker's own thread.
///
/// Dropped with operations still in the kernel (a worker that gave up waiting for them),
/// it leaks the ring and those operations' buffers rather than unmap or free memory the
/// kernel may still read or write.
pub struct Uring {
    ring: ManuallyDrop<IoUring>,
    /// Signalled by the kernel for every completion (None: the owner only ever waits in
    /// `submit_and_wait`, and the kernel saves a wake-up per completion).
    eventfd: Option<EventFd>,
    /// SQEs pushed but not yet submitted.
    unsubmitted: usize,
    /// Completions are deferred until [`Uring::reap`] asks the kernel for them.
    deferred: bool,
    /// The ring accepts submissions (false until the worker thread enables it).
    enabled: bool,
    /// Operations queued or in the kernel, by key; `free` lists the empty keys.
    in_flight: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Count of `Some` in `in_flight`.
    count: usize,
    /// Completions (key, result) moved out of the CQ to make room, reaped before the
    /// ring's.
    ready: Vec<(u64, i32)>,
    /// Reused buffer of `reap`.
    scratch: Vec<(u64, i32)>,
    /// Guest memory registered as fixed buffers (empty unless the owner asked).
    fixed: FixedTable,
    /// Test hook: the next submission fails (as io_uring_enter may, e.g. EBUSY) before
    /// anything queued reaches the kernel.
    #[cfg(test)]
    pub(super) fail_next_submit: bool,
}

impl Uring {
    /// A ring of `entries` submission slots for the file `fd`, of the kind `mode` asks
    /// (tests force a plain ring to run the paths of kernels without DEFER_TASKRUN), whose
    /// completions signal [`Uring::eventfd`].
    pub fn new(entries: u32, fd: BorrowedFd<'_>, mode: RingMode) -> io::Result<Self> {
        Self::build(entries, fd, mode, true)
    }

    /// Like [`Uring::new`], without an eventfd: for an owner that waits for its
    /// completions in [`Uring::submit_and_wait`] only (net TX), so that the kernel does
    /// not signal one per completion.
    pub fn without_eventfd(entries: u32, fd: BorrowedFd<'_>, mode: RingMode) -> io::Result<Self> {
        Self::build(entries, fd, mode, false)
    }

    fn build(
        entries: u32,
        fd: BorrowedFd<'_>,
        mode: RingMode,
        with_eventfd: bool,
    ) -> io::Result<Self> {
        let deferred = match mode {
            RingMode::PreferDeferred => IoUring::builder()
                .setup_r_disabled()
                .setup_single_issuer()
                .setup_defer_taskrun()
                .build(entries)
                // Older kernels: EINVAL for the unknown flags.
                .map_err(|e| {
                    log::debug!("io_uring DEFER_TASKRUN unavailable ({e}); using a plain ring")
                })
                .ok(),
            RingMode::Plain => None,
        };
        let (ring, deferred) = match deferred {
            Some(ring) => (ring, true),
            None => (IoUring::builder().build(entries)?, false),
        };
        ring.submitter().register_files(&[fd.as_raw_fd()])?;
        let eventfd = if with_eventfd {
            let eventfd = EventFd::new(EFD_NONBLOCK)?;
            ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
            Some(eventfd)
        } else {
            None
        };
        Ok(Self {
            ring: ManuallyDrop::new(ring),
            eventfd,
            unsubmitted: 0,
            deferred,
            enabled: !deferred,
            in_flight: Vec::new(),
            free: Vec::new(),
            count: 0,
            ready: Vec::new(),
            scratch: Vec::new(),
            fixed: FixedTable::default(),
            #[cfg(test)]
            fail_next_submit: false,
        })
    }

    /// Enables a ring created disabled; binds it to the calling (worker) thread.
    #[inline]
    fn enable(&mut self) -> io::Result<()> {
        if !self.enabled {
            self.ring.submitter().register_enable_rings()?;
            self.enabled = true;
        }
        Ok(())
    }

    /// The fd that becomes readable when completions arrive (None: built without).
    pub fn eventfd(&self) -> Option<RawFd> {
        self.eventfd.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Clears the eventfd (before reaping, so no completion is missed).
    pub fn clear_event(&self) {
        if let Some(e) = &self.eventfd {
            let _ = e.read();
        }
    }

    /// Makes the eventfd readable: the owner comes back to reap.
    fn signal(&self) {
        if let Some(e) = &self.eventfd {
            let _ = e.write(1);
        }
    }

    /// Operations queued or in the kernel.
    #[inline]
    pub fn in_flight(&self) -> usize {
        self.count
    }

    /// The SQE of `op`. Its pointers stay valid while `op` sits in the in-flight map: the
    /// iovec arrays and buffers are heap memory its [`crate::IovecList`] owns or keeps
    /// alive, and moving the list does not move them.
    /// A read or write of one buffer inside a registered chunk uses that fixed buffer.
    #[inline]
    fn entry(&mut self, op: &Op, key: u64) -> squeue::Entry {
        let fd = types::Fixed(0);
        let count = |n: usize| n.min(IOV_MAX) as u32;
        let e = match op {
            Op::Read { offset, bufs } => {
                let iov = bufs.as_iovecs();
                match self.fixed_slot(iov) {
                    Some(slot) => opcode::ReadFixed::new(
                        fd,
                        iov[0].iov_base.cast(),
                        iov[0].iov_len as u32,
                        slot,
                    )
                    .offset(*offset)
                    .build(),
                    None => opcode::Readv::new(fd, iov.as_ptr(), count(iov.len()))
                        .offset(*offset)
                        .build(),
                }
            }
            Op::Write {
                offset,
                bufs,
                flags,
            } => {
                let iov = bufs.as_iovecs();
                match self.fixed_slot(iov) {
                    Some(slot) => opcode::WriteFixed::new(
                        fd,
                        iov[0].iov_base.cast(),
                        iov[0].iov_len as u32,
                        slot,
                    )
                    .offset(*offset)
                    .rw_flags(*flags)
                    .build(),
                    None => opcode::Writev::new(fd, iov.as_ptr(), count(iov.len()))
                        .offset(*offset)
                        .rw_flags(*flags)
                        .build(),
                }
            }
            Op::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Fallocate { mode, offset, len } => opcode::Fallocate::new(fd, *len)
                .offset(*offset)
                .mode(*mode)
                .build(),
        };
        e.user_data(key)
    }

    /// The fixed buffer a transfer over `iov` can use: one iovec (of at most what a
    /// single SQE's length takes) inside one registered chunk.
    #[inline]
    fn fixed_slot(&mut self, iov: &[libc::iovec]) -> Option<u16> {
        let [v] = iov else { return None };
        let len = u32::try_from(v.iov_len).ok()?;
        let slot = self.fixed.find(v.iov_base as u64, u64::from(len))?;
        self.fixed.ops += 1;
        Some(slot)
    }

    /// Registers `mem` as the ring's fixed buffers (each region in chunks of at most
    /// 1 GiB), replacing what was registered: reads and writes of one buffer inside it
    /// use READ_FIXED/WRITE_FIXED from now on. This pins all of `mem`; the caller checks
    /// the locked-memory limit first.
    ///
    /// Operations already in the kernel keep the buffer they were issued with (the
    /// kernel holds a reference on a replaced buffer until they complete); operations
    /// queued but not yet submitted would name the new table, so they are submitted
    /// first, and if the kernel does not take them all the call fails with
    /// [`FixedError::Busy`] and changes nothing. On any other error nothing is used as a
    /// fixed buffer until the next successful call.
    pub fn register_memory(&mut self, mem: &Arc<GuestMem>) -> Result<(), FixedError> {
        let iovecs = chunks_of(mem);
        if iovecs.len() > FIXED_SLOTS as usize {
            self.unregister_memory();
            return Err(FixedError::TooManyChunks(iovecs.len()));
        }
        self.submit().map_err(FixedError::Register)?;
        if self.unsubmitted > 0 {
            return Err(FixedError::Busy);
        }
        self.enable().map_err(FixedError::Register)?;
        if !self.fixed.created {
            self.ring
                .submitter()
                .register_buffers_sparse(FIXED_SLOTS)
                .map_err(FixedError::Register)?;
            self.fixed.created = true;
        }
        // The new chunks, then empty iovecs over slots the old table used beyond them.
        let mut update = iovecs.clone();
        update.resize(
            self.fixed.slots_to_write(iovecs.len()),
            libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
        );
        // SAFETY: the iovecs point into `mem`'s mappings, which the table keeps (an Arc
        // of the snapshot) for as long as they are registered: until the next call
        // replaces them or the ring is closed (the kernel holds its own page references
        // meanwhile).
        let r = unsafe {
            self.ring
                .submitter()
                .register_buffers_update(0, &update, None)
        };
        match r {
            Ok(()) => {
                self.fixed.set(mem, &iovecs);
                Ok(())
            }
            Err(e) => {
                // Some slots may hold new buffers, some old: use none of them.
                self.unregister_memory();
                Err(FixedError::Register(e))
            }
        }
    }

    /// Stops using fixed buffers and empties the kernel's table (which unpins the
    /// memory once no operation in the kernel still uses it).
    pub fn unregister_memory(&mut self) {
        if !self.fixed.created {
            return;
        }
        // Nothing queued may name a slot once it is emptied.
        let drained = self.submit().is_ok() && self.unsubmitted == 0;
        let n = self.fixed.slots_to_write(0);
        let empty = vec![
            libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            };
            n
        ];
        // SAFETY: empty iovecs register nothing.
        let cleared = drained
            && (n == 0
                || unsafe {
                    self.ring
                        .submitter()
                        .register_buffers_update(0, &empty, None)
                }
                .is_ok());
        self.fixed.clear(cleared);
    }

    /// The guest memory registered as fixed buffers now.
    pub fn registered_memory(&self) -> Option<&Arc<GuestMem>> {
        self.fixed.memory()
    }

    /// Reads and writes issued on a fixed buffer so far.
    pub fn fixed_ops(&self) -> u64 {
        self.fixed.ops
    }

    #[inline]
    fn insert(&mut self, user_data: u64, op: Op) -> usize {
        let entry = Some(InFlight { user_data, op });
        self.count += 1;
        match self.free.pop() {
            Some(k) => {
                self.in_flight[k] = entry;
                k
            }
            None => {
                self.in_flight.push(entry);
                self.in_flight.len() - 1
            }
        }
    }

    #[inline]
    fn remove(&mut self, key: u64) -> Option<InFlight> {
        let k = usize::try_from(key).ok()?;
        let entry = self.in_flight.get_mut(k)?.take()?;
        self.count -= 1;
        self.free.push(k);
        Some(entry)
    }

    /// Queues `op` and keeps it until its completion; `link` makes the next pushed op
    /// wait for this one. On an error `op` never reached the kernel and is dropped.
    #[inline]
    pub fn push(&mut self, op: Op, user_data: u64, link: bool) -> io::Result<()> {
        self.enable()?;
        // The SQE points at heap memory the operation's buffers own (iovec array, data),
        // which stays where it is when the operation moves into the map.
        let next_key = self.free.last().copied().unwrap_or(self.in_flight.len());
        let mut entry = self.entry(&op, next_key as u64);
        if link {
            entry = entry.flags(squeue::Flags::IO_LINK);
        }
        let key = self.insert(user_data, op);
        debug_assert_eq!(key, next_key);
        for _ in 0..MAX_FULL_RETRIES {
            // SAFETY: the entry points into the operation's buffers, which the in-flight
            // map owns until the completion with this key is reaped (or, if that never
            // comes, leaks: see Drop).
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            // Submission queue full: hand what we have to the kernel and retry. `submit`
            // makes room or fails; it never reports success for a queue it left full
            // without having moved completions out of the way (see there).
            if let Err(e) = self.submit() {
                self.remove(key as u64);
                return Err(e);
            }
        }
        self.remove(key as u64);
        // The kernel keeps refusing our entries: fail this operation rather than spin (the
        // caller completes the request with an I/O error).
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "io_uring submission queue stays full",
        ))
    }

    /// SQEs pushed but not yet submitted.
    pub fn unsubmitted(&self) -> usize {
        self.unsubmitted
    }

    /// Submits queued operations.
    ///
    /// EBUSY (a plain ring whose completion queue overflowed and whose overflow the kernel
    /// cannot take more of; kernels before 5.19 or so) means: reap first. The completions
    /// are moved out of the CQ into `ready` and the submission retried, a bounded number
    /// of times: never a busy loop.
    #[inline]
    pub fn submit(&mut self) -> io::Result<()> {
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next_submit) {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        if self.unsubmitted > 0 {
            self.enable()?;
            let mut busy = 0;
            loop {
                match self.ring.submit() {
                    Ok(_) => {
                        // The kernel may take fewer entries than it was given.
                        self.unsubmitted = self.ring.submission().len();
                        break;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        busy += 1;
                        if busy > MAX_BUSY_RETRIES {
                            return Err(e);
                        }
                        self.move_completions_to_ready()?;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        if !self.ready.is_empty() {
            // The worker reaps when the eventfd fires: one write, no sleep.
            self.signal();
        }
        Ok(())
    }

    /// Moves the completions the kernel posted (and those it holds in its overflow list)
    /// into `ready`, making room in the CQ.
    fn move_completions_to_ready(&mut self) -> io::Result<()> {
        let mut ready = std::mem::take(&mut self.ready);
        let r = self.collect_completions(&mut ready);
        self.ready = ready;
        r
    }

    /// Submits and blocks until at least `want` completions are available (capped at
    /// the operations in flight; returns at once with none in flight).
    #[inline]
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next_submit) {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        let want = want.min(self.count.saturating_sub(self.ready.len()));
        if want == 0 {
            return self.submit();
        }
        self.enable()?;
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => {
                    self.unsubmitted = self.ring.submission().len();
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // Completions are waiting for room in the CQ: there is something to reap.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    return self.move_completions_to_ready();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves available completions into `out`, each with its operation (and buffers).
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        self.reap_each(|c| out.push(c))
    }

    /// Hands each available completion, with its operation (and buffers), to `f`.
    #[inline]
    pub fn reap_each(&mut self, mut f: impl FnMut(Completion)) -> io::Result<()> {
        let mut raw = std::mem::take(&mut self.scratch);
        raw.clear();
        raw.append(&mut self.ready);
        let r = self.collect_completions(&mut raw);
        for (key, result) in raw.drain(..) {
            match self.remove(key) {
                Some(InFlight { user_data, op }) => f(Completion {
                    user_data,
                    result,
                    op,
                }),
                None => log::error!("io_uring completion for unknown operation {key}"),
            }
        }
        self.scratch = raw;
        r
    }

    /// Asks the kernel to post what it holds back (deferred task work; completions that
    /// overflowed the CQ) and moves the CQ's completions into `out`.
    fn collect_completions(&mut self, out: &mut Vec<(u64, i32)>) -> io::Result<()> {
        if self.deferred {
            self.enable()?;
        }
        // A plain ring whose CQ overflowed keeps the excess in the kernel until an
        // io_uring_enter with GETEVENTS flushes it into the CQ as room allows: without
        // that, those completions would wait for the next unrelated submission (and with
        // no I/O left to submit, for ever). Each round empties the CQ, so each flush makes
        // progress; the bound only guards against a kernel that keeps the flag set.
        for _ in 0..MAX_FLUSH_ROUNDS {
            if self.deferred || self.ring.submission().cq_overflow() {
                self.get_events()?;
            }
            let before = out.len();
            for cqe in self.ring.completion() {
                out.push((cqe.user_data(), cqe.result()));
            }
            if self.deferred || !self.ring.submission().cq_overflow() || out.len() == before {
                return Ok(());
            }
        }
        // More is waiting in the kernel: have the worker come back for it.
        self.signal();
        Ok(())
    }

    /// io_uring_enter(GETEVENTS) without submitting or waiting: runs deferred task work
    /// and flushes overflowed completions into the CQ; returns at once.
    fn get_events(&mut self) -> io::Result<()> {
        loop {
            // SAFETY: no submissions and no argument; only asks for completions.
            let r = unsafe {
                self.ring
                    .submitter()
                    .enter::<libc::sigset_t>(0, 0, IORING_ENTER_GETEVENTS, None)
            };
            match r {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        if self.count == 0 {
            // SAFETY: not used after this, and no operation remains the kernel could
            // still be working on.
            unsafe { ManuallyDrop::drop(&mut self.ring) };
            return;
        }
        // Closing an io_uring does not wait for its operations: the kernel finishes or
        // cancels them in its own time and may read or write their buffers until then.
        // Keep the ring and the operations (their guest memory snapshots, bounce buffers)
        // for good instead. The owner (a worker) has waited for them already, bounded,
        // and counted and logged what is left.
        log::error!(
            "io_uring dropped with {} operation(s) in the kernel: leaking their buffers",
            self.count
        );
        std::mem::forget(std::mem::take(&mut self.in_flight));
    }
}
