//! RESET_DEVICE returns the device to its initial state: nothing of the session before it
//! (rings, acked features, the inflight region, the dirty log) carries into the next one.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vhost_blk_backend::spec::status;
use vhost_tests::frontend::{FrontendOptions, TestFrontend};
use vhost_user_device::inflight::InflightRegion;

#[test]
fn reset_device_drops_the_inflight_region_of_the_session_before() {
    let b = TestBackend::start(BackendConfig::default());
    let o = FrontendOptions {
        inflight: true,
        ..Default::default()
    };
    let mut fe = TestFrontend::connect(b.socket(), o).unwrap();
    assert_eq!(write(&mut fe, 0, &[1u8; 512]), status::OK);
    fe.fe.get_vring_base(0).unwrap();
    // Two chains of the old session left in flight in the region (as after a guest reset
    // in the middle of I/O).
    {
        let (file, info) = fe.inflight.as_ref().unwrap();
        let region = InflightRegion::map(file, 0, info.mmap_size, 1, 128).unwrap();
        let mut q = region.queue(0, 128).unwrap();
        q.set_entry(5, 100, true);
        q.set_entry(6, 101, true);
    }
    fe.fe.reset_device().unwrap();
    // The new session: no SET_INFLIGHT_FD (the frontend would have to get a new region
    // after a reset), fresh rings from index 0.
    let features = fe.features;
    fe.fe.set_features(features).unwrap();
    fe.add_queue(0).unwrap();
    fe.start_queue(0).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        b.stats[0].resubmitted.load(Ordering::Relaxed),
        0,
        "requests of the session before RESET_DEVICE were replayed"
    );
    let (data, st) = read(&mut fe, 0, 512);
    assert_eq!((st, data), (status::OK, vec![1u8; 512]));
    assert_eq!(fe.queues[0].used_idx(&fe.mem), 1);
}

#[test]
fn reset_device_drops_the_dirty_log_of_the_session_before() {
    let b = TestBackend::start(BackendConfig::default());
    let mut fe = TestFrontend::connect(b.socket(), FrontendOptions::default()).unwrap();
    let log = fe.enable_dirty_log().unwrap();
    fe.fe.get_vring_base(0).unwrap();
    fe.fe.reset_device().unwrap();
    // The next session acks LOG_ALL without a new SET_LOG_BASE: there is no log to write,
    // so the old one must stay untouched.
    let features = fe.features;
    fe.fe
        .set_features(features | vhost_tests::frontend::LOG_ALL)
        .unwrap();
    fe.add_queue(0).unwrap();
    fe.start_queue(0).unwrap();
    log.clear();
    let (_, st) = read(&mut fe, 2, 4096);
    assert_eq!(st, status::OK);
    assert!(
        log.dirty_pages().is_empty(),
        "the backend logged into the dirty log of the session before RESET_DEVICE"
    );
}
