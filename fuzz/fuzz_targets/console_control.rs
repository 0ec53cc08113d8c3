//! virtio-console control messages: the driver's control transmit queue (DEVICE_READY,
//! PORT_READY, PORT_OPEN, anything else) and the device's replies on the control receive
//! queue, on a device with a pty console, a socket port, a file port and the hostinfo port,
//! over guest memory from the input.
//!
//! Input: acked features u64 (MULTIPORT is always added), ring size selectors for control
//! tx (slot 0) and control rx (slot 1), op count, 16 op bytes, then guest memory.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serial_backend::spec::{features, queue};
use serial_backend::{HostKind, PortSpec, SerialDevice};
use vhost_fuzz::{bump_avail, guest_memory, ring_size, start_ring, Reader, RingParams};
use vhost_user_device::{Rings, VhostUserDevice};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};

fn device() -> &'static SerialDevice {
    static DEVICE: OnceLock<SerialDevice> = OnceLock::new();
    DEVICE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vhost-fuzz-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let port = |name: &str, kind| PortSpec {
            name: Some(name.into()),
            console: false,
            kind,
        };
        let specs = [
            PortSpec {
                name: None,
                console: true,
                kind: HostKind::Pty,
            },
            port("org.fuzz.socket", HostKind::Socket(dir.join("port.sock"))),
            port("org.fuzz.file", HostKind::File(dir.join("port.out"))),
            port("org.hostinfo.0", HostKind::Hostinfo),
        ];
        SerialDevice::new(&specs, 8).expect("console device")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let acked = r.u64() | features::MULTIPORT;
    let tx_size = ring_size(r.u8());
    let rx_size = ring_size(r.u8());
    let nops = r.u8() % 17;
    let ops: [u8; 16] = r.array();
    let mem = guest_memory(r.rest());

    let dev = device();
    let queues: Vec<u16> = (0..dev.num_queues()).collect();
    let mut worker = dev.create_worker(&queues, acked).expect("console worker");
    let atomic = GuestMemoryAtomic::new(mem);
    let params = |index, slot, size| RingParams {
        index,
        slot,
        size,
        base: 0,
        event_idx: false,
        acked,
    };
    let Some(tx) = start_ring(&atomic, params(queue::CONTROL_TX, 0, tx_size)) else {
        return;
    };
    let Some(rx) = start_ring(&atomic, params(queue::CONTROL_RX, 1, rx_size)) else {
        return;
    };
    let mem = tx.memory();
    let mut rings = Rings::from_started([tx, rx]);
    let rx_used = 0x1600u64;
    let used_idx = |at: u64| -> u16 { mem.read_obj(GuestAddress(at + 2)).unwrap_or(0) };
    for &op in &ops[..usize::from(nops)] {
        let arg = u16::from(op >> 2);
        match op & 3 {
            0 => worker.process_queue(queue::CONTROL_TX, &mut rings),
            1 => {
                let prev = used_idx(rx_used);
                worker.process_queue(queue::CONTROL_RX, &mut rings);
                let now = used_idx(rx_used);
                if now != prev {
                    // The last element is written after every reply of the pass (earlier
                    // ones may sit in buffers the guest pointed at the used ring).
                    let slot = u64::from(now.wrapping_sub(1) % rx_size);
                    let len: u32 = mem
                        .read_obj(GuestAddress(rx_used + 4 + 8 * slot + 4))
                        .unwrap_or(0);
                    // A control message (8 bytes and its extra) or nothing.
                    assert!(len == 0 || len >= 8, "control reply of {len} bytes");
                }
            }
            2 => bump_avail(&mem, 0, arg),
            _ => bump_avail(&mem, 1, arg),
        }
    }
});
