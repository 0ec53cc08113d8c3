//! vhost-blk-backend: a vhost-user virtio-blk device on a raw image or block device.
//!
//! - [`spec`]: virtio-blk structures and constants;
//! - [`disk`]: opening the image (O_DIRECT where possible), size and alignment;
//! - [`request`]: parsing and checking a descriptor chain into a [`request::Request`];
//! - [`worker`]: the queue worker (zero-copy submission on the layer's I/O engine,
//!   completion, dirty logging);
//! - [`device`]: features, config space, worker creation;
//! - [`shared`]: what the device and its workers share (limits, counters, the disk's
//!   migration state, the gate that holds requests);
//! - [`throttle`]: the I/O limits' token buckets; [`throttle_client`]: the
//!   `set-io-throttle` subcommand;
//! - [`mirror`]: active mirroring for a migration in write-blocking mode;
//! - [`pin`]: `--pin-guest-memory`, guest memory as io_uring fixed buffers within
//!   RLIMIT_MEMLOCK;
//! - [`cli`]: the command line (clap), shared by `main` and the man page generator.

pub mod cli;
pub mod control;
pub mod device;
pub mod dirty;
pub mod dirty_file;
pub mod disk;
pub mod migration;
pub mod mirror;
pub mod pin;
pub mod request;
pub mod seccomp;
pub mod shared;
pub mod spec;
pub mod throttle;
pub mod throttle_client;
pub mod worker;

pub use device::BlkDevice;
pub use disk::{CacheMode, Disk};
pub use shared::BlkOptions;
