//! I/O throttling of the disk (`--iops-limit` & co., `set-io-throttle`): token buckets
//! with the semantics of QEMU's throttle groups. Pure logic; the caller passes the time.
//!
//! Each limit is a bucket that fills at `limit` per second up to its burst capacity (the
//! `*_max` value, or a tenth of a second's worth when none is set, as QEMU does). A
//! request may start when every bucket it draws from is not in debt (tokens >= 0); it is
//! then charged in full, which may put the buckets in debt: so a request larger than a
//! bucket still goes, and the ones after it wait until the debt is paid back. Reads draw
//! from the total and the read buckets, writes from the total and the write buckets.

use std::time::{Duration, Instant};

/// The limits, named as QEMU's block_set_io_throttle arguments. 0 = unlimited (for a
/// `*_max`: the default burst, a tenth of a second of the limit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Requests per second, reads and writes together.
    pub iops: u64,
    /// Read requests per second.
    pub iops_rd: u64,
    /// Write requests per second.
    pub iops_wr: u64,
    /// Bytes per second, reads and writes together.
    pub bps: u64,
    /// Bytes read per second.
    pub bps_rd: u64,
    /// Bytes written per second.
    pub bps_wr: u64,
    /// Burst capacities (requests or bytes) of the buckets above.
    pub iops_max: u64,
    /// See `iops_max`.
    pub iops_rd_max: u64,
    /// See `iops_max`.
    pub iops_wr_max: u64,
    /// See `iops_max`.
    pub bps_max: u64,
    /// See `iops_max`.
    pub bps_rd_max: u64,
    /// See `iops_max`.
    pub bps_wr_max: u64,
}

/// The argument names of set-io-throttle (and the keys query-status shows), in the
/// order of [`Limits::get`] / [`Limits::set`].
pub const NAMES: [&str; 12] = [
    "iops",
    "iops_rd",
    "iops_wr",
    "bps",
    "bps_rd",
    "bps_wr",
    "iops_max",
    "iops_rd_max",
    "iops_wr_max",
    "bps_max",
    "bps_rd_max",
    "bps_wr_max",
];

impl Limits {
    fn fields(&mut self) -> [&mut u64; 12] {
        [
            &mut self.iops,
            &mut self.iops_rd,
            &mut self.iops_wr,
            &mut self.bps,
            &mut self.bps_rd,
            &mut self.bps_wr,
            &mut self.iops_max,
            &mut self.iops_rd_max,
            &mut self.iops_wr_max,
            &mut self.bps_max,
            &mut self.bps_rd_max,
            &mut self.bps_wr_max,
        ]
    }

    /// The value named `name` (one of [`NAMES`]).
    pub fn get(&self, name: &str) -> Option<u64> {
        let i = NAMES.iter().position(|n| *n == name)?;
        let mut c = *self;
        Some(*c.fields()[i])
    }

    /// Sets the value named `name`; false if there is no such name.
    pub fn set(&mut self, name: &str, v: u64) -> bool {
        match NAMES.iter().position(|n| *n == name) {
            Some(i) => {
                *self.fields()[i] = v;
                true
            }
            None => false,
        }
    }

    /// Checks what QEMU checks: a total limit excludes its read/write ones, and a burst
    /// needs its limit and may not be below it.
    pub fn check(&self) -> Result<(), String> {
        if self.iops != 0 && (self.iops_rd != 0 || self.iops_wr != 0) {
            return Err("iops cannot be combined with iops_rd or iops_wr".into());
        }
        if self.bps != 0 && (self.bps_rd != 0 || self.bps_wr != 0) {
            return Err("bps cannot be combined with bps_rd or bps_wr".into());
        }
        for i in 0..6 {
            let mut c = *self;
            let f = c.fields();
            let (limit, max) = (*f[i], *f[i + 6]);
            if max != 0 && limit == 0 {
                return Err(format!("{} needs {}", NAMES[i + 6], NAMES[i]));
            }
            if max != 0 && max < limit {
                return Err(format!(
                    "{} ({max}) must not be smaller than {} ({limit})",
                    NAMES[i + 6],
                    NAMES[i]
                ));
            }
        }
        Ok(())
    }

    /// No limit set.
    pub fn unlimited(&self) -> bool {
        self.iops | self.iops_rd | self.iops_wr | self.bps | self.bps_rd | self.bps_wr == 0
    }
}

/// What a request draws from the buckets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// A read.
    Read,
    /// A write (write-zeroes counts as a write of 0 bytes).
    Write,
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// Per second; 0: this bucket does not limit.
    rate: f64,
    capacity: f64,
    tokens: f64,
}

impl Bucket {
    fn new(rate: u64, max: u64) -> Self {
        let rate = rate as f64;
        let capacity = if max > 0 { max as f64 } else { rate / 10.0 };
        Self {
            rate,
            capacity,
            tokens: capacity,
        }
    }

    fn refill(&mut self, secs: f64) {
        if self.rate > 0.0 {
            self.tokens = (self.tokens + self.rate * secs).min(self.capacity);
        }
    }

