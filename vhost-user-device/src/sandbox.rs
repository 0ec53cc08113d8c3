//! The seccomp sandbox: after start-up every thread of a backend runs under a seccomp
//! filter (built with rust-vmm's `seccompiler`) that allows only the system calls its kind
//! of thread needs.
//!
//! A backend calls [`configure`] at the start of its `run` with the `--sandbox` mode and
//! its [`Profile`] (the calls its own code adds to each [`ThreadKind`]); then each thread
//! calls [`enter`] with its kind: the main thread when start-up is done (the disk, tap or
//! ports are open and the socket is listening: [`crate::Server::serve`] does it), the
//! signal threads and the queue workers as they start. Filters are per thread (no TSYNC).
//!
//! Filters stack: a thread created after its creator entered the sandbox runs under the
//! creator's filter *and* its own. The main thread creates the queue workers (and their
//! io_uring, epoll and eventfds), so its filter is its own list plus the workers' list;
//! a worker's effective list is then exactly the workers' list. All threads share one
//! address space, so the per-thread lists narrow what each thread's code can be made to do
//! directly; the whole process can at most do the union.
//!
//! A denied call raises SIGSYS (SECCOMP_RET_TRAP); the handler writes, with write(2) only,
//! `seccomp: denied system call N (name) in thread T; run with --sandbox none to confirm,
//! see README` to stderr and exits with status 159 (128 + SIGSYS). `--sandbox log`
//! installs the same filters with SECCOMP_RET_LOG instead: nothing is denied, and the
//! kernel log (`dmesg`, audit) names every call that would have been.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// `--sandbox`: whether to install the seccomp filters.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SandboxMode {
    /// Install the per-thread seccomp filters; a denied call ends the process.
    #[default]
    Seccomp,
    /// Install the filters but only log would-be denials to the kernel log (dmesg).
    Log,
    /// No filter (to tell whether a failure comes from the sandbox).
    None,
}

/// The kinds of thread a backend has; each gets its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread after start-up: it accepts frontends and runs the vhost-user
    /// protocol handler, and creates the queue workers.
    Main,
    /// The SIGTERM/SIGINT thread ([`crate::server::handle_termination_signals`]).
    Signals,
    /// A backend's own helper thread that only waits for a signal and logs (net's SIGUSR1
    /// counters thread).
    SignalLogger,
    /// A queue worker.
    Worker,
    /// The control socket (`--control-socket`): its accept thread and the one thread per
    /// client it creates, which run the backend's commands; also the `--metrics-addr`
    /// thread. The threads those commands
    /// start ([`ThreadKind::Job`]) begin under this filter, so its list includes theirs.
    Control,
    /// A backend's long-running job (blk: a block migration, either end). The layer adds
    /// nothing of its own; the backend's profile says what a job does.
    Job,
    /// Moves the device's state through the pipe of SET_DEVICE_STATE_FD (the VMM's
    /// migration): reads or writes one descriptor, then ends.
    StateTransfer,
}

impl ThreadKind {
    fn label(self) -> &'static str {
        match self {
            ThreadKind::Main => "main/protocol",
            ThreadKind::Signals => "signals",
            ThreadKind::SignalLogger => "signal logger",
            ThreadKind::Worker => "queue worker",
            ThreadKind::Control => "control socket",
            ThreadKind::Job => "job",
            ThreadKind::StateTransfer => "device state transfer",
        }
    }
}

/// A set of allowed system calls, some with conditions on their arguments.
#[derive(Clone, Debug, Default)]
pub struct Allow {
    rules: BTreeMap<i64, Option<Vec<SeccompRule>>>,
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    // Valid by construction: arg < 6 and the operators take any value.
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
        .expect("a valid seccomp condition")
}

fn rule(conds: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conds).expect("a non-empty seccomp rule")
}

impl Allow {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Allows `calls` (libc::SYS_* numbers) with any arguments.
    pub fn calls(mut self, calls: &[libc::c_long]) -> Self {
        for &c in calls {
            self.rules.insert(c, None);
        }
        self
    }

