//! vhost-net-backend's `main`: the command line (`cli`) turned into a running device, or a
//! client subcommand. Everything else lives in the library.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use vhost_net_backend::cli::Args;
use vhost_net_backend::control::NetControl;
use vhost_net_backend::{NetDevice, NetOptions, NetShared, Tap, TapSpec};
use vhost_user_device::program::backend_main;
use vhost_user_device::sandbox::{self, ThreadKind};
use vhost_user_device::server::handle_termination_signals;
use vhost_user_device::{Server, Shutdown};

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
