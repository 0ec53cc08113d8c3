//! QEMU's own live migration with vhost-blk-backend attached: the backend logs every page
//! it writes (io_uring reads into guest memory included) and drains its rings at the
//! switch-over, so the destination guest sees exactly what the source guest had.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use vhost_tests::guest::{
    guest_script, parse_console, sha256_file_range, vhost_user_blk_args, write_random, BlkBackend,
    BlkOpts, GuestBoot, GuestTest, VHOST_FALLBACK,
};

const MIB: u64 = 1 << 20;
const CHUNKS: u64 = 32;
const CHUNK_BASE_MIB: u64 = 16;
const MARK_BLK: u64 = 8; // 4 KiB block 8 = 32 KiB into the disk

struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(30);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("QMP {}: {e}", path.display()),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut q = Qmp {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        };
        let mut greeting = String::new();
        q.reader.read_line(&mut greeting).expect("QMP greeting");
        q.cmd(r#"{"execute":"qmp_capabilities"}"#);
        q
    }

    /// Sends a command and returns its reply line (events are skipped).
    fn cmd(&mut self, json: &str) -> String {
        self.try_cmd(json)
            .unwrap_or_else(|e| panic!("QMP {json}: {e}"))
    }

    fn try_cmd(&mut self, json: &str) -> Result<String, String> {
        self.writer
            .write_all(format!("{json}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        loop {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("QEMU closed the QMP connection".into());
            }
            if line.contains("\"return\"") || line.contains("\"error\"") {
                return Ok(line);
            }
        }
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

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

    let (qmp_src, qmp_dst, mig) = (
        t.path("qmp-src.sock"),
        t.path("qmp-dst.sock"),
        t.path("mig.sock"),
    );
    let base = GuestBoot::new(guest_script("blk-migrate.sh"))
        .file(guest_script("lib.sh"))
        .file(&sha_file)
        .env("CHUNKS", CHUNKS)
        .env("CHUNK_BASE_MIB", CHUNK_BASE_MIB)
        .env("MARK_BLK", MARK_BLK)
        .timeout(Duration::from_secs(240));
    let src_boot = base
        .clone()
        .qemu_args(vhost_user_blk_args(&src_sock, 1))
        .qemu_args([
            "-qmp".to_string(),
            format!("unix:{},server=on,wait=off", qmp_src.display()),
        ]);
    let dst_boot = base
        .clone()
        .qemu_args(vhost_user_blk_args(&dst_sock, 1))
        .qemu_args([
            "-qmp".to_string(),
            format!("unix:{},server=on,wait=off", qmp_dst.display()),
        ])
        .qemu_args(["-incoming".to_string(), format!("unix:{}", mig.display())]);
    let dst_initrd = t.path("dst.initrd");
    t.build_initrd(&dst_boot, &dst_initrd).unwrap();
    let dst_console = t.path("dst.console.log");
    let dst_stderr = t.path("dst.qemu-stderr.log");
    let mut dst_cmd = t.qemu_command(&dst_boot, &dst_initrd);
    dst_cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&dst_console).unwrap())
        .stderr(std::fs::File::create(&dst_stderr).unwrap());

    let mut dst_cmd = Some(dst_cmd);
    let mut dst: Option<Child> = None;
    let mut migration: Option<Result<Duration, String>> = None;
    let out = t.boot_with(&src_boot, |line| {
        if !line.contains("@@RESULT phase=migrate") || migration.is_some() {
            return;
        }
        let started = Instant::now();
        let Some(mut cmd) = dst_cmd.take() else {
            return;
        };
        dst = Some(cmd.spawn().expect("start destination QEMU"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !mig.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut q = Qmp::connect(&qmp_src);
        q.cmd(r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":4294967296}}"#);
        let r = q.cmd(&format!(
            r#"{{"execute":"migrate","arguments":{{"uri":"unix:{}"}}}}"#,
            mig.display()
        ));
        if r.contains("error") {
            migration = Some(Err(format!("migrate refused: {r}")));
            return;
        }
        let result = loop {
            let s = match q.try_cmd(r#"{"execute":"query-migrate"}"#) {
                Ok(s) => s,
                Err(e) => break Err(format!("source QEMU went away during migration: {e}")),
            };
            if s.contains("\"completed\"") {
                break Ok(started.elapsed());
            }
            if s.contains("\"failed\"") || s.contains("\"cancelled\"") {
                break Err(format!("migration failed: {s}"));
            }
            if started.elapsed() > Duration::from_secs(120) {
                break Err(format!("migration did not complete: {s}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        // Tell the (now destination) guest the migration is over.
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        let mut mark = vec![0u8; 4096];
        mark[..8].copy_from_slice(b"MIGRATED");
        f.write_all_at(&mark, MARK_BLK * 4096).unwrap();
        f.sync_all().unwrap();
        let _ = q.try_cmd(r#"{"execute":"quit"}"#);
        migration = Some(result);
    });
    let took = match migration {
        Some(Ok(d)) => d,
        Some(Err(e)) => panic!(
            "{e}\nsource QEMU: {:?}\nstderr: {}\nconsole:\n{}",
            out.qemu_status, out.qemu_stderr, out.console
        ),
        None => panic!(
            "the guest never reached the migration point:\n{}",
            out.console
        ),
    };
    assert!(
        !out.qemu_stderr.contains(VHOST_FALLBACK),
        "source QEMU fell back to userspace virtio"
    );
    let mut dst = dst.expect("destination started");
    let exited = wait_exit(&mut dst, Duration::from_secs(180));
    if !exited {
        let _ = dst.kill();
    }
    let console = std::fs::read_to_string(&dst_console)
        .unwrap_or_default()
        .replace('\r', "");
    let stderr = std::fs::read_to_string(&dst_stderr).unwrap_or_default();
    let (results, status) = parse_console(&console);
    eprintln!(
        "migration completed in {:.1}s; destination results: {results:?}",
        took.as_secs_f64()
    );
    assert!(
        exited,
        "destination guest did not finish:\n{console}\n{stderr}"
    );
    assert!(
        !stderr.contains(VHOST_FALLBACK),
        "destination fell back: {stderr}"
    );
    assert_eq!(
        results.get("chunk_mismatches").map(String::as_str),
        Some("0"),
        "destination console:\n{console}\nstderr:\n{stderr}"
    );
    assert_eq!(status, Some(0), "destination console:\n{console}");
    // The write made on the destination reached the image.
    let post = results
        .get("post_write_sha256")
        .expect("post-migration write");
    assert_eq!(&sha256_file_range(&img, 4 * MIB, 4 * MIB).unwrap(), post);
    src_be.stop_expect_clean();
    dst_be.stop_expect_clean();
}
