//! `bench load blk`: fio-like load through a vhost-user-blk socket.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use vhost_tests::frontend::{Buf, FrontendOptions, HarnessError, TestFrontend};

/// Access pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Rw {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Random mix, half reads and half writes.
    Randrw,
}

/// Options of `bench load blk`.
#[derive(Args, Debug)]
pub struct BlkLoadArgs {
    /// The backend's vhost-user socket.
    #[arg(long)]
    pub socket: PathBuf,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    pub rw: Rw,
    /// Block size, e.g. 4k, 128k.
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    pub bs: u64,
    /// Requests kept in flight.
    #[arg(long, default_value_t = 32)]
    pub iodepth: u16,
    /// How long to run, e.g. 10s, 500ms.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub runtime: Duration,
    /// Bytes of the disk to spread I/O over (default: the whole disk).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Ring size to negotiate.
    #[arg(long, default_value_t = 256)]
    pub queue_size: u16,
    /// Request queues to drive, each with --iodepth requests in flight.
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// Check data: every write carries a stamp (block offset, generation); a read of a
    /// block written earlier in the run must return its latest stamp, and at the end every
    /// block written is read back and checked. Never two requests on one block at once.
    /// Costs load-generator CPU, so measure without it.
    #[arg(long)]
    pub verify: bool,
    /// PID of the backend process: report its CPU time (user+system, all threads) per I/O.
    #[arg(long)]
    pub pid: Option<u32>,
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim().to_ascii_lowercase();
    let (num, mult) = match s.chars().last() {
        Some('k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m') => (&s[..s.len() - 1], 1 << 20),
        Some('g') => (&s[..s.len() - 1], 1 << 30),
        _ => (&s[..], 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|e| format!("bad size {s:?}: {e}"))
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Some(ms) = s.strip_suffix("ms") {
        return ms
            .parse()
            .map(Duration::from_millis)
            .map_err(|e| format!("{e}"));
    }
    let secs = s.strip_suffix('s').unwrap_or(s);
    secs.parse::<f64>()
        .map(Duration::from_secs_f64)
        .map_err(|e| format!("bad duration {s:?}: {e}"))
}

/// Errors of the load generator.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Talking to the backend failed.
    #[error("{0}")]
    Harness(#[from] HarnessError),
    /// The backend answered a request with an error status.
    #[error("request at offset {offset} failed with status {status}")]
    Status {
        /// Disk offset.
        offset: u64,
        /// Status byte.
        status: u8,
    },
    /// Bad option combination.
    #[error("{0}")]
    Usage(String),
    /// --verify found data that is not what was last written.
    #[error("verify: block at offset {offset} holds {found}, expected generation {expected}")]
    Verify {
        /// Disk offset of the block.
        offset: u64,
        /// The generation last written there.
        expected: u64,
        /// What was found instead.
        found: String,
    },
}

/// What a run measured.
pub struct Report {
    /// Completed requests.
    pub ios: u64,
    /// Bytes transferred.
    pub bytes: u64,
    /// Measured time.
    pub elapsed: Duration,
    /// Sorted latencies in microseconds.
    pub lat_us: Vec<u64>,
    /// The options, for the report line.
    pub args: String,
    /// Backend CPU microseconds per I/O, when its PID was given.
    pub cpu_us_per_io: Option<f64>,
    /// Blocks checked by --verify (on the fly and in the final read-back).
    pub verified: u64,
}

impl Report {
    /// Requests per second.
    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.elapsed.as_secs_f64()
    }

