//! `bench compare guest-blk`: fio inside one real guest against three block devices
//! serving the same image: our vhost-blk-backend (vhost-user-blk-pci), qemu-storage-daemon's
//! vhost-user-blk export, and QEMU's built-in virtio-blk (`-drive ...,aio=io_uring` +
//! virtio-blk-pci).
//!
//! `bench compare blk` measures the backends with our load generator at native speed; this
//! is the end-to-end view a guest gets, with the guest's block layer and a real QEMU in the
//! path. Same kernel, initramfs, QEMU binary and image for all three; one boot per
//! contender and repetition runs every case (boots cost seconds under TCG), contenders
//! alternate (with a rotated start) so drifts of the machine hit all alike.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::Args;
use vhost_tests::guest::{locate_sibling_binary, Accel, Backend, GuestBoot, GuestTest};

use crate::compare::halt_poll::HaltPollArgs;
use crate::compare::report::{self, machine, Row, Section};
use crate::compare::CompareError;
use crate::load::blk::{parse_duration, parse_size};

/// Options of `bench compare guest-blk`.
#[derive(Args, Debug)]
pub struct CompareGuestBlkArgs {
    /// Directory for the image: tmpfs by default, so the host's disk is not what is measured.
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    /// Image size.
    #[arg(long, default_value = "1g", value_parser = parse_size)]
    size: u64,
    /// Measured time of each case (fio `--runtime`), after a 1 s ramp.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    runtime: Duration,
    /// Repetitions (boots) per contender.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Where to write guest-blk.md and guest-blk.json.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    #[command(flatten)]
    halt_poll: HaltPollArgs,
}

/// One fio job in the guest.
struct Case {
    /// Row name.
    name: &'static str,
    /// Result key prefix in the guest script (`<key>_iops`, `<key>_kibs`).
    key: &'static str,
    /// fio `--rw`.
    rw: &'static str,
    /// fio `--bs`.
    bs: &'static str,
    /// fio `--iodepth`.
    qd: u32,
    /// Whether the row set includes MB/s (large blocks), not only IOPS.
    mbs: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "4k randread QD1",
        key: "rr1",
        rw: "randread",
        bs: "4k",
        qd: 1,
        mbs: false,
    },
    Case {
        name: "4k randread QD32",
        key: "rr32",
        rw: "randread",
        bs: "4k",
        qd: 32,
        mbs: false,
    },
    Case {
        name: "4k randwrite QD32",
        key: "rw32",
        rw: "randwrite",
        bs: "4k",
        qd: 32,
        mbs: false,
    },
    Case {
        name: "128k read QD32",
        key: "sr128",
        rw: "read",
        bs: "128k",
        qd: 32,
        mbs: true,
    },
];

/// Warm-up before each case's measured time (fio `--ramp_time`), in seconds.
const RAMP_SECS: u64 = 1;

/// Virtqueue size for all three devices (QEMU's vhost-user-blk-pci defaults to 128,
/// virtio-blk-pci to 256): equal rings, so no contender queues less.
const QUEUE_SIZE: u16 = 256;

/// The three devices.
#[derive(Clone, Copy, Debug)]
enum Contender {
    /// Our vhost-blk-backend, O_DIRECT, one queue.
    Ours,
    /// qemu-storage-daemon, `aio=io_uring,cache.direct=on`, vhost-user-blk export.
    Qsd,
    /// QEMU's own virtio-blk, `cache=none,aio=io_uring`, in QEMU's main loop.
    QemuVirtioBlk,
}

const CONTENDERS: [Contender; 3] = [Contender::Ours, Contender::Qsd, Contender::QemuVirtioBlk];

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::Ours => "vhost-blk-backend",
            Contender::Qsd => "qemu-storage-daemon",
            Contender::QemuVirtioBlk => "QEMU virtio-blk",
        }
    }
}

/// Starts the contender's backend process (if it has one) and returns it with the QEMU
/// arguments attaching the disk.
fn attach(
    t: &GuestTest,
    c: Contender,
    rep: usize,
    ours_bin: &Path,
    image: &Path,
) -> Result<(Option<Backend>, Vec<String>), CompareError> {
    let img = image.to_string_lossy();
    if img.contains(',') {
        return Err(CompareError::Run(format!(
            "image path {img} contains ',' (QEMU option syntax)"
        )));
    }
    let sock = t.path("blk.sock");
    let _ = std::fs::remove_file(&sock);
    let vhost_user_args = |sock: &Path| {
        vec![
            "-chardev".to_string(),
            format!("socket,id=blk0,path={}", sock.display()),
            "-device".to_string(),
            format!("vhost-user-blk-pci,chardev=blk0,num-queues=1,queue-size={QUEUE_SIZE}"),
        ]
    };
    let cmd = match c {
        Contender::Ours => {
            let mut cmd = Command::new(ours_bin);
            cmd.arg("--socket-path")
                .arg(&sock)
                .arg("--blk-file")
                .arg(image)
                .args(["--num-queues", "1", "--queue-size"])
                .arg(QUEUE_SIZE.to_string());
            cmd
        }
        Contender::Qsd => {
            let mut cmd = Command::new(&t.env.qsd);
            cmd.arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=f0,filename={img},cache.direct=on,aio=io_uring"
                ))
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues=1",
                    sock.display()
                ));
            cmd
        }
        Contender::QemuVirtioBlk => {
            return Ok((
                None,
                vec![
                    "-drive".into(),
                    format!("file={img},if=none,id=d0,format=raw,cache=none,aio=io_uring"),
                    "-device".into(),
                    format!("virtio-blk-pci,drive=d0,num-queues=1,queue-size={QUEUE_SIZE}"),
                ],
            ))
        }
    };
    let mut be = t.spawn_backend(&format!("{}-rep{}", c.name(), rep + 1), cmd)?;
    be.wait_for_socket(&sock, Duration::from_secs(15))
        .map_err(CompareError::Run)?;
    Ok((Some(be), vhost_user_args(&sock)))
}

