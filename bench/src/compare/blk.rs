//! `bench compare blk`: every contender on the same image in one run, alternating, with
//! repetitions; a Markdown table and a JSON file of medians and spreads.
//!
//! Contenders: our vhost-blk-backend and qemu-storage-daemon's vhost-user-blk export, both
//! driven by the same load generator, and fio with io_uring directly on the image (the host
//! limit). CPU per I/O is the backend process's user+system time (all its threads,
//! io_uring workers included) divided by the I/Os it served.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use clap::Args;

use super::halt_poll::HaltPollArgs;
use super::report::{self, machine, Row, Section};
use super::{fill_random, wait_socket, CompareError};
use crate::load::blk::{self, parse_duration, parse_size, BlkLoadArgs, Rw};
use crate::load::cpu_seconds;

/// `--dirs` when not given: tmpfs, then a disk file system.
const DEFAULT_DIRS: &str = "/dev/shm,/var/tmp";

/// Options of `bench compare blk`.
#[derive(Args, Debug)]
pub struct CompareBlkArgs {
    /// Directories for the test image, comma-separated: tmpfs (/dev/shm) and a disk file
    /// system (/var/tmp) by default; each gets its own set of rows.
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_DIRS)]
    dirs: Vec<PathBuf>,
    /// Image size.
    #[arg(long, default_value = "1g", value_parser = parse_size)]
    size: u64,
    /// Length of each measurement.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    runtime: Duration,
    /// Repetitions of every case and contender.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Where to write blk.md, blk.json and blk.png.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Only cases whose name contains this.
    #[arg(long)]
    only: Option<String>,
    /// Check data while measuring (see `bench load blk --verify`).
    #[arg(long)]
    verify: bool,
    #[command(flatten)]
    halt_poll: HaltPollArgs,
}

struct Case {
    name: &'static str,
    rw: Rw,
    bs: u64,
    qd: u16,
    queues: u16,
    /// Run against the polling set-ups (ours with --poll-us, QSD with a polling iothread).
    polling: bool,
    /// Packed rings (`bench load blk --packed`): ours only (QSD's libvhost-user export
    /// has none), to set beside the same case on split rings.
    packed: bool,
}

/// Polling window given to both backends in the polling cases (ours: --poll-us; QSD: an
/// iothread's poll-max-ns).
const POLL_US: u32 = 50;

const CASES: &[Case] = &[
    Case {
        name: "4k randread QD1",
        rw: Rw::Randread,
        bs: 4096,
        qd: 1,
        queues: 1,
        polling: false,
        packed: false,
    },
    Case {
        name: "4k randread QD32",
        rw: Rw::Randread,
        bs: 4096,
        qd: 32,
        queues: 1,
        polling: false,
        packed: false,
    },
    Case {
        name: "4k randread QD32, packed rings",
        rw: Rw::Randread,
        bs: 4096,
        qd: 32,
        queues: 1,
        polling: false,
        packed: true,
    },
    Case {
        name: "4k randread QD128",
        rw: Rw::Randread,
        bs: 4096,
        qd: 128,
        queues: 1,
        polling: false,
        packed: false,
    },
    Case {
        name: "4k randwrite QD1",
        rw: Rw::Randwrite,
        bs: 4096,
        qd: 1,
        queues: 1,
        polling: false,
        packed: false,
    },
    Case {
        name: "4k randwrite QD32",
        rw: Rw::Randwrite,
        bs: 4096,
        qd: 32,
        queues: 1,
        polling: false,
        packed: false,
    },
    Case {
        name: "4k randwrite QD128",
        rw: Rw::Randwrite,
        bs: 4096,
        qd: 128,
        queues: 1,
        polling: false,
        packed: false,
    },
    Case {
        name: "128k read QD32",
        rw: Rw::Read,
        bs: 128 << 10,
        qd: 32,
        queues: 1,
        polling: false,
        packed: false,
    },
    Case {
        name: "4k randread QD32 x2 queues",
        rw: Rw::Randread,
        bs: 4096,
        qd: 32,
        queues: 2,
        polling: false,
        packed: false,
    },
    Case {
        name: "4k randread QD1, polling",
        rw: Rw::Randread,
        bs: 4096,
        qd: 1,
        queues: 1,
        polling: true,
        packed: false,
    },
    Case {
        name: "4k randread QD32, polling",
        rw: Rw::Randread,
        bs: 4096,
        qd: 32,
        queues: 1,
        polling: true,
        packed: false,
    },
];

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_us_per_io: f64,
}

/// A backend process serving a socket.
struct Backend {
    child: Child,
    pid: u32,
    socket: PathBuf,
}

