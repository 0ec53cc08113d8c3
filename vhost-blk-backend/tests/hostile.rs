//! A hostile guest: malformed chains and requests. Each gets an error status where the
//! chain has room for one, or is returned unanswered and counted; the backend keeps
//! serving and never touches memory outside the guest's.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vhost_blk_backend::spec::{req_type, status};
use vhost_tests::frontend::{
    wait_eventfd, Buf, FrontendOptions, TestFrontend, F_INDIRECT, F_NEXT, F_WRITE,
};

const MEM: u64 = 32 << 20;

fn setup() -> (TestBackend, TestFrontend) {
    let b = TestBackend::start(BackendConfig::default());
    let fe = TestFrontend::connect(b.socket(), FrontendOptions::default()).unwrap();
    (b, fe)
}

/// The backend still serves a normal read afterwards.
fn still_serving(fe: &mut TestFrontend) {
    let (data, st) = read(fe, 1, 512);
    assert_eq!(st, status::OK);
    assert_eq!(data, pattern_range(512, 512));
}

/// Publishes a hand-built chain and waits for it to come back; returns (used len, status).
fn raw(fe: &mut TestFrontend, descs: &[(u64, u32, u16)], status_at: u64) -> (u32, u8) {
    let ids = fe.queues[0].reserve(descs.len());
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let next = if flags & F_NEXT != 0 { ids[i + 1] } else { 0 };
        fe.queues[0].write_desc(&fe.mem, ids[i], addr, len, flags, next);
    }
    let dq = &mut fe.queues[0];
    dq.publish(&fe.mem, ids[0]);
    dq.notify();
    let used = fe.wait(0, 1).expect("chain returned to the guest");
    assert_eq!(used[0].id, u32::from(ids[0]));
    (used[0].len, fe.read(status_at, 1)[0])
}

#[test]
fn descriptor_outside_guest_memory_is_dropped() {
    let (b, mut fe) = setup();
    let r = blk_req(&mut fe, req_type::IN, 0, 0);
    for bad in [MEM, MEM - 100, u64::MAX - 10, 1 << 50] {
        let (len, st) = raw(
            &mut fe,
            &[
                (r.hdr, 16, F_NEXT),
                (bad, 4096, F_WRITE | F_NEXT),
                (r.status, 1, F_WRITE),
            ],
            r.status,
        );
        assert_eq!((len, st), (0, 0xff), "addr {bad:#x}");
    }
    assert_eq!(b.stats[0].bad_chains.load(Ordering::Relaxed), 4);
    still_serving(&mut fe);
}

#[test]
fn looping_and_over_long_chains_are_dropped() {
    let (b, mut fe) = setup();
    let r = blk_req(&mut fe, req_type::IN, 0, 512);
    // A two-descriptor loop.
    let ids = fe.queues[0].reserve(2);
    fe.queues[0].write_desc(&fe.mem, ids[0], r.hdr, 16, F_NEXT, ids[1]);
    fe.queues[0].write_desc(&fe.mem, ids[1], r.data, 512, F_WRITE | F_NEXT, ids[0]);
    fe.queues[0].publish(&fe.mem, ids[0]);
    fe.queues[0].notify();
    let used = fe.wait(0, 1).unwrap();
    assert_eq!(used[0].len, 0);
    // A self-loop in an indirect table.
    let table = fe.alloc(32);
    vhost_tests_write_desc(&fe, table, 0, r.hdr, 16, F_NEXT, 1);
    vhost_tests_write_desc(&fe, table, 1, r.data, 512, F_WRITE | F_NEXT, 1);
    let ids = fe.queues[0].reserve(1);
    fe.queues[0].write_desc(&fe.mem, ids[0], table, 32, F_INDIRECT, 0);
    fe.queues[0].publish(&fe.mem, ids[0]);
    fe.queues[0].notify();
    assert_eq!(fe.wait(0, 1).unwrap()[0].len, 0);
    // A chain longer than the queue (129 descriptors on a 128-entry ring) via an
    // indirect table would be limited by the table; build one in the ring itself by
    // chaining every descriptor, the last pointing back to the first.
    let n = fe.queues[0].size as usize - 2;
    let ids = fe.queues[0].reserve(n);
    for i in 0..n {
        let next = ids[(i + 1) % n];
        fe.queues[0].write_desc(&fe.mem, ids[i], r.data, 512, F_WRITE | F_NEXT, next);
    }
    fe.queues[0].publish(&fe.mem, ids[0]);
    fe.queues[0].notify();
    assert_eq!(fe.wait(0, 1).unwrap()[0].len, 0);
    assert_eq!(b.stats[0].bad_chains.load(Ordering::Relaxed), 3);
    still_serving(&mut fe);
}

