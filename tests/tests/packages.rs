//! The Debian packages of the three backends, installed and run as a user would.
//!
//! `scripts/package.sh --fast` builds them (once per run); `tests/packages/root.sh` keeps
//! two bookworm roots cached under /var/tmp/vhost-packages (a clean minbase one, and one
//! with systemd to boot; the first run takes a minute or two, later runs none).
//!
//! 1. In a copy of the clean root (chroot): `apt-get install ./PKG.deb` for all three
//!    (pulling in systemd as a dependency), then every file where it belongs: program,
//!    capability file (same bytes as the repository's, naming a program that runs in that
//!    root), man pages (`man -w`, rendered with the flags and FILES), units (clean under
//!    `systemd-analyze verify`), the vhost-dataplane system user, the example
//!    configurations; then `apt-get purge` removes it all.
//! 2. Under systemd (this machine's PID 1 need not be systemd: the root is booted with
//!    `systemd-nspawn --boot`): the packages installed in the running system, then
//!    vhost-blk-backend@vm1.socket started, the service started by the first vhost-user
//!    connection, data written and read back through it (and found in the image file),
//!    the process checked (`--fd 3`, the vhost-dataplane user, no capabilities,
//!    NoNewPrivileges, seccomp, O_DIRECT/io_uring), SIGKILLed and restarted by
//!    Restart=always, the data read back through the restarted process, a clean stop;
//!    serial-backend@vm1 and vhost-net-backend@vm1 (on a persistent tap owned by the user)
//!    socket-activated and serving as the same unprivileged user; each unit's hardening
//!    checked with `systemd-analyze security`.
//!
//! Both need root; without it (or without systemd-nspawn, or where systemd cannot boot in
//! a container) they print SKIPPED loudly and count as skipped; VHOST_GUEST_REQUIRE=1 turns
//! that into a failure.

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use vhost_tests::frontend::{Buf, FrontendOptions, TestFrontend};
use vhost_tests::guest::{report_skip, workspace_dir};
use vhost_tests::packages::{
    debs, is_root, prepared_root, run_dir, Bind, Chroot, Container, RootKind, PROGRAMS,
};

