//! virtio-blk definitions from the VIRTIO 1.2 specification, section 5.2.

use vm_memory::ByteValued;

/// Size of a sector: offsets in requests are in 512-byte units whatever the block size.
pub const SECTOR_SHIFT: u32 = 9;
/// 512.
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;

/// Feature bits.
pub mod features {
    /// Maximum size of a segment is in `size_max`.
    pub const SIZE_MAX: u64 = 1 << 1;
    /// Maximum number of segments in a request is in `seg_max`.
    pub const SEG_MAX: u64 = 1 << 2;
    /// Device is read-only.
    pub const RO: u64 = 1 << 5;
    /// Block size of the disk is in `blk_size`.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// Cache flush command support.
    pub const FLUSH: u64 = 1 << 9;
    /// Topology information is available.
    pub const TOPOLOGY: u64 = 1 << 10;
    /// The driver can toggle writeback/writethrough through `writeback`.
    pub const CONFIG_WCE: u64 = 1 << 11;
    /// More than one request queue.
    pub const MQ: u64 = 1 << 12;
    /// DISCARD command support.
    pub const DISCARD: u64 = 1 << 13;
    /// WRITE_ZEROES command support.
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// Request types.
pub mod req_type {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush the volatile write cache.
    pub const FLUSH: u32 = 4;
    /// Device identifier (serial), 20 bytes.
    pub const GET_ID: u32 = 8;
    /// Discard ranges.
    pub const DISCARD: u32 = 11;
    /// Write zeroes to ranges.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status values written to the last byte of a request.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// Device or driver error.
    pub const IOERR: u8 = 1;
    /// Request not supported.
    pub const UNSUPP: u8 = 2;
}

/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;

/// `flags` of a discard/write-zeroes segment: the device may deallocate.
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// The request header (`struct virtio_blk_outhdr`), little endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestHeader {
    /// Request type.
    pub type_: u32,
    /// Reserved (ioprio in legacy devices).
    pub reserved: u32,
    /// Offset in 512-byte sectors.
    pub sector: u64,
}

// SAFETY: plain old data with no padding.
unsafe impl ByteValued for RequestHeader {}

/// Size of the header.
pub const HEADER_SIZE: usize = std::mem::size_of::<RequestHeader>();

/// One range of a discard or write-zeroes request.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiscardSegment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// `WRITE_ZEROES_FLAG_UNMAP` or 0.
    pub flags: u32,
}

// SAFETY: plain old data with no padding.
unsafe impl ByteValued for DiscardSegment {}

/// Size of one discard segment.
pub const DISCARD_SEGMENT_SIZE: usize = std::mem::size_of::<DiscardSegment>();

/// Device configuration space (`struct virtio_blk_config`) up to the write-zeroes fields.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment (SIZE_MAX).
    pub size_max: u32,
    /// Most segments per request (SEG_MAX).
    pub seg_max: u32,
    /// Legacy geometry: cylinders.
    pub cylinders: u16,
    /// Legacy geometry: heads.
    pub heads: u8,
    /// Legacy geometry: sectors.
    pub sectors: u8,
    /// Logical block size (BLK_SIZE).
    pub blk_size: u32,
    /// log2(physical block / logical block).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size in blocks.
    pub min_io_size: u16,
    /// Optimal I/O size in blocks.
    pub opt_io_size: u32,
    /// 1 = writeback cache, 0 = writethrough (CONFIG_WCE).
    pub writeback: u8,
    /// Padding.
    pub unused0: u8,
    /// Number of request queues (MQ).
    pub num_queues: u16,
    /// Largest discard in sectors.
    pub max_discard_sectors: u32,
    /// Most discard segments per request.
    pub max_discard_seg: u32,
    /// Discard alignment in sectors.
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Most write-zeroes segments per request.
    pub max_write_zeroes_seg: u32,
    /// Write-zeroes may deallocate.
    pub write_zeroes_may_unmap: u8,
    /// Padding.
    pub unused1: [u8; 3],
}

// SAFETY: packed plain old data.
unsafe impl ByteValued for Config {}

/// Offset of `writeback` in the config space (the one field the driver writes).
pub const CONFIG_WRITEBACK_OFFSET: u32 = 32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_specification() {
        assert_eq!(HEADER_SIZE, 16);
        assert_eq!(DISCARD_SEGMENT_SIZE, 16);
        assert_eq!(std::mem::size_of::<Config>(), 60);
        assert_eq!(std::mem::offset_of!(Config, writeback), 32);
        assert_eq!(std::mem::offset_of!(Config, num_queues), 34);
        assert_eq!(std::mem::offset_of!(Config, max_write_zeroes_seg), 52);
    }
}
