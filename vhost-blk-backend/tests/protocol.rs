//! vhost-user protocol behaviour of the blk backend: multiqueue, event_idx, indirect
//! descriptors, dirty logging, draining on GET_VRING_BASE, reconnects and inflight replay.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use vhost::vhost_user::{VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::VhostBackend;
use vhost_blk_backend::spec::{req_type, status, HEADER_SIZE};
use vhost_tests::frontend::{wait_eventfd, Buf, FrontendOptions, TestFrontend};
use vhost_user_device::inflight::InflightRegion;

fn opts(num_queues: u16) -> FrontendOptions {
    FrontendOptions {
        num_queues,
        ..Default::default()
    }
}

#[test]
fn offers_the_promised_features() {
    let b = TestBackend::start(BackendConfig::default());
    let fe = TestFrontend::connect(b.socket(), opts(1)).unwrap();
    let offered = fe.fe.get_features().unwrap();
    for (bit, name) in [
        (26, "LOG_ALL"),
        (28, "INDIRECT_DESC"),
        (29, "EVENT_IDX"),
        (30, "PROTOCOL_FEATURES"),
        (32, "VERSION_1"),
        (9, "FLUSH"),
        (12, "MQ"),
        (13, "DISCARD"),
        (14, "WRITE_ZEROES"),
        (11, "CONFIG_WCE"),
        (34, "RING_PACKED"),
    ] {
        assert_ne!(offered & (1 << bit), 0, "{name} offered");
    }
    assert_eq!(offered & (1 << 35), 0, "no IN_ORDER");
    for p in [
        VhostUserProtocolFeatures::MQ,
        VhostUserProtocolFeatures::LOG_SHMFD,
        VhostUserProtocolFeatures::REPLY_ACK,
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::RESET_DEVICE,
        VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
    ] {
        assert!(fe.protocol.contains(p), "{p:?} offered");
    }
    assert!(!fe.protocol.contains(VhostUserProtocolFeatures::STATUS));
}

#[test]
fn two_queues_serve_requests_independently() {
    let b = TestBackend::start(BackendConfig {
        num_queues: 2,
        ..Default::default()
    });
    let mut fe = TestFrontend::connect(b.socket(), opts(2)).unwrap();
    assert_eq!(fe.fe.get_queue_num().unwrap(), 2);
    let mut reqs = Vec::new();
    for i in 0..32u64 {
        let q = (i % 2) as u16;
        let r = blk_req(&mut fe, req_type::IN, i * 16, 4096);
        let chain = r.chain(true);
        let dq = &mut fe.queues[usize::from(q)];
        let head = dq.add_chain(&fe.mem, &chain);
        dq.publish(&fe.mem, head);
        reqs.push((q, i, r));
    }
    fe.queues[0].notify();
    fe.queues[1].notify();
    assert_eq!(fe.wait(0, 16).unwrap().len(), 16);
    assert_eq!(fe.wait(1, 16).unwrap().len(), 16);
    for (_, i, r) in &reqs {
        assert_eq!(r.status(&fe), status::OK);
        assert_eq!(fe.read(r.data, 4096), pattern_range(i * 16 * 512, 4096));
    }
    assert!(b.stats[0].completed.load(Ordering::Relaxed) >= 16);
    assert!(b.stats[1].completed.load(Ordering::Relaxed) >= 16);
}

