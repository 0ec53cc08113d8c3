//! What serial-backend adds on its control socket (`--control-socket`) to the layer's
//! commands: its ports in query-status, the device counters in query-stats (the device
//! counts per device, not per port), and which port each queue belongs to.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use vhost_user_device::control::ControlHandler;

use crate::device::Shared;

/// The console device's part of query-status and query-stats.
pub struct SerialControl {
    shared: Arc<Shared>,
}

impl SerialControl {
    /// For the device sharing `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// The role of virtqueue `index` (virtio-console: port 0's receiveq and transmitq, the
/// control queues, then two per port from port 1 on; "rx" is host to guest).
pub fn queue_role(index: usize) -> String {
    match index {
        0 => "port0-rx".into(),
        1 => "port0-tx".into(),
        2 => "control-rx".into(),
        3 => "control-tx".into(),
        i => format!(
            "port{}-{}",
            i / 2 - 1,
            if i.is_multiple_of(2) { "rx" } else { "tx" }
        ),
    }
}

impl ControlHandler for SerialControl {
    fn status(&self) -> Map<String, Value> {
        let ports: Vec<Value> = self
            .shared
            .ports
            .iter()
            .map(|p| {
                json!({
                    "id": p.id,
                    "name": p.name,
                    "console": p.console,
                    "host": p.host,
                })
            })
            .collect();
        object(json!({"max-ports": self.shared.max_ports, "ports": ports}))
    }

    fn device_stats(&self) -> Map<String, Value> {
        let s = &self.shared.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        object(json!({
            "tx-bytes": g(&s.tx_bytes),
            "rx-bytes": g(&s.rx_bytes),
            "control-in": g(&s.control_in),
            "control-out": g(&s.control_out),
            "bad-input": g(&s.bad_input),
            "console-dropped": g(&s.console_dropped),
            "tx-dropped": g(&s.tx_dropped),
            "host-write-errors": g(&s.host_write_errors),
            "emerg-chars": g(&s.emerg_chars),
            "connects": g(&s.connects),
        }))
    }

    fn queue_stats(&self, index: usize) -> Map<String, Value> {
        object(json!({"role": queue_role(index)}))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn queue_roles() {
        let r: Vec<String> = (0..8).map(super::queue_role).collect();
        assert_eq!(
            r,
            [
                "port0-rx",
                "port0-tx",
                "control-rx",
                "control-tx",
                "port1-rx",
                "port1-tx",
                "port2-rx",
                "port2-tx"
            ]
        );
    }
}
