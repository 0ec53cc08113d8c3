//! The one queue worker of the device: control queues, every port's queues, and the host
//! side of every port (through an epoll fd of our own nested in the layer's).
//!
//! This module is the part the layer sees ([`SerialWorker`], a `QueueWorker`) and the
//! dispatch of a ring to its job: `guest_tx` (guest → host), `guest_rx` (host → guest),
//! `control_queue` (MULTIPORT's control messages), `host_io` (the ports' host fds); their
//! shared state is `engine::Engine`.
//!
//! Whatever one ring's work means for another (a control reply, the hostinfo port's
//! end-of-document message, data a PORT_OPEN lets through) is queued and done in `pump`,
//! which visits every ring; `process_queue` and `handle_event` both get all rings from the
//! layer and run it at once.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vhost_user_device::{QueueWorker, Ring, Rings};

use crate::engine::Engine;
use crate::host_poll::PortsState;
use crate::shared::Shared;
use crate::spec::queue;
use crate::state;

/// The device's queue worker.
pub struct SerialWorker {
    e: Option<Engine>,
}

impl SerialWorker {
    /// A worker over `state`; `multiport` is whether the driver acked MULTIPORT.
    pub fn new(shared: Arc<Shared>, mut st: PortsState, multiport: bool) -> Self {
        for p in st.ports.iter_mut() {
            p.reset_guest();
            if !multiport && p.id == 0 {
                // Without MULTIPORT port 0 exists and is open from the start.
                p.guest_ready = true;
                p.set_guest_open(true);
                p.host_open_sent = true;
            }
        }
        if !multiport && st.ports.iter().any(|p| p.id != 0) {
            log::warn!(
                "the driver did not accept VIRTIO_CONSOLE_F_MULTIPORT: only port 0 is served"
            );
        }
        let restored = shared
            .restore
            .lock()
            .unwrap_or_else(|x| x.into_inner())
            .take();
        let mut e = Engine::new(shared, st, multiport);
        if let Some(saved) = restored {
            e.restore(&saved);
        }
        for i in 0..e.st.ports.len() {
            e.st.update_interest(i);
        }
        Self { e: Some(e) }
    }
}

impl Drop for SerialWorker {
    fn drop(&mut self) {
        if let Some(mut e) = self.e.take() {
            for p in e.st.ports.iter_mut() {
                if p.pending.take().is_some() {
                    log::warn!(
                        "port {}: a guest buffer was left unsent at disconnect",
                        p.id
                    );
                }
            }
            *e.shared.slot.lock().unwrap_or_else(|x| x.into_inner()) = Some(e.st);
        }
    }
}

impl QueueWorker for SerialWorker {
    fn save_state(&mut self) -> Option<Vec<u8>> {
        self.e.as_ref().map(|e| state::encode(&e.saved()))
    }

    fn event_fds(&self) -> Vec<RawFd> {
        self.e
            .as_ref()
            .map(|e| vec![e.st.epoll.as_raw_fd()])
            .unwrap_or_default()
    }

    fn process_queue(&mut self, queue: u16, rings: &mut Rings) {
        if let Some(e) = self.e.as_mut() {
            if let Some(ring) = rings.get_mut(queue) {
                e.process_ring(ring);
            }
            if e.dirty || !e.ctrl_out.is_empty() {
                // What this ring's work means for the others (a control message to
                // deliver, data a PORT_OPEN lets through), done now.
                e.pump(rings);
            }
        }
    }

    fn handle_event(&mut self, _fd_index: usize, rings: &mut Rings) {
        if let Some(e) = self.e.as_mut() {
            e.host_events();
            let held = std::mem::take(&mut e.held);
            // `pump` visits the control queue and every port's queues; only the queues of
            // ports that do not exist need a visit of their own.
            e.pump(rings);
            for q in held {
                if e.is_missing_port_tx(q) {
                    if let Some(r) = rings
                        .get_mut(q)
                        .filter(|r| r.is_enabled() && !r.is_broken())
                    {
                        e.discard_tx(r);
                    }
                }
            }
        }
    }

    fn in_flight(&self, q: u16) -> usize {
        let Some(e) = self.e.as_ref() else { return 0 };
        match queue::port_of(q) {
            Some((id, true)) => e
                .port_idx(id)
                .map(|i| usize::from(e.st.ports[i].pending.is_some()))
                .unwrap_or(0),
            _ => 0,
        }
    }

    fn wait_completions(&mut self, rings: &mut Rings) -> io::Result<()> {
        // The ring is being stopped: copy what the host has not taken yet out of guest
        // memory and give the buffers back, so GET_VRING_BASE sees no chain in flight.
        if let Some(e) = self.e.as_mut() {
            e.spill_all(rings);
        }
        Ok(())
    }
}

impl Engine {
    pub(crate) fn process_ring(&mut self, ring: &mut Ring) {
        let q = ring.index();
        match q {
            queue::CONTROL_TX | queue::CONTROL_RX if !self.multiport => {}
            queue::CONTROL_TX => self.control_tx(ring),
            queue::CONTROL_RX => self.control_rx(ring),
            q => {
                let Some((id, tx)) = queue::port_of(q) else {
                    return;
                };
                match self.port_idx(id) {
                    Some(i) if self.multiport || id == 0 => {
                        if tx {
                            self.tx(i, ring);
                        } else {
                            self.rx(i, ring);
                        }
                        self.st.update_interest(i);
                    }
                    _ if tx => self.discard_tx(ring),
                    _ => {}
                }
            }
        }
    }

    /// All rings, in an order that puts data before the control messages it implies.
    pub(crate) fn pump(&mut self, rings: &mut Rings) {
        for _ in 0..4 {
            self.dirty = false;
            if self.multiport {
                if let Some(r) = rings.get_mut(queue::CONTROL_TX).filter(|r| r.is_enabled()) {
                    self.control_tx(r);
                }
            }
            for i in 0..self.st.ports.len() {
                let id = self.st.ports[i].id;
                if !self.multiport && id != 0 {
                    continue;
                }
                if let Some(r) = rings.get_mut(queue::tx(id)).filter(|r| r.is_enabled()) {
                    self.tx(i, r);
                }
                if let Some(r) = rings.get_mut(queue::rx(id)).filter(|r| r.is_enabled()) {
                    self.rx(i, r);
                }
                self.st.update_interest(i);
            }
            if self.multiport {
                if let Some(r) = rings.get_mut(queue::CONTROL_RX).filter(|r| r.is_enabled()) {
                    self.control_rx(r);
                }
            }
            if !self.dirty {
                break;
            }
        }
    }
}
