//! The whole VM moves to another host's QEMU with its own disk: two QEMUs on this machine,
//! each with its own vhost-blk-backend on its own image, the disk copied by the backends'
//! block migration (over TLS with certificates made here, or plain TCP through a relay the
//! test cuts), the RAM and devices by QEMU's migration, which hands the disk over at its
//! switch-over. The guest writes and verifies its disk the whole time
//! (`blk-migrate-live.sh`); it must see no error on either side, and the images must hold
//! what it wrote.
//!
//! - `..._there_and_back_*`: A to B (full, TLS) with the network moving too (a
//!   vhost-net-backend per side, both taps on one bridge in a namespace where the test is
//!   the peer: a ping and a TCP stream both ways run across both switch-overs, and the
//!   destination's guest announces itself); then back to A's image, incremental: exactly
//!   the blocks the guest wrote on B travel.
//! - `..._survives_a_cut_stream_and_a_failed_vm_migration_*`: the block stream is cut
//!   mid-copy (the guest on the source notices nothing) and retried; then QEMU's migration
//!   fails before its switch-over (the destination QEMU is killed: the source keeps
//!   serving, nothing is lost) and after the hand-over (paused before its switch-over,
//!   then cancelled: the source takes the disk back, the destination knows its copy is
//!   stale); a third destination QEMU takes the VM.
//!
//! Each runs once per copy mode ([`CopyMode`]): a mode is one line at the bottom.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};
use vhost_tests::blk_migration::{
    free_tcp_port, make_tls_creds, migrate_cli, migrate_status, CopyMode, Relay,
};
use vhost_tests::guest::{
    report_skip, sha256_file, sha256_file_range, sha256_zeros, vhost_user_blk_args, write_random,
    Backend, BlkBackend, GuestBoot, GuestTest, VHOST_FALLBACK,
};
use vhost_tests::guest_net::{
    locate_vhost_net_backend, vhost_user_net_args, wait_socket_file, NetNs,
};
use vhost_tests::net_peer::{peer_stream, unix_now, Pinger, StreamProgress};
use vhost_tests::vm::{qemu_migrate, qemu_migrate_start, qemu_migrate_wait, Vm};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const DISK: u64 = 96 * MIB;
/// Random data the host writes before the boot (the bulk copy's work).
const HOST_DATA: u64 = 48 * MIB;
/// The part of it the guest verifies on every pass.
const STATIC_OFF: u64 = 8 * MIB;
const STATIC_LEN: u64 = 2 * MIB;
/// The guest writer's region.
const W_OFF: u64 = 64 * MIB;
const W_BLOCKS: u64 = 256;
/// The distinct blocks written once after `final`, 3 blocks apart.
const K_OFF: u64 = 72 * MIB;
const K_COUNT: u64 = 64;
const K_STRIDE: u64 = 3;

const GUEST_IP: &str = "169.254.79.2";
const PEER_CIDR: &str = "169.254.79.1/24";
const GUEST_MAC: &str = "52:54:00:00:79:02";
const STREAM_PORT: u16 = 5001;

/// How the two backends protect their stream.
enum Security<'a> {
    Tls(&'a Path),
    Insecure,
}

/// One vhost-blk-backend of the test.
struct Blk {
    be: Backend,
    sock: PathBuf,
    ctl: PathBuf,
}

/// Starts vhost-blk-backend `name` on `img` with a control socket and a dirty bitmap file
/// beside the image (`<img>.dirty`: a later backend on the same image finds its
/// checkpoint there), `--incoming URI` for a destination.
fn start_blk(
    t: &GuestTest,
    bin: &Path,
    name: &str,
    img: &Path,
    sec: &Security,
    incoming: Option<&str>,
) -> Blk {
    let sock = t.path(&format!("{name}.sock"));
    let ctl = t.path(&format!("{name}-ctl.sock"));
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&ctl);
    let mut cmd = Command::new(bin);
    cmd.arg("--socket-path").arg(&sock);
    cmd.arg("--blk-file").arg(img);
    cmd.args(["--serial", "disk0"]);
    cmd.arg("--control-socket").arg(&ctl);
    cmd.arg("--dirty-bitmap").arg(img.with_extension("dirty"));
    match sec {
        Security::Tls(dir) => {
            cmd.arg("--tls-creds").arg(dir);
        }
        Security::Insecure => {
            cmd.arg("--migration-insecure");
        }
    }
    if let Some(uri) = incoming {
        cmd.args(["--incoming", uri]);
    }
    let mut be = t.spawn_backend(name, cmd).unwrap_or_else(|e| panic!("{e}"));
    be.wait_for_socket(&sock, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}"));
    Blk { be, sock, ctl }
}

