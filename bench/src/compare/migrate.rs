//! `bench compare migrate`: moving a disk image to another host, ours against QEMU's and
//! against a plain TCP copy of the same image.
//!
//! Every case runs over a loopback TCP connection, on the same image, in one run:
//!
//! - **Full copy**: the whole image to a fresh destination, throughput in MB/s. Ours
//!   over plain TCP and over TLS ([`ours`]), qemu-storage-daemon's `blockdev-mirror` to
//!   an NBD export ([`run_rep`]), and a plain TCP copy with nothing but a socket and
//!   pread/pwrite ([`plain`]): the limit a migration over loopback is measured against.
//! - **Incremental return**: after a full copy, a known set of scattered writes (64 MiB
//!   of 4–64 KiB writes by default) and an incremental sync that should send only what
//!   changed: bytes sent, against the dirty blocks at the tracking granularity and
//!   against the distinct bytes written.
//! - **I/O stall at switch-over** (ours; [`switchover`]): under a steady 4 KiB random
//!   write load (paced, and as fast as it goes), the longest time without a completion
//!   across the hand-over (the source's last completion to the destination's first), in
//!   background mode and, where the backend offers it, write-blocking mode.
//!
//! Every repetition checks that the destination is byte-for-byte the source after each
//! phase, and that the writes really landed: a migration benchmark that moves the wrong
//! data measures nothing.
//!
//! qemu-storage-daemon ([`qsd`]) and our backend are driven over QMP ([`qmp`]); the
//! incremental writes go through an NBD export of the source ([`nbd`]).

mod creds;
mod nbd;
mod ours;
mod plain;
mod qmp;
mod qsd;
mod switchover;

use std::collections::HashMap;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;

use crate::compare::report::{self, machine, Metric, Row, Section};
use crate::compare::{fill_random, CompareError};
use crate::load::blk::{parse_duration, parse_size};
use nbd::NbdClient;
use qmp::{bitmap_info, JobEvent};
use qsd::{qsd_version, Qsd};

/// Options of `bench compare migrate`.
#[derive(Args, Debug)]
pub struct CompareMigrateArgs {
    /// Directories for the source and destination images, comma-separated (tmpfs
    /// /dev/shm by default; a disk file system such as /var/tmp adds the disk's cost);
    /// each gets its own set of rows.
    #[arg(long = "dir", value_delimiter = ',', default_value = "/dev/shm")]
    dirs: Vec<PathBuf>,
    /// Image size (a multiple of 4 KiB).
    #[arg(long, default_value = "1g", value_parser = parse_size)]
    size: u64,
    /// Repetitions of every case (each on a fresh destination image and fresh daemons).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Where to write migrate.md, migrate.json and migrate.png.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Data written into the source between the full copy and the incremental return
    /// (a multiple of 4 KiB): writes of 4 KiB to 64 KiB at random 4 KiB-aligned offsets.
    #[arg(long, default_value = "64m", value_parser = parse_size)]
    incremental_writes: u64,
    /// 4 KiB random writes the load generator keeps in flight on the source (and submits
    /// to the destination) during the switch-over cases.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    stall_iodepth: u16,
    /// The paced switch-over load: writes per second, both ends together (0: leave the
    /// paced rows out). The unpaced load (as fast as the writes complete) always runs.
    #[arg(long, default_value_t = 20_000)]
    stall_iops: u64,
    /// How long the switch-over cases let the job run under the load once it is ready,
    /// before `migrate-complete` (e.g. 500ms, 2s).
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    stall_hold: Duration,
}

/// The switch-over's copy modes, in row order.
const COPY_MODES: [&str; 2] = ["background", "write-blocking"];

/// Contender names, ours first.
const CONTENDERS: [&str; 3] = [
    "vhost-blk-backend block migration",
    "qemu-storage-daemon blockdev-mirror → NBD",
    "plain TCP copy",
];

/// Block size of the incremental writes' offsets and of their checks.
const BLOCK: u64 = 4096;
/// Largest incremental write.
const MAX_WRITE: u64 = 64 << 10;

/// Bytes sent by an incremental sync over the dirty blocks' bytes at the tracking
/// granularity (1.00: nothing but the blocks; the excess is protocol).
const SENT_PER_DIRTY: Metric = Metric {
    name: "sent / (dirty blocks × granularity)",
    unit: "×",
    higher_is_better: false,
};
/// Bytes sent by an incremental sync over the distinct bytes written (a coarse tracking
/// granularity sends the untouched rest of every cluster written to).
const SENT_PER_WRITTEN: Metric = Metric {
    name: "sent / distinct bytes written",
    unit: "×",
    higher_is_better: false,
};
/// Requests that completed with an error status.
const IO_ERRORS: Metric = Metric {
    name: "I/O errors",
    unit: "",
    higher_is_better: false,
};

/// One repetition of the peer's cases.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    /// Full copy, MB/s (10^6 bytes).
    full_mbs: f64,
    /// Incremental return: bytes from the source to the destination on the connection
    /// (NBD requests with their payload).
    inc_sent: u64,
    /// Incremental return: wall time, ms.
    inc_ms: f64,
    /// Incremental return: bytes the backup job copied (its `len`).
    inc_job_len: u64,
    /// Incremental return: distinct bytes the writes touched (4 KiB blocks).
    inc_written: u64,
    /// Number of incremental writes.
    writes: usize,
    /// Granularity of the dirty bitmap, bytes.
    granularity: u64,
}

