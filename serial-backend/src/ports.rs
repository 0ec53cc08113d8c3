//! Ports as the command line describes them, and their host side: a pty, a listening unix
//! socket (one client at a time), a file, stdio, or the built-in hostinfo channel.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Where a port's host side is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// A new pseudo terminal; its path is logged (and shown by [`crate::shared::PortInfo`]).
    Pty,
    /// A listening unix socket: one client at a time, reconnects allowed.
    Socket(PathBuf),
    /// Guest output appended to a file (nothing goes to the guest).
    File(PathBuf),
    /// The backend's own stdin and stdout.
    Stdio,
    /// The built-in hostinfo channel.
    Hostinfo,
}

/// One port from the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    /// Name the guest sees (/dev/virtio-ports/NAME); consoles may have none.
    pub name: Option<String>,
    /// A console port (/dev/hvcN) rather than a generic one (/dev/vportNpM).
    pub console: bool,
    /// Host side.
    pub kind: HostKind,
}

/// Errors building ports.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// A `--console`/`--port` value could not be parsed.
    #[error("bad port description {spec:?}: {reason}")]
    Spec {
        /// What was given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// More ports than `--max-ports` allows.
    #[error("{count} port ids needed but --max-ports is {max}; raise --max-ports (and the VMM's num_vqs = 2 * (max_ports + 1))")]
    TooMany {
        /// Ids needed.
        count: u32,
        /// The limit.
        max: u32,
    },
    /// Two ports with one name.
    #[error("two ports are named {0:?}; port names must be unique")]
    DuplicateName(String),
    /// Two stdio ports.
    #[error("only one port can use stdio")]
    TwoStdio,
    /// The socket could not be bound.
    #[error("port {port}: cannot listen on {path}: {source} (does the directory exist? is another backend using it?)")]
    Bind {
        /// Port description.
        port: String,
        /// Socket path.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// The file could not be opened.
    #[error("port {port}: cannot open {path} for appending: {source}")]
    File {
        /// Port description.
        port: String,
        /// File path.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// No pty could be made.
    #[error("port {port}: cannot create a pty: {source} (is /dev/pts mounted?)")]
    Pty {
        /// Port description.
        port: String,
        /// OS error.
        source: io::Error,
    },
    /// Setting up the port's event machinery failed.
    #[error("cannot set up port events: {0}")]
    Events(#[source] io::Error),
}

fn spec_err(spec: &str, reason: impl Into<String>) -> PortError {
    PortError::Spec {
        spec: spec.to_string(),
        reason: reason.into(),
    }
}

/// Parses `pty`, `socket=PATH`, `file=PATH`, `stdio`, each optionally with `name=NAME`, as
/// comma-separated items. `console` ports need no name; other ports do.
pub fn parse_spec(s: &str, console: bool) -> Result<PortSpec, PortError> {
    let mut name = None;
    let mut kind = None;
    for item in s.split(',').filter(|i| !i.is_empty()) {
        let (k, v) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (item, None),
        };
        let new = match (k, v) {
            ("name", Some(v)) => {
                if v.is_empty() || v.len() > 255 || v.contains(['/', '\0']) {
                    return Err(spec_err(s, "a name must be 1..255 bytes without '/'"));
                }
                name = Some(v.to_string());
                continue;
            }
            ("pty", None) => HostKind::Pty,
            ("stdio", None) => HostKind::Stdio,
            ("socket", Some(p)) if !p.is_empty() => HostKind::Socket(PathBuf::from(p)),
            ("file", Some(p)) if !p.is_empty() => HostKind::File(PathBuf::from(p)),
            _ => {
                return Err(spec_err(
                    s,
                    format!("unknown item {item:?} (expected pty, stdio, socket=PATH, file=PATH, name=NAME)"),
                ))
            }
        };
        if kind.replace(new).is_some() {
            return Err(spec_err(s, "more than one host side given"));
        }
    }
    let kind =
        kind.ok_or_else(|| spec_err(s, "no host side (pty, stdio, socket=PATH, file=PATH)"))?;
    if !console && name.is_none() {
        return Err(spec_err(s, "--port needs name=NAME"));
    }
    Ok(PortSpec {
        name,
        console,
        kind,
    })
}

/// Ids for `specs`: consoles first (the first console is port 0, as with QEMU), then the
/// other ports; without consoles port 0 stays unused. Checks limits and names.
pub fn assign_ids(specs: &[PortSpec], max_ports: u32) -> Result<Vec<u32>, PortError> {
    let mut names = std::collections::HashSet::new();
    let mut stdio = 0;
    for s in specs {
        if let Some(n) = &s.name {
            if !names.insert(n.clone()) {
                return Err(PortError::DuplicateName(n.clone()));
            }
        }
        stdio += usize::from(s.kind == HostKind::Stdio);
    }
    if stdio > 1 {
        return Err(PortError::TwoStdio);
    }
    let mut ids = vec![0u32; specs.len()];
    let mut next = 0u32;
    for (i, s) in specs.iter().enumerate().filter(|(_, s)| s.console) {
        ids[i] = next;
        next += 1;
        let _ = s;
    }
    next = next.max(1);
    for (i, _) in specs.iter().enumerate().filter(|(_, s)| !s.console) {
        ids[i] = next;
        next += 1;
    }
    let needed = if specs.is_empty() { 0 } else { next };
    if needed > max_ports {
        return Err(PortError::TooMany {
            count: needed,
            max: max_ports,
        });
    }
    Ok(ids)
}

/// A connected socket client.
pub struct Client {
    /// The connection (non-blocking).
    pub stream: UnixStream,
    /// The peer went away (EPOLLHUP); kept only to read what it left behind.
    pub hung_up: bool,
    /// We shut our write side after the guest closed the port.
    pub wr_shut: bool,
}

/// A pseudo terminal: the master we use and a raw slave we keep open, so that the master
/// neither reports hang-ups nor loses data while no one has the pty open.
pub struct Pty {
    /// Master side (non-blocking).
    pub master: File,
    /// Our own slave fd (raw mode).
    pub _slave: File,
    /// /dev/pts/N.
    pub path: PathBuf,
}

/// A port's host side, open.
pub enum HostSide {
    /// Listening socket and the current client.
    Socket {
        /// Socket path.
        path: PathBuf,
        /// Listener (non-blocking).
        listener: UnixListener,
        /// The client, one at a time.
        client: Option<Client>,
    },
    /// A pty.
    Pty(Pty),
    /// An append-only file.
    File(File),
    /// stdin / stdout.
    Stdio {
        /// stdin reached end of file.
        eof: bool,
    },
    /// The hostinfo channel.
    Hostinfo,
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd the caller owns; errors are reported through errno.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// Creates a pty whose slave is in raw mode.
pub fn open_pty() -> io::Result<Pty> {
    // SAFETY: posix_openpt returns a new fd or -1.
    let fd = cvt(unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    // SAFETY: fd is a fresh descriptor we own.
    let master = unsafe { File::from_raw_fd(fd) };
    // SAFETY: master is a pty master.
    cvt(unsafe { libc::grantpt(master.as_raw_fd()) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::unlockpt(master.as_raw_fd()) })?;
    let mut buf = [0 as libc::c_char; 128];
    // SAFETY: buf is writable for its length.
    let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: ptsname_r wrote a NUL-terminated string into buf.
    let path = PathBuf::from(
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    );
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&path)?;
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer.
    cvt(unsafe { libc::tcgetattr(slave.as_raw_fd(), &mut t) })?;
    // SAFETY: valid pointer to an initialised termios.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: valid fd and pointer.
    cvt(unsafe { libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t) })?;
    set_nonblocking(master.as_raw_fd())?;
    Ok(Pty {
        master,
        _slave: slave,
        path,
    })
}

/// Window size (cols, rows) of the terminal on `fd`, if it is one.
pub fn window_size(fd: RawFd) -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize through a valid pointer.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0).then_some((ws.ws_col, ws.ws_row))
}

