//! The block migration stream between two vhost-blk-backends: frames and messages, and a
//! decoder that refuses anything it was not sent by the peer it is talking to.
//!
//! Every frame has a 32-byte header (little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `VHBM` |
//! | 4..6 | stream version (1) |
//! | 6..8 | message kind |
//! | 8..16 | sequence number: 0, 1, 2, ... per direction |
//! | 16..24 | session id (random, chosen by the source in its Hello) |
//! | 24..28 | payload length (at most [`MAX_PAYLOAD`]) |
//! | 28..32 | CRC-32C of the header's first 28 bytes and the payload |
//!
//! The decoder checks them in that order, and the payload's length before it waits for
//! the payload, so a forged length cannot make it buffer more than one frame. A frame out
//! of sequence (lost, reordered or replayed), of another session, or whose checksum does
//! not match is an error, not a frame; so is a payload that does not parse exactly.
//!
//! TLS (when configured) authenticates the peer and protects the stream; the checksum
//! and the sequence catch what plain TCP, a Unix socket or a manager's tunnel would let
//! through.

use vm_memory::ByteValued;

use crate::dirty_file::Checkpoint;
use crate::spec::{Config, ID_BYTES};

/// The frame magic.
pub const MAGIC: [u8; 4] = *b"VHBM";
/// The stream version this program speaks.
pub const VERSION: u16 = 1;
/// Header bytes.
pub const HEADER_LEN: usize = 32;
/// Largest extent data in one frame.
pub const MAX_EXTENT: u32 = 1 << 20;
/// Largest payload (an extent's data plus its fields).
pub const MAX_PAYLOAD: u32 = MAX_EXTENT + 64;
/// Bytes of a data extent frame before its data: the header, then the extent's offset,
/// length and flags (see [`Encoder::seal_data_extent`]).
pub const DATA_EXTENT_PREFIX: usize = HEADER_LEN + 16;
/// Largest text (reasons) in a message.
const MAX_TEXT: usize = 4096;

/// Extent flag: the range is zeros; no data follows (the receiver punches or zeroes it).
pub const EXTENT_ZERO: u32 = 1;

/// Message kinds on the wire.
mod kind {
    pub const HELLO: u16 = 1;
    pub const ACCEPT: u16 = 2;
    pub const EXTENT: u16 = 3;
    pub const PASS_DONE: u16 = 4;
    pub const COMPLETE: u16 = 5;
    pub const ACK: u16 = 6;
    pub const ERROR: u16 = 7;
    pub const BARRIER: u16 = 8;
    pub const COMMIT: u16 = 9;
}

/// What a sync sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every block (holes and zero blocks as flags only).
    Full,
    /// Only the blocks changed since the checkpoint both ends share.
    Incremental,
}

/// The device as the guest sees it; both ends must agree on all of it.
#[derive(Clone, Copy, Debug)]
pub struct DeviceConfig {
    /// The virtio-blk config space (size, block size, topology, queues, limits, cache).
    pub config: Config,
    /// Read-only device.
    pub read_only: bool,
    /// GET_ID answer.
    pub serial: [u8; ID_BYTES],
}

impl DeviceConfig {
    /// Every field where `self` and `other` differ, as `name: ours vs theirs`; empty when
    /// they match.
    pub fn differences(&self, other: &DeviceConfig) -> Vec<String> {
        let (a, b) = (self.config, other.config);
        let mut out = Vec::new();
        macro_rules! cmp {
            ($($name:literal => $field:ident),* $(,)?) => {$(
                let (x, y) = (a.$field, b.$field);
                if x != y {
                    out.push(format!("{}: {} vs {}", $name, x, y));
                }
            )*};
        }
        cmp!(
            "size (sectors)" => capacity,
            "segment size limit" => size_max,
            "segments per request" => seg_max,
            "block size" => blk_size,
            "physical block exponent" => physical_block_exp,
            "alignment offset" => alignment_offset,
            "minimum I/O size" => min_io_size,
            "optimal I/O size" => opt_io_size,
            "write cache (writeback)" => writeback,
            "queues" => num_queues,
            "discard sectors limit" => max_discard_sectors,
            "discard segments limit" => max_discard_seg,
            "discard alignment" => discard_sector_alignment,
            "write-zeroes sectors limit" => max_write_zeroes_sectors,
            "write-zeroes segments limit" => max_write_zeroes_seg,
            "write-zeroes may unmap" => write_zeroes_may_unmap,
        );
        if self.read_only != other.read_only {
            out.push(format!(
                "read-only: {} vs {}",
                self.read_only, other.read_only
            ));
        }
        if self.serial != other.serial {
            let s = |v: &[u8; ID_BYTES]| {
                String::from_utf8_lossy(v)
                    .trim_end_matches('\0')
                    .to_string()
            };
            out.push(format!(
                "serial: {:?} vs {:?}",
                s(&self.serial),
                s(&other.serial)
            ));
        }
        out
    }
}

