//! What serial-backend adds on its control socket (`--control-socket`) to the layer's
//! commands: its ports in query-status; in query-stats the device's counters, the same
//! counters per port (`ports`, whose sums are the device's), and which port each queue
//! belongs to.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use vhost_user_device::control::ControlHandler;

use crate::shared::{PortInfo, Shared};
use crate::stats::Counter;

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

/// One port's entry of query-stats' `ports`: its id as `port` (the metrics exporter
/// labels its samples `port="N"`, as a queue's are `queue="N"`), its name if it has one
/// (a label too), and the counters that apply to it: `console-dropped` for consoles,
/// `connects` and `disconnects` for socket ports. `guest-open` is 1 while the guest has
/// the port open.
fn port_stats(info: &PortInfo) -> Value {
    let s = &info.stats;
    let mut m = Map::new();
    m.insert("port".into(), json!(info.id));
    if let Some(n) = &info.name {
        m.insert("name".into(), json!(n));
    }
    let mut counters = vec![
        ("tx-bytes", Counter::TxBytes),
        ("rx-bytes", Counter::RxBytes),
        ("tx-dropped", Counter::TxDropped),
        ("host-write-errors", Counter::HostWriteErrors),
    ];
    if info.console {
        counters.push(("console-dropped", Counter::ConsoleDropped));
    }
    if info.socket {
        counters.push(("connects", Counter::Connects));
        counters.push(("disconnects", Counter::Disconnects));
    }
    for (k, c) in counters {
        m.insert(k.into(), json!(s.get(c)));
    }
    m.insert(
        "guest-open".into(),
        json!(u8::from(s.guest_open.load(Ordering::Relaxed))),
    );
    Value::Object(m)
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
            "disconnects": g(&s.disconnects),
            "ports": self.shared.ports.iter().map(port_stats).collect::<Vec<_>>(),
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
