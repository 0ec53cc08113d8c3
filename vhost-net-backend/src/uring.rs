//! The transmit io_uring of one queue pair: a batch of writev operations on the tap queue
//! (registered as fixed file 0), each straight from guest memory, in one system call.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, types, IoUring};

/// An io_uring for writes to one tap queue.
pub struct TxUring {
    ring: IoUring,
    /// Use RWF_NOWAIT (a full tap answers EAGAIN instead of parking the write).
    nowait: bool,
}

impl TxUring {
    /// A ring of `entries` slots writing to `tap_fd`.
    pub fn new(entries: u32, tap_fd: RawFd) -> io::Result<Self> {
        let ring = IoUring::builder().build(entries)?;
        ring.submitter().register_files(&[tap_fd])?;
        Ok(Self { ring, nowait: true })
    }

    /// Submission slots.
    pub fn capacity(&self) -> usize {
        self.ring.params().sq_entries() as usize
    }

    /// Writes each iovec array of `batch` as one frame and stores the results (bytes or
    /// -errno) in `results`, in order. Returns when every write completed.
    ///
    /// # Safety
    /// Every iovec must point to memory that stays valid until this returns.
    pub unsafe fn writev_batch(
        &mut self,
        batch: &[&[libc::iovec]],
        results: &mut Vec<i32>,
    ) -> io::Result<()> {
        results.clear();
        results.resize(batch.len(), -libc::ECANCELED);
        let mut retry: Vec<usize> = (0..batch.len()).collect();
        while !retry.is_empty() {
            let flags = if self.nowait { libc::RWF_NOWAIT } else { 0 };
            for chunk in retry.chunks(self.capacity().max(1)) {
                for &i in chunk {
                    let iov = batch[i];
                    let entry =
                        opcode::Writev::new(types::Fixed(0), iov.as_ptr(), iov.len() as u32)
                            .offset(u64::MAX)
                            .rw_flags(flags)
                            .build()
                            .user_data(i as u64);
                    // SAFETY: the caller keeps the iovecs and their buffers valid until we
                    // return, and we return only after reaping every completion.
                    if unsafe { self.ring.submission().push(&entry) }.is_err() {
                        return Err(io::Error::other("io_uring submission queue full"));
                    }
                }
                let mut left = chunk.len();
                while left > 0 {
                    match self.ring.submit_and_wait(left) {
                        Ok(_) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                        Err(e) => return Err(e),
                    }
                    for cqe in self.ring.completion() {
                        if let Some(r) = results.get_mut(cqe.user_data() as usize) {
                            *r = cqe.result();
                        }
                        left = left.saturating_sub(1);
                    }
                }
            }
            retry.clear();
            if self.nowait && results.contains(&-libc::EOPNOTSUPP) {
                // This kernel's tap does not take RWF_NOWAIT: writes to a tap do not block
                // anyway (its send buffer is unlimited), so write without it.
                self.nowait = false;
                retry.extend(
                    results
                        .iter()
                        .enumerate()
                        .filter(|(_, &r)| r == -libc::EOPNOTSUPP)
                        .map(|(i, _)| i),
                );
            }
        }
        Ok(())
    }
}
