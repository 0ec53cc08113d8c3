//! The device's counters and each port's (query-stats), counted by the worker and read by
//! the control socket.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Device counters. Those a port causes are also kept per port ([`PortStats`]): the
/// worker counts both in one call ([`SerialStats::count`]), so a device counter is the sum
/// of its ports' counters.
#[derive(Debug, Default)]
pub struct SerialStats {
    /// Bytes guest → host.
    pub tx_bytes: AtomicU64,
    /// Bytes host → guest.
    pub rx_bytes: AtomicU64,
    /// Control messages received from the driver.
    pub control_in: AtomicU64,
    /// Control messages sent to the driver.
    pub control_out: AtomicU64,
    /// Ignored guest input: unknown control events, bad port ids, short buffers, chains on
    /// queues of ports that do not exist, guest memory we could not access.
    pub bad_input: AtomicU64,
    /// Console output dropped because no one was connected and the backlog was full.
    pub console_dropped: AtomicU64,
    /// Guest output dropped because a port had to give a chain back to the guest before
    /// its host side took it all (the VMM went away) and the rest exceeded what a port
    /// keeps (`HELD_LIMIT` in the worker), or because writing to its pty or stdio failed.
    pub tx_dropped: AtomicU64,
    /// Failed writes to a port's file, pty or stdio (disk full, stdout closed...).
    pub host_write_errors: AtomicU64,
    /// Emergency-write characters.
    pub emerg_chars: AtomicU64,
    /// Host clients accepted.
    pub connects: AtomicU64,
    /// Host clients gone (hung up, or dropped after a failed read or write).
    pub disconnects: AtomicU64,
}

/// The counters of one port, each also a device counter (see [`SerialStats::count`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Bytes guest → host.
    TxBytes,
    /// Bytes host → guest.
    RxBytes,
    /// Guest output dropped.
    TxDropped,
    /// Console output dropped while no one was connected.
    ConsoleDropped,
    /// Failed writes to the host side.
    HostWriteErrors,
    /// Host clients accepted.
    Connects,
    /// Host clients gone.
    Disconnects,
}

/// One port's counters (query-stats' `ports`), made once at start for each port of the
/// command line and shared by the worker (which counts) and the control socket (which
/// reads). The meaning of each is that of the device counter of the same name.
#[derive(Debug, Default)]
pub struct PortStats {
    /// Bytes guest → host.
    pub tx_bytes: AtomicU64,
    /// Bytes host → guest.
    pub rx_bytes: AtomicU64,
    /// Guest output dropped.
    pub tx_dropped: AtomicU64,
    /// Console output dropped while no one was connected (consoles only).
    pub console_dropped: AtomicU64,
    /// Failed writes to the host side.
    pub host_write_errors: AtomicU64,
    /// Host clients accepted (socket ports only).
    pub connects: AtomicU64,
    /// Host clients gone (socket ports only).
    pub disconnects: AtomicU64,
    /// The guest has the port open, as its driver last said (a console is open once the
    /// driver set it up; without MULTIPORT port 0 is open from the start).
    pub guest_open: AtomicBool,
}

impl PortStats {
    fn counter(&self, which: Counter) -> &AtomicU64 {
        match which {
            Counter::TxBytes => &self.tx_bytes,
            Counter::RxBytes => &self.rx_bytes,
            Counter::TxDropped => &self.tx_dropped,
            Counter::ConsoleDropped => &self.console_dropped,
            Counter::HostWriteErrors => &self.host_write_errors,
            Counter::Connects => &self.connects,
            Counter::Disconnects => &self.disconnects,
        }
    }

    /// The value of `which` now.
    pub fn get(&self, which: Counter) -> u64 {
        self.counter(which).load(Ordering::Relaxed)
    }
}

impl SerialStats {
    fn counter(&self, which: Counter) -> &AtomicU64 {
        match which {
            Counter::TxBytes => &self.tx_bytes,
            Counter::RxBytes => &self.rx_bytes,
            Counter::TxDropped => &self.tx_dropped,
            Counter::ConsoleDropped => &self.console_dropped,
            Counter::HostWriteErrors => &self.host_write_errors,
            Counter::Connects => &self.connects,
            Counter::Disconnects => &self.disconnects,
        }
    }

    /// Adds `n` to `port`'s counter `which` and to the device's.
    pub fn count(&self, port: &PortStats, which: Counter, n: u64) {
        if n == 0 {
            return;
        }
        port.counter(which).fetch_add(n, Ordering::Relaxed);
        self.counter(which).fetch_add(n, Ordering::Relaxed);
    }
}
