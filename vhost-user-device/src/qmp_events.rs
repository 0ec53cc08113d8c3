//! QMP events for the control socket's clients: [`Events`] queues an event for every
//! client that finished negotiation, and wakes its thread to send it.
//!
//! Its own module because both sides need it: the control socket (`control`) subscribes
//! its clients, and the server (`server`) and the devices emit events (connects,
//! migration jobs), so neither of those imports the other for it.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// Events queued for a client that does not read them, before the oldest are dropped.
const MAX_QUEUED_EVENTS: usize = 1024;

/// Sends events to every negotiated client.
#[derive(Clone, Default)]
pub struct Events {
    clients: Arc<Mutex<Vec<Arc<ClientQueue>>>>,
}

/// One client's events not sent yet.
#[derive(Default)]
pub(crate) struct ClientQueue {
    events: Mutex<VecDeque<Value>>,
    /// The client negotiated capabilities: it gets events from now on.
    ready: AtomicBool,
    /// Written to (a byte) when an event is queued; the client's thread waits on the
    /// other end.
    wake: Mutex<Option<UnixStream>>,
}

impl ClientQueue {
    /// The events queued so far, oldest first.
    pub(crate) fn take(&self) -> Vec<Value> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect()
    }

    /// The client negotiated: queue events for it from now on.
    pub(crate) fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }
}

impl Events {
    /// A new client's queue, and the socket that becomes readable when an event is queued.
    pub(crate) fn subscribe(&self) -> io::Result<(Arc<ClientQueue>, UnixStream)> {
        let queue = Arc::new(ClientQueue::default());
        let (wake_rx, wake_tx) = UnixStream::pair()?;
        *queue.wake.lock().unwrap_or_else(|e| e.into_inner()) = Some(wake_tx);
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(queue.clone());
        Ok((queue, wake_rx))
    }

    /// The client of `queue` went away.
    pub(crate) fn unsubscribe(&self, queue: &Arc<ClientQueue>) {
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|c| !Arc::ptr_eq(c, queue));
    }

    /// Emits event `name` with `data` (now).
    pub fn emit(&self, name: &str, data: Value) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let ev = json!({
            "event": name,
            "data": data,
            "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        });
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        for c in clients.iter().filter(|c| c.ready.load(Ordering::Acquire)) {
            let mut q = c.events.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() >= MAX_QUEUED_EVENTS {
                q.pop_front();
            }
            q.push_back(ev.clone());
            drop(q);
            // Events are written by the client's own thread; a byte on its wake socket
            // tells it to look (it waits in read otherwise).
            if let Some(w) = c.wake.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                let _ = w.write(&[1]);
            }
        }
    }
}
