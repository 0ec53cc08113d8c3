//! What every backend program's `main` does, per QEMU's backend program conventions.

use std::error::Error;
use std::process::ExitCode;

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