impl Drop for Backend {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a process we started.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Our backend on `image`; `poll_us` > 0 turns on its adaptive polling.
fn start_ours(image: &Path, work: &Path, poll_us: u32) -> Result<Backend, CompareError> {
    let bin = vhost_tests::guest::locate_sibling_binary("vhost-blk-backend", "VHOST_BLK_BACKEND")
        .map_err(CompareError::Run)?;
    let socket = work.join(format!("ours-poll{poll_us}.sock"));
    let child = Command::new(bin)
        .arg("--blk-file")
        .arg(image)
        .arg("--socket-path")
        .arg(&socket)
        .args(["--num-queues", "2", "--queue-size", "512"])
        .arg(format!("--poll-us={poll_us}"))
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit())
        .spawn()?;
    let pid = child.id();
    wait_socket(&socket)?;
    Ok(Backend { child, pid, socket })
}

/// qemu-storage-daemon exporting `image`; `poll_us` > 0 serves the export from an
/// iothread with that adaptive polling window (poll-max-ns), QEMU's own polling.
fn start_qsd(image: &Path, work: &Path, poll_us: u32) -> Result<Backend, CompareError> {
    let socket = work.join(format!("qsd-poll{poll_us}.sock"));
    let mut cmd = Command::new("qemu-storage-daemon");
    let mut iothread = String::new();
    if poll_us > 0 {
        cmd.arg("--object").arg(format!(
            "iothread,id=io0,poll-max-ns={}",
            u64::from(poll_us) * 1000
        ));
        iothread = ",iothread=io0".into();
    }
    let child = cmd
        .arg("--blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=f,aio=io_uring,cache.direct=on",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues=2{iothread}",
            socket.display()
        ))
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| CompareError::Run(format!("cannot start qemu-storage-daemon: {e}")))?;
    let pid = child.id();
    wait_socket(&socket)?;
    Ok(Backend { child, pid, socket })
}

fn run_backend(
    b: &Backend,
    c: &Case,
    runtime: Duration,
    verify: bool,
) -> Result<Sample, CompareError> {
    let cpu0 = cpu_seconds(b.pid);
    let r = blk::run(&BlkLoadArgs {
        socket: b.socket.clone(),
        rw: c.rw,
        bs: c.bs,
        iodepth: c.qd,
        runtime,
        size: None,
        queue_size: 512,
        queues: c.queues,
        verify,
        pid: None,
        offset: 0,
        verify_state: None,
        packed: c.packed,
    })?;
    let cpu = cpu_seconds(b.pid) - cpu0;
    Ok(Sample {
        iops: r.iops(),
        p50_us: r.pct(0.5) as f64,
        p99_us: r.pct(0.99) as f64,
        cpu_us_per_io: if r.ios > 0 {
            cpu * 1e6 / r.ios as f64
        } else {
            0.0
        },
    })
}

