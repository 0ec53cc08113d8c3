//! Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD).
//!
//! The frontend keeps a shared buffer for us across backend restarts. For every chain we
//! pop we record "in flight" with a sequence number; when we put it on the used ring we
//! clear it. A backend started on the same buffer (SET_INFLIGHT_FD after a crash) finds the
//! chains that never completed and resubmits them in their original order.
//!
//! The layout is libvhost-user's split-ring layout (also what QEMU and SPDK expect):
//! per queue a 16-byte header `{features u64, version u16, desc_num u16, last_batch_head u16,
//! used_idx u16}` followed by `desc_num` 16-byte entries `{inflight u8, pad [u8; 5],
//! next u16, counter u64}`, each queue's area rounded up to 64 bytes.
//!
//! Crash consistency: the buffer lives in shared memory, so everything we stored before
//! dying is there; only the order of our own stores matters. Completion does: set
//! `last_batch_head`, publish the used element, clear `inflight`, copy the used index. A
//! restart that finds `used_idx` behind the ring's used index knows the last batch head was
//! published and clears it (see [`InflightQueue::recover`]).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

/// Region layout version we write.
const INFLIGHT_VERSION: u16 = 1;
const HEADER_SIZE: usize = 16;
const DESC_STATE_SIZE: usize = 16;
const ALIGNMENT: u64 = 64;

/// Errors setting up the inflight region.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// The frontend asked for a geometry we cannot serve.
    #[error("inflight region for {num_queues} queues of {queue_size} entries is invalid")]
    InvalidGeometry {
        /// Queues requested.
        num_queues: u16,
        /// Entries per queue requested.
        queue_size: u16,
    },
    /// The region the frontend gave back is smaller than its geometry needs.
    #[error("inflight region of {got} bytes is smaller than the {need} bytes needed")]
    TooSmall {
        /// Bytes given.
        got: u64,
        /// Bytes needed.
        need: u64,
    },
    /// The region starts at an offset its 8-byte fields cannot be read at.
    #[error(
        "inflight region offset {0} is not a multiple of 8; its fields are read as aligned \
         64-bit words, so the frontend must place the region at an 8-byte aligned offset"
    )]
    Misaligned(u64),
    /// The new region's memfd could not be sealed against resizing.
    #[error(
        "cannot seal the inflight memfd against resizing: {0}; without the seals the \
         frontend could shrink it under our mapping (the kernel must support memfd sealing)"
    )]
    Seal(#[source] std::io::Error),
    /// memfd/ftruncate/mmap failed.
    #[error("cannot create or map the inflight region: {0}")]
    Io(#[from] std::io::Error),
}

/// Bytes one queue's area takes (libvhost-user's `vu_inflight_queue_size`).
pub fn queue_area_size(queue_size: u16) -> u64 {
    let raw = DESC_STATE_SIZE as u64 * u64::from(queue_size) + 2;
    raw.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// The mapped region shared by all queues of a device.
pub struct InflightRegion {
    map_addr: *mut libc::c_void,
    map_len: usize,
    base: *mut u8,
    num_queues: u16,
    queue_size: u16,
}

// SAFETY: the mapping is process-wide shared memory; each queue's area is used by exactly
// one worker at a time (the one owning that ring), and the handler only touches it while
// the ring is stopped.
unsafe impl Send for InflightRegion {}
// SAFETY: see above.
unsafe impl Sync for InflightRegion {}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: the mapping came from a successful mmap and is owned by self.
        unsafe { libc::munmap(self.map_addr, self.map_len) };
    }
}

impl InflightRegion {
    /// Size of the whole region.
    pub fn total_size(num_queues: u16, queue_size: u16) -> u64 {
        queue_area_size(queue_size) * u64::from(num_queues)
    }

