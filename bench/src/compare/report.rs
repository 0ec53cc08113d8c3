//! Results of a comparison: repeated samples per case, metric and contender, reduced to
//! medians and spreads, and written as Markdown, JSON and (see `chart`) a PNG chart.
//!
//! Every `bench compare` subcommand fills one [`Section`]; `bench compare all` gathers the
//! sections of one run into one table and one chart.

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
/// Resident memory of a process.
pub const RSS_MIB: Metric = Metric {
    name: "RSS",
    unit: "MiB",
    higher_is_better: false,
};
/// CPU use of a process, percent of one CPU.
pub const CPU_PCT: Metric = Metric {
    name: "CPU",
    unit: "%",
    higher_is_better: false,
};
/// Data sent over a connection (an incremental copy should send little beyond what
/// changed).
pub const SENT_MIB: Metric = Metric {
    name: "data sent",
    unit: "MiB",
    higher_is_better: false,
};
/// Wall-clock time of one operation.
pub const TIME_MS: Metric = Metric {
    name: "time",
    unit: "ms",
    higher_is_better: false,
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
    /// Contenders (the value columns); with `ratios`, the first is ours and every other
    /// one is a peer it is compared with.
    pub contenders: Vec<String>,
    /// Whether the section compares ours against peers (ratio columns, bars in the chart).
    /// Off for measurements with nothing to compare against, such as `idle` (one row per
    /// backend): a ratio between two of our own backends would mean nothing.
    pub ratios: bool,
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

/// First line of `<program> --version` (None when it cannot be run), for descriptions.
pub fn program_version(program: &std::path::Path) -> Option<String> {
    let out = std::process::Command::new(program)
        .arg("--version")
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_string)
}

/// One line describing the machine: CPUs, model, memory, kernel, and its idle setting
/// (which decides what waking a process on an idle vCPU costs, see `halt_poll`).
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
    format!(
        "{n} x {cpu}, {mem_gib:.0} GiB, Linux {}; {}",
        kernel.trim(),
        crate::compare::halt_poll::describe_current()
    )
}

/// The current UTC date and time, "YYYY-MM-DD HH:MM UTC", for dating results (computed
/// here because a calendar crate for one line is not worth the dependency).
pub fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_string(secs)
}

