//! Rate-limited logging: a guest that sends garbage in a loop must not flood the host log.

use std::time::{Duration, Instant};

/// Logs at most one line per interval and says how many were suppressed in between.
#[derive(Debug)]
pub struct RateLimitedLog {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimitedLog {
    /// One line per second.
    pub const fn new() -> Self {
        Self {
            interval: Duration::from_secs(1),
            last: None,
            suppressed: 0,
        }
    }

    /// Logs `msg()` as a warning unless a line was logged within the interval.
    pub fn warn(&mut self, msg: impl FnOnce() -> String) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.interval)
        {
            self.suppressed += 1;
            return;
        }
        if self.suppressed > 0 {
            log::warn!(
                "{} ({} similar messages suppressed)",
                msg(),
                self.suppressed
            );
        } else {
            log::warn!("{}", msg());
        }
        self.suppressed = 0;
        self.last = Some(now);
    }
}
