//! What every backend program's `main` does, per QEMU's backend program conventions.

use std::error::Error;
use std::os::fd::RawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use serde_json::Value;

use crate::control::{ControlError, ControlHandler, ControlServer, LayerControl, QmpClient};
use crate::metrics::MetricsServer;
use crate::server::ServerState;

use crate::sandbox::{self, Profile, SandboxError, SandboxMode};
use crate::server::{listen_fd, listen_path, ServerError};

/// The flags every backend program takes (QEMU's backend program conventions); flatten
/// into the program's clap arguments with `#[command(flatten)]`.
#[derive(clap::Args, Debug)]
pub struct ListenArgs {
    /// Unix socket to listen on for the VMM (a stale socket file is replaced).
    #[arg(long, value_name = "PATH", required_unless_present_any = ["fd", "print_capabilities"], conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,

    /// Listen on this inherited, already listening unix socket instead of --socket-path.
    #[arg(long, value_name = "FDNUM")]
    pub fd: Option<RawFd>,

    /// Print the backend's capabilities as JSON (vhost-user.json schema) and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// After start-up, confine every thread with a seccomp filter that allows only the
    /// system calls its kind of thread needs ("seccomp"; a denied call ends the process
    /// with a message naming it), only log would-be denials to the kernel log ("log"), or
    /// run without ("none"). Also taken from VHOST_SANDBOX.
    #[arg(long, value_enum, env = "VHOST_SANDBOX", default_value_t = SandboxMode::Seccomp)]
    pub sandbox: SandboxMode,

    /// Test hook: make a forbidden system call right after the main thread entered the
    /// sandbox.
    #[arg(long, hide = true)]
    pub sandbox_selftest: bool,

    /// Serve QMP (QEMU's machine protocol; qmp-shell works) on this Unix socket:
    /// query-status, query-stats (per-queue and device counters; the `stats` subcommand
    /// prints them), query-version, the VHOST_USER_CONNECTED / VHOST_USER_DISCONNECTED
    /// events, and the program's own commands (vhost-blk-backend: migrate, query-migrate,
    /// migrate-set-speed, migrate-cancel, migrate-complete). Mode 0600; other users are refused.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Serve the counters of query-stats for Prometheus at http://ADDR:PORT/metrics
    /// (OpenMetrics text: `<program>_<counter>_total`, per-queue samples labelled
    /// `queue`, serial-backend's per-port samples `port` and `name`). Anyone who can reach the address can read the counters: bind it to
    /// loopback or a management network. Port 0 picks a free port (logged).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl ListenArgs {
    /// The listening socket: `--socket-path` bound now, or the inherited `--fd`.
    pub fn listener(&self) -> Result<UnixListener, ServerError> {
        match (&self.socket_path, self.fd) {
            (Some(p), _) => listen_path(p),
            (None, Some(fd)) => listen_fd(fd),
            (None, None) => Err(ServerError::NoListener),
        }
    }

    /// Sets up the sandbox (`--sandbox`) with the backend's per-thread additions; call it
    /// at the start of `run`, before any thread is created. The threads enter it later:
    /// the main thread in [`crate::Server::serve`], the others as they start.
    pub fn sandbox(&self, profile: Profile) -> Result<(), SandboxError> {
        sandbox::configure(self.sandbox, profile, self.sandbox_selftest)
    }

    /// Starts the control socket (`--control-socket`, if given) for the server whose state
    /// is `state`, with the device's `handler`; see [`ControlServer::start_for`]. Call it
    /// before [`crate::Server::serve`]: its threads enter the sandbox as they start.
    pub fn start_control(
        &self,
        program: &'static str,
        version: &'static str,
        state: &Arc<ServerState>,
        handler: Arc<dyn ControlHandler>,
    ) -> Result<Option<ControlServer>, ControlError> {
        self.control_socket
            .as_deref()
            .map(|p| ControlServer::start_for(p, program, version, state.clone(), handler))
            .transpose()
    }
}

impl ListenArgs {
    /// Starts `--control-socket` and `--metrics-addr`, whichever were given, both for
    /// `handler`'s device on the server whose state is `state`. Keep both until exit.
    pub fn start_services(
        &self,
        program: &'static str,
        version: &'static str,
        state: &Arc<ServerState>,
        handler: Arc<dyn ControlHandler>,
    ) -> Result<(Option<ControlServer>, Option<MetricsServer>), ControlError> {
        let control = self.start_control(program, version, state, handler.clone())?;
        let metrics = self.start_metrics(program, version, state, handler)?;
        Ok((control, metrics))
    }

