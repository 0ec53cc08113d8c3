//! `bench compare all`: every comparison in one run, on one machine state, into one table
//! (all.md, all.json) and one chart (all.png).
//!
//! Each comparison keeps its own options; they are built by clap from their defaults plus
//! the shared `--reps`, `--runtime` and `--out` (only where the comparison has such an
//! option) and any `--pass NAME=OPTION`, so this command needs no knowledge of their
//! structs and stays correct as they gain options. A comparison that fails (or panics) is
//! recorded with its error and the run goes on: one broken peer must not throw away an
//! hour of the others' measurements. The exit status is non-zero when any failed.

use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use clap::{Args, CommandFactory, Parser};

use crate::compare::blk::{self, CompareBlkArgs};
use crate::compare::guest_blk::{self, CompareGuestBlkArgs};
use crate::compare::halt_poll::HaltPollArgs;
use crate::compare::idle::{self, CompareIdleArgs};
use crate::compare::migrate::{self, CompareMigrateArgs};
use crate::compare::net::{self, CompareNetArgs};
use crate::compare::report::{machine, now_utc, Section};
use crate::compare::serial::{self, CompareSerialArgs};
use crate::compare::CompareError;

/// Options of `bench compare all`.
#[derive(Args, Debug)]
pub struct CompareAllArgs {
    /// Repetitions, for every comparison that repeats (default: each one's own).
    #[arg(long)]
    reps: Option<usize>,
    /// Length of each measurement, for every comparison that takes one (`--runtime`, or
    /// `--duration` for idle; default: each one's own).
    #[arg(long, value_parser = check_duration)]
    runtime: Option<String>,
    /// Where every comparison writes its own files, and all.md, all.json and all.png.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Comparisons to leave out, comma-separated (blk, net, serial, guest-blk, idle,
    /// migrate).
    #[arg(long, value_delimiter = ',', value_name = "NAME")]
    skip: Vec<String>,
    /// An extra option for one comparison, as NAME=OPTION; repeatable. Example:
    /// `--pass 'blk=--only=QD32' --pass blk=--dirs=/dev/shm`.
    #[arg(long = "pass", value_name = "NAME=OPTION")]
    pass: Vec<String>,
    /// For the whole run, every comparison (not handed on: each header's machine line
    /// says the setting and that this flag set it).
    #[command(flatten)]
    halt_poll: HaltPollArgs,
}

/// Checks a duration the way the comparisons parse it, but keeps the text: it is handed
/// on to each comparison's own parser.
fn check_duration(s: &str) -> Result<String, String> {
    crate::load::blk::parse_duration(s).map(|_| s.to_string())
}

/// A comparison's options as a command line of their own, so that clap fills in every
/// default exactly as it does for `bench compare NAME`. A later option overrides an
/// earlier one, so `--pass` can override a shared option.
#[derive(Parser, Debug)]
#[command(no_binary_name = true, args_override_self = true)]
struct Sub<A: Args> {
    #[command(flatten)]
    args: A,
}

/// What became of one comparison.
enum Outcome {
    /// It ran; its section.
    Done(Box<Section>),
    /// It failed (options, measurement, or a panic); the error.
    Failed(String),
    /// It did not run; why.
    Skipped(String),
}

/// Every comparison in run order (names as in `bench compare NAME` and `--skip`).
const NAMES: [&str; 6] = ["blk", "net", "serial", "guest-blk", "idle", "migrate"];

/// The argument vector for comparison `name` of type `A`: the shared options it accepts,
/// then the `--pass` options meant for it.
fn sub_argv<A: Args>(name: &str, a: &CompareAllArgs) -> Vec<String> {
    let cmd = Sub::<A>::command();
    let has = |long: &str| cmd.get_arguments().any(|x| x.get_long() == Some(long));
    let mut argv = Vec::new();
    if has("out") {
        argv.push(format!("--out={}", a.out.display()));
    }
    if let (Some(r), true) = (a.reps, has("reps")) {
        argv.push(format!("--reps={r}"));
    }
    if let Some(r) = &a.runtime {
        if let Some(opt) = ["runtime", "duration"].into_iter().find(|o| has(o)) {
            argv.push(format!("--{opt}={r}"));
        }
    }
    for p in &a.pass {
        if let Some(opt) = p.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
            argv.push(opt.to_string());
        }
    }
    argv
}

