//! The control socket (`--control-socket PATH`): QMP, QEMU's machine protocol, so
//! qmp-shell, python's qemu.qmp and libvirt-style tooling can drive a backend.
//!
//! The wire: the server greets (`{"QMP": {...}}`); the client must send
//! `qmp_capabilities` first; then `{"execute": NAME, "arguments": {...}, "id": ...}`
//! gets `{"return": ..., "id": ...}` or `{"error": {"class", "desc"}, "id": ...}`, and
//! events arrive as `{"event": NAME, "data": ..., "timestamp": {...}}`.
//!
//! The socket is mode 0600 and peers of another uid are refused (SO_PEERCRED): whoever
//! may connect controls the disk. Every client is untrusted anyway: malformed JSON, a
//! message that is not an object, an unknown command or wrong argument types get an error
//! reply and change nothing; a message may be at most 64 KiB; at most 16 clients at once.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::qmp_events::ClientQueue;
pub use crate::qmp_events::Events;
use crate::server::ServerState;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Largest message a client may send.
const MAX_MESSAGE: usize = 64 << 10;
/// Most clients connected at once.
const MAX_CLIENTS: usize = 16;

/// A QMP error: its class (as QEMU names them) and a description for the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpError {
    /// `GenericError`, `CommandNotFound`, `DeviceNotActive`, ...
    pub class: &'static str,
    /// What went wrong, for a person.
    pub desc: String,
}

impl QmpError {
    /// A GenericError.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self {
            class: "GenericError",
            desc: desc.into(),
        }
    }

    /// An unknown command.
    pub fn not_found(command: &str) -> Self {
        Self {
            class: "CommandNotFound",
            desc: format!("The command {command} has not been found"),
        }
    }

    /// An argument is missing or of the wrong type.
    pub fn bad_argument(name: &str, want: &str) -> Self {
        Self::generic(format!("Parameter '{name}' expects {want}"))
    }
}

/// What a device adds to the control socket. The layer answers `query-status` and
/// `query-stats` itself ([`LayerControl`]); a device contributes its own fields and
/// counters through the provided methods, and may add commands.
pub trait ControlHandler: Send + Sync {
    /// The device's own commands (none by default).
    fn commands(&self) -> Vec<&'static str> {
        Vec::new()
    }

    /// Runs `command` (one of [`ControlHandler::commands`]) with `args`.
    fn execute(&self, command: &str, _args: &Map<String, Value>) -> Result<Value, QmpError> {
        Err(QmpError::not_found(command))
    }

    /// Fields the device adds to `query-status` (the layer's own win on a clash).
    fn status(&self) -> Map<String, Value> {
        Map::new()
    }

    /// Whether the device holds guest requests (`query-status` says "held", not "running").
    fn held(&self) -> bool {
        false
    }

    /// The device's own counters: the top-level fields of `query-stats` (next to
    /// `queues`).
    fn device_stats(&self) -> Map<String, Value> {
        Map::new()
    }

    /// The device's counters of virtqueue `index`, merged into its entry of `queues` in
    /// `query-stats`.
    fn queue_stats(&self, _index: usize) -> Map<String, Value> {
        Map::new()
    }
}

/// Errors of the control socket's set-up and of its clients.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The metrics address could not be bound.
    #[error("metrics address {addr}: {source}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// The socket could not be created.
    #[error("control socket {path}: {source}")]
    Start {
        /// The socket path.
        path: String,
        /// The OS error.
        source: io::Error,
    },
    /// A client could not talk to a running backend.
    #[error("control socket {path}: {source}")]
    Client {
        /// The socket path.
        path: String,
        /// The OS error.
        source: io::Error,
    },
    /// The backend refused a command.
    #[error("{command}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// The backend's error.
        desc: String,
    },
}

/// Refuses arguments a command does not take (QEMU does the same).
pub fn only_args(args: &Map<String, Value>, allowed: &[&str]) -> Result<(), QmpError> {
    match args.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
        None => Ok(()),
    }
}

/// The layer's commands every backend answers, around the device's handler:
/// `query-status` (running or held, the VMM connected or not, connections so far, uptime,
/// program and version, plus the device's fields) and `query-stats` (the device's
/// counters, and per queue the layer's [`crate::QueueStats`] merged with the device's
/// counters of that queue). Every other command goes to the device.
pub struct LayerControl {
    program: &'static str,
    version: &'static str,
    state: Arc<ServerState>,
    device: Arc<dyn ControlHandler>,
}