    /// Allows `call` when argument `arg` equals one of `values`.
    pub fn arg_in(mut self, call: libc::c_long, arg: u8, values: &[u64]) -> Self {
        let new: Vec<SeccompRule> = values
            .iter()
            .map(|&v| rule(vec![cond(arg, SeccompCmpOp::Eq, v)]))
            .collect();
        self.add(call, Some(new));
        self
    }

    /// Allows `call` when argument `arg` has none of the bits of `mask` set.
    pub fn arg_without(mut self, call: libc::c_long, arg: u8, mask: u64) -> Self {
        self.add(
            call,
            Some(vec![rule(vec![cond(arg, SeccompCmpOp::MaskedEq(mask), 0)])]),
        );
        self
    }

    /// Allows `call` when `arg & mask == value`.
    pub fn arg_masked(mut self, call: libc::c_long, arg: u8, mask: u64, value: u64) -> Self {
        self.add(
            call,
            Some(vec![rule(vec![cond(
                arg,
                SeccompCmpOp::MaskedEq(mask),
                value,
            )])]),
        );
        self
    }

    /// Allows fcntl(2) for descriptor and status flags (GETFD, SETFD, GETFL, SETFL) and
    /// DUPFD_CLOEXEC: what std and our own code do with descriptors they own.
    pub fn fcntl_basic(self) -> Self {
        self.arg_in(
            libc::SYS_fcntl,
            1,
            &[
                libc::F_GETFD as u64,
                libc::F_SETFD as u64,
                libc::F_GETFL as u64,
                libc::F_SETFL as u64,
                libc::F_DUPFD_CLOEXEC as u64,
            ],
        )
    }

    /// Allows ioctl(2) with these request numbers only.
    pub fn ioctls(self, requests: &[libc::c_ulong]) -> Self {
        // c_ulong is u32 on 32-bit targets.
        #[allow(clippy::unnecessary_cast)]
        let requests: Vec<u64> = requests.iter().map(|&r| r as u64).collect();
        self.arg_in(libc::SYS_ioctl, 1, &requests)
    }

    fn add(&mut self, call: libc::c_long, new: Option<Vec<SeccompRule>>) {
        match (self.rules.get_mut(&call), new) {
            (None, new) => {
                self.rules.insert(call, new);
            }
            (Some(None), _) => {}
            (Some(slot), None) => *slot = None,
            (Some(Some(old)), Some(new)) => old.extend(new),
        }
    }

    /// Everything in `self` or in `other`.
    pub fn union(mut self, other: &Allow) -> Self {
        for (&call, r) in &other.rules {
            self.add(call, r.clone());
        }
        self
    }

    /// Whether `call` is allowed at all (with or without conditions).
    pub fn contains(&self, call: libc::c_long) -> bool {
        self.rules.contains_key(&call)
    }

    fn compile(&self, mode: SandboxMode) -> Result<BpfProgram, seccompiler::BackendError> {
        let mismatch = if mode == SandboxMode::Log {
            SeccompAction::Log
        } else {
            SeccompAction::Trap
        };
        let rules = self
            .rules
            .iter()
            .map(|(&c, r)| (c, r.clone().unwrap_or_default()))
            .collect();
        let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|_| {
            seccompiler::BackendError::InvalidTargetArch(std::env::consts::ARCH.into())
        })?;
        let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)?;
        filter.try_into()
    }
}

/// What a backend adds to each thread kind's list (its device's own calls).
pub type Profile = Box<dyn Fn(ThreadKind) -> Allow + Send + Sync>;

