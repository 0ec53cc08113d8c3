//! Every virtio-blk request type, driven through the vhost-user socket, data checked.

mod common;

use common::*;
use vhost_blk_backend::spec::{req_type, status, ID_BYTES, WRITE_ZEROES_FLAG_UNMAP};
use vhost_tests::frontend::{Buf, FrontendOptions, TestFrontend};
use vhost_user_device::engine::EngineKind;

fn connect(b: &TestBackend) -> TestFrontend {
    TestFrontend::connect(b.socket(), FrontendOptions::default()).expect("connect")
}

/// The image on disk (io_uring) or in tmpfs (inline preadv2/pwritev2).
fn backend_in(in_memory: bool) -> TestBackend {
    let b = TestBackend::start(BackendConfig {
        in_memory,
        ..Default::default()
    });
    assert_eq!(
        b.shared.disk.memory_backed(),
        in_memory,
        "{} is {}on a memory file system",
        b.image.display(),
        if in_memory { "not " } else { "" }
    );
    b
}

#[test]
fn read_returns_image_data() {
    check_read(false);
}

#[test]
fn read_returns_image_data_in_memory() {
    check_read(true);
}

fn check_read(in_memory: bool) {
    let b = backend_in(in_memory);
    let mut fe = connect(&b);
    let (data, st) = read(&mut fe, 8, 8192);
    assert_eq!(st, status::OK);
    assert_eq!(data, pattern_range(8 * 512, 8192));
    // The last sector of the disk.
    let (data, st) = read(&mut fe, (4 << 20) / 512 - 1, 512);
    assert_eq!(st, status::OK);
    assert_eq!(data, pattern_range((4 << 20) - 512, 512));
}

#[test]
fn write_reaches_the_image() {
    check_write(false);
}

#[test]
fn write_reaches_the_image_in_memory() {
    check_write(true);
}

#[test]
fn write_and_read_with_adaptive_polling() {
    // The worker polls instead of sleeping between requests: same results.
    let b = TestBackend::start(BackendConfig {
        poll_us: 200,
        ..Default::default()
    });
    write_then_read(b);
}

fn check_write(in_memory: bool) {
    write_then_read(backend_in(in_memory));
}

fn write_then_read(b: TestBackend) {
    let mut fe = connect(&b);
    let data: Vec<u8> = (0..16384u32).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(write(&mut fe, 100, &data), status::OK);
    let flush = blk_req(&mut fe, req_type::FLUSH, 0, 0);
    assert_eq!(run(&mut fe, 0, &flush, false).1, status::OK);
    assert_eq!(b.read_image(100 * 512, data.len()), data);
    // Neighbours untouched.
    assert_eq!(b.read_image(99 * 512, 512), pattern_range(99 * 512, 512));
    assert_eq!(b.read_image(132 * 512, 512), pattern_range(132 * 512, 512));
    // And reading it back through the device gives the same bytes.
    let (back, st) = read(&mut fe, 100, 16384);
    assert_eq!(st, status::OK);
    assert_eq!(back, data);
}

#[test]
fn buffered_cache_mode_reads_and_writes() {
    let b = TestBackend::start(BackendConfig {
        cache: vhost_blk_backend::CacheMode::Writeback,
        ..Default::default()
    });
    assert!(!b.shared.disk.direct);
    let mut fe = connect(&b);
    let data = vec![0x5au8; 4096];
    assert_eq!(write(&mut fe, 3, &data), status::OK);
    let flush = blk_req(&mut fe, req_type::FLUSH, 0, 0);
    assert_eq!(run(&mut fe, 0, &flush, false).1, status::OK);
    assert_eq!(b.read_image(3 * 512, 4096), data);
}

