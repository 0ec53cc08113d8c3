//! Dirty block tracking for block migration: every completed write, discard and
//! write-zeroes marks exactly the blocks it touched (reads and flushes mark nothing), and
//! the persistent bitmap (`--dirty-bitmap`) survives a clean exit but not a kill.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vhost_blk_backend::dirty::DirtyBitmap;
use vhost_blk_backend::dirty_file::{DirtyFile, Loaded};
use vhost_blk_backend::spec::{req_type, status, WRITE_ZEROES_FLAG_UNMAP};
use vhost_tests::frontend::{FrontendOptions, TestFrontend};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-blk-backend");

fn dirty_blocks(b: &DirtyBitmap) -> Vec<u64> {
    (0..b.blocks()).filter(|&i| b.is_dirty(i)).collect()
}

#[test]
fn completed_writes_discards_and_write_zeroes_mark_exactly_their_blocks() {
    let b = TestBackend::start(BackendConfig::default());
    let dirty = b.shared.dirty.clone();
    assert_eq!(dirty.granularity(), 4096);
    let mut fe = TestFrontend::connect(b.socket(), FrontendOptions::default()).expect("connect");
    // Reads and flushes change nothing.
    assert_eq!(read(&mut fe, 0, 64 << 10).1, status::OK);
    let r = blk_req(&mut fe, req_type::FLUSH, 0, 0);
    assert_eq!(run(&mut fe, 0, &r, false).1, status::OK);
    assert_eq!(dirty.count(), 0);
    // A 512-byte write inside block 2; a write straddling blocks 4 and 5.
    assert_eq!(write(&mut fe, 2 * 8 + 3, &[1; 512]), status::OK);
    assert_eq!(write(&mut fe, 4 * 8 + 7, &[2; 1024]), status::OK);
    assert_eq!(dirty_blocks(&dirty), vec![2, 4, 5]);
    // Discard of blocks 10..=11, write-zeroes of 20 (with unmap) and 30..=32 (without).
    assert_eq!(
        range_request(&mut fe, req_type::DISCARD, &[(80, 16, 0)]),
        status::OK
    );
    assert_eq!(
        range_request(
            &mut fe,
            req_type::WRITE_ZEROES,
            &[(160, 8, WRITE_ZEROES_FLAG_UNMAP)]
        ),
        status::OK
    );
    assert_eq!(
        range_request(&mut fe, req_type::WRITE_ZEROES, &[(240, 24, 0)]),
        status::OK
    );
    assert_eq!(dirty_blocks(&dirty), vec![2, 4, 5, 10, 11, 20, 30, 31, 32]);
    // A refused write (past the end) reaches no block and marks none.
    let size_sectors = b.shared.disk.size / 512;
    assert_eq!(write(&mut fe, size_sectors, &[3; 512]), status::IOERR);
    assert_eq!(dirty.count(), 9);
}

fn image(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("disk.img");
    std::fs::write(&p, pattern_range(0, 1 << 20)).unwrap();
    p
}

fn start(dir: &Path, img: &Path, bitmap: &Path) -> (Child, std::path::PathBuf) {
    let sock = dir.join("blk.sock");
    let _ = std::fs::remove_file(&sock);
    let child = Command::new(BIN)
        .arg("--blk-file")
        .arg(img)
        .arg("--socket-path")
        .arg(&sock)
        .arg("--dirty-bitmap")
        .arg(bitmap)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "backend never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    (child, sock)
}

fn stop(child: Child, signal: i32) -> String {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, signal) };
    let out = child.wait_with_output().unwrap();
    if signal == libc::SIGTERM {
        assert!(out.status.success(), "exit status {:?}", out.status);
    }
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_bitmap_file_survives_a_clean_exit_and_a_kill_makes_everything_dirty() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let bm = dir.path().join("disk.dirty");

    // 1. New file; a write to block 3; clean exit: the file holds exactly block 3.
    let (child, sock) = start(dir.path(), &img, &bm);
    let mut fe = TestFrontend::connect(&sock, FrontendOptions::default()).unwrap();
    assert_eq!(write(&mut fe, 3 * 8, &[7; 4096]), status::OK);
    drop(fe);
    let log = stop(child, libc::SIGTERM);
    assert!(log.contains("new dirty bitmap"), "{log}");
    let (f, b, cp, loaded) = DirtyFile::open(&bm, 1 << 20, 4096).unwrap();
    assert_eq!(loaded, Loaded::Trusted);
    assert_eq!(dirty_blocks(&b), vec![3]);
    // (Opening it marked it in use; write it back clean for the backend.)
    f.save(&b, &cp, false).unwrap();

    // 2. Restarted: it keeps block 3 and adds block 9; then SIGKILL.
    let (child, sock) = start(dir.path(), &img, &bm);
    let mut fe = TestFrontend::connect(&sock, FrontendOptions::default()).unwrap();
    assert_eq!(write(&mut fe, 9 * 8, &[8; 512]), status::OK);
    drop(fe);
    let log = stop(child, libc::SIGKILL);
    assert!(log.contains("4096 bytes changed since"), "{log}");

    // 3. After the kill nothing it says can be trusted: the whole disk is dirty, and the
    //    backend says why; the identity stays.
    let (child, _sock) = start(dir.path(), &img, &bm);
    let log = stop(child, libc::SIGTERM);
    assert!(
        log.contains("in use when the backend last stopped")
            && log.contains("whole disk counts as changed"),
        "{log}"
    );
    let (_f, b, cp2, loaded) = DirtyFile::open(&bm, 1 << 20, 4096).unwrap();
    assert_eq!(loaded, Loaded::Trusted);
    assert_eq!(b.count(), b.blocks());
    assert_eq!(cp2, cp);
}
