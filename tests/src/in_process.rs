//! A device served by the layer's [`Server`] inside the test process, for the backends'
//! frontend tests: the backend's own code on a real socket, without a program to start,
//! so a test can also look at the device's shared state and the server's counters.
//!
//! Each backend's `tests/common` builds its device and keeps its own extras (the image,
//! the tap, the port list); the serving, stopping and the drop rule live here once.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use vhost_user_device::server::listen_path;
use vhost_user_device::{QueueStats, Server, ServerError, Shutdown, VhostUserDevice};

/// A device served on a unix socket from a thread of this process. Dropping it stops
/// the server; [`InProcessServer::stop`] also returns what the server returned.
pub struct InProcessServer {
    socket: PathBuf,
    stats: Vec<Arc<QueueStats>>,
    shutdown: Arc<Shutdown>,
    thread: Option<JoinHandle<Result<(), ServerError>>>,
}

impl InProcessServer {
    /// Listens on `socket` (a stale file there is replaced) and serves `device` to one
    /// frontend after another from a new thread.
    pub fn start<D: VhostUserDevice>(device: D, socket: &Path) -> Self {
        let shutdown = Shutdown::new().expect("shutdown");
        let server = Server::new(Arc::new(device), shutdown.clone());
        let stats = server.stats().to_vec();
        let listener = listen_path(socket).expect("listen");
        let thread = std::thread::spawn(move || server.serve(&listener));
        Self {
            socket: socket.to_path_buf(),
            stats,
            shutdown,
            thread: Some(thread),
        }
    }

    /// The socket the server listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The server's per-queue counters (kept across connections).
    pub fn stats(&self) -> &[Arc<QueueStats>] {
        &self.stats
    }

    /// Stops the server and returns what it returned.
    pub fn stop(mut self) -> Result<(), ServerError> {
        self.shutdown.trigger();
        self.thread
            .take()
            .map_or(Ok(()), |t| t.join().expect("server thread"))
    }
}

impl Drop for InProcessServer {
    fn drop(&mut self) {
        self.shutdown.trigger();
        // A failing test must fail, not hang: after a failed assertion the backend may be
        // stuck (that may be what the test caught), so it is left behind then.
        if std::thread::panicking() {
            return;
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