#[test]
fn get_id_returns_the_serial() {
    let b = TestBackend::start(BackendConfig::default());
    let mut fe = connect(&b);
    let r = blk_req(&mut fe, req_type::GET_ID, 0, ID_BYTES as u32);
    let (used, st) = run(&mut fe, 0, &r, true);
    assert_eq!(st, status::OK);
    assert_eq!(used.len, ID_BYTES as u32 + 1);
    let id = fe.read(r.data, ID_BYTES);
    assert_eq!(&id[..16], b"test-serial-0123");
    assert_eq!(&id[16..], &[0, 0, 0, 0]);
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeroes() {
    check_discard_and_write_zeroes(&TestBackend::start(BackendConfig::default()));
}

/// Every kind of request on tmpfs (mapped, as `auto` picks there) and on the engines
/// `auto` would not pick for the file system (`--io-engine inline` on tmpfs and on a
/// disk, `--io-engine uring` on tmpfs).
#[test]
fn every_request_type_on_every_engine() {
    for (in_memory, choice, kind) in [
        (true, EngineChoice::Auto, EngineKind::Mapped),
        (true, EngineChoice::Inline, EngineKind::Inline),
        (false, EngineChoice::Inline, EngineKind::Inline),
        (true, EngineChoice::Uring, EngineKind::Uring),
    ] {
        let start = || {
            TestBackend::start(BackendConfig {
                in_memory,
                io_engine: choice,
                ..Default::default()
            })
        };
        let b = start();
        assert_eq!(b.shared.disk.engine, kind);
        assert_eq!(b.shared.disk.memory_backed(), in_memory);
        check_discard_and_write_zeroes(&b);
        // Each on a fresh image (the discards above zeroed what they check).
        write_then_read(start());
        scattered_on(start());
    }
}

/// An engine's error is the guest's IOERR: the image shrinks under the backend, and a
/// read of what was its end comes back short (end of file; io_uring, inline) or faults
/// in the mapping (mapped: SIGBUS, caught and made EIO; the process lives on).
#[test]
fn an_engine_error_is_an_ioerr_for_the_guest() {
    for (in_memory, choice, kind) in [
        (false, EngineChoice::Auto, EngineKind::Uring),
        (true, EngineChoice::Inline, EngineKind::Inline),
        (true, EngineChoice::Auto, EngineKind::Mapped),
    ] {
        let b = TestBackend::start(BackendConfig {
            in_memory,
            io_engine: choice,
            ..Default::default()
        });
        assert_eq!(b.shared.disk.engine, kind);
        let mut fe = connect(&b);
        let last = (4 << 20) / 512 - 8;
        let (_, st) = read(&mut fe, last, 4096);
        assert_eq!(st, status::OK);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&b.image)
            .and_then(|f| f.set_len(2 << 20))
            .expect("shrink the image");
        let (_, st) = read(&mut fe, last, 4096);
        assert_eq!(st, status::IOERR, "engine {}", b.shared.disk.engine);
        let errors = b
            .shared
            .stats
            .io_errors
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(errors, 1, "engine {}", b.shared.disk.engine);
        // What is still inside the file reads as before.
        let (data, st) = read(&mut fe, 8, 4096);
        assert_eq!(st, status::OK);
        assert_eq!(data, pattern_range(8 * 512, 4096));
    }
}

fn check_discard_and_write_zeroes(b: &TestBackend) {
    let mut fe = connect(b);
    // Discard two ranges in one request.
    assert_eq!(
        range_request(&mut fe, req_type::DISCARD, &[(64, 64, 0), (256, 8, 0)]),
        status::OK
    );
    assert_eq!(b.read_image(64 * 512, 64 * 512), vec![0u8; 64 * 512]);
    assert_eq!(b.read_image(256 * 512, 8 * 512), vec![0u8; 8 * 512]);
    assert_eq!(b.read_image(63 * 512, 512), pattern_range(63 * 512, 512));
    assert_eq!(b.read_image(128 * 512, 512), pattern_range(128 * 512, 512));
    // Write zeroes without unmap, then with.
    assert_eq!(
        range_request(&mut fe, req_type::WRITE_ZEROES, &[(1000, 16, 0)]),
        status::OK
    );
    assert_eq!(
        range_request(
            &mut fe,
            req_type::WRITE_ZEROES,
            &[(2000, 24, WRITE_ZEROES_FLAG_UNMAP)]
        ),
        status::OK
    );
    let (z1, st1) = read(&mut fe, 1000, 16 * 512);
    let (z2, st2) = read(&mut fe, 2000, 24 * 512);
    assert_eq!((st1, st2), (status::OK, status::OK));
    assert!(z1.iter().all(|&b| b == 0) && z2.iter().all(|&b| b == 0));
    assert_eq!(b.read_image(999 * 512, 512), pattern_range(999 * 512, 512));
    assert_eq!(
        b.read_image(1016 * 512, 512),
        pattern_range(1016 * 512, 512)
    );
    assert_eq!(
        b.read_image(2024 * 512, 512),
        pattern_range(2024 * 512, 512)
    );
    if b.shared.disk.memory_backed() {
        // tmpfs reports allocated pages nothing was written to as a hole (SEEK_HOLE).
        return;
    }
    // Without unmap the range stays allocated (no hole reported by SEEK_HOLE).
    let f = std::fs::File::open(&b.image).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open fd.
    let hole = unsafe { libc::lseek(f.as_raw_fd(), 1000 * 512, libc::SEEK_HOLE) };
    assert!(
        hole >= 1016 * 512,
        "write-zeroes without UNMAP left a hole at {hole}"
    );
}

