//! The `migrate*` subcommands: a running backend's control socket drives its migration
//! job. On a terminal they draw a progress bar; otherwise they print JSON lines (one per
//! second and one per state change) for scripts.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vhost_user_device::control::QmpClient;

/// How long `migrate` waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WaitFor {
    /// Until the job is ready (it may then complete).
    Ready,
    /// Until the job has concluded (someone or something completed it, or it failed).
    Completed,
}

/// What `migrate` sends.
#[derive(Clone, Debug)]
pub struct MigrateArgs {
    /// Destination URI.
    pub to: String,
    /// Incremental sync.
    pub incremental: bool,
    /// "background" or "write-blocking".
    pub copy_mode: &'static str,
    /// Bytes per second (None: unlimited).
    pub max_bandwidth: Option<u64>,
    /// When to return.
    pub wait: WaitFor,
}

type CliResult = Result<bool, Box<dyn std::error::Error>>;

fn connect(sock: &Path) -> Result<QmpClient, Box<dyn std::error::Error>> {
    QmpClient::connect(sock)
        .map_err(|e| format!("cannot use the control socket {}: {e}", sock.display()).into())
}

fn run(c: &mut QmpClient, cmd: &str, args: Value) -> Result<Value, Box<dyn std::error::Error>> {
    c.execute(cmd, args)?.map_err(|e| e.desc.into())
}

/// `migrate`: starts the job, prints its id, follows it. Ok(true) when it reached what
/// `--wait` asked for, Ok(false) when it failed.
pub fn migrate(sock: &Path, a: &MigrateArgs) -> CliResult {
    let mut c = connect(sock)?;
    let mut args = json!({"uri": a.to, "incremental": a.incremental, "copy-mode": a.copy_mode});
    if let Some(b) = a.max_bandwidth {
        args["max-bandwidth"] = json!(b);
    }
    let r = run(&mut c, "migrate", args)?;
    let id = r["id"].as_str().unwrap_or("?").to_string();
    let tty = std::io::stdout().is_terminal();
    if tty {
        println!("{id}");
    } else {
        println!("{}", json!({"id": id}));
    }
    follow(&mut c, a.wait, tty)
}

fn follow(c: &mut QmpClient, wait: WaitFor, tty: bool) -> CliResult {
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(1);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg:30} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let mut last_status = String::new();
    let mut last_line = Instant::now() - Duration::from_secs(10);
    loop {
        let q = run(c, "query-migrate", json!({}))?;
        let status = q["status"].as_str().unwrap_or("none").to_string();
        if let Some(b) = &bar {
            b.set_length(q["bytes"]["total"].as_u64().unwrap_or(0).max(1));
            b.set_position(q["bytes"]["sent"].as_u64().unwrap_or(0));
            b.set_message(format!(
                "{} ({})",
                status,
                q["phase"].as_str().unwrap_or("")
            ));
        } else if status != last_status || last_line.elapsed() >= Duration::from_secs(1) {
            println!("{q}");
            let _ = std::io::stdout().flush();
            last_line = Instant::now();
        }
        last_status.clone_from(&status);
        let done = match status.as_str() {
            "concluded" | "none" => true,
            "ready" => wait == WaitFor::Ready,
            _ => false,
        };
        if done {
            if let Some(b) = &bar {
                b.finish_with_message(status.clone());
            }
            return match q.get("error") {
                Some(e) => {
                    eprintln!(
                        "migration failed: {}",
                        e.as_str().unwrap_or("unknown error")
                    );
                    Ok(false)
                }
                None => Ok(status != "none"),
            };
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `migrate-status`: the job as a table, or its JSON.
pub fn status(sock: &Path, as_json: bool) -> CliResult {
    let mut c = connect(sock)?;
    let q = run(&mut c, "query-migrate", json!({}))?;
    if as_json {
        println!("{q}");
        return Ok(q.get("error").is_none());
    }
    let row = |k: &str, v: String| println!("{k:<22} {v}");
    row("job", q["id"].as_str().unwrap_or("-").into());
    row("status", q["status"].as_str().unwrap_or("none").into());
    row("phase", q["phase"].as_str().unwrap_or("-").into());
    row("mode", q["mode"].as_str().unwrap_or("-").into());
    for k in ["total", "sent", "remaining", "data", "zero", "wire"] {
        row(&format!("bytes {k}"), q["bytes"][k].to_string());
    }
    for k in [
        "passes",
        "throughput",
        "dirty-rate",
        "max-bandwidth",
        "expected-downtime-ms",
        "eta-seconds",
        "downtime-ms",
        "error",
    ] {
        if let Some(v) = q.get(k) {
            row(k, v.to_string());
        }
    }
    Ok(q.get("error").is_none())
}

/// `migrate-cancel` and `migrate-complete`.
pub fn simple(sock: &Path, cmd: &str) -> CliResult {
    let mut c = connect(sock)?;
    run(&mut c, cmd, json!({}))?;
    Ok(true)
}
