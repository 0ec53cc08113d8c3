//! `--pin-guest-memory`: guest memory registered as io_uring fixed buffers, within the
//! locked-memory limit.
//!
//! Registering pins every page of guest memory for as long as it is registered, once
//! per queue worker (each has its own io_uring, and the kernel counts each ring's
//! registration). So the backend first checks that all of it fits in RLIMIT_MEMLOCK,
//! counting what every worker has registered ([`PinBudget`]); it checks even where the
//! kernel would not count (a process with CAP_IPC_LOCK, such as root): the limit is how
//! an operator says how much RAM the backend may pin. When it does not fit, or the
//! kernel refuses (memory it cannot pin for long, such as a file on a disk file system
//! rather than memfd, shm or hugetlbfs), one warning says so with the numbers and the
//! disk is served without fixed buffers: the guest's I/O never fails for it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use vhost_user_device::engine::{guest_bytes, FixedError, Uring};
use vhost_user_device::GuestMem;

use crate::disk::Disk;

/// The process's locked-memory allowance and what the workers have taken of it.
#[derive(Debug)]
pub struct PinBudget {
    /// RLIMIT_MEMLOCK (soft) at start, in bytes; u64::MAX: unlimited.
    limit: u64,
    /// Bytes the workers have registered (or are about to).
    pinned: AtomicU64,
    /// The shortfall warning was given (once per process: every worker would repeat it).
    warned: AtomicBool,
}

/// RLIMIT_MEMLOCK's soft limit in bytes (u64::MAX: unlimited or unknown).
pub fn memlock_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `r`.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0
        || r.rlim_cur == libc::RLIM_INFINITY
    {
        return u64::MAX;
    }
    r.rlim_cur
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

impl PinBudget {
    /// The budget for a disk whose command line asked (`asked`) for pinned guest memory:
    /// None (with a warning saying why) unless the disk is on io_uring with O_DIRECT,
    /// the only I/O fixed buffers change.
    pub fn for_disk(disk: &Disk, asked: bool) -> Option<Self> {
        if !asked {
            return None;
        }
        let why = if disk.engine != vhost_user_device::EngineKind::Uring {
            Some(format!("the disk's I/O engine is {}", disk.engine))
        } else if !disk.direct {
            Some("the disk is not opened with O_DIRECT (--cache writeback, or the file system has no O_DIRECT)".to_string())
        } else {
            None
        };
        if let Some(why) = why {
            log::warn!(
                "--pin-guest-memory has no effect: {why}; fixed buffers only serve io_uring \
                 with O_DIRECT"
            );
            return None;
        }
        let limit = memlock_limit();
        log::info!(
            "--pin-guest-memory: guest memory will be registered as io_uring fixed buffers \
             (RLIMIT_MEMLOCK {})",
            if limit == u64::MAX {
                "unlimited".to_string()
            } else {
                mib(limit)
            }
        );
        Some(Self::with_limit(limit))
    }

    /// A budget of `limit` bytes.
    pub fn with_limit(limit: u64) -> Self {
        Self {
            limit,
            pinned: AtomicU64::new(0),
            warned: AtomicBool::new(false),
        }
    }

    /// Bytes registered by all workers now.
    pub fn pinned(&self) -> u64 {
        self.pinned.load(Ordering::Relaxed)
    }

    /// Takes `bytes` of the allowance; Err(bytes pinned in all if this were taken).
    fn reserve(&self, bytes: u64) -> Result<(), u64> {
        let mut cur = self.pinned.load(Ordering::Relaxed);
        loop {
            let after = cur.saturating_add(bytes);
            if after > self.limit {
                return Err(after);
            }
            match self
                .pinned
                .compare_exchange_weak(cur, after, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
    }

    fn release(&self, bytes: u64) {
        let _ = self
            .pinned
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |p| {
                Some(p.saturating_sub(bytes))
            });
    }

    /// Logs `msg` unless a warning was given already.
    fn warn_once(&self, msg: impl FnOnce() -> String) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            log::warn!("{}", msg());
        }
    }
}

