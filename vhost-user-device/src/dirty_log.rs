//! Dirty-page logging for the frontend's live migration (VHOST_F_LOG_ALL + LOG_SHMFD).
//!
//! The frontend hands us a shared bitmap with one bit per 4 KiB guest-physical page
//! (`SET_LOG_BASE`) and switches logging on and off with the `VHOST_F_LOG_ALL` feature bit.
//! Every byte we write into guest memory must set its page's bit before the write becomes
//! visible to the guest through the used ring.
//!
//! Unlike vhost-user-backend's per-region bitmaps, one [`DirtyLog`] is shared by every region
//! (each region only remembers its guest-physical base), so regions added after
//! `SET_LOG_BASE` are logged too, and clearing LOG_ALL stops logging at once.
//!
//! Writes made through vm-memory are marked through the [`RegionLog`] bitmap automatically;
//! writes made behind vm-memory's back (io_uring reads into guest buffers) call
//! [`DirtyLog::mark`] by hand when they complete.

use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

use vm_memory::bitmap::{Bitmap, BitmapSlice, NewBitmap, WithBitmapSlice};

/// The page size of the vhost-user dirty log (`VHOST_LOG_PAGE`).
pub const LOG_PAGE_SIZE: u64 = 0x1000;

/// Errors from mapping the frontend's log.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    /// The frontend asked for a zero-sized or absurdly large log.
    #[error("dirty log of {0} bytes is not a valid size")]
    InvalidSize(u64),
    /// The log file is unusable (too short for the log).
    #[error(transparent)]
    File(#[from] crate::fd_check::FdCheckError),
    /// mmap of the log file failed.
    #[error("cannot map the dirty log: {0}")]
    Mmap(#[source] std::io::Error),
}

/// The frontend's log area mapped into our address space.
struct LogMapping {
    /// Start of the mapping (page aligned, as returned by mmap).
    map_addr: *mut libc::c_void,
    /// Length of the mapping.
    map_len: usize,
    /// Start of the log bitmap inside the mapping (mmap_offset applied).
    bits: *const AtomicU8,
    /// Number of bytes of bitmap.
    len: usize,
}

// SAFETY: the mapping is a MAP_SHARED area that is only accessed through atomic byte
// operations; the raw pointers are valid for as long as the LogMapping exists.
unsafe impl Send for LogMapping {}
// SAFETY: see above; all accesses are atomic.
unsafe impl Sync for LogMapping {}

impl LogMapping {
    fn byte(&self, index: usize) -> Option<&AtomicU8> {
        if index < self.len {
            // SAFETY: index is within the mapped bitmap, and AtomicU8 has the size and
            // alignment of u8.
            Some(unsafe { &*self.bits.add(index) })
        } else {
            None
        }
    }
}

impl Drop for LogMapping {
    fn drop(&mut self) {
        // SAFETY: map_addr/map_len came from a successful mmap and nothing references the
        // mapping any more (we are dropping the only owner).
        unsafe { libc::munmap(self.map_addr, self.map_len) };
    }
}

/// The shared dirty log of one connection.
#[derive(Default)]
pub struct DirtyLog {
    /// Logging is active: a log is mapped and LOG_ALL is negotiated. Checked on every
    /// write with a relaxed load, so the disabled case costs one load.
    active: AtomicBool,
    /// The frontend acked VHOST_F_LOG_ALL.
    log_all: AtomicBool,
    mapping: RwLock<Option<LogMapping>>,
    /// Pages we wrote that lie outside the log the frontend gave us (a frontend bug).
    pages_outside_log: AtomicU64,
    /// Pages marked since the connection started (for tests and stats).
    pages_marked: AtomicU64,
}

impl fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyLog")
            .field("active", &self.active.load(Ordering::Relaxed))
            .finish()
    }
}

