//! virtio-net over packed rings (VIRTIO_F_RING_PACKED) through a real tap in a private
//! network namespace: TX and RX frames checked byte for byte across many laps of a small
//! ring, a mergeable frame over several buffers published together, and cached receive
//! buffers given back when the ring stops.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use vhost::VhostBackend;
use vhost_net_backend::spec::{features, NetHdr, HDR_LEN};
use vhost_tests::frontend::{Buf, FrontendOptions, TestFrontend, Used, RING_PACKED};

const T: Duration = Duration::from_secs(5);
/// A small ring: TX frames take two descriptors, so 8 of them make a lap.
const RING: u16 = 16;

fn connect_packed(be: &TestBackend) -> TestFrontend {
    let fe = TestFrontend::connect(
        &be.socket,
        FrontendOptions {
            num_queues: 3,
            queue_size: RING,
            event_idx: true,
            packed: true,
            ..Default::default()
        },
    )
    .expect("connect");
    assert_ne!(fe.features & RING_PACKED, 0, "packed rings negotiated");
    fe
}

/// Posts one RX buffer of 2048 bytes on queue 0; records where it is.
fn post_one(fe: &mut TestFrontend, gpa_of: &mut HashMap<u32, u64>) {
    let a = fe.alloc(2048);
    let dq = &mut fe.queues[0];
    let id = dq.add_chain(&fe.mem, &[Buf::wo(a, 2048)]);
    dq.publish(&fe.mem, id);
    gpa_of.insert(u32::from(id), a);
}

/// Waits for at least `n` used RX elements (more may come with them).
fn wait_rx(fe: &mut TestFrontend, pending: &mut Vec<Used>, n: usize) {
    if pending.len() < n {
        let more = fe.wait(0, n - pending.len()).expect("rx frames");
        pending.extend(more);
    }
}

