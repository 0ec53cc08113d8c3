//! The smallest NBD client that writes ("fixed newstyle" negotiation, simple replies, one
//! request at a time), for the incremental writes of `bench compare migrate`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::compare::CompareError;

/// How long the server may take to answer (the same bound as a QMP command's).
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

// NBD protocol constants (the NBD protocol document, "fixed newstyle" negotiation).
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const OPT_EXPORT_NAME: u32 = 1;
const FLAG_READ_ONLY: u16 = 1 << 1;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

/// Checks the server's first 18 bytes (magic, IHAVEOPT, handshake flags) and returns the
/// handshake flags.
pub(super) fn parse_nbd_greeting(b: &[u8; 18]) -> Result<u16, String> {
    let magic = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    let opt = u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
    let flags = u16::from_be_bytes([b[16], b[17]]);
    if magic != NBDMAGIC || opt != IHAVEOPT {
        return Err("not a newstyle NBD server".into());
    }
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err("NBD server without fixed newstyle negotiation".into());
    }
    Ok(flags)
}

/// Checks a simple reply to request `cookie`.
pub(super) fn parse_nbd_reply(b: &[u8; 16], cookie: u64) -> Result<(), String> {
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let err = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
    let got = u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(format!("bad NBD reply magic {magic:#x}"));
    }
    if got != cookie {
        return Err(format!("NBD reply to {got}, expected {cookie}"));
    }
    if err != 0 {
        return Err(format!("NBD error {err}"));
    }
    Ok(())
}

/// The smallest NBD client that writes: the incremental writes go through the source
/// daemon's export of the source node, so the node's dirty bitmap records them exactly as
/// it would a guest's (writing the file behind the daemon's back would not be seen).
/// One request at a time; the writes are not timed.
pub(super) struct NbdClient {
    s: UnixStream,
    cookie: u64,
}

impl NbdClient {
    pub(super) fn connect(path: &Path, export: &str, size: u64) -> Result<Self, CompareError> {
        let nbd_err = |e: String| CompareError::Run(format!("NBD {}: {e}", path.display()));
        let mut s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(REPLY_TIMEOUT))?;
        let mut g = [0u8; 18];
        s.read_exact(&mut g)?;
        let flags = parse_nbd_greeting(&g).map_err(nbd_err)?;
        let no_zeroes = flags & FLAG_NO_ZEROES != 0;
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE)
            | if no_zeroes {
                u32::from(FLAG_NO_ZEROES)
            } else {
                0
            };
        let mut m = client_flags.to_be_bytes().to_vec();
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        m.extend_from_slice(&(export.len() as u32).to_be_bytes());
        m.extend_from_slice(export.as_bytes());
        s.write_all(&m)?;
        let mut info = [0u8; 10];
        s.read_exact(&mut info)?;
        if !no_zeroes {
            let mut zeroes = [0u8; 124];
            s.read_exact(&mut zeroes)?;
        }
        let got = u64::from_be_bytes([
            info[0], info[1], info[2], info[3], info[4], info[5], info[6], info[7],
        ]);
        let tflags = u16::from_be_bytes([info[8], info[9]]);
        if got != size {
            return Err(nbd_err(format!("export is {got} bytes, expected {size}")));
        }
        if tflags & FLAG_READ_ONLY != 0 {
            return Err(nbd_err("export is read-only".into()));
        }
        Ok(NbdClient { s, cookie: 0 })
    }

    pub(super) fn request(&mut self, cmd: u16, off: u64, data: &[u8]) -> Result<(), CompareError> {
        self.cookie += 1;
        let mut h = Vec::with_capacity(28);
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&cmd.to_be_bytes());
        h.extend_from_slice(&self.cookie.to_be_bytes());
        h.extend_from_slice(&off.to_be_bytes());
        h.extend_from_slice(&(data.len() as u32).to_be_bytes());
        self.s.write_all(&h)?;
        self.s.write_all(data)?;
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r)?;
        parse_nbd_reply(&r, self.cookie).map_err(CompareError::Run)
    }

    pub(super) fn write(&mut self, off: u64, data: &[u8]) -> Result<(), CompareError> {
        self.request(CMD_WRITE, off, data)
    }

    pub(super) fn flush(&mut self) -> Result<(), CompareError> {
        self.request(CMD_FLUSH, 0, &[])
    }

    /// Sends NBD_CMD_DISC (which has no reply) and closes.
    pub(super) fn disconnect(mut self) {
        let mut h = Vec::with_capacity(28);
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&CMD_DISC.to_be_bytes());
        h.extend_from_slice(&[0u8; 20]);
        let _ = self.s.write_all(&h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_greeting_and_reply() {
        let mut g = [0u8; 18];
        g[..8].copy_from_slice(b"NBDMAGIC");
        g[8..16].copy_from_slice(b"IHAVEOPT");
        g[17] = 3;
        assert_eq!(parse_nbd_greeting(&g), Ok(3));
        g[17] = 2;
        assert!(parse_nbd_greeting(&g).is_err());
        g[0] = 0;
        assert!(parse_nbd_greeting(&g).is_err());

        let mut r = [0u8; 16];
        r[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        r[8..].copy_from_slice(&7u64.to_be_bytes());
        assert_eq!(parse_nbd_reply(&r, 7), Ok(()));
        assert!(parse_nbd_reply(&r, 8).is_err());
        r[7] = 5;
        assert!(parse_nbd_reply(&r, 7).is_err());
    }
}
