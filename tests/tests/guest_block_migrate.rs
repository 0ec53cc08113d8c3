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
//!   fails before its switch-over (the destination QEMU is killed): the source keeps
//!   serving, nothing is lost, and a new destination QEMU takes the VM.
//!
//! Each runs once per copy mode ([`CopyMode`]): a mode is one line at the bottom.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// What the test, as the guest's network peer, saw of the TCP stream.
#[derive(Debug, Default)]
struct StreamLog {
    /// Every `seq N` line from the guest, with when it arrived (unix seconds).
    lines: Vec<(f64, u64)>,
    /// Bytes the peer sent and their sha256.
    sent: u64,
    sent_sha: String,
}

/// The peer's side of the stream (runs in the namespace): connects to the guest (it is
/// still booting: retries), reads its numbered lines (they must come in order, none
/// missing) and sends a line every 100 ms, until `stop`; then closes its side and reads
/// to the end.
fn peer_stream(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    seen: Arc<AtomicU64>,
) -> Result<StreamLog, String> {
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut s = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline && !stop.load(Ordering::Acquire) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(format!("cannot connect to the guest at {addr}: {e}")),
        }
    };
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    let mut log = StreamLog::default();
    let mut sha = Sha256::new();
    let mut partial = Vec::new();
    let mut buf = [0u8; 4096];
    let mut next_send = Instant::now();
    let mut n_sent = 0u64;
    let mut closing: Option<Instant> = None;
    loop {
        if closing.is_none() && stop.load(Ordering::Acquire) {
            s.shutdown(std::net::Shutdown::Write)
                .map_err(|e| e.to_string())?;
            closing = Some(Instant::now());
        }
        if closing.is_none() && Instant::now() >= next_send {
            let line = format!("peer {n_sent}\n");
            s.write_all(line.as_bytes())
                .map_err(|e| format!("sending to the guest: {e}"))?;
            sha.update(line.as_bytes());
            log.sent += line.len() as u64;
            n_sent += 1;
            next_send += Duration::from_millis(100);
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                partial.extend_from_slice(&buf[..n]);
                while let Some(i) = partial.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = partial.drain(..=i).collect();
                    let text = String::from_utf8_lossy(&line);
                    let n: u64 = text
                        .trim()
                        .strip_prefix("seq ")
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| format!("unexpected line from the guest: {text:?}"))?;
                    let want = log.lines.len() as u64;
                    if n != want {
                        return Err(format!("line {n} from the guest, expected {want}"));
                    }
                    log.lines.push((unix_now(), n));
                    seen.store(n + 1, Ordering::Release);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("the stream broke: {e}")),
        }
        if closing.is_some_and(|c| c.elapsed() > Duration::from_secs(60)) {
            return Err("the guest did not close the stream after ours".into());
        }
    }
    log.sent_sha = sha.finalize().iter().map(|x| format!("{x:02x}")).collect();
    Ok(log)
}

/// `busybox ping -i 0.2` from the namespace (busybox: the harness needs it anyway, and
/// it flushes every line), each reply line stamped with its arrival (unix seconds).
struct Pinger {
    child: Child,
    lines: std::thread::JoinHandle<Vec<(f64, String)>>,
}

impl Pinger {
    fn start(ns: &NetNs, ip: &str) -> Pinger {
        let mut child = ns
            .command("busybox")
            .args(["ping", "-i", "0.2", ip])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start busybox ping: {e}"));
        let out = child.stdout.take().unwrap();
        let lines = std::thread::spawn(move || {
            BufReader::new(out)
                .lines()
                .map_while(Result::ok)
                .map(|l| (unix_now(), l))
                .collect()
        });
        Pinger { child, lines }
    }

    /// SIGINT (ping prints its summary and exits); the arrival times of the replies and
    /// the whole output.
    fn stop(mut self) -> (Vec<f64>, String) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let lines = self.lines.join().unwrap_or_default();
        let replies = lines
            .iter()
            .filter(|(_, l)| l.contains("bytes from"))
            .map(|&(t, _)| t)
            .collect();
        let text = lines.into_iter().map(|(_, l)| l + "\n").collect();
        (replies, text)
    }
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
    write_random(&img_a, 0, HOST_DATA, 0x5eed_a11).unwrap();
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
    let ping = Pinger::start(&ns, GUEST_IP);
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicU64::new(0));
    let addr: SocketAddr = format!("{GUEST_IP}:{STREAM_PORT}").parse().unwrap();
    let (s2, n2) = (stop.clone(), seen.clone());
    let peer = ns.spawn_in(move || peer_stream(addr, s2, n2));
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.load(Ordering::Acquire) < 10 {
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
    let m1 = qemu_migrate(&mut vm_a, &mig_b, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n{}", vm_a.tails()));
    let switched_1 = unix_now();
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
    let longest_gap = stream
        .lines
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .fold(0.0, f64::max);
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
    write_random(&img_a, 0, HOST_DATA, 0x5eed_c07).unwrap();
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

    // A new destination QEMU on the same destination backend takes the VM.
    std::fs::remove_file(t.path("vm-b.mig")).ok();
    let mut vm_b2 = Vm::start(
        &t,
        "vm-b2",
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
    keeps_verifying(&mut vm_b2, "pass", 2);
    vm_b2.send_line("final").unwrap();
    vm_b2
        .wait_for("final", Duration::from_secs(120), |r| {
            r.contains_key("k_sha")
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let w_sha = vm_b2.result("w_sha").unwrap().to_string();
    let k_sha = vm_b2.result("k_sha").unwrap().to_string();
    finish(&mut vm_b2);
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
        vm_b2.result_u64("passes"),
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
