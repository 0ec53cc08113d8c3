//! The virtio-net device: features, config space, queue layout and worker creation.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost::vhost_user::VhostUserProtocolFeatures;
use vhost_user_device::device::read_config_bytes;
use vhost_user_device::{DeviceError, QueueWorker, VhostUserDevice};

use crate::ctrl::CtrlWorker;
use crate::shared::{CtrlState, NetOptions, NetShared};
use crate::spec::{features, Config, HDR_LEN, STATUS_LINK_UP};
use crate::tap::Tap;
use crate::worker::PairWorker;

/// Config space bytes we answer for (reads past our fields return zeroes).
const CONFIG_SPACE_SIZE: usize = 64;

/// The virtio-net device.
pub struct NetDevice {
    shared: Arc<NetShared>,
}

impl NetDevice {
    /// A device on `tap` (which must have `opts.pairs` queues).
    pub fn new(tap: Tap, opts: NetOptions) -> Self {
        Self {
            shared: Arc::new(NetShared::new(tap, opts)),
        }
    }

    /// Shared state (counters, tap).
    pub fn shared(&self) -> &Arc<NetShared> {
        &self.shared
    }

    /// Index of the control queue.
    pub fn ctrl_queue(&self) -> u16 {
        2 * self.shared.opts.pairs
    }

    /// The config space as the driver sees it now.
    pub fn config(&self) -> Config {
        let o = &self.shared.opts;
        let mac = self.shared.ctrl.lock().map(|c| c.mac).unwrap_or(o.mac);
        Config {
            mac,
            status: STATUS_LINK_UP,
            max_virtqueue_pairs: o.pairs,
            mtu: o.mtu.unwrap_or(0),
        }
    }
}

impl VhostUserDevice for NetDevice {
    fn name(&self) -> &str {
        "net"
    }

    fn num_queues(&self) -> u16 {
        2 * self.shared.opts.pairs + 1
    }

    fn max_queue_size(&self) -> u16 {
        self.shared.opts.queue_size
    }

    fn features(&self) -> u64 {
        use features as f;
        let o = &self.shared.opts;
        let mut feat = f::CSUM
            | f::GUEST_CSUM
            | f::GUEST_TSO4
            | f::GUEST_TSO6
            | f::GUEST_ECN
            | f::GUEST_UFO
            | f::HOST_TSO4
            | f::HOST_TSO6
            | f::HOST_ECN
            | f::HOST_UFO
            | f::MAC
            | f::STATUS
            | f::CTRL_VQ
            | f::CTRL_RX
            | f::CTRL_MAC_ADDR
            | f::GUEST_ANNOUNCE
            // The layer runs packed rings too (QEMU: `packed=on`).
            | vhost_user_device::packed::VIRTIO_F_RING_PACKED;
        if o.mrg_rxbuf {
            feat |= f::MRG_RXBUF;
        }
        if o.mtu.is_some() {
            feat |= f::MTU;
        }
        if o.pairs > 1 {
            feat |= f::MQ;
        }
        feat
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // Never RARP or NET_MTU: the vhost crate's request handler does not dispatch them.
        // No INFLIGHT_SHMFD: a frame sent twice after a crash is worse than one lost.
        VhostUserProtocolFeatures::CONFIG
    }

    fn read_config(&self, offset: u32, buf: &mut [u8]) -> Result<(), DeviceError> {
        read_config_bytes(&self.config().to_bytes(), CONFIG_SPACE_SIZE, offset, buf)
    }

    fn worker_groups(&self) -> Vec<Vec<u16>> {
        let pairs = self.shared.opts.pairs;
        let mut groups: Vec<Vec<u16>> = (0..pairs).map(|p| vec![2 * p, 2 * p + 1]).collect();
        groups.push(vec![2 * pairs]);
        groups
    }

    fn create_worker(
        &self,
        queues: &[u16],
        acked_features: u64,
    ) -> Result<Box<dyn QueueWorker>, DeviceError> {
        let first = queues.first().copied().unwrap_or(0);
        if first == self.ctrl_queue() {
            let worker = CtrlWorker::new(self.shared.clone(), first, acked_features)
                .map_err(DeviceError::Worker)?;
            return Ok(Box::new(worker));
        }
        self.shared
            .apply_features(acked_features)
            .map_err(DeviceError::Worker)?;
        let worker = PairWorker::new(self.shared.clone(), first / 2, acked_features)
            .map_err(DeviceError::Worker)?;
        Ok(Box::new(worker))
    }

    fn reset(&self) {
        let s = &self.shared;
        if let Ok(mut c) = s.ctrl.lock() {
            *c = CtrlState::new(s.opts.mac);
        }
        s.active_pairs.store(s.opts.pairs, Ordering::Relaxed);
        for p in 0..s.opts.pairs {
            s.set_attached(p, true);
        }
        let _ = s.tap.set_offload(0);
        let _ = s.tap.set_vnet_hdr_len(HDR_LEN);
    }
}
