//! The serial worker's state and the few things every part of it does: find a port,
//! count, report bad guest input, queue a control message for the driver, and come back
//! later to a queue that used its budget. The parts (`host_io`, `guest_tx`, `guest_rx`,
//! `control_queue`) each add the methods of their job to [`Engine`]; `worker` runs them.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost_user_device::rate_limit::RateLimitedLog;
use vhost_user_device::Chain;
use vmm_sys_util::epoll::EpollEvent;

use crate::host_poll::PortsState;
use crate::port::Port;
use crate::ports::HostSide;
use crate::shared::Shared;
use crate::spec::{event, queue, Control};
use crate::state::ConsoleState;
use crate::stats::Counter;

/// Most chains one call takes from a transmit queue (a port's, a missing port's, the
/// control queue): a guest refilling a ring as fast as we empty it must not keep the one
/// worker from every other port. A queue stopped at its budget is taken up again through
/// our own wake eventfd, after the events waiting meanwhile (see `Engine::held`).
pub(crate) const BUDGET: usize = 64;
/// Most iovecs per writev (`guest_tx` fills [`Engine::iov`] up to this many).
pub(crate) const MAX_IOV: usize = 1024;

/// Everything the worker needs, moved back into [`Shared::slot`] when it ends.
pub(crate) struct Engine {
    /// Counters and what the device shares with us.
    pub(crate) shared: Arc<Shared>,
    /// The ports and the epoll of their host sides.
    pub(crate) st: PortsState,
    /// The driver acked MULTIPORT (else only port 0 is served, and no control queues).
    pub(crate) multiport: bool,
    /// The chain being handled (kept to reuse its segment list).
    pub(crate) chain: Chain,
    /// Control messages for the driver, in order, waiting for control receive buffers.
    pub(crate) ctrl_out: VecDeque<Vec<u8>>,
    /// Something happened that another ring must act on.
    pub(crate) dirty: bool,
    /// Queues that stopped at their `BUDGET` with chains possibly left; `handle_event` (run
    /// through our wake eventfd) comes back to them. Guest kicks stay off meanwhile.
    pub(crate) held: Vec<u16>,
    /// Whether we looked at the control transmit and receive rings yet (`[tx, rx]`), and
    /// whether we asked the driver to announce its ports again (`Engine::reattach`).
    pub(crate) control_seen: [bool; 2],
    pub(crate) reattached: bool,
    /// Warnings about guest input and host errors, at a limited rate.
    pub(crate) log: RateLimitedLog,
    /// Scratch for our epoll's events.
    pub(crate) events: Vec<EpollEvent>,
    /// Scratch for the iovecs of one writev from guest memory.
    pub(crate) iov: Vec<libc::iovec>,
}

// SAFETY: the iovec scratch vector only holds pointers while a writev runs on this thread;
// everything else is Send.
unsafe impl Send for Engine {}

impl Engine {
    /// The engine of a worker over `st`, nothing looked at yet.
    pub(crate) fn new(shared: Arc<Shared>, st: PortsState, multiport: bool) -> Self {
        Engine {
            shared,
            st,
            multiport,
            chain: Chain::default(),
            ctrl_out: VecDeque::new(),
            dirty: false,
            held: Vec::new(),
            control_seen: [false; 2],
            reattached: false,
            log: RateLimitedLog::new(),
            events: vec![EpollEvent::default(); 64],
            iov: Vec::with_capacity(MAX_IOV),
        }
    }

    /// The VMM migrated the VM here with the source's console state (DEVICE_STATE): the
    /// driver's view of every port carries over, so no re-announce (`reattach`); then the
    /// guest hears where this host side differs from what it last heard.
    pub(crate) fn restore(&mut self, saved: &ConsoleState) {
        self.reattached = true;
        self.ctrl_out = saved.control.iter().cloned().collect();
        for s in &saved.ports {
            let Some(idx) = self.port_idx(s.id) else {
                continue;
            };
            let p = &mut self.st.ports[idx];
            p.restore(s);
            let (id, console, ready, size) = (p.id, p.console, p.guest_ready, p.size);
            let hostinfo = matches!(p.host, HostSide::Hostinfo);
            let open = p.host.connected();
            if ready && !console && !hostinfo && p.host_open_sent != open {
                p.host_open_sent = open;
                self.send_ctrl(id, event::PORT_OPEN, u16::from(open), &[]);
            }
            if ready && console && size != s.size && size != (0, 0) {
                self.send_resize(id, size);
            }
        }
        log::info!(
            "console state of the VMM's migration taken: {} port(s), {} control message(s)",
            saved.ports.len(),
            saved.control.len()
        );
        self.dirty = true;
    }

    /// The console's state for DEVICE_STATE (every ring stopped).
    pub(crate) fn saved(&self) -> ConsoleState {
        ConsoleState {
            ports: self.st.ports.iter().map(Port::saved).collect(),
            control: self.ctrl_out.iter().cloned().collect(),
        }
    }

    pub(crate) fn port_idx(&self, id: u32) -> Option<usize> {
        self.st.by_id.get(id as usize).copied().flatten()
    }

    /// Queue `q` stopped at its budget: come back to it after the other events.
    pub(crate) fn hold(&mut self, q: u16) {
        if !self.held.contains(&q) {
            self.held.push(q);
        }
        if self.st.wake.write(1).is_err() {
            self.log
                .warn(|| "cannot signal the worker's own eventfd".to_string());
        }
    }

    /// Whether `q` is the transmit queue of a port that does not exist (or is not served
    /// without MULTIPORT): [`Engine::discard_tx`]'s.
    pub(crate) fn is_missing_port_tx(&self, q: u16) -> bool {
        match queue::port_of(q) {
            Some((id, true)) => !(self.port_idx(id).is_some() && (self.multiport || id == 0)),
            _ => false,
        }
    }

    /// Counts `n` of `which` for port `idx` and the device.
    pub(crate) fn count(&self, idx: usize, which: Counter, n: u64) {
        self.shared.stats.count(&self.st.ports[idx].stats, which, n);
    }

    pub(crate) fn bad(&mut self, msg: impl FnOnce() -> String) {
        self.shared.stats.bad_input.fetch_add(1, Ordering::Relaxed);
        self.log.warn(msg);
    }

    pub(crate) fn send_ctrl(&mut self, id: u32, ev: u16, value: u16, extra: &[u8]) {
        let mut m = Control {
            id,
            event: ev,
            value,
        }
        .to_bytes()
        .to_vec();
        m.extend_from_slice(extra);
        self.ctrl_out.push_back(m);
        self.dirty = true;
    }

    pub(crate) fn send_resize(&mut self, id: u32, (cols, rows): (u16, u16)) {
        let mut extra = [0u8; 4];
        extra[0..2].copy_from_slice(&rows.to_le_bytes());
        extra[2..4].copy_from_slice(&cols.to_le_bytes());
        self.send_ctrl(id, event::RESIZE, 0, &extra);
    }
}
