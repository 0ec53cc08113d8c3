//! The `set-io-throttle` subcommand: changes a running backend's I/O limits through its
//! control socket (QMP `set-io-throttle`, the names of QEMU's block_set_io_throttle) and
//! prints the limits in force afterwards (query-status' `io-throttle`).
//!
//! The flags are those that set the limits at start (`--iops-limit`, `--bandwidth-limit`,
//! `--iops-burst`, ...), so a command line's limits can be changed with the same words;
//! the backend's messages, which use QEMU's names, are shown with the flags' names.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use vhost_user_device::control::QmpClient;
use vhost_user_device::program::parse_size;

use crate::throttle::NAMES;

/// Arguments of `set-io-throttle`.
#[derive(clap::Args, Debug)]
pub struct SetIoThrottleArgs {
    /// The running backend's --control-socket.
    #[arg(long, value_name = "SOCK")]
    pub control_socket: PathBuf,

    /// Requests per second, reads and writes together (QEMU's iops; 0: unlimited).
    #[arg(long, value_name = "N")]
    pub iops_limit: Option<u64>,

    /// Read requests per second (QEMU's iops_rd; 0: unlimited).
    #[arg(long, value_name = "N")]
    pub iops_read_limit: Option<u64>,

    /// Write requests per second (QEMU's iops_wr; 0: unlimited).
    #[arg(long, value_name = "N")]
    pub iops_write_limit: Option<u64>,

    /// Bytes per second, read and written together (QEMU's bps); suffixes k, M, G (e.g.
    /// 20M); 0: unlimited.
    #[arg(long, value_name = "RATE", value_parser = parse_size)]
    pub bandwidth_limit: Option<u64>,

    /// Bytes read per second (QEMU's bps_rd); suffixes k, M, G; 0: unlimited.
    #[arg(long, value_name = "RATE", value_parser = parse_size)]
    pub bandwidth_read_limit: Option<u64>,

    /// Bytes written per second (QEMU's bps_wr); suffixes k, M, G; 0: unlimited.
    #[arg(long, value_name = "RATE", value_parser = parse_size)]
    pub bandwidth_write_limit: Option<u64>,

    /// Burst of --iops-limit, at least the limit (QEMU's iops_max; 0: a tenth of a
    /// second's worth).
    #[arg(long, value_name = "N")]
    pub iops_burst: Option<u64>,

    /// Burst of --iops-read-limit (QEMU's iops_rd_max; 0: the default).
    #[arg(long, value_name = "N")]
    pub iops_read_burst: Option<u64>,

    /// Burst of --iops-write-limit (QEMU's iops_wr_max; 0: the default).
    #[arg(long, value_name = "N")]
    pub iops_write_burst: Option<u64>,

    /// Burst of --bandwidth-limit in bytes, suffixes k, M, G (QEMU's bps_max; 0: the
    /// default).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub bandwidth_burst: Option<u64>,

    /// Burst of --bandwidth-read-limit (QEMU's bps_rd_max; 0: the default).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub bandwidth_read_burst: Option<u64>,

    /// Burst of --bandwidth-write-limit (QEMU's bps_wr_max; 0: the default).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub bandwidth_write_burst: Option<u64>,