/// One repetition of ours and of the plain copy.
#[derive(Clone, Copy, Debug, Default)]
struct OursSample {
    /// Full copy over plain TCP, MB/s.
    tcp_mbs: f64,
    /// Of which: from `migrate-complete` to concluded, ms.
    tcp_handover_ms: f64,
    /// Full copy over TLS, MB/s.
    tls_mbs: f64,
    /// The plain TCP copy, MB/s.
    plain_mbs: f64,
    /// The incremental return.
    ret: ours::Return,
    /// The switch-overs: per load (paced, unpaced), per copy mode ([`COPY_MODES`]);
    /// None: not run (no paced load, or the mode is not available).
    stalls: [[Option<switchover::Stall>; 2]; 2],
}

/// The seed of repetition `rep`'s incremental writes (the same for every contender).
fn rep_seed(rep: u64) -> u64 {
    0x9e37_79b9_7f4a_7c15 ^ rep.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Runs the comparison on every directory and returns the section (also written to
/// `<out>/migrate.{md,json,png}`).
pub fn compare_migrate(a: &CompareMigrateArgs) -> Result<Section, CompareError> {
    if a.size == 0 || !a.size.is_multiple_of(BLOCK) || a.size < MAX_WRITE {
        return Err(CompareError::Run(format!(
            "--size must be a multiple of {BLOCK} and at least {MAX_WRITE}"
        )));
    }
    if !a.incremental_writes.is_multiple_of(BLOCK) || a.incremental_writes > a.size {
        return Err(CompareError::Run(format!(
            "--incremental-writes must be a multiple of {BLOCK} and at most --size"
        )));
    }
    if a.reps == 0 {
        return Err(CompareError::Run("--reps must be at least 1".into()));
    }
    let qsd_version = qsd_version()?;
    let bin = vhost_tests::guest::locate_sibling_binary("vhost-blk-backend", "VHOST_BLK_BACKEND")
        .map_err(CompareError::Run)?;
    let ours_version = report::program_version(&bin).unwrap_or_else(|| "vhost-blk-backend".into());
    let job_timeout = Duration::from_secs(60 + a.size / 5_000_000);
    let mut rows = Vec::new();
    let mut facts = Vec::new();
    // Why write-blocking is not measured (the backend refused it), once known.
    let mut wb_missing: Option<String> = None;
    for dir in &a.dirs {
        let work = WorkDir::create(dir)?;
        let image = work.0.join("src.img");
        eprintln!(
            "migrate: creating a {} image of random data in {}",
            human(a.size),
            work.0.display()
        );
        fill_random(&image, a.size)?;
        let creds = work.0.join("tls");
        creds::make(&creds)?;
        let ctx = ours::Ctx {
            bin: &bin,
            work: &work.0,
            image: &image,
            size: a.size,
            job_timeout,
        };
        let mut samples = Vec::new();
        let mut mine = Vec::new();
        for rep in 0..a.reps {
            eprintln!("migrate: {} rep {}/{}", dir.display(), rep + 1, a.reps);
            samples.push(run_rep(a, &work.0, &image, rep as u64)?);
            mine.push(run_ours_rep(a, &ctx, &creds, rep as u64, &mut wb_missing)?);
        }
        let place = dir.display().to_string();
        let per = |o: &dyn Fn(&OursSample) -> f64, q: &dyn Fn(&Sample) -> f64| {
            vec![
                mine.iter().map(o).collect(),
                samples.iter().map(q).collect(),
                Vec::new(),
            ]
        };
        let full = format!("{place}: full copy {}", human(a.size));
        rows.push(Row {
            case: format!("{full}, TCP"),
            metric: report::MB_S,
            samples: vec![
                mine.iter().map(|s| s.tcp_mbs).collect(),
                samples.iter().map(|s| s.full_mbs).collect(),
                mine.iter().map(|s| s.plain_mbs).collect(),
            ],
        });
        rows.push(Row {
            case: format!("{full}, ours over TLS"),
            metric: report::MB_S,
            samples: vec![
                mine.iter().map(|s| s.tls_mbs).collect(),
                Vec::new(),
                mine.iter().map(|s| s.plain_mbs).collect(),
            ],
        });
        let inc = format!(
            "{place}: incremental return after {} of writes",
            human(a.incremental_writes)
        );
        rows.push(Row {
            case: inc.clone(),
            metric: report::SENT_MIB,
            samples: per(&|s| s.ret.wire as f64 / f64::from(1 << 20), &|s| {
                s.inc_sent as f64 / f64::from(1 << 20)
            }),
        });
        rows.push(Row {
            case: inc.clone(),
            metric: report::TIME_MS,
            samples: per(&|s| s.ret.ms, &|s| s.inc_ms),
        });
        rows.push(Row {
            case: inc.clone(),
            metric: SENT_PER_DIRTY,
            samples: per(&|s| s.ret.wire as f64 / s.ret.dirty as f64, &|s| {
                s.inc_sent as f64 / s.inc_job_len as f64
            }),
        });
        rows.push(Row {
            case: inc,
            metric: SENT_PER_WRITTEN,
            samples: per(&|s| s.ret.wire as f64 / s.ret.written as f64, &|s| {
                s.inc_sent as f64 / s.inc_written as f64
            }),
        });
        let ours_only = |v: Vec<f64>| vec![v, Vec::new(), Vec::new()];
        let mut errors = vec![0.0; mine.len()];
        for (l, load) in loads(a).iter().enumerate() {
            let Some(load) = load else { continue };
            for (m, mode) in COPY_MODES.iter().enumerate() {
                let runs: Vec<switchover::Stall> =
                    mine.iter().filter_map(|s| s.stalls[l][m]).collect();
                rows.push(Row {
                    case: format!(
                        "{place}: switch-over under 4k random writes QD{}, {}, {mode}",
                        load.iodepth,
                        load_name(load)
                    ),
                    metric: STALL_MS,
                    samples: ours_only(runs.iter().map(|s| s.stall_ms).collect()),
                });
                for (e, s) in errors.iter_mut().zip(&mine) {
                    *e += s.stalls[l][m].map_or(0.0, |s| s.errors as f64);
                }
            }
        }
        rows.push(Row {
            case: format!("{place}: switch-over, every run above"),
            metric: IO_ERRORS,
            samples: ours_only(errors),
        });

        let med = |v: Vec<f64>| report::median(&v);
        let job = med(samples.iter().map(|s| s.inc_job_len as f64).collect());
        let s0 = samples.first().copied().unwrap_or_default();
        facts.push(format!(
            "{place}: the {} of writes ({} writes in the first repetition, {:.1} MiB of distinct 4 KiB blocks) dirtied a median {:.1} MiB at qemu-storage-daemon's {} KiB bitmap granularity, exactly the clusters they touch, which is what its backup job copied (the rest of what it sent is NBD request headers); ours tracks 4 KiB blocks and sent exactly those blocks' data.",
            human(a.incremental_writes),
            s0.writes,
            s0.inc_written as f64 / f64::from(1 << 20),
            job / f64::from(1 << 20),
            s0.granularity >> 10,
        ));
        facts.push(format!(
            "{place}: of our TCP full copy's time, a median {:.0} ms is the hand-over (from `migrate-complete` to concluded: the last pass, the destination making the image durable, its acknowledgement).",
            med(mine.iter().map(|s| s.tcp_handover_ms).collect()),
        ));
        for (l, load) in loads(a).iter().enumerate() {
            let Some(load) = load else { continue };
            let per_mode: Vec<String> = COPY_MODES
                .iter()
                .enumerate()
                .filter_map(|(m, mode)| {
                    let runs: Vec<switchover::Stall> =
                        mine.iter().filter_map(|s| s.stalls[l][m]).collect();
                    (!runs.is_empty()).then(|| {
                        format!(
                            "{mode}: {:.0} writes/s on the source between ready and `migrate-complete`, the job's own downtime (holding new requests → the destination's acknowledgement) {:.1} ms, {:.0} passes",
                            med(runs.iter().map(|s| s.src_iops).collect()),
                            med(runs.iter().map(|s| s.downtime_ms).collect()),
                            med(runs.iter().map(|s| s.passes as f64).collect()),
                        )
                    })
                })
                .collect();
            facts.push(format!(
                "{place}: switch-over, {} (medians): {}.",
                load_name(load),
                per_mode.join("; ")
            ));
        }
    }
    let mut notes = vec![
        format!("Ours: {ours_version}, two processes: the destination `vhost-blk-backend --blk-file DST --incoming tcp:127.0.0.1:PORT --migration-insecure` (or `--tls-creds DIR`, a throwaway CA's certificates in QEMU's tls-creds-x509 layout, on both ends), the source with `--control-socket`, both with `--dirty-granularity 4k` (and `--dirty-bitmap FILE` for the full copies and the return); the job driven over the control socket as `vhost-blk-backend migrate --to URI` and `migrate-complete` do (QMP `migrate`, JOB_STATUS_CHANGE ready, `migrate-complete`, concluded). Full copy timed from `migrate` to concluded (the destination has made the image durable and acknowledged)."),
        "qemu-storage-daemon, full copy: the source daemon (file driver, aio=io_uring, cache.direct=on) runs `blockdev-mirror sync=full` to an `nbd` client node whose server is a second daemon exporting a fresh sparse image of the same size (same options) on 127.0.0.1 over TCP; timed from the command to BLOCK_JOB_COMPLETED after `block-job-cancel` at BLOCK_JOB_READY (libvirt's way of ending a storage migration). MB = 10^6 bytes.".into(),
        "Plain TCP copy: the same data flow as our full copy without its protocol (no headers, no checksums): this process reads the image with pread in 1 MiB pieces and writes each to the socket (our source writes a 1 MiB extent frame so); a receiver thread reads into a buffer of two of our frames and writes whole 1 MiB pieces with pwrite (as our destination writes extents), then fdatasync (as our destination does before it acknowledges); timed from connect to that fdatasync. Both buffered, over 127.0.0.1, run right before or right after our TCP full copy by turns. Ratios against it: ours / plain.".into(),
        "Incremental return, qemu-storage-daemon: a dirty bitmap is added to the source node at BLOCK_JOB_READY; the writes go through a second (unix-socket NBD) export of that node so the bitmap records them; then `blockdev-backup sync=incremental` with that bitmap copies the dirty clusters to the destination on the full copy's NBD connection. Bytes sent: the kernel's count of bytes the destination's end of that connection received during the job (`tcpi_bytes_received` via `ss -ti`; not the sender's `bytes_sent`, which counts loopback retransmissions on a busy machine twice); time: command to BLOCK_JOB_COMPLETED.".into(),
        "Incremental return, ours: after the full copy the destination owns the disk; the same writes go to it through a vhost-user frontend (so its dirty bitmap records them as a guest's); the old source exits (SIGTERM: its bitmap file keeps the checkpoint), comes back with `--incoming` and that file, and the destination migrates back with `migrate --incremental`. Bytes sent: the job's count of everything it wrote to the connection (`query-migrate` bytes.wire: frames, headers, handshake), checked against the kernel's `tcpi_bytes_received` on the connection's other end at ready (within 1 KiB); time: `migrate` to concluded. The job must report mode incremental and cover exactly the blocks written.".into(),
        format!("Switch-over: the load generator drives both ends in one process (one clock): {} 4 KiB random writes in flight on the source over the whole disk ({}, and as fast as they complete), as many submitted to the destination, which holds them until the sync has landed; the job runs (`migrate` with `copy-mode`, ready, {:?} more under the load, `migrate-complete`: the load generator is not a VMM doing LOG_ALL). I/O stall: the longest time without a completion on either end, from the last one before `migrate-complete` to the destination's first; in background mode that is the source's last completion to the destination's first (in write-blocking mode the writes waiting for the last round complete on the source after the hand-over). Then the destination must equal the source except the blocks its own session wrote after the hand-over. No peer row: qemu-storage-daemon's switch-over is its VMM's.", a.stall_iodepth, if a.stall_iops > 0 { format!("paced at {} writes/s", a.stall_iops) } else { "not paced".into() }, a.stall_hold),
        "Checked every repetition: the destination equals the source byte for byte after every full copy and incremental return, every incremental write is in both images, every request's status is counted.".into(),
    ];
    if let Some(why) = &wb_missing {
        notes.push(format!(
            "Write-blocking switch-over: not available in this build (`migrate` answered: {why})."
        ));
    }
    notes.extend(facts);
    let section = Section {
        name: "migrate".into(),
        title: "Block migration: full copy, incremental return and switch-over over loopback".into(),
        description: format!(
            "Machine: {}. Image: {} of random data in {}. {ours_version}; {qsd_version}. {} repetitions, each with fresh backends and a fresh destination image, the contenders one after the other; median (±spread = (max-min)/median). Command: `bench compare migrate --dir {} --size {} --reps {} --incremental-writes {} --stall-iodepth {} --stall-iops {} --stall-hold {}ms`.",
            machine(),
            human(a.size),
            a.dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(" and "),
            a.reps,
            a.dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(","),
            size_arg(a.size),
            a.reps,
            size_arg(a.incremental_writes),
            a.stall_iodepth,
            a.stall_iops,
            a.stall_hold.as_millis(),
        ),
        contenders: CONTENDERS.iter().map(|c| c.to_string()).collect(),
        ratios: true,
        rows,
        notes,
    };
    section.write(&a.out)?;
    Ok(section)
}

/// The plain TCP copy of the image, checked; MB/s.
fn plain_copy(ctx: &ours::Ctx) -> Result<f64, CompareError> {
    let dst = ctx.work.join("plain-dst.img");
    let secs = plain::copy(ctx.image, &dst, ctx.size)?;
    files_equal(ctx.image, &dst)
        .map_err(|e| CompareError::Run(format!("after the plain TCP copy: {e}")))?;
    let _ = std::fs::remove_file(&dst);
    Ok(ctx.size as f64 / 1e6 / secs)
}

/// The switch-over loads, paced and unpaced ([`OursSample::stalls`]'s order); the paced
/// one is None with `--stall-iops 0`.
fn loads(a: &CompareMigrateArgs) -> [Option<switchover::Load>; 2] {
    let load = |iops| switchover::Load {
        iodepth: a.stall_iodepth,
        iops,
        hold: a.stall_hold,
    };
    [
        (a.stall_iops > 0).then(|| load(a.stall_iops)),
        Some(load(0)),
    ]
}

/// "20000 writes/s" or "unpaced", for case names.
fn load_name(l: &switchover::Load) -> String {
    match l.iops {
        0 => "unpaced".into(),
        n => format!("{n} writes/s"),
    }
}

/// The switch-over stall (its own metric name, so the table says what the time is).
const STALL_MS: Metric = Metric {
    name: "I/O stall",
    unit: "ms",
    higher_is_better: false,
};

/// One repetition of ours (TCP full copy and incremental return, TLS full copy, the
/// switch-overs) and of the plain TCP copy, one after the other.
fn run_ours_rep(
    a: &CompareMigrateArgs,
    ctx: &ours::Ctx,
    creds: &Path,
    rep: u64,
    wb_missing: &mut Option<String>,
) -> Result<OursSample, CompareError> {
    let mbs = |d: Duration| ctx.size as f64 / 1e6 / d.as_secs_f64();
    let mut s = OursSample::default();

    // The plain copy right before or right after ours (by turns), so that the ratio of
    // the two compares runs under the same conditions on a shared machine.
    let plain_first = rep.is_multiple_of(2);
    if plain_first {
        s.plain_mbs = plain_copy(ctx)?;
    }
    let full = ours::full_copy(ctx, &ours::Link::Insecure)?;
    s.tcp_mbs = mbs(full.job.total);
    s.tcp_handover_ms = full.job.handover.as_secs_f64() * 1e3;
    if !plain_first {
        // The full copy's backends go on to the incremental return; they are idle.
        s.plain_mbs = plain_copy(ctx)?;
    }
    let seed = rep_seed(rep);
    let plan = plan_writes(ctx.size, a.incremental_writes, seed);
    s.ret = ours::incremental_return(ctx, full, &plan, seed)?;

    let tls = ours::full_copy(ctx, &ours::Link::Tls(creds.to_path_buf()))?;
    s.tls_mbs = mbs(tls.job.total);
    drop(tls);

    for (l, load) in loads(a).iter().enumerate() {
        let Some(load) = load else { continue };
        for (m, mode) in COPY_MODES.iter().enumerate() {
            if m == 1 && wb_missing.is_some() {
                continue;
            }
            match switchover::run(ctx, mode, *load, seed)? {
                Ok(st) => s.stalls[l][m] = Some(st),
                Err(why) if m == 1 => *wb_missing = Some(why),
                Err(why) => {
                    return Err(CompareError::Run(format!(
                        "{mode} migration refused: {why}"
                    )))
                }
            }
        }
    }
    let _ = std::fs::remove_file(ctx.work.join("ours-dst.img"));
    eprintln!(
        "migrate: ours full copy {:.0} MB/s over TCP ({:.0} ms hand-over), {:.0} MB/s over TLS; plain TCP {:.0} MB/s; incremental {:.2} MiB sent ({:.2} MiB dirty) in {:.1} ms; switch-over stalls (ms; paced, unpaced × background, write-blocking) {:?}",
        s.tcp_mbs,
        s.tcp_handover_ms,
        s.tls_mbs,
        s.plain_mbs,
        s.ret.wire as f64 / f64::from(1 << 20),
        s.ret.dirty as f64 / f64::from(1 << 20),
        s.ret.ms,
        s.stalls
            .map(|l| l.map(|m| m.map(|st| (st.stall_ms * 10.0).round() / 10.0)))
    );
    Ok(s)
}

/// One repetition: full copy, writes, incremental return, with checks after each phase.
///
/// Full copy with `blockdev-mirror sync=full`, not `blockdev-backup sync=full`: storage
/// migration is what mirror is for (libvirt migrates non-shared disks exactly so: mirror
/// to the destination's NBD server, wait for READY, then `block-job-cancel`, which ends a
/// ready mirror cleanly without switching the source over). Mirror keeps copying guest
/// writes made during the copy and converges; backup gives a copy as of the job's start
/// and would leave later writes behind, which is a backup, not a migration.
///
/// Incremental return with `blockdev-backup sync=incremental`: QEMU 10.0's
/// `blockdev-mirror` takes no bitmap, and backup is QEMU's only way to copy just a
/// bitmap's dirty clusters. The bitmap is added at READY, before the mirror ends: every
/// write from then on is recorded, and the ones before it were mirrored, so with a live
/// guest no write could fall between the two copies (here nothing writes then anyway).
fn run_rep(
    a: &CompareMigrateArgs,
    work: &Path,
    image: &Path,
    rep: u64,
) -> Result<Sample, CompareError> {
    let dst_image = work.join("dst.img");
    // A fresh, sparse destination every repetition, as a new host would have.
    std::fs::File::create(&dst_image)?.set_len(a.size)?;
    let res = run_rep_on(a, work, image, &dst_image, rep);
    let _ = std::fs::remove_file(&dst_image);
    res
}

fn run_rep_on(
    a: &CompareMigrateArgs,
    work: &Path,
    image: &Path,
    dst_image: &Path,
    rep: u64,
) -> Result<Sample, CompareError> {
    let job_timeout = Duration::from_secs(60 + a.size / 5_000_000);
    let nbd_port = free_port()?;

    let mut dst = Qsd::start(work, "dst")?;
    dst.add_file_node("dst", dst_image)?;
    dst.qmp.execute(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": nbd_port.to_string()}}}),
    )?;
    dst.qmp.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "dst", "node-name": "dst", "name": "dst", "writable": true}),
    )?;

    let mut src = Qsd::start(work, "src")?;
    src.add_file_node("src", image)?;
    let writer_sock = work.join("src-nbd.sock");
    src.qmp.execute(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": writer_sock}}}),
    )?;
    src.qmp.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "src", "node-name": "src", "name": "src", "writable": true}),
    )?;
    src.add_nbd_node("to-dst", nbd_port)?;

    // 1. Full copy.
    let t0 = Instant::now();
    src.qmp.execute(
        "blockdev-mirror",
        json!({"job-id": "full", "device": "src", "target": "to-dst", "sync": "full"}),
    )?;
    src.qmp.wait_job("full", true, job_timeout)?;
    src.qmp.execute(
        "block-dirty-bitmap-add",
        json!({"node": "src", "name": "ret"}),
    )?;
    src.qmp
        .execute("block-job-cancel", json!({"device": "full"}))?;
    let full = src.qmp.wait_job("full", false, job_timeout)?;
    let full_secs = t0.elapsed().as_secs_f64();
    if let JobEvent::Completed { len, offset } = full {
        if len != a.size || offset != a.size {
            return Err(CompareError::Run(format!(
                "mirror ended at {offset} of {len} bytes, image is {}",
                a.size
            )));
        }
    }
    // The connection must have carried at least the image (zero detection would show
    // here as less, and make the MB/s a measure of something else).
    let full_sent = tcp_bytes_received(nbd_port)?;
    if full_sent < a.size {
        return Err(CompareError::Run(format!(
            "the full copy sent {full_sent} bytes for a {}-byte image",
            a.size
        )));
    }
    files_equal(image, dst_image)
        .map_err(|e| CompareError::Run(format!("after the full copy: {e}")))?;

    // 2. Writes through the source node, so that its bitmap sees them.
    let seed = rep_seed(rep);
    let plan = plan_writes(a.size, a.incremental_writes, seed);
    let mut nbd = NbdClient::connect(&writer_sock, "src", a.size)?;
    let mut buf = vec![0u8; MAX_WRITE as usize];
    for (i, w) in plan.iter().enumerate() {
        let data = &mut buf[..w.len as usize];
        for (k, chunk) in data.chunks_exact_mut(BLOCK as usize).enumerate() {
            fill_block(seed, i, w.off / BLOCK + k as u64, chunk);
        }
        nbd.write(w.off, data)?;
    }
    nbd.flush()?;
    nbd.disconnect();
    let nodes = src
        .qmp
        .execute("query-named-block-nodes", json!({"flat": true}))?;
    let (dirty, granularity) = bitmap_info(&nodes, "src", "ret")
        .ok_or_else(|| CompareError::Run("bitmap `ret` missing on node src".into()))?;
    // Exactly the clusters the writes touched: no write missed, nothing else dirtied,
    // so the bytes sent below are QEMU's cost of these writes and nothing else.
    let expected = dirty_bytes(&plan, granularity, a.size);
    if dirty != expected {
        return Err(CompareError::Run(format!(
            "the bitmap has {dirty} dirty bytes, the writes touched {expected} at granularity {granularity}"
        )));
    }

    // 3. Incremental return, on the same connection as the full copy.
    let sent0 = tcp_bytes_received(nbd_port)?;
    let t1 = Instant::now();
    src.qmp.execute(
        "blockdev-backup",
        json!({"job-id": "ret", "device": "src", "target": "to-dst", "sync": "incremental", "bitmap": "ret"}),
    )?;
    let inc = src.qmp.wait_job("ret", false, job_timeout)?;
    let inc_secs = t1.elapsed().as_secs_f64();
    let sent = tcp_bytes_received(nbd_port)? - sent0;
    let JobEvent::Completed { len: job_len, .. } = inc else {
        return Err(CompareError::Run(format!("backup job ended with {inc:?}")));
    };
    if job_len != dirty {
        return Err(CompareError::Run(format!(
            "backup copied {job_len} bytes, the bitmap had {dirty} dirty"
        )));
    }
    if sent < job_len {
        return Err(CompareError::Run(format!(
            "the connection carried {sent} bytes, fewer than the {job_len} the backup job copied"
        )));
    }
    files_equal(image, dst_image)
        .map_err(|e| CompareError::Run(format!("after the incremental return: {e}")))?;
    check_writes(image, &plan, seed)?;
    drop(src);
    drop(dst);

    let s = Sample {
        full_mbs: a.size as f64 / 1e6 / full_secs,
        inc_sent: sent,
        inc_ms: inc_secs * 1e3,
        inc_job_len: job_len,
        inc_written: dirty_bytes(&plan, BLOCK, a.size),
        writes: plan.len(),
        granularity,
    };
    eprintln!(
        "migrate: full copy {:.0} MB/s; incremental {:.2} MiB sent ({:.2} MiB dirty) in {:.1} ms",
        s.full_mbs,
        sent as f64 / f64::from(1 << 20),
        job_len as f64 / f64::from(1 << 20),
        s.inc_ms
    );
    Ok(s)
}

