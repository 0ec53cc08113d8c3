//! A descriptor chain's buffers as a byte stream: [`ChainReader`] (`io::Read` over the
//! readable buffers) and [`ChainWriter`] (`io::Write` over the writable ones).
//!
//! Devices read headers and commands and write statuses and replies that the guest may
//! split across descriptors anywhere ("no assumptions about descriptor layout", virtio
//! 1.2, 2.7.4). Each device used to walk the segments by hand for that, with its own
//! offset arithmetic; these do it once. Every access goes through vm-memory, which checks
//! that the whole range lies in guest memory (the walker checked the chain, but memory can
//! change under a popped chain: a region removed) and logs writes in the dirty log. Both
//! count the bytes they moved, which is what a device puts on the used ring.
//!
//! They copy. Bulk data that the kernel can move itself (a disk read or write, a frame to
//! or from the tap) stays zero-copy: those paths hand the segments to the kernel as
//! iovecs ([`crate::memory::host_iovecs`]).

use std::io;

use vm_memory::{Bytes, GuestAddress};

use crate::chain::{Chain, Segment};
use crate::memory::GuestMem;

/// Why a chain's buffer could not be read or written (as the source of an `io::Error`
/// of kind `InvalidInput`; running out of buffers is `UnexpectedEof` from `read_exact`
/// and `WriteZero` from `write_all`).
#[derive(Debug, thiserror::Error)]
pub enum ChainIoError {
    /// The buffer is not (or no longer) inside guest memory.
    #[error("chain buffer at {addr:#x} length {len} is not inside guest memory")]
    OutsideMemory {
        /// Guest address of the part that was accessed.
        addr: u64,
        /// Bytes accessed there.
        len: usize,
    },
}

impl From<ChainIoError> for io::Error {
    fn from(e: ChainIoError) -> Self {
        io::Error::new(io::ErrorKind::InvalidInput, e)
    }
}

/// A position in the buffers of one direction of a chain.
#[derive(Clone, Debug)]
struct Cursor<'a> {
    segments: &'a [Segment],
    /// The direction walked: writable buffers, or readable ones.
    writable: bool,
    /// The current segment (those of the other direction are passed over).
    index: usize,
    /// Bytes of the current segment already consumed.
    offset: u32,
    /// Bytes consumed in all.
    done: u64,
}

impl<'a> Cursor<'a> {
    fn new(segments: &'a [Segment], writable: bool) -> Self {
        Self {
            segments,
            writable,
            index: 0,
            offset: 0,
            done: 0,
        }
    }

    /// The rest of the current segment: its guest address and length; None at the end.
    /// Zero-length segments and segments of the other direction are passed over.
    fn current(&mut self) -> io::Result<Option<(u64, usize)>> {
        while let Some(s) = self.segments.get(self.index) {
            if s.writable == self.writable && self.offset < s.len {
                let left = (s.len - self.offset) as usize;
                let addr = s.addr.checked_add(u64::from(self.offset)).ok_or(
                    ChainIoError::OutsideMemory {
                        addr: s.addr,
                        len: left,
                    },
                )?;
                return Ok(Some((addr, left)));
            }
            self.index += 1;
            self.offset = 0;
        }
        Ok(None)
    }

    /// `n` bytes of the current segment (at most what [`Cursor::current`] said) are done.
    fn advance(&mut self, n: usize) {
        // n <= the segment's rest, which fits a u32.
        self.offset += n as u32;
        self.done += n as u64;
    }

    /// Moves `n` bytes on without touching them; returns how many there were.
    fn skip(&mut self, mut n: u64) -> io::Result<u64> {
        let start = self.done;
        while n > 0 {
            let Some((_, left)) = self.current()? else {
                break;
            };
            let take = (left as u64).min(n);
            self.advance(take as usize);
            n -= take;
        }
        Ok(self.done - start)
    }

    /// Bytes left in this direction.
    fn remaining(&self) -> u64 {
        let mut left: u64 = self
            .segments
            .iter()
            .skip(self.index)
            .filter(|s| s.writable == self.writable)
            .map(|s| u64::from(s.len))
            .sum();
        if let Some(s) = self.segments.get(self.index) {
            if s.writable == self.writable {
                left -= u64::from(self.offset.min(s.len));
            }
        }
        left
    }

