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
//! [`crate::device::Gate`].

pub mod client;
pub mod dest;
pub mod image;
pub mod job;
pub mod source;
pub mod stream;
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

/// Reads whole frames off a connection.
pub(crate) struct FrameReader {
    conn: transport::Conn,
    buf: Vec<u8>,
    start: usize,
    eof: bool,
}

impl FrameReader {
    pub(crate) fn new(conn: transport::Conn) -> Self {
        Self {
            conn,
            buf: Vec::with_capacity(2 << 20),
            start: 0,
            eof: false,
        }
    }

    /// The next frame: Ok(None) at a clean end of the stream (between frames).
    pub(crate) fn next(
        &mut self,
        dec: &mut stream::Decoder,
    ) -> Result<Option<(stream::Message, u64)>, MigrationError> {
        use std::io::Read;
        loop {
            if let Some((msg, seq, n)) = dec.decode(&self.buf[self.start..], self.eof)? {
                self.start += n;
                return Ok(Some((msg, seq)));
            }
            if self.eof {
                return Ok(None);
            }
            // Keep the buffer from growing: move the unread bytes to the front.
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let have = self.buf.len();
            self.buf.resize(have + (256 << 10), 0);
            let n = match self.conn.read(&mut self.buf[have..]) {
                Ok(n) => n,
                Err(e) => {
                    self.buf.truncate(have);
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e.into());
                }
            };
            self.buf.truncate(have + n);
            if n == 0 {
                self.eof = true;
            }
        }
    }
}
