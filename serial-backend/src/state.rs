//! The console's state for the VMM's migration (vhost-user DEVICE_STATE): what a
//! destination serial-backend needs to carry on where the source stopped, without asking
//! the driver to announce its ports again and without losing buffered bytes.
//!
//! Per port: whether the driver made it ready and opened it, what the guest last heard
//! of the host side, the console size, the guest's output this backend still holds (the
//! console backlog and spilled chains, not yet written to the host side), and the host's
//! input read but not yet delivered to the guest; plus the control messages not yet
//! delivered. The host side itself (sockets, ptys, files) does not move: the destination
//! has its own, and tells the guest where it differs.
//!
//! Wire format (little-endian): magic `VHCS`, version u16, port count u32, control
//! message count u32; per port: id u32, flags u8 (ready, open, host-open-sent,
//! document-active), cols u16, rows u16, held-output length u32 and bytes, pending-input
//! length u32 and bytes; per control message: length u32 and bytes. It comes from the
//! VMM, so [`decode`] checks every count and length against the limits below.

/// First bytes of a saved console state.
pub const MAGIC: [u8; 4] = *b"VHCS";
/// The format this program writes and reads.
pub const VERSION: u16 = 1;
/// Most ports a state may describe (virtio-console's own limit is far below).
pub const MAX_PORTS: u32 = 4096;
/// Most bytes buffered one way on one port.
pub const MAX_PORT_BYTES: u32 = 4 << 20;
/// Most undelivered control messages, and the largest one (a port name).
pub const MAX_CONTROL: u32 = 4096;
/// See [`MAX_CONTROL`].
pub const MAX_CONTROL_BYTES: u32 = 4096;

const READY: u8 = 1;
const OPEN: u8 = 2;
const HOST_OPEN_SENT: u8 = 4;
const DOC_ACTIVE: u8 = 8;

/// One port's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortState {
    /// Port id.
    pub id: u32,
    /// The driver sent PORT_READY.
    pub guest_ready: bool,
    /// The guest has the port open.
    pub guest_open: bool,
    /// What the guest last heard of the host side (PORT_OPEN).
    pub host_open_sent: bool,
    /// Hostinfo: a document is being delivered.
    pub doc_active: bool,
    /// Console size (cols, rows).
    pub size: (u16, u16),
    /// Guest output not yet written to the host side.
    pub held_output: Vec<u8>,
    /// Host input not yet delivered to the guest.
    pub pending_input: Vec<u8>,
}

/// The whole console's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsoleState {
    /// The ports, in the backend's order.
    pub ports: Vec<PortState>,
    /// Control messages for the guest not yet delivered.
    pub control: Vec<Vec<u8>>,
}

/// Why bytes are not a console state this program takes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// Not a console state.
    #[error("not a serial-backend console state (magic {0:02x?})")]
    Magic([u8; 4]),
    /// Another format version.
    #[error("console state version {0}, this program reads {VERSION}")]
    Version(u16),
    /// Cut short.
    #[error("the console state ends early (at byte {0})")]
    Truncated(usize),
    /// A count or length over its limit.
    #[error("console state: {what} {got} is over the limit of {max}")]
    TooLarge {
        /// Which field.
        what: &'static str,
        /// Its value.
        got: u32,
        /// The limit.
        max: u32,
    },
    /// Bytes after the end.
    #[error("console state: {0} unexpected bytes at the end")]
    Trailing(usize),
    /// Unknown flag bits.
    #[error("console state: port {id} has unknown flags {flags:#x}")]
    Flags {
        /// The port.
        id: u32,
        /// Its flags.
        flags: u8,
    },
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// The state as bytes.
pub fn encode(state: &ConsoleState) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(state.ports.len() as u32).to_le_bytes());
    out.extend_from_slice(&(state.control.len() as u32).to_le_bytes());
    for p in &state.ports {
        out.extend_from_slice(&p.id.to_le_bytes());
        let flags = [
            (p.guest_ready, READY),
            (p.guest_open, OPEN),
            (p.host_open_sent, HOST_OPEN_SENT),
            (p.doc_active, DOC_ACTIVE),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |f, (_, bit)| f | bit);
        out.push(flags);
        out.extend_from_slice(&p.size.0.to_le_bytes());
        out.extend_from_slice(&p.size.1.to_le_bytes());
        put_bytes(&mut out, &p.held_output);
        put_bytes(&mut out, &p.pending_input);
    }
    for m in &state.control {
        put_bytes(&mut out, m);
    }
    out
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(StateError::Truncated(self.b.len()))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, StateError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, StateError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn limited(&mut self, what: &'static str, max: u32) -> Result<u32, StateError> {
        let got = self.u32()?;
        if got > max {
            return Err(StateError::TooLarge { what, got, max });
        }
        Ok(got)
    }

    fn bytes(&mut self, what: &'static str, max: u32) -> Result<Vec<u8>, StateError> {
        let n = self.limited(what, max)?;
        Ok(self.take(n as usize)?.to_vec())
    }
}