/// Builds the options of comparison `name` and runs it, turning every way it can fail
/// (bad options, an error, a panic) into [`Outcome::Failed`].
fn run<A: Args, E: std::fmt::Display>(
    name: &str,
    a: &CompareAllArgs,
    f: fn(&A) -> Result<Section, E>,
) -> Outcome {
    let argv = sub_argv::<A>(name, a);
    eprintln!("== compare {name} {}", argv.join(" "));
    let sub = match Sub::<A>::try_parse_from(&argv) {
        Ok(s) => s,
        Err(e) => {
            // clap's first line says what is wrong; the usage after it is for a terminal.
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or_default();
            return Outcome::Failed(format!(
                "options {}: {}",
                argv.join(" "),
                first.trim_start_matches("error: ")
            ));
        }
    };
    match catch_unwind(AssertUnwindSafe(|| f(&sub.args))) {
        Ok(Ok(s)) => Outcome::Done(Box::new(s)),
        Ok(Err(e)) => Outcome::Failed(e.to_string()),
        Err(panic) => Outcome::Failed(format!(
            "panicked: {}",
            panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)")
        )),
    }
}

/// Runs every comparison and writes all.md, all.json and all.png (after each comparison,
/// so an interrupted run leaves what it measured). Returns the Markdown when none failed;
/// otherwise prints it and returns an error naming the failed ones.
pub fn compare_all(a: &CompareAllArgs) -> Result<String, CompareError> {
    for s in &a.skip {
        if !NAMES.contains(&s.as_str()) {
            return Err(CompareError::Run(format!(
                "--skip {s}: no such comparison (there are {})",
                NAMES.join(", ")
            )));
        }
    }
    for p in &a.pass {
        if !NAMES
            .iter()
            .any(|n| p.strip_prefix(n).is_some_and(|r| r.starts_with('=')))
        {
            return Err(CompareError::Run(format!(
                "--pass {p}: expected NAME=OPTION with NAME one of {}",
                NAMES.join(", ")
            )));
        }
    }
    // A missing font would otherwise only show after all the measurements.
    crate::compare::chart::load_font().map_err(|e| CompareError::Run(e.to_string()))?;
    std::fs::create_dir_all(&a.out)?;
    // One idle setting for every comparison; put back after the last one is written.
    let _halt_poll = a.halt_poll.apply()?;

    let command = command_line();
    let mut done: Vec<(&str, Outcome)> = Vec::new();
    for name in NAMES {
        let outcome = if a.skip.iter().any(|s| s == name) {
            Outcome::Skipped("left out with --skip".into())
        } else {
            match name {
                "blk" => run::<CompareBlkArgs, _>(name, a, blk::compare_blk),
                "net" => run::<CompareNetArgs, _>(name, a, net::compare_net),
                "serial" => run::<CompareSerialArgs, _>(name, a, serial::compare_serial),
                "guest-blk" => run::<CompareGuestBlkArgs, _>(name, a, guest_blk::compare_guest_blk),
                "idle" => run::<CompareIdleArgs, _>(name, a, idle::compare_idle),
                "migrate" => run::<CompareMigrateArgs, _>(name, a, migrate::compare_migrate),
                other => Outcome::Failed(format!("no such comparison {other}")),
            }
        };
        match &outcome {
            Outcome::Done(_) => eprintln!("== {name}: done"),
            Outcome::Failed(e) => eprintln!("== {name}: FAILED: {e}"),
            Outcome::Skipped(why) => eprintln!("== {name}: skipped: {why}"),
        }
        done.push((name, outcome));
        write_all(&a.out, &command, &done)?;
    }

    let md = markdown(&command, &done);
    let failed: Vec<&str> = done
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Failed(_)))
        .map(|(n, _)| *n)
        .collect();
    if failed.is_empty() {
        Ok(md)
    } else {
        println!("{md}");
        Err(CompareError::Run(format!(
            "{} of {} comparisons failed ({}); see {}",
            failed.len(),
            done.len(),
            failed.join(", "),
            a.out.join("all.md").display()
        )))
    }
}

