//! The virtio-console device: features, config space, and the port state that outlives
//! connections (listening sockets, ptys and unsent data stay when the VMM reconnects).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::VhostUserProtocolFeatures;
use vhost_user_device::device::read_config_bytes;
use vhost_user_device::{DeviceError, QueueWorker, VhostUserDevice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::ports::{assign_ids, open_host, window_size, PortError, PortInfo, PortSpec};
use crate::spec::{features, queue, CONFIG_EMERG_WR_OFFSET, CONFIG_SIZE};
use crate::state::{self, ConsoleState};
use crate::worker::{Port, PortsState, SerialWorker};

/// Ring size we accept.
pub const MAX_QUEUE_SIZE: u16 = 1024;

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

/// The virtio-console device.
pub struct SerialDevice {
    shared: Arc<Shared>,
}

impl SerialDevice {
    /// Opens the host side of every port (binds sockets, creates ptys, opens files).
    pub fn new(specs: &[PortSpec], max_ports: u32) -> Result<Self, PortError> {
        let ids = assign_ids(specs, max_ports)?;
        let mut ports = Vec::new();
        let mut infos = Vec::new();
        for (spec, &id) in specs.iter().zip(&ids) {
            let host = open_host(spec)?;
            let pty = match &host {
                crate::ports::HostSide::Pty(p) => Some(p.path.clone()),
                _ => None,
            };
            let stats = Arc::new(PortStats::default());
            let info = PortInfo {
                id,
                name: spec.name.clone(),
                console: spec.console,
                host: host.describe(),
                socket: matches!(host, crate::ports::HostSide::Socket { .. }),
                pty,
                stats: stats.clone(),
            };
            log::info!(
                "port {id}: {}{} on {}",
                if spec.console { "console" } else { "port" },
                spec.name
                    .as_ref()
                    .map(|n| format!(" {n}"))
                    .unwrap_or_default(),
                info.host
            );
            infos.push(info);
            ports.push(Port::new(id, spec.name.clone(), spec.console, host, stats));
        }
        let emerg_efd = EventFd::new(EFD_NONBLOCK).map_err(PortError::Events)?;
        let state =
            PortsState::new(ports, max_ports, emerg_efd.as_raw_fd()).map_err(PortError::Events)?;
        let size0 = state
            .ports
            .iter()
            .find(|p| p.id == 0 && p.console)
            .and_then(|p| p.host.tty_fd())
            .and_then(window_size)
            .map(|(c, r)| u32::from(c) | u32::from(r) << 16)
            .unwrap_or(0);
        Ok(Self {
            shared: Arc::new(Shared {
                max_ports,
                stats: SerialStats::default(),
                size0: AtomicU32::new(size0),
                emerg: Mutex::new(Vec::new()),
                emerg_efd,
                slot: Mutex::new(Some(state)),
                restore: Mutex::new(None),
                ports: infos,
            }),
        })
    }

    /// Shared state (counters, port list).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The config space now.
    pub fn config(&self) -> [u8; CONFIG_SIZE] {
        let size = self.shared.size0.load(Ordering::Relaxed);
        let mut c = [0u8; CONFIG_SIZE];
        c[0..2].copy_from_slice(&((size & 0xffff) as u16).to_le_bytes());
        c[2..4].copy_from_slice(&((size >> 16) as u16).to_le_bytes());
        c[4..8].copy_from_slice(&self.shared.max_ports.to_le_bytes());
        c
    }
}

impl VhostUserDevice for SerialDevice {
    fn name(&self) -> &str {
        "console"
    }

    fn num_queues(&self) -> u16 {
        queue::count(self.shared.max_ports)
    }

    fn max_queue_size(&self) -> u16 {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        features::SIZE | features::MULTIPORT | features::EMERG_WRITE
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
    }

    fn read_config(&self, offset: u32, buf: &mut [u8]) -> Result<(), DeviceError> {
        // QEMU may read more than our 12 bytes (up to its config_size): zeroes past the end.
        read_config_bytes(&self.config(), 0x1000, offset, buf)
    }

    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        if offset == CONFIG_EMERG_WR_OFFSET && (1..=4).contains(&data.len()) {
            self.shared
                .emerg
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(data[0]);
            self.shared
                .stats
                .emerg_chars
                .fetch_add(1, Ordering::Relaxed);
            let _ = self.shared.emerg_efd.write(1);
            return Ok(());
        }
        Err(DeviceError::ConfigAccess {
            offset,
            len: data.len(),
        })
    }

    fn migrates_state(&self) -> bool {
        true
    }

    fn save_state(&self, mut parts: Vec<Vec<u8>>) -> Result<Vec<u8>, DeviceError> {
        // One worker owns every queue; without one, the ports rest in `slot`.
        if let Some(part) = parts.pop() {
            return Ok(part);
        }
        let slot = self.shared.slot.lock().unwrap_or_else(|e| e.into_inner());
        let st = slot
            .as_ref()
            .ok_or_else(|| DeviceError::State("the port state is in use".into()))?;
        Ok(state::encode(&st.saved()))
    }

    fn load_state(&self, bytes: &[u8]) -> Result<(), DeviceError> {
        let saved = state::decode(bytes).map_err(|e| DeviceError::State(e.to_string()))?;
        {
            let slot = self.shared.slot.lock().unwrap_or_else(|e| e.into_inner());
            let st = slot.as_ref().ok_or_else(|| {
                DeviceError::State("a worker is running: the rings must be stopped".into())
            })?;
            st.check(&saved).map_err(DeviceError::State)?;
        }
        *self
            .shared
            .restore
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(saved);
        Ok(())
    }

    fn worker_groups(&self) -> Vec<Vec<u16>> {
        // Control and port queues interact: one worker owns them all.
        vec![(0..self.num_queues()).collect()]
    }

    fn create_worker(
        &self,
        _queues: &[u16],
        acked_features: u64,
    ) -> Result<Box<dyn QueueWorker>, DeviceError> {
        let state = self
            .shared
            .slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| {
                DeviceError::Worker(std::io::Error::other(
                    "port state is still owned by the previous connection's worker",
                ))
            })?;
        let multiport = acked_features & features::MULTIPORT != 0;
        Ok(Box::new(SerialWorker::new(
            self.shared.clone(),
            state,
            multiport,
        )))
    }
}
