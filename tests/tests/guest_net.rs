//! vhost-net-backend in a real QEMU guest: ping and iperf3 both ways over the tap, beside
//! QEMU's own `-netdev tap,vhost=off` measured in the same run.
//!
//! The backend runs inside a network namespace the test creates (`ip netns exec`), so
//! its tap, the link-local addresses and the iperf3 server never touch the host's
//! network; QEMU only talks to the backend over the unix socket. The baseline tap is
//! created in the host namespace (QEMU opens it there) and moved into the test's
//! namespace as soon as the guest starts. Needs root, QEMU and the guest kernel (see
//! `tests/guest/setup.sh`); otherwise a loud SKIPPED. The backend binary is
//! `$VHOST_NET_BACKEND` or the newest `target/{release,debug}/vhost-net-backend`.
//!
//! A second test runs two guests at once, each on its own backend process, with both
//! taps enslaved to one bridge inside the test's namespace: the guests ping each other
//! and one sends a random payload the other checks (sha256).

use std::process::Command;
use std::time::Duration;

use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use vhost_tests::guest::{parse_console, Backend, GuestBoot, GuestTest};
use vhost_tests::guest_net::{
    locate_vhost_net_backend, vhost_user_net_args, wait_socket_file, KillOnDrop, NetNs,
};

const HOST_IP: &str = "169.254.77.1";
const HOST_CIDR: &str = "169.254.77.1/30";
const GUEST_CIDR: &str = "169.254.77.2/30";
const IPERF_TIME: u32 = 3;

fn boot_iperf(t: &mut GuestTest, qemu_args: Vec<String>, cpus: u32) -> (f64, f64, String) {
    let out = t.boot(
        &GuestBoot::new("net-iperf.sh")
            .env("GUEST_IP", GUEST_CIDR)
            .env("HOST_IP", HOST_IP)
            .env("IPERF_TIME", IPERF_TIME)
            .cpus(cpus)
            .timeout(Duration::from_secs(180))
            .qemu_args(qemu_args),
    );
    out.assert_success();
    assert_eq!(out.result("ping"), "ok");
    let f = |k: &str| out.result(k).parse::<f64>().unwrap_or(0.0);
    (
        f("iperf_tx_mbps"),
        f("iperf_rx_mbps"),
        out.result("queues").to_string(),
    )
}

