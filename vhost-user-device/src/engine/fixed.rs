//! Guest memory registered with an io_uring as fixed buffers (READ_FIXED, WRITE_FIXED).
//!
//! A fixed buffer is pinned once, when it is registered, instead of on every operation:
//! the kernel skips the page-table walk and page pinning a readv/writev of guest memory
//! pays per request. The price: the whole of guest memory stays pinned (resident, not
//! swappable or migratable) while it is registered.
//!
//! Which buffer an operation uses is found by its host address: the table keeps the
//! memory snapshot it registered (so those mappings stay where they are), and each
//! operation keeps its own snapshot (see [`crate::IovecList`]). Two mappings alive at
//! the same time never overlap, so an operation whose one iovec lies inside a
//! registered chunk is in that chunk's mapping, however many table changes lie between
//! the two snapshots.

use std::sync::Arc;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMem;

/// The most bytes one fixed buffer may cover (the kernel refuses larger ones).
pub const FIXED_BUF_MAX: u64 = 1 << 30;

/// Slots of the sparse buffer table (the kernel allows up to 16384): 509 regions, or
/// 1 TiB of guest memory in 1 GiB chunks, whichever comes first.
pub const FIXED_SLOTS: u32 = 1024;

/// Why guest memory could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum FixedError {
    /// More chunks than the table has slots.
    #[error(
        "guest memory needs {0} fixed buffers (one per region and GiB), more than the \
         {FIXED_SLOTS} the table holds"
    )]
    TooManyChunks(usize),
    /// Operations the kernel did not take yet still name the old table.
    #[error("submissions still queued; registration retried later")]
    Busy,
    /// io_uring_register failed (EOPNOTSUPP: memory the kernel cannot pin for long,
    /// e.g. a file on disk rather than memfd, shm or hugetlbfs; ENOMEM: over the locked
    /// memory limit).
    #[error("io_uring buffer registration failed: {0}")]
    Register(#[source] std::io::Error),
}

/// One registered chunk: host addresses `[start, end)` are fixed buffer `slot`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Chunk {
    pub start: u64,
    pub end: u64,
    pub slot: u16,
}

/// The chunks of `mem`: each region split into pieces of at most [`FIXED_BUF_MAX`],
/// as iovecs in slot order.
pub fn chunks_of(mem: &GuestMem) -> Vec<libc::iovec> {
    let mut out = Vec::new();
    for region in mem.iter() {
        let base = region.as_ptr() as u64;
        let len = region.len();
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(FIXED_BUF_MAX);
            out.push(libc::iovec {
                iov_base: (base + at) as *mut libc::c_void,
                iov_len: n as usize,
            });
            at += n;
        }
    }
    out
}

/// Bytes of guest memory in `mem` (what registering it pins).
pub fn guest_bytes(mem: &GuestMem) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// The registered table as the engine sees it.
#[derive(Default)]
pub(super) struct FixedTable {
    /// Sorted by `start`; empty: no fixed buffers in use (whatever the kernel holds).
    chunks: Vec<Chunk>,
    /// The memory the chunks point into, kept mapped while they are registered.
    mem: Option<Arc<GuestMem>>,
    /// Slots the kernel's table may hold something in (cleared on the next change).
    used_slots: u32,
    /// The sparse table exists in the kernel.
    pub created: bool,
    /// Operations issued on a fixed buffer (READ_FIXED/WRITE_FIXED).
    pub ops: u64,
}

impl FixedTable {
    /// The fixed buffer holding `[addr, addr + len)`, if one does.
    #[inline]
    pub fn find(&self, addr: u64, len: u64) -> Option<u16> {
        if self.chunks.is_empty() {
            return None;
        }
        let i = self.chunks.partition_point(|c| c.start <= addr);
        let c = self.chunks.get(i.checked_sub(1)?)?;
        let end = addr.checked_add(len)?;
        (end <= c.end).then_some(c.slot)
    }

    /// The memory registered now.
    pub fn memory(&self) -> Option<&Arc<GuestMem>> {
        self.mem.as_ref()
    }

    /// Slots to rewrite for a table of `n` chunks: the new ones and any old ones beyond.
    pub fn slots_to_write(&self, n: usize) -> usize {
        n.max(self.used_slots as usize)
    }

