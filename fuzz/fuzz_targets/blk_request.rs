//! virtio-blk request parsing: chains walked over guest memory from the input, parsed
//! against a disk geometry from the input; every accepted request must stay inside the
//! disk, the advertised limits and guest memory.
//!
//! Input: 16 bytes of parameters (ring size selector, flags, data-segment limit, heads to
//! try, disk size u64, discard/write-zeroes segment limits, sector limit u16), then guest
//! memory (descriptor table at 0x0).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_blk_backend::request::{parse, DiskGeometry, Request};
use vhost_blk_backend::spec::SECTOR_SIZE;
use vhost_fuzz::{check_chain, guest_memory, in_memory, ring_size, Reader};
use vhost_user_device::chain::walk;
use vhost_user_device::Chain;

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let size = ring_size(r.u8());
    let flags = r.u8();
    let max_data_segments = usize::from(r.u8());
    let heads = r.u8();
    let disk_size = r.u64();
    let max_discard_seg = u32::from(r.u8());
    let max_write_zeroes_seg = u32::from(r.u8());
    let max_sectors = u32::from(r.u16());
    let geo = DiskGeometry {
        size: disk_size,
        read_only: flags & 1 != 0,
        max_discard_seg,
        max_discard_sectors: max_sectors,
        max_write_zeroes_seg,
        max_write_zeroes_sectors: max_sectors,
        max_data_segments,
    };
    let mem = guest_memory(r.rest());
    let mut chain = Chain::default();
    for head in 0..u16::from(heads % 8).min(size) {
        if walk(&mem, 0, size, head, &mut chain).is_err() {
            continue;
        }
        check_chain(&mem, &chain);
        let Some(parsed) = parse(&mem, &chain, &geo) else {
            assert!(chain.segments.iter().all(|s| !s.writable));
            continue;
        };
        assert!(in_memory(&mem, parsed.status_addr, 1));
        let Ok(req) = parsed.request else { continue };
        let inside = |offset: u64, len: u64| {
            assert!(
                offset.checked_add(len).is_some_and(|end| end <= geo.size),
                "{offset}+{len} past the disk ({}) in {req:?}",
                geo.size
            );
        };
        match &req {
            Request::Read { offset, data } | Request::Write { offset, data } => {
                let writable = matches!(req, Request::Read { .. });
                assert!(!geo.read_only || writable, "write on a read-only disk");
                assert!(data.len() <= geo.max_data_segments);
                let mut total = 0u64;
                for s in data {
                    assert!(s.len > 0 && s.writable == writable, "{req:?}");
                    assert!(in_memory(&mem, s.addr, u64::from(s.len)));
                    total += u64::from(s.len);
                }
                assert_eq!(total % SECTOR_SIZE, 0);
                inside(*offset, total);
            }
            Request::Flush => {}
            Request::GetId { data } => {
                assert!(!data.is_empty());
                for s in data {
                    assert!(s.len > 0 && s.writable);
                    assert!(in_memory(&mem, s.addr, u64::from(s.len)));
                }
            }
            Request::Discard { ranges } | Request::WriteZeroes { ranges, .. } => {
                assert!(!geo.read_only);
                let max = if matches!(req, Request::Discard { .. }) {
                    geo.max_discard_seg
                } else {
                    geo.max_write_zeroes_seg
                };
                assert!(ranges.len() as u64 <= u64::from(max));
                for b in ranges {
                    assert!(b.len > 0 && b.len <= u64::from(max_sectors) * SECTOR_SIZE);
                    assert_eq!(b.offset % SECTOR_SIZE, 0);
                    inside(b.offset, b.len);
                }
            }
        }
    }
});