/// Reads a state [`encode`] wrote; anything else is refused with the reason.
pub fn decode(bytes: &[u8]) -> Result<ConsoleState, StateError> {
    let mut r = Reader { b: bytes, at: 0 };
    let mut magic = [0u8; 4];
    magic.copy_from_slice(r.take(4)?);
    if magic != MAGIC {
        return Err(StateError::Magic(magic));
    }
    let version = r.u16()?;
    if version != VERSION {
        return Err(StateError::Version(version));
    }
    let ports = r.limited("port count", MAX_PORTS)?;
    let controls = r.limited("control message count", MAX_CONTROL)?;
    let mut state = ConsoleState::default();
    for _ in 0..ports {
        let id = r.u32()?;
        let flags = r.u8()?;
        if flags & !(READY | OPEN | HOST_OPEN_SENT | DOC_ACTIVE) != 0 {
            return Err(StateError::Flags { id, flags });
        }
        let size = (r.u16()?, r.u16()?);
        state.ports.push(PortState {
            id,
            guest_ready: flags & READY != 0,
            guest_open: flags & OPEN != 0,
            host_open_sent: flags & HOST_OPEN_SENT != 0,
            doc_active: flags & DOC_ACTIVE != 0,
            size,
            held_output: r.bytes("held output length", MAX_PORT_BYTES)?,
            pending_input: r.bytes("pending input length", MAX_PORT_BYTES)?,
        });
    }
    for _ in 0..controls {
        state
            .control
            .push(r.bytes("control message length", MAX_CONTROL_BYTES)?);
    }
    if r.at != bytes.len() {
        return Err(StateError::Trailing(bytes.len() - r.at));
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ConsoleState {
        ConsoleState {
            ports: vec![
                PortState {
                    id: 0,
                    guest_ready: true,
                    guest_open: true,
                    host_open_sent: true,
                    doc_active: false,
                    size: (80, 25),
                    held_output: b"login: ".to_vec(),
                    pending_input: Vec::new(),
                },
                PortState {
                    id: 3,
                    guest_ready: true,
                    guest_open: false,
                    host_open_sent: false,
                    doc_active: true,
                    size: (0, 0),
                    held_output: Vec::new(),
                    pending_input: vec![7; 1000],
                },
            ],
            control: vec![vec![3, 0, 0, 0, 6, 0, 1, 0]],
        }
    }

    #[test]
    fn a_state_round_trips() {
        let s = sample();
        assert_eq!(decode(&encode(&s)), Ok(s));
        assert_eq!(
            decode(&encode(&ConsoleState::default())),
            Ok(ConsoleState::default())
        );
    }

    #[test]
    fn damaged_states_are_refused_with_the_reason() {
        let good = encode(&sample());
        // Cut anywhere: truncated, never a panic or a partial state.
        for n in 0..good.len() {
            assert!(decode(&good[..n]).is_err(), "cut at {n}");
        }
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(decode(&b), Err(StateError::Magic(_))));
        let mut b = good.clone();
        b[4] = 9;
        assert_eq!(decode(&b), Err(StateError::Version(9)));
        let mut b = good.clone();
        b.push(0);
        assert_eq!(decode(&b), Err(StateError::Trailing(1)));
        // Flags of the first port (after magic, version, two counts and its id).
        let mut b = good.clone();
        b[4 + 2 + 4 + 4 + 4] = 0x80;
        assert_eq!(decode(&b), Err(StateError::Flags { id: 0, flags: 0x80 }));
        // A huge length is refused before anything is allocated for it.
        let mut b = good.clone();
        let at = 4 + 2 + 4 + 4 + 4 + 1 + 4;
        b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&b),
            Err(StateError::TooLarge {
                what: "held output length",
                ..
            })
        ));
        let mut b = good;
        b[6..10].copy_from_slice(&(MAX_PORTS + 1).to_le_bytes());
        assert!(matches!(
            decode(&b),
            Err(StateError::TooLarge {
                what: "port count",
                ..
            })
        ));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let good = encode(&sample());
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut b = good.clone();
            let i = (x as usize) % b.len();
            b[i] = (x >> 32) as u8;
            let _ = decode(&b);
            let n = (x >> 40) as usize % 64;
            let _ = decode(&b[..n.min(b.len())]);
        }
    }
}