#[test]
fn guest_net_ping_and_iperf_vhost_user_vs_qemu_tap() {
    let Some(mut t) = GuestTest::start("guest_net_ping_and_iperf") else {
        return;
    };
    let bin = locate_vhost_net_backend().unwrap_or_else(|e| panic!("{e}"));

    // --- our backend, 2 queue pairs, tap inside the namespace ---
    let ns = NetNs::create("vu").unwrap_or_else(|e| panic!("{e}"));
    let sock = t.path("net.sock");
    let mut cmd = ns.command(&bin);
    cmd.arg("--socket-path")
        .arg(&sock)
        .args(["--tap", "vutap0", "--num-queue-pairs", "2"]);
    let mut be = t.spawn_backend("backend", cmd).expect("start backend");
    // The harness's wait_for_socket reads /proc/net/unix of our namespace, which does not
    // show a socket bound inside another one; std binds and listens in one step, so the
    // socket file appearing is enough.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !sock.exists() {
        assert!(be.is_running(), "backend exited early; see backend.log");
        assert!(
            std::time::Instant::now() < deadline,
            "backend did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ns.run(&["ip", "addr", "add", HOST_CIDR, "dev", "vutap0"])
        .and_then(|()| ns.run(&["ip", "link", "set", "vutap0", "up"]))
        .unwrap_or_else(|e| panic!("{e}"));
    let _iperf = ns
        .iperf3_server(&t.path("iperf3-vu.log"))
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(300));
    let (vu_tx, vu_rx, queues) = boot_iperf(
        &mut t,
        vhost_user_net_args(&sock, 2, "52:54:00:00:77:02"),
        2,
    );
    assert_eq!(queues, "2", "guest sees 2 queue pairs");
    assert!(vu_tx > 0.0 && vu_rx > 0.0, "iperf3 moved no data");
    be.stop().expect("backend exits cleanly on SIGTERM");
    drop(_iperf);
    drop(ns);

    // --- QEMU's own tap, vhost=off, same guest and addresses ---
    let ns = NetNs::create("qt").unwrap_or_else(|e| panic!("{e}"));
    let tap = format!("vqt{}", std::process::id() % 100_000);
    let status = Command::new("ip")
        .args(["tuntap", "add", &tap, "mode", "tap", "vnet_hdr"])
        .status()
        .expect("ip tuntap");
    assert!(status.success(), "cannot create tap {tap}");
    struct DelTap(String);
    impl Drop for DelTap {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).status();
        }
    }
    let _deltap = DelTap(tap.clone());
    // Up without addresses (no IPv6 chatter), so its carrier shows when QEMU attaches.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6"), "1");
    let status = Command::new("ip")
        .args(["link", "set", &tap, "up"])
        .status()
        .expect("ip link");
    assert!(status.success(), "cannot bring up {tap}");
    let ns_name = ns.name.clone();
    let tap2 = tap.clone();
    // QEMU opens the tap before the guest runs: move it into the namespace and configure
    // it shortly after boot starts (the guest retries ping for 30 s).
    let mover = std::thread::spawn(move || {
        for _ in 0..200 {
            std::thread::sleep(Duration::from_millis(100));
            // A persistent tap has no carrier until QEMU attaches to it.
            let attached = std::fs::read_to_string(format!("/sys/class/net/{tap2}/carrier"))
                .is_ok_and(|c| c.trim() == "1");
            if attached {
                std::thread::sleep(Duration::from_millis(500));
                let ok = Command::new("ip")
                    .args(["link", "set", &tap2, "netns", &ns_name])
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    let _ = Command::new("ip")
                        .args([
                            "netns", "exec", &ns_name, "ip", "addr", "add", HOST_CIDR, "dev", &tap2,
                        ])
                        .status();
                    let _ = Command::new("ip")
                        .args(["netns", "exec", &ns_name, "ip", "link", "set", &tap2, "up"])
                        .status();
                    return true;
                }
            }
        }
        false
    });
    let _iperf = ns
        .iperf3_server(&t.path("iperf3-qt.log"))
        .expect("iperf3 server");
    let args = vec![
        "-netdev".to_string(),
        format!("tap,id=n1,ifname={tap},script=no,downscript=no,vhost=off"),
        "-device".to_string(),
        "virtio-net-pci,netdev=n1,mac=52:54:00:00:77:03,romfile=".to_string(),
    ];
    let (qt_tx, qt_rx, _) = boot_iperf(&mut t, args, 2);
    assert!(mover.join().unwrap_or(false), "could not move the tap");
    eprintln!(
        "@@MEASURED iperf3 Mbit/s guest->host / host->guest: vhost-net-backend {vu_tx} / {vu_rx}, \
         QEMU tap vhost=off {qt_tx} / {qt_rx}"
    );
}

const PEER_A_IP: &str = "169.254.78.1";
const PEER_B_IP: &str = "169.254.78.2";
const PEER_PAYLOAD_KIB: u32 = 2048;

/// Starts vhost-net-backend inside `ns` on tap `tap` (one queue pair), waits for its
/// socket and enslaves the tap to `br`.
fn bridged_backend(
    t: &GuestTest,
    ns: &NetNs,
    bin: &Path,
    name: &str,
    tap: &str,
    br: &str,
) -> (Backend, std::path::PathBuf) {
    let sock = t.path(&format!("{name}.sock"));
    let mut cmd = ns.command(bin);
    cmd.arg("--socket-path").arg(&sock).args(["--tap", tap]);
    let mut be = t.spawn_backend(name, cmd).expect("start backend");
    wait_socket_file(&mut be, &sock, Duration::from_secs(15)).unwrap_or_else(|e| panic!("{e}"));
    ns.enslave(tap, br).unwrap_or_else(|e| panic!("{e}"));
    (be, sock)
}

