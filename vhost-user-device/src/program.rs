//! What every backend program's `main` does, per QEMU's backend program conventions.

use std::error::Error;
use std::os::fd::RawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::sandbox::{self, Profile, SandboxError, SandboxMode};
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

    /// After start-up, confine every thread with a seccomp filter that allows only the
    /// system calls its kind of thread needs ("seccomp"; a denied call ends the process
    /// with a message naming it), only log would-be denials to the kernel log ("log"), or
    /// run without ("none"). Also taken from VHOST_SANDBOX.
    #[arg(long, value_enum, env = "VHOST_SANDBOX", default_value_t = SandboxMode::Seccomp)]
    pub sandbox: SandboxMode,

    /// Test hook: make a forbidden system call right after the main thread entered the
    /// sandbox.
    #[arg(long, hide = true)]
    pub sandbox_selftest: bool,
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

    /// Sets up the sandbox (`--sandbox`) with the backend's per-thread additions; call it
    /// at the start of `run`, before any thread is created. The threads enter it later:
    /// the main thread in [`crate::Server::serve`], the others as they start.
    pub fn sandbox(&self, profile: Profile) -> Result<(), SandboxError> {
        sandbox::configure(self.sandbox, profile, self.sandbox_selftest)
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

/// Parses a byte count or rate as the command line takes it: a number with an optional
/// suffix k, M, G or T (powers of 1024, as QEMU's size options; case-insensitive, an
/// optional trailing "B" or "iB"): `4096`, `64k`, `20M`, `1GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                _ => return Err(format!("{s:?}: unknown unit {c:?} (use k, M, G or T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes (e.g. 4096, 64k, 20M)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_with_and_without_units() {
        for (s, n) in [
            ("4096", 4096),
            ("64k", 64 << 10),
            ("64K", 64 << 10),
            ("20M", 20 << 20),
            ("1GiB", 1 << 30),
            ("2GB", 2 << 30),
            ("1T", 1 << 40),
            (" 7 ", 7),
        ] {
            assert_eq!(parse_size(s), Ok(n), "{s}");
        }
        for s in ["", "k", "12x", "-1", "1.5M", "99999999999999T"] {
            assert!(parse_size(s).is_err(), "{s}");
        }
    }
}
