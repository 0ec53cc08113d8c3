//! SIGBUS inside a file mapping becomes an I/O error instead of the end of the process.
//!
//! A load or store through a shared file mapping raises SIGBUS when the page has no
//! backing any more: the file was truncated under the mapping, or the file system could
//! not allocate the page a store needed (a full tmpfs). The system call path returns
//! EIO or ENOSPC for the same thing. So that the mapped engine ([`super::mapped`]) does
//! no worse, every mapping it reads and writes through is registered here, and the
//! process-wide handler, for a fault inside a registered mapping, puts an anonymous page
//! where the faulting one was (the access then completes, on memory nobody else sees)
//! and counts the fault on the mapping. The engine looks at the count after every copy:
//! a fault makes that operation fail with EIO, and the engine stops mapping the file.
//! A fault anywhere else is what it always was: the handler puts back the action there
//! was before (the Rust runtime's, or the default) and returns, and the access faults
//! again into it.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Once;

/// Mappings registered at once (one per queue worker of a mapped disk).
const SLOTS: usize = 256;

struct Slot {
    /// Start address; 0: free.
    start: AtomicUsize,
    /// Length in bytes (set after `start` is claimed, cleared before it is freed; 0 matches
    /// nothing).
    len: AtomicUsize,
    /// Faults the handler repaired in this mapping.
    faults: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)] // Only the array's initializer.
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faults: AtomicU64::new(0),
};
static SLOTS_TABLE: [Slot; SLOTS] = [FREE; SLOTS];
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);
static INSTALL: Once = Once::new();
/// 0: not tried, 1: installed, else the errno that refused it.
static INSTALLED: AtomicUsize = AtomicUsize::new(0);

/// Installs the handler (once per process). Call it before the thread's seccomp filter
/// forbids rt_sigaction; later calls only report how the first went.
pub fn install() -> io::Result<()> {
    INSTALL.call_once(|| {
        // SAFETY: sysconf has no memory arguments.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            PAGE_SIZE.store(page as usize, Ordering::Relaxed);
        }
        // The action before ours (the Rust runtime's stack-overflow report, or the
        // default), for faults that are not ours. Read before ours is installed, so the
        // handler never sees it unwritten.
        // SAFETY: a valid out pointer; this closure runs once, before the handler exists.
        let saved = unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), PREVIOUS.0.get()) };
        if saved != 0 {
            // SAFETY: as above; SIG_DFL is what the process would have had.
            unsafe { (*PREVIOUS.0.get()).sa_sigaction = libc::SIG_DFL };
        }
        // SAFETY: a zeroed sigaction is a valid starting point; the handler has the
        // SA_SIGINFO signature and only does async-signal-safe work (atomics, mmap,
        // sigaction).
        let r = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                on_sigbus;
            sa.sa_sigaction = handler as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut())
        };
        let state = if r == 0 {
            1
        } else {
            io::Error::last_os_error()
                .raw_os_error()
                .map_or(libc::EPERM as usize, |e| e as usize)
        };
        INSTALLED.store(state, Ordering::Release);
    });
    match INSTALLED.load(Ordering::Acquire) {
        1 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e as i32)),
    }
}

/// The system's page size, as `install` found it (4096 until then).
pub(super) fn page_size() -> usize {
    PAGE_SIZE.load(Ordering::Relaxed)
}

/// A mapping registered with the handler; unregistered on drop (before its unmap).
pub struct Registration {
    slot: &'static Slot,
    seen: u64,
}

