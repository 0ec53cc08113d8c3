//! Accepting frontends, one connection at a time, and staying up when they leave.
//!
//! Backend program conventions (QEMU docs/interop/vhost-user.rst): listen on
//! `--socket-path` or an inherited `--fd`, never daemonize, and exit cleanly on SIGTERM and
//! SIGINT. Each connection gets a fresh protocol [`Handler`]; the device (disk, tap, ports)
//! outlives connections, so a restarted VMM or a new VM reconnects to the same process.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use std::io::Write;

use vhost::vhost_user::{BackendReqHandler, Error as VuError, VhostUserBackendReqHandlerMut};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::VhostUserDevice;
use crate::fd_check::socket_int_option;
use crate::handler::Handler;
use crate::qmp_events::Events;
use crate::rate_limit::RateLimitedLog;
use crate::ring::QueueStats;
use crate::sandbox::{self, SandboxError, ThreadKind};

/// Errors that end serving.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket path could not be bound.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// The socket path.
        path: String,
        /// The OS error.
        source: io::Error,
    },
    /// `--fd` is not a listening unix socket.
    #[error("fd {fd} is not a listening unix socket: {source}")]
    BadFd {
        /// The descriptor number.
        fd: RawFd,
        /// What was wrong.
        source: io::Error,
    },
    /// accept/poll failed.
    #[error("accepting a frontend connection failed: {0}")]
    Accept(#[source] io::Error),
    /// Neither --socket-path nor --fd was given.
    #[error("--socket-path or --fd is required")]
    NoListener,
    /// A queue worker failed; the process should exit non-zero.
    #[error("a queue worker failed (see the log above); giving up")]
    WorkerFailed,
    /// The main thread could not enter the sandbox.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

/// Shared shutdown request: set by the signal thread (or a test), observed by the server.
pub struct Shutdown {
    efd: EventFd,
    requested: AtomicBool,
    conn: Mutex<Option<UnixStream>>,
}

impl Shutdown {
    /// A new, untriggered shutdown flag.
    pub fn new() -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            efd: EventFd::new(EFD_NONBLOCK)?,
            requested: AtomicBool::new(false),
            conn: Mutex::new(None),
        }))
    }

    /// Asks the server to finish: the current connection is closed once its in-flight I/O
    /// completed, and no new one is accepted.
    pub fn trigger(&self) {
        self.requested.store(true, Ordering::SeqCst);
        let _ = self.efd.write(1);
        if let Some(s) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Whether shutdown was asked for.
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    fn set_conn(&self, s: Option<UnixStream>) {
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = s;
        if self.is_requested() {
            self.trigger();
        }
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread (call it before spawning any thread,
/// so every thread inherits the mask) and starts a thread that turns them into a
/// [`Shutdown::trigger`]. A second signal while shutting down exits at once.
pub fn handle_termination_signals(shutdown: Arc<Shutdown>) -> io::Result<()> {
    // SAFETY: plain sigset manipulation on a zeroed local set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    };
    // SAFETY: valid set pointer; old mask not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            sandbox::enter_or_exit(ThreadKind::Signals);
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: valid pointers to a local set and int.
                let rc = unsafe { libc::sigwait(&set, &mut sig) };
                if rc != 0 {
                    continue;
                }
                if shutdown.is_requested() {
                    log::warn!("second signal {sig}: exiting without waiting");
                    std::process::exit(1);
                }
                log::info!("signal {sig}: finishing in-flight I/O and exiting");
                shutdown.trigger();
            }
        })?;
    Ok(())
}

/// Binds `path` (removing a stale socket file first).
pub fn listen_path(path: &Path) -> Result<UnixListener, ServerError> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|source| ServerError::Bind {
        path: path.display().to_string(),
        source,
    })
}

/// Takes over an inherited listening socket (`--fd`).
pub fn listen_fd(fd: RawFd) -> Result<UnixListener, ServerError> {
    let (ty, accepting) = match (
        socket_int_option(fd, libc::SO_TYPE),
        socket_int_option(fd, libc::SO_ACCEPTCONN),
    ) {
        (Ok(t), Ok(a)) => (t, a),
        (Err(source), _) | (_, Err(source)) => return Err(ServerError::BadFd { fd, source }),
    };
    if ty != libc::SOCK_STREAM || accepting == 0 {
        return Err(ServerError::BadFd {
            fd,
            source: io::Error::other("not a listening stream socket"),
        });
    }
    // SAFETY: the fd is a listening stream socket handed to us; we take ownership.
    Ok(unsafe { UnixListener::from_raw_fd(fd) })
}

/// Errors after which the connection cannot continue.
fn is_fatal(e: &VuError) -> bool {
    matches!(
        e,
        VuError::Disconnected
            | VuError::PartialMessage
            | VuError::OversizedMsg
            | VuError::SocketBroken(_)
            | VuError::SocketError(_)
            | VuError::SocketConnect(_)
    )
}

