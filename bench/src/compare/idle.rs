//! `bench compare idle`: each backend's resident memory and CPU use while it waits, with
//! a frontend connected for blk (rings set up, no I/O) and for the others none.
//! Targets: 0 % CPU and at most 8 MiB RSS.
//!
//! The result is a section without ratios: the rows are our own backends, not contenders,
//! and the numbers are judged against the targets, not against each other.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use vhost_tests::frontend::{FrontendOptions, TestFrontend};

use crate::compare::report::{machine, Row, Section, CPU_PCT, RSS_MIB};
use crate::compare::{wait_socket, CompareError};
use crate::load::cpu_seconds;

/// RSS target: a backend that waits should cost no more than a small shell.
const TARGET_RSS_MIB: f64 = 8.0;
/// CPU below this (percent of one CPU) counts as the 0 % target: /proc's tick accounting
/// can charge a few ticks to a process that only woke up for a signal.
const TARGET_CPU_PCT: f64 = 0.5;

/// Options of `bench compare idle`.
#[derive(Args, Debug)]
pub struct CompareIdleArgs {
    /// How long to watch each backend.
    #[arg(long, default_value = "10s", value_parser = crate::load::blk::parse_duration)]
    duration: Duration,
    /// Where to write idle.md, idle.json and idle.png.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// A backend binary: the one next to `bench` (or `env_var`'s), as every comparison finds it.
fn bin(name: &str, env_var: &str) -> Result<PathBuf, CompareError> {
    vhost_tests::guest::locate_sibling_binary(name, env_var).map_err(CompareError::Run)
}

/// What the watched backends did: an RSS and a CPU row for each, and the remarks.
#[derive(Default)]
struct Watched {
    rows: Vec<Row>,
    over_target: Vec<String>,
    notes: Vec<String>,
}

impl Watched {
    /// Watches `p` for `d` and records its RSS at the end and its CPU over the whole time.
    fn watch(&mut self, name: &str, p: &Proc, d: Duration) {
        let pid = p.0.id();
        let cpu0 = cpu_seconds(pid);
        let t0 = Instant::now();
        std::thread::sleep(d);
        let cpu = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
        let rss = rss_kib(pid) as f64 / 1024.0;
        if cpu >= TARGET_CPU_PCT || rss > TARGET_RSS_MIB {
            self.over_target
                .push(format!("{name} ({rss:.1} MiB, {cpu:.2} %)"));
        }
        for (metric, v) in [(RSS_MIB, rss), (CPU_PCT, cpu)] {
            let target = if metric == RSS_MIB {
                TARGET_RSS_MIB
            } else {
                0.0
            };
            self.rows.push(Row {
                case: name.to_string(),
                metric,
                samples: vec![vec![v], vec![target]],
            });
        }
    }
}

/// Runs the idle measurement and returns its section (also written to
/// `<out>/idle.{md,json,png}`).
pub fn compare_idle(a: &CompareIdleArgs) -> Result<Section, CompareError> {
    let dir = std::env::temp_dir().join(format!("vhost-idle-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut w = Watched::default();

    let img = dir.join("idle.img");
    std::fs::File::create(&img)?.set_len(64 << 20)?;
    let sock = dir.join("blk.sock");
    let blk = spawn(
        Command::new(bin("vhost-blk-backend", "VHOST_BLK_BACKEND")?)
            .arg("--blk-file")
            .arg(&img)
            .arg("--socket-path")
            .arg(&sock),
    )?;
    wait_socket(&sock)?;
    let fe = TestFrontend::connect(&sock, FrontendOptions::default())
        .map_err(|e| CompareError::Run(e.to_string()))?;
    w.watch(
        "vhost-blk-backend (frontend connected, rings started)",
        &blk,
        a.duration,
    );
    drop(fe);
    drop(blk);

    let sock = dir.join("con.sock");
    let serial = spawn(
        Command::new(bin("serial-backend", "SERIAL_BACKEND")?)
            .arg("--socket-path")
            .arg(&sock)
            .arg("--console")
            .arg(format!("socket={}", dir.join("c0.sock").display()))
            .arg("--hostinfo"),
    )?;
    wait_socket(&sock)?;
    w.watch("serial-backend (no frontend)", &serial, a.duration);
    drop(serial);

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let ns = format!("vhost-idle-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &ns])
            .status()?
            .success();
        if !ok {
            w.notes
                .push("vhost-net-backend: SKIPPED: `ip netns add` failed".into());
        } else {
            let sock = dir.join("net.sock");
            let net = spawn(
                Command::new("ip")
                    .args(["netns", "exec", &ns])
                    .arg(bin("vhost-net-backend", "VHOST_NET_BACKEND")?)
                    .arg("--socket-path")
                    .arg(&sock)
                    .args(["--tap", "idle0"]),
            )?;
            let r = wait_socket(&sock);
            // `ip netns exec` execs the backend, so the child's pid is the backend's.
            if r.is_ok() {
                w.watch("vhost-net-backend (no frontend)", &net, a.duration);
            }
            drop(net);
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
            r?;
        }
    } else {
        w.notes
            .push("vhost-net-backend: SKIPPED: needs root for a tap".into());
    }
    let _ = std::fs::remove_dir_all(&dir);
    let mut notes = vec![if w.over_target.is_empty() {
        format!(
            "Targets: 0 % CPU (under {TARGET_CPU_PCT} %) and RSS at most {TARGET_RSS_MIB} MiB: every backend measured is within them."
        )
    } else {
        format!(
            "Targets: 0 % CPU (under {TARGET_CPU_PCT} %) and RSS at most {TARGET_RSS_MIB} MiB: NOT within them: {}.",
            w.over_target.join(", ")
        )
    }];
    notes.extend(w.notes);
    let section = Section {
        name: "idle".into(),
        title: "Idle: each backend's memory and CPU while it waits".into(),
        description: format!(
            "Machine: {}. Each backend watched for {:.0} s: RSS at the end, CPU (user + system, all threads) over the whole time, in percent of one CPU. Command: `bench compare idle --duration {}ms`.",
            machine(),
            a.duration.as_secs_f64(),
            a.duration.as_millis()
        ),
        // The target as a second column: the table and the chart show each value next to
        // what it should be.
        contenders: vec!["measured".into(), "target".into()],
        ratios: false,
        rows: w.rows,
        notes,
    };
    section.write(&a.out)?;
    Ok(section)
}

fn spawn(cmd: &mut Command) -> Result<Proc, CompareError> {
    Ok(Proc(
        cmd.env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    ))
}
