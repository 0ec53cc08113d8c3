//! Walking a descriptor chain the guest gave us, trusting nothing.
//!
//! We walk chains ourselves instead of using virtio-queue's `DescriptorChain` so that the
//! same code serves chains popped from the avail ring and chains resubmitted from the
//! inflight region after a reconnect (virtio-queue cannot build a chain from a head index),
//! and so that every rule is checked in one place: head and `next` indices inside the table,
//! at most `queue_size` descriptors (which also catches loops), indirect tables well formed and
//! not nested, readable descriptors before writable ones, every buffer inside guest memory.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMem;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;
/// Size of one descriptor in a table.
const DESC_SIZE: u64 = 16;

/// One buffer of a chain, validated to lie inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes (never zero: empty descriptors are skipped).
    pub len: u32,
    /// The device may write it (VRING_DESC_F_WRITE).
    pub writable: bool,
}

/// Where [`crate::Ring::pop`] took a chain from: what [`crate::Ring::give_back`] needs to
/// return it to the right place.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Origin {
    /// Not taken from a ring (walked directly, or built by hand).
    #[default]
    Detached,
    /// The avail ring, at this avail index.
    Avail(u16),
    /// The chains an earlier backend left in flight (the inflight region).
    Resubmitted,
}

/// A chain: its head index (what goes back on the used ring) and its buffers.
#[derive(Clone, Debug, Default)]
pub struct Chain {
    /// Head descriptor index.
    pub head: u16,
    /// Buffers in order; all readable ones come first.
    pub segments: Vec<Segment>,
    /// Set by [`crate::Ring::pop`].
    pub(crate) origin: Origin,
}

impl Chain {
    /// Where the chain was taken from.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// Total bytes in readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.segments
            .iter()
            .filter(|s| !s.writable)
            .map(|s| u64::from(s.len))
            .sum()
    }

    /// Total bytes in writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.segments
            .iter()
            .filter(|s| s.writable)
            .map(|s| u64::from(s.len))
            .sum()
    }
}

/// Why a chain was rejected. Each is a guest error, counted and logged at a limited rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The head index is not below the queue size.
    #[error("head index {0} is outside the descriptor table")]
    HeadOutOfRange(u16),
    /// A `next` index points outside its table.
    #[error("next index {0} is outside the descriptor table")]
    NextOutOfRange(u16),
    /// More descriptors than the table holds: a loop or an over-long chain.
    #[error("chain has more descriptors than its table (a loop?)")]
    TooLong,
    /// A descriptor (or an indirect table) is not inside guest memory.
    #[error("buffer at {addr:#x} length {len} is outside guest memory")]
    OutsideMemory {
        /// Guest address the driver gave.
        addr: u64,
        /// Length the driver gave.
        len: u64,
    },
    /// An indirect descriptor inside an indirect table, or with NEXT set.
    #[error("nested or chained indirect descriptor")]
    BadIndirect,
    /// An indirect table whose length is zero or not a multiple of 16.
    #[error("indirect table length {0} is not a positive multiple of 16")]
    BadIndirectLength(u32),
    /// A readable descriptor after a writable one.
    #[error("readable descriptor after a writable one")]
    ReadableAfterWritable,
    /// The chain's buffers add up to more than 4 GiB.
    #[error("chain is longer than 4 GiB")]
    TotalTooLarge,
}

#[derive(Clone, Copy, Default)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn read_desc(mem: &GuestMem, table: u64, index: u16) -> Result<RawDesc, ChainError> {
    let addr =
        table
            .checked_add(u64::from(index) * DESC_SIZE)
            .ok_or(ChainError::OutsideMemory {
                addr: table,
                len: DESC_SIZE,
            })?;
    let mut raw = [0u8; 16];
    mem.read_slice(&mut raw, GuestAddress(addr))
        .map_err(|_| ChainError::OutsideMemory {
            addr,
            len: DESC_SIZE,
        })?;
    let le16 = |o: usize| u16::from_le_bytes([raw[o], raw[o + 1]]);
    let mut a = [0u8; 8];
    a.copy_from_slice(&raw[0..8]);
    let mut l = [0u8; 4];
    l.copy_from_slice(&raw[8..12]);
    Ok(RawDesc {
        addr: u64::from_le_bytes(a),
        len: u32::from_le_bytes(l),
        flags: le16(12),
        next: le16(14),
    })
}

