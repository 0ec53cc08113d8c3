//! `--pin-guest-memory`: guest memory registered as io_uring fixed buffers. Reads and
//! writes through them move the right bytes, memory changes (ADD_MEM_REG, REM_MEM_REG)
//! are registered before I/O lands in the new memory, and a locked-memory limit too low
//! for the guest's RAM gives one clear warning and correct I/O without fixed buffers.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use vhost_blk_backend::spec::{req_type, status};
use vhost_tests::frontend::{Buf, FrontendOptions, TestFrontend};
use vm_memory::{Bytes, GuestAddress};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-blk-backend");

/// Guest RAM small enough for the usual 8 MiB RLIMIT_MEMLOCK, with a 1 MiB DIMM added.
const RAM: u64 = 4 << 20;

fn frontend(b: &TestBackend) -> TestFrontend {
    TestFrontend::connect(
        b.socket(),
        FrontendOptions {
            mem_size: RAM,
            ..FrontendOptions::default()
        },
    )
    .expect("connect")
}

fn fixed_ios(b: &TestBackend) -> u64 {
    b.shared.stats.fixed_buffer_ios.load(Ordering::Relaxed)
}

fn pinned(b: &TestBackend) -> u64 {
    b.shared.pin.as_ref().expect("pinning on").pinned()
}

/// Whether this process may lock `bytes` (the backend checks RLIMIT_MEMLOCK even as
/// root), raising its soft limit (and, as root, the hard one) if needed; else reports
/// the test skipped.
fn memlock_allows(bytes: u64, name: &str) -> bool {
    if vhost_blk_backend::pin::memlock_limit() >= bytes {
        return true;
    }
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a local struct.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) == 0 && {
            r.rlim_cur = bytes;
            r.rlim_max = r.rlim_max.max(bytes);
            libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) == 0
        }
    };
    if !raised {
        let limit = vhost_blk_backend::pin::memlock_limit();
        vhost_tests::guest::report_skip(
            name,
            &format!("RLIMIT_MEMLOCK {limit} < {bytes} and cannot be raised"),
        );
    }
    raised
}

#[test]
fn reads_and_writes_go_through_fixed_buffers_and_follow_memory_changes() {
    let name = "reads_and_writes_go_through_fixed_buffers_and_follow_memory_changes";
    if !memlock_allows(RAM + (1 << 20), name) {
        return;
    }
    let b = TestBackend::start(BackendConfig {
        pin_guest_memory: true,
        ..BackendConfig::default()
    });
    let mut fe = frontend(&b);
    // Single-buffer writes and reads: WRITE_FIXED and READ_FIXED, data checked.
    let block: Vec<u8> = (0..4096u32).map(|i| (i * 13 % 251) as u8).collect();
    assert_eq!(write(&mut fe, 8, &block), status::OK);
    let (data, st) = read(&mut fe, 8, 4096);
    assert_eq!((st, data), (status::OK, block.clone()));
    assert_eq!(b.read_image(8 * 512, 4096), block);
    let (data, st) = read(&mut fe, 100, 8192);
    assert_eq!((st, data), (status::OK, pattern_range(100 * 512, 8192)));
    assert_eq!(
        fixed_ios(&b),
        3,
        "every one-buffer read and write was fixed"
    );
    assert_eq!(pinned(&b), RAM);

    // Reads in flight while a DIMM is plugged in: they complete into the memory they
    // were issued on, and reads into the new region are fixed on the new registration.
    let mut reqs = Vec::new();
    for i in 0..8u64 {
        let r = blk_req(&mut fe, req_type::IN, 200 + i * 8, 4096);
        fe.submit(0, &r.chain(true));
        reqs.push((r, 200 + i * 8));
    }
    let dimm = 64u64 << 20;
    let dimm_mem = fe.add_region(dimm, 1 << 20).expect("ADD_MEM_REG");
    let mut new = Vec::new();
    for i in 0..4u64 {
        let r = blk_req(&mut fe, req_type::IN, 400 + i * 8, 0);
        let at = dimm + i * 8192;
        fe.submit(
            0,
            &[Buf::ro(r.hdr, 16), Buf::wo(at, 4096), Buf::wo(r.status, 1)],
        );
        new.push((r, at, 400 + i * 8));
    }
    fe.wait(0, 12).expect("all twelve complete");
    for (r, sector) in &reqs {
        assert_eq!(r.status(&fe), status::OK);
        assert_eq!(
            fe.read(r.data, 4096),
            pattern_range(sector * 512, 4096),
            "read of sector {sector} issued before the change"
        );
    }
    for (r, at, sector) in &new {
        assert_eq!(r.status(&fe), status::OK);
        let mut got = vec![0u8; 4096];
        dimm_mem.read_slice(&mut got, GuestAddress(*at)).unwrap();
        assert_eq!(got, pattern_range(sector * 512, 4096), "read into the DIMM");
    }
    assert_eq!(fixed_ios(&b), 3 + 12);
    assert_eq!(pinned(&b), RAM + (1 << 20), "the DIMM is registered too");
    // A write from the DIMM, fixed.
    let r = blk_req(&mut fe, req_type::OUT, 600, 0);
    dimm_mem
        .write_slice(&block, GuestAddress(dimm + 0x8000))
        .unwrap();
    fe.submit(
        0,
        &[
            Buf::ro(r.hdr, 16),
            Buf::ro(dimm + 0x8000, 4096),
            Buf::wo(r.status, 1),
        ],
    );
    fe.wait(0, 1).unwrap();
    assert_eq!(r.status(&fe), status::OK);
    assert_eq!(b.read_image(600 * 512, 4096), block);
    assert_eq!(fixed_ios(&b), 16);

    // Unplugged again: the next request registers guest RAM alone.
    fe.remove_region(&dimm_mem, dimm).expect("REM_MEM_REG");
    let (data, st) = read(&mut fe, 8, 4096);
    assert_eq!((st, data), (status::OK, block.clone()));
    assert_eq!((fixed_ios(&b), pinned(&b)), (17, RAM));

    // Two buffers in one request: readv, not fixed, and still right.
    let r = blk_req(&mut fe, req_type::IN, 100, 0);
    let (a, c) = (fe.alloc(2048), fe.alloc(2048));
    fe.submit(
        0,
        &[
            Buf::ro(r.hdr, 16),
            Buf::wo(a, 2048),
            Buf::wo(c, 2048),
            Buf::wo(r.status, 1),
        ],
    );
    fe.wait(0, 1).unwrap();
    assert_eq!(r.status(&fe), status::OK);
    let mut got = fe.read(a, 2048);
    got.extend(fe.read(c, 2048));
    assert_eq!(got, pattern_range(100 * 512, 4096));
    assert_eq!(fixed_ios(&b), 17);
    drop(fe);
    b.stop().expect("clean stop");
}

