//! `bench compare net`: our vhost-net-backend against DPDK's vhost PMD (testpmd) through
//! the net load generator, and against QEMU's own userspace tap in a real guest.
//!
//! 1. Load generator (`bench load net`, see `net`): each contender serves a vhost-user
//!    socket with a tap on its host side, both in network namespaces of their own (IPv6
//!    off, so nothing but our frames crosses the taps):
//!    - ours: `vhost-net-backend --tap vnbt0` (the release binary next to `bench`);
//!    - DPDK: `dpdk-testpmd --no-huge` with `net_vhost0` (the vhost-user backend) and
//!      `net_tap0` (a tap), `io` forwarding between them on one busy-polling lcore.
//!
//!    Per frame size (64 and 1500 bytes by default) and direction (TX: generator → tap,
//!    RX: frames injected on the tap → generator), every repetition runs both
//!    contenders, alternating which goes first. Reported: packets/s, Gbit/s, the
//!    contender's CPU time per packet (user + system of the whole process from
//!    /proc/PID/stat: for ours the worker thread and the kernel's tap work it does; for
//!    testpmd mostly its busy poll, a full core whatever the load), and the share of
//!    frames that really arrived (tap counters for TX, the generator's count for RX).
//! 2. Guest (unless `--no-guest`): iperf3 in a TCG/KVM guest of the `vhost-tests`
//!    harness, both directions, on vhost-net-backend vs the same guest on QEMU's
//!    `-netdev tap,vhost=off` (QEMU 11 from `setup-qemu-trixie.sh` when available),
//!    alternating, one boot per contender and repetition.
//!
//! The machine is shared: the CPU time that neither the generator nor the contender
//! used during each measurement (from /proc/stat) is recorded in the notes, so a noisy
//! run shows as such.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use vhost_tests::guest::{harness_dir, locate_sibling_binary, Accel, GuestTest};
use vhost_tests::guest_console::{qemu_for_console, use_qemu};
use vhost_tests::guest_net::{iperf_qemu_tap, iperf_vhost_user, NetNs};

use crate::compare::report::{self, machine, Metric, Row, Section};
use crate::compare::CompareError;
use crate::load::blk::parse_duration;
use crate::load::cpu_seconds;
use crate::load::net::{self, Mode, NetLoadArgs, NetReport};

/// Gigabits per second of Ethernet frames.
const GBIT_S: Metric = Metric {
    name: "throughput",
    unit: "Gbit/s",
    higher_is_better: true,
};
/// The contender's CPU time per packet.
const CPU_US_PER_PKT: Metric = Metric {
    name: "CPU per packet",
    unit: "µs",
    higher_is_better: false,
};
/// Frames that arrived at the far side, in percent of those sent.
const DELIVERED: Metric = Metric {
    name: "delivered",
    unit: "%",
    higher_is_better: true,
};

/// Contender names, in column order.
const OURS: &str = "vhost-net-backend";
const DPDK: &str = "DPDK testpmd vhost PMD";
const QEMU_TAP: &str = "QEMU -netdev tap,vhost=off";

/// Options of `bench compare net`.
#[derive(Args, Debug)]
pub struct CompareNetArgs {
    /// Length of each load-generator measurement.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub runtime: Duration,
    /// Repetitions of every case and contender.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Ethernet frame sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "64,1500")]
    pub frame_sizes: Vec<usize>,
    /// Ring size the generator negotiates.
    #[arg(long, default_value_t = 256)]
    pub queue_size: u16,
    /// Generator batch (frames per avail update / per sendmmsg).
    #[arg(long, default_value_t = 32)]
    pub batch: u16,
    /// Skip the guest iperf3 part (load generator only).
    #[arg(long)]
    pub no_guest: bool,
    /// Skip DPDK testpmd (when it cannot be installed).
    #[arg(long)]
    pub no_dpdk: bool,
    /// Seconds of iperf3 per direction and guest boot.
    #[arg(long, default_value_t = 5)]
    pub iperf_time: u32,
    /// QEMU for the guest part (default: QEMU 11 from tests/guest/setup-qemu-trixie.sh,
    /// else the harness's QEMU).
    #[arg(long)]
    pub qemu: Option<PathBuf>,
    /// Where to write net.md and net.json.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
}

fn run_err(e: impl std::fmt::Display) -> CompareError {
    CompareError::Run(e.to_string())
}

/// One contender serving a vhost-user-net socket, its tap in a namespace of its own.
struct Contender {
    name: &'static str,
    child: Child,
    /// testpmd's interactive prompt: `start` / `stop` forwarding, `quit`.
    stdin: Option<ChildStdin>,
    pid: u32,
    socket: PathBuf,
    tap: String,
    log: PathBuf,
    /// DPDK's runtime directory to remove afterwards.
    run_dir: Option<PathBuf>,
    ns: NetNs,
}