/// One message.
#[derive(Clone, Debug)]
pub enum Message {
    /// Source → destination, first: what is coming.
    Hello {
        /// Full or incremental.
        mode: Mode,
        /// The source's device.
        device: DeviceConfig,
        /// Dirty tracking granularity (bytes).
        granularity: u64,
        /// The checkpoint an incremental sync starts from.
        checkpoint: Checkpoint,
    },
    /// Destination → source: go ahead, in `mode`: Full where the source asked for an
    /// incremental sync the destination cannot take (`reason` says why).
    Accept {
        /// What the destination takes.
        mode: Mode,
        /// Why an incremental sync became a full one (empty otherwise).
        reason: String,
    },
    /// Source → destination: `len` bytes at `offset`, or zeros there.
    Extent {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u32,
        /// [`EXTENT_ZERO`] or 0.
        flags: u32,
        /// The bytes (empty for a zero extent).
        data: Vec<u8>,
    },
    /// Source → destination: a pass over the dirty blocks ended.
    PassDone {
        /// Pass number (0: the bulk pass).
        pass: u32,
        /// Bytes sent in it.
        bytes: u64,
    },
    /// Source → destination: the final pass is sent; record this checkpoint once
    /// everything is durable.
    Complete {
        /// The checkpoint both ends record.
        checkpoint: Checkpoint,
    },
    /// Source → destination: answer with an Ack once every extent sent before this frame
    /// is written (active mirroring: the guest's writes waiting for it may complete).
    Barrier,
    /// Source → destination, after the Ack of Complete: the source knows the
    /// destination has the disk and no longer serves it; the destination may serve.
    /// (Without it the destination cannot tell a lost Ack from a delivered one, and
    /// must not serve while the source might.)
    Commit,
    /// Destination → source: every frame up to `seq` is applied (and, after Complete,
    /// durable).
    Ack {
        /// The source's sequence number acknowledged.
        seq: u64,
    },
    /// Either way: the sync cannot go on, and why.
    Error {
        /// What went wrong.
        reason: String,
    },
}

/// A decoded frame as [`Decoder::decode_frame`] gives it: a data extent's bytes stay in
/// the caller's buffer (the destination writes them to the image from where they were
/// read, without copying them out first); every other frame is a [`Message`].
#[derive(Debug)]
pub enum Frame<'a> {
    /// A data extent: `data` at `offset` (`data` is never empty: at most
    /// [`MAX_EXTENT`] bytes).
    Data {
        /// Byte offset in the image.
        offset: u64,
        /// The bytes, in the decoded buffer.
        data: &'a [u8],
    },
    /// Any other frame, zero extents included.
    Message(Message),
}

impl Frame<'_> {
    /// The frame as an owned message (a data extent's bytes copied).
    pub fn into_message(self) -> Message {
        match self {
            Frame::Data { offset, data } => Message::Extent {
                offset,
                len: data.len() as u32,
                flags: 0,
                data: data.to_vec(),
            },
            Frame::Message(m) => m,
        }
    }
}

/// Why bytes on the stream are not an acceptable frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    /// Not a migration stream at all.
    #[error("not a vhost-blk migration stream (bad magic {0:02x?})")]
    Magic([u8; 4]),
    /// A stream version this program does not speak.
    #[error("stream version {got}, this program speaks {VERSION}: upgrade the older end")]
    Version {
        /// What the peer sent.
        got: u16,
    },
    /// A message kind this version does not have.
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    /// The payload is larger than any valid frame.
    #[error("frame of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    Oversized {
        /// Announced payload length.
        len: u32,
    },
    /// The stream ended inside a frame.
    #[error("stream cut inside a frame ({have} of {need} bytes)")]
    Truncated {
        /// Bytes there.
        have: usize,
        /// Bytes the frame needs.
        need: usize,
    },
    /// Header or payload corrupted (or forged without the key to the session).
    #[error("frame {seq} checksum mismatch (corrupted or forged)")]
    Checksum {
        /// Its sequence number.
        seq: u64,
    },
    /// A frame of an earlier sequence number (a replay or a duplicate).
    #[error("frame {got} replayed (expected {want})")]
    Replayed {
        /// Sequence number seen.
        got: u64,
        /// Sequence number expected.
        want: u64,
    },
    /// Frames are missing or out of order.
    #[error("frame {got} out of order: frames from {want} are missing")]
    OutOfOrder {
        /// Sequence number seen.
        got: u64,
        /// Sequence number expected.
        want: u64,
    },
    /// A frame of another session.
    #[error("frame of session {got:#018x} in session {want:#018x} (forged or crossed streams)")]
    Session {
        /// Session seen.
        got: u64,
        /// Session expected.
        want: u64,
    },
    /// The payload does not parse as its kind.
    #[error("malformed {kind} message: {why}")]
    Malformed {
        /// The message kind.
        kind: &'static str,
        /// What was wrong.
        why: String,
    },
}

