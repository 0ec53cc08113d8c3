//! Reads and writes of a tmpfs file as memory copies through a shared mapping of it.
//!
//! On tmpfs, `preadv2` spends most of its time finding each page in the page cache
//! (an xarray walk per 4 KiB) and entering and leaving the kernel; the file's pages are
//! already memory. Mapped once, a read is one copy from the mapping into guest memory,
//! found by the page tables (`bench compare blk`, tmpfs 4k randread QD32: CPU per I/O
//! 3.0 → 2.2 µs, IOPS 1.2×). What the system calls did for free, this module does itself:
//! - **Holes stay holes.** A load from a hole of a shared tmpfs mapping allocates the
//!   page (preadv2 returns zeros without allocating), so a guest reading its sparse disk
//!   would fill the host's memory. Reads go through the mapping only where the file has
//!   data: each 2 MiB chunk is probed once with mincore (every page in the page cache)
//!   and remembered; chunks with a hole are read with preadv2 and probed again now and
//!   then (a write may have filled them). Writes into chunks with holes are pwritev2 too
//!   (it allocates without a page fault, and says ENOSPC where a store would fault).
//!   Holes this engine punches make their chunks unknown again.
//! - **A vanished page is EIO, not SIGBUS** (the file truncated under us, a full tmpfs
//!   on a store): see [`super::sigbus`].
//! - **Only the mapped length.** Anything past the file's size when it was mapped (the
//!   file grew) goes through the system calls, which know the current size.
//!
//! What it costs: page tables for what the queue touches, up to 2 MiB per GiB of image
//! per queue (each queue's worker maps the file), and address space for the whole image.
//!
//! Writes are stores into the page cache, which on tmpfs is the storage itself, so
//! RWF_DSYNC and fdatasync have nothing more to do (this engine is only chosen for
//! tmpfs; see `EngineChoice::resolve`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::sigbus::{self, page_size, Registration};
use crate::iovec::IovecList;

/// Granularity of the hole map.
const CHUNK: u64 = 2 << 20;
/// Chunk states: probe before the next read; all data; anything else: has a hole, and
/// counts reads up to the wrap to `UNKNOWN`, which probes it again.
const UNKNOWN: u8 = 0;
const DATA: u8 = 1;
const HOLE_FIRST: u8 = 2;

/// A shared mapping of one file with its hole map.
pub struct FileMap {
    base: *mut u8,
    len: usize,
    chunks: Vec<u8>,
    /// mincore's answer for one chunk (a byte per page).
    residency: Vec<u8>,
    /// Set while the mapping is registered with the SIGBUS handler (dropped before
    /// the unmap).
    registration: Option<Registration>,
    writable: bool,
}