fn vhost_tests_write_desc(
    fe: &TestFrontend,
    table: u64,
    i: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let mut raw = Vec::with_capacity(16);
    raw.extend_from_slice(&addr.to_le_bytes());
    raw.extend_from_slice(&len.to_le_bytes());
    raw.extend_from_slice(&flags.to_le_bytes());
    raw.extend_from_slice(&next.to_le_bytes());
    fe.write(table + 16 * u64::from(i), &raw);
}

#[test]
fn bad_indirect_tables_are_dropped() {
    let (b, mut fe) = setup();
    let r = blk_req(&mut fe, req_type::IN, 0, 512);
    // Length not a multiple of 16; table outside memory; nested indirect; INDIRECT|NEXT.
    let table = fe.alloc(64);
    vhost_tests_write_desc(&fe, table, 0, table, 16, F_INDIRECT, 0);
    for (addr, len, flags) in [
        (table, 20u32, F_INDIRECT),
        (MEM - 16, 32, F_INDIRECT),
        (table, 16, F_INDIRECT),
        (table, 0, F_INDIRECT),
    ] {
        let ids = fe.queues[0].reserve(1);
        fe.queues[0].write_desc(&fe.mem, ids[0], addr, len, flags, 0);
        fe.queues[0].publish(&fe.mem, ids[0]);
        fe.queues[0].notify();
        assert_eq!(
            fe.wait(0, 1).unwrap()[0].len,
            0,
            "table {addr:#x} len {len}"
        );
    }
    let ids = fe.queues[0].reserve(2);
    fe.queues[0].write_desc(&fe.mem, ids[0], table, 16, F_INDIRECT | F_NEXT, ids[1]);
    fe.queues[0].write_desc(&fe.mem, ids[1], r.status, 1, F_WRITE, 0);
    fe.queues[0].publish(&fe.mem, ids[0]);
    fe.queues[0].notify();
    assert_eq!(fe.wait(0, 1).unwrap()[0].len, 0);
    assert_eq!(b.stats[0].bad_chains.load(Ordering::Relaxed), 5);
    still_serving(&mut fe);
}

#[test]
fn head_index_out_of_range_is_skipped() {
    let (b, mut fe) = setup();
    let size = fe.queues[0].size;
    fe.queues[0].publish(&fe.mem, size + 5);
    fe.queues[0].notify();
    // Nothing can be returned for a head that does not exist; the next chain still works.
    still_serving(&mut fe);
    assert_eq!(b.stats[0].bad_chains.load(Ordering::Relaxed), 1);
}

#[test]
fn short_header_gets_ioerr() {
    let (b, mut fe) = setup();
    let r = blk_req(&mut fe, req_type::IN, 0, 0);
    let (len, st) = raw(
        &mut fe,
        &[(r.hdr, 8, F_NEXT), (r.status, 1, F_WRITE)],
        r.status,
    );
    assert_eq!((len, st), (1, status::IOERR));
    // No readable descriptor at all.
    fe.write(r.status, &[0xff]);
    let (len, st) = raw(&mut fe, &[(r.status, 1, F_WRITE)], r.status);
    assert_eq!((len, st), (1, status::IOERR));
    assert_eq!(b.shared.stats.bad_requests.load(Ordering::Relaxed), 2);
    still_serving(&mut fe);
}

