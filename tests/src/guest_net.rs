//! Guest-harness additions for network tests: network namespaces, commands inside them,
//! an iperf3 server, QEMU arguments for vhost-user-net, and locating the backend binary.
//!
//! Everything lives in a namespace the test creates (tap, addresses, iperf3 server), with
//! link-local addresses only, and is deleted when the [`NetNs`] is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::guest::{locate_binary, Backend};

/// A network namespace, deleted on drop (with every interface in it).
pub struct NetNs {
    /// Its name (`ip netns`).
    pub name: String,
}

impl NetNs {
    /// Creates `vhn-<tag>-<pid>`.
    pub fn create(tag: &str) -> Result<NetNs, String> {
        let name = format!("vhn-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
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