    /// Latency percentile `p` (0..1) in microseconds.
    pub fn pct(&self, p: f64) -> u64 {
        if self.lat_us.is_empty() {
            0
        } else {
            self.lat_us[((self.lat_us.len() - 1) as f64 * p) as usize]
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        let pct = |p: f64| self.pct(p);
        write!(
            f,
            "{}: {:.0} IOPS, {:.1} MB/s, latency p50 {} us, p99 {} us, p99.9 {} us ({} I/Os in {:.2} s)",
            self.args,
            self.ios as f64 / secs,
            self.bytes as f64 / secs / 1e6,
            pct(0.5),
            pct(0.99),
            pct(0.999),
            self.ios,
            secs
        )?;
        if let Some(c) = self.cpu_us_per_io {
            write!(f, ", backend CPU {c:.1} us per I/O")?;
        }
        if self.verified > 0 {
            write!(f, ", {} blocks verified", self.verified)?;
        }
        Ok(())
    }
}

/// The guest memory of one request slot.
struct Slot {
    hdr: u64,
    data: u64,
    status: u64,
}

/// A request on the ring: its slot, start time, offset and direction.
#[derive(Clone, Copy)]
struct Pending {
    slot: usize,
    t0: Instant,
    offset: u64,
    write: bool,
}

/// xorshift64: cheap, repeatable offsets and read/write choices.
fn next_rand(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// The --verify content of a block: every 8-byte word depends on the block's offset, the
/// generation and the word's index, so a block from the wrong place, an older write or a
/// torn transfer is told apart.
fn stamp_word(offset: u64, generation: u64, i: usize) -> u64 {
    offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (generation << 24) ^ i as u64
}

fn stamp(offset: u64, generation: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    for i in 0..len / 8 {
        v.extend_from_slice(&stamp_word(offset, generation, i).to_le_bytes());
    }
    v
}

fn check_stamp(offset: u64, generation: u64, data: &[u8]) -> Result<(), LoadError> {
    for (i, w) in data.chunks_exact(8).enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        let got = u64::from_le_bytes(b);
        if got != stamp_word(offset, generation, i) {
            return Err(LoadError::Verify {
                offset,
                expected: generation,
                found: format!("word {i} = {got:#018x}"),
            });
        }
    }
    Ok(())
}

/// Runs the load and reports.
pub fn run(a: &BlkLoadArgs) -> Result<Report, LoadError> {
    if a.bs == 0 || !a.bs.is_multiple_of(512) {
        return Err(LoadError::Usage("--bs must be a multiple of 512".into()));
    }
    let depth = usize::from(a.iodepth.max(1));
    if depth * 3 > usize::from(a.queue_size) {
        return Err(LoadError::Usage(format!(
            "--iodepth {} needs a ring of at least {} entries (--queue-size)",
            a.iodepth,
            depth * 3
        )));
    }
    let nq = usize::from(a.queues.max(1));
    let mem_size = (4 << 20) + (nq as u64 * depth as u64 * (a.bs + 8192)).next_multiple_of(1 << 20);
    let mut fe = TestFrontend::connect(
        &a.socket,
        FrontendOptions {
            mem_size,
            queue_size: a.queue_size,
            num_queues: nq as u16,
            ..Default::default()
        },
    )?;
    let cap_bytes = u64::from_le_bytes(
        fe.config(0, 8)?
            .try_into()
            .map_err(|_| LoadError::Usage("short config".into()))?,
    ) * 512;
    let span = a.size.unwrap_or(cap_bytes).min(cap_bytes);
    let blocks = span / a.bs;
    if blocks == 0 {
        return Err(LoadError::Usage("disk smaller than one block".into()));
    }
    if a.verify && blocks <= (depth * nq) as u64 {
        return Err(LoadError::Usage(
            "--verify needs more blocks than requests in flight".into(),
        ));
    }
    let random = matches!(a.rw, Rw::Randread | Rw::Randwrite | Rw::Randrw);
    let slots: Vec<Slot> = (0..depth * nq)
        .map(|_| Slot {
            hdr: fe.alloc(16),
            data: fe.alloc(a.bs),
            status: fe.alloc(1),
        })
        .collect();
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next_seq = 0u64;
    // --verify state: the generation last written to each block, and the blocks with a
    // request in flight (never two at once on one block: their order would be undefined).
    let mut written: HashMap<u64, u64> = HashMap::new();
    let mut busy: HashSet<u64> = HashSet::new();
    let mut generation = 0u64;
    let mut verified = 0u64;
    // The next generation for a --verify write, recorded as the block's latest.
    let verify = a.verify;
    let stamp_for =
        |offset: u64, write: bool, generation: &mut u64, written: &mut HashMap<u64, u64>| {
            (verify && write).then(|| {
                *generation += 1;
                written.insert(offset, *generation);
                *generation
            })
        };
    let mut next_request = |rng: &mut u64, busy: &HashSet<u64>| -> (u64, bool) {
        loop {
            let offset = if random {
                (next_rand(rng) % blocks) * a.bs
            } else {
                let o = (next_seq % blocks) * a.bs;
                next_seq += 1;
                o
            };
            if a.verify && busy.contains(&offset) {
                continue;
            }
            let write = match a.rw {
                Rw::Write | Rw::Randwrite => true,
                Rw::Read | Rw::Randread => false,
                Rw::Randrw => next_rand(rng) & 1 == 1,
            };
            return (offset, write);
        }
    };
    // `stamp_gen`: the --verify generation a write carries.
    let submit = |fe: &mut TestFrontend,
                  slot: usize,
                  offset: u64,
                  write: bool,
                  stamp_gen: Option<u64>|
     -> u16 {
        let s = &slots[slot];
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&u32::from(write).to_le_bytes());
        h[8..16].copy_from_slice(&(offset / 512).to_le_bytes());
        fe.write(s.hdr, &h);
        fe.write(s.status, &[0xff]);
        if let Some(g) = stamp_gen {
            fe.write(s.data, &stamp(offset, g, a.bs as usize));
        }
        let chain = [
            Buf::ro(s.hdr, 16),
            Buf {
                addr: s.data,
                len: a.bs as u32,
                write: !write,
            },
            Buf::wo(s.status, 1),
        ];
        let dq = &mut fe.queues[slot / depth];
        let head = dq.add_chain(&fe.mem, &chain);
        dq.publish(&fe.mem, head);
        head
    };
    let cpu0 = a.pid.map(crate::compare::cpu_seconds);
    // Slot s belongs to queue s / depth.
    let mut in_flight: Vec<HashMap<u16, Pending>> = vec![HashMap::new(); nq];
    // Picks the next request for `slot`, marks its block busy (--verify), stamps and
    // submits it; returns its head and what to remember of it.
    let mut issue = |fe: &mut TestFrontend,
                     busy: &mut HashSet<u64>,
                     written: &mut HashMap<u64, u64>,
                     slot: usize|
     -> (u16, Pending) {
        let (offset, write) = next_request(&mut rng, busy);
        if a.verify {
            busy.insert(offset);
        }
        let g = stamp_for(offset, write, &mut generation, written);
        let head = submit(fe, slot, offset, write, g);
        let p = Pending {
            slot,
            t0: Instant::now(),
            offset,
            write,
        };
        (head, p)
    };
    for slot in 0..depth * nq {
        let (head, p) = issue(&mut fe, &mut busy, &mut written, slot);
        in_flight[slot / depth].insert(head, p);
    }
    for q in &fe.queues {
        q.notify();
    }
    let start = Instant::now();
    let mut lat_us = Vec::with_capacity(1 << 20);
    let mut ios = 0u64;
    let mut pfds: Vec<libc::pollfd> = fe
        .queues
        .iter()
        .map(|q| libc::pollfd {
            fd: q.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while start.elapsed() < a.runtime {
        // SAFETY: pfds is a valid array of pollfd.
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 100) };
        for (q, pending) in in_flight.iter_mut().enumerate() {
            let _ = fe.queues[q].call.read();
            let done = fe.queues[q].take_used(&fe.mem);
            if done.is_empty() {
                continue;
            }
            let now = Instant::now();
            // Collect every finished slot before resubmitting: a resubmission may reuse
            // the head index of a completion not yet looked at.
            let mut free_slots = Vec::with_capacity(done.len());
            for u in &done {
                let Some(p) = pending.remove(&(u.id as u16)) else {
                    continue;
                };
                let st = fe.read(slots[p.slot].status, 1)[0];
                if st != 0 {
                    return Err(LoadError::Status {
                        offset: p.offset,
                        status: st,
                    });
                }
                if a.verify {
                    if !p.write {
                        if let Some(&g) = written.get(&p.offset) {
                            check_stamp(p.offset, g, &fe.read(slots[p.slot].data, a.bs as usize))?;
                            verified += 1;
                        }
                    }
                    busy.remove(&p.offset);
                }
                lat_us.push(now.duration_since(p.t0).as_micros() as u64);
                ios += 1;
                free_slots.push(p.slot);
            }
            for slot in free_slots {
                let (head, p) = issue(&mut fe, &mut busy, &mut written, slot);
                pending.insert(head, p);
            }
            fe.queues[q].notify();
        }
    }
    let elapsed = start.elapsed();
    let cpu_us_per_io = match (a.pid, cpu0) {
        (Some(pid), Some(c0)) if ios > 0 => {
            Some((crate::compare::cpu_seconds(pid) - c0) * 1e6 / ios as f64)
        }
        _ => None,
    };
    // Let the tail complete so the backend is left idle.
    for (q, pending) in in_flight.iter().enumerate() {
        let _ = fe.queues[q].wait_used(&fe.mem, pending.len(), Duration::from_secs(5));
    }
    if a.verify {
        verified += read_back(&mut fe, &slots, &written, a.bs)?;
    }
    lat_us.sort_unstable();
    Ok(Report {
        ios,
        bytes: ios * a.bs,
        elapsed,
        lat_us,
        args: format!("{:?} bs={} iodepth={} queues={}", a.rw, a.bs, a.iodepth, nq).to_lowercase(),
        cpu_us_per_io,
        verified,
    })
}