/// The layer's own commands.
const LAYER_COMMANDS: [&str; 2] = ["query-status", "query-stats"];

impl LayerControl {
    /// The layer's commands for the server whose state is `state`, then `device`'s.
    pub fn new(
        program: &'static str,
        version: &'static str,
        state: Arc<ServerState>,
        device: Arc<dyn ControlHandler>,
    ) -> Self {
        Self {
            program,
            version,
            state,
            device,
        }
    }

    fn query_status(&self) -> Value {
        let mut m = self.device.status();
        let up = self.state.uptime();
        for (k, v) in [
            (
                "status",
                json!(if self.device.held() {
                    "held"
                } else {
                    "running"
                }),
            ),
            ("program", json!(self.program)),
            ("version", json!(self.version)),
            ("pid", json!(std::process::id())),
            ("vmm-connected", json!(self.state.connected())),
            ("connections", json!(self.state.connections())),
            ("uptime-ms", json!(up.as_millis() as u64)),
        ] {
            m.insert(k.into(), v);
        }
        Value::Object(m)
    }

    /// What `query-stats` answers: the device's counters, then one object per queue.
    pub fn stats(&self) -> Value {
        self.query_stats()
    }

    fn query_stats(&self) -> Value {
        let mut m = self.device.device_stats();
        let queues = self
            .state
            .stats()
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
                let (chains, completed) = (g(&q.chains), g(&q.completed));
                let mut e = Map::new();
                for (k, v) in [
                    ("queue", json!(i)),
                    ("chains", json!(chains)),
                    ("completed", json!(completed)),
                    ("in-flight", json!(chains.saturating_sub(completed))),
                    ("notifications", json!(g(&q.notifications))),
                    ("bad-chains", json!(g(&q.bad_chains))),
                    ("resubmitted", json!(g(&q.resubmitted))),
                    ("broken", json!(g(&q.broken))),
                ] {
                    e.insert(k.into(), v);
                }
                for (k, v) in self.device.queue_stats(i) {
                    e.entry(k).or_insert(v);
                }
                Value::Object(e)
            })
            .collect();
        m.insert("queues".into(), Value::Array(queues));
        Value::Object(m)
    }
}

impl ControlHandler for LayerControl {
    fn commands(&self) -> Vec<&'static str> {
        let mut c = LAYER_COMMANDS.to_vec();
        c.extend(
            self.device
                .commands()
                .into_iter()
                .filter(|d| !LAYER_COMMANDS.contains(d)),
        );
        c
    }

    fn execute(&self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        match command {
            "query-status" => {
                only_args(args, &[])?;
                Ok(self.query_status())
            }
            "query-stats" => {
                only_args(args, &[])?;
                Ok(self.query_stats())
            }
            c => self.device.execute(c, args),
        }
    }
}

/// A running control socket; removed (file and thread) on drop.
pub struct ControlServer {
    /// Readable when the accept loop must end (its thread removes the socket file).
    stop: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
    events: Events,
}

