//! A sync from the source's side: the handshake, a bulk pass over the whole image (full
//! mode), passes over the blocks dirtied meanwhile, and the completion that both ends
//! record as the new checkpoint.
//!
//! The caller drives the phases (the migration job, or a test): it repeats dirty passes
//! until what is left fits its downtime, makes the guest's I/O stop (the VMM pauses the
//! VM), then calls [`Source::complete`], whose last pass finds the bitmap final.
//!
//! Whatever fails, no change is forgotten: the blocks this sync took from the dirty
//! bitmap go back into it (all of them after a failed full sync), so the next sync, to
//! this peer or another, still sends them.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::dirty::DirtyBitmap;
use crate::dirty_file::Checkpoint;
use crate::shared::BlkShared;

use super::image::{is_zero, Content, SyncImage};
use super::stream::{
    Decoder, DeviceConfig, Encoder, Message, Mode, DATA_EXTENT_PREFIX, EXTENT_ZERO, MAX_EXTENT,
};
use super::transport::Conn;
use super::{FrameReader, MigrationError};

/// What a sync sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Data bytes sent in extents (zero extents not counted).
    pub data_bytes: u64,
    /// Bytes sent as zero extents (flags only, no data on the wire).
    pub zero_bytes: u64,
    /// Extent frames.
    pub extents: u64,
    /// Everything written to the connection (headers included).
    pub wire_bytes: u64,
    /// Passes done (the bulk pass counts).
    pub passes: u32,
    /// Rounds of active mirroring (write-blocking mode).
    pub mirror_rounds: u64,
}

/// Paces a sync to a bandwidth limit (changeable while it runs) and counts its progress.
#[derive(Debug)]
pub struct Pacer {
    rate: AtomicU64,
    wire: AtomicU64,
    covered: AtomicU64,
    window: Mutex<(Instant, u64)>,
}

impl Pacer {
    /// A pacer at `rate` bytes per second (0: unlimited).
    pub fn new(rate: u64) -> Self {
        Self {
            rate: AtomicU64::new(rate),
            wire: AtomicU64::new(0),
            covered: AtomicU64::new(0),
            window: Mutex::new((Instant::now(), 0)),
        }
    }

