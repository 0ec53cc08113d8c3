//! virtio-net structures and constants (virtio 1.2, section 5.1) and the tap ioctls.

/// Size of `virtio_net_hdr_v1` (with `num_buffers`): what every frame starts with once
/// VIRTIO_F_VERSION_1 is negotiated, and the vnet header size we set on the tap.
pub const HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
pub const HDR_NUM_BUFFERS: usize = 10;
/// Largest Ethernet frame (without the virtio-net header) either direction: a 64 KiB GSO
/// packet plus Ethernet header and one VLAN tag.
pub const MAX_FRAME_LEN: usize = 65536 + 14 + 4;
/// Ethernet header plus a VLAN tag: added to the MTU for the largest non-GSO frame.
pub const ETH_OVERHEAD: usize = 14 + 4;

/// Feature bits.
pub mod features {
    /// Device handles packets with partial checksum (guest → host checksum offload).
    pub const CSUM: u64 = 1 << 0;
    /// Driver handles packets with partial checksum (host → guest).
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// Config space has the MTU.
    pub const MTU: u64 = 1 << 3;
    /// Config space has the MAC.
    pub const MAC: u64 = 1 << 5;
    /// Driver takes TSOv4.
    pub const GUEST_TSO4: u64 = 1 << 7;
    /// Driver takes TSOv6.
    pub const GUEST_TSO6: u64 = 1 << 8;
    /// Driver takes TSO with ECN.
    pub const GUEST_ECN: u64 = 1 << 9;
    /// Driver takes UFO.
    pub const GUEST_UFO: u64 = 1 << 10;
    /// Device takes TSOv4.
    pub const HOST_TSO4: u64 = 1 << 11;
    /// Device takes TSOv6.
    pub const HOST_TSO6: u64 = 1 << 12;
    /// Device takes TSO with ECN.
    pub const HOST_ECN: u64 = 1 << 13;
    /// Device takes UFO.
    pub const HOST_UFO: u64 = 1 << 14;
    /// Driver can merge receive buffers.
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// Config space has the link status.
    pub const STATUS: u64 = 1 << 16;
    /// Control virtqueue.
    pub const CTRL_VQ: u64 = 1 << 17;
    /// Control channel RX mode support (promiscuous, allmulti, ...).
    pub const CTRL_RX: u64 = 1 << 18;
    /// The driver announces itself (gratuitous ARP) when the device asks, e.g. after a
    /// live migration. QEMU owns virtio-net's config space and asks itself; we answer the
    /// driver's acknowledgement when the control queue comes to us.
    pub const GUEST_ANNOUNCE: u64 = 1 << 21;
    /// Several queue pairs.
    pub const MQ: u64 = 1 << 22;
    /// The MAC address can be set through the control queue.
    pub const CTRL_MAC_ADDR: u64 = 1 << 23;
    /// VIRTIO_F_VERSION_1 (offered by the layer): the header always has `num_buffers`.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Size of the legacy `virtio_net_hdr` (no `num_buffers`).
pub const LEGACY_HDR_LEN: usize = 10;

/// The virtio-net header size for the features `acked` (virtio 1.2, 5.1.6): 12 bytes
/// with VERSION_1 or MRG_RXBUF, else the legacy 10.
pub fn hdr_len(acked: u64) -> usize {
    if acked & (features::VERSION_1 | features::MRG_RXBUF) != 0 {
        HDR_LEN
    } else {
        LEGACY_HDR_LEN
    }
}

/// `virtio_net_hdr.flags`.
pub mod hdr_flags {
    /// The checksum at csum_start + csum_offset must be completed.
    pub const NEEDS_CSUM: u8 = 1;
    /// The checksum was validated.
    pub const DATA_VALID: u8 = 2;
    /// Receive segment coalescing information present.
    pub const RSC_INFO: u8 = 4;
}

/// `virtio_net_hdr.gso_type`.
pub mod gso {
    /// Not a GSO frame.
    pub const NONE: u8 = 0;
    /// TCP over IPv4.
    pub const TCPV4: u8 = 1;
    /// UDP fragmentation (UFO).
    pub const UDP: u8 = 3;
    /// TCP over IPv6.
    pub const TCPV6: u8 = 4;
    /// ECN bit, combined with TCPV4/TCPV6.
    pub const ECN: u8 = 0x80;
}

/// Config space status bit: link up.
pub const STATUS_LINK_UP: u16 = 1;

/// Control queue classes and commands.
pub mod ctrl {
    /// Acknowledgement: done.
    pub const OK: u8 = 0;
    /// Acknowledgement: refused.
    pub const ERR: u8 = 1;
    /// Class RX mode.
    pub const CLASS_RX: u8 = 0;
    /// RX: promiscuous on/off.
    pub const RX_PROMISC: u8 = 0;
    /// RX: all multicast on/off.
    pub const RX_ALLMULTI: u8 = 1;
    /// RX: all unicast on/off.
    pub const RX_ALLUNI: u8 = 2;
    /// RX: no multicast.
    pub const RX_NOMULTI: u8 = 3;
    /// RX: no unicast.
    pub const RX_NOUNI: u8 = 4;
    /// RX: no broadcast.
    pub const RX_NOBCAST: u8 = 5;
    /// Class MAC filtering.
    pub const CLASS_MAC: u8 = 1;
    /// MAC: set the unicast and multicast filter tables.
    pub const MAC_TABLE_SET: u8 = 0;
    /// MAC: set the device address.
    pub const MAC_ADDR_SET: u8 = 1;
    /// Class announce (GUEST_ANNOUNCE).
    pub const CLASS_ANNOUNCE: u8 = 3;
    /// Announce: the driver has announced itself.
    pub const ANNOUNCE_ACK: u8 = 0;
    /// Class multiqueue.
    pub const CLASS_MQ: u8 = 4;
    /// MQ: set the number of queue pairs in use.
    pub const MQ_VQ_PAIRS_SET: u8 = 0;
}

/// The virtio-net config space fields we fill (the first 12 bytes; the rest reads zero).
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    /// MAC address.
    pub mac: [u8; 6],
    /// Link status (STATUS_LINK_UP).
    pub status: u16,
    /// Number of queue pairs.
    pub max_virtqueue_pairs: u16,
    /// MTU.
    pub mtu: u16,
}

