//! Active mirroring (`--copy-mode write-blocking`): while a migration job mirrors, a
//! write, discard or write-zeroes completes to the guest only once the blocks it changed
//! are on the destination. The guest's write rate is then bounded by the link, so the job
//! converges whatever the guest does.
//!
//! It works in rounds, like a group commit:
//! - a worker whose write request finished on the source's disk marks its blocks dirty
//!   (as always), then takes a *ticket*, the number of the round now open, and holds the
//!   completion back until that round is mirrored;
//! - the job opens the next round ([`Mirror::begin_round`] returns the number of the one
//!   it closes), sends every dirty block, has the destination acknowledge them (a
//!   Barrier), and declares the round mirrored ([`Mirror::mirrored`]), which wakes the
//!   workers.
//!
//! Why a ticket is enough: a worker marks its blocks, then (SeqCst fence) reads the round
//! number; the job bumps the round number, then (SeqCst fence) takes the dirty blocks. If
//! the worker read round `r`, its marks come before the job's bump of `r` in the single
//! total order of the fences, so the pass that follows that bump sees them: when round
//! `r` is mirrored, so are the worker's blocks. A worker that read `r + 1` waits one more
//! round.
//!
//! When mirroring stops (the job completed, failed or was cancelled), every held write
//! is released: after a hand-over its blocks went in the last pass; after a failure the
//! source keeps the disk, and the blocks are in its dirty bitmap for the next sync.

use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// The mirroring state of one device, shared by its workers and the migration job.
#[derive(Debug)]
pub struct Mirror {
    active: AtomicBool,
    /// The round writes finishing now wait for (1-based).
    round: AtomicU64,
    /// Every round up to this one is on the destination.
    done: AtomicU64,
    /// The highest ticket a worker holds a write for.
    wanted: AtomicU64,
    /// The job sleeps here while no write waits.
    signal: (Mutex<()>, Condvar),
    /// A worker draining its rings sleeps here until a round lands.
    landed: (Mutex<()>, Condvar),
}

impl Default for Mirror {
    fn default() -> Self {
        Self::new()
    }
}

impl Mirror {
    /// Not mirroring.
    pub fn new() -> Self {
        Self {
            active: AtomicBool::new(false),
            round: AtomicU64::new(1),
            done: AtomicU64::new(0),
            wanted: AtomicU64::new(0),
            signal: (Mutex::new(()), Condvar::new()),
            landed: (Mutex::new(()), Condvar::new()),
        }
    }

    /// Whether writes finishing now must wait for the destination.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Writes finishing from now on wait for the destination.
    pub fn start(&self) {
        // A fresh round: tickets of an earlier job (a worker may not have looked at its
        // stop yet) stay released.
        let old = self.round.fetch_add(1, Ordering::SeqCst);
        self.done.store(old, Ordering::SeqCst);
        self.active.store(true, Ordering::SeqCst);
    }

    /// Mirroring is over: every held write may complete (the caller wakes the workers).
    pub fn stop(&self) {
        self.active.store(false, Ordering::SeqCst);
        self.done.store(u64::MAX, Ordering::SeqCst);
        self.notify_landed();
    }

    /// A worker finished a write whose blocks are already marked dirty: the round it
    /// waits for, or None if it may complete at once (not mirroring).
    pub fn ticket(&self) -> Option<u64> {
        if !self.is_active() {
            return None;
        }
        // Orders the caller's dirty marks before the round number it reads (module doc).
        fence(Ordering::SeqCst);
        let t = self.round.load(Ordering::SeqCst);
        if self.is_mirrored(t) {
            return None;
        }
        if self.wanted.fetch_max(t, Ordering::SeqCst) < t {
            let _guard = self.signal.0.lock().unwrap_or_else(|e| e.into_inner());
            self.signal.1.notify_all();
        }
        Some(t)
    }

    /// Whether the writes holding `ticket` may complete.
    pub fn is_mirrored(&self, ticket: u64) -> bool {
        self.done.load(Ordering::SeqCst) >= ticket
    }

    /// Whether some write waits for a round not yet mirrored.
    pub fn waiting(&self) -> bool {
        self.wanted.load(Ordering::SeqCst) > self.done.load(Ordering::SeqCst)
    }

    /// The job waits (at most `timeout`) for a write to wait for it.
    pub fn wait_for_writes(&self, timeout: Duration) {
        let guard = self.signal.0.lock().unwrap_or_else(|e| e.into_inner());
        if self.waiting() {
            return;
        }
        let _ = self
            .signal
            .1
            .wait_timeout(guard, timeout)
            .unwrap_or_else(|e| e.into_inner());
    }

