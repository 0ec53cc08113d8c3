//! vhost-blk-backend in a real QEMU guest (Debian kernel, busybox initramfs).
//!
//! Each test starts the backend on a fresh image, boots a guest running one
//! of `tests/guest/scripts/blk-*.sh`, checks the `@@RESULT` values, and
//! after the guest is gone checks the image file on the host.
//!
//! Needs root (apt-get for QEMU and the guest kernel on first use, see
//! `tests/guest/setup.sh`); without that the tests print a loud SKIPPED
//! banner and return (`VHOST_GUEST_REQUIRE=1` turns that into a failure).
//! Guests run one at a time (2-core machines, TCG). The backend binary is
//! `$VHOST_BLK_BACKEND` or the newest `target/{release,debug}/vhost-blk-backend`
//! (build it first: `cargo build -p vhost-blk-backend`).
//! `VHOST_GUEST_BLK_IMPL=qsd` runs the same tests against
//! qemu-storage-daemon (to validate the harness).

use std::path::{Path, PathBuf};
use std::time::Duration;

use vhost_tests::guest::{
    file_range_is_zero, sha256_file_range, sha256_zeros, vhost_user_blk_args, write_random,
    Backend, BlkBackend, BlkOpts, GuestBoot, GuestTest,
};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Per-test setup: the guest harness (or `None` after a loud skip) and the
/// backend implementation under test.
fn start(name: &str) -> Option<(GuestTest, BlkBackend)> {
    let t = GuestTest::start(name)?;
    let blk = BlkBackend::from_env().unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{name}: backend under test: {blk:?}");
    Some((t, blk))
}

/// Starts the backend serving `img` and waits until its socket listens.
fn serve(t: &GuestTest, blk: &BlkBackend, img: &Path, opts: &BlkOpts) -> (Backend, PathBuf) {
    let sock = t.path("blk.sock");
    let mut be = t
        .spawn_backend("backend", blk.command(&sock, img, opts))
        .unwrap_or_else(|e| panic!("{e}"));
    be.wait_for_socket(&sock, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}"));
    (be, sock)
}

fn image_sha(img: &Path, off: u64, len: u64) -> String {
    sha256_file_range(img, off, len)
        .unwrap_or_else(|e| panic!("reading {} at {off}+{len}: {e}", img.display()))
}

fn image_zero(img: &Path, off: u64, len: u64) -> bool {
    file_range_is_zero(img, off, len)
        .unwrap_or_else(|e| panic!("reading {} at {off}+{len}: {e}", img.display()))
}

/// Test 1: 16 MiB random pattern written with O_DIRECT dd at an odd offset, read
/// back in the guest; the host finds the same bytes in the image file at
/// that offset, and zeros everywhere else.
#[test]
fn guest_blk_pattern_roundtrip() {
    let Some((mut t, blk)) = start("guest_blk_pattern_roundtrip") else {
        return;
    };
    let size = 128 * MIB;
    let (off, len) = (40 * MIB + 192 * KIB, 16 * MIB);
    let img = t.create_image("disk.img", size).expect("create image");
    let (mut be, sock) = serve(&t, &blk, &img, &BlkOpts::default());

    let out = t.boot(
        &GuestBoot::new("blk-pattern.sh")
            .env("PAT_OFF", off)
            .env("PAT_LEN", len)
            .qemu_args(vhost_user_blk_args(&sock, 1)),
    );
    out.assert_success();
    let written = out.result("written_sha256").to_string();
    assert_eq!(out.result("readback_sha256"), written, "guest read-back");
    assert_eq!(out.result_u64("dev_size_sectors"), size / 512);

    be.stop_expect_clean();
    assert_eq!(
        image_sha(&img, off, len),
        written,
        "image range vs guest pattern"
    );
    assert!(
        image_zero(&img, 0, off),
        "image: bytes before the range not zero"
    );
    let end = off + len;
    assert!(
        image_zero(&img, end, size - end),
        "image: bytes after the range not zero"
    );
}

