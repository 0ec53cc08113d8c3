//! The command line of serial-backend (clap), in the library so that the man page
//! generator (`xtask man`) renders the same flags and help the program parses.

use clap::Parser;
use vhost_user_device::program::{ClientCommand, ListenArgs};

use crate::spec::DEFAULT_MAX_PORTS;

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
pub struct Args {
    /// Talk to a running backend instead of starting one.
    #[command(subcommand)]
    pub command: Option<ClientCommand>,

    #[command(flatten)]
    pub listen: ListenArgs,

    /// A console port (repeatable): `pty`, `socket=PATH` or `stdio`, optionally with
    /// `,name=NAME`. The first console is port 0 (/dev/hvc0). A socket listens for one
    /// client at a time; while none is connected, console output is kept (the last 64 KiB).
    #[arg(long, value_name = "HOST")]
    pub console: Vec<String>,

    /// A named port (repeatable): `name=NAME,` then `file=PATH` (guest output appended),
    /// `socket=PATH` (listening, one client at a time, reconnects allowed) or `pty`.
    #[arg(long, value_name = "name=NAME,HOST")]
    pub port: Vec<String>,

    /// Add the hostinfo port `org.hostinfo.0`: reading it gives one JSON document of host
    /// facts (hostname, kernel, CPU, memory, load, time), fresh on each open.
    #[arg(long)]
    pub hostinfo: bool,

    /// Port ids offered to the guest (config max_nr_ports); the VMM must be given
    /// num_vqs = 2 * (MAX_PORTS + 1).
    #[arg(long, default_value_t = DEFAULT_MAX_PORTS, value_parser = clap::value_parser!(u32).range(1..=31))]
    pub max_ports: u32,
}
