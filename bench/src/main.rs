//! `bench`: a vhost-user load generator (the frontend and guest driver in one, native
//! speed) that drives any vhost-user backend socket, so ours and the peers' are measured by
//! the same instrument.

mod blk;
mod compare;
mod idle;
mod report;

use clap::{Parser, Subcommand};

/// vhost-user load generator and benchmarks.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Generate load on a backend socket.
    Load {
        #[command(subcommand)]
        device: LoadDevice,
    },
    /// Run every contender side by side and write a table (bench/results/).
    Compare {
        #[command(subcommand)]
        what: CompareWhat,
    },
}

#[derive(Subcommand, Debug)]
enum CompareWhat {
    /// vhost-blk-backend vs qemu-storage-daemon vs host fio, through the load generator.
    Blk(compare::CompareBlkArgs),
    /// Each backend's RSS and CPU while idle.
    Idle(idle::CompareIdleArgs),
}

#[derive(Subcommand, Debug)]
enum LoadDevice {
    /// Drive a vhost-user-blk backend (ours, qemu-storage-daemon, SPDK, ...).
    Blk(blk::BlkLoadArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Load {
            device: LoadDevice::Blk(a),
        } => blk::run(&a)
            .map(|r| r.to_string())
            .map_err(|e| e.to_string()),
        Cmd::Compare {
            what: CompareWhat::Blk(a),
        } => compare::compare_blk(&a).map_err(|e| e.to_string()),
        Cmd::Compare {
            what: CompareWhat::Idle(a),
        } => idle::compare_idle(&a).map_err(|e| e.to_string()),
    };
    match res {
        Ok(report) => {
            println!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
