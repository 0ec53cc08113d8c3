//! The `--sandbox` checks every backend program's tests share: the hidden
//! `--sandbox-selftest` makes a forbidden call (ptrace) right after the main thread entered
//! the sandbox.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// What the denial message of the selftest must say.
pub const DENIAL: &str = "seccomp: denied system call 101 (ptrace) in thread main/protocol; \
                          run with --sandbox none to confirm, see README";

fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return Some(st);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// Starts `cmd` (a backend with its device arguments and `--socket-path socket`) with
/// `--sandbox-selftest` under the default sandbox, and checks that the process ended with
/// status 159 (128 + SIGSYS) and the clear message.
pub fn selftest_is_killed(mut cmd: Command) {
    let mut child = cmd
        .arg("--sandbox-selftest")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env_remove("VHOST_SANDBOX")
        .spawn()
        .expect("start the backend");
    let st = wait_exit(&mut child, Duration::from_secs(20));
    if st.is_none() {
        let _ = child.kill();
    }
    let err = stderr_of(&mut child);
    let st = st.unwrap_or_else(|| panic!("the forbidden call did not end the process:\n{err}"));
    assert_eq!(st.code(), Some(159), "{st:?}\n{err}");
    assert!(err.contains(DENIAL), "no clear message in:\n{err}");
}

/// The same with `--sandbox none`: the call goes through, the backend keeps serving
/// (`socket` appears) and exits 0 on SIGTERM.
pub fn selftest_passes_without_sandbox(mut cmd: Command, socket: &Path) {
    let mut child = cmd
        .args(["--sandbox", "none", "--sandbox-selftest"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the backend");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if Instant::now() > deadline || child.try_wait().expect("wait").is_some() {
            let _ = child.kill();
            panic!("backend did not come up:\n{}", stderr_of(&mut child));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // The selftest runs as serving starts, after the socket is bound: give it a moment.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "backend ended:\n{}",
        stderr_of(&mut child)
    );
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let st = wait_exit(&mut child, Duration::from_secs(20));
    if st.is_none() {
        let _ = child.kill();
    }
    let err = stderr_of(&mut child);
    assert!(st.is_some_and(|s| s.success()), "{st:?}\n{err}");
    assert!(
        err.contains("sandbox selftest: ptrace was not denied"),
        "selftest did not run:\n{err}"
    );
    assert!(!err.contains("seccomp: denied"), "{err}");
}
