//! The one queue worker of the device: control queues, every port's queues, and the host
//! side of every port (through an epoll fd of our own nested in the layer's).
//!
//! Guest → host: a tx chain is written to the host fd straight from guest memory; when the
//! host is slow (EAGAIN) or, for a named port, absent, the chain stays popped and unused
//! (one per port; the rest wait in the avail ring, so the guest blocks) and is finished when
//! the fd becomes writable or a client connects. Host → guest: we read from the host only
//! when the guest has the port open and we hold no undelivered bytes, so data waits in the
//! host's socket or pty when the guest posts no buffers.
//!
//! Whatever one ring's work means for another (a control reply, the hostinfo port's
//! end-of-document message, data a PORT_OPEN lets through) is queued and done in `pump`,
//! which visits every ring; `process_queue` and `handle_event` both get all rings from the
//! layer and run it at once.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost_user_device::memory::host_iovecs;
use vhost_user_device::rate_limit::RateLimitedLog;
use vhost_user_device::{
    Chain, ChainReader, ChainWriter, GuestMem, QueueWorker, Ring, Rings, Segment,
};
use vmm_sys_util::epoll::{EpollEvent, EventSet};

use crate::host_poll::{
    PortsState, KIND_DATA, KIND_LISTENER, TOKEN_EMERG, TOKEN_TIMER, TOKEN_WAKE,
};
use crate::hostinfo;
use crate::port::{Pending, Port};
use crate::ports::{window_size, Client, HostSide};
use crate::shared::Shared;
use crate::spec::{event, queue, Control, CONTROL_SIZE};
use crate::state::{self, ConsoleState};
use crate::stats::{Counter, PortStats, SerialStats};

/// Bytes read from a host fd at a time (and held until the guest took them).
const RX_CHUNK: usize = 64 * 1024;
/// Console output kept while no one is connected (oldest bytes dropped beyond this).
const CONSOLE_BACKLOG: usize = 64 * 1024;
/// Most iovecs per writev.
const MAX_IOV: usize = 1024;
/// Most guest output a port keeps in host memory when it must give a chain back to the
/// guest before its host side took it (the VMM stops the ring): a chain may be up to 4 GiB
/// long, so only this much of it is copied and the rest is dropped and counted
/// (`SerialStats::tx_dropped`).
const HELD_LIMIT: usize = 1 << 20;
/// Most chains one call takes from a transmit queue (a port's, a missing port's, the
/// control queue): a guest refilling a ring as fast as we empty it must not keep the one
/// worker from every other port. A queue stopped at its budget is taken up again through
/// our own wake eventfd, after the events waiting meanwhile (see `Engine::held`).
const BUDGET: usize = 64;

/// The error of a write(2)/writev(2) that returned `n` <= 0. A write of a non-empty buffer
/// that returns 0 made no progress and never will (errno is not set then): an error too.
fn write_error(n: isize) -> io::Error {
    if n == 0 {
        io::Error::from(io::ErrorKind::WriteZero)
    } else {
        io::Error::last_os_error()
    }
}

/// Bytes waiting to be read on a socket.
fn unread_bytes(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes an int through a valid pointer.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if rc == 0 {
        n.max(0) as usize
    } else {
        0
    }
}

/// Appends iovecs for the unsent part of `p` (at most `MAX_IOV`) to `iov`; an error if a
/// buffer is no longer in guest memory (the layer checked the chain; memory changed since).
fn fill_iov(
    iov: &mut Vec<libc::iovec>,
    p: &Pending,
    mem: &GuestMem,
) -> Result<(), vhost_user_device::memory::MemoryError> {
    let mut skip = p.done;
    for s in &p.segs {
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        host_iovecs(mem, s.addr + skip, len - skip, iov)?;
        skip = 0;
        if iov.len() >= MAX_IOV {
            iov.truncate(MAX_IOV);
            break;
        }
    }
    Ok(())
}

/// One writev(2) of the unsent rest of `p` (at most `MAX_IOV` pieces) from guest memory to
/// `fd`; what was written advances `p.done` and is counted (`tx-bytes`) for `port` and
/// the device. Returns writev's result, or the error if the chain is no longer inside
/// guest memory (nothing written then).
fn writev_pending(
    iov: &mut Vec<libc::iovec>,
    fd: RawFd,
    p: &mut Pending,
    mem: &GuestMem,
    (stats, port): (&SerialStats, &PortStats),
) -> Result<isize, vhost_user_device::memory::MemoryError> {
    iov.clear();
    let filled = fill_iov(iov, p, mem);
    let n = match filled {
        // SAFETY: the iovecs point into guest memory kept mapped by `mem`, and are only
        // read by the kernel.
        Ok(()) => unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as i32) },
        Err(e) => {
            iov.clear();
            return Err(e);
        }
    };
    iov.clear();
    if n > 0 {
        p.done += n as u64;
        stats.count(port, Counter::TxBytes, n as u64);
    }
    Ok(n)
}

