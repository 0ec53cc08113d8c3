//! The I/O stall at switch-over: how long a guest writing steadily sees no completion
//! while the disk moves from the source backend to the destination.
//!
//! One process plays the guest on both hosts, so both ends are timed by one clock: a
//! vhost-user frontend on the source keeps `iodepth` 4 KiB random writes in flight over
//! the whole disk (at most `iops` a second when paced), and one on the destination
//! (started with `--incoming`) submits as many at once, which the destination holds
//! until the sync has landed. Meanwhile the source's job runs (`migrate`, ready, `hold`
//! more under the load, then `migrate-complete`: this load generator is not a VMM doing
//! LOG_ALL, so the hand-over is asked for over the control socket). At the hand-over the
//! source holds new requests and finishes those in flight; the destination's held
//! requests complete as soon as it serves, and its session goes on writing.
//!
//! The stall is the longest time without any completion, on either end, from the last
//! completion before `migrate-complete` to the destination's first. In background mode
//! that is the source's last completion to the destination's first. In write-blocking
//! mode the writes waiting for the last round complete on the source only after the
//! hand-over (their blocks went in the last pass), so the source's "last completion" may
//! come after the destination's first; the longest gap still is what the guest sees.
//!
//! Every completion's status is checked (an error counts, it does not end the run), and
//! at the end every block must be on the destination as the guest last saw it complete:
//! equal to the source's image, except the blocks the destination's own session wrote
//! after the hand-over, and those where the source held a write it never completed
//! (then the destination has the last completed write there, or that one). The last
//! pass must have carried every completed write: this check found two races in the
//! hand-over that lost one now and then.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc;
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

/// The guest's load.
#[derive(Clone, Copy, Debug)]
pub(super) struct Load {
    /// 4 KiB random writes in flight per end.
    pub iodepth: u16,
    /// Writes per second at most, both ends together (0: as fast as they complete).
    pub iops: u64,
    /// How long the job runs under the load once ready, before `migrate-complete`.
    pub hold: Duration,
}

/// What one switch-over measured.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Stall {
    /// Longest time without a completion across the hand-over, ms.
    pub stall_ms: f64,
    /// Requests that completed with an error status, both ends.
    pub errors: u64,
    /// The source's write rate from ready to `migrate-complete`, per second.
    pub src_iops: f64,
    /// The job's own `downtime-ms` (from holding new requests to the destination's Ack).
    pub downtime_ms: f64,
    /// Passes the job made.
    pub passes: u64,
}

/// One side's guest: slots of (header, data, status) and the requests on the ring.
struct Session {
    fe: TestFrontend,
    slots: Vec<[u64; 3]>,
    /// Every slot's data (a slot always writes the same 4 KiB, different per slot).
    data: Vec<Vec<u8>>,
    /// Slots without a request.
    free: Vec<usize>,
    /// Head index → (slot, block offset).
    pending: HashMap<u16, (usize, u64)>,
    rng: u64,
    blocks: u64,
    /// What this session wrote to each block offset.
    written: HashMap<u64, BlockLog>,
    errors: u64,
}