/// The guest's boot: the script and where it works on the disk.
fn guest_boot(static_sha: &str) -> GuestBoot {
    GuestBoot::new("blk-migrate-live.sh")
        .env("W_OFF", W_OFF)
        .env("W_BLOCKS", W_BLOCKS)
        .env("STATIC_OFF", STATIC_OFF)
        .env("STATIC_LEN", STATIC_LEN)
        .env("STATIC_SHA", static_sha)
        .env("K_OFF", K_OFF)
        .env("K_COUNT", K_COUNT)
        .env("K_STRIDE", K_STRIDE)
}

/// sha256 of the K blocks of `img`, concatenated in order (what the guest reports as
/// `k_sha`).
fn k_blocks_sha(img: &Path) -> String {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(img).unwrap();
    let mut h = Sha256::new();
    let mut b = vec![0u8; BLOCK as usize];
    for i in 0..K_COUNT {
        f.read_exact_at(&mut b, K_OFF + i * K_STRIDE * BLOCK)
            .unwrap();
        h.update(&b);
    }
    h.finalize().iter().map(|x| format!("{x:02x}")).collect()
}

/// Polls `migrate-status` until the job has concluded; its last status.
fn job_concluded(bin: &Path, ctl: &Path) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let q = migrate_status(bin, ctl).unwrap_or_else(|e| panic!("{e}"));
        if q["status"] == "concluded" {
            return q;
        }
        assert!(Instant::now() < deadline, "the job did not conclude: {q}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The guest's worker keeps going with no error: `more` passes (or rounds) on `vm`.
fn keeps_verifying(vm: &mut Vm, key: &str, more: u64) {
    vm.wait_progress(key, more, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(vm.result("errors"), Some("0"), "{}", vm.tails());
}

/// `finish`, then the guest's report: it exits 0 with no error.
fn finish(vm: &mut Vm) {
    vm.send_line("finish").unwrap_or_else(|e| panic!("{e}"));
    vm.wait_exit(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(vm.guest_exit, Some(0), "{}", vm.tails());
    assert_eq!(vm.result("errors"), Some("0"), "{}", vm.tails());
    assert!(!vm.stderr().contains(VHOST_FALLBACK), "{}", vm.tails());
}

/// A vhost-net-backend in `ns` on tap `tap`, enslaved to `br`.
fn start_net(
    t: &GuestTest,
    ns: &NetNs,
    bin: &Path,
    name: &str,
    tap: &str,
    br: &str,
) -> (Backend, PathBuf) {
    let sock = t.path(&format!("{name}.sock"));
    let _ = std::fs::remove_file(&sock);
    let mut cmd = ns.command(bin);
    cmd.arg("--socket-path").arg(&sock).args(["--tap", tap]);
    let mut be = t.spawn_backend(name, cmd).unwrap_or_else(|e| panic!("{e}"));
    wait_socket_file(&mut be, &sock, Duration::from_secs(15)).unwrap_or_else(|e| panic!("{e}"));
    ns.enslave(tap, br).unwrap_or_else(|e| panic!("{e}"));
    (be, sock)
}

fn vm_args(blk: &Path, net: Option<&Path>) -> Vec<String> {
    let mut a = vhost_user_blk_args(blk, 1);
    if let Some(n) = net {
        a.extend(vhost_user_net_args(n, 1, GUEST_MAC));
    }
    a
}

fn incoming(t: &GuestTest, name: &str) -> (String, Vec<String>) {
    let uri = format!("unix:{}", t.path(&format!("{name}.mig")).display());
    (uri.clone(), vec!["-incoming".into(), uri])
}

/// Binaries, or the test cannot run against this backend (QEMU's storage daemon has no
/// block migration).
fn binaries() -> Option<PathBuf> {
    match BlkBackend::from_env().unwrap_or_else(|e| panic!("{e}")) {
        BlkBackend::VhostBlk(p) => Some(p),
        BlkBackend::Qsd(_) => {
            eprintln!("block migration tests run against vhost-blk-backend only");
            None
        }
    }
}

fn there_and_back(mode: CopyMode) {
    // Short: the run directory holds unix sockets (108 bytes at most).
    let name = format!("blkmig_there_and_back_{}", mode.short());
    let Some(mut t) = GuestTest::start(&name) else {
        return;
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        report_skip(&name, "needs root (network namespace, bridge and taps)");
        return;
    }
    let Some(blk_bin) = binaries() else { return };
    let net_bin = locate_vhost_net_backend().unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();

    let img_a = t.create_image("a.img", DISK).unwrap();
    write_random(&img_a, 0, HOST_DATA, 0x5eed_0a11).unwrap();
    let static_sha = sha256_file_range(&img_a, STATIC_OFF, STATIC_LEN).unwrap();
    let size = std::fs::metadata(&img_a).unwrap().len();
    let img_b = t.create_image("b.img", size).unwrap();
    let creds = t.path("tls");
    make_tls_creds(&creds, "migration CA").unwrap_or_else(|e| panic!("{e}"));
    let tls = Security::Tls(&creds);

    // The network: a bridge with the peer's address, a backend and tap per side.
    let ns = NetNs::create("mig").unwrap_or_else(|e| panic!("{e}"));
    let br = "vmigbr0";
    ns.add_bridge(br).unwrap_or_else(|e| panic!("{e}"));
    ns.run(&["ip", "addr", "add", PEER_CIDR, "dev", br])
        .unwrap_or_else(|e| panic!("{e}"));
    let (mut net_a, net_a_sock) = start_net(&t, &ns, &net_bin, "net-a", "vmigtapa", br);
    let (mut net_b, net_b_sock) = start_net(&t, &ns, &net_bin, "net-b", "vmigtapb", br);

    let mut blk_a = start_blk(&t, &blk_bin, "blk-a", &img_a, &tls, None);
    let boot = guest_boot(&static_sha)
        .env("GUEST_IP", format!("{GUEST_IP}/24"))
        .env("PORT", STREAM_PORT);
    let initrd = t.path("guest.initrd");
    t.build_initrd(&boot, &initrd).unwrap();
    let mut vm_a = Vm::start(
        &t,
        "vm-a",
        &boot,
        &initrd,
        &vm_args(&blk_a.sock, Some(&net_a_sock)),
    )
    .unwrap();
    vm_a.wait_for("phase=running", Duration::from_secs(150), |r| {
        r.contains_key("phase")
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let booted = started.elapsed();

    // The peer: a ping and the TCP stream, from the namespace.
    let ping = Pinger::start(&ns, GUEST_IP).unwrap_or_else(|e| panic!("{e}"));
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(StreamProgress::default());
    let addr: SocketAddr = format!("{GUEST_IP}:{STREAM_PORT}").parse().unwrap();
    let (s2, n2) = (stop.clone(), seen.clone());
    let peer = ns.spawn_in(move || peer_stream(addr, s2, n2));
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.lines.load(Ordering::Acquire) < 10 {
        assert!(
            Instant::now() < deadline && !peer.is_finished(),
            "no stream from the guest"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    keeps_verifying(&mut vm_a, "pass", 2);

    // A to B: the disk over TLS, then QEMU's migration, whose switch-over hands the disk
    // over.
    let port = free_tcp_port().unwrap();
    let to_b = format!("tcp:127.0.0.1:{port}");
    let mut blk_b = start_blk(&t, &blk_bin, "blk-b", &img_b, &tls, Some(&to_b));
    let (mig_b, inc_b) = incoming(&t, "vm-b");
    let mut vm_b = Vm::start(
        &t,
        "vm-b",
        &boot,
        &initrd,
        &[
            vm_args(&blk_b.sock, Some(&net_b_sock)),
            trace_announce(),
            inc_b,
        ]
        .concat(),
    )
    .unwrap();
    let t0 = Instant::now();
    migrate_cli(&blk_bin, &blk_a.ctl, &to_b, mode, &["--wait", "ready"])
        .unwrap_or_else(|e| panic!("{e}"));
    let disk_ready_1 = t0.elapsed();
    // Two more passes while the job is ready: what the guest writes now reaches B only
    // through the job's dirty passes (or mirroring), and B's guest checks it first thing.
    keeps_verifying(&mut vm_a, "pass", 2);
    let m1 = qemu_migrate(&mut vm_a, &mig_b, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n{}", vm_a.tails()));
    let switched_1 = unix_now();
    network_follows(&seen, &ping, switched_1, "B");
    let job1 = job_concluded(&blk_bin, &blk_a.ctl);
    assert!(job1.get("error").is_none(), "the first sync failed: {job1}");
    assert_eq!(job1["mode"], "full", "{job1}");
    assert_eq!(job1["copy-mode"], mode.as_arg(), "{job1}");
    eprintln!("first sync: {job1}");
    vm_a.quit().unwrap_or_else(|e| panic!("{e}"));
    // The guest goes on on B: the pass the switch-over interrupted is checked there.
    keeps_verifying(&mut vm_b, "pass", 2);

    // `final`: one more full pass and the K blocks, then the disk stays as it is. B's
    // image (on the host) holds exactly what the guest wrote.
    vm_b.send_line("final").unwrap_or_else(|e| panic!("{e}"));
    vm_b.wait_for("final", Duration::from_secs(120), |r| {
        r.contains_key("k_sha")
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(vm_b.result("errors"), Some("0"), "{}", vm_b.tails());
    let w_sha = vm_b.result("w_sha").unwrap().to_string();
    let k_sha = vm_b.result("k_sha").unwrap().to_string();
    assert_eq!(
        sha256_file_range(&img_b, W_OFF, W_BLOCKS * BLOCK).unwrap(),
        w_sha
    );
    assert_eq!(k_blocks_sha(&img_b), k_sha);
    assert_eq!(
        sha256_file_range(&img_b, STATIC_OFF, STATIC_LEN).unwrap(),
        static_sha
    );
    keeps_verifying(&mut vm_b, "rounds", 1);

    // Back to A's image: A's old backend handed the disk over and exits cleanly (its
    // bitmap file keeps the checkpoint); a new one takes an incremental sync from B.
    blk_a.be.stop_expect_clean();
    let port = free_tcp_port().unwrap();
    let to_a = format!("tcp:127.0.0.1:{port}");
    let mut blk_a2 = start_blk(&t, &blk_bin, "blk-a2", &img_a, &tls, Some(&to_a));
    let (mig_a2, inc_a2) = incoming(&t, "vm-a2");
    let mut vm_a2 = Vm::start(
        &t,
        "vm-a2",
        &boot,
        &initrd,
        &[
            vm_args(&blk_a2.sock, Some(&net_a_sock)),
            trace_announce(),
            inc_a2,
        ]
        .concat(),
    )
    .unwrap();
    let t0 = Instant::now();
    migrate_cli(
        &blk_bin,
        &blk_b.ctl,
        &to_a,
        mode,
        &["--incremental", "--wait", "ready"],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let disk_ready_2 = t0.elapsed();
    let m2 = qemu_migrate(&mut vm_b, &mig_a2, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n{}", vm_b.tails()));
    let switched_2 = unix_now();
    network_follows(&seen, &ping, switched_2, "A again");
    let job2 = job_concluded(&blk_bin, &blk_b.ctl);
    assert!(
        job2.get("error").is_none(),
        "the incremental sync failed: {job2}"
    );
    assert_eq!(job2["mode"], "incremental", "{job2}");
    assert_eq!(job2["copy-mode"], mode.as_arg(), "{job2}");
    eprintln!("incremental sync: {job2}");
    // Exactly what the guest wrote on B: the whole region (the final pass) and the K
    // blocks, nothing twice (the disk did not change during this sync).
    let want = (W_BLOCKS + K_COUNT) * BLOCK;
    assert_eq!(job2["bytes"]["data"].as_u64(), Some(want), "{job2}");
    assert_eq!(job2["bytes"]["zero"].as_u64(), Some(0), "{job2}");
    vm_b.quit().unwrap_or_else(|e| panic!("{e}"));
    keeps_verifying(&mut vm_a2, "rounds", 1);

    // The stream and the ping went on across both switch-overs.
    stop.store(true, Ordering::Release);
    let stream = peer
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let (replies, pings) = ping.stop();
    std::fs::write(t.path("ping.log"), &pings).unwrap();
    finish(&mut vm_a2);
    assert_eq!(
        vm_a2.result_u64("net_rx_bytes"),
        stream.sent,
        "{}",
        vm_a2.tails()
    );
    assert_eq!(vm_a2.result("net_rx_sha"), Some(stream.sent_sha.as_str()));
    // Lines and replies arrived while the guest ran on B, and again on A.
    let end = unix_now();
    for (what, from, to) in [("B", switched_1, switched_2), ("A again", switched_2, end)] {
        assert!(
            stream.lines.iter().any(|&(t, _)| t > from && t < to),
            "no stream line from the guest while on {what}"
        );
        assert!(
            replies.iter().any(|&t| t > from && t < to),
            "no ping reply while the guest was on {what}:\n{pings}"
        );
    }
    let longest_gap = stream.longest_gap();
    // The destination's guest announced itself (gratuitous ARP, acked to QEMU).
    for vm in [&vm_b, &vm_a2] {
        assert!(
            vm.stderr().contains("virtio_net_handle_announce"),
            "{} did not announce:\n{}",
            vm.name,
            vm.tails()
        );
    }

    // A's image is B's again, byte for byte.
    blk_b.be.stop_expect_clean();
    blk_a2.be.stop_expect_clean();
    net_a.stop_expect_clean();
    net_b.stop_expect_clean();
    assert_eq!(
        sha256_file(&img_a).unwrap(),
        sha256_file(&img_b).unwrap(),
        "the images differ"
    );
    let replies = replies.len();
    eprintln!(
        "@@MEASURED there and back ({}): boot {:.1}s; A->B disk ready {:.1}s, QEMU {:.1}s \
         (downtime {:?} ms); B->A incremental ready {:.1}s ({} data bytes), QEMU {:.1}s \
         (downtime {:?} ms); {} stream lines (longest gap {:.2}s), {replies} ping replies; \
         passes {}; total {:.1}s",
        mode.as_arg(),
        booted.as_secs_f64(),
        disk_ready_1.as_secs_f64(),
        m1.took.as_secs_f64(),
        m1.downtime_ms,
        disk_ready_2.as_secs_f64(),
        want,
        m2.took.as_secs_f64(),
        m2.downtime_ms,
        stream.lines.len(),
        longest_gap,
        vm_a2.result_u64("passes"),
        started.elapsed().as_secs_f64()
    );
}

/// Waits (30 s at most) for a stream line and a ping reply that arrived after `since`:
/// the guest's network follows it to `side` (its announce moved the bridge's entry).
fn network_follows(stream: &StreamProgress, ping: &Pinger, since: f64, side: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while stream.last_at() <= since || !ping.replies().iter().any(|&t| t > since) {
        assert!(
            Instant::now() < deadline,
            "no stream line (last at {:.1}, switch-over at {since:.1}) or no ping reply from \
             the guest on {side}",
            stream.last_at()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sets QEMU's pause-before-switchover: its migration stops the VM, then waits in
/// `pre-switchover` for `migrate-continue` (or `migrate_cancel`).
fn pause_before_switchover(vm: &mut Vm, on: bool) {
    vm.qmp(
        "migrate-set-capabilities",
        serde_json::json!({"capabilities": [{"capability": "pause-before-switchover", "state": on}]}),
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

/// QEMU traces the guest's announce acknowledgements (the guest sent its gratuitous ARP).
fn trace_announce() -> Vec<String> {
    vec!["-trace".into(), "virtio_net_handle_announce".into()]
}

fn cut_and_failed(mode: CopyMode) {
    let name = format!("blkmig_cut_and_failed_{}", mode.short());
    let Some(mut t) = GuestTest::start(&name) else {
        return;
    };
    let Some(blk_bin) = binaries() else { return };
    let started = Instant::now();
    let img_a = t.create_image("a.img", DISK).unwrap();
    write_random(&img_a, 0, HOST_DATA, 0x5eed_0c07).unwrap();
    let static_sha = sha256_file_range(&img_a, STATIC_OFF, STATIC_LEN).unwrap();
    let img_b = t.create_image("b.img", DISK).unwrap();

    let mut blk_a = start_blk(&t, &blk_bin, "blk-a", &img_a, &Security::Insecure, None);
    let boot = guest_boot(&static_sha);
    let initrd = t.path("guest.initrd");
    t.build_initrd(&boot, &initrd).unwrap();
    let mut vm_a = Vm::start(&t, "vm-a", &boot, &initrd, &vm_args(&blk_a.sock, None)).unwrap();
    vm_a.wait_for("phase=running", Duration::from_secs(150), |r| {
        r.contains_key("phase")
    })
    .unwrap_or_else(|e| panic!("{e}"));
    keeps_verifying(&mut vm_a, "pass", 1);

    // The destination's backend behind a relay the test cuts.
    let port = free_tcp_port().unwrap();
    let mut blk_b = start_blk(
        &t,
        &blk_bin,
        "blk-b",
        &img_b,
        &Security::Insecure,
        Some(&format!("tcp:127.0.0.1:{port}")),
    );
    let relay = Relay::start(&format!("127.0.0.1:{port}")).unwrap();
    let (mig_b, inc_b) = incoming(&t, "vm-b");
    let mut vm_b = Vm::start(
        &t,
        "vm-b",
        &boot,
        &initrd,
        &[vm_args(&blk_b.sock, None), inc_b.clone()].concat(),
    )
    .unwrap();

    // A slow copy (4 MiB/s), cut a few MiB in.
    let mut ctl = vhost_user_device::control::QmpClient::connect(&blk_a.ctl).unwrap();
    ctl.execute("migrate", serde_json::json!({"uri": relay.uri(), "copy-mode": mode.as_arg(), "max-bandwidth": 4 << 20}))
        .unwrap()
        .unwrap_or_else(|e| panic!("{}", e.desc));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let q = ctl
            .execute("query-migrate", serde_json::json!({}))
            .unwrap()
            .unwrap();
        if q["bytes"]["sent"].as_u64().unwrap_or(0) >= 4 * MIB {
            assert_eq!(q["phase"], "bulk", "cut too late: {q}");
            break;
        }
        assert!(Instant::now() < deadline, "the copy did not start: {q}");
        std::thread::sleep(Duration::from_millis(50));
    }
    relay.cut();
    let cut = job_concluded(&blk_bin, &blk_a.ctl);
    let err = cut["error"]
        .as_str()
        .unwrap_or_else(|| panic!("a cut stream is an error: {cut}"));
    assert!(err.contains("migration stream"), "{cut}");
    // The source's guest noticed nothing.
    keeps_verifying(&mut vm_a, "pass", 2);

    // The retry, at full speed, succeeds.
    migrate_cli(
        &blk_bin,
        &blk_a.ctl,
        &relay.uri(),
        mode,
        &["--wait", "ready"],
    )
    .unwrap_or_else(|e| panic!("{e}"));

    // QEMU's migration fails before its switch-over: slow, and the destination QEMU dies.
    qemu_migrate_start(&mut vm_a, &mig_b, 2 << 20).unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let q = vm_a.qmp("query-migrate", serde_json::json!({})).unwrap();
        if q["status"] == "active" && q["ram"]["transferred"].as_u64().unwrap_or(0) > MIB {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "QEMU's migration did not start: {q}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    vm_b.kill();
    let failed = qemu_migrate_wait(&mut vm_a, Duration::from_secs(60));
    assert!(
        failed.is_err(),
        "QEMU's migration completed to a killed destination"
    );
    assert_eq!(
        vm_a.qmp("query-status", serde_json::json!({})).unwrap()["status"],
        "running"
    );
    // No hand-over: the job is still ready, the source serves, the guest verifies on.
    keeps_verifying(&mut vm_a, "pass", 2);
    let q = migrate_status(&blk_bin, &blk_a.ctl).unwrap();
    assert_eq!(q["status"], "ready", "{q}");

    // QEMU's migration fails after the hand-over: paused before its switch-over (the
    // guest stopped, the rings too: the disk is handed over), then cancelled. The VM runs
    // on the source again, which takes the disk back and tells the destination its copy
    // is stale.
    std::fs::remove_file(t.path("vm-b.mig")).ok();
    let mut vm_b2 = Vm::start(
        &t,
        "vm-b2",
        &boot,
        &initrd,
        &[vm_args(&blk_b.sock, None), inc_b.clone()].concat(),
    )
    .unwrap();
    pause_before_switchover(&mut vm_a, true);
    qemu_migrate_start(&mut vm_a, &mig_b, 4 << 30).unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let q = vm_a.qmp("query-migrate", serde_json::json!({})).unwrap();
        if q["status"] == "pre-switchover" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "QEMU did not pause before its switch-over: {q}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let handed = job_concluded(&blk_bin, &blk_a.ctl);
    assert!(handed.get("error").is_none(), "{handed}");
    vm_a.qmp("migrate_cancel", serde_json::json!({})).unwrap();
    assert!(qemu_migrate_wait(&mut vm_a, Duration::from_secs(60)).is_err());
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm_a.qmp("query-status", serde_json::json!({})).unwrap()["status"] != "running" {
        assert!(Instant::now() < deadline, "the source VM did not resume");
        std::thread::sleep(Duration::from_millis(50));
    }
    keeps_verifying(&mut vm_a, "pass", 2);
    vm_b2.kill();

    // The retry asks for an incremental sync; the destination knows its copy is stale, so
    // it is a full one. A third destination QEMU takes the VM.
    pause_before_switchover(&mut vm_a, false);
    migrate_cli(
        &blk_bin,
        &blk_a.ctl,
        &relay.uri(),
        mode,
        &["--incremental", "--wait", "ready"],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let q = migrate_status(&blk_bin, &blk_a.ctl).unwrap();
    assert_eq!(
        q["mode"], "full",
        "a stale destination took an incremental sync: {q}"
    );
    std::fs::remove_file(t.path("vm-b.mig")).ok();
    let mut vm_b3 = Vm::start(
        &t,
        "vm-b3",
        &boot,
        &initrd,
        &[vm_args(&blk_b.sock, None), inc_b].concat(),
    )
    .unwrap();
    let m = qemu_migrate(&mut vm_a, &mig_b, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n{}", vm_a.tails()));
    let job = job_concluded(&blk_bin, &blk_a.ctl);
    assert!(job.get("error").is_none(), "{job}");
    assert_eq!(job["copy-mode"], mode.as_arg(), "{job}");
    eprintln!("the retried sync: {job}");
    vm_a.quit().unwrap_or_else(|e| panic!("{e}"));
    keeps_verifying(&mut vm_b3, "pass", 2);
    vm_b3.send_line("final").unwrap();
    vm_b3
        .wait_for("final", Duration::from_secs(120), |r| {
            r.contains_key("k_sha")
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let w_sha = vm_b3.result("w_sha").unwrap().to_string();
    let k_sha = vm_b3.result("k_sha").unwrap().to_string();
    finish(&mut vm_b3);
    blk_a.be.stop_expect_clean();
    blk_b.be.stop_expect_clean();
    assert_eq!(
        sha256_file_range(&img_b, W_OFF, W_BLOCKS * BLOCK).unwrap(),
        w_sha
    );
    assert_eq!(k_blocks_sha(&img_b), k_sha);
    // Everything else is the source's: the host's data, and zeros.
    assert_eq!(
        sha256_file_range(&img_b, 0, HOST_DATA).unwrap(),
        sha256_file_range(&img_a, 0, HOST_DATA).unwrap()
    );
    assert_eq!(
        sha256_file_range(&img_b, HOST_DATA, W_OFF - HOST_DATA).unwrap(),
        sha256_zeros(W_OFF - HOST_DATA)
    );
    eprintln!(
        "@@MEASURED cut and failed ({}): QEMU migration after the failure {:.1}s (downtime {:?} ms); \
         relay carried {} bytes; passes {}; total {:.1}s",
        mode.as_arg(),
        m.took.as_secs_f64(),
        m.downtime_ms,
        relay.bytes(),
        vm_b3.result_u64("passes"),
        started.elapsed().as_secs_f64()
    );
}

// One line per copy mode the backend has.
#[test]
fn guest_block_migration_there_and_back_background() {
    there_and_back(CopyMode::Background);
}

#[test]
fn guest_block_migration_survives_a_cut_stream_and_a_failed_vm_migration_background() {
    cut_and_failed(CopyMode::Background);
}

#[test]
fn guest_block_migration_there_and_back_write_blocking() {
    there_and_back(CopyMode::WriteBlocking);
}

#[test]
fn guest_block_migration_survives_a_cut_stream_and_a_failed_vm_migration_write_blocking() {
    cut_and_failed(CopyMode::WriteBlocking);
}
