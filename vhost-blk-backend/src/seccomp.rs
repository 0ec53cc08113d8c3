//! What vhost-blk-backend adds to the layer's seccomp lists (see
//! `vhost_user_device::sandbox` and the README's sandbox section).

use vhost_user_device::sandbox::{Allow, Profile, ThreadKind};

/// The block device's calls per thread kind. `dirty_file`: `--dirty-bitmap` was given,
/// so the main thread writes the bitmap file at exit (a new file renamed over the old).
pub fn profile(dirty_file: bool) -> Profile {
    Box::new(move |kind| match kind {
        // Each worker's io_uring and throttle timer are created by the main thread (setup,
        // registering the disk and the eventfd); the worker enables it and runs it. Memory-backed disks
        // are read and written inline with preadv2/pwritev2 (on tmpfs through a mapping the
        // main thread made, probing for holes with mincore); flush, discard and write-zeroes fall
        // back to fdatasync and fallocate.
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
            libc::SYS_mincore,
            // The I/O throttle's timer (created with the worker, by the main thread).
            libc::SYS_timerfd_settime,
        ]),
        ThreadKind::Main => {
            let a = Allow::new().calls(&[libc::SYS_io_uring_setup, libc::SYS_timerfd_create]);
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
        // A block migration, either end: the source connects (unix, TCP, or an inherited
        // fd), reads the image through its own descriptor, and saves the dirty bitmap's
        // checkpoint; the destination accepts, writes and zeroes ranges, syncs, and marks
        // its bitmap file incomplete while it copies.
        ThreadKind::Job => Allow::new()
            .calls(&[
                libc::SYS_connect,
                libc::SYS_accept4,
                libc::SYS_accept,
                libc::SYS_poll,
                libc::SYS_ppoll,
                libc::SYS_read,
                libc::SYS_readv,
                libc::SYS_recvfrom,
                libc::SYS_recvmsg,
                libc::SYS_sendto,
                libc::SYS_sendmsg,
                libc::SYS_shutdown,
                libc::SYS_getsockopt,
                libc::SYS_setsockopt,
                libc::SYS_getsockname,
                libc::SYS_getpeername,
                libc::SYS_openat,
                libc::SYS_fstat,
                libc::SYS_newfstatat,
                libc::SYS_statx,
                libc::SYS_lseek,
                libc::SYS_pread64,
                libc::SYS_preadv,
                libc::SYS_preadv2,
                libc::SYS_pwrite64,
                libc::SYS_pwritev,
                libc::SYS_pwritev2,
                libc::SYS_fallocate,
                libc::SYS_fdatasync,
                libc::SYS_fsync,
                libc::SYS_ftruncate,
                libc::SYS_rename,
                libc::SYS_renameat,
                libc::SYS_renameat2,
                libc::SYS_unlink,
                libc::SYS_unlinkat,
            ])
            .arg_in(
                libc::SYS_socket,
                0,
                &[
                    libc::AF_UNIX as u64,
                    libc::AF_INET as u64,
                    libc::AF_INET6 as u64,
                ],
            )
            .ioctls(&[libc::FIONBIO])
            .fcntl_basic(),
        _ => Allow::new(),
    })
}
