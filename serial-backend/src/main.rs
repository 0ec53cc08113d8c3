//! Command line of serial-backend. Everything else lives in the library.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use serial_backend::control::SerialControl;
use serial_backend::hostinfo;
use serial_backend::ports::{parse_spec, HostKind, PortSpec};
use serial_backend::spec::DEFAULT_MAX_PORTS;
use serial_backend::SerialDevice;
use vhost_user_device::program::{backend_main, ClientCommand, ListenArgs};
use vhost_user_device::server::handle_termination_signals;
use vhost_user_device::{Server, Shutdown};

/// A vhost-user virtio-console backend with many ports: consoles (/dev/hvcN in the guest)
/// and named ports (/dev/vportNpM, /dev/virtio-ports/NAME) on ptys, unix sockets, files or
/// stdio, plus a built-in hostinfo channel.
///
/// QEMU (>= 10.2): -chardev socket,id=vc,path=SOCK -device
/// vhost-user-test-device-pci,chardev=vc,virtio-id=3,num_vqs=2*(MAX_PORTS+1),config_size=12
///
/// Logs go to stderr; set RUST_LOG (error, warn, info, debug) to choose how much.
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

    /// A console port (repeatable): `pty`, `socket=PATH` or `stdio`, optionally with
    /// `,name=NAME`. The first console is port 0 (/dev/hvc0). A socket listens for one
    /// client at a time; while none is connected, console output is kept (the last 64 KiB).
    #[arg(long, value_name = "HOST")]
    console: Vec<String>,

    /// A named port (repeatable): `name=NAME,` then `file=PATH` (guest output appended),
    /// `socket=PATH` (listening, one client at a time, reconnects allowed) or `pty`.
    #[arg(long, value_name = "name=NAME,HOST")]
    port: Vec<String>,

    /// Add the hostinfo port `org.hostinfo.0`: reading it gives one JSON document of host
    /// facts (hostname, kernel, CPU, memory, load, time), fresh on each open.
    #[arg(long)]
    hostinfo: bool,

    /// Port ids offered to the guest (config max_nr_ports); the VMM must be given
    /// num_vqs = 2 * (MAX_PORTS + 1).
    #[arg(long, default_value_t = DEFAULT_MAX_PORTS, value_parser = clap::value_parser!(u32).range(1..=31))]
    max_ports: u32,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(cmd) = &args.command {
        return cmd.run();
    }
    backend_main(
        args.listen.print_capabilities,
        r#"{"type": "console"}"#,
        || run(args),
    )
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    args.listen.sandbox(serial_backend::seccomp::profile())?;
    let mut specs = Vec::new();
    for c in &args.console {
        specs.push(parse_spec(c, true)?);
    }
    for p in &args.port {
        specs.push(parse_spec(p, false)?);
    }
    if args.hostinfo {
        specs.push(PortSpec {
            name: Some(hostinfo::PORT_NAME.into()),
            console: false,
            kind: HostKind::Hostinfo,
        });
    }
    if specs.is_empty() {
        log::warn!("no ports given (--console, --port, --hostinfo): the guest will see none");
    }
    let shutdown = Shutdown::new()?;
    // Before any other thread exists, so every thread inherits the blocked signals.
    handle_termination_signals(shutdown.clone())?;
    let device = SerialDevice::new(&specs, args.max_ports)?;
    let listener = args.listen.listener()?;
    log::info!(
        "virtio-console with {} port(s), max {} (QEMU: num_vqs={}, config_size=12)",
        specs.len(),
        args.max_ports,
        2 * (args.max_ports + 1)
    );
    let shared = device.shared().clone();
    let server = Server::new(Arc::new(device), shutdown);
    let _services = args.listen.start_services(
        "serial-backend",
        env!("CARGO_PKG_VERSION"),
        server.state(),
        Arc::new(SerialControl::new(shared.clone())),
    )?;
    server.serve(&listener)?;
    log::info!("exiting");
    Ok(())
}
