//! The transmit io_uring of one queue pair: a batch of writev operations on the tap queue
//! (registered as fixed file 0), each straight from guest memory, in one system call.

use std::any::Any;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};

/// What the buffers of queued writes live in (guest memory), kept alive until they complete.
pub type KeepAlive = Arc<dyn Any + Send + Sync>;

/// An io_uring for writes to one tap queue.
pub struct TxUring {
    ring: IoUring,
    /// Use RWF_NOWAIT (a full tap answers EAGAIN instead of parking the write).
    nowait: bool,
    /// Our own copies of the iovec arrays of queued writes, one per submission slot. The
    /// kernel reads an array when it takes the entry, and an entry still queued after a
    /// failed io_uring_enter is taken by a later one: the caller's arrays are the caller's
    /// again once we return, so the entries must never point at them.
    iovecs: Vec<Vec<libc::iovec>>,
    /// Entries queued or in flight whose completions were not reaped yet. Slots (and
    /// `keep`) are reused only once this is back to 0.
    outstanding: usize,
    /// Keeps the memory the outstanding writes read from mapped until they complete.
    keep: Option<KeepAlive>,
    /// Tag of the current call (upper half of user_data): completions left over from a
    /// call that failed are not mistaken for this call's.
    generation: u32,
    /// Test hook: the next submission fails (as io_uring_enter may, e.g. EBUSY) before
    /// anything queued reaches the kernel.
    #[cfg(test)]
    fail_next_submit: bool,
}

// SAFETY: the raw pointers in `iovecs` point into memory that `keep` keeps alive; the
// ring moves to its worker thread once, as a whole, and is used there only.
unsafe impl Send for TxUring {}

impl TxUring {
    /// A ring of `entries` slots writing to `tap_fd`.
    pub fn new(entries: u32, tap_fd: RawFd) -> io::Result<Self> {
        let ring = IoUring::builder().build(entries)?;
        ring.submitter().register_files(&[tap_fd])?;
        let slots = ring.params().sq_entries() as usize;
        Ok(Self {
            ring,
            nowait: true,
            iovecs: vec![Vec::new(); slots.max(1)],
            outstanding: 0,
            keep: None,
            generation: 0,
            #[cfg(test)]
            fail_next_submit: false,
        })
    }

    /// Submission slots.
    pub fn capacity(&self) -> usize {
        self.iovecs.len()
    }

    /// Submits whatever is queued and waits for `self.outstanding` completions, storing
    /// this call's results. On an error the outstanding entries keep their iovec copies
    /// and `keep`, and the next call finishes them first.
    fn reap(&mut self, results: &mut [i32]) -> io::Result<()> {
        while self.outstanding > 0 {
            #[cfg(test)]
            if std::mem::take(&mut self.fail_next_submit) {
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
            match self.ring.submit_and_wait(self.outstanding) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            for cqe in self.ring.completion() {
                self.outstanding = self.outstanding.saturating_sub(1);
                let data = cqe.user_data();
                if (data >> 32) as u32 != self.generation {
                    continue;
                }
                if let Some(r) = results.get_mut((data & 0xffff_ffff) as usize) {
                    *r = cqe.result();
                }
            }
        }
        self.keep = None;
        Ok(())
    }

    /// Writes each iovec array of `batch` as one frame and stores the results (bytes or
    /// -errno) in `results`, in order. Returns when every write completed, or with an
    /// error; writes still queued or in flight then use our own copies of their iovecs
    /// and keep `keep` alive, and the next call completes them before anything else.
    ///
    /// # Safety
    /// Every iovec must point into memory that `keep` keeps valid.
    pub unsafe fn writev_batch(
        &mut self,
        batch: &[&[libc::iovec]],
        results: &mut Vec<i32>,
        keep: &KeepAlive,
    ) -> io::Result<()> {
        results.clear();
        results.resize(batch.len(), -libc::ECANCELED);
        // Leftovers of a call that failed: finish them (their results are dropped).
        self.reap(&mut [])?;
        self.generation = self.generation.wrapping_add(1);
        self.keep = Some(keep.clone());
        let mut retry: Vec<usize> = (0..batch.len()).collect();
        while !retry.is_empty() {
            let flags = if self.nowait { libc::RWF_NOWAIT } else { 0 };
            for chunk in retry.chunks(self.capacity()) {
                for (slot, &i) in chunk.iter().enumerate() {
                    let Some(iov) = self.iovecs.get_mut(slot) else {
                        return Err(io::Error::other("io_uring slot out of range"));
                    };
                    iov.clear();
                    iov.extend_from_slice(batch[i]);
                    let entry =
                        opcode::Writev::new(types::Fixed(0), iov.as_ptr(), iov.len() as u32)
                            .offset(u64::MAX)
                            .rw_flags(flags)
                            .build()
                            .user_data(u64::from(self.generation) << 32 | i as u64);
                    // SAFETY: the entry points at our own iovec copy, untouched until the
                    // entry's completion is reaped (`outstanding`), and through it at memory
                    // `keep` keeps valid, which we hold until then too.
                    if unsafe { self.ring.submission().push(&entry) }.is_err() {
                        return Err(io::Error::other("io_uring submission queue full"));
                    }
                    self.outstanding += 1;
                }
                self.reap(results)?;
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

impl Drop for TxUring {
    fn drop(&mut self) {
        // Writes still queued or in flight: give them a few chances to finish; if they
        // cannot, leave their iovecs and memory mapped for good rather than let the kernel
        // read freed memory.
        for _ in 0..3 {
            if self.reap(&mut []).is_ok() {
                return;
            }
        }
        if self.outstanding > 0 {
            std::mem::forget(std::mem::take(&mut self.iovecs));
            std::mem::forget(self.keep.take());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: a valid array for two descriptors.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        assert_eq!(rc, 0, "pipe2: {}", io::Error::last_os_error());
        // SAFETY: two fresh descriptors we own.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn iov(b: &[u8]) -> libc::iovec {
        libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        }
    }

    fn drain(fd: &OwnedFd) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: a valid buffer of its length.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
    }

    #[test]
    fn a_failed_submission_leaves_no_sqe_on_the_callers_iovecs() {
        let (r, w) = pipe();
        let mut u = TxUring::new(8, w.as_raw_fd()).expect("io_uring");
        let first = b"first-frame".to_vec();
        let poison = b"POISON-POISON".to_vec();
        let second = b"second".to_vec();
        let mut iovs = vec![iov(&first)];
        let mut results = Vec::new();
        u.fail_next_submit = true;
        let keep: KeepAlive = Arc::new(());
        // SAFETY: the iovecs point to buffers alive until the end of the test.
        let res = unsafe { u.writev_batch(&[&iovs[..]], &mut results, &keep) };
        assert!(res.is_err(), "the injected failure is reported");
        // The call returned: its iovecs are the caller's again, to reuse as it likes.
        iovs[0] = iov(&poison);
        let iovs2 = [iov(&second)];
        // SAFETY: as above.
        let res = unsafe { u.writev_batch(&[&iovs2[..]], &mut results, &keep) };
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(
            results,
            vec![second.len() as i32],
            "results of this batch only"
        );
        let out = drain(&r);
        assert!(
            !out.windows(6).any(|w| w == b"POISON"),
            "the kernel wrote through iovecs the caller had taken back: {:?}",
            String::from_utf8_lossy(&out)
        );
        assert!(
            out.ends_with(&second),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
        drop(u);
        drop(iovs);
    }
}
