//! virtio-console structures and constants (virtio 1.2, section 5.3), which
//! virtio-bindings 0.2.7 does not have.

/// Feature bits.
pub mod features {
    /// Configuration cols and rows are valid.
    pub const SIZE: u64 = 1 << 0;
    /// Several ports, a control queue pair and the port handshake.
    pub const MULTIPORT: u64 = 1 << 1;
    /// The driver may write single characters to `emerg_wr`.
    pub const EMERG_WRITE: u64 = 1 << 2;
}

/// Control events (`virtio_console_control.event`).
pub mod event {
    /// Driver → device: the driver is ready (value 1) or failed (0).
    pub const DEVICE_READY: u16 = 0;
    /// Device → driver: a port was added.
    pub const DEVICE_ADD: u16 = 1;
    /// Device → driver: a port was removed.
    pub const DEVICE_REMOVE: u16 = 2;
    /// Driver → device: a port is ready (value 1) or failed (0).
    pub const PORT_READY: u16 = 3;
    /// Device → driver: this port is a console (hvc).
    pub const CONSOLE_PORT: u16 = 4;
    /// Device → driver: console size changed; rows u16 then cols u16 follow the header.
    pub const RESIZE: u16 = 5;
    /// Both ways: the port was opened (value 1) or closed (0) on the sender's side.
    pub const PORT_OPEN: u16 = 6;
    /// Device → driver: the port's name follows the header.
    pub const PORT_NAME: u16 = 7;
}

/// Size of `struct virtio_console_control` (id u32, event u16, value u16).
pub const CONTROL_SIZE: usize = 8;

/// Size of the config space: cols u16, rows u16, max_nr_ports u32, emerg_wr u32.
pub const CONFIG_SIZE: usize = 12;
/// Offset of `emerg_wr` in the config space.
pub const CONFIG_EMERG_WR_OFFSET: u32 = 8;

/// QEMU's default (and our default) number of ports: 31, so 64 queues.
pub const DEFAULT_MAX_PORTS: u32 = 31;

/// One control message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Control {
    /// Port id.
    pub id: u32,
    /// One of [`event`].
    pub event: u16,
    /// Event argument.
    pub value: u16,
}

impl Control {
    /// Little-endian wire form.
    pub fn to_bytes(self) -> [u8; CONTROL_SIZE] {
        let mut b = [0u8; CONTROL_SIZE];
        b[0..4].copy_from_slice(&self.id.to_le_bytes());
        b[4..6].copy_from_slice(&self.event.to_le_bytes());
        b[6..8].copy_from_slice(&self.value.to_le_bytes());
        b
    }

    /// Parses the header of a control buffer; `None` if it is too short.
    pub fn parse(b: &[u8]) -> Option<Self> {
        let b: &[u8; CONTROL_SIZE] = b.get(..CONTROL_SIZE)?.try_into().ok()?;
        Some(Self {
            id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            event: u16::from_le_bytes([b[4], b[5]]),
            value: u16::from_le_bytes([b[6], b[7]]),
        })
    }
}

/// Queue layout with MULTIPORT: port 0 rx/tx = 0/1, control rx/tx = 2/3, port N ≥ 1 rx/tx =
/// 2 + 2N / 3 + 2N. Without MULTIPORT only queues 0 and 1 exist.
pub mod queue {
    /// Control receive queue (device → driver).
    pub const CONTROL_RX: u16 = 2;
    /// Control transmit queue (driver → device).
    pub const CONTROL_TX: u16 = 3;

    /// Receive (device → driver) queue of `port`.
    pub fn rx(port: u32) -> u16 {
        if port == 0 {
            0
        } else {
            (2 + 2 * port) as u16
        }
    }

    /// Transmit (driver → device) queue of `port`.
    pub fn tx(port: u32) -> u16 {
        rx(port) + 1
    }

    /// The port and direction (true = tx) of a data queue; `None` for control queues.
    pub fn port_of(queue: u16) -> Option<(u32, bool)> {
        match queue {
            0 | 1 => Some((0, queue == 1)),
            2 | 3 => None,
            q => Some((u32::from(q / 2 - 1), q % 2 == 1)),
        }
    }

    /// Number of queues for `max_ports` ports with MULTIPORT.
    pub fn count(max_ports: u32) -> u16 {
        (2 * (max_ports + 1)) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_layout_round_trips() {
        for p in 0..31 {
            assert_eq!(queue::port_of(queue::rx(p)), Some((p, false)));
            assert_eq!(queue::port_of(queue::tx(p)), Some((p, true)));
        }
        assert_eq!(queue::port_of(2), None);
        assert_eq!(queue::port_of(3), None);
        assert_eq!(queue::count(31), 64);
        assert_eq!(queue::tx(30), 63);
    }

    #[test]
    fn control_wire_form() {
        let c = Control {
            id: 0x0102_0304,
            event: event::RESIZE,
            value: 7,
        };
        assert_eq!(Control::parse(&c.to_bytes()), Some(c));
        assert_eq!(Control::parse(&[0u8; 7]), None);
    }
}
