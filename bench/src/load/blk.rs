//! `bench load blk`: fio-like load through a vhost-user-blk socket.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
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
    /// Where on the disk the I/O starts (bytes, a multiple of --bs); --size counts from
    /// here. Lets runs share a disk without touching each other's blocks.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub offset: u64,
    /// Carry --verify across runs and backend restarts: the blocks written and their
    /// stamps are loaded from FILE at start and every one is read back and checked before
    /// the load begins (the file is removed meanwhile, so a run that dies leaves none
    /// behind); at the end they are written back, also when the backend went away, then
    /// without the blocks whose write was still in flight (their content is undefined).
    /// Not written back after a verify error.
    #[arg(long, value_name = "FILE", requires = "verify")]
    pub verify_state: Option<PathBuf>,
    /// Drive packed virtqueues (VIRTIO_F_RING_PACKED, virtio 1.1) instead of split ones:
    /// each request's descriptors go into the one descriptor ring and come back as one
    /// used descriptor. The backend must offer the feature (ours does;
    /// qemu-storage-daemon's libvhost-user export does not).
    #[arg(long)]
    pub packed: bool,
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
    /// The backend closed the vhost-user connection (it exited or was killed).
    #[error("the backend closed the connection")]
    Disconnected,
    /// The --verify-state file could not be read or written.
    #[error("verify state {path}: {why}")]
    State {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
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
    /// Blocks loaded from --verify-state and checked before the load began.
    pub carried: Option<u64>,
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
            write!(f, ", backend CPU {c:.2} us per I/O")?;
        }
        if self.verified > 0 {
            write!(f, ", {} blocks verified", self.verified)?;
        }
        if let Some(c) = self.carried {
            write!(
                f,
                ", {c} blocks carried over from earlier runs checked first"
            )?;
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

/// What --verify knows: the generation last written to each block (by byte offset) and
/// the last generation handed out.
#[derive(Debug, Default, PartialEq, Eq)]
struct VerifyState {
    written: HashMap<u64, u64>,
    generation: u64,
}

/// First line of a --verify-state file.
const STATE_MAGIC: &str = "bench-blk-verify-state v1";

impl VerifyState {
    /// The file's text: the magic line, `bs N`, `generation N`, then `OFFSET GENERATION`
    /// per block, sorted.
    fn to_text(&self, bs: u64) -> String {
        let mut blocks: Vec<(u64, u64)> = self.written.iter().map(|(&o, &g)| (o, g)).collect();
        blocks.sort_unstable();
        let mut s = format!("{STATE_MAGIC}\nbs {bs}\ngeneration {}\n", self.generation);
        for (o, g) in blocks {
            s.push_str(&format!("{o} {g}\n"));
        }
        s
    }

    fn parse(text: &str, bs: u64) -> Result<Self, String> {
        let mut lines = text.lines();
        if lines.next() != Some(STATE_MAGIC) {
            return Err(format!("does not start with {STATE_MAGIC:?}"));
        }
        let mut field = |name: &str| -> Result<u64, String> {
            lines
                .next()
                .and_then(|l| l.strip_prefix(name))
                .and_then(|v| v.strip_prefix(' '))
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("no {name:?} line"))
        };
        let file_bs = field("bs")?;
        if file_bs != bs {
            return Err(format!("written with --bs {file_bs}, this run has {bs}"));
        }
        let generation = field("generation")?;
        let mut written = HashMap::new();
        for (n, l) in lines.enumerate() {
            let bad = || format!("line {}: {l:?} is not OFFSET GENERATION", n + 4);
            let (o, g) = l.split_once(' ').ok_or_else(bad)?;
            let (o, g): (u64, u64) = (o.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?);
            if !o.is_multiple_of(bs) || g == 0 || g > generation {
                return Err(bad());
            }
            written.insert(o, g);
        }
        Ok(Self {
            written,
            generation,
        })
    }

    /// Loads and removes `path` (none: an empty state).
    fn take(path: &Path, bs: u64) -> Result<Self, LoadError> {
        let err = |why: String| LoadError::State {
            path: path.to_path_buf(),
            why,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(err(e.to_string())),
        };
        let st = Self::parse(&text, bs).map_err(err)?;
        std::fs::remove_file(path).map_err(|e| err(format!("cannot remove: {e}")))?;
        Ok(st)
    }

    /// Writes the state to `path` (atomically), leaving out the blocks in `undefined`.
    fn save(&self, path: &Path, bs: u64, undefined: &HashSet<u64>) -> Result<(), LoadError> {
        let mut kept = Self {
            written: self.written.clone(),
            generation: self.generation,
        };
        kept.written.retain(|o, _| !undefined.contains(o));
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, kept.to_text(bs))
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| LoadError::State {
                path: path.to_path_buf(),
                why: e.to_string(),
            })
    }
}

