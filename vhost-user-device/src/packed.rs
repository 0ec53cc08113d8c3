//! Packed virtqueues (VIRTIO_F_RING_PACKED, virtio 1.1+ "Packed Virtqueues"), trusting
//! nothing the guest writes.
//!
//! A packed ring is one array of 16-byte descriptors `{addr u64, len u32, id u16, flags
//! u16}` that both sides walk in the same direction, plus two 4-byte event suppression
//! areas `{off_wrap u16, flags u16}`. The vhost-user ring addresses name them: the
//! "descriptor table" is the ring, the "avail ring" the driver's area (read here: may the
//! device interrupt?), the "used ring" the device's area (written here: may the driver
//! kick?).
//!
//! Each side keeps a wrap counter that starts at 1 and flips whenever its index passes
//! the end of the ring. A descriptor is available when its AVAIL flag equals the
//! device's avail wrap counter and its USED flag does not; the device marks a buffer used
//! by writing one descriptor, at its own used index, with the buffer id, the length
//! written and both flags equal to its used wrap counter, and then moves its used index
//! on by the number of descriptors the buffer took (the driver counts the same way, by
//! buffer id). So this module remembers each in-flight buffer's descriptor count.
//!
//! The rules enforced, each a malformed chain counted and skipped (returned used with
//! length 0) by [`crate::ring::Ring::pop`] under the same per-round budget as split rings:
//! a buffer id inside the ring, the same buffer checks as [`crate::chain::walk`]
//! (buffers inside guest memory, readable before writable, at most 4 GiB, indirect tables
//! a positive multiple of 16, not nested, not chained). A chain whose NEXT flags run
//! through the whole ring has no end to skip to: the ring is parked as broken.

use std::collections::VecDeque;
use std::sync::atomic::{fence, Ordering};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::chain::{Chain, ChainError, Segment};
use crate::memory::GuestMem;

/// VIRTIO_F_RING_PACKED.
pub const VIRTIO_F_RING_PACKED: u64 = 1 << 34;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const DESC_F_AVAIL: u16 = 1 << 7;
const DESC_F_USED: u16 = 1 << 15;
/// Event suppression flags: interrupts/kicks on, off, or at one descriptor (event_idx).
const EVENT_FLAGS_ENABLE: u16 = 0;
const EVENT_FLAGS_DISABLE: u16 = 1;
const EVENT_FLAGS_DESC: u16 = 2;
/// The wrap counter's bit in `off_wrap` and in the vring base halves.
const WRAP_BIT: u16 = 1 << 15;
/// Size of one descriptor.
const DESC_SIZE: u64 = 16;

/// Why a packed ring cannot start or be processed further.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PackedFault {
    /// A ring index from SET_VRING_BASE is not below the ring size.
    #[error("vring base {base:#x} names index {index}, outside the ring of {size}")]
    BaseOutOfRange {
        /// The raw SET_VRING_BASE value.
        base: u32,
        /// The index it names.
        index: u16,
        /// Ring size.
        size: u16,
    },
    /// The descriptor ring or an event area is misaligned or not inside guest memory.
    #[error("{what} at {addr:#x} is misaligned or not inside guest memory")]
    BadArea {
        /// Which area.
        what: &'static str,
        /// Its guest address.
        addr: u64,
    },
    /// The descriptor at this ring index cannot be read.
    #[error("descriptor {0} cannot be read")]
    Unreadable(u16),
    /// The used descriptor at this ring index cannot be written.
    #[error("used descriptor {0} cannot be written")]
    Unwritable(u16),
    /// A chain's NEXT flags run through the whole ring: there is no end to skip to.
    #[error("a chain starting at descriptor {0} runs through the whole ring")]
    Endless(u16),
}

/// Where a packed ring stands: the next index and wrap counter of each side, the form
/// SET_VRING_BASE and GET_VRING_BASE carry (vhost-user.rst: bits 0-14 the avail index,
/// bit 15 its wrap counter; bits 16-30 the used index, bit 31 its wrap counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedBase {
    /// Next descriptor to read.
    pub avail: u16,
    /// Avail wrap counter.
    pub avail_wrap: bool,
    /// Next descriptor to write as used.
    pub used: u16,
    /// Used wrap counter.
    pub used_wrap: bool,
}

impl PackedBase {
    /// A fresh ring: both indices 0, both wrap counters 1.
    pub const FRESH: Self = Self {
        avail: 0,
        avail_wrap: true,
        used: 0,
        used_wrap: true,
    };

    /// Decodes a SET_VRING_BASE value for a ring of `size`.
    ///
    /// A frontend that knows nothing of the packed layout sends 0 for a fresh ring,
    /// which would mean "both wrap counters 0": a driver starts with them at 1, so a
    /// base of exactly 0 is taken as a fresh ring (QEMU sends 0x80008000 for one).
    pub fn from_vring_base(base: u32, size: u16) -> Result<Self, PackedFault> {
        if base == 0 {
            return Ok(Self::FRESH);
        }
        let avail_half = base as u16;
        let used_half = (base >> 16) as u16;
        let avail = avail_half & !WRAP_BIT;
        let used = used_half & !WRAP_BIT;
        for index in [avail, used] {
            if index >= size {
                return Err(PackedFault::BaseOutOfRange { base, index, size });
            }
        }
        Ok(Self {
            avail,
            avail_wrap: avail_half & WRAP_BIT != 0,
            used,
            used_wrap: used_half & WRAP_BIT != 0,
        })
    }