/// Root, the packages and the root to install them in; `None` after a loud skip.
fn ready(test: &str, kind: RootKind) -> Option<(Vec<std::path::PathBuf>, std::path::PathBuf)> {
    if !is_root() {
        report_skip(test, "needs root (chroot, systemd-nspawn, apt-get)");
        return None;
    }
    let debs = debs().unwrap_or_else(|e| panic!("building the packages: {e}"));
    let root = prepared_root(kind).unwrap_or_else(|e| panic!("preparing the root: {e}"));
    Some((debs.to_vec(), root))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[test]
fn the_packages_install_in_a_clean_root_with_every_file_in_place() {
    let test = "the_packages_install_in_a_clean_root_with_every_file_in_place";
    let Some((debs, clean)) = ready(test, RootKind::Clean) else {
        return;
    };
    let run = run_dir("install").unwrap();
    let root = Chroot::copy_of(&clean, run.path()).unwrap();
    fs::create_dir_all(root.path("/debs")).unwrap();
    for d in &debs {
        fs::copy(d, root.path("/debs").join(file_name(d))).unwrap();
    }
    let installed = |pkg: &str| {
        root.run(&format!(
            "dpkg-query -W -f='${{Status}}' {pkg} 2>/dev/null || true"
        ))
        .ok()
        .to_string()
    };
    assert_ne!(
        installed("systemd"),
        "install ok installed",
        "the clean root must not have systemd yet"
    );

    // What the README says: apt-get install ./PKG.deb.
    let args: Vec<String> = debs.iter().map(|d| format!("./{}", file_name(d))).collect();
    let out = root.run(&format!(
        "cd /debs && apt-get install -y -q --no-install-recommends {}",
        args.join(" ")
    ));
    out.ok();
    for (program, _) in PROGRAMS {
        assert_eq!(installed(program), "install ok installed", "{out:?}");
    }
    assert_eq!(
        installed("systemd"),
        "install ok installed",
        "apt resolves the dependency"
    );

    // The system user, made by systemd-sysusers in postinst.
    let user = root.run("getent passwd vhost-dataplane").ok().to_string();
    let fields: Vec<&str> = user.split(':').collect();
    assert_eq!(fields.len(), 7, "{user}");
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid < 1000, "a system user: {user}");
    assert_eq!(fields[6], "/usr/sbin/nologin", "{user}");
    assert_eq!(
        root.run("id -gn vhost-dataplane").ok(),
        "vhost-dataplane",
        "a group of its own"
    );

    for (program, short) in PROGRAMS {
        let krate = workspace_dir().join(program);
        // The program, at the path its capability file names, runs in the clean root.
        let json = format!("/usr/share/qemu/vhost-user/50-{program}.json");
        let shipped = fs::read(root.path(&json)).unwrap_or_else(|e| panic!("{json}: {e}"));
        let repo = fs::read(krate.join(format!("vhost-user/50-{program}.json"))).unwrap();
        assert_eq!(shipped, repo, "{json} is the repository's file");
        let doc: Value = serde_json::from_slice(&shipped).unwrap();
        assert_eq!(doc["binary"], format!("/usr/bin/{program}"));
        let caps = root
            .run(&format!("/usr/bin/{program} --print-capabilities"))
            .ok()
            .to_string();
        let caps: Value = serde_json::from_str(&caps).unwrap();
        assert_eq!(caps["type"], doc["type"], "{program}");

        // Man pages: found by man, rendered with every flag and the FILES section.
        assert_eq!(
            root.run(&format!("man -w {program}")).ok(),
            format!("/usr/share/man/man1/{program}.1.gz")
        );
        assert_eq!(
            root.run(&format!("man -w {program}-stats")).ok(),
            format!("/usr/share/man/man1/{program}-stats.1.gz")
        );
        let page = root
            .run(&format!("MANWIDTH=200 man -P cat {program}"))
            .ok()
            .to_string();
        for text in [
            "--fd <FDNUM>",
            "--control-socket <PATH>",
            "--sandbox",
            "FILES",
            &format!("/etc/vhost-dataplane/{short}/INSTANCE.conf"),
            &format!("/usr/lib/systemd/system/{program}@.socket"),
        ] {
            assert!(page.contains(text), "man {program} lacks {text:?}:\n{page}");
        }

        // The units, as in the repository, and clean for systemd.
        for unit in ["service", "socket"] {
            let path = format!("/usr/lib/systemd/system/{program}@.{unit}");
            let shipped = fs::read(root.path(&path)).unwrap_or_else(|e| panic!("{path}: {e}"));
            let repo = fs::read(krate.join(format!("debian/{program}@.{unit}"))).unwrap();
            assert_eq!(shipped, repo, "{path}");
        }
        let verify = root.run(&format!(
            "systemd-analyze verify {program}@vm1.service {program}@vm1.socket 2>&1"
        ));
        assert_eq!(verify.ok(), "", "systemd-analyze verify has a complaint");

        // The example configuration, a conffile where the instances' files go.
        let sample = format!("/etc/vhost-dataplane/{short}/example.conf.sample");
        let text = fs::read_to_string(root.path(&sample)).unwrap();
        assert!(text.lines().any(|l| l.starts_with("ARGS=\"--")), "{text}");
        let conffiles = root
            .run(&format!("dpkg-query -W -f='${{Conffiles}}' {program}"))
            .ok()
            .to_string();
        assert!(conffiles.contains(&sample), "{conffiles}");
    }
    assert!(root
        .path("/usr/lib/tmpfiles.d/vhost-blk-backend.conf")
        .is_file());

    // And they go again.
    let names: Vec<&str> = PROGRAMS.iter().map(|(p, _)| *p).collect();
    root.run(&format!("apt-get purge -y -q {}", names.join(" ")))
        .ok();
    for (program, short) in PROGRAMS {
        assert!(!root.path(&format!("/usr/bin/{program}")).exists());
        assert!(!root
            .path(&format!("/usr/lib/systemd/system/{program}@.service"))
            .exists());
        assert!(!root
            .path(&format!("/etc/vhost-dataplane/{short}/example.conf.sample"))
            .exists());
    }
}