impl ControlServer {
    /// Binds `path` (mode 0600; a stale socket there is replaced) and serves it in a
    /// thread. `program` and `version` go into the greeting and `query-version`.
    pub fn start(
        path: &Path,
        program: &'static str,
        version: &'static str,
        handler: Arc<dyn ControlHandler>,
    ) -> io::Result<Self> {
        if std::fs::symlink_metadata(path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) {
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let events = Events::default();
        let ctx = Arc::new(Context {
            program,
            version,
            handler,
            events: events.clone(),
            clients: AtomicUsize::new(0),
        });
        let stop2 = stop.clone();
        let path = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                crate::sandbox::enter_or_exit(crate::sandbox::ThreadKind::Control);
                accept_loop(&listener, &ctx, &stop2);
                let _ = std::fs::remove_file(&path);
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
            events,
        })
    }

    /// Starts the control socket of a backend: the layer's commands ([`LayerControl`]) for
    /// the server whose state is `state` around the device's `handler`, and the
    /// server's connect and disconnect events.
    pub fn start_for(
        path: &Path,
        program: &'static str,
        version: &'static str,
        state: Arc<ServerState>,
        handler: Arc<dyn ControlHandler>,
    ) -> Result<Self, ControlError> {
        let layer = LayerControl::new(program, version, state.clone(), handler);
        let s = Self::start(path, program, version, Arc::new(layer)).map_err(|source| {
            ControlError::Start {
                path: path.display().to_string(),
                source,
            }
        })?;
        state.set_events(s.events());
        Ok(s)
    }

    /// Where events go.
    pub fn events(&self) -> Events {
        self.events.clone()
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        // Only a write(2) and a futex wait here: the dropping thread is usually the main
        // thread under its sandbox, which may not create sockets or unlink files.
        if self.stop.write(1).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

struct Context {
    program: &'static str,
    version: &'static str,
    handler: Arc<dyn ControlHandler>,
    events: Events,
    clients: AtomicUsize,
}

fn accept_loop(listener: &UnixListener, ctx: &Arc<Context>, stop: &EventFd) {
    loop {
        if let Err(e) = wait_readable(listener.as_raw_fd(), stop.as_raw_fd()) {
            log::error!("control socket: poll: {e}");
            return;
        }
        if stop.read().is_ok() {
            return;
        }
        let mut conn = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of fds, say: log (rate-limited by the pause) and keep serving.
                log::warn!("control socket: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        // Accepted sockets do not inherit O_NONBLOCK on Linux; the client loop sets it.
        if let Err(why) = check_peer(&conn) {
            log::warn!("control socket: refused a client: {why}");
            let _ = writeln!(conn, "{}", error_reply(&QmpError::generic(why), None));
            continue;
        }
        if ctx.clients.load(Ordering::Acquire) >= MAX_CLIENTS {
            let e = QmpError::generic(format!("too many clients (at most {MAX_CLIENTS})"));
            let _ = writeln!(conn, "{}", error_reply(&e, None));
            continue;
        }
        ctx.clients.fetch_add(1, Ordering::AcqRel);
        let ctx2 = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                if let Err(e) = serve_client(conn, &ctx2) {
                    log::debug!("control client: {e}");
                }
                ctx2.clients.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            ctx.clients.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Refuses a peer of another uid.
fn check_peer(conn: &UnixStream) -> Result<(), String> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: valid out pointer and length for SO_PEERCRED.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(format!(
            "cannot read the peer's credentials: {}",
            io::Error::last_os_error()
        ));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if cred.uid != me {
        return Err(format!(
            "peer uid {} (pid {}) is not this process's uid {me}",
            cred.uid, cred.pid
        ));
    }
    Ok(())
}

fn error_reply(e: &QmpError, id: Option<&Value>) -> Value {
    let mut v = json!({"error": {"class": e.class, "desc": e.desc}});
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    v
}

fn send(conn: &mut UnixStream, v: &Value) -> io::Result<()> {
    let mut line = v.to_string();
    line.push_str("\r\n");
    conn.write_all(line.as_bytes())
}

fn serve_client(mut conn: UnixStream, ctx: &Context) -> io::Result<()> {
    let (queue, wake_rx) = ctx.events.subscribe()?;
    let r = client_loop(&mut conn, ctx, &queue, wake_rx);
    ctx.events.unsubscribe(&queue);
    r
}

fn client_loop(
    conn: &mut UnixStream,
    ctx: &Context,
    queue: &ClientQueue,
    mut wake: UnixStream,
) -> io::Result<()> {
    let mut session = QmpSession::new(ctx.program, ctx.version, ctx.handler.clone());
    send(conn, &session.greeting())?;
    conn.set_nonblocking(true)?;
    wake.set_nonblocking(true)?;
    let mut replies = Vec::new();
    loop {
        // Events first, then whatever the client sent.
        for ev in queue.take() {
            send_blocking(conn, &ev)?;
        }
        let mut chunk = [0u8; 4096];
        let n = match conn.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_readable(conn.as_raw_fd(), wake.as_raw_fd())?;
                let mut sink = [0u8; 64];
                while wake.read(&mut sink).is_ok_and(|n| n > 0) {}
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let feed = session.feed(&chunk[..n], &mut replies);
        if session.negotiated() {
            queue.set_ready();
        }
        for r in replies.drain(..) {
            send_blocking(conn, &r)?;
        }
        if feed == Feed::Close {
            return Ok(());
        }
    }
}

/// What [`QmpSession::feed`] says about the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feed {
    /// Keep reading.
    More,
    /// Drop the client (it sent a message longer than 64 KiB; the replies say so).
    Close,
}

/// One client's side of the protocol, apart from the socket: bytes in, replies out. The
/// server runs one per client; the fuzzer (`fuzz/fuzz_targets/qmp.rs`) drives it directly.
pub struct QmpSession {
    program: &'static str,
    version: &'static str,
    handler: Arc<dyn ControlHandler>,
    /// Received bytes not yet parsed (a message cut by the socket, at most 64 KiB).
    buf: Vec<u8>,
    negotiated: bool,
}

impl QmpSession {
    /// A session before the greeting.
    pub fn new(
        program: &'static str,
        version: &'static str,
        handler: Arc<dyn ControlHandler>,
    ) -> Self {
        Self {
            program,
            version,
            handler,
            buf: Vec::new(),
            negotiated: false,
        }
    }

    /// What the server says first.
    pub fn greeting(&self) -> Value {
        json!({"QMP": {"version": self.version_value(), "capabilities": []}})
    }

    /// Whether `qmp_capabilities` was accepted (events go to the client from then on).
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// Bytes received and not yet parsed.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    fn version_value(&self) -> Value {
        let (major, minor, micro) = parse_version(self.version);
        json!({"qemu": {"major": major, "minor": minor, "micro": micro},
               "package": format!("{} {}", self.program, self.version)})
    }

    /// Takes bytes from the client and appends one reply per complete message (or per
    /// broken one) to `replies`.
    pub fn feed(&mut self, bytes: &[u8], replies: &mut Vec<Value>) -> Feed {
        self.buf.extend_from_slice(bytes);
        // Every complete JSON value in the buffer.
        loop {
            let trimmed = self.buf.iter().position(|b| !b.is_ascii_whitespace());
            let Some(start) = trimmed else {
                self.buf.clear();
                return Feed::More;
            };
            self.buf.drain(..start);
            let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
            match it.next() {
                Some(Ok(v)) => {
                    let used = it.byte_offset();
                    self.buf.drain(..used);
                    replies.push(self.handle(&v));
                }
                Some(Err(e)) if e.is_eof() => {
                    if self.buf.len() > MAX_MESSAGE {
                        let e =
                            QmpError::generic(format!("message longer than {MAX_MESSAGE} bytes"));
                        replies.push(error_reply(&e, None));
                        self.buf = Vec::new();
                        return Feed::Close;
                    }
                    return Feed::More;
                }
                Some(Err(e)) => {
                    // Where a broken message ends cannot be known: drop what is buffered
                    // and start afresh with the next bytes.
                    self.buf.clear();
                    let e = QmpError::generic(format!("JSON parse error: {e}"));
                    replies.push(error_reply(&e, None));
                    return Feed::More;
                }
                None => return Feed::More,
            }
        }
    }

    fn handle(&mut self, msg: &Value) -> Value {
        let Some(obj) = msg.as_object() else {
            return error_reply(&QmpError::generic("QMP input must be a JSON object"), None);
        };
        let id = obj.get("id");
        let Some(cmd) = obj.get("execute").and_then(Value::as_str) else {
            return error_reply(&QmpError::generic("QMP input lacks member 'execute'"), id);
        };
        let empty = Map::new();
        let args = match obj.get("arguments") {
            None => &empty,
            Some(Value::Object(m)) => m,
            Some(_) => {
                return error_reply(
                    &QmpError::generic("QMP input member 'arguments' must be an object"),
                    id,
                )
            }
        };
        if let Some(k) = obj
            .keys()
            .find(|k| !matches!(k.as_str(), "execute" | "arguments" | "id"))
        {
            return error_reply(
                &QmpError::generic(format!("QMP input member '{k}' is unexpected")),
                id,
            );
        }
        let result = if cmd == "qmp_capabilities" {
            if self.negotiated {
                Err(QmpError {
                    class: "CommandNotFound",
                    desc: "Capabilities negotiation is already complete, command ignored".into(),
                })
            } else {
                self.negotiated = true;
                Ok(json!({}))
            }
        } else if !self.negotiated {
            Err(QmpError {
                class: "CommandNotFound",
                desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
            })
        } else {
            match cmd {
                "query-version" => Ok(self.version_value()),
                "query-commands" => {
                    let mut names = vec!["qmp_capabilities", "query-version", "query-commands"];
                    names.extend(self.handler.commands());
                    Ok(Value::Array(
                        names.into_iter().map(|n| json!({"name": n})).collect(),
                    ))
                }
                c if self.handler.commands().contains(&c) => self.handler.execute(c, args),
                c => Err(QmpError {
                    class: "CommandNotFound",
                    desc: format!("The command {c} has not been found"),
                }),
            }
        };
        match result {
            Ok(v) => {
                let mut r = json!({"return": v});
                if let Some(id) = id {
                    r["id"] = id.clone();
                }
                r
            }
            Err(e) => error_reply(&e, id),
        }
    }
}

/// Writes on a non-blocking socket, waiting for room.
fn send_blocking(conn: &mut UnixStream, v: &Value) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_write_timeout(Some(Duration::from_secs(10)))?;
    let r = send(conn, v);
    conn.set_nonblocking(true)?;
    r
}