    /// Starts `--metrics-addr`, if given: the same counters as the control socket's
    /// query-stats, for `handler`'s device on the server whose state is `state`.
    pub fn start_metrics(
        &self,
        program: &'static str,
        version: &'static str,
        state: &Arc<ServerState>,
        handler: Arc<dyn ControlHandler>,
    ) -> Result<Option<MetricsServer>, ControlError> {
        self.metrics_addr
            .map(|addr| {
                let layer = LayerControl::new(program, version, state.clone(), handler);
                MetricsServer::start(addr, program, layer)
                    .map_err(|source| ControlError::Metrics { addr, source })
            })
            .transpose()
    }
}

/// The subcommands every backend program has: clients of a running backend's
/// `--control-socket`. Flatten into the program's subcommands, or use as they are.
#[derive(clap::Subcommand, Debug)]
pub enum ClientCommand {
    /// Print a running backend's counters (query-stats on its control socket): the
    /// device's, then one row per port (serial-backend) and one row per queue.
    Stats(StatsArgs),
}

/// Arguments of the `stats` subcommand.
#[derive(clap::Args, Debug)]
pub struct StatsArgs {
    /// The running backend's --control-socket.
    #[arg(long, value_name = "SOCK")]
    pub control_socket: PathBuf,
    /// Print query-stats' JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl ClientCommand {
    /// Runs the subcommand; errors go to stderr, the exit status says whether it worked.
    pub fn run(&self) -> ExitCode {
        let r = match self {
            ClientCommand::Stats(a) => print_stats(&a.control_socket, a.json),
        };
        match r {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    }
}

/// Runs `query-stats` on the control socket at `path` and prints it.
pub fn print_stats(path: &Path, json: bool) -> Result<(), ControlError> {
    let client_err = |source| ControlError::Client {
        path: path.display().to_string(),
        source,
    };
    let mut c = QmpClient::connect(path).map_err(client_err)?;
    let v = c
        .execute("query-stats", serde_json::json!({}))
        .map_err(client_err)?
        .map_err(|e| ControlError::Command {
            command: "query-stats".into(),
            desc: e.desc,
        })?;
    if json {
        println!("{v}");
    } else {
        print!("{}", stats_table(&v));
    }
    Ok(())
}

/// Flattens nested objects and arrays into `prefix.key` / `prefix.index` pairs.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                flatten(&format!("{prefix}.{i}"), v, out);
            }
        }
        Value::Object(m) => {
            // A latency histogram: its summary, not its 30-odd bins and bounds.
            if let Some(summary) = crate::histogram::summarize(v) {
                for (k, s) in summary {
                    out.push((format!("{prefix}.{k}"), s));
                }
                return;
            }
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        v => out.push((prefix.to_string(), v.to_string())),
    }
}

/// The arrays of `query-stats` printed as tables, in this order, each with its first
/// columns (those that name a row, then the main counters): serial's ports, then the
/// virtqueues.
const TABLES: [(&str, &[&str]); 2] = [
    (
        "ports",
        &["port", "name", "guest-open", "tx-bytes", "rx-bytes"],
    ),
    ("queues", &["queue", "role"]),
];

/// `query-stats` as text: the device's counters one per line, then a table with one row
/// per port (serial) and one with a row per queue, each with one column per counter any
/// row has.
pub fn stats_table(stats: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut device = Vec::new();
    if let Some(m) = stats.as_object() {
        for (k, v) in m.iter().filter(|(k, _)| TABLES.iter().all(|(t, _)| t != k)) {
            flatten(k, v, &mut device);
        }
    }
    let width = device.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in &device {
        let _ = writeln!(out, "{k:<width$}  {v:>12}");
    }
    for (name, first) in TABLES {
        let Some(items) = stats.get(name).and_then(Value::as_array) else {
            continue;
        };
        let t = table(items, first);
        if t.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&t);
    }
    out
}