    /// The limit (0: none).
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Changes the limit from now on.
    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        *w = (Instant::now(), self.wire.load(Ordering::Relaxed));
    }

    /// Image bytes covered so far (data and zero extents).
    pub fn sent(&self) -> u64 {
        self.covered.load(Ordering::Relaxed)
    }

    fn covered(&self, n: u64) {
        self.covered.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` bytes went on the wire: how long to wait to stay within the limit.
    fn wrote(&self, n: u64) -> Option<Duration> {
        let total = self.wire.fetch_add(n, Ordering::Relaxed) + n;
        let rate = self.rate();
        if rate == 0 {
            return None;
        }
        let (start, base) = *self.window.lock().unwrap_or_else(|e| e.into_inner());
        let due = Duration::from_secs_f64(total.saturating_sub(base) as f64 / rate as f64);
        due.checked_sub(start.elapsed())
    }
}

/// The device as the stream describes it.
pub fn device_config(shared: &BlkShared) -> DeviceConfig {
    DeviceConfig {
        config: shared.config(),
        read_only: shared.disk.read_only,
        serial: shared.serial,
    }
}

/// The unit of zero detection: runs of all-zero blocks of this size travel as flags.
const UNIT: usize = 4096;

/// Pieces at least this large that are data throughout are sent from where they were
/// read ([`Source::send_piece`]); smaller ones are copied into the output buffer, where
/// many of them share one write to the connection.
const IN_PLACE_MIN: usize = 128 << 10;

/// Whether any [`UNIT`] of `data` is all zeros (the last one may be short).
fn has_zero_block(data: &[u8]) -> bool {
    data.chunks(UNIT).any(is_zero)
}

/// A sync in progress, source side.
pub struct Source<'a> {
    shared: &'a BlkShared,
    conn: Conn,
    reader: FrameReader,
    enc: Encoder,
    dec: Decoder,
    image: SyncImage,
    /// Blocks taken from the dirty bitmap by this sync (given back if it fails).
    taken: DirtyBitmap,
    full: bool,
    done: bool,
    checkpoint: Checkpoint,
    out: Vec<u8>,
    /// A data extent frame: the image is read into it after its header's room, and it
    /// goes to the connection as it is (see [`Source::send_piece`]).
    frame: Vec<u8>,
    pacer: Option<Arc<Pacer>>,
    cancel: Option<Arc<AtomicBool>>,
    /// What was sent so far.
    pub stats: SyncStats,
}

impl<'a> Source<'a> {
    /// Says Hello over `conn` and waits for the destination's answer. An incremental
    /// sync the destination cannot take becomes a full one (logged with its reason).
    pub fn start(shared: &'a BlkShared, conn: Conn, mode: Mode) -> Result<Self, MigrationError> {
        let checkpoint = shared
            .sync
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .checkpoint;
        let mut session = [0u8; 8];
        crate::dirty_file::getrandom(&mut session)?;
        let session = u64::from_le_bytes(session);
        let reader = FrameReader::new(conn.try_clone()?);
        conn.set_read_timeout(Some(Duration::from_secs(60)))?;
        let image = SyncImage::open(shared.disk.path(), shared.disk.size, false)
            .map_err(MigrationError::Image)?;
        let dirty = &shared.dirty;
        let mut s = Self {
            shared,
            conn,
            reader,
            enc: Encoder::new(session),
            dec: Decoder::for_session(session),
            image,
            taken: DirtyBitmap::new(dirty.size(), dirty.granularity())
                .map_err(|e| MigrationError::Protocol(e.to_string()))?,
            full: mode == Mode::Full,
            done: false,
            checkpoint,
            out: Vec::with_capacity(4 << 20),
            frame: vec![0u8; DATA_EXTENT_PREFIX + MAX_EXTENT as usize],
            pacer: None,
            cancel: None,
            stats: SyncStats::default(),
        };
        s.send(&Message::Hello {
            mode,
            device: device_config(shared),
            granularity: dirty.granularity(),
            checkpoint,
        })?;
        s.flush()?;
        match s.recv()? {
            Message::Accept {
                mode: Mode::Full,
                reason,
            } => {
                if mode == Mode::Incremental {
                    log::warn!("incremental sync not possible ({reason}): doing a full one");
                }
                s.full = true;
            }
            Message::Accept { .. } => {}
            Message::Error { reason } => return Err(MigrationError::Peer(reason)),
            m => {
                return Err(MigrationError::Protocol(format!(
                    "expected Accept, got {m:?}"
                )))
            }
        }
        if s.full {
            // Changes from now on are the next passes' work; the bulk pass sends the rest.
            // (Given back in full if this sync fails.)
            dirty.clear();
        }
        Ok(s)
    }

    /// Paces the sync and counts its progress in `pacer`; stops it (Cancelled) when
    /// `cancel` is set.
    pub fn set_pacer(&mut self, pacer: Arc<Pacer>, cancel: Arc<AtomicBool>) {
        self.pacer = Some(pacer);
        self.cancel = Some(cancel);
    }

    /// Whether this sync sends everything.
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// The whole image, in order: holes and zero blocks as flags, data as it is.
    ///
    /// Holes are skipped with SEEK_DATA, asked at every piece: where there is data it
    /// answers at once, and a hole inside a piece reads as zeros, which travel as flags
    /// all the same. (SEEK_HOLE would find where the data ends, but on an image that is
    /// data throughout it walks the whole file: 15 ms a GiB of tmpfs, 3 % of a copy.)
    pub fn bulk_pass(&mut self) -> Result<(), MigrationError> {
        let size = self.image.size();
        let mut at = 0u64;
        while at < size {
            let data = self.image.next_data(at);
            if data > at {
                self.send_zeros(at, data - at)?;
                at = data;
                continue;
            }
            let end = (at + u64::from(MAX_EXTENT)).min(size);
            self.send_range(at, end - at)?;
            at = end;
        }
        self.pass_done()
    }

    /// One pass over the blocks dirtied since the last: returns the bytes it covered.
    pub fn dirty_pass(&mut self) -> Result<u64, MigrationError> {
        let covered = self.send_dirty()?;
        self.pass_done()?;
        Ok(covered)
    }

    /// One round of active mirroring: the blocks dirtied since the last round, then a
    /// Barrier the destination acknowledges once they are written. Returns the bytes
    /// it covered.
    pub fn mirror_round(&mut self) -> Result<u64, MigrationError> {
        let covered = self.send_dirty()?;
        self.stats.mirror_rounds += 1;
        self.barrier()?;
        Ok(covered)
    }

    /// Sends every dirty block (taken from the bitmap before it is read).
    fn send_dirty(&mut self) -> Result<u64, MigrationError> {
        let dirty = self.shared.dirty.clone();
        let g = dirty.granularity();
        let per_take = (u64::from(MAX_EXTENT) / g).max(1);
        let mut from = 0;
        let mut covered = 0;
        while let Some((first, count)) = dirty.take(from, per_take) {
            // Taken before it is read (the dirty module's ordering rule).
            self.taken.mark(first * g, count * g);
            let start = first * g;
            let len = (count * g).min(self.image.size() - start);
            self.send_range(start, len)?;
            covered += len;
            from = first + count;
        }
        Ok(covered)
    }

    /// Waits until the destination has written every extent sent so far (active
    /// mirroring: the writes those extents carry may then complete to the guest).
    pub fn barrier(&mut self) -> Result<(), MigrationError> {
        let seq = self.send(&Message::Barrier)?;
        self.flush()?;
        match self.recv()? {
            Message::Ack { seq: s } if s == seq => Ok(()),
            Message::Error { reason } => Err(MigrationError::Peer(reason)),
            m => Err(MigrationError::Protocol(format!(
                "expected the Ack of Barrier {seq}, got {m:?}"
            ))),
        }
    }

    /// Bytes the next dirty pass would cover now.
    pub fn dirty_bytes(&self) -> u64 {
        self.shared.dirty.dirty_bytes()
    }

    /// The last pass (the caller has stopped the guest's I/O), then Complete; returns
    /// the new checkpoint once the destination says everything is durable, and records
    /// it on this end.
    pub fn complete(self) -> Result<(Checkpoint, SyncStats), MigrationError> {
        let (c, stats, _) = self.complete_with_lease()?;
        Ok((c, stats))
    }

    /// [`Source::complete`], keeping the connection open: the returned lease can tell
    /// the destination later that its copy is stale (the VM stayed here after all).
    /// Dropping the lease closes the connection; the destination then keeps serving.
    pub fn complete_with_lease(mut self) -> Result<(Checkpoint, SyncStats, Lease), MigrationError> {
        self.dirty_pass()?;
        let next = Checkpoint {
            image_id: self.checkpoint.image_id,
            generation: self.checkpoint.generation + 1,
        };
        let seq = self.send(&Message::Complete { checkpoint: next })?;
        self.flush()?;
        match self.recv()? {
            Message::Ack { seq: s } if s == seq => {}
            Message::Error { reason } => return Err(MigrationError::Peer(reason)),
            m => return Err(MigrationError::Protocol(format!("expected Ack, got {m:?}"))),
        }
        // Both ends hold the same image now: record the checkpoint.
        let shared = self.shared;
        let mut st = shared.sync.lock().unwrap_or_else(|e| e.into_inner());
        st.checkpoint = next;
        if let Some(f) = &st.file {
            if let Err(e) = f.save(&shared.dirty, &next, true) {
                log::warn!("{}: saving the checkpoint: {e}", f.path().display());
            }
        }
        drop(st);
        // The destination holds until it hears that we have its Ack.
        self.send(&Message::Commit)?;
        self.flush()?;
        let lease = Lease {
            conn: self.conn.try_clone()?,
            enc: self.enc.clone(),
        };
        self.done = true;
        Ok((next, self.stats, lease))
    }

    /// Sends `[offset, offset + len)`: read in extents of at most MAX_EXTENT, and within
    /// each, runs of all-zero 4 KiB blocks as zero flags, the rest as data.
    fn send_range(&mut self, offset: u64, len: u64) -> Result<(), MigrationError> {
        let mut at = 0;
        while at < len {
            let n = (len - at).min(u64::from(MAX_EXTENT)) as usize;
            let mut frame = std::mem::take(&mut self.frame);
            let r = self.send_piece(offset + at, &mut frame[..DATA_EXTENT_PREFIX + n]);
            self.frame = frame;
            r?;
            at += n as u64;
        }
        Ok(())
    }

    /// Reads the image at `offset` into `frame` after its [`DATA_EXTENT_PREFIX`] and
    /// sends it. A large piece of data without a zero block, the bulk pass's usual case,
    /// is sealed as one extent frame where it was read and written to the connection as
    /// it is: the data is copied once (page cache to `frame`) before the socket's own
    /// copy, not a second time into the output buffer. Anything else goes through
    /// [`Source::send_runs`].
    fn send_piece(&mut self, offset: u64, frame: &mut [u8]) -> Result<(), MigrationError> {
        let data = &mut frame[DATA_EXTENT_PREFIX..];
        let n = data.len();
        match self.image.read(offset, data) {
            Err(e) => Err(MigrationError::Image(e)),
            Ok(Content::Zero) => self.send_zeros(offset, n as u64),
            Ok(Content::Data) if n >= IN_PLACE_MIN && !has_zero_block(data) => {
                self.stats.data_bytes += n as u64;
                self.stats.extents += 1;
                if let Some(p) = &self.pacer {
                    p.covered(n as u64);
                }
                self.enc.seal_data_extent(offset, frame);
                // The frames queued before it go first: sequence numbers are in order.
                self.flush()?;
                self.write_wire(frame)
            }
            Ok(Content::Data) => self.send_runs(offset, &frame[DATA_EXTENT_PREFIX..]),
        }
    }

    /// Sends `data` (read at `offset`) as alternating runs of data and zero blocks.
    fn send_runs(&mut self, offset: u64, data: &[u8]) -> Result<(), MigrationError> {
        let mut start = 0;
        while start < data.len() {
            let zero = is_zero(&data[start..(start + UNIT).min(data.len())]);
            let mut end = (start + UNIT).min(data.len());
            while end < data.len() && is_zero(&data[end..(end + UNIT).min(data.len())]) == zero {
                end = (end + UNIT).min(data.len());
            }
            let at = offset + start as u64;
            if zero {
                self.send_zeros(at, (end - start) as u64)?;
            } else {
                self.stats.data_bytes += (end - start) as u64;
                self.stats.extents += 1;
                if let Some(p) = &self.pacer {
                    p.covered((end - start) as u64);
                }
                self.enc
                    .encode_data_extent(at, &data[start..end], &mut self.out);
                if self.out.len() >= 2 << 20 {
                    self.flush()?;
                }
            }
            start = end;
        }
        Ok(())
    }

    fn send_zeros(&mut self, offset: u64, len: u64) -> Result<(), MigrationError> {
        let mut at = 0;
        while at < len {
            let n = (len - at).min(u64::from(MAX_EXTENT));
            self.stats.zero_bytes += n;
            self.stats.extents += 1;
            if let Some(p) = &self.pacer {
                p.covered(n);
            }
            self.send(&Message::Extent {
                offset: offset + at,
                len: n as u32,
                flags: EXTENT_ZERO,
                data: Vec::new(),
            })?;
            at += n;
        }
        Ok(())
    }

    fn pass_done(&mut self) -> Result<(), MigrationError> {
        let pass = self.stats.passes;
        self.stats.passes += 1;
        self.send(&Message::PassDone {
            pass,
            bytes: self.stats.data_bytes,
        })?;
        self.flush()
    }

    fn send(&mut self, msg: &Message) -> Result<u64, MigrationError> {
        let seq = self.enc.encode(msg, &mut self.out);
        if self.out.len() >= 2 << 20 {
            self.flush()?;
        }
        Ok(seq)
    }

    fn flush(&mut self) -> Result<(), MigrationError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        let r = self.write_wire(&out);
        self.out = out;
        self.out.clear();
        r
    }

    /// Writes whole frames to the connection: counted, paced, and cancellable.
    fn write_wire(&mut self, bytes: &[u8]) -> Result<(), MigrationError> {
        let r = self.conn.write_all(bytes).and_then(|()| self.conn.flush());
        let n = bytes.len() as u64;
        self.stats.wire_bytes += n;
        let cancelled = || {
            self.cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Acquire))
        };
        if let Some(wait) = self.pacer.as_ref().and_then(|p| p.wrote(n)) {
            // In slices, so a cancel does not wait for the whole pause.
            let until = Instant::now() + wait;
            while !cancelled() {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::sleep(left.min(Duration::from_millis(100)));
            }
        }
        if cancelled() {
            return Err(MigrationError::Cancelled);
        }
        if let Err(e) = r {
            // The destination may have said why before it hung up.
            if let Ok(Some((Message::Error { reason }, _))) = self.reader.next(&mut self.dec) {
                return Err(MigrationError::Peer(reason));
            }
            return Err(e.into());
        }
        Ok(())
    }

    fn recv(&mut self) -> Result<Message, MigrationError> {
        match self.reader.next(&mut self.dec)? {
            Some((m, _)) => Ok(m),
            None => Err(MigrationError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the destination closed the connection",
            ))),
        }
    }
}

/// The connection of a completed sync, kept by the source after the hand-over.
pub struct Lease {
    conn: Conn,
    enc: Encoder,
}

impl Lease {
    /// Tells the destination that its copy is stale (an Error frame after Complete),
    /// then closes the connection.
    pub fn revoke(mut self, why: &str) {
        let mut out = Vec::new();
        self.enc.encode(
            &Message::Error {
                reason: why.to_string(),
            },
            &mut out,
        );
        if let Err(e) = self.conn.write_all(&out).and_then(|()| self.conn.flush()) {
            log::warn!("could not tell the destination its copy is stale: {e}");
        } else {
            log::info!("told the destination its copy is stale ({why})");
        }
        self.conn.shutdown();
    }
}

impl Drop for Source<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Failed or abandoned: the changes it took are not on any peer for sure.
        if self.full {
            self.shared.dirty.mark_all();
        } else {
            self.shared.dirty.merge(&self.taken.snapshot());
        }
        let _ = self.conn.write_all(&{
            let mut v = Vec::new();
            self.enc.encode(
                &Message::Error {
                    reason: "the source abandoned the sync".into(),
                },
                &mut v,
            );
            v
        });
        self.conn.shutdown();
    }
}