/// Test 2: fio random writes with crc32c verification (32 MiB).
#[test]
fn guest_blk_fio_verify() {
    let Some((mut t, blk)) = start("guest_blk_fio_verify") else {
        return;
    };
    let img = t.create_image("disk.img", 96 * MIB).expect("create image");
    let (mut be, sock) = serve(&t, &blk, &img, &BlkOpts::default());

    let out = t.boot(
        &GuestBoot::new("blk-fio-verify.sh")
            .env("FIO_OFF", "32M")
            .env("FIO_SIZE", "32M")
            .qemu_args(vhost_user_blk_args(&sock, 1)),
    );
    out.assert_success();
    assert_eq!(out.result("fio_rc"), "0");
    assert_eq!(out.result("fio_errors"), "0");
    assert_eq!(
        out.result_u64("fio_write_kib"),
        32 * 1024,
        "fio wrote 32 MiB"
    );
    be.stop_expect_clean();
}

/// Test 2b: the same fio verify run on packed virtqueues (`packed=on`): the guest's
/// driver negotiates VIRTIO_F_RING_PACKED (bit 34 of the features it shows in sysfs)
/// and every block fio wrote reads back with its checksum.
#[test]
fn guest_blk_packed_fio_verify() {
    let Some((mut t, blk)) = start("guest_blk_packed_fio_verify") else {
        return;
    };
    let img = t.create_image("disk.img", 96 * MIB).expect("create image");
    let (mut be, sock) = serve(&t, &blk, &img, &BlkOpts::default());
    let mut qemu = vhost_user_blk_args(&sock, 1);
    qemu[3].push_str(",packed=on");

    let out = t.boot(
        &GuestBoot::new("blk-fio-verify.sh")
            .env("FIO_OFF", "16M")
            .env("FIO_SIZE", "32M")
            .env("FIO_IODEPTH", "32")
            .qemu_args(qemu),
    );
    out.assert_success();
    let features = out.result("dev_virtio_features");
    assert_eq!(
        features.as_bytes().get(34),
        Some(&b'1'),
        "VIRTIO_F_RING_PACKED not negotiated: {features}"
    );
    assert_eq!(out.result("fio_rc"), "0");
    assert_eq!(out.result("fio_errors"), "0");
    assert_eq!(
        out.result_u64("fio_write_kib"),
        32 * 1024,
        "fio wrote 32 MiB"
    );
    be.stop_expect_clean();
}

/// Test 3: Two queues: the guest gets two blk-mq hardware queues, and I/O from
/// each of its two CPUs (hence each queue) round-trips.
#[test]
fn guest_blk_two_queues() {
    let Some((mut t, blk)) = start("guest_blk_two_queues") else {
        return;
    };
    let (off, len) = (8 * MIB, 8 * MIB);
    let img = t.create_image("disk.img", 64 * MIB).expect("create image");
    let opts = BlkOpts {
        num_queues: Some(2),
        ..Default::default()
    };
    let (mut be, sock) = serve(&t, &blk, &img, &opts);

    let out = t.boot(
        &GuestBoot::new("blk-queues.sh")
            .cpus(2)
            .env("PAT_OFF", off)
            .env("PAT_LEN", len)
            .qemu_args(vhost_user_blk_args(&sock, 2)),
    );
    out.assert_success();
    assert_eq!(
        out.result_u64("dev_nr_queues"),
        2,
        "/sys/block/vda/mq entries"
    );
    assert_eq!(out.result_u64("cpus_checked"), 2);
    be.stop_expect_clean();
    for cpu in 0..2u64 {
        let w = out.result(&format!("cpu{cpu}_written_sha256"));
        assert_eq!(out.result(&format!("cpu{cpu}_readback_sha256")), w);
        assert_eq!(
            image_sha(&img, off + cpu * len, len),
            w,
            "image, cpu {cpu} range"
        );
    }
}

