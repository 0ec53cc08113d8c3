//! Guest → host: a port's transmit chains written to its host side straight from guest
//! memory (writev over the chain's buffers), bytes held when the host side is slow or
//! absent, and what happens to a chain the host has not taken when the ring stops.
//!
//! When the host is slow (EAGAIN) or, for a named port, absent, the chain stays popped and
//! unused (one per port; the rest wait in the avail ring, so the guest blocks) and is
//! finished when the fd becomes writable or a client connects.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;

use vhost_user_device::memory::host_iovecs;
use vhost_user_device::{ChainReader, GuestMem, PassEnd, Ring, RingPass, Rings, Segment};

use crate::engine::{Engine, BUDGET, MAX_IOV};
use crate::port::Pending;
use crate::ports::HostSide;
use crate::spec::queue;
use crate::stats::{Counter, PortStats, SerialStats};

/// Console output kept while no one is connected (oldest bytes dropped beyond this).
const CONSOLE_BACKLOG: usize = 64 * 1024;
/// Most guest output a port keeps in host memory when it must give a chain back to the
/// guest before its host side took it (the VMM stops the ring): a chain may be up to 4 GiB
/// long, so only this much of it is copied and the rest is dropped and counted
/// (`SerialStats::tx_dropped`).
const HELD_LIMIT: usize = 1 << 20;

/// What a write(2)/writev(2) of a non-empty buffer that returned `n` <= 0 means for the
/// loop around it.
#[derive(Debug)]
enum Stall {
    /// A signal came first (EINTR): write again.
    Retry,
    /// The host side is full (EAGAIN): wait for EPOLLOUT.
    Blocked,
    /// It will not get better: an error, or 0 bytes taken (no progress, and errno is
    /// not set then).
    Failed(io::Error),
}

/// Reads errno right after the write that returned `n`.
fn stall(n: isize) -> Stall {
    if n == 0 {
        return Stall::Failed(io::Error::from(io::ErrorKind::WriteZero));
    }
    let err = io::Error::last_os_error();
    match err.kind() {
        io::ErrorKind::Interrupted => Stall::Retry,
        io::ErrorKind::WouldBlock => Stall::Blocked,
        _ => Stall::Failed(err),
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
    /// Writes port `idx`'s transmit chains on `ring` to its host side (at most `BUDGET` a
    /// call), keeps one pending while the host is slow or absent, and sends the socket
    /// client EOF once the guest closed the port and its output is out.
    pub(crate) fn tx(&mut self, idx: usize, ring: &mut Ring) {
        let mem = ring.memory();
        let mut completed = false;
        let mut drained = false;
        let mut pass = RingPass::new(BUDGET);
        loop {
            if let Flush::Blocked = self.flush(idx, ring, &mem, &mut completed) {
                break;
            }
            if !pass.pop(ring, &mem, &mut self.chain) {
                match pass.end() {
                    // A host side that takes everything at once (a console without
                    // client, a file) would let a guest refilling the ring keep us here:
                    // kicks stay off, we come back through `held`.
                    PassEnd::Budget => self.hold(ring.index()),
                    PassEnd::Empty => drained = true,
                    // A round spent on malformed chains may have left data behind them:
                    // the layer comes back for it, and EOF waits until then.
                    PassEnd::RoundSpent | PassEnd::Open => {}
                }
                break;
            }
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
    pub(crate) fn discard_tx(&mut self, ring: &mut Ring) {
        let mem = ring.memory();
        let q = ring.index();
        let mut pass = RingPass::new(BUDGET);
        while pass.pop(ring, &mem, &mut self.chain) {
            // Counted before the guest can see the buffer back (a driver, or a test,
            // reading the counter after the completion must find it there).
            self.shared.stats.bad_input.fetch_add(1, Ordering::Relaxed);
            ring.add_used(&mem, self.chain.head, 0);
        }
        let n = pass.taken();
        if n > 0 {
            ring.notify(&mem);
            self.log
                .warn(|| format!("queue {q}: {n} buffer(s) for a port that does not exist"));
        }
        if pass.end() == PassEnd::Budget {
            // More may be waiting; kicks stay off.
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
            failed = Some(match stall(n) {
                Stall::Retry => continue,
                // A file opened blocking does not say this; if it does, it is no state
                // to wait in (files are not watched for EPOLLOUT).
                Stall::Blocked => io::Error::from(io::ErrorKind::WouldBlock),
                Stall::Failed(e) => e,
            });
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
                match stall(n) {
                    Stall::Retry => continue,
                    Stall::Blocked => return Flush::Blocked,
                    Stall::Failed(_) => break,
                }
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
            match stall(n) {
                Stall::Retry => continue,
                Stall::Blocked => return Flush::Blocked,
                Stall::Failed(_) => self.write_failed(idx, ring, mem, completed),
            }
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

    pub(crate) fn spill_all(&mut self, rings: &mut Rings) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipe with a non-blocking write end: (read, write).
    fn pipe() -> (i32, i32) {
        let mut fds = [0i32; 2];
        // SAFETY: fds has room for the two descriptors pipe2 writes.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        assert_eq!(r, 0);
        (fds[0], fds[1])
    }

    fn write(fd: i32, buf: &[u8]) -> isize {
        // SAFETY: writes from a live buffer of its length.
        unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) }
    }

    #[test]
    fn a_full_host_side_is_waited_for_and_a_gone_reader_is_a_failure() {
        let (r, w) = pipe();
        let chunk = [0u8; 65536];
        let mut n;
        loop {
            n = write(w, &chunk);
            if n <= 0 {
                break;
            }
        }
        assert!(matches!(stall(n), Stall::Blocked), "a full pipe");
        // SAFETY: r is ours and closed once.
        unsafe { libc::close(r) };
        // The Rust runtime ignores SIGPIPE: the write fails with EPIPE.
        let n = write(w, &chunk[..1]);
        match stall(n) {
            Stall::Failed(e) => assert_eq!(e.raw_os_error(), Some(libc::EPIPE)),
            other => panic!("EPIPE taken as {other:?}"),
        }
        // SAFETY: w is ours and closed once.
        unsafe { libc::close(w) };
    }

    #[test]
    fn no_progress_is_a_failure_and_a_signal_is_a_retry() {
        match stall(0) {
            Stall::Failed(e) => assert_eq!(e.kind(), io::ErrorKind::WriteZero),
            other => panic!("0 bytes taken as {other:?}"),
        }
        // SAFETY: errno is this thread's; set as a write interrupted by a signal sets it.
        unsafe { *libc::__errno_location() = libc::EINTR };
        assert!(matches!(stall(-1), Stall::Retry));
    }
}