    /// How long until the bucket is out of debt.
    fn wait(&self) -> Duration {
        // Out of debt up to rounding errors of the refills.
        if self.rate <= 0.0 || self.tokens >= -1e-6 {
            return Duration::ZERO;
        }
        // Rounded up (and at least a microsecond) so that the bucket is out of debt by then.
        Duration::from_secs_f64(-self.tokens / self.rate).max(Duration::from_micros(1))
            + Duration::from_nanos(1)
    }
}

/// The buckets of one disk.
#[derive(Debug)]
pub struct Throttle {
    limits: Limits,
    /// iops, iops_rd, iops_wr, bps, bps_rd, bps_wr.
    buckets: [Bucket; 6],
    last: Instant,
}

impl Throttle {
    /// Buckets for `limits`, full at `now`.
    pub fn new(limits: Limits, now: Instant) -> Self {
        let mut t = Self {
            limits: Limits::default(),
            buckets: [Bucket::default(); 6],
            last: now,
        };
        t.set_limits(limits, now);
        t
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// New limits from `now` on. Buckets whose limit did not change keep their level;
    /// the others start full.
    pub fn set_limits(&mut self, limits: Limits, now: Instant) {
        self.advance(now);
        let mut old = self.limits;
        let mut new = limits;
        let (o, n) = (old.fields(), new.fields());
        for i in 0..6 {
            if *o[i] != *n[i] || *o[i + 6] != *n[i + 6] {
                self.buckets[i] = Bucket::new(*n[i], *n[i + 6]);
            }
        }
        self.limits = limits;
    }

    fn advance(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        for b in &mut self.buckets {
            b.refill(secs);
        }
    }

    fn drawn(dir: Dir) -> [usize; 4] {
        match dir {
            Dir::Read => [0, 1, 3, 4],
            Dir::Write => [0, 2, 3, 5],
        }
    }

    /// A request of `bytes` data bytes wants to start at `now`: Ok (and charged) if it
    /// may, else how long to wait before asking again.
    pub fn request(&mut self, dir: Dir, bytes: u64, now: Instant) -> Result<(), Duration> {
        self.advance(now);
        let idx = Self::drawn(dir);
        let wait = idx
            .iter()
            .map(|&i| self.buckets[i].wait())
            .max()
            .unwrap_or_default();
        if !wait.is_zero() {
            return Err(wait);
        }
        for (n, &i) in idx.iter().enumerate() {
            let b = &mut self.buckets[i];
            if b.rate > 0.0 {
                b.tokens -= if n < 2 { 1.0 } else { bytes as f64 };
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Requests of `dir`/`bytes` that start in `secs` seconds when the caller retries
    /// exactly when told (as the worker's timer does).
    /// How many 0-byte writes start at `now` before one must wait.
    fn passing_at(t: &mut Throttle, now: Instant) -> u32 {
        let mut n = 0;
        while t.request(Dir::Write, 0, now).is_ok() {
            n += 1;
        }
        n
    }

    fn run(t: &mut Throttle, t0: Instant, secs: u64, dir: Dir, bytes: u64) -> u64 {
        let end = t0 + Duration::from_secs(secs);
        let mut now = t0;
        let mut n = 0;
        while now < end {
            match t.request(dir, bytes, now) {
                Ok(()) => n += 1,
                Err(w) => now += w,
            }
        }
        n
    }

    #[test]
    fn unlimited_never_waits() {
        let t0 = Instant::now();
        let mut t = Throttle::new(Limits::default(), t0);
        for _ in 0..100_000 {
            assert_eq!(t.request(Dir::Write, 1 << 20, t0), Ok(()));
        }
    }

    #[test]
    fn iops_refill_rate_and_default_burst() {
        let t0 = Instant::now();
        let limits = Limits {
            iops: 500,
            ..Limits::default()
        };
        let mut t = Throttle::new(limits, t0);
        // The default burst: a tenth of a second's worth (50), then the debt of one.
        let mut burst = 0;
        while t.request(Dir::Read, 4096, t0).is_ok() {
            burst += 1;
        }
        assert_eq!(burst, 51);
        let n = run(&mut t, t0, 10, Dir::Read, 4096);
        assert!((4990..=5010).contains(&n), "{n}");
    }

    #[test]
    fn burst_capacity() {
        let t0 = Instant::now();
        let limits = Limits {
            iops: 100,
            iops_max: 1000,
            ..Limits::default()
        };
        let mut t = Throttle::new(limits, t0);
        assert_eq!(passing_at(&mut t, t0), 1001);
        // Idle for 5 s: refilled by 500 only, then 10 s later full again, never more.
        assert_eq!(passing_at(&mut t, t0 + Duration::from_secs(5)), 500);
        assert_eq!(passing_at(&mut t, t0 + Duration::from_secs(100)), 1001);
    }

    #[test]
    fn a_request_larger_than_the_bucket_goes_and_the_next_one_waits_for_the_debt() {
        let t0 = Instant::now();
        let limits = Limits {
            bps: 1 << 20,
            ..Limits::default()
        };
        let mut t = Throttle::new(limits, t0);
        // Capacity 104857.6 bytes; a 4 MiB write goes at once.
        assert_eq!(t.request(Dir::Write, 4 << 20, t0), Ok(()));
        let w = t.request(Dir::Write, 512, t0).expect_err("in debt");
        // The debt: 4 MiB - capacity, at 1 MiB/s.
        assert!(w > ms(3890) && w < ms(3910), "{w:?}");
        assert!(t.request(Dir::Write, 512, t0 + w - ms(10)).is_err());
        assert_eq!(t.request(Dir::Write, 512, t0 + w), Ok(()));
    }

    #[test]
    fn total_versus_read_and_write_buckets() {
        let t0 = Instant::now();
        let limits = Limits {
            iops_rd: 100,
            bps_wr: 1 << 20,
            ..Limits::default()
        };
        let mut t = Throttle::new(limits, t0);
        // Reads are limited in count only, writes in bytes only.
        let reads = run(&mut t, t0, 10, Dir::Read, 1 << 20);
        assert!((995..=1011).contains(&reads), "{reads}");
        let mut t = Throttle::new(limits, t0);
        let writes = run(&mut t, t0, 10, Dir::Write, 64 << 10);
        assert!((158..=164).contains(&writes), "{writes}");
        // Reads do not use up the write bucket, nor writes the read one.
        let mut t = Throttle::new(limits, t0);
        while t.request(Dir::Read, 0, t0).is_ok() {}
        assert_eq!(t.request(Dir::Write, 1, t0), Ok(()));
        // A total limit counts both.
        let mut t = Throttle::new(
            Limits {
                iops: 10,
                iops_max: 10,
                ..Limits::default()
            },
            t0,
        );
        for i in 0..11 {
            let dir = if i % 2 == 0 { Dir::Read } else { Dir::Write };
            assert_eq!(t.request(dir, 0, t0), Ok(()));
        }
        assert!(t.request(Dir::Read, 0, t0).is_err());
        assert!(t.request(Dir::Write, 0, t0).is_err());
    }

    #[test]
    fn time_until_the_next_request() {
        let t0 = Instant::now();
        let mut t = Throttle::new(
            Limits {
                iops: 10,
                iops_max: 10,
                ..Limits::default()
            },
            t0,
        );
        while t.request(Dir::Read, 0, t0).is_ok() {}
        // In debt by one: 100 ms.
        let w = t.request(Dir::Read, 0, t0).expect_err("waits");
        assert!(w >= ms(100) && w < ms(101), "{w:?}");
        // Asked again later, the wait is what is left.
        let w = t.request(Dir::Read, 0, t0 + ms(60)).expect_err("waits");
        assert!(w >= ms(40) && w < ms(41), "{w:?}");
        assert_eq!(t.request(Dir::Read, 0, t0 + ms(100)), Ok(()));
    }

    #[test]
    fn changed_limits_take_effect_and_unchanged_buckets_keep_their_debt() {
        let t0 = Instant::now();
        let l = Limits {
            iops: 300,
            ..Limits::default()
        };
        let mut t = Throttle::new(l, t0);
        let n = run(&mut t, t0, 4, Dir::Read, 4096);
        assert!((1225..=1235).contains(&n), "{n}");
        let t1 = t0 + Duration::from_secs(4);
        t.set_limits(
            Limits {
                iops: 600,
                ..Limits::default()
            },
            t1,
        );
        let n = run(&mut t, t1, 4, Dir::Read, 4096);
        assert!((2455..=2465).contains(&n), "{n}");
        // Setting the same limits again changes nothing: still in debt.
        let t2 = t1 + Duration::from_secs(4);
        while t.request(Dir::Read, 0, t2).is_ok() {}
        t.set_limits(t.limits(), t2);
        assert!(t.request(Dir::Read, 0, t2).is_err());
        t.set_limits(Limits::default(), t2);
        assert_eq!(t.request(Dir::Read, 0, t2), Ok(()));
    }

    #[test]
    fn limits_are_checked_as_qemu_does() {
        let ok = Limits {
            iops_rd: 10,
            iops_wr: 20,
            bps: 1000,
            bps_max: 2000,
            ..Limits::default()
        };
        assert_eq!(ok.check(), Ok(()));
        let mut l = ok;
        l.iops = 5;
        assert!(l.check().is_err());
        let mut l = ok;
        l.bps_max = 999;
        assert!(l.check().is_err());
        let mut l = ok;
        l.iops_max = 10;
        assert!(l.check().is_err());
        let mut l = Limits::default();
        assert!(l.unlimited());
        assert!(l.set("bps_wr_max", 7));
        assert!(!l.set("nope", 7));
        assert_eq!(l.get("bps_wr_max"), Some(7));
        assert_eq!(l.get("iops"), Some(0));
    }
}
