//! Writes the seed corpora (`corpus/<target>/seed-*`): a few small, valid inputs per target
//! in each target's input format. Run from `fuzz/`: `cargo run --example gen-corpus`.

use std::path::Path;

use vhost_blk_backend::dirty_file::Checkpoint;
use vhost_blk_backend::migration::stream::{DeviceConfig, Encoder, Message, Mode, EXTENT_ZERO};
use vhost_blk_backend::spec::{Config, ID_BYTES};
use vhost_net_backend::spec::features as netf;

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

/// Guest memory image as the targets load it (region A from address 0).
struct Mem(Vec<u8>);

impl Mem {
    fn new() -> Self {
        Self(Vec::new())
    }
    fn put(&mut self, at: u64, b: &[u8]) {
        let at = at as usize;
        if self.0.len() < at + b.len() {
            self.0.resize(at + b.len(), 0);
        }
        self.0[at..at + b.len()].copy_from_slice(b);
    }
    fn desc(&mut self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = Vec::new();
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        self.put(table + 16 * u64::from(i), &d);
    }
    /// Avail ring of slot `slot` with `heads`.
    fn avail(&mut self, slot: u64, heads: &[u16]) {
        let at = slot * 0x1000 + 0x400;
        self.put(at, &0u16.to_le_bytes());
        self.put(at + 2, &(heads.len() as u16).to_le_bytes());
        for (i, h) in heads.iter().enumerate() {
            self.put(at + 4 + 2 * i as u64, &h.to_le_bytes());
        }
        // Used ring index 0 (and room for the ring).
        self.put(slot * 0x1000 + 0x600 + 4 + 8 * 16, &[0]);
    }
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join(name), bytes).expect("write seed");
}

