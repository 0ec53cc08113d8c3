//! serial-backend through the frontend harness (no VM): the MULTIPORT handshake, data both
//! ways on several ports, backpressure without loss, resize, hostinfo, hostile control
//! messages.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;
use serial_backend::ports::HostKind;
use serial_backend::spec::{event, queue, Control};
use vhost::VhostBackend;
use vhost_tests::frontend::wait_eventfd;

fn connect(path: &std::path::Path) -> UnixStream {
    let s = UnixStream::connect(path).expect("connect port socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Standard set: console socket (0), console pty (1), two named sockets (2, 3), a file
/// port (4), hostinfo (5).
fn standard() -> TestBackend {
    TestBackend::start(6, |d| {
        vec![
            console(HostKind::Socket(d.join("con0.sock"))),
            console(HostKind::Pty),
            named("org.example.a", HostKind::Socket(d.join("a.sock"))),
            named("org.example.b", HostKind::Socket(d.join("b.sock"))),
            named("org.example.log", HostKind::File(d.join("log.txt"))),
            named(serial_backend::hostinfo::PORT_NAME, HostKind::Hostinfo),
        ]
    })
}

#[test]
fn multiport_handshake() {
    let b = standard();
    let cfg = {
        let mut d = Driver::connect(&b);
        let cfg = d.fe.config(0, 12).unwrap();
        let m = d.handshake(6);
        for id in 0..6 {
            assert!(has(&m, id, event::DEVICE_ADD, 1), "DEVICE_ADD {id}: {m:?}");
        }
        assert!(has(&m, 0, event::CONSOLE_PORT, 1));
        assert!(has(&m, 1, event::CONSOLE_PORT, 1));
        assert!(!m
            .iter()
            .any(|(c, _)| c.event == event::CONSOLE_PORT && c.id > 1));
        let names: Vec<(u32, String)> = m
            .iter()
            .filter(|(c, _)| c.event == event::PORT_NAME)
            .map(|(c, x)| (c.id, String::from_utf8(x.clone()).unwrap()))
            .collect();
        assert_eq!(
            names,
            vec![
                (2, "org.example.a".into()),
                (3, "org.example.b".into()),
                (4, "org.example.log".into()),
                (5, "org.hostinfo.0".into())
            ]
        );
        // Host side present: pty, file, hostinfo; absent: the sockets without clients.
        for id in [1, 4, 5] {
            assert!(has(&m, id, event::PORT_OPEN, 1), "PORT_OPEN {id}: {m:?}");
        }
        for id in [2, 3] {
            assert!(!has(&m, id, event::PORT_OPEN, 1));
        }
        // CONSOLE_PORT comes before anything else about that port.
        let first1 = m
            .iter()
            .position(|(c, _)| c.id == 1 && c.event != event::DEVICE_ADD);
        assert_eq!(m[first1.unwrap()].0.event, event::CONSOLE_PORT);

        // Host connect and disconnect reach the guest.
        let s = connect(&b.path("a.sock"));
        d.wait_ctrl("host open", |m| has(m, 2, event::PORT_OPEN, 1));
        drop(s);
        d.wait_ctrl("host close", |m| has(m, 2, event::PORT_OPEN, 0));
        let s = connect(&b.path("a.sock"));
        d.wait_ctrl("host reconnect", |m| has(m, 2, event::PORT_OPEN, 1));
        drop(s);
        cfg
    };
    assert_eq!(&cfg[4..8], &6u32.to_le_bytes());
    // A second driver (reconnect of the VMM) gets the whole handshake again.
    let mut d = Driver::connect(&b);
    let m = d.handshake(6);
    assert!(has(&m, 1, event::CONSOLE_PORT, 1));
}

#[test]
fn data_both_ways_on_several_ports() {
    let b = standard();
    let mut d = Driver::connect(&b);
    d.handshake(6);
    let mut sa = connect(&b.path("a.sock"));
    let mut sb = connect(&b.path("b.sock"));
    d.wait_ctrl("both open", |m| {
        has(m, 2, event::PORT_OPEN, 1) && has(m, 3, event::PORT_OPEN, 1)
    });
    for id in [2, 3, 4] {
        d.send_ctrl(id, event::PORT_OPEN, 1);
    }
    const LEN: usize = 1 << 20;
    let (ga, gb, gl) = (pattern(1, LEN), pattern(2, LEN), pattern(3, 100_000));
    // Host readers run while the guest writes (socket buffers are smaller than 1 MiB).
    let ra = {
        let mut s = sa.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut v = vec![0u8; LEN];
            s.read_exact(&mut v).map(|_| v)
        })
    };
    let rb = {
        let mut s = sb.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut v = vec![0u8; LEN];
            s.read_exact(&mut v).map(|_| v)
        })
    };
    let mut total = 0;
    for (i, (id, data)) in [(2, &ga), (3, &gb), (4, &gl)].into_iter().enumerate() {
        // Four rounds so the 256-entry rings never overflow.
        let chunk = [32 * 1024, 8192, 4096][i];
        for part in data.chunks(64 * chunk) {
            let n = d.write_port(id, part, chunk);
            assert_eq!(d.wait_tx(id, n, Duration::from_secs(10)), n, "port {id}");
            total += part.len();
        }
    }
    assert_eq!(ra.join().unwrap().unwrap(), ga);
    assert_eq!(rb.join().unwrap().unwrap(), gb);
    assert_eq!(std::fs::read(b.path("log.txt")).unwrap(), gl);
    assert!(b.stat(|s| &s.tx_bytes) >= total as u64);

    // Host → guest on both sockets at once.
    let (ha, hb) = (pattern(4, LEN), pattern(5, LEN));
    let wa = {
        let h = ha.clone();
        std::thread::spawn(move || sa.write_all(&h))
    };
    let wb = {
        let h = hb.clone();
        std::thread::spawn(move || sb.write_all(&h))
    };
    let got_a = d.read_port(2, LEN, Duration::from_secs(20));
    let got_b = d.read_port(3, LEN, Duration::from_secs(20));
    wa.join().unwrap().unwrap();
    wb.join().unwrap().unwrap();
    assert!(got_a == ha && got_b == hb, "host → guest data differs");
}

