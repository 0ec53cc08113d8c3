//! The block migration stream.
//!
//! Mode byte even: the decoder over arbitrary bytes (fed whole, then in two pieces), as
//! the destination (session from the first Hello) or the source (a known session). Every
//! frame it accepts must re-encode to exactly the bytes it came from (except Error frames
//! whose reason was not UTF-8), and a frame cut short must be "need more", not an error,
//! until the stream ends.
//!
//! Mode byte odd: messages built from the input (valid or not) are encoded and decoded
//! again: a valid message comes back equal, an invalid one is refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_blk_backend::dirty_file::Checkpoint;
use vhost_blk_backend::migration::stream::{
    Decoder, DeviceConfig, Encoder, Message, Mode, EXTENT_ZERO, MAX_EXTENT,
};
use vhost_blk_backend::spec::{Config, ID_BYTES};
use vhost_fuzz::Reader;
use vm_memory::ByteValued;

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let mode = r.u8();
    if mode & 1 == 0 {
        decode(mode, r.u64(), usize::from(r.u16()), r.rest());
    } else {
        round_trip(&mut r);
    }
});

fn decoder(mode: u8, session: u64) -> Decoder {
    if mode & 2 != 0 {
        Decoder::for_session(session)
    } else {
        Decoder::new()
    }
}

fn decode(mode: u8, session: u64, cut: usize, buf: &[u8]) {
    let mut d = decoder(mode, session);
    let mut enc: Option<Encoder> = None;
    let mut pos = 0;
    while let Ok(Some((msg, seq, n))) = d.decode(&buf[pos..], true) {
        assert!(n >= 32 && n <= buf.len() - pos);
        let frame = &buf[pos..pos + n];
        let session = d.session().expect("a decoded frame sets the session");
        let e = enc.get_or_insert_with(|| Encoder::new(session));
        assert_eq!(e.next_seq(), seq);
        let mut again = Vec::new();
        e.encode(&msg, &mut again);
        let lossy =
            matches!(&msg, Message::Error { .. }) && std::str::from_utf8(&frame[32..]).is_err();
        if !lossy {
            assert_eq!(again, frame, "{msg:?} re-encodes differently");
        }
        pos += n;
    }
    // The first frame, arriving in two pieces: the first piece alone needs more bytes
    // (or is already refused, as the whole stream is), never a frame.
    let mut whole = decoder(mode, session);
    let first = whole.decode(buf, false);
    if let Ok(Some((_, _, n))) = first {
        let cut = cut % n;
        let mut d = decoder(mode, session);
        match d.decode(&buf[..cut], false) {
            Ok(None) => {}
            other => panic!("{cut} bytes of a {n}-byte frame gave {other:?}"),
        }
        assert!(d.decode(&buf[..cut], true).is_err() || cut == 0);
        assert!(matches!(d.decode(buf, false), Ok(Some((_, 0, m))) if m == n));
    }
}

/// A message from the input and whether it is valid on the wire.
fn message(r: &mut Reader) -> (Message, bool) {
    match r.u8() % 9 {
        0 => {
            let mode = if r.u8() & 1 == 0 {
                Mode::Full
            } else {
                Mode::Incremental
            };
            let read_only = r.u8() & 1 != 0;
            let serial: [u8; ID_BYTES] = r.array();
            let mut config = Config::default();
            let raw = r.bytes(std::mem::size_of::<Config>());
            config.as_mut_slice()[..raw.len()].copy_from_slice(raw);
            let granularity = r.u64();
            let checkpoint = Checkpoint {
                image_id: r.array(),
                generation: r.u64(),
            };
            (
                Message::Hello {
                    mode,
                    device: DeviceConfig {
                        config,
                        read_only,
                        serial,
                    },
                    granularity,
                    checkpoint,
                },
                granularity.is_power_of_two(),
            )
        }
        1 => {
            let mode = if r.u8() & 1 == 0 {
                Mode::Full
            } else {
                Mode::Incremental
            };
            let n = usize::from(r.u8());
            let reason = String::from_utf8_lossy(r.bytes(n)).into_owned();
            (Message::Accept { mode, reason }, true)
        }
        2 => {
            let offset = r.u64();
            let flags = u32::from(r.u8());
            let len = r.u32() % (MAX_EXTENT + 2);
            let data_len = usize::from(r.u8());
            let data = r.bytes(data_len).to_vec();
            let valid = len != 0
                && len <= MAX_EXTENT
                && offset.checked_add(u64::from(len)).is_some()
                && flags & !EXTENT_ZERO == 0
                && if flags & EXTENT_ZERO != 0 {
                    data.is_empty()
                } else {
                    data.len() == len as usize
                };
            (
                Message::Extent {
                    offset,
                    len,
                    flags,
                    data,
                },
                valid,
            )
        }
        3 => (
            Message::PassDone {
                pass: r.u32(),
                bytes: r.u64(),
            },
            true,
        ),
        4 => (
            Message::Complete {
                checkpoint: Checkpoint {
                    image_id: r.array(),
                    generation: r.u64(),
                },
            },
            true,
        ),
        5 => (Message::Ack { seq: r.u64() }, true),
        6 => (Message::Barrier, true),
        7 => (Message::Commit, true),
        _ => {
            let n = usize::from(r.u16());
            let reason = String::from_utf8_lossy(r.bytes(n)).into_owned();
            (Message::Error { reason }, true)
        }
    }
}

fn round_trip(r: &mut Reader) {
    let session = r.u64();
    let mut enc = Encoder::new(session);
    let mut dec = Decoder::for_session(session);
    for _ in 0..8 {
        if r.is_empty() {
            break;
        }
        let (msg, valid) = message(r);
        let mut buf = Vec::new();
        let seq = enc.encode(&msg, &mut buf);
        match dec.decode(&buf, true) {
            Ok(Some((got, s, n))) => {
                assert!(valid, "invalid {msg:?} decoded as {got:?}");
                assert_eq!((s, n), (seq, buf.len()));
                let want = match &msg {
                    // The encoder cuts long reasons at a character boundary.
                    Message::Error { reason } => {
                        let mut end = reason.len().min(4096);
                        while !reason.is_char_boundary(end) {
                            end -= 1;
                        }
                        format!(
                            "{:?}",
                            Message::Error {
                                reason: reason[..end].to_string()
                            }
                        )
                    }
                    m => format!("{m:?}"),
                };
                assert_eq!(format!("{got:?}"), want);
            }
            other => {
                assert!(!valid, "{msg:?} did not survive the round trip: {other:?}");
                // The decoder refused the frame; the rest of the stream cannot follow.
                return;
            }
        }
    }
}
