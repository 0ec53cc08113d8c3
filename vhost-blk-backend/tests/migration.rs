//! Block migration between two in-process backends over a socket: a full sync copies
//! data, holes and zeros; an incremental one sends exactly the dirty blocks; the
//! destination holds the guest's requests until the sync completes; a device mismatch
//! is refused on both ends with nothing written; a cut stream leaves the destination
//! incomplete and held, loses no change on the source, and a retry works.
//!
//! Both ends run in threads under the program's seccomp filter for migration threads
//! (`ThreadKind::Job`; [`job_thread`]), as they do in the program: a call missing from
//! the list ends this test process with the sandbox's message and status 159.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use vhost_blk_backend::migration::dest::{receive, Received};
use vhost_blk_backend::migration::source::{Source, SyncStats};
use vhost_blk_backend::migration::stream::Mode;
use vhost_blk_backend::migration::transport::Conn;
use vhost_blk_backend::migration::MigrationError;
use vhost_blk_backend::spec::{req_type, status};
use vhost_tests::frontend::{FrontendOptions, TestFrontend};

const SIZE: u64 = 8 << 20;

/// Runs `f` in a new thread under the migration threads' seccomp filter (the sandbox is
/// configured for this process once, as vhost-blk-backend's `run` does).
fn job_thread<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    use vhost_user_device::sandbox::{self, SandboxMode, ThreadKind};
    static CONFIGURED: std::sync::Once = std::sync::Once::new();
    CONFIGURED.call_once(|| {
        sandbox::configure(
            SandboxMode::Seccomp,
            vhost_blk_backend::seccomp::profile(true),
            false,
        )
        .expect("configure the sandbox");
    });
    std::thread::spawn(move || {
        sandbox::enter(ThreadKind::Job).expect("enter the sandbox");
        f()
    })
}

fn backend(fill: bool, held: bool) -> TestBackend {
    TestBackend::start(BackendConfig {
        size: SIZE,
        fill,
        held,
        ..Default::default()
    })
}

/// Runs one sync from `src` to `dst` over a socket pair: Ok((source stats, what the
/// destination received)) or the two ends' errors.
fn sync(
    src: &TestBackend,
    dst: &TestBackend,
    mode: Mode,
) -> Result<(SyncStats, Received, bool), (MigrationError, MigrationError)> {
    let (a, b) = UnixStream::pair().unwrap();
    sync_over(src, dst, mode, Conn::Unix(a), Conn::Unix(b))
}

fn sync_over(
    src: &TestBackend,
    dst: &TestBackend,
    mode: Mode,
    src_conn: Conn,
    dst_conn: Conn,
) -> Result<(SyncStats, Received, bool), (MigrationError, MigrationError)> {
    match sync_ends(src, dst, mode, src_conn, dst_conn) {
        (Ok((stats, full)), Ok(r)) => Ok((stats, r, full)),
        (Err(e), Err(f)) => Err((e, f)),
        (Ok(_), Err(f)) => panic!("source completed, destination failed: {f}"),
        (Err(e), Ok(_)) => panic!("destination completed, source failed: {e}"),
    }
}

/// One sync; what each end made of it.
#[allow(clippy::type_complexity)]
fn sync_ends(
    src: &TestBackend,
    dst: &TestBackend,
    mode: Mode,
    src_conn: Conn,
    dst_conn: Conn,
) -> (
    Result<(SyncStats, bool), MigrationError>,
    Result<Received, MigrationError>,
) {
    let dshared = dst.shared.clone();
    let d = job_thread(move || receive(&dshared, dst_conn));
    let sshared = src.shared.clone();
    let s = job_thread(move || {
        let mut s = Source::start(&sshared, src_conn, mode)?;
        let full = s.is_full();
        if full {
            s.bulk_pass()?;
        }
        s.dirty_pass()?;
        let (_, stats) = s.complete()?;
        Ok::<_, MigrationError>((stats, full))
    })
    .join()
    .unwrap();
    (s, d.join().unwrap())
}

/// Whether `b`'s gate is open within 5 s. A destination opens it right after it
/// acknowledges the source's Complete, so a moment after the source's job concluded:
/// asserting it at once races with that moment.
fn serves_soon(b: &TestBackend) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !b.shared.gate.is_open() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

fn image(b: &TestBackend) -> Vec<u8> {
    std::fs::read(&b.image).unwrap()
}

fn hole_at(b: &TestBackend, offset: u64) -> bool {
    let f = std::fs::File::open(&b.image).unwrap();
    // SAFETY: lseek on an open fd.
    let h = unsafe { libc::lseek(f.as_raw_fd(), offset as i64, libc::SEEK_HOLE) };
    h == offset as i64
}

fn checkpoint(b: &TestBackend) -> (String, u64) {
    let st = b.shared.sync.lock().unwrap();
    (st.checkpoint.image_uuid(), st.checkpoint.generation)
}

