//! Project chores that need the backends' code, run with `cargo run -p xtask -- ...`.
//!
//! `man OUT_DIR`: the man pages of vhost-blk-backend, vhost-net-backend and
//! serial-backend (and of their subcommands), rendered from their clap command lines;
//! `scripts/package.sh` runs it before it builds the Debian packages.

mod man;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Project chores that need the backends' code.
#[derive(Parser, Debug)]
#[command(about, long_about)]
enum Task {
    /// Render the backends' man pages (section 1) into OUT_DIR, one per program and one per
    /// subcommand, from the same clap definitions the programs parse.
    Man {
        /// Where the pages go (created if missing).
        out_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    match Task::parse() {
        Task::Man { out_dir } => match man::render_all(&out_dir) {
            Ok(files) => {
                for f in files {
                    println!("{}", f.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("xtask man: writing into {}: {e}", out_dir.display());
                ExitCode::FAILURE
            }
        },
    }
}