/// Reads every block in `written` back through queue 0, one slot at a time per request
/// kept in flight, and checks its latest stamp. Returns the number of blocks checked.
fn read_back(
    fe: &mut TestFrontend,
    slots: &[Slot],
    written: &HashMap<u64, u64>,
    bs: u64,
) -> Result<u64, LoadError> {
    let mut todo: Vec<(u64, u64)> = written.iter().map(|(&o, &g)| (o, g)).collect();
    todo.sort_unstable();
    let depth = slots.len().min(fe.queues[0].size as usize / 3).max(1);
    let mut checked = 0u64;
    for batch in todo.chunks(depth) {
        let mut heads = HashMap::new();
        for (i, &(offset, generation)) in batch.iter().enumerate() {
            let s = &slots[i];
            let mut h = [0u8; 16];
            h[8..16].copy_from_slice(&(offset / 512).to_le_bytes());
            fe.write(s.hdr, &h);
            fe.write(s.status, &[0xff]);
            let chain = [
                Buf::ro(s.hdr, 16),
                Buf::wo(s.data, bs as u32),
                Buf::wo(s.status, 1),
            ];
            let head = fe.submit(0, &chain);
            heads.insert(head, (i, offset, generation));
        }
        fe.queues[0].notify();
        for u in fe.wait(0, batch.len())? {
            let Some(&(i, offset, generation)) = heads.get(&(u.id as u16)) else {
                continue;
            };
            let st = fe.read(slots[i].status, 1)[0];
            if st != 0 {
                return Err(LoadError::Status { offset, status: st });
            }
            check_stamp(offset, generation, &fe.read(slots[i].data, bs as usize))?;
            checked += 1;
        }
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_tell_blocks_and_generations_apart() {
        let s = stamp(8192, 3, 4096);
        assert!(check_stamp(8192, 3, &s).is_ok());
        assert!(check_stamp(8192, 2, &s).is_err());
        assert!(check_stamp(4096, 3, &s).is_err());
        let mut torn = s.clone();
        torn[2048..].copy_from_slice(&stamp(8192, 2, 4096)[2048..]);
        assert!(check_stamp(8192, 3, &torn).is_err());
    }
}