fn kind_name(k: u16) -> &'static str {
    match k {
        kind::HELLO => "Hello",
        kind::ACCEPT => "Accept",
        kind::EXTENT => "Extent",
        kind::PASS_DONE => "PassDone",
        kind::COMPLETE => "Complete",
        kind::ACK => "Ack",
        kind::ERROR => "Error",
        kind::BARRIER => "Barrier",
        kind::COMMIT => "Commit",
        _ => "unknown",
    }
}

/// Writes frames of one direction: sequence numbers and the session id.
#[derive(Clone, Debug)]
pub struct Encoder {
    session: u64,
    next_seq: u64,
}

impl Encoder {
    /// An encoder for `session`, starting at sequence 0.
    pub fn new(session: u64) -> Self {
        Self {
            session,
            next_seq: 0,
        }
    }

    /// The sequence number the next frame gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends a data extent (`data` at `offset`) as one frame to `out`, straight from
    /// the caller's buffer; the same bytes as `encode` of the equivalent Message::Extent.
    pub fn encode_data_extent(&mut self, offset: u64, data: &[u8], out: &mut Vec<u8>) -> u64 {
        let start = out.len();
        out.resize(start + HEADER_LEN, 0);
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(data);
        self.seal(kind::EXTENT, start, out)
    }

    /// Makes `frame` a data extent frame in place: its first [`DATA_EXTENT_PREFIX`]
    /// bytes are room for the header and the extent's fields, the rest is the data (at
    /// most [`MAX_EXTENT`] bytes, at `offset`), which the caller put there, e.g. read
    /// straight from the image; the data is not copied. The same bytes as
    /// `encode_data_extent`; returns the sequence number.
    pub fn seal_data_extent(&mut self, offset: u64, frame: &mut [u8]) -> u64 {
        let len = (frame.len() - DATA_EXTENT_PREFIX) as u32;
        frame[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&offset.to_le_bytes());
        frame[HEADER_LEN + 8..HEADER_LEN + 12].copy_from_slice(&len.to_le_bytes());
        frame[HEADER_LEN + 12..DATA_EXTENT_PREFIX].copy_from_slice(&0u32.to_le_bytes());
        self.seal(kind::EXTENT, 0, frame)
    }

    /// Appends `msg` as one frame to `out`; returns its sequence number.
    pub fn encode(&mut self, msg: &Message, out: &mut Vec<u8>) -> u64 {
        let start = out.len();
        out.resize(start + HEADER_LEN, 0);
        let k = match msg {
            Message::Hello {
                mode,
                device,
                granularity,
                checkpoint,
            } => {
                out.push(mode_byte(*mode));
                out.push(u8::from(device.read_only));
                out.extend_from_slice(&device.serial);
                out.extend_from_slice(device.config.as_slice());
                out.extend_from_slice(&granularity.to_le_bytes());
                put_checkpoint(out, checkpoint);
                kind::HELLO
            }
            Message::Accept { mode, reason } => {
                out.push(mode_byte(*mode));
                put_text(out, reason);
                kind::ACCEPT
            }
            Message::Extent {
                offset,
                len,
                flags,
                data,
            } => {
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&flags.to_le_bytes());
                out.extend_from_slice(data);
                kind::EXTENT
            }
            Message::PassDone { pass, bytes } => {
                out.extend_from_slice(&pass.to_le_bytes());
                out.extend_from_slice(&bytes.to_le_bytes());
                kind::PASS_DONE
            }
            Message::Complete { checkpoint } => {
                put_checkpoint(out, checkpoint);
                kind::COMPLETE
            }
            Message::Barrier => kind::BARRIER,
            Message::Commit => kind::COMMIT,
            Message::Ack { seq } => {
                out.extend_from_slice(&seq.to_le_bytes());
                kind::ACK
            }
            Message::Error { reason } => {
                put_text(out, reason);
                kind::ERROR
            }
        };
        self.seal(k, start, out)
    }

    /// Fills in the header of the frame of kind `k` that starts at `start` in `out`.
    fn seal(&mut self, k: u16, start: usize, out: &mut [u8]) -> u64 {
        let len = (out.len() - start - HEADER_LEN) as u32;
        let seq = self.next_seq;
        self.next_seq += 1;
        let h = &mut out[start..start + HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&VERSION.to_le_bytes());
        h[6..8].copy_from_slice(&k.to_le_bytes());
        h[8..16].copy_from_slice(&seq.to_le_bytes());
        h[16..24].copy_from_slice(&self.session.to_le_bytes());
        h[24..28].copy_from_slice(&len.to_le_bytes());
        let crc = frame_crc(&out[start..start + 28], &out[start + HEADER_LEN..]);
        out[start + 28..start + 32].copy_from_slice(&crc.to_le_bytes());
        seq
    }
}

