//! Connections coming and going: a new frontend after a hang-up, inflight resubmission
//! after a dead backend, interrupts owed from an earlier session, RESET_DEVICE, and the
//! drain before GET_VRING_BASE answers. Moved here from blk's protocol tests, on the echo
//! device.

mod echo;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use echo::{pattern, EchoBackend};
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vhost_tests::frontend::{wait_eventfd, Buf, FrontendOptions, TestFrontend};
use vhost_user_device::inflight::InflightRegion;

/// Submits an echo of `data` on queue 0, waits for it; returns what came back.
fn echo_once(fe: &mut TestFrontend, data: &[u8]) -> Vec<u8> {
    let src = fe.alloc(data.len() as u64);
    let dst = fe.alloc(data.len() as u64);
    fe.write(src, data);
    let len = data.len() as u32;
    fe.submit(0, &[Buf::ro(src, len), Buf::wo(dst, len)]);
    let used = fe.wait(0, 1).expect("completion");
    assert_eq!(used[0].len, len, "bytes written reported");
    fe.read(dst, data.len())
}

fn with_inflight() -> FrontendOptions {
    FrontendOptions {
        inflight: true,
        ..Default::default()
    }
}

#[test]
fn a_new_frontend_can_connect_after_the_first_hangs_up() {
    let b = EchoBackend::start(1);
    {
        let mut fe = TestFrontend::connect(b.socket(), FrontendOptions::default()).unwrap();
        assert_eq!(echo_once(&mut fe, &pattern(1, 1024)), pattern(1, 1024));
        // Dropped without GET_VRING_BASE, like a killed VMM.
    }
    for round in 0..2u8 {
        let mut fe = TestFrontend::connect(b.socket(), FrontendOptions::default()).unwrap();
        let data = pattern(2 + round, 1024);
        assert_eq!(echo_once(&mut fe, &data), data, "session {}", round + 2);
    }
}

/// A frontend reconnecting to `b` as if the backend of an earlier session had died: that
/// session (one echo completed) left an inflight region, returned here for
/// [`mark_in_flight`]; the new session has done its handshake and laid out queue 0.
fn reconnect_after_a_dead_backend(
    b: &EchoBackend,
    o: &FrontendOptions,
) -> (TestFrontend, std::fs::File, VhostUserInflight) {
    let (file, info) = {
        let mut fe = TestFrontend::connect(b.socket(), o.clone()).unwrap();
        assert_eq!(echo_once(&mut fe, &[1u8; 512]), vec![1u8; 512]);
        fe.fe.get_vring_base(0).unwrap();
        fe.inflight.take().unwrap()
    };
    let mut fe = TestFrontend::handshake(b.socket(), o).unwrap();
    fe.add_queue(0).unwrap();
    (fe, file, info)
}

/// Marks `(head, counter)` in flight on queue 0 of the region, as the dead backend would
/// have left them.
fn mark_in_flight(file: &std::fs::File, info: &VhostUserInflight, heads: &[(u16, u64)]) {
    let region = InflightRegion::map(file, 0, info.mmap_size, 1, 128).unwrap();
    let mut q = region.queue(0, 128).unwrap();
    q.recover(0);
    for &(head, counter) in heads {
        q.set_entry(head, counter, true);
    }
}

