//! Host → guest: bytes read from a port's host side copied into the guest's receive
//! buffers. We read from the host only when the guest has the port open and we hold no
//! undelivered bytes, so data waits in the host's socket or pty while the guest posts no
//! buffers.

use std::io::{self, Write};

use vhost_user_device::{ChainWriter, Ring};

use crate::engine::Engine;
use crate::spec::event;
use crate::stats::Counter;

impl Engine {
    /// Fills port `idx`'s receive buffers on `ring` with host input while both last, then
    /// ends a hostinfo document the guest has read whole.
    pub(crate) fn rx(&mut self, idx: usize, ring: &mut Ring) {
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
}
