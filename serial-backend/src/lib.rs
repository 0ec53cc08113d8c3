//! serial-backend: a vhost-user virtio-console device with many ports.
//!
//! - [`spec`]: virtio-console structures, constants and the queue layout;
//! - [`ports`]: the command line's port descriptions and their host sides (pty, unix
//!   socket, file, stdio, hostinfo);
//! - [`hostinfo`]: the JSON document of the `org.hostinfo.0` port;
//! - [`worker`]: the single queue worker (control handshake, data both ways, host fds);
//! - [`device`]: features, config space, worker creation;
//! - [`cli`]: the command line (clap), shared by `main` and the man page generator.

pub mod cli;
pub mod control;
pub mod device;
pub mod hostinfo;
pub mod ports;
pub mod seccomp;
pub mod spec;
pub mod state;
pub mod worker;

pub use device::{Counter, PortStats, SerialDevice, SerialStats};
pub use ports::{parse_spec, HostKind, PortSpec};