    /// Encodes for GET_VRING_BASE.
    pub fn to_vring_base(self) -> u32 {
        let half = |i: u16, w: bool| u32::from(i | if w { WRAP_BIT } else { 0 });
        half(self.avail, self.avail_wrap) | half(self.used, self.used_wrap) << 16
    }
}

/// What [`PackedRing::pop`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Popped {
    /// No descriptor is available.
    Empty,
    /// A well-formed chain, now in the caller's [`Chain`] (its head is the buffer id).
    Chain,
    /// A malformed chain, consumed: return it with [`PackedRing::add_used_counted`].
    Bad {
        /// The buffer id the driver gave.
        id: u16,
        /// Descriptors it took in the ring.
        count: u16,
        /// What was wrong.
        error: ChainError,
    },
}

#[derive(Clone, Copy, Default)]
struct RawDesc {
    addr: u64,
    len: u32,
    id: u16,
    flags: u16,
}

fn parse_desc(raw: &[u8; 16]) -> RawDesc {
    let mut a = [0u8; 8];
    a.copy_from_slice(&raw[0..8]);
    RawDesc {
        addr: u64::from_le_bytes(a),
        len: u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
        id: u16::from_le_bytes([raw[12], raw[13]]),
        flags: u16::from_le_bytes([raw[14], raw[15]]),
    }
}

/// Collects a chain's buffers with the split walker's checks.
struct Collector<'a> {
    mem: &'a GuestMem,
    total: u64,
    seen_writable: bool,
}

impl Collector<'_> {
    fn push(&mut self, d: &RawDesc, chain: &mut Chain) -> Result<(), ChainError> {
        if d.len == 0 {
            return Ok(());
        }
        let writable = d.flags & DESC_F_WRITE != 0;
        if !writable && self.seen_writable {
            return Err(ChainError::ReadableAfterWritable);
        }
        self.seen_writable |= writable;
        if !self.mem.check_range(GuestAddress(d.addr), d.len as usize) {
            return Err(ChainError::OutsideMemory {
                addr: d.addr,
                len: u64::from(d.len),
            });
        }
        self.total += u64::from(d.len);
        if self.total > u64::from(u32::MAX) {
            return Err(ChainError::TotalTooLarge);
        }
        chain.segments.push(Segment {
            addr: d.addr,
            len: d.len,
            writable,
        });
        Ok(())
    }

    /// An indirect table: consecutive descriptors (no NEXT links in packed rings), of
    /// which only the WRITE flag counts.
    fn indirect(&mut self, d: &RawDesc, chain: &mut Chain) -> Result<(), ChainError> {
        let len = d.len;
        if len == 0 || u64::from(len) % DESC_SIZE != 0 {
            return Err(ChainError::BadIndirectLength(len));
        }
        let count = u16::try_from(u64::from(len) / DESC_SIZE)
            .map_err(|_| ChainError::BadIndirectLength(len))?;
        let table = d.addr;
        if GuestAddress(table).checked_add(u64::from(len)).is_none()
            || !self.mem.check_range(GuestAddress(table), len as usize)
        {
            return Err(ChainError::OutsideMemory {
                addr: table,
                len: u64::from(len),
            });
        }
        for i in 0..u64::from(count) {
            let addr = table + i * DESC_SIZE;
            let mut raw = [0u8; 16];
            self.mem
                .read_slice(&mut raw, GuestAddress(addr))
                .map_err(|_| ChainError::OutsideMemory {
                    addr,
                    len: DESC_SIZE,
                })?;
            let inner = parse_desc(&raw);
            if inner.flags & DESC_F_INDIRECT != 0 {
                return Err(ChainError::BadIndirect);
            }
            self.push(&inner, chain)?;
        }
        Ok(())
    }
}

/// The device side of one packed ring.
pub struct PackedRing {
    size: u16,
    desc: u64,
    driver_event: u64,
    device_event: u64,
    event_idx: bool,
    pos: PackedBase,
    /// Descriptors each in-flight buffer id took (what the used index moves on by).
    counts: Vec<u16>,
    /// Ring positions before recent pops, newest last, for [`PackedRing::undo_pop`].
    history: VecDeque<(u16, bool)>,
    /// Chains taken, minus those given back: the split ring's "next avail" to callers
    /// that count positions.
    popped: u16,
    /// The used position at the last interrupt decision (event_idx).
    signalled: (u16, bool),
}

impl PackedRing {
    /// A packed ring of `size` descriptors at `desc` with its driver (`driver_event`,
    /// vhost-user's avail address) and device (`device_event`, the used address) event
    /// areas, continuing from `base` (SET_VRING_BASE).
    pub fn new(
        mem: &GuestMem,
        size: u16,
        desc: u64,
        driver_event: u64,
        device_event: u64,
        base: u32,
        event_idx: bool,
    ) -> Result<Self, PackedFault> {
        let area = |what, addr: u64, len: u64, align: u64| {
            let inside = GuestAddress(addr).checked_add(len).is_some()
                && mem.check_range(GuestAddress(addr), len as usize);
            if !addr.is_multiple_of(align) || !inside {
                return Err(PackedFault::BadArea { what, addr });
            }
            Ok(())
        };
        area("descriptor ring", desc, DESC_SIZE * u64::from(size), 16)?;
        area("driver event area", driver_event, 4, 4)?;
        area("device event area", device_event, 4, 4)?;
        let pos = PackedBase::from_vring_base(base, size)?;
        Ok(Self {
            size,
            desc,
            driver_event,
            device_event,
            event_idx,
            pos,
            counts: vec![0; usize::from(size)],
            history: VecDeque::with_capacity(usize::from(size)),
            popped: 0,
            signalled: (pos.used, pos.used_wrap),
        })
    }

