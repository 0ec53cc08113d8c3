//! Turning a descriptor chain into a virtio-blk request, checking everything the guest
//! said. Parsing does no I/O; the engine executes what comes out.
//!
//! Framing follows the specification's "no assumptions about descriptor layout" rule: the
//! 16-byte header is the first 16 readable bytes, the status is the last writable byte, and
//! the data is whatever lies between, however the guest split it into descriptors.

use vhost_user_device::{Chain, GuestMem, Segment};
use vm_memory::{Bytes, GuestAddress};

use crate::spec::{
    req_type, status, DiscardSegment, RequestHeader, DISCARD_SEGMENT_SIZE, HEADER_SIZE,
    SECTOR_SIZE, WRITE_ZEROES_FLAG_UNMAP,
};

/// What the disk looks like to request parsing.
#[derive(Clone, Copy, Debug)]
pub struct DiskGeometry {
    /// Capacity in bytes.
    pub size: u64,
    /// Read-only disk.
    pub read_only: bool,
    /// Most segments in a discard request.
    pub max_discard_seg: u32,
    /// Largest discard segment in sectors.
    pub max_discard_sectors: u32,
    /// Most segments in a write-zeroes request.
    pub max_write_zeroes_seg: u32,
    /// Largest write-zeroes segment in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Most data buffers in one read or write (the iovec limit).
    pub max_data_segments: usize,
}

/// A range of the disk in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    /// Offset in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A parsed request, ready to execute.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at `offset` into the guest buffers.
    Read {
        /// Disk offset in bytes.
        offset: u64,
        /// Guest buffers (writable), in order.
        data: Vec<Segment>,
    },
    /// Write the guest buffers at `offset`.
    Write {
        /// Disk offset in bytes.
        offset: u64,
        /// Guest buffers (readable), in order.
        data: Vec<Segment>,
    },
    /// Make earlier writes durable.
    Flush,
    /// Write the serial into the guest buffers.
    GetId {
        /// Guest buffers (writable).
        data: Vec<Segment>,
    },
    /// Discard ranges (a hint).
    Discard {
        /// Ranges.
        ranges: Vec<ByteRange>,
    },
    /// Zero ranges; `unmap` allows deallocation.
    WriteZeroes {
        /// Ranges.
        ranges: Vec<ByteRange>,
        /// Deallocation allowed.
        unmap: bool,
    },
}

/// Why a request was refused (the status to write and a reason for the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Fewer than 16 readable bytes.
    #[error("header shorter than 16 bytes")]
    ShortHeader,
    /// Data buffers in the wrong direction for the request type.
    #[error("data buffers in the wrong direction for request type {0}")]
    WrongDirection(u32),
    /// Data length is not a whole number of sectors.
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    /// The request reaches past the end of the disk, or its offset overflows.
    #[error("sector {sector} + {len} bytes is past the end of the disk")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A write-type request on a read-only disk.
    #[error("write-type request {0} on a read-only disk")]
    ReadOnly(u32),
    /// A malformed discard/write-zeroes payload.
    #[error("discard/write-zeroes payload of {0} bytes is malformed")]
    BadSegmentList(u64),
    /// More segments or sectors than advertised.
    #[error("discard/write-zeroes request exceeds the advertised limits")]
    OverLimit,
    /// Too many data buffers for one I/O.
    #[error("{0} data buffers are more than one request may carry")]
    TooManySegments(usize),
    /// Flags we do not know, or UNMAP on DISCARD.
    #[error("unsupported flags {0:#x} in a discard/write-zeroes segment")]
    UnsupportedFlags(u32),
    /// A request type we do not implement.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// Guest memory could not be read.
    #[error("request payload is not readable")]
    Unreadable,
}

impl RequestError {
    /// The virtio status for this error.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::UnsupportedFlags(_) => status::UNSUPP,
            _ => status::IOERR,
        }
    }
}

/// A parsed chain: where the status goes, and the request or the reason it was refused.
#[derive(Debug)]
pub struct Parsed {
    /// Guest address of the status byte.
    pub status_addr: u64,
    /// The request, or the error to report.
    pub request: Result<Request, RequestError>,
}

/// Copies `buf.len()` bytes starting `skip` bytes into `segs`.
fn read_across(
    mem: &GuestMem,
    segs: &[Segment],
    mut skip: u64,
    buf: &mut [u8],
) -> Result<(), RequestError> {
    let mut done = 0usize;
    for s in segs {
        if done == buf.len() {
            break;
        }
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let take = ((len - skip) as usize).min(buf.len() - done);
        mem.read_slice(&mut buf[done..done + take], GuestAddress(s.addr + skip))
            .map_err(|_| RequestError::Unreadable)?;
        done += take;
        skip = 0;
    }
    if done == buf.len() {
        Ok(())
    } else {
        Err(RequestError::ShortHeader)
    }
}

/// The segments of `segs` after dropping the first `skip` bytes.
fn skip_bytes(segs: &[Segment], mut skip: u64) -> Vec<Segment> {
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        out.push(Segment {
            addr: s.addr + skip,
            len: (len - skip) as u32,
            writable: s.writable,
        });
        skip = 0;
    }
    out
}

/// The segments of `segs` without their last `drop` bytes.
fn drop_tail(segs: &[Segment], drop: u64) -> Vec<Segment> {
    let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
    let mut keep = total.saturating_sub(drop);
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        if keep == 0 {
            break;
        }
        let len = u64::from(s.len).min(keep);
        out.push(Segment {
            addr: s.addr,
            len: len as u32,
            writable: s.writable,
        });
        keep -= len;
    }
    out
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

