//! I/O engines: operations on one file whose buffers the engine owns until the kernel is
//! done with them.
//!
//! An [`Op`] carries its buffers as an [`IovecList`] (which holds the guest memory
//! snapshot or the bounce buffer its iovecs point into). [`Engine::push`] takes the
//! operation by value and answers either [`Pushed::Submitted`] (the engine keeps the
//! operation in its in-flight map, keyed by the caller's `user_data`, until the kernel
//! posts its completion; [`Engine::reap`] hands it back in a [`Completion`]) or
//! [`Pushed::Done`] (it ran at once; the completion is right there). No caller keeps
//! buffers alive by hand, and nothing outside [`IovecList`] declares raw iovecs `Send`.
//!
//! Two engines, chosen per file and logged ([`EngineChoice`], `--io-engine`):
//! - [`Uring`]: io_uring with the file registered (fixed file 0: no file lookup and
//!   reference per operation), completions signalled on an eventfd; what disks and taps
//!   want. On request it also registers guest memory as fixed buffers
//!   ([`Uring::register_memory`], see `fixed`).
//! - [`Inline`]: preadv2/pwritev2/fdatasync/fallocate on the calling thread. On a memory
//!   file system (tmpfs, hugetlbfs, ramfs) reads and writes never wait for a device, yet
//!   io_uring cannot issue them without blocking in its sense (no IOCB_NOWAIT there) and
//!   hands every one to an io-wq kernel thread: two context switches per request and, on
//!   a small machine, a core. Inline they are a memory copy on the worker's thread.
//!   On tmpfs the inline engine can go further and copy through a mapping of the file
//!   ([`Inline::mapped`], `mapped`): no system call and no page-cache lookup per request.

mod fixed;
mod inline;
mod mapped;
pub mod sigbus;
mod uring;

use std::io;
use std::os::fd::{BorrowedFd, RawFd};

pub use fixed::{chunks_of, guest_bytes, FixedError, FIXED_BUF_MAX, FIXED_SLOTS};
pub use inline::Inline;
pub use uring::{RingMode, Uring};

use crate::iovec::IovecList;

/// `offset` of a write to a stream (a tap): the file's current position, as -1 is for
/// pwritev2 and io_uring.
pub const CURRENT_POSITION: u64 = u64::MAX;

/// One operation on the engine's file.
#[derive(Debug)]
pub enum Op {
    /// preadv2 into `bufs` at `offset`.
    Read {
        /// File offset.
        offset: u64,
        /// Where the data goes.
        bufs: IovecList,
    },
    /// pwritev2 from `bufs` at `offset` ([`CURRENT_POSITION`] for streams), with the
    /// `RWF_*` flags `flags` (RWF_DSYNC: write through; RWF_NOWAIT).
    Write {
        /// File offset.
        offset: u64,
        /// Where the data comes from.
        bufs: IovecList,
        /// RWF_* flags.
        flags: i32,
    },
    /// fdatasync.
    Flush,
    /// fallocate(mode, offset, len).
    Fallocate {
        /// FALLOC_FL_* flags.
        mode: i32,
        /// File offset.
        offset: u64,
        /// Length.
        len: u64,
    },
}

impl Op {
    /// The operation's buffers back (reads and writes), e.g. to resubmit the rest of a
    /// short transfer or to copy a bounce buffer out.
    #[inline]
    pub fn into_bufs(self) -> Option<IovecList> {
        match self {
            Op::Read { bufs, .. } | Op::Write { bufs, .. } => Some(bufs),
            Op::Flush | Op::Fallocate { .. } => None,
        }
    }
}

/// A finished operation: the caller's `user_data`, the result (bytes or -errno, as the
/// system call's), and the operation with its buffers, now the caller's again.
#[derive(Debug)]
pub struct Completion {
    /// What the caller passed to [`Engine::push`].
    pub user_data: u64,
    /// Bytes transferred, 0, or -errno.
    pub result: i32,
    /// The operation, buffers included.
    pub op: Op,
}

/// What [`Engine::push`] did with an operation.
#[derive(Debug)]
pub enum Pushed {
    /// Queued for the kernel; its completion comes from [`Engine::reap`].
    Submitted,
    /// Ran at once.
    Done(Completion),
}

/// `--io-engine`: how a file's I/O is done.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// Mapped on tmpfs, inline on the other memory file systems (hugetlbfs, ramfs),
    /// io_uring elsewhere.
    #[default]
    Auto,
    /// io_uring for everything.
    Uring,
    /// Synchronous system calls on the queue's worker thread for everything (flushes and
    /// discards too: on a disk they then stall the queue while they run).
    Inline,
    /// tmpfs only: reads and writes are memory copies through a shared mapping of the
    /// file (holes are read with system calls, so they stay holes); the rest inline.
    Mapped,
}

/// The engine a file gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// [`Uring`].
    Uring,
    /// [`Inline`].
    Inline,
    /// [`Inline::mapped`].
    Mapped,
}

/// Where a file lives, as far as the choice of engine goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileHome {
    /// tmpfs: its page cache is the storage.
    Tmpfs,
    /// hugetlbfs or ramfs: in memory, but not for mapping by this engine.
    OtherMemory,
    /// Anything else: a device stands behind it.
    Device,
}

