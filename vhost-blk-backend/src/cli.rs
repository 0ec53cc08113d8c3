//! The command line of vhost-blk-backend (clap), in the library so that the man page
//! generator (`xtask man`) renders the same flags and help the program parses.

use std::path::PathBuf;

use clap::Parser;
use vhost_user_device::engine::EngineChoice;
use vhost_user_device::program::{parse_size, ClientCommand, ListenArgs};

use crate::dirty;
use crate::migration::client::WaitFor;
use crate::migration::transport::Uri;
use crate::throttle::Limits;
use crate::throttle_client::SetIoThrottleArgs;
use crate::CacheMode;

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
pub struct Args {
    /// Talk to a running backend instead of starting one.
    #[command(subcommand)]
    pub command: Option<Cmd>,

    #[command(flatten)]
    pub listen: ListenArgs,

    /// Raw disk image file or block device to serve.
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "print_capabilities"
    )]
    pub blk_file: Option<PathBuf>,

    /// Open the disk read-only and offer a read-only device (writes fail with an I/O error).
    #[arg(long)]
    pub read_only: bool,

    /// Number of request queues; each gets its own worker thread and io_uring.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,

    /// Entries per queue (a power of two, up to 1024).
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Serial number the guest reads with GET_ID (at most 20 bytes; default: the file name).
    #[arg(long)]
    pub serial: Option<String>,

    /// Host cache mode: "none" uses O_DIRECT (falls back to buffered with a warning where
    /// the file system cannot), "writeback" goes through the host page cache.
    #[arg(long, value_enum, default_value_t = CacheMode::None)]
    pub cache: CacheMode,

    /// How the disk's reads and writes are done. "uring": io_uring, asynchronous, what
    /// disks want. "inline": system calls (preadv2, pwritev2, fdatasync, fallocate) on the
    /// queue's worker thread; a memory file system's I/O is a memory copy that io_uring
    /// would hand to a kernel thread (a context switch each way, and a core on a small
    /// host), but on a disk every request, flushes included, then stalls its queue while it
    /// runs. "mapped" (tmpfs only): reads and writes are memory copies through a shared
    /// mapping of the file, with no system call and no page-cache lookup per request
    /// (holes are still read with system calls, so a sparse image stays sparse; a page
    /// that vanishes under the mapping, the file truncated or the tmpfs full, fails its
    /// request with EIO and the rest goes inline). "auto" (default): mapped on tmpfs,
    /// inline on hugetlbfs and ramfs, io_uring elsewhere. The choice is logged at start.
    #[arg(long, value_enum, value_name = "ENGINE", default_value_t = EngineChoice::Auto)]
    pub io_engine: EngineChoice,

    /// Register guest memory with each queue's io_uring as fixed buffers, so that
    /// single-buffer reads and writes skip pinning the guest's pages per request
    /// (READ_FIXED/WRITE_FIXED). Only for the io_uring engine with O_DIRECT (--cache
    /// none on a disk file system or block device); otherwise it has no effect. What it
    /// costs: the guest's whole RAM is pinned in host memory (resident, never swapped)
    /// once per queue, counted against RLIMIT_MEMLOCK, which must allow guest RAM ×
    /// --num-queues (systemd LimitMEMLOCK=, ulimit -l); when it does not, or the kernel
    /// cannot pin the memory (the VMM's RAM must be memfd, shm or hugetlbfs, as with QEMU's
    /// memory-backend-memfd), one warning says so and the disk is served without them.
    /// Do not combine with a balloon, free page reporting or virtio-mem: RAM the guest
    /// gives back and gets again is new pages, which registered buffers would not see.
    #[arg(long)]
    pub pin_guest_memory: bool,

    /// Logical block size the guest sees (512 or 4096).
    #[arg(long, default_value_t = 512, value_parser = parse_block_size)]
    pub block_size: u32,

    /// Adaptive polling: after each kick or completion a queue worker keeps looking for
    /// the next one for up to this many microseconds before it sleeps (like QEMU's
    /// iothread poll-max-ns). Saves a wake-up per batch under load, at the price of CPU
    /// while the guest is between batches. 0 (default): never poll; on small hosts the
    /// guest needs the CPU.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub poll_us: u32,

    /// Size of the blocks whose changes are tracked for block migration (a power of two
    /// from 512 to 64M; suffixes k, M). Every completed write, discard and write-zeroes
    /// marks the blocks it touched, and an incremental sync sends exactly those. The
    /// bitmap costs one bit per block in memory: 32 MiB per TiB of disk at 4k, 2 MiB per
    /// TiB at 64k.
    #[arg(long, value_name = "BYTES", default_value = "4k", value_parser = parse_granularity)]
    pub dirty_granularity: u64,

    /// Keep the dirty-block bitmap in FILE across restarts, so the next incremental sync
    /// still knows what changed. It is written at every sync checkpoint and on a clean
    /// exit, and marked in use while the backend runs: after a crash (or a file made for
    /// another size or granularity) the whole disk counts as changed, never too little.
    /// Created if missing.
    #[arg(long, value_name = "FILE")]
    pub dirty_bitmap: Option<PathBuf>,

    /// Be the destination of a block migration: take the disk from a source
    /// vhost-blk-backend at URI (tcp:HOST:PORT, unix:PATH, or fd:N for a socket a manager
    /// hands over). The VMM may connect at once; the guest's requests wait (they do not
    /// fail) until a sync has landed, been checked and made durable. The image must exist
    /// with the source's size; a failed sync leaves it held for a retry.
    #[arg(long, value_name = "URI", value_parser = parse_uri)]
    pub incoming: Option<Uri>,

    /// Allow the migration stream over plain TCP: the disk then crosses the network
    /// unencrypted and unauthenticated. Needed on both ends for tcp: URIs.
    #[arg(long)]
    pub migration_insecure: bool,

    /// Encrypt and mutually authenticate migration streams over TCP with TLS, from DIR in
    /// QEMU's tls-creds-x509 layout (ca-cert.pem; server-cert.pem and server-key.pem for
    /// --incoming; client-cert.pem and client-key.pem for migrate): the credentials
    /// libvirt deploys for migration work as they are. Needed on both ends.
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,

    /// The switch-over time a migration aims for: the job is ready once what is left to
    /// copy takes at most this long at the measured rate.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    pub downtime_limit: u64,

    /// Requests per second the disk serves at most, reads and writes together (0: unlimited).
    /// Requests over the limit wait in the backend; they never fail. Token buckets as in
    /// QEMU's throttle groups (its iops). Changeable at run time with set-io-throttle on
    /// the control socket. Flush, discard and get-id requests are not counted;
    /// write-zeroes counts as a write of no bytes.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub iops_limit: u64,

    /// Read requests per second at most (QEMU's iops_rd); not with --iops-limit.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub iops_read_limit: u64,

    /// Write requests per second at most (QEMU's iops_wr); not with --iops-limit.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub iops_write_limit: u64,

    /// Bytes per second at most, read and written together (QEMU's bps); suffixes k, M,
    /// G (e.g. 20M). A request larger than the burst still goes, and puts the bucket in
    /// debt for those after it.
    #[arg(long, value_name = "RATE", default_value_t = 0, value_parser = parse_size)]
    pub bandwidth_limit: u64,

    /// Bytes read per second at most (QEMU's bps_rd); not with --bandwidth-limit.
    #[arg(long, value_name = "RATE", default_value_t = 0, value_parser = parse_size)]
    pub bandwidth_read_limit: u64,

    /// Bytes written per second at most (QEMU's bps_wr); not with --bandwidth-limit.
    #[arg(long, value_name = "RATE", default_value_t = 0, value_parser = parse_size)]
    pub bandwidth_write_limit: u64,

    /// Burst of --iops-limit: requests that may go at once after a quiet time, the
    /// capacity of the bucket (QEMU's iops_max; at least the limit). Default: a tenth of
    /// a second's worth.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub iops_burst: u64,

    /// Burst of --iops-read-limit (QEMU's iops_rd_max).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub iops_read_burst: u64,

    /// Burst of --iops-write-limit (QEMU's iops_wr_max).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub iops_write_burst: u64,

    /// Burst of --bandwidth-limit in bytes, suffixes k, M, G (QEMU's bps_max; at least
    /// the limit). Default: a tenth of a second's worth.
    #[arg(long, value_name = "BYTES", default_value_t = 0, value_parser = parse_size)]
    pub bandwidth_burst: u64,

    /// Burst of --bandwidth-read-limit (QEMU's bps_rd_max).
    #[arg(long, value_name = "BYTES", default_value_t = 0, value_parser = parse_size)]
    pub bandwidth_read_burst: u64,

    /// Burst of --bandwidth-write-limit (QEMU's bps_wr_max).
    #[arg(long, value_name = "BYTES", default_value_t = 0, value_parser = parse_size)]
    pub bandwidth_write_burst: u64,
}

#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
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
pub enum CopyModeArg {
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

impl Args {
    /// The I/O limits of the command line, checked.
    pub fn io_limits(&self) -> Result<Limits, String> {
        let limits = Limits {
            iops: self.iops_limit,
            iops_rd: self.iops_read_limit,
            iops_wr: self.iops_write_limit,
            bps: self.bandwidth_limit,
            bps_rd: self.bandwidth_read_limit,
            bps_wr: self.bandwidth_write_limit,
            iops_max: self.iops_burst,
            iops_rd_max: self.iops_read_burst,
            iops_wr_max: self.iops_write_burst,
            bps_max: self.bandwidth_burst,
            bps_rd_max: self.bandwidth_read_burst,
            bps_wr_max: self.bandwidth_write_burst,
        };
        limits.check().map_err(|e| {
            format!(
                "I/O limits: {e} (iops is --iops-limit, iops_rd/iops_wr --iops-read/write-limit, \
             bps* the --bandwidth-*-limit flags, *_max the --*-burst flags)"
            )
        })?;
        Ok(limits)
    }
}
