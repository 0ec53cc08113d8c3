//! The layer's rings seen from the driver: chains direct and indirect, several queues,
//! and the notification rules (event_idx, VRING_AVAIL_F_NO_INTERRUPT). Moved here from
//! blk's protocol tests, on the echo device.

mod echo;

use std::time::{Duration, Instant};

use echo::{pattern, EchoBackend};
use vhost::vhost_user::VhostUserFrontend;
use vhost_tests::frontend::{wait_eventfd, Buf, FrontendOptions, TestFrontend, EVENT_IDX};

fn connect(b: &EchoBackend, opts: FrontendOptions) -> TestFrontend {
    TestFrontend::connect(b.socket(), opts).expect("connect")
}

/// Guest buffers of one echo: `data` in a readable buffer, a writable one as long.
struct Echo {
    src: u64,
    dst: u64,
    data: Vec<u8>,
}

impl Echo {
    fn new(fe: &mut TestFrontend, data: Vec<u8>) -> Self {
        let src = fe.alloc(data.len() as u64);
        let dst = fe.alloc(data.len() as u64);
        fe.write(src, &data);
        Self { src, dst, data }
    }

    fn chain(&self) -> Vec<Buf> {
        let len = self.data.len() as u32;
        vec![Buf::ro(self.src, len), Buf::wo(self.dst, len)]
    }

    /// The device wrote the data back.
    fn check(&self, fe: &TestFrontend, what: &str) {
        assert_eq!(
            fe.read(self.dst, self.data.len()),
            self.data,
            "{what}: echoed bytes"
        );
    }
}

