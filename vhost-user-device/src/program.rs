//! What every backend program's `main` does, per QEMU's backend program conventions.

use std::error::Error;
use std::os::fd::RawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::server::{listen_fd, listen_path, ServerError};

/// The flags every backend program takes (QEMU's backend program conventions); flatten
/// into the program's clap arguments with `#[command(flatten)]`.
#[derive(clap::Args, Debug)]
pub struct ListenArgs {
    /// Unix socket to listen on for the VMM (a stale socket file is replaced).
    #[arg(long, value_name = "PATH", required_unless_present_any = ["fd", "print_capabilities"], conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,

    /// Listen on this inherited, already listening unix socket instead of --socket-path.
    #[arg(long, value_name = "FDNUM")]
    pub fd: Option<RawFd>,

    /// Print the backend's capabilities as JSON (vhost-user.json schema) and exit.
    #[arg(long)]
    pub print_capabilities: bool,
}

impl ListenArgs {
    /// The listening socket: `--socket-path` bound now, or the inherited `--fd`.
    pub fn listener(&self) -> Result<UnixListener, ServerError> {
        match (&self.socket_path, self.fd) {
            (Some(p), _) => listen_path(p),
            (None, Some(fd)) => listen_fd(fd),
            (None, None) => Err(ServerError::NoListener),
        }
    }
}

/// Logs to stderr (level from RUST_LOG, default info); with `--print-capabilities` prints
/// `capabilities` (the vhost-user.json document) and exits 0; otherwise runs `run`, and
/// turns an error into one log line and exit status 1.
pub fn backend_main(
    print_capabilities: bool,
    capabilities: &str,
    run: impl FnOnce() -> Result<(), Box<dyn Error>>,
) -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if print_capabilities {
        println!("{capabilities}");
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