/// One worker's registration: which memory its ring has registered, and how much of
/// the budget that took.
#[derive(Debug, Default)]
pub struct PinnedMemory {
    /// The snapshot last looked at (registered or not): a new one means new memory. Weak:
    /// remembering it must not keep its mappings alive (the ring holds what it registered).
    seen: Weak<GuestMem>,
    /// Bytes this worker holds of the budget.
    reserved: u64,
}

impl PinnedMemory {
    /// Registers `mem` on `ring` if it is not the memory seen last; `workers` is how many
    /// rings may register it (for the message). Must be called before any request on
    /// `mem` is pushed.
    #[inline]
    pub fn follow(
        &mut self,
        budget: &PinBudget,
        ring: &mut Uring,
        mem: &Arc<GuestMem>,
        workers: u16,
    ) {
        if std::ptr::eq(self.seen.as_ptr(), Arc::as_ptr(mem)) {
            return;
        }
        self.register(budget, ring, mem, workers);
    }

    #[cold]
    fn register(
        &mut self,
        budget: &PinBudget,
        ring: &mut Uring,
        mem: &Arc<GuestMem>,
        workers: u16,
    ) {
        // The old registration goes first: it is released whatever happens next.
        ring.unregister_memory();
        budget.release(std::mem::take(&mut self.reserved));
        let bytes = guest_bytes(mem);
        if bytes == 0 {
            self.seen = Arc::downgrade(mem);
            return;
        }
        if let Err(total) = budget.reserve(bytes) {
            self.seen = Arc::downgrade(mem);
            let need = bytes.saturating_mul(u64::from(workers.max(1)));
            budget.warn_once(|| {
                format!(
                    "--pin-guest-memory: guest memory of {} on each of {workers} queue \
                     worker(s) ({} pinned in all, {} at this point) exceeds RLIMIT_MEMLOCK of \
                     {}; serving the disk without io_uring fixed buffers. To pin it, raise the \
                     limit to at least {} (systemd: LimitMEMLOCK={}; shell: ulimit -l {}; \
                     running process: prlimit --memlock=...), or drop --pin-guest-memory",
                    mib(bytes),
                    mib(need),
                    mib(total),
                    mib(budget.limit),
                    mib(need),
                    need,
                    need.div_ceil(1024),
                )
            });
            return;
        }
        match ring.register_memory(mem) {
            Ok(()) => {
                self.seen = Arc::downgrade(mem);
                self.reserved = bytes;
                log::debug!("registered {} of guest memory as fixed buffers", mib(bytes));
            }
            // The kernel did not take the queued submissions yet: try again with the
            // next request (`seen` stays old).
            Err(FixedError::Busy) => budget.release(bytes),
            Err(e) => {
                self.seen = Arc::downgrade(mem);
                budget.release(bytes);
                budget.warn_once(|| {
                    format!(
                        "--pin-guest-memory: cannot register {} of guest memory with io_uring \
                         ({e}); serving the disk without fixed buffers. ENOMEM/EAGAIN: raise \
                         RLIMIT_MEMLOCK (LimitMEMLOCK=, ulimit -l); EOPNOTSUPP/EFAULT: the VMM's \
                         guest memory must be memfd, shm or hugetlbfs (QEMU: \
                         memory-backend-memfd), not a file on disk",
                        mib(bytes)
                    )
                });
            }
        }
    }

    /// Gives this worker's share of the budget back (the ring is going away).
    pub fn release(&mut self, budget: &PinBudget) {
        budget.release(std::mem::take(&mut self.reserved));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_shared_and_never_overdrawn() {
        let b = PinBudget::with_limit(100);
        assert_eq!(b.reserve(60), Ok(()));
        assert_eq!(b.reserve(60), Err(120));
        assert_eq!(b.pinned(), 60, "a refused reservation takes nothing");
        assert_eq!(b.reserve(40), Ok(()));
        b.release(60);
        assert_eq!(b.pinned(), 40);
        b.release(1000);
        assert_eq!(b.pinned(), 0);
        let unlimited = PinBudget::with_limit(u64::MAX);
        assert_eq!(unlimited.reserve(u64::MAX), Ok(()));
    }
}