/// CRC-32C (Castagnoli, crc-fast's CRC-32/ISCSI) of the header's first 28 bytes and the
/// payload.
fn frame_crc(header28: &[u8], payload: &[u8]) -> u32 {
    let mut d = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    d.update(header28);
    d.update(payload);
    d.finalize() as u32
}

fn mode_byte(mode: Mode) -> u8 {
    match mode {
        Mode::Full => 0,
        Mode::Incremental => 1,
    }
}

/// Text, cut to MAX_TEXT bytes on a character boundary; it ends the payload.
fn put_text(out: &mut Vec<u8>, text: &str) {
    let mut end = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&text.as_bytes()[..end]);
}

fn put_checkpoint(out: &mut Vec<u8>, c: &Checkpoint) {
    out.extend_from_slice(&c.image_id);
    out.extend_from_slice(&c.generation.to_le_bytes());
}

/// Reads frames of one direction, checking sequence and session.
#[derive(Debug)]
pub struct Decoder {
    session: Option<u64>,
    next_seq: u64,
}

/// A payload reader that refuses to read past the end or to leave bytes unread.
struct Fields<'a> {
    b: &'a [u8],
    kind: &'static str,
}

impl<'a> Fields<'a> {
    fn bad(&self, why: impl Into<String>) -> StreamError {
        StreamError::Malformed {
            kind: self.kind,
            why: why.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StreamError> {
        if self.b.len() < n {
            return Err(self.bad(format!("{} bytes short", n - self.b.len())));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }

    fn u8(&mut self) -> Result<u8, StreamError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, StreamError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }

    fn u64(&mut self) -> Result<u64, StreamError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    fn mode(&mut self) -> Result<Mode, StreamError> {
        match self.u8()? {
            0 => Ok(Mode::Full),
            1 => Ok(Mode::Incremental),
            m => Err(self.bad(format!("mode {m}"))),
        }
    }

    /// The rest of the payload as text.
    fn text(&mut self) -> Result<String, StreamError> {
        let b = self.take(self.b.len())?;
        if b.len() > MAX_TEXT {
            return Err(self.bad("text too long"));
        }
        Ok(String::from_utf8_lossy(b).into_owned())
    }

    fn checkpoint(&mut self) -> Result<Checkpoint, StreamError> {
        let mut image_id = [0u8; 16];
        image_id.copy_from_slice(self.take(16)?);
        Ok(Checkpoint {
            image_id,
            generation: self.u64()?,
        })
    }

    fn end(self) -> Result<(), StreamError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(self.bad(format!("{} unexpected bytes at the end", self.b.len())))
        }
    }
}

impl Decoder {
    /// A decoder that takes the session from the first frame (the destination, which
    /// learns it from the source's Hello).
    pub fn new() -> Self {
        Self {
            session: None,
            next_seq: 0,
        }
    }

    /// A decoder for a known session (the source reading the destination's replies).
    pub fn for_session(session: u64) -> Self {
        Self {
            session: Some(session),
            next_seq: 0,
        }
    }

    /// The session, once known.
    pub fn session(&self) -> Option<u64> {
        self.session
    }

    /// Decodes the frame at the start of `buf`: Ok(None) when more bytes are needed,
    /// Ok(Some((message, sequence, frame length))) for a frame, Err for bytes that can
    /// never be a valid frame. `at_eof` says no more bytes will come (a cut stream).
    pub fn decode(
        &mut self,
        buf: &[u8],
        at_eof: bool,
    ) -> Result<Option<(Message, u64, usize)>, StreamError> {
        Ok(self
            .decode_frame(buf, at_eof)?
            .map(|(f, seq, n)| (f.into_message(), seq, n)))
    }

