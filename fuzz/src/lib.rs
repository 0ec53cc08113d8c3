//! Shared pieces of the fuzz targets: guest memory built from the fuzzer's bytes, rings
//! started on it, and a byte reader that never fails (missing bytes read as zero).
//!
//! Guest memory has three regions: A at 0x0 (32 KiB, filled with the input's memory
//! bytes), a hole, then B at 0x9000 and C at 0xa000 (4 KiB each, adjacent, so a buffer may
//! run from one region into the next). Ring slot `n` puts its descriptor table at
//! `n * 0x1000`, its avail ring at `+0x400` and its used ring at `+0x600`.

use std::sync::Arc;

use vhost_user_device::dirty_log::{DirtyLog, RegionLog};
use vhost_user_device::ring::RingSetup;
use vhost_user_device::{Chain, GuestMem, QueueStats, Ring};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Region A: start and size.
pub const REGION_A: (u64, usize) = (0, 0x8000);
/// Region B (after a hole).
pub const REGION_B: (u64, usize) = (0x9000, 0x1000);
/// Region C (adjacent to B).
pub const REGION_C: (u64, usize) = (0xa000, 0x1000);

/// Reads little-endian values from the front of the input; past the end it yields zeros.
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (h, t) = self.data.split_at(n);
        self.data = t;
        h
    }

    /// Exactly `N` bytes, zero-padded.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Guest memory (regions A, B, C) with `bytes` copied to the start of region A (and, past
/// 32 KiB, nowhere: inputs that long are cut).
pub fn guest_memory(bytes: &[u8]) -> GuestMem {
    let mem: GuestMem = GuestMemoryMmap::<RegionLog>::from_ranges(&[
        (GuestAddress(REGION_A.0), REGION_A.1),
        (GuestAddress(REGION_B.0), REGION_B.1),
        (GuestAddress(REGION_C.0), REGION_C.1),
    ])
    .expect("anonymous guest memory");
    let n = bytes.len().min(REGION_A.1);
    mem.write_slice(&bytes[..n], GuestAddress(REGION_A.0))
        .expect("write region A");
    mem
}

/// Whether `[addr, addr + len)` lies inside guest memory.
pub fn in_memory(mem: &GuestMem, addr: u64, len: u64) -> bool {
    len == 0 || mem.check_range(GuestAddress(addr), len as usize)
}

/// Ring size for a selector byte: a power of two from 1 to 64.
pub fn ring_size(sel: u8) -> u16 {
    1 << (sel % 7)
}

/// Where ring slot `slot` lives: (descriptor table, avail ring, used ring).
pub fn ring_addrs(slot: u64) -> (u64, u64, u64) {
    let base = slot * 0x1000;
    (base, base + 0x400, base + 0x600)
}

/// What [`start_ring`] needs besides memory.
#[derive(Clone, Copy, Debug)]
pub struct RingParams {
    /// Queue index.
    pub index: u16,
    /// Ring slot (addresses).
    pub slot: u64,
    /// Ring size.
    pub size: u16,
    /// SET_VRING_BASE value.
    pub base: u16,
    /// VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// Acked features the worker sees.
    pub acked: u64,
}

/// A started ring on `mem` (shared through `atomic`), or None if the layer refuses it.
pub fn start_ring(atomic: &GuestMemoryAtomic<GuestMem>, p: RingParams) -> Option<Ring> {
    let (desc, avail, used) = ring_addrs(p.slot);
    Ring::start(RingSetup {
        index: p.index,
        size: p.size,
        max_size: 256,
        desc,
        avail,
        used,
        // A packed ring's base has two halves (avail and used, each an index and a wrap
        // bit): the used half is the same bits turned, so both vary with the input.
        base: if p.acked & vhost_user_device::packed::VIRTIO_F_RING_PACKED != 0 {
            u32::from(p.base) | u32::from(p.base.rotate_left(8)) << 16
        } else {
            u32::from(p.base)
        },
        event_idx: p.event_idx,
        acked_features: p.acked,
        kick: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        call: Some(EventFd::new(EFD_NONBLOCK).expect("eventfd")),
        err: Some(EventFd::new(EFD_NONBLOCK).expect("eventfd")),
        enabled: true,
        inflight: None,
        mem: atomic.clone(),
        log: DirtyLog::new(),
        stats: Arc::new(QueueStats::default()),
    })
    .ok()
}

/// Adds `n` to the avail index of ring slot `slot` (the guest posting more chains).
pub fn bump_avail(mem: &GuestMem, slot: u64, n: u16) {
    let (_, avail, _) = ring_addrs(slot);
    let at = GuestAddress(avail + 2);
    if let Ok(v) = mem.read_obj::<u16>(at) {
        let _ = mem.write_obj(v.wrapping_add(n), at);
    }
}

/// Panics unless `chain` keeps the walker's promises: every buffer non-empty and inside
/// guest memory, readable buffers before writable ones, at most 4 GiB in all.
pub fn check_chain(mem: &GuestMem, chain: &Chain) {
    let mut seen_writable = false;
    let mut total = 0u64;
    for s in &chain.segments {
        assert!(s.len > 0, "empty segment in {chain:?}");
        assert!(
            in_memory(mem, s.addr, u64::from(s.len)),
            "segment outside memory in {chain:?}"
        );
        assert!(
            s.writable || !seen_writable,
            "readable after writable in {chain:?}"
        );
        seen_writable |= s.writable;
        total += u64::from(s.len);
    }
    assert!(total <= u64::from(u32::MAX), "chain longer than 4 GiB");
}

/// A virtio-blk device with `num_queues` queues of 64 on a 1 MiB temp image named after
/// `target` (unlinked at once: the open file keeps the image).
pub fn blk_device(target: &str, num_queues: u16) -> vhost_blk_backend::BlkDevice {
    use vhost_blk_backend::{BlkDevice, BlkOptions, CacheMode, Disk};
    let path = std::env::temp_dir().join(format!("vhost-fuzz-{target}-{}.img", std::process::id()));
    let f = std::fs::File::create(&path).expect("create image");
    f.set_len(1 << 20).expect("size image");
    drop(f);
    let disk = Disk::open(&path, false, CacheMode::Writeback, 512).expect("open image");
    let _ = std::fs::remove_file(&path);
    BlkDevice::new(
        disk,
        &BlkOptions {
            num_queues,
            queue_size: 64,
            block_size: 512,
            serial: "fuzz".into(),
            poll_us: 0,
            dirty: None,
            pin_guest_memory: false,
        },
    )
}
