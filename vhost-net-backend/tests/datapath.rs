//! Data path through a real tap (in a private network namespace): TX reaches the tap,
//! frames from the tap land in RX buffers, mergeable buffers, offloads, dirty logging,
//! backpressure and giving back cached buffers when a ring stops.

mod common;

use std::time::Duration;

use common::*;
use vhost::VhostBackend;
use vhost_net_backend::spec::{features, gso, hdr_flags, NetHdr, HDR_LEN};
use vhost_tests::frontend::Buf;

const T: Duration = Duration::from_secs(5);

#[test]
fn tx_frame_reaches_the_tap() {
    if !enter_netns("tx_frame_reaches_the_tap") {
        return;
    }
    let be = TestBackend::start(Config::default());
    let mut fe = be.connect();
    let sock = PacketSocket::open(TAP, false);
    let frame = test_frame(HOST_MAC, GUEST_MAC, 0x1111, 300);
    send_tx(&mut fe, 0, NetHdr::default(), &frame);
    let used = fe.wait(1, 1).expect("tx completion");
    assert_eq!(used[0].len, 0);
    let (_, got) = sock
        .recv_matching(T, |f| has_tag(f, 0x1111))
        .expect("frame on the tap");
    assert_eq!(got, frame);
    assert_eq!(be.packets(1), 1);

    // A burst larger than one io_uring batch, all in order.
    for i in 0..150u32 {
        send_tx(
            &mut fe,
            0,
            NetHdr::default(),
            &test_frame(HOST_MAC, GUEST_MAC, 0x2000 + i, 64),
        );
        if i % 50 == 49 {
            fe.wait(1, 50).expect("burst completions");
        }
    }
    for i in 0..150u32 {
        sock.recv_matching(T, |f| has_tag(f, 0x2000 + i))
            .unwrap_or_else(|| panic!("burst frame {i}"));
    }
    assert_eq!(be.packets(1), 151);
}

#[test]
fn tap_frame_lands_in_rx_buffer_and_is_dirty_logged() {
    if !enter_netns("tap_frame_lands_in_rx_buffer_and_is_dirty_logged") {
        return;
    }
    let be = TestBackend::start(Config::default());
    let mut fe = be.connect();
    let log = fe.enable_dirty_log().expect("dirty log");
    let sock = PacketSocket::open(TAP, false);
    // Enough buffers for a 64 KiB GSO frame (the driver acked TSO).
    let bufs = post_rx(&mut fe, 0, 40, 2048);
    let frame = test_frame(GUEST_MAC, HOST_MAC, 0x3333, 200);
    sock.send(None, &frame).expect("send");
    let mut pending = Vec::new();
    let (used, hdr, data) = recv_rx(&mut fe, 0, &bufs, &mut pending);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].len as usize, HDR_LEN + frame.len());
    assert_eq!(hdr.num_buffers, 1);
    assert_eq!(hdr.gso_type, gso::NONE);
    assert_eq!(data, frame);
    let gpa = bufs
        .iter()
        .find(|(h, _)| u32::from(*h) == used[0].id)
        .map(|(_, a)| *a)
        .expect("buffer");
    assert!(log.is_dirty(gpa), "RX data page not in the dirty log");
    assert!(
        log.is_dirty(fe.queues[0].used),
        "used ring not in the dirty log"
    );
    assert_eq!(be.packets(0), 1);

    // Several frames in a row.
    for i in 0..20u32 {
        sock.send(
            None,
            &test_frame(GUEST_MAC, HOST_MAC, 0x4000 + i, 100 + i as usize),
        )
        .expect("send");
    }
    for i in 0..20u32 {
        let (_, _, data) = recv_rx(&mut fe, 0, &bufs, &mut pending);
        assert!(
            has_tag(&data, 0x4000 + i),
            "frame {i} out of order or missing"
        );
        assert_eq!(data.len(), 100 + i as usize + 14);
    }
}