/// virtio-blk request types.
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// One virtio-blk request on queue 0: header, data (`data` to write, or `len` bytes for
/// the device to fill), status; returns the status and the data buffer afterwards.
fn blk_request(
    fe: &mut TestFrontend,
    type_: u32,
    sector: u64,
    data: Option<&[u8]>,
    len: u32,
) -> (u8, Vec<u8>) {
    let hdr = fe.alloc(16);
    let buf = fe.alloc(u64::from(len));
    let status = fe.alloc(1);
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&type_.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    fe.write(hdr, &h);
    fe.write(status, &[0xff]);
    let data_buf = match data {
        Some(d) => {
            fe.write(buf, d);
            Buf::ro(buf, len)
        }
        None => Buf::wo(buf, len),
    };
    fe.submit(0, &[Buf::ro(hdr, 16), data_buf, Buf::wo(status, 1)]);
    fe.wait(0, 1).expect("the request completes");
    (fe.read(status, 1)[0], fe.read(buf, len as usize))
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// `systemctl show -p PROP --value UNIT` in the container.
fn show(c: &Container, unit: &str, prop: &str) -> String {
    c.run(&format!("systemctl show -p {prop} --value {unit}"))
        .ok()
        .to_string()
}

/// `systemctl status UNIT` and its journal, for failure messages.
fn status(c: &Container, unit: &str) -> String {
    let r = c.run(&format!(
        "systemctl status --no-pager -l {unit}; journalctl --no-pager -n 30 -u {unit}"
    ));
    format!("--- systemctl status {unit}\n{}{}", r.stdout, r.stderr)
}

/// Waits until `f` holds, or panics with `what` after `timeout`.
fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The main process of `unit`: checks it runs `program --fd 3` as `uid` with no
/// capabilities, NoNewPrivileges and seccomp, fd 3 a socket; returns its pid.
fn check_main_process(c: &Container, unit: &str, program: &str, uid: &str) -> String {
    assert_eq!(show(c, unit, "ActiveState"), "active", "{unit}");
    let pid = show(c, unit, "MainPID");
    let cmdline = c
        .run(&format!("tr '\\0' ' ' < /proc/{pid}/cmdline"))
        .ok()
        .to_string();
    assert!(
        cmdline.starts_with(&format!("/usr/bin/{program} --fd 3 ")),
        "{unit} runs {cmdline}"
    );
    assert!(!cmdline.contains("--socket-path"), "{cmdline}");
    assert!(
        c.run(&format!("readlink /proc/{pid}/fd/3"))
            .ok()
            .starts_with("socket:"),
        "fd 3 of {unit} is its listening socket"
    );
    let status = c.run(&format!("cat /proc/{pid}/status")).ok().to_string();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    assert_eq!(field("Uid"), [uid; 4].join(" "), "{unit}: {status}");
    assert_eq!(field("CapEff"), "0000000000000000", "{unit}");
    assert_eq!(field("CapPrm"), "0000000000000000", "{unit}");
    assert_eq!(field("NoNewPrivs"), "1", "{unit}");
    assert_eq!(field("Seccomp"), "2", "{unit}: in filter mode");
    pid
}

/// `systemd-analyze security`'s overall exposure of `unit` (0 best, 10 worst).
fn exposure(c: &Container, unit: &str) -> f64 {
    let out = c
        .run(&format!(
            "systemd-analyze security --no-pager {unit} | tail -n 1"
        ))
        .ok()
        .to_string();
    out.split("exposure level for")
        .nth(1)
        .and_then(|rest| rest.split(':').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in {out:?}"))
}

/// A persistent multi-queue tap owned by `uid`, deleted on drop.
struct Tap(String);

impl Tap {
    fn create(name: &str, uid: &str) -> Tap {
        let st = std::process::Command::new("ip")
            .args(["tuntap", "add", "dev", name, "mode", "tap"])
            .args(["multi_queue", "vnet_hdr", "user", uid])
            .status()
            .expect("run ip");
        assert!(st.success(), "ip tuntap add {name}");
        Tap(name.to_string())
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args([
                "tuntap",
                "del",
                "dev",
                &self.0,
                "mode",
                "tap",
                "multi_queue",
            ])
            .status();
    }
}

#[test]
fn the_backends_run_under_systemd_socket_activated_unprivileged_and_restarted() {
    let test = "the_backends_run_under_systemd_socket_activated_unprivileged_and_restarted";
    let Some((debs, boot_root)) = ready(test, RootKind::Boot) else {
        return;
    };
    let has_nspawn = std::process::Command::new("systemd-nspawn")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_nspawn {
        report_skip(
            test,
            "systemd-nspawn not found (apt-get install systemd-container; tests/guest/setup.sh does)",
        );
        return;
    }
    let run = run_dir("systemd").unwrap();
    let deb_dir = run.path().join("debs");
    let images = run.path().join("images");
    fs::create_dir_all(&deb_dir).unwrap();
    fs::create_dir_all(&images).unwrap();
    for d in &debs {
        fs::copy(d, deb_dir.join(file_name(d))).unwrap();
    }
    // On the work directory's disk (not the container's tmpfs overlay), so the backend
    // opens it with O_DIRECT and reads and writes it through io_uring.
    let image = images.join("vm1.img");
    fs::File::create(&image)
        .and_then(|f| f.set_len(16 << 20))
        .unwrap();
    let binds = [
        Bind {
            host: &deb_dir,
            inside: "/debs",
            read_only: true,
        },
        Bind {
            host: &images,
            inside: "/var/lib/vhost-dataplane",
            read_only: false,
        },
    ];
    let c = match Container::boot(&boot_root, &binds, &run.path().join("console.log")) {
        Ok(c) => c,
        Err(why) => {
            report_skip(
                test,
                &format!("systemd cannot boot in a container here: {why}"),
            );
            return;
        }
    };

    // Installed into the running system: postinst creates the user and reloads systemd.
    let args: Vec<String> = debs.iter().map(|d| format!("./{}", file_name(d))).collect();
    c.run(&format!(
        "cd /debs && apt-get install -y -q --no-install-recommends {}",
        args.join(" ")
    ))
    .ok();
    let unit = c
        .run("systemctl cat vhost-blk-backend@.service")
        .ok()
        .to_string();
    assert!(
        unit.contains("ExecStart=/usr/bin/vhost-blk-backend --fd 3 "),
        "{unit}"
    );
    assert!(unit.contains("\nRestart=always\n"), "{unit}");
    assert!(unit.contains("\nUser=vhost-dataplane\n"), "{unit}");
    let uid = c.run("id -u vhost-dataplane").ok().to_string();

    // --- vhost-blk-backend@vm1
    c.run(
        "chgrp vhost-dataplane /var/lib/vhost-dataplane/vm1.img && \
         chmod 660 /var/lib/vhost-dataplane/vm1.img && \
         echo 'ARGS=\"--blk-file /var/lib/vhost-dataplane/vm1.img --serial pkg-vm1\"' \
             > /etc/vhost-dataplane/blk/vm1.conf && \
         systemctl enable --now vhost-blk-backend@vm1.socket",
    )
    .ok();
    let (sock_unit, svc) = (
        "vhost-blk-backend@vm1.socket",
        "vhost-blk-backend@vm1.service",
    );
    assert_eq!(show(&c, sock_unit, "ActiveState"), "active");
    assert_eq!(show(&c, sock_unit, "UnitFileState"), "enabled");
    assert_eq!(
        show(&c, svc, "ActiveState"),
        "inactive",
        "nothing starts the backend before the VMM connects"
    );
    let sock = c.host_path("/run/vhost-dataplane/vm1/blk.sock");
    let opts = FrontendOptions::default();
    let mut fe = TestFrontend::connect_within(&sock, opts, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("connecting to {}: {e}\n{}", sock.display(), status(&c, svc)));
    let pid = check_main_process(&c, svc, "vhost-blk-backend", &uid);
    // The instance's configuration reached it: GET_ID answers its --serial.
    let (st, id) = blk_request(&mut fe, VIRTIO_BLK_T_GET_ID, 0, None, 20);
    assert_eq!(st, 0);
    assert_eq!(&id[..7], b"pkg-vm1");
    let first = pattern(7, 8192);
    assert_eq!(
        blk_request(&mut fe, VIRTIO_BLK_T_OUT, 64, Some(&first), 8192).0,
        0
    );
    let (st, back) = blk_request(&mut fe, VIRTIO_BLK_T_IN, 64, None, 8192);
    assert_eq!(st, 0);
    assert!(back == first, "read back what was written");
    let mut on_disk = vec![0u8; 8192];
    fs::File::open(&image)
        .unwrap()
        .read_exact_at(&mut on_disk, 64 * 512)
        .unwrap();
    assert!(on_disk == first, "the write is in the image file");
    let journal = c
        .run(&format!("journalctl -u {svc} -o cat --no-pager"))
        .ok()
        .to_string();
    assert!(
        journal.contains("bytes, O_DIRECT, I/O engine io_uring, block size 512)"),
        "an on-disk image through io_uring:\n{journal}"
    );

    // Restart=always: SIGKILLed, it comes back on the same socket and serves the data.
    c.run(&format!("kill -KILL {pid}")).ok();
    wait_until(Duration::from_secs(30), "the restarted backend", || {
        show(&c, svc, "NRestarts") == "1"
            && show(&c, svc, "ActiveState") == "active"
            && !matches!(show(&c, svc, "MainPID").as_str(), "0" | "")
    });
    let restarted = check_main_process(&c, svc, "vhost-blk-backend", &uid);
    assert_ne!(restarted, pid);
    fe.reconnect(&sock)
        .unwrap_or_else(|e| panic!("reconnecting: {e}"));
    let (st, back) = blk_request(&mut fe, VIRTIO_BLK_T_IN, 64, None, 8192);
    assert_eq!(st, 0);
    assert!(back == first, "the restarted backend reads the same data");
    let second = pattern(99, 4096);
    assert_eq!(
        blk_request(&mut fe, VIRTIO_BLK_T_OUT, 200, Some(&second), 4096).0,
        0
    );
    assert!(blk_request(&mut fe, VIRTIO_BLK_T_IN, 200, None, 4096).1 == second);
    // systemctl stop: SIGTERM, a clean exit with the VMM still connected.
    c.run(&format!("systemctl stop {svc}")).ok();
    assert_eq!(show(&c, svc, "Result"), "success");
    assert_eq!(show(&c, svc, "ExecMainStatus"), "0");
    drop(fe);
    let journal = c
        .run(&format!("journalctl -u {svc} -o cat --no-pager"))
        .ok()
        .to_string();
    assert!(!journal.contains("seccomp: denied"), "{journal}");

    // --- serial-backend@vm1: a console socket and a pty in its runtime directory.
    c.run(
        "echo 'ARGS=\"--console socket=/run/vhost-dataplane/vm1/serial/console.sock \
         --console pty --hostinfo\"' > /etc/vhost-dataplane/serial/vm1.conf && \
         systemctl enable --now serial-backend@vm1.socket",
    )
    .ok();
    let svc = "serial-backend@vm1.service";
    assert_eq!(show(&c, svc, "ActiveState"), "inactive");
    let sock = c.host_path("/run/vhost-dataplane/vm1/serial.sock");
    let fe = TestFrontend::handshake(&sock, &FrontendOptions::default())
        .unwrap_or_else(|e| panic!("handshake with serial-backend: {e}\n{}", status(&c, svc)));
    check_main_process(&c, svc, "serial-backend", &uid);
    let console = c.host_path("/run/vhost-dataplane/vm1/serial/console.sock");
    let meta = fs::metadata(&console).unwrap_or_else(|e| panic!("{}: {e}", console.display()));
    assert_eq!(
        meta.uid().to_string(),
        uid,
        "the port socket is the service's"
    );
    let journal = c
        .run(&format!("journalctl -u {svc} -o cat --no-pager"))
        .ok()
        .to_string();
    assert!(journal.contains("console on pty /dev/pts/"), "{journal}");
    drop(fe);

    // --- vhost-net-backend@vm1: no capabilities, on a tap made for its user.
    let tap = Tap::create(&format!("vdppkg{}", std::process::id() % 100_000), &uid);
    c.run(&format!(
        "echo 'ARGS=\"--tap {}\"' > /etc/vhost-dataplane/net/vm1.conf && \
         systemctl enable --now vhost-net-backend@vm1.socket",
        tap.0
    ))
    .ok();
    let svc = "vhost-net-backend@vm1.service";
    let sock = c.host_path("/run/vhost-dataplane/vm1/net.sock");
    let fe = TestFrontend::handshake(&sock, &FrontendOptions::default())
        .unwrap_or_else(|e| panic!("handshake with vhost-net-backend: {e}\n{}", status(&c, svc)));
    check_main_process(&c, svc, "vhost-net-backend", &uid);
    let journal = c
        .run(&format!("journalctl -u {svc} -o cat --no-pager"))
        .ok()
        .to_string();
    assert!(journal.contains(&format!("serving {}", tap.0)), "{journal}");
    drop(fe);

    for (program, _) in PROGRAMS {
        let unit = format!("{program}@vm1.service");
        let level = exposure(&c, &unit);
        eprintln!("{unit}: systemd-analyze security exposure {level}");
        assert!(level <= 2.0, "{unit} lost its hardening: exposure {level}");
    }
}
