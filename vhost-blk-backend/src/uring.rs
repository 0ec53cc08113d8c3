//! The io_uring engine of one queue worker: submission with back-pressure, completion
//! reaping, and an eventfd the worker's epoll waits on (completions never busy-poll).

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// One operation on the disk. Pointers must stay valid until its completion is reaped.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// preadv into `iovecs`.
    Readv {
        /// iovec array.
        iovecs: *const libc::iovec,
        /// Number of iovecs.
        count: u32,
        /// Disk offset.
        offset: u64,
    },
    /// pwritev from `iovecs`, with RWF_DSYNC when `dsync`.
    Writev {
        /// iovec array.
        iovecs: *const libc::iovec,
        /// Number of iovecs.
        count: u32,
        /// Disk offset.
        offset: u64,
        /// Write through (the guest turned the write cache off).
        dsync: bool,
    },
    /// fdatasync.
    Flush,
    /// fallocate(mode, offset, len).
    Fallocate {
        /// fallocate mode flags.
        mode: i32,
        /// Disk offset.
        offset: u64,
        /// Length.
        len: u64,
    },
}

/// Which kind of io_uring [`Uring::with_mode`] sets up.
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

/// An io_uring with the disk registered as fixed file 0.
///
/// Where the kernel has it (6.1+), the ring is set up with DEFER_TASKRUN and SINGLE_ISSUER:
/// completions are then posted when the worker asks for them (in [`Uring::reap`]) instead
/// of interrupting the worker thread with task work at arbitrary points, which on a
/// 2-core machine under paravirtualisation costs more than the I/O itself. Such a ring
/// belongs to one thread; it is created disabled (the worker is built on the control
/// thread) and enabled by the first call on the worker's own thread.
pub struct Uring {
    ring: IoUring,
    eventfd: EventFd,
    /// SQEs pushed but not yet submitted.
    unsubmitted: usize,
    /// Completions are deferred until [`Uring::reap`] asks the kernel for them.
    deferred: bool,
    /// The ring accepts submissions (false until the worker thread enables it).
    enabled: bool,
    /// Reads and writes are done at once with preadv2/pwritev2 (memory-backed image; see
    /// `disk::is_memory_backed`); their results wait in `ready`.
    inline: Option<RawFd>,
    /// Results of inline operations, reaped before the ring's.
    ready: Vec<(u64, i32)>,
}

impl Uring {
    /// A ring of `entries` submission slots for the file `disk_fd`; `inline_rw` does reads
    /// and writes synchronously instead (memory-backed files).
    pub fn new(entries: u32, disk_fd: RawFd, inline_rw: bool) -> io::Result<Self> {
        Self::with_mode(entries, disk_fd, inline_rw, RingMode::PreferDeferred)
    }

    /// Like [`Uring::new`], choosing the kind of ring: tests force a plain ring to run the
    /// paths of kernels without DEFER_TASKRUN on any kernel.
    pub fn with_mode(
        entries: u32,
        disk_fd: RawFd,
        inline_rw: bool,
        mode: RingMode,
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
        ring.submitter().register_files(&[disk_fd])?;
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(Self {
            ring,
            eventfd,
            unsubmitted: 0,
            deferred,
            enabled: !deferred,
            inline: inline_rw.then_some(disk_fd),
            ready: Vec::new(),
        })
    }

    /// Performs a read or write at once when inline I/O is on; None when `op` goes to the
    /// ring.
    fn try_inline(&self, op: &Op) -> Option<i32> {
        let fd = self.inline?;
        let res = match *op {
            Op::Readv {
                iovecs,
                count,
                offset,
            } => {
                // SAFETY: the caller of `push` guarantees the iovecs and their buffers are
                // valid; the call completes before we return.
                unsafe { libc::preadv2(fd, iovecs, count as i32, offset as i64, 0) }
            }
            Op::Writev {
                iovecs,
                count,
                offset,
                dsync,
            } => {
                let flags = if dsync { libc::RWF_DSYNC } else { 0 };
                // SAFETY: as above.
                unsafe { libc::pwritev2(fd, iovecs, count as i32, offset as i64, flags) }
            }
            _ => return None,
        };
        Some(if res < 0 {
            -io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        } else {
            i32::try_from(res).unwrap_or(i32::MAX)
        })
    }

    /// Enables a ring created disabled; binds it to the calling (worker) thread.
    fn enable(&mut self) -> io::Result<()> {
        if !self.enabled {
            self.ring.submitter().register_enable_rings()?;
            self.enabled = true;
        }
        Ok(())
    }

    /// The fd that becomes readable when completions arrive.
    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Clears the eventfd (before reaping, so no completion is missed).
    pub fn clear_event(&self) {
        let _ = self.eventfd.read();
    }