/// What every thread needs: memory (no executable mappings), locks, time, logging to
/// stderr, closing fds, signal return, thread exit.
fn base() -> Allow {
    let exec = libc::PROT_EXEC as u64;
    Allow::new()
        .calls(&[
            libc::SYS_brk,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
            libc::SYS_futex,
            libc::SYS_sched_yield,
            libc::SYS_nanosleep,
            libc::SYS_clock_nanosleep,
            libc::SYS_clock_gettime,
            libc::SYS_gettimeofday,
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_close,
            libc::SYS_getrandom,
            libc::SYS_rt_sigreturn,
            // The kernel's restart of a call interrupted by a stop (SIGSTOP, SIGCONT).
            libc::SYS_restart_syscall,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_getpid,
            libc::SYS_gettid,
            libc::SYS_exit,
            libc::SYS_exit_group,
        ])
        .arg_without(libc::SYS_mmap, 2, exec)
        .arg_without(libc::SYS_mprotect, 2, exec)
        // abort() after a panic while panicking raises SIGABRT at itself.
        .arg_in(libc::SYS_tgkill, 2, &[libc::SIGABRT as u64])
}

/// The layer's own calls per kind (without [`base`] and without the backend's profile).
fn layer(kind: ThreadKind) -> Allow {
    match kind {
        ThreadKind::Main => Allow::new()
            .calls(&[
                // Accepting frontends and the vhost-user messages (fds ride on SCM_RIGHTS).
                libc::SYS_poll,
                libc::SYS_ppoll,
                libc::SYS_accept4,
                libc::SYS_accept,
                libc::SYS_recvfrom,
                libc::SYS_recvmsg,
                libc::SYS_sendmsg,
                libc::SYS_sendto,
                libc::SYS_shutdown,
                libc::SYS_getsockopt,
                libc::SYS_read,
                libc::SYS_readv,
                // Guest memory, the dirty log and the inflight region (memfd, sealed).
                libc::SYS_memfd_create,
                libc::SYS_ftruncate,
                libc::SYS_fstat,
                libc::SYS_newfstatat,
                libc::SYS_statx,
                libc::SYS_fstatfs,
                libc::SYS_lseek,
                libc::SYS_dup,
                // Worker threads: their eventfds, epoll, and the threads themselves.
                libc::SYS_eventfd2,
                libc::SYS_epoll_create1,
                libc::SYS_epoll_ctl,
                libc::SYS_clone3,
                libc::SYS_set_robust_list,
                libc::SYS_rseq,
                libc::SYS_sched_getaffinity,
                // fd_check: what a kick or call descriptor is (/proc/self/fd/N).
                libc::SYS_readlink,
                libc::SYS_readlinkat,
            ])
            .arg_masked(
                libc::SYS_clone,
                0,
                libc::CLONE_THREAD as u64,
                libc::CLONE_THREAD as u64,
            )
            .fcntl_basic()
            .arg_in(
                libc::SYS_fcntl,
                1,
                &[libc::F_ADD_SEALS as u64, libc::F_GET_SEALS as u64],
            )
            // The threads it creates name themselves and enter the sandbox.
            .arg_in(
                libc::SYS_prctl,
                0,
                &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64],
            )
            .arg_in(
                libc::SYS_seccomp,
                0,
                &[libc::SECCOMP_SET_MODE_FILTER as u64],
            ),
        ThreadKind::Signals => Allow::new().calls(&[
            libc::SYS_rt_sigtimedwait,
            // Shutdown::trigger: the server's eventfd and shutdown(2) of the connection.
            libc::SYS_shutdown,
        ]),
        ThreadKind::SignalLogger => Allow::new().calls(&[libc::SYS_rt_sigtimedwait]),
        ThreadKind::Worker => Allow::new()
            .calls(&[
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
                libc::SYS_epoll_ctl,
                libc::SYS_read,
            ])
            .fcntl_basic(),
        ThreadKind::Control => Allow::new()
            .calls(&[
                // Accepting clients (and the stop eventfd), talking QMP.
                libc::SYS_poll,
                libc::SYS_ppoll,
                libc::SYS_accept4,
                libc::SYS_accept,
                libc::SYS_read,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                // SO_PEERCRED against our own uid.
                libc::SYS_getsockopt,
                libc::SYS_geteuid,
                // One thread per client, with a socket pair that wakes it for events.
                libc::SYS_socketpair,
                libc::SYS_clone3,
                libc::SYS_set_robust_list,
                libc::SYS_rseq,
                libc::SYS_sched_getaffinity,
                // The socket file, removed when the server stops.
                libc::SYS_unlink,
                libc::SYS_unlinkat,
            ])
            .arg_masked(
                libc::SYS_clone,
                0,
                libc::CLONE_THREAD as u64,
                libc::CLONE_THREAD as u64,
            )
            // Non-blocking sockets (FIONBIO) and timeouts (SO_SNDTIMEO, SO_RCVTIMEO: the
            // metrics endpoint, which runs under this list too).
            .ioctls(&[libc::FIONBIO])
            .arg_in(
                libc::SYS_setsockopt,
                2,
                &[libc::SO_SNDTIMEO as u64, libc::SO_RCVTIMEO as u64],
            )
            .fcntl_basic()
            .arg_in(
                libc::SYS_prctl,
                0,
                &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64],
            )
            .arg_in(
                libc::SYS_seccomp,
                0,
                &[libc::SECCOMP_SET_MODE_FILTER as u64],
            ),
        ThreadKind::Job => Allow::new(),
        // write and close are in the base list.
        ThreadKind::StateTransfer => Allow::new().calls(&[libc::SYS_read]).fcntl_basic(),
    }
}

