//! The engines behind one interface: what each says for a pushed operation, that an
//! operation's buffers live until its completion, links, errors, a full completion queue.

use super::*;
use crate::iovec::tests::two_regions;
use crate::iovec::AlignedBuf;
use crate::Segment;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// Runs `f` on a thread and fails (instead of hanging the suite) if it takes too long.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(_) => panic!("did not finish within {limit:?}"),
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: a valid array for two descriptors.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", io::Error::last_os_error());
    // SAFETY: two fresh descriptors we own.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn seg(addr: u64, len: u32) -> Segment {
    Segment {
        addr,
        len,
        writable: true,
    }
}

/// Waits for `n` completions of `e` (pushed ones included), at most 10 s.
fn wait_for(e: &mut Engine, pushed: Pushed, n: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    if let Pushed::Done(c) = pushed {
        out.push(c);
    }
    wait_more(e, out, n)
}

/// The completions of `pushed`: those done at once and those the engine reaps.
fn collect(e: &mut Engine, pushed: Vec<Pushed>) -> Vec<Completion> {
    let n = pushed.len();
    let out = pushed
        .into_iter()
        .filter_map(|p| match p {
            Pushed::Done(c) => Some(c),
            Pushed::Submitted => None,
        })
        .collect();
    wait_more(e, out, n)
}

fn wait_more(e: &mut Engine, mut out: Vec<Completion>, n: usize) -> Vec<Completion> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "{} of {n} completions",
            out.len()
        );
        e.submit_and_wait(1).expect("wait");
        e.clear_event();
        e.reap(&mut out).expect("reap");
    }
    out
}

/// 8 KiB of a known pattern at offset 4096 of a temp file.
fn patterned_file() -> std::fs::File {
    let f = tempfile::tempfile().expect("temp file");
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    f.write_all_at(&data, 4096).expect("write");
    f
}

fn both_engines(fd: std::os::fd::BorrowedFd<'_>) -> [Engine; 2] {
    [
        Engine::new(EngineKind::Inline, fd, 16).expect("inline"),
        Engine::Uring(Box::new(
            Uring::new(16, fd, RingMode::Plain).expect("io_uring"),
        )),
    ]
}

#[test]
fn the_inline_engine_is_done_at_once_and_io_uring_submits_then_completes() {
    let file = patterned_file();
    for mut e in both_engines(file.as_fd()) {
        let mem = two_regions();
        // Two guest buffers in two regions: the read is scattered across both.
        let bufs =
            IovecList::from_guest(&mem, &[seg(0x100, 4096), seg((1 << 20) + 8, 4096)]).unwrap();
        let pushed = e
            .push(Op::Read { offset: 4096, bufs }, 77, false)
            .expect("push");
        match (e.kind(), &pushed) {
            (EngineKind::Inline, Pushed::Done(_)) => assert_eq!(e.in_flight(), 0),
            (EngineKind::Uring, Pushed::Submitted) => assert_eq!(e.in_flight(), 1),
            (k, p) => panic!("{k}: {p:?}"),
        }
        let done = wait_for(&mut e, pushed, 1);
        assert_eq!(
            (done[0].user_data, done[0].result),
            (77, 8192),
            "{}",
            e.kind()
        );
        assert_eq!(e.in_flight(), 0);
        let mut got = vec![0u8; 8192];
        mem.read_slice(&mut got[..4096], GuestAddress(0x100))
            .unwrap();
        mem.read_slice(&mut got[4096..], GuestAddress((1 << 20) + 8))
            .unwrap();
        let want: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(got, want, "{}", e.kind());
    }
}

