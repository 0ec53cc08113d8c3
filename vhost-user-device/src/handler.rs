//! The vhost-user protocol state machine of one connection.
//!
//! vhost's `BackendReqHandler` parses and validates messages; this type implements the
//! requests: feature negotiation, memory table, ring setup, start/stop of rings on their
//! worker threads, dirty logging, inflight regions and config space.

use std::fs::File;
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut,
    VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::VhostUserMemoryRegionBase;
use vmm_sys_util::eventfd::EventFd;

use crate::device::{VhostUserDevice, VmmEvent};
use crate::dirty_log::DirtyLog;
use crate::fd_check::check_eventfd;
use crate::inflight::InflightRegion;
use crate::memory::{MemoryTable, MAX_MEM_SLOTS};
use crate::ring::{QueueStats, Ring, RingSetup};
use crate::worker::WorkerHandle;

/// VIRTIO_F_VERSION_1.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_RING_F_INDIRECT_DESC.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// VIRTIO_RING_F_EVENT_IDX.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Virtio features the layer implements for every device.
pub fn layer_features() -> u64 {
    VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | VhostUserVirtioFeatures::LOG_ALL.bits()
        | VIRTIO_F_VERSION_1
        | VIRTIO_RING_F_INDIRECT_DESC
        | VIRTIO_RING_F_EVENT_IDX
}

/// Protocol features the layer implements for every device.
pub fn layer_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::BACKEND_REQ
}

/// Ring configuration collected from SET_VRING_* messages.
#[derive(Default)]
struct VringConfig {
    size: u16,
    desc: Option<u64>,
    avail: Option<u64>,
    used: Option<u64>,
    /// SET_VRING_BASE (32 bits for packed rings: both indices and wrap counters).
    base: u32,
    call: Option<EventFd>,
    /// SET_VRING_ERR: signalled when the ring is found broken.
    err: Option<EventFd>,
    enabled: bool,
    started: bool,
}

/// Protocol state of one frontend connection.
pub struct Handler<D: VhostUserDevice> {
    device: Arc<D>,
    owned: bool,
    acked_features: u64,
    acked_protocol: u64,
    log: Arc<DirtyLog>,
    mem: MemoryTable,
    vrings: Vec<VringConfig>,
    group_of: Vec<usize>,
    groups: Vec<Vec<u16>>,
    workers: Vec<Option<WorkerHandle>>,
    inflight: Option<Arc<InflightRegion>>,
    backend_req: Option<Backend>,
    stats: Vec<Arc<QueueStats>>,
    worker_failed: bool,
    /// A request failed in a way the protocol has no error reply for; the connection
    /// must be closed (see [`Handler::must_hang_up`]).
    hang_up: bool,
    /// The device state moving through SET_DEVICE_STATE_FD's pipe, until
    /// CHECK_DEVICE_STATE.
    state_transfer: Option<StateTransfer>,
}

/// A DEVICE_STATE transfer in progress: a thread writes the saved state to the
/// frontend's pipe, or reads the state to load from it.
enum StateTransfer {
    Save(std::thread::JoinHandle<std::io::Result<()>>),
    Load(std::thread::JoinHandle<std::io::Result<Vec<u8>>>),
}

/// The most device state taken from a frontend (the console's: its ports' flags and
/// buffered bytes, well under this).
pub const MAX_DEVICE_STATE: usize = 16 << 20;

/// Reads `file` to its end, refusing more than [`MAX_DEVICE_STATE`] bytes.
fn read_state(mut file: File) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut state = Vec::new();
    (&mut file)
        .take(MAX_DEVICE_STATE as u64 + 1)
        .read_to_end(&mut state)?;
    if state.len() > MAX_DEVICE_STATE {
        return Err(std::io::Error::other(format!(
            "more than {MAX_DEVICE_STATE} bytes of device state"
        )));
    }
    Ok(state)
}

fn handler_err(e: impl std::fmt::Display) -> VuError {
    VuError::ReqHandlerError(std::io::Error::other(e.to_string()))
}

/// The result of a state transfer's thread.
fn joined<T>(r: std::thread::Result<std::io::Result<T>>) -> VuResult<T> {
    match r {
        Ok(r) => r.map_err(|e| handler_err(format!("device state: {e}"))),
        Err(_) => Err(handler_err("device state: the transfer thread panicked")),
    }
}

/// Runs a device state transfer on its own thread (SET_DEVICE_STATE_FD must not block:
/// the frontend reads or writes the other end of the pipe after the reply).
fn state_thread<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> VuResult<std::thread::JoinHandle<std::io::Result<T>>> {
    std::thread::Builder::new()
        .name("device-state".into())
        .spawn(move || {
            crate::sandbox::enter_or_exit(crate::sandbox::ThreadKind::StateTransfer);
            f()
        })
        .map_err(|e| handler_err(format!("device state: cannot start its thread: {e}")))
}

