//! Our block migration, driven the way an operator drives it: two vhost-blk-backend
//! processes, the destination started with `--incoming tcp:127.0.0.1:PORT`, the source's
//! job run over its control socket (QMP: `migrate`, JOB_STATUS_CHANGE events,
//! `migrate-complete` once ready, `query-migrate`), exactly what `vhost-blk-backend
//! migrate ... --wait ready` and `migrate-complete` send.
//!
//! - Full copy: source → a fresh sparse destination, plain TCP (`--migration-insecure` on
//!   both ends) or TLS (`--tls-creds DIR` on both ends), timed from `migrate` to the
//!   job's `concluded` (the destination has made everything durable and acknowledged).
//! - Incremental return: after the full copy the destination owns the disk; a vhost-user
//!   frontend writes the known set of scattered blocks there (so its dirty bitmap records
//!   them as a guest's writes); the old source is restarted with `--incoming` and its
//!   `--dirty-bitmap` file (which holds the checkpoint both ends recorded), and the
//!   destination migrates back with `incremental: true`.

use std::ffi::OsString;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vhost_tests::frontend::{Buf, FrontendOptions, TestFrontend};

use super::qmp::Qmp;
use super::{
    check_writes, dirty_bytes, files_equal, fill_block, free_port, log_tail, tcp_bytes_received,
    WriteOp, BLOCK, MAX_WRITE,
};
use crate::compare::{wait_socket, CompareError};

/// The dirty bitmap's granularity we run with (the program's default, said explicitly
/// because the ratios below depend on it).
pub(super) const GRANULARITY: u64 = 4096;

/// How the migration stream is protected.
#[derive(Clone, Debug)]
pub(super) enum Link {
    /// Plain TCP: `--migration-insecure` on both ends.
    Insecure,
    /// TLS with the credentials in this directory on both ends.
    Tls(PathBuf),
}

impl Link {
    fn args(&self) -> Vec<OsString> {
        match self {
            Link::Insecure => vec!["--migration-insecure".into()],
            Link::Tls(dir) => vec!["--tls-creds".into(), dir.into()],
        }
    }
}

/// What every run of ours needs.
pub(super) struct Ctx<'a> {
    /// The vhost-blk-backend binary.
    pub bin: &'a Path,
    /// This run's directory (sockets, logs, bitmap files, the destination image).
    pub work: &'a Path,
    /// The source image.
    pub image: &'a Path,
    /// Its size.
    pub size: u64,
    /// How long a job may take.
    pub job_timeout: Duration,
}

impl Ctx<'_> {
    /// A fresh sparse destination image, as a new host would have.
    pub(super) fn fresh_destination(&self) -> Result<PathBuf, CompareError> {
        let p = self.work.join("ours-dst.img");
        let _ = std::fs::remove_file(&p);
        std::fs::File::create(&p)?.set_len(self.size)?;
        Ok(p)
    }
}

/// A vhost-blk-backend process; stopped (SIGTERM, then SIGKILL) when dropped.
pub(super) struct Backend {
    child: Child,
    name: String,
    /// Its vhost-user socket.
    pub vhost: PathBuf,
    ctl: Option<PathBuf>,
    log: PathBuf,
}

impl Backend {
    /// Starts `bin` on `image` with `args`, a control socket when `control`; its stderr
    /// goes to `<name>.log`. Returns once its sockets exist (the migration listener of
    /// `--incoming` is bound before them).
    pub(super) fn start(
        ctx: &Ctx,
        name: &str,
        image: &Path,
        args: &[OsString],
        control: bool,
    ) -> Result<Self, CompareError> {
        let vhost = ctx.work.join(format!("{name}.sock"));
        let ctl = control.then(|| ctx.work.join(format!("{name}-ctl.sock")));
        let log = ctx.work.join(format!("{name}.log"));
        for p in std::iter::once(&vhost).chain(ctl.as_ref()) {
            let _ = std::fs::remove_file(p);
        }
        let mut cmd = Command::new(ctx.bin);
        cmd.arg("--blk-file")
            .arg(image)
            .arg("--socket-path")
            .arg(&vhost)
            .args(["--serial", "bench-migrate", "--dirty-granularity", "4k"])
            .args(args);
        if let Some(c) = &ctl {
            cmd.arg("--control-socket").arg(c);
        }
        let child = cmd
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .map_err(|e| CompareError::Run(format!("cannot start {}: {e}", ctx.bin.display())))?;
        let mut b = Backend {
            child,
            name: name.into(),
            vhost,
            ctl,
            log,
        };
        for p in std::iter::once(b.vhost.clone()).chain(b.ctl.clone()) {
            if let Err(e) = wait_socket(&p) {
                return Err(b.failed(e));
            }
        }
        if let Ok(Some(st)) = b.child.try_wait() {
            return Err(CompareError::Run(format!(
                "vhost-blk-backend ({name}) exited with {st}: {}",
                log_tail(&b.log)
            )));
        }
        Ok(b)
    }