/// The caller gives its only references away: the engine alone keeps the guest memory
/// (or the bounce buffer) of a read that waits in the kernel, and hands it back with the
/// completion.
#[test]
fn an_operations_buffers_live_until_its_completion() {
    let (r, w) = pipe();
    let mut e = Engine::Uring(Box::new(
        Uring::new(8, r.as_fd(), RingMode::Plain).expect("io_uring"),
    ));
    let mem = two_regions();
    let weak = Arc::downgrade(&mem);
    let guest = IovecList::from_guest(&mem, &[seg(0x2000, 5)]).unwrap();
    drop(mem);
    let bounce = IovecList::owned(AlignedBuf::new(4).unwrap());
    for (bufs, data) in [(guest, &b"guest"[..]), (bounce, &b"data"[..])] {
        let is_guest = bufs.owned_buf().is_none();
        let op = Op::Read {
            offset: CURRENT_POSITION,
            bufs,
        };
        // A read from an empty pipe waits in the kernel until something is written.
        assert!(matches!(e.push(op, 9, false), Ok(Pushed::Submitted)));
        e.submit().expect("submit");
        std::thread::sleep(Duration::from_millis(50));
        let mut out = Vec::new();
        e.reap(&mut out).expect("reap");
        assert!(out.is_empty(), "completed before any data: {out:?}");
        assert_eq!(e.in_flight(), 1);
        if is_guest {
            assert!(
                weak.upgrade().is_some(),
                "guest memory unmapped under a read"
            );
        }
        // SAFETY: writes from a valid buffer of its length.
        let n = unsafe { libc::write(w.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        assert_eq!(n, data.len() as isize);
        let done = wait_for(&mut e, Pushed::Submitted, 1);
        assert_eq!((done[0].user_data, done[0].result), (9, data.len() as i32));
        let bufs = done.into_iter().next().and_then(|c| c.op.into_bufs());
        let bufs = bufs.expect("the buffers come back");
        match bufs.owned_buf() {
            Some(b) => assert_eq!(b.as_slice(), data),
            None => {
                let mem = weak
                    .upgrade()
                    .expect("still mapped: the completion holds it");
                let mut got = [0u8; 5];
                mem.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
                assert_eq!(&got[..], data);
                drop(mem);
                drop(bufs);
                assert!(weak.upgrade().is_none(), "the last reference was the op's");
            }
        }
    }
}

/// A submission that fails leaves its operations in the engine (the kernel takes the
/// queued entries with a later call); they complete then, with their buffers intact.
#[test]
fn a_failed_submission_keeps_the_operations_until_they_complete() {
    let file = patterned_file();
    let mut u = Uring::new(8, file.as_fd(), RingMode::Plain).expect("io_uring");
    let bufs = IovecList::owned(AlignedBuf::new(512).unwrap());
    u.push(Op::Read { offset: 4096, bufs }, 5, false)
        .expect("push");
    u.fail_next_submit = true;
    assert!(u.submit().is_err(), "the injected failure is reported");
    assert_eq!(u.in_flight(), 1);
    let mut e = Engine::Uring(Box::new(u));
    let done = wait_for(&mut e, Pushed::Submitted, 1);
    assert_eq!((done[0].user_data, done[0].result), (5, 512));
    let bufs = done
        .into_iter()
        .next()
        .and_then(|c| c.op.into_bufs())
        .unwrap();
    let want: Vec<u8> = (0..512u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(bufs.owned_buf().map(|b| b.as_slice().to_vec()), Some(want));
}

/// Errors come back as the system call's -errno, and a linked read that comes back short
/// cancels the next operation, the same on both engines.
#[test]
fn errors_and_broken_links_are_the_same_on_both_engines() {
    let file = patterned_file();
    for mut e in both_engines(file.as_fd()) {
        let kind = e.kind();
        // A read past the end of the file (0 bytes: short), linked to a flush.
        let bufs = IovecList::owned(AlignedBuf::new(512).unwrap());
        let a = e
            .push(
                Op::Read {
                    offset: 1 << 20,
                    bufs,
                },
                1,
                true,
            )
            .expect("push");
        let b = e.push(Op::Flush, 2, false).expect("push");
        let mut done = collect(&mut e, vec![a, b]);
        done.sort_by_key(|c| c.user_data);
        let results: Vec<(u64, i32)> = done.iter().map(|c| (c.user_data, c.result)).collect();
        assert_eq!(results, vec![(1, 0), (2, -libc::ECANCELED)], "{kind}");
        // A write to a file opened read-only: EBADF.
        let ro = std::fs::File::open("/proc/self/exe").expect("open");
        let mut e = Engine::new(kind, ro.as_fd(), 8).expect("engine");
        let bufs = IovecList::owned(AlignedBuf::new(512).unwrap());
        let pushed = e
            .push(
                Op::Write {
                    offset: 0,
                    bufs,
                    flags: 0,
                },
                3,
                false,
            )
            .expect("push");
        let done = wait_for(&mut e, pushed, 1);
        assert_eq!(done[0].result, -libc::EBADF, "{kind}");
    }
}

/// A plain 16-entry ring (CQ of 32) gets 1000 operations without being reaped: the
/// completions overflow the CQ. Pushing must neither spin nor fail, and every one of
/// the 1000 completions must come out of `reap`, exactly once.
#[test]
fn a_full_completion_queue_neither_spins_nor_loses_completions() {
    const N: u64 = 1000;
    let file = tempfile::tempfile().expect("temp file");
    file.set_len(1 << 20).expect("size");
    let got = within(Duration::from_secs(30), move || {
        let mut u = Uring::new(16, file.as_fd(), RingMode::Plain).expect("ring");
        for i in 0..N {
            let op = if i % 2 == 0 {
                Op::Flush
            } else {
                Op::Fallocate {
                    mode: 0,
                    offset: (i % 64) * 4096,
                    len: 4096,
                }
            };
            u.push(op, i, false).expect("push");
        }
        u.submit().expect("submit");
        // Let them all complete first: the CQ holds 32, the rest overflow.
        std::thread::sleep(Duration::from_millis(300));
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while (out.len() as u64) < N && Instant::now() < deadline {
            u.clear_event();
            let before = out.len();
            u.reap(&mut out).expect("reap");
            if out.len() == before {
                let mut pfd = libc::pollfd {
                    fd: u.eventfd().expect("built with an eventfd"),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, 100) };
            }
        }
        assert_eq!(u.in_flight(), 0);
        drop(file);
        out.into_iter()
            .map(|c| (c.user_data, c.result))
            .collect::<Vec<_>>()
    });
    assert_eq!(got.len() as u64, N, "completions reaped");
    let mut ids: Vec<u64> = got.iter().map(|&(id, _)| id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len() as u64, N, "each completion exactly once");
    assert!(got.iter().all(|&(_, res)| res >= 0), "{got:?}");
}

/// A file on a disk file system opened with O_DIRECT (fixed buffers matter for O_DIRECT
/// only; tmpfs has none), or None where /var/tmp cannot do it.
fn direct_file() -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = tempfile::tempdir_in("/var/tmp").ok()?;
    let path = dir.path().join("direct.img");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path);
    match f {
        Ok(f) => {
            f.set_len(1 << 20).expect("size");
            Some(f)
        }
        Err(e) => {
            vhost_tests::guest::report_skip(
                "engine fixed buffers",
                &format!("no O_DIRECT on /var/tmp: {e}"),
            );
            None
        }
    }
}

