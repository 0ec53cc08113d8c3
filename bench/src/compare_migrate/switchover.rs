//! The I/O stall at switch-over: how long a guest writing steadily sees no completion
//! while the disk moves from the source backend to the destination.
//!
//! One process plays the guest on both hosts, so both ends are timed by one clock: a
//! vhost-user frontend on the source keeps `iodepth` 4 KiB random writes in flight over
//! the whole disk, and one on the destination (started with `--incoming`) submits as
//! many at once, which the destination holds until the sync has landed. Meanwhile the
//! source's job runs (`migrate`, ready, `hold` more of dirty passes under the load, then
//! `migrate-complete`: this load generator is not a VMM doing LOG_ALL, so the hand-over
//! is asked for over the control socket). At the hand-over the source holds new requests
//! and lets those in flight finish; the destination's held requests complete as soon as
//! it serves, and its session goes on writing.
//!
//! The stall is from the source's last completion to the destination's first. Every
//! completion's status is checked (an error counts, it does not end the run), and at the
//! end the destination must equal the source everywhere but the blocks the destination's
//! own session wrote after the hand-over: the last pass carried every completed write.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use vhost_tests::frontend::{Buf, FrontendOptions, HarnessError, TestFrontend};

use super::free_port;
use super::ours::{run_job, Backend, Ctx, JobRun};
use crate::compare::CompareError;

/// Block size of the load.
const BS: u64 = 4096;
/// How long the destination's session keeps writing after its first completion.
const AFTER: Duration = Duration::from_millis(300);

/// What one switch-over measured.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Stall {
    /// Source's last completion → destination's first, ms.
    pub stall_ms: f64,
    /// Requests that completed with an error status, both ends.
    pub errors: u64,
    /// Source's write rate before the hand-over, requests per second.
    pub src_iops: f64,
    /// The job's own `downtime-ms` (from holding new requests to the destination's Ack).
    pub downtime_ms: f64,
    /// Dirty passes the job made.
    pub passes: u64,
}

/// One side's guest: slots of (header, data, status) and the requests on the ring.
struct Session {
    fe: TestFrontend,
    slots: Vec<[u64; 3]>,
    /// Head index → slot.
    pending: HashMap<u16, usize>,
    rng: u64,
    blocks: u64,
    /// Every block offset this session submitted a write to.
    written: HashSet<u64>,
    completed: u64,
    errors: u64,
}

impl Session {
    fn connect(socket: &Path, iodepth: u16, seed: u64) -> Result<Self, CompareError> {
        let mut fe = TestFrontend::connect(
            socket,
            FrontendOptions {
                mem_size: 8 << 20,
                queue_size: 256,
                ..Default::default()
            },
        )
        .map_err(harness)?;
        let cap = fe.config(0, 8).map_err(harness)?;
        let sectors = u64::from_le_bytes(
            cap.try_into()
                .map_err(|_| CompareError::Run("short config space".into()))?,
        );
        let mut rng = seed | 1;
        let slots = (0..iodepth)
            .map(|_| {
                let s = [fe.alloc(16), fe.alloc(BS), fe.alloc(1)];
                // Data that is not zeros (zero blocks travel as flags, not data).
                let data: Vec<u8> = (0..BS / 8)
                    .flat_map(|_| xorshift(&mut rng).to_le_bytes())
                    .collect();
                fe.write(s[1], &data);
                s
            })
            .collect();
        Ok(Self {
            fe,
            slots,
            pending: HashMap::new(),
            rng,
            blocks: sectors * 512 / BS,
            written: HashSet::new(),
            completed: 0,
            errors: 0,
        })
    }

