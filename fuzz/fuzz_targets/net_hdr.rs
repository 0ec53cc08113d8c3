//! virtio-net headers: parsing and serialising, the transmit header check (checksum and
//! GSO/TSO offloads against the acked features and the frame length), and the tap
//! offloads and header length that follow from the acked features.
//!
//! Input: acked features u64, frame length u32, 12 header bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_fuzz::Reader;
use vhost_net_backend::spec::{
    features as f, gso, hdr_flags, hdr_len, tap_offloads, tun, NetHdr, HDR_LEN, LEGACY_HDR_LEN,
};

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let acked = r.u64();
    let frame_len = r.u32() as usize;
    let raw: [u8; HDR_LEN] = r.array();

    let hdr = NetHdr::parse(&raw);
    assert_eq!(hdr.to_bytes(), raw);
    assert_eq!(NetHdr::parse(&hdr.to_bytes()), hdr);

    let hlen = hdr_len(acked);
    assert!(hlen == HDR_LEN || hlen == LEGACY_HDR_LEN);

    let o = tap_offloads(acked);
    if o != 0 {
        assert!(acked & f::GUEST_CSUM != 0 && o & tun::TUN_F_CSUM != 0);
    }
    if o & tun::TUN_F_TSO4 != 0 {
        assert!(acked & f::GUEST_TSO4 != 0);
    }
    if o & tun::TUN_F_TSO6 != 0 {
        assert!(acked & f::GUEST_TSO6 != 0);
    }
    if o & tun::TUN_F_UFO != 0 {
        assert!(acked & f::GUEST_UFO != 0);
    }
    if o & tun::TUN_F_TSO_ECN != 0 {
        assert!(acked & f::GUEST_ECN != 0 && o & (tun::TUN_F_TSO4 | tun::TUN_F_TSO6) != 0);
    }

    if hdr.check_tx(acked, frame_len).is_ok() {
        assert_eq!(
            hdr.flags & !(hdr_flags::NEEDS_CSUM | hdr_flags::DATA_VALID),
            0
        );
        if hdr.flags & hdr_flags::NEEDS_CSUM != 0 {
            assert!(acked & f::CSUM != 0);
            let end = usize::from(hdr.csum_start) + usize::from(hdr.csum_offset) + 2;
            assert!(
                end <= frame_len,
                "checksum at {end} past a {frame_len}-byte frame"
            );
        }
        let ecn = hdr.gso_type & gso::ECN != 0;
        match hdr.gso_type & !gso::ECN {
            gso::NONE => assert!(!ecn),
            t => {
                let need = match t {
                    gso::TCPV4 => f::HOST_TSO4,
                    gso::TCPV6 => f::HOST_TSO6,
                    gso::UDP => {
                        assert!(!ecn);
                        f::HOST_UFO
                    }
                    other => panic!("GSO type {other:#x} accepted"),
                };
                assert!(acked & need != 0);
                assert!(!ecn || acked & f::HOST_ECN != 0);
                assert!(hdr.gso_size != 0);
            }
        }
    }
});