#[test]
fn missing_or_read_only_status_is_dropped() {
    let (b, mut fe) = setup();
    // OUT with no writable descriptor at all.
    let w = blk_req(&mut fe, req_type::OUT, 0, 512);
    fe.write(w.data, &[0xee; 512]);
    let (len, _) = raw(
        &mut fe,
        &[(w.hdr, 16, F_NEXT), (w.data, 512, F_NEXT), (w.status, 1, 0)],
        w.status,
    );
    assert_eq!(len, 0);
    assert_eq!(
        fe.read(w.status, 1)[0],
        0xff,
        "read-only status byte written"
    );
    assert_eq!(
        b.read_image(0, 512),
        pattern_range(0, 512),
        "unanswerable write executed"
    );
    // IN whose status descriptor is read-only (after writable data).
    let r = blk_req(&mut fe, req_type::IN, 0, 512);
    let (len, st) = raw(
        &mut fe,
        &[
            (r.hdr, 16, F_NEXT),
            (r.data, 512, F_WRITE | F_NEXT),
            (r.status, 1, 0),
        ],
        r.status,
    );
    assert_eq!((len, st), (0, 0xff));
    assert_eq!(b.shared.stats.dropped.load(Ordering::Relaxed), 1);
    assert_eq!(b.stats[0].bad_chains.load(Ordering::Relaxed), 1);
    still_serving(&mut fe);
}

#[test]
fn wrong_data_direction_gets_ioerr() {
    let (b, mut fe) = setup();
    // A read whose data buffer is device-readable.
    let r = blk_req(&mut fe, req_type::IN, 0, 512);
    let (len, st) = raw(
        &mut fe,
        &[
            (r.hdr, 16, F_NEXT),
            (r.data, 512, F_NEXT),
            (r.status, 1, F_WRITE),
        ],
        r.status,
    );
    assert_eq!((len, st), (1, status::IOERR));
    // A write whose data buffer is device-writable: must not touch the disk.
    let w = blk_req(&mut fe, req_type::OUT, 0, 512);
    fe.write(w.data, &[0xdd; 512]);
    let (len, st) = raw(
        &mut fe,
        &[
            (w.hdr, 16, F_NEXT),
            (w.data, 512, F_WRITE | F_NEXT),
            (w.status, 1, F_WRITE),
        ],
        w.status,
    );
    assert_eq!((len, st), (1, status::IOERR));
    assert_eq!(
        fe.read(w.data, 512),
        vec![0xdd; 512],
        "guest buffer overwritten"
    );
    assert_eq!(b.read_image(0, 512), pattern_range(0, 512));
    // GET_ID without a writable buffer.
    let g = blk_req(&mut fe, req_type::GET_ID, 0, 0);
    let (_, st) = raw(
        &mut fe,
        &[(g.hdr, 16, F_NEXT), (g.status, 1, F_WRITE)],
        g.status,
    );
    assert_eq!(st, status::IOERR);
    // Data length not a multiple of 512.
    let r = blk_req(&mut fe, req_type::IN, 0, 0);
    let d = fe.alloc(4096);
    let (_, st) = raw(
        &mut fe,
        &[
            (r.hdr, 16, F_NEXT),
            (d, 700, F_WRITE | F_NEXT),
            (r.status, 1, F_WRITE),
        ],
        r.status,
    );
    assert_eq!(st, status::IOERR);
    still_serving(&mut fe);
}

