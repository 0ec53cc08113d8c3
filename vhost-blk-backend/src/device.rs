//! The virtio-blk device: what it offers the driver and how it builds queue workers.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost::vhost_user::VhostUserProtocolFeatures;
use vhost_user_device::device::read_config_bytes;
use vhost_user_device::{DeviceError, QueueWorker, VhostUserDevice, VmmEvent};
use vm_memory::ByteValued;

use crate::disk::Disk;
use crate::shared::VmmState;
use crate::spec::{features, Config, CONFIG_WRITEBACK_OFFSET};
use crate::worker::BlkWorker;

use crate::shared::{BlkOptions, BlkShared};

/// Config space bytes we answer for (reads past our fields return zeroes).
const CONFIG_SPACE_SIZE: usize = 256;

/// The virtio-blk device.
pub struct BlkDevice {
    shared: Arc<BlkShared>,
}

impl BlkDevice {
    /// A device serving `disk`.
    pub fn new(disk: Disk, opts: &BlkOptions) -> Self {
        Self {
            shared: Arc::new(BlkShared::new(disk, opts)),
        }
    }

    /// Shared state (counters, disk).
    pub fn shared(&self) -> &Arc<BlkShared> {
        &self.shared
    }

    /// The config space as the driver sees it now.
    pub fn config(&self) -> Config {
        self.shared.config()
    }
}

impl VhostUserDevice for BlkDevice {
    fn name(&self) -> &str {
        "blk"
    }

    fn num_queues(&self) -> u16 {
        self.shared.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        self.shared.queue_size
    }

    fn features(&self) -> u64 {
        let mut f = features::SEG_MAX
            | features::SIZE_MAX
            | features::BLK_SIZE
            | features::FLUSH
            | features::TOPOLOGY
            | features::CONFIG_WCE
            | features::MQ
            // The layer runs packed rings too (QEMU: `packed=on`).
            | vhost_user_device::packed::VIRTIO_F_RING_PACKED;
        if self.shared.disk.read_only {
            f |= features::RO;
        } else {
            f |= features::DISCARD | features::WRITE_ZEROES;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // Reads, writes, flushes and discards are safe to resubmit after a crash.
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn read_config(&self, offset: u32, buf: &mut [u8]) -> Result<(), DeviceError> {
        read_config_bytes(self.config().as_slice(), CONFIG_SPACE_SIZE, offset, buf)
    }

    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        match (offset, data) {
            (CONFIG_WRITEBACK_OFFSET, [v]) => {
                let on = *v != 0;
                log::info!(
                    "guest set the write cache to {}",
                    if on { "writeback" } else { "writethrough" }
                );
                self.shared.writeback.store(on, Ordering::Relaxed);
                Ok(())
            }
            _ => Err(DeviceError::ConfigAccess {
                offset,
                len: data.len(),
            }),
        }
    }

    fn create_worker(
        &self,
        queues: &[u16],
        acked_features: u64,
    ) -> Result<Box<dyn QueueWorker>, DeviceError> {
        let worker = BlkWorker::new(self.shared.clone(), queues, acked_features)
            .map_err(DeviceError::Worker)?;
        Ok(Box::new(worker))
    }

    fn reset(&self) {
        // A new driver starts with the default cache mode.
        self.shared.writeback.store(true, Ordering::Relaxed);
        // A new VMM (or a reset device) is not migrating anything yet.
        *self.shared.vmm.lock().unwrap_or_else(|e| e.into_inner()) = VmmState::default();
    }

    fn vmm_event(&self, event: VmmEvent) {
        let s = &self.shared;
        let mut v = s.vmm.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            VmmEvent::LogAll(on) => v.log_all = on,
            VmmEvent::RingStopped(q) => v.started &= !(1u64 << (q % 64)),
            VmmEvent::RingStarted(q) => {
                v.started |= 1u64 << (q % 64);
                v.ever_started = true;
                // Rings restarted after the disk was handed over: the VMM's migration
                // did not complete and the VM runs here again. Serve it; the dirty
                // bitmap records what changes from now on, so the next sync to the
                // destination sends exactly that.
                if s.handed_over.load(Ordering::Acquire) {
                    log::warn!(
                        "queue {q} restarted after the hand-over: the VMM's migration did not \
                         complete; serving the disk again (the destination is now stale)"
                    );
                    s.take_back("the VMM's migration did not complete: the VM runs on the source");
                }
            }
        }
    }
}
