//! Memory hot-plug (ADD_MEM_REG / REM_MEM_REG): the backend's region table must follow
//! the frontend's in any order, down to an empty table, and I/O must land in the regions.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use vhost::VhostBackend;
use vhost_blk_backend::spec::{req_type, status};
use vhost_tests::frontend::{Buf, FrontendOptions, TestFrontend};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Reads `len` bytes from `sector` into `buf_gpa` (a buffer in any region); returns the
/// used length and the status byte.
fn read_into(fe: &mut TestFrontend, sector: u64, buf_gpa: u64, len: u32) -> (u32, u8) {
    let r = blk_req(fe, req_type::IN, sector, 0);
    fe.submit(
        0,
        &[
            Buf::ro(r.hdr, 16),
            Buf::wo(buf_gpa, len),
            Buf::wo(r.status, 1),
        ],
    );
    let used = fe.wait(0, 1).expect("chain returned");
    (used[0].len, r.status(fe))
}

fn region_bytes(mem: &GuestMemoryMmap, gpa: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(gpa)).unwrap();
    v
}

#[test]
fn regions_added_below_others_and_removed_down_to_none_follow_the_frontend() {
    let b = TestBackend::start(BackendConfig::default());
    let mut fe = TestFrontend::connect(b.socket(), FrontendOptions::default()).unwrap();
    // Hot-plug a DIMM high up, then one below it (but above guest RAM at 0).
    let (hi, lo) = (64u64 << 20, 48u64 << 20);
    let hi_mem = fe.add_region(hi, 1 << 20).unwrap();
    let lo_mem = fe
        .add_region(lo, 1 << 20)
        .expect("ADD_MEM_REG below an existing region");
    // I/O into both new regions lands where the driver looks.
    assert_eq!(
        read_into(&mut fe, 16, lo + 0x2000, 4096),
        (4097, status::OK)
    );
    assert_eq!(
        region_bytes(&lo_mem, lo + 0x2000, 4096),
        pattern_range(16 * 512, 4096)
    );
    assert_eq!(read_into(&mut fe, 40, hi + 0x1000, 512), (513, status::OK));
    assert_eq!(
        region_bytes(&hi_mem, hi + 0x1000, 512),
        pattern_range(40 * 512, 512)
    );
    // Unplugged, a region is gone for the backend too: a chain into it is dropped.
    fe.remove_region(&hi_mem, hi).unwrap();
    fe.remove_region(&lo_mem, lo).unwrap();
    let bad = b.stats[0].bad_chains.load(Ordering::Relaxed);
    assert_eq!(read_into(&mut fe, 16, lo + 0x2000, 4096).0, 0);
    assert_eq!(b.stats[0].bad_chains.load(Ordering::Relaxed), bad + 1);
    // Stop the ring and unplug guest RAM too: the table is empty, as the frontend's is.
    let base = fe.fe.get_vring_base(0).unwrap();
    let ram = fe.mem.clone();
    fe.remove_region(&ram, 0)
        .expect("REM_MEM_REG of the last region");
    // Plug it back and carry on.
    fe.readd_region(&ram, 0).unwrap();
    fe.start_queue_at(0, base as u16).unwrap();
    let (data, st) = read(&mut fe, 3, 512);
    assert_eq!((st, data), (status::OK, pattern_range(3 * 512, 512)));
}