#[test]
fn out_of_range_sectors_get_ioerr() {
    let (b, mut fe) = setup();
    let sectors = (4u64 << 20) / 512;
    for (sector, len) in [
        (sectors, 512u32),
        (sectors - 1, 1024),
        (u64::MAX / 512 + 1, 512), // sector * 512 overflows
        (u64::MAX, 512),
        (u64::MAX / 512, 4096), // offset + len overflows
    ] {
        let r = blk_req(&mut fe, req_type::IN, sector, len);
        let (used, st) = run(&mut fe, 0, &r, true);
        assert_eq!((used.len, st), (1, status::IOERR), "read at {sector}");
        let w = blk_req(&mut fe, req_type::OUT, sector, len);
        assert_eq!(
            run(&mut fe, 0, &w, false).1,
            status::IOERR,
            "write at {sector}"
        );
    }
    assert_eq!(
        b.read_image((4 << 20) - 512, 512),
        pattern_range((4 << 20) - 512, 512)
    );
    still_serving(&mut fe);
}

fn range_req(fe: &mut TestFrontend, type_: u32, segs: &[(u64, u32, u32)], extra: usize) -> u8 {
    let r = blk_req(fe, type_, 0, 0);
    let mut raw = Vec::new();
    for &(sector, num, flags) in segs {
        raw.extend_from_slice(&sector.to_le_bytes());
        raw.extend_from_slice(&num.to_le_bytes());
        raw.extend_from_slice(&flags.to_le_bytes());
    }
    raw.extend(std::iter::repeat_n(0u8, extra));
    let at = fe.alloc(raw.len().max(1) as u64);
    fe.write(at, &raw);
    let mut chain = vec![Buf::ro(r.hdr, 16)];
    if !raw.is_empty() {
        chain.push(Buf::ro(at, raw.len() as u32));
    }
    chain.push(Buf::wo(r.status, 1));
    fe.submit(0, &chain);
    fe.wait(0, 1).unwrap();
    r.status(fe)
}

#[test]
fn bad_discard_and_write_zeroes_segments() {
    let (b, mut fe) = setup();
    let sectors = (4u64 << 20) / 512;
    for t in [req_type::DISCARD, req_type::WRITE_ZEROES] {
        // Past the end, overflowing, over the advertised segment size.
        assert_eq!(
            range_req(&mut fe, t, &[(sectors - 4, 8, 0)], 0),
            status::IOERR
        );
        assert_eq!(
            range_req(&mut fe, t, &[(u64::MAX - 2, 8, 0)], 0),
            status::IOERR
        );
        assert_eq!(range_req(&mut fe, t, &[(0, u32::MAX, 0)], 0), status::IOERR);
        // More segments than max_discard_seg (32).
        let many: Vec<_> = (0..33).map(|i| (i * 8, 8, 0)).collect();
        assert_eq!(range_req(&mut fe, t, &many, 0), status::IOERR);
        // Payload not a multiple of 16, and empty.
        assert_eq!(range_req(&mut fe, t, &[(0, 8, 0)], 5), status::IOERR);
        assert_eq!(range_req(&mut fe, t, &[], 0), status::IOERR);
        // Unknown flags.
        assert_eq!(range_req(&mut fe, t, &[(0, 8, 0x80)], 0), status::UNSUPP);
    }
    // UNMAP on DISCARD is not allowed by the spec.
    assert_eq!(
        range_req(&mut fe, req_type::DISCARD, &[(0, 8, 1)], 0),
        status::UNSUPP
    );
    // Nothing was zeroed.
    assert_eq!(b.read_image(0, 64 * 1024), pattern_range(0, 64 * 1024));
    assert_eq!(
        b.read_image((sectors - 4) * 512, 2048),
        pattern_range((sectors - 4) * 512, 2048)
    );
    still_serving(&mut fe);
}

#[test]
fn unknown_request_type_gets_unsupp() {
    let (_b, mut fe) = setup();
    for t in [2u32, 14, 99, u32::MAX] {
        let r = blk_req(&mut fe, t, 0, 0);
        assert_eq!(run(&mut fe, 0, &r, false).1, status::UNSUPP, "type {t}");
    }
    still_serving(&mut fe);
}

