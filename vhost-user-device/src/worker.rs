//! Worker threads: each owns the started rings of one queue group and waits on their kick
//! fds, the device's own fds and a command channel from the protocol thread.

use std::io;
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::QueueWorker;
use crate::rate_limit::RateLimitedLog;
use crate::ring::{Ring, Rings};
use crate::sandbox::{self, ThreadKind};

const TOKEN_WAKE: u64 = 0;
/// A drain (ring stop) still waiting after this long is logged, and again every as long.
const DRAIN_REPORT_AFTER: Duration = Duration::from_secs(10);
/// Longest pause between retries of a failing wait for completions during a drain.
const DRAIN_RETRY_MAX: Duration = Duration::from_millis(100);
const TOKEN_KICK_BASE: u64 = 1;
const TOKEN_DEVICE_BASE: u64 = 1 << 32;
/// The worker's own eventfd, written to come back to rings whose round was spent.
const TOKEN_RESUME: u64 = u64::MAX;

pub(crate) enum Command {
    Start(Box<Ring>),
    /// The reply comes once the worker applied it (see [`WorkerHandle::enable`]).
    Enable(u16, bool, Sender<()>),
    SetCall(u16, Option<EventFd>),
    SetErr(u16, Option<EventFd>),
    Stop(u16, Sender<Option<Box<Ring>>>),
    SaveState(Sender<Option<Vec<u8>>>),
}

/// The protocol thread's handle on a worker thread.
pub(crate) struct WorkerHandle {
    tx: Sender<Command>,
    wake: EventFd,
    exit: Arc<AtomicBool>,
    failed: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    pub(crate) fn spawn(
        name: String,
        worker: Box<dyn QueueWorker>,
        queues: Vec<u16>,
    ) -> io::Result<Self> {
        let (tx, rx) = unbounded();
        let wake = EventFd::new(EFD_NONBLOCK)?;
        let resume = EventFd::new(EFD_NONBLOCK)?;
        let exit = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicBool::new(false));
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_WAKE),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            resume.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_RESUME),
        )?;
        for (i, fd) in worker.event_fds().into_iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, TOKEN_DEVICE_BASE + i as u64),
            )?;
        }
        let mut state = WorkerState {
            poll: worker.poll_duration().filter(|d| !d.is_zero()),
            worker,
            rings: Rings::new(queues),
            epoll,
            rx,
            wake: wake.try_clone()?,
            resume,
            exit: exit.clone(),
        };
        let failed_flag = failed.clone();
        let thread_name = name.clone();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            if let Err(e) = sandbox::enter(ThreadKind::Worker) {
                log::error!("worker {thread_name}: {e}");
                failed_flag.store(true, Ordering::SeqCst);
                return;
            }
            match catch_unwind(AssertUnwindSafe(|| state.run())) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    log::error!("worker {thread_name} failed: {e}");
                    failed_flag.store(true, Ordering::SeqCst);
                }
                Err(_) => {
                    log::error!("worker {thread_name} panicked");
                    failed_flag.store(true, Ordering::SeqCst);
                }
            }
        })?;
        Ok(Self {
            tx,
            wake,
            exit,
            failed,
            thread: Some(thread),
        })
    }

    fn send(&self, cmd: Command) -> bool {
        if self.tx.send(cmd).is_err() {
            return false;
        }
        self.wake.write(1).is_ok()
    }

    pub(crate) fn start(&self, ring: Ring) -> bool {
        self.send(Command::Start(Box::new(ring)))
    }

    /// Enables or disables a started ring, and returns once the worker applied it: the
    /// frontend's SET_VRING_ENABLE is acknowledged only then, so a chain it makes
    /// available after a disable is never taken (the worker handles commands between
    /// events, never in the middle of processing a ring).
    pub(crate) fn enable(&self, queue: u16, on: bool) -> bool {
        let (tx, rx) = bounded(1);
        if !self.send(Command::Enable(queue, on, tx)) {
            return false;
        }
        rx.recv().is_ok()
    }

    pub(crate) fn set_call(&self, queue: u16, call: Option<EventFd>) -> bool {
        self.send(Command::SetCall(queue, call))
    }

    pub(crate) fn set_err(&self, queue: u16, err: Option<EventFd>) -> bool {
        self.send(Command::SetErr(queue, err))
    }

    /// Stops a ring after its in-flight requests completed, and hands it back.
    pub(crate) fn stop(&self, queue: u16) -> Option<Box<Ring>> {
        let (tx, rx) = bounded(1);
        if !self.send(Command::Stop(queue, tx)) {
            return None;
        }
        rx.recv().ok().flatten()
    }

    /// The worker's part of the device state (see [`QueueWorker::save_state`]).
    pub(crate) fn save_state(&self) -> Option<Vec<u8>> {
        let (tx, rx) = bounded(1);
        if !self.send(Command::SaveState(tx)) {
            return None;
        }
        rx.recv().ok().flatten()
    }

    pub(crate) fn has_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Stops every ring (draining them) and joins the thread. Returns false if the worker
    /// failed at any point.
    pub(crate) fn shutdown(mut self) -> bool {
        self.exit.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        !self.has_failed()
    }
}