    /// Moves up to `len` bytes with `op(guest address, range in the caller's buffer)`,
    /// segment by segment. An access that fails after some bytes moved ends the call
    /// with those bytes; the error comes with the next call (`io::Read`/`io::Write`).
    fn transfer(
        &mut self,
        len: usize,
        mut op: impl FnMut(GuestAddress, std::ops::Range<usize>) -> bool,
    ) -> io::Result<usize> {
        let mut n = 0;
        while n < len {
            let Some((addr, left)) = self.current()? else {
                break;
            };
            let take = left.min(len - n);
            if !op(GuestAddress(addr), n..n + take) {
                if n > 0 {
                    break;
                }
                return Err(ChainIoError::OutsideMemory { addr, len: take }.into());
            }
            self.advance(take);
            n += take;
        }
        Ok(n)
    }
}

/// `io::Read` over the readable buffers of a chain, in order.
#[derive(Clone, Debug)]
pub struct ChainReader<'a> {
    mem: &'a GuestMem,
    cursor: Cursor<'a>,
}

impl<'a> ChainReader<'a> {
    /// Reads `chain`'s readable buffers.
    pub fn new(mem: &'a GuestMem, chain: &'a Chain) -> Self {
        Self::over(mem, &chain.segments)
    }

    /// Reads the readable ones of `segments` (part of a chain a device kept).
    pub fn over(mem: &'a GuestMem, segments: &'a [Segment]) -> Self {
        Self {
            mem,
            cursor: Cursor::new(segments, false),
        }
    }

    /// Bytes read (or skipped) so far.
    pub fn bytes_read(&self) -> u64 {
        self.cursor.done
    }

    /// Bytes left to read.
    pub fn remaining(&self) -> u64 {
        self.cursor.remaining()
    }

    /// Passes over `n` bytes without reading them; returns how many there were (fewer
    /// at the end of the buffers).
    pub fn skip(&mut self, n: u64) -> io::Result<u64> {
        self.cursor.skip(n)
    }
}

impl io::Read for ChainReader<'_> {
    /// Fills `buf` across buffer boundaries; short only at the end of the readable
    /// buffers, or before a buffer that is not in guest memory (reported by the next
    /// call).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mem = self.mem;
        self.cursor.transfer(buf.len(), |at, range| {
            mem.read_slice(&mut buf[range], at).is_ok()
        })
    }
}

/// `io::Write` over the writable buffers of a chain, in order. Writing past their end
/// writes nothing (`write` returns 0, `write_all` fails with `WriteZero`).
#[derive(Clone, Debug)]
pub struct ChainWriter<'a> {
    mem: &'a GuestMem,
    cursor: Cursor<'a>,
}

impl<'a> ChainWriter<'a> {
    /// Writes into `chain`'s writable buffers.
    pub fn new(mem: &'a GuestMem, chain: &'a Chain) -> Self {
        Self::over(mem, &chain.segments)
    }

    /// Writes into the writable ones of `segments` (part of a chain a device kept).
    pub fn over(mem: &'a GuestMem, segments: &'a [Segment]) -> Self {
        Self {
            mem,
            cursor: Cursor::new(segments, true),
        }
    }

    /// Bytes written (or skipped) so far: the used length, when written from the start.
    pub fn bytes_written(&self) -> u64 {
        self.cursor.done
    }

    /// Room left.
    pub fn remaining(&self) -> u64 {
        self.cursor.remaining()
    }

    /// Passes over `n` bytes without writing them; returns how many there were (fewer
    /// at the end of the buffers).
    pub fn skip(&mut self, n: u64) -> io::Result<u64> {
        self.cursor.skip(n)
    }
}