/// Test 4: Discard and write-zeroes read back as zeros (guest and image file);
/// the ranges around them keep the pattern.
#[test]
fn guest_blk_discard_write_zeroes() {
    let Some((mut t, blk)) = start("guest_blk_discard_write_zeroes") else {
        return;
    };
    let (off, len) = (16 * MIB, 24 * MIB);
    let img = t.create_image("disk.img", 64 * MIB).expect("create image");
    let (mut be, sock) = serve(&t, &blk, &img, &BlkOpts::default());

    let out = t.boot(
        &GuestBoot::new("blk-discard.sh")
            .env("PAT_OFF", off)
            .env("PAT_LEN", len)
            .qemu_args(vhost_user_blk_args(&sock, 1)),
    );
    out.assert_success();
    assert!(out.result_u64("dev_discard_max_bytes") > 0);
    assert!(out.result_u64("dev_write_zeroes_max_bytes") > 0);
    let zeros = sha256_zeros(4 * MIB);
    assert_eq!(out.result("zeros_sha256"), zeros);
    assert_eq!(
        out.result("discard_sha256"),
        zeros,
        "guest: discarded range"
    );
    assert_eq!(
        out.result("zeroout_sha256"),
        zeros,
        "guest: write-zeroes range"
    );

    be.stop_expect_clean();
    assert!(
        image_zero(&img, off + 4 * MIB, 4 * MIB),
        "image: discarded range not zero"
    );
    assert!(
        image_zero(&img, off + 12 * MIB, 4 * MIB),
        "image: write-zeroes range not zero"
    );
    let keep = [(0, 4 * MIB), (8 * MIB, 4 * MIB), (16 * MIB, len - 16 * MIB)];
    for (i, (o, l)) in keep.into_iter().enumerate() {
        assert_eq!(
            image_sha(&img, off + o, l),
            out.result(&format!("keep{i}_sha256")),
            "image: untouched range {i}"
        );
    }
}

/// Test 5: Flush: buffered writes made durable by fsync / sync. As soon as the
/// guest reports them flushed, the backend is SIGKILLed (no chance to write
/// anything back at exit); the image must hold the data.
#[test]
fn guest_blk_flush_durable() {
    let Some((mut t, blk)) = start("guest_blk_flush_durable") else {
        return;
    };
    let (a_off, b_off, len) = (8 * MIB, 24 * MIB, 4 * MIB);
    let img = t.create_image("disk.img", 64 * MIB).expect("create image");
    let opts = BlkOpts {
        cache: Some("writeback".into()),
        ..Default::default()
    };
    let (mut be, sock) = serve(&t, &blk, &img, &opts);

    let mut killed = false;
    let out = t.boot_with(
        &GuestBoot::new("blk-flush.sh")
            .env("A_OFF", a_off)
            .env("B_OFF", b_off)
            .env("LEN", len)
            .env("FLUSH_WAIT", 3)
            .qemu_args(vhost_user_blk_args(&sock, 1)),
        |line| {
            if !killed && line.contains("@@RESULT flushed=1") {
                be.kill();
                killed = true;
            }
        },
    );
    out.assert_success();
    assert!(killed, "guest never reported flushed=1");
    // qemu-storage-daemon offers CONFIG_WCE with wce=0, so the guest runs
    // its disk write-through there (and sends no FLUSH at all).
    if matches!(blk, BlkBackend::VhostBlk(_)) {
        assert_eq!(
            out.result("dev_write_cache"),
            "write_back",
            "with --cache writeback the guest must see a write-back cache (FLUSH, wce=1)"
        );
    }
    assert_eq!(
        image_sha(&img, a_off, len),
        out.result("a_sha256"),
        "image: dd conv=fsync range"
    );
    assert_eq!(
        image_sha(&img, b_off, len),
        out.result("b_sha256"),
        "image: dd + sync range"
    );
}

/// Test 6: Read-only: the guest sees a read-only disk, can read it, every write
/// attempt fails, and the image is unchanged.
#[test]
fn guest_blk_read_only() {
    let Some((mut t, blk)) = start("guest_blk_read_only") else {
        return;
    };
    let img = t.create_image("disk.img", 32 * MIB).expect("create image");
    let head = write_random(&img, 0, MIB, 0x5eed_0001).expect("fill image");
    write_random(&img, 16 * MIB, MIB, 0x5eed_0002).expect("fill image");
    let before = std::fs::read(&img).expect("read image");
    let opts = BlkOpts {
        read_only: true,
        ..Default::default()
    };
    let (mut be, sock) = serve(&t, &blk, &img, &opts);

    let out = t.boot(
        &GuestBoot::new("blk-readonly.sh")
            .env("READ_OFF", 0)
            .env("READ_LEN", MIB)
            .qemu_args(vhost_user_blk_args(&sock, 1)),
    );
    out.assert_success();
    assert_eq!(out.result("getro"), "1", "blockdev --getro");
    assert_eq!(out.result("dev_ro"), "1", "/sys/block/vda/ro");
    assert_eq!(out.result("read_sha256"), head, "guest reads the image");
    for k in ["write_rc", "write_buffered_rc", "zeroout_rc", "discard_rc"] {
        assert_ne!(out.result(k), "0", "{k}: a write succeeded");
    }
    be.stop_expect_clean();
    let after = std::fs::read(&img).expect("read image");
    assert!(after == before, "image changed under a read-only backend");
}

