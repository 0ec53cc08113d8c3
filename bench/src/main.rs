//! `bench`: a vhost-user load generator (the frontend and guest driver in one, native
//! speed) that drives any vhost-user backend socket, so ours and the peers' are measured by
//! the same instrument.

mod compare;
mod load;

use clap::{Parser, Subcommand};

use compare::{all, chart, guest_blk, idle, migrate};
use load::{blk, net, serial};

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
    Blk(compare::blk::CompareBlkArgs),
    /// Each backend's RSS and CPU while idle.
    Idle(idle::CompareIdleArgs),
    /// vhost-net-backend vs DPDK testpmd's vhost PMD through the load generator, and vs
    /// QEMU's own tap in a guest (iperf3).
    Net(compare::net::CompareNetArgs),
    /// Every comparison in one run: bench/results/all.md, all.json and all.png.
    All(all::CompareAllArgs),
    /// One console port in a real guest, both directions: serial-backend vs QEMU's
    /// virtio-serial.
    Serial(compare::serial::CompareSerialArgs),
    /// fio in a real guest: vhost-blk-backend vs qemu-storage-daemon vs QEMU's virtio-blk.
    GuestBlk(guest_blk::CompareGuestBlkArgs),
    /// Block migration over loopback: full copy and incremental return (ours not built
    /// yet) vs qemu-storage-daemon's blockdev-mirror / incremental backup to NBD.
    Migrate(migrate::CompareMigrateArgs),
}

#[derive(Subcommand, Debug)]
enum LoadDevice {
    /// Drive a vhost-user-blk backend (ours, qemu-storage-daemon, SPDK, ...).
    Blk(blk::BlkLoadArgs),
    /// Drive a vhost-user-net backend (ours, DPDK's vhost PMD, ...): TX, RX or both.
    Net(net::NetLoadArgs),
    /// Drive a vhost-user virtio-console backend: one port, both directions, every byte
    /// checked (the port's host side must be a unix socket).
    Serial(serial::SerialLoadArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Every comparison ends with a chart: a missing font is reported before measuring.
    if matches!(cli.cmd, Cmd::Compare { .. }) {
        if let Err(e) = chart::load_font() {
            eprintln!("bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    let res = match cli.cmd {
        Cmd::Load {
            device: LoadDevice::Blk(a),
        } => blk::run(&a)
            .map(|r| r.to_string())
            .map_err(|e| e.to_string()),
        Cmd::Load {
            device: LoadDevice::Net(a),
        } => net::run(&a)
            .map(|r| r.to_string())
            .map_err(|e| e.to_string()),
        Cmd::Load {
            device: LoadDevice::Serial(a),
        } => serial::run(&a)
            .map(|r| r.to_string())
            .map_err(|e| e.to_string()),
        Cmd::Compare {
            what: CompareWhat::Blk(a),
        } => compare::blk::compare_blk(&a)
            .map(|s| s.markdown())
            .map_err(|e| e.to_string()),
        Cmd::Compare {
            what: CompareWhat::Net(a),
        } => compare::net::compare_net(&a)
            .map(|s| s.markdown())
            .map_err(|e| e.to_string()),
        Cmd::Compare {
            what: CompareWhat::Idle(a),
        } => idle::compare_idle(&a)
            .map(|s| s.markdown())
            .map_err(|e| e.to_string()),
        Cmd::Compare {
            what: CompareWhat::All(a),
        } => all::compare_all(&a).map_err(|e| e.to_string()),
        Cmd::Compare {
            what: CompareWhat::Serial(a),
        } => compare::serial::compare_serial(&a)
            .map(|s| s.markdown())
            .map_err(|e| e.to_string()),
        Cmd::Compare {
            what: CompareWhat::GuestBlk(a),
        } => guest_blk::compare_guest_blk(&a)
            .map(|s| s.markdown())
            .map_err(|e| e.to_string()),
        Cmd::Compare {
            what: CompareWhat::Migrate(a),
        } => migrate::compare_migrate(&a)
            .map(|s| s.markdown())
            .map_err(|e| e.to_string()),
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
