//! The console's state in the VMM's migration (vhost-user DEVICE_STATE), on the frontend
//! harness acting as QEMU would: the source's rings stopped, its state saved through a
//! pipe; the same guest memory and rings attached to a destination serial-backend that
//! loads the state before its rings start. The guest's view of every port carries over
//! (no re-announce), the console's held output reaches the destination's host side, and
//! data flows both ways on an open port right away. (No QEMU console device migrates
//! today: QEMU's vhost-user-test-device refuses; this keeps the backend ready for one.)

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serial_backend::ports::HostKind;
use serial_backend::spec::event;
use serial_backend::state;
use serial_backend::PortSpec;
use vhost_tests::frontend::load_device_state;

fn ports(d: &Path) -> Vec<PortSpec> {
    vec![
        console(HostKind::Socket(d.join("con.sock"))),
        named("org.test.a", HostKind::Socket(d.join("a.sock"))),
    ]
}

/// Reads from `s` until `want` bytes came (10 s at most).
fn read_exactly(s: &mut UnixStream, want: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < want {
        assert!(
            Instant::now() < deadline,
            "got {:?} of {want} bytes",
            String::from_utf8_lossy(&got)
        );
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    got
}

#[test]
fn the_console_state_moves_with_the_vm_and_the_destination_carries_on() {
    let src = TestBackend::start(4, ports);
    let dst = TestBackend::start(4, ports);
    let mut d = Driver::connect(&src);
    d.handshake(2);
    d.send_ctrl(1, event::PORT_OPEN, 1);
    // The console has no host client: its output waits in the backlog.
    let n = d.write_port(0, b"boot messages\n", 64);
    assert_eq!(d.wait_tx(0, n, Duration::from_secs(10)), n);

    let saved = d.fe.save_device_state().expect("save");
    let s = state::decode(&saved).expect("a state this program reads");
    let con = s.ports.iter().find(|p| p.id == 0).expect("port 0");
    assert!(con.guest_ready);
    assert_eq!(con.held_output, b"boot messages\n");
    let a = s.ports.iter().find(|p| p.id == 1).expect("port 1");
    assert!(a.guest_ready && a.guest_open && !a.host_open_sent);

    d.fe.reconnect_with(&dst.socket, |fe| load_device_state(fe, &saved))
        .expect("the destination takes the state");
    // A host client on the destination's console gets what the guest wrote on the source.
    let mut con = UnixStream::connect(dst.path("con.sock")).unwrap();
    assert_eq!(read_exactly(&mut con, 14), b"boot messages\n");
    // Port 1 is ready and open without a new handshake: a client connecting is announced
    // to the guest, and data goes both ways.
    let mut a = UnixStream::connect(dst.path("a.sock")).unwrap();
    let msgs = d.wait_ctrl("PORT_OPEN for the new client", |m| {
        has(m, 1, event::PORT_OPEN, 1)
    });
    assert!(
        !msgs.iter().any(|(c, _)| c.event == event::DEVICE_ADD),
        "the destination asked the driver to announce its ports again: {msgs:?}"
    );
    a.write_all(b"to the guest").unwrap();
    assert_eq!(d.read_port(1, 12, Duration::from_secs(10)), b"to the guest");
    let n = d.write_port(1, b"from the guest", 64);
    assert_eq!(d.wait_tx(1, n, Duration::from_secs(10)), n);
    assert_eq!(read_exactly(&mut a, 14), b"from the guest");
}

#[test]
fn a_destination_with_other_ports_refuses_the_state() {
    let src = TestBackend::start(4, ports);
    let dst = TestBackend::start(4, |d| vec![console(HostKind::Socket(d.join("con.sock")))]);
    let mut d = Driver::connect(&src);
    d.handshake(2);
    let saved = d.fe.save_device_state().expect("save");
    d.fe.reconnect_with(&dst.socket, |fe| load_device_state(fe, &saved))
        .expect_err("another port layout must be refused");
    // A damaged state is refused too, and the backend keeps serving connections.
    let mut damaged = saved.clone();
    damaged.truncate(damaged.len() - 1);
    let dst2 = TestBackend::start(4, ports);
    let mut d2 = Driver::connect(&src);
    d2.handshake(2);
    d2.fe.save_device_state().expect("save again");
    assert!(d2
        .fe
        .reconnect_with(&dst2.socket, |fe| load_device_state(fe, &damaged))
        .is_err());
    // The VMM gives up on this destination (one frontend at a time); a fresh one works.
    drop(d2);
    let mut d3 = Driver::connect(&dst2);
    assert_eq!(
        d3.handshake(2)
            .iter()
            .filter(|(c, _)| c.event == event::DEVICE_ADD)
            .count(),
        2
    );
}

/// The real program, under its default seccomp sandbox: the state moves between two
/// processes (the transfer threads' filter allows what they do), and both exit 0.
#[test]
fn the_programs_move_the_state_under_their_sandbox() {
    use std::process::{Command, Stdio};
    use vhost_tests::guest_net::KillOnDrop;
    let dir = tempfile::tempdir().unwrap();
    let log =
        |name: &str| std::fs::read_to_string(dir.path().join(name).join("log")).unwrap_or_default();
    let start = |name: &str| -> KillOnDrop {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let out = std::fs::File::create(d.join("log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_serial-backend"))
            .arg("--socket-path")
            .arg(d.join("vhost.sock"))
            .args(["--max-ports", "4"])
            .arg("--console")
            .arg(format!("socket={}", d.join("con.sock").display()))
            .arg("--port")
            .arg(format!(
                "name=org.test.a,socket={}",
                d.join("a.sock").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("start serial-backend");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !d.join("vhost.sock").exists() {
            assert!(Instant::now() < deadline, "{name} is not listening");
            std::thread::sleep(Duration::from_millis(10));
        }
        KillOnDrop(child)
    };
    let mut src = start("src");
    let mut dst = start("dst");
    let mut d = Driver::connect_socket(&dir.path().join("src/vhost.sock"), 4);
    d.handshake(2);
    d.send_ctrl(1, event::PORT_OPEN, 1);
    let n = d.write_port(0, b"held\n", 64);
    assert_eq!(d.wait_tx(0, n, Duration::from_secs(10)), n);
    let saved =
        d.fe.save_device_state()
            .unwrap_or_else(|e| panic!("save under the sandbox: {e}\n{}", log("src")));
    d.fe.reconnect_with(&dir.path().join("dst/vhost.sock"), |fe| {
        load_device_state(fe, &saved)
    })
    .unwrap_or_else(|e| panic!("load under the sandbox: {e}\n{}", log("dst")));
    let mut con = UnixStream::connect(dir.path().join("dst/con.sock")).unwrap();
    assert_eq!(read_exactly(&mut con, 5), b"held\n");
    drop(d);
    for (name, c) in [("src", &mut src), ("dst", &mut dst)] {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(c.0.id() as i32, libc::SIGTERM) };
        let st = c.0.wait().unwrap();
        assert!(st.success(), "{name}: {st:?}\n{}", log(name));
    }
}
