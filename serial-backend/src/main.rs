//! serial-backend's `main`: the command line (`cli`) turned into a running device, or a
//! client subcommand. Everything else lives in the library.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use serial_backend::cli::Args;
use serial_backend::control::SerialControl;
use serial_backend::hostinfo;
use serial_backend::ports::{parse_spec, HostKind, PortSpec};
use serial_backend::SerialDevice;
use vhost_user_device::program::backend_main;
use vhost_user_device::server::handle_termination_signals;
use vhost_user_device::{Server, Shutdown};

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