    /// The kernel's table now holds `iovecs` (from `mem`) in slots 0.., nothing after.
    pub fn set(&mut self, mem: &Arc<GuestMem>, iovecs: &[libc::iovec]) {
        let mut chunks: Vec<Chunk> = iovecs
            .iter()
            .enumerate()
            .map(|(slot, v)| Chunk {
                start: v.iov_base as u64,
                end: v.iov_base as u64 + v.iov_len as u64,
                slot: slot as u16,
            })
            .collect();
        chunks.sort_unstable_by_key(|c| c.start);
        self.chunks = chunks;
        self.mem = Some(mem.clone());
        self.used_slots = iovecs.len() as u32;
    }

    /// No fixed buffer is used from now on; `kernel_cleared`: the kernel's slots are
    /// empty too (else they are rewritten at the next registration).
    pub fn clear(&mut self, kernel_cleared: bool) {
        self.chunks.clear();
        self.mem = None;
        if kernel_cleared {
            self.used_slots = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(chunks: &[(u64, u64)]) -> FixedTable {
        FixedTable {
            chunks: chunks
                .iter()
                .enumerate()
                .map(|(i, &(start, end))| Chunk {
                    start,
                    end,
                    slot: i as u16,
                })
                .collect(),
            ..FixedTable::default()
        }
    }

    #[test]
    fn a_buffer_is_fixed_only_when_wholly_inside_one_chunk() {
        let t = table(&[(0x1000, 0x3000), (0x3000, 0x5000), (0x9000, 0xa000)]);
        assert_eq!(t.find(0x1000, 0x2000), Some(0));
        assert_eq!(t.find(0x3000, 0x1000), Some(1));
        assert_eq!(t.find(0x4fff, 1), Some(1));
        // Straddles two chunks (contiguous, but two buffers), or runs past one.
        assert_eq!(t.find(0x2fff, 2), None);
        assert_eq!(t.find(0x9800, 0x1000), None);
        // Before, between and after the chunks; an end that overflows.
        assert_eq!(t.find(0x0fff, 1), None);
        assert_eq!(t.find(0x6000, 8), None);
        assert_eq!(t.find(0xa000, 8), None);
        assert_eq!(t.find(u64::MAX - 1, 8), None);
        assert_eq!(FixedTable::default().find(0x1000, 8), None);
    }

    #[test]
    fn a_region_over_a_gib_is_split_into_gib_chunks() {
        use crate::dirty_log::DirtyLog;
        use crate::memory::MemoryTable;
        use std::os::fd::FromRawFd;
        use vhost::vhost_user::message::VhostUserMemoryRegion;
        use vm_memory::GuestAddressSpace;
        let size = (5u64 << 30) / 2;
        // SAFETY: valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"fixed-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        // Sparse: nothing is allocated, nothing is touched.
        file.set_len(size).expect("size");
        let mut table = MemoryTable::new(DirtyLog::new());
        table
            .add_region(&VhostUserMemoryRegion::new(0, size, 0x7000_0000, 0), file)
            .expect("region");
        let mem = table.atomic().memory().into_inner();
        let c = chunks_of(&mem);
        let lens: Vec<u64> = c.iter().map(|v| v.iov_len as u64).collect();
        assert_eq!(lens, vec![1 << 30, 1 << 30, 1 << 29]);
        assert_eq!(c[1].iov_base as u64, c[0].iov_base as u64 + (1 << 30));
        assert_eq!(guest_bytes(&mem), size);
    }

    #[test]
    fn regions_are_split_into_chunks_of_at_most_a_gib() {
        let mem = crate::iovec::tests::two_regions();
        let c = chunks_of(&mem);
        assert_eq!(c.len(), 2);
        assert!(c.iter().all(|v| v.iov_len == 64 << 10));
        assert_eq!(guest_bytes(&mem), 128 << 10);
        let mut t = FixedTable::default();
        t.set(&mem, &c);
        assert_eq!(
            t.slots_to_write(1),
            2,
            "old slots beyond the new table are cleared"
        );
        let base = c[1].iov_base as u64;
        assert_eq!(t.find(base + 100, 4096), Some(1));
        t.clear(true);
        assert_eq!(t.find(base + 100, 4096), None);
        assert_eq!(t.slots_to_write(1), 1);
    }
}
