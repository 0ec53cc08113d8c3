//! The transmit side of one queue pair on the layer's I/O engine: a batch of frames, each
//! one writev on the tap queue straight from guest memory, in one io_uring submission.
//!
//! Each write owns its buffers (an [`IovecList`], which keeps the guest memory snapshot
//! mapped) until its completion: a call that fails half-way leaves its writes with the
//! engine, which the next call finishes first.

use std::io;
use std::os::fd::BorrowedFd;

use vhost_user_device::engine::{
    Completion, Engine, Op, Pushed, RingMode, Uring, CURRENT_POSITION,
};
use vhost_user_device::IovecList;

/// A frame to write: where its buffers are (taken by the write, given back only when the
/// write is to be retried).
pub trait TxBufs {
    /// The frame's buffers.
    fn bufs(&mut self) -> &mut Option<IovecList>;
}

impl TxBufs for Option<IovecList> {
    fn bufs(&mut self) -> &mut Option<IovecList> {
        self
    }
}

/// Writes of frames to one tap queue.
pub struct TxUring {
    engine: Engine,
    /// Use RWF_NOWAIT (a full tap answers EAGAIN instead of parking the write).
    nowait: bool,
    /// Tag of the current call (upper half of user_data): completions left over from a
    /// call that failed are not mistaken for this call's.
    generation: u32,
    /// Reused: completions of one wait, and the frames to (re)write.
    completions: Vec<Completion>,
    todo: Vec<usize>,
}

impl TxUring {
    /// A ring of `entries` slots writing to `tap`. A plain ring without an eventfd: the
    /// worker waits for TX completions in the submitting call (a tap write does not
    /// block), so deferred task work and a signal per completion would only cost.
    pub fn new(entries: u32, tap: BorrowedFd<'_>) -> io::Result<Self> {
        let uring = Uring::without_eventfd(entries, tap, RingMode::Plain)?;
        Ok(Self {
            engine: Engine::Uring(Box::new(uring)),
            nowait: true,
            generation: 0,
            completions: Vec::new(),
            todo: Vec::new(),
        })
    }

    /// Waits for the writes of earlier calls that failed; their results are dropped.
    fn finish_leftovers(&mut self) -> io::Result<()> {
        while self.engine.in_flight() > 0 {
            self.engine.submit_and_wait(self.engine.in_flight())?;
            self.engine.reap(&mut self.completions)?;
            self.completions.clear();
        }
        Ok(())
    }

    /// Writes the buffers of each entry of `frames` as one frame (taking them) and stores
    /// the results (bytes or -errno) in `results`, in order. Returns when every write
    /// completed, or with an error; writes still queued or in flight then stay with the
    /// engine (owning their buffers), and the next call completes them before anything
    /// else.
    pub fn writev_batch<F: TxBufs>(
        &mut self,
        frames: &mut [F],
        results: &mut Vec<i32>,
    ) -> io::Result<()> {
        results.clear();
        results.resize(frames.len(), -libc::ECANCELED);
        self.finish_leftovers()?;
        self.generation = self.generation.wrapping_add(1);
        let generation = self.generation;
        let mut todo = std::mem::take(&mut self.todo);
        todo.clear();
        todo.extend(0..frames.len());
        while !todo.is_empty() {
            let flags = if self.nowait { libc::RWF_NOWAIT } else { 0 };
            let mut outstanding = 0usize;
            for &i in &todo {
                let Some(bufs) = frames.get_mut(i).and_then(|f| f.bufs().take()) else {
                    continue;
                };
                let op = Op::Write {
                    offset: CURRENT_POSITION,
                    bufs,
                    flags,
                };
                match self
                    .engine
                    .push(op, u64::from(generation) << 32 | i as u64, false)?
                {
                    Pushed::Submitted => outstanding += 1,
                    Pushed::Done(c) => self.completions.push(c),
                }
            }
            // Those done at once (an inline engine), then those the kernel completes.
            for c in self.completions.drain(..) {
                if record(c, generation, results, frames) {
                    outstanding = outstanding.saturating_sub(1);
                }
            }
            while outstanding > 0 {
                self.engine.submit_and_wait(outstanding)?;
                let mut got = 0;
                self.engine.reap_each(|c| {
                    if record(c, generation, results, frames) {
                        got += 1;
                    }
                })?;
                outstanding = outstanding.saturating_sub(got);
            }
            todo.clear();
            if self.nowait && results.contains(&-libc::EOPNOTSUPP) {
                // This kernel's tap does not take RWF_NOWAIT: writes to a tap do not block
                // anyway (its send buffer is unlimited), so write without it.
                self.nowait = false;
                todo.extend(
                    results
                        .iter()
                        .enumerate()
                        .filter(|(_, &r)| r == -libc::EOPNOTSUPP)
                        .map(|(i, _)| i),
                );
            }
        }
        self.todo = todo;
        Ok(())
    }
}

/// Stores the result of a write of call `generation` (false: a leftover of an earlier
/// call, dropped). Only a retry without RWF_NOWAIT needs the buffers back.
fn record<F: TxBufs>(
    c: Completion,
    generation: u32,
    results: &mut [i32],
    frames: &mut [F],
) -> bool {
    if (c.user_data >> 32) as u32 != generation {
        return false;
    }
    let i = (c.user_data & 0xffff_ffff) as usize;
    if let (Some(r), Some(f)) = (results.get_mut(i), frames.get_mut(i)) {
        *r = c.result;
        if c.result == -libc::EOPNOTSUPP {
            *f.bufs() = c.op.into_bufs();
        }
    }
    true
}

impl Drop for TxUring {
    fn drop(&mut self) {
        // Writes still queued or in flight: give them a few chances to finish. If they
        // cannot, the engine leaks them (and the guest memory they read) when dropped,
        // rather than let the kernel read unmapped memory.
        for _ in 0..3 {
            if self.finish_leftovers().is_ok() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
    use vhost_user_device::AlignedBuf;

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: a valid array for two descriptors.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        assert_eq!(rc, 0, "pipe2: {}", io::Error::last_os_error());
        // SAFETY: two fresh descriptors we own.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn frame(data: &[u8]) -> Option<IovecList> {
        let mut b = AlignedBuf::new(data.len()).expect("alloc");
        b.as_mut_slice().copy_from_slice(data);
        Some(IovecList::owned(b))
    }

    fn drain(fd: &OwnedFd) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: a valid buffer of its length.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
    }

    /// Frames go out whole and in order, each result is its frame's, and a full pipe
    /// answers EAGAIN for the frames it cannot take (the caller writes them again).
    #[test]
    fn a_batch_is_written_in_order_and_a_full_pipe_says_eagain() {
        let (r, w) = pipe();
        let mut u = TxUring::new(8, w.as_fd()).expect("io_uring");
        let mut frames = vec![frame(b"first-frame"), frame(b"second"), frame(b"3")];
        let mut results = Vec::new();
        u.writev_batch(&mut frames, &mut results).expect("write");
        assert_eq!(results, vec![11, 6, 1]);
        assert_eq!(drain(&r), b"first-framesecond3");
        // Fill the pipe (64 KiB by default), then one more frame: EAGAIN, not a block.
        let big = vec![0x5au8; 1 << 20];
        let mut frames = vec![frame(&big), frame(b"late")];
        u.writev_batch(&mut frames, &mut results).expect("write");
        assert!(
            results[0] > 0 && (results[0] as usize) < big.len(),
            "{results:?}"
        );
        assert_eq!(results[1], -libc::EAGAIN, "{results:?}");
    }
}
