//! What vhost-blk-backend adds on its control socket (`--control-socket`) to the layer's
//! commands: its fields of query-status and query-stats, and the migration commands.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Map, Value};
use vhost_user_device::control::{ControlHandler, QmpError};

use crate::migration::job::{CopyMode, JobError, JobParams, Migrations};
use crate::shared::BlkShared;
use crate::throttle::{Limits, NAMES};

/// The blk commands.
pub struct BlkControl {
    shared: Arc<BlkShared>,
    migrations: Arc<Migrations>,
}

impl BlkControl {
    /// Commands for the device sharing `shared`, with its migration jobs.
    pub fn new(shared: Arc<BlkShared>, migrations: Arc<Migrations>) -> Self {
        Self { shared, migrations }
    }
}

/// Refuses arguments a command does not take (QEMU does the same).
fn only(args: &Map<String, Value>, allowed: &[&str]) -> Result<(), QmpError> {
    match args.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
        None => Ok(()),
    }
}

fn job_error(e: JobError) -> QmpError {
    QmpError::generic(e.to_string())
}

fn u64_arg(args: &Map<String, Value>, name: &str) -> Result<Option<u64>, QmpError> {
    match args.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| QmpError::bad_argument(name, "a non-negative integer")),
    }
}

/// The arguments of `set-io-throttle`, checked, applied over `current`: the names of
/// QEMU's block_set_io_throttle (iops, iops_rd, iops_wr, bps, bps_rd, bps_wr and their
/// `*_max` bursts; 0 = unlimited). Those not given keep their value. QEMU's `device`,
/// `id` and `group` name the disk, which is implied here: accepted as strings, ignored.
pub fn throttle_params(args: &Map<String, Value>, current: Limits) -> Result<Limits, QmpError> {
    let mut allowed: Vec<&str> = NAMES.to_vec();
    allowed.extend(["device", "id", "group"]);
    only(args, &allowed)?;
    for k in ["device", "id", "group"] {
        if args.get(k).is_some_and(|v| !v.is_string()) {
            return Err(QmpError::bad_argument(k, "a string"));
        }
    }
    let mut limits = current;
    for name in NAMES {
        if let Some(v) = u64_arg(args, name)? {
            limits.set(name, v);
        }
    }
    limits.check().map_err(QmpError::generic)?;
    Ok(limits)
}

/// The limits as JSON (query-status' `io-throttle`).
pub fn limits_json(limits: &Limits) -> Value {
    let m: Map<String, Value> = NAMES
        .iter()
        .map(|n| ((*n).to_string(), json!(limits.get(n).unwrap_or(0))))
        .collect();
    Value::Object(m)
}

/// The arguments of `migrate`, checked: `uri` (a string: `tcp:HOST:PORT`, `unix:PATH`
/// or `fd:N`), `incremental` (a boolean), `copy-mode` (`background` or `write-blocking`),
/// `max-bandwidth` (bytes/s, 0 = unlimited); nothing else.
pub fn migrate_params(args: &Map<String, Value>) -> Result<JobParams, QmpError> {
    only(args, &["uri", "incremental", "copy-mode", "max-bandwidth"])?;
    let uri = match args.get("uri") {
        Some(Value::String(s)) => s.parse().map_err(QmpError::generic)?,
        _ => return Err(QmpError::bad_argument("uri", "a string")),
    };
    let incremental = match args.get("incremental") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(QmpError::bad_argument("incremental", "a boolean")),
    };
    let copy_mode = match args.get("copy-mode").map(|v| v.as_str()) {
        None | Some(Some("background")) => CopyMode::Background,
        Some(Some("write-blocking")) => CopyMode::WriteBlocking,
        Some(_) => {
            return Err(QmpError::bad_argument(
                "copy-mode",
                "'background' or 'write-blocking'",
            ))
        }
    };
    let max_bandwidth = u64_arg(args, "max-bandwidth")?.unwrap_or(0);
    Ok(JobParams {
        uri,
        incremental,
        copy_mode,
        max_bandwidth,
    })
}

