//! libvirt end to end: the example domains of `deploy/libvirt/`, filled in with this
//! test's paths, defined and started with `virsh` on libvirt's embedded QEMU driver
//! (`qemu:///embed?root=DIR`: no daemon, which this machine could not run as a service),
//! with the project's backends behind their vhost-user devices.
//!
//! * `vm1.xml` on the machine's QEMU (10.0 from bookworm-backports here): a
//!   `<disk type='vhostuser'>` on vhost-blk-backend and an `<interface type='vhostuser'>`
//!   on vhost-net-backend;
//! * `vm1-console.xml` on QEMU 11 (the trixie chroot of `tests/guest/setup-qemu-trixie.sh`,
//!   as the domain's `<emulator>`): the same two plus a virtio-console on serial-backend,
//!   added through `<qemu:commandline>` (libvirt has no element for it).
//!
//! The guest (`tests/guest/scripts/libvirt.sh`) checks the disk's size, serial and queues,
//! reads a pattern the host wrote into the image and writes one the host then finds in the
//! image; pings the tap's end in the net backend's namespace; and with the console, says
//! hello on /dev/hvc0 and moves random data both ways through a named port. The guest
//! powers off, libvirt turns that into `on_poweroff` (shut off, reason shutdown), and the
//! domain is undefined. Needs root, libvirt (`tests/guest/setup.sh`) and the guest kernel;
//! otherwise a loud SKIPPED.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost_tests::guest::{
    parse_console, report_skip, sha256_file_range, tail_file, work_dir, write_random, Accel,
    Backend, BlkBackend, BlkOpts, GuestBoot, GuestTest, DEFAULT_BOOT_TIMEOUT, VHOST_FALLBACK,
};
use vhost_tests::guest_console::{
    connect_retry, locate_serial_backend, pattern, qemu_for_console, sha_to_eof,
};
use vhost_tests::guest_net::{locate_vhost_net_backend, wait_socket_file, NetNs};
use vhost_tests::libvirt::{example_xml, fill_template, sweep_stale_roots, EmbeddedVirsh};

const IMAGE_SIZE: u64 = 64 << 20;
/// The host fills this range before boot; the guest reports its hash.
const READ_OFF: u64 = 1 << 20;
const READ_LEN: u64 = 1 << 20;
/// The guest writes this range; the host finds the guest's hash in the image.
const WRITE_OFF: u64 = 8 << 20;
const WRITE_LEN: u64 = 4 << 20;
/// The disk's serial (`vhost-blk-backend --serial`, as in deploy/libvirt/README.md).
const SERIAL: &str = "vm1-disk0";
/// The MAC in the example XML.
const MAC: &str = "52:54:00:76:68:01";
const TAP: &str = "lvtap0";
const HOST_CIDR: &str = "169.254.79.1/30";
const HOST_IP: &str = "169.254.79.1";
const GUEST_CIDR: &str = "169.254.79.2/30";
/// serial-backend's max ports in the example (num_vqs=10 there).
const MAX_PORTS: &str = "4";
const PORT_NAME: &str = "org.vhost.libvirt";
const PORT_BYTES: usize = 256 << 10;
/// The embedded driver's roots: `<work dir>/libvirt-embed-<pid>-<n>`.
const EMBED_ROOT_PREFIX: &str = "libvirt-embed-";

#[test]
fn libvirt_vm1_disk_and_nic() {
    run_vm1("guest_libvirt_disk_and_nic", "vm1.xml", None);
}