impl DirtyLog {
    /// Creates a log with nothing mapped and logging off.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Maps the frontend's log (`SET_LOG_BASE`), replacing any previous one.
    pub fn set_log_base(&self, file: &File, offset: u64, size: u64) -> Result<(), DirtyLogError> {
        let len = usize::try_from(size).map_err(|_| DirtyLogError::InvalidSize(size))?;
        if len == 0 || size > (1 << 40) {
            return Err(DirtyLogError::InvalidSize(size));
        }
        // mmap past the end of the file succeeds; the first mark there raises SIGBUS.
        crate::fd_check::check_covers(file, offset, size, "dirty log")?;
        let page = 4096u64;
        let aligned_off = offset & !(page - 1);
        let delta = (offset - aligned_off) as usize;
        let map_len = len
            .checked_add(delta)
            .ok_or(DirtyLogError::InvalidSize(size))?;
        let file_off =
            libc::off_t::try_from(aligned_off).map_err(|_| DirtyLogError::InvalidSize(size))?;
        // SAFETY: a fresh shared mapping of a file the frontend gave us; we check the result.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                file_off,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(DirtyLogError::Mmap(std::io::Error::last_os_error()));
        }
        let mapping = LogMapping {
            map_addr: addr,
            map_len,
            // SAFETY: delta < page size <= map_len, so the pointer stays inside the mapping.
            bits: unsafe { addr.cast::<u8>().add(delta) }.cast::<AtomicU8>(),
            len,
        };
        let mut guard = self.mapping.write().unwrap_or_else(|e| e.into_inner());
        *guard = Some(mapping);
        self.update_active(&guard);
        Ok(())
    }

    /// Records whether the frontend acked VHOST_F_LOG_ALL (`SET_FEATURES`).
    pub fn set_log_all(&self, on: bool) {
        let guard = self.mapping.write().unwrap_or_else(|e| e.into_inner());
        self.log_all.store(on, Ordering::SeqCst);
        self.update_active(&guard);
    }

    fn update_active(&self, mapping: &Option<LogMapping>) {
        let active = mapping.is_some() && self.log_all.load(Ordering::SeqCst);
        self.active.store(active, Ordering::SeqCst);
    }

    /// Drops the mapping and turns logging off (connection teardown).
    pub fn clear(&self) {
        let mut guard = self.mapping.write().unwrap_or_else(|e| e.into_inner());
        *guard = None;
        self.log_all.store(false, Ordering::SeqCst);
        self.update_active(&guard);
    }

    /// Whether writes are being logged right now.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Marks the pages covering `[gpa, gpa + len)` dirty, if logging is active.
    pub fn mark(&self, gpa: u64, len: usize) {
        if len == 0 || !self.active.load(Ordering::Relaxed) {
            return;
        }
        let guard = self.mapping.read().unwrap_or_else(|e| e.into_inner());
        let Some(map) = guard.as_ref() else { return };
        let first = gpa / LOG_PAGE_SIZE;
        let last = gpa.saturating_add(len as u64 - 1) / LOG_PAGE_SIZE;
        let mut page = first;
        // Set whole bytes at a time: one atomic OR per 8 pages.
        while page <= last {
            let byte = page / 8;
            let bit_lo = page % 8;
            let bit_hi = (last - byte * 8).min(7);
            let mask: u8 = ((0xffu16 >> (7 - bit_hi)) as u8) & (0xffu8 << bit_lo);
            match usize::try_from(byte).ok().and_then(|b| map.byte(b)) {
                Some(b) => {
                    b.fetch_or(mask, Ordering::Release);
                }
                None => {
                    self.pages_outside_log
                        .fetch_add(mask.count_ones() as u64, Ordering::Relaxed);
                }
            }
            self.pages_marked
                .fetch_add(mask.count_ones() as u64, Ordering::Relaxed);
            page = (byte + 1) * 8;
        }
    }

    /// Whether the page holding `gpa` is marked in the log.
    pub fn is_dirty(&self, gpa: u64) -> bool {
        let guard = self.mapping.read().unwrap_or_else(|e| e.into_inner());
        let page = gpa / LOG_PAGE_SIZE;
        guard
            .as_ref()
            .and_then(|m| usize::try_from(page / 8).ok().and_then(|b| m.byte(b)))
            .is_some_and(|b| b.load(Ordering::Acquire) & (1 << (page % 8)) != 0)
    }

    /// Pages we wrote that the frontend's log did not cover.
    pub fn pages_outside_log(&self) -> u64 {
        self.pages_outside_log.load(Ordering::Relaxed)
    }
}