/// Everything the worker needs, moved back into [`Shared::slot`] when it ends.
struct Engine {
    shared: Arc<Shared>,
    st: PortsState,
    multiport: bool,
    chain: Chain,
    ctrl_out: VecDeque<Vec<u8>>,
    /// Something happened that another ring must act on.
    dirty: bool,
    /// Queues that stopped at their `BUDGET` with chains possibly left; `handle_event` (run
    /// through our wake eventfd) comes back to them. Guest kicks stay off meanwhile.
    held: Vec<u16>,
    /// Whether we looked at the control transmit and receive rings yet (`[tx, rx]`), and
    /// whether we asked the driver to announce its ports again (`Engine::reattach`).
    control_seen: [bool; 2],
    reattached: bool,
    log: RateLimitedLog,
    events: Vec<EpollEvent>,
    iov: Vec<libc::iovec>,
}

// SAFETY: the iovec scratch vector only holds pointers while a writev runs on this thread;
// everything else is Send.
unsafe impl Send for Engine {}

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
        let mut e = Engine {
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
        };
        if let Some(saved) = restored {
            e.restore(&saved);
        }
        for i in 0..e.st.ports.len() {
            e.st.update_interest(i);
        }
        Self { e: Some(e) }
    }
}

impl Engine {
    /// The VMM migrated the VM here with the source's console state (DEVICE_STATE): the
    /// driver's view of every port carries over, so no re-announce (`reattach`); then the
    /// guest hears where this host side differs from what it last heard.
    fn restore(&mut self, saved: &ConsoleState) {
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
    fn saved(&self) -> ConsoleState {
        ConsoleState {
            ports: self.st.ports.iter().map(Port::saved).collect(),
            control: self.ctrl_out.iter().cloned().collect(),
        }
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

/// Which part of a pending chain [`Engine::copy_pending`] keeps when the chain would take
/// a port's held output beyond its limit.
#[derive(Clone, Copy)]
enum Keep {
    /// The newest bytes, up to this many held in all (a console's backlog: the latest
    /// output is what a user connecting later wants to see).
    Newest(usize),
    /// What follows the bytes already held, up to this many held in all (the client gets
    /// a contiguous continuation of what it already read).
    Oldest(usize),
}

/// How writing a port's output went.
enum Flush {
    /// Nothing is held any more.
    Idle,
    /// The host cannot take more now.
    Blocked,
}

impl Engine {
    fn port_idx(&self, id: u32) -> Option<usize> {
        self.st.by_id.get(id as usize).copied().flatten()
    }

    /// Queue `q` stopped at its budget: come back to it after the other events.
    fn hold(&mut self, q: u16) {
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
    fn is_missing_port_tx(&self, q: u16) -> bool {
        match queue::port_of(q) {
            Some((id, true)) => !(self.port_idx(id).is_some() && (self.multiport || id == 0)),
            _ => false,
        }
    }

    /// Counts `n` of `which` for port `idx` and the device.
    fn count(&self, idx: usize, which: Counter, n: u64) {
        self.shared.stats.count(&self.st.ports[idx].stats, which, n);
    }

    fn bad(&mut self, msg: impl FnOnce() -> String) {
        self.shared.stats.bad_input.fetch_add(1, Ordering::Relaxed);
        self.log.warn(msg);
    }

    fn send_ctrl(&mut self, id: u32, ev: u16, value: u16, extra: &[u8]) {
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

    fn process_ring(&mut self, ring: &mut Ring) {
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
    fn pump(&mut self, rings: &mut Rings) {
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

    // ---- host side -------------------------------------------------------------------

    fn host_events(&mut self) {
        let mut events = std::mem::take(&mut self.events);
        let n = match self.st.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::warn!("epoll_wait on port fds: {e}");
                }
                0
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_WAKE => {
                    let _ = self.st.wake.read();
                }
                TOKEN_TIMER => {
                    let _ = self.st.timer.wait();
                    self.check_sizes();
                }
                TOKEN_EMERG => {
                    let _ = self.shared.emerg_efd.read();
                    let bytes = std::mem::take(
                        &mut *self.shared.emerg.lock().unwrap_or_else(|e| e.into_inner()),
                    );
                    if let Some(i) = self.port_idx(0) {
                        self.st.ports[i].out_buf.extend(bytes);
                        self.st.update_interest(i);
                    }
                }
                t => {
                    let idx = (t >> 2) as usize;
                    if idx >= self.st.ports.len() {
                        continue;
                    }
                    match t & 3 {
                        KIND_LISTENER => self.accept(idx),
                        KIND_DATA => {
                            let hup = ev
                                .event_set()
                                .intersects(EventSet::HANG_UP | EventSet::ERROR);
                            if hup {
                                self.hang_up(idx);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        self.events = events;
    }

    fn accept(&mut self, idx: usize) {
        let HostSide::Socket {
            listener, client, ..
        } = &mut self.st.ports[idx].host
        else {
            return;
        };
        if client.is_some() {
            return;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = stream.set_nonblocking(true) {
                    log::warn!("port {}: client: {e}", self.st.ports[idx].id);
                    return;
                }
                *client = Some(Client {
                    stream,
                    hung_up: false,
                    wr_shut: false,
                });
                let p = &mut self.st.ports[idx];
                self.shared.stats.count(&p.stats, Counter::Connects, 1);
                log::info!("port {}: host client connected", p.id);
                let (id, tell) = (p.id, p.guest_ready && !p.console && !p.host_open_sent);
                if tell {
                    p.host_open_sent = true;
                    self.send_ctrl(id, event::PORT_OPEN, 1, &[]);
                }
                self.dirty = true;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => log::warn!("port {}: accept: {e}", self.st.ports[idx].id),
        }
        self.st.update_interest(idx);
    }

    /// The socket client went away: tell the guest; keep the fd until its data is read.
    fn hang_up(&mut self, idx: usize) {
        self.client_gone(idx);
        self.st.update_interest(idx);
    }

    /// Marks port `idx`'s socket client hung up, tells the guest, and drops the client
    /// unless it still holds bytes for the guest.
    fn client_gone(&mut self, idx: usize) {
        if let HostSide::Socket {
            client: Some(c), ..
        } = &mut self.st.ports[idx].host
        {
            c.hung_up = true;
        }
        self.host_gone(idx);
        let unread = self.st.ports[idx]
            .host
            .read_fd()
            .map(unread_bytes)
            .unwrap_or(0);
        if unread == 0 {
            self.drop_client(idx);
        }
    }

    fn host_gone(&mut self, idx: usize) {
        let p = &mut self.st.ports[idx];
        if p.host_open_sent && p.guest_ready && !p.console {
            p.host_open_sent = false;
            let id = p.id;
            log::info!("port {id}: host client disconnected");
            self.send_ctrl(id, event::PORT_OPEN, 0, &[]);
        }
    }

    fn drop_client(&mut self, idx: usize) {
        self.host_gone(idx);
        // Deregister before closing, so a reused fd number cannot be confused.
        self.st.set_reg(idx, KIND_DATA as usize, None, 0, false);
        let port = &mut self.st.ports[idx];
        if let HostSide::Socket { client, .. } = &mut port.host {
            if client.take().is_some() {
                self.shared
                    .stats
                    .count(&port.stats, Counter::Disconnects, 1);
            }
        }
        self.st.update_interest(idx);
    }

    /// Reads host input into `rx_buf`; true if there is some.
    fn fill(&mut self, idx: usize) -> bool {
        let p = &mut self.st.ports[idx];
        let Some(fd) = p.host.read_fd() else {
            return false;
        };
        p.rx_buf.resize(RX_CHUNK, 0);
        p.rx_off = 0;
        // SAFETY: reading into our own buffer of RX_CHUNK bytes.
        let n = unsafe { libc::read(fd, p.rx_buf.as_mut_ptr().cast(), RX_CHUNK) };
        let err = io::Error::last_os_error();
        if n > 0 {
            p.rx_buf.truncate(n as usize);
            return true;
        }
        p.rx_buf.clear();
        let id = p.id;
        match (&mut p.host, n) {
            (HostSide::Socket { .. }, 0) => self.drop_client(idx),
            (HostSide::Stdio { eof }, 0) => *eof = true,
            (_, 0) => {}
            _ if err.kind() == io::ErrorKind::WouldBlock
                || err.raw_os_error() == Some(libc::EIO) => {}
            (HostSide::Socket { .. }, _) => {
                log::info!("port {id}: reading from the client: {err}");
                self.drop_client(idx);
            }
            _ => self.log.warn(|| format!("port {id}: read: {err}")),
        }
        false
    }

    fn check_sizes(&mut self) {
        for i in 0..self.st.ports.len() {
            let p = &mut self.st.ports[i];
            if !p.console {
                continue;
            }
            let Some(size) = p.host.tty_fd().and_then(window_size) else {
                continue;
            };
            if size == p.size || size == (0, 0) {
                continue;
            }
            p.size = size;
            let (id, ready) = (p.id, p.guest_ready);
            if id == 0 {
                self.shared.size0.store(
                    u32::from(size.0) | u32::from(size.1) << 16,
                    Ordering::Relaxed,
                );
            }
            log::info!("port {id}: console size {}x{}", size.0, size.1);
            if ready && self.multiport {
                self.send_resize(id, size);
            }
        }
        // A RESIZE queued here goes out in the `pump` that follows the host events.
    }

    fn send_resize(&mut self, id: u32, (cols, rows): (u16, u16)) {
        let mut extra = [0u8; 4];
        extra[0..2].copy_from_slice(&rows.to_le_bytes());
        extra[2..4].copy_from_slice(&cols.to_le_bytes());
        self.send_ctrl(id, event::RESIZE, 0, &extra);
    }

    // ---- guest → host -----------------------------------------------------------------

    fn tx(&mut self, idx: usize, ring: &mut Ring) {
        let mem = ring.memory();
        let mut completed = false;
        let mut drained = false;
        let mut taken = 0;
        loop {
            if let Flush::Blocked = self.flush(idx, ring, &mem, &mut completed) {
                break;
            }
            ring.disable_notification(&mem);
            if taken >= BUDGET {
                // A host side that takes everything at once (a console without client, a
                // file) would let a guest refilling the ring keep us here: kicks stay off,
                // we come back through `held`.
                self.hold(ring.index());
                break;
            }
            if !ring.pop(&mem, &mut self.chain) {
                if ring.enable_notification(&mem) {
                    continue;
                }
                // A round spent on malformed chains may have left data behind them:
                // the layer comes back for it, and EOF waits until then.
                drained = !ring.round_spent();
                break;
            }
            taken += 1;
            let segs: Vec<Segment> = self
                .chain
                .segments
                .iter()
                .filter(|s| !s.writable)
                .copied()
                .collect();
            let total = segs.iter().map(|s| u64::from(s.len)).sum();
            if total == 0 {
                ring.add_used(&mem, self.chain.head, 0);
                completed = true;
                continue;
            }
            self.st.ports[idx].pending = Some(Pending {
                head: self.chain.head,
                segs,
                total,
                done: 0,
            });
        }
        if completed {
            ring.notify(&mem);
        }
        // The guest closed the port and everything it wrote before is out: EOF for the
        // client (the guest queued all its data before sending PORT_OPEN 0).
        let port = &mut self.st.ports[idx];
        if drained && port.close_after_flush && port.pending.is_none() && port.out_buf.is_empty() {
            port.close_after_flush = false;
            if let HostSide::Socket {
                client: Some(c), ..
            } = &mut port.host
            {
                let _ = c.stream.shutdown(std::net::Shutdown::Write);
                c.wr_shut = true;
                log::info!(
                    "port {}: guest closed the port; sent EOF to the client",
                    port.id
                );
            }
        }
    }

    /// Pops and completes chains on a tx queue of a port that does not exist, at most
    /// `BUDGET` per call (the rest through `held`).
    fn discard_tx(&mut self, ring: &mut Ring) {
        let mem = ring.memory();
        let q = ring.index();
        let mut n = 0;
        ring.disable_notification(&mem);
        while n < BUDGET && ring.pop(&mem, &mut self.chain) {
            // Counted before the guest can see the buffer back (a driver, or a test,
            // reading the counter after the completion must find it there).
            self.shared.stats.bad_input.fetch_add(1, Ordering::Relaxed);
            ring.add_used(&mem, self.chain.head, 0);
            n += 1;
        }
        if n > 0 {
            ring.notify(&mem);
            self.log
                .warn(|| format!("queue {q}: {n} buffer(s) for a port that does not exist"));
        }
        if n >= BUDGET || ring.enable_notification(&mem) {
            // More may be waiting (kicks stay off if we stopped at the budget).
            self.hold(q);
        }
    }

    fn complete_pending(&mut self, idx: usize, ring: &mut Ring, mem: &GuestMem) {
        if let Some(p) = self.st.ports[idx].pending.take() {
            ring.add_used(mem, p.head, 0);
        }
    }

    /// Copies part of the unsent rest of the pending chain into `out_buf`, so that `out_buf`
    /// never holds more than `keep`'s limit. Only the bytes kept are read from guest memory:
    /// the chain may be up to 4 GiB long (an indirect table of large buffers), far more
    /// than any port buffers. Returns how many bytes of the chain were not kept (counted by
    /// the caller, which knows why).
    fn copy_pending(&mut self, idx: usize, mem: &GuestMem, keep: Keep) -> u64 {
        let port = &mut self.st.ports[idx];
        let Some(p) = &port.pending else { return 0 };
        let left = p.total.saturating_sub(p.done);
        let held = port.out_buf.len() as u64;
        let (from, take, mut dropped) = match keep {
            Keep::Newest(cap) => {
                let cap = cap as u64;
                let take = left.min(cap);
                // The oldest held bytes make room first.
                let over = (held + take).saturating_sub(cap).min(held);
                port.out_buf.drain(..over as usize);
                (p.done + (left - take), take, left - take)
            }
            Keep::Oldest(cap) => {
                let take = left.min((cap as u64).saturating_sub(held));
                (p.done, take, left - take)
            }
        };
        if let Keep::Newest(_) = keep {
            // Backlog bytes drained above are dropped output too.
            dropped += held.saturating_sub(port.out_buf.len() as u64);
        }
        // Only the bytes kept are read from guest memory, straight into `out_buf`.
        let mut chain = ChainReader::over(mem, &p.segs);
        let bad = match chain.skip(from) {
            Ok(_) => io::copy(&mut (&mut chain).take(take), &mut port.out_buf)
                .map(|copied| copied < take)
                .unwrap_or(true),
            Err(_) => true,
        };
        if bad {
            let id = port.id;
            self.bad(|| format!("port {id}: tx buffer outside guest memory"));
        }
        dropped
    }

    /// Writes the pending chain to a file port straight from guest memory, in writevs of
    /// at most `MAX_IOV` pieces (never a copy of the whole chain), and completes it. A
    /// write error drops the rest of the chain (counted in `host_write_errors`).
    fn write_pending_to_file(&mut self, idx: usize, ring: &mut Ring, mem: &GuestMem) {
        let port = &mut self.st.ports[idx];
        let id = port.id;
        let fd = match &port.host {
            HostSide::File(f) => f.as_raw_fd(),
            _ => return,
        };
        let Some(p) = &mut port.pending else { return };
        let mut failed = None;
        while p.done < p.total {
            let counters = (&self.shared.stats, &*port.stats);
            let Ok(n) = writev_pending(&mut self.iov, fd, p, mem, counters) else {
                self.complete_pending(idx, ring, mem);
                self.bad(|| format!("port {id}: tx buffer outside guest memory"));
                return;
            };
            if n > 0 {
                continue;
            }
            // A regular file taking nothing is an error too: do not retry for ever.
            let err = write_error(n);
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            failed = Some(err);
            break;
        }
        if let Some(e) = failed {
            self.count(idx, Counter::HostWriteErrors, 1);
            self.log
                .warn(|| format!("port {id}: writing the file: {e}"));
        }
        self.complete_pending(idx, ring, mem);
    }

    fn flush(
        &mut self,
        idx: usize,
        ring: &mut Ring,
        mem: &GuestMem,
        completed: &mut bool,
    ) -> Flush {
        loop {
            let port = &mut self.st.ports[idx];
            let id = port.id;
            match &mut port.host {
                HostSide::Hostinfo => {
                    if let Some(p) = &port.pending {
                        self.shared
                            .stats
                            .count(&port.stats, Counter::TxBytes, p.total);
                        self.complete_pending(idx, ring, mem);
                        *completed = true;
                    }
                    return Flush::Idle;
                }
                HostSide::File(f) => {
                    use std::io::Write;
                    // Held bytes (emergency writes) first, then the pending chain.
                    let (a, b) = port.out_buf.as_slices();
                    let n = (a.len() + b.len()) as u64;
                    let r = f.write_all(a).and_then(|_| f.write_all(b));
                    port.out_buf.clear();
                    self.shared.stats.count(&port.stats, Counter::TxBytes, n);
                    if let Err(e) = r {
                        self.count(idx, Counter::HostWriteErrors, 1);
                        self.log
                            .warn(|| format!("port {id}: writing the file: {e}"));
                    }
                    if self.st.ports[idx].pending.is_some() {
                        self.write_pending_to_file(idx, ring, mem);
                        *completed = true;
                    }
                    return Flush::Idle;
                }
                _ => {}
            }
            let Some(fd) = port.host.write_fd() else {
                if port.console && !port.host.connected() {
                    // No one listens to this console: keep a bounded backlog, free the
                    // guest (hvc busy-waits for its buffers).
                    if port.pending.is_some() {
                        let dropped = self.copy_pending(idx, mem, Keep::Newest(CONSOLE_BACKLOG));
                        self.count(idx, Counter::ConsoleDropped, dropped);
                        self.complete_pending(idx, ring, mem);
                        *completed = true;
                    }
                    return Flush::Idle;
                }
                return if port.pending.is_some() {
                    Flush::Blocked
                } else {
                    Flush::Idle
                };
            };
            // Held bytes first.
            while !port.out_buf.is_empty() {
                let (a, _) = port.out_buf.as_slices();
                // SAFETY: writing from our own buffer.
                let n = unsafe { libc::write(fd, a.as_ptr().cast(), a.len()) };
                if n > 0 {
                    port.out_buf.drain(..n as usize);
                    self.shared
                        .stats
                        .count(&port.stats, Counter::TxBytes, n as u64);
                    continue;
                }
                let err = write_error(n);
                if err.kind() == io::ErrorKind::WouldBlock {
                    return Flush::Blocked;
                }
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break;
            }
            if !port.out_buf.is_empty() {
                self.write_failed(idx, ring, mem, completed);
                continue;
            }
            let Some(p) = &mut port.pending else {
                return Flush::Idle;
            };
            let counters = (&self.shared.stats, &*port.stats);
            let Ok(n) = writev_pending(&mut self.iov, fd, p, mem, counters) else {
                // The layer checked the chain; memory changed under us (unplug).
                self.complete_pending(idx, ring, mem);
                *completed = true;
                self.bad(|| format!("port {id}: tx buffer outside guest memory"));
                continue;
            };
            if n > 0 {
                if p.done >= p.total {
                    self.complete_pending(idx, ring, mem);
                    *completed = true;
                }
                continue;
            }
            let err = write_error(n);
            if err.kind() == io::ErrorKind::WouldBlock {
                return Flush::Blocked;
            }
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            self.write_failed(idx, ring, mem, completed);
        }
    }

    /// Writing to the host failed. A socket client is dropped and the output stays held for
    /// the next one. A pty or stdio that cannot be written to will not get better: what is
    /// held and the pending chain are dropped (counted, logged) and the chain goes back to
    /// the guest, rather than retried for ever.
    fn write_failed(&mut self, idx: usize, ring: &mut Ring, mem: &GuestMem, completed: &mut bool) {
        let id = self.st.ports[idx].id;
        if let HostSide::Socket { .. } = &self.st.ports[idx].host {
            log::info!("port {id}: client went away while writing");
            self.client_gone(idx);
            return;
        }
        let p = &mut self.st.ports[idx];
        let held = p.out_buf.len() as u64;
        p.out_buf.clear();
        let chain = p.pending.as_ref().map_or(0, |c| c.total - c.done);
        self.count(idx, Counter::HostWriteErrors, 1);
        self.count(idx, Counter::TxDropped, held + chain);
        self.log.warn(|| format!("port {id}: host write failed"));
        if self.st.ports[idx].pending.is_some() {
            self.complete_pending(idx, ring, mem);
            *completed = true;
        }
    }

    fn spill_all(&mut self, rings: &mut Rings) {
        for i in 0..self.st.ports.len() {
            if self.st.ports[i].pending.is_none() {
                continue;
            }
            let id = self.st.ports[i].id;
            let Some(ring) = rings.get_mut(queue::tx(id)) else {
                continue;
            };
            let mem = ring.memory();
            let mut completed = false;
            let _ = self.flush(i, ring, &mem, &mut completed);
            if self.st.ports[i].pending.is_some() {
                // The chain must go back to the guest now: keep what a port may hold for
                // the next client, and count the rest.
                let dropped = self.copy_pending(i, &mem, Keep::Oldest(HELD_LIMIT));
                if dropped > 0 {
                    self.count(i, Counter::TxDropped, dropped);
                    self.log.warn(|| {
                        format!(
                            "port {id}: ring stopped with guest output unsent; {dropped} \
                             byte(s) beyond the {HELD_LIMIT} kept dropped"
                        )
                    });
                }
                self.complete_pending(i, ring, &mem);
            }
            ring.notify(&mem);
        }
    }

    // ---- host → guest -----------------------------------------------------------------

    fn rx(&mut self, idx: usize, ring: &mut Ring) {
        if !self.st.ports[idx].guest_open {
            return;
        }
        let mem = ring.memory();
        let mut used = false;
        loop {
            if self.st.ports[idx].rx_empty() && !self.fill(idx) {
                break;
            }
            if !ring.pop(&mem, &mut self.chain) {
                if ring.enable_notification(&mem) {
                    continue;
                }
                break;
            }
            let p = &mut self.st.ports[idx];
            let mut buffers = ChainWriter::new(&mem, &self.chain);
            // The buffers filling up is no error: the rest waits for the next chain.
            let bad = match buffers.write_all(&p.rx_buf[p.rx_off..]) {
                Ok(()) => false,
                Err(e) => e.kind() != io::ErrorKind::WriteZero,
            };
            let written = buffers.bytes_written() as usize;
            p.rx_off += written;
            // Counted before the guest can see the buffer (a reader of the counters after
            // the data must find it there).
            self.shared
                .stats
                .count(&p.stats, Counter::RxBytes, written as u64);
            ring.add_used(&mem, self.chain.head, written as u32);
            used = true;
            if bad {
                let id = p.id;
                self.bad(|| format!("port {id}: rx buffer not writable"));
            }
        }
        if used {
            ring.notify(&mem);
        }
        let p = &mut self.st.ports[idx];
        if p.doc_active && p.rx_empty() {
            // The whole document is on the used ring: end of file for the reader.
            p.doc_active = false;
            p.host_open_sent = false;
            let id = p.id;
            self.send_ctrl(id, event::PORT_OPEN, 0, &[]);
        }
    }

    // ---- control queues ---------------------------------------------------------------

    /// The first look at a control ring of this connection, before anything is taken from
    /// it: a ring that does not start at index 0 was used before, by a backend this one
    /// replaces (the previous one was killed and QEMU reconnected, or the connection was
    /// dropped and made again under a running guest). The driver set its ports up with that
    /// backend and will not do it again on its own: [`Engine::reattach`]. A driver that
    /// starts (or restarts) the device begins both control rings at 0.
    fn check_live_driver(&mut self, ring: &Ring) {
        let i = usize::from(ring.index() == queue::CONTROL_RX);
        if std::mem::replace(&mut self.control_seen[i], true) {
            return;
        }
        if ring.next_avail() != 0 && !self.reattached {
            self.reattach();
        }
    }

    /// Asks a driver that set its ports up with an earlier backend to announce them again:
    /// DEVICE_ADD for every port, which a driver that already has the port answers with
    /// PORT_READY (Linux's virtio_console does). The PORT_READY then restores what this
    /// process cannot know (`port_ready`): the port is ready, and it is open in the guest
    /// (assumed, see serial-backend's README, "Restarts"); and the driver learns the host
    /// side's state now, which may differ from what it last heard.
    fn reattach(&mut self) {
        self.reattached = true;
        if !self.multiport {
            return;
        }
        log::info!(
            "the driver was set up by an earlier backend: asking it to announce its {} port(s) \
             again",
            self.st.ports.len()
        );
        let ids: Vec<u32> = self.st.ports.iter().map(|p| p.id).collect();
        for (i, id) in ids.into_iter().enumerate() {
            self.st.ports[i].reattaching = true;
            self.send_ctrl(id, event::DEVICE_ADD, 1, &[]);
        }
    }

    fn control_tx(&mut self, ring: &mut Ring) {
        self.check_live_driver(ring);
        let mem = ring.memory();
        let mut completed = false;
        let mut taken = 0;
        loop {
            ring.disable_notification(&mem);
            if taken >= BUDGET {
                // Kicks stay off: we come back through `held`.
                self.hold(ring.index());
                break;
            }
            if !ring.pop(&mem, &mut self.chain) {
                if ring.enable_notification(&mem) {
                    continue;
                }
                break;
            }
            // A message is CONTROL_SIZE bytes; fewer (a short chain, unreadable memory)
            // is refused below.
            let mut buf = [0u8; CONTROL_SIZE];
            let got = ChainReader::new(&mem, &self.chain)
                .read(&mut buf)
                .unwrap_or(0);
            let head = self.chain.head;
            ring.add_used(&mem, head, 0);
            completed = true;
            taken += 1;
            self.shared.stats.control_in.fetch_add(1, Ordering::Relaxed);
            match Control::parse(&buf[..got]) {
                Some(c) => self.control(c),
                None => self.bad(|| format!("control message of {got} bytes (need 8) ignored")),
            }
        }
        if completed {
            ring.notify(&mem);
        }
    }

    fn control(&mut self, c: Control) {
        if c.event == event::DEVICE_READY {
            if c.value != 1 {
                log::warn!(
                    "the guest driver failed to initialise (DEVICE_READY {})",
                    c.value
                );
                return;
            }
            log::info!("guest driver ready; adding {} port(s)", self.st.ports.len());
            self.ctrl_out.clear();
            let ids: Vec<u32> = self.st.ports.iter().map(|p| p.id).collect();
            for (i, id) in ids.into_iter().enumerate() {
                self.st.ports[i].reset_guest();
                self.st.update_interest(i);
                self.send_ctrl(id, event::DEVICE_ADD, 1, &[]);
            }
            return;
        }
        let Some(idx) = self.port_idx(c.id) else {
            let max = self.shared.max_ports;
            self.bad(|| {
                format!(
                    "control event {} for port {} ignored: no such port (max {max})",
                    c.event, c.id
                )
            });
            return;
        };
        match c.event {
            event::PORT_READY => self.port_ready(idx, c.value),
            event::PORT_OPEN => self.guest_open(idx, c.value != 0),
            ev => self.bad(|| format!("control event {ev} from the guest ignored (port {})", c.id)),
        }
    }

    fn port_ready(&mut self, idx: usize, value: u16) {
        let p = &mut self.st.ports[idx];
        let id = p.id;
        if value != 1 {
            log::warn!("port {id}: the guest could not set the port up (PORT_READY {value})");
            return;
        }
        if p.guest_ready {
            self.bad(|| format!("port {id}: repeated PORT_READY ignored"));
            return;
        }
        p.guest_ready = true;
        let (console, name, size) = (p.console, p.name.clone(), p.size);
        let open = p.host.connected();
        if console {
            self.send_ctrl(id, event::CONSOLE_PORT, 1, &[]);
            if size != (0, 0) {
                self.send_resize(id, size);
            }
        }
        if let Some(n) = name {
            self.send_ctrl(id, event::PORT_NAME, 1, n.as_bytes());
        }
        if open {
            self.st.ports[idx].host_open_sent = true;
            self.send_ctrl(id, event::PORT_OPEN, 1, &[]);
        }
        let p = &mut self.st.ports[idx];
        if std::mem::replace(&mut p.reattaching, false) {
            // The driver had this port before we started. A console is open in the guest
            // for good (hvc opens it when it sets the console up); a named port is assumed
            // open, unless the guest told us meanwhile, as a guest program holding it
            // across our restart is the case that must keep working (its next PORT_OPEN
            // corrects us). The hostinfo port starts a document only on an open it sees.
            let told = p.told_open.take();
            p.set_guest_open(!matches!(p.host, HostSide::Hostinfo) && told.unwrap_or(true));
            if !open && !console {
                // It may still believe the earlier backend's client is connected.
                self.send_ctrl(id, event::PORT_OPEN, 0, &[]);
            }
            log::info!("port {id}: announced again by the driver");
            self.dirty = true;
            self.st.update_interest(idx);
        }
    }

    fn guest_open(&mut self, idx: usize, open: bool) {
        let p = &mut self.st.ports[idx];
        let id = p.id;
        if !p.guest_ready {
            if p.reattaching {
                // The driver has the port; its PORT_READY is on the way.
                p.told_open = Some(open);
                return;
            }
            self.bad(|| format!("port {id}: PORT_OPEN before PORT_READY ignored"));
            return;
        }
        if p.guest_open == open {
            return;
        }
        p.set_guest_open(open);
        log::info!(
            "port {id}: guest {}",
            if open { "opened" } else { "closed" }
        );
        let hostinfo = matches!(p.host, HostSide::Hostinfo);
        if open {
            // A close still waiting for its data to drain keeps applying: the client gets
            // EOF after the previous session's output.
            if hostinfo {
                p.rx_buf = hostinfo::document();
                p.rx_off = 0;
                p.doc_active = true;
                if !p.host_open_sent {
                    p.host_open_sent = true;
                    self.send_ctrl(id, event::PORT_OPEN, 1, &[]);
                }
            }
        } else if hostinfo {
            p.rx_buf.clear();
            p.rx_off = 0;
            p.doc_active = false;
            if !p.host_open_sent {
                // Ready for the next open.
                p.host_open_sent = true;
                self.send_ctrl(id, event::PORT_OPEN, 1, &[]);
            }
        } else if matches!(
            p.host,
            HostSide::Socket {
                client: Some(_),
                ..
            }
        ) && !p.console
        {
            p.close_after_flush = true;
        }
        self.dirty = true;
        self.st.update_interest(idx);
    }

    fn control_rx(&mut self, ring: &mut Ring) {
        self.check_live_driver(ring);
        let mem = ring.memory();
        let mut used = false;
        while let Some(msg) = self.ctrl_out.front() {
            if !ring.pop(&mem, &mut self.chain) {
                if ring.enable_notification(&mem) {
                    continue;
                }
                break;
            }
            let head = self.chain.head;
            let mut reply = ChainWriter::new(&mem, &self.chain);
            let room = reply.remaining();
            // A message goes whole or not at all: the driver reads one per buffer.
            let ok = room >= msg.len() as u64 && reply.write_all(msg).is_ok();
            let written = reply.bytes_written();
            used = true;
            if ok {
                ring.add_used(&mem, head, written as u32);
                self.ctrl_out.pop_front();
                self.shared
                    .stats
                    .control_out
                    .fetch_add(1, Ordering::Relaxed);
            } else {
                ring.add_used(&mem, head, 0);
                self.bad(|| {
                    format!("control receive buffer of {room} bytes too small or unwritable")
                });
            }
        }
        if used {
            ring.notify(&mem);
        }
    }
}
