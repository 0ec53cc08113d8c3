//! The virtio-console device: features, config space, and the port state that outlives
//! connections (listening sockets, ptys and unsent data stay when the VMM reconnects).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::VhostUserProtocolFeatures;
use vhost_user_device::device::read_config_bytes;
use vhost_user_device::{DeviceError, QueueWorker, VhostUserDevice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::host_poll::PortsState;
use crate::port::Port;
use crate::ports::{assign_ids, open_host, window_size, PortError, PortSpec};
use crate::shared::{PortInfo, Shared};
use crate::spec::{features, queue, CONFIG_EMERG_WR_OFFSET, CONFIG_SIZE};
use crate::state;
use crate::stats::{PortStats, SerialStats};
use crate::worker::SerialWorker;

/// Ring size we accept.
pub const MAX_QUEUE_SIZE: u16 = 1024;

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
