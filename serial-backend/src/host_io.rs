//! The host side of the ports: what the worker's own epoll reports (clients connecting
//! and hanging up, the console size timer, emergency writes), and reading host input for
//! the guest.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;

use vmm_sys_util::epoll::EventSet;

use crate::engine::Engine;
use crate::host_poll::{KIND_DATA, KIND_LISTENER, TOKEN_EMERG, TOKEN_TIMER, TOKEN_WAKE};
use crate::ports::{window_size, Client, HostSide};
use crate::spec::event;
use crate::stats::Counter;

/// Bytes read from a host fd at a time (and held until the guest took them).
const RX_CHUNK: usize = 64 * 1024;

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

impl Engine {
    pub(crate) fn host_events(&mut self) {
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
    pub(crate) fn client_gone(&mut self, idx: usize) {
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
    pub(crate) fn fill(&mut self, idx: usize) -> bool {
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
}