    /// Ring size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Where the ring stands (GET_VRING_BASE).
    pub fn base(&self) -> PackedBase {
        self.pos
    }

    /// Chains taken so far, less those given back (wrapping).
    pub fn popped(&self) -> u16 {
        self.popped
    }

    /// Whether the ring never had a used descriptor written (since the base it started at
    /// was fresh).
    pub fn is_fresh(&self) -> bool {
        self.pos.used == 0 && self.pos.used_wrap
    }

    fn step(&self, index: u16, wrap: bool) -> (u16, bool) {
        let next = index + 1;
        if next >= self.size {
            (0, !wrap)
        } else {
            (next, wrap)
        }
    }

    fn desc_addr(&self, index: u16) -> GuestAddress {
        GuestAddress(self.desc + DESC_SIZE * u64::from(index))
    }

    fn flags_at(&self, mem: &GuestMem, index: u16) -> Result<u16, PackedFault> {
        let at = self.desc_addr(index).unchecked_add(14);
        mem.load::<u16>(at, Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|_| PackedFault::Unreadable(index))
    }

    fn is_avail(flags: u16, wrap: bool) -> bool {
        (flags & DESC_F_AVAIL != 0) == wrap && (flags & DESC_F_USED != 0) != wrap
    }

    /// Whether the driver made the descriptor at the next avail position available.
    pub fn has_avail(&self, mem: &GuestMem) -> Result<bool, PackedFault> {
        let flags = self.flags_at(mem, self.pos.avail)?;
        Ok(Self::is_avail(flags, self.pos.avail_wrap))
    }

    /// Takes the next chain into `chain` (its head the buffer id). A malformed chain is
    /// consumed whole (up to its last descriptor) and reported as [`Popped::Bad`].
    pub fn pop(&mut self, mem: &GuestMem, chain: &mut Chain) -> Result<Popped, PackedFault> {
        chain.segments.clear();
        if !self.has_avail(mem)? {
            return Ok(Popped::Empty);
        }
        // The driver writes the descriptors before the head's flags: read them after.
        fence(Ordering::Acquire);
        let start = (self.pos.avail, self.pos.avail_wrap);
        let (mut index, mut wrap) = start;
        let mut collector = Collector {
            mem,
            total: 0,
            seen_writable: false,
        };
        let mut error = None;
        let mut count = 0u16;
        let id = loop {
            if count == self.size {
                return Err(PackedFault::Endless(start.0));
            }
            let mut raw = [0u8; 16];
            mem.read_slice(&mut raw, self.desc_addr(index))
                .map_err(|_| PackedFault::Unreadable(index))?;
            let d = parse_desc(&raw);
            count += 1;
            (index, wrap) = self.step(index, wrap);
            if error.is_none() {
                let r = if d.flags & DESC_F_INDIRECT != 0 {
                    if d.flags & DESC_F_NEXT != 0 || count > 1 {
                        Err(ChainError::BadIndirect)
                    } else {
                        collector.indirect(&d, chain)
                    }
                } else {
                    collector.push(&d, chain)
                };
                error = r.err();
            }
            // The buffer id is the last descriptor's.
            if d.flags & DESC_F_NEXT == 0 {
                break d.id;
            }
        };
        self.pos.avail = index;
        self.pos.avail_wrap = wrap;
        // Malformed chains count as taken too, as on a split ring (where each moves the
        // avail index): a caller giving back its last chains by position then sees the
        // gap a malformed one leaves and stops before it, instead of re-offering it.
        if self.history.len() == usize::from(self.size) {
            self.history.pop_front();
        }
        self.history.push_back(start);
        self.popped = self.popped.wrapping_add(1);
        chain.head = id;
        if id >= self.size {
            error.get_or_insert(ChainError::HeadOutOfRange(id));
        }
        if let Some(error) = error {
            chain.segments.clear();
            return Ok(Popped::Bad { id, count, error });
        }
        self.counts[usize::from(id)] = count;
        Ok(Popped::Chain)
    }

    /// Gives back the last chain taken (it is taken again by the next pop). Returns false
    /// if there is none to give back.
    pub fn undo_pop(&mut self) -> bool {
        let Some((avail, wrap)) = self.history.pop_back() else {
            return false;
        };
        self.pos.avail = avail;
        self.pos.avail_wrap = wrap;
        self.popped = self.popped.wrapping_sub(1);
        true
    }

    /// Marks buffers used, each with the descriptor count its pop recorded; ids outside
    /// the ring are skipped. Returns how many were written.
    pub fn add_used(&mut self, mem: &GuestMem, used: &[(u16, u32)]) -> Result<u16, PackedFault> {
        // Taken out for the call (no copy): the data path allocates nothing here.
        let counts = std::mem::take(&mut self.counts);
        let elems = used.iter().filter_map(|&(id, len)| {
            counts
                .get(usize::from(id))
                .map(|&count| (id, len, count.max(1)))
        });
        let written = self.write_used(mem, elems.clone());
        let n = elems.count() as u16;
        self.counts = counts;
        written.map(|()| n)
    }

    /// Marks one buffer used that took `count` descriptors (a malformed chain's).
    pub fn add_used_counted(
        &mut self,
        mem: &GuestMem,
        id: u16,
        len: u32,
        count: u16,
    ) -> Result<(), PackedFault> {
        self.write_used(mem, std::iter::once((id, len, count.clamp(1, self.size))))
    }

    /// `(index, wrap)` moved on by `count` (at most the ring size) descriptors.
    fn advance(&self, index: u16, wrap: bool, count: u16) -> (u16, bool) {
        let n = u32::from(index) + u32::from(count);
        let size = u32::from(self.size);
        if n >= size {
            ((n - size) as u16, !wrap)
        } else {
            (n as u16, wrap)
        }
    }

