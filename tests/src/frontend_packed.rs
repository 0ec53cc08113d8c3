//! The driver side of a packed ring (VIRTIO_F_RING_PACKED) for the frontend harness,
//! written as Linux's virtio_ring does: a chain's descriptors go into the ring at the
//! avail position, the head's flags last; used descriptors are read at the used position,
//! which moves on by the descriptor count of the buffer id each one names.
//!
//! [`crate::frontend::DriverQueue`] dispatches to this when the queue was set up packed,
//! so tests and the load generator drive packed rings with the same calls as split ones.

use std::sync::atomic::{fence, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// VIRTIO_F_RING_PACKED.
pub const RING_PACKED: u64 = 1 << 34;

const F_NEXT: u16 = 1;
const F_AVAIL: u16 = 1 << 7;
const F_USED: u16 = 1 << 15;
const WRAP_BIT: u16 = 1 << 15;

/// One descriptor of a chain, before it goes into the ring.
#[derive(Clone, Copy, Debug)]
pub struct PackedDesc {
    /// Guest-physical address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// VRING_DESC_F_WRITE / VRING_DESC_F_INDIRECT (NEXT and the wrap bits are set here).
    pub flags: u16,
}

/// The driver's state of one packed ring.
pub struct PackedDriver {
    size: u16,
    desc: u64,
    avail: u16,
    avail_wrap: bool,
    used: u16,
    used_wrap: bool,
    /// Per buffer id: the descriptors it is published with.
    chains: Vec<Vec<PackedDesc>>,
    /// Per buffer id: the ring slots its last publication took.
    counts: Vec<u16>,
    /// Ring slots held by published buffers not yet used.
    in_ring: u16,
}

impl PackedDriver {
    /// A fresh ring of `size` descriptors at `desc` (both wrap counters 1).
    pub fn new(size: u16, desc: u64) -> Self {
        Self {
            size,
            desc,
            avail: 0,
            avail_wrap: true,
            used: 0,
            used_wrap: true,
            chains: vec![Vec::new(); usize::from(size)],
            counts: vec![0; usize::from(size)],
            in_ring: 0,
        }
    }

    /// Sets what buffer `id` is published with.
    pub fn set_chain(&mut self, id: u16, descs: Vec<PackedDesc>) {
        if let Some(c) = self.chains.get_mut(usize::from(id)) {
            *c = descs;
        }
    }

    fn step(&self, index: u16, wrap: bool) -> (u16, bool) {
        if index + 1 == self.size {
            (0, !wrap)
        } else {
            (index + 1, wrap)
        }
    }

    fn slot(&self, index: u16) -> u64 {
        self.desc + 16 * u64::from(index)
    }

    /// Writes buffer `id`'s descriptors at the avail position and makes them available,
    /// the head's flags last (after a release fence).
    pub fn publish(&mut self, mem: &GuestMemoryMmap, id: u16) {
        // Taken out while written (put back below): no copy per request.
        let descs = std::mem::take(&mut self.chains[usize::from(id)]);
        let n = descs.len().max(1) as u16;
        assert!(
            self.in_ring + n <= self.size,
            "test packed ring out of descriptors"
        );
        let head = self.avail;
        let mut head_flags = 0;
        for (i, d) in descs.iter().enumerate() {
            let wrap_bits = if self.avail_wrap { F_AVAIL } else { F_USED };
            let next = if i + 1 < descs.len() { F_NEXT } else { 0 };
            let flags = d.flags | next | wrap_bits;
            let at = self.slot(self.avail);
            let _ = mem.write_obj(d.addr.to_le(), GuestAddress(at));
            let _ = mem.write_obj(d.len.to_le(), GuestAddress(at + 8));
            let _ = mem.write_obj(id.to_le(), GuestAddress(at + 12));
            if i == 0 {
                head_flags = flags;
            } else {
                let _ = mem.write_obj(flags.to_le(), GuestAddress(at + 14));
            }
            (self.avail, self.avail_wrap) = self.step(self.avail, self.avail_wrap);
        }
        fence(Ordering::Release);
        let _ = mem.write_obj(head_flags.to_le(), GuestAddress(self.slot(head) + 14));
        fence(Ordering::SeqCst);
        self.chains[usize::from(id)] = descs;
        self.counts[usize::from(id)] = n;
        self.in_ring += n;
    }

    /// The used descriptor at `(index, wrap)` if the device wrote it: (id, len).
    fn used_at(&self, mem: &GuestMemoryMmap, index: u16, wrap: bool) -> Option<(u16, u32)> {
        let at = self.slot(index);
        let flags = u16::from_le(mem.read_obj(GuestAddress(at + 14)).ok()?);
        if (flags & F_AVAIL != 0) != wrap || (flags & F_USED != 0) != wrap {
            return None;
        }
        fence(Ordering::Acquire);
        let len = u32::from_le(mem.read_obj(GuestAddress(at + 8)).ok()?);
        let id = u16::from_le(mem.read_obj(GuestAddress(at + 12)).ok()?);
        Some((id, len))
    }

    /// Takes the next used descriptor, if any: (id, len).
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u16, u32)> {
        let (id, len) = self.used_at(mem, self.used, self.used_wrap)?;
        let n = self
            .counts
            .get(usize::from(id))
            .copied()
            .unwrap_or(1)
            .max(1);
        for _ in 0..n {
            (self.used, self.used_wrap) = self.step(self.used, self.used_wrap);
        }
        self.in_ring = self.in_ring.saturating_sub(n);
        Some((id, len))
    }

    /// Used descriptors the device wrote that were not taken yet, and the position after
    /// them.
    fn pending_used(&self, mem: &GuestMemoryMmap) -> (u16, (u16, bool)) {
        let (mut index, mut wrap) = (self.used, self.used_wrap);
        let mut n = 0u16;
        while n < self.size {
            let Some((id, _)) = self.used_at(mem, index, wrap) else {
                break;
            };
            for _ in 0..self
                .counts
                .get(usize::from(id))
                .copied()
                .unwrap_or(1)
                .max(1)
            {
                (index, wrap) = self.step(index, wrap);
            }
            n += 1;
        }
        (n, (index, wrap))
    }

    /// How many used descriptors wait to be taken.
    pub fn used_waiting(&self, mem: &GuestMemoryMmap) -> u16 {
        self.pending_used(mem).0
    }

    /// The SET_VRING_BASE for a device restarted after the last one died without saying
    /// where it stood: both sides at the device's used position, so chains it took and
    /// never completed are read again (as QEMU restarts a split ring at its used index).
    /// Right only while completions came in ring order: a buffer completed out of order
    /// overwrote the descriptors of one before it, which the inflight region's packed
    /// layout would have kept (not implemented by the layer; see its `packed` module).
    pub fn restart_base(&self, mem: &GuestMemoryMmap) -> u32 {
        let (_, (index, wrap)) = self.pending_used(mem);
        let half = u32::from(index | if wrap { WRAP_BIT } else { 0 });
        half | half << 16
    }
}