/// The writes of one session to one block.
#[derive(Debug, Default)]
struct BlockLog {
    /// The slot of the last write completed without error.
    acked: Option<usize>,
    /// Slots of writes submitted and not completed (a held write may or may not have
    /// reached the image).
    unacked: Vec<usize>,
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
        let (mut slots, mut data) = (Vec::new(), Vec::new());
        for _ in 0..iodepth {
            let s = [fe.alloc(16), fe.alloc(BS), fe.alloc(1)];
            // Data that is not zeros (zero blocks travel as flags, not data).
            let d: Vec<u8> = (0..BS / 8)
                .flat_map(|_| xorshift(&mut rng).to_le_bytes())
                .collect();
            fe.write(s[1], &d);
            slots.push(s);
            data.push(d);
        }
        Ok(Self {
            fe,
            free: (0..slots.len()).rev().collect(),
            slots,
            data,
            pending: HashMap::new(),
            rng,
            blocks: sectors * 512 / BS,
            written: HashMap::new(),
            errors: 0,
        })
    }

    /// Up to `n` 4 KiB writes at random blocks from the free slots, kicked; returns how
    /// many.
    fn submit(&mut self, n: u64) -> u64 {
        let mut done = 0;
        while done < n {
            let Some(slot) = self.free.pop() else { break };
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
            self.pending.insert(head, (slot, off));
            self.written.entry(off).or_default().unacked.push(slot);
            done += 1;
        }
        if done > 0 {
            self.fe.queues[0].notify();
        }
        done
    }

    /// Takes the completions there are, checks their status and frees their slots;
    /// returns how many.
    fn reap(&mut self) -> u64 {
        let _ = self.fe.queues[0].call.read();
        let mut n = 0;
        for u in self.fe.queues[0].take_used(&self.fe.mem) {
            let Some((slot, off)) = self.pending.remove(&(u.id as u16)) else {
                continue;
            };
            let ok = self.fe.read(self.slots[slot][2], 1)[0] == 0;
            if !ok {
                self.errors += 1;
            }
            if let Some(log) = self.written.get_mut(&off) {
                if let Some(i) = log.unacked.iter().position(|&s| s == slot) {
                    log.unacked.remove(i);
                }
                if ok {
                    log.acked = Some(slot);
                }
            }
            self.free.push(slot);
            n += 1;
        }
        n
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

/// What the job's driver thread reports.
enum Report {
    /// The job is ready.
    Ready,
    /// The job is over (or `migrate` was refused: the inner Err).
    Done(Result<Result<JobRun, String>, CompareError>),
}

/// Migrates the image from a source under `load` to a fresh destination in `copy_mode`
/// ("background", "write-blocking"). Ok(Err(why)) when the source refuses the mode.
pub(super) fn run(
    ctx: &Ctx,
    copy_mode: &str,
    load: Load,
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
    let mut s = Session::connect(&src.vhost, load.iodepth, seed).map_err(|e| src.failed(e))?;
    let mut d =
        Session::connect(&dst.vhost, load.iodepth, seed ^ 0x5555).map_err(|e| dst.failed(e))?;
    let mut qmp = src.control()?;
    let args = json!({"uri": uri, "copy-mode": copy_mode});
    let timeout = ctx.job_timeout;
    let (tx, rx) = mpsc::channel();
    let t_load = Instant::now();
    // The destination's requests wait there from the start; the source's run.
    let mut submitted = d.submit(u64::MAX) + s.submit(u64::MAX);
    std::thread::spawn(move || {
        let ready = tx.clone();
        let r = run_job(&mut qmp, args, load.hold, timeout, |_| {
            let _ = ready.send(Report::Ready);
            Ok(())
        });
        let _ = tx.send(Report::Done(r));
    });

    let fds = [
        s.fe.queues[0].call.as_raw_fd(),
        d.fe.queues[0].call.as_raw_fd(),
    ];
    let deadline = t_load + ctx.job_timeout + Duration::from_secs(30);
    // From ready on: every instant completions were taken, with how many on the source.
    let mut times: Vec<(Instant, u64)> = Vec::new();
    let mut ready = false;
    let mut first_dst = None::<Instant>;
    let mut done: Option<JobRun> = None;
    let (job, first_dst) = loop {
        let wait = match load.iops {
            0 => Duration::from_millis(5),
            // The next write is due then.
            iops => (t_load + Duration::from_secs_f64((submitted + 1) as f64 / iops as f64))
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(5)),
        };
        wait_readable(&fds, wait);
        let now = Instant::now();
        let (ns, nd) = (s.reap(), d.reap());
        if nd > 0 {
            first_dst.get_or_insert(now);
        }
        if ready && ns + nd > 0 {
            times.push((now, ns));
        }
        let budget = match load.iops {
            0 => u64::MAX,
            iops => (((now - t_load).as_secs_f64() * iops as f64) as u64).saturating_sub(submitted),
        };
        let sent = s.submit(budget);
        submitted += sent + d.submit(budget.saturating_sub(sent));
        loop {
            match rx.try_recv() {
                Ok(Report::Ready) => ready = true,
                Ok(Report::Done(r)) => match r? {
                    Ok(j) => done = Some(j),
                    Err(why) => return Ok(Err(why)),
                },
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) if done.is_some() => break,
                Err(mpsc::TryRecvError::Disconnected) => {
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
        wait_readable(&fds[1..], Duration::from_millis(5));
        d.reap();
    }
    let (stall, src_iops) = measure(&times, job.completing, first_dst);
    let stall = Stall {
        stall_ms: stall.as_secs_f64() * 1e3,
        errors: s.errors + d.errors,
        src_iops,
        downtime_ms: job.end["downtime-ms"].as_f64().unwrap_or(0.0),
        passes: job.end["passes"].as_u64().unwrap_or(0),
    };
    let dst_wrote: HashSet<u64> = d.written.keys().copied().collect();
    let (src_log, src_data) = (std::mem::take(&mut s.written), std::mem::take(&mut s.data));
    drop(s);
    drop(d);
    check_destination(ctx.image, &dst_image, &dst_wrote, &src_log, &src_data).map_err(|e| {
        CompareError::Run(format!(
            "switch-over ({copy_mode}), after the hand-over: {e}"
        ))
    })?;
    src.stop()?;
    dst.stop()?;
    Ok(Ok(stall))
}

/// Waits up to `timeout` (microseconds count) for one of `fds` to be readable.
fn wait_readable(fds: &[i32], timeout: Duration) {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: pfds is a valid array of pollfd, ts a valid timespec, no signal mask.
    unsafe {
        libc::ppoll(
            pfds.as_mut_ptr(),
            pfds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
}

/// From the instants completions were taken from ready on (with the source's count at
/// each): the longest gap between two of them from the last one before `completing` to
/// `first_dst`, and the source's completions per second before `completing`.
fn measure(times: &[(Instant, u64)], completing: Instant, first_dst: Instant) -> (Duration, f64) {
    let before: Vec<&(Instant, u64)> = times.iter().filter(|(t, _)| *t < completing).collect();
    let src_iops = match (before.first(), before.last()) {
        (Some(a), Some(b)) if b.0 > a.0 => {
            before[1..].iter().map(|(_, n)| *n).sum::<u64>() as f64 / (b.0 - a.0).as_secs_f64()
        }
        _ => 0.0,
    };
    let from = before.last().map_or(completing, |(t, _)| *t);
    let mut last = from;
    let mut longest = Duration::ZERO;
    for (t, _) in times.iter().filter(|(t, _)| *t > from && *t <= first_dst) {
        longest = longest.max(t.duration_since(last));
        last = *t;
    }
    (longest, src_iops)
}

/// Checks the destination against the source image block by block. A block the
/// destination's own session wrote is skipped. Elsewhere a difference is allowed only
/// where the source's session had writes that never completed (the source holds them at
/// the hand-over; one that reached its image before was not acknowledged, so the guest
/// cannot count on it either way): the destination must then hold the last completed
/// write there, or one of those. Anything else is a completed write the migration lost.
fn check_destination(
    src: &Path,
    dst: &Path,
    skip: &HashSet<u64>,
    log: &HashMap<u64, BlockLog>,
    data: &[Vec<u8>],
) -> Result<(), CompareError> {
    let (fa, fb) = (std::fs::File::open(src)?, std::fs::File::open(dst)?);
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
                if x == y || skip.contains(&at) {
                    continue;
                }
                let Some(l) = log.get(&at) else {
                    return Err(CompareError::Run(format!(
                        "the destination differs from the source in the block at {at}, \
                         which no session wrote"
                    )));
                };
                let holds = |slot: usize| data.get(slot).is_some_and(|d| d[..] == *y);
                let allowed = !l.unacked.is_empty()
                    && (l.acked.is_some_and(holds) || l.unacked.iter().any(|&s| holds(s)));
                if !allowed {
                    return Err(CompareError::Run(format!(
                        "the destination lost a completed write: the block at {at} holds \
                         neither the source's last completed write there ({}) nor one of \
                         the {} it never completed",
                        match l.acked {
                            Some(s) => format!("slot {s}"),
                            None => "none".into(),
                        },
                        l.unacked.len()
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
    fn the_destination_may_lack_only_writes_never_completed() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let data = vec![vec![1u8; 4096], vec![2u8; 4096]];
        let img =
            |blocks: &[u8]| -> Vec<u8> { blocks.iter().flat_map(|&v| vec![v; 4096]).collect() };
        let log = |acked: Option<usize>, unacked: Vec<usize>| BlockLog { acked, unacked };
        // Block 1: slot 0 completed, then slot 1 reached the source and never completed:
        // the destination may hold either. Block 2: the destination's own write.
        std::fs::write(&a, img(&[0, 2, 0])).unwrap();
        let logs = HashMap::from([(4096, log(Some(0), vec![1]))]);
        let skip = HashSet::from([8192]);
        for dst in [[0, 1, 9], [0, 2, 9]] {
            std::fs::write(&b, img(&dst)).unwrap();
            check_destination(&a, &b, &skip, &logs, &data).unwrap();
        }
        // Older data than the completed write: lost.
        std::fs::write(&b, img(&[0, 0, 9])).unwrap();
        let e = check_destination(&a, &b, &skip, &logs, &data)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lost a completed write") && e.contains("at 4096"),
            "{e}"
        );
        // Everything completed: it must be there.
        let logs = HashMap::from([(4096, log(Some(1), vec![]))]);
        std::fs::write(&b, img(&[0, 1, 9])).unwrap();
        assert!(check_destination(&a, &b, &skip, &logs, &data).is_err());
        // A block nobody wrote must be equal.
        std::fs::write(&b, img(&[5, 2, 9])).unwrap();
        let e = check_destination(&a, &b, &skip, &logs, &data)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no session wrote"), "{e}");
    }

    #[test]
    fn the_stall_is_the_longest_gap_across_the_hand_over() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Source completions every 10 ms (2 each) until 100 (those in flight when the
        // hand-over began), `migrate-complete` at 95; background: nothing until the
        // destination's first at 130.
        let mut times: Vec<(Instant, u64)> = (0..=10).map(|i| (at(i * 10), 2)).collect();
        times.push((at(130), 0));
        times.push((at(135), 0));
        let (stall, iops) = measure(&times, at(95), at(130));
        assert_eq!(stall, Duration::from_millis(30));
        // 9 intervals of 10 ms before 95 (0..=90), 2 completions after each.
        assert!((iops - 200.0).abs() < 1e-6, "{iops}");
        // Write-blocking: the source's held writes complete at 104, after the hand-over
        // started; the destination's first at 101. The longest gap before it is 90 → 101.
        let mut times: Vec<(Instant, u64)> = (0..=9).map(|i| (at(i * 10), 2)).collect();
        times.push((at(101), 0));
        times.push((at(104), 3));
        let (stall, _) = measure(&times, at(95), at(101));
        assert_eq!(stall, Duration::from_millis(11));
    }
}
