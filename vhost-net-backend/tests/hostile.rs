//! A hostile or broken driver: bad TX chains and headers, unusable RX buffers, addresses
//! outside guest memory, bad control commands. Each is dropped and counted, the chain is
//! returned, and the device keeps working.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use vhost::VhostBackend;
use vhost_net_backend::spec::{gso, hdr_flags, NetHdr, HDR_LEN};
use vhost_net_backend::stats::DropReason;
use vhost_tests::frontend::{wait_eventfd, Buf, TestFrontend};

const T: Duration = Duration::from_secs(5);

/// After the hostile part, a good frame still goes through.
fn still_works(fe: &mut vhost_tests::frontend::TestFrontend, sock: &PacketSocket, tag: u32) {
    send_tx(
        fe,
        0,
        NetHdr::default(),
        &test_frame(HOST_MAC, GUEST_MAC, tag, 80),
    );
    fe.wait(1, 1).expect("good frame completes");
    sock.recv_matching(T, |f| has_tag(f, tag))
        .expect("good frame reaches the tap");
}

#[test]
fn bad_tx_chains_are_dropped_counted_and_returned() {
    if !enter_netns("bad_tx_chains_are_dropped_counted_and_returned") {
        return;
    }
    let be = TestBackend::start(Config::default());
    let mut fe = be.connect();
    let sock = PacketSocket::open(TAP, false);

    // Shorter than the virtio-net header.
    let a = fe.alloc(8);
    fe.submit(1, &[Buf::ro(a, 8)]);
    assert_eq!(fe.wait(1, 1).expect("returned")[0].len, 0);
    assert_eq!(be.drops(1, DropReason::ShortChain), 1);

    // Over 64 KiB plus headers.
    let big = fe.alloc(70_000);
    fe.submit(1, &[Buf::ro(big, 70_000)]);
    fe.wait(1, 1).expect("returned");
    assert_eq!(be.drops(1, DropReason::TooLong), 1);

    // Bad GSO: unknown type, GSO without segment size, checksum outside the frame, ECN
    // without TSO, unknown flags.
    let frame = test_frame(HOST_MAC, GUEST_MAC, 0xdead, 100);
    let bad = [
        NetHdr {
            gso_type: 0x42,
            gso_size: 100,
            ..Default::default()
        },
        NetHdr {
            flags: hdr_flags::NEEDS_CSUM,
            gso_type: gso::TCPV4,
            gso_size: 0,
            csum_start: 34,
            csum_offset: 16,
            ..Default::default()
        },
        NetHdr {
            flags: hdr_flags::NEEDS_CSUM,
            csum_start: 100,
            csum_offset: 16,
            ..Default::default()
        },
        NetHdr {
            gso_type: gso::ECN,
            gso_size: 100,
            ..Default::default()
        },
        NetHdr {
            flags: 0x40,
            ..Default::default()
        },
    ];
    for h in bad {
        send_tx(&mut fe, 0, h, &frame);
        fe.wait(1, 1).expect("returned");
    }
    assert_eq!(be.drops(1, DropReason::BadHeader), 5);
    assert!(
        sock.recv_matching(Duration::from_millis(300), |f| has_tag(f, 0xdead))
            .is_none(),
        "a frame with a bad header reached the tap"
    );

    // A header split over tiny descriptors is fine.
    let h = fe.alloc(HDR_LEN as u64);
    let d = fe.alloc(frame.len() as u64);
    let good = test_frame(HOST_MAC, GUEST_MAC, 0xbeef, 100);
    fe.write(d, &good);
    fe.submit(
        1,
        &[
            Buf::ro(h, 3),
            Buf::ro(h + 3, 9),
            Buf::ro(d, good.len() as u32),
        ],
    );
    fe.wait(1, 1).expect("completes");
    sock.recv_matching(T, |f| has_tag(f, 0xbeef))
        .expect("split header frame");

    // Descriptor outside guest memory (32 MiB): the layer refuses the chain.
    let before = be.stats[1].bad_chains.load(Ordering::Relaxed);
    fe.submit(1, &[Buf::ro(1 << 40, 100)]);
    assert_eq!(fe.wait(1, 1).expect("returned")[0].len, 0);
    assert_eq!(be.stats[1].bad_chains.load(Ordering::Relaxed), before + 1);

    still_works(&mut fe, &sock, 0xc001);
}