#[test]
fn event_idx_suppresses_and_publishes_indices() {
    let b = TestBackend::start(BackendConfig::default());
    let mut fe = TestFrontend::connect(
        b.socket(),
        FrontendOptions {
            event_idx: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_ne!(fe.features & (1 << 29), 0);
    // Ask for an interrupt only after the 4th completion (used_event = 3).
    fe.queues[0].set_used_event(&fe.mem, 3);
    let reqs: Vec<_> = (0..4u64)
        .map(|i| blk_req(&mut fe, req_type::IN, i * 8, 512))
        .collect();
    for r in &reqs[..2] {
        fe.submit(0, &r.chain(true));
        fe.queues[0]
            .wait_used(&fe.mem, 1, Duration::from_secs(5))
            .unwrap();
    }
    // Two completions so far, below used_event: no interrupt may have been sent.
    let _ = fe.queues[0].call.read();
    assert_eq!(b.stats[0].notifications.load(Ordering::Relaxed), 0);
    // The backend tells the driver which avail index to kick at.
    assert_eq!(fe.queues[0].avail_event(&fe.mem), 2);
    for r in &reqs[2..] {
        fe.submit(0, &r.chain(true));
        fe.queues[0]
            .wait_used(&fe.mem, 1, Duration::from_secs(5))
            .unwrap();
    }
    // The backend counts the interrupt just after publishing the used index the wait
    // above saw: give it a moment to get there.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while b.stats[0].notifications.load(Ordering::Relaxed) == 0
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(b.stats[0].notifications.load(Ordering::Relaxed), 1);
    for (i, r) in reqs.iter().enumerate() {
        assert_eq!(fe.read(r.data, 512), pattern_range(i as u64 * 8 * 512, 512));
    }
}

#[test]
fn without_event_idx_no_interrupt_is_honoured() {
    use vhost_tests::frontend::wait_eventfd;
    let b = TestBackend::start(BackendConfig::default());
    let mut fe = TestFrontend::connect(b.socket(), FrontendOptions::default()).unwrap();
    assert_eq!(fe.features & (1 << 29), 0, "event_idx negotiated");
    let notifications = || b.stats[0].notifications.load(Ordering::Relaxed);
    // VRING_AVAIL_F_NO_INTERRUPT: completions are published, the call eventfd stays quiet.
    fe.queues[0].set_avail_flags(&fe.mem, 1);
    for i in 0..3u64 {
        let r = blk_req(&mut fe, req_type::IN, i * 8, 512);
        fe.submit(0, &r.chain(true));
        // Watch the used index, not the call eventfd (which must stay unsignalled).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while fe.queues[0].used_idx(&fe.mem) != (i + 1) as u16 {
            assert!(
                std::time::Instant::now() < deadline,
                "request {i} not completed"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(fe.queues[0].take_used(&fe.mem).len(), 1);
        assert_eq!(r.status(&fe), status::OK);
    }
    assert!(
        !wait_eventfd(&fe.queues[0].call, Duration::from_millis(100)),
        "the call eventfd was signalled although the driver asked for no interrupts"
    );
    assert_eq!(notifications(), 0, "interrupts counted under NO_INTERRUPT");
    // Flag cleared: interrupts again.
    fe.queues[0].set_avail_flags(&fe.mem, 0);
    let r = blk_req(&mut fe, req_type::IN, 64, 512);
    fe.submit(0, &r.chain(true));
    assert!(
        wait_eventfd(&fe.queues[0].call, Duration::from_secs(5)),
        "no interrupt once NO_INTERRUPT was cleared"
    );
    assert_eq!(r.status(&fe), status::OK);
    assert_eq!(notifications(), 1);
}

#[test]
fn indirect_chains_read_and_write() {
    let b = TestBackend::start(BackendConfig::default());
    let mut fe = TestFrontend::connect(b.socket(), opts(1)).unwrap();
    let w = blk_req(&mut fe, req_type::OUT, 500, 2048);
    fe.write(w.data, &[0x3cu8; 2048]);
    let table = fe.alloc(64);
    let chain = vec![
        Buf::ro(w.hdr, HEADER_SIZE as u32),
        Buf::ro(w.data, 1024),
        Buf::ro(w.data + 1024, 1024),
        Buf::wo(w.status, 1),
    ];
    let dq = &mut fe.queues[0];
    let head = dq.add_indirect(&fe.mem, table, &chain);
    dq.publish(&fe.mem, head);
    dq.notify();
    fe.wait(0, 1).unwrap();
    assert_eq!(w.status(&fe), status::OK);
    assert_eq!(b.read_image(500 * 512, 2048), vec![0x3c; 2048]);
    let r = blk_req(&mut fe, req_type::IN, 500, 2048);
    let table = fe.alloc(48);
    let chain = vec![
        Buf::ro(r.hdr, HEADER_SIZE as u32),
        Buf::wo(r.data, 2048),
        Buf::wo(r.status, 1),
    ];
    let dq = &mut fe.queues[0];
    let head = dq.add_indirect(&fe.mem, table, &chain);
    dq.publish(&fe.mem, head);
    dq.notify();
    fe.wait(0, 1).unwrap();
    assert_eq!(r.status(&fe), status::OK);
    assert_eq!(fe.read(r.data, 2048), vec![0x3c; 2048]);
}

#[test]
fn dirty_log_marks_exactly_the_pages_we_write() {
    let b = TestBackend::start(BackendConfig::default());
    let mut fe = TestFrontend::connect(b.socket(), opts(1)).unwrap();
    let log = fe.enable_dirty_log().unwrap();
    // A read of 3 pages into a buffer spanning pages; header and the write's data are
    // only read by the device and must stay clean.
    let r = blk_req(&mut fe, req_type::IN, 0, 3 * 4096);
    let w = blk_req(&mut fe, req_type::OUT, 64, 4096);
    log.clear();
    fe.submit(0, &r.chain(true));
    fe.wait(0, 1).unwrap();
    fe.submit(0, &w.chain(false));
    fe.wait(0, 1).unwrap();
    let dirty = log.dirty_pages();
    let used_page = fe.queues[0].used / 4096;
    let mut want = vec![
        r.data / 4096,
        r.data / 4096 + 1,
        r.data / 4096 + 2,
        r.status / 4096,
        w.status / 4096,
        used_page,
    ];
    want.sort_unstable();
    want.dedup();
    assert_eq!(dirty, want, "dirty pages");
    assert!(!log.is_dirty(r.hdr) || want.contains(&(r.hdr / 4096)));
    assert!(!want.contains(&(w.data / 4096)));
    // LOG_ALL cleared: nothing is logged any more.
    fe.disable_dirty_log().unwrap();
    log.clear();
    let r2 = blk_req(&mut fe, req_type::IN, 8, 4096);
    fe.submit(0, &r2.chain(true));
    fe.wait(0, 1).unwrap();
    assert!(
        log.dirty_pages().is_empty(),
        "logging continued after LOG_ALL was cleared"
    );
}

#[test]
fn dirty_log_covers_regions_added_after_set_log_base() {
    let b = TestBackend::start(BackendConfig::default());
    let mut fe = TestFrontend::connect(b.socket(), opts(1)).unwrap();
    let log = fe.enable_dirty_log().unwrap();
    // A second region added after SET_LOG_BASE, like a hot-plugged DIMM.
    let hi = 48u64 << 20;
    let region = fe.add_region(hi, 1 << 20).unwrap();
    let r = blk_req(&mut fe, req_type::IN, 16, 0);
    log.clear();
    fe.submit(
        0,
        &[
            Buf::ro(r.hdr, 16),
            Buf::wo(hi + 0x3000, 4096),
            Buf::wo(r.status, 1),
        ],
    );
    fe.wait(0, 1).unwrap();
    assert_eq!(r.status(&fe), status::OK);
    use vm_memory::{Bytes, GuestAddress};
    let mut got = vec![0u8; 4096];
    region
        .read_slice(&mut got, GuestAddress(hi + 0x3000))
        .unwrap();
    assert_eq!(got, pattern_range(16 * 512, 4096));
    assert!(log.is_dirty(hi + 0x3000), "late region's page not logged");
    assert!(!log.is_dirty(hi + 0x2000) && !log.is_dirty(hi + 0x4000));
}

#[test]
fn get_vring_base_waits_for_in_flight_requests() {
    let b = TestBackend::start(BackendConfig {
        size: 64 << 20,
        fill: false,
        ..Default::default()
    });
    // Write real data so reads take real I/O.
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&b.image)
            .unwrap();
        f.write_all_at(&pattern_range(0, 64 << 20), 0).unwrap();
        f.sync_all().unwrap();
    }
    let mut fe = TestFrontend::connect(b.socket(), opts(1)).unwrap();
    let n = 40u16;
    let mut reqs = Vec::new();
    for i in 0..u64::from(n) {
        let r = blk_req(
            &mut fe,
            req_type::IN,
            (i * 256) % ((64 << 20) / 512 - 512),
            128 * 1024,
        );
        let dq = &mut fe.queues[0];
        let head = dq.add_chain(&fe.mem, &r.chain(true));
        dq.publish(&fe.mem, head);
        reqs.push(r);
    }
    fe.queues[0].notify();
    // Let the backend pop them, then stop the ring while the reads are in the kernel.
    std::thread::sleep(Duration::from_millis(2));
    let base = fe.fe.get_vring_base(0).unwrap();
    let used = fe.queues[0].used_idx(&fe.mem);
    assert_eq!(
        u32::from(used),
        base,
        "GET_VRING_BASE answered before every popped request was completed"
    );
    // Whatever was popped is complete and correct.
    for (i, r) in reqs.iter().enumerate().take(used as usize) {
        assert_eq!(r.status(&fe), status::OK, "request {i}");
    }
    assert!(base > 0, "nothing was popped before the stop");
    // Restart from that base: the rest completes too.
    fe.start_queue_at(0, base as u16).unwrap();
    fe.queues[0].notify();
    fe.queues[0]
        .wait_used(&fe.mem, usize::from(n), Duration::from_secs(10))
        .unwrap();
    for (i, r) in reqs.iter().enumerate() {
        assert_eq!(r.status(&fe), status::OK);
        let sector = (i as u64 * 256) % ((64 << 20) / 512 - 512);
        assert_eq!(fe.read(r.data, 4096), pattern_range(sector * 512, 4096));
    }
}

/// Writes stuck in the kernel (a frozen file system) when GET_VRING_BASE arrives: the
/// answer waits for them however long that takes, and none of their completions is lost:
/// each is on the used ring (with the reported base), its status page is in the dirty
/// log, its blocks are in the block-migration bitmap, and the inflight region holds
/// nothing in flight. A drain that gave up instead would answer with them in flight and
/// drop their completions when they arrive.
#[test]
fn get_vring_base_waits_for_writes_stuck_in_a_frozen_file_system() {
    if !is_root() {
        vhost_tests::guest::report_skip(
            "get_vring_base_waits_for_writes_stuck_in_a_frozen_file_system",
            "needs root (mounts and freezes an ext4 file system on a loop device)",
        );
        return;
    }
    let mut fs = FreezableFs::new();
    let image = fs.path().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(8 << 20))
        .expect("image");
    let b = TestBackend::start_on(
        tempfile::tempdir().expect("tempdir"),
        image,
        BackendConfig {
            size: 8 << 20,
            fill: false,
            ..Default::default()
        },
    );
    let mut fe = TestFrontend::connect(
        b.socket(),
        FrontendOptions {
            inflight: true,
            ..Default::default()
        },
    )
    .expect("connect");
    let log = fe.enable_dirty_log().expect("dirty log");
    let n = 4u64;
    let reqs: Vec<_> = (0..n)
        .map(|i| {
            let r = blk_req(&mut fe, req_type::OUT, i * 8, 4096);
            fe.write(r.data, &[i as u8 + 1; 4096]);
            r
        })
        .collect();
    log.clear();
    fs.freeze();
    for r in &reqs {
        let dq = &mut fe.queues[0];
        let head = dq.add_chain(&fe.mem, &r.chain(false));
        dq.publish(&fe.mem, head);
    }
    fe.queues[0].notify();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while b.shared.stats.in_flight.load(Ordering::Relaxed) < n {
        assert!(std::time::Instant::now() < deadline, "writes not in flight");
        std::thread::sleep(Duration::from_millis(5));
    }
    let answered = std::sync::atomic::AtomicBool::new(false);
    let base = std::thread::scope(|s| {
        let frontend = &mut fe.fe;
        let t = s.spawn(|| {
            let base = frontend.get_vring_base(0);
            answered.store(true, Ordering::SeqCst);
            base
        });
        // Longer than any drain deadline a backend could reasonably have for a stuck disk.
        std::thread::sleep(Duration::from_millis(1500));
        let early = answered.load(Ordering::SeqCst);
        let left = b.shared.stats.in_flight.load(Ordering::Relaxed);
        fs.thaw();
        let base = t.join().expect("GET_VRING_BASE thread");
        assert!(
            !early,
            "GET_VRING_BASE answered with {left} write(s) still in the kernel"
        );
        base.expect("GET_VRING_BASE")
    });
    assert_eq!(base, n as u32, "every popped write counted in the base");
    assert_eq!(
        fe.queues[0].used_idx(&fe.mem),
        n as u16,
        "every write on the used ring before the answer"
    );
    assert_eq!(b.shared.stats.in_flight.load(Ordering::Relaxed), 0);
    for (i, r) in reqs.iter().enumerate() {
        assert_eq!(r.status(&fe), status::OK, "write {i}");
        assert!(
            log.is_dirty(r.status),
            "status of write {i} not in the dirty log"
        );
        let offset = i as u64 * 4096;
        assert_eq!(b.read_image(offset, 4096), vec![i as u8 + 1; 4096]);
        let block = offset / b.shared.dirty.granularity();
        assert!(
            b.shared.dirty.is_dirty(block),
            "block of write {i} not marked"
        );
    }
    let (file, info) = fe.inflight.take().expect("inflight region");
    let region = InflightRegion::map(&file, 0, info.mmap_size, 1, info.queue_size)
        .expect("map inflight region");
    let mut q = region.queue(0, info.queue_size).expect("queue area");
    let rec = q.recover(n as u16);
    assert!(
        rec.resubmit.is_empty(),
        "heads still marked in flight: {:?}",
        rec.resubmit
    );
}

