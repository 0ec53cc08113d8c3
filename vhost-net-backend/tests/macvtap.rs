//! `--macvtap IFNAME` end to end: the real binary runs inside a network namespace the test
//! creates (`ip netns exec`), on a macvtap in bridge mode whose lower device is one end
//! of a veth pair (this kernel may have no `dummy` driver; a veth also lets frames be
//! injected). A packet socket on the other veth end sees the frames the frontend
//! transmits and injects frames addressed to the macvtap, which land in RX buffers.
//!
//! The second test removes the macvtap's `/dev/tapN` first (as on a host without udev
//! and devtmpfs, or where a macvtap in another namespace owns the name): the backend
//! must find the device numbers in sysfs and open a private node instead.

mod common;

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use vhost_net_backend::spec::{NetHdr, HDR_LEN};
use vhost_tests::frontend::{FrontendOptions, TestFrontend};
use vhost_tests::guest_net::{KillOnDrop, NetNs};

const T: Duration = Duration::from_secs(5);
const MACVTAP: &str = "vmt0";
const LOWER: &str = "vml0";
const PEER: &str = "vmp0";
const MACVTAP_MAC: &str = "02:00:00:00:00:02";

/// Both tests make a macvtap with the same ifindex in fresh namespaces, so the same
/// `/dev/tapN` name: run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

struct Setup {
    ns: NetNs,
    dir: tempfile::TempDir,
    /// The macvtap's `/dev/tapN` and its device number (from sysfs).
    dev_node: PathBuf,
    rdev: u64,
}

