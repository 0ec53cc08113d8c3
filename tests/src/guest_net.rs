//! Guest-harness additions for network tests: network namespaces, commands inside them,
//! an iperf3 server, QEMU arguments for vhost-user-net, locating the backend binary, and
//! the iperf3 runs shared by the guest test and `bench compare net` (a guest on
//! vhost-net-backend, and the same guest on QEMU's own `-netdev tap,vhost=off`).
//!
//! Everything lives in a namespace the test creates (tap, addresses, iperf3 server), with
//! link-local addresses only, and is deleted when the [`NetNs`] is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::guest::{locate_binary, Backend, GuestBoot, GuestTest};

/// A network namespace, deleted on drop (with every interface in it).
pub struct NetNs {
    /// Its name (`ip netns`).
    pub name: String,
}

impl NetNs {
    /// Creates `vhn-<tag>-<pid>`.
    pub fn create(tag: &str) -> Result<NetNs, String> {
        let name = format!("vhn-{tag}-{}", std::process::id());
        // A leftover of an earlier process with our pid; usually none (quietly).
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = NetNs { name };
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A command running inside the namespace.
    pub fn command(&self, program: impl AsRef<Path>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program.as_ref());
        c
    }

    /// Runs `args` inside the namespace and checks it succeeded.
    pub fn run(&self, args: &[&str]) -> Result<(), String> {
        let (prog, rest) = args.split_first().ok_or("empty command")?;
        run(self.command(prog).args(rest))
    }

    /// Waits until interface `dev` exists in the namespace.
    pub fn wait_for_link(&self, dev: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let ok = self
                .command("ip")
                .args(["link", "show", dev])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("no interface {dev} in namespace {}", self.name))
    }

    /// Creates bridge `br` in the namespace (no STP, no forward delay, IPv6 off so no
    /// autoconfiguration chatter) and brings it up.
    pub fn add_bridge(&self, br: &str) -> Result<(), String> {
        let _ = self.run(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        let _ = self.run(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
        self.run(&[
            "ip",
            "link",
            "add",
            br,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ])?;
        self.run(&["ip", "link", "set", br, "up"])
    }

    /// Enslaves `dev` to bridge `br` and brings it up.
    pub fn enslave(&self, dev: &str, br: &str) -> Result<(), String> {
        self.run(&["ip", "link", "set", dev, "master", br])?;
        self.run(&["ip", "link", "set", dev, "up"])
    }

    /// Runs `f` on a new thread that lives in the namespace (setns on that thread only):
    /// the sockets it opens are the namespace's, so the test itself can be a peer there.
    /// The thread's result is `f`'s, or why it could not enter the namespace (then `f`
    /// does not run).
    pub fn spawn_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T, String>> {
        use std::os::fd::AsRawFd;
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
            // SAFETY: setns on an fd we own; it moves only this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!(
                    "setns into {path}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(f())
        })
    }

    /// Starts an iperf3 server bound to `ip` inside the namespace (killed on drop).
    /// Starts an iperf3 server in the namespace, listening on every address of it (only the
    /// namespace's own tap is there), so it may start before the tap has its address.
    pub fn iperf3_server(&self, log: &Path) -> Result<KillOnDrop, String> {
        let f = std::fs::File::create(log).map_err(|e| e.to_string())?;
        let f2 = f.try_clone().map_err(|e| e.to_string())?;
        let child = self
            .command("iperf3")
            .args(["-s"])
            .stdout(f)
            .stderr(f2)
            .spawn()
            .map_err(|e| format!("cannot start iperf3: {e}"))?;
        Ok(KillOnDrop(child))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A child process killed (and reaped) on drop.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// QEMU arguments for a vhost-user NIC on `socket` with `queues` queue pairs.
pub fn vhost_user_net_args(socket: &Path, queues: u16, mac: &str) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id=cn0,path={}", socket.display()),
        "-netdev".into(),
        format!("vhost-user,id=n0,chardev=cn0,queues={queues}"),
        "-device".into(),
        format!(
            "virtio-net-pci,netdev=n0,mac={mac},romfile={}",
            if queues > 1 { ",mq=on" } else { "" }
        ),
    ]
}

/// `$VHOST_NET_BACKEND` or the newest
/// `{<target dir of this test binary>,$CARGO_TARGET_DIR,<workspace>/target}/{release,debug}/vhost-net-backend`.
pub fn locate_vhost_net_backend() -> Result<PathBuf, String> {
    locate_binary("vhost-net-backend", "VHOST_NET_BACKEND")
}