#[test]
fn config_space_describes_the_disk() {
    let (b, mut fe) = with_every_queue(BackendConfig {
        num_queues: 2,
        block_size: 4096,
        ..Default::default()
    });
    let c = fe.config(0, 60).expect("config");
    let u64at = |o: usize| u64::from_le_bytes(c[o..o + 8].try_into().unwrap());
    let u32at = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().unwrap());
    let u16at = |o: usize| u16::from_le_bytes(c[o..o + 2].try_into().unwrap());
    assert_eq!(u64at(0), (4 << 20) / 512, "capacity");
    assert_eq!(u32at(8), 128 << 10, "size_max");
    assert_eq!(u32at(12), 126, "seg_max");
    assert_eq!(u32at(20), 4096, "blk_size");
    assert_eq!(c[32], 1, "writeback");
    assert_eq!(u16at(34), 2, "num_queues");
    assert!(u32at(36) > 0 && u32at(40) > 0, "discard limits");
    assert_eq!(u32at(44), 8, "discard alignment in sectors");
    assert!(u32at(48) > 0 && u32at(52) > 0, "write zeroes limits");
    assert_eq!(c[56], 1, "write_zeroes_may_unmap");
    // A partial read at an offset, as QEMU does for single fields.
    assert_eq!(fe.config(20, 4).unwrap(), 4096u32.to_le_bytes());
    // Writethrough: the driver clears writeback and the device reports it.
    use vhost::vhost_user::message::VhostUserConfigFlags;
    use vhost::vhost_user::VhostUserFrontend;
    fe.fe
        .set_config(32, VhostUserConfigFlags::WRITABLE, &[0])
        .expect("set writeback");
    assert_eq!(fe.config(32, 1).unwrap(), vec![0]);
    assert!(!b
        .shared
        .writeback
        .load(std::sync::atomic::Ordering::Relaxed));
    // Writes still land (now with RWF_DSYNC).
    assert_eq!(write(&mut fe, 8, &[7u8; 4096]), status::OK);
    assert_eq!(b.read_image(8 * 512, 4096), vec![7u8; 4096]);
    // Capacity is not writable.
    assert!(fe
        .fe
        .set_config(0, VhostUserConfigFlags::WRITABLE, &[0; 8])
        .is_err());
}

#[test]
fn read_only_disk_refuses_writes_and_serves_reads() {
    let b = TestBackend::start(BackendConfig {
        read_only: true,
        ..Default::default()
    });
    let mut fe = connect(&b);
    assert_ne!(fe.features & (1 << 5), 0, "VIRTIO_BLK_F_RO offered");
    assert_eq!(write(&mut fe, 0, &[0u8; 512]), status::IOERR);
    assert_eq!(
        range_request(&mut fe, req_type::DISCARD, &[(0, 8, 0)]),
        status::IOERR
    );
    assert_eq!(
        range_request(&mut fe, req_type::WRITE_ZEROES, &[(0, 8, 0)]),
        status::IOERR
    );
    let (data, st) = read(&mut fe, 0, 4096);
    assert_eq!(st, status::OK);
    assert_eq!(data, pattern_range(0, 4096));
    assert_eq!(b.read_image(0, 4096), pattern_range(0, 4096));
    let flush = blk_req(&mut fe, req_type::FLUSH, 0, 0);
    assert_eq!(run(&mut fe, 0, &flush, false).1, status::OK);
}

