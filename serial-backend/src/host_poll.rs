//! The ports and the epoll fd that watches their host sides (listening sockets, clients,
//! ptys, stdio) together with the worker's own wake-up, the console size timer and the
//! emergency-write eventfd. The worker's epoll fd is nested in the layer's, so one
//! readiness of it brings the worker to look at all of them. Each port is registered for
//! exactly the readiness the worker can act on now (`PortsState::update_interest`), so
//! data waits in the host's socket or pty while the guest posts no buffers.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::port::{Port, Reg};
use crate::ports::HostSide;
use crate::state::ConsoleState;

/// How often console window sizes are checked.
const SIZE_POLL: Duration = Duration::from_millis(250);

/// Tokens of our own fds in [`PortsState`]'s epoll; a port's fds get [`token`]s.
pub(crate) const TOKEN_WAKE: u64 = u64::MAX;
pub(crate) const TOKEN_TIMER: u64 = u64::MAX - 1;
pub(crate) const TOKEN_EMERG: u64 = u64::MAX - 2;
/// Kinds of a port's fds, in the low two bits of its token.
pub(crate) const KIND_LISTENER: u64 = 0;
pub(crate) const KIND_DATA: u64 = 1;
pub(crate) const KIND_STDOUT: u64 = 2;

/// The token of port `idx`'s fd of `kind`.
pub(crate) fn token(idx: usize, kind: u64) -> u64 {
    (idx as u64) << 2 | kind
}

/// Ports and our epoll: everything that outlives a VMM connection.
pub struct PortsState {
    /// The ports.
    pub ports: Vec<Port>,
    pub(crate) by_id: Vec<Option<usize>>,
    pub(crate) epoll: Epoll,
    pub(crate) wake: EventFd,
    pub(crate) timer: TimerFd,
}

impl PortsState {
    /// The console's state for DEVICE_STATE when no worker runs (nothing undelivered on
    /// the control queue then).
    pub fn saved(&self) -> ConsoleState {
        ConsoleState {
            ports: self.ports.iter().map(Port::saved).collect(),
            control: Vec::new(),
        }
    }

    /// Whether `state` describes these ports (same ids): a destination with another
    /// port layout refuses it.
    pub fn check(&self, state: &ConsoleState) -> Result<(), String> {
        let mut ours: Vec<u32> = self.ports.iter().map(|p| p.id).collect();
        let mut theirs: Vec<u32> = state.ports.iter().map(|p| p.id).collect();
        ours.sort_unstable();
        theirs.sort_unstable();
        if ours != theirs {
            return Err(format!(
                "the source has ports {theirs:?}, this backend {ours:?}: start it with the \
                 same --port list"
            ));
        }
        Ok(())
    }

    /// Sets up the epoll fd with the wake, timer and emergency-write fds.
    pub fn new(ports: Vec<Port>, max_ports: u32, emerg_fd: RawFd) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let wake = EventFd::new(EFD_NONBLOCK)?;
        let mut timer = TimerFd::new()?;
        timer.reset(SIZE_POLL, Some(SIZE_POLL))?;
        for (fd, t) in [
            (wake.as_raw_fd(), TOKEN_WAKE),
            (timer.as_raw_fd(), TOKEN_TIMER),
            (emerg_fd, TOKEN_EMERG),
        ] {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, t))?;
        }
        let mut by_id = vec![None; max_ports as usize];
        for (i, p) in ports.iter().enumerate() {
            if let Some(slot) = by_id.get_mut(p.id as usize) {
                *slot = Some(i);
            }
        }
        let mut st = Self {
            ports,
            by_id,
            epoll,
            wake,
            timer,
        };
        for i in 0..st.ports.len() {
            st.update_interest(i);
        }
        Ok(st)
    }

    pub(crate) fn set_reg(
        &mut self,
        idx: usize,
        kind: usize,
        fd: Option<RawFd>,
        events: u32,
        keep: bool,
    ) {
        let port = &mut self.ports[idx];
        let reg = port.regs[kind];
        let want = fd.filter(|_| events != 0 || keep);
        if reg.fd >= 0 && want != Some(reg.fd) {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, reg.fd, EpollEvent::default());
            port.regs[kind] = Reg::default();
        }
        let Some(fd) = want else { return };
        if port.unpollable[kind] || (port.regs[kind].fd == fd && port.regs[kind].events == events) {
            return;
        }
        let ev = EpollEvent::new(
            EventSet::from_bits_truncate(events),
            token(idx, kind as u64),
        );
        let (first, second) = if port.regs[kind].fd == fd {
            (ControlOperation::Modify, ControlOperation::Add)
        } else {
            (ControlOperation::Add, ControlOperation::Modify)
        };
        let r = self
            .epoll
            .ctl(first, fd, ev)
            .or_else(|_| self.epoll.ctl(second, fd, ev));
        match r {
            Ok(()) => port.regs[kind] = Reg { fd, events },
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                // A regular file or /dev/null: always ready, never polled.
                port.unpollable[kind] = true;
            }
            Err(e) => log::warn!("port {}: cannot poll fd {fd}: {e}", port.id),
        }
    }

    /// Registers exactly the readiness we care about now.
    pub(crate) fn update_interest(&mut self, idx: usize) {
        let p = &self.ports[idx];
        let want_read = p.guest_open && p.rx_empty();
        let want_write = !p.out_buf.is_empty() || p.pending.is_some();
        let inn = EventSet::IN.bits();
        let out = EventSet::OUT.bits();
        match &p.host {
            HostSide::Socket {
                listener, client, ..
            } => {
                let lfd = listener.as_raw_fd();
                let lev = if client.is_none() { inn } else { 0 };
                let (cfd, cev) = match client {
                    Some(c) if !c.hung_up => {
                        let mut ev = 0;
                        if want_read {
                            ev |= inn;
                        }
                        if want_write && !c.wr_shut {
                            ev |= out;
                        }
                        (Some(c.stream.as_raw_fd()), ev)
                    }
                    _ => (None, 0),
                };
                self.set_reg(idx, KIND_LISTENER as usize, Some(lfd), lev, false);
                // The client stays registered with no events, to see it hang up.
                self.set_reg(idx, KIND_DATA as usize, cfd, cev, true);
            }
            HostSide::Pty(pty) => {
                let fd = pty.master.as_raw_fd();
                let ev = if want_read { inn } else { 0 } | if want_write { out } else { 0 };
                self.set_reg(idx, KIND_DATA as usize, Some(fd), ev, false);
            }
            HostSide::Stdio { eof } => {
                let rev = if want_read && !eof { inn } else { 0 };
                let wev = if want_write { out } else { 0 };
                self.set_reg(idx, KIND_DATA as usize, Some(0), rev, false);
                self.set_reg(idx, KIND_STDOUT as usize, Some(1), wev, false);
            }
            HostSide::File(_) | HostSide::Hostinfo => {}
        }
    }
}
