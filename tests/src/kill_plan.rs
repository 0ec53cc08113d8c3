//! What the crash-restart tests share: kill counts from the environment and the random
//! kill moments, repeatable with `VHOST_CRASH_SEED` (the seed is printed).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `name` from the environment as a number, `default` when unset or empty; a value that
/// is not a number fails the test that asked (a typo must not silently run the default).
pub fn env_u32(name: &str, default: u32) -> u32 {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        _ => default,
    }
}

/// xorshift64*, seeded from `VHOST_CRASH_SEED` or the clock.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `VHOST_CRASH_SEED` or the clock; prints the seed for `test`.
    pub fn from_env(test: &str) -> Rng {
        let seed = std::env::var("VHOST_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("{test}: VHOST_CRASH_SEED={seed}");
        Rng(seed | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next_u64() % (hi - lo).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_stay_in_range_and_a_seed_repeats() {
        let mut a = Rng(42 | 1);
        let mut b = Rng(42 | 1);
        for _ in 0..1000 {
            let m = a.millis(100, 300);
            assert!(m >= Duration::from_millis(100) && m < Duration::from_millis(300));
            assert_eq!(m, b.millis(100, 300));
        }
    }
}