/// `items` (objects) as a table: a header line, then one row per item; the columns
/// `first` (those any item has) come first, then every other field by name; "-" where
/// an item lacks one.
fn table(items: &[Value], first: &[&str]) -> String {
    use std::fmt::Write as _;
    let rows: Vec<Vec<(String, String)>> = items
        .iter()
        .map(|q| {
            let mut r = Vec::new();
            flatten("", q, &mut r);
            r
        })
        .collect();
    let mut columns: Vec<String> = first.iter().map(|c| c.to_string()).collect();
    columns.retain(|c| rows.iter().any(|r| r.iter().any(|(k, _)| k == c)));
    for r in &rows {
        for (k, _) in r {
            if !columns.contains(k) {
                columns.push(k.clone());
            }
        }
    }
    if columns.is_empty() {
        return String::new();
    }
    let cell = |r: &[(String, String)], c: &str| {
        r.iter()
            .find(|(k, _)| k == c)
            .map_or_else(|| "-".to_string(), |(_, v)| v.clone())
    };
    let widths: Vec<usize> = columns
        .iter()
        .map(|c| {
            rows.iter()
                .map(|r| cell(r, c).len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = String::new();
    let _ = writeln!(out, "{}", line(columns.clone()));
    for r in &rows {
        let _ = writeln!(
            out,
            "{}",
            line(columns.iter().map(|c| cell(r, c)).collect())
        );
    }
    out
}

/// Logs to stderr (level from RUST_LOG, default info); with `--print-capabilities` prints
/// `capabilities` (the vhost-user.json document) and exits 0; otherwise runs `run`, and
/// turns an error into one log line and exit status 1.
pub fn backend_main(
    print_capabilities: bool,
    capabilities: &str,
    run: impl FnOnce() -> Result<(), Box<dyn Error>>,
) -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if print_capabilities {
        println!("{capabilities}");
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Parses a byte count or rate as the command line takes it: a number with an optional
/// suffix k, M, G or T (powers of 1024, as QEMU's size options; case-insensitive, an
/// optional trailing "B" or "iB"): `4096`, `64k`, `20M`, `1GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                _ => return Err(format!("{s:?}: unknown unit {c:?} (use k, M, G or T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes (e.g. 4096, 64k, 20M)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::{parse_size, stats_table};

    #[test]
    fn the_stats_table_has_device_lines_and_a_row_per_queue() {
        let v = serde_json::json!({
            "writes": 10,
            "drops": {"short": 1},
            "pairs": [{"rx": 3}],
            "queues": [
                {"queue": 0, "chains": 10, "role": "rx0"},
                {"queue": 1, "chains": 123456, "extra": 5},
            ],
        });
        let t = stats_table(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("writes") && l.ends_with(" 10")),
            "{t}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("drops.short") && l.ends_with(" 1")),
            "{t}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("pairs.0.rx") && l.ends_with(" 3")),
            "{t}"
        );
        let head = lines.iter().position(|l| l.contains("chains")).unwrap();
        let cols: Vec<&str> = lines[head].split_whitespace().collect();
        assert_eq!(cols, ["queue", "role", "chains", "extra"]);
        let r0: Vec<&str> = lines[head + 1].split_whitespace().collect();
        assert_eq!(r0, ["0", "rx0", "10", "-"]);
        let r1: Vec<&str> = lines[head + 2].split_whitespace().collect();
        assert_eq!(r1, ["1", "-", "123456", "5"]);
        assert_eq!(lines.len(), head + 3);
    }

    #[test]
    fn ports_get_a_table_of_their_own_before_the_queues() {
        let v = serde_json::json!({
            "tx-bytes": 12,
            "ports": [
                {"port": 0, "tx-bytes": 5, "console-dropped": 0},
                {"port": 2, "name": "org.example.log", "tx-bytes": 7},
            ],
            "queues": [{"queue": 0, "chains": 1, "role": "port0-rx"}],
        });
        let t = stats_table(&v);
        let lines: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(lines[0], ["tx-bytes", "12"], "{t}");
        assert!(lines[1].is_empty(), "{t}");
        assert_eq!(
            lines[2],
            ["port", "name", "tx-bytes", "console-dropped"],
            "{t}"
        );
        assert_eq!(lines[3], ["0", "-", "5", "0"], "{t}");
        assert_eq!(lines[4], ["2", "org.example.log", "7", "-"], "{t}");
        assert!(lines[5].is_empty(), "{t}");
        assert_eq!(lines[6], ["queue", "role", "chains"], "{t}");
        assert_eq!(lines[7], ["0", "port0-rx", "1"], "{t}");
        assert_eq!(lines.len(), 8, "{t}");
    }

    #[test]
    fn sizes_with_and_without_units() {
        for (s, n) in [
            ("4096", 4096),
            ("64k", 64 << 10),
            ("64K", 64 << 10),
            ("20M", 20 << 20),
            ("1GiB", 1 << 30),
            ("2GB", 2 << 30),
            ("1T", 1 << 40),
            (" 7 ", 7),
        ] {
            assert_eq!(parse_size(s), Ok(n), "{s}");
        }
        for s in ["", "k", "12x", "-1", "1.5M", "99999999999999T"] {
            assert!(parse_size(s).is_err(), "{s}");
        }
    }
}
