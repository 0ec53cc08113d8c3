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

use std::process::Command;
use std::time::Duration;

use vhost_tests::guest::{GuestBoot, GuestTest};
use vhost_tests::guest_net::{locate_vhost_net_backend, vhost_user_net_args, NetNs};

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
