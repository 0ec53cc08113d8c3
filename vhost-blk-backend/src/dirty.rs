//! Dirty block tracking: which blocks of the image changed since the last sync, for block
//! migration (a dirty pass copies them; an incremental sync sends only them).
//!
//! One bit per `granularity` bytes (a power of two, 512 B to 64 MiB), in atomic words, so
//! the data path marks without a lock: one `fetch_or` per 64 blocks touched.
//!
//! The invariant the copier relies on: a request's bits are set *after* it completes
//! (the worker marks when the kernel reports the write done), and the copier clears a
//! block's bit *before* it reads the block ([`DirtyBitmap::take`]). A write that lands
//! after the clear sets the bit again, so the next pass copies the block again; no
//! completed write can fall between the two and be lost.

use std::sync::atomic::{AtomicU64, Ordering};

/// Smallest and largest granularity accepted.
pub const MIN_GRANULARITY: u64 = 512;
/// See [`MIN_GRANULARITY`].
pub const MAX_GRANULARITY: u64 = 64 << 20;
/// The default: a guest's 4 KiB write dirties exactly what it wrote.
pub const DEFAULT_GRANULARITY: u64 = 4096;

/// Why a bitmap cannot be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DirtyError {
    /// Not a power of two in range.
    #[error(
        "dirty granularity {0} must be a power of two between {MIN_GRANULARITY} and \
         {MAX_GRANULARITY} bytes"
    )]
    Granularity(u64),
}

/// Whether `granularity` can be tracked: a power of two in range.
pub fn check_granularity(granularity: u64) -> Result<(), DirtyError> {
    if granularity.is_power_of_two() && (MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity) {
        Ok(())
    } else {
        Err(DirtyError::Granularity(granularity))
    }
}

/// A dirty-block bitmap over `size` bytes.
#[derive(Debug)]
pub struct DirtyBitmap {
    shift: u32,
    size: u64,
    blocks: u64,
    words: Box<[AtomicU64]>,
}

impl DirtyBitmap {
    /// A clean bitmap over `size` bytes at `granularity`.
    pub fn new(size: u64, granularity: u64) -> Result<Self, DirtyError> {
        check_granularity(granularity)?;
        Ok(Self::build(size, granularity.trailing_zeros()))
    }

    /// A clean bitmap over `size` bytes at [`DEFAULT_GRANULARITY`].
    pub fn at_default_granularity(size: u64) -> Self {
        Self::build(size, DEFAULT_GRANULARITY.trailing_zeros())
    }