    /// Creates a zeroed region in a new memfd (GET_INFLIGHT_FD).
    pub fn create(num_queues: u16, queue_size: u16) -> Result<(Arc<Self>, File), InflightError> {
        if num_queues == 0 || queue_size == 0 || !queue_size.is_power_of_two() {
            return Err(InflightError::InvalidGeometry {
                num_queues,
                queue_size,
            });
        }
        let size = Self::total_size(num_queues, queue_size);
        // SAFETY: valid C string; the result is checked.
        let fd = unsafe {
            libc::memfd_create(
                c"vhost-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        // The frontend must not be able to shrink it under our mapping (an access past
        // the end would raise SIGBUS), so a region we cannot seal is not handed out.
        // SAFETY: fcntl on our own fd with valid arguments; the result is checked.
        let rc = unsafe {
            libc::fcntl(
                fd,
                libc::F_ADD_SEALS,
                libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
            )
        };
        if rc < 0 {
            return Err(InflightError::Seal(std::io::Error::last_os_error()));
        }
        let region = Self::map(&file, 0, size, num_queues, queue_size)?;
        Ok((region, file))
    }

    /// Maps a region the frontend gives back (SET_INFLIGHT_FD).
    pub fn map(
        file: &File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Arc<Self>, InflightError> {
        if num_queues == 0 || queue_size == 0 {
            return Err(InflightError::InvalidGeometry {
                num_queues,
                queue_size,
            });
        }
        // Header and entries are read with aligned 64-bit volatile accesses (undefined
        // behaviour at a misaligned address); areas are 64-byte multiples, so an 8-byte
        // aligned start keeps every field aligned.
        if !offset.is_multiple_of(std::mem::align_of::<u64>() as u64) {
            return Err(InflightError::Misaligned(offset));
        }
        let need = Self::total_size(num_queues, queue_size);
        if size < need {
            return Err(InflightError::TooSmall { got: size, need });
        }
        let file_len = file.metadata()?.len();
        if offset.checked_add(need).is_none_or(|end| end > file_len) {
            return Err(InflightError::TooSmall {
                got: file_len.saturating_sub(offset),
                need,
            });
        }
        let page = 4096u64;
        let aligned = offset & !(page - 1);
        let delta = (offset - aligned) as usize;
        let map_len = need as usize + delta;
        // SAFETY: fresh shared mapping of the frontend's file; result checked; the file is
        // at least offset + need bytes long (checked above).
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                aligned as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(Arc::new(Self {
            map_addr: addr,
            map_len,
            // SAFETY: delta < map_len.
            base: unsafe { addr.cast::<u8>().add(delta) },
            num_queues,
            queue_size,
        }))
    }

    /// Queues the region was sized for.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// The tracking view of queue `index`, if the region covers it and the ring is no
    /// larger than the region's entries.
    pub fn queue(self: &Arc<Self>, index: u16, ring_size: u16) -> Option<InflightQueue> {
        if index >= self.num_queues || ring_size > self.queue_size {
            return None;
        }
        let offset = queue_area_size(self.queue_size) as usize * usize::from(index);
        Some(InflightQueue {
            // SAFETY: offset + area size is within the mapping (index < num_queues).
            area: unsafe { self.base.add(offset) },
            ring_size,
            counter: 0,
            _region: self.clone(),
        })
    }
}

/// Inflight tracking for one queue.
pub struct InflightQueue {
    area: *mut u8,
    ring_size: u16,
    counter: u64,
    _region: Arc<InflightRegion>,
}

// SAFETY: the area belongs to one ring, which is owned by one thread at a time.
unsafe impl Send for InflightQueue {}

/// What a restarted ring must do after recovering its inflight area.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Heads to resubmit, oldest first.
    pub resubmit: Vec<u16>,
    /// The avail index to continue from (used index + chains still in flight), or `None`
    /// when the area was fresh and the frontend's base stands.
    pub next_avail: Option<u16>,
}

impl InflightQueue {
    fn write<T: Copy>(&self, offset: usize, v: T) {
        // SAFETY: every caller passes an offset inside this queue's area (header fields or
        // a descriptor entry with index < ring_size <= desc_num of the area).
        unsafe { std::ptr::write_volatile(self.area.add(offset).cast::<T>(), v) }
    }

    fn read<T: Copy>(&self, offset: usize) -> T {
        // SAFETY: as in `write`.
        unsafe { std::ptr::read_volatile(self.area.add(offset).cast::<T>()) }
    }

    fn desc_off(head: u16) -> usize {
        HEADER_SIZE + usize::from(head) * DESC_STATE_SIZE
    }

    /// Reconciles the area with the ring's current used index, at ring start.
    pub fn recover(&mut self, used_idx: u16) -> Recovery {
        let version: u16 = self.read(8);
        let desc_num: u16 = self.read(10);
        if version != INFLIGHT_VERSION || desc_num != self.ring_size {
            // Fresh (or resized) area: initialise; nothing to resubmit.
            self.write::<u64>(0, 0);
            for head in 0..self.ring_size {
                self.write::<u8>(Self::desc_off(head), 0);
                self.write::<u64>(Self::desc_off(head) + 8, 0);
            }
            self.write::<u16>(10, self.ring_size);
            self.write::<u16>(12, 0);
            self.write::<u16>(14, used_idx);
            fence(Ordering::SeqCst);
            self.write::<u16>(8, INFLIGHT_VERSION);
            self.counter = 1;
            return Recovery::default();
        }
        let recorded_used: u16 = self.read(14);
        if recorded_used != used_idx {
            // We died after publishing the last batch's used element but before clearing
            // its inflight flag.
            let last: u16 = self.read(12);
            if last < self.ring_size {
                self.write::<u8>(Self::desc_off(last), 0);
            }
            fence(Ordering::SeqCst);
            self.write::<u16>(14, used_idx);
        }
        let mut pending: Vec<(u64, u16)> = (0..self.ring_size)
            .filter(|&h| self.read::<u8>(Self::desc_off(h)) == 1)
            .map(|h| (self.read::<u64>(Self::desc_off(h) + 8), h))
            .collect();
        pending.sort_unstable();
        self.counter = pending.last().map_or(1, |(c, _)| c + 1);
        Recovery {
            next_avail: Some(used_idx.wrapping_add(pending.len() as u16)),
            resubmit: pending.into_iter().map(|(_, h)| h).collect(),
        }
    }

    /// Records that `head` was taken from the avail ring.
    pub fn begin(&mut self, head: u16) {
        if head >= self.ring_size {
            return;
        }
        self.write::<u64>(Self::desc_off(head) + 8, self.counter);
        self.counter += 1;
        fence(Ordering::Release);
        self.write::<u8>(Self::desc_off(head), 1);
    }

    /// `head` went back to the avail ring unused (see [`crate::Ring::give_back`]): no
    /// longer in flight, and a restart must not resubmit it (the avail ring offers it
    /// again).
    pub fn abandon(&mut self, head: u16) {
        if head < self.ring_size {
            self.write::<u8>(Self::desc_off(head), 0);
        }
    }

    /// Called just before `head` is put on the used ring.
    pub fn before_used(&mut self, head: u16) {
        self.write::<u16>(12, head);
        fence(Ordering::Release);
    }

    /// Called right after `head` was put on the used ring, with the new used index.
    pub fn after_used(&mut self, head: u16, used_idx: u16) {
        fence(Ordering::Release);
        if head < self.ring_size {
            self.write::<u8>(Self::desc_off(head), 0);
        }
        fence(Ordering::Release);
        self.write::<u16>(14, used_idx);
    }

    /// Marks `head` in flight with an explicit counter (tests build "crashed" areas).
    pub fn set_entry(&mut self, head: u16, counter: u64, inflight: bool) {
        if head < self.ring_size {
            self.write::<u64>(Self::desc_off(head) + 8, counter);
            self.write::<u8>(Self::desc_off(head), u8::from(inflight));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_then_crash_recovery_resubmits_in_order() {
        let (region, _file) = InflightRegion::create(2, 8).unwrap();
        let mut q = region.queue(1, 8).unwrap();
        assert_eq!(q.recover(0), Recovery::default());
        q.begin(3);
        q.begin(5);
        q.begin(1);
        // 5 completes normally.
        q.before_used(5);
        q.after_used(5, 1);
        // 3 is published on the used ring, then we "crash" before clearing it.
        q.before_used(3);
        drop(q);
        let mut q = region.queue(1, 8).unwrap();
        let r = q.recover(2);
        assert_eq!(r.resubmit, vec![1]);
        assert_eq!(r.next_avail, Some(3));
        // Queue 0 is untouched and fresh.
        let mut q0 = region.queue(0, 8).unwrap();
        assert_eq!(q0.recover(0), Recovery::default());
        assert!(region.queue(2, 8).is_none());
        assert!(region.queue(0, 16).is_none());
    }

    #[test]
    fn a_misaligned_offset_is_refused() {
        let (_region, file) = InflightRegion::create(1, 8).unwrap();
        let size = InflightRegion::total_size(1, 8);
        // A file with room for the region at any of these offsets.
        // SAFETY: valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"inflight-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh descriptor we own.
        let big = unsafe { File::from_raw_fd(fd) };
        big.set_len(8192).unwrap();
        for offset in [1, 4, 6, 4100] {
            assert!(
                matches!(
                    InflightRegion::map(&big, offset, size, 1, 8),
                    Err(InflightError::Misaligned(o)) if o == offset
                ),
                "offset {offset}"
            );
        }
        InflightRegion::map(&big, 8, size, 1, 8).unwrap();
        InflightRegion::map(&big, 4096 + 64, size, 1, 8).unwrap();
        InflightRegion::map(&file, 0, size, 1, 8).unwrap();
    }
}
