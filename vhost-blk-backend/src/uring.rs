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
        let (ring, deferred) = match IoUring::builder()
            .setup_r_disabled()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries)
        {
            Ok(ring) => (ring, true),
            // Older kernels: EINVAL for the unknown flags.
            Err(e) => {
                log::debug!("io_uring DEFER_TASKRUN unavailable ({e}); using a plain ring");
                (IoUring::builder().build(entries)?, false)
            }
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
        loop {
            // SAFETY: the caller guarantees the buffers outlive the operation.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            // Submission queue full: hand what we have to the kernel and retry.
            self.submit()?;
        }
    }

    /// Submits queued operations; makes inline results visible through the eventfd.
    pub fn submit(&mut self) -> io::Result<()> {
        if !self.ready.is_empty() {
            // The worker reaps when the eventfd fires: one write, no sleep.
            let _ = self.eventfd.write(1);
        }
        if self.unsubmitted == 0 {
            return Ok(());
        }
        self.enable()?;
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    self.unsubmitted = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The kernel is short of completion space: reap, then retry.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
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
                    self.unsubmitted = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves available completions (user_data, result) into `out`.
    pub fn reap(&mut self, out: &mut Vec<(u64, i32)>) -> io::Result<()> {
        out.append(&mut self.ready);
        if self.deferred {
            self.enable()?;
            // Post the completions the kernel holds back for us (runs our deferred task
            // work); returns at once.
            loop {
                // SAFETY: no submissions and no argument; only asks for completions.
                let r = unsafe {
                    self.ring.submitter().enter::<libc::sigset_t>(
                        0,
                        0,
                        IORING_ENTER_GETEVENTS,
                        None,
                    )
                };
                match r {
                    Ok(_) => break,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        for cqe in self.ring.completion() {
            out.push((cqe.user_data(), cqe.result()));
        }
        Ok(())
    }
}