/// What the guest measured in one case.
#[derive(Clone, Copy, Debug)]
struct CaseResult {
    /// fio's IOPS.
    iops: f64,
    /// fio's bandwidth, KiB/s.
    kibs: f64,
    /// The disk's interrupts per completed I/O in the guest: under TCG every interrupt
    /// costs the one emulated CPU, so this explains much of a difference in IOPS.
    irqs_per_io: f64,
}

/// One boot's results, per case.
type BootResult = Vec<CaseResult>;

/// Guest interrupts per completed I/O (less is better: notification suppression and
/// completion batching at work).
const IRQS_PER_IO: report::Metric = report::Metric {
    name: "guest interrupts per I/O",
    unit: "",
    higher_is_better: false,
};

/// One boot with `c` attached, running every case.
fn run_boot(
    t: &mut GuestTest,
    c: Contender,
    rep: usize,
    ours_bin: &Path,
    image: &Path,
    runtime: Duration,
) -> Result<BootResult, CompareError> {
    let (mut be, qemu_args) = attach(t, c, rep, ours_bin, image)?;
    let secs = runtime.as_secs().max(1);
    let cases: Vec<String> = CASES
        .iter()
        .map(|k| format!("{}:{}:{}:{}", k.key, k.rw, k.bs, k.qd))
        .collect();
    let per_case = secs + RAMP_SECS + 5;
    let boot = GuestBoot::new("blk-fio-bench.sh")
        .env("FIO_CASES", cases.join(" "))
        .env("FIO_RUNTIME", secs)
        .env("FIO_RAMP", RAMP_SECS)
        .qemu_args(qemu_args)
        .timeout(Duration::from_secs(120 + 3 * per_case * CASES.len() as u64));
    let out = t.try_boot(&boot);
    let stopped = be.as_mut().map(Backend::stop);
    let out = out?;
    out.check().map_err(CompareError::Run)?;
    match stopped {
        Some(Ok(st)) if !st.success() => {
            return Err(CompareError::Run(format!(
                "{} exited with {st} after SIGTERM",
                c.name()
            )))
        }
        Some(Err(e)) => return Err(CompareError::Run(e)),
        _ => {}
    }
    CASES
        .iter()
        .map(|k| {
            let get = |what: &str| {
                let key = format!("{}_{what}", k.key);
                out.results
                    .get(&key)
                    .and_then(|v| v.parse::<f64>().ok())
                    .ok_or_else(|| {
                        CompareError::Run(format!(
                            "{}: the guest reported no number {key}; console: {}",
                            c.name(),
                            out.console_log.display()
                        ))
                    })
            };
            let ios = get("ios")?;
            let r = CaseResult {
                iops: get("iops")?,
                kibs: get("kibs")?,
                irqs_per_io: if ios > 0.0 { get("irqs")? / ios } else { 0.0 },
            };
            eprintln!(
                "guest-blk {}: {}: {:.0} IOPS, {:.1} MB/s, {:.2} interrupts per I/O",
                c.name(),
                k.name,
                r.iops,
                r.kibs * 1024.0 / 1e6,
                r.irqs_per_io
            );
            Ok(r)
        })
        .collect()
}