impl FileMap {
    /// Maps `fd` (read-write if it was opened so, else read-only) over its current size.
    /// None: nothing to map (an empty file). Errors: the SIGBUS handler cannot be
    /// installed (see [`sigbus::install`]), every registration slot is taken, or mmap
    /// failed; the caller then does without.
    pub fn new(fd: BorrowedFd<'_>) -> io::Result<Option<Self>> {
        sigbus::install()?;
        // SAFETY: a zeroed stat is a valid out buffer for fstat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and out pointer.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let len = usize::try_from(st.st_size).unwrap_or(0);
        if len == 0 {
            return Ok(None);
        }
        // SAFETY: F_GETFL has no memory arguments.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        let writable = flags >= 0 && (flags & libc::O_ACCMODE) == libc::O_RDWR;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping chosen by the kernel; nothing is overwritten.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let Some(registration) = Registration::new(base as usize, len) else {
            // SAFETY: the mapping just made, not yet used.
            unsafe { libc::munmap(base, len) };
            return Err(io::Error::other("too many mapped files"));
        };
        Ok(Some(Self {
            base: base.cast(),
            len,
            chunks: vec![UNKNOWN; (len as u64).div_ceil(CHUNK) as usize],
            residency: vec![0; CHUNK as usize / page_size()],
            registration: Some(registration),
            writable,
        }))
    }

    /// `[offset, offset + bytes)` as a range of the mapping, if it is inside it.
    fn range(&self, offset: u64, bytes: u64) -> Option<usize> {
        let end = offset.checked_add(bytes)?;
        (end <= self.len as u64).then_some(offset as usize)
    }

    /// Reads into `bufs` from `offset` through the mapping. None: not here (outside the
    /// mapping, or a hole in the way): use the system call.
    pub fn read(&mut self, offset: u64, bufs: &IovecList) -> Option<i32> {
        let bytes = bufs.bytes();
        let mut at = self.range(offset, bytes)?;
        if bytes == 0 || !self.all_data(offset, bytes) {
            return None;
        }
        for v in bufs.as_iovecs() {
            // SAFETY: `at..at + iov_len` is inside the mapping (checked against the total
            // above), and `bufs` keeps the guest memory or bounce buffer its iovecs point
            // to alive and writable while it lives. Both are shared memory others may
            // change at any time: raw copies only, never references.
            unsafe {
                std::ptr::copy_nonoverlapping(self.base.add(at), v.iov_base.cast(), v.iov_len)
            };
            at += v.iov_len;
        }
        Some(self.result(bytes))
    }

    /// Writes `bufs` at `offset` through the mapping. None: not here (outside the
    /// mapping, a read-only file, or a hole in the way: a store into a hole allocates the
    /// page in a page fault, dearer than pwritev2 doing it, and a full tmpfs would answer
    /// it with SIGBUS where pwritev2 says ENOSPC).
    pub fn write(&mut self, offset: u64, bufs: &IovecList) -> Option<i32> {
        let bytes = bufs.bytes();
        let mut at = self.range(offset, bytes)?;
        if !self.writable || bytes == 0 || !self.all_data(offset, bytes) {
            return None;
        }
        for v in bufs.as_iovecs() {
            // SAFETY: as in `read`, the other way round.
            unsafe {
                std::ptr::copy_nonoverlapping(v.iov_base.cast(), self.base.add(at), v.iov_len)
            };
            at += v.iov_len;
        }
        Some(self.result(bytes))
    }

    /// The chunks of `[offset, offset + len)` may have new holes (we punched them).
    pub fn forget(&mut self, offset: u64, len: u64) {
        let first = (offset / CHUNK) as usize;
        let last = (offset.saturating_add(len).div_ceil(CHUNK) as usize).min(self.chunks.len());
        for c in self.chunks.iter_mut().take(last).skip(first) {
            *c = UNKNOWN;
        }
    }

    /// Whether the SIGBUS handler repaired a fault in the mapping: from then on it is not
    /// to be trusted (the caller drops it).
    pub fn faulted(&mut self) -> bool {
        self.registration.as_mut().is_some_and(|r| r.faulted())
    }

    /// `bytes` transferred, or EIO if a page vanished during the copy.
    fn result(&mut self, bytes: u64) -> i32 {
        if self.faulted() {
            -libc::EIO
        } else {
            i32::try_from(bytes).unwrap_or(i32::MAX)
        }
    }

    /// Whether every chunk the range touches is known to hold data, probing those not
    /// known and counting reads and writes on those with holes.
    fn all_data(&mut self, offset: u64, bytes: u64) -> bool {
        let first = offset / CHUNK;
        let last = (offset + bytes - 1) / CHUNK;
        for c in first..=last {
            let Some(state) = self.chunks.get_mut(c as usize) else {
                return false;
            };
            match *state {
                DATA => continue,
                UNKNOWN => {
                    let start = (c * CHUNK) as usize;
                    let end = (start + CHUNK as usize).min(self.len);
                    if !resident(self.base, start, end, &mut self.residency) {
                        *state = HOLE_FIRST;
                        return false;
                    }
                    *state = DATA;
                    // All of the chunk's page-table entries in one call, rather than a
                    // page fault per 64 KiB as the copies touch it (a fault is dear in a
                    // VM). Only for data: populating a hole would allocate it. An error
                    // (a kernel before 5.14) leaves it to the faults.
                    // SAFETY: a range inside our own mapping; no memory is changed.
                    unsafe {
                        libc::madvise(
                            self.base.add(start).cast(),
                            end - start,
                            libc::MADV_POPULATE_READ,
                        )
                    };
                }
                _ => {
                    *state = state.wrapping_add(1);
                    return false;
                }
            }
        }
        true
    }
}