#[test]
fn backpressure_loses_nothing() {
    let b = standard();
    let mut d = Driver::connect(&b);
    d.handshake(6);
    d.send_ctrl(2, event::PORT_OPEN, 1);
    // No client yet: guest output must wait, not vanish.
    let data = pattern(7, 4 << 20);
    let first = &data[..1 << 20];
    let n = d.write_port(2, first, 16384);
    assert_eq!(
        d.wait_tx(2, 1, Duration::from_millis(300)),
        0,
        "buffers completed with no host"
    );
    // A client that does not read: the socket fills, the backend holds the rest.
    let mut s = connect(&b.path("a.sock"));
    s.set_read_timeout(None).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let done = d.wait_tx(2, n, Duration::from_millis(200));
    assert!(
        done < n,
        "all {n} buffers completed though the host reads nothing"
    );
    let reader = {
        let mut s2 = s.try_clone().unwrap();
        let len = data.len();
        std::thread::spawn(move || {
            let mut v = vec![0u8; len];
            // A slow reader.
            let mut got = 0;
            while got < len {
                let n = s2.read(&mut v[got..(got + 4096).min(len)]).unwrap();
                assert!(n > 0, "EOF after {got} bytes");
                got += n;
                if got % (256 * 1024) < 4096 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            v
        })
    };
    let mut left = n - done;
    let _ = d.wait_tx(2, left, Duration::from_secs(20));
    left = 0;
    for part in data[1 << 20..].chunks(64 * 16384) {
        let n = d.write_port(2, part, 16384);
        assert_eq!(d.wait_tx(2, n, Duration::from_secs(20)), n);
    }
    assert_eq!(left, 0);
    assert!(
        reader.join().unwrap() == data,
        "guest → host stream differs"
    );

    // Host → guest with no rx buffers posted: waits, then arrives whole.
    let mut d2 = d;
    // Use up the posted buffers by sending exactly 16 * 4096 bytes first.
    let pre = pattern(8, 16 * RX_BUF as usize);
    s.write_all(&pre).unwrap();
    let got = d2.read_port(2, pre.len(), Duration::from_secs(10));
    assert!(got == pre);
    let big = pattern(9, 2 << 20);
    let w = {
        let big = big.clone();
        std::thread::spawn(move || s.write_all(&big).map(|_| s))
    };
    let got = d2.read_port(2, big.len(), Duration::from_secs(30));
    assert!(got == big, "host → guest stream differs");
    drop(w.join().unwrap().unwrap());
}

#[test]
fn guest_close_and_host_reconnect() {
    let b = standard();
    let mut d = Driver::connect(&b);
    d.handshake(6);
    let mut s = connect(&b.path("a.sock"));
    d.wait_ctrl("open", |m| has(m, 2, event::PORT_OPEN, 1));
    d.send_ctrl(2, event::PORT_OPEN, 1);
    let n = d.write_port(2, b"hello", 5);
    assert_eq!(d.wait_tx(2, n, Duration::from_secs(5)), n);
    d.send_ctrl(2, event::PORT_OPEN, 0);
    // The guest closing reaches the host as end of file.
    let mut v = Vec::new();
    s.read_to_end(&mut v).unwrap();
    assert_eq!(v, b"hello");
    drop(s);
    d.wait_ctrl("host close", |m| has(m, 2, event::PORT_OPEN, 0));
    let mut s = connect(&b.path("a.sock"));
    d.wait_ctrl("host reopen", |m| has(m, 2, event::PORT_OPEN, 1));
    d.send_ctrl(2, event::PORT_OPEN, 1);
    let n = d.write_port(2, b"again", 5);
    assert_eq!(d.wait_tx(2, n, Duration::from_secs(5)), n);
    let mut v = [0u8; 5];
    s.read_exact(&mut v).unwrap();
    assert_eq!(&v, b"again");
}

/// A driver set up by an earlier backend (QEMU reconnected to a restarted backend, or the
/// connection was made again under a running guest) does not repeat its handshake. The
/// backend sees control rings already in use, asks the driver to announce its ports again
/// (DEVICE_ADD, which Linux answers with PORT_READY) and then serves them: host input
/// reaches a port the guest opened with the earlier backend and the console, and a port
/// whose client is gone hears PORT_OPEN 0. Without this, host input never reached the
/// guest after a restart (found by `tests/crash.rs`). A fresh driver gets no such request.
#[test]
fn a_driver_set_up_by_an_earlier_backend_announces_its_ports_again() {
    let b = standard();
    let mut d = Driver::connect(&b);
    std::thread::sleep(Duration::from_millis(100));
    d.poll();
    assert!(d.ctrl.is_empty(), "before DEVICE_READY: {:?}", d.ctrl);
    d.handshake(6);
    let mut a = connect(&b.path("a.sock"));
    d.wait_ctrl("host open", |m| has(m, 2, event::PORT_OPEN, 1));
    d.send_ctrl(2, event::PORT_OPEN, 1);
    let n = d.write_port(2, b"before", 6);
    assert_eq!(d.wait_tx(2, n, Duration::from_secs(5)), n);

    // Same guest memory and rings, a new connection; the driver stays as it is.
    d.fe.reconnect(&b.socket).expect("reconnect");
    let m = d.wait_ctrl("DEVICE_ADD for every port", |m| {
        (0..6).all(|id| has(m, id, event::DEVICE_ADD, 1))
    });
    assert!(
        !m.iter().any(|(c, _)| c.event == event::PORT_OPEN),
        "port state before the driver answered: {m:?}"
    );
    for id in 0..6 {
        d.send_ctrl(id, event::PORT_READY, 1);
    }
    d.wait_ctrl("the host sides' state", |m| {
        has(m, 2, event::PORT_OPEN, 1) && has(m, 3, event::PORT_OPEN, 0)
    });
    a.write_all(b"after").unwrap();
    assert_eq!(d.read_port(2, 5, Duration::from_secs(5)), b"after");
    let n = d.write_port(2, b"out", 3);
    assert_eq!(d.wait_tx(2, n, Duration::from_secs(5)), n);
    let mut v = [0u8; 9];
    a.read_exact(&mut v).unwrap();
    assert_eq!(&v, b"beforeout");
    let mut c = connect(&b.path("con0.sock"));
    c.write_all(b"console").unwrap();
    assert_eq!(d.read_port(0, 7, Duration::from_secs(5)), b"console");
}

fn set_winsize(f: &std::fs::File, ws: &libc::winsize) {
    // SAFETY: TIOCSWINSZ reads a winsize through a valid pointer.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::TIOCSWINSZ, ws) };
    assert_eq!(rc, 0, "TIOCSWINSZ");
}

#[test]
fn resize_follows_the_pty() {
    let b = TestBackend::start(2, |_| vec![console(HostKind::Pty), console(HostKind::Pty)]);
    let mut d = Driver::connect(&b);
    d.handshake(2);
    let pty = b.shared.ports[1].pty.clone().expect("pty path");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pty)
        .unwrap();
    let ws = libc::winsize {
        ws_row: 33,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    set_winsize(&f, &ws);
    let m = d.wait_ctrl("RESIZE", |m| {
        m.iter().any(|(c, _)| c.event == event::RESIZE)
    });
    let (c, extra) = m.iter().find(|(c, _)| c.event == event::RESIZE).unwrap();
    assert_eq!(c.id, 1);
    // rows, then cols.
    assert_eq!(extra[..4], [33, 0, 120, 0]);
    // Port 0's size shows in the config space: cols, then rows.
    let pty0 = b.shared.ports[0].pty.clone().unwrap();
    let f0 = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pty0)
        .unwrap();
    let ws = libc::winsize {
        ws_row: 40,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    set_winsize(&f0, &ws);
    d.wait_ctrl("RESIZE 0", |m| {
        m.iter().any(|(c, _)| c.event == event::RESIZE && c.id == 0)
    });
    assert_eq!(d.fe.config(0, 4).unwrap(), [100, 0, 40, 0]);
}

#[test]
fn hostinfo_document_on_each_open() {
    let b = standard();
    let mut d = Driver::connect(&b);
    d.handshake(6);
    for round in 0..2 {
        d.send_ctrl(5, event::PORT_OPEN, 1);
        let m = d.wait_ctrl("end of document", |m| has(m, 5, event::PORT_OPEN, 0));
        let _ = m;
        d.poll();
        let doc = String::from_utf8(d.data.remove(&5).unwrap_or_default()).unwrap();
        let host = serial_backend::hostinfo::hostname();
        assert!(
            doc.starts_with('{') && doc.ends_with("}\n"),
            "round {round}: {doc}"
        );
        assert!(doc.contains(&format!("\"hostname\": \"{host}\"")), "{doc}");
        d.send_ctrl(5, event::PORT_OPEN, 0);
        d.wait_ctrl("ready again", |m| has(m, 5, event::PORT_OPEN, 1));
    }
}

#[test]
fn emergency_write_reaches_console_zero() {
    use vhost::vhost_user::message::VhostUserConfigFlags;
    use vhost::vhost_user::VhostUserFrontend;
    let b = standard();
    let mut d = Driver::connect(&b);
    d.handshake(6);
    let mut s = connect(&b.path("con0.sock"));
    for ch in b"SOS" {
        d.fe.fe
            .set_config(8, VhostUserConfigFlags::WRITABLE, &[*ch, 0, 0, 0])
            .unwrap();
    }
    let mut v = [0u8; 3];
    s.read_exact(&mut v).unwrap();
    assert_eq!(&v, b"SOS");
}

#[test]
fn hostile_control_messages_are_ignored() {
    let b = standard();
    let mut d = Driver::connect(&b);
    let before = b.stat(|s| &s.bad_input);
    d.send_ctrl(0, 99, 1); // unknown event
    d.send_ctrl(1000, event::PORT_READY, 1); // port id out of range
    d.send_ctrl(u32::MAX, event::PORT_OPEN, 1);
    d.send_ctrl(5, event::PORT_OPEN, 1); // before PORT_READY
    d.send_ctrl(2, event::DEVICE_ADD, 1); // device → driver event from the driver
    d.send_ctrl_raw(&[0u8; 4]); // short
    d.send_ctrl_raw(
        &Control {
            id: 2,
            event: event::RESIZE,
            value: 0,
        }
        .to_bytes(),
    );
    // A control buffer outside guest memory.
    d.fe.submit(
        queue::CONTROL_TX,
        &[vhost_tests::frontend::Buf::ro((64 << 20) - 4, 8)],
    );
    let _ = d.fe.wait(queue::CONTROL_TX, 1);
    let gpa = d.fe.alloc(16);
    // Writable-only control buffer (nothing to read).
    d.fe.submit(queue::CONTROL_TX, &[vhost_tests::frontend::Buf::wo(gpa, 8)]);
    let _ = d.fe.wait(queue::CONTROL_TX, 1);
    let bad = b.stat(|s| &s.bad_input) - before;
    assert!(bad >= 7, "only {bad} bad inputs counted");
    // Still fully functional.
    let m = d.handshake(6);
    assert!(has(&m, 1, event::CONSOLE_PORT, 1));
    let start = Instant::now();
    d.send_ctrl(4, event::PORT_OPEN, 1);
    let n = d.write_port(4, b"ok\n", 3);
    assert_eq!(d.wait_tx(4, n, Duration::from_secs(5)), n);
    assert_eq!(std::fs::read(b.path("log.txt")).unwrap(), b"ok\n");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn tx_on_a_missing_port_is_returned() {
    // Port ids 0 (console) and 1 exist; 2 does not.
    let b = TestBackend::start(3, |d| {
        vec![
            console(HostKind::File(d.join("c.txt"))),
            named("x", HostKind::File(d.join("x.txt"))),
        ]
    });
    let mut d = Driver::connect(&b);
    d.handshake(2);
    let before = b.stat(|s| &s.bad_input);
    let n = d.write_port(2, b"nobody", 6);
    assert_eq!(d.wait_tx(2, n, Duration::from_secs(5)), n);
    assert!(b.stat(|s| &s.bad_input) > before);
}

#[test]
fn a_broken_tx_ring_is_parked_and_the_other_ports_keep_working() {
    const T: Duration = Duration::from_secs(5);
    let b = TestBackend::start(3, |d| {
        vec![
            console(HostKind::File(d.join("c.txt"))),
            named("x", HostKind::File(d.join("x.txt"))),
        ]
    });
    let mut d = Driver::connect(&b);
    d.handshake(2);
    // Port 1's transmit ring: avail index the ring size + 5 ahead of the device.
    let q = queue::tx(1);
    let err = d.fe.set_vring_err(q).unwrap();
    let dq = &mut d.fe.queues[usize::from(q)];
    let bad = dq.avail_idx().wrapping_add(dq.size + 5);
    dq.force_avail_idx(&d.fe.mem, bad);
    dq.notify();
    assert!(wait_eventfd(&err, T), "VRING_ERR was not signalled");
    assert_eq!(
        b.stats[usize::from(q)]
            .broken
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // The worker serves the other rings (all of them share it here).
    let n = d.write_port(0, b"still here\n", 64);
    assert_eq!(d.wait_tx(0, n, T), n);
    assert_eq!(std::fs::read(b.path("c.txt")).unwrap(), b"still here\n");
    // (A backend stuck on the ring would never answer: fail instead of hanging.)
    let base = d.fe.within(T, |fe| fe.fe.get_vring_base(usize::from(q)));
    assert_eq!(base.expect("GET_VRING_BASE"), 0);
}

/// Keeps transmit queue `q` full of slow chains (each an indirect table of 512 one-byte
/// buffers, so the backend needs a while per ring) for `flood`, republishing every chain
/// the backend returns at once; meanwhile writes a line on file port `other` and returns
/// how long that took (None: not within the flood).
fn other_port_during_flood(
    b: &TestBackend,
    d: &mut Driver,
    q: u16,
    other: u32,
    flood: Duration,
) -> Option<Duration> {
    use vhost_tests::frontend::{Buf, Used, F_INDIRECT};
    const DESCS: usize = 512;
    let byte = d.fe.alloc(1);
    d.fe.write(byte, b"z");
    let table = d.fe.alloc(16 * DESCS as u64);
    let qi = usize::from(q);
    let size = usize::from(d.fe.queues[qi].size);
    let first = d.fe.queues[qi].add_indirect(&d.fe.mem, table, &vec![Buf::ro(byte, 1); DESCS]);
    let mut heads = vec![first];
    for _ in 1..size {
        let id = d.fe.queues[qi].reserve(1)[0];
        d.fe.queues[qi].write_desc(&d.fe.mem, id, table, (16 * DESCS) as u32, F_INDIRECT, 0);
        heads.push(id);
    }
    d.fe.queues[qi].publish_many(&d.fe.mem, &heads);
    d.fe.queues[qi].notify();
    let start = Instant::now();
    let mut used: Vec<Used> = Vec::new();
    let mut sent: Option<Instant> = None;
    let mut took = None;
    let oq = usize::from(queue::tx(other));
    while start.elapsed() < flood {
        used.clear();
        d.fe.queues[qi].take_used_into(&d.fe.mem, &mut used);
        let again: Vec<u16> = used.iter().map(|u| u.id as u16).collect();
        d.fe.queues[qi].publish_many(&d.fe.mem, &again);
        d.fe.queues[qi].notify();
        if sent.is_none() && start.elapsed() > Duration::from_millis(200) {
            d.write_port(other, b"served\n", 64);
            sent = Some(Instant::now());
        }
        if let (Some(t), None) = (sent, took) {
            if !d.fe.queues[oq].take_used(&d.fe.mem).is_empty() {
                took = Some(t.elapsed());
            }
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    let _ = b;
    took
}

#[test]
fn a_flooded_tx_ring_does_not_starve_the_other_ports() {
    const FLOOD: Duration = Duration::from_secs(3);
    // Port 0: a console whose socket has no client (its output goes to the backlog);
    // port 1: a file; ports 2 and 3 do not exist.
    let b = TestBackend::start(4, |d| {
        vec![
            console(HostKind::Socket(d.join("c.sock"))),
            named("x", HostKind::File(d.join("x.txt"))),
        ]
    });
    let mut d = Driver::connect(&b);
    d.handshake(2);
    let bad_before = b.stat(|s| &s.bad_input);
    for (what, q) in [
        ("a port that does not exist", queue::tx(3)),
        ("a console without client", queue::tx(0)),
    ] {
        let took = other_port_during_flood(&b, &mut d, q, 1, FLOOD);
        assert!(
            took.is_some_and(|t| t < Duration::from_secs(1)),
            "port 1 waited {took:?} (None: more than the whole {FLOOD:?} flood) while the \
             tx ring of {what} was flooded"
        );
    }
    assert!(b.stat(|s| &s.bad_input) > bad_before);
    let n = d.write_port(1, b"end\n", 64);
    assert_eq!(d.wait_tx(1, n, Duration::from_secs(10)), n);
    let log = std::fs::read(b.path("x.txt")).unwrap();
    assert_eq!(log, b"served\nserved\nend\n");
}