/// Waits for the backend to count `n` interrupts on queue 0: it counts each just after
/// publishing the used index a driver may already have seen.
fn wait_notifications(b: &EchoBackend, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.notifications(0) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn two_queues_serve_chains_independently() {
    let b = EchoBackend::start(2);
    let mut fe = connect(
        &b,
        FrontendOptions {
            num_queues: 2,
            ..Default::default()
        },
    );
    assert_eq!(fe.fe.get_queue_num().unwrap(), 2);
    let mut echoes = Vec::new();
    for i in 0..32u8 {
        let q = u16::from(i % 2);
        let e = Echo::new(&mut fe, pattern(i, 4096));
        let dq = &mut fe.queues[usize::from(q)];
        let head = dq.add_chain(&fe.mem, &e.chain());
        dq.publish(&fe.mem, head);
        echoes.push((q, head, e));
    }
    fe.queues[0].notify();
    fe.queues[1].notify();
    let used = [fe.wait(0, 16).unwrap(), fe.wait(1, 16).unwrap()];
    for (q, head, e) in &echoes {
        let u = used[usize::from(*q)]
            .iter()
            .find(|u| u.id == u32::from(*head))
            .unwrap_or_else(|| panic!("head {head} not used on queue {q}"));
        assert_eq!(u.len, 4096, "bytes written reported");
        e.check(&fe, &format!("queue {q} head {head}"));
    }
    for q in 0..2 {
        assert_eq!(
            b.stats(q)
                .completed
                .load(std::sync::atomic::Ordering::SeqCst),
            16,
            "queue {q}"
        );
    }
}

#[test]
fn indirect_chains_are_walked_in_order() {
    let b = EchoBackend::start(1);
    let mut fe = connect(&b, FrontendOptions::default());
    // Readable bytes in two descriptors, written back into three of the table.
    let data = pattern(7, 3000);
    let src = fe.alloc(3000);
    fe.write(src, &data);
    let dst = fe.alloc(3000);
    let table = fe.alloc(80);
    let chain = vec![
        Buf::ro(src, 1000),
        Buf::ro(src + 1000, 2000),
        Buf::wo(dst + 2000, 1000),
        Buf::wo(dst, 1500),
        Buf::wo(dst + 1500, 500),
    ];
    let dq = &mut fe.queues[0];
    let head = dq.add_indirect(&fe.mem, table, &chain);
    dq.publish(&fe.mem, head);
    dq.notify();
    let used = fe.wait(0, 1).unwrap();
    assert_eq!((used[0].id, used[0].len), (u32::from(head), 3000));
    // dst+0..1500 got bytes 1000..2500, dst+1500..2000 got 2500..3000, dst+2000.. got 0..1000.
    let mut expect = vec![0u8; 3000];
    expect[2000..].copy_from_slice(&data[..1000]);
    expect[..1500].copy_from_slice(&data[1000..2500]);
    expect[1500..2000].copy_from_slice(&data[2500..]);
    assert_eq!(
        fe.read(dst, 3000),
        expect,
        "writable descriptors in table order"
    );
    // And a plain indirect echo, as a driver with INDIRECT_DESC sends them.
    let e = Echo::new(&mut fe, pattern(9, 2048));
    let table = fe.alloc(32);
    let dq = &mut fe.queues[0];
    let head = dq.add_indirect(&fe.mem, table, &e.chain());
    dq.publish(&fe.mem, head);
    dq.notify();
    assert_eq!(fe.wait(0, 1).unwrap()[0].len, 2048);
    e.check(&fe, "indirect echo");
}

#[test]
fn event_idx_suppresses_and_publishes_indices() {
    let b = EchoBackend::start(1);
    let mut fe = connect(
        &b,
        FrontendOptions {
            event_idx: true,
            ..Default::default()
        },
    );
    assert_ne!(fe.features & EVENT_IDX, 0, "event_idx negotiated");
    // Ask for an interrupt only after the 4th completion (used_event = 3).
    fe.queues[0].set_used_event(&fe.mem, 3);
    let echoes: Vec<_> = (0..4u8)
        .map(|i| Echo::new(&mut fe, pattern(i, 512)))
        .collect();
    for e in &echoes[..2] {
        fe.submit(0, &e.chain());
        fe.queues[0]
            .wait_used(&fe.mem, 1, Duration::from_secs(5))
            .unwrap();
    }
    // Two completions so far, below used_event: no interrupt may have been sent.
    let _ = fe.queues[0].call.read();
    assert_eq!(b.notifications(0), 0);
    // The backend tells the driver which avail index to kick at. It writes avail_event
    // when it re-enables notifications, after publishing the used element the driver
    // just saw: wait for it rather than read it at once.
    let deadline = Instant::now() + Duration::from_secs(5);
    while fe.queues[0].avail_event(&fe.mem) != 2 {
        assert!(
            Instant::now() < deadline,
            "avail_event stayed at {} instead of 2",
            fe.queues[0].avail_event(&fe.mem)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    for e in &echoes[2..] {
        fe.submit(0, &e.chain());
        fe.queues[0]
            .wait_used(&fe.mem, 1, Duration::from_secs(5))
            .unwrap();
    }
    wait_notifications(&b, 1);
    assert_eq!(b.notifications(0), 1);
    for (i, e) in echoes.iter().enumerate() {
        e.check(&fe, &format!("echo {i}"));
    }
}

#[test]
fn without_event_idx_no_interrupt_is_honoured() {
    let b = EchoBackend::start(1);
    let mut fe = connect(&b, FrontendOptions::default());
    assert_eq!(fe.features & EVENT_IDX, 0, "event_idx negotiated");
    // VRING_AVAIL_F_NO_INTERRUPT: completions are published, the call eventfd stays quiet.
    fe.queues[0].set_avail_flags(&fe.mem, 1);
    for i in 0..3u8 {
        let e = Echo::new(&mut fe, pattern(i, 512));
        fe.submit(0, &e.chain());
        // Watch the used index, not the call eventfd (which must stay unsignalled).
        let deadline = Instant::now() + Duration::from_secs(5);
        while fe.queues[0].used_idx(&fe.mem) != u16::from(i) + 1 {
            assert!(Instant::now() < deadline, "echo {i} not completed");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(fe.queues[0].take_used(&fe.mem).len(), 1);
        e.check(&fe, &format!("echo {i}"));
    }
    assert!(
        !wait_eventfd(&fe.queues[0].call, Duration::from_millis(100)),
        "the call eventfd was signalled although the driver asked for no interrupts"
    );
    assert_eq!(
        b.notifications(0),
        0,
        "interrupts counted under NO_INTERRUPT"
    );
    // Flag cleared: interrupts again.
    fe.queues[0].set_avail_flags(&fe.mem, 0);
    let e = Echo::new(&mut fe, pattern(3, 512));
    fe.submit(0, &e.chain());
    assert!(
        wait_eventfd(&fe.queues[0].call, Duration::from_secs(5)),
        "no interrupt once NO_INTERRUPT was cleared"
    );
    e.check(&fe, "echo after the flag was cleared");
    assert_eq!(b.notifications(0), 1);
}

/// A started ring that the frontend disabled is not processed: chains wait on it until
/// SET_VRING_ENABLE turns it back on, which processes them without a kick.
#[test]
fn a_disabled_ring_waits_for_set_vring_enable() {
    let b = EchoBackend::start(1);
    let mut fe = connect(&b, FrontendOptions::default());
    fe.fe.set_vring_enable(0, false).unwrap();
    let e = Echo::new(&mut fe, pattern(12, 1024));
    fe.submit(0, &e.chain());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        fe.queues[0].used_idx(&fe.mem),
        0,
        "a disabled ring was processed"
    );
    fe.fe.set_vring_enable(0, true).unwrap();
    assert_eq!(fe.wait(0, 1).unwrap()[0].len, 1024);
    e.check(&fe, "echo after the enable");
}
