//! The migration job, QEMU's job model: an id, states created → running → ready →
//! concluded (with success or an error), an event on every change, a speed that can be
//! changed while it runs, cancel and complete.
//!
//! Running: connect, handshake, bulk pass (full syncs), then dirty passes until what is
//! left fits `downtime_limit` at the measured rate: the job is *ready*. It keeps doing
//! dirty passes until `complete`: then it holds the guest's new requests at the gate,
//! waits for those in flight, does the last pass, and completes the sync. After that
//! hand-over the source holds every request (it serves no more writes to the image the
//! destination now owns); a failed or cancelled job gives its blocks back and opens the
//! gate again.
//!
//! In write-blocking mode, from the end of the first dirty pass on, the job mirrors in
//! rounds (see [`crate::mirror`]): the guest's writes complete only once their blocks
//! are on the destination, so the job converges whatever the guest's write rate, and
//! the last pass at the hand-over is at most one round's worth.
//!
//! The hand-over happens on `complete`, or when the VMM migrates the VM: LOG_ALL on and
//! every ring stopped (the guest paused), once the job is ready.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vhost_user_device::control::Events;
use vhost_user_device::sandbox::{self, ThreadKind};

use crate::shared::{BlkShared, Revoke};

use super::source::{Pacer, Source};
use super::stream::Mode;
use super::transport::{self, Security, Uri};
use super::MigrationError;

/// QEMU's job states (those this job goes through).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobStatus {
    /// Made, not started.
    Created,
    /// Copying.
    Running,
    /// What is left fits the downtime limit: may complete.
    Ready,
    /// Over: see `error`.
    Concluded,
}

impl JobStatus {
    fn name(self) -> &'static str {
        match self {
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Ready => "ready",
            JobStatus::Concluded => "concluded",
        }
    }
}

/// How writes are treated once the job is ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMode {
    /// Dirty passes go on in the background.
    Background,
    /// Every guest write is mirrored before it completes (active mirroring).
    WriteBlocking,
}

/// What `migrate` asks for.
#[derive(Clone, Debug)]
pub struct JobParams {
    /// Where the destination listens.
    pub uri: Uri,
    /// Send only what changed since the shared checkpoint.
    pub incremental: bool,
    /// Background or write-blocking.
    pub copy_mode: CopyMode,
    /// Bytes per second (0: unlimited).
    pub max_bandwidth: u64,
}

/// Progress and result of one job.
#[derive(Clone, Debug)]
struct Info {
    id: String,
    status: JobStatus,
    phase: &'static str,
    error: Option<String>,
    mode: Mode,
    total: u64,
    started: Instant,
    ready_at: Option<Instant>,
    downtime: Option<Duration>,
    passes: u32,
    last_pass_bytes: u64,
    dirty_rate: f64,
    throughput: f64,
    data_bytes: u64,
    zero_bytes: u64,
    wire_bytes: u64,
    copy_mode: CopyMode,
    mirror_rounds: u64,
}

struct Job {
    info: Mutex<Info>,
    cancel: Arc<AtomicBool>,
    /// Shuts the job's connection down on cancel (a job blocked on a destination that
    /// stopped answering wakes at once, not at its read timeout).
    canceller: Mutex<Option<transport::Canceller>>,
    complete: AtomicBool,
    /// Set and signalled by `complete` and `cancel`: the job's idle wait between passes
    /// ends at once (a hand-over is not delayed by up to an idle pause).
    nudge: (Mutex<bool>, Condvar),
    pacer: Arc<Pacer>,
}

impl Job {
    /// Waits `timeout`, or less if `complete` or `cancel` is asked for meanwhile.
    fn idle(&self, timeout: Duration) {
        let woken = self.nudge.0.lock().unwrap_or_else(|e| e.into_inner());
        let (mut woken, _) = self
            .nudge
            .1
            .wait_timeout_while(woken, timeout, |w| !*w)
            .unwrap_or_else(|e| e.into_inner());
        *woken = false;
    }

    fn nudge(&self) {
        *self.nudge.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.nudge.1.notify_all();
    }
}

/// The migrations of one device: at most one running at a time.
pub struct Migrations {
    shared: Arc<BlkShared>,
    events: Mutex<Option<Events>>,
    current: Mutex<Option<Arc<Job>>>,
    next_id: AtomicU64,
    security: Security,
    downtime_limit: Duration,
}