/// Test 7: Reconnect: one backend process serves two guests in a row; the second
/// reads what the first wrote.
#[test]
fn guest_blk_reconnect() {
    let Some((mut t, blk)) = start("guest_blk_reconnect") else {
        return;
    };
    let (off1, len1, off2, len2) = (4 * MIB, 8 * MIB, 20 * MIB, 4 * MIB);
    let img = t.create_image("disk.img", 64 * MIB).expect("create image");
    let (mut be, sock) = serve(&t, &blk, &img, &BlkOpts::default());

    let out1 = t.boot(
        &GuestBoot::new("blk-pattern.sh")
            .env("PAT_OFF", off1)
            .env("PAT_LEN", len1)
            .qemu_args(vhost_user_blk_args(&sock, 1)),
    );
    out1.assert_success();
    let w1 = out1.result("written_sha256").to_string();
    assert!(be.is_running(), "backend exited after the first guest");

    let out2 = t.boot(
        &GuestBoot::new("blk-pattern.sh")
            .env("CHECK_OFF", off1)
            .env("CHECK_LEN", len1)
            .env("CHECK_SHA", &w1)
            .env("PAT_OFF", off2)
            .env("PAT_LEN", len2)
            .qemu_args(vhost_user_blk_args(&sock, 1)),
    );
    out2.assert_success();
    assert_eq!(
        out2.result("check_sha256"),
        w1,
        "second guest reads first guest's data"
    );
    let w2 = out2.result("written_sha256").to_string();
    assert_eq!(out2.result("readback_sha256"), w2);

    be.stop_expect_clean();
    assert_eq!(
        image_sha(&img, off1, len1),
        w1,
        "image: first guest's range"
    );
    assert_eq!(
        image_sha(&img, off2, len2),
        w2,
        "image: second guest's range"
    );
}

/// Test 8: Geometry: 4 KiB logical blocks, an image size that is not a power of
/// two, one queue, serial; I/O at the very end of the disk works and a read
/// past it returns nothing.
#[test]
fn guest_blk_geometry_4k() {
    let Some((mut t, blk)) = start("guest_blk_geometry_4k") else {
        return;
    };
    let size = 100 * MIB + 12 * KIB;
    let tail = 64 * KIB;
    let serial = "vhost-geom-4k";
    let img = t.create_image("disk.img", size).expect("create image");
    let opts = BlkOpts {
        block_size: Some(4096),
        num_queues: Some(1),
        serial: Some(serial.into()),
        ..Default::default()
    };
    let (mut be, sock) = serve(&t, &blk, &img, &opts);

    let out = t.boot(
        &GuestBoot::new("blk-geometry.sh")
            .env("TAIL_LEN", tail)
            .qemu_args(vhost_user_blk_args(&sock, 1)),
    );
    out.assert_success();
    assert_eq!(
        out.result_u64("dev_size_sectors"),
        size / 512,
        "/sys/block/vda/size"
    );
    assert_eq!(
        out.result_u64("dev_size_bytes"),
        size,
        "blockdev --getsize64"
    );
    assert_eq!(out.result_u64("dev_logical_block_size"), 4096);
    assert!(out.result_u64("dev_physical_block_size") >= 4096);
    assert_eq!(out.result_u64("dev_nr_queues"), 1);
    if blk.supports_serial() {
        assert_eq!(out.result("dev_serial"), serial, "/sys/block/vda/serial");
    }
    let w = out.result("tail_written_sha256").to_string();
    assert_eq!(out.result("tail_readback_sha256"), w);
    assert_eq!(out.result_u64("past_end_bytes"), 0, "read past the end");

    be.stop_expect_clean();
    assert_eq!(image_sha(&img, size - tail, tail), w, "image: tail range");
}
