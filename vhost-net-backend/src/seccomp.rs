//! What vhost-net-backend adds to the layer's seccomp lists (see
//! `vhost_user_device::sandbox` and the README's sandbox section).

use vhost_user_device::sandbox::{Allow, Profile, ThreadKind};

use crate::spec::tun;

/// The net device's calls per thread kind.
pub fn profile() -> Profile {
    Box::new(|kind| match kind {
        // TX: io_uring writev to the tap queue; RX: readv straight into guest buffers.
        // Enabling and disabling a queue pair attaches or detaches its tap queue.
        ThreadKind::Worker => Allow::new()
            .calls(&[
                libc::SYS_io_uring_enter,
                libc::SYS_io_uring_register,
                libc::SYS_readv,
                libc::SYS_writev,
                libc::SYS_read,
            ])
            .ioctls(&[tun::TUNSETQUEUE]),
        // The workers' io_uring are set up here; SET_FEATURES and the control queue's
        // offload commands set the tap's vnet header size and offloads.
        ThreadKind::Main => Allow::new().calls(&[libc::SYS_io_uring_setup]).ioctls(&[
            tun::TUNSETOFFLOAD,
            tun::TUNSETVNETHDRSZ,
            tun::TUNSETQUEUE,
        ]),
        _ => Allow::new(),
    })
}
