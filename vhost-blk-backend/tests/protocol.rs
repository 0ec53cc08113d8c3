//! vhost-user protocol behaviour that depends on blk itself: the features it offers, the
//! dirty pages its io_uring reads log, its in-flight accounting when GET_VRING_BASE drains
//! (real and frozen disks), and write-zeroes on tmpfs.
//!
//! What the layer does for any device (multiqueue, event_idx, indirect descriptors, the dirty
//! log of vm-memory writes and late regions, the drain itself, reconnects, inflight
//! resubmission, RESET_DEVICE, bad frontend requests) is tested in vhost-user-device/tests
//! on an echo device.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use vhost::vhost_user::VhostUserProtocolFeatures;
use vhost::VhostBackend;
use vhost_blk_backend::spec::{req_type, status};
use vhost_tests::frontend::{Buf, FrontendOptions, TestFrontend};
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

/// blk's reads land in guest memory through io_uring, behind vm-memory's back: the worker
/// marks those pages by hand when they complete (the layer's own test, with vm-memory
/// writes, is vhost-user-device/tests/dirty_log.rs).
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

/// Reads in the kernel when GET_VRING_BASE arrives: blk counts them in flight until
/// io_uring completes them (the layer's drain itself, on a device holding its completions,
/// is tested in vhost-user-device/tests/sessions.rs).
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
    while b.shared.in_flight() < n {
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
        let left = b.shared.in_flight();
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
    assert_eq!(b.shared.in_flight(), 0);
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
