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

/// An io_uring with the disk registered as fixed file 0.
pub struct Uring {
    ring: IoUring,
    eventfd: EventFd,
    /// SQEs pushed but not yet submitted.
    unsubmitted: usize,
}

impl Uring {
    /// A ring of `entries` submission slots for the file `disk_fd`.
    pub fn new(entries: u32, disk_fd: RawFd) -> io::Result<Self> {
        let ring = IoUring::builder().build(entries)?;
        ring.submitter().register_files(&[disk_fd])?;
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(Self {
            ring,
            eventfd,
            unsubmitted: 0,
        })
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
        let mut entry = Self::entry(op, user_data);
        if link {
            entry = entry.flags(squeue::Flags::IO_LINK);
        }
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

    /// Submits queued operations.
    pub fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
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
    pub fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        for cqe in self.ring.completion() {
            out.push((cqe.user_data(), cqe.result()));
        }
    }
}