#[test]
fn scattered_and_oddly_framed_chains() {
    check_scattered(false);
}

#[test]
fn scattered_and_oddly_framed_chains_in_memory() {
    check_scattered(true);
}

fn check_scattered(in_memory: bool) {
    scattered_on(backend_in(in_memory));
}

fn scattered_on(b: TestBackend) {
    let mut fe = connect(&b);
    // Header split over two descriptors, data over three, status in its own.
    let hdr = fe.alloc(16);
    let mut h = Vec::new();
    h.extend_from_slice(&req_type::IN.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&40u64.to_le_bytes());
    fe.write(hdr, &h);
    let d1 = fe.alloc(512);
    let d2 = fe.alloc(1024);
    let d3 = fe.alloc(512);
    let st = fe.alloc(1);
    fe.submit(
        0,
        &[
            Buf::ro(hdr, 5),
            Buf::ro(hdr + 5, 11),
            Buf::wo(d1, 512),
            Buf::wo(d2, 1024),
            Buf::wo(d3, 512),
            Buf::wo(st, 1),
        ],
    );
    let used = fe.wait(0, 1).unwrap();
    assert_eq!(fe.read(st, 1)[0], status::OK);
    assert_eq!(used[0].len, 2049);
    let mut got = fe.read(d1, 512);
    got.extend(fe.read(d2, 1024));
    got.extend(fe.read(d3, 512));
    assert_eq!(got, pattern_range(40 * 512, 2048));
    // Data and status in one descriptor.
    let r = blk_req(&mut fe, req_type::IN, 2, 0);
    let buf = fe.alloc(513);
    fe.submit(0, &[Buf::ro(r.hdr, 16), Buf::wo(buf, 513)]);
    fe.wait(0, 1).unwrap();
    assert_eq!(fe.read(buf + 512, 1)[0], status::OK);
    assert_eq!(fe.read(buf, 512), pattern_range(1024, 512));
}

#[test]
fn unaligned_guest_buffers_bounce_under_o_direct() {
    let b = TestBackend::start(BackendConfig::default());
    let mut fe = connect(&b);
    // 512 bytes at an odd guest address: O_DIRECT cannot use it in place.
    let r = blk_req(&mut fe, req_type::IN, 6, 0);
    let buf = fe.alloc(1024) + 3;
    fe.submit(
        0,
        &[Buf::ro(r.hdr, 16), Buf::wo(buf, 512), Buf::wo(r.status, 1)],
    );
    fe.wait(0, 1).unwrap();
    assert_eq!(r.status(&fe), status::OK);
    assert_eq!(fe.read(buf, 512), pattern_range(6 * 512, 512));
    let w = blk_req(&mut fe, req_type::OUT, 9, 0);
    let src = fe.alloc(1024) + 1;
    fe.write(src, &[0xabu8; 512]);
    fe.submit(
        0,
        &[Buf::ro(w.hdr, 16), Buf::ro(src, 512), Buf::wo(w.status, 1)],
    );
    fe.wait(0, 1).unwrap();
    assert_eq!(w.status(&fe), status::OK);
    assert_eq!(b.read_image(9 * 512, 512), vec![0xab; 512]);
    if b.shared.disk.direct && b.shared.disk.mem_align > 1 {
        assert!(
            b.shared
                .stats
                .bounced
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 2
        );
    }
}

/// Submits a read or write of `segs` consecutive descriptors of the given lengths starting
/// at guest address `buf`; returns the status.
fn multi_segment(fe: &mut TestFrontend, type_: u32, sector: u64, buf: u64, lens: &[u32]) -> u8 {
    let r = blk_req(fe, type_, sector, 0);
    let mut chain = vec![Buf::ro(r.hdr, 16)];
    let mut at = buf;
    for &len in lens {
        chain.push(Buf {
            addr: at,
            len,
            write: type_ == req_type::IN,
        });
        at += u64::from(len);
    }
    chain.push(Buf::wo(r.status, 1));
    fe.submit(0, &chain);
    fe.wait(0, 1).expect("completion");
    r.status(fe)
}