struct WorkerState {
    /// Keep polling this long after the last event (see `QueueWorker::poll_duration`).
    poll: Option<Duration>,
    worker: Box<dyn QueueWorker>,
    rings: Rings,
    epoll: Epoll,
    rx: Receiver<Command>,
    wake: EventFd,
    /// Written when a ring's round was spent ([`Ring::round_spent`]): the worker comes
    /// back to it after the events already waiting, without a kick.
    resume: EventFd,
    exit: Arc<AtomicBool>,
}

/// Has `worker` process what the guest made available on ring `queue`, in a new round.
fn process(worker: &mut dyn QueueWorker, queue: u16, rings: &mut Rings) {
    let Some(ring) = rings.get_mut(queue) else {
        return;
    };
    ring.begin_round();
    worker.process_queue(queue, rings);
}

impl WorkerState {
    fn run(&mut self) -> io::Result<()> {
        let mut events = vec![EpollEvent::default(); 32];
        let mut last_event: Option<Instant> = None;
        loop {
            // Poll (timeout 0) while the last event is recent enough, else sleep.
            let polling = matches!((self.poll, last_event), (Some(p), Some(t)) if t.elapsed() < p);
            let n = match self.epoll.wait(if polling { 0 } else { -1 }, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                if !polling {
                    last_event = None;
                }
                std::hint::spin_loop();
                continue;
            }
            if self.poll.is_some() {
                last_event = Some(Instant::now());
            }
            for ev in &events[..n] {
                let token = ev.data();
                if token == TOKEN_WAKE {
                    let _ = self.wake.read();
                    while let Ok(cmd) = self.rx.try_recv() {
                        self.command(cmd)?;
                    }
                    if self.exit.load(Ordering::SeqCst) {
                        self.stop_all();
                        return Ok(());
                    }
                } else if token == TOKEN_RESUME {
                    let _ = self.resume.read();
                    self.resume_spent();
                } else if token >= TOKEN_DEVICE_BASE {
                    let index = (token - TOKEN_DEVICE_BASE) as usize;
                    self.worker.handle_event(index, &mut self.rings);
                } else {
                    let slot = (token - TOKEN_KICK_BASE) as usize;
                    self.kicked(slot);
                }
            }
            self.schedule_resume();
        }
    }

    /// Rings whose round is spent but which may be processed: the ones to come back to.
    fn spent(ring: &Ring) -> bool {
        ring.round_spent() && ring.is_enabled() && !ring.is_broken()
    }

    /// After a batch of events: if a ring's round was spent (it skipped its share of
    /// malformed chains with more left), come back to it through `resume`. Not at once:
    /// epoll reports `resume` after the fds already ready, so the other rings, the
    /// device's completions and the protocol thread's commands (a GET_VRING_BASE waiting
    /// for its reply) get their turn first. And not through a kick, which the guest need
    /// not send again: the chains are already on the ring.
    fn schedule_resume(&mut self) {
        if self
            .rings
            .slots
            .iter()
            .any(|(_, r)| r.as_ref().is_some_and(Self::spent))
        {
            // Fails only when the counter is about to overflow (EAGAIN): it is then
            // readable anyway, which is all we need.
            let _ = self.resume.write(1);
        }
    }

    /// Starts a new round on each ring whose round was spent.
    fn resume_spent(&mut self) {
        let queues: Vec<u16> = self.rings.slots.iter().map(|(q, _)| *q).collect();
        for q in queues {
            // Looked at right before its turn: processing an earlier ring may have taken
            // from this one (a device reaching its other rings).
            if self.rings.get_mut(q).is_some_and(|r| Self::spent(r)) {
                process(self.worker.as_mut(), q, &mut self.rings);
            }
        }
    }

