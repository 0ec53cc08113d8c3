//! The backing store: a raw image file or a block device.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use vhost_user_device::engine::{EngineChoice, EngineKind, FileHome, MappedNeedsTmpfs};

/// How the host page cache is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CacheMode {
    /// O_DIRECT: bypass the host page cache (falls back to buffered, with a warning, where
    /// the file system cannot do O_DIRECT).
    None,
    /// Buffered I/O through the host page cache.
    Writeback,
}

/// Errors opening the disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// open(2) failed.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The path given with --blk-file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// stat or an ioctl failed.
    #[error("cannot read the size of {path}: {source}")]
    Size {
        /// The path given with --blk-file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Neither a regular file nor a block device.
    #[error("{0} is neither a regular file nor a block device")]
    NotADisk(PathBuf),
    /// The disk is smaller than one block.
    #[error("{path} holds {size} bytes, less than one {block_size}-byte block")]
    TooSmall {
        /// The path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The block size asked for.
        block_size: u32,
    },
    /// --block-size below the device's own logical block size.
    #[error("block size {block_size} is smaller than the device's logical block size {device}")]
    BlockSizeTooSmall {
        /// Asked for.
        block_size: u32,
        /// The device's.
        device: u32,
    },
}

/// An open disk.
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    /// Usable size in bytes (a whole number of blocks).
    pub size: u64,
    /// Opened with O_DIRECT.
    pub direct: bool,
    /// Opened read-only.
    pub read_only: bool,
    /// A block device (not a file).
    pub is_block_device: bool,
    /// Buffer address alignment O_DIRECT needs (1 when not direct).
    pub mem_align: u64,
    /// File offset and length alignment O_DIRECT needs (1 when not direct).
    pub offset_align: u64,
    /// The device's logical block size (512 for files).
    pub logical_block_size: u32,
    /// FALLOC_FL_ZERO_RANGE failed with EOPNOTSUPP once: use punch + allocate instead.
    pub zero_range_unsupported: AtomicBool,
    /// Punching a hole (or punch + allocate) failed with EOPNOTSUPP once: fallocate cannot
    /// zero anything here (ramfs; a block device without write-zeroes), so write-zeroes
    /// requests write zeros.
    pub zero_by_writing: AtomicBool,
    /// Where the file lives (a block device counts as `Device`): see [`file_home`].
    pub home: FileHome,
    /// The I/O engine each queue worker runs the disk's I/O on: `--io-engine`, by default
    /// mapped on tmpfs, inline on other memory file systems and io_uring for anything else.
    pub engine: EngineKind,
}