/// The command as typed, quoted for a shell where needed (recorded with the results).
fn command_line() -> String {
    let quote = |s: String| {
        if !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_./=:,+@%-".contains(c))
        {
            s
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    let mut args = std::env::args();
    let argv0 = args
        .next()
        .map(|p| {
            Path::new(&p)
                .file_name()
                .map_or(p.clone(), |f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "bench".into());
    std::iter::once(argv0)
        .chain(args.map(quote))
        .collect::<Vec<_>>()
        .join(" ")
}

/// all.md: machine, date, command, what became of each comparison, the chart, then every
/// section's table.
fn markdown(command: &str, done: &[(&str, Outcome)]) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# bench compare all\n\nMachine: {}. Date: {}. Command: `{command}`.\n",
        machine(),
        now_utc()
    );
    md.push_str("| comparison | result |\n|---|---|\n");
    for (name, o) in done {
        let r = match o {
            Outcome::Done(s) => {
                // Rows without the first contender's value (ours, e.g. migrate's
                // write-blocking switch-over on a build without it) are a peer baseline
                // or nothing: say so up front.
                let missing = s.rows.iter().filter(|r| r.median(0).is_none()).count();
                match s.contenders.first() {
                    Some(first) if missing > 0 => format!(
                        "done: {} rows, **{first} not measured in {missing}** (see its notes)",
                        s.rows.len()
                    ),
                    _ => format!("done: {} rows", s.rows.len()),
                }
            }
            Outcome::Failed(e) => format!("**FAILED**: {}", one_line(e)),
            Outcome::Skipped(why) => format!("skipped: {why}"),
        };
        let _ = writeln!(md, "| {name} | {r} |");
    }
    md.push_str("\n![ours vs peers](all.png)\n");
    for (_, o) in done {
        if let Outcome::Done(s) = o {
            let _ = write!(md, "\n{}", s.markdown());
        }
    }
    md
}

/// An error message fit for a table cell.
fn one_line(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

/// Writes all.md, all.json and all.png for the comparisons done so far.
fn write_all(out: &Path, command: &str, done: &[(&str, Outcome)]) -> Result<(), CompareError> {
    std::fs::write(out.join("all.md"), markdown(command, done))?;
    let comparisons: Vec<serde_json::Value> = done
        .iter()
        .map(|(name, o)| match o {
            Outcome::Done(_) => serde_json::json!({"name": name, "status": "done"}),
            Outcome::Failed(e) => {
                serde_json::json!({"name": name, "status": "failed", "error": e})
            }
            Outcome::Skipped(why) => {
                serde_json::json!({"name": name, "status": "skipped", "reason": why})
            }
        })
        .collect();
    let sections: Vec<&Section> = done
        .iter()
        .filter_map(|(_, o)| match o {
            Outcome::Done(s) => Some(&**s),
            _ => None,
        })
        .collect();
    let json = serde_json::json!({
        "machine": machine(),
        "date": now_utc(),
        "command": command,
        "comparisons": comparisons,
        "sections": sections.iter().map(|s| s.json()).collect::<Vec<_>>(),
    });
    let text = serde_json::to_string_pretty(&json).map_err(std::io::Error::other)?;
    std::fs::write(out.join("all.json"), text)?;
    // The chart says what is missing from it, so a partial run does not look complete.
    let notes: Vec<String> = done
        .iter()
        .filter_map(|(name, o)| match o {
            Outcome::Done(_) => None,
            Outcome::Failed(e) => Some(format!("{name}: FAILED: {}", one_line(e))),
            Outcome::Skipped(why) => Some(format!("{name}: skipped: {why}")),
        })
        .collect();
    let owned: Vec<Section> = sections.into_iter().cloned().collect();
    crate::compare::chart::write_chart_with_notes(&owned, &notes, &out.join("all.png"))
        .map_err(|e| CompareError::Run(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(args: &[&str]) -> CompareAllArgs {
        Sub::<CompareAllArgs>::try_parse_from(args).unwrap().args
    }

    #[test]
    fn shared_options_go_only_where_they_exist() {
        let a = all(&[
            "--reps",
            "1",
            "--runtime",
            "2s",
            "--out",
            "/tmp/r",
            "--pass",
            "blk=--only=QD32",
            "--pass",
            "idle=--out=/tmp/i",
        ]);
        assert_eq!(
            sub_argv::<CompareBlkArgs>("blk", &a),
            ["--out=/tmp/r", "--reps=1", "--runtime=2s", "--only=QD32"]
        );
        // idle has no --reps, and calls its runtime --duration; a passed option overrides
        // a shared one.
        let argv = sub_argv::<CompareIdleArgs>("idle", &a);
        assert_eq!(argv, ["--out=/tmp/r", "--duration=2s", "--out=/tmp/i"]);
        let idle = Sub::<CompareIdleArgs>::try_parse_from(&argv).unwrap().args;
        assert!(format!("{idle:?}").contains("\"/tmp/i\""), "{idle:?}");
        // Nothing shared given: each comparison's own defaults.
        assert_eq!(
            sub_argv::<CompareBlkArgs>("blk", &all(&[])),
            ["--out=bench/results"]
        );
        assert!(Sub::<CompareBlkArgs>::try_parse_from(["--out=x", "--reps=2"]).is_ok());
    }

    #[test]
    fn bad_options_are_refused_before_anything_runs() {
        assert!(Sub::<CompareAllArgs>::try_parse_from(["--runtime", "soon"]).is_err());
        let e = compare_all(&all(&["--skip", "blk,nope"])).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let e = compare_all(&all(&["--pass", "blkx=--only=1"])).unwrap_err();
        assert!(e.to_string().contains("NAME=OPTION"), "{e}");
    }

    #[test]
    fn failures_and_skips_are_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let section = Section {
            name: "t".into(),
            title: "T".into(),
            description: "d".into(),
            contenders: vec!["ours".into(), "peer".into()],
            ratios: true,
            rows: vec![crate::compare::report::Row {
                case: "c".into(),
                metric: crate::compare::report::IOPS,
                samples: vec![vec![2.0], vec![1.0]],
            }],
            notes: vec![],
        };
        let done = vec![
            ("blk", Outcome::Done(Box::new(section))),
            ("net", Outcome::Failed("no tap |\nhere".into())),
            ("migrate", Outcome::Skipped("left out with --skip".into())),
        ];
        write_all(dir.path(), "bench compare all", &done).unwrap();
        let md = std::fs::read_to_string(dir.path().join("all.md")).unwrap();
        assert!(md.contains("| blk | done: 1 rows |"), "{md}");
        assert!(md.contains("| net | **FAILED**: no tap \\| here |"), "{md}");
        assert!(
            md.contains("| migrate | skipped: left out with --skip |"),
            "{md}"
        );
        assert!(md.contains("Command: `bench compare all`"), "{md}");
        assert!(md.contains("| c | IOPS | 2.00 | 1.00 | 2.00× |"), "{md}");
        let j: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("all.json")).unwrap()).unwrap();
        assert_eq!(j["comparisons"][1]["status"], "failed");
        assert_eq!(j["comparisons"][2]["status"], "skipped");
        assert_eq!(j["sections"].as_array().unwrap().len(), 1);
        let png = std::fs::read(dir.path().join("all.png")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }

    #[test]
    fn a_baseline_without_ours_is_called_out() {
        let s = Section {
            name: "migrate".into(),
            title: "M".into(),
            description: "d".into(),
            contenders: vec!["ours".into(), "peer".into()],
            ratios: false,
            rows: vec![crate::compare::report::Row {
                case: "full copy".into(),
                metric: crate::compare::report::MB_S,
                samples: vec![vec![], vec![900.0]],
            }],
            notes: vec![],
        };
        let md = markdown("c", &[("migrate", Outcome::Done(Box::new(s)))]);
        assert!(
            md.contains("| migrate | done: 1 rows, **ours not measured in 1** (see its notes) |"),
            "{md}"
        );
    }

    #[test]
    fn panics_become_failures() {
        fn boom(_: &CompareIdleArgs) -> Result<Section, CompareError> {
            panic!("boom")
        }
        let o = run::<CompareIdleArgs, _>("idle", &all(&[]), boom);
        assert!(matches!(o, Outcome::Failed(e) if e.contains("boom")));
    }
}
