//! vhost-net-backend: a vhost-user virtio-net device on a tap or macvtap interface.
//!
//! - [`spec`]: virtio-net structures, feature bits, header checks, tap ioctls;
//! - [`tap`]: opening the tap (multi-queue, vnet header) or a macvtap's `/dev/tapN`;
//! - [`uring`]: the transmit io_uring (batched writev straight from guest memory);
//! - [`worker`]: one worker per queue pair (TX, RX, backpressure, dirty logging);
//! - [`ctrl`]: the control queue (RX mode, MAC filter, queue pairs);
//! - [`stats`]: per-queue counters;
//! - [`device`]: features, config space, queue layout, worker creation;
//! - [`shared`]: what the device and its workers share (options, tap, counters, control
//!   queue state);
//! - [`cli`]: the command line (clap), shared by `main` and the man page generator.

pub mod cli;
pub mod control;
pub mod ctrl;
pub mod device;
pub mod seccomp;
pub mod shared;
pub mod spec;
pub mod stats;
pub mod tap;
pub mod uring;
pub mod worker;

pub use device::NetDevice;
pub use shared::{NetOptions, NetShared};
pub use tap::{Tap, TapSpec};
