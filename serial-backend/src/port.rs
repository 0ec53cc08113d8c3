//! One port as the worker keeps it: its host side, what the guest and we last told each
//! other about it, and the bytes held either way. A port outlives the VMM connection (it
//! rests in [`crate::shared::Shared::slot`] between workers).

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost_user_device::Segment;

use crate::ports::{window_size, HostSide};
use crate::state::PortState;
use crate::stats::PortStats;

/// A tx chain being written to the host.
pub(crate) struct Pending {
    pub(crate) head: u16,
    /// Its readable buffers.
    pub(crate) segs: Vec<Segment>,
    pub(crate) total: u64,
    pub(crate) done: u64,
}

/// One fd's registration in our epoll.
#[derive(Clone, Copy)]
pub(crate) struct Reg {
    pub(crate) fd: RawFd,
    pub(crate) events: u32,
}

impl Default for Reg {
    fn default() -> Self {
        Self { fd: -1, events: 0 }
    }
}

/// A port: its host side and what the guest and we know about it.
pub struct Port {
    /// Port id.
    pub id: u32,
    /// Name.
    pub name: Option<String>,
    /// Console port.
    pub console: bool,
    /// Host side.
    pub host: HostSide,
    /// Its counters (query-stats' `ports`), shared with the control socket.
    pub stats: Arc<PortStats>,
    pub(crate) guest_ready: bool,
    /// Changed only through `set_guest_open`, which also publishes it in `stats`.
    pub(crate) guest_open: bool,
    /// What we last told the guest about the host side (PORT_OPEN).
    pub(crate) host_open_sent: bool,
    /// Guest output held by us (console backlog, spilled chains), written before new chains.
    pub(crate) out_buf: VecDeque<u8>,
    pub(crate) pending: Option<Pending>,
    pub(crate) rx_buf: Vec<u8>,
    pub(crate) rx_off: usize,
    /// The guest closed the port: half-close the socket client once its output is flushed.
    pub(crate) close_after_flush: bool,
    /// Hostinfo: a document is being delivered.
    pub(crate) doc_active: bool,
    /// Console size (cols, rows).
    pub(crate) size: (u16, u16),
    pub(crate) regs: [Reg; 3],
    /// stdin or stdout cannot be polled (a regular file, /dev/null).
    pub(crate) unpollable: [bool; 3],
    /// We asked a driver set up by an earlier backend to announce the port again (see
    /// `Engine::reattach`); its PORT_READY restores the port's state.
    pub(crate) reattaching: bool,
    /// A PORT_OPEN the guest sent while we waited for that PORT_READY.
    pub(crate) told_open: Option<bool>,
}

impl Port {
    /// A port with nothing negotiated yet, counting into `stats`.
    pub fn new(
        id: u32,
        name: Option<String>,
        console: bool,
        host: HostSide,
        stats: Arc<PortStats>,
    ) -> Self {
        let size = if console {
            host.tty_fd().and_then(window_size).unwrap_or((0, 0))
        } else {
            (0, 0)
        };
        Self {
            id,
            name,
            console,
            host,
            stats,
            guest_ready: false,
            guest_open: false,
            host_open_sent: false,
            out_buf: VecDeque::new(),
            pending: None,
            rx_buf: Vec::new(),
            rx_off: 0,
            close_after_flush: false,
            doc_active: false,
            size,
            regs: [Reg::default(); 3],
            unpollable: [false; 3],
            reattaching: false,
            told_open: None,
        }
    }

    pub(crate) fn rx_empty(&self) -> bool {
        self.rx_off >= self.rx_buf.len()
    }

    pub(crate) fn set_guest_open(&mut self, open: bool) {
        self.guest_open = open;
        self.stats.guest_open.store(open, Ordering::Relaxed);
    }

    pub(crate) fn reset_guest(&mut self) {
        self.guest_ready = false;
        self.set_guest_open(false);
        self.host_open_sent = false;
        self.close_after_flush = false;
        self.reattaching = false;
        self.told_open = None;
        if matches!(self.host, HostSide::Hostinfo) {
            self.doc_active = false;
            self.rx_buf.clear();
            self.rx_off = 0;
        }
    }
}

impl Port {
    /// What the DEVICE_STATE of the VMM's migration carries of this port.
    pub(crate) fn saved(&self) -> PortState {
        PortState {
            id: self.id,
            guest_ready: self.guest_ready,
            guest_open: self.guest_open,
            host_open_sent: self.host_open_sent,
            doc_active: self.doc_active,
            size: self.size,
            held_output: self.out_buf.iter().copied().collect(),
            pending_input: self.rx_buf.get(self.rx_off..).unwrap_or_default().to_vec(),
        }
    }

    /// Takes up where the source's port stopped (the guest's view of it, and the bytes
    /// buffered either way). The host side is this process's own.
    pub(crate) fn restore(&mut self, s: &PortState) {
        self.guest_ready = s.guest_ready;
        self.guest_open = s.guest_open;
        self.host_open_sent = s.host_open_sent;
        self.doc_active = s.doc_active;
        self.out_buf = s.held_output.iter().copied().collect();
        self.rx_buf = s.pending_input.clone();
        self.rx_off = 0;
    }
}
