//! What serial-backend adds to the layer's seccomp lists (see
//! `vhost_user_device::sandbox` and the README's sandbox section).

use vhost_user_device::sandbox::{Allow, Profile, ThreadKind};

/// The console device's calls per thread kind.
pub fn profile() -> Profile {
    Box::new(|kind| match kind {
        // The worker moves bytes between the ports' hosts (ptys, unix sockets, files,
        // stdio) and the rings, accepts socket clients, watches pty window sizes, and
        // reads /proc and uname for the hostinfo port (read-only opens only).
        ThreadKind::Worker => Allow::new()
            .calls(&[
                libc::SYS_read,
                libc::SYS_readv,
                libc::SYS_writev,
                libc::SYS_accept4,
                libc::SYS_accept,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_shutdown,
                libc::SYS_uname,
                libc::SYS_sysinfo,
                // hostinfo's CPU count (available_parallelism).
                libc::SYS_sched_getaffinity,
                libc::SYS_statx,
                libc::SYS_fstat,
                libc::SYS_newfstatat,
                libc::SYS_lseek,
            ])
            // FIONBIO: std's set_nonblocking on an accepted client socket.
            .ioctls(&[
                libc::FIONREAD,
                libc::FIONBIO,
                libc::TIOCGWINSZ,
                libc::TIOCSWINSZ,
            ])
            .arg_masked(
                libc::SYS_openat,
                2,
                (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND) as u64,
                libc::O_RDONLY as u64,
            ),
        _ => Allow::new(),
    })
}
