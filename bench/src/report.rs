//! Results of a comparison: repeated samples per case, metric and contender, reduced to
//! medians and spreads, and written as Markdown, JSON and (see `chart`) a PNG chart.
//!
//! Every `bench compare` subcommand fills one [`Section`]; `bench compare all` gathers the
//! sections of one run into one table and one chart.

// Used by the compare subcommands as they move onto it.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::Path;

/// What a row measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Metric {
    /// Short name shown in the table ("IOPS", "p50 latency", "CPU per I/O").
    pub name: &'static str,
    /// Unit shown after the value ("", "µs", "Mbit/s").
    pub unit: &'static str,
    /// Whether more is better (IOPS, throughput) or less is (latency, CPU).
    pub higher_is_better: bool,
}

/// Operations (or frames, or requests) per second.
pub const IOPS: Metric = Metric {
    name: "IOPS",
    unit: "",
    higher_is_better: true,
};
/// Median latency.
pub const P50_US: Metric = Metric {
    name: "p50 latency",
    unit: "µs",
    higher_is_better: false,
};
/// 99th percentile latency.
pub const P99_US: Metric = Metric {
    name: "p99 latency",
    unit: "µs",
    higher_is_better: false,
};
/// Backend CPU time per operation.
pub const CPU_US_PER_OP: Metric = Metric {
    name: "CPU per op",
    unit: "µs",
    higher_is_better: false,
};
/// Megabytes per second.
pub const MB_S: Metric = Metric {
    name: "throughput",
    unit: "MB/s",
    higher_is_better: true,
};
/// Megabits per second.
pub const MBIT_S: Metric = Metric {
    name: "throughput",
    unit: "Mbit/s",
    higher_is_better: true,
};
/// Packets per second.
pub const PPS: Metric = Metric {
    name: "packets/s",
    unit: "",
    higher_is_better: true,
};

/// One measured quantity for every contender.
#[derive(Clone, Debug)]
pub struct Row {
    /// The case, e.g. "4k randread QD32".
    pub case: String,
    /// What is measured.
    pub metric: Metric,
    /// Samples per contender, in the section's contender order (empty: not measured).
    pub samples: Vec<Vec<f64>>,
}

/// The results of one `bench compare` subcommand.
#[derive(Clone, Debug)]
pub struct Section {
    /// Short name: "blk", "net", "serial", "migrate", "idle"; also the file name.
    pub name: String,
    /// Heading shown in Markdown.
    pub title: String,
    /// Setting of the run: machine, image, repetitions, the command.
    pub description: String,
    /// Contenders; the first is ours, ratios are ours against each other one.
    pub contenders: Vec<String>,
    /// Rows in display order.
    pub rows: Vec<Row>,
    /// Remarks printed under the table.
    pub notes: Vec<String>,
}

/// Median of a sample set (0 when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut c = v.to_vec();
    c.sort_by(|a, b| a.total_cmp(b));
    if c.is_empty() {
        0.0
    } else if c.len() % 2 == 1 {
        c[c.len() / 2]
    } else {
        (c[c.len() / 2 - 1] + c[c.len() / 2]) / 2.0
    }
}

/// Spread of a sample set: (max - min) / median, in percent.
pub fn spread_pct(v: &[f64]) -> f64 {
    let m = median(v);
    if v.is_empty() || m == 0.0 {
        return 0.0;
    }
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
    (hi - lo) / m * 100.0
}

/// One line describing the machine: CPUs, model, kernel.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let n = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
    format!("{n} x {cpu}, {mem_gib:.0} GiB, Linux {}", kernel.trim())
}

impl Row {
    /// Median of contender `i` (None when not measured).
    pub fn median(&self, i: usize) -> Option<f64> {
        self.samples
            .get(i)
            .filter(|s| !s.is_empty())
            .map(|s| median(s))
    }

    /// "Ours is N× better than contender `i`": for higher-is-better metrics ours/theirs,
    /// for lower-is-better theirs/ours, so above 1 always means ours wins.
    pub fn advantage(&self, i: usize) -> Option<f64> {
        let ours = self.median(0)?;
        let theirs = self.median(i)?;
        let r = if self.metric.higher_is_better {
            ours / theirs
        } else {
            theirs / ours
        };
        r.is_finite().then_some(r)
    }
}

fn fmt_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