impl Contender {
    fn load(
        &self,
        a: &CompareNetArgs,
        mode: Mode,
        frame_size: usize,
        runtime: Duration,
    ) -> NetLoadArgs {
        NetLoadArgs {
            socket: self.socket.clone(),
            mode,
            frame_size,
            runtime,
            queue_size: a.queue_size,
            batch: a.batch,
            tap: Some(self.tap.clone()),
            netns: Some(self.ns.name.clone()),
            rx_window: None,
            verify: false,
            busy_poll: false,
        }
    }

    /// Lets testpmd forward (only while it is measured: its lcore spins a full core
    /// whenever it forwards, which would steal a CPU from the other contender).
    fn resume(&mut self) -> Result<(), CompareError> {
        self.command("start")
    }

    /// Stops testpmd's forwarding (its lcore goes back to sleep).
    fn pause(&mut self) -> Result<(), CompareError> {
        self.command("stop")
    }

    fn command(&mut self, cmd: &str) -> Result<(), CompareError> {
        if let Some(stdin) = self.stdin.as_mut() {
            stdin
                .write_all(format!("{cmd}\n").as_bytes())
                .and_then(|()| stdin.flush())
                .map_err(|e| run_err(format!("{}: `{cmd}`: {e}", self.name)))?;
            // The command runs synchronously once read; give it that moment.
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(())
    }

    fn alive(&mut self) -> Result<(), CompareError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            _ => Err(run_err(format!(
                "{} exited; log {}:\n{}",
                self.name,
                self.log.display(),
                vhost_tests::guest::tail_file(&self.log, 20)
            ))),
        }
    }
}

impl Drop for Contender {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"stop\nquit\n");
        } else {
            // SAFETY: kill(2) on our own child (`ip netns exec` execs the program).
            unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(d) = &self.run_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// A namespace with IPv6 off (no autoconfiguration chatter on the taps).
fn quiet_netns(tag: &str) -> Result<NetNs, CompareError> {
    let ns = NetNs::create(tag).map_err(run_err)?;
    for k in ["all", "default"] {
        ns.run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{k}.disable_ipv6=1"),
        ])
        .map_err(run_err)?;
    }
    Ok(ns)
}

