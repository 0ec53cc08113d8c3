//! A guest posting transmit chains far larger than a port can buffer (up to 4 GiB through
//! one indirect table): the backend must not copy them into host memory. Where the host
//! side takes data (a file, a connected client) the chain is delivered in bounded pieces
//! straight from guest memory; where it must be given back without a consumer (a console
//! with no client, a VMM going away) a bounded part is kept and the rest is counted.
//!
//! These tests measure the process's peak resident size, so they live in their own test
//! binary and run one at a time.

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use serial_backend::ports::HostKind;
use serial_backend::spec::{event, queue};
use serial_backend::Counter;
use vhost_tests::frontend::Buf;

/// One test at a time: they measure the whole process's peak memory.
static SERIAL: Mutex<()> = Mutex::new(());

/// Distinct 1 MiB source areas; descriptor `i` of a huge chain points at area `i % AREAS`.
const AREAS: usize = 4;
const AREA: usize = 1 << 20;
/// Most the process may grow while a huge chain is handled (the chains are 64 to 512 MiB;
/// copying one, as the backend did, grows it by at least that much).
const MAX_GROWTH_KIB: u64 = 32 << 10;

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} not in /proc/self/status"))
}

/// Resets the peak resident size (VmHWM) to the current one and returns it.
fn reset_peak() -> u64 {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
    status_kib("VmHWM:")
}

fn grown_kib(base: u64) -> u64 {
    status_kib("VmHWM:").saturating_sub(base)
}

/// Byte `off` of the stream a huge chain carries.
fn expected(areas: &[Vec<u8>], off: usize) -> u8 {
    areas[(off / AREA) % AREAS][off % AREA]
}

/// Writes the source areas into guest memory and publishes (without kicking) one chain of
/// `descs` readable 1 MiB descriptors through an indirect table on `q`.
fn post_huge(d: &mut Driver, q: u16, descs: usize) -> Vec<Vec<u8>> {
    let areas: Vec<Vec<u8>> = (0..AREAS).map(|i| pattern(i as u8 + 40, AREA)).collect();
    let gpas: Vec<u64> = areas
        .iter()
        .map(|a| {
            let gpa = d.fe.alloc(AREA as u64);
            d.fe.write(gpa, a);
            gpa
        })
        .collect();
    let bufs: Vec<Buf> = (0..descs)
        .map(|i| Buf::ro(gpas[i % AREAS], AREA as u32))
        .collect();
    let table = d.fe.alloc(16 * descs as u64);
    let dq = &mut d.fe.queues[usize::from(q)];
    let head = dq.add_indirect(&d.fe.mem, table, &bufs);
    dq.publish(&d.fe.mem, head);
    areas
}

