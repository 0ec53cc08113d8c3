//! The descriptor-chain walker and the ring over guest memory from the input.
//!
//! 1. `chain::walk` with a descriptor table address, queue size and head from the input
//!    (any values, including ones no frontend would set up).
//! 2. A ring started on the same memory (ring slot 0: descriptor table 0x0, avail 0x400,
//!    used 0x600), driven by up to 32 operations: pop, complete one or all popped chains
//!    (one by one or as a batch), give the last pop back, notification on/off, notify, and
//!    the guest posting more chains (bumping the avail index). With flags bit 1 the ring
//!    is packed (VIRTIO_F_RING_PACKED): the descriptor ring at 0x0, the driver's event
//!    area at 0x400, the device's at 0x600; the guest's descriptors and their wrap flags
//!    are the input's memory bytes.
//!
//! Input: ring size selector, flags (bit 0 event_idx, bit 1 packed), base u16, walk table
//! u64, walk queue size u16, walk head u16, op count, 32 op bytes, then guest memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_fuzz::{
    bump_avail, check_chain, guest_memory, ring_size, start_ring, Reader, RingParams,
};
use vhost_user_device::chain::walk;
use vhost_user_device::Chain;
use vm_memory::GuestMemoryAtomic;

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let size = ring_size(r.u8());
    let flags = r.u8();
    let base = r.u16();
    let walk_table = r.u64();
    let walk_size = r.u16();
    let walk_head = r.u16();
    let nops = r.u8() % 33;
    let ops: [u8; 32] = r.array();
    let mem = guest_memory(r.rest());

    let mut chain = Chain::default();
    if walk(&mem, walk_table, walk_size, walk_head, &mut chain).is_ok() {
        check_chain(&mem, &chain);
        assert_eq!(chain.head, walk_head);
        assert!(walk_head < walk_size);
    }

    let atomic = GuestMemoryAtomic::new(mem);
    let Some(mut ring) = start_ring(
        &atomic,
        RingParams {
            index: 0,
            slot: 0,
            size,
            base,
            event_idx: flags & 1 != 0,
            acked: if flags & 2 != 0 {
                vhost_user_device::packed::VIRTIO_F_RING_PACKED
            } else {
                0
            },
        },
    ) else {
        return;
    };
    let mem = ring.memory();
    let mut popped: Vec<(Chain, u32)> = Vec::new();
    let mut pops = 0u32;
    for &op in &ops[..usize::from(nops)] {
        let arg = op >> 3;
        // Each operation is a new round, as each event is for the layer's worker: a
        // round stops after a bounded number of malformed chains.
        ring.begin_round();
        match op & 7 {
            0 | 1 => {
                if ring.pop(&mem, &mut chain) {
                    pops += 1;
                    check_chain(&mem, &chain);
                    assert!(chain.head < ring.size());
                    let len = (chain.writable_len() as u32).min(u32::from(arg) * 64);
                    popped.push((chain.clone(), len));
                }
            }
            2 => {
                if !popped.is_empty() {
                    let (chain, len) = popped.remove(0);
                    ring.add_used(&mem, chain.head, len);
                }
            }
            3 => {
                let used: Vec<(u16, u32)> = popped.drain(..).map(|(c, l)| (c.head, l)).collect();
                ring.add_used_batch(&mem, &used);
            }
            4 => {
                // The last `arg` chains taken go back unused (what the net worker does
                // with its cached receive buffers when the ring stops).
                let n = usize::from(arg).min(popped.len());
                let back: Vec<Chain> = popped.drain(popped.len() - n..).map(|(c, _)| c).collect();
                let completed = ring.give_back(&mem, &back);
                assert!(completed <= back.len());
            }
            5 => ring.disable_notification(&mem),
            6 => {
                let _ = ring.enable_notification(&mem);
                ring.notify(&mem);
            }
            _ => bump_avail(&mem, 0, u16::from(arg)),
        }
        if ring.is_broken() {
            assert!(!ring.pop(&mem, &mut chain));
            assert!(!ring.enable_notification(&mem));
        }
    }
    let stats = ring.stats();
    assert!(u64::from(pops) <= stats.chains.load(std::sync::atomic::Ordering::Relaxed));
});