    /// Writes used descriptors `(id, len, descriptor count)`: ids and lengths first, then,
    /// after a release fence, the flags of all but the first, and the first one's flags
    /// last, so the driver (which reads in ring order) sees the batch at once, each
    /// element complete.
    fn write_used(
        &mut self,
        mem: &GuestMem,
        used: impl Iterator<Item = (u16, u32, u16)> + Clone,
    ) -> Result<(), PackedFault> {
        let start = (self.pos.used, self.pos.used_wrap);
        let (mut index, mut wrap) = start;
        let mut first = None;
        for (id, len, count) in used.clone() {
            first.get_or_insert(len);
            let at = self.desc_addr(index);
            let mut body = [0u8; 6];
            body[..4].copy_from_slice(&len.to_le_bytes());
            body[4..].copy_from_slice(&id.to_le_bytes());
            mem.write_slice(&body, at.unchecked_add(8))
                .map_err(|_| PackedFault::Unwritable(index))?;
            (index, wrap) = self.advance(index, wrap, count);
        }
        let Some(first_len) = first else {
            return Ok(());
        };
        let flags = |len: u32, wrap: bool| {
            let mut f = if wrap { DESC_F_AVAIL | DESC_F_USED } else { 0 };
            if len > 0 {
                f |= DESC_F_WRITE;
            }
            f
        };
        fence(Ordering::Release);
        let (mut at, mut w) = start;
        for (i, (_, len, count)) in used.enumerate() {
            if i > 0 {
                self.store_flags(mem, at, flags(len, w))?;
            }
            (at, w) = self.advance(at, w, count);
        }
        self.store_flags(mem, start.0, flags(first_len, start.1))?;
        self.pos.used = index;
        self.pos.used_wrap = wrap;
        Ok(())
    }

    fn store_flags(&self, mem: &GuestMem, index: u16, flags: u16) -> Result<(), PackedFault> {
        mem.store(
            flags.to_le(),
            self.desc_addr(index).unchecked_add(14),
            Ordering::Release,
        )
        .map_err(|_| PackedFault::Unwritable(index))
    }

    /// Asks the driver not to kick (device event flags DISABLE).
    pub fn disable_notification(&self, mem: &GuestMem) {
        let at = GuestAddress(self.device_event + 2);
        let _ = mem.store(EVENT_FLAGS_DISABLE.to_le(), at, Ordering::Release);
    }

    /// Asks the driver to kick again: at the next avail position with event_idx (flags
    /// DESC), for every buffer otherwise. Returns whether a chain is already available
    /// (the caller processes again rather than waiting for a kick that may never come).
    pub fn enable_notification(&self, mem: &GuestMem) -> Result<bool, PackedFault> {
        let bad = |_| PackedFault::BadArea {
            what: "device event area",
            addr: self.device_event,
        };
        if self.event_idx {
            let off_wrap = self.pos.avail | if self.pos.avail_wrap { WRAP_BIT } else { 0 };
            mem.store(
                off_wrap.to_le(),
                GuestAddress(self.device_event),
                Ordering::Release,
            )
            .map_err(bad)?;
            mem.store(
                EVENT_FLAGS_DESC.to_le(),
                GuestAddress(self.device_event + 2),
                Ordering::Release,
            )
            .map_err(bad)?;
        } else {
            mem.store(
                EVENT_FLAGS_ENABLE.to_le(),
                GuestAddress(self.device_event + 2),
                Ordering::Release,
            )
            .map_err(bad)?;
        }
        // Our flags must be visible before we look at the ring again, or a driver that
        // checked them just before would not kick and we would not see its buffer.
        fence(Ordering::SeqCst);
        self.has_avail(mem)
    }