fn check_range(geo: &DiskGeometry, sector: u64, len: u64) -> Result<u64, RequestError> {
    let oob = RequestError::OutOfRange { sector, len };
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or(oob)?;
    let end = offset.checked_add(len).ok_or(oob)?;
    if end > geo.size {
        return Err(oob);
    }
    Ok(offset)
}

fn parse_segments(
    mem: &GuestMem,
    geo: &DiskGeometry,
    payload: &[Segment],
    type_: u32,
) -> Result<(Vec<ByteRange>, bool), RequestError> {
    let bytes = total(payload);
    if bytes == 0 || !bytes.is_multiple_of(DISCARD_SEGMENT_SIZE as u64) {
        return Err(RequestError::BadSegmentList(bytes));
    }
    let count = bytes / DISCARD_SEGMENT_SIZE as u64;
    let (max_seg, max_sectors) = if type_ == req_type::DISCARD {
        (geo.max_discard_seg, geo.max_discard_sectors)
    } else {
        (geo.max_write_zeroes_seg, geo.max_write_zeroes_sectors)
    };
    if count > u64::from(max_seg) {
        return Err(RequestError::OverLimit);
    }
    let mut ranges = Vec::with_capacity(count as usize);
    let mut unmap_all = true;
    for i in 0..count {
        let mut raw = [0u8; DISCARD_SEGMENT_SIZE];
        read_across(mem, payload, i * DISCARD_SEGMENT_SIZE as u64, &mut raw)?;
        let seg = DiscardSegment {
            sector: u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default()),
            num_sectors: u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default()),
            flags: u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default()),
        };
        let allowed = if type_ == req_type::DISCARD {
            0
        } else {
            WRITE_ZEROES_FLAG_UNMAP
        };
        if seg.flags & !allowed != 0 {
            return Err(RequestError::UnsupportedFlags(seg.flags));
        }
        unmap_all &= seg.flags & WRITE_ZEROES_FLAG_UNMAP != 0;
        if seg.num_sectors > max_sectors {
            return Err(RequestError::OverLimit);
        }
        let len = u64::from(seg.num_sectors) * SECTOR_SIZE;
        let offset = check_range(geo, seg.sector, len)?;
        if len > 0 {
            ranges.push(ByteRange { offset, len });
        }
    }
    // Deallocation is only allowed when every segment allows it.
    Ok((ranges, unmap_all))
}

/// Parses a chain. Returns `None` when the chain has no writable byte for the status: such
/// a chain can only be returned to the guest unanswered.
pub fn parse(mem: &GuestMem, chain: &Chain, geo: &DiskGeometry) -> Option<Parsed> {
    let split = chain
        .segments
        .iter()
        .position(|s| s.writable)
        .unwrap_or(chain.segments.len());
    let (readable, writable) = chain.segments.split_at(split);
    let last = writable.last()?;
    let status_addr = last.addr + u64::from(last.len) - 1;
    Some(Parsed {
        status_addr,
        request: parse_request(mem, readable, writable, geo),
    })
}

fn parse_request(
    mem: &GuestMem,
    readable: &[Segment],
    writable: &[Segment],
    geo: &DiskGeometry,
) -> Result<Request, RequestError> {
    let mut raw = [0u8; HEADER_SIZE];
    read_across(mem, readable, 0, &mut raw)?;
    let hdr = RequestHeader {
        type_: u32::from_le_bytes(raw[0..4].try_into().unwrap_or_default()),
        reserved: 0,
        sector: u64::from_le_bytes(raw[8..16].try_into().unwrap_or_default()),
    };
    let out_data = skip_bytes(readable, HEADER_SIZE as u64);
    let in_data = drop_tail(writable, 1);
    let t = hdr.type_;
    match t {
        req_type::IN | req_type::OUT => {
            let (data, wrong) = if t == req_type::IN {
                (in_data, !out_data.is_empty())
            } else {
                (out_data, !in_data.is_empty())
            };
            if wrong {
                return Err(RequestError::WrongDirection(t));
            }
            if t == req_type::OUT && geo.read_only {
                return Err(RequestError::ReadOnly(t));
            }
            let len = total(&data);
            if !len.is_multiple_of(SECTOR_SIZE) {
                return Err(RequestError::UnalignedLength(len));
            }
            if data.len() > geo.max_data_segments {
                return Err(RequestError::TooManySegments(data.len()));
            }
            let offset = check_range(geo, hdr.sector, len)?;
            Ok(if t == req_type::IN {
                Request::Read { offset, data }
            } else {
                Request::Write { offset, data }
            })
        }
        req_type::FLUSH => Ok(Request::Flush),
        req_type::GET_ID => {
            if in_data.is_empty() {
                return Err(RequestError::WrongDirection(t));
            }
            Ok(Request::GetId { data: in_data })
        }
        req_type::DISCARD | req_type::WRITE_ZEROES => {
            if geo.read_only {
                return Err(RequestError::ReadOnly(t));
            }
            if !in_data.is_empty() {
                return Err(RequestError::WrongDirection(t));
            }
            let (ranges, unmap) = parse_segments(mem, geo, &out_data, t)?;
            if t == req_type::DISCARD {
                Ok(Request::Discard { ranges })
            } else {
                Ok(Request::WriteZeroes { ranges, unmap })
            }
        }
        other => Err(RequestError::Unsupported(other)),
    }
}
