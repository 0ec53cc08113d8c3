//! The virtio-net device: features, config space, queue layout and worker creation.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::VhostUserProtocolFeatures;
use vhost_user_device::device::read_config_bytes;
use vhost_user_device::{DeviceError, QueueWorker, VhostUserDevice};

use crate::ctrl::{CtrlState, CtrlWorker};
use crate::spec::{features, hdr_len, tap_offloads, Config, HDR_LEN, STATUS_LINK_UP};
use crate::stats::NetStats;
use crate::tap::Tap;
use crate::worker::PairWorker;

/// Config space bytes we answer for (reads past our fields return zeroes).
const CONFIG_SPACE_SIZE: usize = 64;

/// Options the device is built from (the command line).
#[derive(Clone, Debug)]
pub struct NetOptions {
    /// Queue pairs (each has an RX and a TX queue and one tap queue).
    pub pairs: u16,
    /// Ring size (power of two).
    pub queue_size: u16,
    /// MAC address in config space.
    pub mac: [u8; 6],
    /// MTU in config space (VIRTIO_NET_F_MTU offered when set).
    pub mtu: Option<u16>,
    /// Offer VIRTIO_NET_F_MRG_RXBUF (on by default; off only for tests).
    pub mrg_rxbuf: bool,
}

/// State shared by the device and its workers.
#[derive(Debug)]
pub struct NetShared {
    /// The host side.
    pub tap: Tap,
    /// Options.
    pub opts: NetOptions,
    /// Counters.
    pub stats: NetStats,
    /// Control queue state (RX mode, filters, MAC).
    pub ctrl: Mutex<CtrlState>,
    /// Queue pairs the driver uses (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET).
    pub active_pairs: AtomicU16,
    attached: Mutex<Vec<bool>>,
}

impl NetShared {
    /// Attaches or detaches the tap queue of `pair`, so the kernel only steers frames to
    /// queues a driver reads. Pair 0 always stays attached.
    pub fn set_attached(&self, pair: u16, on: bool) {
        if pair == 0 {
            return;
        }
        let mut state = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        let (Some(cur), Some(q)) = (
            state.get_mut(usize::from(pair)),
            self.tap.queues.get(usize::from(pair)),
        ) else {
            return;
        };
        if *cur == on {
            return;
        }
        match q.set_attached(on) {
            Ok(()) => {
                *cur = on;
                log::debug!(
                    "tap queue {pair} {}",
                    if on { "attached" } else { "detached" }
                );
            }
            Err(e) => log::warn!(
                "cannot {} tap queue {pair}: {e}",
                if on { "attach" } else { "detach" }
            ),
        }
    }

    /// Sets the tap up for the features the driver acked: the vnet header size and the
    /// offloads the tap may hand us. Called for every negotiation (workers follow a
    /// second SET_FEATURES without RESET_DEVICE).
    pub fn apply_features(&self, acked: u64) -> std::io::Result<()> {
        let hlen = hdr_len(acked);
        self.tap.set_vnet_hdr_len(hlen).map_err(|e| {
            std::io::Error::other(format!("TUNSETVNETHDRSZ {hlen} on {}: {e}", self.tap.name))
        })?;
        let offload = tap_offloads(acked);
        if let Err(e) = self.tap.set_offload(offload) {
            // Older kernels refuse UFO; try without it.
            let without = offload & !crate::spec::tun::TUN_F_UFO;
            if without == offload || self.tap.set_offload(without).is_err() {
                return Err(std::io::Error::other(format!(
                    "TUNSETOFFLOAD {offload:#x} on {}: {e}",
                    self.tap.name
                )));
            }
        }
        Ok(())
    }

    /// Whether the tap queue of `pair` is attached.
    pub fn is_attached(&self, pair: u16) -> bool {
        self.attached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(usize::from(pair))
            .copied()
            .unwrap_or(false)
    }
}

/// The virtio-net device.
pub struct NetDevice {
    shared: Arc<NetShared>,
}

impl NetDevice {
    /// A device on `tap` (which must have `opts.pairs` queues).
    pub fn new(tap: Tap, opts: NetOptions) -> Self {
        let pairs = opts.pairs;
        let n = tap.queues.len();
        Self {
            shared: Arc::new(NetShared {
                tap,
                stats: NetStats::new(pairs),
                ctrl: Mutex::new(CtrlState::new(opts.mac)),
                active_pairs: AtomicU16::new(pairs),
                attached: Mutex::new(vec![true; n]),
                opts,
            }),
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