#[test]
fn a_new_frontend_can_connect_after_the_first_hangs_up() {
    let b = TestBackend::start(BackendConfig::default());
    {
        let mut fe = TestFrontend::connect(b.socket(), opts(1)).unwrap();
        assert_eq!(write(&mut fe, 10, &[0x11u8; 1024]), status::OK);
        // Dropped without GET_VRING_BASE, like a killed VMM.
    }
    for round in 0..2u8 {
        let mut fe = TestFrontend::connect(b.socket(), opts(1)).unwrap();
        let (data, st) = read(&mut fe, 10, 1024);
        assert_eq!(st, status::OK);
        assert_eq!(data, vec![0x11 + round; 1024]);
        assert_eq!(write(&mut fe, 10, &[0x12 + round; 1024]), status::OK);
    }
}

/// A frontend reconnecting to `b` as if the backend of an earlier session had died: that
/// session (one write completed) left an inflight region, returned here for
/// [`mark_in_flight`]; the new session has done its handshake and laid out queue 0.
fn reconnect_after_a_dead_backend(
    b: &TestBackend,
    o: &FrontendOptions,
) -> (
    TestFrontend,
    std::fs::File,
    vhost::vhost_user::message::VhostUserInflight,
) {
    let (file, info) = {
        let mut fe = TestFrontend::connect(b.socket(), o.clone()).unwrap();
        assert_eq!(write(&mut fe, 0, &[1u8; 512]), status::OK);
        fe.fe.get_vring_base(0).unwrap();
        fe.inflight.take().unwrap()
    };
    let mut fe = TestFrontend::handshake(b.socket(), o).unwrap();
    fe.add_queue(0).unwrap();
    (fe, file, info)
}