impl<D: VhostUserDevice> Handler<D> {
    /// The protocol features offered: the layer's, the device's, and DEVICE_STATE for a
    /// device with state to move.
    fn offered_protocol(&self) -> VhostUserProtocolFeatures {
        let mut f = layer_protocol_features() | self.device.protocol_features();
        if self.device.migrates_state() {
            f |= VhostUserProtocolFeatures::DEVICE_STATE;
        }
        f
    }

    /// A fresh handler for a new connection.
    pub fn new(device: Arc<D>, stats: Vec<Arc<QueueStats>>) -> Self {
        let n = usize::from(device.num_queues());
        let groups = device.worker_groups();
        let mut group_of = vec![usize::MAX; n];
        for (g, queues) in groups.iter().enumerate() {
            for &q in queues {
                if let Some(slot) = group_of.get_mut(usize::from(q)) {
                    *slot = g;
                }
            }
        }
        let log = DirtyLog::new();
        Self {
            mem: MemoryTable::new(log.clone()),
            log,
            owned: false,
            acked_features: 0,
            acked_protocol: 0,
            vrings: (0..n).map(|_| VringConfig::default()).collect(),
            workers: groups.iter().map(|_| None).collect(),
            group_of,
            groups,
            inflight: None,
            backend_req: None,
            stats,
            worker_failed: false,
            hang_up: false,
            state_transfer: None,
            device,
        }
    }

    /// Whether the frontend acked REPLY_ACK (it then waits for an ack to every request it
    /// flags NEED_REPLY).
    pub fn reply_ack_negotiated(&self) -> bool {
        self.acked_protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    /// The connection's dirty log (tests and stats).
    pub fn dirty_log(&self) -> &Arc<DirtyLog> {
        &self.log
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | layer_features()
    }

    /// Whether the frontend acked VHOST_USER_F_PROTOCOL_FEATURES.
    pub fn protocol_negotiated(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    fn vring(&mut self, index: u32) -> VuResult<&mut VringConfig> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.vrings.get_mut(i))
            .ok_or(VuError::InvalidParam)
    }

    fn worker_for(&mut self, queue: u16) -> VuResult<&WorkerHandle> {
        let group = *self
            .group_of
            .get(usize::from(queue))
            .ok_or(VuError::InvalidParam)?;
        let queues = self.groups.get(group).ok_or(VuError::InvalidParam)?.clone();
        let slot = self.workers.get_mut(group).ok_or(VuError::InvalidParam)?;
        if slot.is_none() {
            let worker = self
                .device
                .create_worker(&queues, self.acked_features)
                .map_err(handler_err)?;
            let name = format!("{}-q{}", self.device.name(), queues[0]);
            let handle = WorkerHandle::spawn(name, worker, queues).map_err(handler_err)?;
            *slot = Some(handle);
        }
        slot.as_ref().ok_or(VuError::BackendInternalError)
    }

    fn running_worker(&self, queue: u16) -> Option<&WorkerHandle> {
        let group = *self.group_of.get(usize::from(queue))?;
        self.workers.get(group)?.as_ref()
    }

    /// Starts ring `index` if it has everything it needs.
    fn start_ring(&mut self, index: u16, kick: EventFd) -> VuResult<()> {
        let max_size = self.device.max_queue_size();
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let acked_features = self.acked_features;
        let protocol = self.protocol_negotiated();
        let inflight = self.inflight.clone();
        let mem = self.mem.atomic();
        let log = self.log.clone();
        let stats = self
            .stats
            .get(usize::from(index))
            .cloned()
            .unwrap_or_default();
        let vr = self.vring(u32::from(index))?;
        let (Some(desc), Some(avail), Some(used)) = (vr.desc, vr.avail, vr.used) else {
            log::warn!("queue {index}: kick fd set before ring addresses; not starting");
            return Err(VuError::InvalidOperation("ring addresses not set"));
        };
        let size = if vr.size == 0 { max_size } else { vr.size };
        let call = match &vr.call {
            Some(c) => Some(c.try_clone().map_err(handler_err)?),
            None => None,
        };
        let err = match &vr.err {
            Some(e) => Some(e.try_clone().map_err(handler_err)?),
            None => None,
        };
        // Without VHOST_USER_F_PROTOCOL_FEATURES rings are enabled as soon as they start.
        let enabled = if protocol { vr.enabled } else { true };
        let setup = RingSetup {
            index,
            size,
            max_size,
            desc,
            avail,
            used,
            base: vr.base,
            event_idx,
            acked_features,
            kick,
            call,
            err,
            enabled,
            inflight: inflight.and_then(|r| r.queue(index, size)),
            mem,
            log,
            stats,
        };
        let ring = Ring::start(setup).map_err(|e| {
            log::error!("{e}");
            handler_err(e)
        })?;
        if !self.worker_for(index)?.start(ring) {
            self.worker_failed = true;
            return Err(VuError::BackendInternalError);
        }
        self.vring(u32::from(index))?.started = true;
        self.device.vmm_event(VmmEvent::RingStarted(index));
        Ok(())
    }

