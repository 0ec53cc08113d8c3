//! What the device, its worker and the protocol thread share: the counters, the
//! emergency-write bytes, the port list, and the ports themselves while no worker runs.
//!
//! It lives apart from `device` (features, config space, worker creation) and `worker`
//! (the queues) so that each depends on it and neither on the other.

use std::path::PathBuf;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::host_poll::PortsState;
use crate::state::ConsoleState;
use crate::stats::{PortStats, SerialStats};

/// State shared by the device, its workers and the protocol thread.
pub struct Shared {
    /// Port ids available (config max_nr_ports).
    pub max_ports: u32,
    /// Counters.
    pub stats: SerialStats,
    /// Port 0's size, cols | rows << 16 (config space).
    pub size0: AtomicU32,
    /// Emergency-write bytes not yet handed to the worker.
    pub emerg: Mutex<Vec<u8>>,
    /// Wakes the worker for `emerg`.
    pub emerg_efd: EventFd,
    /// Port state while no worker runs.
    pub slot: Mutex<Option<PortsState>>,
    /// What the ports are, with their counters, in command-line order (the order of
    /// query-status' and query-stats' `ports`).
    pub ports: Vec<PortInfo>,
    /// A console state the VMM's migration brought (DEVICE_STATE), taken up by the next
    /// worker.
    pub restore: Mutex<Option<ConsoleState>>,
}

/// What a port is, for logs, tests and the operator.
#[derive(Clone, Debug)]
pub struct PortInfo {
    /// Port id (virtio).
    pub id: u32,
    /// Name, if any.
    pub name: Option<String>,
    /// Console port.
    pub console: bool,
    /// Host side, e.g. "pty /dev/pts/3".
    pub host: String,
    /// The host side is a listening socket (clients connect and go).
    pub socket: bool,
    /// The pty path for pty ports.
    pub pty: Option<PathBuf>,
    /// Its counters, which the worker's port shares.
    pub stats: Arc<PortStats>,
}