    fn kicked(&mut self, slot: usize) {
        let Some((queue, Some(ring))) = self.rings.slots.get_mut(slot) else {
            return;
        };
        // The kick fd may be blocking; epoll said it is readable, so this does not block.
        // Read it even for a parked ring, or epoll would report it readable for ever.
        let _ = ring.kick.read();
        if ring.is_enabled() && !ring.is_broken() {
            let queue = *queue;
            process(self.worker.as_mut(), queue, &mut self.rings);
        }
    }

    fn command(&mut self, cmd: Command) -> io::Result<()> {
        match cmd {
            Command::Start(ring) => {
                let Some(slot) = self.rings.slot_of(ring.index()) else {
                    log::error!("queue {} does not belong to this worker", ring.index());
                    return Ok(());
                };
                self.epoll.ctl(
                    ControlOperation::Add,
                    ring.kick.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, TOKEN_KICK_BASE + slot as u64),
                )?;
                let queue = ring.index();
                let ring = self.rings.slots[slot].1.insert(*ring);
                // Completions an earlier backend (or session) published without an
                // interrupt the driver got.
                ring.resync_call();
                // Chains made available before the kick fd arrived, and resubmissions.
                if ring.is_enabled() && !ring.is_broken() {
                    process(self.worker.as_mut(), queue, &mut self.rings);
                }
            }
            Command::Enable(queue, on, reply) => {
                if let Some(ring) = self.rings.get_mut(queue) {
                    ring.enabled = on;
                    // Applied: the frontend may have its answer (before the processing,
                    // which it does not wait for).
                    let _ = reply.send(());
                    if on && !ring.is_broken() {
                        process(self.worker.as_mut(), queue, &mut self.rings);
                    }
                }
            }
            Command::SetCall(queue, call) => {
                if let Some(ring) = self.rings.get_mut(queue) {
                    ring.set_call(call);
                }
            }
            Command::SetErr(queue, err) => {
                if let Some(ring) = self.rings.get_mut(queue) {
                    ring.set_err(err);
                }
            }
            Command::Stop(queue, reply) => {
                let ring = self.stop_ring(queue);
                let _ = reply.send(ring);
            }
            Command::SaveState(reply) => {
                let _ = reply.send(self.worker.save_state());
            }
        }
        Ok(())
    }

    fn stop_ring(&mut self, queue: u16) -> Option<Box<Ring>> {
        let slot = self.rings.slot_of(queue)?;
        let ring = self.rings.slots[slot].1.as_ref()?;
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            ring.kick.as_raw_fd(),
            EpollEvent::default(),
        );
        self.drain(queue);
        self.rings.slots[slot].1.take().map(Box::new)
    }

    /// Waits until every request taken from `queue` is on its used ring.
    ///
    /// GET_VRING_BASE must only be answered then: the frontend reads the used index right
    /// after, restarts or migrates the ring from it, and may unmap the memory. The
    /// vhost-user spec has GET_VRING_BASE drain in-flight I/O (only the optional
    /// GET_VRING_BASE_INFLIGHT feature, not offered here, lets a back-end suspend it into
    /// the inflight region instead). A request answered later would be lost to the
    /// frontend (no used entry it looks at, no dirty-log mark it reads), and when
    /// migrating, a write could land on the disk after the destination took it over.
    ///
    /// So the drain has no deadline and a failing wait does not end it: it is retried
    /// after a short pause (growing to DRAIN_RETRY_MAX). QEMU waits for its own block
    /// layer's drain the same way. A drain that takes long is logged, so a stuck disk
    /// shows up in the log rather than only as a frontend waiting for its reply.
    fn drain(&mut self, queue: u16) {
        let started = Instant::now();
        let mut next_report = DRAIN_REPORT_AFTER;
        let mut pause = Duration::from_millis(1);
        let mut failures = RateLimitedLog::new();
        loop {
            let n = self.worker.in_flight(queue);
            if n == 0 {
                return;
            }
            if started.elapsed() >= next_report {
                log::warn!(
                    "queue {queue}: stopping the ring waits for {n} in-flight request(s) \
                     ({}s so far)",
                    started.elapsed().as_secs()
                );
                next_report += DRAIN_REPORT_AFTER;
            }
            match self.worker.wait_completions(&mut self.rings) {
                Ok(()) => pause = Duration::from_millis(1),
                Err(e) => {
                    failures.warn(|| {
                        format!(
                            "queue {queue}: waiting for {n} in-flight request(s) failed: {e}; \
                             retrying (the ring stops only once they complete)"
                        )
                    });
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(DRAIN_RETRY_MAX);
                }
            }
        }
    }

    fn stop_all(&mut self) {
        let queues: Vec<u16> = self
            .rings
            .slots
            .iter()
            .filter(|(_, r)| r.is_some())
            .map(|(q, _)| *q)
            .collect();
        for q in queues {
            self.stop_ring(q);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A started 16-entry ring in 64 KiB of guest memory.
    fn ring() -> Ring {
        crate::ring::tests::ring_of(16)
    }

    /// A device with one request in flight whose first wait for completions fails (as an
    /// io_uring_enter can), and which completes once released.
    struct FailingWait {
        in_flight: Arc<AtomicUsize>,
        release: Arc<AtomicBool>,
        waits: usize,
    }

    impl QueueWorker for FailingWait {
        fn process_queue(&mut self, _queue: u16, _rings: &mut Rings) {}

        fn in_flight(&self, _queue: u16) -> usize {
            self.in_flight.load(Ordering::SeqCst)
        }

        fn wait_completions(&mut self, _rings: &mut Rings) -> io::Result<()> {
            self.waits += 1;
            if self.waits == 1 {
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
            if self.release.load(Ordering::SeqCst) {
                self.in_flight.store(0, Ordering::SeqCst);
            } else {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        }
    }

    /// GET_VRING_BASE's drain must not end while a request is in flight, even when a wait
    /// for completions fails: the frontend reads the used index right after, and a request
    /// completing later would be lost to it.
    #[test]
    fn a_failed_wait_does_not_end_the_drain_with_requests_in_flight() {
        let in_flight = Arc::new(AtomicUsize::new(1));
        let release = Arc::new(AtomicBool::new(false));
        let worker = FailingWait {
            in_flight: in_flight.clone(),
            release: release.clone(),
            waits: 0,
        };
        let handle = WorkerHandle::spawn("test-q0".into(), Box::new(worker), vec![0]).unwrap();
        assert!(handle.start(ring()));
        let stopped = AtomicBool::new(false);
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                let ring = handle.stop(0);
                stopped.store(true, Ordering::SeqCst);
                ring
            });
            std::thread::sleep(Duration::from_millis(300));
            let early = stopped.load(Ordering::SeqCst);
            let left = in_flight.load(Ordering::SeqCst);
            release.store(true, Ordering::SeqCst);
            let ring = t.join().unwrap();
            assert!(
                !early,
                "the ring was handed back (GET_VRING_BASE answered) with {left} request(s) \
                 in flight"
            );
            assert!(ring.is_some(), "the ring comes back once drained");
        });
        assert_eq!(in_flight.load(Ordering::SeqCst), 0);
        assert!(handle.shutdown());
    }

    /// A device whose queue 0 carries requests and queue 1 the buffers for their replies
    /// (the shape of virtio-console's control queues): a request completes with a reply
    /// taken from the other ring, in the same call.
    struct Replier;

    impl QueueWorker for Replier {
        fn process_queue(&mut self, queue: u16, rings: &mut Rings) {
            if queue != 0 {
                return;
            }
            let mut chain = crate::Chain::default();
            loop {
                let Some(requests) = rings.get_mut(0) else {
                    return;
                };
                let mem = requests.memory();
                if !requests.pop(&mem, &mut chain) {
                    return;
                }
                requests.add_used(&mem, chain.head, 0);
                requests.notify(&mem);
                let Some(replies) = rings.get_mut(1) else {
                    return;
                };
                let mem = replies.memory();
                if replies.pop(&mem, &mut chain) {
                    replies.add_used(&mem, chain.head, 1);
                    replies.notify(&mem);
                }
            }
        }
    }

    /// A kick on one ring lets the worker act on another of its group at once: no
    /// detour through an eventfd of its own to get at the other ring.
    #[test]
    fn a_kicked_queue_reaches_the_other_rings_of_its_group() {
        use crate::ring::tests::{desc, publish, ring_of_queue, used_idx};
        let requests = ring_of_queue(0, 16);
        let replies = ring_of_queue(1, 16);
        let (req_mem, reply_mem) = (requests.memory(), replies.memory());
        let kick = requests.kick.try_clone().unwrap();
        desc(&reply_mem, 0, 0x8000, 16);
        publish(&reply_mem, 1);
        let handle =
            WorkerHandle::spawn("test-replier".into(), Box::new(Replier), vec![0, 1]).unwrap();
        assert!(handle.start(replies));
        assert!(handle.start(requests));
        desc(&req_mem, 0, 0x8000, 16);
        publish(&req_mem, 1);
        kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while used_idx(&reply_mem) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(used_idx(&req_mem), 1, "the request completed");
        assert_eq!(
            used_idx(&reply_mem),
            1,
            "its reply went out on the other ring"
        );
        assert!(handle.shutdown());
    }
}