/// `--io-engine mapped` for a file that is not on tmpfs.
#[derive(Debug, thiserror::Error)]
#[error("--io-engine mapped needs a file on tmpfs (its page cache is its storage, so a store into the mapping is as durable as a write); this file is {0}: use auto, inline or uring")]
pub struct MappedNeedsTmpfs(&'static str);

impl EngineChoice {
    /// The engine for a file living at `home`.
    pub fn resolve(self, home: FileHome) -> Result<EngineKind, MappedNeedsTmpfs> {
        Ok(match (self, home) {
            (EngineChoice::Auto, FileHome::Tmpfs) => EngineKind::Mapped,
            (EngineChoice::Auto, FileHome::OtherMemory) => EngineKind::Inline,
            (EngineChoice::Auto, FileHome::Device) | (EngineChoice::Uring, _) => EngineKind::Uring,
            (EngineChoice::Inline, _) => EngineKind::Inline,
            (EngineChoice::Mapped, FileHome::Tmpfs) => EngineKind::Mapped,
            (EngineChoice::Mapped, FileHome::OtherMemory) => {
                return Err(MappedNeedsTmpfs("on hugetlbfs or ramfs"))
            }
            (EngineChoice::Mapped, FileHome::Device) => {
                return Err(MappedNeedsTmpfs("backed by a device"))
            }
        })
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::Uring => "io_uring",
            EngineKind::Inline => "inline",
            EngineKind::Mapped => "mapped",
        })
    }
}

/// One of the two engines (an enum, not a trait object: the data path calls it per
/// operation).
pub enum Engine {
    /// io_uring (boxed: the ring's state is large beside the inline engine's fd).
    Uring(Box<Uring>),
    /// Synchronous system calls.
    Inline(Inline),
}

impl Engine {
    /// An engine of `kind` for `fd`; `entries` is the io_uring's submission queue size.
    pub fn new(kind: EngineKind, fd: BorrowedFd<'_>, entries: u32) -> io::Result<Self> {
        Ok(match kind {
            EngineKind::Uring => {
                Engine::Uring(Box::new(Uring::new(entries, fd, RingMode::PreferDeferred)?))
            }
            EngineKind::Inline => Engine::Inline(Inline::new(fd)?),
            EngineKind::Mapped => Engine::Inline(Inline::mapped(fd)?),
        })
    }

    /// The io_uring engine, if this is one (fixed buffers are its alone).
    #[inline]
    pub fn uring_mut(&mut self) -> Option<&mut Uring> {
        match self {
            Engine::Uring(u) => Some(u),
            Engine::Inline(_) => None,
        }
    }

    /// Which engine this is.
    #[inline]
    pub fn kind(&self) -> EngineKind {
        match self {
            Engine::Uring(_) => EngineKind::Uring,
            Engine::Inline(i) if i.is_mapped() => EngineKind::Mapped,
            Engine::Inline(_) => EngineKind::Inline,
        }
    }

    /// Takes `op`; `link` makes the next pushed operation run only if this one succeeds
    /// fully (else it completes with -ECANCELED). Errors: the operation never reached the
    /// kernel (its buffers are dropped with it; nothing can still touch them).
    #[inline]
    pub fn push(&mut self, op: Op, user_data: u64, link: bool) -> io::Result<Pushed> {
        match self {
            Engine::Uring(u) => u.push(op, user_data, link).map(|()| Pushed::Submitted),
            Engine::Inline(i) => Ok(Pushed::Done(i.run(op, user_data, link))),
        }
    }

    /// Hands queued operations to the kernel.
    #[inline]
    pub fn submit(&mut self) -> io::Result<()> {
        match self {
            Engine::Uring(u) => u.submit(),
            Engine::Inline(_) => Ok(()),
        }
    }

    /// Submits and blocks until at least `want` completions are available (at most as
    /// many as are in flight).
    #[inline]
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        match self {
            Engine::Uring(u) => u.submit_and_wait(want),
            Engine::Inline(_) => Ok(()),
        }
    }

    /// Moves the available completions into `out`.
    #[inline]
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        match self {
            Engine::Uring(u) => u.reap(out),
            Engine::Inline(_) => Ok(()),
        }
    }

    /// Hands each available completion to `f` (no vector in between: the data path).
    #[inline]
    pub fn reap_each(&mut self, f: impl FnMut(Completion)) -> io::Result<()> {
        match self {
            Engine::Uring(u) => u.reap_each(f),
            Engine::Inline(_) => Ok(()),
        }
    }

    /// The fd that becomes readable when completions arrive (None: every operation is
    /// done when `push` returns).
    #[inline]
    pub fn event_fd(&self) -> Option<RawFd> {
        match self {
            Engine::Uring(u) => u.eventfd(),
            Engine::Inline(_) => None,
        }
    }

    /// Clears the event fd (before reaping, so no completion is missed).
    #[inline]
    pub fn clear_event(&self) {
        if let Engine::Uring(u) = self {
            u.clear_event();
        }
    }

    /// Operations pushed but not yet handed to the kernel (always 0 for the inline engine).
    #[inline]
    pub fn unsubmitted(&self) -> usize {
        match self {
            Engine::Uring(u) => u.unsubmitted(),
            Engine::Inline(_) => 0,
        }
    }

    /// Operations the engine holds for the kernel.
    #[inline]
    pub fn in_flight(&self) -> usize {
        match self {
            Engine::Uring(u) => u.in_flight(),
            Engine::Inline(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests;
