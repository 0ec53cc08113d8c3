//! Guest memory as the frontend describes it (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG).
//!
//! Each region is mapped MAP_SHARED from the fd the frontend sent and gets a [`RegionLog`]
//! bitmap tied to the connection's one [`DirtyLog`], so every region is logged, whenever it
//! was added. The current table is published through a `GuestMemoryAtomic`: workers take a
//! snapshot (`Arc`) per batch and keep it in every in-flight request, so a mapping the
//! kernel is still reading or writing is never unmapped under it.

use std::fs::File;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::dirty_log::{DirtyLog, RegionLog};
use crate::fd_check::{check_covers, FdCheckError};

/// Guest memory with our dirty-log bitmap.
pub type GuestMem = GuestMemoryMmap<RegionLog>;
/// The published, atomically replaceable guest memory.
pub type GuestMemAtomic = GuestMemoryAtomic<GuestMem>;

/// The most regions we accept through ADD_MEM_REG (the value QEMU and vhost-user-backend use).
pub const MAX_MEM_SLOTS: u64 = 509;

/// Errors in the frontend's memory description.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A region with zero size or whose end overflows the address space.
    #[error("memory region at guest address {gpa:#x} with size {size:#x} is invalid")]
    InvalidRegion {
        /// Guest-physical start.
        gpa: u64,
        /// Size in bytes.
        size: u64,
    },
    /// The region's file is unusable (too short for the region).
    #[error("memory region at guest address {gpa:#x}: {source}")]
    File {
        /// Guest-physical start.
        gpa: u64,
        /// What is wrong with the file.
        source: FdCheckError,
    },
    /// mmap of a region failed.
    #[error("cannot map guest memory region at {gpa:#x}: {source}")]
    Map {
        /// Guest-physical start.
        gpa: u64,
        /// What vm-memory reported.
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The region overlaps another one or the table is otherwise inconsistent.
    #[error("guest memory regions overlap or are inconsistent: {0}")]
    Table(String),
    /// REM_MEM_REG named a region we do not have.
    #[error("no memory region at guest address {0:#x} to remove")]
    NoSuchRegion(u64),
    /// Too many regions.
    #[error("more than {MAX_MEM_SLOTS} memory regions")]
    TooManyRegions,
    /// A frontend virtual address (ring address) not inside any region.
    #[error("frontend address {0:#x} is not inside guest memory")]
    UnmappedAddress(u64),
}

/// One region as the frontend described it.
#[derive(Clone)]
struct Region {
    gpa: u64,
    size: u64,
    /// The frontend's virtual address of the region's start (ring addresses are given in it).
    user_addr: u64,
    mapping: Arc<GuestRegionMmap<RegionLog>>,
}

/// The connection's guest memory table.
pub struct MemoryTable {
    regions: Vec<Region>,
    atomic: GuestMemAtomic,
    log: Arc<DirtyLog>,
}

impl MemoryTable {
    /// An empty table whose regions will log into `log`.
    pub fn new(log: Arc<DirtyLog>) -> Self {
        Self {
            regions: Vec::new(),
            atomic: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            log,
        }
    }

    /// The published memory, shared with the workers.
    pub fn atomic(&self) -> GuestMemAtomic {
        self.atomic.clone()
    }