fn bind(port: &str, path: &Path) -> Result<UnixListener, PortError> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(|source| PortError::Bind {
        port: port.to_string(),
        path: path.to_path_buf(),
        source,
    })?;
    l.set_nonblocking(true).map_err(|source| PortError::Bind {
        port: port.to_string(),
        path: path.to_path_buf(),
        source,
    })?;
    Ok(l)
}

/// Opens the host side of `spec`.
pub fn open_host(spec: &PortSpec) -> Result<HostSide, PortError> {
    let label = spec.name.clone().unwrap_or_else(|| "console".into());
    Ok(match &spec.kind {
        HostKind::Socket(p) => HostSide::Socket {
            path: p.clone(),
            listener: bind(&label, p)?,
            client: None,
        },
        HostKind::Pty => HostSide::Pty(open_pty().map_err(|source| PortError::Pty {
            port: label,
            source,
        })?),
        HostKind::File(p) => HostSide::File(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| PortError::File {
                    port: label,
                    path: p.clone(),
                    source,
                })?,
        ),
        HostKind::Stdio => {
            // Errors (stdin closed, a regular file) only mean we poll less.
            let _ = set_nonblocking(0);
            let _ = set_nonblocking(1);
            HostSide::Stdio { eof: false }
        }
        HostKind::Hostinfo => HostSide::Hostinfo,
    })
}

