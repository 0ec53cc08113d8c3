//! Command line of vhost-blk-backend. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use vhost_blk_backend::dirty::{self, DirtyBitmap};
use vhost_blk_backend::dirty_file::{DirtyFile, Loaded};
use vhost_blk_backend::{BlkDevice, BlkOptions, CacheMode, Disk};
use vhost_user_device::program::{backend_main, parse_size, ListenArgs};
use vhost_user_device::server::handle_termination_signals;
use vhost_user_device::{Server, Shutdown};

/// A vhost-user virtio-blk backend: serves a raw image file or a block device to a VMM
/// (QEMU's vhost-user-blk-pci, cloud-hypervisor, crosvm, ...) with io_uring, zero-copy.
///
/// Logs go to stderr; set RUST_LOG (error, warn, info, debug) to choose how much.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    #[command(flatten)]
    listen: ListenArgs,

    /// Raw disk image file or block device to serve.
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "print_capabilities"
    )]
    blk_file: Option<PathBuf>,

    /// Open the disk read-only and offer a read-only device (writes fail with an I/O error).
    #[arg(long)]
    read_only: bool,

    /// Number of request queues; each gets its own worker thread and io_uring.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    num_queues: u16,

    /// Entries per queue (a power of two, up to 1024).
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size)]
    queue_size: u16,

    /// Serial number the guest reads with GET_ID (at most 20 bytes; default: the file name).
    #[arg(long)]
    serial: Option<String>,

    /// Host cache mode: "none" uses O_DIRECT (falls back to buffered with a warning where
    /// the file system cannot), "writeback" goes through the host page cache.
    #[arg(long, value_enum, default_value_t = CacheMode::None)]
    cache: CacheMode,

    /// Logical block size the guest sees (512 or 4096).
    #[arg(long, default_value_t = 512, value_parser = parse_block_size)]
    block_size: u32,

    /// Adaptive polling: after each kick or completion a queue worker keeps looking for
    /// the next one for up to this many microseconds before it sleeps (like QEMU's
    /// iothread poll-max-ns). Saves a wake-up per batch under load, at the price of CPU
    /// while the guest is between batches. 0 (default): never poll; on small hosts the
    /// guest needs the CPU.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    poll_us: u32,

    /// Size of the blocks whose changes are tracked for block migration (a power of two
    /// from 512 to 64M; suffixes k, M). Every completed write, discard and write-zeroes
    /// marks the blocks it touched, and an incremental sync sends exactly those. The
    /// bitmap costs one bit per block in memory: 32 MiB per TiB of disk at 4k, 2 MiB per
    /// TiB at 64k.
    #[arg(long, value_name = "BYTES", default_value = "4k", value_parser = parse_granularity)]
    dirty_granularity: u64,

    /// Keep the dirty-block bitmap in FILE across restarts, so the next incremental sync
    /// still knows what changed. It is written at every sync checkpoint and on a clean
    /// exit, and marked in use while the backend runs: after a crash (or a file made for
    /// another size or granularity) the whole disk counts as changed, never too little.
    /// Created if missing.
    #[arg(long, value_name = "FILE")]
    dirty_bitmap: Option<PathBuf>,
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|e| format!("{e}"))?;
    if n.is_power_of_two() && (2..=1024).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} is not a power of two between 2 and 1024"))
    }
}

fn parse_granularity(s: &str) -> Result<u64, String> {
    let g = parse_size(s)?;
    dirty::check_granularity(g).map_err(|e| e.to_string())?;
    Ok(g)
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n @ (512 | 1024 | 2048 | 4096)) => Ok(n),
        _ => Err(format!("{s} is not one of 512, 1024, 2048, 4096")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    backend_main(
        args.listen.print_capabilities,
        r#"{"type": "block", "features": ["read-only", "blk-file"]}"#,
        || run(args),
    )
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    args.listen.sandbox(vhost_blk_backend::seccomp::profile(
        args.dirty_bitmap.is_some(),
    ))?;
    let path = args.blk_file.ok_or("--blk-file is required")?;
    let disk = Disk::open(&path, args.read_only, args.cache, args.block_size)?;
    let serial = args.serial.unwrap_or_else(|| {
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    log::info!(
        "serving {} ({} bytes, {}{}{}, block size {}) on {} queue(s) of {}",
        path.display(),
        disk.size,
        if disk.direct { "O_DIRECT" } else { "buffered" },
        if disk.memory_backed {
            ", in memory: reads and writes inline"
        } else {
            ""
        },
        if disk.read_only { ", read-only" } else { "" },
        args.block_size,
        args.num_queues,
        args.queue_size
    );
    let (dirty, dirty_file) = match &args.dirty_bitmap {
        Some(file) => {
            let (f, bitmap, checkpoint, loaded) =
                DirtyFile::open(file, disk.size, args.dirty_granularity)?;
            let id = checkpoint.image_uuid();
            let generation = checkpoint.generation;
            match loaded {
                Loaded::Created => {
                    log::info!("{}: new dirty bitmap, image id {id}", file.display())
                }
                Loaded::Trusted => log::info!(
                    "{}: image id {id}, generation {generation}, {} bytes changed since",
                    file.display(),
                    bitmap.dirty_bytes()
                ),
                Loaded::AllDirty(why) => log::warn!(
                    "{}: {why}; the whole disk counts as changed for the next sync \
                     (image id {id}, generation {generation})",
                    file.display()
                ),
            }
            (Arc::new(bitmap), Some((f, checkpoint)))
        }
        None => (
            Arc::new(DirtyBitmap::new(disk.size, args.dirty_granularity)?),
            None,
        ),
    };
    let device = BlkDevice::new(
        disk,
        &BlkOptions {
            num_queues: args.num_queues,
            queue_size: args.queue_size,
            block_size: args.block_size,
            serial,
            poll_us: args.poll_us,
            dirty: Some(dirty.clone()),
        },
    );
    let shutdown = Shutdown::new()?;
    // Before any other thread exists, so every thread inherits the blocked signals.
    handle_termination_signals(shutdown.clone())?;
    let listener = args.listen.listener()?;
    let server = Server::new(Arc::new(device), shutdown);
    server.serve(&listener)?;
    // Every request has completed (serve drains before it returns): the bitmap is
    // complete, and the file may say so.
    if let Some((f, checkpoint)) = dirty_file {
        f.save(&dirty, &checkpoint, false)
            .map_err(|e| format!("saving the dirty bitmap {}: {e}", f.path().display()))?;
    }
    log::info!("exiting");
    Ok(())
}