impl Registration {
    /// Registers `[start, start + len)`. None: every slot is taken (the caller does not
    /// map, then).
    pub fn new(start: usize, len: usize) -> Option<Self> {
        for slot in &SLOTS_TABLE {
            if slot.start.load(Ordering::Relaxed) != 0 {
                continue;
            }
            // Claimed by its start; the handler matches nothing until the length is in
            // (no access through the mapping can happen before this returns).
            if slot
                .start
                .compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                slot.len.store(len, Ordering::Release);
                let seen = slot.faults.load(Ordering::Acquire);
                return Some(Registration { slot, seen });
            }
        }
        None
    }

    /// Whether the handler repaired a fault in this mapping since the last call.
    pub fn faulted(&mut self) -> bool {
        let now = self.slot.faults.load(Ordering::Acquire);
        std::mem::replace(&mut self.seen, now) != now
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.slot.len.store(0, Ordering::Release);
        self.slot.start.store(0, Ordering::Release);
    }
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers; si_addr is
    // the faulting address for SIGBUS.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in &SLOTS_TABLE {
        let start = slot.start.load(Ordering::Acquire);
        if start == 0 || addr < start || addr - start >= slot.len.load(Ordering::Acquire) {
            continue;
        }
        let page = PAGE_SIZE.load(Ordering::Relaxed);
        let at = addr & !(page - 1);
        // SAFETY: replaces one page inside a mapping this process made and registered
        // (the engine that owns it is the faulting thread, mid-copy); nothing else can
        // hold a reference into it. mmap is async-signal-safe (a system call).
        let r = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if r != libc::MAP_FAILED {
            slot.faults.fetch_add(1, Ordering::AcqRel);
            return;
        }
        break;
    }
    // Not ours (or the page could not be replaced): the action there was before ours,
    // which gets the fault when the access faults again on return.
    // SAFETY: PREVIOUS was written before this handler was installed and never after;
    // sigaction is async-signal-safe.
    unsafe {
        libc::sigaction(libc::SIGBUS, PREVIOUS.0.get(), std::ptr::null_mut());
    }
}

/// The SIGBUS action before ours.
struct Previous(std::cell::UnsafeCell<libc::sigaction>);
// SAFETY: written once by `install` before the handler that reads it exists, read-only after.
unsafe impl Sync for Previous {}
// SAFETY: an all-zero sigaction is valid (SIG_DFL, no flags, empty mask).
static PREVIOUS: Previous = Previous(std::cell::UnsafeCell::new(unsafe { std::mem::zeroed() }));

#[cfg(test)]
mod tests {
    use super::*;

    /// A fault outside every registered mapping still ends the process with SIGBUS (the
    /// handler hands it back), while one inside is repaired and counted. Run in a forked
    /// child, which only makes system calls after the fork.
    #[test]
    fn only_faults_in_registered_mappings_are_repaired() {
        install().expect("install the handler");
        let page = PAGE_SIZE.load(Ordering::Relaxed);
        // Two one-page mappings of memfds, both truncated to nothing after mapping: a
        // load from either faults.
        let mut maps = [std::ptr::null_mut::<u8>(); 2];
        for m in &mut maps {
            // SAFETY: plain system calls; the results are checked.
            unsafe {
                let fd = libc::memfd_create(c"sigbus-test".as_ptr(), libc::MFD_CLOEXEC);
                assert!(fd >= 0);
                assert_eq!(libc::ftruncate(fd, page as i64), 0);
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    page,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd,
                    0,
                );
                assert_ne!(p, libc::MAP_FAILED);
                assert_eq!(libc::ftruncate(fd, 0), 0);
                libc::close(fd);
                *m = p.cast();
            }
        }
        let mut ours = Registration::new(maps[0] as usize, page).expect("a slot");
        // SAFETY: the loads fault by design; the first is repaired (an anonymous page of
        // zeros), the second is the child's end.
        unsafe {
            let child = libc::fork();
            assert!(child >= 0);
            if child == 0 {
                let v = std::ptr::read_volatile(maps[0]);
                if v != 0 {
                    libc::_exit(2);
                }
                let _ = std::ptr::read_volatile(maps[1]);
                libc::_exit(3);
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(child, &mut status, 0), child);
            assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS,
                "the child did not die of SIGBUS on the unregistered page (status {status:#x})"
            );
            // In this process: the registered mapping's fault is repaired and counted.
            assert!(!ours.faulted());
            assert_eq!(std::ptr::read_volatile(maps[0]), 0);
            assert!(ours.faulted());
            assert!(!ours.faulted(), "counted once");
            drop(ours);
            libc::munmap(maps[0].cast(), page);
            libc::munmap(maps[1].cast(), page);
        }
    }
}
