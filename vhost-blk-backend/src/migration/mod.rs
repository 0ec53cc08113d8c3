//! Live block migration between two vhost-blk-backends (in progress).
//!
//! - [`stream`]: the frames and messages the two ends exchange;
//! - [`transport`]: where the stream goes (`tcp:`, `unix:`, `fd:`);
//! - [`image`]: reading extents from the source image and applying them to the
//!   destination's;
//! - [`source`]: a sync from the source's side (bulk pass, dirty passes, completion);
//! - [`dest`]: the destination's side (checks, applies, records the checkpoint, opens the
//!   gate that held the guest's requests).
//!
//! Dirty block tracking lives in [`crate::dirty`] and [`crate::dirty_file`]; the gate in
//! [`crate::shared::Gate`].

pub mod client;
pub mod dest;
pub mod image;
pub mod job;
pub mod source;
pub mod stream;
pub mod tls;
pub mod transport;

use std::io;

use stream::StreamError;

/// Why a sync failed (on either end).
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The connection failed or was cut.
    #[error("migration stream: {0}")]
    Io(#[from] io::Error),
    /// The peer sent something that is not a valid frame.
    #[error("migration stream: {0}")]
    Stream(#[from] StreamError),
    /// The two devices differ: nothing was written.
    #[error("the devices differ, nothing was written: {0}")]
    Mismatch(String),
    /// The peer reported an error.
    #[error("the peer says: {0}")]
    Peer(String),
    /// The peer broke the protocol (a valid frame at the wrong time).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Reading or writing the image failed.
    #[error("image: {0}")]
    Image(io::Error),
    /// The job was cancelled.
    #[error("cancelled")]
    Cancelled,
}

/// Reads whole frames off a connection, through one buffer allocated once (a frame is at
/// most a header and MAX_PAYLOAD bytes, so it always fits).
pub(crate) struct FrameReader {
    conn: transport::Conn,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

/// Room for two largest frames: reads of up to one frame's size never wait for a move.
const READ_BUF: usize = 2 * (stream::HEADER_LEN + stream::MAX_PAYLOAD as usize);

impl FrameReader {
    pub(crate) fn new(conn: transport::Conn) -> Self {
        Self {
            conn,
            buf: vec![0u8; READ_BUF],
            start: 0,
            end: 0,
            eof: false,
        }
    }

    /// Sets the read timeout of the connection (None: block).
    pub(crate) fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        self.conn.set_read_timeout(t)
    }

    /// The next frame: Ok(None) at a clean end of the stream (between frames).
    pub(crate) fn next(
        &mut self,
        dec: &mut stream::Decoder,
    ) -> Result<Option<(stream::Message, u64)>, MigrationError> {
        self.next_with(dec, |frame, seq| (frame.into_message(), seq))
    }

    /// The next frame, handed with its sequence number to `take` while it is still in
    /// this reader's buffer (a data extent's bytes are not copied out): `take`'s result,
    /// or Ok(None) at a clean end of the stream (between frames).
    pub(crate) fn next_with<R>(
        &mut self,
        dec: &mut stream::Decoder,
        take: impl FnOnce(stream::Frame<'_>, u64) -> R,
    ) -> Result<Option<R>, MigrationError> {
        use std::io::Read;
        loop {
            if let Some((frame, seq, n)) =
                dec.decode_frame(&self.buf[self.start..self.end], self.eof)?
            {
                let r = take(frame, seq);
                self.start += n;
                return Ok(Some(r));
            }
            if self.eof {
                return Ok(None);
            }
            // Less than a frame's room left at the end: move the unread bytes forward.
            if self.buf.len() - self.end < READ_BUF / 2 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let n = match self.conn.read(&mut self.buf[self.end..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            self.end += n;
            if n == 0 {
                self.eof = true;
            }
        }
    }
}
