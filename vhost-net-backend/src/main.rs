//! Command line of vhost-net-backend. Everything else lives in the library.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use vhost_net_backend::control::NetControl;
use vhost_net_backend::tap::parse_mac;
use vhost_net_backend::{NetDevice, NetOptions, NetShared, Tap, TapSpec};
use vhost_user_device::program::{backend_main, ClientCommand, ListenArgs};
use vhost_user_device::sandbox::{self, ThreadKind};
use vhost_user_device::server::handle_termination_signals;
use vhost_user_device::{Server, Shutdown};

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
struct Args {
    /// Talk to a running backend instead of starting one.
    #[command(subcommand)]
    command: Option<ClientCommand>,

    #[command(flatten)]
    listen: ListenArgs,

    /// Tap interface to attach to; created (non-persistent) if it does not exist. An
    /// existing tap must be multi-queue with a vnet header
    /// (`ip tuntap add NAME mode tap multi_queue vnet_hdr`).
    #[arg(long, value_name = "NAME", required_unless_present_any = ["macvtap", "print_capabilities"], conflicts_with = "macvtap")]
    tap: Option<String>,

    /// Existing macvtap interface to use through its /dev/tapN (several guests can share
    /// one physical NIC this way). The guest's MAC defaults to the macvtap's.
    #[arg(long, value_name = "IFNAME")]
    macvtap: Option<String>,

    /// MAC address in the device's config space (aa:bb:cc:dd:ee:ff). QEMU uses its own
    /// `-device virtio-net-pci,mac=` instead.
    #[arg(long, value_parser = parse_mac_arg)]
    mac: Option<[u8; 6]>,

    /// MTU offered to the guest (VIRTIO_NET_F_MTU); set the same MTU on the tap yourself.
    #[arg(long, value_parser = clap::value_parser!(u16).range(68..=65535))]
    mtu: Option<u16>,

    /// Queue pairs (one RX + one TX queue each, one tap queue and worker thread each);
    /// QEMU: `-netdev vhost-user,queues=N` and `-device virtio-net-pci,mq=on`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=31))]
    num_queue_pairs: u16,

    /// Entries per queue (a power of two, up to 1024).
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size)]
    queue_size: u16,
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

/// Blocks SIGUSR1 in the calling thread (call it before spawning any thread, so every
/// thread inherits the mask).
fn block_sigusr1() -> std::io::Result<libc::sigset_t> {
    // SAFETY: plain sigset manipulation on a zeroed local set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        set
    };
    // SAFETY: valid set pointer; old mask not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(set)
}

/// Logs the counters on every SIGUSR1 (blocked everywhere by [`block_sigusr1`]).
fn handle_stats_signal(set: libc::sigset_t, shared: Arc<NetShared>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("stats".into())
        .spawn(move || {
            sandbox::enter_or_exit(ThreadKind::SignalLogger);
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: valid pointers to a local set and int.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                    log::info!(
                        "counters of tap {}:\n{}",
                        shared.tap.name,
                        shared.stats.report()
                    );
                }
            }
        })?;
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(cmd) = &args.command {
        return cmd.run();
    }
    backend_main(args.listen.print_capabilities, r#"{"type": "net"}"#, || {
        run(args)
    })
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    args.listen.sandbox(vhost_net_backend::seccomp::profile())?;
    let spec = match (args.tap, args.macvtap) {
        (Some(t), _) => TapSpec::Tap(t),
        (None, Some(m)) => TapSpec::Macvtap(m),
        (None, None) => return Err("--tap or --macvtap is required".into()),
    };
    let tap = Tap::open(&spec, args.num_queue_pairs)?;
    // A locally administered default, as QEMU's 52:54:00 prefix.
    let mac = args
        .mac
        .or(tap.mac)
        .unwrap_or([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    log::info!(
        "serving {} ({} queue pair(s) of {}, MAC {})",
        tap.name,
        args.num_queue_pairs,
        args.queue_size,
        mac.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    );
    let device = NetDevice::new(
        tap,
        NetOptions {
            pairs: args.num_queue_pairs,
            queue_size: args.queue_size,
            mac,
            mtu: args.mtu,
            mrg_rxbuf: true,
        },
    );
    let shutdown = Shutdown::new()?;
    // Before any other thread exists, so every thread inherits the blocked signals.
    let usr1 = block_sigusr1()?;
    handle_termination_signals(shutdown.clone())?;
    handle_stats_signal(usr1, device.shared().clone())?;
    let listener = args.listen.listener()?;
    let shared = device.shared().clone();
    let server = Server::new(Arc::new(device), shutdown);
    let _services = args.listen.start_services(
        "vhost-net-backend",
        env!("CARGO_PKG_VERSION"),
        server.state(),
        Arc::new(NetControl::new(shared.clone())),
    )?;
    server.serve(&listener)?;
    log::info!("exiting; counters:\n{}", shared.stats.report());
    Ok(())
}