    /// [`Decoder::decode`], with a data extent's bytes left in `buf` ([`Frame::Data`]).
    pub fn decode_frame<'a>(
        &mut self,
        buf: &'a [u8],
        at_eof: bool,
    ) -> Result<Option<(Frame<'a>, u64, usize)>, StreamError> {
        let need_more = |need: usize| {
            if at_eof && (!buf.is_empty() || need > HEADER_LEN) {
                Err(StreamError::Truncated {
                    have: buf.len(),
                    need,
                })
            } else {
                Ok(None)
            }
        };
        // Check what has arrived of the header as soon as it is there.
        if buf.len() >= 4 && buf[0..4] != MAGIC {
            let mut m = [0u8; 4];
            m.copy_from_slice(&buf[0..4]);
            return Err(StreamError::Magic(m));
        }
        if buf.len() < HEADER_LEN {
            return if buf.is_empty() && at_eof {
                Ok(None)
            } else {
                need_more(HEADER_LEN)
            };
        }
        let u16_at = |i: usize| u16::from_le_bytes([buf[i], buf[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&buf[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let version = u16_at(4);
        if version != VERSION {
            return Err(StreamError::Version { got: version });
        }
        let k = u16_at(6);
        if kind_name(k) == "unknown" {
            return Err(StreamError::UnknownKind(k));
        }
        let len = u32_at(24);
        if len > MAX_PAYLOAD {
            return Err(StreamError::Oversized { len });
        }
        let total = HEADER_LEN + len as usize;
        if buf.len() < total {
            return need_more(total);
        }
        let seq = u64_at(8);
        let payload = &buf[HEADER_LEN..total];
        if u32_at(28) != frame_crc(&buf[0..28], payload) {
            return Err(StreamError::Checksum { seq });
        }
        let session = u64_at(16);
        match self.session {
            Some(want) if want != session => {
                return Err(StreamError::Session { got: session, want })
            }
            _ => {}
        }
        if seq < self.next_seq {
            return Err(StreamError::Replayed {
                got: seq,
                want: self.next_seq,
            });
        }
        if seq > self.next_seq {
            return Err(StreamError::OutOfOrder {
                got: seq,
                want: self.next_seq,
            });
        }
        let msg = Self::parse_frame(k, payload)?;
        if self.session.is_none() && !matches!(msg, Frame::Message(Message::Hello { .. })) {
            return Err(StreamError::Malformed {
                kind: kind_name(k),
                why: "the stream must start with Hello".into(),
            });
        }
        self.session = Some(session);
        self.next_seq += 1;
        Ok(Some((msg, seq, total)))
    }

    /// An extent frame (its data borrowed from `payload`), or [`Decoder::parse`]'s
    /// message.
    fn parse_frame(k: u16, payload: &[u8]) -> Result<Frame<'_>, StreamError> {
        if k != kind::EXTENT {
            return Self::parse(k, payload).map(Frame::Message);
        }
        let mut f = Fields {
            b: payload,
            kind: kind_name(k),
        };
        let offset = f.u64()?;
        let len = f.u32()?;
        let flags = f.u32()?;
        if len == 0 || len > MAX_EXTENT {
            return Err(f.bad(format!("length {len}")));
        }
        if flags & !EXTENT_ZERO != 0 {
            return Err(f.bad(format!("unknown flags {flags:#x}")));
        }
        if offset.checked_add(u64::from(len)).is_none() {
            return Err(f.bad(format!("range {offset}+{len} overflows")));
        }
        let frame = if flags & EXTENT_ZERO != 0 {
            Frame::Message(Message::Extent {
                offset,
                len,
                flags,
                data: Vec::new(),
            })
        } else {
            Frame::Data {
                offset,
                data: f.take(len as usize)?,
            }
        };
        f.end()?;
        Ok(frame)
    }

    /// Every message but an extent (see [`Decoder::parse_frame`]).
    fn parse(k: u16, payload: &[u8]) -> Result<Message, StreamError> {
        let mut f = Fields {
            b: payload,
            kind: kind_name(k),
        };
        let msg = match k {
            kind::HELLO => {
                let mode = f.mode()?;
                let read_only = match f.u8()? {
                    0 => false,
                    1 => true,
                    r => return Err(f.bad(format!("read-only flag {r}"))),
                };
                let mut serial = [0u8; ID_BYTES];
                serial.copy_from_slice(f.take(ID_BYTES)?);
                let mut config = Config::default();
                config
                    .as_mut_slice()
                    .copy_from_slice(f.take(std::mem::size_of::<Config>())?);
                let granularity = f.u64()?;
                if !granularity.is_power_of_two() {
                    return Err(f.bad(format!("granularity {granularity}")));
                }
                let checkpoint = f.checkpoint()?;
                Message::Hello {
                    mode,
                    device: DeviceConfig {
                        config,
                        read_only,
                        serial,
                    },
                    granularity,
                    checkpoint,
                }
            }
            kind::ACCEPT => Message::Accept {
                mode: f.mode()?,
                reason: f.text()?,
            },
            kind::PASS_DONE => Message::PassDone {
                pass: f.u32()?,
                bytes: f.u64()?,
            },
            kind::COMPLETE => Message::Complete {
                checkpoint: f.checkpoint()?,
            },
            kind::ACK => Message::Ack { seq: f.u64()? },
            kind::BARRIER => Message::Barrier,
            kind::COMMIT => Message::Commit,
            kind::ERROR => Message::Error { reason: f.text()? },
            _ => return Err(StreamError::UnknownKind(k)),
        };
        f.end()?;
        Ok(msg)
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

/// Checks an extent against the device it lands on: inside it, on sector boundaries.
pub fn check_extent(offset: u64, len: u32, size: u64) -> Result<(), String> {
    let Some(end) = offset.checked_add(u64::from(len)) else {
        return Err(format!("extent {offset}+{len} overflows"));
    };
    // Only the disk's last extent may end off a sector boundary (a size that is not one).
    if !offset.is_multiple_of(512) || (!len.is_multiple_of(512) && end != size) {
        return Err(format!("extent {offset}+{len} is not on sector boundaries"));
    }
    if end > size {
        return Err(format!(
            "extent {offset}+{len} ends past the end of the disk ({size} bytes)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SESSION: u64 = 0x1234_5678_9abc_def0;

    fn device() -> DeviceConfig {
        let mut serial = [0u8; ID_BYTES];
        serial[..4].copy_from_slice(b"disk");
        DeviceConfig {
            config: Config {
                capacity: 2048,
                seg_max: 254,
                blk_size: 512,
                min_io_size: 1,
                writeback: 1,
                num_queues: 2,
                max_discard_sectors: 1 << 22,
                max_discard_seg: 32,
                discard_sector_alignment: 1,
                max_write_zeroes_sectors: 1 << 22,
                max_write_zeroes_seg: 32,
                write_zeroes_may_unmap: 1,
                ..Default::default()
            },
            read_only: false,
            serial,
        }
    }

    fn checkpoint() -> Checkpoint {
        Checkpoint {
            image_id: [7; 16],
            generation: 3,
        }
    }

    fn hello() -> Message {
        Message::Hello {
            mode: Mode::Incremental,
            device: device(),
            granularity: 4096,
            checkpoint: checkpoint(),
        }
    }

    fn all_messages() -> Vec<Message> {
        vec![
            hello(),
            Message::Accept {
                mode: Mode::Full,
                reason: "the destination changed since".into(),
            },
            Message::Extent {
                offset: 4096,
                len: 8,
                flags: 0,
                data: (1..=8).collect(),
            },
            Message::Extent {
                offset: 1 << 20,
                len: 65536,
                flags: EXTENT_ZERO,
                data: Vec::new(),
            },
            Message::PassDone { pass: 2, bytes: 99 },
            Message::Barrier,
            Message::Commit,
            Message::Complete {
                checkpoint: checkpoint(),
            },
            Message::Ack { seq: 41 },
            Message::Error {
                reason: "disk full".into(),
            },
        ]
    }

    fn stream(msgs: &[Message]) -> Vec<u8> {
        let mut e = Encoder::new(SESSION);
        let mut out = Vec::new();
        for m in msgs {
            e.encode(m, &mut out);
        }
        out
    }

    fn decode_all(buf: &[u8]) -> Result<Vec<Message>, StreamError> {
        let mut d = Decoder::new();
        let mut at = 0;
        let mut out = Vec::new();
        while let Some((m, seq, n)) = d.decode(&buf[at..], true)? {
            assert_eq!(seq, out.len() as u64);
            out.push(m);
            at += n;
        }
        Ok(out)
    }

    #[test]
    fn the_frame_checksum_is_crc32c_of_header_then_payload() {
        // The CRC-32C check value (RFC 3720), split anywhere.
        assert_eq!(frame_crc(b"1234", b"56789"), 0xe306_9283);
        assert_eq!(frame_crc(b"", b"123456789"), 0xe306_9283);
        assert_eq!(frame_crc(b"", b""), 0);
    }

    #[test]
    fn every_message_round_trips() {
        let msgs = all_messages();
        let got = decode_all(&stream(&msgs)).unwrap();
        assert_eq!(format!("{got:?}"), format!("{msgs:?}"));
    }

    #[test]
    fn a_data_extent_encodes_the_same_bytes_either_way() {
        let data: Vec<u8> = (0..=255).collect();
        let (mut a, mut b) = (Encoder::new(SESSION), Encoder::new(SESSION));
        let (mut x, mut y) = (Vec::new(), Vec::new());
        a.encode_data_extent(4096, &data, &mut x);
        b.encode(
            &Message::Extent {
                offset: 4096,
                len: 256,
                flags: 0,
                data: data.clone(),
            },
            &mut y,
        );
        assert_eq!(x, y);
        // Sealed in place, after a first frame: the same bytes, the next sequence number.
        let mut frame = vec![0xeeu8; DATA_EXTENT_PREFIX];
        frame.extend_from_slice(&data);
        a.encode(&Message::Barrier, &mut x);
        b.encode(&Message::Barrier, &mut y);
        assert_eq!(a.seal_data_extent(8192, &mut frame), 2);
        b.encode_data_extent(8192, &data, &mut y);
        assert_eq!(&y[x.len()..], &frame[..]);
    }

    #[test]
    fn a_data_extent_decodes_in_place_and_everything_else_as_messages() {
        let msgs = all_messages();
        let buf = stream(&msgs);
        let mut d = Decoder::new();
        let (mut at, mut data_frames) = (0, 0);
        while let Some((f, _, n)) = d.decode_frame(&buf[at..], true).unwrap() {
            match f {
                Frame::Data { offset, data } => {
                    data_frames += 1;
                    assert_eq!((offset, data), (4096, &(1..=8).collect::<Vec<u8>>()[..]));
                    // The bytes are the frame's own, in the decoded buffer.
                    let frame = buf[at..at + n].as_ptr_range();
                    assert!(frame.contains(&data.as_ptr()));
                }
                Frame::Message(Message::Extent { flags, data, .. }) => {
                    assert_eq!((flags, data.len()), (EXTENT_ZERO, 0));
                }
                Frame::Message(_) => {}
            }
            at += n;
        }
        assert_eq!((at, data_frames), (buf.len(), 1));
    }

    #[test]
    fn a_frame_arriving_in_pieces_is_decoded_once_whole() {
        let buf = stream(&all_messages()[..3]);
        let mut d = Decoder::new();
        let mut at = 0;
        let mut frames = 0;
        let mut have = 0;
        // Feed one byte more each time: never an error, and each frame exactly once.
        while at < buf.len() {
            have = (have + 1).min(buf.len());
            match d.decode(&buf[at..have], false).unwrap() {
                None => {}
                Some((_, _, n)) => {
                    at += n;
                    frames += 1;
                }
            }
        }
        assert_eq!(frames, 3);
    }

    #[test]
    fn a_stream_cut_anywhere_is_truncated_not_a_frame() {
        let buf = stream(&all_messages()[..3]);
        let first = HEADER_LEN + buf[24] as usize + ((buf[25] as usize) << 8);
        for cut in 1..first {
            let mut d = Decoder::new();
            match d.decode(&buf[..cut], true) {
                Err(StreamError::Truncated { have, need }) => {
                    assert_eq!(have, cut);
                    assert!(need > cut);
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        let mut d = Decoder::new();
        assert!(
            matches!(d.decode(&[], true), Ok(None)),
            "a clean end between frames"
        );
    }

    #[test]
    fn reordered_replayed_and_missing_frames_are_refused() {
        let msgs = all_messages();
        let mut e = Encoder::new(SESSION);
        let frames: Vec<Vec<u8>> = msgs
            .iter()
            .map(|m| {
                let mut v = Vec::new();
                e.encode(m, &mut v);
                v
            })
            .collect();
        let mut d = Decoder::new();
        d.decode(&frames[0], false).unwrap().unwrap();
        d.decode(&frames[1], false).unwrap().unwrap();
        assert_eq!(
            d.decode(&frames[1], false).unwrap_err(),
            StreamError::Replayed { got: 1, want: 2 }
        );
        assert_eq!(
            d.decode(&frames[3], false).unwrap_err(),
            StreamError::OutOfOrder { got: 3, want: 2 }
        );
        // The refused frames changed nothing: the right one is still taken.
        assert!(d.decode(&frames[2], false).unwrap().is_some());
    }

    #[test]
    fn forged_and_corrupted_frames_are_refused() {
        let good = stream(&all_messages()[..3]);
        let first = decode_all(&good[..]).unwrap().len();
        assert_eq!(first, 3);
        // Any single flipped bit anywhere in the frames is caught.
        for i in 0..good.len() {
            for bit in [0, 3, 7] {
                let mut bad = good.clone();
                bad[i] ^= 1 << bit;
                assert!(decode_all(&bad).is_err(), "flipped bit {bit} of byte {i}");
            }
        }
        // A frame of another session, with a valid checksum (crossed streams, or forged
        // by someone who knows the format but not the session).
        let mut d = Decoder::for_session(SESSION);
        let mut e = Encoder::new(SESSION ^ 1);
        let mut f = Vec::new();
        e.encode(
            &Message::Accept {
                mode: Mode::Incremental,
                reason: String::new(),
            },
            &mut f,
        );
        assert_eq!(
            d.decode(&f, false).unwrap_err(),
            StreamError::Session {
                got: SESSION ^ 1,
                want: SESSION
            }
        );
        // A destination takes the session from the Hello, and only from a Hello.
        let mut d = Decoder::new();
        let mut e = Encoder::new(SESSION);
        let mut f = Vec::new();
        e.encode(&Message::Ack { seq: 0 }, &mut f);
        assert!(matches!(
            d.decode(&f, false),
            Err(StreamError::Malformed { why, .. }) if why.contains("start with Hello")
        ));
    }

    /// Re-encodes a frame's header checksum after tampering with it, as a forger would.
    fn reseal(frame: &mut [u8]) {
        let crc = frame_crc(&frame[..28], &frame[HEADER_LEN..]);
        frame[28..32].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn oversized_frames_are_refused_before_their_payload_arrives() {
        let mut f = stream(&[hello()]);
        f[24..28].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        // Only the header is there: refused at once, nothing buffered waiting.
        assert_eq!(
            Decoder::new().decode(&f[..HEADER_LEN], false).unwrap_err(),
            StreamError::Oversized {
                len: MAX_PAYLOAD + 1
            }
        );
    }

    #[test]
    fn malformed_payloads_are_refused_with_the_reason() {
        type Damage = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(Message, Damage, &str)> = vec![
            (hello(), Box::new(|f| f[HEADER_LEN] = 9), "mode 9"),
            (
                hello(),
                Box::new(|f| f[HEADER_LEN + 1] = 2),
                "read-only flag 2",
            ),
            (
                hello(),
                Box::new(|f| {
                    f.pop();
                }),
                "bytes short",
            ),
            (hello(), Box::new(|f| f.push(0)), "unexpected bytes"),
            (
                Message::Extent {
                    offset: 0,
                    len: 4,
                    flags: 0,
                    data: vec![1, 2, 3, 4],
                },
                Box::new(|f| f[HEADER_LEN + 8] = 5), // len 5, 4 bytes of data
                "bytes short",
            ),
            (
                Message::Extent {
                    offset: 0,
                    len: 4,
                    flags: 0,
                    data: vec![1, 2, 3, 4],
                },
                Box::new(|f| f[HEADER_LEN + 12] = 2), // an unknown flag
                "unknown flags",
            ),
            (
                Message::Extent {
                    offset: u64::MAX - 1,
                    len: 4,
                    flags: 0,
                    data: vec![0; 4],
                },
                Box::new(|_| {}),
                "overflows",
            ),
            (
                Message::Extent {
                    offset: 0,
                    len: 4,
                    flags: EXTENT_ZERO,
                    data: vec![],
                },
                Box::new(|f| {
                    f[HEADER_LEN + 8..HEADER_LEN + 12].copy_from_slice(&0u32.to_le_bytes())
                }),
                "length 0",
            ),
            (
                Message::Barrier,
                Box::new(|f| f.push(1)),
                "1 unexpected bytes at the end",
            ),
        ];
        for (msg, damage, want) in cases {
            // A good Hello first so the decoder knows the session, the damaged frame
            // second (a damaged Hello is the first frame itself).
            let is_hello = matches!(msg, Message::Hello { .. });
            let mut e = Encoder::new(SESSION);
            let mut first = Vec::new();
            if !is_hello {
                e.encode(&hello(), &mut first);
            }
            let mut f = Vec::new();
            e.encode(&msg, &mut f);
            damage(&mut f);
            let len = (f.len() - HEADER_LEN) as u32;
            f[24..28].copy_from_slice(&len.to_le_bytes());
            reseal(&mut f);
            let mut d = Decoder::new();
            if !is_hello {
                d.decode(&first, false).unwrap().unwrap();
            }
            match d.decode(&f, true) {
                Err(StreamError::Malformed { why, .. }) => assert!(why.contains(want), "{why}"),
                other => panic!("{want}: {other:?}"),
            }
        }
    }

    #[test]
    fn versions_and_kinds_this_program_does_not_know_are_refused() {
        let mut f = stream(&[hello()]);
        f[4..6].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(
            Decoder::new().decode(&f, false).unwrap_err(),
            StreamError::Version { got: 2 }
        );
        let mut f = stream(&[hello()]);
        f[6..8].copy_from_slice(&99u16.to_le_bytes());
        assert_eq!(
            Decoder::new().decode(&f, false).unwrap_err(),
            StreamError::UnknownKind(99)
        );
        assert_eq!(
            Decoder::new()
                .decode(b"GET / HTTP/1.1\r\n", false)
                .unwrap_err(),
            StreamError::Magic(*b"GET ")
        );
    }

    #[test]
    fn a_device_mismatch_names_every_field_that_differs() {
        let a = device();
        assert!(a.differences(&a).is_empty());
        let mut b = a;
        b.config.capacity = 4096;
        b.config.blk_size = 4096;
        b.config.writeback = 0;
        b.config.num_queues = 1;
        b.read_only = true;
        b.serial[0] = b'D';
        let d = a.differences(&b);
        assert_eq!(
            d,
            vec![
                "size (sectors): 2048 vs 4096",
                "block size: 512 vs 4096",
                "write cache (writeback): 1 vs 0",
                "queues: 2 vs 1",
                "read-only: false vs true",
                "serial: \"disk\" vs \"Disk\"",
            ]
        );
    }

    #[test]
    fn extents_must_land_inside_the_disk_on_sector_boundaries() {
        assert!(check_extent(0, 4096, 1 << 20).is_ok());
        assert!(check_extent((1 << 20) - 512, 512, 1 << 20).is_ok());
        assert!(check_extent(100, 512, 1 << 20).is_err());
        assert!(check_extent(0, 100, 1 << 20).is_err());
        assert!(check_extent((1 << 20) - 512, 1024, 1 << 20).is_err());
    }

    /// Random bytes, and random damage to a valid stream: never a panic, never a frame
    /// from garbage (Firecracker's parse_random_requests in spirit).
    #[test]
    fn random_input_never_panics() {
        let valid = stream(&all_messages());
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2000 {
            let n = (next() % 300) as usize;
            let junk: Vec<u8> = (0..n).map(|_| next() as u8).collect();
            let _ = decode_all(&junk);
            let mut bad = valid.clone();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % bad.len();
                bad[i] = next() as u8;
            }
            let _ = decode_all(&bad);
        }
    }
}
