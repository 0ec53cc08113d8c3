//! A sync from the destination's side: check the source's device against ours, take the
//! extents, make them durable, record the checkpoint. The guest's requests wait at the
//! gate (closed while `--incoming` has not completed a sync) and are served only after.
//!
//! From the moment it accepts a sync until that sync completes, the image is marked
//! incomplete (in the `--dirty-bitmap` file too, so a restart does not serve it): its
//! content is then neither the old disk nor the new one. A cut or refused stream leaves it
//! so, and the next sync (a retry) makes it whole.
//!
//! A completed sync is served only once the source confirms it got the Ack (Commit):
//! otherwise the source, which cannot tell, keeps serving, and two copies would be
//! written. After that the source keeps the connection open: if the VM stays on the
//! source after all (the VMM's migration failed after the disk was handed over), it says
//! so with an Error frame, and this end marks its copy stale (incomplete: held, and not
//! served after a restart either) and waits for the next sync.

use std::io::Write;
use std::time::Duration;

use crate::dirty_file::Checkpoint;
use crate::shared::BlkShared;

use super::image::SyncImage;
use super::source::device_config;
use super::stream::{check_extent, Decoder, Encoder, Frame, Message, Mode, EXTENT_ZERO};
use super::transport::{Conn, Listener};
use super::{FrameReader, MigrationError};

/// How long the destination waits for the next frame before it gives the sync up.
const FRAME_TIMEOUT: Duration = Duration::from_secs(60);

/// What a completed incoming sync did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// The checkpoint both ends recorded.
    pub checkpoint: Checkpoint,
    /// Full or incremental.
    pub mode: Mode,
    /// Data bytes written.
    pub data_bytes: u64,
    /// Bytes zeroed (holes punched or zeros written).
    pub zero_bytes: u64,
}

/// Takes syncs from `listener` until one completes, then opens the gate; failed ones
/// are logged and the next connection is a retry. Then watches the completed sync's
/// connection: a source that takes the disk back makes the copy stale and this end waits
/// for the next sync. Returns the completed sync once its source closed the connection
/// (normally when the source's process ends).
pub fn serve_incoming(
    shared: &BlkShared,
    listener: &mut Listener,
) -> Result<Received, MigrationError> {
    loop {
        let conn = listener.accept()?;
        match receive_watchable(shared, conn) {
            Ok((r, reader, dec)) => {
                shared.gate.open();
                log::info!(
                    "incoming {:?} sync complete (generation {}): serving",
                    r.mode,
                    r.checkpoint.generation
                );
                if !stale_after(shared, reader, dec) {
                    return Ok(r);
                }
            }
            Err(e) => {
                log::warn!("incoming sync failed ({e}); the image stays held, waiting for a retry")
            }
        }
    }
}

/// Watches a completed sync's connection; true if the source said the copy is stale
/// (then the image is marked incomplete and held).
fn stale_after(shared: &BlkShared, mut reader: FrameReader, mut dec: Decoder) -> bool {
    if let Err(e) = reader.set_read_timeout(None) {
        log::warn!("incoming: cannot watch the source after the sync: {e}");
        return false;
    }
    match reader.next(&mut dec) {
        Ok(Some((Message::Error { reason }, _))) => {
            shared.gate.close();
            mark_incomplete(shared);
            log::error!(
                "the source took the disk back ({reason}): this copy is stale; requests are \
                 held until a new sync completes"
            );
            true
        }
        Ok(None) => false,
        Ok(Some((m, _))) => {
            log::warn!("incoming: unexpected {m:?} after the sync; no longer watching");
            false
        }
        Err(e) => {
            log::info!("incoming: the source's connection ended ({e})");
            false
        }
    }
}

/// Takes one sync over `conn`, up to the source's Commit.
pub fn receive(shared: &BlkShared, conn: Conn) -> Result<Received, MigrationError> {
    receive_watchable(shared, conn).map(|(r, _, _)| r)
}