#[test]
fn a_huge_chain_on_a_console_without_client_keeps_only_the_backlog() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const DESCS: usize = 512;
    const BACKLOG: usize = 64 << 10;
    let b = TestBackend::start(1, |d| vec![console(HostKind::Socket(d.join("con.sock")))]);
    let mut d = Driver::connect(&b);
    d.handshake(1);
    let areas = post_huge(&mut d, queue::tx(0), DESCS);
    let base = reset_peak();
    d.fe.queues[usize::from(queue::tx(0))].notify();
    assert_eq!(
        d.wait_tx(0, 1, Duration::from_secs(30)),
        1,
        "chain not returned"
    );
    let grown = grown_kib(base);
    assert!(
        grown < MAX_GROWTH_KIB,
        "the backend grew by {} MiB for a {DESCS} MiB chain",
        grown >> 10
    );
    let total = DESCS * AREA;
    assert_eq!(
        b.stat(|s| &s.console_dropped),
        (total - BACKLOG) as u64,
        "dropped bytes miscounted"
    );
    assert_eq!(
        b.port_stat(0, Counter::ConsoleDropped),
        (total - BACKLOG) as u64
    );
    // The newest 64 KiB are delivered when a client connects, then later output.
    let mut s = UnixStream::connect(b.path("con.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = vec![0u8; BACKLOG];
    s.read_exact(&mut got).unwrap();
    let want: Vec<u8> = (total - BACKLOG..total)
        .map(|o| expected(&areas, o))
        .collect();
    assert!(got == want, "the backlog is not the chain's last 64 KiB");
    let n = d.write_port(0, b"later\n", 64);
    assert_eq!(d.wait_tx(0, n, Duration::from_secs(5)), n);
    let mut v = [0u8; 6];
    s.read_exact(&mut v).unwrap();
    assert_eq!(&v, b"later\n");
}

#[test]
fn a_huge_chain_to_a_file_is_written_whole_without_a_copy() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const DESCS: usize = 128;
    let b = TestBackend::start(2, |d| vec![named("log", HostKind::File(d.join("log")))]);
    let mut d = Driver::connect(&b);
    d.handshake(1);
    d.send_ctrl(1, event::PORT_OPEN, 1);
    let areas = post_huge(&mut d, queue::tx(1), DESCS);
    let base = reset_peak();
    d.fe.queues[usize::from(queue::tx(1))].notify();
    assert_eq!(
        d.wait_tx(1, 1, Duration::from_secs(60)),
        1,
        "chain not returned"
    );
    let grown = grown_kib(base);
    assert!(
        grown < MAX_GROWTH_KIB,
        "the backend grew by {} MiB for a {DESCS} MiB chain",
        grown >> 10
    );
    // Nothing lost, in order.
    let mut f = std::fs::File::open(b.path("log")).unwrap();
    let mut buf = vec![0u8; AREA];
    for i in 0..DESCS {
        f.read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("file ends in MiB {i}: {e}"));
        assert!(buf == areas[i % AREAS], "MiB {i} of the file differs");
    }
    assert_eq!(f.read(&mut buf).unwrap(), 0, "file longer than the chain");
    assert_eq!(b.stat(|s| &s.tx_bytes), (DESCS * AREA) as u64);
    assert_eq!(b.stat(|s| &s.tx_dropped), 0);
}

#[test]
fn a_huge_chain_held_at_disconnect_is_kept_up_to_the_limit() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const DESCS: usize = 256;
    const HELD: usize = 1 << 20;
    let b = TestBackend::start(2, |d| vec![named("x", HostKind::Socket(d.join("x.sock")))]);
    let areas = {
        let mut d = Driver::connect(&b);
        d.handshake(1);
        d.send_ctrl(1, event::PORT_OPEN, 1);
        let areas = post_huge(&mut d, queue::tx(1), DESCS);
        d.fe.queues[usize::from(queue::tx(1))].notify();
        // No client: the chain waits in the backend.
        assert_eq!(d.wait_tx(1, 1, Duration::from_millis(300)), 0);
        let base = reset_peak();
        // The VMM goes away: GET_VRING_BASE must see the chain given back.
        let q = usize::from(queue::tx(1));
        use vhost::VhostBackend;
        let r =
            d.fe.within(Duration::from_secs(30), |fe| fe.fe.get_vring_base(q));
        assert!(r.is_ok(), "GET_VRING_BASE: {r:?}");
        assert_eq!(d.wait_tx(1, 1, Duration::from_secs(5)), 1);
        let grown = grown_kib(base);
        assert!(
            grown < MAX_GROWTH_KIB,
            "the backend grew by {} MiB for a {DESCS} MiB chain",
            grown >> 10
        );
        areas
    };
    let total = DESCS * AREA;
    assert_eq!(b.stat(|s| &s.tx_dropped), (total - HELD) as u64);
    assert_eq!(b.port_stat(0, Counter::TxDropped), (total - HELD) as u64);
    // The next connection delivers what was kept: the start of the chain, in order.
    let mut d = Driver::connect(&b);
    d.handshake(1);
    let mut s = UnixStream::connect(b.path("x.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = vec![0u8; HELD];
    s.read_exact(&mut got).unwrap();
    let want: Vec<u8> = (0..HELD).map(|o| expected(&areas, o)).collect();
    assert!(got == want, "the kept part is not the chain's first MiB");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut more = [0u8; 1];
    assert!(
        s.read(&mut more).is_err(),
        "more than the kept part was delivered"
    );
}