fn wait_for_socket(c: &mut Contender) -> Result<(), CompareError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.socket.exists() {
        c.alive()?;
        if Instant::now() > deadline {
            return Err(run_err(format!(
                "{} never listened on {}",
                c.name,
                c.socket.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn start_ours(work: &Path) -> Result<Contender, CompareError> {
    let bin = locate_sibling_binary("vhost-net-backend", "VHOST_NET_BACKEND").map_err(run_err)?;
    let ns = quiet_netns("bno")?;
    let socket = work.join("ours.sock");
    let log = work.join("vhost-net-backend.log");
    let f = std::fs::File::create(&log)?;
    let child = ns
        .command(&bin)
        .arg("--socket-path")
        .arg(&socket)
        .args(["--tap", "vnbt0", "--queue-size", "1024"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()?;
    let mut c = Contender {
        name: OURS,
        pid: child.id(),
        child,
        stdin: None,
        socket,
        tap: "vnbt0".into(),
        log,
        run_dir: None,
        ns,
    };
    wait_for_socket(&mut c)?;
    c.ns.run(&["ip", "link", "set", "vnbt0", "up"])
        .map_err(run_err)?;
    Ok(c)
}

/// `$DPDK_TESTPMD`, else what `tests/guest/setup-dpdk.sh` installs and prints.
fn testpmd() -> Result<PathBuf, CompareError> {
    if let Some(p) = std::env::var_os("DPDK_TESTPMD").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let script = harness_dir().join("setup-dpdk.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| run_err(format!("cannot run {}: {e}", script.display())))?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || path.is_empty() {
        return Err(run_err(format!(
            "{} failed ({}); --no-dpdk skips DPDK",
            script.display(),
            out.status
        )));
    }
    Ok(PathBuf::from(path))
}

/// The testpmd command line after the program, for the notes and for starting it.
fn testpmd_args(socket: &Path, prefix: &str) -> Vec<String> {
    [
        // Two lcores (main + one forwarding), each allowed on either CPU: on a shared
        // machine a pinned busy-poll thread would lose half its CPU to anything else
        // scheduled there, while our backend's threads can move.
        "--lcores",
        "0@(0,1),1@(0,1)",
        "--no-pci",
        "--no-huge",
        "-m",
        "512",
        "--file-prefix",
        prefix,
        "--log-level",
        "lib.eal:warning",
        "--vdev",
        &format!("net_vhost0,iface={},queues=1", socket.display()),
        "--vdev",
        "net_tap0,iface=dtap0",
        "--",
        "-i",
        "--forward-mode=io",
        "--nb-cores=1",
        "--rxq=1",
        "--txq=1",
        "--total-num-mbufs=16384",
        "--no-lsc-interrupt",
        "--disable-link-check",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn start_testpmd(work: &Path, bin: &Path) -> Result<Contender, CompareError> {
    let ns = quiet_netns("bnd")?;
    let socket = work.join("dpdk.sock");
    let log = work.join("testpmd.log");
    let f = std::fs::File::create(&log)?;
    let prefix = format!("vhbench{}", std::process::id());
    let mut child = ns
        .command(bin)
        .args(testpmd_args(&socket, &prefix))
        .stdin(Stdio::piped())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .map_err(|e| run_err(format!("cannot start {}: {e}", bin.display())))?;
    let stdin = child.stdin.take();
    let mut c = Contender {
        name: DPDK,
        pid: child.id(),
        child,
        stdin,
        socket,
        tap: "dtap0".into(),
        log,
        run_dir: Some(PathBuf::from(format!("/var/run/dpdk/{prefix}"))),
        ns,
    };
    wait_for_socket(&mut c)?;
    Ok(c)
}

/// Short runs until frames flow both ways (testpmd starts forwarding a moment after its
/// socket appears); also the warm-up of every contender.
fn warm_up(c: &mut Contender, a: &CompareNetArgs) -> Result<(), CompareError> {
    c.resume()?;
    let res = warm_up_running(c, a);
    c.pause()?;
    res
}

fn warm_up_running(c: &mut Contender, a: &CompareNetArgs) -> Result<(), CompareError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        c.alive()?;
        let r = net::run(&c.load(a, Mode::Both, 64, Duration::from_millis(500)))
            .map_err(|e| run_err(format!("{}: {e}", c.name)))?;
        let tap_ok = r.tap.is_some_and(|t| t.rx_packets > 0);
        if r.rx_received > 0 && r.tx_completed > 0 && tap_ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(run_err(format!(
                "{} forwards no frames: {r}\nlog {}:\n{}",
                c.name,
                c.log.display(),
                vhost_tests::guest::tail_file(&c.log, 20)
            )));
        }
    }
}

/// Busy CPU seconds of the whole machine so far (/proc/stat: all but idle and iowait).
fn machine_busy_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(cpu) = stat.lines().next() else {
        return 0.0;
    };
    let v: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy: f64 = v
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, x)| x)
        .sum();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    busy / hz
}

/// One measurement of one contender.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    pps: f64,
    gbit: f64,
    cpu_us_per_pkt: f64,
    delivered_pct: f64,
    /// Cores' worth of CPU used by other processes during the run.
    other_load: f64,
}

fn measure(
    c: &mut Contender,
    a: &CompareNetArgs,
    mode: Mode,
    frame_size: usize,
) -> Result<Sample, CompareError> {
    c.resume()?;
    let res = measure_running(c, a, mode, frame_size);
    c.pause()?;
    res
}

fn measure_running(
    c: &mut Contender,
    a: &CompareNetArgs,
    mode: Mode,
    frame_size: usize,
) -> Result<Sample, CompareError> {
    c.alive()?;
    let cpu0 = cpu_seconds(c.pid);
    let busy0 = machine_busy_seconds();
    let t0 = Instant::now();
    let r: NetReport = net::run(&c.load(a, mode, frame_size, a.runtime))
        .map_err(|e| run_err(format!("{}: {e}", c.name)))?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(c.pid) - cpu0;
    let other = (machine_busy_seconds() - busy0 - cpu - r.generator_cpu).max(0.0) / wall;
    let (pps, frames, delivered_pct) = match mode {
        // Both directions at once: the slower one counts, so one direction starving the
        // other (a single worker serves both rings) shows instead of hiding in a total.
        Mode::Both => (
            r.tx_pps().min(r.rx_pps()),
            r.tx_completed + r.rx_received,
            match (&r.tap, r.tx_completed + r.rx_injected) {
                (Some(t), n) if n > 0 => (t.rx_packets + r.rx_received) as f64 * 100.0 / n as f64,
                _ => 0.0,
            },
        ),
        Mode::Rx => (
            r.rx_pps(),
            r.rx_received,
            if r.rx_injected > 0 {
                r.rx_received as f64 * 100.0 / r.rx_injected as f64
            } else {
                0.0
            },
        ),
        _ => (
            r.tx_pps(),
            r.tx_completed,
            match (&r.tap, r.tx_completed) {
                (Some(t), n) if n > 0 => t.rx_packets as f64 * 100.0 / n as f64,
                _ => 0.0,
            },
        ),
    };
    eprintln!(
        "  {}: {r}\n  contender CPU {:.2} s, other load {other:.2} cores",
        c.name, cpu
    );
    Ok(Sample {
        pps,
        gbit: r.gbit(pps),
        cpu_us_per_pkt: if frames > 0 {
            cpu * 1e6 / frames as f64
        } else {
            0.0
        },
        delivered_pct,
        other_load: other,
    })
}

/// Runs the comparison and returns the section (also written to `<out>/net.{md,json}`).
pub fn compare_net(a: &CompareNetArgs) -> Result<Section, CompareError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(run_err(
            "bench compare net needs root (network namespaces and taps)",
        ));
    }
    if a.reps == 0 || a.frame_sizes.is_empty() {
        return Err(run_err("--reps and --frame-sizes must not be empty"));
    }
    let load0 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let work = std::env::temp_dir().join(format!("vhost-bench-net-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let res = compare_in(a, &work, &load0);
    let _ = std::fs::remove_dir_all(&work);
    let section = res?;
    section.write(&a.out)?;
    Ok(section)
}

fn compare_in(a: &CompareNetArgs, work: &Path, load0: &str) -> Result<Section, CompareError> {
    let contenders = vec![OURS.to_string(), DPDK.to_string(), QEMU_TAP.to_string()];
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut others: Vec<f64> = Vec::new();
    {
        let mut ours = start_ours(work)?;
        let mut dpdk = if a.no_dpdk {
            None
        } else {
            Some(start_testpmd(work, &testpmd()?)?)
        };
        eprintln!("warming up {OURS}");
        warm_up(&mut ours, a)?;
        if let Some(d) = dpdk.as_mut() {
            eprintln!("warming up {DPDK}");
            warm_up(d, a)?;
        }
        for &fs in &a.frame_sizes {
            for (mode, dir) in [
                (Mode::Tx, "TX"),
                (Mode::Rx, "RX"),
                (Mode::Both, "both ways (slower direction)"),
            ] {
                // samples[contender][rep]
                let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); 2];
                for rep in 0..a.reps {
                    eprintln!("{fs} B {dir} (rep {}/{})", rep + 1, a.reps);
                    let mut order: Vec<(usize, &mut Contender)> = vec![(0, &mut ours)];
                    if let Some(d) = dpdk.as_mut() {
                        if rep % 2 == 0 {
                            order.push((1, d));
                        } else {
                            order.insert(0, (1, d));
                        }
                    }
                    for (i, c) in order {
                        let s = measure(c, a, mode, fs)?;
                        others.push(s.other_load);
                        samples[i].push(s);
                    }
                }
                let case = format!("{fs} B {dir}");
                for (metric, f) in [
                    (report::PPS, (|s: &Sample| s.pps) as fn(&Sample) -> f64),
                    (GBIT_S, |s: &Sample| s.gbit),
                    (CPU_US_PER_PKT, |s: &Sample| s.cpu_us_per_pkt),
                    (DELIVERED, |s: &Sample| s.delivered_pct),
                ] {
                    rows.push(Row {
                        case: case.clone(),
                        metric,
                        samples: vec![
                            samples[0].iter().map(f).collect(),
                            samples[1].iter().map(f).collect(),
                            Vec::new(),
                        ],
                    });
                }
            }
        }
    }
    let mut guest_desc = String::from("Guest part skipped (--no-guest).");
    if !a.no_guest {
        guest_desc = guest_rows(a, &mut rows)?;
    }
    let load1 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    others.sort_by(|x, y| x.total_cmp(y));
    notes.push(format!(
        "Load generator: one thread, closed-loop RX injection (at most min(ring, 400) frames between injection and arrival), batch {}, ring {}; frame size = the Ethernet frame without FCS; Gbit/s = packets/s × frame size × 8. TX frames go to a unicast MAC that is not the tap's: the host counts them (tap rx_packets, the \"delivered\" row) and drops them at once.",
        a.batch, a.queue_size
    ));
    notes.push(format!(
        "Ours: `vhost-net-backend --tap vnbt0 --queue-size 1024` in its own namespace (sleeps on eventfds/epoll: no busy polling). DPDK: `dpdk-testpmd {}` in its own namespace, forwarding (`start`) only while it is measured; its forwarding lcore busy-polls a full core whatever the load, so its CPU per packet is about 1 s / packets per second.",
        testpmd_args(Path::new("SOCK"), "PREFIX").join(" ")
    ));
    notes.push("DPDK's tap PMD only reads its tap after a SIGIO (the tun driver signals every frame it queues; the PMD's rx burst returns nothing until the signal handler bumped a counter), so testpmd's RX direction pays one signal delivery per frame in its main thread: that, not the vhost side, limits its RX rate.".into());
    if let (Some(med), Some(max)) = (others.get(others.len() / 2), others.last()) {
        notes.push(format!(
            "Other processes on the machine used a median of {med:.2} (max {max:.2}) cores during the load-generator measurements (/proc/stat busy time minus the generator and the contender); load average before: {}, after: {}.",
            load0.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
            load1.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        ));
    }
    notes.push(guest_desc);
    Ok(Section {
        name: "net".into(),
        title: "Network: the load generator through each vhost-user-net backend, and iperf3 in a guest".into(),
        description: format!(
            "Machine: {}. {} repetitions of {:.0} s per case and contender, alternating; median (±spread = (max-min)/median). Command: `bench compare net --runtime {}ms --reps {} --frame-sizes {} --queue-size {} --batch {}{}{} --iperf-time {}`.",
            machine(),
            a.reps,
            a.runtime.as_secs_f64(),
            a.runtime.as_millis(),
            a.reps,
            a.frame_sizes
                .iter()
                .map(|f| f.to_string())
                .collect::<Vec<_>>()
                .join(","),
            a.queue_size,
            a.batch,
            if a.no_guest { " --no-guest" } else { "" },
            if a.no_dpdk { " --no-dpdk" } else { "" },
            a.iperf_time,
        ),
        contenders,
        ratios: true,
        rows,
        notes,
    })
}