/// Whether every page of `[start, end)` of the mapping at `base` is in the file's page
/// cache: the file has data there (tmpfs keeps no page for a hole; a page swapped out
/// also counts as absent, and is then read with the system call, which is only slower).
/// mincore looks at the chunk's pages alone, where lseek(SEEK_HOLE) on tmpfs walks on
/// until it finds a hole, to the end of a file without one.
fn resident(base: *mut u8, start: usize, end: usize, out: &mut [u8]) -> bool {
    let pages = (end - start).div_ceil(page_size());
    let Some(out) = out.get_mut(..pages) else {
        return false;
    };
    // SAFETY: `[start, end)` lies inside the mapping at `base` (a chunk of it, clamped to
    // its length), and `out` holds a byte for each of its pages.
    let r = unsafe { libc::mincore(base.add(start).cast(), end - start, out.as_mut_ptr()) };
    r == 0 && out.iter().all(|&b| b & 1 == 1)
}

impl Drop for FileMap {
    fn drop(&mut self) {
        self.registration = None;
        // SAFETY: our own mapping; nothing borrows it (copies are raw and finished).
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

// SAFETY: the mapping is plain shared memory owned by this value; the raw pointer is only
// used by whoever owns the `FileMap` (the engine's thread).
unsafe impl Send for FileMap {}

#[cfg(test)]
mod tests {
    use super::super::{Engine, EngineKind, Op, Pushed};
    use super::*;
    use crate::iovec::tests::two_regions;
    use crate::iovec::AlignedBuf;
    use crate::Segment;
    use std::os::fd::AsFd;
    use std::os::unix::fs::{FileExt, MetadataExt};
    use vm_memory::{Bytes, GuestAddress};

    const MIB: u64 = 1 << 20;

    /// A file in /dev/shm (tmpfs, where this engine is used), `len` bytes, sparse.
    fn shm_file(len: u64) -> std::fs::File {
        let f = tempfile::tempfile_in("/dev/shm").expect("a file in /dev/shm");
        f.set_len(len).expect("size");
        f
    }

    fn pattern(offset: u64, len: usize, seed: u8) -> Vec<u8> {
        (0..len as u64)
            .map(|i| ((offset + i) % 251) as u8 ^ seed)
            .collect()
    }

    fn run(e: &mut Engine, op: Op) -> (i32, Op) {
        match e.push(op, 1, false).expect("push") {
            Pushed::Done(c) => (c.result, c.op),
            Pushed::Submitted => panic!("the inline engine is done at once"),
        }
    }

    fn read_owned(e: &mut Engine, offset: u64, len: usize) -> (i32, Vec<u8>) {
        let bufs = IovecList::owned(AlignedBuf::new(len).expect("buffer"));
        let (r, op) = run(e, Op::Read { offset, bufs });
        let data = op
            .into_bufs()
            .and_then(|b| b.owned_buf().map(|b| b.as_slice().to_vec()))
            .expect("the buffer back");
        (r, data)
    }

    fn write_owned(e: &mut Engine, offset: u64, data: &[u8]) -> i32 {
        let mut buf = AlignedBuf::new(data.len()).expect("buffer");
        buf.as_mut_slice().copy_from_slice(data);
        let bufs = IovecList::owned(buf);
        run(
            e,
            Op::Write {
                offset,
                bufs,
                flags: 0,
            },
        )
        .0
    }

    fn mapped(f: &std::fs::File) -> Engine {
        let e = Engine::new(EngineKind::Mapped, f.as_fd(), 16).expect("engine");
        assert_eq!(e.kind(), EngineKind::Mapped, "the file was not mapped");
        e
    }

    /// Scattered reads and writes (two guest regions, across a chunk boundary) through
    /// the map, checked against a copy kept beside it and against the file itself.
    #[test]
    fn reads_and_writes_through_the_map_are_the_file() {
        let f = shm_file(6 * MIB);
        let mut model = pattern(0, (6 * MIB) as usize, 0);
        f.write_all_at(&model, 0).expect("fill");
        let mut e = mapped(&f);
        let mem = two_regions();
        let segs = |a: u32, b: u32| {
            [
                Segment {
                    addr: 0x100,
                    len: a,
                    writable: true,
                },
                Segment {
                    addr: MIB + 8,
                    len: b,
                    writable: true,
                },
            ]
        };
        let mut x: u64 = 0x1234_5678_9abc_def1;
        for round in 0..200u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let (a, b) = (1 + (x % 5000) as u32, 1 + ((x >> 20) % 5000) as u32);
            let len = u64::from(a + b);
            // Half of them straddle the 2 MiB chunk boundary.
            let offset = if round % 2 == 0 {
                2 * MIB - len / 2
            } else {
                (x >> 32) % (6 * MIB - len)
            };
            let bufs = IovecList::from_guest(&mem, &segs(a, b)).expect("iovecs");
            if x & 1 == 0 {
                let data = pattern(offset, len as usize, round as u8 | 1);
                mem.write_slice(&data[..a as usize], GuestAddress(0x100))
                    .unwrap();
                mem.write_slice(&data[a as usize..], GuestAddress(MIB + 8))
                    .unwrap();
                let (r, _) = run(
                    &mut e,
                    Op::Write {
                        offset,
                        bufs,
                        flags: 0,
                    },
                );
                assert_eq!(r as u64, len);
                model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            } else {
                let (r, _) = run(&mut e, Op::Read { offset, bufs });
                assert_eq!(r as u64, len);
                let mut got = vec![0u8; len as usize];
                mem.read_slice(&mut got[..a as usize], GuestAddress(0x100))
                    .unwrap();
                mem.read_slice(&mut got[a as usize..], GuestAddress(MIB + 8))
                    .unwrap();
                assert!(
                    got == model[offset as usize..(offset + len) as usize],
                    "read at {offset}+{len}"
                );
            }
        }
        let mut file = vec![0u8; model.len()];
        f.read_exact_at(&mut file, 0).expect("read the file");
        assert!(file == model, "the file differs from what was written");
    }

    /// A read of a hole comes back as zeros and leaves the hole (a load through a
    /// shared tmpfs mapping would allocate the page); data around it comes through the
    /// map.
    #[test]
    fn holes_are_read_with_system_calls_and_stay_holes() {
        let f = shm_file(8 * MIB);
        let data = pattern(0, MIB as usize, 7);
        f.write_all_at(&data, 0)
            .expect("data in the first chunk only");
        let mut e = mapped(&f);
        let blocks = f.metadata().expect("stat").blocks();
        for offset in [3 * MIB, 5 * MIB + 4096, 2 * MIB - 4096 + 2 * MIB] {
            for _ in 0..300 {
                // Past the re-probe count too.
                let (r, got) = read_owned(&mut e, offset, 8192);
                assert_eq!(r, 8192);
                assert!(got.iter().all(|&b| b == 0), "zeros at {offset}");
            }
        }
        // A read across the first chunk's data and its hole.
        let (r, got) = read_owned(&mut e, MIB - 4096, 8192);
        assert_eq!(r, 8192);
        assert_eq!(&got[..4096], &data[(MIB - 4096) as usize..]);
        assert!(got[4096..].iter().all(|&b| b == 0));
        assert_eq!(
            f.metadata().expect("stat").blocks(),
            blocks,
            "reading holes allocated memory"
        );
        let (r, got) = read_owned(&mut e, 4096, 4096);
        assert_eq!((r, got.as_slice()), (4096, &data[4096..8192]));
        // A write into a hole is pwritev2's: no page fault per page it allocates.
        let fill = pattern(6 * MIB, 64 << 10, 2);
        let mut buf = AlignedBuf::new(fill.len()).expect("buffer");
        buf.as_mut_slice().copy_from_slice(&fill);
        let bufs = IovecList::owned(buf);
        let faults = minor_faults();
        let (r, _) = run(
            &mut e,
            Op::Write {
                offset: 6 * MIB,
                bufs,
                flags: 0,
            },
        );
        let faulted = minor_faults() - faults;
        assert_eq!(r, 64 << 10);
        assert!(faulted < 4, "{faulted} page faults writing into a hole");
        let mut back = vec![0u8; fill.len()];
        f.read_exact_at(&mut back, 6 * MIB).expect("read");
        assert!(back == fill);
    }

    /// This thread's minor page faults so far.
    fn minor_faults() -> i64 {
        // SAFETY: a zeroed rusage is a valid out buffer.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid out pointer.
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) }, 0);
        ru.ru_minflt
    }

    /// Holes we punch are forgotten: a chunk known to be all data and then punched is
    /// probed again, so reading the new hole does not fill it back in.
    #[test]
    fn a_punched_chunk_is_probed_again() {
        let f = shm_file(4 * MIB);
        f.write_all_at(&pattern(0, (4 * MIB) as usize, 3), 0)
            .expect("fill");
        let mut e = mapped(&f);
        assert_eq!(read_owned(&mut e, 2 * MIB, 4096).0, 4096);
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let (r, _) = run(
            &mut e,
            Op::Fallocate {
                mode,
                offset: 2 * MIB,
                len: MIB,
            },
        );
        assert_eq!(r, 0);
        let blocks = f.metadata().expect("stat").blocks();
        let (r, got) = read_owned(&mut e, 2 * MIB + 8192, 4096);
        assert_eq!(r, 4096);
        assert!(got.iter().all(|&b| b == 0));
        assert_eq!(f.metadata().expect("stat").blocks(), blocks);
    }

    /// What lies past the size the file had when it was mapped goes through the system
    /// calls, which know the current size.
    #[test]
    fn past_the_mapped_length_is_a_system_call() {
        let f = shm_file(2 * MIB);
        let mut e = mapped(&f);
        let data = pattern(3 * MIB, 4096, 9);
        f.write_all_at(&data, 3 * MIB).expect("grow the file");
        assert_eq!(write_owned(&mut e, 3 * MIB + 4096, &data), 4096);
        let (r, got) = read_owned(&mut e, 3 * MIB, 4096);
        assert_eq!((r, got), (4096, data.clone()));
        let mut back = vec![0u8; 4096];
        f.read_exact_at(&mut back, 3 * MIB + 4096).expect("read");
        assert_eq!(back, data);
    }

    /// A file opened read-only is mapped read-only: reads come through the map, writes
    /// get the system call's answer (EBADF).
    #[test]
    fn a_read_only_file_is_read_through_the_map_and_writes_are_refused() {
        let dir = tempfile::tempdir_in("/dev/shm").expect("dir");
        let path = dir.path().join("ro.img");
        std::fs::write(&path, pattern(0, MIB as usize, 1)).expect("write");
        let f = std::fs::File::open(&path).expect("open read-only");
        let mut e = mapped(&f);
        let (r, got) = read_owned(&mut e, 4096, 4096);
        assert_eq!((r, got), (4096, pattern(4096, 4096, 1)));
        assert_eq!(write_owned(&mut e, 0, &[1; 512]), -libc::EBADF);
    }

    /// The file truncated under the mapping: the read that faults fails with EIO (the
    /// process lives on), and the engine goes on without the map.
    #[test]
    fn a_page_vanishing_under_the_map_is_eio_and_the_map_is_dropped() {
        let f = shm_file(4 * MIB);
        f.write_all_at(&pattern(0, (4 * MIB) as usize, 5), 0)
            .expect("fill");
        let mut e = mapped(&f);
        assert_eq!(read_owned(&mut e, 3 * MIB, 4096).0, 4096);
        f.set_len(MIB).expect("truncate under the map");
        assert_eq!(read_owned(&mut e, 3 * MIB, 4096).0, -libc::EIO);
        assert_eq!(e.kind(), EngineKind::Inline, "the map was kept");
        // From now on system calls: end of file there, data where the file still is.
        assert_eq!(read_owned(&mut e, 3 * MIB, 4096).0, 0);
        let (r, got) = read_owned(&mut e, 4096, 4096);
        assert_eq!((r, got), (4096, pattern(4096, 4096, 5)));
    }
}
