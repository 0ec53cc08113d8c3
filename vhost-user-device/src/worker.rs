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
use crate::ring::Ring;
use crate::sandbox::{self, ThreadKind};

const TOKEN_WAKE: u64 = 0;
const TOKEN_KICK_BASE: u64 = 1;
const TOKEN_DEVICE_BASE: u64 = 1 << 32;

/// The rings a worker owns, by position in its group.
pub struct Rings {
    slots: Vec<(u16, Option<Ring>)>,
}

impl Rings {
    /// The started ring of `queue`, if this worker owns it.
    pub fn get_mut(&mut self, queue: u16) -> Option<&mut Ring> {
        self.slots
            .iter_mut()
            .find(|(q, _)| *q == queue)
            .and_then(|(_, r)| r.as_mut())
    }

    fn slot_of(&self, queue: u16) -> Option<usize> {
        self.slots.iter().position(|(q, _)| *q == queue)
    }

    /// Iterates over the started rings.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Ring> {
        self.slots.iter_mut().filter_map(|(_, r)| r.as_mut())
    }
}

pub(crate) enum Command {
    Start(Box<Ring>),
    Enable(u16, bool),
    SetCall(u16, Option<EventFd>),
    SetErr(u16, Option<EventFd>),
    Stop(u16, Sender<Option<Box<Ring>>>),
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
        let exit = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicBool::new(false));
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_WAKE),
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
            rings: Rings {
                slots: queues.into_iter().map(|q| (q, None)).collect(),
            },
            epoll,
            rx,
            wake: wake.try_clone()?,
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

    pub(crate) fn enable(&self, queue: u16, on: bool) -> bool {
        self.send(Command::Enable(queue, on))
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
    exit: Arc<AtomicBool>,
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
                } else if token >= TOKEN_DEVICE_BASE {
                    let index = (token - TOKEN_DEVICE_BASE) as usize;
                    self.worker.handle_event(index, &mut self.rings);
                } else {
                    let slot = (token - TOKEN_KICK_BASE) as usize;
                    self.kicked(slot);
                }
            }
        }
    }

    fn kicked(&mut self, slot: usize) {
        let Some((_, Some(ring))) = self.rings.slots.get_mut(slot) else {
            return;
        };
        // The kick fd may be blocking; epoll said it is readable, so this does not block.
        // Read it even for a parked ring, or epoll would report it readable for ever.
        let _ = ring.kick.read();
        if ring.is_enabled() && !ring.is_broken() {
            self.worker.process_queue(ring);
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
                let ring = &mut self.rings.slots[slot].1.insert(*ring);
                // Chains made available before the kick fd arrived, and resubmissions.
                if ring.is_enabled() && !ring.is_broken() {
                    self.worker.process_queue(ring);
                }
            }
            Command::Enable(queue, on) => {
                if let Some(ring) = self.rings.get_mut(queue) {
                    ring.enabled = on;
                    if on && !ring.is_broken() {
                        self.worker.process_queue(ring);
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
        // GET_VRING_BASE must only be answered once everything taken from this ring is on
        // the used ring: the frontend reads the used index right after.
        while self.worker.in_flight(queue) > 0 {
            if let Err(e) = self.worker.wait_completions(&mut self.rings) {
                log::error!("queue {queue}: waiting for in-flight requests failed: {e}");
                break;
            }
        }
        self.rings.slots[slot].1.take().map(Box::new)
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