#[test]
fn inflight_requests_of_a_dead_backend_are_resubmitted() {
    let b = EchoBackend::start(1);
    // Session 1 created the region and completed one echo; then its backend died with
    // two chains popped but not completed: publish them on the avail ring and mark them
    // in flight in the shared region, as the dead process would have.
    let (mut fe, file, info) = reconnect_after_a_dead_backend(&b, &with_inflight());
    let (a, z) = (pattern(0x77, 1024), pattern(0x30, 512));
    let (src_a, dst_a, src_z, dst_z) =
        (fe.alloc(1024), fe.alloc(1024), fe.alloc(512), fe.alloc(512));
    fe.write(src_a, &a);
    fe.write(src_z, &z);
    let dq = &mut fe.queues[0];
    let ha = dq.add_chain(&fe.mem, &[Buf::ro(src_a, 1024), Buf::wo(dst_a, 1024)]);
    dq.publish(&fe.mem, ha);
    let hz = dq.add_chain(&fe.mem, &[Buf::ro(src_z, 512), Buf::wo(dst_z, 512)]);
    dq.publish(&fe.mem, hz);
    mark_in_flight(&file, &info, &[(ha, 7), (hz, 8)]);
    fe.set_inflight(file, info).unwrap();
    // The VMM restores the avail index from the used index (0): the backend must not pop
    // the two chains again as new, but resubmit them once from the region.
    fe.start_queue_at(0, 0).unwrap();
    let used = fe.wait(0, 2).unwrap();
    let mut got: Vec<(u32, u32)> = used.iter().map(|u| (u.id, u.len)).collect();
    got.sort_unstable();
    let mut want = vec![(u32::from(ha), 1024), (u32::from(hz), 512)];
    want.sort_unstable();
    assert_eq!(got, want, "both in-flight chains completed, each once");
    assert_eq!(fe.read(dst_a, 1024), a);
    assert_eq!(fe.read(dst_z, 512), z);
    assert_eq!(b.stats(0).resubmitted.load(Ordering::SeqCst), 2);
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
    let b = EchoBackend::start(1);
    let (mut fe, file, info) = reconnect_after_a_dead_backend(&b, &with_inflight());
    let data = pattern(0x55, 1024);
    let (src, dst) = (fe.alloc(1024), fe.alloc(1024));
    fe.write(src, &data);
    let dq = &mut fe.queues[0];
    let head = dq.add_chain(&fe.mem, &[Buf::ro(src, 1024), Buf::wo(dst, 1024)]);
    dq.publish(&fe.mem, head);
    mark_in_flight(&file, &info, &[(head, 3)]);
    fe.set_inflight(file, info).unwrap();
    fe.start_queue_without_call(0, 0).unwrap();
    // The resubmitted chain completes while the ring has no call fd.
    let deadline = Instant::now() + Duration::from_secs(5);
    while fe.queues[0].used_idx(&fe.mem) != 1 {
        assert!(
            Instant::now() < deadline,
            "resubmitted chain never completed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(fe.read(dst, 1024), data);
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
/// `without_event_idx_no_interrupt_is_honoured` in rings.rs).
#[test]
fn a_restarted_ring_with_completions_interrupts_the_guest_once() {
    let b = EchoBackend::start(1);
    for call_first in [true, false] {
        let mut fe = TestFrontend::handshake(b.socket(), &with_inflight()).unwrap();
        fe.setup_inflight().unwrap();
        fe.add_queue(0).unwrap();
        // Guest memory as the dead backend left it: 3 chains made available, all 3
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
    let b = EchoBackend::start(1);
    let mut fe = TestFrontend::connect(b.socket(), FrontendOptions::default()).unwrap();
    assert_eq!(echo_once(&mut fe, &pattern(9, 512)), pattern(9, 512));
    fe.fe.reset_device().unwrap();
    // The stopped ring takes nothing: a chain published and kicked now stays unused.
    let (src, dst) = (fe.alloc(512), fe.alloc(512));
    fe.write(src, &pattern(10, 512));
    fe.submit(0, &[Buf::ro(src, 512), Buf::wo(dst, 512)]);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        fe.queues[0].used_idx(&fe.mem),
        1,
        "a reset ring took a chain"
    );
    // A fresh start (ring laid out again from index 0) works.
    let features = fe.features;
    fe.fe.set_features(features).unwrap();
    fe.add_queue(0).unwrap();
    fe.start_queue(0).unwrap();
    assert_eq!(echo_once(&mut fe, &pattern(11, 512)), pattern(11, 512));
    assert_eq!(
        fe.queues[0].used_idx(&fe.mem),
        1,
        "the new ring starts at 0"
    );
}

/// GET_VRING_BASE is answered only once every chain the device took is on the used ring,
/// however long that takes: the frontend reads the used index right after and restarts or
/// migrates the ring from it. The echo device holds what it pops, as a device whose I/O is
/// still in the kernel; the answer must wait for the release.
#[test]
fn get_vring_base_waits_for_in_flight_requests() {
    let b = EchoBackend::start(1);
    let mut fe = TestFrontend::connect(b.socket(), FrontendOptions::default()).unwrap();
    let n = 8usize;
    let held = 5usize;
    let data: Vec<Vec<u8>> = (0..n).map(|i| pattern(i as u8, 4096)).collect();
    let bufs: Vec<(u64, u64)> = data
        .iter()
        .map(|d| {
            let (src, dst) = (fe.alloc(4096), fe.alloc(4096));
            fe.write(src, d);
            (src, dst)
        })
        .collect();
    let heads: Vec<u16> = bufs
        .iter()
        .map(|&(src, dst)| {
            fe.queues[0].add_chain(&fe.mem, &[Buf::ro(src, 4096), Buf::wo(dst, 4096)])
        })
        .collect();
    b.control.hold();
    for &h in &heads[..held] {
        fe.queues[0].publish(&fe.mem, h);
    }
    fe.queues[0].notify();
    b.control.wait_held(held);
    assert_eq!(fe.queues[0].used_idx(&fe.mem), 0, "held chains completed");
    let answered = AtomicBool::new(false);
    let base = std::thread::scope(|s| {
        let frontend = &mut fe.fe;
        let t = s.spawn(|| {
            let base = frontend.get_vring_base(0);
            answered.store(true, Ordering::SeqCst);
            base
        });
        std::thread::sleep(Duration::from_millis(300));
        let early = answered.load(Ordering::SeqCst);
        b.control.release();
        let base = t.join().expect("GET_VRING_BASE thread");
        assert!(
            !early,
            "GET_VRING_BASE answered with {held} chain(s) in flight"
        );
        base.expect("GET_VRING_BASE")
    });
    assert_eq!(base, held as u32, "every popped chain counted in the base");
    assert_eq!(
        fe.queues[0].used_idx(&fe.mem),
        held as u16,
        "every popped chain on the used ring before the answer"
    );
    assert_eq!(b.control.held(), 0);
    // Restart from that base: the rest completes too, each chain echoed.
    for &h in &heads[held..] {
        fe.queues[0].publish(&fe.mem, h);
    }
    fe.start_queue_at(0, base as u16).unwrap();
    fe.queues[0].notify();
    fe.queues[0]
        .wait_used(&fe.mem, n, Duration::from_secs(5))
        .unwrap();
    for (i, (d, &(_, dst))) in data.iter().zip(&bufs).enumerate() {
        assert_eq!(&fe.read(dst, 4096), d, "chain {i}");
    }
}

/// A shutdown (SIGTERM) with chains in flight: the server returns only once they are on
/// the used ring, so a guest never loses a completion to a backend that was asked to stop.
#[test]
fn shutdown_waits_for_in_flight_chains_and_completes_them() {
    let b = EchoBackend::start(1);
    let mut fe = TestFrontend::connect(b.socket(), FrontendOptions::default()).unwrap();
    b.control.hold();
    let data: Vec<Vec<u8>> = (0..3u8).map(|i| pattern(0x40 + i, 2048)).collect();
    let dsts: Vec<u64> = data
        .iter()
        .map(|d| {
            let (src, dst) = (fe.alloc(2048), fe.alloc(2048));
            fe.write(src, d);
            fe.submit(0, &[Buf::ro(src, 2048), Buf::wo(dst, 2048)]);
            dst
        })
        .collect();
    b.control.wait_held(3);
    let EchoBackend {
        server,
        control,
        dir: _dir,
    } = b;
    let stopping = std::thread::spawn(move || server.stop());
    std::thread::sleep(Duration::from_millis(300));
    let early = stopping.is_finished();
    control.release();
    assert!(!early, "the server stopped with 3 chains in flight");
    stopping
        .join()
        .expect("server stop thread")
        .expect("the server returns cleanly");
    assert_eq!(fe.queues[0].used_idx(&fe.mem), 3, "every chain completed");
    for (i, (d, &dst)) in data.iter().zip(&dsts).enumerate() {
        assert_eq!(&fe.read(dst, 2048), d, "chain {i}");
    }
}
