//! A guest that tries to keep a worker busy forever: every guest-driven loop must end
//! (sleep until a kick, or come back later through the worker's own eventfd) so the
//! worker stays responsive and cheap.
//!
//! Its own test binary: the RX test measures the CPU time of the `net-q0` threads of this
//! process, which other tests' workers would blur; the TX flood keeps a `net-q0` worker
//! busy on purpose, so the two take [`NET_Q0`] in turn.

mod common;

use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use vhost::VhostBackend;
use vhost_net_backend::spec::NetHdr;
use vhost_tests::frontend::{Buf, Used};
use vm_memory::{Bytes, GuestAddress};

const T: Duration = Duration::from_secs(5);

/// Held by the tests whose `net-q0` worker must not run beside another's (see the top).
static NET_Q0: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// CPU time (user + system) of this process's threads named `name`.
fn threads_cpu(name: &str) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let mut ticks = 0u64;
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    for t in dir.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let Some(end) = stat.rfind(')') else { continue };
        let f: Vec<&str> = stat[end + 1..].split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        ticks += num(11) + num(12);
    }
    Duration::from_millis(ticks * 1000 / tick)
}

/// Collects received frames until `n` arrived, and the heads of buffers returned unused
/// (length 0) meanwhile.
fn frames(
    fe: &mut vhost_tests::frontend::TestFrontend,
    bufs: &[(u16, u64)],
    n: usize,
) -> (Vec<Vec<u8>>, Vec<u32>) {
    let mut out = Vec::new();
    let mut unused = Vec::new();
    let mut pending: Vec<Used> = Vec::new();
    let deadline = Instant::now() + T;
    while out.len() < n && Instant::now() < deadline {
        if pending.is_empty() {
            pending.extend(fe.wait(0, 1).expect("used"));
        }
        if pending[0].len == 0 {
            unused.push(pending.remove(0).id);
            continue;
        }
        let (_, _, data) = recv_rx(fe, 0, bufs, &mut pending);
        out.push(data);
    }
    (out, unused)
}

#[test]
fn rx_unusable_buffer_behind_a_partial_frame_does_not_spin() {
    let _alone = NET_Q0.lock().unwrap_or_else(|e| e.into_inner());
    if !enter_netns("rx_unusable_buffer_behind_a_partial_frame_does_not_spin") {
        return;
    }
    let be = TestBackend::start(Config::default());
    let mut fe = be.connect();
    let sock = PacketSocket::open(TAP, false);
    // Two buffers: the 5000-byte frame is read into them and its rest kept aside.
    let mut bufs = post_rx(&mut fe, 0, 2, 2048);
    let first = test_frame(GUEST_MAC, HOST_MAC, 0xf000, 5000);
    sock.send(None, &first).expect("send");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(fe.queues[0].used_idx(&fe.mem), 0, "nothing published yet");
    // Then, with one kick, an unusable buffer (no room for the header) and a good one.
    let tiny = fe.alloc(4);
    let good = fe.alloc(2048);
    let dq = &mut fe.queues[0];
    let h_tiny = dq.add_chain(&fe.mem, &[Buf::wo(tiny, 4)]);
    let h_good = dq.add_chain(&fe.mem, &[Buf::wo(good, 2048)]);
    dq.publish_many(&fe.mem, &[h_tiny, h_good]);
    dq.notify();
    bufs.push((h_good, good));
    std::thread::sleep(Duration::from_millis(200));

    let before = threads_cpu("net-q0");
    std::thread::sleep(Duration::from_secs(1));
    let spent = threads_cpu("net-q0").saturating_sub(before);
    if spent > Duration::from_millis(300) {
        // A spinning worker never reads its command channel again: dropping the backend
        // would wait for it forever. Leave both behind and fail.
        std::mem::forget(fe);
        std::mem::forget(be);
        panic!("the RX worker spins: {spent:?} of CPU in 1 s");
    }

    // Traffic resumes: the first frame is complete (or, at the latest, completes once the
    // guest posts good buffers), and a new frame arrives.
    bufs.extend(post_rx(&mut fe, 0, 8, 2048));
    let second = test_frame(GUEST_MAC, HOST_MAC, 0xf001, 300);
    sock.send(None, &second).expect("send");
    let (got, unused) = frames(&mut fe, &bufs, 2);
    assert_eq!(got.len(), 2, "frames after the unusable buffer");
    assert_eq!(got[0], first);
    assert_eq!(got[1], second);
    assert!(be.drops(0, vhost_net_backend::stats::DropReason::RxBufferTooSmall) >= 1);
    assert_eq!(
        unused,
        vec![u32::from(h_tiny)],
        "the unusable buffer comes back once"
    );
}

