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
