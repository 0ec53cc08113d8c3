//! serial-backend: a vhost-user virtio-console device with many ports.
//!
//! - [`spec`]: virtio-console structures, constants and the queue layout;
//! - [`ports`]: the command line's port descriptions and their host sides (pty, unix
//!   socket, file, stdio, hostinfo);
//! - [`hostinfo`]: the JSON document of the `org.hostinfo.0` port;
//! - [`port`]: one port's state (what the guest and we know, bytes held either way);
//! - [`host_poll`]: the ports and the epoll fd that watches their host sides;
//! - [`worker`]: the single queue worker the layer runs, and the dispatch of each ring to
//!   its job: `guest_tx` (guest → host), `guest_rx` (host → guest), `control_queue`
//!   (MULTIPORT's control messages), `host_io` (the ports' host fds), all on the state in
//!   `engine`;
//! - [`stats`]: the device's and each port's counters;
//! - [`shared`]: what the device, its worker and the protocol thread share;
//! - [`device`]: features, config space, worker creation;
//! - [`cli`]: the command line (clap), shared by `main` and the man page generator.

pub mod cli;
pub mod control;
mod control_queue;
pub mod device;
mod engine;
mod guest_rx;
mod guest_tx;
mod host_io;
pub mod host_poll;
pub mod hostinfo;
pub mod port;
pub mod ports;
pub mod seccomp;
pub mod shared;
pub mod spec;
pub mod state;
pub mod stats;
pub mod worker;

pub use device::SerialDevice;
pub use ports::{parse_spec, HostKind, PortSpec};
pub use stats::{Counter, PortStats, SerialStats};