const TMPFS_MAGIC: i64 = 0x0102_1994;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// Where `file` lives, for the choice of I/O engine. Reads and writes on a memory file
/// system never wait for a device, yet such file systems cannot do them without blocking
/// in io_uring's sense (no IOCB_NOWAIT support), so io_uring hands every one to a kernel
/// worker thread: two context switches per request for a memory copy. Doing them on the
/// queue's worker thread (the inline engine, `vhost_user_device::engine`) is cheaper and
/// still zero-copy; on tmpfs, copying through a mapping of the file (the mapped engine)
/// also skips the system call and the page-cache lookup.
pub fn file_home(file: &File) -> FileHome {
    // SAFETY: zeroed statfs is a valid out buffer for fstatfs.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and out pointer.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut s) } != 0 {
        return FileHome::Device;
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets.
    match s.f_type as i64 {
        TMPFS_MAGIC => FileHome::Tmpfs,
        HUGETLBFS_MAGIC | RAMFS_MAGIC => FileHome::OtherMemory,
        _ => FileHome::Device,
    }
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;

impl Disk {
    /// Opens `path`; `block_size` is what the guest will see.
    pub fn open(
        path: &Path,
        read_only: bool,
        cache: CacheMode,
        block_size: u32,
    ) -> Result<Self, DiskError> {
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(!read_only);
            let mut flags = libc::O_CLOEXEC;
            if direct {
                flags |= libc::O_DIRECT;
            }
            o.custom_flags(flags).open(path)
        };
        let want_direct = cache == CacheMode::None;
        let (file, direct) = match open(want_direct) {
            Ok(f) => (f, want_direct),
            Err(e) if want_direct && e.raw_os_error() == Some(libc::EINVAL) => {
                log::warn!(
                    "{}: the file system does not support O_DIRECT; using buffered I/O \
                     (--cache=writeback)",
                    path.display()
                );
                let f = open(false).map_err(|source| DiskError::Open {
                    path: path.into(),
                    source,
                })?;
                (f, false)
            }
            Err(source) => {
                return Err(DiskError::Open {
                    path: path.into(),
                    source,
                })
            }
        };
        let size_err = |source| DiskError::Size {
            path: path.into(),
            source,
        };
        let meta = file.metadata().map_err(size_err)?;
        let ft = meta.file_type();
        let (raw_size, lbs, is_block_device) = if ft.is_block_device() {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 to the pointer we pass.
            if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) } < 0 {
                return Err(size_err(io::Error::last_os_error()));
            }
            let mut lbs: libc::c_int = 0;
            // SAFETY: BLKSSZGET writes one int to the pointer we pass.
            if unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut lbs) } < 0 {
                return Err(size_err(io::Error::last_os_error()));
            }
            (size, u32::try_from(lbs).unwrap_or(512).max(512), true)
        } else if ft.is_file() {
            (meta.len(), 512, false)
        } else {
            return Err(DiskError::NotADisk(path.into()));
        };
        if block_size < lbs {
            return Err(DiskError::BlockSizeTooSmall {
                block_size,
                device: lbs,
            });
        }
        let size = raw_size - raw_size % u64::from(block_size);
        if size == 0 {
            return Err(DiskError::TooSmall {
                path: path.into(),
                size: raw_size,
                block_size,
            });
        }
        if size != raw_size {
            log::warn!(
                "{}: size {raw_size} is not a multiple of {block_size}; the last {} bytes are \
                 not exposed",
                path.display(),
                raw_size - size
            );
        }
        let (mem_align, offset_align) = if direct {
            dio_alignment(&file).unwrap_or((u64::from(lbs), u64::from(lbs)))
        } else {
            (1, 1)
        };
        let home = if is_block_device {
            FileHome::Device
        } else {
            file_home(&file)
        };
        Ok(Self {
            file,
            path: path.into(),
            size,
            direct,
            read_only,
            is_block_device,
            mem_align,
            offset_align,
            logical_block_size: lbs,
            zero_range_unsupported: AtomicBool::new(false),
            zero_by_writing: AtomicBool::new(false),
            home,
            engine: if home != FileHome::Device {
                EngineKind::Inline
            } else {
                EngineKind::Uring
            },
        })
    }

    /// Chooses the I/O engine (`--io-engine`) and says which it is and why. Errors:
    /// `mapped` for a file not on tmpfs.
    pub fn choose_engine(&mut self, choice: EngineChoice) -> Result<(), MappedNeedsTmpfs> {
        self.engine = choice.resolve(self.home)?;
        let why = match (choice, self.home) {
            (EngineChoice::Auto, FileHome::Tmpfs) => "auto: the file is on tmpfs",
            (EngineChoice::Auto, FileHome::OtherMemory) => {
                "auto: the file is in memory (hugetlbfs or ramfs)"
            }
            (EngineChoice::Auto, FileHome::Device) => "auto: the file is not in memory",
            _ => "--io-engine",
        };
        log::info!(
            "{}: I/O engine {} ({why})",
            self.path.display(),
            self.engine
        );
        Ok(())
    }

    /// The file lives in memory (tmpfs, hugetlbfs, ramfs).
    pub fn memory_backed(&self) -> bool {
        self.home != FileHome::Device
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether ZERO_RANGE is known not to work here.
    pub fn zero_range_unsupported(&self) -> bool {
        self.zero_range_unsupported.load(Ordering::Relaxed)
    }

    /// Whether fallocate is known not to zero anything here (write zeros instead).
    pub fn zero_by_writing(&self) -> bool {
        self.zero_by_writing.load(Ordering::Relaxed)
    }
}

/// O_DIRECT alignment from statx(STATX_DIOALIGN) (Linux 6.1+).
fn dio_alignment(file: &File) -> Option<(u64, u64)> {
    // SAFETY: zeroed statx is a valid out buffer.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, empty path with AT_EMPTY_PATH, valid out pointer.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_mem_align == 0 {
        return None;
    }
    Some((
        u64::from(stx.stx_dio_mem_align),
        u64::from(stx.stx_dio_offset_align.max(1)),
    ))
}
