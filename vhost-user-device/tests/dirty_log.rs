//! The frontend's dirty log (SET_LOG_BASE, VHOST_F_LOG_ALL) as the layer keeps it for a
//! device writing guest memory through vm-memory: exactly the pages written (buffers and
//! the used ring), regions added after SET_LOG_BASE included, nothing once LOG_ALL is
//! cleared. Moved here from blk's protocol tests, on the echo device; blk keeps the test
//! of its own marking of what io_uring wrote.

mod echo;

use echo::{pattern, EchoBackend};
use vhost_tests::frontend::{Buf, FrontendOptions, TestFrontend};
use vm_memory::{Bytes, GuestAddress};

#[test]
fn dirty_log_marks_exactly_the_pages_written_and_stops_with_log_all() {
    let b = EchoBackend::start(1);
    let mut fe = TestFrontend::connect(b.socket(), FrontendOptions::default()).unwrap();
    let log = fe.enable_dirty_log().unwrap();
    // 3 pages read from one buffer and written into another that spans 4 pages (it starts
    // 1 byte into its first, so its last byte is alone on the 4th): the readable pages
    // must stay clean.
    let data = pattern(5, 3 * 4096);
    let src = fe.alloc(3 * 4096);
    fe.write(src, &data);
    let dst = fe.alloc(4 * 4096) + 1;
    log.clear();
    fe.submit(0, &[Buf::ro(src, 3 * 4096), Buf::wo(dst, 3 * 4096)]);
    assert_eq!(fe.wait(0, 1).unwrap()[0].len, 3 * 4096);
    assert_eq!(fe.read(dst, 3 * 4096), data);
    let used_page = fe.queues[0].used / 4096;
    let mut want: Vec<u64> = (0..4).map(|i| dst / 4096 + i).collect();
    want.push(used_page);
    want.sort_unstable();
    assert_eq!(log.dirty_pages(), want, "dirty pages");
    assert!((0..3).all(|i| !log.is_dirty(src + i * 4096)));
    // A writable buffer the device leaves untouched (nothing to echo into it) stays clean.
    let spare = fe.alloc(4096);
    let dst2 = fe.alloc(4096);
    let src2 = fe.alloc(4096);
    fe.write(src2, &pattern(6, 4096));
    log.clear();
    fe.submit(
        0,
        &[
            Buf::ro(src2, 4096),
            Buf::wo(dst2, 4096),
            Buf::wo(spare, 4096),
        ],
    );
    fe.wait(0, 1).unwrap();
    let mut want = vec![dst2 / 4096, used_page];
    want.sort_unstable();
    assert_eq!(log.dirty_pages(), want, "only the pages written");
    // LOG_ALL cleared: nothing is logged any more.
    fe.disable_dirty_log().unwrap();
    log.clear();
    assert_eq!(fe.read(dst, 16), data[..16]);
    let src3 = fe.alloc(4096);
    let dst3 = fe.alloc(4096);
    fe.write(src3, &pattern(7, 4096));
    fe.submit(0, &[Buf::ro(src3, 4096), Buf::wo(dst3, 4096)]);
    fe.wait(0, 1).unwrap();
    assert_eq!(fe.read(dst3, 4096), pattern(7, 4096));
    assert!(
        log.dirty_pages().is_empty(),
        "logging continued after LOG_ALL was cleared"
    );
}

#[test]
fn dirty_log_covers_regions_added_after_set_log_base() {
    let b = EchoBackend::start(1);
    let mut fe = TestFrontend::connect(b.socket(), FrontendOptions::default()).unwrap();
    let log = fe.enable_dirty_log().unwrap();
    // A second region added after SET_LOG_BASE, like a hot-plugged DIMM.
    let hi = 48u64 << 20;
    let region = fe.add_region(hi, 1 << 20).unwrap();
    let data = pattern(8, 4096);
    let src = fe.alloc(4096);
    fe.write(src, &data);
    log.clear();
    fe.submit(0, &[Buf::ro(src, 4096), Buf::wo(hi + 0x3000, 4096)]);
    assert_eq!(fe.wait(0, 1).unwrap()[0].len, 4096);
    let mut got = vec![0u8; 4096];
    region
        .read_slice(&mut got, GuestAddress(hi + 0x3000))
        .unwrap();
    assert_eq!(got, data);
    assert!(log.is_dirty(hi + 0x3000), "late region's page not logged");
    assert!(!log.is_dirty(hi + 0x2000) && !log.is_dirty(hi + 0x4000));
    // And a chain reading from the late region into the first one.
    let dst = fe.alloc(4096);
    log.clear();
    fe.submit(0, &[Buf::ro(hi + 0x3000, 4096), Buf::wo(dst, 4096)]);
    fe.wait(0, 1).unwrap();
    assert_eq!(fe.read(dst, 4096), data);
    assert!(log.is_dirty(dst) && !log.is_dirty(hi + 0x3000));
}