    /// Print the limits in force as query-status' `io-throttle` JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The flag of each of [`NAMES`], in that order.
const FLAGS: [&str; 12] = [
    "--iops-limit",
    "--iops-read-limit",
    "--iops-write-limit",
    "--bandwidth-limit",
    "--bandwidth-read-limit",
    "--bandwidth-write-limit",
    "--iops-burst",
    "--iops-read-burst",
    "--iops-write-burst",
    "--bandwidth-burst",
    "--bandwidth-read-burst",
    "--bandwidth-write-burst",
];

/// Why `set-io-throttle` failed.
#[derive(Debug, thiserror::Error)]
pub enum ThrottleClientError {
    /// The control socket could not be reached or answered badly.
    #[error("cannot use the control socket {path}: {source} (is the backend running with --control-socket {path}?)")]
    Socket {
        /// The socket.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The backend refused the limits (nothing changed).
    #[error("the backend refused the limits: {0} (nothing changed; the limits not given keep their value, 0 lifts one)")]
    Refused(String),
    /// A command the backend should answer failed.
    #[error("{command}: {desc}")]
    Command {
        /// The QMP command.
        command: &'static str,
        /// The backend's message.
        desc: String,
    },
    /// query-status has no `io-throttle`.
    #[error("query-status has no io-throttle: is {0} a vhost-blk-backend's control socket?")]
    NotBlk(String),
}

impl SetIoThrottleArgs {
    /// The values given, by their QMP name.
    fn given(&self) -> Map<String, Value> {
        let values = [
            self.iops_limit,
            self.iops_read_limit,
            self.iops_write_limit,
            self.bandwidth_limit,
            self.bandwidth_read_limit,
            self.bandwidth_write_limit,
            self.iops_burst,
            self.iops_read_burst,
            self.iops_write_burst,
            self.bandwidth_burst,
            self.bandwidth_read_burst,
            self.bandwidth_write_burst,
        ];
        NAMES
            .iter()
            .zip(values)
            .filter_map(|(n, v)| v.map(|v| ((*n).to_string(), Value::from(v))))
            .collect()
    }
}

/// `message` with every QMP limit name (`iops_rd`) replaced by its flag
/// (`--iops-read-limit`); other words stay.
pub fn with_flag_names(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        match NAMES.iter().position(|n| *n == word.as_str()) {
            Some(i) => out.push_str(FLAGS[i]),
            None => out.push_str(word),
        }
        word.clear();
    };
    for c in message.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// The limits as a table: one line per limit, its QMP name, its flag and its value
/// (0 shown as unlimited, or for a burst as the default).
pub fn limits_table(limits: &Map<String, Value>) -> String {
    let mut out = String::new();
    for (i, (name, flag)) in NAMES.iter().zip(FLAGS).enumerate() {
        let v = limits.get(*name).and_then(Value::as_u64).unwrap_or(0);
        let shown = match (v, i < 6) {
            (0, true) => "0 (unlimited)".to_string(),
            (0, false) => "0 (default)".to_string(),
            (v, _) => v.to_string(),
        };
        out.push_str(&format!("{name:<12} {flag:<24} {shown}\n"));
    }
    out
}

/// Sends the limits given to the backend at `args.control_socket` (none given: changes
/// nothing), then prints the limits in force.
pub fn run(args: &SetIoThrottleArgs) -> Result<(), ThrottleClientError> {
    let path = &args.control_socket;
    let mut c = connect(path)?;
    let given = args.given();
    if !given.is_empty() {
        c.execute("set-io-throttle", Value::Object(given))
            .map_err(|source| socket_error(path, source))?
            .map_err(|e| {
                // QmpClient puts the error's class first; the message is what helps.
                let desc = e.desc.strip_prefix("GenericError: ").unwrap_or(&e.desc);
                ThrottleClientError::Refused(with_flag_names(desc))
            })?;
    }
    let status = c
        .execute("query-status", Value::Object(Map::new()))
        .map_err(|source| socket_error(path, source))?
        .map_err(|e| ThrottleClientError::Command {
            command: "query-status",
            desc: e.desc,
        })?;
    let Some(limits) = status.get("io-throttle").and_then(Value::as_object) else {
        return Err(ThrottleClientError::NotBlk(path.display().to_string()));
    };
    if args.json {
        println!("{}", Value::Object(limits.clone()));
    } else {
        print!("{}", limits_table(limits));
    }
    Ok(())
}

fn socket_error(path: &Path, source: std::io::Error) -> ThrottleClientError {
    ThrottleClientError::Socket {
        path: path.display().to_string(),
        source,
    }
}

fn connect(path: &Path) -> Result<QmpClient, ThrottleClientError> {
    QmpClient::connect(path).map_err(|source| socket_error(path, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qmp_names_in_messages_become_flags() {
        assert_eq!(
            with_flag_names("iops cannot be combined with iops_rd or iops_wr"),
            "--iops-limit cannot be combined with --iops-read-limit or --iops-write-limit"
        );
        assert_eq!(
            with_flag_names("bps_wr_max (1024) must not be smaller than bps_wr (2048)"),
            "--bandwidth-write-burst (1024) must not be smaller than --bandwidth-write-limit (2048)"
        );
        // Words that merely contain a name stay.
        assert_eq!(with_flag_names("iopsx bps_"), "iopsx bps_");
    }

    #[test]
    fn the_table_has_every_limit_and_says_what_0_means() {
        let mut m = Map::new();
        m.insert("iops".into(), Value::from(500));
        m.insert("bps_wr_max".into(), Value::from(4096));
        let t = limits_table(&m);
        let lines: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(lines.len(), 12, "{t}");
        assert_eq!(lines[0], ["iops", "--iops-limit", "500"], "{t}");
        assert_eq!(
            lines[1],
            ["iops_rd", "--iops-read-limit", "0", "(unlimited)"],
            "{t}"
        );
        assert_eq!(
            lines[6],
            ["iops_max", "--iops-burst", "0", "(default)"],
            "{t}"
        );
        assert_eq!(
            lines[11],
            ["bps_wr_max", "--bandwidth-write-burst", "4096"],
            "{t}"
        );
    }
}