impl Config {
    /// Config space bytes, little-endian.
    pub fn to_bytes(self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[0..6].copy_from_slice(&self.mac);
        b[6..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..10].copy_from_slice(&self.max_virtqueue_pairs.to_le_bytes());
        b[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        b
    }
}

/// The virtio-net header (without `num_buffers`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHdr {
    /// NEEDS_CSUM / DATA_VALID / RSC_INFO.
    pub flags: u8,
    /// GSO type.
    pub gso_type: u8,
    /// Header length.
    pub hdr_len: u16,
    /// Segment size.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where the checksum goes, from csum_start.
    pub csum_offset: u16,
    /// Buffers the frame spans (receive side).
    pub num_buffers: u16,
}

impl NetHdr {
    /// Parses the 12 header bytes.
    pub fn parse(b: &[u8; HDR_LEN]) -> Self {
        let le = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
            num_buffers: le(10),
        }
    }

    /// The 12 header bytes.
    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }
}

/// Why a guest's transmit header is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HdrError {
    /// Unknown flag bits.
    #[error("unknown header flags {0:#x}")]
    Flags(u8),
    /// Unknown GSO type, or one the driver did not negotiate.
    #[error("GSO type {0:#x} is unknown or not negotiated")]
    GsoType(u8),
    /// GSO without a segment size.
    #[error("GSO frame with segment size 0")]
    GsoSize,
    /// Checksum offload not negotiated, or its position outside the frame.
    #[error("checksum at {start}+{offset} is outside the {len}-byte frame or not negotiated")]
    Csum {
        /// csum_start.
        start: u16,
        /// csum_offset.
        offset: u16,
        /// Frame length.
        len: usize,
    },
}

impl NetHdr {
    /// Checks a transmit header against the negotiated features and the frame length
    /// (without header). The kernel checks the GSO fields against the packet again.
    pub fn check_tx(&self, acked: u64, frame_len: usize) -> Result<(), HdrError> {
        use features as f;
        if self.flags & !(hdr_flags::NEEDS_CSUM | hdr_flags::DATA_VALID) != 0 {
            return Err(HdrError::Flags(self.flags));
        }
        if self.flags & hdr_flags::NEEDS_CSUM != 0 {
            let end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
            if acked & f::CSUM == 0 || end > frame_len {
                return Err(HdrError::Csum {
                    start: self.csum_start,
                    offset: self.csum_offset,
                    len: frame_len,
                });
            }
        }
        let ecn = self.gso_type & gso::ECN != 0;
        let needed = match self.gso_type & !gso::ECN {
            gso::NONE if !ecn => return Ok(()),
            gso::TCPV4 => f::HOST_TSO4,
            gso::TCPV6 => f::HOST_TSO6,
            gso::UDP if !ecn => f::HOST_UFO,
            _ => return Err(HdrError::GsoType(self.gso_type)),
        };
        if acked & needed == 0 || (ecn && acked & f::HOST_ECN == 0) {
            return Err(HdrError::GsoType(self.gso_type));
        }
        if self.gso_size == 0 {
            return Err(HdrError::GsoSize);
        }
        Ok(())
    }
}

