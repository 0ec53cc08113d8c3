//! The control queues of MULTIPORT: the driver's messages (DEVICE_READY, PORT_READY,
//! PORT_OPEN) and our replies and announcements (DEVICE_ADD, CONSOLE_PORT, PORT_NAME,
//! PORT_OPEN, RESIZE), and taking over a driver an earlier backend set up.

use std::io::{Read, Write};
use std::sync::atomic::Ordering;

use vhost_user_device::{ChainReader, ChainWriter, PassEnd, Ring, RingPass};

use crate::engine::{Engine, BUDGET};
use crate::hostinfo;
use crate::ports::HostSide;
use crate::spec::{event, queue, Control, CONTROL_SIZE};

impl Engine {
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

    /// Takes the driver's control messages from `ring` (at most `BUDGET` a call) and acts
    /// on them.
    pub(crate) fn control_tx(&mut self, ring: &mut Ring) {
        self.check_live_driver(ring);
        let mem = ring.memory();
        let mut completed = false;
        let mut pass = RingPass::new(BUDGET);
        while pass.pop(ring, &mem, &mut self.chain) {
            // A message is CONTROL_SIZE bytes; fewer (a short chain, unreadable memory)
            // is refused below.
            let mut buf = [0u8; CONTROL_SIZE];
            let got = ChainReader::new(&mem, &self.chain)
                .read(&mut buf)
                .unwrap_or(0);
            let head = self.chain.head;
            ring.add_used(&mem, head, 0);
            completed = true;
            self.shared.stats.control_in.fetch_add(1, Ordering::Relaxed);
            match Control::parse(&buf[..got]) {
                Some(c) => self.control(c),
                None => self.bad(|| format!("control message of {got} bytes (need 8) ignored")),
            }
        }
        if pass.end() == PassEnd::Budget {
            // Kicks stay off: we come back through `held`.
            self.hold(ring.index());
        }
        if completed {
            ring.notify(&mem);
        }
    }

    /// Acts on one control message from the driver.
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

    /// Delivers the queued control messages into the driver's control receive buffers,
    /// one message per buffer, in order.
    pub(crate) fn control_rx(&mut self, ring: &mut Ring) {
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
