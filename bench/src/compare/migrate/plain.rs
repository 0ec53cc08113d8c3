//! The plain TCP copy: what moving the image costs with nothing but a socket, the limit
//! any block migration over loopback is measured against.
//!
//! The same data flow as our migration's, without its protocol (no headers, no
//! checksums): the sender reads the image with pread in 1 MiB pieces (our stream's
//! largest extent) and writes each to the socket as it is, as our source writes a full
//! extent frame; the receiver reads into a buffer of two largest frames (our
//! destination's) and writes whole 1 MiB pieces from it with pwrite, as our destination
//! writes whole extents, then fdatasync, as our destination does before it acknowledges.
//! Both ends buffered (the page cache), in two threads of this process, over 127.0.0.1.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use crate::compare::CompareError;

/// The piece size on both ends: our stream's largest extent (stream::MAX_EXTENT).
const PIECE: usize = 1 << 20;
/// The receiver's buffer: our destination's, two frames of a header and the largest
/// payload (2 × (32 + 1 MiB + 64)).
const RECV_BUF: usize = 2 * (32 + (1 << 20) + 64);

/// Copies `src` (`size` bytes) into `dst` (created or truncated) through a loopback TCP
/// connection; returns the seconds from connecting to the receiver's fdatasync, and
/// checks that the receiver got exactly `size` bytes.
pub(super) fn copy(src: &Path, dst: &Path, size: u64) -> Result<f64, CompareError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dst)?;
    out.set_len(size)?;
    let receiver = std::thread::Builder::new()
        .name("plain-recv".into())
        .spawn(move || -> std::io::Result<u64> {
            let (mut conn, _) = listener.accept()?;
            let mut buf = vec![0u8; RECV_BUF];
            let (mut start, mut end, mut at) = (0, 0, 0u64);
            loop {
                let n = match conn.read(&mut buf[end..]) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                end += n;
                // Whole pieces as they are there; the rest at the end of the stream.
                while end - start >= PIECE || (n == 0 && end > start) {
                    let len = (end - start).min(PIECE);
                    out.write_all_at(&buf[start..start + len], at)?;
                    at += len as u64;
                    start += len;
                }
                if n == 0 {
                    break;
                }
                // Less than a piece's room left: move the unread bytes forward.
                if buf.len() - end < PIECE {
                    buf.copy_within(start..end, 0);
                    end -= start;
                    start = 0;
                }
            }
            out.sync_data()?;
            Ok(at)
        })?;
    let input = std::fs::File::open(src)?;
    let t0 = Instant::now();
    let sent = (|| -> std::io::Result<()> {
        let mut conn = TcpStream::connect(addr)?;
        let mut piece = vec![0u8; PIECE];
        let mut at = 0u64;
        while at < size {
            let n = (size - at).min(PIECE as u64) as usize;
            input.read_exact_at(&mut piece[..n], at)?;
            conn.write_all(&piece[..n])?;
            at += n as u64;
        }
        conn.shutdown(std::net::Shutdown::Write)
    })();
    let got = receiver
        .join()
        .map_err(|_| CompareError::Run("the plain TCP receiver panicked".into()))?;
    let secs = t0.elapsed().as_secs_f64();
    sent?;
    let got = got?;
    if got != size {
        return Err(CompareError::Run(format!(
            "the plain TCP copy received {got} bytes of {size}"
        )));
    }
    Ok(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        // Not a multiple of either chunk, so the last pieces are short.
        let size = (5 << 20) + 12345;
        crate::compare::fill_random(&a, size).unwrap();
        // A longer old destination is cut to size.
        std::fs::write(&b, vec![1u8; (6 << 20) as usize]).unwrap();
        copy(&a, &b, size).unwrap();
        assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
    }
}