impl io::Write for ChainWriter<'_> {
    /// Writes as much of `buf` as fits, across buffer boundaries; short only at the end
    /// of the writable buffers, or before a buffer that is not in guest memory (reported
    /// by the next call).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mem = self.mem;
        self.cursor.transfer(buf.len(), |at, range| {
            mem.write_slice(&buf[range], at).is_ok()
        })
    }

    /// Nothing to flush: every write went to guest memory.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    use crate::chain;

    /// Where the tests' descriptor table lives (the test ring's memory holds its own
    /// rings below).
    const TABLE: u64 = 0x3000;
    const TABLE_SIZE: u16 = 16;
    /// Guest memory ends here (see `ring::tests::ring_of`).
    const MEM_END: u64 = 0x10000;
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    /// 64 KiB of guest memory.
    fn memory() -> std::sync::Arc<GuestMem> {
        crate::ring::tests::ring_of(16).memory()
    }

    /// Writes the descriptors `(addr, len, writable)` as one chain from index 0 of the
    /// table and walks it as the ring would.
    fn chain_of(mem: &GuestMem, descs: &[(u64, u32, bool)]) -> Chain {
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let flags = if writable { WRITE } else { 0 } | if last { 0 } else { NEXT };
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&(i as u16 + 1).to_le_bytes());
            mem.write_slice(&raw, GuestAddress(TABLE + 16 * i as u64))
                .unwrap();
        }
        let mut c = Chain::default();
        chain::walk(mem, TABLE, TABLE_SIZE, 0, &mut c).unwrap();
        c
    }

    fn fill(mem: &GuestMem, addr: u64, bytes: &[u8]) {
        mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    fn guest_bytes(mem: &GuestMem, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn a_read_spans_segment_boundaries_in_order() {
        let mem = memory();
        fill(&mem, 0x8000, b"abc");
        fill(&mem, 0x9000, b"defg");
        fill(&mem, 0xa000, b"h");
        let c = chain_of(
            &mem,
            &[(0x8000, 3, false), (0x9000, 4, false), (0xa000, 1, false)],
        );
        let mut r = ChainReader::new(&mem, &c);
        assert_eq!(r.remaining(), 8);
        let mut two = [0u8; 2];
        r.read_exact(&mut two).unwrap();
        assert_eq!(&two, b"ab");
        // The next read starts inside the first segment and ends inside the second.
        let mut four = [0u8; 4];
        r.read_exact(&mut four).unwrap();
        assert_eq!(&four, b"cdef");
        assert_eq!((r.bytes_read(), r.remaining()), (6, 2));
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"gh");
        assert_eq!(r.bytes_read(), 8);
    }

    #[test]
    fn a_chain_shorter_than_asked_reads_what_it_has_and_read_exact_fails() {
        let mem = memory();
        fill(&mem, 0x8000, b"0123456789");
        let c = chain_of(&mem, &[(0x8000, 6, false), (0x9000, 4, true)]);
        let mut buf = [0xffu8; 16];
        let mut r = ChainReader::new(&mem, &c);
        assert_eq!(r.read(&mut buf).unwrap(), 6, "only the readable bytes");
        assert_eq!(&buf[..6], b"012345");
        assert_eq!(r.read(&mut buf).unwrap(), 0, "then the end");
        let mut r = ChainReader::new(&mem, &c);
        let e = r.read_exact(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_chain_without_buffers_of_a_direction_is_empty_that_way() {
        let mem = memory();
        let c = chain_of(&mem, &[(0x8000, 8, true)]);
        let mut r = ChainReader::new(&mem, &c);
        assert_eq!(r.remaining(), 0);
        assert_eq!(r.read(&mut [0u8; 4]).unwrap(), 0);
        let c = chain_of(&mem, &[(0x8000, 8, false)]);
        let mut w = ChainWriter::new(&mem, &c);
        assert_eq!(w.remaining(), 0);
        assert_eq!(w.write(b"x").unwrap(), 0);
    }

    #[test]
    fn zero_length_segments_are_passed_over() {
        let mem = memory();
        fill(&mem, 0x8000, b"ab");
        fill(&mem, 0x9000, b"cd");
        // The walker drops empty descriptors; a chain built by hand may have them.
        let c = chain_of(
            &mem,
            &[(0x8000, 2, false), (0xa000, 0, false), (0x9000, 2, false)],
        );
        assert_eq!(c.segments.len(), 2);
        let seg = |addr, len, writable| Segment {
            addr,
            len,
            writable,
        };
        let by_hand = [
            seg(0xb000, 0, false),
            seg(0x8000, 2, false),
            seg(0xb000, 0, false),
            seg(0x9000, 2, false),
            seg(0xc000, 0, true),
            seg(0xc000, 3, true),
            seg(0xd000, 0, true),
        ];
        for segments in [&c.segments[..], &by_hand[..]] {
            let mut r = ChainReader::over(&mem, segments);
            let mut all = Vec::new();
            r.read_to_end(&mut all).unwrap();
            assert_eq!(all, b"abcd");
        }
        let mut w = ChainWriter::over(&mem, &by_hand);
        assert_eq!(w.remaining(), 3);
        w.write_all(b"xyz").unwrap();
        assert_eq!(guest_bytes(&mem, 0xc000, 3), b"xyz");
    }

    #[test]
    fn writes_span_segments_and_stop_at_the_end() {
        let mem = memory();
        fill(&mem, 0x9000, &[0xee; 8]);
        fill(&mem, 0xa000, &[0xee; 8]);
        let c = chain_of(
            &mem,
            &[(0x8000, 4, false), (0x9000, 3, true), (0xa000, 2, true)],
        );
        let mut w = ChainWriter::new(&mem, &c);
        assert_eq!(w.remaining(), 5);
        w.write_all(b"1234").unwrap();
        assert_eq!(w.bytes_written(), 4);
        assert_eq!(w.write(b"567").unwrap(), 1, "one byte of room left");
        assert_eq!(w.write(b"8").unwrap(), 0, "none left");
        let e = w.write_all(b"8").unwrap_err();
        assert_eq!(
            e.kind(),
            io::ErrorKind::WriteZero,
            "writing past the end is refused"
        );
        assert_eq!(w.bytes_written(), 5);
        assert_eq!(guest_bytes(&mem, 0x9000, 4), b"123\xee");
        assert_eq!(
            guest_bytes(&mem, 0xa000, 3),
            b"45\xee",
            "nothing past the buffer"
        );
        // The readable buffer was not written.
        assert_eq!(guest_bytes(&mem, 0x8000, 4), [0; 4]);
    }

    #[test]
    fn skip_moves_on_without_touching_and_stops_at_the_end() {
        let mem = memory();
        fill(&mem, 0x8000, b"header--");
        fill(&mem, 0x9000, b"payload");
        let c = chain_of(
            &mem,
            &[(0x8000, 8, false), (0x9000, 7, false), (0xa000, 4, true)],
        );
        let mut r = ChainReader::new(&mem, &c);
        assert_eq!(r.skip(10).unwrap(), 10);
        let mut buf = [0u8; 3];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ylo");
        assert_eq!(r.skip(100).unwrap(), 2, "only what is left");
        let mut w = ChainWriter::new(&mem, &c);
        assert_eq!(w.skip(2).unwrap(), 2);
        w.write_all(b"st").unwrap();
        assert_eq!(w.bytes_written(), 4);
        assert_eq!(guest_bytes(&mem, 0xa000, 4), b"\0\0st");
    }

    #[test]
    fn buffers_outside_guest_memory_are_refused_after_the_bytes_before_them() {
        let mem = memory();
        fill(&mem, 0x8000, b"okay");
        // A chain the walker accepted, then memory went away under its second buffer: a
        // hand-built chain stands for it.
        let segments = [
            Segment {
                addr: 0x8000,
                len: 4,
                writable: false,
            },
            Segment {
                addr: MEM_END - 2,
                len: 4,
                writable: false,
            },
            Segment {
                addr: u64::MAX,
                len: 4,
                writable: true,
            },
        ];
        let mut r = ChainReader::over(&mem, &segments);
        let mut buf = [0u8; 8];
        assert_eq!(r.read(&mut buf).unwrap(), 4, "the good part first");
        assert_eq!(&buf[..4], b"okay");
        let e = r.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(r.bytes_read(), 4);
        let mut r = ChainReader::over(&mem, &segments);
        assert!(r.read_exact(&mut buf).is_err());
        let mut w = ChainWriter::over(&mem, &segments);
        let e = w.write(b"xy").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(w.bytes_written(), 0);
        // An address that overflows once moved into the segment is refused too.
        assert_eq!(w.skip(1).unwrap(), 1);
        assert!(w.write(b"x").is_err());
    }
}