/// Takes one sync over `conn`; also returns the connection's reader and decoder.
fn receive_watchable(
    shared: &BlkShared,
    conn: Conn,
) -> Result<(Received, FrameReader, Decoder), MigrationError> {
    conn.set_read_timeout(Some(FRAME_TIMEOUT))?;
    let mut writer = conn.try_clone()?;
    let mut reader = FrameReader::new(conn);
    let mut dec = Decoder::new();
    let (hello, _) = reader.next(&mut dec)?.ok_or_else(|| {
        MigrationError::Protocol("the source closed the connection before its Hello".into())
    })?;
    let session = dec.session().unwrap_or(0);
    let mut enc = Encoder::new(session);
    let mut reply = |msg: &Message, w: &mut Conn| -> Result<u64, MigrationError> {
        let mut out = Vec::new();
        let seq = enc.encode(msg, &mut out);
        w.write_all(&out)?;
        w.flush()?;
        Ok(seq)
    };
    let refuse =
        |e: MigrationError,
         w: &mut Conn,
         reply: &mut dyn FnMut(&Message, &mut Conn) -> Result<u64, MigrationError>| {
            let _ = reply(
                &Message::Error {
                    reason: e.to_string(),
                },
                w,
            );
            e
        };
    let Message::Hello {
        mode,
        device,
        granularity: _,
        checkpoint: theirs,
    } = hello
    else {
        return Err(refuse(
            MigrationError::Protocol("the stream must start with Hello".into()),
            &mut writer,
            &mut reply,
        ));
    };
    let ours = device_config(shared);
    let diff = ours.differences(&device);
    if !diff.is_empty() {
        // Ours first, theirs second: "field: destination vs source".
        return Err(refuse(
            MigrationError::Mismatch(format!("{} (destination vs source)", diff.join(", "))),
            &mut writer,
            &mut reply,
        ));
    }
    // Incremental only from the checkpoint we hold, onto an image nobody changed since.
    let (mode, why) = {
        let st = shared.sync.lock().unwrap_or_else(|e| e.into_inner());
        let changed = shared.dirty.dirty_bytes();
        match mode {
            Mode::Full => (Mode::Full, String::new()),
            _ if st.incomplete => (
                Mode::Full,
                "an earlier incoming sync did not complete".into(),
            ),
            _ if st.checkpoint.image_id != theirs.image_id => (
                Mode::Full,
                format!(
                    "the destination holds image {}, the source {}",
                    st.checkpoint.image_uuid(),
                    theirs.image_uuid()
                ),
            ),
            _ if st.checkpoint.generation != theirs.generation => (
                Mode::Full,
                format!(
                    "the destination is at generation {}, the source at {}",
                    st.checkpoint.generation, theirs.generation
                ),
            ),
            _ if changed > 0 => (
                Mode::Full,
                format!("the destination's image changed ({changed} bytes) since the checkpoint"),
            ),
            _ => (Mode::Incremental, String::new()),
        }
    };
    let image = SyncImage::open(shared.disk.path(), shared.disk.size, true)
        .map_err(MigrationError::Image)?;
    mark_incomplete(shared);
    reply(&Message::Accept { mode, reason: why }, &mut writer)?;

    let size = shared.disk.size;
    let (mut data_bytes, mut zero_bytes) = (0u64, 0u64);
    loop {
        // A data extent is checked and written straight from the reader's buffer (a copy
        // less per byte); every other frame comes back as a message.
        let next = reader.next_with(&mut dec, |frame, seq| match frame {
            Frame::Data { offset, data } => Next::Wrote(
                check_extent(offset, data.len() as u32, size)
                    .map_err(MigrationError::Protocol)
                    .and_then(|()| image.write(offset, data).map_err(MigrationError::Image))
                    .map(|()| data.len() as u64),
            ),
            Frame::Message(m) => Next::Message(m, seq),
        })?;
        let (msg, seq) = match next {
            None => {
                return Err(MigrationError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the stream was cut before the sync completed",
                )))
            }
            Some(Next::Wrote(Ok(n))) => {
                data_bytes += n;
                continue;
            }
            Some(Next::Wrote(Err(e))) => return Err(refuse(e, &mut writer, &mut reply)),
            Some(Next::Message(m, seq)) => (m, seq),
        };
        match msg {
            Message::Extent {
                offset,
                len,
                flags,
                data,
            } => {
                if let Err(why) = check_extent(offset, len, size) {
                    return Err(refuse(
                        MigrationError::Protocol(why),
                        &mut writer,
                        &mut reply,
                    ));
                }
                let r = if flags & EXTENT_ZERO != 0 {
                    zero_bytes += u64::from(len);
                    image.zero(offset, u64::from(len))
                } else {
                    data_bytes += u64::from(len);
                    image.write(offset, &data)
                };
                if let Err(e) = r {
                    return Err(refuse(MigrationError::Image(e), &mut writer, &mut reply));
                }
            }
            Message::PassDone { pass, bytes } => {
                log::debug!("incoming pass {pass} done ({bytes} data bytes so far)");
            }
            Message::Barrier => {
                // Every extent before it is written (page cache: the Complete makes it
                // durable); the source's mirrored writes may complete.
                reply(&Message::Ack { seq }, &mut writer)?;
            }
            Message::Complete { checkpoint } => {
                if checkpoint.image_id != theirs.image_id
                    || checkpoint.generation != theirs.generation + 1
                {
                    return Err(refuse(
                        MigrationError::Protocol(format!(
                            "Complete names generation {} of image {}, expected {} of {}",
                            checkpoint.generation,
                            checkpoint.image_uuid(),
                            theirs.generation + 1,
                            theirs.image_uuid()
                        )),
                        &mut writer,
                        &mut reply,
                    ));
                }
                if let Err(e) = image.sync() {
                    return Err(refuse(MigrationError::Image(e), &mut writer, &mut reply));
                }
                record_complete(shared, checkpoint);
                reply(&Message::Ack { seq }, &mut writer)?;
                // Serve only once the source confirms it has our Ack: if it did not get
                // it, it keeps serving, and so must we not.
                match reader.next(&mut dec) {
                    Ok(Some((Message::Commit, _))) => {}
                    other => {
                        let why = match other {
                            Ok(Some((m, _))) => format!("it sent {m:?}"),
                            Ok(None) => "it closed the connection".into(),
                            Err(e) => e.to_string(),
                        };
                        mark_incomplete(shared);
                        return Err(MigrationError::Protocol(format!(
                            "the source did not confirm the hand-over ({why}): it may still \
                             serve the disk, so this end holds it until a new sync completes"
                        )));
                    }
                }
                let r = Received {
                    checkpoint,
                    mode,
                    data_bytes,
                    zero_bytes,
                };
                return Ok((r, reader, dec));
            }
            Message::Error { reason } => return Err(MigrationError::Peer(reason)),
            m => {
                return Err(refuse(
                    MigrationError::Protocol(format!("unexpected {m:?}")),
                    &mut writer,
                    &mut reply,
                ))
            }
        }
    }
}

/// What the receive loop got from the stream: a data extent it wrote, or a message.
enum Next {
    /// A data extent of this many bytes is written (or why not).
    Wrote(Result<u64, MigrationError>),
    /// Another frame, and its sequence number.
    Message(Message, u64),
}

/// The image is about to change: neither old nor new until the sync completes.
fn mark_incomplete(shared: &BlkShared) {
    let mut st = shared.sync.lock().unwrap_or_else(|e| e.into_inner());
    st.incomplete = true;
    if let Some(f) = &st.file {
        if let Err(e) = f.save_with(&shared.dirty, &st.checkpoint, true, true) {
            log::warn!("{}: marking the image incomplete: {e}", f.path().display());
        }
    }
}

/// Everything is durable: the image is the source's at `checkpoint`, with no change
/// since.
fn record_complete(shared: &BlkShared, checkpoint: Checkpoint) {
    let mut st = shared.sync.lock().unwrap_or_else(|e| e.into_inner());
    shared.dirty.clear();
    st.checkpoint = checkpoint;
    st.incomplete = false;
    if let Some(f) = &st.file {
        if let Err(e) = f.save(&shared.dirty, &checkpoint, true) {
            log::warn!("{}: saving the checkpoint: {e}", f.path().display());
        }
    }
}