/// Waits until `a` or `b` is readable (or a signal interrupts).
fn wait_readable(a: RawFd, b: RawFd) -> io::Result<()> {
    let mut fds = [
        libc::pollfd {
            fd: a,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: valid array of two pollfds.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

fn parse_version(v: &str) -> (u64, u64, u64) {
    let mut it = v.split('.').map(|p| p.parse().unwrap_or(0));
    (
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    )
}

/// A small QMP client, for the programs' own subcommands and for tests.
pub struct QmpClient {
    conn: UnixStream,
    buf: Vec<u8>,
    /// Events received while waiting for replies, oldest first.
    pub events: VecDeque<Value>,
}

impl QmpClient {
    /// Connects, reads the greeting and negotiates capabilities.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let conn = UnixStream::connect(path)?;
        conn.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut c = Self {
            conn,
            buf: Vec::new(),
            events: VecDeque::new(),
        };
        let greeting = c.read_value()?;
        if greeting.get("QMP").is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a QMP greeting: {greeting}"),
            ));
        }
        c.execute("qmp_capabilities", json!({}))?
            .map_err(|e| io::Error::other(e.desc))?;
        Ok(c)
    }

    /// Runs a command: Ok(Ok(return value)) or Ok(Err(the QMP error)).
    pub fn execute(&mut self, cmd: &str, args: Value) -> io::Result<Result<Value, QmpError>> {
        let msg = json!({"execute": cmd, "arguments": args});
        send(&mut self.conn, &msg)?;
        loop {
            let v = self.read_value()?;
            if v.get("event").is_some() {
                self.events.push_back(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(Ok(r.clone()));
            }
            if let Some(e) = v.get("error") {
                return Ok(Err(QmpError {
                    class: "GenericError",
                    desc: format!(
                        "{}: {}",
                        e.get("class").and_then(Value::as_str).unwrap_or("Error"),
                        e.get("desc").and_then(Value::as_str).unwrap_or("")
                    ),
                }));
            }
        }
    }

    /// Waits for the next event (up to the read timeout).
    pub fn next_event(&mut self) -> io::Result<Value> {
        if let Some(e) = self.events.pop_front() {
            return Ok(e);
        }
        loop {
            let v = self.read_value()?;
            if v.get("event").is_some() {
                return Ok(v);
            }
        }
    }

    /// Sends raw bytes (tests of malformed input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.conn.write_all(bytes)
    }

    /// Reads the next JSON value.
    pub fn read_value(&mut self) -> io::Result<Value> {
        loop {
            let start = self
                .buf
                .iter()
                .position(|b| !b.is_ascii_whitespace())
                .unwrap_or(self.buf.len());
            self.buf.drain(..start);
            if !self.buf.is_empty() {
                let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
                match it.next() {
                    Some(Ok(v)) => {
                        let used = it.byte_offset();
                        self.buf.drain(..used);
                        return Ok(v);
                    }
                    Some(Err(e)) if !e.is_eof() => {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e))
                    }
                    _ => {}
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.conn.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the control socket closed",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    struct Echo;

    impl ControlHandler for Echo {
        fn commands(&self) -> Vec<&'static str> {
            vec!["echo", "fail"]
        }

        fn execute(&self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
            match command {
                "echo" => match args.get("text") {
                    Some(Value::String(s)) => Ok(json!({"text": s})),
                    _ => Err(QmpError::bad_argument("text", "a string")),
                },
                _ => Err(QmpError::generic("asked to fail")),
            }
        }
    }

    fn server() -> (tempfile::TempDir, std::path::PathBuf, ControlServer) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ctl.sock");
        let s = ControlServer::start(&p, "test", "1.2.3", Arc::new(Echo)).unwrap();
        (dir, p, s)
    }

    #[test]
    fn a_session_replies_per_message_however_the_bytes_are_cut() {
        let mut s = QmpSession::new("test", "1.2.3", Arc::new(Echo));
        assert_eq!(s.greeting()["QMP"]["version"]["qemu"]["minor"], 2);
        let mut out = Vec::new();
        let input = br#"{"execute": "qmp_capabilities"} {"execute": "echo", "arguments": {"text": "hi"}, "id": 7}"#;
        // One byte at a time: a reply only when a message is complete.
        for (i, b) in input.iter().enumerate() {
            assert_eq!(s.feed(&[*b], &mut out), Feed::More, "at byte {i}");
        }
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0], json!({"return": {}}));
        assert_eq!(out[1], json!({"return": {"text": "hi"}, "id": 7}));
        assert!(s.negotiated());
        assert_eq!(s.buffered(), 0);
        // A broken message: one error, then the session goes on.
        out.clear();
        s.feed(br#"{"execute": } {"execute": "fail"}"#, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["error"]["class"], "GenericError");
        out.clear();
        s.feed(br#"{"execute": "fail"}"#, &mut out);
        assert_eq!(out[0]["error"]["desc"], "asked to fail");
        // An unfinished message longer than the limit ends the session.
        out.clear();
        let mut long = b"[\"".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_MESSAGE));
        assert_eq!(s.feed(&long, &mut out), Feed::Close);
        assert_eq!(out.len(), 1);
        assert_eq!(s.buffered(), 0);
    }

    #[test]
    fn greeting_negotiation_commands_and_errors() {
        let (_d, p, _s) = server();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Before qmp_capabilities nothing else runs.
        let conn = UnixStream::connect(&p).unwrap();
        let mut raw = QmpClient {
            conn,
            buf: Vec::new(),
            events: VecDeque::new(),
        };
        let g = raw.read_value().unwrap();
        assert_eq!(g["QMP"]["version"]["qemu"]["minor"], 2);
        assert_eq!(g["QMP"]["version"]["package"], "test 1.2.3");
        raw.send_raw(br#"{"execute": "echo", "arguments": {"text": "x"}}"#)
            .unwrap();
        let r = raw.read_value().unwrap();
        assert_eq!(r["error"]["class"], "CommandNotFound");

        let mut c = QmpClient::connect(&p).unwrap();
        assert_eq!(
            c.execute("echo", json!({"text": "hi"})).unwrap().unwrap(),
            json!({"text": "hi"})
        );
        let e = c.execute("echo", json!({"text": 5})).unwrap().unwrap_err();
        assert!(e.desc.contains("'text' expects a string"), "{}", e.desc);
        let e = c.execute("nope", json!({})).unwrap().unwrap_err();
        assert!(e.desc.contains("CommandNotFound"), "{}", e.desc);
        let cmds = c.execute("query-commands", json!({})).unwrap().unwrap();
        assert!(cmds.as_array().unwrap().iter().any(|v| v["name"] == "echo"));
        let v = c.execute("query-version", json!({})).unwrap().unwrap();
        assert_eq!(v["qemu"]["major"], 1);
    }

    #[test]
    fn malformed_input_gets_an_error_and_the_socket_keeps_serving() {
        let (_d, p, _s) = server();
        let mut c = QmpClient::connect(&p).unwrap();
        for (bad, want) in [
            (&b"{\"execute\": \n"[..], "JSON parse error"),
            (b"[1, 2]\n", "must be a JSON object"),
            (b"{\"arguments\": {}}\n", "lacks member 'execute'"),
            (
                b"{\"execute\": \"echo\", \"arguments\": 3}\n",
                "must be an object",
            ),
            (
                b"{\"execute\": \"echo\", \"bogus\": 1}\n",
                "'bogus' is unexpected",
            ),
        ] {
            c.send_raw(bad).unwrap();
            // The cut-off first message only errors when the next line arrives.
            if bad.starts_with(b"{\"execute\": \n") {
                c.send_raw(b"}\n").unwrap();
            }
            let r = c.read_value().unwrap();
            let desc = r["error"]["desc"].as_str().unwrap_or_default().to_string();
            assert!(desc.contains(want), "{bad:?}: {r}");
        }
        // Still serving, with ids echoed.
        c.send_raw(br#"{"execute": "echo", "arguments": {"text": "ok"}, "id": 7}"#)
            .unwrap();
        let r = c.read_value().unwrap();
        assert_eq!(r["id"], 7);
        assert_eq!(r["return"]["text"], "ok");
        // An over-long message ends the connection with an error, the server lives on.
        let mut big = b"{\"execute\": \"echo\", \"arguments\": {\"text\": \"".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_MESSAGE + 10));
        c.send_raw(&big).unwrap();
        let r = c.read_value().unwrap();
        assert!(r["error"]["desc"].as_str().unwrap().contains("longer than"));
        let mut c2 = QmpClient::connect(&p).unwrap();
        assert!(c2.execute("echo", json!({"text": "y"})).unwrap().is_ok());
    }

    #[test]
    fn events_reach_negotiated_clients() {
        let (_d, p, s) = server();
        let mut c = QmpClient::connect(&p).unwrap();
        // Make sure the server has seen the negotiation before the event.
        c.execute("query-version", json!({})).unwrap().unwrap();
        s.events().emit(
            "JOB_STATUS_CHANGE",
            json!({"id": "m0", "status": "running"}),
        );
        let ev = c.next_event().unwrap();
        assert_eq!(ev["event"], "JOB_STATUS_CHANGE");
        assert_eq!(ev["data"]["status"], "running");
        assert!(ev["timestamp"]["seconds"].as_u64().unwrap() > 0);
    }

    /// A device with its own fields, counters and a command; it also claims
    /// `query-stats`, which the layer keeps for itself.
    struct Dev {
        held: AtomicBool,
    }

    impl ControlHandler for Dev {
        fn commands(&self) -> Vec<&'static str> {
            vec!["query-stats", "poke"]
        }

        fn execute(&self, command: &str, _args: &Map<String, Value>) -> Result<Value, QmpError> {
            match command {
                "poke" => Ok(json!("poked")),
                c => Err(QmpError::generic(format!("the device ran {c}"))),
            }
        }

        fn status(&self) -> Map<String, Value> {
            let mut m = Map::new();
            m.insert("image".into(), json!("disk.img"));
            m.insert("status".into(), json!("the device may not set this"));
            m
        }

        fn held(&self) -> bool {
            self.held.load(Ordering::Relaxed)
        }

        fn device_stats(&self) -> Map<String, Value> {
            let mut m = Map::new();
            m.insert("writes".into(), json!(10));
            m
        }

        fn queue_stats(&self, index: usize) -> Map<String, Value> {
            let mut m = Map::new();
            m.insert("role".into(), json!(format!("q{index}")));
            // The layer's own counter wins.
            m.insert("chains".into(), json!(999));
            m
        }
    }

    #[test]
    fn the_layer_answers_status_and_stats_around_the_device() {
        let state = Arc::new(ServerState::new(2));
        state.stats()[0].chains.store(12, Ordering::Relaxed);
        state.stats()[0].completed.store(10, Ordering::Relaxed);
        state.stats()[1].bad_chains.store(3, Ordering::Relaxed);
        let dev = Arc::new(Dev {
            held: AtomicBool::new(false),
        });
        let layer = LayerControl::new("prog", "1.2.3", state.clone(), dev.clone());
        assert_eq!(layer.commands(), ["query-status", "query-stats", "poke"]);
        let none = Map::new();
        assert_eq!(layer.execute("poke", &none).unwrap(), json!("poked"));
        let mut extra = Map::new();
        extra.insert("x".into(), json!(1));
        assert!(layer.execute("query-stats", &extra).is_err());

        let st = layer.execute("query-status", &none).unwrap();
        assert_eq!(st["status"], "running");
        assert_eq!(st["program"], "prog");
        assert_eq!(st["version"], "1.2.3");
        assert_eq!(st["image"], "disk.img");
        assert_eq!(st["vmm-connected"], false);
        assert_eq!(st["connections"], 0);
        assert!(st["uptime-ms"].is_u64());
        dev.held.store(true, Ordering::Relaxed);
        let n = state.connect();
        let st = layer.execute("query-status", &none).unwrap();
        assert_eq!(st["status"], "held");
        assert_eq!((st["vmm-connected"].clone(), n), (json!(true), 1));
        state.disconnect(n, "bye");
        assert_eq!(
            layer.execute("query-status", &none).unwrap()["vmm-connected"],
            false
        );

        let stats = layer.execute("query-stats", &none).unwrap();
        assert_eq!(stats["writes"], 10);
        let q = stats["queues"].as_array().unwrap();
        assert_eq!(q.len(), 2);
        assert_eq!(q[0]["queue"], 0);
        assert_eq!(q[0]["chains"], 12);
        assert_eq!(q[0]["completed"], 10);
        assert_eq!(q[0]["in-flight"], 2);
        assert_eq!(q[0]["role"], "q0");
        assert_eq!(q[1]["bad-chains"], 3);
        assert_eq!(q[1]["in-flight"], 0);
    }

    #[test]
    fn a_server_control_socket_sends_connect_and_disconnect_events() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ctl.sock");
        let state = Arc::new(ServerState::new(1));
        let dev = Arc::new(Dev {
            held: AtomicBool::new(false),
        });
        let _s = ControlServer::start_for(&p, "prog", "0.1.0", state.clone(), dev).unwrap();
        let mut c = QmpClient::connect(&p).unwrap();
        c.execute("query-version", json!({})).unwrap().unwrap();
        let n = state.connect();
        state.disconnect(n, "the frontend closed the connection");
        let ev = c.next_event().unwrap();
        assert_eq!(ev["event"], "VHOST_USER_CONNECTED");
        assert_eq!(ev["data"], json!({"connection": 1}));
        let ev = c.next_event().unwrap();
        assert_eq!(ev["event"], "VHOST_USER_DISCONNECTED");
        assert_eq!(
            ev["data"],
            json!({"connection": 1, "reason": "the frontend closed the connection"})
        );
        let st = c.execute("query-status", json!({})).unwrap().unwrap();
        assert_eq!(st["connections"], 1);
    }

    /// Connects as uid 65534 from a forked child (only async-signal-safe calls there)
    /// and returns what the server sent.
    fn connect_as_nobody(path: &Path) -> String {
        use std::os::unix::ffi::OsStrExt;
        let mut addr: libc::sockaddr_un = unsafe {
            // SAFETY: all-zero is a valid sockaddr_un.
            std::mem::zeroed()
        };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
            *d = *s as libc::c_char;
        }
        let mut pipe = [0i32; 2];
        // SAFETY: valid array of two ints.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        // SAFETY: the child calls only async-signal-safe functions and _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: plain system calls on values prepared before the fork.
            unsafe {
                libc::close(pipe[0]);
                if libc::setresgid(65534, 65534, 65534) != 0
                    || libc::setresuid(65534, 65534, 65534) != 0
                {
                    libc::_exit(2);
                }
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                // A server that accepted us would greet and wait: read for 2 s at most.
                let tv = libc::timeval {
                    tv_sec: 2,
                    tv_usec: 0,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                );
                let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                if libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) != 0 {
                    libc::_exit(3);
                }
                let mut buf = [0u8; 512];
                loop {
                    let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                    if n <= 0 {
                        break;
                    }
                    libc::write(pipe[1], buf.as_ptr().cast(), n as usize);
                }
                libc::_exit(0);
            }
        }
        // SAFETY: closing our copy of the write end; reading the child's report.
        unsafe { libc::close(pipe[1]) };
        let mut out = Vec::new();
        let mut f = unsafe {
            // SAFETY: we own the read end.
            <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(pipe[0])
        };
        let _ = f.read_to_end(&mut out);
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child status {status}"
        );
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn a_peer_of_another_uid_is_refused() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("\n#### SKIPPED: a_peer_of_another_uid_is_refused needs root ####\n");
            return;
        }
        let (d, p, _s) = server();
        // Let uid 65534 reach the socket (the server's own check must refuse it).
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        let text = connect_as_nobody(&p);
        assert!(text.contains("is not this process's uid"), "got {text:?}");
        assert!(!text.contains("QMP"), "got a greeting: {text}");
        // The server goes on serving its own uid.
        let mut c = QmpClient::connect(&p).unwrap();
        assert!(c.execute("query-version", json!({})).unwrap().is_ok());
    }
}
