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

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use vhost_tests::guest::{parse_console, Backend, GuestBoot, GuestTest};
use vhost_tests::guest_net::{
    iperf_qemu_tap, iperf_vhost_user, locate_vhost_net_backend, vhost_user_net_args,
    wait_socket_file, KillOnDrop, NetNs,
};

const IPERF_TIME: u32 = 3;

#[test]
fn guest_net_ping_and_iperf_vhost_user_vs_qemu_tap() {
    let Some(mut t) = GuestTest::start("guest_net_ping_and_iperf") else {
        return;
    };
    let bin = locate_vhost_net_backend().unwrap_or_else(|e| panic!("{e}"));

    // Our backend, 2 queue pairs, tap inside a namespace of its own.
    let vu = iperf_vhost_user(&mut t, &bin, 2, 2, IPERF_TIME, "backend")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(vu.queues, "2", "guest sees 2 queue pairs");
    assert!(vu.tx_mbps > 0.0 && vu.rx_mbps > 0.0, "iperf3 moved no data");

    // QEMU's own tap, vhost=off, same guest and addresses.
    let qt = iperf_qemu_tap(&mut t, 2, IPERF_TIME, "qemu-tap").unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "@@MEASURED iperf3 Mbit/s guest->host / host->guest: vhost-net-backend {} / {}, \
         QEMU tap vhost=off {} / {}",
        vu.tx_mbps, vu.rx_mbps, qt.tx_mbps, qt.rx_mbps
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
    two_guests_on_a_bridge("guest_net_two_guests_on_a_bridge", false);
}

/// The same two guests with packed virtqueues (`packed=on`): the Linux driver's packed
/// rings both ways (A sends, B receives, both ping), the payload checked.
#[test]
fn guest_net_two_guests_on_a_bridge_packed_rings() {
    two_guests_on_a_bridge("guest_net_two_guests_on_a_bridge_packed_rings", true);
}

/// The guests' NIC arguments: `vhost_user_net_args`, with `packed=on` if `packed`.
fn nic_args(sock: &Path, mac: &str, packed: bool) -> Vec<String> {
    let mut args = vhost_user_net_args(sock, 1, mac);
    if packed {
        if let Some(dev) = args.last_mut() {
            dev.push_str(",packed=on");
        }
    }
    args
}

/// VIRTIO_F_RING_PACKED in the features string a guest read from sysfs (bit 34 is
/// character 34).
fn packed_negotiated(features: &str) -> bool {
    features.as_bytes().get(34) == Some(&b'1')
}

fn two_guests_on_a_bridge(name: &str, packed: bool) {
    let Some(mut t) = GuestTest::start(name) else {
        return;
    };
    let started = Instant::now();
    let bin = locate_vhost_net_backend().unwrap_or_else(|e| panic!("{e}"));
    let ns = NetNs::create(if packed { "brp" } else { "br" }).unwrap_or_else(|e| panic!("{e}"));
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
    let boot_b = peer("recv", PEER_B_IP, PEER_A_IP).qemu_args(nic_args(
        &sock_b,
        "52:54:00:00:78:02",
        packed,
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

    let boot_a = peer("send", PEER_A_IP, PEER_B_IP).qemu_args(nic_args(
        &sock_a,
        "52:54:00:00:78:01",
        packed,
    ));
    let out_a = t.boot(&boot_a);
    out_a.assert_success();
    assert_eq!(
        packed_negotiated(out_a.result("features")),
        packed,
        "guest A's virtio features: {}",
        out_a.result("features")
    );
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
    assert_eq!(
        packed_negotiated(get("features")),
        packed,
        "guest B's virtio features: {}",
        get("features")
    );
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
        "@@MEASURED two bridged guests{}: {} KiB A->B verified, {:.1}s",
        if packed { " (packed rings)" } else { "" },
        PEER_PAYLOAD_KIB,
        started.elapsed().as_secs_f64()
    );
}
