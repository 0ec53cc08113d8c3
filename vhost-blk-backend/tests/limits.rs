//! Guest-driven work is bounded: a queue never has more requests in flight than its size
//! (a driver that re-posts heads still in flight gets no more).
//!
//! The in-flight test needs I/O that does not complete at once: the image lives on an
//! ext4 file system (on a loop device) that the test freezes, so writes wait in the
//! kernel until it thaws. That needs root; without it the test says SKIPPED loudly.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use vhost_blk_backend::spec::{req_type, status};
use vhost_tests::frontend::{FrontendOptions, TestFrontend};

const QUEUE_SIZE: u16 = 16;

/// A driver that re-posts the heads of its own writes while they are still in flight
/// (the device cannot complete them: the file system is frozen). Without a limit every
/// re-post is another request in flight, without end; with it the queue stops taking
/// chains at its size, and everything completes once the file system thaws.
#[test]
fn a_queue_never_has_more_requests_in_flight_than_its_size() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        vhost_tests::guest::report_skip(
            "a_queue_never_has_more_requests_in_flight_than_its_size",
            "needs root (mounts and freezes an ext4 file system on a loop device)",
        );
        return;
    }
    let mut fs = FreezableFs::new();
    let image = fs.path().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(8 << 20))
        .expect("image");
    let dir = tempfile::tempdir().expect("tempdir");
    let b = TestBackend::start_on(
        dir,
        image,
        BackendConfig {
            size: 8 << 20,
            queue_size: QUEUE_SIZE,
            fill: false,
            ..Default::default()
        },
    );
    let mut fe = TestFrontend::connect(
        b.socket(),
        FrontendOptions {
            queue_size: QUEUE_SIZE,
            ..Default::default()
        },
    )
    .expect("connect");
    // One write per descriptor triple: 5 chains of 3 fit a 16-entry table.
    let reqs: Vec<_> = (0..5u64)
        .map(|i| {
            let r = blk_req(&mut fe, req_type::OUT, i * 8, 4096);
            fe.write(r.data, &[i as u8 + 1; 4096]);
            r
        })
        .collect();
    let heads: Vec<u16> = reqs
        .iter()
        .map(|r| fe.queues[0].add_chain(&fe.mem, &r.chain(false)))
        .collect();
    fs.freeze();
    // 6 rounds of 5: 30 chains, within what the avail ring may hold beyond the 16 a
    // limited device takes (posting further ahead would be a broken ring, a different
    // defence, tested in hostile.rs).
    let rounds = 6;
    for _ in 0..rounds {
        fe.queues[0].publish_many(&fe.mem, &heads);
        fe.queues[0].notify();
        std::thread::sleep(Duration::from_millis(20));
    }
    let peak = b.shared.stats.in_flight_peak.load(Ordering::Relaxed);
    let now = b.shared.in_flight();
    assert!(
        peak <= u64::from(QUEUE_SIZE),
        "{peak} requests were in flight on a queue of {QUEUE_SIZE}"
    );
    assert_eq!(now, u64::from(QUEUE_SIZE), "the queue should be full");
    fs.thaw();
    // Every posted chain completes (the ones held back too), with status OK.
    let want = heads.len() * rounds;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut done = 0;
    while done < want {
        assert!(
            Instant::now() < deadline,
            "{done} of {want} chains completed after the thaw"
        );
        done += fe.wait(0, 1).map(|u| u.len()).unwrap_or(0);
    }
    for (i, r) in reqs.iter().enumerate() {
        assert_eq!(r.status(&fe), status::OK);
        assert_eq!(b.read_image(i as u64 * 4096, 4096), vec![i as u8 + 1; 4096]);
    }
    assert_eq!(b.shared.in_flight(), 0);
}