/// Marks `(head, counter)` in flight on queue 0 of the region, as the dead backend would
/// have left them.
fn mark_in_flight(
    file: &std::fs::File,
    info: &vhost::vhost_user::message::VhostUserInflight,
    heads: &[(u16, u64)],
) {
    let region = InflightRegion::map(file, 0, info.mmap_size, 1, 128).unwrap();
    let mut q = region.queue(0, 128).unwrap();
    q.recover(0);
    for &(head, counter) in heads {
        q.set_entry(head, counter, true);
    }
}

#[test]
fn inflight_requests_of_a_dead_backend_are_resubmitted() {
    let b = TestBackend::start(BackendConfig::default());
    let o = FrontendOptions {
        inflight: true,
        ..Default::default()
    };
    // Session 1 created the region and completed one request; then its backend died with
    // two requests popped but not completed: publish them on the avail ring and mark them
    // in flight in the shared region, as the dead process would have.
    let (mut fe, file, info) = reconnect_after_a_dead_backend(&b, &o);
    let w = blk_req(&mut fe, req_type::OUT, 20, 1024);
    fe.write(w.data, &[0x77u8; 1024]);
    let r = blk_req(&mut fe, req_type::IN, 30, 512);
    let dq = &mut fe.queues[0];
    let hw = dq.add_chain(&fe.mem, &w.chain(false));
    dq.publish(&fe.mem, hw);
    let hr = dq.add_chain(&fe.mem, &r.chain(true));
    dq.publish(&fe.mem, hr);
    mark_in_flight(&file, &info, &[(hw, 7), (hr, 8)]);
    fe.set_inflight(file, info).unwrap();
    // The VMM restores the avail index from the used index (0): the backend must not pop
    // the two chains again as new, but resubmit them once from the region.
    fe.start_queue_at(0, 0).unwrap();
    let used = fe.wait(0, 2).unwrap();
    assert_eq!(used.len(), 2);
    let mut ids: Vec<u32> = used.iter().map(|u| u.id).collect();
    ids.sort_unstable();
    let mut want = vec![u32::from(hw), u32::from(hr)];
    want.sort_unstable();
    assert_eq!(ids, want, "both in-flight chains completed, each once");
    assert_eq!(w.status(&fe), status::OK);
    assert_eq!(r.status(&fe), status::OK);
    assert_eq!(b.read_image(20 * 512, 1024), vec![0x77; 1024]);
    assert_eq!(fe.read(r.data, 512), pattern_range(30 * 512, 512));
    assert_eq!(b.stats[0].resubmitted.load(Ordering::Relaxed), 2);
    // Nothing extra completes.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(fe.queues[0].used_idx(&fe.mem), 2);
    assert_eq!(fe.fe.get_vring_base(0).unwrap(), 2);
}