struct Config {
    mode: SandboxMode,
    profile: Profile,
    selftest: bool,
}

static CONFIG: OnceLock<Config> = OnceLock::new();

/// The complete list of `kind` under `profile` (what [`enter`] installs).
pub fn allowed(kind: ThreadKind, profile: &dyn Fn(ThreadKind) -> Allow) -> Allow {
    let own = base().union(&layer(kind)).union(&profile(kind));
    match kind {
        // The main thread creates the workers and the state transfers, which start under
        // its filter.
        ThreadKind::Main => own
            .union(&allowed(ThreadKind::Worker, profile))
            .union(&allowed(ThreadKind::StateTransfer, profile)),
        // Control clients start the jobs.
        ThreadKind::Control => own.union(&allowed(ThreadKind::Job, profile)),
        _ => own,
    }
}

/// The system calls that open a file by name.
#[cfg(target_arch = "x86_64")]
const OPEN_CALLS: &[libc::c_long] = &[libc::SYS_openat, libc::SYS_open];
#[cfg(not(target_arch = "x86_64"))]
const OPEN_CALLS: &[libc::c_long] = &[libc::SYS_openat];

/// A filter that makes open(2) and openat(2) fail with EACCES (only log them with
/// `--sandbox log`). Installed, on top of its own, in every thread whose list does not
/// allow opening files: code we do not control may open one anyway and cope with a
/// failure. glibc's free() opens /proc/sys/vm/overcommit_memory the first time it shrinks
/// a thread arena's heap (as a queue worker exits, say); a trap there ended
/// vhost-net-backend in `scripts/soak.sh`. A refused open reads nothing, so this gives a
/// thread no more than its list.
fn open_refusal(mode: SandboxMode) -> Result<BpfProgram, seccompiler::BackendError> {
    let refuse = if mode == SandboxMode::Log {
        SeccompAction::Log
    } else {
        SeccompAction::Errno(libc::EACCES as u32)
    };
    let rules = OPEN_CALLS.iter().map(|&c| (c, Vec::new())).collect();
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| seccompiler::BackendError::InvalidTargetArch(std::env::consts::ARCH.into()))?;
    SeccompFilter::new(rules, SeccompAction::Allow, refuse, arch)?.try_into()
}

/// Errors setting up the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The filter could not be built.
    #[error("building the seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    /// The filter could not be installed (a kernel without seccomp filters?).
    #[error("installing the seccomp filter (run with --sandbox none to go without): {0}")]
    Apply(#[from] seccompiler::Error),
    /// The SIGSYS handler could not be installed.
    #[error("installing the SIGSYS handler: {0}")]
    Signal(std::io::Error),
    /// [`configure`] was called twice.
    #[error("the sandbox was already configured")]
    Twice,
}

