//! What vhost-blk-backend adds to the layer's seccomp lists (see
//! `vhost_user_device::sandbox` and the README's sandbox section).

use vhost_user_device::sandbox::{Allow, Profile, ThreadKind};

/// The block device's calls per thread kind. `dirty_file`: `--dirty-bitmap` was given,
/// so the main thread writes the bitmap file at exit (a new file renamed over the old).
pub fn profile(dirty_file: bool) -> Profile {
    Box::new(move |kind| match kind {
        // Each worker's io_uring is created by the main thread (setup, registering the
        // disk and the eventfd); the worker enables it and runs it. Memory-backed disks
        // (tmpfs) are read and written inline with preadv2/pwritev2; flush, discard and
        // write-zeroes fall back to fdatasync and fallocate.
        ThreadKind::Worker => Allow::new().calls(&[
            libc::SYS_io_uring_enter,
            libc::SYS_io_uring_register,
            libc::SYS_preadv2,
            libc::SYS_pwritev2,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_fallocate,
            libc::SYS_fdatasync,
            libc::SYS_fsync,
        ]),
        ThreadKind::Main => {
            let a = Allow::new().calls(&[libc::SYS_io_uring_setup]);
            if dirty_file {
                a.calls(&[
                    libc::SYS_openat,
                    libc::SYS_rename,
                    libc::SYS_renameat,
                    libc::SYS_renameat2,
                ])
            } else {
                a
            }
        }
        _ => Allow::new(),
    })
}