    /// Stops ring `index` (draining it); returns the vring base to report.
    fn stop_ring(&mut self, index: u16) -> VuResult<u32> {
        let started = self.vring(u32::from(index))?.started;
        if !started {
            return Ok(self.vring(u32::from(index))?.base);
        }
        let ring = self.running_worker(index).and_then(|w| w.stop(index));
        let vr = self.vring(u32::from(index))?;
        vr.started = false;
        match ring {
            Some(ring) => {
                vr.base = ring.vring_base();
                Ok(vr.base)
            }
            None => {
                log::error!("queue {index}: worker did not hand the ring back");
                self.worker_failed = true;
                Err(VuError::BackendInternalError)
            }
        }
    }

    /// Stops every ring and worker (disconnect, reset). Returns false if a worker failed.
    pub fn shutdown(&mut self) -> bool {
        for index in 0..self.vrings.len() as u16 {
            let _ = self.stop_ring(index);
        }
        let mut ok = !self.worker_failed;
        for w in self.workers.iter_mut() {
            if let Some(w) = w.take() {
                ok &= w.shutdown();
            }
        }
        ok
    }

    /// Whether the connection must be closed because a request failed that the frontend
    /// cannot be told about (a refused SET_LOG_BASE).
    pub fn must_hang_up(&self) -> bool {
        self.hang_up
    }

    /// Whether any worker has failed.
    pub fn worker_failed(&self) -> bool {
        self.worker_failed || self.workers.iter().flatten().any(|w| w.has_failed())
    }

    /// RESET_DEVICE (and RESET_OWNER): "disable all rings and reset all internal device
    /// state to the initial state, ready to be reinitialized" (vhost-user spec).
    ///
    /// Cleared, being the device's or the driver session's: rings and workers, acked
    /// virtio features, the inflight region (the spec has the frontend get a new one after
    /// a reset; resubmitting the old one's chains would replay requests of a driver that
    /// has reset) and the dirty log (QEMU sends SET_LOG_BASE again when it restarts a
    /// device with logging on).
    ///
    /// Kept, being the connection's: ownership (the spec says so), the acked protocol
    /// features (negotiated once per connection: QEMU does not send them again, and the
    /// vhost crate's message layer keeps acting on its own copy, e.g. for REPLY_ACK), the
    /// backend request channel, and the memory table (the VM's memory did not change;
    /// QEMU only sends the regions that differ from what it already sent).
    fn reset_state(&mut self) {
        if !self.shutdown() {
            self.worker_failed = true;
        }
        for vr in self.vrings.iter_mut() {
            *vr = VringConfig::default();
        }
        self.acked_features = 0;
        self.inflight = None;
        self.log.clear();
        self.device.reset();
    }
}