    fn entry(op: Op, user_data: u64) -> squeue::Entry {
        let fd = types::Fixed(0);
        let e = match op {
            Op::Readv {
                iovecs,
                count,
                offset,
            } => opcode::Readv::new(fd, iovecs, count).offset(offset).build(),
            Op::Writev {
                iovecs,
                count,
                offset,
                dsync,
            } => opcode::Writev::new(fd, iovecs, count)
                .offset(offset)
                .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                .build(),
            Op::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Fallocate { mode, offset, len } => opcode::Fallocate::new(fd, len)
                .offset(offset)
                .mode(mode)
                .build(),
        };
        e.user_data(user_data)
    }

    /// Queues `op`; `link` makes the next pushed op wait for this one.
    ///
    /// # Safety
    /// The buffers and iovec arrays `op` points to must stay valid and unmoved until the
    /// completion with `user_data` has been reaped.
    pub unsafe fn push(&mut self, op: Op, user_data: u64, link: bool) -> io::Result<()> {
        if let Some(res) = self.try_inline(&op) {
            self.ready.push((user_data, res));
            return Ok(());
        }
        let mut entry = Self::entry(op, user_data);
        if link {
            entry = entry.flags(squeue::Flags::IO_LINK);
        }
        self.enable()?;
        for _ in 0..MAX_FULL_RETRIES {
            // SAFETY: the caller guarantees the buffers outlive the operation.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            // Submission queue full: hand what we have to the kernel and retry. `submit`
            // makes room or fails; it never reports success for a queue it left full
            // without having moved completions out of the way (see there).
            self.submit()?;
        }
        // The kernel keeps refusing our entries: fail this operation rather than spin (the
        // caller completes the request with an I/O error).
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "io_uring submission queue stays full",
        ))
    }

    /// Submits queued operations; makes inline results visible through the eventfd.
    ///
    /// EBUSY (a plain ring whose completion queue overflowed and whose overflow the kernel
    /// cannot take more of; kernels before 5.19 or so) means: reap first. The completions
    /// are moved out of the CQ into `ready` (reaped from there like inline results) and the
    /// submission retried, a bounded number of times: never a busy loop.
    pub fn submit(&mut self) -> io::Result<()> {
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
            let _ = self.eventfd.write(1);
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

    /// Submits and blocks until at least one completion is available.
    pub fn submit_and_wait(&mut self) -> io::Result<()> {
        if !self.ready.is_empty() {
            return self.submit();
        }
        self.enable()?;
        loop {
            match self.ring.submit_and_wait(1) {
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

    /// Moves available completions (user_data, result) into `out`.
    pub fn reap(&mut self, out: &mut Vec<(u64, i32)>) -> io::Result<()> {
        out.append(&mut self.ready);
        self.collect_completions(out)
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
        let _ = self.eventfd.write(1);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// Runs `f` on a thread and fails (instead of hanging the suite) if it takes too long.
    fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        match rx.recv_timeout(limit) {
            Ok(v) => v,
            Err(_) => panic!("did not finish within {limit:?}"),
        }
    }

    /// Waits until the ring's eventfd is readable or `ms` milliseconds passed.
    fn wait_event(u: &Uring, ms: i32) {
        let mut pfd = libc::pollfd {
            fd: u.eventfd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, ms) };
    }

    /// A plain 16-entry ring (CQ of 32) gets 1000 operations without being reaped: the
    /// completions overflow the CQ. Pushing must neither spin nor fail, and every one of
    /// the 1000 completions must come out of `reap`, exactly once.
    #[test]
    fn a_full_completion_queue_neither_spins_nor_loses_completions() {
        const N: u64 = 1000;
        let file = tempfile::tempfile().expect("temp file");
        file.set_len(1 << 20).expect("size");
        let got = within(Duration::from_secs(30), move || {
            let mut u =
                Uring::with_mode(16, file.as_raw_fd(), false, RingMode::Plain).expect("ring");
            for i in 0..N {
                let op = if i % 2 == 0 {
                    Op::Flush
                } else {
                    Op::Fallocate {
                        mode: 0,
                        offset: (i % 64) * 4096,
                        len: 4096,
                    }
                };
                // SAFETY: fsync and fallocate reference no memory.
                unsafe { u.push(op, i, false) }.expect("push");
            }
            u.submit().expect("submit");
            // Let them all complete first: the CQ holds 32, the rest overflow.
            std::thread::sleep(Duration::from_millis(300));
            let mut out = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            while (out.len() as u64) < N && Instant::now() < deadline {
                u.clear_event();
                let before = out.len();
                u.reap(&mut out).expect("reap");
                if out.len() == before {
                    wait_event(&u, 100);
                }
            }
            drop(file);
            out
        });
        assert_eq!(got.len() as u64, N, "completions reaped");
        let mut ids: Vec<u64> = got.iter().map(|&(id, _)| id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len() as u64, N, "each completion exactly once");
        assert!(got.iter().all(|&(_, res)| res >= 0), "{got:?}");
    }
}