/// Control queue index with one queue pair.
const CTRLQ: u16 = 2;

#[test]
fn control_queue_flood_does_not_keep_its_worker() {
    if !enter_netns("control_queue_flood_does_not_keep_its_worker") {
        return;
    }
    let (_be, mut fe, sock) = big_rings();
    // One heavy command (a MAC table of about 60 KiB), shared by every chain through one
    // indirect table.
    let macs = (60 * 1024) / 6;
    let mut cmd = vec![1u8, 0];
    cmd.extend_from_slice(&(macs as u32).to_le_bytes());
    cmd.extend(std::iter::repeat_n(0x02u8, macs * 6));
    cmd.extend_from_slice(&0u32.to_le_bytes());
    let c = fe.alloc(cmd.len() as u64);
    fe.write(c, &cmd);
    let ack = fe.alloc(1);
    let table = fe.alloc(32);
    let bufs = [Buf::ro(c, cmd.len() as u32), Buf::wo(ack, 1)];
    let flood = Flood::start(&mut fe, CTRLQ, table, &bufs);

    // TX and RX still move while the control queue is flooded.
    let frame = test_frame(HOST_MAC, GUEST_MAC, 0xc100, 200);
    send_tx(&mut fe, 0, NetHdr::default(), &frame);
    fe.wait(1, 1).expect("tx completion while flooded");
    sock.recv_matching(T, |f| has_tag(f, 0xc100))
        .expect("tx frame while flooded");
    assert_rx_moves(&mut fe, &sock, 0xc101);

    // The control queue's worker still answers the frontend: stopping the flooded ring
    // (GET_VRING_BASE) needs it to leave its loop.
    flood.stop_answers(&mut fe, 64);
}

/// A backend with 1024-entry rings (a long run of chains before a flooded ring could ever
/// run dry), a frontend connected to it and a packet socket on its tap.
fn big_rings() -> (
    TestBackend,
    vhost_tests::frontend::TestFrontend,
    PacketSocket,
) {
    let be = TestBackend::start(Config {
        queue_size: 1024,
        ..Config::default()
    });
    let fe = be.connect();
    let sock = PacketSocket::open(TAP, false);
    (be, fe, sock)
}

/// A frame sent on the tap with `tag` reaches the guest, whole.
fn assert_rx_moves(fe: &mut vhost_tests::frontend::TestFrontend, sock: &PacketSocket, tag: u32) {
    let rx = post_rx(fe, 0, 4, 2048);
    let frame = test_frame(GUEST_MAC, HOST_MAC, tag, 200);
    sock.send(None, &frame).expect("send");
    let mut pending = Vec::new();
    let (_, _, data) = recv_rx(fe, 0, &rx, &mut pending);
    assert_eq!(data, frame);
}

/// A flooding driver: every chain of one queue re-posted as soon as it comes back, with a
/// kick each time, so the queue's worker never finds the ring empty.
struct Flood {
    queue: u16,
    stop: Arc<AtomicBool>,
    driver: std::thread::JoinHandle<u64>,
}

