//! Command line of vhost-blk-backend. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use vhost_blk_backend::control::BlkControl;
use vhost_blk_backend::device::SyncState;
use vhost_blk_backend::dirty::{self, DirtyBitmap};
use vhost_blk_backend::dirty_file::{DirtyFile, Loaded};
use vhost_blk_backend::migration::client::{self, MigrateArgs, WaitFor};
use vhost_blk_backend::migration::dest::serve_incoming;
use vhost_blk_backend::migration::job::Migrations;
use vhost_blk_backend::migration::tls::TlsCreds;
use vhost_blk_backend::migration::transport::{self, Security, Uri};
use vhost_blk_backend::throttle::Limits;
use vhost_blk_backend::throttle_client::{self, SetIoThrottleArgs};
use vhost_blk_backend::{BlkDevice, BlkOptions, CacheMode, Disk};
use vhost_user_device::program::{backend_main, parse_size, ClientCommand, ListenArgs};
use vhost_user_device::sandbox::{self, ThreadKind};
use vhost_user_device::server::handle_termination_signals;
use vhost_user_device::{Server, Shutdown};

/// A vhost-user virtio-blk backend: serves a raw image file or a block device to a VMM
/// (QEMU's vhost-user-blk-pci, cloud-hypervisor, crosvm, ...) with io_uring, zero-copy.
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
    command: Option<Cmd>,

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

    /// Be the destination of a block migration: take the disk from a source
    /// vhost-blk-backend at URI (tcp:HOST:PORT, unix:PATH, or fd:N for a socket a manager
    /// hands over). The VMM may connect at once; the guest's requests wait (they do not
    /// fail) until a sync has landed, been checked and made durable. The image must exist
    /// with the source's size; a failed sync leaves it held for a retry.
    #[arg(long, value_name = "URI", value_parser = parse_uri)]
    incoming: Option<Uri>,

    /// Allow the migration stream over plain TCP: the disk then crosses the network
    /// unencrypted and unauthenticated. Needed on both ends for tcp: URIs.
    #[arg(long)]
    migration_insecure: bool,

    /// Encrypt and mutually authenticate migration streams over TCP with TLS, from DIR in
    /// QEMU's tls-creds-x509 layout (ca-cert.pem; server-cert.pem and server-key.pem for
    /// --incoming; client-cert.pem and client-key.pem for migrate): the credentials
    /// libvirt deploys for migration work as they are. Needed on both ends.
    #[arg(long, value_name = "DIR")]
    tls_creds: Option<PathBuf>,

    /// The switch-over time a migration aims for: the job is ready once what is left to
    /// copy takes at most this long at the measured rate.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    downtime_limit: u64,

    /// Requests per second the disk serves at most, reads and writes together (0: unlimited).
    /// Requests over the limit wait in the backend; they never fail. Token buckets as in
    /// QEMU's throttle groups (its iops). Changeable at run time with set-io-throttle on
    /// the control socket. Flush, discard and get-id requests are not counted;
    /// write-zeroes counts as a write of no bytes.
    #[arg(long, value_name = "N", default_value_t = 0)]
    iops_limit: u64,

    /// Read requests per second at most (QEMU's iops_rd); not with --iops-limit.
    #[arg(long, value_name = "N", default_value_t = 0)]
    iops_read_limit: u64,

    /// Write requests per second at most (QEMU's iops_wr); not with --iops-limit.
    #[arg(long, value_name = "N", default_value_t = 0)]
    iops_write_limit: u64,

    /// Bytes per second at most, read and written together (QEMU's bps); suffixes k, M,
    /// G (e.g. 20M). A request larger than the burst still goes, and puts the bucket in
    /// debt for those after it.
    #[arg(long, value_name = "RATE", default_value_t = 0, value_parser = parse_size)]
    bandwidth_limit: u64,

    /// Bytes read per second at most (QEMU's bps_rd); not with --bandwidth-limit.
    #[arg(long, value_name = "RATE", default_value_t = 0, value_parser = parse_size)]
    bandwidth_read_limit: u64,

    /// Bytes written per second at most (QEMU's bps_wr); not with --bandwidth-limit.
    #[arg(long, value_name = "RATE", default_value_t = 0, value_parser = parse_size)]
    bandwidth_write_limit: u64,

    /// Burst of --iops-limit: requests that may go at once after a quiet time, the
    /// capacity of the bucket (QEMU's iops_max; at least the limit). Default: a tenth of
    /// a second's worth.
    #[arg(long, value_name = "N", default_value_t = 0)]
    iops_burst: u64,

    /// Burst of --iops-read-limit (QEMU's iops_rd_max).
    #[arg(long, value_name = "N", default_value_t = 0)]
    iops_read_burst: u64,

    /// Burst of --iops-write-limit (QEMU's iops_wr_max).
    #[arg(long, value_name = "N", default_value_t = 0)]
    iops_write_burst: u64,

    /// Burst of --bandwidth-limit in bytes, suffixes k, M, G (QEMU's bps_max; at least
    /// the limit). Default: a tenth of a second's worth.
    #[arg(long, value_name = "BYTES", default_value_t = 0, value_parser = parse_size)]
    bandwidth_burst: u64,

    /// Burst of --bandwidth-read-limit (QEMU's bps_rd_max).
    #[arg(long, value_name = "BYTES", default_value_t = 0, value_parser = parse_size)]
    bandwidth_read_burst: u64,

    /// Burst of --bandwidth-write-limit (QEMU's bps_wr_max).
    #[arg(long, value_name = "BYTES", default_value_t = 0, value_parser = parse_size)]
    bandwidth_write_burst: u64,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    #[command(flatten)]
    Common(ClientCommand),
    /// Start a block migration of a running backend's disk to a destination
    /// vhost-blk-backend (started with --incoming), and follow it. Prints the job id;
    /// exits non-zero if the job fails.
    Migrate {
        /// The running backend's --control-socket.
        #[arg(long, value_name = "SOCK")]
        control_socket: PathBuf,
        /// Where the destination listens: tcp:HOST:PORT, unix:PATH or fd:N.
        #[arg(long, value_name = "URI")]
        to: String,
        /// Send only the blocks changed since the checkpoint both ends share (falls back
        /// to a full copy, saying why, when they share none).
        #[arg(long)]
        incremental: bool,
        /// background: dirty passes go on while the guest writes; write-blocking: every
        /// write is mirrored before it completes (converges whatever the write rate).
        #[arg(long, value_enum, default_value_t = CopyModeArg::Background)]
        copy_mode: CopyModeArg,
        /// Bytes per second, suffixes k, M, G (e.g. 20M); changeable while it runs with
        /// migrate-set-speed on the control socket. Default: unlimited.
        #[arg(long, value_name = "RATE", value_parser = parse_size)]
        max_bandwidth: Option<u64>,
        /// Return once the job is ready (it may then complete) or once it concluded.
        #[arg(long, value_enum, default_value_t = WaitFor::Ready)]
        wait: WaitFor,
    },
    /// Show the migration job of a running backend.
    MigrateStatus {
        /// The running backend's --control-socket.
        #[arg(long, value_name = "SOCK")]
        control_socket: PathBuf,
        /// Print query-migrate's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Cancel the running migration job (the source keeps the disk; nothing is lost).
    MigrateCancel {
        /// The running backend's --control-socket.
        #[arg(long, value_name = "SOCK")]
        control_socket: PathBuf,
    },
    /// Hand the disk over: the ready job holds new requests, finishes the last pass and
    /// completes; the source then serves the disk no more.
    MigrateComplete {
        /// The running backend's --control-socket.
        #[arg(long, value_name = "SOCK")]
        control_socket: PathBuf,
    },
    /// Change a running backend's I/O limits (set-io-throttle on its control socket) with
    /// the flags that set them at start, then print the limits in force. Limits not given
    /// keep their value; 0 lifts a limit (a burst: back to the default). Exits non-zero,
    /// changing nothing, if the backend refuses the combination. With no limit given,
    /// only prints them.
    SetIoThrottle(SetIoThrottleArgs),
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum CopyModeArg {
    Background,
    WriteBlocking,
}

fn parse_uri(s: &str) -> Result<Uri, String> {
    s.parse()
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

/// The I/O limits of the command line, checked.
fn io_limits(args: &Args) -> Result<Limits, String> {
    let limits = Limits {
        iops: args.iops_limit,
        iops_rd: args.iops_read_limit,
        iops_wr: args.iops_write_limit,
        bps: args.bandwidth_limit,
        bps_rd: args.bandwidth_read_limit,
        bps_wr: args.bandwidth_write_limit,
        iops_max: args.iops_burst,
        iops_rd_max: args.iops_read_burst,
        iops_wr_max: args.iops_write_burst,
        bps_max: args.bandwidth_burst,
        bps_rd_max: args.bandwidth_read_burst,
        bps_wr_max: args.bandwidth_write_burst,
    };
    limits.check().map_err(|e| {
        format!(
            "I/O limits: {e} (iops is --iops-limit, iops_rd/iops_wr --iops-read/write-limit, \
             bps* the --bandwidth-*-limit flags, *_max the --*-burst flags)"
        )
    })?;
    Ok(limits)
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    if let Some(cmd) = args.command.take() {
        return client(cmd);
    }
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
    // Checked before anything is opened (the names in the message are set-io-throttle's).
    let limits = io_limits(&args)?;
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
            let incomplete = loaded == Loaded::Incomplete;
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
                Loaded::Incomplete if args.incoming.is_none() => {
                    return Err(format!(
                        "{}: an incoming block migration to {} did not complete, so the image \
                         is neither the old disk nor the new one; refusing to serve it. Run \
                         with --incoming to take a sync.",
                        file.display(),
                        path.display()
                    )
                    .into())
                }
                Loaded::Incomplete => log::warn!(
                    "{}: an earlier incoming sync did not complete; waiting for a full one",
                    file.display()
                ),
            }
            (Arc::new(bitmap), Some((f, checkpoint, incomplete)))
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
    let shared = device.shared().clone();
    shared.set_io_limits(limits);
    if !limits.unlimited() {
        log::info!("I/O limits: {limits:?}");
    }
    if let Some((f, checkpoint, incomplete)) = dirty_file {
        *shared.sync.lock().unwrap_or_else(|e| e.into_inner()) = SyncState {
            checkpoint,
            file: Some(f),
            incomplete,
        };
    }
    let security = Security {
        insecure: args.migration_insecure,
        tls: args.tls_creds.as_deref().map(TlsCreds::new),
    };
    if let (Some(t), Some(_)) = (&security.tls, &args.listen.control_socket) {
        t.check(false)?;
    }
    // Bind the migration address before anything else, so a bad one fails at start.
    let incoming = match &args.incoming {
        Some(uri) => {
            shared.gate.close();
            if let Some(t) = &security.tls {
                t.check(true)?;
            }
            Some(transport::listen(uri, &security)?)
        }
        None => None,
    };
    let shutdown = Shutdown::new()?;
    // Before any other thread exists, so every thread inherits the blocked signals.
    handle_termination_signals(shutdown.clone())?;
    let listener = args.listen.listener()?;
    if let Some(mut l) = incoming {
        let shared = shared.clone();
        log::info!("waiting for the incoming block migration; guest requests are held");
        std::thread::Builder::new()
            .name("incoming".into())
            .spawn(move || {
                sandbox::enter_or_exit(ThreadKind::Job);
                if let Err(e) = serve_incoming(&shared, &mut l) {
                    log::error!("incoming block migration: {e}");
                }
            })?;
    }
    let server = Server::new(Arc::new(device), shutdown);
    // The migration commands are only reachable through the control socket.
    let migrations = args.listen.control_socket.is_some().then(|| {
        Arc::new(Migrations::new(
            shared.clone(),
            security.clone(),
            std::time::Duration::from_millis(args.downtime_limit),
        ))
    });
    let control = match &migrations {
        Some(m) => args.listen.start_control(
            "vhost-blk-backend",
            env!("CARGO_PKG_VERSION"),
            server.state(),
            Arc::new(BlkControl::new(shared.clone(), m.clone())),
        )?,
        None => None,
    };
    if let (Some(m), Some(c)) = (&migrations, &control) {
        m.set_events(c.events());
    }
    // Metrics only read counters: a job list nobody can start jobs on will do.
    let _metrics = args.listen.start_metrics(
        "vhost-blk-backend",
        env!("CARGO_PKG_VERSION"),
        server.state(),
        Arc::new(BlkControl::new(
            shared.clone(),
            Arc::new(Migrations::new(
                shared.clone(),
                security.clone(),
                std::time::Duration::from_millis(args.downtime_limit),
            )),
        )),
    )?;
    server.serve(&listener)?;
    // Every request has completed (serve drains before it returns): the bitmap is
    // complete, and the file may say so.
    let st = shared.sync.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = &st.file {
        f.save_with(&dirty, &st.checkpoint, false, st.incomplete)
            .map_err(|e| format!("saving the dirty bitmap {}: {e}", f.path().display()))?;
    }
    log::info!("exiting");
    Ok(())
}

/// The subcommands: a client of a running backend's control socket.
fn client(cmd: Cmd) -> ExitCode {
    let r = match cmd {
        Cmd::Common(c) => return c.run(),
        Cmd::Migrate {
            control_socket,
            to,
            incremental,
            copy_mode,
            max_bandwidth,
            wait,
        } => client::migrate(
            &control_socket,
            &MigrateArgs {
                to,
                incremental,
                copy_mode: match copy_mode {
                    CopyModeArg::Background => "background",
                    CopyModeArg::WriteBlocking => "write-blocking",
                },
                max_bandwidth,
                wait,
            },
        ),
        Cmd::MigrateStatus {
            control_socket,
            json,
        } => client::status(&control_socket, json),
        Cmd::MigrateCancel { control_socket } => client::simple(&control_socket, "migrate-cancel"),
        Cmd::MigrateComplete { control_socket } => {
            client::simple(&control_socket, "migrate-complete")
        }
        Cmd::SetIoThrottle(a) => throttle_client::run(&a).map(|()| true).map_err(Into::into),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
