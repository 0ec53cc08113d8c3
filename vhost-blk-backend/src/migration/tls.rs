//! TLS for the migration stream over TCP: encrypted and mutually authenticated with
//! rustls, from a directory in QEMU's tls-creds-x509 layout, so the credentials libvirt
//! already deploys for migration work as they are:
//!
//! | file | used by |
//! |---|---|
//! | `ca-cert.pem` | both ends: the authority both certificates must chain to |
//! | `server-cert.pem`, `server-key.pem` | the destination (it listens) |
//! | `client-cert.pem`, `client-key.pem` | the source (it connects) |
//!
//! The source checks the destination's certificate against the host name or address in
//! its `tcp:` URI; the destination requires a client certificate from the same authority.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

/// Why credentials cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing or does not parse.
    #[error("{path}: {why}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Credentials from a tls-creds-x509 directory.
#[derive(Clone, Debug)]
pub struct TlsCreds {
    dir: PathBuf,
}

/// rustls with ring: it builds with just a C compiler (aws-lc-rs wants more of the build
/// machine). rustls marks ring's provider deprecated only because it lacks post-quantum
/// key exchange.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsCreds {
    /// Credentials in `dir` (read when a connection is made, so renewed certificates
    /// are picked up).
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn certs(&self, name: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let path = self.file(name);
        let bad = |why: String| TlsError::File {
            path: path.clone(),
            why,
        };
        let certs = CertificateDer::pem_file_iter(&path)
            .map_err(|e| bad(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no certificate in it".into()));
        }
        Ok(certs)
    }

    fn key(&self, name: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
        let path = self.file(name);
        PrivateKeyDer::from_pem_file(&path).map_err(|e| TlsError::File {
            path,
            why: e.to_string(),
        })
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in self.certs("ca-cert.pem")? {
            roots.add(c).map_err(|e| TlsError::File {
                path: self.file("ca-cert.pem"),
                why: e.to_string(),
            })?;
        }
        Ok(Arc::new(roots))
    }

    /// The destination's side: its certificate, and client certificates required.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.certs("server-cert.pem")?, self.key("server-key.pem")?)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(Arc::new(cfg))
    }

    /// The source's side: the authority, and its own certificate.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.certs("client-cert.pem")?, self.key("client-key.pem")?)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(Arc::new(cfg))
    }

    /// Checks that every file the given side needs is there and parses (at start-up, so
    /// a mistake is an error then and not at migration time).
    pub fn check(&self, server: bool) -> Result<(), TlsError> {
        if server {
            self.server_config().map(|_| ())
        } else {
            self.client_config().map(|_| ())
        }
    }
}

/// A TLS stream, shared by the reading and the writing half of a connection (a sync
/// never reads and writes at the same time, so the lock is never contended).
#[derive(Clone)]
pub struct TlsStream(Arc<Mutex<TlsInner>>);

enum TlsInner {
    Client(rustls::StreamOwned<ClientConnection, TcpStream>),
    Server(rustls::StreamOwned<ServerConnection, TcpStream>),
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsStream")
    }
}

fn tls_io(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, format!("TLS: {e}"))
}

impl TlsStream {
    /// The source's end: handshakes as a client of `host` (name or address).
    pub fn connect(tcp: TcpStream, host: &str, creds: &TlsCreds) -> io::Result<Self> {
        let name = ServerName::try_from(host.to_string()).map_err(tls_io)?;
        let conn =
            ClientConnection::new(creds.client_config().map_err(tls_io)?, name).map_err(tls_io)?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        // Complete the handshake now, so a refused certificate is the connect's error.
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).map_err(tls_io)?;
        }
        Ok(Self(Arc::new(Mutex::new(TlsInner::Client(s)))))
    }

    /// The destination's end: handshakes as the server, requiring a client certificate.
    pub fn accept(tcp: TcpStream, creds: &TlsCreds) -> io::Result<Self> {
        let conn = ServerConnection::new(creds.server_config().map_err(tls_io)?).map_err(tls_io)?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).map_err(tls_io)?;
        }
        Ok(Self(Arc::new(Mutex::new(TlsInner::Server(s)))))
    }

    fn tcp(&self) -> io::Result<TcpStream> {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match &*g {
            TlsInner::Client(s) => s.sock.try_clone(),
            TlsInner::Server(s) => s.sock.try_clone(),
        }
    }

    /// The TCP socket underneath (timeouts, shutdown).
    pub fn socket(&self) -> io::Result<TcpStream> {
        self.tcp()
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *g {
            TlsInner::Client(s) => s.read(buf),
            TlsInner::Server(s) => s.read(buf),
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *g {
            TlsInner::Client(s) => s.write(buf),
            TlsInner::Server(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *g {
            TlsInner::Client(s) => s.flush(),
            TlsInner::Server(s) => s.flush(),
        }
    }
}