fn run_fio(image: &Path, c: &Case, runtime: Duration) -> Result<Sample, CompareError> {
    let rw = match c.rw {
        Rw::Read => "read",
        Rw::Write => "write",
        Rw::Randread => "randread",
        Rw::Randwrite => "randwrite",
        Rw::Randrw => "randrw",
    };
    let cpu_before = children_cpu_seconds();
    let out = Command::new("fio")
        .args([
            "--name=host",
            "--direct=1",
            "--ioengine=io_uring",
            "--time_based",
        ])
        .arg(format!("--filename={}", image.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={}", c.bs))
        .arg(format!("--iodepth={}", c.qd))
        .arg(format!("--numjobs={}", c.queues))
        .arg("--group_reporting")
        // Percentiles of the whole latency, not only of the part after submission.
        .arg("--lat_percentiles=1")
        .arg(format!("--runtime={}ms", runtime.as_millis()))
        .args(["--output-format=json"])
        .output()
        .map_err(|e| CompareError::Run(format!("cannot run fio: {e}")))?;
    if !out.status.success() {
        return Err(CompareError::Run(format!(
            "fio failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| CompareError::Run(format!("fio output: {e}")))?;
    // fio's own usr/sys figures count its job threads only; the reaped child's rusage also
    // has the io_uring workers (iou-wrk) its submissions punted to, and fio's set-up, which
    // is small beside seconds of I/O.
    let cpu_s = children_cpu_seconds() - cpu_before;
    fio_sample(&v, c.rw, cpu_s)
}

/// The sample in fio's JSON output `v` (run with `--lat_percentiles=1`), given the CPU
/// seconds it took.
///
/// Latency is fio's `lat`, from the submission of an I/O to its completion: what the load
/// generator measures (from making a request available to seeing it used). fio's default
/// `clat` starts after the submission returned, which leaves out the system call that
/// reaches the device (on this machine's virtio disk, a doorbell of about 20 µs at QD 1).
fn fio_sample(v: &serde_json::Value, rw: Rw, cpu_s: f64) -> Result<Sample, CompareError> {
    let job = &v["jobs"][0];
    let side = if matches!(rw, Rw::Read | Rw::Randread) {
        &job["read"]
    } else {
        &job["write"]
    };
    let ios = side["total_ios"].as_f64().unwrap_or(0.0);
    let pct = |k: &str| {
        side["lat_ns"]["percentile"][k]
            .as_f64()
            .map(|ns| ns / 1000.0)
            .ok_or_else(|| CompareError::Run(format!("fio output has no lat_ns percentile {k}")))
    };
    Ok(Sample {
        iops: side["iops"].as_f64().unwrap_or(0.0),
        p50_us: pct("50.000000")?,
        p99_us: pct("99.000000")?,
        cpu_us_per_io: if ios > 0.0 { cpu_s * 1e6 / ios } else { 0.0 },
    })
}

/// Runs the comparison on every image directory and returns the section (also written to
/// `<out>/blk.{md,json}`).
pub fn compare_blk(a: &CompareBlkArgs) -> Result<Section, CompareError> {
    // Before anything is measured; held until the tables are written, whose header
    // records the setting.
    let _halt_poll = a.halt_poll.apply()?;
    let contenders = vec![
        "vhost-blk-backend".to_string(),
        "qemu-storage-daemon".to_string(),
        "fio on the host (the limit)".to_string(),
    ];
    let mut rows = Vec::new();
    let mut places = Vec::new();
    for dir in &a.dirs {
        let kind = if is_tmpfs(dir) { "tmpfs" } else { "disk" };
        places.push(format!("{} ({kind})", dir.display()));
        let work = tempfile_dir(dir)?;
        let res = compare_in(a, &work, kind, &mut rows);
        let _ = std::fs::remove_dir_all(&work);
        res?;
    }
    let section = Section {
        name: "blk".into(),
        title: "Block: the load generator through each vhost-user-blk backend".into(),
        description: format!(
            "Machine: {}. Image: {} MiB of random data in {}. {} repetitions of {:.0} s per case and contender, alternating; median (±spread = (max-min)/median). Command: `bench compare blk{} --size {}m --runtime {}ms --reps {}{}{}{}`.",
            machine(),
            a.size >> 20,
            places.join(" and "),
            a.reps,
            a.runtime.as_secs_f64(),
            dirs_option(&a.dirs),
            a.size >> 20,
            a.runtime.as_millis(),
            a.reps,
            a.only
                .as_deref()
                .map(|o| format!(" --only '{o}'"))
                .unwrap_or_default(),
            if a.verify { " --verify" } else { "" },
            a.halt_poll.command_suffix(),
        ),
        contenders,
        ratios: true,
        rows,
        notes: vec![
            "qemu-storage-daemon: `--blockdev driver=file,aio=io_uring,cache.direct=on`, exported as vhost-user-blk with 2 queues; ours: `--num-queues 2 --queue-size 512` (O_DIRECT).".into(),
            "fio: io_uring, direct=1, the same image, one job per queue: the host without any vhost-user hop. Its latency is fio's `lat` (`--lat_percentiles=1`), from submission to completion, as the load generator measures ours; fio's default `clat` leaves out the submitting system call.".into(),
            "CPU per op: the backend process's user+system time (all threads, io_uring workers included) over the I/Os it served; for fio, fio's own (its job and its io_uring workers: submission, completion and the copy), the host's whole cost of the I/O without a vhost-user hop.".into(),
            "\"packed rings\": the load generator with `--packed` (VIRTIO_F_RING_PACKED); qemu-storage-daemon has no packed rings (libvhost-user), so that row compares our packed rings with our split ones in the row of the same case, measured in the same run.".into(),
            format!("\"polling\" cases: ours with `--poll-us {POLL_US}`, qemu-storage-daemon serving the export from an iothread with `poll-max-ns={}` (QEMU's adaptive polling); every other case: no polling (both defaults).", u64::from(POLL_US) * 1000),
        ],
    };
    section.write(&a.out)?;
    Ok(section)
}

/// The `--dirs` of the command line that measured `dirs` ("" for the default).
fn dirs_option(dirs: &[PathBuf]) -> String {
    let list: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    let list = list.join(",");
    if list == DEFAULT_DIRS {
        return String::new();
    }
    format!(" --dirs {list}")
}

/// Runs every case on a fresh image in `work`, appending rows named `"<kind>: <case>"`.
fn compare_in(
    a: &CompareBlkArgs,
    work: &Path,
    kind: &str,
    rows: &mut Vec<Row>,
) -> Result<(), CompareError> {
    let image = work.join("bench.img");
    eprintln!(
        "creating a {} MiB image of random data in {}",
        a.size >> 20,
        work.display()
    );
    fill_random(&image, a.size)?;
    let ours = start_ours(&image, work, 0)?;
    let qsd = start_qsd(&image, work, 0)?;
    let ours_polling = start_ours(&image, work, POLL_US)?;
    let qsd_polling = start_qsd(&image, work, POLL_US)?;
    for c in CASES
        .iter()
        .filter(|c| a.only.as_deref().is_none_or(|o| c.name.contains(o)))
    {
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); 3];
        for rep in 0..a.reps {
            eprintln!("{kind}: {} (rep {}/{})", c.name, rep + 1, a.reps);
            let (o, q) = if c.polling {
                (&ours_polling, &qsd_polling)
            } else {
                (&ours, &qsd)
            };
            samples[0].push(run_backend(o, c, a.runtime, a.verify)?);
            if !c.packed {
                samples[1].push(run_backend(q, c, a.runtime, a.verify)?);
            }
            samples[2].push(run_fio(&image, c, a.runtime)?);
        }
        let case = format!("{kind}: {}", c.name);
        // `with` contenders have the metric (all three: fio's CPU per op is the host's
        // whole cost of the I/O, the efficiency limit a backend is measured against).
        let pick = |f: fn(&Sample) -> f64, with: usize| -> Vec<Vec<f64>> {
            (0..3)
                .map(|i| {
                    if i < with {
                        samples[i].iter().map(f).collect()
                    } else {
                        Vec::new()
                    }
                })
                .collect()
        };
        for (metric, f, with) in [
            (report::IOPS, (|s: &Sample| s.iops) as fn(&Sample) -> f64, 3),
            (report::P50_US, |s: &Sample| s.p50_us, 3),
            (report::P99_US, |s: &Sample| s.p99_us, 3),
            (report::CPU_US_PER_OP, |s: &Sample| s.cpu_us_per_io, 3),
        ] {
            rows.push(Row {
                case: case.clone(),
                metric,
                samples: pick(f, with),
            });
        }
    }
    Ok(())
}

/// User+system CPU time of this process's reaped children (fio, once `output()` returned).
fn children_cpu_seconds() -> f64 {
    // SAFETY: a zeroed rusage is a valid out buffer for getrusage.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_CHILDREN only fills the buffer.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

fn is_tmpfs(p: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: zeroed statfs is a valid out buffer; valid C string.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::statfs(c.as_ptr(), &mut s) == 0 && s.f_type == libc::TMPFS_MAGIC }
}

fn tempfile_dir(base: &Path) -> Result<PathBuf, CompareError> {
    let d = base.join(format!("vhost-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// fio's JSON for one job, trimmed to what `fio_sample` reads.
    fn fio_json(side: &str) -> serde_json::Value {
        let body = serde_json::json!({
            "iops": 1234.5,
            "total_ios": 4000,
            "clat_ns": { "percentile": { "50.000000": 3000.0, "99.000000": 9000.0 } },
            "lat_ns": { "percentile": { "50.000000": 25000.0, "99.000000": 71000.0 } },
        });
        let empty = serde_json::json!({ "iops": 0.0, "total_ios": 0 });
        let (read, write) = if side == "read" {
            (body, empty)
        } else {
            (empty, body)
        };
        serde_json::json!({ "jobs": [ { "read": read, "write": write } ] })
    }

    #[test]
    fn fio_latency_is_from_submission_not_after_it() {
        let s = fio_sample(&fio_json("read"), Rw::Randread, 0.002).unwrap();
        assert_eq!(s.p50_us, 25.0);
        assert_eq!(s.p99_us, 71.0);
        assert_eq!(s.iops, 1234.5);
        assert!((s.cpu_us_per_io - 0.5).abs() < 1e-9, "{}", s.cpu_us_per_io);
    }

    #[test]
    fn the_recorded_command_names_directories_other_than_the_default() {
        let p = |v: &[&str]| v.iter().map(PathBuf::from).collect::<Vec<_>>();
        assert_eq!(dirs_option(&p(&["/dev/shm", "/var/tmp"])), "");
        assert_eq!(dirs_option(&p(&["/var/tmp"])), " --dirs /var/tmp");
        assert_eq!(
            dirs_option(&p(&["/var/tmp", "/dev/shm"])),
            " --dirs /var/tmp,/dev/shm"
        );
    }

    #[test]
    fn fio_writes_are_read_from_the_write_side() {
        let s = fio_sample(&fio_json("write"), Rw::Randwrite, 0.0).unwrap();
        assert_eq!((s.iops, s.p50_us), (1234.5, 25.0));
    }

    #[test]
    fn fio_output_without_total_latency_percentiles_is_an_error() {
        let mut v = fio_json("read");
        v["jobs"][0]["read"]
            .as_object_mut()
            .unwrap()
            .remove("lat_ns");
        let e = fio_sample(&v, Rw::Randread, 0.0).err().unwrap();
        assert!(e.to_string().contains("lat_ns"), "{e}");
    }
}