/// A directory of this run's files, removed with everything in it when dropped.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create(base: &Path) -> Result<Self, CompareError> {
        if !base.is_dir() {
            return Err(CompareError::Run(format!(
                "{} is not a directory",
                base.display()
            )));
        }
        let d = base.join(format!("vhost-bench-migrate-{}", std::process::id()));
        std::fs::create_dir_all(&d)?;
        Ok(WorkDir(d))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the daemon binds it itself, and
/// QMP has no way to ask it which port it picked).
fn free_port() -> Result<u16, CompareError> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Bytes the destination's end of the one established TCP connection to
/// 127.0.0.1:`port` has received so far, from the kernel's `tcpi_bytes_received` as
/// `ss -ti` shows it.
///
/// Counted by the kernel rather than by a relay in this process: a relay's extra copies
/// cost about half again the incremental return's time on two CPUs. The count is every
/// byte the migration put on the connection (requests and data), whatever the protocol.
/// The receiving end's count, not the sender's `bytes_sent`: on a busy machine loopback
/// TCP retransmits now and then, and `bytes_sent` counts those bytes twice.
fn tcp_bytes_received(port: u16) -> Result<u64, CompareError> {
    let out = Command::new("ss")
        .args(["-t", "-i", "-n", "-H", "state", "established", "sport", "="])
        .arg(format!(":{port}"))
        .output()
        .map_err(|e| CompareError::Run(format!("cannot run ss (Debian package iproute2): {e}")))?;
    if !out.status.success() {
        return Err(CompareError::Run(format!(
            "ss failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    parse_ss_bytes_received(&String::from_utf8_lossy(&out.stdout))
        .map_err(|e| CompareError::Run(format!("connection to port {port}: {e}")))
}

/// The `bytes_received` of the only socket in `ss -ti` output.
fn parse_ss_bytes_received(out: &str) -> Result<u64, String> {
    let counts: Vec<&str> = out
        .split_whitespace()
        .filter_map(|t| t.strip_prefix("bytes_received:"))
        .collect();
    match counts.as_slice() {
        [n] => n.parse().map_err(|e| format!("bytes_received {n:?}: {e}")),
        [] => Err(format!("no connection with a byte count in {out:?}")),
        _ => Err(format!("{} connections, expected one", counts.len())),
    }
}

/// The last lines of a daemon's log, for error messages.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" / ")
}

/// One incremental write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct WriteOp {
    off: u64,
    len: u64,
}

/// xorshift64*, seeded through splitmix64 so that any seed (0 too) works.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in 0..n (n > 0) for placing writes.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Writes totalling exactly `total` bytes: each 4 KiB to 64 KiB (a multiple of 4 KiB, the
/// last one cut to what is left) at a random 4 KiB-aligned offset inside the image. They
/// may overlap, as a guest's do.
fn plan_writes(size: u64, total: u64, seed: u64) -> Vec<WriteOp> {
    let mut rng = Rng::new(seed);
    let mut left = total;
    let mut plan = Vec::new();
    while left > 0 {
        let len = ((rng.below(MAX_WRITE / BLOCK) + 1) * BLOCK).min(left);
        let off = rng.below((size - len) / BLOCK + 1) * BLOCK;
        plan.push(WriteOp { off, len });
        left -= len;
    }
    plan
}

/// The data write `write` puts in image block `block`: known, so it can be checked, and
/// different per write, so a lost or misordered write shows.
fn fill_block(seed: u64, write: usize, block: u64, out: &mut [u8]) {
    let mut rng = Rng::new(seed ^ ((write as u64) << 40) ^ block);
    for c in out.chunks_exact_mut(8) {
        c.copy_from_slice(&rng.next().to_le_bytes());
    }
}

/// Bytes of the clusters of `granularity` bytes that the plan writes to: what a dirty
/// bitmap of that granularity must count (the image's last cluster may be short).
fn dirty_bytes(plan: &[WriteOp], granularity: u64, size: u64) -> u64 {
    let g = granularity.max(1);
    let clusters: std::collections::BTreeSet<u64> = plan
        .iter()
        .filter(|w| w.len > 0)
        .flat_map(|w| w.off / g..=(w.off + w.len - 1) / g)
        .collect();
    clusters
        .into_iter()
        .map(|c| g.min(size.saturating_sub(c * g)))
        .sum()
}

/// Checks that every block of the plan holds the data of the last write to it.
fn check_writes(image: &Path, plan: &[WriteOp], seed: u64) -> Result<(), CompareError> {
    let mut last: HashMap<u64, usize> = HashMap::new();
    for (i, w) in plan.iter().enumerate().rev() {
        for b in w.off / BLOCK..(w.off + w.len) / BLOCK {
            last.entry(b).or_insert(i);
        }
    }
    let f = std::fs::File::open(image)?;
    let (mut want, mut got) = (vec![0u8; BLOCK as usize], vec![0u8; BLOCK as usize]);
    for (&b, &i) in &last {
        fill_block(seed, i, b, &mut want);
        f.read_exact_at(&mut got, b * BLOCK)?;
        if want != got {
            return Err(CompareError::Run(format!(
                "incremental write {i} is not in the source image at block {b}"
            )));
        }
    }
    Ok(())
}

/// Compares two files byte for byte (the images are as large as memory allows, so in
/// chunks), naming the first difference.
fn files_equal(a: &Path, b: &Path) -> Result<(), CompareError> {
    let (fa, fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (la, lb) = (fa.metadata()?.len(), fb.metadata()?.len());
    if la != lb {
        return Err(CompareError::Run(format!(
            "{} is {la} bytes, {} is {lb}",
            a.display(),
            b.display()
        )));
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0;
    while off < la {
        let n = (la - off).min(ba.len() as u64) as usize;
        fa.read_exact_at(&mut ba[..n], off)?;
        fb.read_exact_at(&mut bb[..n], off)?;
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            return Err(CompareError::Run(format!(
                "destination differs from the source at byte {}",
                off + i as u64
            )));
        }
        off += n as u64;
    }
    Ok(())
}

/// "1 GiB", "64 MiB", "12 KiB" or "N bytes", for case names.
fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b.is_multiple_of(1 << 30) => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b.is_multiple_of(1 << 20) => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b.is_multiple_of(1 << 10) => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

/// A size as `parse_size` reads it back ("1g", "64m", "12k", "100").
fn size_arg(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b.is_multiple_of(1 << 30) => format!("{}g", b >> 30),
        b if b >= 1 << 20 && b.is_multiple_of(1 << 20) => format!("{}m", b >> 20),
        b if b >= 1 << 10 && b.is_multiple_of(1 << 10) => format!("{}k", b >> 10),
        b => b.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_plan_fills_the_amount_inside_the_image() {
        let size = 1 << 30;
        let plan = plan_writes(size, 64 << 20, 1);
        assert_eq!(plan.iter().map(|w| w.len).sum::<u64>(), 64 << 20);
        for w in &plan {
            assert_eq!(w.off % BLOCK, 0);
            assert_eq!(w.len % BLOCK, 0);
            assert!((BLOCK..=MAX_WRITE).contains(&w.len));
            assert!(w.off + w.len <= size);
        }
        // Sizes spread over the whole range, not one size.
        assert!(plan.iter().any(|w| w.len == BLOCK));
        assert!(plan.iter().any(|w| w.len == MAX_WRITE));
        assert_eq!(plan, plan_writes(size, 64 << 20, 1));
        assert_ne!(plan, plan_writes(size, 64 << 20, 2));
        assert!(plan_writes(size, 0, 1).is_empty());
        // An image of exactly one write.
        let one = plan_writes(MAX_WRITE, MAX_WRITE, 3);
        assert!(one.iter().all(|w| w.off + w.len <= MAX_WRITE));
    }

    #[test]
    fn dirty_clusters() {
        let w = |off, len| WriteOp { off, len };
        let g = 64 << 10;
        assert_eq!(dirty_bytes(&[], g, 1 << 20), 0);
        // One 4 KiB write dirties its cluster; one across a boundary, two.
        assert_eq!(dirty_bytes(&[w(4096, 4096)], g, 1 << 20), g);
        assert_eq!(dirty_bytes(&[w(g - 4096, 8192)], g, 1 << 20), 2 * g);
        // Overlaps count once.
        assert_eq!(
            dirty_bytes(&[w(0, 4096), w(8192, 4096), w(0, g)], g, 1 << 20),
            g
        );
        // The last cluster of an image that ends mid-cluster is short.
        assert_eq!(dirty_bytes(&[w(g, 4096)], g, g + 8192), 8192);
    }

    #[test]
    fn last_write_wins_in_the_check() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("i");
        let plan = [
            WriteOp { off: 0, len: 8192 },
            WriteOp {
                off: 4096,
                len: 4096,
            },
        ];
        let mut data = vec![0u8; 8192];
        fill_block(5, 0, 0, &mut data[..4096]);
        fill_block(5, 1, 1, &mut data[4096..]);
        std::fs::write(&img, &data).unwrap();
        check_writes(&img, &plan, 5).unwrap();
        // The overwritten first write's second block must not be expected.
        fill_block(5, 0, 1, &mut data[4096..]);
        std::fs::write(&img, &data).unwrap();
        assert!(check_writes(&img, &plan, 5).is_err());
    }

    #[test]
    fn file_compare_names_the_first_difference() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut data = vec![7u8; (1 << 20) + 10];
        std::fs::write(&a, &data).unwrap();
        std::fs::write(&b, &data).unwrap();
        files_equal(&a, &b).unwrap();
        data[(1 << 20) + 3] = 0;
        std::fs::write(&b, &data).unwrap();
        let e = files_equal(&a, &b).unwrap_err().to_string();
        assert!(e.contains(&format!("byte {}", (1 << 20) + 3)), "{e}");
    }

    #[test]
    fn ss_byte_count() {
        // `ss -tinH state established`, one loopback connection seen from both ends.
        let client = "0      0      127.0.0.1:41228 127.0.0.1:38017\n\t bbr wscale:10,10 rto:204 rtt:0.24/0.169 ato:40 mss:65483 cwnd:36 ssthresh:8 bytes_sent:11534781 bytes_acked:11534782 bytes_received:343 segs_out:212 segs_in:68 data_segs_out:206 bbr:(bw:74837709824bps,mrtt:0.006,pacing_gain:1,cwnd_gain:2) send 78579600000bps lastrcv:4 delivered:207 busy:4ms snd_wnd:6014976\n";
        let server = "0      0      127.0.0.1:38017 127.0.0.1:41228\n\t bbr wscale:10,10 rto:204 rtt:0.25/0.407 ato:40 mss:32768 cwnd:14 bytes_sent:343 bytes_acked:343 bytes_received:11534781 segs_out:67 app_limited snd_wnd:65536\n";
        assert_eq!(parse_ss_bytes_received(server), Ok(11_534_781));
        assert!(parse_ss_bytes_received(&format!("{client}{server}")).is_err());
        assert!(parse_ss_bytes_received("").is_err());
        assert!(parse_ss_bytes_received("x bytes_received:12a").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(human(1 << 30), "1 GiB");
        assert_eq!(human(64 << 20), "64 MiB");
        assert_eq!(human(1536 << 20), "1536 MiB");
        assert_eq!(size_arg(1 << 30), "1g");
        assert_eq!(size_arg(100), "100");
        for s in [1u64 << 30, 64 << 20, 12 << 10, 100] {
            assert_eq!(parse_size(&size_arg(s)), Ok(s));
        }
    }
}