/// Waits until the backend `be` created its socket file `sock` (std binds and listens in
/// one step, so the file existing is enough; the harness's `wait_for_socket` reads
/// `/proc/net/unix` of our namespace, which does not show a socket bound in another one).
pub fn wait_socket_file(be: &mut Backend, sock: &Path, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !sock.exists() {
        if !be.is_running() {
            return Err(format!(
                "backend exited early; see {}",
                be.log_path().display()
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!("backend did not listen on {}", sock.display()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Host end of the guest's link in the iperf3 runs (link-local, inside the namespace).
pub const IPERF_HOST_IP: &str = "169.254.77.1";
const IPERF_HOST_CIDR: &str = "169.254.77.1/30";
const IPERF_GUEST_CIDR: &str = "169.254.77.2/30";

/// What one guest's iperf3 run (`net-iperf.sh`) measured.
#[derive(Clone, Debug)]
pub struct IperfResult {
    /// Guest → host, Mbit/s (iperf3's receiver figure).
    pub tx_mbps: f64,
    /// Host → guest (`-R`), Mbit/s.
    pub rx_mbps: f64,
    /// RX queues the guest's NIC has (its queue pairs).
    pub queues: String,
}

/// Boots `net-iperf.sh` with `qemu_args` (a NIC whose host end is [`IPERF_HOST_IP`] with
/// an iperf3 server behind it): ping, then `secs` seconds of iperf3 each way.
pub fn boot_iperf(
    t: &mut GuestTest,
    qemu_args: Vec<String>,
    cpus: u32,
    secs: u32,
) -> Result<IperfResult, String> {
    let out = t
        .try_boot(
            &GuestBoot::new("net-iperf.sh")
                .env("GUEST_IP", IPERF_GUEST_CIDR)
                .env("HOST_IP", IPERF_HOST_IP)
                .env("IPERF_TIME", secs)
                .cpus(cpus)
                .timeout(Duration::from_secs(150 + 2 * u64::from(secs)))
                .qemu_args(qemu_args),
        )
        .map_err(|e| e.to_string())?;
    out.check()?;
    let get = |k: &str| out.results.get(k).map(String::as_str).unwrap_or("");
    if get("ping") != "ok" {
        return Err(format!(
            "guest could not ping the host; console: {}",
            out.console_log.display()
        ));
    }
    let mbps = |k: &str| get(k).parse::<f64>().unwrap_or(0.0);
    Ok(IperfResult {
        tx_mbps: mbps("iperf_tx_mbps"),
        rx_mbps: mbps("iperf_rx_mbps"),
        queues: get("queues").to_string(),
    })
}

/// iperf3 in a guest on vhost-net-backend (`bin`, `pairs` queue pairs): the backend runs
/// in a fresh namespace on tap `vutap0` with the iperf3 server; it must exit cleanly on
/// SIGTERM afterwards. `tag` names the logs (`<tag>.log`, `iperf3-<tag>.log`).
pub fn iperf_vhost_user(
    t: &mut GuestTest,
    bin: &Path,
    pairs: u16,
    cpus: u32,
    secs: u32,
    tag: &str,
) -> Result<IperfResult, String> {
    let ns = NetNs::create("vu")?;
    let sock = t.path(&format!("{tag}.sock"));
    let _ = std::fs::remove_file(&sock);
    let mut cmd = ns.command(bin);
    cmd.arg("--socket-path").arg(&sock).args([
        "--tap",
        "vutap0",
        "--num-queue-pairs",
        &pairs.to_string(),
    ]);
    let mut be = t
        .spawn_backend(tag, cmd)
        .map_err(|e| format!("cannot start the backend: {e}"))?;
    wait_socket_file(&mut be, &sock, Duration::from_secs(15))?;
    ns.run(&["ip", "addr", "add", IPERF_HOST_CIDR, "dev", "vutap0"])?;
    ns.run(&["ip", "link", "set", "vutap0", "up"])?;
    let iperf = ns.iperf3_server(&t.path(&format!("iperf3-{tag}.log")))?;
    std::thread::sleep(Duration::from_millis(300));
    let res = boot_iperf(
        t,
        vhost_user_net_args(&sock, pairs, "52:54:00:00:77:02"),
        cpus,
        secs,
    );
    let stopped = be.stop();
    drop(iperf);
    let res = res?;
    stopped.map_err(|e| format!("backend did not exit on SIGTERM: {e}"))?;
    Ok(res)
}

/// A tap in the host namespace, deleted on drop (unless moved away).
struct HostTap(String);

impl Drop for HostTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

/// iperf3 in the same guest on QEMU's own `-netdev tap,vhost=off` (QEMU's userspace
/// virtio-net). QEMU opens the tap in the host namespace before the guest runs, so the
/// tap is created there and moved into a fresh namespace (with the iperf3 server) as
/// soon as QEMU attached to it; the guest retries its ping for 30 s meanwhile.
pub fn iperf_qemu_tap(
    t: &mut GuestTest,
    cpus: u32,
    secs: u32,
    tag: &str,
) -> Result<IperfResult, String> {
    let ns = NetNs::create("qt")?;
    let tap = format!("vqt{}", std::process::id() % 100_000);
    run(Command::new("ip").args(["tuntap", "add", &tap, "mode", "tap", "vnet_hdr"]))?;
    let _deltap = HostTap(tap.clone());
    // Up without addresses (no IPv6 chatter), so its carrier shows when QEMU attaches.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6"), "1");
    run(Command::new("ip").args(["link", "set", &tap, "up"]))?;
    let ns_name = ns.name.clone();
    let tap2 = tap.clone();
    let mover = std::thread::spawn(move || {
        for _ in 0..300 {
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
                    let inside = |args: &[&str]| {
                        Command::new("ip")
                            .args(["netns", "exec", &ns_name, "ip"])
                            .args(args)
                            .status()
                            .is_ok_and(|s| s.success())
                    };
                    return inside(&["addr", "add", IPERF_HOST_CIDR, "dev", &tap2])
                        && inside(&["link", "set", &tap2, "up"]);
                }
            }
        }
        false
    });
    let iperf = ns.iperf3_server(&t.path(&format!("iperf3-{tag}.log")))?;
    let args = vec![
        "-netdev".to_string(),
        format!("tap,id=n1,ifname={tap},script=no,downscript=no,vhost=off"),
        "-device".to_string(),
        "virtio-net-pci,netdev=n1,mac=52:54:00:00:77:03,romfile=".to_string(),
    ];
    let res = boot_iperf(t, args, cpus, secs);
    let moved = mover.join().unwrap_or(false);
    drop(iperf);
    let res = res?;
    if !moved {
        return Err(format!("could not move {tap} into {}", ns.name));
    }
    Ok(res)
}