impl<D: VhostUserDevice> VhostUserBackendReqHandlerMut for Handler<D> {
    fn set_owner(&mut self) -> VuResult<()> {
        if self.owned {
            return Err(VuError::InvalidOperation("already owned"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.reset_state();
        self.owned = false;
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.reset_state();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.offered_features())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        let unknown = features & !self.offered_features();
        if unknown != 0 {
            log::error!("frontend acked features we did not offer: {unknown:#x}");
            return Err(VuError::InvalidParam);
        }
        self.acked_features = features;
        // LOG_ALL on: log every write from now on; off (migration done or cancelled): stop.
        let log_all = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        self.log.set_log_all(log_all);
        self.device.vmm_event(VmmEvent::LogAll(log_all));
        if !self.protocol_negotiated() {
            for vr in self.vrings.iter_mut() {
                vr.enabled = true;
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        self.mem.set_table(ctx, files).map_err(|e| {
            log::error!("SET_MEM_TABLE: {e}");
            handler_err(e)
        })?;
        log::debug!("memory table: {} region(s)", self.mem.num_regions());
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let max = u32::from(self.device.max_queue_size());
        if num == 0 || num > max || !num.is_power_of_two() {
            log::error!("queue {index}: ring size {num} is not a power of two up to {max}");
            return Err(VuError::InvalidParam);
        }
        let vr = self.vring(index)?;
        vr.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        // The used ring is written through vm-memory and therefore logged by guest-physical
        // address, which is what log_guest_addr names; the flag needs no extra handling.
        let translate = |va: u64| {
            self.mem.vmm_va_to_gpa(va).map_err(|e| {
                log::error!("queue {index}: SET_VRING_ADDR: {e}");
                handler_err(e)
            })
        };
        let (d, u, a) = (
            translate(descriptor)?,
            translate(used)?,
            translate(available)?,
        );
        let vr = self.vring(index)?;
        if vr.started && (vr.desc, vr.used, vr.avail) != (Some(d), Some(u), Some(a)) {
            log::warn!("queue {index}: ring moved while started; applies at next start");
        }
        vr.desc = Some(d);
        vr.used = Some(u);
        vr.avail = Some(a);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        // A packed ring's base carries both sides' indices and wrap counters in 32 bits
        // (checked against the ring size when it starts); a split ring's is an avail index.
        let packed = self.acked_features & crate::packed::VIRTIO_F_RING_PACKED != 0;
        if !packed && base > u32::from(u16::MAX) {
            return Err(VuError::InvalidParam);
        }
        let vr = self.vring(index)?;
        vr.base = base;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let q = u16::try_from(index).map_err(|_| VuError::InvalidParam)?;
        let was_started = self.vring(index)?.started;
        let base = self.stop_ring(q)?;
        if was_started {
            self.device.vmm_event(VmmEvent::RingStopped(q));
        }
        Ok(VhostUserVringState::new(index, base))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let q = u16::from(index);
        self.vring(u32::from(index))?;
        let Some(file) = fd else {
            log::error!("queue {index}: polling mode (no kick fd) is not supported");
            return Err(VuError::InvalidOperation("kick fd required"));
        };
        // Before touching the ring: a refused fd leaves a running ring on its old kick.
        // Not logged here: the server logs failed requests rate-limited, and a frontend
        // can repeat this one at will.
        check_eventfd(&file, "kick")
            .map_err(|e| handler_err(format!("queue {index}: SET_VRING_KICK: {e}")))?;
        // A new kick fd for a running ring: restart it on the new fd.
        if self.vring(u32::from(index))?.started {
            self.stop_ring(q)?;
        }
        // SAFETY: checked above to be an eventfd; we take ownership of the descriptor.
        let kick = unsafe { EventFd::from_raw_fd_owned(file) };
        self.start_ring(q, kick)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let q = u16::from(index);
        self.vring(u32::from(index))?;
        // Writing a regular file "works" and a full blocking pipe stalls the worker: only
        // eventfds are accepted. A refused fd leaves the ring on its old call fd.
        if let Some(f) = &fd {
            check_eventfd(f, "call")
                .map_err(|e| handler_err(format!("queue {index}: SET_VRING_CALL: {e}")))?;
        }
        // SAFETY: checked above to be an eventfd; we take ownership.
        let call = fd.map(|f| unsafe { EventFd::from_raw_fd_owned(f) });
        let worker_call = match &call {
            Some(c) => Some(c.try_clone().map_err(handler_err)?),
            None => None,
        };
        let vr = self.vring(u32::from(index))?;
        vr.call = call;
        if vr.started {
            if let Some(w) = self.running_worker(q) {
                w.set_call(q, worker_call);
            }
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let q = u16::from(index);
        // SAFETY: the frontend passed us an eventfd; we take ownership.
        let err = fd.map(|f| unsafe { EventFd::from_raw_fd_owned(f) });
        let worker_err = match &err {
            Some(e) => Some(e.try_clone().map_err(handler_err)?),
            None => None,
        };
        let vr = self.vring(u32::from(index))?;
        vr.err = err;
        if vr.started {
            if let Some(w) = self.running_worker(q) {
                w.set_err(q, worker_err);
            }
        }
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(self.offered_protocol())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        let offered = self.offered_protocol().bits();
        if features & !offered != 0 {
            log::error!("frontend acked protocol features we did not offer: {features:#x}");
            return Err(VuError::InvalidParam);
        }
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(u64::from(self.device.num_queues()))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        let q = u16::try_from(index).map_err(|_| VuError::InvalidParam)?;
        let vr = self.vring(index)?;
        vr.enabled = enable;
        if vr.started {
            if let Some(w) = self.running_worker(q) {
                w.enable(q, enable);
            }
        }
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let mut buf = vec![0u8; size as usize];
        self.device
            .read_config(offset, &mut buf)
            .map_err(handler_err)?;
        Ok(buf)
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        self.device.write_config(offset, buf).map_err(|e| {
            log::warn!("SET_CONFIG: {e}");
            handler_err(e)
        })
    }

    fn set_backend_req_fd(&mut self, backend: Backend) {
        self.backend_req = Some(backend);
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation(
            "shared objects are not supported",
        ))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        if inflight.num_queues > self.device.num_queues()
            || inflight.queue_size > self.device.max_queue_size()
        {
            return Err(VuError::InvalidParam);
        }
        let (region, file) = InflightRegion::create(inflight.num_queues, inflight.queue_size)
            .map_err(|e| {
                log::error!("GET_INFLIGHT_FD: {e}");
                handler_err(e)
            })?;
        self.inflight = Some(region);
        let size = InflightRegion::total_size(inflight.num_queues, inflight.queue_size);
        Ok((
            VhostUserInflight::new(size, 0, inflight.num_queues, inflight.queue_size),
            file,
        ))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        let region = InflightRegion::map(
            &file,
            inflight.mmap_offset,
            inflight.mmap_size,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(|e| {
            log::error!("SET_INFLIGHT_FD: {e}");
            handler_err(e)
        })?;
        self.inflight = Some(region);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        self.mem.add_region(region, fd).map_err(|e| {
            log::error!("ADD_MEM_REG: {e}");
            handler_err(e)
        })?;
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        self.mem.remove_region(region).map_err(|e| {
            log::error!("REM_MEM_REG: {e}");
            handler_err(e)
        })
    }

    fn set_device_state_fd(
        &mut self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        fd: File,
    ) -> VuResult<Option<File>> {
        // vhost dispatches these whether or not DEVICE_STATE was negotiated.
        if self.acked_protocol & VhostUserProtocolFeatures::DEVICE_STATE.bits() == 0 {
            return Err(VuError::InvalidOperation(
                "device state transfer was not negotiated",
            ));
        }
        if !matches!(phase, VhostTransferStatePhase::STOPPED) {
            return Err(handler_err("device state: only the stopped phase exists"));
        }
        if self.vrings.iter().any(|v| v.started) {
            return Err(handler_err(
                "device state: every ring must be stopped (GET_VRING_BASE) first",
            ));
        }
        // A transfer the frontend never checked is abandoned (its thread ends with its
        // pipe).
        self.state_transfer = None;
        let transfer = match direction {
            VhostTransferStateDirection::SAVE => {
                let parts: Vec<Vec<u8>> = self
                    .workers
                    .iter()
                    .flatten()
                    .filter_map(WorkerHandle::save_state)
                    .collect();
                let state = self.device.save_state(parts).map_err(|e| {
                    log::error!("SET_DEVICE_STATE_FD: {e}");
                    handler_err(e)
                })?;
                let thread = state_thread(move || {
                    use std::io::Write;
                    let mut file = fd;
                    file.write_all(&state)
                })?;
                StateTransfer::Save(thread)
            }
            VhostTransferStateDirection::LOAD => {
                StateTransfer::Load(state_thread(move || read_state(fd))?)
            }
        };
        self.state_transfer = Some(transfer);
        Ok(None)
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        let Some(transfer) = self.state_transfer.take() else {
            return Err(handler_err("device state: no transfer to check"));
        };
        let r = match transfer {
            StateTransfer::Save(t) => joined(t.join()),
            StateTransfer::Load(t) => joined(t.join())
                .and_then(|state: Vec<u8>| self.device.load_state(&state).map_err(handler_err)),
        };
        if let Err(e) = &r {
            log::error!("CHECK_DEVICE_STATE: {e}");
        }
        r
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(VuError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VuResult<()> {
        self.log
            .set_log_base(&file, log.mmap_offset, log.mmap_size)
            .map_err(|e| {
                // The frontend waits for the log message back and the protocol has no error
                // reply for it: without one it would wait forever. Closing the connection is
                // the error it can see (libvhost-user does the same).
                log::error!("SET_LOG_BASE: {e}; closing the connection");
                self.hang_up = true;
                handler_err(e)
            })
    }
}

/// Owning conversion from a `File` holding an eventfd.
trait EventFdFromFile {
    /// # Safety
    /// `file` must be an eventfd.
    unsafe fn from_raw_fd_owned(file: File) -> EventFd;
}

impl EventFdFromFile for EventFd {
    unsafe fn from_raw_fd_owned(file: File) -> EventFd {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: we own the descriptor (into_raw_fd); the caller promises it is an eventfd.
        unsafe { EventFd::from_raw_fd(file.into_raw_fd()) }
    }
}
