//! Where the migration stream goes: `tcp:HOST:PORT`, `unix:PATH`, or `fd:N` (a connected
//! or listening stream socket a manager hands over, so it can bring its own tunnel).
//!
//! TCP is encrypted and mutually authenticated with TLS when both ends have credentials
//! (`--tls-creds DIR`, see [`super::tls`]). Plain TCP crosses hosts unprotected, so it is
//! only allowed where the operator says so on both ends (`--migration-insecure`); a Unix
//! socket or a handed-over fd stays on the host or inside the manager's tunnel.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use vhost_user_device::fd_check::socket_int_option;

use super::tls::{TlsCreds, TlsStream};

/// A migration address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Uri {
    /// `tcp:HOST:PORT` (HOST may be `[v6]`).
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// `unix:PATH`.
    Unix(PathBuf),
    /// `fd:N`: a stream socket this process inherited.
    Fd(RawFd),
}

impl FromStr for Uri {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{s:?}: {why} (use tcp:HOST:PORT, unix:PATH or fd:N)");
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(bad("no host"));
            }
            let port = port.parse().map_err(|_| bad("bad port"))?;
            Ok(Uri::Tcp {
                host: host.to_string(),
                port,
            })
        } else if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("no path"));
            }
            Ok(Uri::Unix(PathBuf::from(path)))
        } else if let Some(n) = s.strip_prefix("fd:") {
            let fd: RawFd = n.parse().map_err(|_| bad("bad fd number"))?;
            if fd < 3 {
                return Err(bad("fd must be 3 or above"));
            }
            Ok(Uri::Fd(fd))
        } else {
            Err(bad("unknown transport"))
        }
    }
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Uri::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Uri::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Uri::Unix(p) => write!(f, "unix:{}", p.display()),
            Uri::Fd(n) => write!(f, "fd:{n}"),
        }
    }
}

impl Uri {
    /// Whether the stream would cross the network unprotected.
    pub fn is_network(&self) -> bool {
        matches!(self, Uri::Tcp { .. })
    }
}

/// How TCP streams are protected.
#[derive(Clone, Debug, Default)]
pub struct Security {
    /// Plain TCP allowed (`--migration-insecure`).
    pub insecure: bool,
    /// TLS credentials (`--tls-creds`): TCP streams use TLS.
    pub tls: Option<TlsCreds>,
}

impl Security {
    /// Plain TCP allowed or not, no TLS.
    pub fn plain(insecure: bool) -> Self {
        Self {
            insecure,
            tls: None,
        }
    }
}

/// Why a transport cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Plain TCP without both ends' consent.
    #[error(
        "{0}: plain TCP sends the disk unencrypted and unauthenticated; give --tls-creds DIR \
         on both ends, or --migration-insecure on both ends to accept that"
    )]
    Insecure(Uri),
    /// The socket operation failed.
    #[error("{uri}: {source}")]
    Io {
        /// Where.
        uri: Uri,
        /// What failed.
        source: io::Error,
    },
}

/// A connected stream.
#[derive(Debug)]
pub enum Conn {
    /// TCP.
    Tcp(TcpStream),
    /// A Unix stream socket (also any handed-over stream socket).
    Unix(UnixStream),
    /// TLS over TCP.
    Tls(TlsStream),
}

/// Shuts a connection down from another thread (see [`Conn::canceller`]).
#[derive(Debug)]
pub enum Canceller {
    /// The TCP socket (of a plain or TLS connection).
    Tcp(TcpStream),
    /// The Unix socket.
    Unix(UnixStream),
}

