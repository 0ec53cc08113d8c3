//! Guest-harness additions for the console tests: QEMU 11 from a trixie chroot (only
//! QEMU >= 10.2 has a user-creatable `vhost-user-test-device-pci`), the serial-backend
//! binary, and host-side port clients.

use std::fs;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::guest::{harness_dir, is_executable, locate_binary, work_dir, GuestEnv, GuestTest};

/// Runs `tests/guest/setup-qemu-trixie.sh` (idempotent; needs root) and returns the QEMU 11
/// wrapper, or `$QEMU_CONSOLE` if set. `Err` is the reason to skip.
pub fn qemu_for_console() -> Result<PathBuf, String> {
    if let Some(q) = std::env::var_os("QEMU_CONSOLE").filter(|q| !q.is_empty()) {
        return Ok(PathBuf::from(q));
    }
    let wrapper = work_dir().join("qemu-trixie/qemu-system-x86_64");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let log = work_dir().join("setup-qemu-trixie.log");
        let out = fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let st = Command::new("bash")
            .arg(harness_dir().join("setup-qemu-trixie.sh"))
            .env("VHOST_GUEST_WORK", work_dir())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .status()
            .map_err(|e| format!("cannot run setup-qemu-trixie.sh: {e}"))?;
        if !st.success() {
            return Err(format!(
                "tests/guest/setup-qemu-trixie.sh failed ({st}); see {}:\n{}",
                log.display(),
                crate::guest::tail_file(&log, 10)
            ));
        }
    }
    if is_executable(&wrapper) {
        Ok(wrapper)
    } else {
        Err(format!(
            "no QEMU >= 10.2 ({} missing): run tests/guest/setup-qemu-trixie.sh as root \
             (QEMU 10.0 has no user-creatable vhost-user-test-device-pci)",
            wrapper.display()
        ))
    }
}

/// Makes `t` boot with `qemu` instead of the harness's default QEMU.
pub fn use_qemu(t: &mut GuestTest, qemu: PathBuf) {
    let env: GuestEnv = GuestEnv {
        qemu,
        ..t.env.clone()
    };
    t.env = Box::leak(Box::new(env));
}

/// `$SERIAL_BACKEND`, else the newest `{<test target dir>,$CARGO_TARGET_DIR,<workspace>/target}/{release,debug}/serial-backend`.
pub fn locate_serial_backend() -> Result<PathBuf, String> {
    locate_binary("serial-backend", "SERIAL_BACKEND")
}

/// QEMU arguments attaching a vhost-user virtio-console with `max_ports` ports.
pub fn vhost_user_console_args(socket: &Path, max_ports: u32) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id=vc,path={}", socket.display()),
        "-device".into(),
        format!(
            "vhost-user-test-device-pci,chardev=vc,virtio-id=3,num_vqs={},config_size=12",
            2 * (max_ports + 1)
        ),
    ]
}

/// Connects to a unix socket, retrying until `timeout`.
pub fn connect_retry(path: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    let start = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() > timeout => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Reads `s` to EOF; returns (sha256 hex, bytes, seconds from the first byte to EOF).
pub fn sha_to_eof(s: &mut UnixStream) -> std::io::Result<(String, u64, f64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    let mut first = None;
    loop {
        let k = s.read(&mut buf)?;
        if k == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        h.update(&buf[..k]);
        n += k as u64;
    }
    let secs = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(0.0);
    Ok((format!("{:x}", h.finalize()), n, secs))
}

/// `len` bytes of a deterministic pattern and their sha256.
pub fn pattern(seed: u32, len: usize) -> (Vec<u8>, String) {
    let mut x = seed | 1;
    let v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let sha = format!("{:x}", Sha256::digest(&v));
    (v, sha)
}