    /// Closes the open round and opens the next; returns the closed round's number. The
    /// caller then takes the dirty blocks, sends them, and calls [`Mirror::mirrored`].
    pub fn begin_round(&self) -> u64 {
        let r = self.round.fetch_add(1, Ordering::SeqCst);
        // Orders the bump before the dirty blocks the caller takes next (module doc).
        fence(Ordering::SeqCst);
        r
    }

    /// Round `r` (and all before it) is on the destination.
    pub fn mirrored(&self, r: u64) {
        self.done.fetch_max(r, Ordering::SeqCst);
        self.notify_landed();
    }

    /// A worker waits (at most `timeout`) for the round of `ticket` to land.
    pub fn wait_mirrored(&self, ticket: u64, timeout: Duration) {
        let guard = self.landed.0.lock().unwrap_or_else(|e| e.into_inner());
        if self.is_mirrored(ticket) {
            return;
        }
        let _ = self
            .landed
            .1
            .wait_timeout(guard, timeout)
            .unwrap_or_else(|e| e.into_inner());
    }

    fn notify_landed(&self) {
        let _guard = self.landed.0.lock().unwrap_or_else(|e| e.into_inner());
        self.landed.1.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::DirtyBitmap;
    use std::sync::Arc;

    #[test]
    fn an_inactive_mirror_holds_nothing() {
        let m = Mirror::new();
        assert_eq!(m.ticket(), None);
        assert!(!m.waiting());
    }

    #[test]
    fn a_write_completes_once_its_round_is_mirrored() {
        let m = Mirror::new();
        m.start();
        let t = m.ticket().expect("mirroring: the write waits");
        assert!(m.waiting());
        assert!(!m.is_mirrored(t));
        let r = m.begin_round();
        assert_eq!(
            r, t,
            "the round the write waits for is the one the job closes"
        );
        // A write finishing during the round waits for the next.
        let t2 = m.ticket().expect("waits");
        assert_eq!(t2, t + 1);
        m.mirrored(r);
        assert!(m.is_mirrored(t));
        assert!(!m.is_mirrored(t2));
        assert!(m.waiting());
        m.mirrored(m.begin_round());
        assert!(m.is_mirrored(t2));
        assert!(!m.waiting());
    }

    #[test]
    fn stopping_releases_every_write_and_a_restart_holds_again() {
        let m = Mirror::new();
        m.start();
        let t = m.ticket().expect("waits");
        m.stop();
        assert!(m.is_mirrored(t));
        assert_eq!(m.ticket(), None);
        m.start();
        let t2 = m.ticket().expect("a new job holds writes again");
        assert!(!m.is_mirrored(t2));
        assert!(m.is_mirrored(t), "an old ticket stays released");
    }

    /// The invariant the whole mode rests on, under real threads: every write that was
    /// released had its block taken by a pass that began after the write finished.
    #[test]
    fn a_released_write_was_taken_by_a_later_pass() {
        const BLOCKS: u64 = 256;
        let m = Arc::new(Mirror::new());
        let dirty = Arc::new(DirtyBitmap::new(BLOCKS * 4096, 4096).expect("bitmap"));
        // For each block: the number of writes finished, and the writes a pass has taken.
        let written: Arc<Vec<AtomicU64>> =
            Arc::new((0..BLOCKS).map(|_| AtomicU64::new(0)).collect());
        let copied: Arc<Vec<AtomicU64>> =
            Arc::new((0..BLOCKS).map(|_| AtomicU64::new(0)).collect());
        m.start();
        let stop = Arc::new(AtomicBool::new(false));
        let job = {
            let (m, dirty, written, copied, stop) = (
                m.clone(),
                dirty.clone(),
                written.clone(),
                copied.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    m.wait_for_writes(Duration::from_millis(5));
                    let r = m.begin_round();
                    let mut from = 0;
                    while let Some((first, count)) = dirty.take(from, 64) {
                        for b in first..first + count {
                            // The "copy": what was written by now is what the pass reads.
                            let w = written[b as usize].load(Ordering::SeqCst);
                            copied[b as usize].fetch_max(w, Ordering::SeqCst);
                        }
                        from = first + count;
                    }
                    m.mirrored(r);
                }
            })
        };
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let (m, dirty, written, copied) =
                    (m.clone(), dirty.clone(), written.clone(), copied.clone());
                std::thread::spawn(move || {
                    for i in 0..2000u64 {
                        let b = (i * 7 + w * 3) % BLOCKS;
                        let n = written[b as usize].fetch_add(1, Ordering::SeqCst) + 1;
                        dirty.mark(b * 4096, 4096);
                        if let Some(t) = m.ticket() {
                            while !m.is_mirrored(t) {
                                std::thread::yield_now();
                            }
                        }
                        let c = copied[b as usize].load(Ordering::SeqCst);
                        assert!(c >= n, "block {b}: write {n} released with copy {c}");
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer");
        }
        stop.store(true, Ordering::Release);
        job.join().expect("job");
    }
}