    /// `e` with the end of this backend's log.
    pub(super) fn failed(&self, e: CompareError) -> CompareError {
        CompareError::Run(format!(
            "{e} (vhost-blk-backend {} log: {})",
            self.name,
            log_tail(&self.log)
        ))
    }

    /// A QMP session on its control socket.
    pub(super) fn control(&self) -> Result<Qmp, CompareError> {
        let p = self
            .ctl
            .as_ref()
            .ok_or_else(|| CompareError::Run(format!("{} has no control socket", self.name)))?;
        let mut q = Qmp::new(UnixStream::connect(p)?, &self.name)?;
        q.handshake().map_err(|e| self.failed(e))?;
        Ok(q)
    }

    /// Stops it with SIGTERM (a clean exit writes its `--dirty-bitmap` file) and waits;
    /// fails when it does not exit within 10 s or exits with an error.
    pub(super) fn stop(mut self) -> Result<(), CompareError> {
        // SAFETY: kill(2) on a process we started and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.try_wait()? {
                return if st.success() {
                    Ok(())
                } else {
                    Err(self.failed(CompareError::Run(format!("exited with {st}"))))
                };
            }
            if Instant::now() > deadline {
                return Err(self.failed(CompareError::Run(
                    "did not exit within 10 s of SIGTERM".into(),
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        crate::compare::terminate(&mut self.child, Duration::from_secs(5));
    }
}

/// One job from `migrate` to `concluded`.
#[derive(Clone, Debug)]
pub(super) struct JobRun {
    /// From `migrate` to the job's `concluded`.
    pub total: Duration,
    /// From `migrate-complete` to `concluded`.
    pub handover: Duration,
    /// When `migrate-complete` was sent.
    pub completing: Instant,
    /// `query-migrate` when the job became ready.
    pub at_ready: Value,
    /// `query-migrate` after it concluded.
    pub end: Value,
}

/// Waits for job `id` to reach `want` ("ready", "concluded"); a job that concludes
/// before it is ready failed.
fn wait_status(qmp: &mut Qmp, id: &str, want: &str, deadline: Instant) -> Result<(), CompareError> {
    loop {
        let ev = qmp.next_event(deadline)?;
        if ev.name != "JOB_STATUS_CHANGE" || ev.data["id"].as_str() != Some(id) {
            continue;
        }
        match ev.data["status"].as_str() {
            Some(s) if s == want => return Ok(()),
            Some("concluded") => {
                return Err(CompareError::Run(format!(
                    "migration job {id} concluded before it was {want}: {}",
                    ev.data["error"].as_str().unwrap_or("no error given")
                )))
            }
            _ => {}
        }
    }
}

/// Runs a migration job with `args` (the `migrate` command's arguments) on `qmp`: waits
/// for ready, calls `on_ready` with `query-migrate`'s answer, lets the job run
/// `hold_at_ready` longer, completes it and waits for concluded. Ok(Err(why)) when
/// `migrate` itself is refused (a mode this build does not offer).
pub(super) fn run_job(
    qmp: &mut Qmp,
    args: Value,
    hold_at_ready: Duration,
    timeout: Duration,
    on_ready: impl FnOnce(&Value) -> Result<(), CompareError>,
) -> Result<Result<JobRun, String>, CompareError> {
    let deadline = Instant::now() + timeout;
    let t0 = Instant::now();
    let id = match qmp.try_execute("migrate", args)? {
        Ok(v) => v["id"]
            .as_str()
            .ok_or_else(|| CompareError::Run(format!("migrate answered {v}, no job id")))?
            .to_string(),
        Err(why) => return Ok(Err(why)),
    };
    wait_status(qmp, &id, "ready", deadline)?;
    let at_ready = qmp.execute("query-migrate", json!({}))?;
    on_ready(&at_ready)?;
    std::thread::sleep(hold_at_ready);
    let tc = Instant::now();
    qmp.execute("migrate-complete", json!({}))?;
    wait_status(qmp, &id, "concluded", deadline)?;
    let (total, handover) = (t0.elapsed(), tc.elapsed());
    let end = qmp.execute("query-migrate", json!({}))?;
    if let Some(e) = end.get("error") {
        return Err(CompareError::Run(format!("migration job {id} failed: {e}")));
    }
    Ok(Ok(JobRun {
        total,
        handover,
        completing: tc,
        at_ready,
        end,
    }))
}

/// How far the job's byte count and the kernel's may be apart at ready: the job sends a
/// pass-done frame (a few dozen bytes) on every idle pass, so the two reads, one after
/// the other, may see a frame or two of difference.
const WIRE_SLACK: u64 = 1024;

/// A byte count of `query-migrate`'s `bytes`.
pub(super) fn bytes(q: &Value, k: &str) -> u64 {
    q["bytes"][k].as_u64().unwrap_or(0)
}

/// A full copy of the source image to a fresh destination over `link`: both backends
/// (left running, the destination now serving) and the job.
pub(super) struct FullCopy {
    pub src: Backend,
    pub dst: Backend,
    pub dst_image: PathBuf,
    pub job: JobRun,
}

/// Starts a destination with `--incoming` and a source, and migrates the whole image.
/// Both keep `--dirty-bitmap` files (the source's, restarted, is the incremental return's
/// destination). Checks that every byte went as data and that the images are equal.
pub(super) fn full_copy(ctx: &Ctx, link: &Link) -> Result<FullCopy, CompareError> {
    let dst_image = ctx.fresh_destination()?;
    for f in ["src.dirty", "dst.dirty"] {
        let _ = std::fs::remove_file(ctx.work.join(f));
    }
    let port = free_port()?;
    let uri = format!("tcp:127.0.0.1:{port}");
    let mut dst_args: Vec<OsString> = vec!["--incoming".into(), uri.clone().into()];
    dst_args.extend(link.args());
    dst_args.extend(["--dirty-bitmap".into(), ctx.work.join("dst.dirty").into()]);
    let dst = Backend::start(ctx, "ours-dst", &dst_image, &dst_args, true)?;
    let mut src_args = link.args();
    src_args.extend(["--dirty-bitmap".into(), ctx.work.join("src.dirty").into()]);
    let src = Backend::start(ctx, "ours-src", ctx.image, &src_args, true)?;
    let mut qmp = src.control()?;
    let job = run_job(
        &mut qmp,
        json!({"uri": uri}),
        Duration::ZERO,
        ctx.job_timeout,
        |_| Ok(()),
    )?
    .map_err(|why| src.failed(CompareError::Run(format!("migrate refused: {why}"))))?;
    // Random data: all of it must travel as data (zero detection would make the
    // throughput a measure of something else).
    let data = bytes(&job.end, "data");
    if data != ctx.size || bytes(&job.end, "wire") < ctx.size {
        return Err(CompareError::Run(format!(
            "the full copy sent {data} data bytes ({} on the wire) for a {}-byte image",
            bytes(&job.end, "wire"),
            ctx.size
        )));
    }
    files_equal(ctx.image, &dst_image)
        .map_err(|e| CompareError::Run(format!("after our full copy: {e}")))?;
    Ok(FullCopy {
        src,
        dst,
        dst_image,
        job,
    })
}

/// What the incremental return measured.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Return {
    /// Bytes the job wrote to the connection (frames with their headers, the handshake).
    pub wire: u64,
    /// Image bytes the job covered (its `bytes.total` when it started: the dirty blocks).
    pub dirty: u64,
    /// Distinct bytes the writes touched (4 KiB blocks).
    pub written: u64,
    /// From `migrate` to concluded.
    pub ms: f64,
}

/// After `full` (plain TCP): `plan` written on the destination, then the return to the
/// restarted source. Checks that the return was incremental, covered exactly the blocks
/// written, and that both images are equal and hold every write.
pub(super) fn incremental_return(
    ctx: &Ctx,
    full: FullCopy,
    plan: &[WriteOp],
    seed: u64,
) -> Result<Return, CompareError> {
    let FullCopy {
        src,
        dst,
        dst_image,
        ..
    } = full;
    write_plan(&dst.vhost, plan, seed).map_err(|e| dst.failed(e))?;
    // The old source, which handed the disk over, exits cleanly (its bitmap file keeps
    // the checkpoint) and comes back as the destination of the return.
    src.stop()?;
    let port = free_port()?;
    let uri = format!("tcp:127.0.0.1:{port}");
    let back = Backend::start(
        ctx,
        "ours-src-back",
        ctx.image,
        &[
            "--incoming".into(),
            uri.clone().into(),
            "--migration-insecure".into(),
            "--dirty-bitmap".into(),
            ctx.work.join("src.dirty").into(),
        ],
        false,
    )?;
    let mut qmp = dst.control()?;
    // The job counts the bytes it writes to the connection; while the connection is
    // up (at ready) that count must be the kernel's, which is how the peer's are counted.
    let job = run_job(
        &mut qmp,
        json!({"uri": uri, "incremental": true}),
        Duration::ZERO,
        ctx.job_timeout,
        |q| {
            let kernel = tcp_bytes_received(port)?;
            let ours = bytes(q, "wire");
            if kernel.abs_diff(ours) > WIRE_SLACK {
                let _ = std::process::Command::new("ss")
                    .args(["-t", "-i", "-n", "-H", "state", "established", "sport", "="])
                    .arg(format!(":{port}"))
                    .status();
                return Err(CompareError::Run(format!(
                    "at ready the job says it wrote {ours} bytes, the destination's end \
                     received {kernel}"
                )));
            }
            Ok(())
        },
    )?
    .map_err(|why| dst.failed(CompareError::Run(format!("migrate refused: {why}"))))?;
    let expected = dirty_bytes(plan, GRANULARITY, ctx.size);
    if job.end["mode"] != "incremental" {
        return Err(back.failed(CompareError::Run(format!(
            "the return was not incremental: {}",
            job.end
        ))));
    }
    let (total, data, zero) = (
        bytes(&job.at_ready, "total"),
        bytes(&job.end, "data"),
        bytes(&job.end, "zero"),
    );
    if total != expected || data + zero != expected {
        return Err(CompareError::Run(format!(
            "the return covered {total} bytes and sent {data} of data and {zero} of zeros; \
             the writes touched {expected} bytes in {GRANULARITY}-byte blocks"
        )));
    }
    files_equal(ctx.image, &dst_image)
        .map_err(|e| CompareError::Run(format!("after our incremental return: {e}")))?;
    check_writes(ctx.image, plan, seed)?;
    back.stop()?;
    dst.stop()?;
    Ok(Return {
        wire: bytes(&job.end, "wire"),
        dirty: expected,
        written: dirty_bytes(plan, BLOCK, ctx.size),
        ms: job.total.as_secs_f64() * 1e3,
    })
}

/// Writes `plan` (the data of `fill_block`) through a vhost-user frontend on `socket`,
/// one request at a time, each checked.
fn write_plan(socket: &Path, plan: &[WriteOp], seed: u64) -> Result<(), CompareError> {
    let harness = |e: vhost_tests::frontend::HarnessError| {
        CompareError::Run(format!("writing through {}: {e}", socket.display()))
    };
    let mut fe = TestFrontend::connect(
        socket,
        FrontendOptions {
            mem_size: 4 << 20,
            ..Default::default()
        },
    )
    .map_err(harness)?;
    let (hdr, data, status) = (fe.alloc(16), fe.alloc(MAX_WRITE), fe.alloc(1));
    let mut buf = vec![0u8; MAX_WRITE as usize];
    for (i, w) in plan.iter().enumerate() {
        let d = &mut buf[..w.len as usize];
        for (k, chunk) in d.chunks_exact_mut(BLOCK as usize).enumerate() {
            fill_block(seed, i, w.off / BLOCK + k as u64, chunk);
        }
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&1u32.to_le_bytes()); // VIRTIO_BLK_T_OUT
        h[8..16].copy_from_slice(&(w.off / 512).to_le_bytes());
        fe.write(hdr, &h);
        fe.write(data, d);
        fe.write(status, &[0xff]);
        fe.submit(
            0,
            &[
                Buf::ro(hdr, 16),
                Buf::ro(data, w.len as u32),
                Buf::wo(status, 1),
            ],
        );
        fe.wait(0, 1).map_err(harness)?;
        let st = fe.read(status, 1)[0];
        if st != 0 {
            return Err(CompareError::Run(format!(
                "write {i} at {} failed with status {st}",
                w.off
            )));
        }
    }
    Ok(())
}