/// Runs the comparison and returns the section (also written to
/// `<out>/guest-blk.{md,json}`).
pub fn compare_guest_blk(a: &CompareGuestBlkArgs) -> Result<Section, CompareError> {
    // Before anything is started; held until the tables are written, whose header
    // records the setting. The host's vCPUs run QEMU and the backend: their wake-ups pay it.
    let _halt_poll = a.halt_poll.apply()?;
    let ours_bin = locate_sibling_binary("vhost-blk-backend", "VHOST_BLK_BACKEND")
        .map_err(CompareError::Run)?;
    let mut t = GuestTest::try_start("bench_compare_guest_blk")
        .map_err(|e| CompareError::Run(e.to_string()))?;
    let work = a
        .dir
        .join(format!("vhost-guest-blk-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let res = measure(a, &mut t, &ours_bin, &work);
    let _ = std::fs::remove_dir_all(&work);
    let samples = res?;
    let accel = t.env.accel;
    let accel_name = match accel {
        Accel::Tcg => "TCG",
        Accel::Kvm => "KVM",
    };
    let version = |p: &Path| {
        crate::compare::report::program_version(p)
            .unwrap_or_else(|| format!("{} (version unknown)", p.display()))
    };
    let qemu = version(&t.env.qemu);
    let qsd = version(&t.env.qsd);
    drop(t);

    let mut rows = Vec::new();
    for (ci, c) in CASES.iter().enumerate() {
        let pick = |f: &dyn Fn(&CaseResult) -> f64| -> Vec<Vec<f64>> {
            samples
                .iter()
                .map(|per| per.iter().filter_map(|boot| boot.get(ci)).map(f).collect())
                .collect()
        };
        rows.push(Row {
            case: c.name.into(),
            metric: report::IOPS,
            samples: pick(&|r| r.iops),
        });
        if c.mbs {
            rows.push(Row {
                case: c.name.into(),
                metric: report::MB_S,
                samples: pick(&|r| r.kibs * 1024.0 / 1e6),
            });
        }
        rows.push(Row {
            case: c.name.into(),
            metric: IRQS_PER_IO,
            samples: pick(&|r| r.irqs_per_io),
        });
    }
    let bound = match accel {
        Accel::Tcg => "The guest runs under TCG (no KVM here): every I/O costs emulated guest CPU (fio, the block layer, virtio-blk, interrupts), which bounds all three contenders far below what `bench compare blk` shows for the backends alone; the differences are what is left of the devices' costs under that bound.",
        Accel::Kvm => "The guest runs under KVM.",
    };
    let section = Section {
        name: "guest-blk".into(),
        title: "Block in a guest: fio through each device".into(),
        description: format!(
            "Machine: {}. Guest: 1 vCPU ({accel_name}), 512 MiB, Debian kernel, fio {} s per case after a {RAMP_SECS} s ramp (io_uring, direct=1, /dev/vda); {qemu}; {qsd}. Image: {} MiB of random data in {}. One boot per contender and repetition runs every case; {} repetitions, contenders alternating with a rotated start; median (±spread = (max-min)/median). Command: `bench compare guest-blk --size {}m --runtime {}s --reps {}{}`.",
            machine(),
            a.runtime.as_secs().max(1),
            a.size >> 20,
            a.dir.display(),
            a.reps,
            a.size >> 20,
            a.runtime.as_secs().max(1),
            a.reps,
            a.halt_poll.command_suffix(),
        ),
        contenders: CONTENDERS.iter().map(|c| c.name().to_string()).collect(),
        ratios: true,
        rows,
        notes: vec![
            bound.into(),
            format!("vhost-blk-backend: `--num-queues 1 --queue-size {QUEUE_SIZE}` (O_DIRECT, io_uring); qemu-storage-daemon: `driver=file,aio=io_uring,cache.direct=on`, vhost-user-blk export, 1 queue; both as `vhost-user-blk-pci,num-queues=1,queue-size={QUEUE_SIZE}`."),
            format!("QEMU virtio-blk: `-drive file=...,if=none,format=raw,cache=none,aio=io_uring` + `virtio-blk-pci,num-queues=1,queue-size={QUEUE_SIZE}`, served in QEMU's main loop (no iothread)."),
            "With the image in memory (tmpfs, the default `--dir /dev/shm`) vhost-blk-backend's I/O engine is `mapped` (`--io-engine auto` on tmpfs: reads and writes are memory copies through a shared mapping of the file, on its queue thread, so a request completes before the next is taken) instead of io_uring; `--dir /var/tmp` measures its io_uring path.".into(),
            "Guest interrupts per I/O: the disk's interrupts in the guest over the I/Os it completed (ramp included); fewer means completions were batched or suppressed, which under TCG buys IOPS.".into(),
        ],
    };
    section.write(&a.out)?;
    Ok(section)
}

/// Creates the image and runs every repetition; `samples[contender][rep][case]`.
fn measure(
    a: &CompareGuestBlkArgs,
    t: &mut GuestTest,
    ours_bin: &Path,
    work: &Path,
) -> Result<Vec<Vec<BootResult>>, CompareError> {
    let image = work.join("guest-blk.img");
    eprintln!(
        "creating a {} MiB image of random data in {}",
        a.size >> 20,
        work.display()
    );
    crate::compare::fill_random(&image, a.size)?;
    let mut samples = vec![Vec::new(); CONTENDERS.len()];
    for rep in 0..a.reps {
        // Rotated start: over three repetitions every contender boots once first, second
        // and last, so a position effect (the first boot after the image was written, a
        // neighbour's load ramping up) does not always hit the same one.
        for k in 0..CONTENDERS.len() {
            let i = (rep + k) % CONTENDERS.len();
            let c = CONTENDERS[i];
            eprintln!("guest-blk: {} (rep {}/{})", c.name(), rep + 1, a.reps);
            samples[i].push(run_boot(t, c, rep, ours_bin, &image, a.runtime)?);
        }
    }
    Ok(samples)
}
