//! The image as a sync sees it: extents read from the source (holes found with
//! SEEK_DATA/SEEK_HOLE, zero blocks noticed), applied on the destination (data written,
//! zeros punched so both images compare equal, or written where punching cannot zero).
//!
//! Syncs use their own descriptor on the image, buffered (not the workers' O_DIRECT one):
//! the source's reads need no aligned buffers, and the destination makes everything
//! durable with one fdatasync before it serves. O_DIRECT reads by the workers see the
//! page cache's data (the kernel writes dirty pages back before a direct read).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;

/// What a range of the source holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Content {
    /// Only zeros (a hole, or written zeros): sent as a flag.
    Zero,
    /// Data: sent as it is.
    Data,
}

/// An open image for a sync.
#[derive(Debug)]
pub struct SyncImage {
    file: File,
    size: u64,
}

impl SyncImage {
    /// Opens the image at `path` of `size` bytes (read-only for a source).
    pub fn open(path: &Path, size: u64, write: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(write).open(path)?;
        Ok(Self { file, size })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where the next data at or after `offset` starts (`size` when none): the range in
    /// between is a hole. Block devices and file systems without SEEK_DATA say data
    /// everywhere.
    pub fn next_data(&self, offset: u64) -> u64 {
        self.seek(offset, libc::SEEK_DATA).unwrap_or(offset)
    }

    /// Where the hole after data at `offset` starts (`size` when none).
    pub fn next_hole(&self, offset: u64) -> u64 {
        self.seek(offset, libc::SEEK_HOLE).unwrap_or(self.size)
    }

    fn seek(&self, offset: u64, whence: i32) -> Option<u64> {
        if offset >= self.size {
            return Some(self.size);
        }
        // SAFETY: lseek on our own open fd; it does not change what we read with pread.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as i64, whence) };
        if r < 0 {
            // ENXIO: no data (or no hole) past offset.
            return (io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO))
                .then_some(self.size);
        }
        Some((r as u64).min(self.size))
    }

    /// Reads `buf.len()` bytes at `offset` and says whether they are all zeros.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<Content> {
        self.file.read_exact_at(buf, offset)?;
        Ok(if is_zero(buf) {
            Content::Zero
        } else {
            Content::Data
        })
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    /// Makes `[offset, offset + len)` read as zeros: a hole where the file system can
    /// punch one (the source had a hole or zeros there), written zeros elsewhere.
    pub fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on our own fd; no memory involved.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if !matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP) | Some(libc::ENODEV) | Some(libc::EINVAL)
        ) {
            return Err(e);
        }
        let zeros = vec![0u8; (len as usize).min(1 << 20)];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset + at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Makes everything written durable.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Whether every byte is zero (word at a time).
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: reading u64s from a byte slice at aligned positions is sound; align_to
        // gives the unaligned head and tail as bytes.
        unsafe { buf.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_data_and_zeros_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = File::create(&p).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 1 << 20).unwrap();
        f.write_all_at(&[0u8; 4096], 2 << 20).unwrap();
        let img = SyncImage::open(&p, 4 << 20, false).unwrap();
        // Ext4/xfs/tmpfs report the hole before 1 MiB; others say data everywhere.
        let d = img.next_data(0);
        assert!(d == 0 || d == 1 << 20, "{d}");
        let mut buf = vec![0u8; 4096];
        assert_eq!(img.read(1 << 20, &mut buf).unwrap(), Content::Data);
        assert_eq!(img.read(2 << 20, &mut buf).unwrap(), Content::Zero);
        assert!(img.next_hole(1 << 20) > 1 << 20);
        assert_eq!(img.next_data(4 << 20), 4 << 20);
    }

    #[test]
    fn zero_punches_or_writes_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![7u8; 1 << 20]).unwrap();
        let img = SyncImage::open(&p, 1 << 20, true).unwrap();
        img.zero(4096, 8192).unwrap();
        let data = std::fs::read(&p).unwrap();
        assert!(data[4096..12288].iter().all(|&b| b == 0));
        assert_eq!(data[4095], 7);
        assert_eq!(data[12288], 7);
    }

    #[test]
    fn is_zero_checks_every_byte() {
        let mut v = vec![0u8; 1000];
        assert!(is_zero(&v));
        for i in [0, 1, 7, 8, 500, 999] {
            v[i] = 1;
            assert!(!is_zero(&v), "{i}");
            assert!(!is_zero(&v[1..]) || i == 0, "{i}");
            v[i] = 0;
        }
    }
}