fn blk_header(t: u32, sector: u64) -> Vec<u8> {
    let mut h = t.to_le_bytes().to_vec();
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

/// Six requests (read, write, flush, get-id, discard, write-zeroes) at heads 0, 3, 6, 8,
/// 10, 12 of a 16-entry table at 0x0, and an indirect read at head 14.
fn blk_memory() -> Mem {
    let mut m = Mem::new();
    let t = 0;
    // read: header, 512 writable, status
    m.put(0x800, &blk_header(0, 2));
    m.desc(t, 0, 0x800, 16, NEXT, 1);
    m.desc(t, 1, 0x1000, 512, NEXT | WRITE, 2);
    m.desc(t, 2, 0x1400, 1, WRITE, 0);
    // write: header + 1024 readable (two descriptors), status
    m.put(0x810, &blk_header(1, 4));
    m.desc(t, 3, 0x810, 16, NEXT, 4);
    m.desc(t, 4, 0x1800, 1024, NEXT, 5);
    m.desc(t, 5, 0x1401, 1, WRITE, 0);
    // flush
    m.put(0x820, &blk_header(4, 0));
    m.desc(t, 6, 0x820, 16, NEXT, 7);
    m.desc(t, 7, 0x1402, 1, WRITE, 0);
    // get-id: 20 bytes + status in one writable descriptor
    m.put(0x830, &blk_header(8, 0));
    m.desc(t, 8, 0x830, 16, NEXT, 9);
    m.desc(t, 9, 0x1410, 21, WRITE, 0);
    // discard: header and one segment in one descriptor
    let mut d = blk_header(11, 0);
    d.extend_from_slice(&8u64.to_le_bytes());
    d.extend_from_slice(&16u32.to_le_bytes());
    d.extend_from_slice(&0u32.to_le_bytes());
    m.put(0x840, &d);
    m.desc(t, 10, 0x840, 32, NEXT, 11);
    m.desc(t, 11, 0x1403, 1, WRITE, 0);
    // write-zeroes with UNMAP
    let mut z = blk_header(13, 0);
    z.extend_from_slice(&32u64.to_le_bytes());
    z.extend_from_slice(&8u32.to_le_bytes());
    z.extend_from_slice(&1u32.to_le_bytes());
    m.put(0x860, &z);
    m.desc(t, 12, 0x860, 32, NEXT, 13);
    m.desc(t, 13, 0x1404, 1, WRITE, 0);
    // indirect read: a 3-entry table at 0x900
    m.desc(t, 14, 0x900, 48, INDIRECT, 0);
    m.desc(0x900, 0, 0x800, 16, NEXT, 1);
    m.desc(0x900, 1, 0xa000 - 256, 512, NEXT | WRITE, 2);
    m.desc(0x900, 2, 0x1405, 1, WRITE, 0);
    m
}

fn blk_request() {
    let m = blk_memory();
    let mut p = vec![4, 0, 8, 7];
    p.extend_from_slice(&(1u64 << 20).to_le_bytes());
    p.extend_from_slice(&[4, 4]);
    p.extend_from_slice(&1024u16.to_le_bytes());
    let mut a = p.clone();
    a.extend_from_slice(&m.0);
    write("blk_request", "seed-0", &a);
    // Heads 8..: read-only disk, all heads tried through the loop of 7.
    let mut b = p;
    b[1] = 1;
    b.extend_from_slice(&m.0);
    write("blk_request", "seed-1", &b);
}

fn chain_ring() {
    let mut m = blk_memory();
    m.avail(0, &[0, 3, 6, 8, 10, 12, 14]);
    // Flags bit 1: the same memory read as a packed ring (mostly malformed: a start).
    for (flags, name) in [(0u8, "seed-0"), (1, "seed-1"), (2, "seed-2"), (3, "seed-3")] {
        let mut p = vec![4, flags];
        p.extend_from_slice(&0u16.to_le_bytes());
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(&16u16.to_le_bytes());
        p.extend_from_slice(&14u16.to_le_bytes());
        // pop, pop, complete, pop, undo, pop, batch, notify, disable, pop, pop, bump 2, pop
        let ops = [
            0u8,
            0,
            2 | (8 << 3),
            0,
            4,
            0,
            3,
            6,
            5,
            0,
            0,
            7 | (2 << 3),
            0,
            6,
        ];
        p.push(ops.len() as u8);
        let mut o = [0u8; 32];
        o[..ops.len()].copy_from_slice(&ops);
        p.extend_from_slice(&o);
        p.extend_from_slice(&m.0);
        write("chain_ring", name, &p);
    }
}

fn net_hdr() {
    let hdr = |flags: u8, gso: u8, hlen: u16, gso_size: u16, cs: u16, co: u16| {
        let mut h = vec![flags, gso];
        for v in [hlen, gso_size, cs, co, 0] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        h
    };
    let all = netf::CSUM
        | netf::GUEST_CSUM
        | netf::HOST_TSO4
        | netf::HOST_TSO6
        | netf::HOST_ECN
        | netf::GUEST_TSO4
        | netf::GUEST_ECN
        | netf::MRG_RXBUF
        | netf::VERSION_1;
    let cases = [
        (0u64, 60u32, hdr(0, 0, 0, 0, 0, 0)),
        (all, 1514, hdr(1, 0, 0, 0, 34, 16)),
        (all, 9000, hdr(1, 1, 54, 1448, 34, 16)),
        (all, 9000, hdr(1, 0x84, 74, 1428, 54, 16)),
    ];
    for (i, (acked, len, h)) in cases.iter().enumerate() {
        let mut b = acked.to_le_bytes().to_vec();
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(h);
        write("net_hdr", &format!("seed-{i}"), &b);
    }
}

fn net_ctrl() {
    let mut m = Mem::new();
    let cmds: Vec<Vec<u8>> = vec![
        vec![0, 0, 1], // RX promisc on
        vec![0, 5, 1], // RX no broadcast
        {
            // MAC table: 1 unicast, 1 multicast
            let mut v = vec![1, 0];
            v.extend_from_slice(&1u32.to_le_bytes());
            v.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
            v.extend_from_slice(&1u32.to_le_bytes());
            v.extend_from_slice(&[1, 0, 0x5e, 0, 0, 1]);
            v
        },
        vec![1, 1, 2, 0, 0, 0, 0, 2], // MAC address set
        vec![3, 0],                   // announce ack
        vec![4, 0, 2, 0],             // 2 queue pairs
    ];
    let mut heads = Vec::new();
    for (i, c) in cmds.iter().enumerate() {
        let at = 0x800 + 0x40 * i as u64;
        m.put(at, c);
        let h = 2 * i as u16;
        // class+cmd, data, ack
        m.desc(0, h, at, 2, NEXT, h + 1);
        m.desc(0, h + 1, at + 2, (c.len() - 2) as u32, NEXT, h + 2);
        heads.push(h);
    }
    // The acks share one descriptor after the last chain; fix up each chain's third link.
    for (i, _) in cmds.iter().enumerate() {
        let h = 2 * i as u16;
        m.desc(
            0,
            h + 1,
            0x800 + 0x40 * i as u64 + 2,
            (cmds[i].len() - 2) as u32,
            NEXT,
            15,
        );
    }
    m.desc(0, 15, 0xc00, 1, WRITE, 0);
    // Commands without data (announce) skip the empty descriptor: the walker drops it.
    m.avail(0, &heads);
    let acked = netf::CTRL_VQ
        | netf::CTRL_RX
        | netf::MQ
        | netf::CTRL_MAC_ADDR
        | netf::GUEST_ANNOUNCE
        | netf::VERSION_1;
    let mut p = acked.to_le_bytes().to_vec();
    p.extend_from_slice(&[3, 4, 2]);
    p.extend_from_slice(&m.0);
    write("net_ctrl", "seed-0", &p);
}

fn console_control() {
    let mut m = Mem::new();
    // Control tx (slot 0): DEVICE_READY, PORT_READY 0..3, PORT_OPEN 1 and 3.
    let msgs: [(u32, u16, u16); 7] = [
        (0, 0, 1),
        (0, 3, 1),
        (1, 3, 1),
        (2, 3, 1),
        (3, 3, 1),
        (1, 6, 1),
        (3, 6, 1),
    ];
    let mut heads = Vec::new();
    for (i, (id, ev, v)) in msgs.iter().enumerate() {
        let at = 0x2000 + 8 * i as u64;
        let mut b = id.to_le_bytes().to_vec();
        b.extend_from_slice(&ev.to_le_bytes());
        b.extend_from_slice(&v.to_le_bytes());
        m.put(at, &b);
        m.desc(0, i as u16, at, 8, 0, 0);
        heads.push(i as u16);
    }
    m.avail(0, &heads);
    // Control rx (slot 1): 16 writable 64-byte buffers.
    let rx: Vec<u16> = (0..16).collect();
    for i in 0..16u16 {
        m.desc(0x1000, i, 0x3000 + 64 * u64::from(i), 64, WRITE, 0);
    }
    m.avail(1, &rx);
    let mut p = 2u64.to_le_bytes().to_vec();
    p.extend_from_slice(&[4, 4]);
    let ops = [0u8, 1, 0, 1, 3 | (4 << 2), 1];
    p.push(ops.len() as u8);
    let mut o = [0u8; 16];
    o[..ops.len()].copy_from_slice(&ops);
    p.extend_from_slice(&o);
    p.extend_from_slice(&m.0);
    write("console_control", "seed-0", &p);
}

fn migration_stream() {
    let mut serial = [0u8; ID_BYTES];
    serial[..4].copy_from_slice(b"disk");
    let device = DeviceConfig {
        config: Config {
            capacity: 2048,
            blk_size: 512,
            num_queues: 1,
            ..Default::default()
        },
        read_only: false,
        serial,
    };
    let checkpoint = Checkpoint {
        image_id: [7; 16],
        generation: 3,
    };
    let session = 0x1234_5678_9abc_def0u64;
    let msgs = [
        Message::Hello {
            mode: Mode::Incremental,
            device,
            granularity: 4096,
            checkpoint,
        },
        Message::Extent {
            offset: 4096,
            len: 8,
            flags: 0,
            data: b"abcdefgh".to_vec(),
        },
        Message::Extent {
            offset: 8192,
            len: 4096,
            flags: EXTENT_ZERO,
            data: Vec::new(),
        },
        Message::PassDone { pass: 0, bytes: 8 },
        Message::Complete { checkpoint },
        Message::Ack { seq: 4 },
        Message::Error {
            reason: "disk full".into(),
        },
    ];
    let mut enc = Encoder::new(session);
    let mut stream = Vec::new();
    for m in &msgs {
        enc.encode(m, &mut stream);
    }
    // Destination (mode 0) and source (mode 2) decoders; cut the first frame at 40.
    for (mode, name) in [(0u8, "seed-0"), (2, "seed-1")] {
        let mut b = vec![mode];
        b.extend_from_slice(&session.to_le_bytes());
        b.extend_from_slice(&40u16.to_le_bytes());
        b.extend_from_slice(&stream);
        write("migration_stream", name, &b);
    }
    // Round trip (mode 1): Accept, an extent of 4 bytes, a zero extent, PassDone, Ack, Error.
    let mut b = vec![1u8];
    b.extend_from_slice(&session.to_le_bytes());
    b.push(1);
    b.push(0); // Accept: full,
    b.push(0); // no reason
    b.push(2);
    b.extend_from_slice(&512u64.to_le_bytes());
    b.push(0);
    b.extend_from_slice(&4u32.to_le_bytes());
    b.push(4);
    b.extend_from_slice(b"data");
    b.push(2);
    b.extend_from_slice(&1024u64.to_le_bytes());
    b.push(1);
    b.extend_from_slice(&512u32.to_le_bytes());
    b.push(0);
    b.push(3);
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&4u64.to_le_bytes());
    b.push(5);
    b.extend_from_slice(&3u64.to_le_bytes());
    b.push(6);
    b.extend_from_slice(&4u16.to_le_bytes());
    b.extend_from_slice(b"oops");
    write("migration_stream", "seed-2", &b);
}

