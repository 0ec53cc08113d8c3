//! A lock-free latency histogram with fixed bucket boundaries, for per-queue request
//! latencies: the data path adds a sample with two single-writer adds (a bin and the sum), the
//! control socket reads it as QEMU's `BlockLatencyHistogramInfo` does (`boundaries` and
//! `bins`, one more bin than boundaries), and the Prometheus exporter turns that into a
//! `_seconds` histogram (`_bucket{le=...}`, `_sum`, `_count`; see [`crate::metrics`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::counter::add_single_writer;

use serde_json::{json, Value};

/// Upper bounds of the bins in microseconds, inclusive as Prometheus' `le` is: bin i
/// holds `(boundaries[i-1], boundaries[i]]`, the last bin everything above. From a fast
/// tmpfs request (a few µs) to a disk in trouble (a second and more).
pub const BOUNDARIES_US: [u64; 16] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000,
];

/// The fields of a histogram in `query-stats`; the exporter looks for these.
pub const BOUNDARIES_KEY: &str = "boundaries-us";
/// See [`BOUNDARIES_KEY`].
pub const BINS_KEY: &str = "bins";
/// See [`BOUNDARIES_KEY`].
pub const SUM_KEY: &str = "sum-us";

/// Request latencies of one queue.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    bins: [AtomicU64; BOUNDARIES_US.len() + 1],
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one sample. One thread at a time adds to a histogram (a queue's worker: see
    /// [`add_single_writer`]); any may read it.
    pub fn record(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let bin = BOUNDARIES_US.partition_point(|&b| b < us);
        add_single_writer(&self.bins[bin], 1);
        add_single_writer(&self.sum_us, us);
    }

    /// Samples so far.
    pub fn count(&self) -> u64 {
        self.bins.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// `{"boundaries-us": [...], "bins": [...], "sum-us": N}` (bins not cumulative).
    pub fn to_json(&self) -> Value {
        let bins: Vec<u64> = self
            .bins
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        json!({
            BOUNDARIES_KEY: BOUNDARIES_US,
            BINS_KEY: bins,
            SUM_KEY: self.sum_us.load(Ordering::Relaxed),
        })
    }
}

/// A histogram as `query-stats` shows it, read back (by the `stats` table and the
/// Prometheus exporter).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistogramView {
    /// Upper bounds of the bins, µs.
    pub bounds_us: Vec<u64>,
    /// Samples per bin (one more than bounds), not cumulative.
    pub bins: Vec<u64>,
    /// Sum of the samples, µs.
    pub sum_us: u64,
}

impl HistogramView {
    /// Reads what [`LatencyHistogram::to_json`] wrote; None if `obj` is not a
    /// histogram (or an inconsistent one).
    pub fn from_json(obj: &serde_json::Map<String, Value>) -> Option<Self> {
        let numbers = |key: &str| -> Option<Vec<u64>> {
            obj.get(key)?
                .as_array()?
                .iter()
                .map(Value::as_u64)
                .collect::<Option<_>>()
        };
        let bounds_us = numbers(BOUNDARIES_KEY)?;
        let bins = numbers(BINS_KEY)?;
        if bins.len() != bounds_us.len() + 1 {
            return None;
        }
        let sum_us = obj.get(SUM_KEY).and_then(Value::as_u64).unwrap_or(0);
        Some(Self {
            bounds_us,
            bins,
            sum_us,
        })
    }

    /// Samples.
    pub fn count(&self) -> u64 {
        self.bins.iter().sum()
    }
}

/// A histogram of `query-stats` (as [`LatencyHistogram::to_json`] writes it) in a few
/// numbers a table can show: samples, mean, and the bins holding the median and the 99th
/// percentile (`<=250` µs; `>1000000` for the last bin). None if `v` is not one.
pub fn summarize(v: &Value) -> Option<Vec<(&'static str, String)>> {
    let HistogramView {
        bounds_us: bounds,
        bins,
        sum_us: sum,
    } = HistogramView::from_json(v.as_object()?)?;
    let count: u64 = bins.iter().sum();
    let quantile = |q: f64| -> String {
        if count == 0 {
            return "-".into();
        }
        let want = ((count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in bins.iter().enumerate() {
            seen += n;
            if seen >= want {
                return match bounds.get(i) {
                    Some(b) => format!("<={b}"),
                    None => format!(">{}", bounds.last().copied().unwrap_or(0)),
                };
            }
        }
        "-".into()
    };
    Some(vec![
        ("count", count.to_string()),
        (
            "mean-us",
            sum.checked_div(count)
                .map_or_else(|| "-".into(), |m| m.to_string()),
        ),
        ("p50-us", quantile(0.5)),
        ("p99-us", quantile(0.99)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_gives_count_mean_and_the_bins_of_the_median_and_p99() {
        let h = LatencyHistogram::new();
        for _ in 0..98 {
            h.record(Duration::from_micros(40));
        }
        h.record(Duration::from_micros(3_000));
        h.record(Duration::from_secs(3));
        let s = summarize(&h.to_json()).unwrap();
        assert_eq!(
            s,
            [
                ("count", "100".to_string()),
                ("mean-us", ((98 * 40 + 3_000 + 3_000_000) / 100).to_string()),
                ("p50-us", "<=50".to_string()),
                ("p99-us", "<=5000".to_string()),
            ]
        );
        assert_eq!(
            summarize(&LatencyHistogram::new().to_json()).unwrap()[2].1,
            "-"
        );
        assert!(summarize(&json!({"bins": [1]})).is_none());
    }

    #[test]
    fn samples_land_in_the_bin_of_their_range() {
        let h = LatencyHistogram::new();
        for us in [0, 9, 10, 24, 999, 1_000, 2_000_000] {
            h.record(Duration::from_micros(us));
        }
        let v = h.to_json();
        let bins: Vec<u64> = serde_json::from_value(v[BINS_KEY].clone()).unwrap();
        assert_eq!(bins.len(), BOUNDARIES_US.len() + 1);
        assert_eq!(bins[0], 3, "0, 9 and 10 µs: up to 10");
        assert_eq!(bins[1], 1, "24 µs: (10, 25]");
        assert_eq!(bins[6], 2, "999 and 1000 µs: (500, 1000]");
        assert_eq!(bins[7], 0);
        assert_eq!(bins[16], 1, "2 s: above the last bound");
        assert_eq!(h.count(), 7);
        assert_eq!(v[SUM_KEY], 9 + 10 + 24 + 999 + 1_000 + 2_000_000);
    }
}
