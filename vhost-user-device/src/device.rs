//! The traits a device implements to plug into the layer.
//!
//! A device describes itself (features, config space, queues) through [`VhostUserDevice`]
//! and processes its queues through [`QueueWorker`]s: one worker per group of queues, each
//! on its own thread, owning the rings of its group while they are started. A worker may
//! register its own fds (an io_uring eventfd, a tap fd) and keep requests in flight; the
//! layer asks it to finish them before a ring is stopped (GET_VRING_BASE), so the frontend
//! never sees a stopped ring with work outstanding.

use std::io;
use std::os::fd::RawFd;

use vhost::vhost_user::VhostUserProtocolFeatures;

use crate::ring::Rings;

/// Errors a device reports to the layer.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A config space access outside the config space or to a read-only field.
    #[error("config space access at offset {offset} length {len} is not allowed")]
    ConfigAccess {
        /// Offset the frontend gave.
        offset: u32,
        /// Length the frontend gave.
        len: usize,
    },
    /// Setting up a worker's resources failed (io_uring, fds).
    #[error("cannot set up queue worker: {0}")]
    Worker(#[source] io::Error),
    /// The device state of the VMM's migration (DEVICE_STATE) cannot be saved or taken.
    #[error("device state: {0}")]
    State(String),
}

/// Answers a config-space read from the device's current config bytes: `buf` gets the bytes
/// at `offset`, and zeroes past the end of `config` (frontends may read more than a device
/// fills, e.g. QEMU's generic device reads `config_size`). Reads ending past `space_size`
/// are refused.
pub fn read_config_bytes(
    config: &[u8],
    space_size: usize,
    offset: u32,
    buf: &mut [u8],
) -> Result<(), DeviceError> {
    let start = offset as usize;
    if start
        .checked_add(buf.len())
        .is_none_or(|end| end > space_size)
    {
        return Err(DeviceError::ConfigAccess {
            offset,
            len: buf.len(),
        });
    }
    for (i, b) in buf.iter_mut().enumerate() {
        *b = config.get(start + i).copied().unwrap_or(0);
    }
    Ok(())
}

/// A virtio device served over vhost-user.
pub trait VhostUserDevice: Send + Sync + 'static {
    /// Short name for logs and thread names ("blk", "net", "console").
    fn name(&self) -> &str;

    /// Number of virtqueues.
    fn num_queues(&self) -> u16;

    /// Largest ring size the device accepts (a power of two).
    fn max_queue_size(&self) -> u16;

    /// Device and transport virtio feature bits offered. The layer adds
    /// VHOST_USER_F_PROTOCOL_FEATURES, VHOST_F_LOG_ALL, VIRTIO_F_VERSION_1,
    /// VIRTIO_RING_F_INDIRECT_DESC and VIRTIO_RING_F_EVENT_IDX, which it implements.
    fn features(&self) -> u64;

    /// Protocol features the device needs beyond the ones the layer always offers (MQ,
    /// LOG_SHMFD, REPLY_ACK, RESET_DEVICE, CONFIGURE_MEM_SLOTS, BACKEND_REQ). For example
    /// CONFIG, INFLIGHT_SHMFD (only for devices whose requests are safe to resubmit), MTU.
    fn protocol_features(&self) -> VhostUserProtocolFeatures;

    /// Reads `buf.len()` bytes of config space at `offset`.
    fn read_config(&self, offset: u32, buf: &mut [u8]) -> Result<(), DeviceError>;

    /// Writes config space (only fields the driver may write).
    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        Err(DeviceError::ConfigAccess {
            offset,
            len: data.len(),
        })
    }

    /// Which queues share a worker thread. Default: one worker per queue.
    fn worker_groups(&self) -> Vec<Vec<u16>> {
        (0..self.num_queues()).map(|q| vec![q]).collect()
    }

    /// Creates the worker for a group of queues, with the features the driver acked.
    fn create_worker(
        &self,
        queues: &[u16],
        acked_features: u64,
    ) -> Result<Box<dyn QueueWorker>, DeviceError>;

    /// The frontend reset the device or went away: drop per-connection state.
    fn reset(&self) {}

    /// What the VMM does that tells a device about the VM's own migration (a backend
    /// moving its state elsewhere needs to know when the guest is paused for the
    /// switch-over). Default: ignored.
    fn vmm_event(&self, _event: VmmEvent) {}

    /// Whether the device has internal state to move inside the VMM's migration stream
    /// (VHOST_USER_PROTOCOL_F_DEVICE_STATE). Default: no.
    fn migrates_state(&self) -> bool {
        false
    }

    /// The device's state, every ring stopped: `parts` holds what each running worker's
    /// [`QueueWorker::save_state`] gave, in group order (empty when none runs).
    fn save_state(&self, _parts: Vec<Vec<u8>>) -> Result<Vec<u8>, DeviceError> {
        Err(DeviceError::State(
            "this device has no state to save".into(),
        ))
    }

    /// Takes a state a peer saved, before the rings start (the VMM's migration
    /// destination). The bytes come from the VMM: check everything.
    fn load_state(&self, _state: &[u8]) -> Result<(), DeviceError> {
        Err(DeviceError::State(
            "this device has no state to load".into(),
        ))
    }
}

/// The VMM's migration-related actions, as the layer sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmmEvent {
    /// VHOST_F_LOG_ALL acked (true: the VMM is migrating RAM) or cleared.
    LogAll(bool),
    /// A ring started (kick set); after a stop on the same connection this means the VM
    /// runs here again.
    RingStarted(u16),
    /// GET_VRING_BASE stopped a ring: the VMM paused it (any stop, pause or migration).
    RingStopped(u16),
}

/// Processes the queues of one group on one thread.
pub trait QueueWorker: Send {
    /// Extra fds to wait on; readiness of fd `i` calls [`QueueWorker::handle_event`]
    /// with `i`. Asked once when the worker starts.
    fn event_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// Ring `queue` was kicked, started or enabled: process what the guest made available
    /// on it. `rings` holds every started ring of the worker's group, so a device whose
    /// queues depend on each other (a reply on another queue, a control message) can act
    /// on them at once; `rings.get_mut(queue)` is started, enabled and not broken, and the
    /// layer began a new round on it ([`crate::Ring::begin_round`]).
    fn process_queue(&mut self, queue: u16, rings: &mut Rings);

    /// One of [`QueueWorker::event_fds`] is readable (the worker consumes it).
    fn handle_event(&mut self, _fd_index: usize, _rings: &mut Rings) {}

    /// Requests of `queue` taken from the ring and not yet put on the used ring.
    fn in_flight(&self, _queue: u16) -> usize {
        0
    }

    /// Blocks until at least one in-flight request completes, and completes it (used
    /// ring, dirty log, notification). Called only while `in_flight` is non-zero. An
    /// error does not end a ring stop: the layer logs it and calls again after a pause,
    /// until `in_flight` is zero.
    fn wait_completions(&mut self, _rings: &mut Rings) -> io::Result<()> {
        Ok(())
    }

    /// Adaptive polling: after an event, keep checking for the next one (kicks,
    /// completions) for this long before sleeping. None (the default): always sleep. It
    /// saves a sleep and a wake-up per batch at high load, and costs up to this much CPU
    /// per idle gap, so it is for hosts with cores to spare. Asked once at start.
    fn poll_duration(&self) -> Option<std::time::Duration> {
        None
    }

    /// This worker's part of the device state for the VMM's migration (DEVICE_STATE),
    /// asked on the worker's thread once every ring is stopped. Default: none.
    fn save_state(&mut self) -> Option<Vec<u8>> {
        None
    }
}
