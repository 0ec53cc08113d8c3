//! Typed iovec lists: the buffers of one I/O operation as host iovecs, together with what
//! keeps the memory they point to alive.
//!
//! An [`IovecList`] is built from guest buffers (checked against guest memory, holding the
//! memory snapshot, an `Arc`, that keeps the mapping in place), from a buffer of our own
//! ([`AlignedBuf`], for bounce buffers), or from a buffer shared between operations (the
//! buffer of zeros write-zeroes writes from). Whoever owns the list owns the memory: an
//! I/O engine that holds an operation's list until the kernel is done with it needs no
//! promise from its caller (see [`crate::engine`]).

use std::sync::Arc;

use crate::chain::Segment;
use crate::memory::{host_iovecs, GuestMem, MemoryError};

/// The kernel's limit on iovecs per readv/writev (UIO_MAXIOV).
pub const IOV_MAX: usize = 1024;

/// Alignment unit of [`AlignedBuf`]: enough for O_DIRECT on any device (logical blocks
/// are at most a page).
const ALIGN: usize = 4096;

#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Page([u8; ALIGN]);

/// A zeroed, page-aligned heap buffer (O_DIRECT bounce buffers, the buffer of zeros).
pub struct AlignedBuf {
    pages: Vec<Page>,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes, page aligned; None when the allocation fails.
    pub fn new(len: usize) -> Option<Self> {
        let n = len.max(1).div_ceil(ALIGN);
        let mut pages = Vec::new();
        pages.try_reserve_exact(n).ok()?;
        pages.resize(n, Page([0; ALIGN]));
        Some(Self { pages, len })
    }

    /// The buffer's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `pages` holds at least `len` initialised bytes, contiguous (Page is
        // repr(C) without padding: an array of u8).
        unsafe { std::slice::from_raw_parts(self.pages.as_ptr().cast(), self.len) }
    }

    /// The buffer's bytes, to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.pages.as_mut_ptr().cast(), self.len) }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn ptr(&self) -> *mut libc::c_void {
        self.pages.as_ptr().cast_mut().cast()
    }
}

/// What keeps the memory of an [`IovecList`] alive.
enum Backing {
    /// No buffers (operations without data).
    None,
    /// Guest memory: the snapshot keeps every region of it mapped (held, never read).
    Guest(#[allow(dead_code)] Arc<GuestMem>),
    /// A buffer the list owns.
    Owned(AlignedBuf),
    /// A buffer shared with other lists, read only (the kernel never writes it); held,
    /// never read.
    Shared(#[allow(dead_code)] Arc<AlignedBuf>),
}

/// Why guest buffers cannot be turned into an [`IovecList`].
#[derive(Debug, thiserror::Error)]
pub enum IovecError {
    /// A buffer is (partly) outside guest memory.
    #[error("guest buffer at {addr:#x} ({len} bytes) is outside guest memory: {source}")]
    OutsideMemory {
        /// Guest-physical start of the buffer.
        addr: u64,
        /// Its length.
        len: u64,
        /// What the memory table said.
        source: MemoryError,
    },
    /// More host iovecs than one readv/writev takes.
    #[error("{0} buffers are more than the {IOV_MAX} one system call takes")]
    TooMany(usize),
}

/// Host iovecs over memory the list keeps alive. See the module documentation.
pub struct IovecList {
    iovecs: Vec<libc::iovec>,
    /// Bytes the iovecs cover.
    bytes: u64,
    backing: Backing,
}

// SAFETY: the raw pointers in `iovecs` point into memory `backing` keeps alive (a guest
// memory snapshot, a buffer the list owns, or a shared buffer held through an Arc), and
// nothing else in the list is tied to a thread; moving the list moves that ownership
// with it. This is the one place the I/O path declares raw iovecs Send.
unsafe impl Send for IovecList {}

impl IovecList {
    /// An empty list (an operation without data).
    #[inline]
    pub fn empty() -> Self {
        Self {
            iovecs: Vec::new(),
            bytes: 0,
            backing: Backing::None,
        }
    }

    /// The host iovecs of the guest buffers `segments` (every byte checked to be inside
    /// `mem`), keeping `mem` mapped for as long as the list lives.
    pub fn from_guest<'a>(
        mem: &Arc<GuestMem>,
        segments: impl IntoIterator<Item = &'a Segment>,
    ) -> Result<Self, IovecError> {
        let segments = segments.into_iter();
        let mut iovecs = Vec::with_capacity(segments.size_hint().0);
        let mut bytes = 0u64;
        for s in segments {
            let len = u64::from(s.len);
            host_iovecs(mem, s.addr, len, &mut iovecs).map_err(|source| {
                IovecError::OutsideMemory {
                    addr: s.addr,
                    len,
                    source,
                }
            })?;
            bytes += len;
        }
        Ok(Self {
            iovecs,
            bytes,
            backing: Backing::Guest(mem.clone()),
        })
    }

    /// Like [`IovecList::from_guest`], failing when one system call could not take the
    /// whole list (a frame must go to the tap in one writev).
    pub fn from_guest_whole<'a>(
        mem: &Arc<GuestMem>,
        segments: impl IntoIterator<Item = &'a Segment>,
    ) -> Result<Self, IovecError> {
        let list = Self::from_guest(mem, segments)?;
        if list.iovecs.len() > IOV_MAX {
            return Err(IovecError::TooMany(list.iovecs.len()));
        }
        Ok(list)
    }

