//! The vhost-user device layer shared by the project's backends.
//!
//! # Why our own layer
//!
//! rust-vmm's `vhost-user-backend` 0.24 is close, but it cannot do four things every backend
//! here needs: it has no hook to finish in-flight requests before answering GET_VRING_BASE
//! (an io_uring backend would let the frontend read a used index that is still moving), it
//! has no inflight tracking (INFLIGHT_SHMFD), regions added after SET_LOG_BASE are never
//! logged, and clearing VHOST_F_LOG_ALL does not stop logging. Patching it would mean
//! forking its private handler. Instead this crate implements the vhost crate's
//! [`vhost::vhost_user::VhostUserBackendReqHandlerMut`] directly (message parsing and
//! validation stay in `vhost`) and owns the rest:
//!
//! - [`server`]: listening on `--socket-path` or `--fd`, one connection after another,
//!   SIGTERM/SIGINT handling that drains in-flight I/O before exiting;
//! - [`handler`]: the per-connection protocol state machine;
//! - [`memory`] and [`dirty_log`]: guest memory regions (SET_MEM_TABLE, ADD/REM_MEM_REG)
//!   sharing one dirty log, which covers late regions and honours LOG_ALL on and off;
//! - [`ring`], [`chain`]: started rings (and [`Rings`], a worker's group of them; chains a
//!   device did not use go back with [`Ring::give_back`]) and a descriptor-chain walker
//!   that checks every index, length and address the guest gives; [`chain_io`]: a chain's
//!   buffers as `io::Read` and `io::Write`, for headers, statuses and replies;
//!   [`packed`]: the packed ring format (VIRTIO_F_RING_PACKED), which [`ring::Ring`]
//!   dispatches to when it was negotiated;
//! - [`ring_pass`]: the loop every consumer of a driver-to-device ring needs (kicks off
//!   while taking chains, a budget, kicks back on only after a last look at an empty ring);
//! - [`inflight`]: the INFLIGHT_SHMFD region and the resubmission of chains a previous
//!   backend process left in flight;
//! - [`worker`] and [`device`]: worker threads and the two traits devices implement;
//! - [`iovec`] and [`engine`]: typed iovec lists that own what they point into, and the
//!   two I/O engines (io_uring, inline) whose operations own their buffers until the
//!   kernel is done with them;
//! - [`control`] and [`qmp_events`]: the QMP control socket and the events it sends;
//! - [`sandbox`]: the per-thread seccomp filters (`--sandbox`).
//!
//! Devices describe themselves with [`device::VhostUserDevice`] and process queues in a
//! [`device::QueueWorker`] (`process_queue(queue, rings)`: the kicked queue, with every
//! ring of the group at hand); a worker owns its rings while they run, so the data path takes
//! no locks, and the protocol thread talks to it through a command channel (start, enable,
//! new call fd, stop-after-drain).

pub mod chain;
pub mod chain_io;
pub mod control;
pub mod counter;
pub mod device;
pub mod dirty_log;
pub mod engine;
pub mod fd_check;
pub mod handler;
pub mod histogram;
pub mod inflight;
pub mod iovec;
pub mod memory;
pub mod metrics;
pub mod packed;
pub mod program;
pub mod qmp_events;
pub mod rate_limit;
pub mod ring;
pub mod ring_pass;
pub mod sandbox;
#[cfg(target_arch = "x86_64")]
mod sandbox_names;
pub mod server;
pub mod worker;

pub use chain::{Chain, Origin, Segment};
pub use chain_io::{ChainReader, ChainWriter};
pub use device::{DeviceError, QueueWorker, VhostUserDevice, VmmEvent};
pub use engine::{Completion, Engine, EngineChoice, EngineKind, Op, Pushed};
pub use iovec::{AlignedBuf, IovecList};
pub use memory::{GuestMem, GuestMemAtomic};
pub use ring::{QueueStats, Ring, Rings};
pub use ring_pass::{PassEnd, RingPass};
pub use server::{Server, ServerError, Shutdown};

/// The README's example device, compiled as a doctest (`cargo test -p vhost-user-device
/// --doc`) so that it keeps matching the traits it shows.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