/// Tap ioctls and flags (linux/if_tun.h).
pub mod tun {
    /// TUNSETIFF.
    pub const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    /// TUNGETIFF.
    pub const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
    /// TUNSETOFFLOAD.
    pub const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
    /// TUNSETVNETHDRSZ.
    pub const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
    /// TUNSETQUEUE.
    pub const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
    /// IFF_TAP.
    pub const IFF_TAP: libc::c_short = 0x0002;
    /// IFF_NO_PI.
    pub const IFF_NO_PI: libc::c_short = 0x1000;
    /// IFF_VNET_HDR.
    pub const IFF_VNET_HDR: libc::c_short = 0x4000;
    /// IFF_MULTI_QUEUE.
    pub const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
    /// IFF_ATTACH_QUEUE.
    pub const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
    /// IFF_DETACH_QUEUE.
    pub const IFF_DETACH_QUEUE: libc::c_short = 0x0400;
    /// TUN_F_CSUM.
    pub const TUN_F_CSUM: libc::c_uint = 0x01;
    /// TUN_F_TSO4.
    pub const TUN_F_TSO4: libc::c_uint = 0x02;
    /// TUN_F_TSO6.
    pub const TUN_F_TSO6: libc::c_uint = 0x04;
    /// TUN_F_TSO_ECN.
    pub const TUN_F_TSO_ECN: libc::c_uint = 0x08;
    /// TUN_F_UFO.
    pub const TUN_F_UFO: libc::c_uint = 0x10;
}

/// The tap offload flags matching the receive offloads the driver acked (what the tap
/// may hand us, and we pass on to the guest unchanged).
pub fn tap_offloads(acked: u64) -> libc::c_uint {
    use features as f;
    let mut o = 0;
    if acked & f::GUEST_CSUM != 0 {
        o |= tun::TUN_F_CSUM;
        if acked & f::GUEST_TSO4 != 0 {
            o |= tun::TUN_F_TSO4;
        }
        if acked & f::GUEST_TSO6 != 0 {
            o |= tun::TUN_F_TSO6;
        }
        if acked & f::GUEST_ECN != 0 && o & (tun::TUN_F_TSO4 | tun::TUN_F_TSO6) != 0 {
            o |= tun::TUN_F_TSO_ECN;
        }
        if acked & f::GUEST_UFO != 0 {
            o |= tun::TUN_F_UFO;
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = NetHdr {
            flags: 1,
            gso_type: gso::TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        assert_eq!(NetHdr::parse(&h.to_bytes()), h);
    }

    #[test]
    fn tx_header_checks() {
        let all = features::CSUM | features::HOST_TSO4 | features::HOST_TSO6;
        let mut h = NetHdr::default();
        assert!(h.check_tx(0, 60).is_ok());
        h.flags = hdr_flags::NEEDS_CSUM;
        h.csum_start = 34;
        h.csum_offset = 16;
        assert!(h.check_tx(all, 60).is_ok());
        assert!(h.check_tx(0, 60).is_err());
        assert!(h.check_tx(all, 40).is_err());
        h.gso_type = gso::TCPV4;
        assert_eq!(h.check_tx(all, 60), Err(HdrError::GsoSize));
        h.gso_size = 1448;
        assert!(h.check_tx(all, 60).is_ok());
        assert!(h.check_tx(features::CSUM, 60).is_err());
        h.gso_type = 0x42;
        assert!(h.check_tx(all, 60).is_err());
        h.gso_type = gso::TCPV4 | gso::ECN;
        assert!(h.check_tx(all, 60).is_err());
        h.gso_type = gso::NONE;
        h.flags = 0x80;
        assert!(h.check_tx(all, 60).is_err());
    }

    #[test]
    fn header_size_follows_features() {
        assert_eq!(hdr_len(0), LEGACY_HDR_LEN);
        assert_eq!(hdr_len(features::MRG_RXBUF), HDR_LEN);
        assert_eq!(hdr_len(features::VERSION_1), HDR_LEN);
    }

    #[test]
    fn offloads_follow_features() {
        assert_eq!(tap_offloads(features::GUEST_TSO4), 0);
        let f = features::GUEST_CSUM | features::GUEST_TSO4 | features::GUEST_ECN;
        assert_eq!(
            tap_offloads(f),
            tun::TUN_F_CSUM | tun::TUN_F_TSO4 | tun::TUN_F_TSO_ECN
        );
    }
}