const SET_VRING_ENABLE: u32 = 18;
const HDR_REPLY: u32 = 0x4;
const HDR_NEED_REPLY: u32 = 0x8;

/// Handles a SET_VRING_ENABLE that arrives before the frontend acked
/// VHOST_USER_F_PROTOCOL_FEATURES, which the vhost crate (0.18) would refuse without even
/// sending the requested ack. The spec only requires the feature to be *offered*, and QEMU's
/// vhost-user-net does exactly this at netdev init (it is the only enable a single-queue
/// device ever gets) and then waits for the ack. We peek at the next header; if it is such a
/// message we consume it, apply it and answer it ourselves. Returns whether we did.
fn take_early_vring_enable<D: VhostUserDevice>(
    conn: &UnixStream,
    handler: &Mutex<Handler<D>>,
) -> io::Result<bool> {
    if handler
        .lock()
        .map(|h| h.protocol_negotiated())
        .unwrap_or(true)
    {
        return Ok(false);
    }
    let fd = conn.as_raw_fd();
    let mut hdr = [0u8; 12];
    // SAFETY: recv into a local buffer of the given length; MSG_PEEK leaves the data (and
    // any file descriptors) queued for the vhost crate's reader.
    let n = unsafe {
        libc::recv(
            fd,
            hdr.as_mut_ptr().cast(),
            hdr.len(),
            libc::MSG_PEEK | libc::MSG_WAITALL,
        )
    };
    if n != hdr.len() as isize {
        return Ok(false);
    }
    let word = |i: usize| u32::from_ne_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let (request, flags, size) = (word(0), word(4), word(8));
    if request != SET_VRING_ENABLE || size != 8 {
        return Ok(false);
    }
    let mut msg = [0u8; 20];
    // SAFETY: recv into a local buffer of the given length.
    let n = unsafe { libc::recv(fd, msg.as_mut_ptr().cast(), msg.len(), libc::MSG_WAITALL) };
    if n != msg.len() as isize {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "truncated SET_VRING_ENABLE",
        ));
    }
    let index = u32::from_ne_bytes([msg[12], msg[13], msg[14], msg[15]]);
    let num = u32::from_ne_bytes([msg[16], msg[17], msg[18], msg[19]]);
    let (ok, reply_ack) = match handler.lock() {
        Ok(mut h) => {
            let ok = num <= 1 && h.set_vring_enable(index, num == 1).is_ok();
            (ok, h.reply_ack_negotiated())
        }
        Err(_) => (false, false),
    };
    if !ok {
        log::warn!("SET_VRING_ENABLE {{index {index}, num {num}}} refused");
    }
    if reply_ack && flags & HDR_NEED_REPLY != 0 {
        let mut reply = [0u8; 20];
        reply[0..4].copy_from_slice(&SET_VRING_ENABLE.to_ne_bytes());
        reply[4..8].copy_from_slice(&(0x1 | HDR_REPLY).to_ne_bytes());
        reply[8..12].copy_from_slice(&8u32.to_ne_bytes());
        reply[12..20].copy_from_slice(&u64::from(!ok).to_ne_bytes());
        (&*conn).write_all(&reply)?;
    }
    Ok(true)
}

/// Event a frontend connecting emits on the control socket.
pub const EVENT_CONNECTED: &str = "VHOST_USER_CONNECTED";
/// Event a frontend disconnecting emits on the control socket.
pub const EVENT_DISCONNECTED: &str = "VHOST_USER_DISCONNECTED";

/// What the server knows about itself, shared with the control socket: the per-queue
/// counters, whether a frontend is connected, how many connected so far, since when the
/// process serves.
pub struct ServerState {
    stats: Vec<Arc<QueueStats>>,
    started: Instant,
    connected: AtomicBool,
    connections: AtomicU64,
    events: Mutex<Option<Events>>,
}

impl ServerState {
    /// State for a device of `queues` queues, started now.
    pub fn new(queues: usize) -> Self {
        Self {
            stats: (0..queues)
                .map(|_| Arc::new(QueueStats::default()))
                .collect(),
            started: Instant::now(),
            connected: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            events: Mutex::new(None),
        }
    }

    /// Per-queue counters, kept across connections.
    pub fn stats(&self) -> &[Arc<QueueStats>] {
        &self.stats
    }

    /// Whether a frontend (the VMM) is connected now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Frontend connections accepted so far (the current one included).
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Acquire)
    }

    /// Time since the server was created.
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Sends the connect and disconnect events to `events` from now on.
    pub fn set_events(&self, events: Events) {
        *self.events.lock().unwrap_or_else(|e| e.into_inner()) = Some(events);
    }

    fn emit(&self, name: &str, data: serde_json::Value) {
        if let Some(ev) = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            ev.emit(name, data);
        }
    }

    pub(crate) fn connect(&self) -> u64 {
        let n = self.connections.fetch_add(1, Ordering::AcqRel) + 1;
        self.connected.store(true, Ordering::Release);
        self.emit(EVENT_CONNECTED, serde_json::json!({ "connection": n }));
        n
    }

    pub(crate) fn disconnect(&self, n: u64, reason: &str) {
        self.connected.store(false, Ordering::Release);
        self.emit(
            EVENT_DISCONNECTED,
            serde_json::json!({ "connection": n, "reason": reason }),
        );
    }
}