    /// One iovec over the whole of `buf`, which the list now owns.
    pub fn owned(buf: AlignedBuf) -> Self {
        let iovecs = vec![libc::iovec {
            iov_base: buf.ptr(),
            iov_len: buf.len(),
        }];
        Self {
            bytes: buf.len() as u64,
            iovecs,
            backing: Backing::Owned(buf),
        }
    }

    /// `len` bytes read from `buf` over and over (iovecs of at most its length): writes
    /// of one shared buffer of zeros. The kernel only reads such a list.
    pub fn repeated(buf: &Arc<AlignedBuf>, len: u64) -> Self {
        let mut iovecs = Vec::new();
        let mut left = len;
        let step = buf.len().max(1) as u64;
        while left > 0 {
            let n = left.min(step);
            iovecs.push(libc::iovec {
                iov_base: buf.ptr(),
                iov_len: n as usize,
            });
            left -= n;
        }
        Self {
            iovecs,
            bytes: len,
            backing: Backing::Shared(buf.clone()),
        }
    }

    /// The iovecs, valid for as long as the list lives.
    #[inline]
    pub fn as_iovecs(&self) -> &[libc::iovec] {
        &self.iovecs
    }

    /// Bytes still covered.
    #[inline]
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether every iovec starts and ends on a multiple of `align` (O_DIRECT).
    pub fn is_aligned(&self, align: u64) -> bool {
        self.iovecs
            .iter()
            .all(|v| (v.iov_base as u64 | v.iov_len as u64).is_multiple_of(align.max(1)))
    }

    /// The owned buffer (a bounce buffer), if the list is one.
    #[inline]
    pub fn owned_buf(&self) -> Option<&AlignedBuf> {
        match &self.backing {
            Backing::Owned(b) => Some(b),
            _ => None,
        }
    }

    /// Drops the first `n` bytes (the part a short transfer already moved).
    pub fn advance(&mut self, mut n: u64) {
        n = n.min(self.bytes);
        self.bytes -= n;
        let mut drop_count = 0;
        for v in self.iovecs.iter_mut() {
            let len = v.iov_len as u64;
            if n >= len {
                n -= len;
                drop_count += 1;
            } else {
                // `wrapping_add`: no dereference, and n < iov_len keeps the pointer
                // inside the buffer.
                v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n as usize).cast();
                v.iov_len -= n as usize;
                break;
            }
        }
        self.iovecs.drain(..drop_count);
    }
}