/// Source image: the pattern, a 1 MiB hole at 2 MiB, 256 KiB of written zeros at 5 MiB.
fn shape_source(b: &TestBackend) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&b.image)
        .unwrap();
    // SAFETY: fallocate on an open fd.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0x03, 2 << 20, 1 << 20) };
    assert_eq!(r, 0, "punch: {}", std::io::Error::last_os_error());
    f.write_all_at(&vec![0u8; 256 << 10], 5 << 20).unwrap();
}

#[test]
fn a_full_sync_copies_data_holes_and_zeros() {
    let src = backend(true, false);
    shape_source(&src);
    let dst = backend(false, false);
    std::fs::write(&dst.image, vec![0x55u8; SIZE as usize]).unwrap();
    let (stats, got, full) = sync(&src, &dst, Mode::Full).unwrap();
    assert!(full);
    assert_eq!(got.mode, Mode::Full);
    assert!(
        image(&src) == image(&dst),
        "images differ after a full sync"
    );
    // The hole and the zeros went as flags: data sent is the rest.
    let zeros = (1 << 20) + (256 << 10);
    assert_eq!(stats.data_bytes, SIZE - zeros);
    assert_eq!(stats.zero_bytes, zeros);
    assert_eq!(got.data_bytes, stats.data_bytes);
    assert!(
        hole_at(&dst, 2 << 20),
        "the source's hole is not a hole on the destination"
    );
    // Both ends recorded the same checkpoint, the source's identity at generation 1.
    assert_eq!(checkpoint(&src), checkpoint(&dst));
    assert_eq!(checkpoint(&dst).1, 1);
    assert_eq!(src.shared.dirty.count(), 0);
}

#[test]
fn an_incremental_sync_sends_exactly_the_dirty_blocks() {
    let src = backend(true, false);
    let dst = backend(false, false);
    sync(&src, &dst, Mode::Full).unwrap();
    // Scattered guest writes on the source: 40 blocks, some adjacent, one rewritten.
    let mut fe = TestFrontend::connect(src.socket(), FrontendOptions::default()).unwrap();
    let mut blocks: Vec<u64> = (0..37).map(|i| (i * 53 + 7) % 2048).collect();
    blocks.extend([1000, 1001, 1002]);
    for (i, &b) in blocks.iter().enumerate() {
        assert_eq!(write(&mut fe, b * 8, &[i as u8 + 1; 4096]), status::OK);
    }
    assert_eq!(write(&mut fe, 7 * 8, &[0xee; 4096]), status::OK);
    blocks.sort_unstable();
    blocks.dedup();
    let dirty = src.shared.dirty.count();
    assert_eq!(dirty, blocks.len() as u64);
    let (stats, got, full) = sync(&src, &dst, Mode::Incremental).unwrap();
    assert!(
        !full,
        "the destination should have taken an incremental sync"
    );
    assert_eq!(got.mode, Mode::Incremental);
    assert_eq!(
        stats.data_bytes + stats.zero_bytes,
        dirty * 4096,
        "bytes sent must be exactly the dirty blocks"
    );
    assert!(
        image(&src) == image(&dst),
        "images differ after an incremental sync"
    );
    assert_eq!(checkpoint(&src), checkpoint(&dst));
    assert_eq!(checkpoint(&dst).1, 2);
    // And back: nothing changed on the destination, nothing is sent.
    let (stats, _, full) = sync(&dst, &src, Mode::Incremental).unwrap();
    assert!(!full);
    assert_eq!(stats.data_bytes + stats.zero_bytes, 0);
}

#[test]
fn an_incremental_sync_onto_a_changed_destination_becomes_full_and_says_why() {
    let src = backend(true, false);
    let dst = backend(false, false);
    sync(&src, &dst, Mode::Full).unwrap();
    let mut fe = TestFrontend::connect(dst.socket(), FrontendOptions::default()).unwrap();
    assert_eq!(write(&mut fe, 64, &[9; 4096]), status::OK);
    let (stats, got, full) = sync(&src, &dst, Mode::Incremental).unwrap();
    assert!(full && got.mode == Mode::Full);
    assert_eq!(stats.data_bytes + stats.zero_bytes, SIZE);
    assert!(image(&src) == image(&dst));
}

#[test]
fn the_destination_holds_requests_until_the_sync_completes() {
    let src = backend(true, false);
    let dst = backend(false, true);
    let mut fe = TestFrontend::connect(dst.socket(), FrontendOptions::default()).unwrap();
    // A read sent before the sync: it waits, it does not fail.
    let r = blk_req(&mut fe, req_type::IN, 16, 4096);
    fe.submit(0, &r.chain(true));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fe.queues[0].used_idx(&fe.mem), 0, "served before the sync");
    sync(&src, &dst, Mode::Full).unwrap();
    // receive() leaves the gate to its caller (serve_incoming opens it on success).
    assert_eq!(fe.queues[0].used_idx(&fe.mem), 0);
    dst.shared.gate.open();
    fe.wait(0, 1)
        .expect("the held read completes once the gate opens");
    assert_eq!(r.status(&fe), status::OK);
    assert_eq!(fe.read(r.data, 4096), pattern_range(16 * 512, 4096));
}