/// Walks the chain starting at `head` in the table at `desc_table` (guest-physical) of a
/// queue of `queue_size` entries, filling `chain.segments`.
pub fn walk(
    mem: &GuestMem,
    desc_table: u64,
    queue_size: u16,
    head: u16,
    chain: &mut Chain,
) -> Result<(), ChainError> {
    chain.head = head;
    chain.segments.clear();
    chain.origin = Origin::Detached;
    if head >= queue_size {
        return Err(ChainError::HeadOutOfRange(head));
    }
    let mut total: u64 = 0;
    let mut seen_writable = false;
    let mut push = |d: &RawDesc, chain: &mut Chain| -> Result<(), ChainError> {
        if d.len == 0 {
            return Ok(());
        }
        let writable = d.flags & VRING_DESC_F_WRITE != 0;
        if !writable && seen_writable {
            return Err(ChainError::ReadableAfterWritable);
        }
        seen_writable |= writable;
        if !mem.check_range(GuestAddress(d.addr), d.len as usize) {
            return Err(ChainError::OutsideMemory {
                addr: d.addr,
                len: u64::from(d.len),
            });
        }
        total += u64::from(d.len);
        if total > u64::from(u32::MAX) {
            return Err(ChainError::TotalTooLarge);
        }
        chain.segments.push(Segment {
            addr: d.addr,
            len: d.len,
            writable,
        });
        Ok(())
    };

    let mut index = head;
    let mut budget = queue_size;
    loop {
        if budget == 0 {
            return Err(ChainError::TooLong);
        }
        budget -= 1;
        let d = read_desc(mem, desc_table, index)?;
        if d.flags & VRING_DESC_F_INDIRECT != 0 {
            if d.flags & VRING_DESC_F_NEXT != 0 {
                return Err(ChainError::BadIndirect);
            }
            return walk_indirect(mem, &d, chain, &mut push);
        }
        push(&d, chain)?;
        if d.flags & VRING_DESC_F_NEXT == 0 {
            return Ok(());
        }
        if d.next >= queue_size {
            return Err(ChainError::NextOutOfRange(d.next));
        }
        index = d.next;
    }
}

