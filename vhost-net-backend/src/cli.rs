//! The command line of vhost-net-backend (clap), in the library so that the man page
//! generator (`xtask man`) renders the same flags and help the program parses.

use clap::Parser;
use vhost_user_device::program::{ClientCommand, ListenArgs};

use crate::tap::parse_mac;

/// A vhost-user virtio-net backend: serves a NIC to a VMM (QEMU's `-netdev vhost-user`,
/// cloud-hypervisor, DPDK virtio-user, ...) on a tap or macvtap interface. TX goes to the
/// tap with io_uring writev straight from guest memory, RX is read straight into the
/// guest's buffers; checksum offload, TSO/UFO and mergeable receive buffers.
///
/// Logs go to stderr; set RUST_LOG (error, warn, info, debug) to choose how much.
/// SIGUSR1 logs the per-queue counters.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Args {
    /// Talk to a running backend instead of starting one.
    #[command(subcommand)]
    pub command: Option<ClientCommand>,

    #[command(flatten)]
    pub listen: ListenArgs,

    /// Tap interface to attach to; created (non-persistent) if it does not exist. An
    /// existing tap must be multi-queue with a vnet header
    /// (`ip tuntap add NAME mode tap multi_queue vnet_hdr`).
    #[arg(long, value_name = "NAME", required_unless_present_any = ["macvtap", "print_capabilities"], conflicts_with = "macvtap")]
    pub tap: Option<String>,

    /// Existing macvtap interface to use through its /dev/tapN (several guests can share
    /// one physical NIC this way). The guest's MAC defaults to the macvtap's.
    #[arg(long, value_name = "IFNAME")]
    pub macvtap: Option<String>,

    /// MAC address in the device's config space (aa:bb:cc:dd:ee:ff). QEMU uses its own
    /// `-device virtio-net-pci,mac=` instead.
    #[arg(long, value_parser = parse_mac_arg)]
    pub mac: Option<[u8; 6]>,

    /// MTU offered to the guest (VIRTIO_NET_F_MTU); set the same MTU on the tap yourself.
    #[arg(long, value_parser = clap::value_parser!(u16).range(68..=65535))]
    pub mtu: Option<u16>,

    /// Queue pairs (one RX + one TX queue each, one tap queue and worker thread each);
    /// QEMU: `-netdev vhost-user,queues=N` and `-device virtio-net-pci,mq=on`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=31))]
    pub num_queue_pairs: u16,

    /// Entries per queue (a power of two, up to 1024).
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,
}

fn parse_mac_arg(s: &str) -> Result<[u8; 6], String> {
    parse_mac(s).ok_or_else(|| format!("{s} is not a MAC address like 52:54:00:12:34:56"))
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|e| format!("{e}"))?;
    if n.is_power_of_two() && (2..=1024).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} is not a power of two between 2 and 1024"))
    }
}
