//! The virtio-net control queue: commands (RX mode, MAC tables and address, announce,
//! queue pairs) in chains on a ring over guest memory from the input, handled by the
//! device's control worker (on a tap-less device: no host interface is touched).
//!
//! Input: acked features u64, queue pairs (1-8), ring size selector, passes, then guest
//! memory (ring slot 0).
#![no_main]

use std::sync::atomic::Ordering;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vhost_fuzz::{bump_avail, guest_memory, ring_size, start_ring, Reader, RingParams};
use vhost_net_backend::ctrl::CtrlWorker;
use vhost_net_backend::{NetDevice, NetOptions, Tap};
use vhost_user_device::{QueueWorker, Rings};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let acked = r.u64();
    let pairs = u16::from(r.u8() % 8) + 1;
    let size = ring_size(r.u8());
    let passes = r.u8() % 4 + 1;
    let mem = guest_memory(r.rest());

    let tap = Tap {
        name: "fuzz".into(),
        queues: Vec::new(),
        mac: None,
    };
    let device = NetDevice::new(
        tap,
        NetOptions {
            pairs,
            queue_size: 256,
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            mtu: None,
            mrg_rxbuf: true,
        },
    );
    let shared = Arc::clone(device.shared());
    let queue = device.ctrl_queue();
    let mut worker = CtrlWorker::new(shared.clone(), queue, acked).expect("control worker");
    let atomic = GuestMemoryAtomic::new(mem);
    let Some(ring) = start_ring(
        &atomic,
        RingParams {
            index: queue,
            slot: 0,
            size,
            base: 0,
            event_idx: false,
            acked,
        },
    ) else {
        return;
    };
    let mem = ring.memory();
    let mut rings = Rings::from_started([ring]);
    let used_idx = || -> u16 { mem.read_obj(GuestAddress(0x602)).unwrap_or(0) };
    let mut prev = used_idx();
    for _ in 0..passes {
        worker.process_queue(queue, &mut rings);
        // The last used element the worker published (written after everything else of
        // the pass) carries at most the acknowledgement byte.
        let now = used_idx();
        if now != prev {
            let slot = u64::from(now.wrapping_sub(1) % size);
            let len: u32 = mem
                .read_obj(GuestAddress(0x604 + 8 * slot + 4))
                .unwrap_or(0);
            assert!(len <= 1, "used length {len} for a control command");
        }
        prev = now;
        bump_avail(&mem, 0, 1);
    }
    let active = shared.active_pairs.load(Ordering::Relaxed);
    assert!(
        (1..=pairs).contains(&active),
        "{active} of {pairs} pairs active"
    );
    let st = shared.ctrl.lock().expect("control state");
    assert!(st.unicast.len() <= 64 * 1024 / 6 && st.multicast.len() <= 64 * 1024 / 6);
});
