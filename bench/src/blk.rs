//! `bench load blk`: fio-like load through a vhost-user-blk socket.

use std::collections::HashMap;
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
        )
    }
}

struct Slot {
    hdr: u64,
    data: u64,
    status: u64,
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
    let write = matches!(a.rw, Rw::Write | Rw::Randwrite);
    let random = matches!(a.rw, Rw::Randread | Rw::Randwrite);
    let slots: Vec<Slot> = (0..depth * nq)
        .map(|_| Slot {
            hdr: fe.alloc(16),
            data: fe.alloc(a.bs),
            status: fe.alloc(1),
        })
        .collect();
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next_seq = 0u64;
    let mut next_offset = |rng: &mut u64| {
        if random {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            (*rng % blocks) * a.bs
        } else {
            let o = (next_seq % blocks) * a.bs;
            next_seq += 1;
            o
        }
    };
    // Slot s belongs to queue s / depth.
    let mut in_flight: Vec<HashMap<u16, (usize, Instant, u64)>> = vec![HashMap::new(); nq];
    let submit = |fe: &mut TestFrontend, slot: usize, offset: u64| -> u16 {
        let s = &slots[slot];
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&u32::from(write).to_le_bytes());
        h[8..16].copy_from_slice(&(offset / 512).to_le_bytes());
        fe.write(s.hdr, &h);
        fe.write(s.status, &[0xff]);
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
    for slot in 0..depth * nq {
        let off = next_offset(&mut rng);
        let head = submit(&mut fe, slot, off);
        in_flight[slot / depth].insert(head, (slot, Instant::now(), off));
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
                let Some((slot, t0, off)) = pending.remove(&(u.id as u16)) else {
                    continue;
                };
                let st = fe.read(slots[slot].status, 1)[0];
                if st != 0 {
                    return Err(LoadError::Status {
                        offset: off,
                        status: st,
                    });
                }
                lat_us.push(now.duration_since(t0).as_micros() as u64);
                ios += 1;
                free_slots.push(slot);
            }
            for slot in free_slots {
                let off = next_offset(&mut rng);
                let head = submit(&mut fe, slot, off);
                pending.insert(head, (slot, Instant::now(), off));
            }
            fe.queues[q].notify();
        }
    }
    let elapsed = start.elapsed();
    // Let the tail complete so the backend is left idle.
    for (q, pending) in in_flight.iter().enumerate() {
        let _ = fe.queues[q].wait_used(&fe.mem, pending.len(), Duration::from_secs(5));
    }
    lat_us.sort_unstable();
    Ok(Report {
        ios,
        bytes: ios * a.bs,
        elapsed,
        lat_us,
        args: format!("{:?} bs={} iodepth={} queues={}", a.rw, a.bs, a.iodepth, nq).to_lowercase(),
    })
}