#[test]
fn unusable_rx_buffers_are_returned_and_skipped() {
    if !enter_netns("unusable_rx_buffers_are_returned_and_skipped") {
        return;
    }
    let be = TestBackend::start(Config::default());
    let mut fe = be.connect();
    let sock = PacketSocket::open(TAP, false);
    // Too small for the header, read-only, outside memory; then good ones.
    let small = fe.alloc(4);
    let h_small = fe.submit(0, &[Buf::wo(small, 4)]);
    let ro = fe.alloc(2048);
    let h_ro = fe.submit(0, &[Buf::ro(ro, 2048)]);
    fe.submit(0, &[Buf::wo(1 << 40, 2048)]);
    let bufs = post_rx(&mut fe, 0, 40, 2048);
    let frame = test_frame(GUEST_MAC, HOST_MAC, 0xd00d, 300);
    sock.send(None, &frame).expect("send");
    // Three returned with length 0 (in order, before the frame), then the frame.
    let mut used = fe.wait(0, 4).expect("used");
    let bad: Vec<_> = used.drain(..3).collect();
    assert!(bad.iter().all(|u| u.len == 0), "{bad:?}");
    assert!(bad.iter().any(|u| u.id == u32::from(h_small)));
    assert!(bad.iter().any(|u| u.id == u32::from(h_ro)));
    assert_eq!(be.drops(0, DropReason::RxBufferTooSmall), 2);
    let (_, hdr, data) = recv_rx(&mut fe, 0, &bufs, &mut used);
    assert_eq!(hdr.num_buffers, 1);
    assert_eq!(data, frame);

    // A bad buffer in the middle of good ones is returned in order too.
    let tiny = fe.alloc(2);
    fe.submit(0, &[Buf::wo(tiny, 2)]);
    let more = post_rx(&mut fe, 0, 40, 2048);
    let mut all = bufs.clone();
    all.extend(more);
    for i in 0..45u32 {
        sock.send(None, &test_frame(GUEST_MAC, HOST_MAC, 0xe000 + i, 60))
            .expect("send");
    }
    let mut got = 0;
    let mut pending = Vec::new();
    let deadline = std::time::Instant::now() + T;
    while got < 45 && std::time::Instant::now() < deadline {
        if pending.is_empty() {
            pending.extend(fe.wait(0, 1).expect("used"));
        }
        if pending[0].len == 0 {
            pending.remove(0);
            continue;
        }
        let (_, _, data) = recv_rx(&mut fe, 0, &all, &mut pending);
        assert!(has_tag(&data, 0xe000 + got), "frame {got} out of order");
        got += 1;
    }
    assert_eq!(got, 45);
    assert_eq!(be.drops(0, DropReason::RxBufferTooSmall), 3);
    still_works(&mut fe, &sock, 0xc002);
}

#[test]
fn bad_control_commands_are_refused() {
    if !enter_netns("bad_control_commands_are_refused") {
        return;
    }
    let be = TestBackend::start(Config::default());
    let mut fe = be.connect();
    // No ack buffer: returned with length 0.
    let a = fe.alloc(2);
    fe.write(a, &[0, 0]);
    fe.submit(2, &[Buf::ro(a, 2)]);
    assert_eq!(fe.wait(2, 1).expect("returned")[0].len, 0);
    // Too short, MQ without MQ negotiated (one pair), unknown class.
    for cmd in [vec![], vec![4u8, 0, 1, 0], vec![77, 1]] {
        let h = fe.alloc(cmd.len().max(1) as u64);
        fe.write(h, &cmd);
        let ack = fe.alloc(1);
        let mut bufs = Vec::new();
        if !cmd.is_empty() {
            bufs.push(Buf::ro(h, cmd.len() as u32));
        }
        bufs.push(Buf::wo(ack, 1));
        fe.submit(2, &bufs);
        let u = fe.wait(2, 1).expect("answered");
        assert_eq!(u[0].len, 1);
        assert_eq!(fe.read(ack, 1)[0], 1, "command {cmd:?} must be refused");
    }
    assert_eq!(be.shared.stats.ctrl_err.load(Ordering::Relaxed), 4);
}

/// Makes queue `q`'s avail index run the ring size + 5 ahead of the device and kicks:
/// virtio-queue refuses such a ring, which the backend used to spin on.
fn break_ring(fe: &mut TestFrontend, q: u16) {
    let dq = &mut fe.queues[usize::from(q)];
    let bad = dq.avail_idx().wrapping_add(dq.size + 5);
    dq.force_avail_idx(&fe.mem, bad);
    dq.notify();
}

#[test]
fn a_broken_tx_ring_is_parked_until_restarted() {
    if !enter_netns("a_broken_tx_ring_is_parked_until_restarted") {
        return;
    }
    let be = TestBackend::start(Config::default());
    let mut fe = be.connect();
    let sock = PacketSocket::open(TAP, false);
    let err = fe.set_vring_err(1).unwrap();
    break_ring(&mut fe, 1);
    assert!(wait_eventfd(&err, T), "VRING_ERR was not signalled");
    assert_eq!(be.stats[1].broken.load(Ordering::Relaxed), 1);
    // (A backend stuck on the ring would never answer: fail instead of hanging.)
    let base = fe.within(T, |fe| fe.fe.get_vring_base(1));
    assert_eq!(base.expect("GET_VRING_BASE"), 0);
    fe.add_queue(1).unwrap();
    fe.start_queue(1).unwrap();
    still_works(&mut fe, &sock, 0xb001);
    assert_eq!(be.stats[1].broken.load(Ordering::Relaxed), 1);
}

#[test]
fn a_broken_control_ring_is_parked_and_the_data_path_keeps_working() {
    if !enter_netns("a_broken_control_ring_is_parked_and_the_data_path_keeps_working") {
        return;
    }
    let be = TestBackend::start(Config::default());
    let mut fe = be.connect();
    let sock = PacketSocket::open(TAP, false);
    let err = fe.set_vring_err(2).unwrap();
    break_ring(&mut fe, 2);
    assert!(wait_eventfd(&err, T), "VRING_ERR was not signalled");
    assert_eq!(be.stats[2].broken.load(Ordering::Relaxed), 1);
    still_works(&mut fe, &sock, 0xb002);
    let base = fe.within(T, |fe| fe.fe.get_vring_base(2));
    assert_eq!(base.expect("GET_VRING_BASE"), 0);
    fe.add_queue(2).unwrap();
    fe.start_queue(2).unwrap();
    // Commands are answered again (an unknown class is refused with an ack).
    let h = fe.alloc(2);
    fe.write(h, &[77, 1]);
    let ack = fe.alloc(1);
    fe.submit(2, &[Buf::ro(h, 2), Buf::wo(ack, 1)]);
    assert_eq!(fe.wait(2, 1).expect("answered")[0].len, 1);
    assert_eq!(fe.read(ack, 1)[0], 1);
}