/// QEMU (vhost-user-blk-pci) restarting the device on a new backend sends SET_VRING_KICK and
/// SET_VRING_ENABLE first and SET_VRING_CALL only afterwards, when it unmasks the guest
/// notifiers. Requests resubmitted from the inflight region may complete in between, with
/// no call fd to signal: the new call fd must then be signalled, or the guest waits for
/// those completions for ever (found by `guest_crash`: a guest hung after a backend kill).
#[test]
fn completions_before_the_call_fd_arrives_are_signalled_on_it() {
    let b = TestBackend::start(BackendConfig::default());
    let o = FrontendOptions {
        inflight: true,
        ..Default::default()
    };
    let (mut fe, file, info) = reconnect_after_a_dead_backend(&b, &o);
    let w = blk_req(&mut fe, req_type::OUT, 20, 1024);
    fe.write(w.data, &[0x55u8; 1024]);
    let dq = &mut fe.queues[0];
    let hw = dq.add_chain(&fe.mem, &w.chain(false));
    dq.publish(&fe.mem, hw);
    mark_in_flight(&file, &info, &[(hw, 3)]);
    fe.set_inflight(file, info).unwrap();
    fe.start_queue_without_call(0, 0).unwrap();
    // The resubmitted request completes while the ring has no call fd.
    let deadline = Instant::now() + Duration::from_secs(5);
    while fe.queues[0].used_idx(&fe.mem) != 1 {
        assert!(
            Instant::now() < deadline,
            "resubmitted request never completed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(w.status(&fe), status::OK);
    fe.set_call(0).unwrap();
    assert!(
        wait_eventfd(&fe.queues[0].call, Duration::from_secs(2)),
        "the call fd that arrived after the completion was never signalled"
    );
}

/// A backend killed after publishing completions and before signalling them (or before it
/// had a call fd) leaves its successor nothing to complete and nothing in flight: the
/// successor must still interrupt the guest once, whichever comes first, the call fd or
/// the ring start; or the guest waits for the completions already in its used ring for
/// ever (found by `guest_crash`'s 100-kill soak: a hang after a kill that came right after
/// a restart with resubmissions). A fresh ring (used index 0) gets no such interrupt (see
/// `without_event_idx_no_interrupt_is_honoured`).
#[test]
fn a_restarted_ring_with_completions_interrupts_the_guest_once() {
    let b = TestBackend::start(BackendConfig::default());
    let o = FrontendOptions {
        inflight: true,
        ..Default::default()
    };
    for call_first in [true, false] {
        let mut fe = TestFrontend::handshake(b.socket(), &o).unwrap();
        fe.setup_inflight().unwrap();
        fe.add_queue(0).unwrap();
        // Guest memory as the dead backend left it: 3 requests made available, all 3
        // published as used (the driver never heard of them); nothing in flight.
        let (avail, used) = (fe.queues[0].avail, fe.queues[0].used);
        fe.write(avail + 2, &3u16.to_le_bytes());
        fe.write(used + 2, &3u16.to_le_bytes());
        if call_first {
            // NUM/ADDR/BASE/CALL/KICK/ENABLE: the signal comes at ring start.
            fe.start_queue_at(0, 3).unwrap();
        } else {
            // QEMU's order for vhost-user-blk-pci: the call fd comes last.
            fe.start_queue_without_call(0, 3).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            fe.set_call(0).unwrap();
        }
        assert!(
            wait_eventfd(&fe.queues[0].call, Duration::from_secs(2)),
            "call_first={call_first}: completions of the dead backend never signalled"
        );
        assert!(
            !wait_eventfd(&fe.queues[0].call, Duration::from_millis(100)),
            "call_first={call_first}: more than one interrupt"
        );
        assert_eq!(fe.queues[0].used_idx(&fe.mem), 3, "nothing re-executed");
        fe.fe.get_vring_base(0).unwrap();
    }
}

#[test]
fn reset_device_stops_rings_and_allows_a_fresh_start() {
    let b = TestBackend::start(BackendConfig::default());
    let mut fe = TestFrontend::connect(b.socket(), opts(1)).unwrap();
    assert_eq!(write(&mut fe, 4, &[9u8; 512]), status::OK);
    fe.fe.reset_device().unwrap();
    let features = fe.features;
    fe.fe.set_features(features).unwrap();
    fe.add_queue(0).unwrap();
    fe.start_queue(0).unwrap();
    let (data, st) = read(&mut fe, 4, 512);
    assert_eq!(st, status::OK);
    assert_eq!(data, vec![9u8; 512]);
}

#[test]
fn write_zeroes_on_tmpfs_falls_back_when_zero_range_is_unsupported() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, pattern_range(0, 1 << 20)).unwrap();
    let b = TestBackend::start_on(dir, image, BackendConfig::default());
    let mut fe = TestFrontend::connect(b.socket(), opts(1)).unwrap();
    for round in 0..2 {
        let r = blk_req(&mut fe, req_type::WRITE_ZEROES, 0, 0);
        let seg = fe.alloc(16);
        let mut raw = Vec::new();
        raw.extend_from_slice(&(100u64 + round * 50).to_le_bytes());
        raw.extend_from_slice(&16u32.to_le_bytes());
        raw.extend_from_slice(&0u32.to_le_bytes());
        fe.write(seg, &raw);
        fe.submit(
            0,
            &[Buf::ro(r.hdr, 16), Buf::ro(seg, 16), Buf::wo(r.status, 1)],
        );
        fe.wait(0, 1).unwrap();
        assert_eq!(r.status(&fe), status::OK, "round {round}");
        let at = (100 + round * 50) * 512;
        assert_eq!(b.read_image(at, 16 * 512), vec![0u8; 16 * 512]);
        assert_eq!(
            b.read_image(at + 16 * 512, 512),
            pattern_range(at + 16 * 512, 512)
        );
    }
}