#[test]
fn a_device_mismatch_is_refused_on_both_ends_and_nothing_is_written() {
    let src = backend(true, false);
    let dst = TestBackend::start(BackendConfig {
        size: SIZE * 2,
        fill: false,
        ..Default::default()
    });
    let before = image(&dst);
    let (e, f) = sync(&src, &dst, Mode::Full).unwrap_err();
    for (end, err) in [("source", e.to_string()), ("destination", f.to_string())] {
        assert!(
            err.contains("the devices differ") && err.contains("size (sectors)"),
            "{end}: {err}"
        );
    }
    assert!(image(&dst) == before, "the destination was written");
    assert!(!dst.shared.sync.lock().unwrap().incomplete);
}

/// Relays the first `limit` bytes from one socket to the other, then cuts both.
fn cutting_relay(limit: usize) -> (Conn, Conn) {
    let (src_end, mut relay_in) = UnixStream::pair().unwrap();
    let (mut relay_out, dst_end) = UnixStream::pair().unwrap();
    let back_in = relay_out.try_clone().unwrap();
    let back_out = relay_in.try_clone().unwrap();
    // Destination -> source, whole.
    std::thread::spawn(move || {
        let (mut i, mut o) = (back_in, back_out);
        let _ = std::io::copy(&mut i, &mut o);
    });
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        let mut sent = 0;
        while sent < limit {
            let n = match relay_in.read(&mut buf[..(limit - sent).min(64 << 10)]) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if relay_out.write_all(&buf[..n]).is_err() {
                break;
            }
            sent += n;
        }
        let _ = relay_in.shutdown(std::net::Shutdown::Both);
        let _ = relay_out.shutdown(std::net::Shutdown::Both);
    });
    (Conn::Unix(src_end), Conn::Unix(dst_end))
}

#[test]
fn a_cut_stream_leaves_the_destination_held_and_incomplete_and_a_retry_works() {
    let src = backend(true, false);
    let dst = backend(false, true);
    let (a, b) = cutting_relay(3 << 20);
    let (e, f) = sync_over(&src, &dst, Mode::Full, a, b).unwrap_err();
    assert!(
        matches!(f, MigrationError::Io(_) | MigrationError::Stream(_)),
        "{f}"
    );
    let _ = e;
    assert!(dst.shared.sync.lock().unwrap().incomplete);
    assert!(!dst.shared.gate.is_open());
    // The failed full sync gave every block back to the source's bitmap.
    assert_eq!(src.shared.dirty.count(), src.shared.dirty.blocks());
    // The retry completes and the images are equal.
    let (_, got, _) = sync(&src, &dst, Mode::Incremental).unwrap();
    assert_eq!(
        got.mode,
        Mode::Full,
        "an incomplete destination takes a full sync"
    );
    assert!(!dst.shared.sync.lock().unwrap().incomplete);
    assert!(image(&src) == image(&dst));
}

/// Cut anywhere: inside the Hello, right after it, in the bulk pass, in the last pass,
/// inside the Complete frame: both ends fail, the destination stays held, the source
/// loses no change. Inside the Commit (the source has the Ack): the source is done, the
/// destination, which cannot know that, holds and marks its copy incomplete. The retry
/// after all of them makes the images equal.
#[test]
fn a_cut_at_every_phase_of_the_stream_then_a_retry_works() {
    let src = backend(true, false);
    shape_source(&src);
    // The whole stream once, to know where its phases lie.
    let probe = backend(false, true);
    let (stats, _, _) = sync(&src, &probe, Mode::Full).unwrap();
    let n = stats.wire_bytes as usize;
    let dst = backend(false, true);
    // The Commit frame (a header, no payload) ends the stream.
    let commit = vhost_blk_backend::migration::stream::HEADER_LEN;
    for limit in [1, 40, 400, n / 3, n - commit - 4096, n - commit - 10] {
        let (a, b) = cutting_relay(limit);
        if sync_over(&src, &dst, Mode::Full, a, b).is_ok() {
            panic!("a stream cut at byte {limit} of {n} completed");
        }
        assert!(
            !dst.shared.gate.is_open(),
            "cut at {limit}: the destination serves"
        );
        assert_eq!(
            src.shared.dirty.count(),
            src.shared.dirty.blocks(),
            "cut at {limit}: a failed full sync gives every block back"
        );
        if limit > 400 {
            assert!(
                dst.shared.sync.lock().unwrap().incomplete,
                "cut at {limit}: the destination's image is not marked incomplete"
            );
        }
    }
    let (a, b) = cutting_relay(n - 10);
    let (s, d) = sync_ends(&src, &dst, Mode::Full, a, b);
    assert!(s.is_ok(), "the source had its Ack: {s:?}");
    let e = d.expect_err("the destination never heard the Commit");
    assert!(
        e.to_string().contains("did not confirm the hand-over"),
        "{e}"
    );
    assert!(!dst.shared.gate.is_open());
    assert!(dst.shared.sync.lock().unwrap().incomplete);
    let (_, got, _) = sync(&src, &dst, Mode::Incremental).unwrap();
    assert_eq!(got.mode, Mode::Full);
    assert!(!dst.shared.sync.lock().unwrap().incomplete);
    assert!(image(&src) == image(&dst));
}