/// iperf3 in a guest: ours and QEMU's tap alternating; appends the two rows and returns
/// a note describing the setting.
fn guest_rows(a: &CompareNetArgs, rows: &mut Vec<Row>) -> Result<String, CompareError> {
    let bin = locate_sibling_binary("vhost-net-backend", "VHOST_NET_BACKEND").map_err(run_err)?;
    let mut t = GuestTest::try_start("bench_compare_net")
        .map_err(|e| run_err(format!("{e} (--no-guest skips the guest part)")))?;
    let qemu = match a.qemu.clone().map_or_else(qemu_for_console, Ok) {
        Ok(q) => {
            use_qemu(&mut t, q);
            String::new()
        }
        Err(e) => format!(" (QEMU 11 unavailable: {e})"),
    };
    let version =
        report::program_version(&t.env.qemu).unwrap_or_else(|| "QEMU (version unknown)".into());
    let accel = match t.env.accel {
        Accel::Tcg => "TCG",
        Accel::Kvm => "KVM",
    };
    // [direction][contender: ours, qemu tap]
    let mut mbps: [[Vec<f64>; 2]; 2] = Default::default();
    for rep in 0..a.reps {
        eprintln!("guest iperf3 (rep {}/{})", rep + 1, a.reps);
        let mut order = [0usize, 1];
        if rep % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let r = if i == 0 {
                iperf_vhost_user(&mut t, &bin, 1, 2, a.iperf_time, &format!("ours-{rep}"))
            } else {
                iperf_qemu_tap(&mut t, 2, a.iperf_time, &format!("qemu-tap-{rep}"))
            }
            .map_err(run_err)?;
            eprintln!(
                "  {}: guest→host {:.0} Mbit/s, host→guest {:.0} Mbit/s",
                if i == 0 { OURS } else { QEMU_TAP },
                r.tx_mbps,
                r.rx_mbps
            );
            mbps[0][i].push(r.tx_mbps);
            mbps[1][i].push(r.rx_mbps);
        }
    }
    for (d, case) in ["guest iperf3 guest→host", "guest iperf3 host→guest"]
        .iter()
        .enumerate()
    {
        rows.push(Row {
            case: case.to_string(),
            metric: report::MBIT_S,
            samples: vec![mbps[d][0].clone(), Vec::new(), mbps[d][1].clone()],
        });
    }
    Ok(format!(
        "Guest: {version}{qemu}, {accel}, 2 vCPUs, one TCP stream of iperf3 for {} s each way to a server on the tap's host side (in a namespace); ours with 1 queue pair (`-netdev vhost-user`), QEMU's own virtio-net on `-netdev tap,vhost=off` (one queue); one boot per contender and repetition.{}",
        a.iperf_time,
        if accel == "TCG" {
            " Under TCG the guest's emulated CPU, not the backend, bounds these numbers."
        } else {
            ""
        }
    ))
}
