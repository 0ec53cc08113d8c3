//! QEMU's own live migration with vhost-blk-backend attached: the backend logs every page
//! it writes (io_uring reads into guest memory included) and drains its rings at the
//! switch-over, so the destination guest sees exactly what the source guest had.
//! (Both QEMUs share one image here; `guest_block_migrate.rs` moves the disk too.)

use std::os::unix::fs::FileExt;
use std::time::Duration;

use vhost_tests::guest::{
    guest_script, sha256_file_range, vhost_user_blk_args, write_random, BlkBackend, BlkOpts,
    GuestBoot, GuestTest, VHOST_FALLBACK,
};
use vhost_tests::vm::{qemu_migrate, Vm};

const MIB: u64 = 1 << 20;
const CHUNKS: u64 = 32;
const CHUNK_BASE_MIB: u64 = 16;
const MARK_BLK: u64 = 8; // 4 KiB block 8 = 32 KiB into the disk

#[test]
fn guest_blk_live_migration_keeps_backend_written_memory() {
    let Some(mut t) = GuestTest::start("guest_blk_live_migration") else {
        return;
    };
    let blk = BlkBackend::from_env().expect("backend");
    if !matches!(blk, BlkBackend::VhostBlk(_)) {
        eprintln!("live migration test runs against vhost-blk-backend only");
        return;
    }
    let img = t.create_image("disk.img", 96 * MIB).unwrap();
    write_random(&img, 0, 96 * MIB, 0x5eed_0001).unwrap();
    let shas: Vec<String> = (0..CHUNKS)
        .map(|i| sha256_file_range(&img, (CHUNK_BASE_MIB + i) * MIB, MIB).unwrap())
        .collect();
    let sha_file = t.path("chunks.sha");
    std::fs::write(&sha_file, shas.join("\n") + "\n").unwrap();

    // Two backends on the same image: the source's and the destination's (shared storage).
    let (src_sock, dst_sock) = (t.path("src.sock"), t.path("dst.sock"));
    let mut src_be = t
        .spawn_backend(
            "src-backend",
            blk.command(&src_sock, &img, &BlkOpts::default()),
        )
        .unwrap();
    src_be
        .wait_for_socket(&src_sock, Duration::from_secs(10))
        .unwrap();
    let mut dst_be = t
        .spawn_backend(
            "dst-backend",
            blk.command(&dst_sock, &img, &BlkOpts::default()),
        )
        .unwrap();
    dst_be
        .wait_for_socket(&dst_sock, Duration::from_secs(10))
        .unwrap();

    let boot = GuestBoot::new(guest_script("blk-migrate.sh"))
        .file(guest_script("lib.sh"))
        .file(&sha_file)
        .env("CHUNKS", CHUNKS)
        .env("CHUNK_BASE_MIB", CHUNK_BASE_MIB)
        .env("MARK_BLK", MARK_BLK);
    let initrd = t.path("guest.initrd");
    t.build_initrd(&boot, &initrd).unwrap();
    let mut src = Vm::start(
        &t,
        "src",
        &boot,
        &initrd,
        &vhost_user_blk_args(&src_sock, 1),
    )
    .unwrap();
    src.wait_for("the migration point", Duration::from_secs(240), |r| {
        r.get("phase").is_some_and(|p| p == "migrate")
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let mig = format!("unix:{}", t.path("mig.sock").display());
    let incoming = ["-incoming".to_string(), mig.clone()];
    let mut dst = Vm::start(
        &t,
        "dst",
        &boot,
        &initrd,
        &[vhost_user_blk_args(&dst_sock, 1), incoming.to_vec()].concat(),
    )
    .unwrap();
    let m = qemu_migrate(&mut src, &mig, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n{}", src.tails()));
    // Tell the (now destination) guest the migration is over.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    let mut mark = vec![0u8; 4096];
    mark[..8].copy_from_slice(b"MIGRATED");
    f.write_all_at(&mark, MARK_BLK * 4096).unwrap();
    f.sync_all().unwrap();
    assert!(
        !src.stderr().contains(VHOST_FALLBACK),
        "source QEMU fell back to userspace virtio"
    );
    src.quit().unwrap_or_else(|e| panic!("{e}"));
    dst.wait_exit(Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("destination guest did not finish: {e}"));
    eprintln!(
        "migration completed in {:.1}s; destination results: {:?}",
        m.took.as_secs_f64(),
        dst.results
    );
    assert!(
        !dst.stderr().contains(VHOST_FALLBACK),
        "destination fell back: {}",
        dst.tails()
    );
    assert_eq!(dst.result("chunk_mismatches"), Some("0"), "{}", dst.tails());
    assert_eq!(dst.guest_exit, Some(0), "{}", dst.tails());
    // The write made on the destination reached the image.
    let post = dst
        .result("post_write_sha256")
        .expect("post-migration write");
    assert_eq!(sha256_file_range(&img, 4 * MIB, 4 * MIB).unwrap(), post);
    src_be.stop_expect_clean();
    dst_be.stop_expect_clean();
}