mod vmm_driven {
    //! The hand-over the VMM's own migration triggers: a ready job hands the disk over
    //! when LOG_ALL is on and every ring has been stopped (QEMU pauses the guest for its
    //! switch-over), not on a plain pause, and the source serves again if the VM resumes
    //! there afterwards (the VMM's migration failed).

    use super::*;
    use std::sync::Arc;
    use std::time::Instant;
    use vhost::VhostBackend;
    use vhost_blk_backend::migration::dest::serve_incoming;
    use vhost_blk_backend::migration::job::{CopyMode, JobParams, Migrations};
    use vhost_blk_backend::migration::transport::{listen, Security, Uri};

    fn status(m: &Migrations) -> String {
        m.query().unwrap()["status"].as_str().unwrap().to_string()
    }

    fn wait_status(m: &Migrations, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while status(m) != want {
            assert!(
                Instant::now() < deadline,
                "job never {want}: {}",
                m.query().unwrap()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A source with a running guest (queue 0 started), a held destination listening,
    /// and a job that became ready.
    fn ready_job() -> (TestBackend, TestBackend, TestFrontend, Arc<Migrations>) {
        let (src, dst, fe, m, _) = ready_job_via(CopyMode::Background, false);
        (src, dst, fe, m)
    }

    /// `ready_job` in `copy_mode`; with `relayed`, the stream goes through a relay the
    /// returned flag stalls (it stops forwarding to the destination, without closing).
    /// A held destination taking syncs on its own `mig.sock` (serve_incoming, in a job
    /// thread); returns it and the socket's path.
    fn listening_destination() -> (TestBackend, std::path::PathBuf) {
        let dst = backend(false, true);
        let dst_path = dst.dir.path().join("mig.sock");
        let mut l = listen(&Uri::Unix(dst_path.clone()), &Security::default()).unwrap();
        let dshared = dst.shared.clone();
        job_thread(move || serve_incoming(&dshared, &mut l));
        (dst, dst_path)
    }

    /// The migration jobs of `src` (100 ms downtime limit, plain streams).
    fn migrations(src: &TestBackend) -> Arc<Migrations> {
        Arc::new(Migrations::new(
            src.shared.clone(),
            Security::default(),
            Duration::from_millis(100),
        ))
    }

    /// A full sync to `uri` in `copy_mode`, unlimited.
    fn full_to(uri: Uri, copy_mode: CopyMode) -> JobParams {
        JobParams {
            uri,
            incremental: false,
            copy_mode,
            max_bandwidth: 0,
        }
    }

    pub(super) fn ready_job_via(
        copy_mode: CopyMode,
        relayed: bool,
    ) -> (
        TestBackend,
        TestBackend,
        TestFrontend,
        Arc<Migrations>,
        Arc<std::sync::atomic::AtomicBool>,
    ) {
        let src = backend(true, false);
        let (dst, dst_path) = listening_destination();
        let stall = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let uri = if relayed {
            let relay = dst.dir.path().join("relay.sock");
            stalling_relay(&relay, dst_path, stall.clone());
            Uri::Unix(relay)
        } else {
            Uri::Unix(dst_path)
        };
        let mut fe = TestFrontend::connect(src.socket(), FrontendOptions::default()).unwrap();
        assert_eq!(write(&mut fe, 0, &[0x11; 4096]), status::OK);
        let m = migrations(&src);
        m.start(full_to(uri, copy_mode)).unwrap();
        wait_status(&m, "ready");
        (src, dst, fe, m, stall)
    }

    /// Listens at `at`; for one connection, relays everything from `to` back as it is,
    /// and has `forward` move what the source sends on (source side, destination side);
    /// then shuts the destination's side down.
    fn relay(
        at: &std::path::Path,
        to: std::path::PathBuf,
        forward: impl FnOnce(&mut UnixStream, &mut UnixStream) + Send + 'static,
    ) {
        let l = std::os::unix::net::UnixListener::bind(at).unwrap();
        std::thread::spawn(move || {
            let (mut from_src, _) = l.accept().unwrap();
            let mut to_dst = UnixStream::connect(&to).unwrap();
            let (mut back_in, mut back_out) =
                (to_dst.try_clone().unwrap(), from_src.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut back_in, &mut back_out);
            });
            forward(&mut from_src, &mut to_dst);
            let _ = to_dst.shutdown(std::net::Shutdown::Both);
        });
    }

    /// Listens at `at`; relays one connection to `to` both ways, until `stall` is set:
    /// then what the source sends is no longer forwarded (nor is the connection closed).
    fn stalling_relay(
        at: &std::path::Path,
        to: std::path::PathBuf,
        stall: Arc<std::sync::atomic::AtomicBool>,
    ) {
        use std::sync::atomic::Ordering;
        relay(at, to, move |from_src, to_dst| {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match from_src.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if stall.load(Ordering::Acquire) {
                    // Hold the connection open, forward nothing more.
                    continue;
                }
                if to_dst.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }

    /// Listens at `at`; relays one connection to `to`, frame by frame, and cuts the
    /// source's side right after its Complete frame went through: the destination's Ack
    /// is written into a live connection (for 2 s) and never reaches the source.
    fn relay_cut_after_complete(at: &std::path::Path, to: std::path::PathBuf) {
        const HEADER: usize = 32;
        const COMPLETE: u16 = 5; // the stream's kind number of Complete
        relay(at, to, |from_src, to_dst| {
            let mut head = [0u8; HEADER];
            while from_src.read_exact(&mut head).is_ok() {
                let kind = u16::from_le_bytes([head[6], head[7]]);
                let len = u32::from_le_bytes([head[24], head[25], head[26], head[27]]);
                let mut payload = vec![0u8; len as usize];
                if from_src.read_exact(&mut payload).is_err()
                    || to_dst.write_all(&head).is_err()
                    || to_dst.write_all(&payload).is_err()
                {
                    break;
                }
                if kind == COMPLETE {
                    // The source's side goes; the destination's Ack lands in a live
                    // connection and goes nowhere.
                    let _ = from_src.shutdown(std::net::Shutdown::Both);
                    std::thread::sleep(Duration::from_secs(2));
                    break;
                }
            }
            let _ = from_src.shutdown(std::net::Shutdown::Both);
        });
    }

    /// The destination got the whole sync and acked it, but the Ack was lost: the source
    /// cannot know the destination has the disk, so it keeps serving; the destination
    /// must then not serve too (two writers on two copies). It holds until a sync it
    /// knows the source saw completes: the retry.
    #[test]
    fn a_lost_ack_never_leaves_both_ends_serving_and_a_retry_hands_over() {
        let src = backend(true, false);
        let (dst, dst_path) = listening_destination();
        let relay = dst.dir.path().join("relay.sock");
        relay_cut_after_complete(&relay, dst_path.clone());
        let mut fe = TestFrontend::connect(src.socket(), FrontendOptions::default()).unwrap();
        let m = migrations(&src);
        m.start(full_to(Uri::Unix(relay), CopyMode::Background))
            .unwrap();
        wait_status(&m, "ready");
        m.complete().unwrap();
        wait_status(&m, "concluded");
        assert!(
            m.query().unwrap().get("error").is_some(),
            "the Ack was lost"
        );
        assert!(src.shared.gate.is_open(), "the source keeps the disk");
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !dst.shared.gate.is_open(),
            "the destination serves while the source does: two copies written"
        );
        // The source goes on; then a retry hands over.
        assert_eq!(write(&mut fe, 40, &[0x66; 4096]), status::OK);
        m.start(full_to(Uri::Unix(dst_path), CopyMode::Background))
            .unwrap();
        wait_status(&m, "ready");
        m.complete().unwrap();
        wait_status(&m, "concluded");
        let q = m.query().unwrap();
        assert!(q.get("error").is_none(), "{q}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !dst.shared.gate.is_open() {
            assert!(Instant::now() < deadline, "the destination does not serve");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!src.shared.gate.is_open());
        assert!(image(&src) == image(&dst));
        assert_eq!(&image(&dst)[40 * 512..40 * 512 + 4096], &[0x66; 4096][..]);
    }

    /// A write the I/O throttle holds (taken from its ring, not started) when the hand-over
    /// begins starts before the gate closes: the destination gets it, the guest sees it
    /// complete; it is not left to start on the source after the disk went.
    #[test]
    fn a_throttled_write_is_in_the_hand_over() {
        let src = backend(true, false);
        let (dst, dst_path) = listening_destination();
        let mut fe = TestFrontend::connect(src.socket(), FrontendOptions::default()).unwrap();
        src.shared
            .set_io_limits(vhost_blk_backend::throttle::Limits {
                iops: 1,
                ..Default::default()
            });
        let reqs: Vec<_> = (0..2u64)
            .map(|i| {
                let r = blk_req(&mut fe, req_type::OUT, 80 + i * 8, 4096);
                fe.write(r.data, &[0x70 + i as u8; 4096]);
                fe.submit(0, &r.chain(false));
                r
            })
            .collect();
        fe.wait(0, 1).expect("the first write goes");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            src.shared
                .stats
                .parked
                .load(std::sync::atomic::Ordering::Acquire),
            1,
            "the second write waits for the throttle"
        );
        let m = migrations(&src);
        m.start(full_to(Uri::Unix(dst_path), CopyMode::Background))
            .unwrap();
        wait_status(&m, "ready");
        m.complete().unwrap();
        wait_status(&m, "concluded");
        let q = m.query().unwrap();
        assert!(q.get("error").is_none(), "{q}");
        fe.wait(0, 1).expect("the throttled write completed");
        for r in &reqs {
            assert_eq!(r.status(&fe), status::OK);
        }
        assert!(image(&src) == image(&dst));
        assert_eq!(&image(&dst)[88 * 512..88 * 512 + 4096], &[0x71; 4096][..]);
        assert_eq!(src.shared.io_limits().iops, 1, "the limits are back");
        assert!(src
            .shared
            .throttle_on
            .load(std::sync::atomic::Ordering::Acquire));
    }

    pub(super) fn wait_status_of(m: &Migrations, want: &str) {
        wait_status(m, want)
    }

    #[test]
    fn log_all_and_every_ring_stopped_hand_the_disk_over() {
        let (src, dst, mut fe, m) = ready_job();
        // A write while ready: the last pass must carry it.
        assert_eq!(write(&mut fe, 8, &[0x22; 4096]), status::OK);
        let _log = fe.enable_dirty_log().unwrap();
        fe.fe.get_vring_base(0).unwrap();
        wait_status(&m, "concluded");
        let q = m.query().unwrap();
        assert!(q.get("error").is_none(), "{q}");
        assert!(q["downtime-ms"].as_f64().is_some());
        assert!(serves_soon(&dst), "the destination serves");
        assert!(!src.shared.gate.is_open(), "the source holds");
        assert!(image(&src) == image(&dst));
        assert_eq!(&image(&dst)[4096..8192], &[0x22; 4096][..]);
    }

    #[test]
    fn a_plain_pause_does_not_hand_over() {
        let (src, dst, mut fe, m) = ready_job();
        // No LOG_ALL: a stop/cont, a snapshot, a reset... not a migration.
        fe.fe.get_vring_base(0).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(status(&m), "ready");
        assert!(src.shared.gate.is_open());
        assert!(!dst.shared.gate.is_open());
        fe.start_queue_at(0, fe.queues[0].avail_idx()).unwrap();
        assert_eq!(write(&mut fe, 16, &[0x33; 4096]), status::OK);
        m.cancel().unwrap();
        wait_status(&m, "concluded");
        assert!(
            src.shared.gate.is_open(),
            "a cancelled job leaves the source serving"
        );
    }

    #[test]
    fn the_source_serves_again_when_the_vm_resumes_there_after_the_hand_over() {
        let (src, _dst, mut fe, m) = ready_job();
        let _log = fe.enable_dirty_log().unwrap();
        fe.fe.get_vring_base(0).unwrap();
        wait_status(&m, "concluded");
        assert!(!src.shared.gate.is_open());
        // The VMM's migration failed: it restarts the rings on the same connection.
        fe.disable_dirty_log().unwrap();
        fe.start_queue_at(0, fe.queues[0].avail_idx()).unwrap();
        assert_eq!(write(&mut fe, 24, &[0x44; 4096]), status::OK);
        let (data, st) = read(&mut fe, 24, 4096);
        assert_eq!((st, data), (status::OK, vec![0x44; 4096]));
        // And that write is what the next sync to the (stale) destination sends.
        assert_eq!(src.shared.dirty.count(), 1);
        assert!(src.shared.dirty.is_dirty(3));
    }

    #[test]
    fn the_destination_is_marked_stale_when_the_vm_stays_on_the_source_and_a_retry_works() {
        let (src, dst, mut fe, m) = ready_job();
        let _log = fe.enable_dirty_log().unwrap();
        fe.fe.get_vring_base(0).unwrap();
        wait_status(&m, "concluded");
        assert!(serves_soon(&dst), "the destination took the disk");
        // A handed-over source owns nothing to migrate.
        let uri = Uri::Unix(dst.dir.path().join("mig.sock"));
        let params = JobParams {
            uri,
            incremental: true,
            copy_mode: CopyMode::Background,
            max_bandwidth: 0,
        };
        let e = m.start(params.clone()).unwrap_err();
        assert!(e.to_string().contains("no longer owns"), "{e}");
        // The VMM's migration failed: the VM runs on the source again.
        fe.disable_dirty_log().unwrap();
        fe.start_queue_at(0, fe.queues[0].avail_idx()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while dst.shared.gate.is_open() || !dst.shared.sync.lock().unwrap().incomplete {
            assert!(Instant::now() < deadline, "the destination was not told");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(write(&mut fe, 32, &[0x55; 4096]), status::OK);
        // The destination waits for a new sync; a retry makes it whole and serves.
        m.start(params).unwrap();
        wait_status(&m, "ready");
        m.complete().unwrap();
        wait_status(&m, "concluded");
        let q = m.query().unwrap();
        assert!(q.get("error").is_none(), "{q}");
        assert_eq!(
            q["mode"], "full",
            "a stale destination takes a full sync: {q}"
        );
        assert!(serves_soon(&dst));
        assert!(!dst.shared.sync.lock().unwrap().incomplete);
        assert!(image(&src) == image(&dst));
        assert_eq!(&image(&dst)[32 * 512..32 * 512 + 4096], &[0x55; 4096][..]);
    }
}

mod write_blocking {
    //! Active mirroring (`copy-mode write-blocking`): once the job mirrors, a write
    //! completes to the guest only when its blocks are on the destination; a destination
    //! that stops answering holds the guest's writes, and a cancel releases them with the
    //! source serving on; the VMM's pause drains the rings with writes waiting for their
    //! round.

    use super::vmm_driven::{ready_job_via, wait_status_of};
    use super::*;
    use std::sync::atomic::Ordering;
    use vhost::VhostBackend;
    use vhost_blk_backend::migration::job::CopyMode;

    fn on_destination(dst: &TestBackend, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        std::fs::File::open(&dst.image)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    }

    #[test]
    fn every_write_is_on_the_destination_before_it_completes() {
        let (src, dst, mut fe, m, _) = ready_job_via(CopyMode::WriteBlocking, false);
        let q = m.query().unwrap();
        assert_eq!(q["phase"], "mirror", "{q}");
        assert_eq!(q["copy-mode"], "write-blocking", "{q}");
        for i in 0..24u64 {
            let sector = 64 + i * 24;
            let data = vec![0x40 + i as u8; 4096];
            assert_eq!(write(&mut fe, sector, &data), status::OK);
            // Read at once from the destination's image, behind both backends' backs.
            assert!(
                on_destination(&dst, sector * 512, 4096) == data,
                "write {i} completed before it reached the destination"
            );
        }
        // Write-zeroes and discard are mirrored as well.
        assert_eq!(
            range_request(&mut fe, req_type::WRITE_ZEROES, &[(64, 8, 0)]),
            status::OK
        );
        assert!(on_destination(&dst, 64 * 512, 4096) == vec![0u8; 4096]);
        let rounds = m.query().unwrap()["mirror-rounds"].as_u64().unwrap();
        assert!(rounds >= 1, "no mirroring round: {}", m.query().unwrap());
        m.complete().unwrap();
        wait_status_of(&m, "concluded");
        let q = m.query().unwrap();
        assert!(q.get("error").is_none(), "{q}");
        assert!(image(&src) == image(&dst));
        assert!(serves_soon(&dst));
    }

    #[test]
    fn a_stalled_destination_holds_writes_and_a_cancel_releases_them() {
        let (src, dst, mut fe, m, stall) = ready_job_via(CopyMode::WriteBlocking, true);
        stall.store(true, Ordering::Release);
        let r = blk_req(&mut fe, req_type::OUT, 200, 4096);
        fe.write(r.data, &[0x5a; 4096]);
        fe.submit(0, &r.chain(false));
        std::thread::sleep(Duration::from_millis(400));
        // (ready_job_via's own write was the first.)
        assert_eq!(
            fe.queues[0].used_idx(&fe.mem),
            1,
            "the write completed without reaching the destination"
        );
        m.cancel().unwrap();
        // Woken at once by the cancel (the stream's own timeout is a minute).
        wait_status_of(&m, "concluded");
        let q = m.query().unwrap();
        assert_eq!(q["error"], "cancelled", "{q}");
        fe.wait(0, 1)
            .expect("the held write completes after the cancel");
        assert_eq!(r.status(&fe), status::OK);
        // The source serves on, with the write; every block waits for the next sync.
        assert!(src.shared.gate.is_open());
        let (data, st) = read(&mut fe, 200, 4096);
        assert_eq!((st, data), (status::OK, vec![0x5a; 4096]));
        assert_eq!(src.shared.dirty.count(), src.shared.dirty.blocks());
        assert!(!dst.shared.gate.is_open(), "the destination stays held");
    }

    #[test]
    fn the_vmm_pause_drains_writes_waiting_for_their_round_and_hands_over() {
        let (src, dst, mut fe, m, _) = ready_job_via(CopyMode::WriteBlocking, false);
        let _log = fe.enable_dirty_log().unwrap();
        let r = blk_req(&mut fe, req_type::OUT, 400, 4096);
        fe.write(r.data, &[0x6b; 4096]);
        fe.submit(0, &r.chain(false));
        // GET_VRING_BASE returns only once the write has completed (its round landed).
        fe.fe.get_vring_base(0).unwrap();
        // (ready_job_via's own write was the first.)
        assert_eq!(fe.queues[0].used_idx(&fe.mem), 2);
        assert_eq!(r.status(&fe), status::OK);
        wait_status_of(&m, "concluded");
        let q = m.query().unwrap();
        assert!(q.get("error").is_none(), "{q}");
        assert!(serves_soon(&dst) && !src.shared.gate.is_open());
        assert!(on_destination(&dst, 400 * 512, 4096) == vec![0x6b; 4096]);
        assert!(image(&src) == image(&dst));
    }
}

mod tls {
    //! Migration over TCP with TLS, from credentials in QEMU's tls-creds-x509 layout that
    //! the test makes: mutual authentication both ways, a foreign client or a plain one
    //! refused with nothing written.

    use super::*;
    use vhost_blk_backend::migration::tls::TlsCreds;
    use vhost_blk_backend::migration::transport::{connect, listen, Security, Uri};

    /// A CA and its server and client certificates in `dir`, QEMU's file names.
    fn make_creds(dir: &std::path::Path, ca_name: &str) {
        vhost_tests::blk_migration::make_tls_creds(dir, ca_name).unwrap();
    }

    fn secure(dir: &std::path::Path) -> Security {
        Security {
            insecure: false,
            tls: Some(TlsCreds::new(dir)),
        }
    }

    /// Listens on a free loopback port with `dst_sec`; returns the URI and the listener.
    fn tcp_listener(
        dst_sec: &Security,
    ) -> (Uri, vhost_blk_backend::migration::transport::Listener) {
        let l = listen(&"tcp:127.0.0.1:0".parse().unwrap(), dst_sec).unwrap();
        let port = l.local_port().unwrap();
        (format!("tcp:127.0.0.1:{port}").parse().unwrap(), l)
    }

    #[test]
    fn a_sync_over_tls_with_certificates_from_one_authority_works() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("creds");
        make_creds(&creds, "migration CA");
        let src = backend(true, false);
        let dst = backend(false, true);
        let (uri, mut l) = tcp_listener(&secure(&creds));
        let accept = job_thread(move || l.accept().map(|c| (c, l)));
        let a = job_thread(move || connect(&uri, &secure(&creds)))
            .join()
            .unwrap()
            .unwrap();
        let (b, _l) = accept.join().unwrap().unwrap();
        assert!(matches!(a, Conn::Tls(_)) && matches!(b, Conn::Tls(_)));
        let (stats, got, _) = sync_over(&src, &dst, Mode::Full, a, b).unwrap();
        assert_eq!(got.data_bytes, stats.data_bytes);
        assert!(image(&src) == image(&dst));
    }

    #[test]
    fn a_client_of_another_authority_or_without_tls_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (ours, theirs) = (dir.path().join("ours"), dir.path().join("theirs"));
        make_creds(&ours, "migration CA");
        make_creds(&theirs, "another CA");
        let (uri, mut l) = tcp_listener(&secure(&ours));
        // A source whose certificates come from another authority: the handshake fails
        // on both ends (it does not trust our server either).
        let accept = std::thread::spawn(move || {
            let r = l.accept().map(|_| ());
            (r, l)
        });
        let e = connect(&uri, &secure(&theirs)).unwrap_err();
        assert!(e.to_string().contains("TLS"), "{e}");
        let (r, mut l) = accept.join().unwrap();
        assert!(r.is_err(), "the destination accepted a foreign client");
        // A source that trusts our authority but holds a certificate of another: only
        // the destination's check of client certificates can refuse it.
        let mixed = dir.path().join("mixed");
        std::fs::create_dir_all(&mixed).unwrap();
        std::fs::copy(ours.join("ca-cert.pem"), mixed.join("ca-cert.pem")).unwrap();
        for f in ["client-cert.pem", "client-key.pem"] {
            std::fs::copy(theirs.join(f), mixed.join(f)).unwrap();
        }
        let accept = std::thread::spawn(move || {
            let r = l.accept().map(|_| ());
            (r, l)
        });
        let _ = connect(&uri, &secure(&mixed)).map(|mut c| c.write_all(b"x"));
        let (r, mut l) = accept.join().unwrap();
        let e = r.expect_err("the destination accepted a client certificate of another CA");
        assert!(e.to_string().contains("TLS"), "{e}");
        // A plain TCP source (with consent on its end only): no TLS handshake, refused.
        let accept = std::thread::spawn(move || l.accept().map(|_| ()));
        let mut plain = connect(&uri, &Security::plain(true)).unwrap();
        let _ = plain.write_all(b"VHBM not a TLS hello, just a plain stream\n");
        plain.shutdown();
        assert!(
            accept.join().unwrap().is_err(),
            "the destination took a plain stream"
        );
    }
}
