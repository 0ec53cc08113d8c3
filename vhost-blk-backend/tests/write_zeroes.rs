//! WRITE_ZEROES must mean zeros: where the file system or device cannot zero or deallocate
//! a range (fallocate says EOPNOTSUPP for every mode on ramfs; a block device without
//! write-zeroes support refuses a punched hole), the backend writes zeros. A success status
//! with the old data still there is the defect these tests catch.
//!
//! They mount a ramfs (and attach a loop device), so they need root; without it they
//! print a loud SKIPPED and count as skipped.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;

use common::*;
use vhost_blk_backend::spec::{req_type, status, WRITE_ZEROES_FLAG_UNMAP};
use vhost_tests::frontend::{FrontendOptions, TestFrontend};

const SIZE: u64 = 16 << 20;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A ramfs mounted on a fresh directory, unmounted (lazily) on drop.
struct Ramfs {
    dir: tempfile::TempDir,
}

impl Ramfs {
    fn mount() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = CString::new(dir.path().as_os_str().as_bytes()).expect("path");
        // SAFETY: valid NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(
                c"ramfs".as_ptr(),
                target.as_ptr(),
                c"ramfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "mount ramfs: {}", std::io::Error::last_os_error());
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        let target = CString::new(self.dir.path().as_os_str().as_bytes()).expect("path");
        // SAFETY: valid NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// A loop device over `file`, detached on drop.
struct LoopDevice(PathBuf);

impl LoopDevice {
    fn attach(file: &Path) -> Self {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(PathBuf::from(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        ))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// An image of SIZE bytes of the test pattern at `path`.
fn make_image(path: &Path) {
    let f = std::fs::File::create(path).expect("create image");
    f.write_all_at(&pattern_range(0, SIZE as usize), 0)
        .expect("fill image");
}

/// Zeroes 2 MiB with and 3 MiB without UNMAP, each crossing the 1 MiB buffer of zeros
/// unevenly, and checks that the guest and `read_back` (the image's bytes) see zeros
/// there and the pattern around.
fn check_zeroing(b: &TestBackend, read_back: &dyn Fn(u64, usize) -> Vec<u8>) {
    let mut fe = TestFrontend::connect(b.socket(), FrontendOptions::default()).expect("connect");
    for (sector, sectors, flags) in [
        (2048u64, 4096u32 + 7, WRITE_ZEROES_FLAG_UNMAP),
        (16384, 6144 + 9, 0),
    ] {
        let what = if flags == 0 { "without" } else { "with" };
        assert_eq!(
            range_request(&mut fe, req_type::WRITE_ZEROES, &[(sector, sectors, flags)]),
            status::OK,
            "write-zeroes {what} UNMAP"
        );
        let (off, len) = (sector * 512, sectors as usize * 512);
        // Through the backend, in chunks the test frontend's memory holds.
        for at in (0..len).step_by(512 << 10) {
            let n = (len - at).min(512 << 10);
            let (data, st) = read(&mut fe, sector + (at / 512) as u64, n as u32);
            assert_eq!(st, status::OK);
            assert!(
                data.iter().all(|&x| x == 0),
                "guest reads non-zero data at byte {} of a range zeroed {what} UNMAP",
                at + data.iter().position(|&x| x != 0).unwrap_or(0)
            );
        }
        let host = read_back(off, len);
        assert!(
            host.iter().all(|&x| x == 0),
            "the image holds non-zero data at byte {} of a range zeroed {what} UNMAP",
            host.iter().position(|&x| x != 0).unwrap_or(0)
        );
        assert_eq!(read_back(off - 512, 512), pattern_range(off - 512, 512));
        assert_eq!(
            read_back(off + len as u64, 512),
            pattern_range(off + len as u64, 512)
        );
    }
}

#[test]
fn write_zeroes_on_ramfs_reads_back_as_zeros() {
    if !is_root() {
        vhost_tests::guest::report_skip(
            "write_zeroes_on_ramfs_reads_back_as_zeros",
            "needs root (mounts a ramfs)",
        );
        return;
    }
    let ramfs = Ramfs::mount();
    let image = ramfs.path().join("disk.img");
    make_image(&image);
    let dir = tempfile::tempdir().expect("tempdir");
    let b = TestBackend::start_on(
        dir,
        image.clone(),
        BackendConfig {
            size: SIZE,
            ..Default::default()
        },
    );
    let f = std::fs::File::open(&image).expect("open image");
    check_zeroing(&b, &|off, len| {
        let mut v = vec![0u8; len];
        f.read_exact_at(&mut v, off).expect("read image");
        v
    });
    assert!(
        b.shared.disk.zero_by_writing.load(Ordering::Relaxed),
        "the backend should have learned that fallocate cannot zero on ramfs"
    );
    b.stop().expect("clean stop");
}

/// A loop device whose backing file is on ramfs: the loop driver then offers no
/// write-zeroes, so a punched hole (WRITE_ZEROES with UNMAP) is refused by the block layer.
#[test]
fn write_zeroes_on_a_block_device_without_write_zeroes_support() {
    if !is_root() {
        vhost_tests::guest::report_skip(
            "write_zeroes_on_a_block_device_without_write_zeroes_support",
            "needs root (mounts a ramfs, attaches a loop device)",
        );
        return;
    }
    let ramfs = Ramfs::mount();
    let backing = ramfs.path().join("backing.img");
    make_image(&backing);
    let dev = LoopDevice::attach(&backing);
    let dir = tempfile::tempdir().expect("tempdir");
    let b = TestBackend::start_on(
        dir,
        dev.0.clone(),
        BackendConfig {
            size: SIZE,
            ..Default::default()
        },
    );
    assert!(b.shared.disk.is_block_device);
    let f = std::fs::File::open(&backing).expect("open backing file");
    check_zeroing(&b, &|off, len| {
        let mut v = vec![0u8; len];
        f.read_exact_at(&mut v, off).expect("read backing file");
        v
    });
    b.stop().expect("clean stop");
}