impl Canceller {
    /// Shuts both directions down: whoever is blocked on the connection wakes with an
    /// error or an end of stream.
    pub fn cancel(&self) {
        let _ = match self {
            Canceller::Tcp(s) => s.shutdown(Shutdown::Both),
            Canceller::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Conn {
    /// Shuts both directions down (wakes a peer blocked in read).
    pub fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
            Conn::Tls(s) => s.socket().and_then(|t| t.shutdown(Shutdown::Both)),
        };
    }

    /// A handle that can shut the socket down while another thread is blocked on it
    /// (a TLS stream's own `shutdown` waits for the session lock a blocked read holds).
    pub fn canceller(&self) -> io::Result<Canceller> {
        Ok(match self {
            Conn::Tcp(s) => Canceller::Tcp(s.try_clone()?),
            Conn::Unix(s) => Canceller::Unix(s.try_clone()?),
            Conn::Tls(s) => Canceller::Tcp(s.socket()?),
        })
    }

    /// A second handle on the same socket (one thread reads while another writes).
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            // One TLS session: both handles share it.
            Conn::Tls(s) => Conn::Tls(s.clone()),
        })
    }

    /// A read timeout (None: block).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(t),
            Conn::Unix(s) => s.set_read_timeout(t),
            Conn::Tls(s) => s.socket()?.set_read_timeout(t),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// Refuses plain TCP unless TLS is configured or the operator consented.
pub fn check_policy(uri: &Uri, sec: &Security) -> Result<(), TransportError> {
    if uri.is_network() && sec.tls.is_none() && !sec.insecure {
        return Err(TransportError::Insecure(uri.clone()));
    }
    Ok(())
}

/// Connects to `uri` (the source side).
pub fn connect(uri: &Uri, sec: &Security) -> Result<Conn, TransportError> {
    check_policy(uri, sec)?;
    let io = |source| TransportError::Io {
        uri: uri.clone(),
        source,
    };
    match uri {
        Uri::Tcp { host, port } => {
            let addrs: Vec<_> = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(io)?
                .collect();
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            for a in addrs {
                match TcpStream::connect_timeout(&a, Duration::from_secs(10)) {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        return match &sec.tls {
                            Some(creds) => TlsStream::connect(s, host, creds)
                                .map(Conn::Tls)
                                .map_err(io),
                            None => Ok(Conn::Tcp(s)),
                        };
                    }
                    Err(e) => last = e,
                }
            }
            Err(io(last))
        }
        Uri::Unix(p) => UnixStream::connect(p).map(Conn::Unix).map_err(io),
        Uri::Fd(fd) => take_fd(*fd).map(Conn::Unix).map_err(io),
    }
}

/// A bound address waiting for the source (the destination side).
#[derive(Debug)]
pub enum Listener {
    /// TCP, with TLS credentials when configured.
    Tcp(TcpListener, Option<TlsCreds>),
    /// Unix.
    Unix(UnixListener, PathBuf),
    /// A handed-over listening socket.
    FdListening(UnixListener),
    /// A handed-over connected socket: one connection, taken once.
    FdConnected(Option<UnixStream>),
}

/// Binds `uri` (the destination side).
pub fn listen(uri: &Uri, sec: &Security) -> Result<Listener, TransportError> {
    check_policy(uri, sec)?;
    let io = |source| TransportError::Io {
        uri: uri.clone(),
        source,
    };
    match uri {
        Uri::Tcp { host, port } => TcpListener::bind((host.as_str(), *port))
            .map(|l| Listener::Tcp(l, sec.tls.clone()))
            .map_err(io),
        Uri::Unix(p) => {
            // A stale socket file from an earlier run would make bind fail.
            if std::fs::symlink_metadata(p).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            }) {
                let _ = std::fs::remove_file(p);
            }
            UnixListener::bind(p)
                .map(|l| Listener::Unix(l, p.clone()))
                .map_err(io)
        }
        Uri::Fd(fd) => {
            let s = take_fd(*fd).map_err(io)?;
            if is_listening(s.as_raw_fd()) {
                // SAFETY: the fd was just checked to be a listening stream socket we own.
                let l =
                    unsafe { UnixListener::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(s)) };
                Ok(Listener::FdListening(l))
            } else {
                Ok(Listener::FdConnected(Some(s)))
            }
        }
    }
}