/// The device advertises SIZE_MAX and SEG_MAX, and a request carrying more data than
/// seg_max × size_max is refused (IOERR, counted) without allocating anything for it,
/// while a misaligned request of exactly that size still bounces and reads back right.
/// A driver that did not ack SIZE_MAX (OVMF does not) may send larger requests; they are
/// served in place when aligned, and refused only when they would need a bounce buffer
/// beyond the limit.
#[test]
fn requests_beyond_the_advertised_size_limits_are_refused() {
    use std::sync::atomic::Ordering::Relaxed;
    use vhost_blk_backend::spec::features;
    let b = TestBackend::start(BackendConfig {
        size: 8 << 20,
        queue_size: 16,
        ..Default::default()
    });
    let mut fe = TestFrontend::connect(
        b.socket(),
        FrontendOptions {
            queue_size: 16,
            ..Default::default()
        },
    )
    .expect("connect");
    assert_ne!(fe.features & features::SIZE_MAX, 0, "SIZE_MAX offered");
    let c = fe.config(0, 16).expect("config");
    let size_max = u32::from_le_bytes(c[8..12].try_into().unwrap());
    let seg_max = u32::from_le_bytes(c[12..16].try_into().unwrap());
    assert_eq!((size_max, seg_max), (128 << 10, 14), "size_max, seg_max");
    let limit = size_max * seg_max;
    let full = vec![size_max; seg_max as usize];
    let direct = b.shared.disk.direct && b.shared.disk.mem_align > 1;
    // Misaligned (odd guest address), exactly at the limit: bounced, and correct.
    let buf = fe.alloc(u64::from(limit) + 4096) + 1;
    let bounced = b.shared.stats.bounced.load(Relaxed);
    assert_eq!(
        multi_segment(&mut fe, req_type::IN, 64, buf, &full),
        status::OK
    );
    assert!(
        fe.read(buf, limit as usize) == pattern_range(64 * 512, limit as usize),
        "misaligned read at the limit"
    );
    fe.write(buf, &vec![0x3c; limit as usize]);
    assert_eq!(
        multi_segment(&mut fe, req_type::OUT, 8, buf, &full),
        status::OK
    );
    assert!(
        b.read_image(8 * 512, limit as usize) == vec![0x3c; limit as usize],
        "misaligned write at the limit"
    );
    if direct {
        assert_eq!(b.shared.stats.bounced.load(Relaxed), bounced + 2);
    }
    // 512 bytes more: refused before any buffer is allocated for it.
    let mut over = full.clone();
    over[0] += 512;
    let bounced = b.shared.stats.bounced.load(Relaxed);
    let bad = b.shared.stats.bad_requests.load(Relaxed);
    for type_ in [req_type::IN, req_type::OUT] {
        assert_eq!(
            multi_segment(&mut fe, type_, 0, buf, &over),
            status::IOERR,
            "type {type_}"
        );
    }
    assert_eq!(b.shared.stats.too_large.load(Relaxed), 2);
    assert_eq!(b.shared.stats.bad_requests.load(Relaxed), bad + 2);
    assert_eq!(
        b.shared.stats.bounced.load(Relaxed),
        bounced,
        "no bounce buffer"
    );
    assert_eq!(
        b.read_image(0, 512),
        pattern_range(0, 512),
        "nothing written"
    );
    drop(fe);

    // A driver without SIZE_MAX: one large aligned descriptor is served in place; the
    // same misaligned would need a bounce buffer beyond the limit and is refused.
    let mut fe = TestFrontend::connect(
        b.socket(),
        FrontendOptions {
            queue_size: 16,
            features: Some(!features::SIZE_MAX),
            ..Default::default()
        },
    )
    .expect("connect");
    assert_eq!(fe.features & features::SIZE_MAX, 0);
    let big = limit + (1 << 20);
    let buf = fe.alloc(u64::from(big) + 4096);
    // Past what the first session wrote.
    let sector = 4 << 11;
    assert_eq!(
        multi_segment(&mut fe, req_type::IN, sector, buf, &[big]),
        status::OK
    );
    assert!(
        fe.read(buf, big as usize) == pattern_range(sector * 512, big as usize),
        "large aligned read"
    );
    if direct {
        let bounced = b.shared.stats.bounced.load(Relaxed);
        assert_eq!(
            multi_segment(&mut fe, req_type::IN, sector, buf + 1, &[big]),
            status::IOERR
        );
        assert_eq!(b.shared.stats.bounced.load(Relaxed), bounced);
        assert_eq!(b.shared.stats.too_large.load(Relaxed), 3);
    }
}