#[test]
fn guest_net_two_guests_on_a_bridge() {
    let Some(mut t) = GuestTest::start("guest_net_two_guests_on_a_bridge") else {
        return;
    };
    let started = Instant::now();
    let bin = locate_vhost_net_backend().unwrap_or_else(|e| panic!("{e}"));
    let ns = NetNs::create("br").unwrap_or_else(|e| panic!("{e}"));
    ns.add_bridge("vbr0").unwrap_or_else(|e| panic!("{e}"));
    let (mut be_a, sock_a) = bridged_backend(&t, &ns, &bin, "backend-a", "vbta", "vbr0");
    let (mut be_b, sock_b) = bridged_backend(&t, &ns, &bin, "backend-b", "vbtb", "vbr0");

    let peer = |role: &str, ip: &str, peer_ip: &str| {
        GuestBoot::new("net-peer.sh")
            .env("ROLE", role)
            .env("GUEST_IP", format!("{ip}/24"))
            .env("PEER_IP", peer_ip)
            .env("PAYLOAD_KIB", PEER_PAYLOAD_KIB)
            .timeout(Duration::from_secs(120))
    };
    // Guest B (receiver) runs in a QEMU of our own; guest A through the harness.
    let boot_b = peer("recv", PEER_B_IP, PEER_A_IP).qemu_args(vhost_user_net_args(
        &sock_b,
        1,
        "52:54:00:00:78:02",
    ));
    let initrd_b = t.path("b.initrd");
    t.build_initrd(&boot_b, &initrd_b)
        .expect("initrd for guest B");
    let console_b = t.path("b.console.log");
    let mut cmd_b = t.qemu_command(&boot_b, &initrd_b);
    cmd_b
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&console_b).expect("console log"))
        .stderr(std::fs::File::create(t.path("b.qemu-stderr.log")).expect("stderr log"));
    let mut qemu_b = KillOnDrop(cmd_b.spawn().expect("start QEMU for guest B"));

    let boot_a = peer("send", PEER_A_IP, PEER_B_IP).qemu_args(vhost_user_net_args(
        &sock_a,
        1,
        "52:54:00:00:78:01",
    ));
    let out_a = t.boot(&boot_a);
    out_a.assert_success();
    assert_eq!(out_a.result("ping"), "ok");
    assert_eq!(out_a.result("sent"), "ok");

    let deadline = Instant::now() + Duration::from_secs(60);
    let status_b = loop {
        if let Some(st) = qemu_b.0.try_wait().expect("wait for QEMU B") {
            break Some(st);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = std::fs::remove_file(&initrd_b);
    let console = std::fs::read_to_string(&console_b)
        .unwrap_or_default()
        .replace('\r', "");
    let (results_b, exit_b) = parse_console(&console);
    assert!(status_b.is_some(), "guest B did not finish:\n{console}");
    assert_eq!(exit_b, Some(0), "guest B failed:\n{console}");
    let get = |k: &str| results_b.get(k).map(String::as_str).unwrap_or("");
    assert_eq!(get("ping"), "ok", "guest B could not ping A");
    assert_eq!(get("recv_bytes"), out_a.result("sent_bytes"));
    assert_eq!(
        get("recv_sha"),
        out_a.result("sent_sha"),
        "payload corrupted"
    );
    assert_eq!(
        get("recv_bytes"),
        (u64::from(PEER_PAYLOAD_KIB) * 1024).to_string()
    );
    be_a.stop().expect("backend A exits cleanly on SIGTERM");
    be_b.stop().expect("backend B exits cleanly on SIGTERM");
    eprintln!(
        "@@MEASURED two bridged guests: {} KiB A->B verified, {:.1}s",
        PEER_PAYLOAD_KIB,
        started.elapsed().as_secs_f64()
    );
}
