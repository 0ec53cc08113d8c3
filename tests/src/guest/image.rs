//! Disk image contents: hashes of ranges, zero checks, pseudo-random fills.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

/// Hex sha256 of `len` bytes of `path` at `offset` (short files fail).
pub fn sha256_file_range(path: &Path, offset: u64, len: u64) -> io::Result<String> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut h = Sha256::new();
    let mut left = len;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        f.read_exact(&mut buf[..n])?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(hex(&h.finalize()))
}

/// Whether `len` bytes of `path` at `offset` are all zero (a memcmp per
/// MiB: fast even in unoptimised test builds, unlike hashing).
pub fn file_range_is_zero(path: &Path, offset: u64, len: u64) -> io::Result<bool> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let zeros = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        f.read_exact(&mut buf[..n])?;
        if buf[..n] != zeros[..n] {
            return Ok(false);
        }
        left -= n as u64;
    }
    Ok(true)
}

/// Hex sha256 of a whole file.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let len = fs::metadata(path)?.len();
    sha256_file_range(path, 0, len)
}

/// Hex sha256 of `len` zero bytes.
pub fn sha256_zeros(len: u64) -> String {
    let mut h = Sha256::new();
    let buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        h.update(&buf[..n]);
        left -= n as u64;
    }
    hex(&h.finalize())
}

fn hex(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

/// Writes `len` pseudo-random bytes (xorshift64*, from `seed`) into `path`
/// at `offset`; returns their hex sha256.
pub fn write_random(path: &Path, offset: u64, len: u64, seed: u64) -> io::Result<String> {
    let mut f = OpenOptions::new().write(true).open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut state = seed | 1;
    let mut h = Sha256::new();
    let mut left = len;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        for chunk in buf[..n].chunks_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let v = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        f.write_all(&buf[..n])?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(hex(&h.finalize()))
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn zeros_hash() {
        assert_eq!(
            sha256_zeros(0),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