/// Sixteen queues: the harness's rings for queues 8 and up lie above 1 MiB, where its
/// buffers used to start, so a request prepared for queue 0 had its data overwritten by
/// queue 8's descriptors. Every queue's write is prepared first, then they are submitted
/// from the last queue to the first, and every block is read back.
#[test]
fn sixteen_queues_each_carry_their_own_data() {
    let (_b, mut fe) = with_every_queue(BackendConfig {
        num_queues: 16,
        ..Default::default()
    });
    let data = |q: u16| vec![0xa0 + q as u8; 4096];
    let writes: Vec<_> = (0..16u16)
        .map(|q| {
            let w = blk_req(&mut fe, req_type::OUT, u64::from(q) * 8, 4096);
            fe.write(w.data, &data(q));
            w
        })
        .collect();
    for q in (0..16u16).rev() {
        let w = &writes[usize::from(q)];
        assert_eq!(
            run(&mut fe, q, w, false).1,
            status::OK,
            "write on queue {q}"
        );
    }
    for q in 0..16u16 {
        let r = blk_req(&mut fe, req_type::IN, u64::from(q) * 8, 4096);
        assert_eq!(run(&mut fe, q, &r, true).1, status::OK, "read on queue {q}");
        let got = fe.read(r.data, 4096);
        let bad = got.iter().zip(data(q)).filter(|(a, b)| **a != *b).count();
        assert_eq!(
            bad, 0,
            "{bad} bytes differ in the block written on queue {q}"
        );
    }
}

#[test]
fn device_counters_are_the_sums_of_every_queue() {
    let (b, mut fe) = with_every_queue(BackendConfig {
        num_queues: 2,
        ..Default::default()
    });
    // Queue 0: three 4 KiB writes; queue 1: two 8 KiB reads and one 4 KiB write.
    for i in 0..3u64 {
        let r = blk_req(&mut fe, req_type::OUT, i * 8, 4096);
        assert_eq!(run(&mut fe, 0, &r, false).1, status::OK);
    }
    for i in 0..2u64 {
        let r = blk_req(&mut fe, req_type::IN, i * 16, 8192);
        assert_eq!(run(&mut fe, 1, &r, true).1, status::OK);
    }
    let r = blk_req(&mut fe, req_type::OUT, 64, 4096);
    assert_eq!(run(&mut fe, 1, &r, false).1, status::OK);

    use std::sync::atomic::Ordering::Relaxed;
    let q = &b.shared.queue_stats;
    assert_eq!(
        (q[0].writes.load(Relaxed), q[0].reads.load(Relaxed)),
        (3, 0)
    );
    assert_eq!(
        (q[1].writes.load(Relaxed), q[1].reads.load(Relaxed)),
        (1, 2)
    );
    let t = b.shared.totals();
    assert_eq!((t.writes, t.write_bytes), (4, 4 * 4096));
    assert_eq!((t.reads, t.read_bytes), (2, 2 * 8192));
    assert_eq!(b.shared.in_flight(), 0);
    // Each queue's peak was one request at a time.
    assert_eq!(b.shared.stats.in_flight_peak.load(Relaxed), 1);
}

/// A backend started with `cfg` and a frontend that set up every one of its queues.
fn with_every_queue(cfg: BackendConfig) -> (TestBackend, TestFrontend) {
    let num_queues = cfg.num_queues;
    let b = TestBackend::start(cfg);
    let fe = TestFrontend::connect(
        b.socket(),
        FrontendOptions {
            num_queues,
            ..Default::default()
        },
    )
    .expect("connect");
    (b, fe)
}
