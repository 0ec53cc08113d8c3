//! What vhost-net-backend adds on its control socket (`--control-socket`) to the layer's
//! commands: per queue its packet, byte and drop counters, and the control queue's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use vhost_user_device::control::ControlHandler;

use crate::stats::DropReason;
use crate::NetShared;

/// The net device's part of query-status and query-stats.
pub struct NetControl {
    shared: Arc<NetShared>,
}

impl NetControl {
    /// For the device sharing `shared`.
    pub fn new(shared: Arc<NetShared>) -> Self {
        Self { shared }
    }
}

fn g(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

impl ControlHandler for NetControl {
    fn status(&self) -> Map<String, Value> {
        object(json!({
            "tap": self.shared.tap.name,
            "queue-pairs": self.shared.opts.pairs,
            "active-pairs": self.shared.active_pairs.load(Ordering::Relaxed),
        }))
    }

    fn device_stats(&self) -> Map<String, Value> {
        let s = &self.shared.stats;
        // Per queue pair: RX is virtqueue 2n, TX 2n + 1.
        let pairs: Vec<Value> = s
            .queues
            .chunks(2)
            .enumerate()
            .map(|(i, q)| {
                let (rx, tx) = (&q[0], q.get(1));
                json!({
                    "pair": i,
                    "rx-packets": g(&rx.packets),
                    "rx-bytes": g(&rx.bytes),
                    "rx-drops": rx.total_drops(),
                    "tx-packets": tx.map_or(0, |t| g(&t.packets)),
                    "tx-bytes": tx.map_or(0, |t| g(&t.bytes)),
                    "tx-drops": tx.map_or(0, |t| t.total_drops()),
                })
            })
            .collect();
        object(json!({
            "ctrl-ok": g(&s.ctrl_ok),
            "ctrl-err": g(&s.ctrl_err),
            "queue-pairs": pairs,
        }))
    }

    fn queue_stats(&self, index: usize) -> Map<String, Value> {
        let s = &self.shared.stats;
        let Some(c) = s.queues.get(index) else {
            return object(json!({"role": "ctrl"}));
        };
        let mut m = object(json!({
            "role": format!("{}{}", if index.is_multiple_of(2) { "rx" } else { "tx" }, index / 2),
            "packets": g(&c.packets),
            "bytes": g(&c.bytes),
            "merged": g(&c.merged),
            "waits": g(&c.waits),
            "drops": c.total_drops(),
        }));
        let by_reason: Map<String, Value> = DropReason::ALL
            .iter()
            .map(|d| (d.name().replace('_', "-"), json!(c.drops(*d))))
            .collect();
        m.insert("drops-by-reason".into(), Value::Object(by_reason));
        m
    }
}