#[test]
fn bad_frontend_requests_are_refused_and_the_connection_survives() {
    use vhost::VringConfigData;
    let b = TestBackend::start(BackendConfig::default());
    let mut fe = TestFrontend::connect(b.socket(), opts(1)).unwrap();
    // Ring sizes that are not a power of two or exceed the maximum.
    assert!(fe.fe.set_vring_num(0, 100).is_err());
    assert!(fe.fe.set_vring_num(0, 4096).is_err());
    assert!(fe.fe.set_vring_num(0, 0).is_err());
    // Ring addresses outside every memory region.
    let bogus = VringConfigData {
        queue_max_size: 128,
        queue_size: 128,
        flags: 0,
        desc_table_addr: 0x10,
        used_ring_addr: 0x20,
        avail_ring_addr: 0x30,
        log_addr: None,
    };
    assert!(fe.fe.set_vring_addr(0, &bogus).is_err());
    // (A config read past the config space gets QEMU's zero-size error reply; the vhost
    // crate's frontend cannot read such a reply, so it is not exercised here.)
    // Acking a feature that was never offered.
    assert!(fe.fe.set_features(fe.features | (1 << 35)).is_err());
    // The connection still works, with the original ring untouched.
    let (data, st) = read(&mut fe, 5, 512);
    assert_eq!((st, data), (status::OK, pattern_range(5 * 512, 512)));
}