/// Formats seconds since the Unix epoch as "YYYY-MM-DD HH:MM UTC" (proleptic Gregorian;
/// the days-to-civil algorithm of Howard Hinnant's date library).
fn utc_string(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let (hh, mm) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02} UTC")
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
    /// The peers ours is compared with (contender indices), none without `ratios`.
    pub fn peers(&self) -> std::ops::Range<usize> {
        if self.ratios {
            1..self.contenders.len().max(1)
        } else {
            0..0
        }
    }

    /// Markdown: heading, description, a table with median (±spread) per contender and
    /// (with `ratios`) ours-vs-each-peer ratios, then the notes.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "### {}\n\n{}\n", self.title, self.description);
        md.push_str("| case | metric |");
        for c in &self.contenders {
            let _ = write!(md, " {c} |");
        }
        for i in self.peers() {
            let _ = write!(md, " ours vs {} |", self.contenders[i]);
        }
        md.push_str("\n|---|---|");
        for _ in 0..self.contenders.len() + self.peers().len() {
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
            for i in self.peers() {
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
        if self.ratios {
            md.push_str(
                "\nRatios: above 1 means ours is better (for latency and CPU, the peer's value over ours).\n",
            );
        }
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
                            "ours_advantage": if self.peers().contains(&i) { r.advantage(i) } else { None },
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
            "ratios": self.ratios,
            "rows": rows,
            "notes": self.notes,
        })
    }

    /// Writes `<out>/<name>.md`, `<out>/<name>.json` and the chart `<out>/<name>.png`.
    ///
    /// The chart comes last, so a chart that cannot be drawn (no font) still leaves the
    /// tables behind; its error (which names the package to install) is an I/O error here
    /// so that every caller's existing `?` on I/O keeps working.
    pub fn write(&self, out: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(out)?;
        std::fs::write(out.join(format!("{}.md", self.name)), self.markdown())?;
        let json = serde_json::to_string_pretty(&self.json()).map_err(std::io::Error::other)?;
        std::fs::write(out.join(format!("{}.json", self.name)), json)?;
        crate::compare::chart::write_chart(
            std::slice::from_ref(self),
            &out.join(format!("{}.png", self.name)),
        )
        .map_err(std::io::Error::other)
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
            ratios: true,
            rows: vec![Row {
                case: "4k".into(),
                metric: IOPS,
                samples: vec![vec![300.0, 310.0, 290.0], vec![100.0, 100.0, 100.0]],
            }],
            notes: vec![],
        };
        let md = s.markdown();
        assert!(
            md.contains("| case | metric | ours | peer | ours vs peer |\n|---|---|---|---|---|\n"),
            "{md}"
        );
        assert!(
            md.contains("| 4k | IOPS | 300 (±7%) | 100 (±0%) | 3.00× |"),
            "{md}"
        );
        assert!(md.contains("Ratios: above 1"), "{md}");
        assert_eq!(s.json()["rows"][0]["results"][1]["ours_advantage"], 3.0);
    }

    #[test]
    fn section_without_ratios_has_no_ratio_columns() {
        let s = Section {
            name: "idle".into(),
            title: "Idle".into(),
            description: "d".into(),
            contenders: vec!["idle".into()],
            ratios: false,
            rows: vec![
                Row {
                    case: "vhost-blk-backend".into(),
                    metric: RSS_MIB,
                    samples: vec![vec![3.25]],
                },
                Row {
                    case: "serial-backend".into(),
                    metric: CPU_PCT,
                    samples: vec![vec![0.0]],
                },
            ],
            notes: vec!["n".into()],
        };
        assert!(s.peers().is_empty());
        let md = s.markdown();
        assert!(
            md.contains("| case | metric | idle |\n|---|---|---|\n"),
            "{md}"
        );
        assert!(
            md.contains("| vhost-blk-backend | RSS (MiB) | 3.25 |\n"),
            "{md}"
        );
        assert!(md.contains("| serial-backend | CPU (%) | 0.00 |\n"), "{md}");
        assert!(md.contains("- n\n"), "{md}");
        assert!(!md.contains("ours vs") && !md.contains("Ratios:"), "{md}");
        let j = s.json();
        assert_eq!(j["ratios"], false);
        assert!(j["rows"][0]["results"][0]["ours_advantage"].is_null());

        // Two contenders without ratios: still no ratio column.
        let s = Section {
            contenders: vec!["a".into(), "b".into()],
            rows: vec![Row {
                case: "c".into(),
                metric: IOPS,
                samples: vec![vec![2.0], vec![1.0]],
            }],
            ..s
        };
        assert!(s.markdown().contains("| c | IOPS | 2.00 | 1.00 |\n"));
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc_string(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_string(951_782_400 + 3600 + 120), "2000-02-29 01:02 UTC");
        assert_eq!(utc_string(1_798_761_599), "2026-12-31 23:59 UTC");
    }

    #[test]
    fn write_leaves_markdown_json_and_chart() {
        let dir = tempfile::tempdir().unwrap();
        let s = Section {
            name: "w".into(),
            title: "W".into(),
            description: "d".into(),
            contenders: vec!["ours".into(), "peer".into()],
            ratios: true,
            rows: vec![Row {
                case: "4k".into(),
                metric: IOPS,
                samples: vec![vec![2.0], vec![1.0]],
            }],
            notes: vec![],
        };
        s.write(dir.path()).unwrap();
        for ext in ["md", "json", "png"] {
            let p = dir.path().join(format!("w.{ext}"));
            assert!(std::fs::metadata(&p).unwrap().len() > 0, "{}", p.display());
        }
    }
}