#[test]
fn a_flood_of_bad_chains_does_not_stop_good_ones() {
    let (b, mut fe) = setup();
    let good = blk_req(&mut fe, req_type::IN, 3, 512);
    for _ in 0..50 {
        let ids = fe.queues[0].reserve(1);
        fe.queues[0].write_desc(&fe.mem, ids[0], MEM + 4096, 16, 0, 0);
        fe.queues[0].publish(&fe.mem, ids[0]);
    }
    let head = fe.queues[0].add_chain(&fe.mem, &good.chain(true));
    fe.queues[0].publish(&fe.mem, head);
    fe.queues[0].notify();
    fe.wait(0, 51).unwrap();
    assert_eq!(good.status(&fe), status::OK);
    assert_eq!(fe.read(good.data, 512), pattern_range(3 * 512, 512));
    assert_eq!(b.stats[0].bad_chains.load(Ordering::Relaxed), 50);
}

/// How long a test waits for something the backend should do at once.
const PROMPT: Duration = Duration::from_secs(5);

/// Makes queue 0's avail index run more than the ring size ahead of the device, as the
/// hostile frontend of the report did, and kicks.
fn break_ring(fe: &mut TestFrontend) {
    let dq = &mut fe.queues[0];
    let bad = dq.avail_idx().wrapping_add(dq.size + 5);
    dq.force_avail_idx(&fe.mem, bad);
    dq.notify();
}

/// The frontend restarts queue 0 from scratch (fresh ring memory, base 0), as a VMM does
/// after resetting the device; the backend must take it back into service.
fn restart_ring(fe: &mut TestFrontend) {
    fe.add_queue(0).unwrap();
    fe.start_queue(0).unwrap();
}

#[test]
fn avail_index_far_ahead_parks_the_ring_until_it_is_restarted() {
    let (b, mut fe) = setup();
    let err = fe.set_vring_err(0).unwrap();
    still_serving(&mut fe);
    break_ring(&mut fe);
    assert!(wait_eventfd(&err, PROMPT), "VRING_ERR was not signalled");
    assert_eq!(b.stats[0].broken.load(Ordering::Relaxed), 1);
    // Kicks on the parked ring are drained, neither processed nor reported again.
    for _ in 0..10 {
        fe.queues[0].notify();
    }
    assert!(!wait_eventfd(&err, Duration::from_millis(200)));
    assert_eq!(b.stats[0].broken.load(Ordering::Relaxed), 1);
    // GET_VRING_BASE answers, with the index the device stopped at (one chain taken).
    // (A backend stuck on the ring would never answer: fail instead of hanging.)
    let base = fe.within(PROMPT, |fe| fe.fe.get_vring_base(0));
    assert_eq!(base.expect("GET_VRING_BASE"), 1);
    restart_ring(&mut fe);
    still_serving(&mut fe);
    assert_eq!(b.stats[0].broken.load(Ordering::Relaxed), 1);
}

#[test]
fn a_new_connection_after_a_broken_ring_is_served() {
    let (b, mut fe) = setup();
    let err = fe.set_vring_err(0).unwrap();
    break_ring(&mut fe);
    assert!(wait_eventfd(&err, PROMPT), "VRING_ERR was not signalled");
    // The frontend goes away with the ring parked; the next one gets a working device.
    drop(fe);
    let mut fe = TestFrontend::connect_within(b.socket(), FrontendOptions::default(), PROMPT)
        .expect("second connection");
    assert_eq!(write(&mut fe, 4, &[0x5a; 1024]), status::OK);
    let (data, st) = read(&mut fe, 4, 1024);
    assert_eq!((st, data), (status::OK, vec![0x5a; 1024]));
    assert_eq!(b.stats[0].broken.load(Ordering::Relaxed), 1);
}