#[test]
fn libvirt_vm1_disk_nic_and_console() {
    let test = "guest_libvirt_disk_nic_and_console";
    // QEMU >= 10.2 for vhost-user-test-device-pci; a reason to skip otherwise.
    if !is_root() {
        report_skip(test, "needs root (libvirt's QEMU driver, taps, namespaces)");
        return;
    }
    match qemu_for_console() {
        Ok(qemu) => run_vm1(test, "vm1-console.xml", Some(qemu)),
        Err(reason) => report_skip(test, &reason),
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Host side of the console: the guest's hello on hvc0 and, on the named port, what the
/// guest sent (sha256, bytes) and the hash of what we sent back.
struct ConsoleHost {
    backend: Backend,
    hvc0: JoinHandle<String>,
    port: JoinHandle<std::io::Result<((String, u64), String)>>,
}

fn start_console(t: &GuestTest, sock: &Path) -> ConsoleHost {
    let bin = locate_serial_backend().unwrap_or_else(|e| panic!("{e}"));
    let con0 = t.path("con0.sock");
    let port = t.path("port.sock");
    let mut cmd = Command::new(bin);
    cmd.arg("--socket-path")
        .arg(sock)
        .args(["--max-ports", MAX_PORTS])
        .arg("--console")
        .arg(format!("socket={}", con0.display()))
        .arg("--port")
        .arg(format!("name={PORT_NAME},socket={}", port.display()));
    let mut backend = t
        .spawn_backend("serial-backend", cmd)
        .unwrap_or_else(|e| panic!("{e}"));
    backend
        .wait_for_socket(sock, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}"));

    let mut con = connect_retry(&con0, Duration::from_secs(10)).expect("connect to hvc0's socket");
    con.set_read_timeout(Some(DEFAULT_BOOT_TIMEOUT)).ok();
    let hvc0 = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("hello from hvc0 under libvirt") {
            match con.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    });
    let mut p = connect_retry(&port, Duration::from_secs(10)).expect("connect to the port");
    p.set_read_timeout(Some(DEFAULT_BOOT_TIMEOUT)).ok();
    let port = std::thread::spawn(move || {
        use std::io::Write;
        let (sha, n, _) = sha_to_eof(&mut p)?;
        let (data, sent_sha) = pattern(0x11b_71c7, PORT_BYTES);
        p.write_all(&data)?;
        Ok(((sha, n), sent_sha))
    });
    ConsoleHost {
        backend,
        hvc0,
        port,
    }
}

/// Defines and starts domain `name` from `xml`, checks that it runs, and waits for the
/// guest to power off; returns libvirt's final state (`shut off (<reason>)`).
fn run_domain(virsh: &mut EmbeddedVirsh, xml: &Path, name: &str) -> Result<String, String> {
    virsh.define(xml, name).map_err(|e| e.to_string())?;
    virsh
        .run(&format!("start {name}"))
        .map_err(|e| e.to_string())?;
    let running = virsh.domstate(name).map_err(|e| e.to_string())?;
    if !running.starts_with("running") {
        return Err(format!("domain {name} after start: {running}"));
    }
    virsh.wait_shut_off(name, DEFAULT_BOOT_TIMEOUT)
}

/// Starts the backends, fills `template` in, runs the domain through virsh and checks
/// what the guest saw. `console_qemu`: the QEMU >= 10.2 for the console example.
fn run_vm1(test: &str, template: &str, console_qemu: Option<PathBuf>) {
    let Some(mut t) = GuestTest::start(test) else {
        return;
    };
    if !is_root() {
        report_skip(test, "needs root (libvirt's QEMU driver, taps, namespaces)");
        return;
    }
    if Command::new("virsh").arg("--version").output().is_err() {
        report_skip(
            test,
            "virsh not found: run tests/guest/setup.sh as root (libvirt-clients, \
             libvirt-daemon-driver-qemu)",
        );
        return;
    }
    let started = Instant::now();

    // vhost-blk-backend on a fresh image with a known pattern in it.
    let img = t.create_image("disk.img", IMAGE_SIZE).expect("image");
    let host_pattern = write_random(&img, READ_OFF, READ_LEN, 0x5eed_1ab7).expect("pattern");
    let blk_sock = t.path("blk.sock");
    let blk = BlkBackend::locate_vhost_blk_backend().unwrap_or_else(|e| panic!("{e}"));
    let opts = BlkOpts {
        num_queues: Some(2),
        serial: Some(SERIAL.into()),
        ..BlkOpts::default()
    };
    let mut blk_be = t
        .spawn_backend(
            "vhost-blk-backend",
            BlkBackend::VhostBlk(blk).command(&blk_sock, &img, &opts),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    blk_be
        .wait_for_socket(&blk_sock, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}"));

    // vhost-net-backend in a namespace of its own, on a tap with the guest's peer address.
    let ns = NetNs::create("libvirt").unwrap_or_else(|e| panic!("{e}"));
    let net_sock = t.path("net.sock");
    let _ = std::fs::remove_file(&net_sock);
    let mut cmd = ns.command(locate_vhost_net_backend().unwrap_or_else(|e| panic!("{e}")));
    cmd.arg("--socket-path")
        .arg(&net_sock)
        .args(["--tap", TAP, "--num-queue-pairs", "2"]);
    let mut net_be = t
        .spawn_backend("vhost-net-backend", cmd)
        .unwrap_or_else(|e| panic!("{e}"));
    wait_socket_file(&mut net_be, &net_sock, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}"));
    ns.run(&["ip", "addr", "add", HOST_CIDR, "dev", TAP])
        .and_then(|_| ns.run(&["ip", "link", "set", TAP, "up"]))
        .unwrap_or_else(|e| panic!("{e}"));

    let console_sock = t.path("console.sock");
    let console = console_qemu
        .as_ref()
        .map(|_| start_console(&t, &console_sock));

    // The guest: kernel, initrd with the script, its parameters.
    let mut boot = GuestBoot::new("libvirt.sh")
        .env("READ_OFF", READ_OFF)
        .env("READ_LEN", READ_LEN)
        .env("WRITE_OFF", WRITE_OFF)
        .env("WRITE_LEN", WRITE_LEN)
        .env("GUEST_IP", GUEST_CIDR)
        .env("HOST_IP", HOST_IP);
    if console.is_some() {
        boot = boot
            .env("CONSOLE_PORT", PORT_NAME)
            .env("PORT_BYTES", PORT_BYTES);
    }
    let initrd = t.path("vm1.initrd");
    t.build_initrd(&boot, &initrd).expect("initrd");

    // The example, with this test's paths.
    let name = format!("vm1-libvirt-{}", std::process::id());
    let console_log = t.path("console.log");
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let mut subs = vec![
        ("<name>vm1</name>", format!("<name>{name}</name>")),
        ("/var/lib/vm1/vmlinuz", path(&t.env.kernel)),
        ("/var/lib/vm1/initrd.img", path(&initrd)),
        (
            "console=ttyS0 root=/dev/vda",
            "console=ttyS0 panic=-1 mitigations=off quiet".to_string(),
        ),
        // A guest that panics must not be rebooted for ever.
        (
            "<on_reboot>restart</on_reboot>",
            "<on_reboot>destroy</on_reboot>".to_string(),
        ),
        ("/run/vm1/blk.sock", path(&blk_sock)),
        ("/run/vm1/net.sock", path(&net_sock)),
        ("/var/log/vm1-console.log", path(&console_log)),
    ];
    match &console_qemu {
        Some(q) => {
            subs.push((
                "/var/tmp/vhost-guest/qemu-trixie/qemu-system-x86_64",
                path(q),
            ));
            subs.push(("/run/vm1/console.sock", path(&console_sock)));
        }
        None => subs.push(("/usr/bin/qemu-system-x86_64", path(&t.env.qemu))),
    }
    if t.env.accel == Accel::Kvm {
        subs.push(("<domain type='qemu'", "<domain type='kvm'".to_string()));
        subs.push((
            "<cpu mode='maximum'/>",
            "<cpu mode='host-passthrough'/>".to_string(),
        ));
    }
    let xml = fill_template(&example_xml(template), &subs).unwrap_or_else(|e| panic!("{e}"));
    let xml_path = t.path("vm1.xml");
    std::fs::write(&xml_path, xml).expect("write the domain XML");

    // libvirt: define, start, wait for the guest to power off.
    // Short (the monitor socket lives under it), in the work directory (the QEMU 11
    // wrapper's chroot sees only that and /tmp), and swept if a killed run left it.
    sweep_stale_roots(&work_dir(), EMBED_ROOT_PREFIX);
    let root = work_dir().join(format!(
        "{EMBED_ROOT_PREFIX}{}-{}",
        std::process::id(),
        template.len()
    ));
    let mut virsh =
        EmbeddedVirsh::start(&root, &t.path("virsh.log")).unwrap_or_else(|e| panic!("{e}"));
    let t_start = Instant::now();
    let ran = run_domain(&mut virsh, &xml_path, &name);
    let guest_secs = t_start.elapsed().as_secs_f64();
    // Keep QEMU's log with the test's (the embedded root goes away with the session).
    let qemu_log = t.path("qemu.log");
    let _ = std::fs::copy(virsh.qemu_log(&name), &qemu_log);
    let end = ran.unwrap_or_else(|e| {
        panic!(
            "{e}\n--- console ---\n{}\n--- qemu log ---\n{}",
            tail_file(&console_log, 30),
            tail_file(&qemu_log, 15)
        )
    });
    virsh.close().unwrap_or_else(|e| panic!("{e}"));

    // What libvirt made of the XML, and whether QEMU kept the devices on vhost-user.
    let qemu_out = std::fs::read_to_string(&qemu_log).unwrap_or_default();
    assert!(
        !qemu_out.contains(VHOST_FALLBACK),
        "QEMU fell back on userspace virtio:\n{qemu_out}"
    );
    let mut want = vec!["vhost-user-blk-pci", "\"type\":\"vhost-user\""];
    if console.is_some() {
        want.push("vhost-user-test-device-pci");
    }
    for w in want {
        assert!(
            qemu_out.contains(w),
            "no {w} in QEMU's command line:\n{qemu_out}"
        );
    }

    let text = std::fs::read_to_string(&console_log)
        .unwrap_or_default()
        .replace('\r', "");
    let (results, exit) = parse_console(&text);
    let get = |k: &str| results.get(k).map(String::as_str).unwrap_or("");
    assert_eq!(
        exit,
        Some(0),
        "guest script failed; console:\n{}",
        tail_file(&console_log, 30)
    );
    assert_eq!(
        end, "shut off (shutdown)",
        "the guest powered off; libvirt says"
    );

    // Disk.
    assert_eq!(get("blk_size_bytes"), IMAGE_SIZE.to_string());
    assert_eq!(get("blk_serial"), SERIAL);
    assert_eq!(get("blk_queues"), "2");
    assert_eq!(
        get("blk_host_pattern_sha256"),
        host_pattern,
        "the guest read what the host wrote"
    );
    let in_image = sha256_file_range(&img, WRITE_OFF, WRITE_LEN).expect("hash the image");
    assert_eq!(
        get("blk_written_sha256"),
        in_image,
        "the image holds what the guest wrote"
    );
    assert_eq!(get("blk_readback_sha256"), in_image);
    // NIC.
    assert_eq!(get("net_mac"), MAC);
    assert_eq!(get("net_queues"), "2");
    assert_eq!(get("net_ping"), "ok");
    // Console.
    if let Some(c) = console {
        assert_eq!(get("console_hvc0"), "yes");
        let hello = c.hvc0.join().expect("hvc0 reader");
        assert!(
            hello.contains("hello from hvc0 under libvirt"),
            "hvc0 said: {hello:?}"
        );
        let ((from_guest, n), to_guest) =
            c.port.join().expect("port thread").expect("port traffic");
        assert_eq!(n, PORT_BYTES as u64, "guest → host bytes");
        assert_eq!(get("console_tx_sha256"), from_guest, "guest → host data");
        assert_eq!(get("console_rx_sha256"), to_guest, "host → guest data");
        let mut be = c.backend;
        be.stop_expect_clean();
    }
    blk_be.stop_expect_clean();
    net_be.stop().expect("vhost-net-backend exits on SIGTERM");
    eprintln!(
        "@@MEASURED {test}: guest under libvirt (define to shut off) {guest_secs:.1}s, \
         test {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
