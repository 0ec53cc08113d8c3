//! The layer's protocol handling against frontends that get it wrong or do it in an odd
//! order. Moved here from blk's protocol tests, on the echo device.

mod echo;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use echo::{pattern, EchoBackend, MAX_QUEUE_SIZE};
use vhost::{VhostBackend, VringConfigData};
use vhost_tests::frontend::{Buf, FrontendOptions, TestFrontend};

#[test]
fn bad_frontend_requests_are_refused_and_the_connection_survives() {
    let b = EchoBackend::start(1);
    let mut fe = TestFrontend::connect(b.socket(), FrontendOptions::default()).unwrap();
    // Ring sizes that are not a power of two or exceed the maximum.
    assert!(fe.fe.set_vring_num(0, 100).is_err());
    assert!(fe.fe.set_vring_num(0, MAX_QUEUE_SIZE * 2).is_err());
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
    // Acking a feature that was never offered (VIRTIO_F_RING_PACKED).
    assert!(fe.fe.set_features(fe.features | (1 << 34)).is_err());
    // The connection still works, with the original ring untouched.
    let data = pattern(4, 512);
    let (src, dst) = (fe.alloc(512), fe.alloc(512));
    fe.write(src, &data);
    fe.submit(0, &[Buf::ro(src, 512), Buf::wo(dst, 512)]);
    assert_eq!(fe.wait(0, 1).unwrap()[0].len, 512);
    assert_eq!(fe.read(dst, 512), data);
}

/// QEMU's vhost-user-net sends SET_VRING_ENABLE before SET_FEATURES, with REPLY_ACK
/// negotiated, and waits for the ack: it must get one.
#[test]
fn set_vring_enable_before_set_features_is_acknowledged() {
    let b = EchoBackend::start(1);
    let mut s = UnixStream::connect(b.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let msg = |req: u32, flags: u32, payload: &[u8]| {
        let mut m = Vec::new();
        m.extend_from_slice(&req.to_ne_bytes());
        m.extend_from_slice(&(1 | flags).to_ne_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_ne_bytes());
        m.extend_from_slice(payload);
        m
    };
    let reply = |s: &mut UnixStream| {
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