/// Why a job could not start.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// One is running.
    #[error("migration job {0} is still running: cancel or complete it first")]
    Busy(String),
    /// Not possible with this configuration.
    #[error("{0}")]
    Refused(String),
}

impl Migrations {
    /// The migration jobs of the device sharing `shared`. `security` says how TCP streams
    /// are protected; `downtime_limit` is the switch-over time the job aims for.
    pub fn new(shared: Arc<BlkShared>, security: Security, downtime_limit: Duration) -> Self {
        Self {
            shared,
            events: Mutex::new(None),
            current: Mutex::new(None),
            next_id: AtomicU64::new(0),
            security,
            downtime_limit,
        }
    }

    /// Where job events go.
    pub fn set_events(&self, events: Events) {
        *self.events.lock().unwrap_or_else(|e| e.into_inner()) = Some(events);
    }

    /// Starts a job; returns its id.
    pub fn start(self: &Arc<Self>, params: JobParams) -> Result<String, JobError> {
        transport::check_policy(&params.uri, &self.security)
            .map_err(|e| JobError::Refused(e.to_string()))?;
        if self.shared.handed_over.load(Ordering::Acquire) {
            return Err(JobError::Refused(
                "this backend handed the disk over to its destination and no longer owns it".into(),
            ));
        }
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(j) = cur.as_ref() {
            let info = j.info.lock().unwrap_or_else(|e| e.into_inner());
            if info.status != JobStatus::Concluded {
                return Err(JobError::Busy(info.id.clone()));
            }
        }
        let id = format!("migrate{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let job = Arc::new(Job {
            info: Mutex::new(Info {
                id: id.clone(),
                status: JobStatus::Created,
                phase: "connecting",
                error: None,
                mode: if params.incremental {
                    Mode::Incremental
                } else {
                    Mode::Full
                },
                total: 0,
                started: Instant::now(),
                ready_at: None,
                downtime: None,
                passes: 0,
                last_pass_bytes: 0,
                dirty_rate: 0.0,
                throughput: 0.0,
                data_bytes: 0,
                zero_bytes: 0,
                wire_bytes: 0,
                copy_mode: params.copy_mode,
                mirror_rounds: 0,
            }),
            cancel: Arc::new(AtomicBool::new(false)),
            canceller: Mutex::new(None),
            complete: AtomicBool::new(false),
            nudge: (Mutex::new(false), Condvar::new()),
            pacer: Arc::new(Pacer::new(params.max_bandwidth)),
        });
        *cur = Some(job.clone());
        drop(cur);
        self.emit(&job);
        let me = self.clone();
        let j2 = job.clone();
        std::thread::Builder::new()
            .name("migrate".into())
            .spawn(move || {
                sandbox::enter_or_exit(ThreadKind::Job);
                me.run(&j2, params)
            })
            .map_err(|e| JobError::Refused(format!("cannot start the job thread: {e}")))?;
        Ok(id)
    }

    /// The current (or last) job as `query-migrate` shows it; None before the first.
    pub fn query(&self) -> Option<Value> {
        let cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let job = cur.as_ref()?;
        let info = job.info.lock().unwrap_or_else(|e| e.into_inner());
        let sent = job.pacer.sent();
        let remaining = match info.status {
            JobStatus::Concluded => 0,
            _ if info.phase == "bulk" => info.total.saturating_sub(sent),
            _ => self.shared.dirty.dirty_bytes(),
        };
        let expected_downtime_ms = if info.throughput > 0.0 {
            (self.shared.dirty.dirty_bytes() as f64 / info.throughput * 1000.0) as u64
        } else {
            0
        };
        let eta = if info.throughput > 0.0 {
            (remaining as f64 / info.throughput).ceil() as u64
        } else {
            0
        };
        let mut v = json!({
            "id": info.id,
            "status": info.status.name(),
            "phase": info.phase,
            "mode": match info.mode { Mode::Full => "full", Mode::Incremental => "incremental" },
            "bytes": {
                "total": info.total,
                "sent": sent,
                "remaining": remaining,
                "data": info.data_bytes,
                "zero": info.zero_bytes,
                "wire": info.wire_bytes,
            },
            "passes": info.passes,
            "copy-mode": match info.copy_mode {
                CopyMode::Background => "background",
                CopyMode::WriteBlocking => "write-blocking",
            },
            "mirror-rounds": info.mirror_rounds,
            "dirty-rate": info.dirty_rate as u64,
            "throughput": info.throughput as u64,
            "max-bandwidth": job.pacer.rate(),
            "expected-downtime-ms": expected_downtime_ms,
            "eta-seconds": eta,
            "elapsed-ms": info.started.elapsed().as_millis() as u64,
        });
        if let Some(d) = info.downtime {
            v["downtime-ms"] = json!(d.as_secs_f64() * 1000.0);
        }
        if let Some(e) = &info.error {
            v["error"] = json!(e);
        }
        Some(v)
    }

    /// Changes the bandwidth limit of the running job.
    pub fn set_speed(&self, rate: u64) -> Result<(), JobError> {
        let job = self.running()?;
        job.pacer.set_rate(rate);
        Ok(())
    }

    /// Cancels the running job (its blocks go back to the dirty bitmap).
    pub fn cancel(&self) -> Result<(), JobError> {
        let job = self.running()?;
        if job.info.lock().unwrap_or_else(|e| e.into_inner()).phase == "completing" {
            // The destination may already have the disk: cutting the stream now could
            // leave both ends serving it.
            return Err(JobError::Refused(
                "the job is handing the disk over; it can no longer be cancelled".into(),
            ));
        }
        job.cancel.store(true, Ordering::Release);
        job.nudge();
        if let Some(c) = job
            .canceller
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            c.cancel();
        }
        Ok(())
    }

    /// Hands over: only a ready job.
    pub fn complete(&self) -> Result<(), JobError> {
        let job = self.running()?;
        let status = job.info.lock().unwrap_or_else(|e| e.into_inner()).status;
        if status != JobStatus::Ready {
            return Err(JobError::Refused(format!(
                "the job is {}, not ready: it can complete once what is left fits the \
                 downtime limit",
                status.name()
            )));
        }
        job.complete.store(true, Ordering::Release);
        job.nudge();
        Ok(())
    }

    fn running(&self) -> Result<Arc<Job>, JobError> {
        let cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        match cur.as_ref() {
            Some(j)
                if j.info.lock().unwrap_or_else(|e| e.into_inner()).status
                    != JobStatus::Concluded =>
            {
                Ok(j.clone())
            }
            _ => Err(JobError::Refused("no migration job is running".into())),
        }
    }

    fn emit(&self, job: &Job) {
        let (id, status, error) = {
            let i = job.info.lock().unwrap_or_else(|e| e.into_inner());
            (i.id.clone(), i.status.name(), i.error.clone())
        };
        if let Some(ev) = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let mut data = json!({"id": id, "status": status});
            if let Some(e) = error {
                data["error"] = json!(e);
            }
            ev.emit("JOB_STATUS_CHANGE", data);
        }
    }

    fn set(&self, job: &Job, f: impl FnOnce(&mut Info)) {
        let before = {
            let mut i = job.info.lock().unwrap_or_else(|e| e.into_inner());
            let before = i.status;
            f(&mut i);
            before != i.status
        };
        if before {
            self.emit(job);
        }
    }

    fn run(&self, job: &Job, params: JobParams) {
        self.set(job, |i| i.status = JobStatus::Running);
        let result = self.copy(job, &params);
        let gate = &self.shared.gate;
        match result {
            Ok(()) => {
                log::info!(
                    "migration to {} complete: this backend no longer serves the disk",
                    params.uri
                );
                self.set(job, |i| {
                    i.phase = "done";
                    i.status = JobStatus::Concluded;
                });
            }
            Err(e) => {
                // The source keeps the disk: serve again.
                gate.open();
                // A cancel shuts the connection down: whatever broke, it was the cancel.
                let e = if job.cancel.load(Ordering::Acquire) {
                    MigrationError::Cancelled
                } else {
                    e
                };
                log::warn!("migration to {} failed: {e}", params.uri);
                let msg = e.to_string();
                self.set(job, |i| {
                    i.error = Some(msg);
                    i.status = JobStatus::Concluded;
                });
            }
        }
    }

    fn copy(&self, job: &Job, params: &JobParams) -> Result<(), MigrationError> {
        let conn = transport::connect(&params.uri, &self.security).map_err(|e| match e {
            transport::TransportError::Io { source, .. } => MigrationError::Io(source),
            other => MigrationError::Protocol(other.to_string()),
        })?;
        match conn.canceller() {
            Ok(c) => *job.canceller.lock().unwrap_or_else(|e| e.into_inner()) = Some(c),
            Err(e) => log::warn!("migration: cancel will wait for the stream's timeout: {e}"),
        }
        if job.cancel.load(Ordering::Acquire) {
            return Err(MigrationError::Cancelled);
        }
        let mode = job.info.lock().unwrap_or_else(|e| e.into_inner()).mode;
        let mut src = Source::start(&self.shared, conn, mode)?;
        src.set_pacer(job.pacer.clone(), job.cancel.clone());
        let size = self.shared.disk.size;
        if src.is_full() {
            self.set(job, |i| {
                i.mode = Mode::Full;
                i.total = size;
                i.phase = "bulk";
            });
            let t = Instant::now();
            src.bulk_pass()?;
            let secs = t.elapsed().as_secs_f64().max(1e-6);
            self.set(job, |i| {
                i.throughput = size as f64 / secs;
                i.passes = 1;
            });
        } else {
            self.set(job, |i| i.total = self.shared.dirty.dirty_bytes());
        }
        self.set(job, |i| i.phase = "dirty");
        // Releases the writes held for mirroring however this ends (after a hand-over
        // their blocks went in the last pass; after a failure they are dirty here).
        let mirror = MirrorGuard(&self.shared);
        let mut by_vmm = false;
        loop {
            if job.cancel.load(Ordering::Acquire) {
                return Err(MigrationError::Cancelled);
            }
            let t = Instant::now();
            let bytes = if mirror.is_active() {
                let round = self.shared.mirror.begin_round();
                let bytes = src.mirror_round()?;
                self.shared.mirror.mirrored(round);
                // The workers complete the writes that waited for this round.
                self.shared.gate.wake();
                bytes
            } else {
                src.dirty_pass()?
            };
            if params.copy_mode == CopyMode::WriteBlocking && !mirror.is_active() {
                // The first dirty pass took what the bulk pass left behind; from now on
                // writes wait for their round.
                log::info!(
                    "migration to {}: mirroring every write from now on",
                    params.uri
                );
                self.shared.mirror.start();
                self.set(job, |i| i.phase = "mirror");
            }
            let secs = t.elapsed().as_secs_f64().max(1e-6);
            let stats = src.stats;
            let left = src.dirty_bytes();
            let throughput = {
                let i = job.info.lock().unwrap_or_else(|e| e.into_inner());
                if bytes > (1 << 20) {
                    bytes as f64 / secs
                } else {
                    i.throughput
                }
            };
            let fits =
                throughput > 0.0 && (left as f64 / throughput) <= self.downtime_limit.as_secs_f64();
            self.set(job, |i| {
                i.passes = stats.passes;
                i.last_pass_bytes = bytes;
                i.dirty_rate = left as f64 / secs;
                i.throughput = throughput;
                i.data_bytes = stats.data_bytes;
                i.zero_bytes = stats.zero_bytes;
                i.wire_bytes = stats.wire_bytes;
                i.mirror_rounds = stats.mirror_rounds;
                if (fits || left == 0) && i.status == JobStatus::Running {
                    i.status = JobStatus::Ready;
                    i.ready_at = Some(Instant::now());
                }
            });
            if job.complete.load(Ordering::Acquire) {
                break;
            }
            // The VMM is migrating the VM and paused it: hand over now, without being
            // asked (a plain pause has no LOG_ALL; a pause before ready waits for ready).
            let switching = self
                .shared
                .vmm
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .switching_over();
            let ready =
                job.info.lock().unwrap_or_else(|e| e.into_inner()).status == JobStatus::Ready;
            if switching && ready {
                log::info!("the VMM paused the guest for its migration: handing the disk over");
                by_vmm = true;
                break;
            }
            if mirror.is_active() {
                // The next round as soon as a write waits for it (or to look at the
                // VMM and the job's commands again).
                self.shared
                    .mirror
                    .wait_for_writes(Duration::from_millis(50));
            } else if left < (1 << 20) {
                // Little to do: do not spin on an idle disk.
                job.idle(Duration::from_millis(50));
            }
        }
        // Hand-over: hold new requests, let those in flight finish, last pass, Complete.
        self.set(job, |i| i.phase = "completing");
        let t = Instant::now();
        // Requests the I/O throttle holds were taken from their rings and not started:
        // the last pass must see them done. The limits are lifted for the hand-over (put
        // back when it ends, however), so they start now.
        let _unthrottled = Unthrottled::lift(&self.shared);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.shared.stats.parked.load(Ordering::Acquire) > 0 {
            if Instant::now() > deadline {
                return Err(MigrationError::Protocol(
                    "throttled requests did not start within 30 s: not handing over".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.shared.gate.close();
        let deadline = Instant::now() + Duration::from_secs(30);
        // No worker taking requests (a pass), nothing parked, then nothing in flight: the
        // image is final.
        loop {
            // `parked` before `in_flight`: a drain starts a parked request without a pass
            // (the ring is stopping), counting it in flight before it leaves `parked`
            // (AcqRel), so one that left `parked` after this load is seen in flight by
            // the next. In the other order it could start between the two loads and be
            // in neither.
            if self.shared.stats.parked.load(Ordering::Acquire) > 0 {
                // Limits set again meanwhile (set-io-throttle) parked one: never hand
                // over with a request the last pass cannot see.
                return Err(MigrationError::Protocol(
                    "a request was throttled during the hand-over: not handing over".into(),
                ));
            }
            if self.shared.gate.is_quiet() && self.shared.in_flight() == 0 {
                break;
            }
            if Instant::now() > deadline {
                return Err(MigrationError::Protocol(
                    "requests still in flight after 30 s: not handing over".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let (_, stats, lease) = src.complete_with_lease()?;
        let downtime = t.elapsed();
        *self.shared.revoke.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Revoke(Box::new(move |why: &str| lease.revoke(why))));
        self.shared.handed_over.store(true, Ordering::Release);
        drop(mirror);
        // A VMM that resumed the guest here while we handed over cancelled its
        // migration: the VM runs on this side, so this side serves it (a restart after
        // this point is caught by the device's RingStarted).
        if by_vmm {
            let running = self
                .shared
                .vmm
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .started
                != 0;
            if running && self.shared.handed_over.load(Ordering::Acquire) {
                log::warn!("the guest resumed during the hand-over: serving the disk again");
                self.shared
                    .take_back("the guest resumed on the source during the hand-over");
            }
        }
        self.set(job, |i| {
            i.downtime = Some(downtime);
            i.data_bytes = stats.data_bytes;
            i.zero_bytes = stats.zero_bytes;
            i.wire_bytes = stats.wire_bytes;
            i.passes = stats.passes;
            i.mirror_rounds = stats.mirror_rounds;
        });
        Ok(())
    }
}

/// The I/O throttle off while it lives (a hand-over starts every parked request); on
/// drop the limits in force decide again.
struct Unthrottled<'a>(&'a BlkShared);

impl<'a> Unthrottled<'a> {
    fn lift(shared: &'a BlkShared) -> Self {
        shared.throttle_on.store(false, Ordering::SeqCst);
        // The workers look at their parked requests again (and start them).
        shared.gate.wake();
        Self(shared)
    }
}

impl Drop for Unthrottled<'_> {
    fn drop(&mut self) {
        let on = !self.0.io_limits().unlimited();
        self.0.throttle_on.store(on, Ordering::SeqCst);
    }
}

/// Mirroring on the device while it lives: dropping it stops mirroring and wakes the
/// workers, which complete every write they held.
struct MirrorGuard<'a>(&'a BlkShared);

impl MirrorGuard<'_> {
    fn is_active(&self) -> bool {
        self.0.mirror.is_active()
    }
}

impl Drop for MirrorGuard<'_> {
    fn drop(&mut self) {
        if self.0.mirror.is_active() {
            self.0.mirror.stop();
            self.0.gate.wake();
        }
    }
}