    /// A 4 KiB write at a random block from `slot` (not kicked).
    fn submit(&mut self, slot: usize) {
        let off = (xorshift(&mut self.rng) % self.blocks) * BS;
        let [hdr, data, status] = self.slots[slot];
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&1u32.to_le_bytes()); // VIRTIO_BLK_T_OUT
        h[8..16].copy_from_slice(&(off / 512).to_le_bytes());
        self.fe.write(hdr, &h);
        self.fe.write(status, &[0xff]);
        let q = &mut self.fe.queues[0];
        let head = q.add_chain(
            &self.fe.mem,
            &[
                Buf::ro(hdr, 16),
                Buf::ro(data, BS as u32),
                Buf::wo(status, 1),
            ],
        );
        q.publish(&self.fe.mem, head);
        self.pending.insert(head, slot);
        self.written.insert(off);
    }

    fn submit_all(&mut self) {
        for slot in 0..self.slots.len() {
            self.submit(slot);
        }
        self.fe.queues[0].notify();
    }

    /// Takes the completions there are, checks their status, resubmits from the freed
    /// slots when `more`; returns how many completed.
    fn reap(&mut self, more: bool) -> usize {
        let _ = self.fe.queues[0].call.read();
        let done = self.fe.queues[0].take_used(&self.fe.mem);
        // Every finished slot first: a resubmission may reuse the head of a completion
        // not yet looked at.
        let mut free = Vec::with_capacity(done.len());
        for u in &done {
            let Some(slot) = self.pending.remove(&(u.id as u16)) else {
                continue;
            };
            if self.fe.read(self.slots[slot][2], 1)[0] != 0 {
                self.errors += 1;
            }
            free.push(slot);
        }
        self.completed += free.len() as u64;
        if more && !free.is_empty() {
            for &slot in &free {
                self.submit(slot);
            }
            self.fe.queues[0].notify();
        }
        free.len()
    }
}

fn harness(e: HarnessError) -> CompareError {
    CompareError::Run(format!("load generator: {e}"))
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Migrates the image from a source under a steady `iodepth` 4 KiB random write load to
/// a fresh destination in `copy_mode` ("background", "write-blocking"). Ok(Err(why))
/// when the source refuses the mode.
pub(super) fn run(
    ctx: &Ctx,
    copy_mode: &str,
    iodepth: u16,
    hold: Duration,
    seed: u64,
) -> Result<Result<Stall, String>, CompareError> {
    let dst_image = ctx.fresh_destination()?;
    let uri = format!("tcp:127.0.0.1:{}", free_port()?);
    let dst = Backend::start(
        ctx,
        "stall-dst",
        &dst_image,
        &[
            "--incoming".into(),
            uri.clone().into(),
            "--migration-insecure".into(),
        ],
        false,
    )?;
    let src = Backend::start(
        ctx,
        "stall-src",
        ctx.image,
        &["--migration-insecure".into()],
        true,
    )?;
    let mut s = Session::connect(&src.vhost, iodepth, seed).map_err(|e| src.failed(e))?;
    let mut d = Session::connect(&dst.vhost, iodepth, seed ^ 0x5555).map_err(|e| dst.failed(e))?;
    d.submit_all();
    s.submit_all();
    let mut qmp = src.control()?;
    let args = json!({"uri": uri, "copy-mode": copy_mode});
    let timeout = ctx.job_timeout;
    let t_load = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(run_job(&mut qmp, args, hold, timeout, |_| Ok(())));
    });

    let mut pfds = [
        s.fe.queues[0].call.as_raw_fd(),
        d.fe.queues[0].call.as_raw_fd(),
    ]
    .map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let deadline = Instant::now() + ctx.job_timeout + Duration::from_secs(30);
    let (mut last_src, mut first_dst) = (None::<Instant>, None::<Instant>);
    // The job's result once it is over: the destination may open a moment after the
    // source concluded (it acknowledges, then serves).
    let mut done: Option<JobRun> = None;
    let (job, first_dst) = loop {
        // SAFETY: pfds is a valid array of pollfd.
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 5) };
        let now = Instant::now();
        if s.reap(true) > 0 {
            last_src = Some(now);
        }
        if d.reap(true) > 0 {
            first_dst.get_or_insert(now);
        }
        if done.is_none() {
            match rx.try_recv() {
                Ok(r) => match r? {
                    Ok(j) => done = Some(j),
                    Err(why) => return Ok(Err(why)),
                },
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    return Err(CompareError::Run(
                        "the migration job's driver panicked".into(),
                    ))
                }
            }
        }
        if let Some(f) = first_dst.filter(|f| now.duration_since(*f) >= AFTER) {
            if let Some(j) = done.take() {
                break (j, f);
            }
        }
        if now > deadline {
            return Err(src.failed(CompareError::Run(format!(
                "switch-over ({copy_mode}): {} after {:?}",
                if done.is_some() {
                    "the job concluded, and no request completed on the destination"
                } else {
                    "the job did not conclude"
                },
                deadline.duration_since(t_load)
            ))));
        }
    };
    let last_src = last_src.ok_or_else(|| {
        src.failed(CompareError::Run(format!(
            "switch-over ({copy_mode}): no request completed on the source"
        )))
    })?;
    // The destination's last requests complete; the source's stay held (it no longer
    // serves the disk) and go with the connection.
    let until = Instant::now() + Duration::from_secs(5);
    while !d.pending.is_empty() {
        if Instant::now() > until {
            return Err(dst.failed(CompareError::Run(format!(
                "switch-over ({copy_mode}): {} requests still in flight on the destination",
                d.pending.len()
            ))));
        }
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfds[1], 1, 5) };
        d.reap(false);
    }
    let src_secs = last_src.duration_since(t_load).as_secs_f64().max(1e-6);
    let stall = Stall {
        stall_ms: first_dst.saturating_duration_since(last_src).as_secs_f64() * 1e3,
        errors: s.errors + d.errors,
        src_iops: s.completed as f64 / src_secs,
        downtime_ms: job.end["downtime-ms"].as_f64().unwrap_or(0.0),
        passes: job.end["passes"].as_u64().unwrap_or(0),
    };
    let written = std::mem::take(&mut d.written);
    drop(s);
    drop(d);
    equal_except(ctx.image, &dst_image, &written).map_err(|e| {
        CompareError::Run(format!(
            "switch-over ({copy_mode}), after the hand-over: {e}"
        ))
    })?;
    src.stop()?;
    dst.stop()?;
    Ok(Ok(stall))
}

