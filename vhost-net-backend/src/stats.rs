//! Per-queue counters: packets, bytes and drops by reason.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use vhost_user_device::counter::add_single_writer;

/// Why a frame (or a guest buffer) was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// TX chain shorter than the virtio-net header.
    ShortChain,
    /// TX frame longer than 64 KiB plus headers.
    TooLong,
    /// TX header with bad flags, GSO type/size or checksum position.
    BadHeader,
    /// A buffer address the host cannot map (outside guest memory).
    BadAddress,
    /// The tap refused the frame (EINVAL: the kernel's own GSO/header checks).
    TapRejected,
    /// Other tap write/read errors.
    TapError,
    /// RX chain with no room for the header (or with device-readable buffers).
    RxBufferTooSmall,
    /// RX frame larger than the buffers the guest posted (no MRG_RXBUF).
    RxTruncated,
    /// TX frames completed unsent when the ring stopped with the tap full (those that could
    /// go back to the avail ring are not lost, and not counted: see `Ring::give_back`).
    TxAbandoned,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 9] = [
        DropReason::ShortChain,
        DropReason::TooLong,
        DropReason::BadHeader,
        DropReason::BadAddress,
        DropReason::TapRejected,
        DropReason::TapError,
        DropReason::RxBufferTooSmall,
        DropReason::RxTruncated,
        DropReason::TxAbandoned,
    ];

    /// Short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::ShortChain => "short_chain",
            DropReason::TooLong => "too_long",
            DropReason::BadHeader => "bad_header",
            DropReason::BadAddress => "bad_address",
            DropReason::TapRejected => "tap_rejected",
            DropReason::TapError => "tap_error",
            DropReason::RxBufferTooSmall => "rx_buffer_too_small",
            DropReason::RxTruncated => "rx_truncated",
            DropReason::TxAbandoned => "tx_abandoned",
        }
    }
}

/// Counters of one data queue. Only the worker that owns the queue adds to them, per
/// frame, without a locked instruction ([`add_single_writer`]); anyone reads them.
#[derive(Debug, Default)]
pub struct QueueCounters {
    /// Frames moved.
    pub packets: AtomicU64,
    /// Bytes moved (without the virtio-net header).
    pub bytes: AtomicU64,
    /// RX: frames spread over more than one buffer (mergeable buffers).
    pub merged: AtomicU64,
    /// Times the queue waited: RX for guest buffers, TX for room in the tap.
    pub waits: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
}

impl QueueCounters {
    /// Counts a moved frame.
    pub fn packet(&self, bytes: usize) {
        add_single_writer(&self.packets, 1);
        add_single_writer(&self.bytes, bytes as u64);
    }

    /// Counts an RX frame spread over more than one buffer.
    pub fn merged_frame(&self) {
        add_single_writer(&self.merged, 1);
    }

    /// Counts a wait (RX for guest buffers, TX for room in the tap).
    pub fn waited(&self) {
        add_single_writer(&self.waits, 1);
    }

    /// Counts a drop.
    pub fn drop(&self, why: DropReason) {
        if let Some(i) = DropReason::ALL.iter().position(|&d| d == why) {
            add_single_writer(&self.drops[i], 1);
        }
    }

    /// Drops counted for `why`.
    pub fn drops(&self, why: DropReason) -> u64 {
        DropReason::ALL
            .iter()
            .position(|&d| d == why)
            .map_or(0, |i| self.drops[i].load(Ordering::Relaxed))
    }

    /// All drops.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().map(|d| d.load(Ordering::Relaxed)).sum()
    }
}

/// Counters of the device: one entry per data queue (even = RX, odd = TX).
#[derive(Debug)]
pub struct NetStats {
    /// Indexed by virtqueue number.
    pub queues: Vec<QueueCounters>,
    /// Control commands answered OK / refused.
    pub ctrl_ok: AtomicU64,
    /// Control commands refused.
    pub ctrl_err: AtomicU64,
}

impl NetStats {
    /// Counters for `pairs` queue pairs.
    pub fn new(pairs: u16) -> Self {
        Self {
            queues: (0..2 * usize::from(pairs))
                .map(|_| QueueCounters::default())
                .collect(),
            ctrl_ok: AtomicU64::new(0),
            ctrl_err: AtomicU64::new(0),
        }
    }

    /// Counters of virtqueue `q` (a dummy for the control queue).
    pub fn queue(&self, q: u16) -> Option<&QueueCounters> {
        self.queues.get(usize::from(q))
    }

    /// One line per queue, for the log.
    pub fn report(&self) -> String {
        let mut s = String::new();
        for (i, c) in self.queues.iter().enumerate() {
            let dir = if i % 2 == 0 { "rx" } else { "tx" };
            let _ = write!(
                s,
                "queue {i} ({dir}{}): packets {} bytes {} merged {} waits {} drops {}",
                i / 2,
                c.packets.load(Ordering::Relaxed),
                c.bytes.load(Ordering::Relaxed),
                c.merged.load(Ordering::Relaxed),
                c.waits.load(Ordering::Relaxed),
                c.total_drops()
            );
            for d in DropReason::ALL {
                let n = c.drops(d);
                if n > 0 {
                    let _ = write!(s, " {}={n}", d.name());
                }
            }
            s.push('\n');
        }
        let _ = write!(
            s,
            "control: ok {} refused {}",
            self.ctrl_ok.load(Ordering::Relaxed),
            self.ctrl_err.load(Ordering::Relaxed)
        );
        s
    }
}