    fn build(size: u64, shift: u32) -> Self {
        let blocks = size.div_ceil(1 << shift);
        Self {
            shift,
            size,
            blocks,
            words: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    /// Bytes of memory a bitmap over `size` bytes at `granularity` takes.
    pub fn cost(size: u64, granularity: u64) -> u64 {
        size.div_ceil(granularity.max(1)).div_ceil(64) * 8
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        1 << self.shift
    }

    /// Bytes covered.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of blocks (bits).
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The byte range of block `block` (the last block may be short).
    pub fn block_range(&self, block: u64) -> (u64, u64) {
        let start = block << self.shift;
        (
            start,
            self.granularity().min(self.size.saturating_sub(start)),
        )
    }

    /// Marks every block that `[offset, offset + len)` touches (clipped to the size).
    /// Called after the write, discard or write-zeroes completed.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        let first = offset >> self.shift;
        let last = (end - 1) >> self.shift;
        self.update_bits(first, last, |w, m| {
            w.fetch_or(m, Ordering::Release);
        });
    }

    /// Marks everything dirty (a bitmap that cannot be trusted, a full sync).
    pub fn mark_all(&self) {
        if self.blocks > 0 {
            self.update_bits(0, self.blocks - 1, |w, m| {
                w.fetch_or(m, Ordering::Release);
            });
        }
    }

    /// Clears everything.
    pub fn clear(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::Release);
        }
    }

    /// Whether block `block` is dirty.
    pub fn is_dirty(&self, block: u64) -> bool {
        block < self.blocks
            && self.words[(block / 64) as usize].load(Ordering::Acquire) & (1 << (block % 64)) != 0
    }

    /// Number of dirty blocks.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Bytes the dirty blocks cover (the last block counted by its real length).
    pub fn dirty_bytes(&self) -> u64 {
        let mut n = self.count() * self.granularity();
        if self.blocks > 0 && self.is_dirty(self.blocks - 1) {
            n -= self.granularity() - self.block_range(self.blocks - 1).1;
        }
        n
    }

    /// The first dirty block at or after `from`, without clearing it.
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        let mut block = from;
        while block < self.blocks {
            let word = self.words[(block / 64) as usize].load(Ordering::Acquire) >> (block % 64);
            if word != 0 {
                let found = block + u64::from(word.trailing_zeros());
                return (found < self.blocks).then_some(found);
            }
            block = (block / 64 + 1) * 64;
        }
        None
    }

    /// Clears and returns the run of dirty blocks starting at the first dirty block at or
    /// after `from`, at most `max` blocks long: `(first, count)`. The copier calls this
    /// *before* it reads the blocks (see the module comment for why that order).
    pub fn take(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let first = self.next_dirty(from)?;
        let mut count = 0u64;
        while count < max.max(1) && first + count < self.blocks {
            let block = first + count;
            let bit = 1u64 << (block % 64);
            let prev = self.words[(block / 64) as usize].fetch_and(!bit, Ordering::AcqRel);
            if prev & bit == 0 {
                break;
            }
            count += 1;
        }
        // A concurrent take may have cleared `first` between next_dirty and here.
        if count == 0 {
            return self.take(first + 1, max);
        }
        Some((first, count))
    }

    /// A copy of the words (for saving).
    pub fn snapshot(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    /// ORs saved words in (bits past the end are ignored). False when the word count
    /// does not match this bitmap's.
    pub fn merge(&self, words: &[u64]) -> bool {
        if words.len() != self.words.len() {
            return false;
        }
        let tail = self.blocks % 64;
        for (i, (w, &v)) in self.words.iter().zip(words).enumerate() {
            let v = if i + 1 == self.words.len() && tail != 0 {
                v & ((1u64 << tail) - 1)
            } else {
                v
            };
            w.fetch_or(v, Ordering::Release);
        }
        true
    }

    /// Applies `f(word, mask)` to the words covering blocks `first..=last`.
    fn update_bits(&self, first: u64, last: u64, f: impl Fn(&AtomicU64, u64)) {
        let (fw, lw) = (first / 64, last / 64);
        for wi in fw..=lw {
            let lo = if wi == fw { first % 64 } else { 0 };
            let hi = if wi == lw { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            f(&self.words[wi as usize], mask);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn granularity_must_be_a_power_of_two_in_range() {
        assert!(DirtyBitmap::new(1 << 20, 4096).is_ok());
        for g in [0, 256, 3000, 128 << 20] {
            assert_eq!(
                DirtyBitmap::new(1 << 20, g).err(),
                Some(DirtyError::Granularity(g))
            );
        }
    }

    #[test]
    fn cost_is_32_mib_per_tib_at_4k() {
        assert_eq!(DirtyBitmap::cost(1 << 40, 4096), 32 << 20);
    }

    #[test]
    fn mark_sets_exactly_the_touched_blocks() {
        let b = DirtyBitmap::new(1 << 20, 4096).unwrap();
        b.mark(4095, 2); // blocks 0 and 1
        b.mark(64 * 4096, 4096 * 65); // blocks 64..=128
        b.mark(1 << 20, 4096); // past the end: nothing
        b.mark(100, 0); // empty: nothing
        let dirty: Vec<u64> = (0..b.blocks()).filter(|&i| b.is_dirty(i)).collect();
        let want: Vec<u64> = [0, 1].into_iter().chain(64..=128).collect();
        assert_eq!(dirty, want);
        assert_eq!(b.count(), 67);
    }

    #[test]
    fn a_short_last_block_is_counted_by_its_length() {
        let b = DirtyBitmap::new(10_000, 4096).unwrap(); // 3 blocks, last one 1808 bytes
        assert_eq!(b.blocks(), 3);
        b.mark(9_000, 5_000);
        assert_eq!(b.block_range(2), (8192, 1808));
        assert_eq!(b.dirty_bytes(), 1808);
        b.mark_all();
        assert_eq!(b.count(), 3);
        assert_eq!(b.dirty_bytes(), 10_000);
    }

    #[test]
    fn take_clears_runs_in_order() {
        let b = DirtyBitmap::new(1 << 20, 4096).unwrap();
        b.mark(2 * 4096, 3 * 4096); // 2,3,4
        b.mark(70 * 4096, 4096); // 70
        assert_eq!(b.take(0, 2), Some((2, 2)));
        assert_eq!(b.take(0, 16), Some((4, 1)));
        assert_eq!(b.take(0, 16), Some((70, 1)));
        assert_eq!(b.take(0, 16), None);
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn snapshot_and_merge_round_trip() {
        let b = DirtyBitmap::new(100 * 4096 + 7, 4096).unwrap();
        b.mark(5 * 4096, 4096);
        b.mark(100 * 4096, 1);
        let c = DirtyBitmap::new(100 * 4096 + 7, 4096).unwrap();
        assert!(c.merge(&b.snapshot()));
        assert_eq!(c.snapshot(), b.snapshot());
        assert!(!c.merge(&[0]));
        // Bits past the end in saved words are ignored.
        let d = DirtyBitmap::new(3 * 4096, 4096).unwrap();
        assert!(d.merge(&[u64::MAX]));
        assert_eq!(d.count(), 3);
    }

    /// The ordering rule in its simplest form: a block marked after the copier took it
    /// is dirty again, so the next pass copies it.
    #[test]
    fn a_mark_after_take_makes_the_block_dirty_again() {
        let b = DirtyBitmap::new(16 * 4096, 4096).unwrap();
        b.mark(3 * 4096, 4096);
        assert_eq!(b.take(0, 16), Some((3, 1)));
        assert!(!b.is_dirty(3));
        b.mark(3 * 4096, 4096); // a write completing while the copier read block 3
        assert_eq!(b.take(0, 16), Some((3, 1)));
    }

    /// The invariant under concurrency: the writer sets a block's bit after its write
    /// completes, the copier clears it before it reads; once writes stop and the bitmap is
    /// clean, the copy holds the last version of every block. (A clear that is not one
    /// atomic read-modify-write loses concurrent marks and fails this most runs.)
    #[test]
    fn the_copy_converges_to_the_last_write_of_every_block() {
        const BLOCKS: u64 = 128;
        let b = Arc::new(DirtyBitmap::new(BLOCKS * 4096, 4096).unwrap());
        let image: Arc<Vec<AtomicU64>> = Arc::new((0..BLOCKS).map(|_| AtomicU64::new(0)).collect());
        let writer = {
            let (b, image) = (b.clone(), image.clone());
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64;
                for version in 1..=200_000u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let block = x % BLOCKS;
                    image[block as usize].store(version, Ordering::Release); // the write
                                                                             // The time between the kernel's write and the worker's completion.
                    for _ in 0..64 {
                        std::hint::spin_loop();
                    }
                    b.mark(block * 4096, 4096); // ... then its completion marks it
                }
            })
        };
        let mut copy = vec![0u64; BLOCKS as usize];
        let pass = |copy: &mut Vec<u64>| {
            let mut from = 0;
            while let Some((first, n)) = b.take(from, 8) {
                for blk in first..first + n {
                    copy[blk as usize] = image[blk as usize].load(Ordering::Acquire);
                }
                from = first + n;
            }
        };
        while !writer.is_finished() {
            pass(&mut copy);
        }
        writer.join().unwrap();
        pass(&mut copy);
        assert_eq!(b.count(), 0);
        let want: Vec<u64> = image.iter().map(|v| v.load(Ordering::Acquire)).collect();
        assert_eq!(copy, want);
    }
}