fn walk_indirect(
    mem: &GuestMem,
    table_desc: &RawDesc,
    chain: &mut Chain,
    push: &mut impl FnMut(&RawDesc, &mut Chain) -> Result<(), ChainError>,
) -> Result<(), ChainError> {
    let len = table_desc.len;
    if len == 0 || u64::from(len) % DESC_SIZE != 0 {
        return Err(ChainError::BadIndirectLength(len));
    }
    let count = u64::from(len) / DESC_SIZE;
    let count = u16::try_from(count).map_err(|_| ChainError::BadIndirectLength(len))?;
    let table = table_desc.addr;
    if GuestAddress(table).checked_add(u64::from(len)).is_none()
        || !mem.check_range(GuestAddress(table), len as usize)
    {
        return Err(ChainError::OutsideMemory {
            addr: table,
            len: u64::from(len),
        });
    }
    let mut index = 0u16;
    let mut budget = count;
    loop {
        if budget == 0 {
            return Err(ChainError::TooLong);
        }
        budget -= 1;
        let d = read_desc(mem, table, index)?;
        if d.flags & VRING_DESC_F_INDIRECT != 0 {
            return Err(ChainError::BadIndirect);
        }
        push(&d, chain)?;
        if d.flags & VRING_DESC_F_NEXT == 0 {
            return Ok(());
        }
        if d.next >= count {
            return Err(ChainError::NextOutOfRange(d.next));
        }
        index = d.next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use std::sync::Arc;

    use vhost::vhost_user::message::VhostUserMemoryRegion;
    use vm_memory::GuestAddressSpace;

    use crate::dirty_log::DirtyLog;
    use crate::memory::MemoryTable;

    /// Guest memory of the tests: [0, MEM), and a second region [HI, HI + MEM) past a hole.
    const MEM: u64 = 0x10000;
    const HI: u64 = 0x20000;
    /// The descriptor table, and where the tests put indirect tables and buffers.
    const TABLE: u64 = 0;
    const INDIRECT: u64 = 0x4000;
    const BUF: u64 = 0x8000;
    const QSIZE: u16 = 16;

    fn memfd(len: u64) -> File {
        // SAFETY: valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"chain-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh descriptor we own.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    /// Guest memory of `regions` (gpa, size), each backed by its own memfd.
    fn memory(regions: &[(u64, u64)]) -> Arc<GuestMem> {
        let mut table = MemoryTable::new(DirtyLog::new());
        for &(gpa, size) in regions {
            table
                .add_region(
                    &VhostUserMemoryRegion::new(gpa, size, 0x7000_0000_0000 + gpa, 0),
                    memfd(size),
                )
                .unwrap();
        }
        table.atomic().memory().into_inner()
    }

    fn mem() -> Arc<GuestMem> {
        memory(&[(0, MEM), (HI, MEM)])
    }

    /// Writes descriptor `i` of the table at `table`.
    fn desc(mem: &GuestMem, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(table + 16 * u64::from(i)))
            .unwrap();
    }

    const N: u16 = VRING_DESC_F_NEXT;
    const W: u16 = VRING_DESC_F_WRITE;
    const I: u16 = VRING_DESC_F_INDIRECT;

    fn walk_at(mem: &GuestMem, head: u16) -> Result<Chain, ChainError> {
        let mut chain = Chain::default();
        walk(mem, TABLE, QSIZE, head, &mut chain).map(|()| chain)
    }

    fn seg(addr: u64, len: u32, writable: bool) -> Segment {
        Segment {
            addr,
            len,
            writable,
        }
    }

    #[test]
    fn a_direct_chain_follows_next_and_keeps_the_order_and_directions() {
        let mem = mem();
        // Head 5 -> 2 -> 9, out of table order; a readable buffer in the second region.
        desc(&mem, TABLE, 5, BUF, 16, N, 2);
        desc(&mem, TABLE, 2, HI + 0x100, 512, N, 9);
        desc(&mem, TABLE, 9, BUF + 0x1000, 1, W, 0);
        let chain = walk_at(&mem, 5).unwrap();
        assert_eq!(chain.head, 5);
        assert_eq!(
            chain.segments,
            vec![
                seg(BUF, 16, false),
                seg(HI + 0x100, 512, false),
                seg(BUF + 0x1000, 1, true)
            ]
        );
        assert_eq!((chain.readable_len(), chain.writable_len()), (528, 1));
        // NEXT clear ends the chain whatever `next` says.
        desc(&mem, TABLE, 3, BUF, 8, 0, 200);
        assert_eq!(walk_at(&mem, 3).unwrap().segments, vec![seg(BUF, 8, false)]);
    }

    #[test]
    fn empty_descriptors_are_skipped_and_a_reused_chain_starts_empty() {
        let mem = mem();
        desc(&mem, TABLE, 0, BUF, 0, N, 1);
        desc(&mem, TABLE, 1, BUF, 32, N | W, 2);
        // A zero-length readable descriptor after a writable one is not an error: it is
        // not a buffer at all.
        desc(&mem, TABLE, 2, 0xdead_0000_0000, 0, 0, 0);
        let mut chain = Chain {
            head: 9,
            segments: vec![seg(1, 1, false); 3],
            ..Default::default()
        };
        walk(&mem, TABLE, QSIZE, 0, &mut chain).unwrap();
        assert_eq!(chain.head, 0);
        assert_eq!(chain.segments, vec![seg(BUF, 32, true)]);
    }

    #[test]
    fn an_indirect_table_is_walked_by_its_own_next_links() {
        let mem = mem();
        desc(&mem, TABLE, 4, INDIRECT, 3 * 16, I, 0);
        desc(&mem, INDIRECT, 0, BUF, 16, N, 2);
        desc(&mem, INDIRECT, 2, BUF + 0x100, 4096, N | W, 1);
        desc(&mem, INDIRECT, 1, BUF + 0x2000, 1, W, 0);
        let chain = walk_at(&mem, 4).unwrap();
        assert_eq!(chain.head, 4);
        assert_eq!(
            chain.segments,
            vec![
                seg(BUF, 16, false),
                seg(BUF + 0x100, 4096, true),
                seg(BUF + 0x2000, 1, true)
            ]
        );
        // Direct descriptors may lead to the indirect one (its table's buffers follow).
        desc(&mem, TABLE, 6, HI, 8, N, 4);
        let chain = walk_at(&mem, 6).unwrap();
        assert_eq!(chain.segments.len(), 4);
        assert_eq!(chain.segments[0], seg(HI, 8, false));
    }

    #[test]
    fn a_chain_as_long_as_the_table_is_accepted_and_loops_are_caught() {
        let mem = mem();
        // Every descriptor once: 0 -> 1 -> ... -> 15.
        for i in 0..QSIZE {
            let last = i + 1 == QSIZE;
            desc(&mem, TABLE, i, BUF, 1, if last { 0 } else { N }, i + 1);
        }
        assert_eq!(walk_at(&mem, 0).unwrap().segments.len(), usize::from(QSIZE));
        // 15 -> 0 closes the loop.
        desc(&mem, TABLE, QSIZE - 1, BUF, 1, N, 0);
        assert_eq!(walk_at(&mem, 0).unwrap_err(), ChainError::TooLong);
        assert_eq!(walk_at(&mem, 7).unwrap_err(), ChainError::TooLong);
        // A descriptor pointing at itself.
        desc(&mem, TABLE, 3, BUF, 1, N, 3);
        assert_eq!(walk_at(&mem, 3).unwrap_err(), ChainError::TooLong);
        // And a loop inside an indirect table: 0 -> 1 -> 0.
        desc(&mem, TABLE, 8, INDIRECT, 2 * 16, I, 0);
        desc(&mem, INDIRECT, 0, BUF, 1, N, 1);
        desc(&mem, INDIRECT, 1, BUF, 1, N, 0);
        assert_eq!(walk_at(&mem, 8).unwrap_err(), ChainError::TooLong);
        // Each entry of the table once is fine.
        desc(&mem, INDIRECT, 1, BUF, 1, 0, 0);
        assert_eq!(walk_at(&mem, 8).unwrap().segments.len(), 2);
    }

    #[test]
    fn indices_outside_the_table_are_refused() {
        let mem = mem();
        assert_eq!(
            walk_at(&mem, QSIZE).unwrap_err(),
            ChainError::HeadOutOfRange(QSIZE)
        );
        assert_eq!(
            walk_at(&mem, u16::MAX).unwrap_err(),
            ChainError::HeadOutOfRange(u16::MAX)
        );
        desc(&mem, TABLE, 0, BUF, 1, N, QSIZE);
        assert_eq!(
            walk_at(&mem, 0).unwrap_err(),
            ChainError::NextOutOfRange(QSIZE)
        );
        desc(&mem, TABLE, 1, INDIRECT, 2 * 16, I, 0);
        desc(&mem, INDIRECT, 0, BUF, 1, N, 2);
        assert_eq!(walk_at(&mem, 1).unwrap_err(), ChainError::NextOutOfRange(2));
    }

    #[test]
    fn buffers_outside_guest_memory_are_refused() {
        let mem = mem();
        let outside = |addr: u64, len: u32| ChainError::OutsideMemory {
            addr,
            len: u64::from(len),
        };
        for (addr, len) in [
            // Past the end of the first region, in the hole, past the last region.
            (MEM, 1),
            (MEM - 8, 16),
            (HI - 1, 2),
            (HI + MEM - 1, 2),
            (1 << 40, 4096),
            // The end wraps around the address space.
            (u64::MAX - 7, 16),
            (u64::MAX, u32::MAX),
        ] {
            desc(&mem, TABLE, 0, BUF, 16, N, 1);
            desc(&mem, TABLE, 1, addr, len, W, 0);
            assert_eq!(
                walk_at(&mem, 0).unwrap_err(),
                outside(addr, len),
                "{addr:#x}+{len}"
            );
        }
        // The last byte of each region is inside.
        desc(&mem, TABLE, 1, HI + MEM - 1, 1, W, 0);
        assert!(walk_at(&mem, 0).is_ok());
        // A descriptor table that is itself outside memory (or wraps).
        let mut chain = Chain::default();
        assert!(matches!(
            walk(&mem, MEM - 16, QSIZE, 1, &mut chain),
            Err(ChainError::OutsideMemory { .. })
        ));
        assert!(matches!(
            walk(&mem, u64::MAX - 15, QSIZE, 1, &mut chain),
            Err(ChainError::OutsideMemory { .. })
        ));
    }

    #[test]
    fn malformed_indirect_tables_are_refused() {
        let mem = mem();
        let head_to = |flags: u16, addr: u64, len: u32| {
            desc(&mem, TABLE, 0, addr, len, flags, 1);
            walk_at(&mem, 0)
        };
        desc(&mem, INDIRECT, 0, BUF, 16, 0, 0);
        assert!(head_to(I, INDIRECT, 16).is_ok());
        assert_eq!(
            head_to(I | N, INDIRECT, 16).unwrap_err(),
            ChainError::BadIndirect
        );
        for len in [0, 8, 20, 16 * 65536, u32::MAX] {
            assert_eq!(
                head_to(I, INDIRECT, len).unwrap_err(),
                ChainError::BadIndirectLength(len),
                "length {len}"
            );
        }
        // The table must lie inside memory.
        assert_eq!(
            head_to(I, MEM - 16, 32).unwrap_err(),
            ChainError::OutsideMemory {
                addr: MEM - 16,
                len: 32
            }
        );
        assert_eq!(
            head_to(I, u64::MAX - 15, 32).unwrap_err(),
            ChainError::OutsideMemory {
                addr: u64::MAX - 15,
                len: 32
            }
        );
        // No indirect descriptor inside an indirect table.
        desc(&mem, INDIRECT, 0, BUF, 16, N, 1);
        desc(&mem, INDIRECT, 1, INDIRECT + 0x100, 16, I, 0);
        assert_eq!(
            head_to(I, INDIRECT, 32).unwrap_err(),
            ChainError::BadIndirect
        );
        // Its buffers are checked like direct ones.
        desc(&mem, INDIRECT, 1, MEM, 16, W, 0);
        assert_eq!(
            head_to(I, INDIRECT, 32).unwrap_err(),
            ChainError::OutsideMemory { addr: MEM, len: 16 }
        );
    }

    #[test]
    fn a_readable_buffer_after_a_writable_one_is_refused() {
        let mem = mem();
        desc(&mem, TABLE, 0, BUF, 16, N | W, 1);
        desc(&mem, TABLE, 1, BUF, 16, 0, 0);
        assert_eq!(
            walk_at(&mem, 0).unwrap_err(),
            ChainError::ReadableAfterWritable
        );
        desc(&mem, TABLE, 2, INDIRECT, 32, I, 0);
        desc(&mem, INDIRECT, 0, BUF, 16, N | W, 1);
        desc(&mem, INDIRECT, 1, BUF, 16, 0, 0);
        assert_eq!(
            walk_at(&mem, 2).unwrap_err(),
            ChainError::ReadableAfterWritable
        );
    }

    /// Lengths add up in 64 bits: a chain whose buffers total more than 4 GiB (each inside
    /// memory, the same 4 MiB again and again) is refused rather than wrapped.
    #[test]
    fn buffers_adding_up_to_more_than_4_gib_are_refused() {
        let size = 4u64 << 20;
        let mem = memory(&[(0, size)]);
        let len = size as u32;
        // 1024 buffers of 4 MiB are exactly 4 GiB: one byte past u32::MAX.
        let n: u16 = 1024;
        for i in 0..n {
            let last = i + 1 == n;
            desc(&mem, TABLE, i, 0, len, if last { 0 } else { N }, i + 1);
        }
        let mut chain = Chain::default();
        assert_eq!(
            walk(&mem, TABLE, n, 0, &mut chain).unwrap_err(),
            ChainError::TotalTooLarge
        );
        // One byte less in the last buffer: exactly u32::MAX, accepted.
        desc(&mem, TABLE, n - 1, 0, len - 1, 0, 0);
        walk(&mem, TABLE, n, 0, &mut chain).unwrap();
        assert_eq!(chain.readable_len(), u64::from(u32::MAX));
    }
}
