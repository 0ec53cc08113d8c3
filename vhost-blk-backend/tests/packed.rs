//! virtio-blk over packed rings (VIRTIO_F_RING_PACKED), driven through the vhost-user
//! socket with the frontend harness's packed driver: data checked across many laps of a
//! small ring, indirect and malformed chains, event_idx, and a ring moved to a new backend
//! with the wrap counters GET_VRING_BASE returned.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use vhost_blk_backend::spec::{req_type, status};
use vhost_tests::frontend::{Buf, FrontendOptions, TestFrontend, RING_PACKED};

/// A ring this small wraps every few requests (a request takes three descriptors).
const RING: u16 = 8;

fn connect_packed(b: &TestBackend, event_idx: bool, inflight: bool) -> TestFrontend {
    let fe = TestFrontend::connect(
        b.socket(),
        FrontendOptions {
            queue_size: RING,
            packed: true,
            event_idx,
            inflight,
            ..Default::default()
        },
    )
    .expect("connect");
    assert_ne!(fe.features & RING_PACKED, 0, "packed rings negotiated");
    assert!(fe.queues[0].is_packed());
    fe
}

/// Writes `n` distinct 4 KiB blocks, two requests in flight at a time (they may complete
/// in either order), then reads each back and checks it.
fn write_read_laps(fe: &mut TestFrontend, b: &TestBackend, first_sector: u64, n: u64) {
    let block = |i: u64| -> Vec<u8> {
        (0..4096u64)
            .map(|j| ((i * 31 + j * 7) % 251) as u8)
            .collect()
    };
    for pair in 0..n / 2 {
        let reqs: Vec<_> = (0..2)
            .map(|k| {
                let i = pair * 2 + k;
                let r = blk_req(fe, req_type::OUT, first_sector + i * 8, 4096);
                fe.write(r.data, &block(i));
                fe.submit(0, &r.chain(false));
                r
            })
            .collect();
        let used = fe.wait(0, 2).expect("write completions");
        assert_eq!(used.len(), 2);
        for r in &reqs {
            assert_eq!(r.status(fe), status::OK);
        }
    }
    for i in 0..n / 2 * 2 {
        let (data, st) = read(fe, first_sector + i * 8, 4096);
        assert_eq!(st, status::OK);
        assert_eq!(data, block(i), "block {i} read back");
        assert_eq!(b.read_image((first_sector + i * 8) * 512, 4096), block(i));
    }
}

#[test]
fn packed_ring_reads_and_writes_across_many_laps() {
    let b = TestBackend::start(BackendConfig::default());
    let mut fe = connect_packed(&b, false, false);
    // 40 writes and 40 reads of three descriptors each: 30 laps of the 8-entry ring.
    write_read_laps(&mut fe, &b, 64, 40);
    let (data, st) = read(&mut fe, 0, 8192);
    assert_eq!(st, status::OK);
    assert_eq!(data, pattern_range(0, 8192));
    assert_eq!(b.stats[0].bad_chains.load(Ordering::Relaxed), 0);
}

#[test]
fn packed_ring_with_event_idx_and_an_inflight_region() {
    // event_idx puts both sides' event suppression in DESC mode; the inflight region is
    // accepted and left unused (split only; the backend logs that).
    let b = TestBackend::start(BackendConfig::default());
    let mut fe = connect_packed(&b, true, true);
    assert!(fe.inflight.is_some());
    write_read_laps(&mut fe, &b, 256, 24);
}