/// Sets the mode and the backend's profile for the threads that [`enter`] the sandbox
/// later; with a filtering mode, installs the SIGSYS handler that reports denials. Call it
/// once, at the start of `run`, before any thread is created.
///
/// With `selftest` (the hidden `--sandbox-selftest`), the main thread makes a forbidden
/// call right after it entered the sandbox (see [`selftest`]).
pub fn configure(mode: SandboxMode, profile: Profile, selftest: bool) -> Result<(), SandboxError> {
    if mode == SandboxMode::Seccomp {
        install_sigsys_handler()?;
    }
    CONFIG
        .set(Config {
            mode,
            profile,
            selftest,
        })
        .map_err(|_| SandboxError::Twice)
}

/// Installs the calling thread's filter for `kind` (nothing without [`configure`] or with
/// `--sandbox none`). Every later call of this thread, and of the threads it creates, must
/// be on the list.
pub fn enter(kind: ThreadKind) -> Result<(), SandboxError> {
    let Some(cfg) = CONFIG.get() else {
        return Ok(());
    };
    if cfg.mode != SandboxMode::None {
        let mut list = allowed(kind, &cfg.profile);
        // A thread that may not open files gets EACCES from open(2), not SIGSYS: see
        // [`open_refusal`]. Its own filter lets the calls through to the refusal, which
        // takes precedence (the kernel applies the strictest result of all filters).
        let refuse_open = !list.contains(libc::SYS_openat);
        if refuse_open {
            list = list.calls(OPEN_CALLS);
        }
        let prog = list.compile(cfg.mode)?;
        let refusal = if refuse_open {
            Some(open_refusal(cfg.mode)?)
        } else {
            None
        };
        set_thread_label(kind);
        // The refusal first: installing a filter takes prctl and seccomp, which the
        // thread's own list may not allow once it is in force.
        if let Some(r) = refusal {
            seccompiler::apply_filter(&r)?;
        }
        seccompiler::apply_filter(&prog)?;
    }
    if kind == ThreadKind::Main && cfg.selftest {
        selftest();
    }
    Ok(())
}

/// [`enter`] for a thread that has no way to report an error: logs it and ends the process
/// (a thread that silently ran unsandboxed would defeat `--sandbox seccomp`).
pub fn enter_or_exit(kind: ThreadKind) {
    if let Err(e) = enter(kind) {
        log::error!("{e}");
        std::process::exit(1);
    }
}

/// The hidden `--sandbox-selftest`: makes a call no thread is allowed (ptrace with an
/// invalid pid: harmless when it does run). Under `--sandbox seccomp` the process ends
/// with the denial message; otherwise this logs that the call went through.
pub fn selftest() {
    // SAFETY: ptrace(PTRACE_PEEKDATA) of pid 0 (no such tracee) fails with ESRCH and
    // touches no memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_ptrace,
            libc::PTRACE_PEEKDATA,
            0 as libc::pid_t,
            0usize,
            0usize,
        )
    };
    log::warn!(
        "sandbox selftest: ptrace was not denied (returned {rc}: {})",
        std::io::Error::last_os_error()
    );
}

const LABEL_LEN: usize = 64;

thread_local! {
    static LABEL: Cell<([u8; LABEL_LEN], usize)> = const { Cell::new(([0; LABEL_LEN], 0)) };
}

fn set_thread_label(kind: ThreadKind) {
    let text = match std::thread::current().name() {
        Some(n) if n != "main" => format!("{n} ({})", kind.label()),
        _ => kind.label().to_owned(),
    };
    let mut buf = [0u8; LABEL_LEN];
    let n = text.len().min(LABEL_LEN);
    buf[..n].copy_from_slice(&text.as_bytes()[..n]);
    LABEL.with(|l| l.set((buf, n)));
}

/// A small stack buffer for building the message without allocating.
struct Msg {
    buf: [u8; 256],
    len: usize,
}