/// QEMU's vhost-user-net sends SET_VRING_ENABLE before SET_FEATURES, with REPLY_ACK
/// negotiated, and waits for the ack: it must get one.
#[test]
fn set_vring_enable_before_set_features_is_acknowledged() {
    use std::io::{Read, Write};
    let b = TestBackend::start(BackendConfig::default());
    let mut s = std::os::unix::net::UnixStream::connect(b.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let msg = |req: u32, flags: u32, payload: &[u8]| {
        let mut m = Vec::new();
        m.extend_from_slice(&req.to_ne_bytes());
        m.extend_from_slice(&(1 | flags).to_ne_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_ne_bytes());
        m.extend_from_slice(payload);
        m
    };
    let reply = |s: &mut std::os::unix::net::UnixStream| {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).expect("reply");
        (
            u32::from_ne_bytes(h[0..4].try_into().unwrap()),
            u64::from_ne_bytes(h[12..20].try_into().unwrap()),
        )
    };
    s.write_all(&msg(1, 0, &[])).unwrap(); // GET_FEATURES
    let (code, features) = reply(&mut s);
    assert_eq!(code, 1);
    assert_ne!(features & (1 << 30), 0);
    s.write_all(&msg(15, 0, &[])).unwrap(); // GET_PROTOCOL_FEATURES
    let (_, proto) = reply(&mut s);
    assert_ne!(proto & (1 << 3), 0, "REPLY_ACK");
    s.write_all(&msg(16, 0, &(1u64 << 3).to_ne_bytes()))
        .unwrap(); // SET_PROTOCOL_FEATURES
    s.write_all(&msg(3, 0x8, &[])).unwrap(); // SET_OWNER, need reply
    assert_eq!(reply(&mut s), (3, 0));
    // SET_VRING_ENABLE {index 0, num 0}, need reply: answered, not left hanging.
    let mut state = Vec::new();
    state.extend_from_slice(&0u32.to_ne_bytes());
    state.extend_from_slice(&0u32.to_ne_bytes());
    s.write_all(&msg(18, 0x8, &state)).unwrap();
    assert_eq!(reply(&mut s), (18, 0));
    // The connection is still in step.
    s.write_all(&msg(1, 0, &[])).unwrap();
    assert_eq!(reply(&mut s), (1, features));
}