#[test]
fn packed_rings_carry_tx_and_rx_frames_across_many_laps() {
    if !enter_netns("packed_rings_carry_tx_and_rx_frames") {
        return;
    }
    let be = TestBackend::start(Config::default());
    let mut fe = connect_packed(&be);
    let sock = PacketSocket::open(TAP, false);

    // TX: 60 frames of two descriptors, 7 laps and a half of the ring, in order.
    for i in 0..60u32 {
        let frame = test_frame(HOST_MAC, GUEST_MAC, 0x1000 + i, 64 + i as usize);
        send_tx(&mut fe, 0, NetHdr::default(), &frame);
        fe.wait(1, 1).expect("tx completion");
        let (_, got) = sock
            .recv_matching(T, |f| has_tag(f, 0x1000 + i))
            .unwrap_or_else(|| panic!("tx frame {i} on the tap"));
        assert_eq!(got, frame);
    }
    assert_eq!(be.packets(1), 60);

    // RX: 8 buffers posted, each reposted as it comes back; 40 frames go round 2.5 laps.
    let mut gpa_of = HashMap::new();
    for _ in 0..8 {
        post_one(&mut fe, &mut gpa_of);
    }
    fe.queues[0].notify();
    let mut pending = Vec::new();
    for i in 0..40u32 {
        let frame = test_frame(GUEST_MAC, HOST_MAC, 0x2000 + i, 100 + i as usize);
        sock.send(None, &frame).expect("send");
        wait_rx(&mut fe, &mut pending, 1);
        let u = pending.remove(0);
        let gpa = gpa_of[&u.id];
        assert_eq!(u.len as usize, HDR_LEN + frame.len());
        let hdr = NetHdr::parse(&fe.read(gpa, HDR_LEN).try_into().expect("header"));
        assert_eq!(hdr.num_buffers, 1);
        assert_eq!(
            fe.read(gpa + HDR_LEN as u64, frame.len()),
            frame,
            "frame {i}"
        );
        post_one(&mut fe, &mut gpa_of);
        fe.queues[0].notify();
    }

    // A frame over four buffers: the backend publishes them together (the driver reads
    // num_buffers from the first and expects the rest already there).
    assert_ne!(fe.features & features::MRG_RXBUF, 0);
    let frame = test_frame(GUEST_MAC, HOST_MAC, 0x3000, 8000 - 14);
    sock.send(None, &frame).expect("send");
    wait_rx(&mut fe, &mut pending, 1);
    let more = fe.queues[0].take_used(&fe.mem);
    pending.extend(more);
    let first = pending[0];
    let hdr = NetHdr::parse(
        &fe.read(gpa_of[&first.id], HDR_LEN)
            .try_into()
            .expect("header"),
    );
    assert_eq!(hdr.num_buffers, 4);
    assert_eq!(pending.len(), 4, "all four buffers visible together");
    let mut data = fe.read(
        gpa_of[&first.id] + HDR_LEN as u64,
        first.len as usize - HDR_LEN,
    );
    for u in &pending[1..] {
        data.extend(fe.read(gpa_of[&u.id], u.len as usize));
    }
    assert_eq!(data, frame);
    assert_eq!(
        be.stats[0]
            .bad_chains
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[test]
fn stopping_a_packed_rx_ring_gives_cached_buffers_back() {
    if !enter_netns("stopping_a_packed_rx_ring_gives_cached_buffers_back") {
        return;
    }
    let be = TestBackend::start(Config::default());
    let mut fe = connect_packed(&be);
    let sock = PacketSocket::open(TAP, false);
    let mut gpa_of = HashMap::new();
    for _ in 0..6 {
        post_one(&mut fe, &mut gpa_of);
    }
    fe.queues[0].notify();
    sock.send(None, &test_frame(GUEST_MAC, HOST_MAC, 0x8000, 100))
        .expect("send");
    let mut pending = Vec::new();
    wait_rx(&mut fe, &mut pending, 1);
    assert_eq!(pending.len(), 1);
    // One buffer (one descriptor) used; the backend may hold the other five popped: it
    // must give them back, so both sides stand at index 1 of the first lap.
    let base = fe.fe.get_vring_base(0).expect("GET_VRING_BASE");
    assert_eq!(
        base, 0x8001_8001,
        "cached receive buffers were not given back"
    );
}

/// Like datapath.rs's split-ring test: good A, malformed M (the layer returns it while
/// popping), good B and C, all taken on one kick. Stopping the ring gives back B and C
/// (the run after the hole M leaves) by moving the avail position back over them,
/// completes A unused, and never re-offers M: each buffer comes back exactly once, and B
/// and C take frames after the restart.
#[test]
fn stopping_a_packed_rx_ring_after_malformed_buffers_gives_each_back_once() {
    if !enter_netns("stopping_a_packed_rx_ring_after_malformed_buffers") {
        return;
    }
    let be = TestBackend::start(Config::default());
    let mut fe = connect_packed(&be);
    let sock = PacketSocket::open(TAP, false);
    let a = fe.alloc(2048);
    let b = fe.alloc(2048);
    let c = fe.alloc(2048);
    let dq = &mut fe.queues[0];
    let ha = dq.add_chain(&fe.mem, &[Buf::wo(a, 2048)]);
    let hm = dq.add_chain(&fe.mem, &[Buf::wo(1 << 40, 2048)]);
    let hb = dq.add_chain(&fe.mem, &[Buf::wo(b, 2048)]);
    let hc = dq.add_chain(&fe.mem, &[Buf::wo(c, 2048)]);
    dq.publish_many(&fe.mem, &[ha, hm, hb, hc]);
    dq.notify();
    let mut used = fe.wait(0, 1).expect("the malformed chain comes back");
    std::thread::sleep(Duration::from_millis(200));
    used.extend(fe.queues[0].take_used(&fe.mem));

    let base = fe.fe.get_vring_base(0).expect("GET_VRING_BASE");
    // M and A used (2 descriptors); B and C given back: both sides at index 2.
    assert_eq!(base, 0x8002_8002, "used {used:?}");
    fe.start_queue_at_base(0, base).expect("restart");
    for i in 0..2u32 {
        sock.send(None, &test_frame(GUEST_MAC, HOST_MAC, 0xb100 + i, 100))
            .expect("send");
    }
    wait_rx(&mut fe, &mut used, 4);
    std::thread::sleep(Duration::from_millis(200));
    used.extend(fe.queues[0].take_used(&fe.mem));
    for h in [ha, hm, hb, hc].map(u32::from) {
        let n = used.iter().filter(|u| u.id == h).count();
        assert_eq!(n, 1, "buffer {h} used {n} times: {used:?}");
    }
    let frames: Vec<_> = used.iter().filter(|u| u.len > 0).collect();
    assert_eq!(
        frames.iter().map(|u| u.id).collect::<Vec<_>>(),
        vec![u32::from(hb), u32::from(hc)]
    );
    for (u, (gpa, tag)) in frames.iter().zip([(b, 0xb100), (c, 0xb101)]) {
        let data = fe.read(gpa + HDR_LEN as u64, u.len as usize - HDR_LEN);
        assert!(has_tag(&data, tag), "frame {tag:#x} in buffer {}", u.id);
    }
}
