//! The persistent form of the dirty bitmap (`--dirty-bitmap FILE`) and the checkpoint it
//! carries, so an incremental sync can follow a restart of the backend.
//!
//! A checkpoint is the image's identity (a random UUID made when the file is first
//! created, kept with the image in this file) plus a generation that both ends of a sync
//! record when it completes. The bitmap then says which blocks changed since that
//! checkpoint.
//!
//! The rule that keeps it honest (qcow2's persistent bitmaps have the same `in_use` flag):
//! the file is marked in use while the process runs and written clean only at a clean
//! exit. A file found in use (the process crashed or was killed), with a bad checksum, cut
//! short, or made for another size or granularity cannot say what changed, so the whole
//! image counts as dirty; the next incremental sync then sends everything, never too
//! little.
//!
//! Layout (little-endian): a 64-byte header (magic, version, flags, granularity, size,
//! image id, generation, header checksum), the bitmap words, and a checksum of
//! the words. Every save writes a new file and renames it over the old one, so a crash
//! during a save leaves the previous file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::dirty::{DirtyBitmap, DirtyError};

const MAGIC: [u8; 8] = *b"VHBLKDBM";
const VERSION: u32 = 1;
const FLAG_IN_USE: u32 = 1;
/// An incoming sync started on this image and did not complete.
const FLAG_INCOMPLETE: u32 = 2;
const HEADER_LEN: usize = 64;

/// Where the bitmap stands relative to what both ends of the last sync recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The image's identity.
    pub image_id: [u8; 16],
    /// Incremented by every completed sync.
    pub generation: u64,
}

impl Checkpoint {
    /// A new identity (random), generation 0.
    pub fn new_identity() -> io::Result<Self> {
        let mut image_id = [0u8; 16];
        getrandom(&mut image_id)?;
        // An RFC 4122 version 4 UUID.
        image_id[6] = (image_id[6] & 0x0f) | 0x40;
        image_id[8] = (image_id[8] & 0x3f) | 0x80;
        Ok(Self {
            image_id,
            generation: 0,
        })
    }

    /// The identity as a UUID string.
    pub fn image_uuid(&self) -> String {
        let h: Vec<String> = self.image_id.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            h[0..4].concat(),
            h[4..6].concat(),
            h[6..8].concat(),
            h[8..10].concat(),
            h[10..16].concat()
        )
    }
}

/// Fills `buf` from the kernel's random source.
pub(crate) fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: writes at most the remaining bytes of `buf`.
        let n = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), buf.len() - got, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        got += n as usize;
    }
    Ok(())
}

/// How a bitmap file was found at start-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Loaded {
    /// No file: a new identity, nothing dirty yet, and no sync to be incremental against.
    Created,
    /// Written clean at the last exit: its bits are exactly what changed since.
    Trusted,
    /// Present but not trustworthy: everything counts as dirty. Says why.
    AllDirty(String),
    /// An incoming sync started on the image and did not complete: its content is
    /// neither the old nor the new disk. Everything counts as dirty, and the image must
    /// not be served until a sync completes.
    Incomplete,
}

/// Why the bitmap file cannot be used at all.
#[derive(Debug, thiserror::Error)]
pub enum DirtyFileError {
    /// Reading or writing it failed.
    #[error("dirty bitmap file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The granularity asked for cannot be tracked.
    #[error(transparent)]
    Bitmap(#[from] DirtyError),
}

/// A bitmap file, open for the life of the process.
#[derive(Debug)]
pub struct DirtyFile {
    path: PathBuf,
}

/// What `load` says of a file with FLAG_INCOMPLETE.
const INCOMPLETE: &str = "an incoming sync did not complete";

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

struct Header {
    flags: u32,
    granularity: u64,
    size: u64,
    checkpoint: Checkpoint,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.flags.to_le_bytes());
        h[16..24].copy_from_slice(&self.granularity.to_le_bytes());
        h[24..32].copy_from_slice(&self.size.to_le_bytes());
        h[32..48].copy_from_slice(&self.checkpoint.image_id);
        h[48..56].copy_from_slice(&self.checkpoint.generation.to_le_bytes());
        // The word count follows from size and granularity; the header's own checksum.
        let sum = fnv1a(&h[..56]);
        h[56..64].copy_from_slice(&sum.to_le_bytes());
        h
    }

    fn decode(h: &[u8; HEADER_LEN]) -> Result<Self, String> {
        let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[i..i + 8]);
            u64::from_le_bytes(b)
        };
        if h[0..8] != MAGIC {
            return Err("not a dirty bitmap file (bad magic)".into());
        }
        if u32_at(8) != VERSION {
            return Err(format!(
                "format version {} (this program writes {VERSION})",
                u32_at(8)
            ));
        }
        if u64_at(56) != fnv1a(&h[..56]) {
            return Err("header checksum mismatch".into());
        }
        let mut image_id = [0u8; 16];
        image_id.copy_from_slice(&h[32..48]);
        Ok(Self {
            flags: u32_at(12),
            granularity: u64_at(16),
            size: u64_at(24),
            checkpoint: Checkpoint {
                image_id,
                generation: u64_at(48),
            },
        })
    }
}