impl Listener {
    /// Waits for the next connection.
    pub fn accept(&mut self) -> io::Result<Conn> {
        match self {
            Listener::Tcp(l, tls) => {
                let (s, _) = l.accept()?;
                let _ = s.set_nodelay(true);
                match tls {
                    // A peer that fails the handshake (no or a foreign certificate)
                    // gets nothing: its stream ends here.
                    Some(creds) => {
                        s.set_read_timeout(Some(Duration::from_secs(30)))?;
                        TlsStream::accept(s, creds).map(Conn::Tls)
                    }
                    None => Ok(Conn::Tcp(s)),
                }
            }
            Listener::Unix(l, _) | Listener::FdListening(l) => Ok(Conn::Unix(l.accept()?.0)),
            Listener::FdConnected(s) => s.take().map(Conn::Unix).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the handed-over connection was already used; hand over a new one",
                )
            }),
        }
    }

    /// The bound TCP port (port 0 in the URI picks a free one).
    pub fn local_port(&self) -> Option<u16> {
        match self {
            Listener::Tcp(l, _) => l.local_addr().ok().map(|a| a.port()),
            _ => None,
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Takes ownership of inherited fd `fd`, checking that it is a stream socket.
fn take_fd(fd: RawFd) -> io::Result<UnixStream> {
    let ty = socket_int_option(fd, libc::SO_TYPE).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {fd} is not a socket: {e}"),
        )
    })?;
    if ty != libc::SOCK_STREAM {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {fd} is not a stream socket"),
        ));
    }
    // SAFETY: the fd is an open socket handed to this process for this purpose; from here
    // on we own it (and close it when done).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(UnixStream::from(owned))
}

fn is_listening(fd: RawFd) -> bool {
    socket_int_option(fd, libc::SO_ACCEPTCONN).is_ok_and(|v| v != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_and_print_back() {
        for s in [
            "tcp:example.org:4444",
            "tcp:[::1]:80",
            "unix:/run/m.sock",
            "fd:7",
        ] {
            assert_eq!(s.parse::<Uri>().unwrap().to_string(), s);
        }
        for (s, why) in [
            ("tcp:host", "no port"),
            ("tcp::1", "no host"),
            ("tcp:h:99999", "bad port"),
            ("unix:", "no path"),
            ("fd:1", "3 or above"),
            ("fd:x", "bad fd"),
            ("nbd:x", "unknown transport"),
        ] {
            let e = s.parse::<Uri>().unwrap_err();
            assert!(e.contains(why), "{s}: {e}");
        }
    }

    #[test]
    fn plain_tcp_needs_consent() {
        let uri: Uri = "tcp:127.0.0.1:1".parse().unwrap();
        let e = connect(&uri, &Security::plain(false)).unwrap_err();
        assert!(e.to_string().contains("--migration-insecure"), "{e}");
        assert!(check_policy(&"unix:/x".parse().unwrap(), &Security::default()).is_ok());
    }

    #[test]
    fn unix_and_fd_transports_carry_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let uri = Uri::Unix(dir.path().join("m.sock"));
        let mut l = listen(&uri, &Security::default()).unwrap();
        let mut a = connect(&uri, &Security::default()).unwrap();
        let mut b = l.accept().unwrap();
        a.write_all(b"hello").unwrap();
        let mut got = [0u8; 5];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        // A connected socketpair handed over as fd:N.
        let (x, y) = UnixStream::pair().unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(x);
        let mut l = listen(&Uri::Fd(fd), &Security::default()).unwrap();
        let mut c = l.accept().unwrap();
        assert!(l.accept().is_err(), "a handed-over connection serves once");
        let mut y = y;
        y.write_all(b"abc").unwrap();
        let mut got = [0u8; 3];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"abc");
        // Not a socket.
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(f);
        let e = connect(&Uri::Fd(fd), &Security::default()).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
    }
}
