//! The inline engine: every operation is a system call on the calling thread, done when
//! `run` returns (see the module documentation of `engine` for when that is the better
//! choice).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use super::mapped::FileMap;
use super::{Completion, Op};
use crate::iovec::IOV_MAX;

/// Synchronous I/O on one file.
pub struct Inline {
    /// Our own descriptor of the file (a dup: it cannot be closed under us).
    fd: OwnedFd,
    /// The previous operation was linked and did not succeed fully: this one is
    /// cancelled, as io_uring cancels the rest of a broken link chain.
    cancel_next: bool,
    /// The file mapped, when reads and writes are memory copies ([`FileMap`]); dropped
    /// for good after a page vanished under it.
    map: Option<FileMap>,
}

impl Inline {
    /// An engine for `fd`.
    pub fn new(fd: BorrowedFd<'_>) -> io::Result<Self> {
        Ok(Self {
            fd: fd.try_clone_to_owned()?,
            cancel_next: false,
            map: None,
        })
    }

    /// An engine for `fd` that reads and writes through a mapping of it (a tmpfs file:
    /// see [`FileMap`]); other operations, and whatever the mapping cannot do, are
    /// system calls as in [`Inline::new`].
    /// When the file cannot be mapped, one warning says why and the engine is the plain
    /// inline one.
    pub fn mapped(fd: BorrowedFd<'_>) -> io::Result<Self> {
        let mut engine = Self::new(fd)?;
        match FileMap::new(engine.fd.as_fd()) {
            Ok(map) => engine.map = map,
            Err(e) => log::warn!(
                "cannot map the file ({e}): its reads and writes are system calls instead"
            ),
        }
        Ok(engine)
    }

    /// Whether reads and writes go through a mapping.
    pub fn is_mapped(&self) -> bool {
        self.map.is_some()
    }

    /// Runs `op` now. `link`: the next operation runs only if this one succeeds fully.
    pub fn run(&mut self, op: Op, user_data: u64, link: bool) -> Completion {
        let result = if std::mem::take(&mut self.cancel_next) {
            -libc::ECANCELED
        } else if let Some(r) = self.through_map(&op) {
            r
        } else {
            self.syscall(&op)
        };
        if link {
            // io_uring breaks a link on an error and on a short read or write.
            let want = match &op {
                Op::Read { bufs, .. } | Op::Write { bufs, .. } => bufs.bytes(),
                Op::Flush | Op::Fallocate { .. } => 0,
            };
            self.cancel_next = result < 0 || (result as u64) < want;
        }
        Completion {
            user_data,
            result,
            op,
        }
    }

    /// `op` done through the mapping, if it can be.
    fn through_map(&mut self, op: &Op) -> Option<i32> {
        let map = self.map.as_mut()?;
        let result = match op {
            Op::Read { offset, bufs } => map.read(*offset, bufs),
            Op::Write { offset, bufs, .. } => map.write(*offset, bufs),
            Op::Fallocate { offset, len, .. } => {
                // Holes may appear: the system call does it, the map forgets what it knew.
                map.forget(*offset, *len);
                None
            }
            Op::Flush => None,
        };
        if result == Some(-libc::EIO) {
            log::warn!(
                "a page of the mapped file vanished during a copy (truncated under us, or \
                 the file system is full): that request failed with EIO, and the file's \
                 reads and writes are system calls from now on"
            );
            self.map = None;
        }
        result
    }

    fn syscall(&self, op: &Op) -> i32 {
        let fd = self.fd.as_raw_fd();
        let res: i64 = match op {
            Op::Read { offset, bufs } => {
                let iov = bufs.as_iovecs();
                let n = iov.len().min(IOV_MAX) as libc::c_int;
                // SAFETY: `bufs` keeps the memory its iovecs point to alive and writable
                // for as long as it lives, which covers this call.
                unsafe { libc::preadv2(fd, iov.as_ptr(), n, *offset as i64, 0) as i64 }
            }
            Op::Write {
                offset,
                bufs,
                flags,
            } => {
                let iov = bufs.as_iovecs();
                let n = iov.len().min(IOV_MAX) as libc::c_int;
                // SAFETY: as above; the kernel only reads the buffers.
                unsafe { libc::pwritev2(fd, iov.as_ptr(), n, *offset as i64, *flags) as i64 }
            }
            // SAFETY: plain system calls on our own descriptor, no memory passed.
            Op::Flush => unsafe { i64::from(libc::fdatasync(fd)) },
            Op::Fallocate { mode, offset, len } => {
                // SAFETY: as above.
                unsafe { i64::from(libc::fallocate(fd, *mode, *offset as i64, *len as i64)) }
            }
        };
        if res < 0 {
            -io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        } else {
            i32::try_from(res).unwrap_or(i32::MAX)
        }
    }
}