    fn map(&self, desc: &VhostUserMemoryRegion, file: File) -> Result<Region, MemoryError> {
        let gpa = desc.guest_phys_addr;
        let size = desc.memory_size;
        let invalid = || MemoryError::InvalidRegion { gpa, size };
        if size == 0
            || gpa.checked_add(size).is_none()
            || desc.user_addr.checked_add(size).is_none()
            || desc.mmap_offset.checked_add(size).is_none()
        {
            return Err(invalid());
        }
        let len = usize::try_from(size).map_err(|_| invalid())?;
        // mmap past the end of the file succeeds; the first access there raises SIGBUS.
        check_covers(&file, desc.mmap_offset, size, "guest memory region")
            .map_err(|source| MemoryError::File { gpa, source })?;
        let bitmap = RegionLog::new(self.log.clone(), gpa);
        let mmap = MmapRegionBuilder::new_with_bitmap(len, bitmap)
            .with_file_offset(FileOffset::new(file, desc.mmap_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
            .map_err(|source| MemoryError::Map { gpa, source })?;
        let region = GuestRegionMmap::new(mmap, GuestAddress(gpa)).ok_or_else(invalid)?;
        Ok(Region {
            gpa,
            size,
            user_addr: desc.user_addr,
            mapping: Arc::new(region),
        })
    }

    fn publish(&mut self, mut regions: Vec<Region>) -> Result<(), MemoryError> {
        // vm-memory wants regions in guest-physical order, but the frontend adds and
        // removes them in any order (a DIMM hot-plugged below an existing one).
        regions.sort_unstable_by_key(|r| r.gpa);
        // An empty table is legal: the frontend may unplug every region (REM_MEM_REG of
        // the last one) before adding new ones; vm-memory refuses to build an empty
        // collection from regions, so publish an empty one directly.
        let mem = if regions.is_empty() {
            GuestMemoryMmap::new()
        } else {
            GuestMemoryMmap::from_arc_regions(regions.iter().map(|r| r.mapping.clone()).collect())
                .map_err(|e| MemoryError::Table(e.to_string()))?
        };
        // Regions must not overlap in the frontend's address space either, or ring
        // address translation would be ambiguous.
        for (i, a) in regions.iter().enumerate() {
            for b in &regions[i + 1..] {
                if a.user_addr < b.user_addr + b.size && b.user_addr < a.user_addr + a.size {
                    return Err(MemoryError::Table(format!(
                        "frontend addresses of regions {:#x} and {:#x} overlap",
                        a.gpa, b.gpa
                    )));
                }
            }
        }
        self.atomic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(mem);
        self.regions = regions;
        Ok(())
    }

    /// Replaces the whole table (SET_MEM_TABLE).
    pub fn set_table(
        &mut self,
        descs: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> Result<(), MemoryError> {
        let mut regions = Vec::with_capacity(descs.len());
        for (desc, file) in descs.iter().zip(files) {
            regions.push(self.map(desc, file)?);
        }
        self.publish(regions)
    }

    /// Adds one region (ADD_MEM_REG).
    pub fn add_region(
        &mut self,
        desc: &VhostUserMemoryRegion,
        file: File,
    ) -> Result<(), MemoryError> {
        if self.regions.len() as u64 >= MAX_MEM_SLOTS {
            return Err(MemoryError::TooManyRegions);
        }
        let region = self.map(desc, file)?;
        let mut regions = self.regions.clone();
        regions.push(region);
        self.publish(regions)
    }

    /// Removes the region matching `desc` (REM_MEM_REG).
    pub fn remove_region(&mut self, desc: &VhostUserMemoryRegion) -> Result<(), MemoryError> {
        let pos = self
            .regions
            .iter()
            .position(|r| r.gpa == desc.guest_phys_addr && r.size == desc.memory_size)
            .ok_or(MemoryError::NoSuchRegion(desc.guest_phys_addr))?;
        let mut regions = self.regions.clone();
        regions.remove(pos);
        self.publish(regions)
    }

    /// Translates a frontend virtual address (as in SET_VRING_ADDR) to a guest-physical one.
    pub fn vmm_va_to_gpa(&self, va: u64) -> Result<u64, MemoryError> {
        self.regions
            .iter()
            .find(|r| va >= r.user_addr && va - r.user_addr < r.size)
            .map(|r| r.gpa + (va - r.user_addr))
            .ok_or(MemoryError::UnmappedAddress(va))
    }

    /// Number of mapped regions.
    pub fn num_regions(&self) -> usize {
        self.atomic.memory().num_regions()
    }
}

/// Appends host iovecs covering `[gpa, gpa + len)` to `out`, one per region the range
/// touches. Fails if any byte is outside guest memory. The pointers stay valid for as long
/// as `mem` (the snapshot) is alive.
pub fn host_iovecs(
    mem: &GuestMem,
    gpa: u64,
    len: u64,
    out: &mut Vec<libc::iovec>,
) -> Result<(), MemoryError> {
    let mut addr = gpa;
    let mut left = len;
    while left > 0 {
        let (region, offset) = mem
            .to_region_addr(GuestAddress(addr))
            .ok_or(MemoryError::UnmappedAddress(addr))?;
        let in_region = region.len() - offset.0;
        let take = left.min(in_region);
        let host = region
            .get_host_address(offset)
            .map_err(|_| MemoryError::UnmappedAddress(addr))?;
        out.push(libc::iovec {
            iov_base: host.cast(),
            iov_len: take as usize,
        });
        addr += take;
        left -= take;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn memfd(len: u64) -> File {
        // SAFETY: valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"memory-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh descriptor we own.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    fn region(gpa: u64, size: u64) -> VhostUserMemoryRegion {
        VhostUserMemoryRegion::new(gpa, size, 0x7000_0000_0000 + gpa, 0)
    }

    #[test]
    fn regions_are_kept_sorted_and_the_last_one_can_be_removed() {
        let mut t = MemoryTable::new(DirtyLog::new());
        t.add_region(&region(0x40_0000, 0x1000), memfd(0x1000))
            .unwrap();
        t.add_region(&region(0x10_0000, 0x2000), memfd(0x2000))
            .unwrap();
        t.add_region(&region(0x20_0000, 0x1000), memfd(0x1000))
            .unwrap();
        assert_eq!(t.num_regions(), 3);
        let mem = t.atomic().memory();
        for gpa in [0x10_1fff, 0x20_0000, 0x40_0fff] {
            assert!(mem.to_region_addr(GuestAddress(gpa)).is_some(), "{gpa:#x}");
        }
        assert_eq!(t.vmm_va_to_gpa(0x7000_0020_0010).unwrap(), 0x20_0010);
        for (gpa, size) in [
            (0x20_0000, 0x1000),
            (0x40_0000, 0x1000),
            (0x10_0000, 0x2000),
        ] {
            t.remove_region(&region(gpa, size)).unwrap();
        }
        assert_eq!(t.num_regions(), 0);
        assert!(t.vmm_va_to_gpa(0x7000_0010_0000).is_err());
        t.add_region(&region(0x10_0000, 0x2000), memfd(0x2000))
            .unwrap();
        assert_eq!(t.num_regions(), 1);
    }
}