#[test]
fn a_reset_device_takes_a_broken_ring_back() {
    let (b, mut fe) = setup();
    break_ring(&mut fe);
    let deadline = std::time::Instant::now() + PROMPT;
    while b.stats[0].broken.load(Ordering::Relaxed) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the ring was not found broken"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    fe.within(PROMPT, |fe| fe.fe.reset_device())
        .expect("RESET_DEVICE");
    // RESET_DEVICE forgets the negotiated features; negotiate again, then restart.
    let features = fe.features;
    fe.fe.set_features(features).unwrap();
    restart_ring(&mut fe);
    still_serving(&mut fe);
}

#[test]
fn an_avail_ring_at_address_zero_is_reported_not_spun_on() {
    let b = TestBackend::start(BackendConfig::default());
    let mut fe = TestFrontend::handshake(b.socket(), &FrontendOptions::default()).unwrap();
    fe.add_queue(0).unwrap();
    // virtio-queue accepts an avail ring at guest address 0 but then refuses to iterate
    // it; with one chain announced there the backend used to spin.
    fe.queues[0].avail = 0;
    fe.queues[0].force_avail_idx(&fe.mem, 1);
    let err = fe.set_vring_err(0).unwrap();
    fe.start_queue(0).unwrap();
    assert!(wait_eventfd(&err, PROMPT), "VRING_ERR was not signalled");
    assert_eq!(b.stats[0].broken.load(Ordering::Relaxed), 1);
    let base = fe.within(PROMPT, |fe| fe.fe.get_vring_base(0));
    assert_eq!(base.expect("GET_VRING_BASE"), 0);
    restart_ring(&mut fe);
    still_serving(&mut fe);
}

/// A backend and frontend with rings of `size` entries.
fn setup_sized(size: u16) -> (TestBackend, TestFrontend) {
    let b = TestBackend::start(BackendConfig {
        queue_size: size,
        ..BackendConfig::default()
    });
    let fe = TestFrontend::connect(
        b.socket(),
        FrontendOptions {
            queue_size: size,
            ..FrontendOptions::default()
        },
    )
    .unwrap();
    (b, fe)
}

/// Writes an indirect table of `n` descriptors at `table` that loops (the last one leads
/// back to the first): walking it reads all `n` before the chain is found too long.
fn looping_table(fe: &TestFrontend, table: u64, n: u16) {
    let mut raw = Vec::with_capacity(16 * usize::from(n));
    for i in 0..n {
        let next = if i + 1 == n { 0 } else { i + 1 };
        raw.extend_from_slice(&0u64.to_le_bytes());
        raw.extend_from_slice(&0u32.to_le_bytes());
        raw.extend_from_slice(&F_NEXT.to_le_bytes());
        raw.extend_from_slice(&next.to_le_bytes());
    }
    fe.write(table, &raw);
}

