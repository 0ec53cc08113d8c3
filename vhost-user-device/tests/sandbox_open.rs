//! A thread whose list has no openat may still meet an open(2) it did not ask for: glibc's
//! free() opens /proc/sys/vm/overcommit_memory (once per process) when it first shrinks a
//! thread arena's heap, e.g. as a queue worker exits. Seen in scripts/soak.sh:
//! vhost-net-backend died with `denied system call 257 (openat) in thread net-q0`. Such an
//! open must fail (EACCES; glibc copes) instead of ending the process; calls that are
//! simply not on a list still end it (tests/sandbox.rs of each program).
//!
//! Its own test binary: the sandbox is configured once per process.

use std::ffi::CString;

use vhost_user_device::sandbox::{self, Allow, SandboxMode, ThreadKind};

fn open_rdonly(path: &str) -> Result<i32, i32> {
    let p = CString::new(path).unwrap();
    // SAFETY: a NUL-terminated path; the fd, if any, is closed below.
    let fd = unsafe { libc::open(p.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd >= 0 {
        // SAFETY: our own fd.
        unsafe { libc::close(fd) };
        Ok(fd)
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

#[test]
fn an_open_in_a_thread_without_openat_fails_with_eacces_and_the_process_lives() {
    // Workers get nothing extra; jobs may open files.
    let profile: sandbox::Profile = Box::new(|k| match k {
        ThreadKind::Job => Allow::new().calls(&[libc::SYS_openat]),
        _ => Allow::new(),
    });
    sandbox::configure(SandboxMode::Seccomp, profile, false).unwrap();
    assert!(open_rdonly("/proc/sys/vm/overcommit_memory").is_ok());
    let worker = std::thread::spawn(|| {
        sandbox::enter(ThreadKind::Worker).unwrap();
        open_rdonly("/proc/sys/vm/overcommit_memory")
    })
    .join()
    .unwrap();
    assert_eq!(worker, Err(libc::EACCES));
    let job = std::thread::spawn(|| {
        sandbox::enter(ThreadKind::Job).unwrap();
        open_rdonly("/proc/sys/vm/overcommit_memory")
    })
    .join()
    .unwrap();
    assert!(job.is_ok(), "a job may open files: {job:?}");
}