fn vhost_user() {
    const UA: u64 = 0x7f00_0000_0000;
    let mut m = blk_memory();
    m.avail(0, &[0, 3, 6, 8, 10, 12, 14]);
    let mut b = (m.0.len() as u16).to_le_bytes().to_vec();
    b.extend_from_slice(&m.0);
    let mut msg = |code: u8, ctl: u8, payload: &[u8]| {
        b.push(code);
        b.push(ctl);
        b.push(payload.len() as u8);
        b.extend_from_slice(payload);
    };
    let u64s = |v: &[u64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let state = |i: u32, n: u32| [i.to_le_bytes(), n.to_le_bytes()].concat();
    msg(1, 0, &[]); // GET_FEATURES
    msg(3, 0, &[]); // SET_OWNER
    msg(15, 0, &[]); // GET_PROTOCOL_FEATURES
    msg(16, 0, &u64s(&[0x1 | 0x8 | 0x200])); // SET_PROTOCOL_FEATURES: MQ, REPLY_ACK, CONFIG
    msg(2, 4, &u64s(&[(1 << 32) | (1 << 30)])); // SET_FEATURES (NEED_REPLY)
    msg(17, 0, &[]); // GET_QUEUE_NUM
    let mut table = vec![1, 0, 0, 0, 0, 0, 0, 0];
    table.extend_from_slice(&u64s(&[0, 0x10000, UA, 0]));
    msg(5, 1 | 4, &table); // SET_MEM_TABLE with a memfd
    msg(8, 0, &state(0, 16)); // SET_VRING_NUM
    let mut addr = state(0, 0);
    addr.extend_from_slice(&u64s(&[UA, UA + 0x600, UA + 0x400, 0]));
    msg(9, 0, &addr); // SET_VRING_ADDR
    msg(10, 0, &state(0, 0)); // SET_VRING_BASE
    msg(13, 2, &u64s(&[0])); // SET_VRING_CALL
    msg(12, 2, &u64s(&[0])); // SET_VRING_KICK
    msg(18, 0, &state(0, 1)); // SET_VRING_ENABLE
    let mut cfg = [0u32.to_le_bytes(), 16u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
    cfg.extend_from_slice(&[0; 16]);
    msg(24, 0, &cfg); // GET_CONFIG
    msg(11, 0, &state(0, 0)); // GET_VRING_BASE
    msg(34, 0, &[]); // RESET_DEVICE
    write("vhost_user", "seed-0", &b);
}

fn main() {
    blk_request();
    chain_ring();
    net_hdr();
    net_ctrl();
    console_control();
    migration_stream();
    vhost_user();
    qmp();
}

/// QMP sessions: piece size, then what a client sends.
fn qmp() {
    let seeds: [(&str, u8, &str); 5] = [
        (
            "status",
            0,
            r#"{"execute":"qmp_capabilities"}{"execute":"query-status","id":1}{"execute":"query-stats"}"#,
        ),
        (
            "migrate",
            7,
            r#"{"execute":"qmp_capabilities"} {"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:4444","incremental":true,"copy-mode":"background","max-bandwidth":1048576}} {"execute":"migrate","arguments":{"uri":"unix:/tmp/x.sock"}} {"execute":"migrate","arguments":{"uri":"fd:3","copy-mode":"write-blocking"}}"#,
        ),
        (
            "jobs",
            1,
            r#"{"execute":"qmp_capabilities"}{"execute":"query-migrate"}{"execute":"migrate-set-speed","arguments":{"value":100}}{"execute":"migrate-cancel"}{"execute":"migrate-complete"}{"execute":"query-commands"}{"execute":"query-version"}"#,
        ),
        (
            "broken",
            3,
            r#"{"execute":"query-status"} {"execute": } [1,2] "x" {"execute":"qmp_capabilities","bogus":1} {"arguments":{}}"#,
        ),
        (
            "args",
            0,
            r#"{"execute":"qmp_capabilities"}{"execute":"query-status","arguments":{"x":1}}{"execute":"migrate","arguments":[]}{"execute":"migrate","arguments":{"uri":5}}{"execute":"migrate-set-speed","arguments":{"value":-1}}"#,
        ),
    ];
    for (name, step, text) in seeds {
        let mut b = vec![step];
        b.extend_from_slice(text.as_bytes());
        write("qmp", &format!("seed-{name}"), &b);
    }
}