impl Msg {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_num(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The system call's name, where this build knows the architecture's numbers.
fn syscall_name(nr: i64) -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        usize::try_from(nr)
            .ok()
            .and_then(|i| crate::sandbox_names::NAMES.get(i))
            .copied()
            .filter(|n| !n.is_empty())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = nr;
        None
    }
}

/// `siginfo_t` for SIGSYS as the kernel fills it (`_sigsys` in the union); libc does not
/// name these fields.
#[repr(C)]
struct SigsysInfo {
    si_signo: libc::c_int,
    si_errno: libc::c_int,
    si_code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Async-signal-safe only: a stack buffer, a thread-local Cell read and write(2).
    // SAFETY: the kernel passes a SIGSYS siginfo, laid out as SigsysInfo.
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall } as i64;
    let mut m = Msg {
        buf: [0; 256],
        len: 0,
    };
    m.push(b"seccomp: denied system call ");
    m.push_num(nr as u64);
    m.push(b" (");
    m.push(syscall_name(nr).unwrap_or("unknown").as_bytes());
    m.push(b") in thread ");
    let (label, n) = LABEL.try_with(|l| l.get()).unwrap_or(([0; LABEL_LEN], 0));
    if n == 0 {
        m.push(b"?");
    } else {
        m.push(&label[..n]);
    }
    m.push(b"; run with --sandbox none to confirm, see README\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is valid for len.
    unsafe {
        libc::write(2, m.buf.as_ptr().cast(), m.len);
        libc::_exit(128 + libc::SIGSYS);
    }
}

fn install_sigsys_handler() -> Result<(), SandboxError> {
    // SAFETY: a zeroed sigaction with our handler and SA_SIGINFO; the handler only does
    // async-signal-safe work.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(SandboxError::Signal(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_profile(_: ThreadKind) -> Allow {
        Allow::new()
    }

    #[test]
    fn every_kind_compiles_and_main_covers_the_workers() {
        for kind in [
            ThreadKind::Main,
            ThreadKind::Signals,
            ThreadKind::SignalLogger,
            ThreadKind::Worker,
            ThreadKind::Control,
            ThreadKind::Job,
            ThreadKind::StateTransfer,
        ] {
            let a = allowed(kind, &no_profile);
            assert!(a.compile(SandboxMode::Seccomp).is_ok(), "{kind:?}");
            assert!(a.contains(libc::SYS_exit_group));
            assert!(!a.contains(libc::SYS_ptrace));
            assert!(!a.contains(libc::SYS_execve));
        }
        let main = allowed(ThreadKind::Main, &no_profile);
        for c in allowed(ThreadKind::Worker, &no_profile).rules.keys() {
            assert!(main.contains(*c), "{c}");
        }
        assert!(!allowed(ThreadKind::Worker, &no_profile).contains(libc::SYS_clone3));
        // A job a profile allows to connect: the control threads that start it may too.
        let job = |k: ThreadKind| match k {
            ThreadKind::Job => Allow::new().calls(&[libc::SYS_connect]),
            _ => Allow::new(),
        };
        assert!(allowed(ThreadKind::Control, &job).contains(libc::SYS_connect));
        assert!(!allowed(ThreadKind::Main, &job).contains(libc::SYS_connect));
        assert!(!allowed(ThreadKind::Control, &no_profile).contains(libc::SYS_socket));
    }

    #[test]
    fn names_of_some_calls() {
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(syscall_name(libc::SYS_ptrace), Some("ptrace"));
            assert_eq!(
                syscall_name(libc::SYS_io_uring_setup),
                Some("io_uring_setup")
            );
            assert_eq!(syscall_name(100_000), None);
        }
    }

    #[test]
    fn message_numbers() {
        let mut m = Msg {
            buf: [0; 256],
            len: 0,
        };
        m.push_num(0);
        m.push(b",");
        m.push_num(1234);
        assert_eq!(&m.buf[..m.len], b"0,1234");
    }
}