/// Serves a device to one frontend after another.
pub struct Server<D: VhostUserDevice> {
    device: Arc<D>,
    state: Arc<ServerState>,
    shutdown: Arc<Shutdown>,
}

impl<D: VhostUserDevice> Server<D> {
    /// A server for `device`, stopping when `shutdown` is triggered.
    pub fn new(device: Arc<D>, shutdown: Arc<Shutdown>) -> Self {
        let state = Arc::new(ServerState::new(usize::from(device.num_queues())));
        Self {
            device,
            state,
            shutdown,
        }
    }

    /// Per-queue counters, kept across connections.
    pub fn stats(&self) -> &[Arc<QueueStats>] {
        self.state.stats()
    }

    /// Counters and connection state, for the control socket.
    pub fn state(&self) -> &Arc<ServerState> {
        &self.state
    }

    /// Accepts and serves connections until shutdown is requested. Start-up is over: the
    /// calling (main) thread enters the sandbox first (see [`crate::sandbox`]).
    pub fn serve(&self, listener: &UnixListener) -> Result<(), ServerError> {
        sandbox::enter(ThreadKind::Main)?;
        loop {
            let Some(stream) = self.accept(listener)? else {
                return Ok(());
            };
            log::info!("frontend connected");
            self.serve_connection(stream)?;
            if self.shutdown.is_requested() {
                return Ok(());
            }
            log::info!("frontend disconnected; waiting for the next one");
        }
    }

    fn accept(&self, listener: &UnixListener) -> Result<Option<UnixStream>, ServerError> {
        loop {
            if self.shutdown.is_requested() {
                return Ok(None);
            }
            let mut fds = [
                libc::pollfd {
                    fd: listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.shutdown.efd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: fds is a valid array of two pollfd structs.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ServerError::Accept(e));
            }
            if fds[1].revents != 0 {
                return Ok(None);
            }
            if fds[0].revents != 0 {
                match listener.accept() {
                    Ok((s, _)) => return Ok(Some(s)),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::Interrupted
                                | io::ErrorKind::WouldBlock
                                | io::ErrorKind::ConnectionAborted
                        ) =>
                    {
                        continue
                    }
                    Err(e) => return Err(ServerError::Accept(e)),
                }
            }
        }
    }

    /// Serves one connection until the frontend hangs up or shutdown is requested; every
    /// in-flight request has completed when this returns.
    pub fn serve_connection(&self, stream: UnixStream) -> Result<(), ServerError> {
        let n = self.state.connect();
        let mut reason = "the frontend closed the connection".to_string();
        let r = self.serve_connection_inner(stream, &mut reason);
        self.state.disconnect(n, &reason);
        r
    }

    fn serve_connection_inner(
        &self,
        stream: UnixStream,
        reason: &mut String,
    ) -> Result<(), ServerError> {
        let handler = Arc::new(Mutex::new(Handler::new(
            self.device.clone(),
            self.state.stats.clone(),
        )));
        let mut req = BackendReqHandler::from_stream(stream, handler.clone());
        let conn = req.try_clone_connection().ok();
        self.shutdown.set_conn(req.try_clone_connection().ok());
        let mut bad_msg_log = RateLimitedLog::new();
        loop {
            if let Some(c) = conn.as_ref() {
                match take_early_vring_enable(c, &handler) {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => {
                        log::warn!("frontend connection ended: {e}");
                        *reason = format!("protocol error: {e}");
                        break;
                    }
                }
            }
            match req.handle_request() {
                Ok(()) => {}
                Err(e) if is_fatal(&e) => {
                    if self.shutdown.is_requested() {
                        *reason = "the backend is shutting down".into();
                    } else if !matches!(e, VuError::Disconnected) {
                        log::warn!("frontend connection ended: {e}");
                        *reason = format!("protocol error: {e}");
                    }
                    break;
                }
                Err(e) => bad_msg_log.warn(|| format!("frontend request failed: {e}")),
            }
            let (failed, hang_up) = handler
                .lock()
                .map(|h| (h.worker_failed(), h.must_hang_up()))
                .unwrap_or((true, false));
            if hang_up {
                log::warn!(
                    "closing the frontend connection: a request failed that has no error reply"
                );
                *reason = "a request failed that has no error reply".into();
                break;
            }
            if failed {
                *reason = "a queue worker failed".into();
                break;
            }
            if self.shutdown.is_requested() {
                *reason = "the backend is shutting down".into();
                break;
            }
        }
        self.shutdown.set_conn(None);
        let ok = match handler.lock() {
            Ok(mut h) => h.shutdown(),
            Err(_) => false,
        };
        self.device.reset();
        if ok {
            Ok(())
        } else {
            Err(ServerError::WorkerFailed)
        }
    }
}