/// Compares two images block by block, skipping the 4 KiB blocks at `skip` (offsets).
fn equal_except(a: &Path, b: &Path, skip: &HashSet<u64>) -> Result<(), CompareError> {
    let (fa, fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let len = fa.metadata()?.len();
    if fb.metadata()?.len() != len {
        return Err(CompareError::Run("the images differ in size".into()));
    }
    const CHUNK: u64 = 1 << 20;
    let (mut ba, mut bb) = (vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize]);
    let mut off = 0;
    while off < len {
        let n = (len - off).min(CHUNK) as usize;
        fa.read_exact_at(&mut ba[..n], off)?;
        fb.read_exact_at(&mut bb[..n], off)?;
        if ba[..n] != bb[..n] {
            for (i, (x, y)) in ba[..n]
                .chunks(BS as usize)
                .zip(bb[..n].chunks(BS as usize))
                .enumerate()
            {
                let at = off + i as u64 * BS;
                if x != y && !skip.contains(&at) {
                    return Err(CompareError::Run(format!(
                        "the destination differs from the source in the block at {at}, \
                         which only the source wrote"
                    )));
                }
            }
        }
        off += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_only_in_skipped_blocks_pass() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut data = vec![3u8; (2 << 20) + 8192];
        std::fs::write(&a, &data).unwrap();
        data[(1 << 20) + 4100] = 9;
        std::fs::write(&b, &data).unwrap();
        let skip = HashSet::from([(1 << 20) + 4096]);
        equal_except(&a, &b, &skip).unwrap();
        let e = equal_except(&a, &b, &HashSet::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("at {}", (1 << 20) + 4096)), "{e}");
        data[2 << 20] = 1;
        std::fs::write(&b, &data).unwrap();
        assert!(equal_except(&a, &b, &skip).is_err());
    }
}