impl std::fmt::Debug for IovecList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backing = match self.backing {
            Backing::None => "none",
            Backing::Guest(_) => "guest",
            Backing::Owned(_) => "owned",
            Backing::Shared(_) => "shared",
        };
        f.debug_struct("IovecList")
            .field("iovecs", &self.iovecs.len())
            .field("bytes", &self.bytes)
            .field("backing", &backing)
            .finish()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dirty_log::DirtyLog;
    use crate::memory::MemoryTable;
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use vhost::vhost_user::message::VhostUserMemoryRegion;
    use vm_memory::GuestAddressSpace;

    /// Guest memory of two 64 KiB regions, at 0 and at 1 MiB.
    pub(crate) fn two_regions() -> Arc<GuestMem> {
        let mut table = MemoryTable::new(DirtyLog::new());
        for gpa in [0u64, 1 << 20] {
            // SAFETY: valid C string; the result is checked.
            let fd = unsafe { libc::memfd_create(c"iovec-test".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0);
            // SAFETY: a fresh descriptor we own.
            let file = unsafe { File::from_raw_fd(fd) };
            file.set_len(64 << 10).expect("size");
            table
                .add_region(
                    &VhostUserMemoryRegion::new(gpa, 64 << 10, 0x7000_0000_0000 + gpa, 0),
                    file,
                )
                .expect("region");
        }
        table.atomic().memory().into_inner()
    }

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr,
            len,
            writable: false,
        }
    }

    #[test]
    fn guest_buffers_are_checked_and_split_at_region_ends() {
        let mem = two_regions();
        let l =
            IovecList::from_guest(&mem, &[seg(0x100, 512), seg((1 << 20) + 8, 8)]).expect("inside");
        assert_eq!(l.bytes(), 520);
        assert_eq!(l.as_iovecs().len(), 2);
        // 64 KiB to 1 MiB is a hole between the regions.
        let e = IovecList::from_guest(&mem, &[seg(0xff00, 0x200)]).expect_err("hole");
        assert!(
            matches!(e, IovecError::OutsideMemory { addr: 0xff00, .. }),
            "{e}"
        );
        let e = IovecList::from_guest(&mem, &[seg(u64::MAX - 3, 8)]).expect_err("wraps");
        assert!(matches!(e, IovecError::OutsideMemory { .. }), "{e}");
    }

    #[test]
    fn too_many_iovecs_for_one_call_are_refused_whole() {
        let mem = two_regions();
        let segs: Vec<Segment> = (0..IOV_MAX as u64 + 1).map(|i| seg(i * 8, 8)).collect();
        assert!(IovecList::from_guest(&mem, &segs).is_ok());
        let e = IovecList::from_guest_whole(&mem, &segs).expect_err("too many");
        assert!(
            matches!(e, IovecError::TooMany(n) if n == IOV_MAX + 1),
            "{e}"
        );
    }

    #[test]
    fn advance_drops_whole_iovecs_then_moves_into_the_next() {
        let mem = two_regions();
        let mut l = IovecList::from_guest(&mem, &[seg(0, 100), seg(0x1000, 100)]).unwrap();
        let second = l.as_iovecs()[1].iov_base as usize;
        l.advance(150);
        assert_eq!(l.bytes(), 50);
        assert_eq!(l.as_iovecs().len(), 1);
        assert_eq!(l.as_iovecs()[0].iov_base as usize, second + 50);
        assert_eq!(l.as_iovecs()[0].iov_len, 50);
        l.advance(1000);
        assert_eq!(l.bytes(), 0);
        assert!(l.as_iovecs().is_empty());
    }

    #[test]
    fn aligned_buffers_are_page_aligned_zeroed_and_repeat() {
        let mut b = AlignedBuf::new(10_000).expect("alloc");
        assert_eq!(b.len(), 10_000);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[9_999] = 7;
        let l = IovecList::owned(b);
        // The start is page aligned; the length (10 000) is a multiple of 16, not of 512.
        assert!(l.is_aligned(16));
        assert!(!l.is_aligned(512));
        assert_eq!(l.as_iovecs()[0].iov_base as usize % 4096, 0);
        assert_eq!(l.owned_buf().map(|b| b.as_slice()[9_999]), Some(7));
        let z = Arc::new(AlignedBuf::new(4096).unwrap());
        let r = IovecList::repeated(&z, 10_000);
        let lens: Vec<usize> = r.as_iovecs().iter().map(|v| v.iov_len).collect();
        assert_eq!(lens, vec![4096, 4096, 1808]);
        assert_eq!(Arc::strong_count(&z), 2, "the list holds the shared buffer");
        drop(r);
        assert_eq!(Arc::strong_count(&z), 1);
    }
}