#[test]
fn packed_indirect_and_malformed_chains() {
    let b = TestBackend::start(BackendConfig::default());
    let mut fe = connect_packed(&b, false, false);
    // A read through an indirect table.
    let r = blk_req(&mut fe, req_type::IN, 16, 2048);
    let table = fe.alloc(64);
    let head = {
        let dq = &mut fe.queues[0];
        let id = dq.add_indirect(&fe.mem, table, &r.chain(true));
        dq.publish(&fe.mem, id);
        dq.notify();
        id
    };
    let used = fe.wait(0, 1).expect("indirect completion");
    assert_eq!(used[0].id, u32::from(head));
    assert_eq!(used[0].len, 2049);
    assert_eq!(r.status(&fe), status::OK);
    assert_eq!(fe.read(r.data, 2048), pattern_range(16 * 512, 2048));

    // A data buffer outside guest memory: returned unused, counted, the ring goes on.
    let r = blk_req(&mut fe, req_type::IN, 0, 512);
    let mem_size = FrontendOptions::default().mem_size;
    let bad = [
        Buf::ro(r.hdr, 16),
        Buf::wo(mem_size - 256, 512),
        Buf::wo(r.status, 1),
    ];
    let head = fe.submit(0, &bad);
    let used = fe.wait(0, 1).expect("malformed chain returned");
    assert_eq!((used[0].id, used[0].len), (u32::from(head), 0));
    assert_eq!(r.status(&fe), 0xff, "the device did not touch the request");
    assert_eq!(b.stats[0].bad_chains.load(Ordering::Relaxed), 1);
    // The next request works, at the right place in the ring.
    let (data, st) = read(&mut fe, 3, 1024);
    assert_eq!(st, status::OK);
    assert_eq!(data, pattern_range(3 * 512, 1024));
}

#[test]
fn packed_ring_moves_to_a_new_backend_with_its_wrap_counters() {
    let first = TestBackend::start(BackendConfig::default());
    let mut fe = connect_packed(&first, false, false);
    // Five requests of three descriptors: 15 slots of the 8-entry ring, so both sides
    // stand at index 7 of the second lap (wrap counters 0).
    for i in 0..5u64 {
        let (data, st) = read(&mut fe, i, 512);
        assert_eq!(st, status::OK);
        assert_eq!(data, pattern_range(i * 512, 512));
    }
    let bases = fe.stop_queues().expect("GET_VRING_BASE");
    assert_eq!(
        bases,
        vec![0x0007_0007],
        "indices 7 with both wrap counters clear"
    );
    drop(first);

    // A second backend continues from there: a fresh-ring base would have it wait at
    // index 0 for descriptors the driver will never write there.
    let second = TestBackend::start(BackendConfig::default());
    // A base naming an index outside the 8-entry ring is refused (the ring does not
    // start), and the backend takes a good one on the next connection.
    assert!(fe.reconnect_at(second.socket(), &[0x0009_0007]).is_err());
    assert_eq!(second.stats[0].chains.load(Ordering::Relaxed), 0);
    fe.reconnect_at(second.socket(), &bases)
        .expect("reconnect at the saved base");
    write_read_laps(&mut fe, &second, 512, 10);
    let bases = fe.stop_queues().expect("GET_VRING_BASE");
    // 15 + 30 + 30 slots = 75 = 9 laps and 3: index 3, wrap counter (1 + 9) % 2 = 0.
    assert_eq!(bases, vec![0x0003_0003]);
    drop(second);

    // A backend restarted after its predecessor died (no GET_VRING_BASE): the frontend
    // restarts the ring at its used position, with the wrap counters that go with it.
    let third = TestBackend::start(BackendConfig::default());
    fe.reconnect(third.socket()).expect("reconnect");
    write_read_laps(&mut fe, &third, 1024, 6);
}

#[test]
fn a_split_frontend_gets_a_split_ring_from_the_same_backend() {
    // Offering packed rings changes nothing for a driver that does not ack them.
    let b = TestBackend::start(BackendConfig::default());
    let mut fe = TestFrontend::connect(b.socket(), FrontendOptions::default()).expect("connect");
    assert_eq!(fe.features & RING_PACKED, 0);
    assert!(!fe.queues[0].is_packed());
    let (data, st) = read(&mut fe, 1, 512);
    assert_eq!(st, status::OK);
    assert_eq!(data, pattern_range(512, 512));
    // A split ring's base is a 16-bit avail index: a packed-style 32-bit one is refused.
    let base = fe.stop_queues().expect("GET_VRING_BASE");
    assert_eq!(base, vec![1]);
    assert!(fe.start_queue_at_base(0, 0x8001_8001).is_err());
    fe.start_queue_at_base(0, base[0])
        .expect("restart at the saved base");
    let (data, st) = read(&mut fe, 2, 512);
    assert_eq!(st, status::OK);
    assert_eq!(data, pattern_range(1024, 512));
}