impl ControlHandler for BlkControl {
    fn commands(&self) -> Vec<&'static str> {
        vec![
            "migrate",
            "query-migrate",
            "migrate-set-speed",
            "migrate-cancel",
            "migrate-complete",
            "set-io-throttle",
        ]
    }

    fn held(&self) -> bool {
        !self.shared.gate.is_open()
    }

    fn status(&self) -> Map<String, Value> {
        let st = self.shared.sync.lock().unwrap_or_else(|e| e.into_inner());
        let v = json!({
            "image": self.shared.disk.path().display().to_string(),
            "size": self.shared.disk.size,
            "image-id": st.checkpoint.image_uuid(),
            "generation": st.checkpoint.generation,
            "incomplete": st.incomplete,
            "dirty-bytes": self.shared.dirty.dirty_bytes(),
            "dirty-granularity": self.shared.dirty.granularity(),
            "io-throttle": limits_json(&self.shared.io_limits()),
        });
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    fn device_stats(&self) -> Map<String, Value> {
        let s = &self.shared.stats;
        let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let t = self.shared.totals();
        let v = json!({
            "reads": t.reads,
            "writes": t.writes,
            "read-bytes": t.read_bytes,
            "write-bytes": t.write_bytes,
            "flushes": g(&s.flushes),
            "bad-requests": g(&s.bad_requests),
            "too-large": g(&s.too_large),
            "io-errors": g(&s.io_errors),
            "dropped": g(&s.dropped),
            "bounced": g(&s.bounced),
            "fixed-buffer-ios": g(&s.fixed_buffer_ios),
            "pinned-bytes": self.shared.pin.as_ref().map_or(0, |p| p.pinned()),
            "in-flight": self.shared.in_flight(),
            "in-flight-peak": g(&s.in_flight_peak),
            "teardown-waited": g(&s.teardown_waited),
            "teardown-leaked": g(&s.teardown_leaked),
            "throttled": g(&s.throttled),
            "throttle-wait-ms": g(&s.throttle_wait_us) / 1000,
        });
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    fn queue_stats(&self, index: usize) -> Map<String, Value> {
        let Some(q) = self.shared.queue_stats.get(index) else {
            return Map::new();
        };
        let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let v = json!({
            "reads": g(&q.reads),
            "writes": g(&q.writes),
            "read-bytes": g(&q.read_bytes),
            "write-bytes": g(&q.write_bytes),
            "flushes": g(&q.flushes),
            "bad-requests": g(&q.bad_requests),
            "io-errors": g(&q.io_errors),
            "latency-histogram": q.latency.to_json(),
        });
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    fn execute(&self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        match command {
            "migrate" => {
                let id = self
                    .migrations
                    .start(migrate_params(args)?)
                    .map_err(job_error)?;
                Ok(json!({"id": id}))
            }
            "query-migrate" => {
                only(args, &[])?;
                Ok(self
                    .migrations
                    .query()
                    .unwrap_or_else(|| json!({"status": "none"})))
            }
            "migrate-set-speed" => {
                only(args, &["value"])?;
                let v = u64_arg(args, "value")?
                    .ok_or_else(|| QmpError::bad_argument("value", "a non-negative integer"))?;
                self.migrations.set_speed(v).map_err(job_error)?;
                Ok(json!({}))
            }
            "migrate-cancel" => {
                only(args, &[])?;
                self.migrations.cancel().map_err(job_error)?;
                Ok(json!({}))
            }
            "migrate-complete" => {
                only(args, &[])?;
                self.migrations.complete().map_err(job_error)?;
                Ok(json!({}))
            }
            "set-io-throttle" => {
                let limits = throttle_params(args, self.shared.io_limits())?;
                self.shared.set_io_limits(limits);
                Ok(json!({}))
            }
            c => Err(QmpError::not_found(c)),
        }
    }
}