/// Runs the load and reports.
pub fn run(a: &BlkLoadArgs) -> Result<Report, LoadError> {
    if a.bs == 0 || !a.bs.is_multiple_of(512) {
        return Err(LoadError::Usage("--bs must be a multiple of 512".into()));
    }
    if !a.offset.is_multiple_of(a.bs) {
        return Err(LoadError::Usage(
            "--offset must be a multiple of --bs".into(),
        ));
    }
    let depth = usize::from(a.iodepth.max(1));
    if depth * 3 > usize::from(a.queue_size) {
        return Err(LoadError::Usage(format!(
            "--iodepth {} needs a ring of at least {} entries (--queue-size)",
            a.iodepth,
            depth * 3
        )));
    }
    let mut st = match &a.verify_state {
        Some(p) => VerifyState::take(p, a.bs)?,
        None => VerifyState::default(),
    };
    // Blocks with a request in flight (--verify): after a failure, their content is
    // undefined.
    let mut busy = HashSet::new();
    let res = drive(a, &mut st, &mut busy);
    if let Some(p) = &a.verify_state {
        // After a verify error the state is not carried on: that error is reported once.
        if !matches!(res, Err(LoadError::Verify { .. })) {
            if let Err(e) = st.save(p, a.bs, &busy) {
                match res {
                    Ok(_) => return Err(e),
                    Err(_) => eprintln!("bench: {e}"),
                }
            }
        }
    }
    res
}