/// Pushes `op` on `u` and waits for its completion; returns the result and the buffers.
fn run_one(e: &mut Engine, op: Op) -> (i32, Option<IovecList>) {
    let pushed = e.push(op, 9, false).expect("push");
    let mut done = wait_for(e, pushed, 1);
    let c = done.pop().expect("completion");
    (c.result, c.op.into_bufs())
}

fn fixed_ops(e: &mut Engine) -> u64 {
    e.uring_mut().expect("io_uring").fixed_ops()
}

/// Guest memory registered as fixed buffers: one-buffer reads and writes go through
/// READ_FIXED/WRITE_FIXED and move the right bytes, others keep readv/writev; a new
/// memory table is registered while an operation on the old one is in the kernel, which
/// still completes into the old memory, and the new memory's buffers are fixed at once.
#[test]
fn fixed_buffers_carry_io_and_follow_a_memory_change() {
    let Some(file) = direct_file() else { return };
    let mut e = Engine::Uring(Box::new(
        Uring::new(16, file.as_fd(), RingMode::PreferDeferred).expect("io_uring"),
    ));
    let old = two_regions();
    e.uring_mut()
        .unwrap()
        .register_memory(&old)
        .expect("register memfd guest memory");
    assert!(Arc::ptr_eq(
        e.uring_mut().unwrap().registered_memory().unwrap(),
        &old
    ));
    let block: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 253) as u8).collect();
    old.write_slice(&block, GuestAddress(0x1000)).unwrap();
    let bufs = IovecList::from_guest(&old, &[seg(0x1000, 4096)]).unwrap();
    let (r, _) = run_one(
        &mut e,
        Op::Write {
            offset: 8192,
            bufs,
            flags: 0,
        },
    );
    assert_eq!(r, 4096);
    assert_eq!(fixed_ops(&mut e), 1, "a one-buffer write is WRITE_FIXED");
    let mut on_disk = vec![0u8; 4096];
    // A buffered read of an O_DIRECT-written block sees the data (the write is done).
    std::fs::File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .unwrap()
        .read_exact_at(&mut on_disk, 8192)
        .unwrap();
    assert_eq!(on_disk, block);

    // A read into the second region: READ_FIXED on the second chunk.
    let bufs = IovecList::from_guest(&old, &[seg((1 << 20) + 0x2000, 4096)]).unwrap();
    let (r, _) = run_one(&mut e, Op::Read { offset: 8192, bufs });
    assert_eq!(r, 4096);
    assert_eq!(fixed_ops(&mut e), 2);
    let mut got = vec![0u8; 4096];
    old.read_slice(&mut got, GuestAddress((1 << 20) + 0x2000))
        .unwrap();
    assert_eq!(got, block);

    // Two buffers: readv, not fixed.
    let bufs =
        IovecList::from_guest(&old, &[seg(0x4000, 2048), seg((1 << 20) + 0x4000, 2048)]).unwrap();
    let (r, _) = run_one(&mut e, Op::Read { offset: 8192, bufs });
    assert_eq!(r, 4096);
    assert_eq!(fixed_ops(&mut e), 2, "two buffers keep readv");
    let mut got = vec![0u8; 2048];
    old.read_slice(&mut got, GuestAddress((1 << 20) + 0x4000))
        .unwrap();
    assert_eq!(got, block[2048..]);

    // An operation on the old memory in the kernel while a new table is registered.
    let bufs = IovecList::from_guest(&old, &[seg(0x8000, 4096)]).unwrap();
    let pending = e.push(Op::Read { offset: 8192, bufs }, 1, false).unwrap();
    assert!(matches!(pending, Pushed::Submitted));
    let new = two_regions();
    e.uring_mut()
        .unwrap()
        .register_memory(&new)
        .expect("register the new table");
    assert_eq!(fixed_ops(&mut e), 3);
    let done = wait_for(&mut e, pending, 1);
    assert_eq!(
        done[0].result, 4096,
        "the old buffer stayed registered for it"
    );
    let mut got = vec![0u8; 4096];
    old.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
    assert_eq!(got, block);
    // The old memory is no longer fixed, the new one is.
    let bufs = IovecList::from_guest(&old, &[seg(0x9000, 4096)]).unwrap();
    let (r, _) = run_one(&mut e, Op::Read { offset: 8192, bufs });
    assert_eq!((r, fixed_ops(&mut e)), (4096, 3));
    let bufs = IovecList::from_guest(&new, &[seg((1 << 20) + 0x1000, 4096)]).unwrap();
    let (r, _) = run_one(&mut e, Op::Read { offset: 8192, bufs });
    assert_eq!((r, fixed_ops(&mut e)), (4096, 4));
    let mut got = vec![0u8; 4096];
    new.read_slice(&mut got, GuestAddress((1 << 20) + 0x1000))
        .unwrap();
    assert_eq!(got, block);
    drop(old);

    // Unregistered: plain readv again, still correct.
    e.uring_mut().unwrap().unregister_memory();
    assert!(e.uring_mut().unwrap().registered_memory().is_none());
    let bufs = IovecList::from_guest(&new, &[seg(0x3000, 4096)]).unwrap();
    let (r, _) = run_one(&mut e, Op::Read { offset: 8192, bufs });
    assert_eq!((r, fixed_ops(&mut e)), (4096, 4));
    let mut got = vec![0u8; 4096];
    new.read_slice(&mut got, GuestAddress(0x3000)).unwrap();
    assert_eq!(got, block);
}