#[test]
fn mergeable_buffers_across_descriptors() {
    if !enter_netns("mergeable_buffers_across_descriptors") {
        return;
    }
    let be = TestBackend::start(Config::default());
    let mut fe = be.connect();
    assert!(acked(&fe, features::MRG_RXBUF));
    let sock = PacketSocket::open(TAP, false);
    let bufs = post_rx(&mut fe, 0, 40, 2048);
    // 8000 bytes (the tap's MTU is 9000): header + frame need 4 buffers of 2048.
    let frame = test_frame(GUEST_MAC, HOST_MAC, 0x5555, 8000 - 14);
    sock.send(None, &frame).expect("send");
    let mut pending = Vec::new();
    let (used, hdr, data) = recv_rx(&mut fe, 0, &bufs, &mut pending);
    assert_eq!(hdr.num_buffers, 4);
    assert_eq!(used.len(), 4);
    assert_eq!(
        used.iter().map(|u| u.len).collect::<Vec<_>>(),
        vec![2048, 2048, 2048, (HDR_LEN + 8000 - 3 * 2048) as u32]
    );
    assert_eq!(data, frame);
    assert_eq!(
        be.shared.stats.queues[0]
            .merged
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn without_mrg_rxbuf_one_buffer_per_frame_and_oversized_frames_are_dropped() {
    if !enter_netns("without_mrg_rxbuf") {
        return;
    }
    let be = TestBackend::start(Config {
        mrg_rxbuf: false,
        ..Config::default()
    });
    let mut fe = be.connect();
    assert!(!acked(&fe, features::MRG_RXBUF));
    let sock = PacketSocket::open(TAP, false);
    let bufs = post_rx(&mut fe, 0, 4, 2048);
    sock.send(None, &test_frame(GUEST_MAC, HOST_MAC, 0x6000, 5000))
        .expect("send");
    let frame = test_frame(GUEST_MAC, HOST_MAC, 0x6001, 500);
    sock.send(None, &frame).expect("send");
    let mut pending = Vec::new();
    let (used, hdr, data) = recv_rx(&mut fe, 0, &bufs, &mut pending);
    assert_eq!(used.len(), 1);
    assert_eq!(hdr.num_buffers, 1);
    assert_eq!(
        data, frame,
        "the oversized frame must be dropped, not delivered"
    );
    assert_eq!(
        be.drops(0, vhost_net_backend::stats::DropReason::RxTruncated),
        1
    );
}

/// An IPv4/TCP frame of `payload` bytes (checksums left for offload).
fn tcp_frame(payload: usize) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 20 + payload) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]);
    f.extend_from_slice(&[169, 254, 9, 1, 169, 254, 9, 2]);
    // IPv4 header checksum.
    let mut sum = 0u32;
    for c in f[14..34].chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let ck = !(sum as u16);
    f[24..26].copy_from_slice(&ck.to_be_bytes());
    f.extend_from_slice(&5001u16.to_be_bytes());
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&1u32.to_be_bytes());
    f.extend_from_slice(&0u32.to_be_bytes());
    f.extend_from_slice(&[0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    for i in 0..payload {
        f.push(i as u8);
    }
    f
}

#[test]
fn offload_bits_pass_through_both_ways() {
    if !enter_netns("offload_bits_pass_through_both_ways") {
        return;
    }
    let be = TestBackend::start(Config::default());
    let mut fe = be.connect();
    assert!(acked(
        &fe,
        GSO_FEATURES | features::HOST_TSO4 | features::CSUM
    ));
    let sock = PacketSocket::open(TAP, true);

    // Guest → host: a 4000-byte TSO frame with partial checksum.
    let mut frame = tcp_frame(4000);
    frame[0..6].copy_from_slice(&HOST_MAC);
    frame[6..12].copy_from_slice(&GUEST_MAC);
    let hdr = NetHdr {
        flags: hdr_flags::NEEDS_CSUM,
        gso_type: gso::TCPV4,
        hdr_len: 54,
        gso_size: 1400,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    send_tx(&mut fe, 0, hdr, &frame);
    fe.wait(1, 1).expect("tx completion");
    let (h, got) = sock
        .recv_matching(T, |f| f.len() > 1000 && f[12..14] == [0x08, 0x00])
        .expect("TSO frame on the tap");
    let h = h.expect("vnet header");
    assert_eq!(
        got.len(),
        frame.len(),
        "the frame reached the host unsegmented"
    );
    assert_eq!(h.gso_type, gso::TCPV4);
    assert_eq!(h.gso_size, 1400);
    assert_eq!(h.flags & hdr_flags::NEEDS_CSUM, hdr_flags::NEEDS_CSUM);
    assert_eq!(be.packets(1), 1);

    // Host → guest: a 6000-byte TSO frame stays one frame with its GSO header.
    let bufs = post_rx(&mut fe, 0, 40, 2048);
    let frame = tcp_frame(6000);
    let hdr = NetHdr {
        flags: hdr_flags::NEEDS_CSUM,
        gso_type: gso::TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    sock.send(Some(hdr), &frame).expect("send GSO");
    let mut pending = Vec::new();
    let (used, h, data) = recv_rx(&mut fe, 0, &bufs, &mut pending);
    assert_eq!(data, frame);
    assert_eq!(h.gso_type, gso::TCPV4);
    assert_eq!(h.gso_size, 1448);
    assert_eq!(h.flags & hdr_flags::NEEDS_CSUM, hdr_flags::NEEDS_CSUM);
    assert_eq!(usize::from(h.num_buffers), used.len());
    assert!(used.len() >= 3);
}

#[test]
fn rx_waits_for_buffers_and_resumes_on_kick_without_loss() {
    if !enter_netns("rx_waits_for_buffers") {
        return;
    }
    let be = TestBackend::start(Config::default());
    let mut fe = be.connect();
    let sock = PacketSocket::open(TAP, false);
    // No buffers yet: frames wait in the tap.
    for i in 0..5u32 {
        sock.send(None, &test_frame(GUEST_MAC, HOST_MAC, 0x7000 + i, 100))
            .expect("send");
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(fe.queues[0].used_idx(&fe.mem), 0);
    let bufs = post_rx(&mut fe, 0, 40, 2048);
    let mut pending = Vec::new();
    for i in 0..5u32 {
        let (_, _, data) = recv_rx(&mut fe, 0, &bufs, &mut pending);
        assert!(has_tag(&data, 0x7000 + i), "frame {i}");
    }
}

#[test]
fn stopping_rx_gives_cached_buffers_back() {
    if !enter_netns("stopping_rx_gives_cached_buffers_back") {
        return;
    }
    let be = TestBackend::start(Config::default());
    let mut fe = be.connect();
    let sock = PacketSocket::open(TAP, false);
    let bufs = post_rx(&mut fe, 0, 40, 2048);
    sock.send(None, &test_frame(GUEST_MAC, HOST_MAC, 0x8000, 100))
        .expect("send");
    let mut pending = Vec::new();
    recv_rx(&mut fe, 0, &bufs, &mut pending);
    // One buffer used; the backend may hold the other 39 popped: it must give them back.
    let base = fe.fe.get_vring_base(0).expect("GET_VRING_BASE");
    assert_eq!(base, 1, "cached receive buffers were not given back");
}

#[test]
fn multiqueue_pairs_and_control_queue() {
    if !enter_netns("multiqueue_pairs_and_control_queue") {
        return;
    }
    let be = TestBackend::start(Config {
        pairs: 2,
        ..Config::default()
    });
    let mut fe = be.connect();
    assert!(acked(&fe, features::MQ | features::CTRL_VQ));
    let cfg = fe.config(0, 12).expect("config");
    assert_eq!(&cfg[0..6], &GUEST_MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 2, "max pairs");
    let ctrl = |fe: &mut common_ctrl::Fe, class: u8, cmd: u8, data: &[u8]| {
        common_ctrl::command(fe, 4, class, cmd, data)
    };
    assert_eq!(ctrl(&mut fe, 4, 0, &2u16.to_le_bytes()), 0, "MQ 2 pairs");
    assert_eq!(
        ctrl(&mut fe, 4, 0, &3u16.to_le_bytes()),
        1,
        "MQ 3 pairs refused"
    );
    assert_eq!(
        ctrl(&mut fe, 4, 0, &0u16.to_le_bytes()),
        1,
        "MQ 0 pairs refused"
    );
    assert_eq!(ctrl(&mut fe, 0, 0, &[1]), 0, "promiscuous on");
    assert_eq!(ctrl(&mut fe, 0, 1, &[1]), 0, "allmulti on");
    assert_eq!(ctrl(&mut fe, 0, 0, &[1, 2]), 1, "bad length");
    let mut tables = Vec::new();
    tables.extend_from_slice(&1u32.to_le_bytes());
    tables.extend_from_slice(&GUEST_MAC);
    tables.extend_from_slice(&1u32.to_le_bytes());
    tables.extend_from_slice(&[0x01, 0, 0x5e, 0, 0, 1]);
    assert_eq!(ctrl(&mut fe, 1, 0, &tables), 0, "MAC table");
    assert_eq!(ctrl(&mut fe, 1, 0, &tables[..10]), 1, "short MAC table");
    assert_eq!(ctrl(&mut fe, 1, 1, &[2, 0, 0, 0, 0, 9]), 0, "MAC address");
    assert_eq!(&fe.config(0, 6).expect("config")[..], &[2, 0, 0, 0, 0, 9]);
    assert_eq!(ctrl(&mut fe, 9, 0, &[]), 1, "unknown class");
    assert_eq!(ctrl(&mut fe, 3, 0, &[]), 0, "announce acknowledged");
    assert_eq!(ctrl(&mut fe, 3, 0, &[1]), 1, "announce with a payload");
    {
        let st = be.shared.ctrl.lock().expect("ctrl state");
        assert!(st.promisc && st.allmulti);
        assert_eq!(st.multicast.len(), 1);
    }

    // Both pairs move frames.
    let sock = PacketSocket::open(TAP, false);
    for pair in 0..2u16 {
        let tag = 0x9000 + u32::from(pair);
        let frame = test_frame(HOST_MAC, GUEST_MAC, tag, 100);
        send_tx(&mut fe, pair, NetHdr::default(), &frame);
        fe.wait(2 * pair + 1, 1).expect("tx completion");
        sock.recv_matching(T, |f| has_tag(f, tag))
            .unwrap_or_else(|| panic!("frame from pair {pair}"));
    }
    // Receive: whichever queue the kernel picks, every frame arrives once.
    let b0 = post_rx(&mut fe, 0, 40, 2048);
    let b1 = post_rx(&mut fe, 1, 40, 2048);
    for i in 0..10u32 {
        // Different source MACs spread flows over the queues.
        let mut src = HOST_MAC;
        src[5] = 0x10 + i as u8;
        sock.send(None, &test_frame(GUEST_MAC, src, 0xa000 + i, 100))
            .expect("send");
    }
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + T;
    while seen.len() < 10 && std::time::Instant::now() < deadline {
        for (pair, bufs) in [(0u16, &b0), (1u16, &b1)] {
            for u in fe.queues[usize::from(2 * pair)].take_used(&fe.mem) {
                let gpa = bufs
                    .iter()
                    .find(|(h, _)| u32::from(*h) == u.id)
                    .map(|(_, a)| *a)
                    .expect("buffer");
                let data = fe.read(gpa + HDR_LEN as u64, u.len as usize - HDR_LEN);
                if data.len() >= 18 && data[12..14] == common::ETHERTYPE.to_be_bytes() {
                    seen.push(u32::from_le_bytes([data[14], data[15], data[16], data[17]]));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    seen.sort();
    assert_eq!(seen, (0xa000..0xa00a).collect::<Vec<_>>());
}

mod common_ctrl {
    use vhost_tests::frontend::{Buf, TestFrontend};
    pub type Fe = TestFrontend;

    /// Sends one control command on queue `q`; returns the ack byte.
    pub fn command(fe: &mut Fe, q: u16, class: u8, cmd: u8, data: &[u8]) -> u8 {
        let h = fe.alloc(2);
        fe.write(h, &[class, cmd]);
        let ack = fe.alloc(1);
        fe.write(ack, &[0xee]);
        let mut bufs = vec![Buf::ro(h, 2)];
        if !data.is_empty() {
            let d = fe.alloc(data.len() as u64);
            fe.write(d, data);
            bufs.push(Buf::ro(d, data.len() as u32));
        }
        bufs.push(Buf::wo(ack, 1));
        fe.submit(q, &bufs);
        let used = fe.wait(q, 1).expect("control completion");
        assert_eq!(used[0].len, 1);
        fe.read(ack, 1)[0]
    }
}

#[test]
fn frame_larger_than_posted_buffers_waits_for_more_without_loss() {
    if !enter_netns("frame_larger_than_posted_buffers_waits") {
        return;
    }
    let be = TestBackend::start(Config::default());
    let mut fe = be.connect();
    let sock = PacketSocket::open(TAP, false);
    let mut bufs = post_rx(&mut fe, 0, 2, 2048);
    let frame = test_frame(GUEST_MAC, HOST_MAC, 0xb000, 5000);
    sock.send(None, &frame).expect("send");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(fe.queues[0].used_idx(&fe.mem), 0, "nothing published yet");
    bufs.extend(post_rx(&mut fe, 0, 3, 2048));
    let mut pending = Vec::new();
    let (used, hdr, data) = recv_rx(&mut fe, 0, &bufs, &mut pending);
    assert_eq!(hdr.num_buffers, 3);
    assert_eq!(used.len(), 3);
    assert_eq!(data, frame);
}

#[test]
fn stopping_rx_after_malformed_buffers_gives_each_buffer_back_once() {
    if !enter_netns("stopping_rx_after_malformed_buffers_gives_each_buffer_back_once") {
        return;
    }
    let be = TestBackend::start(Config::default());
    let mut fe = be.connect();
    let sock = PacketSocket::open(TAP, false);
    // Good A, malformed M (outside guest memory: the layer returns it while popping), too
    // small S (the net worker returns it), good B and C; one kick and no frame, so the
    // worker takes them all and keeps the good ones for later.
    let a = fe.alloc(2048);
    let b = fe.alloc(2048);
    let c = fe.alloc(2048);
    let small = fe.alloc(4);
    let dq = &mut fe.queues[0];
    let ha = dq.add_chain(&fe.mem, &[Buf::wo(a, 2048)]);
    let hm = dq.add_chain(&fe.mem, &[Buf::wo(1 << 40, 2048)]);
    let hs = dq.add_chain(&fe.mem, &[Buf::wo(small, 4)]);
    let hb = dq.add_chain(&fe.mem, &[Buf::wo(b, 2048)]);
    let hc = dq.add_chain(&fe.mem, &[Buf::wo(c, 2048)]);
    dq.publish_many(&fe.mem, &[ha, hm, hs, hb, hc]);
    dq.notify();
    let mut used = fe.wait(0, 1).expect("the malformed chain comes back");
    std::thread::sleep(Duration::from_millis(200));
    used.extend(fe.queues[0].take_used(&fe.mem));

    // Stop the ring (the worker gives back what it holds) and start it again from there.
    let base = fe.fe.get_vring_base(0).expect("GET_VRING_BASE");
    fe.start_queue_at(0, base as u16).expect("restart");
    let bufs = [(ha, a), (hb, b), (hc, c)];
    for i in 0..3u32 {
        sock.send(None, &test_frame(GUEST_MAC, HOST_MAC, 0xb100 + i, 100))
            .expect("send");
    }
    let all = [ha, hm, hs, hb, hc].map(u32::from);
    let deadline = std::time::Instant::now() + T;
    while !all.iter().all(|h| used.iter().any(|u| u.id == *h))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
        used.extend(fe.queues[0].take_used(&fe.mem));
    }
    // Nothing more may come back later (a second completion of the same buffer).
    std::thread::sleep(Duration::from_millis(200));
    used.extend(fe.queues[0].take_used(&fe.mem));
    for h in all {
        let n = used.iter().filter(|u| u.id == h).count();
        assert_eq!(
            n, 1,
            "head {h} in the used ring {n} times: {used:?} (base {base})"
        );
    }
    // Frames that landed are intact, in order.
    let mut next = 0xb100u32;
    for u in used.iter().filter(|u| u.len > 0) {
        let (_, gpa) = bufs
            .iter()
            .find(|(h, _)| u32::from(*h) == u.id)
            .expect("a frame in a good buffer");
        let data = fe.read(gpa + HDR_LEN as u64, u.len as usize - HDR_LEN);
        assert!(
            has_tag(&data, next),
            "frame {next:#x} missing or out of order"
        );
        next += 1;
    }
    assert!(
        next >= 0xb102,
        "at least the two buffers given back took frames"
    );
}

/// VIRTIO_F_VERSION_1.
const VERSION_1: u64 = 1 << 32;

/// Checks both directions with the header layout `features` imply: 12 bytes with
/// `num_buffers` (VERSION_1 or MRG_RXBUF), else the legacy 10 bytes; frames larger than
/// one buffer merged (MRG_RXBUF) or dropped.
fn check_header_layout(be: &TestBackend, fe: &mut vhost_tests::frontend::TestFrontend, tag: u32) {
    let feats = fe.features;
    let mrg = feats & features::MRG_RXBUF != 0;
    let hlen = if feats & (VERSION_1 | features::MRG_RXBUF) != 0 {
        12
    } else {
        10
    };
    let sock = PacketSocket::open(TAP, false);
    // TX: the header is `hlen` bytes, the frame follows.
    let frame = test_frame(HOST_MAC, GUEST_MAC, tag, 200);
    let h = fe.alloc(hlen as u64);
    let d = fe.alloc(frame.len() as u64);
    fe.write(d, &frame);
    fe.submit(1, &[Buf::ro(h, hlen), Buf::ro(d, frame.len() as u32)]);
    fe.wait(1, 1).expect("tx completion");
    let (_, got) = sock
        .recv_matching(T, |f| has_tag(f, tag))
        .expect("tx frame on the tap");
    assert_eq!(got, frame, "tx frame with a {hlen}-byte header");

    // RX: a small frame, then one larger than a buffer, then a small one.
    let bufs = post_rx(fe, 0, 8, 2048);
    let before = be.drops(0, vhost_net_backend::stats::DropReason::RxTruncated);
    let small = test_frame(GUEST_MAC, HOST_MAC, tag + 1, 300);
    let big = test_frame(GUEST_MAC, HOST_MAC, tag + 2, 3000);
    let last = test_frame(GUEST_MAC, HOST_MAC, tag + 3, 300);
    for f in [&small, &big, &last] {
        sock.send(None, f).expect("send");
    }
    let gpa_of = |id: u32| {
        bufs.iter()
            .find(|(h, _)| u32::from(*h) == id)
            .map(|(_, a)| *a)
            .expect("one of our buffers")
    };
    let mut used = fe.wait(0, 1).expect("rx");
    let u = used.remove(0);
    assert_eq!(
        u.len as usize,
        hlen as usize + small.len(),
        "{hlen}-byte header"
    );
    assert_eq!(
        fe.read(gpa_of(u.id) + u64::from(hlen), small.len()),
        small,
        "frame after a {hlen}-byte header"
    );
    if hlen == 12 {
        let nb = fe.read(gpa_of(u.id) + 10, 2);
        assert_eq!(u16::from_le_bytes([nb[0], nb[1]]), 1, "num_buffers");
    }
    if used.is_empty() {
        used.extend(fe.wait(0, 1).expect("rx"));
    }
    let u = used.remove(0);
    if mrg {
        let nb = fe.read(gpa_of(u.id) + 10, 2);
        assert_eq!(
            u16::from_le_bytes([nb[0], nb[1]]),
            2,
            "merged over 2 buffers"
        );
        if used.is_empty() {
            used.extend(fe.queues[0].take_used(&fe.mem));
        }
        used.remove(0);
        if used.is_empty() {
            used.extend(fe.wait(0, 1).expect("rx"));
        }
        let u = used.remove(0);
        let data = fe.read(gpa_of(u.id) + u64::from(hlen), last.len());
        assert_eq!(data, last);
    } else {
        // The big frame is dropped, not spread over buffers the driver reads one by one.
        assert_eq!(
            u.len as usize,
            hlen as usize + last.len(),
            "big frame dropped"
        );
        let data = fe.read(gpa_of(u.id) + u64::from(hlen), last.len());
        assert_eq!(data, last);
        assert_eq!(
            be.drops(0, vhost_net_backend::stats::DropReason::RxTruncated),
            before + 1
        );
    }
}

/// Stops every ring, acks `features` with a second SET_FEATURES (no RESET_DEVICE) and
/// starts the rings again from scratch.
fn renegotiate(fe: &mut vhost_tests::frontend::TestFrontend, features: u64) {
    for q in 0..3 {
        fe.fe.get_vring_base(q).expect("GET_VRING_BASE");
    }
    fe.fe.set_features(features).expect("SET_FEATURES");
    fe.features = features;
    for q in 0..3 {
        fe.add_queue(q).expect("add queue");
        fe.start_queue(q).expect("start queue");
    }
}

#[test]
fn renegotiation_on_the_same_connection_follows_the_new_features() {
    if !enter_netns("renegotiation_on_the_same_connection_follows_the_new_features") {
        return;
    }
    let be = TestBackend::start(Config::default());
    let mut fe = be.connect();
    let all = fe.features;
    assert!(acked(&fe, features::MRG_RXBUF | VERSION_1));
    check_header_layout(&be, &mut fe, 0xc000);
    // Legacy layout: no MRG_RXBUF, no VERSION_1 (10-byte header).
    renegotiate(&mut fe, all & !(features::MRG_RXBUF | VERSION_1));
    check_header_layout(&be, &mut fe, 0xc100);
    // VERSION_1 without MRG_RXBUF: 12 bytes, one buffer per frame.
    renegotiate(&mut fe, all & !features::MRG_RXBUF);
    check_header_layout(&be, &mut fe, 0xc200);
    // And back to everything.
    renegotiate(&mut fe, all);
    check_header_layout(&be, &mut fe, 0xc300);
}

#[test]
fn renegotiation_on_a_new_connection_follows_the_new_features() {
    if !enter_netns("renegotiation_on_a_new_connection_follows_the_new_features") {
        return;
    }
    let be = TestBackend::start(Config::default());
    let mut fe = be.connect();
    check_header_layout(&be, &mut fe, 0xd000);
    let all = fe.features;
    drop(fe);
    for (i, want) in [
        all & !(features::MRG_RXBUF | VERSION_1),
        all & !features::MRG_RXBUF,
        all,
    ]
    .into_iter()
    .enumerate()
    {
        let mut fe = vhost_tests::frontend::TestFrontend::connect(
            &be.socket,
            vhost_tests::frontend::FrontendOptions {
                num_queues: 3,
                queue_size: be.cfg.queue_size,
                event_idx: true,
                features: Some(want),
                ..Default::default()
            },
        )
        .expect("connect again");
        assert_eq!(fe.features & !(1 << 30), want & !(1 << 30));
        check_header_layout(&be, &mut fe, 0xd100 + 0x100 * i as u32);
    }
}