impl Flood {
    /// Fills `queue` with chains of `bufs` (through one indirect table at `table`) and
    /// starts re-posting them.
    fn start(
        fe: &mut vhost_tests::frontend::TestFrontend,
        queue: u16,
        table: u64,
        bufs: &[Buf],
    ) -> Self {
        let size = fe.queues[usize::from(queue)].size;
        let heads: Vec<u16> = (0..size)
            .map(|_| fe.queues[usize::from(queue)].add_indirect(&fe.mem, table, bufs))
            .collect();
        let mem = fe.mem.clone();
        let (avail, used) = {
            let q = &fe.queues[usize::from(queue)];
            (q.avail, q.used)
        };
        let kick = fe.queues[usize::from(queue)]
            .kick
            .try_clone()
            .expect("kick fd");
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let driver = std::thread::spawn(move || {
            let put_avail = |idx: u16, head: u16| {
                let at = avail + 4 + 2 * u64::from(idx % size);
                let _ = mem.write_obj(head.to_le(), GuestAddress(at));
            };
            let mut avail_idx = 0u16;
            for &h in &heads {
                put_avail(avail_idx, h);
                avail_idx = avail_idx.wrapping_add(1);
            }
            fence(Ordering::Release);
            let _ = mem.write_obj(avail_idx.to_le(), GuestAddress(avail + 2));
            fence(Ordering::SeqCst);
            let _ = kick.write(1);
            let mut last_used = 0u16;
            let mut handled = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                fence(Ordering::Acquire);
                let used_idx = u16::from_le(mem.read_obj(GuestAddress(used + 2)).unwrap_or(0));
                if used_idx == last_used {
                    std::hint::spin_loop();
                    continue;
                }
                while last_used != used_idx {
                    let at = used + 4 + 8 * u64::from(last_used % size);
                    let id = u32::from_le(mem.read_obj(GuestAddress(at)).unwrap_or(0));
                    put_avail(avail_idx, id as u16);
                    avail_idx = avail_idx.wrapping_add(1);
                    last_used = last_used.wrapping_add(1);
                    handled += 1;
                }
                fence(Ordering::Release);
                let _ = mem.write_obj(avail_idx.to_le(), GuestAddress(avail + 2));
                fence(Ordering::SeqCst);
                let _ = kick.write(1);
            }
            handled
        });
        std::thread::sleep(Duration::from_millis(300));
        Flood {
            queue,
            stop,
            driver,
        }
    }

    /// Asks the backend to stop the flooded ring (GET_VRING_BASE, which its worker must
    /// leave its loop to answer), then stops the flood; asserts that the answer came in
    /// time and that more than `budget` chains went round (the worker was kept busy
    /// across several passes).
    fn stop_answers(self, fe: &mut vhost_tests::frontend::TestFrontend, budget: u64) {
        let (tx, rx) = std::sync::mpsc::channel();
        let queue = self.queue;
        let answered = std::thread::scope(|s| {
            s.spawn(move || {
                let r = fe.fe.get_vring_base(usize::from(queue));
                let _ = tx.send(r.is_ok());
            });
            let answered = rx.recv_timeout(T);
            // Let a stuck worker drain, so the thread above returns either way.
            self.stop.store(true, Ordering::Relaxed);
            answered
        });
        let handled = self.driver.join().expect("flooder");
        assert!(handled > budget, "the flood did not run: {handled}");
        assert_eq!(
            answered,
            Ok(true),
            "GET_VRING_BASE on flooded queue {queue} did not return within {T:?}"
        );
    }
}

/// A guest whose every TX frame is dropped (shorter than the virtio-net header) and who
/// re-posts each one as soon as it comes back: no frame is ever sent, so a budget counted
/// in frames sent never runs out. The worker must still leave its loop (RX moves, the
/// frontend's GET_VRING_BASE is answered).
#[test]
fn tx_flood_of_dropped_frames_does_not_keep_its_worker() {
    let _alone = NET_Q0.lock().unwrap_or_else(|e| e.into_inner());
    if !enter_netns("tx_flood_of_dropped_frames_does_not_keep_its_worker") {
        return;
    }
    let (be, mut fe, sock) = big_rings();
    let short = fe.alloc(4);
    let table = fe.alloc(16);
    let flood = Flood::start(&mut fe, 1, table, &[Buf::ro(short, 4)]);

    // RX, served by the same worker, still moves.
    assert_rx_moves(&mut fe, &sock, 0xc201);
    assert!(be.drops(1, vhost_net_backend::stats::DropReason::ShortChain) > 256);

    flood.stop_answers(&mut fe, 256);
}