    /// Whether the driver wants an interrupt for the used descriptors written since the
    /// last call (`added` of them): its event flags, and with DESC (event_idx) whether its
    /// event offset lies among them (the rule of Linux's and DPDK's packed rings).
    /// Unreadable flags answer yes: better a spurious interrupt than a driver waiting.
    pub fn needs_interrupt(&mut self, mem: &GuestMem, added: u16) -> bool {
        let old = std::mem::replace(&mut self.signalled, (self.pos.used, self.pos.used_wrap));
        // What we wrote must be visible before we read the driver's wishes (paired with
        // the driver's barrier when it re-enables interrupts).
        fence(Ordering::SeqCst);
        let Ok(flags) = mem.load::<u16>(GuestAddress(self.driver_event + 2), Ordering::Acquire)
        else {
            return true;
        };
        match u16::from_le(flags) {
            EVENT_FLAGS_DISABLE => false,
            EVENT_FLAGS_DESC if self.event_idx => {
                if added == 0 {
                    return false;
                }
                let Ok(raw) = mem.load::<u16>(GuestAddress(self.driver_event), Ordering::Acquire)
                else {
                    return true;
                };
                let off_wrap = u16::from_le(raw);
                // Positions as a count on one line: the previous lap's are `size` lower.
                let new = self.pos.used;
                let mut old_idx = old.0;
                if new <= old_idx {
                    old_idx = old_idx.wrapping_sub(self.size);
                }
                let mut event = off_wrap & !WRAP_BIT;
                if (off_wrap & WRAP_BIT != 0) != self.pos.used_wrap {
                    event = event.wrapping_sub(self.size);
                }
                new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old_idx)
            }
            // ENABLE, and anything unknown (DESC without event_idx is a driver error):
            // interrupt.
            _ => true,
        }
    }

    /// Whether the driver turned interrupts off altogether (for a resynchronising
    /// interrupt, which is only due to a driver that wants interrupts).
    pub fn interrupts_disabled(&self, mem: &GuestMem) -> bool {
        mem.load::<u16>(GuestAddress(self.driver_event + 2), Ordering::Acquire)
            .map(|f| u16::from_le(f) == EVENT_FLAGS_DISABLE)
            .unwrap_or(false)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::FromRawFd;

    use vhost::vhost_user::message::VhostUserMemoryRegion;
    use vm_memory::GuestAddressSpace;

    use crate::dirty_log::DirtyLog;
    use crate::memory::MemoryTable;

    const RING: u64 = 0;
    const DRIVER: u64 = 0x1000;
    const DEVICE: u64 = 0x1010;
    const MEM: u64 = 0x10000;

    fn memory() -> std::sync::Arc<GuestMem> {
        atomic_memory().memory().into_inner()
    }

    fn atomic_memory() -> crate::memory::GuestMemAtomic {
        // SAFETY: valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"packed-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh descriptor we own.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(MEM).unwrap();
        let mut table = MemoryTable::new(DirtyLog::new());
        table
            .add_region(&VhostUserMemoryRegion::new(0, MEM, 0x7000_0000_0000, 0), f)
            .unwrap();
        table.atomic()
    }

    /// The driver side of a packed ring, as Linux's virtio_ring writes it.
    pub(crate) struct Driver {
        size: u16,
        avail: u16,
        avail_wrap: bool,
        used: u16,
        used_wrap: bool,
        counts: Vec<u16>,
    }

    impl Driver {
        pub(crate) fn new(size: u16) -> Self {
            Self {
                size,
                avail: 0,
                avail_wrap: true,
                used: 0,
                used_wrap: true,
                counts: vec![0; usize::from(size)],
            }
        }

        fn write(mem: &GuestMem, index: u16, d: RawDesc) {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&d.len.to_le_bytes());
            raw[12..14].copy_from_slice(&d.id.to_le_bytes());
            raw[14..16].copy_from_slice(&d.flags.to_le_bytes());
            mem.write_slice(&raw, GuestAddress(RING + 16 * u64::from(index)))
                .unwrap();
        }

        /// Makes a chain of `(addr, len, flags)` available as buffer `id`, the head's
        /// flags written last.
        pub(crate) fn add(&mut self, mem: &GuestMem, id: u16, bufs: &[(u64, u32, u16)]) {
            let head = self.avail;
            let mut head_flags = 0;
            for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
                let wrap = if self.avail_wrap {
                    DESC_F_AVAIL
                } else {
                    DESC_F_USED
                };
                let next = if i + 1 < bufs.len() { DESC_F_NEXT } else { 0 };
                let f = flags | next | wrap;
                if i == 0 {
                    head_flags = f;
                    // Not yet available: the wrong wrap bits for this lap.
                    let stale = if self.avail_wrap {
                        DESC_F_USED
                    } else {
                        DESC_F_AVAIL
                    };
                    Self::write(
                        mem,
                        self.avail,
                        RawDesc {
                            addr,
                            len,
                            id,
                            flags: stale,
                        },
                    );
                } else {
                    Self::write(
                        mem,
                        self.avail,
                        RawDesc {
                            addr,
                            len,
                            id,
                            flags: f,
                        },
                    );
                }
                self.avail += 1;
                if self.avail == self.size {
                    self.avail = 0;
                    self.avail_wrap = !self.avail_wrap;
                }
            }
            if let Some(c) = self.counts.get_mut(usize::from(id)) {
                *c = bufs.len() as u16;
            }
            let at = GuestAddress(RING + 16 * u64::from(head) + 14);
            mem.write_obj(head_flags.to_le(), at).unwrap();
        }

        /// The next used descriptor, if the device wrote one: (id, len).
        pub(crate) fn take_used(&mut self, mem: &GuestMem) -> Option<(u16, u32)> {
            let at = RING + 16 * u64::from(self.used);
            let flags: u16 = mem.read_obj(GuestAddress(at + 14)).unwrap();
            let w = self.used_wrap;
            if (flags & DESC_F_AVAIL != 0) != w || (flags & DESC_F_USED != 0) != w {
                return None;
            }
            let len: u32 = mem.read_obj(GuestAddress(at + 8)).unwrap();
            let id: u16 = mem.read_obj(GuestAddress(at + 12)).unwrap();
            let n = self
                .counts
                .get(usize::from(id))
                .copied()
                .unwrap_or(1)
                .max(1);
            for _ in 0..n {
                self.used += 1;
                if self.used == self.size {
                    self.used = 0;
                    self.used_wrap = !self.used_wrap;
                }
            }
            Some((id, len))
        }
    }

    fn ring(mem: &GuestMem, size: u16, event_idx: bool) -> PackedRing {
        PackedRing::new(mem, size, RING, DRIVER, DEVICE, 0, event_idx).unwrap()
    }

    #[test]
    fn chains_wrap_around_the_ring_and_come_back_used() {
        let mem = memory();
        let mut ring = ring(&mem, 8, false);
        let mut drv = Driver::new(8);
        let mut chain = Chain::default();
        // 3-descriptor chains over an 8-entry ring: chains straddle the end.
        for round in 0..16u16 {
            let id = round % 2;
            let base = 0x4000 + u64::from(round) * 0x100;
            drv.add(
                &mem,
                id,
                &[
                    (base, 16, 0),
                    (base + 16, 64, DESC_F_WRITE),
                    (base + 80, 1, DESC_F_WRITE),
                ],
            );
            assert_eq!(
                ring.pop(&mem, &mut chain),
                Ok(Popped::Chain),
                "round {round}"
            );
            assert_eq!(chain.head, id);
            assert_eq!(
                chain.segments,
                vec![
                    Segment {
                        addr: base,
                        len: 16,
                        writable: false
                    },
                    Segment {
                        addr: base + 16,
                        len: 64,
                        writable: true
                    },
                    Segment {
                        addr: base + 80,
                        len: 1,
                        writable: true
                    },
                ]
            );
            assert_eq!(ring.pop(&mem, &mut chain), Ok(Popped::Empty));
            ring.add_used(&mem, &[(id, 65)]).unwrap();
            assert_eq!(drv.take_used(&mem), Some((id, 65)));
            assert_eq!(drv.take_used(&mem), None);
        }
        // 48 descriptors went round an 8-entry ring: six laps, the wrap counters back
        // where they started.
        assert_eq!(ring.base(), PackedBase::FRESH);
        assert_eq!(ring.popped(), 16);
    }

    #[test]
    fn a_batch_completes_out_of_order_and_shows_as_one() {
        let mem = memory();
        let mut ring = ring(&mem, 8, false);
        let mut drv = Driver::new(8);
        let mut chain = Chain::default();
        drv.add(&mem, 5, &[(0x4000, 8, 0), (0x4100, 8, DESC_F_WRITE)]);
        drv.add(&mem, 2, &[(0x4200, 8, DESC_F_WRITE)]);
        assert_eq!(ring.pop(&mem, &mut chain), Ok(Popped::Chain));
        assert_eq!(ring.pop(&mem, &mut chain), Ok(Popped::Chain));
        // Completed in the other order: the used descriptors are written in completion
        // order, each moving the used index by its buffer's descriptor count.
        assert_eq!(ring.add_used(&mem, &[(2, 7), (5, 3)]), Ok(2));
        assert_eq!(drv.take_used(&mem), Some((2, 7)));
        assert_eq!(drv.take_used(&mem), Some((5, 3)));
        assert_eq!(ring.base().used, 3);
    }

    #[test]
    fn indirect_tables_are_read_and_checked() {
        let mem = memory();
        let mut ring = ring(&mem, 4, false);
        let mut drv = Driver::new(4);
        let mut chain = Chain::default();
        let table = 0x8000u64;
        let inner = |i: u64, addr: u64, len: u32, flags: u16| {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[14..16].copy_from_slice(&flags.to_le_bytes());
            mem.write_slice(&raw, GuestAddress(table + 16 * i)).unwrap();
        };
        inner(0, 0x5000, 16, 0);
        inner(1, 0x6000, 512, DESC_F_WRITE);
        drv.add(&mem, 3, &[(table, 32, DESC_F_INDIRECT)]);
        assert_eq!(ring.pop(&mem, &mut chain), Ok(Popped::Chain));
        assert_eq!(chain.head, 3);
        assert_eq!(chain.readable_len(), 16);
        assert_eq!(chain.writable_len(), 512);
        // Nested indirect, a bad table length and a table outside memory are malformed;
        // each is consumed and the ring goes on.
        inner(1, 0x6000, 512, DESC_F_INDIRECT);
        drv.add(&mem, 0, &[(table, 32, DESC_F_INDIRECT)]);
        drv.add(&mem, 1, &[(table, 24, DESC_F_INDIRECT)]);
        drv.add(&mem, 2, &[(MEM - 16, 32, DESC_F_INDIRECT)]);
        let errors: Vec<_> = (0..3)
            .map(|_| match ring.pop(&mem, &mut chain) {
                Ok(Popped::Bad { error, count, .. }) => {
                    assert_eq!(count, 1);
                    error
                }
                other => panic!("expected a malformed chain, got {other:?}"),
            })
            .collect();
        assert_eq!(
            errors,
            vec![
                ChainError::BadIndirect,
                ChainError::BadIndirectLength(24),
                ChainError::OutsideMemory {
                    addr: MEM - 16,
                    len: 32
                },
            ]
        );
        assert_eq!(ring.pop(&mem, &mut chain), Ok(Popped::Empty));
    }

    #[test]
    fn malformed_chains_are_consumed_whole() {
        let mem = memory();
        let mut ring = ring(&mem, 8, false);
        let mut drv = Driver::new(8);
        let mut chain = Chain::default();
        // Readable after writable, over three descriptors: all three are skipped.
        drv.add(
            &mem,
            1,
            &[
                (0x4000, 8, DESC_F_WRITE),
                (0x4100, 8, 0),
                (0x4200, 8, DESC_F_WRITE),
            ],
        );
        // A buffer id outside the ring, a buffer outside memory.
        drv.add(&mem, 9, &[(0x4000, 8, 0)]);
        drv.add(&mem, 2, &[(MEM - 4, 8, 0)]);
        drv.add(&mem, 4, &[(0x4000, 8, 0)]);
        let mut bad = Vec::new();
        while let Ok(Popped::Bad { id, count, error }) = ring.pop(&mem, &mut chain) {
            ring.add_used_counted(&mem, id, 0, count).unwrap();
            bad.push((id, count, error));
        }
        assert_eq!(
            bad,
            vec![
                (1, 3, ChainError::ReadableAfterWritable),
                (9, 1, ChainError::HeadOutOfRange(9)),
                (
                    2,
                    1,
                    ChainError::OutsideMemory {
                        addr: MEM - 4,
                        len: 8
                    }
                ),
            ]
        );
        // The good chain after them was popped by the loop's last call.
        assert_eq!(chain.head, 4);
        assert_eq!(chain.segments.len(), 1);
        assert_eq!(drv.take_used(&mem), Some((1, 0)));
    }

    #[test]
    fn a_chain_through_the_whole_ring_parks_it() {
        let mem = memory();
        let mut ring = ring(&mem, 4, false);
        let mut chain = Chain::default();
        for i in 0..4u16 {
            Driver::write(
                &mem,
                i,
                RawDesc {
                    addr: 0x4000,
                    len: 8,
                    id: 0,
                    flags: DESC_F_AVAIL | DESC_F_NEXT,
                },
            );
        }
        assert_eq!(ring.pop(&mem, &mut chain), Err(PackedFault::Endless(0)));
    }

    #[test]
    fn given_back_chains_are_taken_again() {
        let mem = memory();
        let mut ring = ring(&mem, 4, false);
        let mut drv = Driver::new(4);
        let mut chain = Chain::default();
        drv.add(
            &mem,
            0,
            &[(0x4000, 8, DESC_F_WRITE), (0x4100, 8, DESC_F_WRITE)],
        );
        drv.add(
            &mem,
            1,
            &[(0x4200, 8, DESC_F_WRITE), (0x4300, 8, DESC_F_WRITE)],
        );
        assert_eq!(ring.pop(&mem, &mut chain), Ok(Popped::Chain));
        assert_eq!(ring.pop(&mem, &mut chain), Ok(Popped::Chain));
        assert!(!ring.base().avail_wrap, "went round once");
        assert!(ring.undo_pop());
        assert!(ring.undo_pop());
        assert!(!ring.undo_pop());
        assert_eq!(ring.base(), PackedBase::FRESH);
        assert_eq!(ring.pop(&mem, &mut chain), Ok(Popped::Chain));
        assert_eq!(chain.head, 0);
        assert_eq!(ring.pop(&mem, &mut chain), Ok(Popped::Chain));
        assert_eq!(chain.head, 1);
    }

    #[test]
    fn vring_base_carries_both_wrap_counters() {
        let b = PackedBase {
            avail: 5,
            avail_wrap: false,
            used: 3,
            used_wrap: true,
        };
        assert_eq!(b.to_vring_base(), 0x8003_0005);
        assert_eq!(PackedBase::from_vring_base(0x8003_0005, 8), Ok(b));
        assert_eq!(PackedBase::from_vring_base(0, 8), Ok(PackedBase::FRESH));
        assert_eq!(
            PackedBase::from_vring_base(0x8000_8000, 8),
            Ok(PackedBase::FRESH)
        );
        assert!(PackedBase::from_vring_base(0x0009_0000, 8).is_err());
        assert!(PackedBase::from_vring_base(0x0000_0008, 8).is_err());
        // A ring restarted at a base resumes there: the next chain is read at index 5.
        let mem = memory();
        let ring = PackedRing::new(&mem, 8, RING, DRIVER, DEVICE, 0x8003_0005, false).unwrap();
        assert_eq!(ring.base(), b);
        assert!(PackedRing::new(&mem, 8, RING + 8, DRIVER, DEVICE, 0, false).is_err());
        assert!(PackedRing::new(&mem, 8, RING, MEM - 2, DEVICE, 0, false).is_err());
    }

    #[test]
    fn notification_suppression_both_ways() {
        let mem = memory();
        let set_driver = |off_wrap: u16, flags: u16| {
            mem.write_obj(off_wrap.to_le(), GuestAddress(DRIVER))
                .unwrap();
            mem.write_obj(flags.to_le(), GuestAddress(DRIVER + 2))
                .unwrap();
        };
        let device = || -> (u16, u16) {
            (
                mem.read_obj(GuestAddress(DEVICE)).unwrap(),
                mem.read_obj(GuestAddress(DEVICE + 2)).unwrap(),
            )
        };
        // Without event_idx: ENABLE/DISABLE both ways.
        let mut ring = ring(&mem, 8, false);
        let mut drv = Driver::new(8);
        ring.disable_notification(&mem);
        assert_eq!(device().1, EVENT_FLAGS_DISABLE);
        assert_eq!(ring.enable_notification(&mem), Ok(false));
        assert_eq!(device().1, EVENT_FLAGS_ENABLE);
        drv.add(&mem, 0, &[(0x4000, 8, DESC_F_WRITE)]);
        assert_eq!(
            ring.enable_notification(&mem),
            Ok(true),
            "a buffer raced in"
        );
        set_driver(0, EVENT_FLAGS_DISABLE);
        assert!(!ring.needs_interrupt(&mem, 1));
        set_driver(0, EVENT_FLAGS_ENABLE);
        assert!(ring.needs_interrupt(&mem, 1));

        // With event_idx: the device asks for a kick at its next avail position, and
        // interrupts only when the driver's event offset was passed.
        let mut ring = PackedRing::new(&mem, 8, RING, DRIVER, DEVICE, 0, true).unwrap();
        let mut drv = Driver::new(8);
        let mut chain = Chain::default();
        for id in 0..6u16 {
            drv.add(&mem, id, &[(0x4000, 8, DESC_F_WRITE)]);
        }
        for _ in 0..6 {
            assert_eq!(ring.pop(&mem, &mut chain), Ok(Popped::Chain));
        }
        assert_eq!(ring.enable_notification(&mem), Ok(false));
        assert_eq!(device(), (6 | WRAP_BIT, EVENT_FLAGS_DESC));
        // The driver wants an interrupt once used descriptor 3 is written (this lap).
        set_driver(3 | WRAP_BIT, EVENT_FLAGS_DESC);
        ring.add_used(&mem, &[(0, 8), (1, 8), (2, 8)]).unwrap();
        assert!(!ring.needs_interrupt(&mem, 3), "used 0..3 do not reach 3");
        ring.add_used(&mem, &[(3, 8)]).unwrap();
        assert!(ring.needs_interrupt(&mem, 1), "used 3 is the event");
        ring.add_used(&mem, &[(4, 8)]).unwrap();
        assert!(!ring.needs_interrupt(&mem, 1), "past the event");
        // An event in the next lap (wrap bit clear) is not reached by this lap's used.
        set_driver(1, EVENT_FLAGS_DESC);
        ring.add_used(&mem, &[(5, 8)]).unwrap();
        assert!(!ring.needs_interrupt(&mem, 1));
    }

    /// A started packed ring of `size` through [`crate::ring::Ring`], its driver and device
    /// areas `offset` bytes into theirs.
    fn started_packed_ring(
        atomic: &crate::memory::GuestMemAtomic,
        size: u16,
        offset: u64,
    ) -> crate::ring::Ring {
        use crate::ring::{QueueStats, Ring, RingSetup};
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
        Ring::start(RingSetup {
            index: 0,
            size,
            max_size: size,
            desc: RING,
            avail: DRIVER + offset,
            used: DEVICE + offset,
            base: 0,
            event_idx: false,
            acked_features: VIRTIO_F_RING_PACKED,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: None,
            err: None,
            enabled: true,
            inflight: None,
            mem: atomic.clone(),
            log: DirtyLog::new(),
            stats: std::sync::Arc::new(QueueStats::default()),
        })
        .unwrap()
    }

    /// Through [`crate::ring::Ring`]: a guest filling its packed ring with malformed
    /// chains gets the same bounded share of a round as on a split ring, each one returned
    /// once, and the good chain behind them is taken in a later round.
    #[test]
    fn ring_skips_a_bounded_number_of_malformed_packed_chains_per_round() {
        use crate::ring::BAD_CHAINS_PER_ROUND;
        let atomic = atomic_memory();
        let mem = atomic.memory().into_inner();
        let size = 256u16;
        let mut ring = started_packed_ring(&atomic, size, 0x2000);
        assert!(ring.is_packed());
        let mut drv = Driver::new(size);
        let bad = 100u16;
        for id in 0..bad {
            drv.add(&mem, id, &[(MEM + 4096, 16, 0)]);
        }
        drv.add(&mem, bad, &[(0x8000, 16, DESC_F_WRITE)]);
        let mut chain = Chain::default();
        assert!(!ring.pop(&mem, &mut chain));
        let share = BAD_CHAINS_PER_ROUND as u16;
        assert_eq!(
            ring.stats().bad_chains.load(Ordering::Relaxed),
            u64::from(share)
        );
        assert!(ring.round_spent());
        assert!(!ring.enable_notification(&mem));
        ring.begin_round();
        assert!(ring.pop(&mem, &mut chain));
        assert_eq!(chain.head, bad);
        assert_eq!(
            ring.stats().bad_chains.load(Ordering::Relaxed),
            u64::from(bad)
        );
        // Each malformed chain came back once, with length 0, in order.
        for id in 0..bad {
            assert_eq!(drv.take_used(&mem), Some((id, 0)));
        }
        assert_eq!(drv.take_used(&mem), None);
        ring.add_used(&mem, bad, 16);
        assert_eq!(drv.take_used(&mem), Some((bad, 16)));
        // GET_VRING_BASE: 101 descriptors into a 256-entry ring, first lap.
        assert_eq!(ring.vring_base(), 0x8065_8065);
    }

    /// [`crate::ring::Ring::give_back`] on a packed ring: the last chains taken go back by
    /// moving the avail position (and wrap counter) back over them; a malformed chain pop
    /// skipped is a gap the rewind stops at, and the chain before it is completed unused.
    #[test]
    fn ring_gives_back_packed_chains_up_to_a_malformed_one() {
        let atomic = atomic_memory();
        let mem = atomic.memory().into_inner();
        let size = 4u16;
        let mut ring = started_packed_ring(&atomic, size, 0);
        let mut drv = Driver::new(size);
        // A (one descriptor), malformed M, then B over the last two descriptors of the
        // 4-entry ring (the avail wrap counter flips after it).
        drv.add(&mem, 0, &[(0x4000, 8, DESC_F_WRITE)]);
        drv.add(&mem, 1, &[(MEM, 8, DESC_F_WRITE)]);
        drv.add(
            &mem,
            2,
            &[(0x4100, 8, DESC_F_WRITE), (0x4200, 8, DESC_F_WRITE)],
        );
        let mut a = Chain::default();
        let mut b = Chain::default();
        assert!(ring.pop(&mem, &mut a));
        assert!(ring.pop(&mem, &mut b));
        assert_eq!((a.head, b.head), (0, 2));
        assert_eq!(
            ring.vring_base() & 0xffff,
            0,
            "avail wrapped to index 0, counter 0"
        );
        assert_eq!(ring.give_back(&mem, [&a, &b]), 1, "A completed unused");
        assert_eq!(drv.take_used(&mem), Some((1, 0)), "M, once");
        assert_eq!(drv.take_used(&mem), Some((0, 0)), "then A");
        assert_eq!(drv.take_used(&mem), None);
        // B is read again from where it was, wrap counter and all.
        let mut again = Chain::default();
        assert!(ring.pop(&mem, &mut again));
        assert_eq!(again.head, 2);
        assert_eq!(again.segments, b.segments);
        assert!(!ring.pop(&mem, &mut again));
        assert_eq!(ring.stats().bad_chains.load(Ordering::Relaxed), 1);
    }
}