/// Memory the kernel will not pin for long (a file on a disk file system, not memfd)
/// is refused with an error the caller can report, and I/O carries on without it.
#[test]
fn memory_that_cannot_be_pinned_is_refused_and_io_carries_on() {
    let Some(file) = direct_file() else { return };
    let mut e = Engine::Uring(Box::new(
        Uring::new(16, file.as_fd(), RingMode::Plain).expect("io_uring"),
    ));
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let backing = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("ram"))
        .unwrap();
    backing.set_len(64 << 10).unwrap();
    let mut table = crate::memory::MemoryTable::new(crate::dirty_log::DirtyLog::new());
    table
        .add_region(
            &vhost::vhost_user::message::VhostUserMemoryRegion::new(0, 64 << 10, 0x7000_0000, 0),
            backing,
        )
        .unwrap();
    let mem = vm_memory::GuestAddressSpace::memory(&table.atomic()).into_inner();
    let err = e
        .uring_mut()
        .unwrap()
        .register_memory(&mem)
        .expect_err("a disk file's pages are not pinned for long");
    assert!(matches!(err, FixedError::Register(_)), "{err}");
    assert!(e.uring_mut().unwrap().registered_memory().is_none());
    mem.write_slice(&[5u8; 4096], GuestAddress(0)).unwrap();
    let bufs = IovecList::from_guest(&mem, &[seg(0, 4096)]).unwrap();
    let (r, _) = run_one(
        &mut e,
        Op::Write {
            offset: 0,
            bufs,
            flags: 0,
        },
    );
    assert_eq!((r, fixed_ops(&mut e)), (4096, 0));
}