fn setup(tag: &str, test: &str) -> Option<Setup> {
    let _ = env_logger::builder().is_test(true).try_init();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        vhost_tests::guest::report_skip(test, "needs root (network namespace, macvtap)");
        return None;
    }
    let ns = match NetNs::create(tag) {
        Ok(ns) => ns,
        Err(e) => {
            vhost_tests::guest::report_skip(
                test,
                &format!("cannot create a network namespace: {e}"),
            );
            return None;
        }
    };
    let _ = ns.run(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    let _ = ns.run(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
    ns.run(&[
        "ip", "link", "add", LOWER, "type", "veth", "peer", "name", PEER,
    ])
    .expect("veth pair");
    if let Err(e) = ns.run(&[
        "ip", "link", "add", "link", LOWER, "name", MACVTAP, "type", "macvtap", "mode", "bridge",
    ]) {
        vhost_tests::guest::report_skip(test, &format!("no macvtap support: {e}"));
        return None;
    }
    ns.run(&["ip", "link", "set", MACVTAP, "address", MACVTAP_MAC])
        .expect("macvtap address");
    for dev in [LOWER, PEER, MACVTAP] {
        ns.run(&["ip", "link", "set", dev, "up"]).expect("link up");
    }
    // sysfs as the namespace sees it (`ip netns exec` remounts /sys).
    let out = ns
        .command("sh")
        .args([
            "-c",
            &format!(
                "i=$(cat /sys/class/net/{MACVTAP}/ifindex); echo $i; cat /sys/class/net/{MACVTAP}/macvtap/tap$i/dev"
            ),
        ])
        .output()
        .expect("read sysfs");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let ifindex = lines.next().expect("ifindex").trim().to_string();
    let (maj, min) = lines
        .next()
        .and_then(|l| l.trim().split_once(':'))
        .map(|(a, b)| (a.parse::<u32>().unwrap(), b.parse::<u32>().unwrap()))
        .expect("macvtap device numbers in sysfs");
    Some(Setup {
        ns,
        dir: tempfile::tempdir().expect("tempdir"),
        dev_node: PathBuf::from(format!("/dev/tap{ifindex}")),
        rdev: libc::makedev(maj, min),
    })
}

impl Setup {
    /// Whether `/dev/tapN` exists and is this macvtap's node.
    fn dev_node_is_ours(&self) -> bool {
        std::fs::metadata(&self.dev_node)
            .is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == self.rdev)
    }

    /// Starts the binary in the namespace on the macvtap; returns it and its log path.
    fn start_backend(&self) -> (KillOnDrop, PathBuf, PathBuf) {
        let sock = self.dir.path().join("net.sock");
        let log = self.dir.path().join("backend.log");
        let f = File::create(&log).expect("log");
        let mut cmd = self.ns.command(env!("CARGO_BIN_EXE_vhost-net-backend"));
        cmd.arg("--socket-path")
            .arg(&sock)
            .args(["--macvtap", MACVTAP, "--queue-size", "128"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("log"))
            .stderr(f);
        let mut child = KillOnDrop(cmd.spawn().expect("start vhost-net-backend"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            if let Ok(Some(st)) = child.0.try_wait() {
                panic!("backend exited ({st}):\n{}", read(&log));
            }
            assert!(Instant::now() < deadline, "backend did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        (child, sock, log)
    }

    /// A packet socket on the veth end opposite the macvtap.
    fn peer_socket(&self) -> PacketSocket {
        packet_socket_in_netns(&self.ns.name, PEER, false)
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn mac_bytes(s: &str) -> [u8; 6] {
    vhost_net_backend::tap::parse_mac(s).expect("mac")
}

/// TX from the frontend shows up on the veth peer; a frame injected there for the
/// macvtap's MAC lands in an RX buffer.
fn tx_and_rx(st: &Setup, sock: &Path, log: &Path) {
    let guest_mac = mac_bytes(MACVTAP_MAC);
    let mut fe = TestFrontend::connect(
        sock,
        FrontendOptions {
            num_queues: 3,
            queue_size: 128,
            event_idx: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("connect: {e}\n{}", read(log)));
    // The MAC in config space defaults to the macvtap's.
    assert_eq!(fe.config(0, 6).expect("config"), guest_mac.to_vec());
    let peer = st.peer_socket();

    let frame = test_frame(HOST_MAC, guest_mac, 0x6d76_0001, 300);
    send_tx(&mut fe, 0, NetHdr::default(), &frame);
    let used = fe.wait(1, 1).expect("tx completion");
    assert_eq!(used[0].len, 0);
    let (_, got) = peer
        .recv_matching(T, |f| has_tag(f, 0x6d76_0001))
        .expect("TX frame on the macvtap's lower device");
    assert_eq!(got, frame);

    let bufs = post_rx(&mut fe, 0, 16, 2048);
    let frame = test_frame(guest_mac, HOST_MAC, 0x6d76_0002, 500);
    peer.send(None, &frame).expect("inject");
    let mut pending = Vec::new();
    let (used, hdr, data) = recv_rx(&mut fe, 0, &bufs, &mut pending);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].len as usize, HDR_LEN + frame.len());
    assert_eq!(hdr.num_buffers, 1);
    assert_eq!(data, frame);
}

fn stop(mut be: KillOnDrop, log: &Path) -> String {
    // SAFETY: plain kill(2) of our own child (SIGTERM: clean exit with counters).
    unsafe { libc::kill(be.0.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let st = loop {
        if let Ok(Some(st)) = be.0.try_wait() {
            break st;
        }
        assert!(Instant::now() < deadline, "backend did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = read(log);
    assert!(st.success(), "backend exit {st}:\n{text}");
    text
}

#[test]
fn macvtap_tx_reaches_lower_device_and_rx_arrives() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(st) = setup("mvt", "macvtap_tx_reaches_lower_device_and_rx_arrives") else {
        return;
    };
    let node_was_ours = st.dev_node_is_ours();
    let (be, sock, log) = st.start_backend();
    tx_and_rx(&st, &sock, &log);
    let text = stop(be, &log);
    // Where devtmpfs made the node, the backend uses it.
    assert_eq!(
        text.contains("using a private node"),
        !node_was_ours,
        "log:\n{text}"
    );
    assert!(text.contains("tx0): packets 1"), "counters:\n{text}");
    assert!(text.contains("rx0): packets 1"), "counters:\n{text}");
}

#[test]
fn macvtap_without_its_dev_node_uses_a_private_node() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Some(st) = setup("mvn", "macvtap_without_its_dev_node_uses_a_private_node") else {
        return;
    };
    // Only ever remove our own node (same device number), never another macvtap's.
    if st.dev_node_is_ours() {
        std::fs::remove_file(&st.dev_node).expect("remove /dev/tapN");
    }
    assert!(!st.dev_node_is_ours());
    let (be, sock, log) = st.start_backend();
    tx_and_rx(&st, &sock, &log);
    let text = stop(be, &log);
    assert!(text.contains("using a private node"), "log:\n{text}");
    // The private node is unlinked right after opening.
    let leftovers: Vec<_> = std::fs::read_dir("/dev")
        .expect("/dev")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".vhost-net-backend-")
        })
        .collect();
    assert!(leftovers.is_empty(), "private node left in /dev");
}