/// Without the flag nothing is registered and nothing counts as fixed.
#[test]
fn without_the_flag_nothing_is_pinned() {
    let b = TestBackend::start(BackendConfig::default());
    let mut fe = frontend(&b);
    let (data, st) = read(&mut fe, 3, 4096);
    assert_eq!((st, data), (status::OK, pattern_range(3 * 512, 4096)));
    assert!(b.shared.pin.is_none());
    assert_eq!(fixed_ios(&b), 0);
}

/// The backend program under a locked-memory limit below the guest's RAM: one warning
/// with the numbers and what to do, and the guest's I/O is served all the same.
#[test]
fn a_memlock_limit_below_guest_ram_warns_and_serves_without_fixed_buffers() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, pattern_range(0, 1 << 20)).unwrap();
    let sock = dir.path().join("blk.sock");
    let mut cmd = Command::new(BIN);
    cmd.arg("--blk-file")
        .arg(&img)
        .arg("--socket-path")
        .arg(&sock)
        .arg("--pin-guest-memory")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
    unsafe {
        cmd.pre_exec(|| {
            let mut r = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            r.rlim_cur = 1 << 20;
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut fe = TestFrontend::connect(
        &sock,
        FrontendOptions {
            mem_size: RAM,
            ..FrontendOptions::default()
        },
    )
    .unwrap();
    let block = vec![0x5au8; 4096];
    assert_eq!(write(&mut fe, 16, &block), status::OK);
    let (data, st) = read(&mut fe, 16, 4096);
    assert_eq!((st, data), (status::OK, block.clone()));
    let (data, st) = read(&mut fe, 40, 4096);
    assert_eq!((st, data), (status::OK, pattern_range(40 * 512, 4096)));
    drop(fe);
    let err = vhost_tests::control::sigterm_expect_clean_exit(&mut child);
    let on_disk = std::fs::read(&img).unwrap();
    assert_eq!(&on_disk[16 * 512..16 * 512 + 4096], &block[..]);
    let warning = "--pin-guest-memory: guest memory of 4.0 MiB on each of 1 queue worker(s) \
                   (4.0 MiB pinned in all, 4.0 MiB at this point) exceeds RLIMIT_MEMLOCK of \
                   1.0 MiB; serving the disk without io_uring fixed buffers. To pin it, raise \
                   the limit to at least 4.0 MiB (systemd: LimitMEMLOCK=4194304; shell: \
                   ulimit -l 4096";
    assert!(err.contains(warning), "stderr lacks the warning:\n{err}");
    assert_eq!(err.matches("exceeds RLIMIT_MEMLOCK").count(), 1, "{err}");
}