impl DirtyFile {
    /// Opens (or creates) the bitmap file for an image of `size` bytes tracked at
    /// `granularity`, loads what it can trust into a new bitmap, and marks the file in use.
    /// Returns the file, the bitmap, the checkpoint and how the file was found.
    pub fn open(
        path: &Path,
        size: u64,
        granularity: u64,
    ) -> Result<(Self, DirtyBitmap, Checkpoint, Loaded), DirtyFileError> {
        let bitmap = DirtyBitmap::new(size, granularity)?;
        let io_err = |source| DirtyFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        let (checkpoint, loaded) = match File::open(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                (Checkpoint::new_identity().map_err(io_err)?, Loaded::Created)
            }
            Err(e) => return Err(io_err(e)),
            Ok(mut f) => {
                let mut data = Vec::new();
                f.read_to_end(&mut data).map_err(io_err)?;
                match Self::load(&data, &bitmap, size, granularity) {
                    Ok((cp, Some(why))) if why == INCOMPLETE => {
                        bitmap.mark_all();
                        (cp, Loaded::Incomplete)
                    }
                    Ok((cp, None)) => (cp, Loaded::Trusted),
                    Ok((cp, Some(why))) => {
                        bitmap.mark_all();
                        (cp, Loaded::AllDirty(why))
                    }
                    Err(why) => {
                        // Nothing usable, not even the identity: a new one, all dirty (a
                        // peer holding the old identity will then do a full sync).
                        bitmap.mark_all();
                        (
                            Checkpoint::new_identity().map_err(io_err)?,
                            Loaded::AllDirty(why),
                        )
                    }
                }
            }
        };
        let file = Self {
            path: path.to_path_buf(),
        };
        file.save_with(&bitmap, &checkpoint, true, loaded == Loaded::Incomplete)
            .map_err(io_err)?;
        Ok((file, bitmap, checkpoint, loaded))
    }

    /// Parses a file's bytes into `bitmap`. Ok((checkpoint, None)) when every bit can be
    /// trusted, Ok((checkpoint, Some(why))) when only the identity can, Err(why) when
    /// nothing can.
    fn load(
        data: &[u8],
        bitmap: &DirtyBitmap,
        size: u64,
        granularity: u64,
    ) -> Result<(Checkpoint, Option<String>), String> {
        let Some(h) = data.get(..HEADER_LEN) else {
            return Err(format!("cut short ({} bytes, no header)", data.len()));
        };
        let mut hb = [0u8; HEADER_LEN];
        hb.copy_from_slice(h);
        let header = Header::decode(&hb)?;
        let cp = header.checkpoint;
        if header.flags & FLAG_INCOMPLETE != 0 {
            return Ok((cp, Some(INCOMPLETE.into())));
        }
        if header.flags & FLAG_IN_USE != 0 {
            return Ok((
                cp,
                Some("it was in use when the backend last stopped (a crash or a kill)".into()),
            ));
        }
        if header.size != size || header.granularity != granularity {
            return Ok((
                cp,
                Some(format!(
                    "it tracks {} bytes at {} B granularity, the image now has {size} bytes at \
                     {granularity} B",
                    header.size, header.granularity
                )),
            ));
        }
        let body = &data[HEADER_LEN..];
        let words = bitmap.snapshot().len();
        if body.len() != words * 8 + 8 {
            return Ok((
                cp,
                Some(format!("cut short or padded ({} bytes)", data.len())),
            ));
        }
        let (bits, sum) = body.split_at(words * 8);
        let mut sb = [0u8; 8];
        sb.copy_from_slice(sum);
        if u64::from_le_bytes(sb) != fnv1a(bits) {
            return Ok((cp, Some("bitmap checksum mismatch".into())));
        }
        let v: Vec<u64> = bits
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                u64::from_le_bytes(b)
            })
            .collect();
        if !bitmap.merge(&v) {
            return Ok((cp, Some("word count mismatch".into())));
        }
        Ok((cp, None))
    }

    /// Writes `bitmap` and `checkpoint`, marked in use or clean, atomically (a new file
    /// renamed over the old, both synced).
    pub fn save(
        &self,
        bitmap: &DirtyBitmap,
        checkpoint: &Checkpoint,
        in_use: bool,
    ) -> io::Result<()> {
        self.save_with(bitmap, checkpoint, in_use, false)
    }

    /// [`DirtyFile::save`], also saying whether an incoming sync is unfinished.
    pub fn save_with(
        &self,
        bitmap: &DirtyBitmap,
        checkpoint: &Checkpoint,
        in_use: bool,
        incomplete: bool,
    ) -> io::Result<()> {
        let words = bitmap.snapshot();
        let mut flags = if in_use { FLAG_IN_USE } else { 0 };
        if incomplete {
            flags |= FLAG_INCOMPLETE;
        }
        let header = Header {
            flags,
            granularity: bitmap.granularity(),
            size: bitmap.size(),
            checkpoint: *checkpoint,
        };
        let mut out = Vec::with_capacity(HEADER_LEN + words.len() * 8 + 8);
        out.extend_from_slice(&header.encode());
        for w in &words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        let sum = fnv1a(&out[HEADER_LEN..]);
        out.extend_from_slice(&sum.to_le_bytes());

        let tmp = self.path.with_extension("tmp-save");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&out)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 100 * 4096 + 512;

    fn open(path: &Path) -> (DirtyFile, DirtyBitmap, Checkpoint, Loaded) {
        DirtyFile::open(path, SIZE, 4096).unwrap()
    }

    #[test]
    fn a_new_file_gets_an_identity_and_is_marked_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        let (_f, b, cp, loaded) = open(&p);
        assert_eq!(loaded, Loaded::Created);
        assert_eq!(b.count(), 0);
        assert_eq!(cp.generation, 0);
        assert_eq!(cp.image_uuid().len(), 36);
        assert_eq!(&cp.image_uuid()[14..15], "4");
        // Opening it again without a clean save: it was in use, so all dirty, same id.
        let (_f, b2, cp2, loaded2) = open(&p);
        assert!(matches!(loaded2, Loaded::AllDirty(ref why) if why.contains("in use")));
        assert_eq!(b2.count(), b2.blocks());
        assert_eq!(cp2, cp);
    }

    #[test]
    fn a_clean_save_round_trips_bits_and_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        let (f, b, mut cp, _) = open(&p);
        b.mark(4096 * 7, 3 * 4096);
        b.mark(SIZE - 1, 1);
        cp.generation = 42;
        f.save(&b, &cp, false).unwrap();
        let (_f, b2, cp2, loaded) = open(&p);
        assert_eq!(loaded, Loaded::Trusted);
        assert_eq!(cp2, cp);
        assert_eq!(b2.snapshot(), b.snapshot());
        assert_eq!(b2.count(), 4);
    }

    fn clean_file(p: &Path) -> Checkpoint {
        let (f, b, cp, _) = open(p);
        b.mark(0, 4096);
        f.save(&b, &cp, false).unwrap();
        cp
    }

    #[test]
    fn damaged_files_mean_everything_is_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        type Damage = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(&str, Damage)> = vec![
            (
                "bitmap checksum",
                Box::new(|d: &mut Vec<u8>| d[HEADER_LEN + 3] ^= 0x10),
            ),
            (
                "cut short",
                Box::new(|d: &mut Vec<u8>| d.truncate(d.len() - 5)),
            ),
            ("cut short", Box::new(|d: &mut Vec<u8>| d.push(0))),
            ("header checksum", Box::new(|d: &mut Vec<u8>| d[20] ^= 1)),
            ("magic", Box::new(|d: &mut Vec<u8>| d[0] = b'X')),
            ("no header", Box::new(|d: &mut Vec<u8>| d.truncate(10))),
        ];
        for (want, damage) in cases {
            let cp = clean_file(&p);
            let mut data = fs::read(&p).unwrap();
            damage(&mut data);
            fs::write(&p, &data).unwrap();
            let (_f, b, cp2, loaded) = open(&p);
            match loaded {
                Loaded::AllDirty(why) => assert!(why.contains(want), "{want}: {why}"),
                other => panic!("{want}: loaded {other:?}"),
            }
            assert_eq!(b.count(), b.blocks(), "{want}");
            // A damaged header cannot be trusted for the identity either.
            let header_ok = !["header checksum", "magic", "no header"].contains(&want);
            assert_eq!(cp2 == cp, header_ok, "{want}");
        }
    }

    #[test]
    fn an_unfinished_incoming_sync_stays_marked_until_saved_complete() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        let (f, b, cp, _) = open(&p);
        f.save_with(&b, &cp, false, true).unwrap();
        let (f, b, cp2, loaded) = open(&p);
        assert_eq!(loaded, Loaded::Incomplete);
        assert_eq!(cp2, cp);
        assert_eq!(b.count(), b.blocks());
        // Reopening keeps the mark (a restart does not make the image servable).
        let (f2, _, _, loaded) = open(&p);
        assert_eq!(loaded, Loaded::Incomplete);
        drop(f);
        b.clear();
        f2.save(&b, &cp, false).unwrap();
        assert_eq!(open(&p).3, Loaded::Trusted);
    }

    #[test]
    fn another_size_or_granularity_means_everything_is_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        clean_file(&p);
        let (f, b, cp, loaded) = DirtyFile::open(&p, SIZE + 4096, 4096).unwrap();
        assert!(matches!(loaded, Loaded::AllDirty(ref w) if w.contains("bytes at")));
        assert_eq!(b.count(), b.blocks());
        f.save(&b, &cp, false).unwrap();
        let (_f, b, _, loaded) = DirtyFile::open(&p, SIZE + 4096, 65536).unwrap();
        assert!(matches!(loaded, Loaded::AllDirty(_)));
        assert_eq!(b.granularity(), 65536);
    }
}