/// A ring filled with malformed chains, good ones behind them, and one kick: the backend
/// takes the malformed ones a bounded share at a time, and comes back for the rest on its
/// own. Every good request is served, every malformed chain comes back exactly once
/// (unanswered) and is counted exactly once.
#[test]
fn many_malformed_chains_then_good_ones_are_all_served() {
    let (b, mut fe) = setup_sized(1024);
    let table = fe.alloc(16 * 8);
    looping_table(&fe, table, 8);
    let bad = 1000usize;
    let mut bad_heads = Vec::with_capacity(bad);
    for i in 0..bad {
        let ids = fe.queues[0].reserve(1);
        if i % 2 == 0 {
            // A buffer outside guest memory.
            fe.queues[0].write_desc(&fe.mem, ids[0], MEM + 4096, 16, 0, 0);
        } else {
            fe.queues[0].write_desc(&fe.mem, ids[0], table, 16 * 8, F_INDIRECT, 0);
        }
        fe.queues[0].publish(&fe.mem, ids[0]);
        bad_heads.push(u32::from(ids[0]));
    }
    let mut good = Vec::new();
    for i in 0..8u64 {
        let r = blk_req(&mut fe, req_type::IN, 10 + i, 512);
        let head = fe.queues[0].add_chain(&fe.mem, &r.chain(true));
        fe.queues[0].publish(&fe.mem, head);
        good.push((u32::from(head), i, r));
    }
    fe.queues[0].notify();
    let used = fe.wait(0, bad + good.len()).expect("every chain returned");
    assert_eq!(
        used.len(),
        bad + good.len(),
        "more used entries than chains"
    );
    let mut returned_bad: Vec<u32> = used.iter().filter(|u| u.len == 0).map(|u| u.id).collect();
    returned_bad.sort_unstable();
    let mut expected_bad = bad_heads.clone();
    expected_bad.sort_unstable();
    assert_eq!(
        returned_bad, expected_bad,
        "each malformed chain returned once"
    );
    for (head, i, r) in &good {
        let u: Vec<_> = used.iter().filter(|u| u.id == *head).collect();
        assert_eq!(
            u.len(),
            1,
            "good request {i} (head {head}) returned {} times",
            u.len()
        );
        assert_eq!(u[0].len, 513);
        assert_eq!(r.status(&fe), status::OK);
        assert_eq!(fe.read(r.data, 512), pattern_range((10 + i) * 512, 512));
    }
    assert_eq!(b.stats[0].bad_chains.load(Ordering::Relaxed), bad as u64);
    // Nothing more comes back later (no chain is returned twice).
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(fe.queues[0].used_idx(&fe.mem), (bad + good.len()) as u16);
    assert_eq!(b.stats[0].bad_chains.load(Ordering::Relaxed), bad as u64);
    still_serving(&mut fe);
}

/// GET_VRING_BASE while a ring still holds many malformed chains, each expensive to walk
/// (an indirect table as long as the ring, that loops): the backend answers after the
/// share it is working on, not after the whole ring, and the index it answers is exact.
#[test]
fn stopping_a_ring_full_of_malformed_chains_answers_promptly() {
    let size = 4096u16;
    let (b, mut fe) = setup_sized(size);
    let n = size;
    let table = fe.alloc(16 * u64::from(n));
    looping_table(&fe, table, n);
    let mut heads = Vec::with_capacity(usize::from(size));
    for _ in 0..size {
        let ids = fe.queues[0].reserve(1);
        fe.queues[0].write_desc(&fe.mem, ids[0], table, 16 * u32::from(n), F_INDIRECT, 0);
        fe.queues[0].publish(&fe.mem, ids[0]);
        heads.push(u32::from(ids[0]));
    }
    fe.queues[0].notify();
    // The stop must find the worker at work on the ring, not before it started.
    let deadline = std::time::Instant::now() + PROMPT;
    while b.stats[0].bad_chains.load(Ordering::Relaxed) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the backend did not start on the ring"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let started = std::time::Instant::now();
    let base = fe
        .within(PROMPT, |fe| fe.fe.get_vring_base(0))
        .expect("GET_VRING_BASE answered in time");
    let took = started.elapsed();
    let base = u16::try_from(base).expect("base fits the ring");
    assert!(
        base < size,
        "GET_VRING_BASE was answered only after all {size} malformed chains ({took:?})"
    );
    // Everything before the index is back on the used ring, once, and counted; nothing
    // after it was touched.
    assert_eq!(fe.queues[0].used_idx(&fe.mem), base);
    assert_eq!(
        b.stats[0].bad_chains.load(Ordering::Relaxed),
        u64::from(base)
    );
    let used = fe.queues[0].take_used(&fe.mem);
    let ids: Vec<u32> = used.iter().map(|u| u.id).collect();
    assert_eq!(ids, heads[..usize::from(base)]);
    assert!(used.iter().all(|u| u.len == 0));
    restart_ring(&mut fe);
    still_serving(&mut fe);
}
