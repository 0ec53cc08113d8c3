//! `bench compare idle`: each backend's resident memory and CPU use while it waits, with
//! a frontend connected for blk (rings set up, no I/O) and for the others none.
//! Targets: 0 % CPU and at most 8 MiB RSS.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use vhost_tests::frontend::{FrontendOptions, TestFrontend};

use crate::compare::{cpu_seconds, wait_socket, CompareError};

/// Options of `bench compare idle`.
#[derive(Args, Debug)]
pub struct CompareIdleArgs {
    /// How long to watch each backend.
    #[arg(long, default_value = "10s", value_parser = crate::blk::parse_duration)]
    duration: Duration,
    /// Where to write idle.md.
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

fn bin(name: &str) -> Result<PathBuf, CompareError> {
    std::env::current_exe()?
        .parent()
        .map(|d| d.join(name))
        .filter(|p| p.exists())
        .ok_or_else(|| {
            CompareError::Run(format!("{name} not found next to bench; build --release"))
        })
}

fn watch(name: &str, p: &Proc, d: Duration, md: &mut String) {
    let pid = p.0.id();
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    std::thread::sleep(d);
    let cpu = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    let rss = rss_kib(pid);
    let _ = writeln!(
        md,
        "| {name} | {:.1} MiB | {cpu:.2} % | {} |",
        rss as f64 / 1024.0,
        if cpu < 0.5 && rss <= 8 * 1024 {
            "yes"
        } else {
            "no"
        }
    );
}

/// Runs the idle measurement and returns the Markdown table.
pub fn compare_idle(a: &CompareIdleArgs) -> Result<String, CompareError> {
    let dir = std::env::temp_dir().join(format!("vhost-idle-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut md =
        String::from("| backend (idle) | RSS | CPU | within 0 % / 8 MiB |\n|---|---|---|---|\n");

    let img = dir.join("idle.img");
    std::fs::File::create(&img)?.set_len(64 << 20)?;
    let sock = dir.join("blk.sock");
    let blk = spawn(
        Command::new(bin("vhost-blk-backend")?)
            .arg("--blk-file")
            .arg(&img)
            .arg("--socket-path")
            .arg(&sock),
    )?;
    wait_socket(&sock)?;
    let fe = TestFrontend::connect(&sock, FrontendOptions::default())
        .map_err(|e| CompareError::Run(e.to_string()))?;
    watch(
        "vhost-blk-backend (frontend connected, rings started)",
        &blk,
        a.duration,
        &mut md,
    );
    drop(fe);
    drop(blk);

    let sock = dir.join("con.sock");
    let serial = spawn(
        Command::new(bin("serial-backend")?)
            .arg("--socket-path")
            .arg(&sock)
            .arg("--console")
            .arg(format!("socket={}", dir.join("c0.sock").display()))
            .arg("--hostinfo"),
    )?;
    wait_socket(&sock)?;
    watch("serial-backend (no frontend)", &serial, a.duration, &mut md);
    drop(serial);

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let ns = format!("vhost-idle-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &ns])
            .status()?
            .success();
        if ok {
            let sock = dir.join("net.sock");
            let net = spawn(
                Command::new("ip")
                    .args(["netns", "exec", &ns])
                    .arg(bin("vhost-net-backend")?)
                    .arg("--socket-path")
                    .arg(&sock)
                    .args(["--tap", "idle0"]),
            )?;
            let r = wait_socket(&sock);
            // `ip netns exec` execs the backend, so the child's pid is the backend's.
            if r.is_ok() {
                watch("vhost-net-backend (no frontend)", &net, a.duration, &mut md);
            }
            drop(net);
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
            r?;
        }
    } else {
        md.push_str("| vhost-net-backend | SKIPPED: needs root for a tap | | |\n");
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(a.out.join("idle.md"), &md)?;
    Ok(md)
}

fn spawn(cmd: &mut Command) -> Result<Proc, CompareError> {
    Ok(Proc(
        cmd.env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    ))
}