fn drive(
    a: &BlkLoadArgs,
    st: &mut VerifyState,
    busy: &mut HashSet<u64>,
) -> Result<Report, LoadError> {
    let depth = usize::from(a.iodepth.max(1));
    let nq = usize::from(a.queues.max(1));
    let mem_size = (4 << 20) + (nq as u64 * depth as u64 * (a.bs + 8192)).next_multiple_of(1 << 20);
    let mut fe = TestFrontend::connect(
        &a.socket,
        FrontendOptions {
            mem_size,
            queue_size: a.queue_size,
            num_queues: nq as u16,
            packed: a.packed,
            ..Default::default()
        },
    )?;
    let cap_bytes = u64::from_le_bytes(
        fe.config(0, 8)?
            .try_into()
            .map_err(|_| LoadError::Usage("short config".into()))?,
    ) * 512;
    if a.offset >= cap_bytes {
        return Err(LoadError::Usage(format!(
            "--offset {} is beyond the disk ({cap_bytes} bytes)",
            a.offset
        )));
    }
    let room = cap_bytes - a.offset;
    let span = a.size.unwrap_or(room).min(room);
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
    // Blocks an earlier run wrote (--verify-state) must hold what it last wrote there.
    let carried = match &a.verify_state {
        Some(_) => Some(read_back(&mut fe, &slots, &st.written, a.bs)?),
        None => None,
    };
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15 ^ st.generation;
    let mut next_seq = 0u64;
    let mut verified = 0u64;
    // The next generation for a --verify write, recorded as the block's latest.
    let verify = a.verify;
    let stamp_for = |offset: u64, write: bool, st: &mut VerifyState| {
        (verify && write).then(|| {
            st.generation += 1;
            st.written.insert(offset, st.generation);
            st.generation
        })
    };
    let mut next_request = |rng: &mut u64, busy: &HashSet<u64>| -> (u64, bool) {
        loop {
            let offset = if random {
                a.offset + (next_rand(rng) % blocks) * a.bs
            } else {
                let o = a.offset + (next_seq % blocks) * a.bs;
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
    let cpu0 = a.pid.map(crate::load::cpu_seconds);
    // Slot s belongs to queue s / depth.
    let mut in_flight: Vec<HashMap<u16, Pending>> = vec![HashMap::new(); nq];
    // Picks the next request for `slot`, marks its block busy (--verify), stamps and
    // submits it; returns its head and what to remember of it.
    let mut issue = |fe: &mut TestFrontend,
                     busy: &mut HashSet<u64>,
                     st: &mut VerifyState,
                     slot: usize|
     -> (u16, Pending) {
        let (offset, write) = next_request(&mut rng, busy);
        if a.verify {
            busy.insert(offset);
        }
        let g = stamp_for(offset, write, st);
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
        let (head, p) = issue(&mut fe, busy, st, slot);
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
    // The vhost-user connection: the backend never writes to it unasked, so any event on
    // it means it went away (exited, killed).
    pfds.push(libc::pollfd {
        fd: fe.fe.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    });
    while start.elapsed() < a.runtime {
        // SAFETY: pfds is a valid array of pollfd.
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 100) };
        if pfds[nq].revents != 0 {
            return Err(LoadError::Disconnected);
        }
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
                let st_byte = fe.read(slots[p.slot].status, 1)[0];
                if st_byte != 0 {
                    return Err(LoadError::Status {
                        offset: p.offset,
                        status: st_byte,
                    });
                }
                if a.verify {
                    if !p.write {
                        if let Some(&g) = st.written.get(&p.offset) {
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
                let (head, p) = issue(&mut fe, busy, st, slot);
                pending.insert(head, p);
            }
            fe.queues[q].notify();
        }
    }
    let elapsed = start.elapsed();
    let cpu_us_per_io = match (a.pid, cpu0) {
        (Some(pid), Some(c0)) if ios > 0 => {
            Some((crate::load::cpu_seconds(pid) - c0) * 1e6 / ios as f64)
        }
        _ => None,
    };
    // Let the tail complete so the backend is left idle.
    for (q, pending) in in_flight.iter().enumerate() {
        let _ = fe.queues[q].wait_used(&fe.mem, pending.len(), Duration::from_secs(5));
    }
    if a.verify {
        verified += read_back(&mut fe, &slots, &st.written, a.bs)?;
        // Every block read back as last written: none is undefined any more.
        busy.clear();
    }
    lat_us.sort_unstable();
    Ok(Report {
        ios,
        bytes: ios * a.bs,
        elapsed,
        lat_us,
        args: format!(
            "{:?} bs={} iodepth={} queues={}{}",
            a.rw,
            a.bs,
            a.iodepth,
            nq,
            if a.packed { " packed" } else { "" }
        )
        .to_lowercase(),
        cpu_us_per_io,
        verified,
        carried,
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

    #[test]
    fn verify_state_round_trips_and_rejects_garbage() {
        let st = VerifyState {
            written: HashMap::from([(8192, 3), (0, 1), (4096, 7)]),
            generation: 7,
        };
        let text = st.to_text(4096);
        assert!(text.starts_with(STATE_MAGIC));
        assert_eq!(VerifyState::parse(&text, 4096), Ok(st));
        assert!(VerifyState::parse(&text, 512).is_err(), "other block size");
        assert!(VerifyState::parse("hello\n", 4096).is_err());
        let bad = |line: &str| {
            VerifyState::parse(
                &format!("{STATE_MAGIC}\nbs 4096\ngeneration 7\n{line}\n"),
                4096,
            )
        };
        assert!(bad("4096 3").is_ok());
        for line in ["4096", "4096 x", "100 3", "4096 0", "4096 8"] {
            assert!(bad(line).is_err(), "{line:?} accepted");
        }
    }

    /// Our backend in-process on an image in a temporary directory.
    fn start_backend(dir: &Path, image: &Path) -> vhost_tests::in_process::InProcessServer {
        use vhost_blk_backend::{BlkDevice, BlkOptions, CacheMode, Disk};
        let disk = Disk::open(image, false, CacheMode::None, 512).expect("open image");
        let device = BlkDevice::new(
            disk,
            &BlkOptions {
                num_queues: 1,
                queue_size: 256,
                block_size: 512,
                serial: "bench-test".into(),
                poll_us: 0,
                dirty: None,
                pin_guest_memory: false,
            },
        );
        vhost_tests::in_process::InProcessServer::start(device, &dir.join("blk.sock"))
    }

    /// --verify-state carries what was written across backend restarts: the next run
    /// checks it first, a block changed behind its back is caught (and the state is not
    /// carried on), and a run that cannot reach the backend keeps the state.
    #[test]
    fn verify_state_carries_across_backend_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(8 << 20))
            .expect("image");
        let state = dir.path().join("state");
        let args = |socket: &Path, rw: Rw| BlkLoadArgs {
            socket: socket.to_path_buf(),
            rw,
            bs: 4096,
            iodepth: 8,
            runtime: Duration::from_millis(300),
            size: Some(2 << 20),
            queue_size: 256,
            queues: 1,
            verify: true,
            pid: None,
            offset: 1 << 20,
            verify_state: Some(state.clone()),
            packed: false,
        };
        let written = {
            let b = start_backend(dir.path(), &image);
            let r = run(&args(b.socket(), Rw::Randwrite)).expect("first run");
            assert_eq!(r.carried, Some(0));
            let st = VerifyState::take(&state, 4096).expect("state written");
            assert!(!st.written.is_empty());
            assert!(st.written.keys().all(|&o| (1 << 20..3 << 20).contains(&o)));
            st.save(&state, 4096, &HashSet::new()).expect("put back");
            st
        };
        {
            let b = start_backend(dir.path(), &image);
            let r = run(&args(b.socket(), Rw::Randrw)).expect("run after a restart");
            assert_eq!(r.carried, Some(written.written.len() as u64));
        }
        // Nobody listening: the state stays as it was.
        let before = std::fs::read_to_string(&state).expect("state");
        assert!(run(&args(&dir.path().join("nobody.sock"), Rw::Read)).is_err());
        assert_eq!(std::fs::read_to_string(&state).expect("state kept"), before);
        // A block changed behind the load generator's back.
        let st = VerifyState::parse(&before, 4096).expect("parse");
        let (&victim, _) = st.written.iter().next().expect("a block");
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&image)
                .expect("image");
            f.write_all_at(&[0xa5; 4096], victim).expect("clobber");
        }
        let b = start_backend(dir.path(), &image);
        match run(&args(b.socket(), Rw::Read)) {
            Err(LoadError::Verify { offset, .. }) => assert_eq!(offset, victim),
            other => panic!(
                "expected a verify error at {victim}, got {:?}",
                other.map(|r| r.to_string())
            ),
        }
        assert!(!state.exists(), "state carried on after a verify error");
    }

    /// `--packed` drives packed rings: random writes and reads with every block's stamp
    /// checked, over a ring small enough to wrap many times.
    #[test]
    fn packed_rings_carry_verified_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(8 << 20))
            .expect("image");
        let b = start_backend(dir.path(), &image);
        let r = run(&BlkLoadArgs {
            socket: b.socket().to_path_buf(),
            rw: Rw::Randrw,
            bs: 4096,
            iodepth: 8,
            runtime: Duration::from_millis(300),
            size: Some(1 << 20),
            queue_size: 32,
            queues: 1,
            verify: true,
            pid: None,
            offset: 0,
            verify_state: None,
            packed: true,
        })
        .expect("packed run");
        assert!(r.ios > 100, "only {} I/Os", r.ios);
        assert!(r.verified > 0, "nothing read back and checked");
        assert!(r.args.contains("packed"));
    }
}
