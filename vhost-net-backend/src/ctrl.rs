//! The control queue: RX mode, MAC filter tables and address, and queue-pair selection.
//!
//! QEMU handles the control queue of a vhost-user NIC itself (and tells us about queue
//! pairs with SET_VRING_ENABLE); frontends that pass it on (the test harness, others) get
//! it answered here.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost_user_device::rate_limit::RateLimitedLog;
use vhost_user_device::{
    Chain, ChainReader, ChainWriter, GuestMem, PassEnd, QueueWorker, RingPass, Rings,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::shared::NetShared;
use crate::spec::{ctrl, features};

/// Largest command we read (a MAC table of a few thousand entries).
const MAX_COMMAND: u64 = 64 * 1024;
/// Commands handled per call before the worker serves its other events (the frontend's
/// requests: stopping the ring, shutting down): a driver that re-posts commands as fast as
/// they complete would otherwise keep it in the loop forever.
const BUDGET: usize = 64;

/// The control queue worker.
pub struct CtrlWorker {
    shared: Arc<NetShared>,
    /// Index of the control queue.
    queue: u16,
    acked: u64,
    chain: Chain,
    log: RateLimitedLog,
    /// Written when a call stopped at its budget with commands possibly left, so the
    /// worker comes back (kicks stay off meanwhile).
    more: EventFd,
}

/// Parses one MAC table (u32 count + 6-byte entries) at the front of `data`.
fn mac_table(data: &[u8]) -> Option<(Vec<[u8; 6]>, &[u8])> {
    let n = u32::from_le_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let bytes = n.checked_mul(6)?;
    let body = data.get(4..4 + bytes)?;
    let macs = body
        .chunks_exact(6)
        .map(|c| {
            let mut m = [0u8; 6];
            m.copy_from_slice(c);
            m
        })
        .collect();
    Some((macs, &data[4 + bytes..]))
}

impl CtrlWorker {
    /// A worker for the control queue.
    pub fn new(shared: Arc<NetShared>, queue: u16, acked: u64) -> std::io::Result<Self> {
        Ok(Self {
            shared,
            queue,
            acked,
            chain: Chain::default(),
            log: RateLimitedLog::new(),
            more: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Executes one command; returns the acknowledgement.
    fn execute(&mut self, class: u8, cmd: u8, data: &[u8]) -> u8 {
        let mut st = match self.shared.ctrl.lock() {
            Ok(s) => s,
            Err(e) => e.into_inner(),
        };
        match (class, cmd) {
            (ctrl::CLASS_RX, c) if self.acked & features::CTRL_RX != 0 && c <= ctrl::RX_NOBCAST => {
                let [on] = data else {
                    return ctrl::ERR;
                };
                let on = *on != 0;
                match c {
                    ctrl::RX_PROMISC => st.promisc = on,
                    ctrl::RX_ALLMULTI => st.allmulti = on,
                    ctrl::RX_ALLUNI => st.alluni = on,
                    ctrl::RX_NOMULTI => st.nomulti = on,
                    ctrl::RX_NOUNI => st.nouni = on,
                    _ => st.nobcast = on,
                }
                log::debug!("control: rx mode {c} = {on}");
                ctrl::OK
            }
            (ctrl::CLASS_MAC, ctrl::MAC_TABLE_SET) => {
                let Some((uni, rest)) = mac_table(data) else {
                    return ctrl::ERR;
                };
                let Some((multi, rest)) = mac_table(rest) else {
                    return ctrl::ERR;
                };
                if !rest.is_empty() {
                    return ctrl::ERR;
                }
                log::debug!(
                    "control: MAC filter {} unicast, {} multicast",
                    uni.len(),
                    multi.len()
                );
                st.unicast = uni;
                st.multicast = multi;
                ctrl::OK
            }
            (ctrl::CLASS_MAC, ctrl::MAC_ADDR_SET) if self.acked & features::CTRL_MAC_ADDR != 0 => {
                let Ok(mac) = <[u8; 6]>::try_from(data) else {
                    return ctrl::ERR;
                };
                st.mac = mac;
                ctrl::OK
            }
            (ctrl::CLASS_ANNOUNCE, ctrl::ANNOUNCE_ACK)
                if self.acked & features::GUEST_ANNOUNCE != 0 && data.is_empty() =>
            {
                // We never raise VIRTIO_NET_S_ANNOUNCE ourselves, so there is nothing to
                // clear; the acknowledgement is still valid and answered as such.
                log::debug!("control: guest announced itself");
                ctrl::OK
            }
            (ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET) if self.acked & features::MQ != 0 => {
                let Ok(b) = <[u8; 2]>::try_from(data) else {
                    return ctrl::ERR;
                };
                let n = u16::from_le_bytes(b);
                let max = self.shared.opts.pairs;
                if n == 0 || n > max {
                    return ctrl::ERR;
                }
                drop(st);
                self.shared.active_pairs.store(n, Ordering::Relaxed);
                for p in 0..max {
                    self.shared.set_attached(p, p < n);
                }
                log::info!("control: driver uses {n} of {max} queue pair(s)");
                ctrl::OK
            }
            _ => ctrl::ERR,
        }
    }

    /// Handles the chain in `self.chain`; returns the used length.
    fn handle(&mut self, mem: &GuestMem) -> u32 {
        if self.chain.writable_len() == 0 {
            self.log
                .warn(|| "control command without room for the acknowledgement".into());
            self.shared.stats.ctrl_err.fetch_add(1, Ordering::Relaxed);
            return 0;
        };
        let len = self.chain.readable_len();
        let mut status = ctrl::ERR;
        if (2..=MAX_COMMAND).contains(&len) {
            let mut buf = vec![0u8; len as usize];
            if ChainReader::new(mem, &self.chain)
                .read_exact(&mut buf)
                .is_ok()
            {
                status = self.execute(buf[0], buf[1], &buf[2..]);
            }
        }
        if status == ctrl::OK {
            self.shared.stats.ctrl_ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.shared.stats.ctrl_err.fetch_add(1, Ordering::Relaxed);
        }
        // The acknowledgement is the first writable byte.
        let mut ack = ChainWriter::new(mem, &self.chain);
        if ack.write_all(&[status]).is_err() {
            return 0;
        }
        1
    }
}

impl QueueWorker for CtrlWorker {
    fn process_queue(&mut self, queue: u16, rings: &mut Rings) {
        let Some(ring) = rings.get_mut(queue) else {
            return;
        };
        // The worker lives as long as the connection; a second SET_FEATURES (without
        // RESET_DEVICE) restarts the ring with the features that now apply.
        self.acked = ring.acked_features();
        let mem = ring.memory();
        let mut pass = RingPass::new(BUDGET);
        while pass.pop(ring, &mem, &mut self.chain) {
            let used = self.handle(&mem);
            ring.add_used(&mem, self.chain.head, used);
        }
        if pass.end() == PassEnd::Budget {
            // Kicks stay off: we come back through `more` once the worker has served its
            // other events.
            if self.more.write(1).is_err() {
                self.log
                    .warn(|| "cannot signal the control worker's own eventfd".into());
            }
        }
        if pass.taken() > 0 {
            ring.notify(&mem);
        }
    }

    fn event_fds(&self) -> Vec<RawFd> {
        vec![self.more.as_raw_fd()]
    }

    fn handle_event(&mut self, _fd_index: usize, rings: &mut Rings) {
        let _ = self.more.read();
        if let Some(ring) = rings.get_mut(self.queue) {
            if ring.is_enabled() {
                self.process_queue(self.queue, rings);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_tables() {
        let mut d = Vec::new();
        d.extend_from_slice(&1u32.to_le_bytes());
        d.extend_from_slice(&[1, 2, 3, 4, 5, 6]);
        d.extend_from_slice(&0u32.to_le_bytes());
        let (uni, rest) = mac_table(&d).expect("first table");
        assert_eq!(uni, vec![[1, 2, 3, 4, 5, 6]]);
        let (multi, rest) = mac_table(rest).expect("second table");
        assert!(multi.is_empty() && rest.is_empty());
        assert!(mac_table(&[1, 0, 0, 0, 1]).is_none());
        assert!(mac_table(&[0xff, 0xff, 0xff, 0xff]).is_none());
    }
}