impl HostSide {
    /// Human-readable description for logs.
    pub fn describe(&self) -> String {
        match self {
            HostSide::Socket { path, .. } => format!("socket {}", path.display()),
            HostSide::Pty(p) => format!("pty {}", p.path.display()),
            HostSide::File(_) => "file".into(),
            HostSide::Stdio { .. } => "stdio".into(),
            HostSide::Hostinfo => "hostinfo".into(),
        }
    }

    /// Whether someone is there on the host side (a socket has a live client).
    pub fn connected(&self) -> bool {
        match self {
            HostSide::Socket { client, .. } => client.as_ref().is_some_and(|c| !c.hung_up),
            _ => true,
        }
    }

    /// The fd guest output goes to, if it can take output now.
    pub fn write_fd(&self) -> Option<RawFd> {
        match self {
            HostSide::Socket { client, .. } => client
                .as_ref()
                .filter(|c| !c.hung_up && !c.wr_shut)
                .map(|c| c.stream.as_raw_fd()),
            HostSide::Pty(p) => Some(p.master.as_raw_fd()),
            HostSide::File(f) => Some(f.as_raw_fd()),
            HostSide::Stdio { .. } => Some(1),
            HostSide::Hostinfo => None,
        }
    }

    /// The fd guest input comes from, if any.
    pub fn read_fd(&self) -> Option<RawFd> {
        match self {
            HostSide::Socket { client, .. } => client.as_ref().map(|c| c.stream.as_raw_fd()),
            HostSide::Pty(p) => Some(p.master.as_raw_fd()),
            HostSide::Stdio { eof: false } => Some(0),
            _ => None,
        }
    }

    /// Terminal whose window size a console follows.
    pub fn tty_fd(&self) -> Option<RawFd> {
        match self {
            HostSide::Pty(p) => Some(p.master.as_raw_fd()),
            HostSide::Stdio { .. } => Some(1),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(
            parse_spec("socket=/run/c.sock", true).unwrap().kind,
            HostKind::Socket("/run/c.sock".into())
        );
        let p = parse_spec("name=org.example.log,file=/tmp/x", false).unwrap();
        assert_eq!(p.name.as_deref(), Some("org.example.log"));
        assert_eq!(p.kind, HostKind::File("/tmp/x".into()));
        assert!(parse_spec("pty", false).is_err());
        assert!(parse_spec("name=a,pty,stdio", false).is_err());
        assert!(parse_spec("name=a,bogus", false).is_err());
        assert!(parse_spec("name=a/b,pty", false).is_err());
    }

    #[test]
    fn ids_put_consoles_first() {
        let c = parse_spec("pty", true).unwrap();
        let n = parse_spec("name=a,pty", false).unwrap();
        let n2 = parse_spec("name=b,pty", false).unwrap();
        assert_eq!(
            assign_ids(&[n.clone(), c.clone(), n2.clone()], 31).unwrap(),
            vec![1, 0, 2]
        );
        assert_eq!(
            assign_ids(&[n.clone(), n2.clone()], 31).unwrap(),
            vec![1, 2]
        );
        assert!(assign_ids(&[n.clone(), n2.clone()], 2).is_err());
        assert!(assign_ids(&[n.clone(), n], 31).is_err());
    }
}
