//! What the device and its workers share: the options, the tap, the counters and the
//! control queue's state ([`NetShared`]).
//!
//! It lives apart from `device` (features, config space, worker creation) and the workers
//! (`worker`, `ctrl`) so that each of those depends on it and none on another.

use std::sync::atomic::AtomicU16;
use std::sync::Mutex;

use crate::spec::{hdr_len, tap_offloads};
use crate::stats::NetStats;
use crate::tap::Tap;

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
    /// The state of a device on `tap` (which must have `opts.pairs` queues).
    pub fn new(tap: Tap, opts: NetOptions) -> Self {
        let pairs = opts.pairs;
        let n = tap.queues.len();
        Self {
            tap,
            stats: NetStats::new(pairs),
            ctrl: Mutex::new(CtrlState::new(opts.mac)),
            active_pairs: AtomicU16::new(pairs),
            attached: Mutex::new(vec![true; n]),
            opts,
        }
    }

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

/// What the driver configured through the control queue.
#[derive(Clone, Debug, Default)]
pub struct CtrlState {
    /// Promiscuous mode.
    pub promisc: bool,
    /// All multicast.
    pub allmulti: bool,
    /// All unicast.
    pub alluni: bool,
    /// No multicast.
    pub nomulti: bool,
    /// No unicast.
    pub nouni: bool,
    /// No broadcast.
    pub nobcast: bool,
    /// Device MAC (MAC_ADDR_SET).
    pub mac: [u8; 6],
    /// Unicast filter table.
    pub unicast: Vec<[u8; 6]>,
    /// Multicast filter table.
    pub multicast: Vec<[u8; 6]>,
}

impl CtrlState {
    /// Defaults after reset.
    pub fn new(mac: [u8; 6]) -> Self {
        Self {
            mac,
            ..Default::default()
        }
    }
}