impl Section {
    /// Markdown: heading, description, a table with median (±spread) per contender and
    /// ours-vs-each-peer ratios, then the notes.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "### {}\n\n{}\n", self.title, self.description);
        md.push_str("| case | metric |");
        for c in &self.contenders {
            let _ = write!(md, " {c} |");
        }
        for c in self.contenders.iter().skip(1) {
            let _ = write!(md, " ours vs {c} |");
        }
        md.push_str("\n|---|---|");
        for _ in 0..(self.contenders.len() * 2).saturating_sub(1) {
            md.push_str("---|");
        }
        md.push('\n');
        for r in &self.rows {
            let unit = if r.metric.unit.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.metric.unit)
            };
            let _ = write!(md, "| {} | {}{} |", r.case, r.metric.name, unit);
            for i in 0..self.contenders.len() {
                match r.samples.get(i).filter(|s| !s.is_empty()) {
                    Some(s) if s.len() > 1 => {
                        let _ = write!(md, " {} (±{:.0}%) |", fmt_value(median(s)), spread_pct(s));
                    }
                    Some(s) => {
                        let _ = write!(md, " {} |", fmt_value(median(s)));
                    }
                    None => md.push_str(" – |"),
                }
            }
            for i in 1..self.contenders.len() {
                match r.advantage(i) {
                    Some(a) => {
                        let _ = write!(md, " {a:.2}× |");
                    }
                    None => md.push_str(" – |"),
                }
            }
            md.push('\n');
        }
        if !self.notes.is_empty() {
            md.push('\n');
            for n in &self.notes {
                let _ = writeln!(md, "- {n}");
            }
        }
        md.push_str(
            "\nRatios: above 1 means ours is better (for latency and CPU, the peer's value over ours).\n",
        );
        md
    }

    /// The section as JSON: every sample, medians, spreads and ratios.
    pub fn json(&self) -> serde_json::Value {
        let rows: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|r| {
                let per: Vec<serde_json::Value> = self
                    .contenders
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let s = r.samples.get(i).cloned().unwrap_or_default();
                        serde_json::json!({
                            "contender": c,
                            "samples": s,
                            "median": r.median(i),
                            "spread_pct": spread_pct(&s),
                            "ours_advantage": if i == 0 { None } else { r.advantage(i) },
                        })
                    })
                    .collect();
                serde_json::json!({
                    "case": r.case,
                    "metric": r.metric.name,
                    "unit": r.metric.unit,
                    "higher_is_better": r.metric.higher_is_better,
                    "results": per,
                })
            })
            .collect();
        serde_json::json!({
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "machine": machine(),
            "contenders": self.contenders,
            "rows": rows,
            "notes": self.notes,
        })
    }

    /// Writes `<out>/<name>.md` and `<out>/<name>.json`.
    pub fn write(&self, out: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(out)?;
        std::fs::write(out.join(format!("{}.md", self.name)), self.markdown())?;
        let json = serde_json::to_string_pretty(&self.json()).map_err(std::io::Error::other)?;
        std::fs::write(out.join(format!("{}.json", self.name)), json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
        assert_eq!(spread_pct(&[90.0, 100.0, 110.0]), 20.0);
    }

    #[test]
    fn advantage_follows_direction() {
        let r = Row {
            case: "c".into(),
            metric: IOPS,
            samples: vec![vec![200.0], vec![100.0]],
        };
        assert_eq!(r.advantage(1), Some(2.0));
        let r = Row {
            case: "c".into(),
            metric: P50_US,
            samples: vec![vec![50.0], vec![100.0]],
        };
        assert_eq!(r.advantage(1), Some(2.0));
        let r = Row {
            case: "c".into(),
            metric: P50_US,
            samples: vec![vec![50.0], vec![]],
        };
        assert_eq!(r.advantage(1), None);
    }

    #[test]
    fn markdown_has_every_contender_and_ratio() {
        let s = Section {
            name: "t".into(),
            title: "T".into(),
            description: "d".into(),
            contenders: vec!["ours".into(), "peer".into()],
            rows: vec![Row {
                case: "4k".into(),
                metric: IOPS,
                samples: vec![vec![300.0, 310.0, 290.0], vec![100.0, 100.0, 100.0]],
            }],
            notes: vec![],
        };
        let md = s.markdown();
        assert!(
            md.contains("| 4k | IOPS | 300 (±7%) | 100 (±0%) | 3.00× |"),
            "{md}"
        );
    }
}