/// The vm-memory bitmap of one guest memory region: the shared log plus the region's
/// guest-physical base. `Default` is a detached bitmap that logs nothing.
#[derive(Clone, Debug, Default)]
pub struct RegionLog {
    log: Option<Arc<DirtyLog>>,
    gpa_base: u64,
}

impl RegionLog {
    /// A bitmap for the region starting at `gpa_base`, logging into `log`.
    pub fn new(log: Arc<DirtyLog>, gpa_base: u64) -> Self {
        Self {
            log: Some(log),
            gpa_base,
        }
    }
}

/// A view of a [`RegionLog`] at some offset, handed out by vm-memory for slices.
#[derive(Clone, Copy, Debug)]
pub struct RegionLogSlice<'a> {
    log: Option<&'a DirtyLog>,
    gpa: u64,
}

impl<'a> WithBitmapSlice<'a> for RegionLog {
    type S = RegionLogSlice<'a>;
}

impl<'b> WithBitmapSlice<'b> for RegionLogSlice<'_> {
    type S = Self;
}

impl BitmapSlice for RegionLogSlice<'_> {}

impl Bitmap for RegionLogSlice<'_> {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if let Some(log) = self.log {
            log.mark(self.gpa.wrapping_add(offset as u64), len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.log
            .is_some_and(|l| l.is_dirty(self.gpa.wrapping_add(offset as u64)))
    }

    fn slice_at(&self, offset: usize) -> Self {
        Self {
            log: self.log,
            gpa: self.gpa.wrapping_add(offset as u64),
        }
    }
}

impl Bitmap for RegionLog {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if let Some(log) = &self.log {
            log.mark(self.gpa_base.wrapping_add(offset as u64), len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.log
            .as_ref()
            .is_some_and(|l| l.is_dirty(self.gpa_base.wrapping_add(offset as u64)))
    }

    fn slice_at(&self, offset: usize) -> RegionLogSlice<'_> {
        RegionLogSlice {
            log: self.log.as_deref(),
            gpa: self.gpa_base.wrapping_add(offset as u64),
        }
    }
}

impl NewBitmap for RegionLog {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn log_file(len: usize) -> File {
        let mut f = tempfile_memfd();
        f.write_all(&vec![0u8; len]).unwrap();
        f
    }

    fn tempfile_memfd() -> File {
        // SAFETY: memfd_create with a valid C string; result checked.
        let fd = unsafe { libc::memfd_create(c"dirty-log-test".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh descriptor we own.
        unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    }

    #[test]
    fn a_log_file_shorter_than_the_log_is_refused() {
        let log = DirtyLog::new();
        let f = log_file(4096);
        for (offset, size) in [(0, 4097), (1, 4096), (4096, 1)] {
            assert!(
                matches!(
                    log.set_log_base(&f, offset, size),
                    Err(DirtyLogError::File(_))
                ),
                "offset {offset} size {size}"
            );
        }
        log.set_log_base(&f, 100, 3996).unwrap();
    }

    #[test]
    fn marks_exact_pages_only_when_log_all() {
        let log = DirtyLog::new();
        let f = log_file(64);
        log.set_log_base(&f, 0, 64).unwrap();
        log.mark(0x5000, 1);
        assert!(!log.is_dirty(0x5000), "LOG_ALL not acked yet");
        log.set_log_all(true);
        log.mark(0x5000, 1);
        log.mark(0x9fff, 0x1002); // pages 9, 10, 11
        for p in 0..64u64 {
            let want = matches!(p, 5 | 9 | 10 | 11);
            assert_eq!(log.is_dirty(p * 0x1000), want, "page {p}");
        }
        // A long range crossing several bytes.
        log.mark(0x20000, 0x12000); // pages 32..=49
        for p in 30..52u64 {
            assert_eq!(log.is_dirty(p * 0x1000), (32..=49).contains(&p), "page {p}");
        }
        log.set_log_all(false);
        log.mark(0x60000, 1);
        assert!(!log.is_dirty(0x60000));
        // Outside the 64-byte (512-page) log: counted, not written.
        log.set_log_all(true);
        log.mark(600 * 0x1000, 1);
        assert_eq!(log.pages_outside_log(), 1);
    }
}
