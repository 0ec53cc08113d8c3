//! serial-backend in a real QEMU guest: QEMU 11.1 (trixie chroot, set up by
//! `tests/guest/setup-qemu-trixie.sh`) with `vhost-user-test-device-pci,virtio-id=3`.
//!
//! Two consoles and three named ports plus hostinfo: the guest writes 4 MiB of random
//! data to each named port and the host checks it byte for byte (sha256), the host sends
//! 4 MiB to each and the guest checks it, the guest reads the hostinfo JSON and its
//! hostname must be the host's. Skips loudly without root/QEMU 11 (VHOST_GUEST_REQUIRE=1
//! makes that a failure).

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use vhost_tests::console_bench::{console_guest_or_skip, console_throughput, ConsoleImpl};
use vhost_tests::guest::GuestBoot;
use vhost_tests::guest_console::{
    connect_retry, locate_serial_backend, pattern, sha_to_eof, vhost_user_console_args,
};

const PORT_BYTES: usize = 4 << 20;

#[test]
fn guest_console_ports() {
    let Some(mut t) = console_guest_or_skip("guest_console_ports") else {
        return;
    };
    let bin = locate_serial_backend().unwrap_or_else(|e| panic!("{e}"));
    let sock = t.path("console.sock");
    let mut cmd = Command::new(&bin);
    cmd.arg("--socket-path").arg(&sock);
    for c in ["con0", "con1"] {
        cmd.arg("--console")
            .arg(format!("socket={}", t.path(&format!("{c}.sock")).display()));
    }
    for i in 1..=3 {
        cmd.arg("--port").arg(format!(
            "name=org.test.p{i},socket={}",
            t.path(&format!("p{i}.sock")).display()
        ));
    }
    cmd.arg("--hostinfo");
    let mut be = t
        .spawn_backend("serial-backend", cmd)
        .unwrap_or_else(|e| panic!("{e}"));
    be.wait_for_socket(&sock, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}"));

    // Host side: console readers and, per named port, read to EOF then send.
    let mut consoles = Vec::new();
    for c in ["con0", "con1"] {
        let mut s = connect_retry(&t.path(&format!("{c}.sock")), Duration::from_secs(10)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
        consoles.push(std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&got).contains("hello from hvc") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            String::from_utf8_lossy(&got).into_owned()
        }));
    }
    let mut ports = Vec::new();
    for i in 1..=3u32 {
        let mut s = connect_retry(&t.path(&format!("p{i}.sock")), Duration::from_secs(10)).unwrap();
        ports.push(std::thread::spawn(move || {
            let rx = sha_to_eof(&mut s).expect("reading guest data");
            let (data, sha) = pattern(i * 7919, PORT_BYTES);
            s.write_all(&data).expect("sending to the guest");
            (rx, sha)
        }));
    }

    let boot = GuestBoot::new("console-ports.sh")
        .env("PORT_BYTES", PORT_BYTES)
        .qemu_args(vhost_user_console_args(&sock, 31))
        .timeout(Duration::from_secs(400));
    let out = t.boot(&boot);
    out.assert_success();
    assert_eq!(out.result("hvc0"), "yes");
    assert_eq!(out.result("hvc1"), "yes");
    assert_eq!(out.result_u64("nports"), 6);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(out.result("hostinfo_hostname"), host.trim());
    for (i, h) in ports.into_iter().enumerate() {
        let ((rx_sha, rx_n, secs), tx_sha) = h.join().expect("port thread");
        let n = i + 1;
        assert_eq!(rx_n, PORT_BYTES as u64, "port {n}: guest → host bytes");
        assert_eq!(
            out.result(&format!("tx_sha_{n}")),
            rx_sha,
            "port {n}: guest → host data"
        );
        assert_eq!(
            out.result(&format!("rx_sha_{n}")),
            tx_sha,
            "port {n}: host → guest data"
        );
        eprintln!("port {n}: guest → host {rx_n} bytes in {secs:.2}s");
    }
    for (i, c) in consoles.into_iter().enumerate() {
        let got = c.join().unwrap();
        assert!(
            got.contains(&format!("hello from hvc{i}")),
            "console {i}: {got:?}"
        );
    }
    eprintln!(
        "guest_console_ports: guest tx {}s, rx {}s for 3 x {} MiB",
        out.result("tx_secs"),
        out.result("rx_secs"),
        PORT_BYTES >> 20
    );
    be.stop_expect_clean();
}

/// MB/s through one port, guest → host and host → guest: serial-backend vs QEMU's
/// built-in virtio-serial (socket chardev), same QEMU, same run (the measurement is
/// `vhost_tests::console_bench`, shared with `bench compare serial`). Manual: `cargo test
/// -p vhost-tests --test guest_console -- --ignored --nocapture`.
#[test]
#[ignore]
fn guest_console_bench() {
    let Some(mut t) = console_guest_or_skip("guest_console_bench") else {
        return;
    };
    let bin = locate_serial_backend().unwrap_or_else(|e| panic!("{e}"));
    let mut results = Vec::new();
    for which in ConsoleImpl::ALL {
        let r = console_throughput(&mut t, which, &bin, 256).unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "BENCH {}: guest → host {:.1} MB/s, host → guest {:.1} MB/s",
            which.name(),
            r.guest_to_host_mbs,
            r.host_to_guest_mbs
        );
        results.push((which.name(), r));
    }
    eprintln!("BENCH results: {results:?}");
}
