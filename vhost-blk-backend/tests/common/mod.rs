//! Starting an in-process vhost-blk backend on a temporary image for frontend tests.
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vhost_blk_backend::shared::BlkShared;
use vhost_blk_backend::spec::{req_type, HEADER_SIZE};
use vhost_blk_backend::{BlkDevice, BlkOptions, CacheMode, Disk};
use vhost_tests::frontend::{Buf, TestFrontend, Used};
use vhost_tests::in_process::InProcessServer;
pub use vhost_user_device::engine::EngineChoice;
use vhost_user_device::ServerError;

/// A running backend on a temporary image.
pub struct TestBackend {
    // First, so that it is dropped (the server stopped) before the directory goes.
    server: InProcessServer,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub image: PathBuf,
    pub shared: Arc<BlkShared>,
    pub stats: Vec<Arc<vhost_user_device::QueueStats>>,
}

pub struct BackendConfig {
    pub size: u64,
    pub read_only: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub block_size: u32,
    pub cache: CacheMode,
    /// Fill the image with this byte pattern function of the offset.
    pub fill: bool,
    /// Put the image in /dev/shm (tmpfs: the backend does reads and writes inline)
    /// instead of cargo's temporary directory for tests (in the build directory, on disk).
    pub in_memory: bool,
    /// Adaptive polling window of the queue workers (0: off).
    pub poll_us: u32,
    /// Start with the gate closed, as `--incoming` does: requests wait for a sync.
    pub held: bool,
    /// `--io-engine`.
    pub io_engine: EngineChoice,
    /// `--pin-guest-memory`.
    pub pin_guest_memory: bool,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            size: 4 << 20,
            read_only: false,
            num_queues: 1,
            queue_size: 128,
            block_size: 512,
            cache: CacheMode::None,
            fill: true,
            in_memory: false,
            poll_us: 0,
            held: false,
            io_engine: EngineChoice::Auto,
            pin_guest_memory: false,
        }
    }
}

/// The byte the test image holds at `offset` (never zero, so zeroing is visible).
pub fn pattern(offset: u64) -> u8 {
    ((offset.wrapping_mul(2654435761) >> 7) as u8) | 1
}

pub fn pattern_range(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| pattern(offset + i)).collect()
}

impl TestBackend {
    pub fn start(cfg: BackendConfig) -> Self {
        let dir = if cfg.in_memory {
            tempfile::tempdir_in("/dev/shm").expect("tempdir in /dev/shm")
        } else {
            // Not the system's temporary directory: /tmp is a tmpfs on many machines,
            // and these images must be on a disk file system (io_uring, O_DIRECT).
            tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir")
        };
        let image = dir.path().join("disk.img");
        let f = std::fs::File::create(&image).expect("create image");
        f.set_len(cfg.size).expect("size image");
        if cfg.fill {
            f.write_all_at(&pattern_range(0, cfg.size as usize), 0)
                .expect("fill image");
        }
        drop(f);
        Self::start_on(dir, image, cfg)
    }

    pub fn start_on(dir: tempfile::TempDir, image: PathBuf, cfg: BackendConfig) -> Self {
        let socket = dir.path().join("blk.sock");
        let mut disk =
            Disk::open(&image, cfg.read_only, cfg.cache, cfg.block_size).expect("open disk");
        disk.choose_engine(cfg.io_engine).expect("engine");
        let device = BlkDevice::new(
            disk,
            &BlkOptions {
                num_queues: cfg.num_queues,
                queue_size: cfg.queue_size,
                block_size: cfg.block_size,
                serial: "test-serial-0123".into(),
                poll_us: cfg.poll_us,
                dirty: None,
                pin_guest_memory: cfg.pin_guest_memory,
            },
        );
        let shared = device.shared().clone();
        if cfg.held {
            shared.gate.close();
        }
        let server = InProcessServer::start(device, &socket);
        Self {
            stats: server.stats().to_vec(),
            server,
            dir,
            socket,
            image,
            shared,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn read_image(&self, offset: u64, len: usize) -> Vec<u8> {
        let f = std::fs::File::open(&self.image).expect("open image");
        let mut v = vec![0u8; len];
        f.read_exact_at(&mut v, offset).expect("read image");
        v
    }

    /// Stops the server and returns what it returned.
    pub fn stop(self) -> Result<(), ServerError> {
        self.server.stop()
    }
}

/// Guest-side buffers of one blk request.
pub struct BlkReq {
    pub hdr: u64,
    pub data: u64,
    pub data_len: u32,
    pub status: u64,
}

/// Allocates header/data/status buffers and writes the header.
pub fn blk_req(fe: &mut TestFrontend, type_: u32, sector: u64, data_len: u32) -> BlkReq {
    let hdr = fe.alloc(HEADER_SIZE as u64);
    let data = if data_len > 0 {
        fe.alloc(u64::from(data_len))
    } else {
        0
    };
    let status = fe.alloc(1);
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&type_.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    fe.write(hdr, &h);
    fe.write(status, &[0xff]);
    BlkReq {
        hdr,
        data,
        data_len,
        status,
    }
}

impl BlkReq {
    /// The usual three-descriptor chain; `device_writes_data` for IN / GET_ID.
    pub fn chain(&self, device_writes_data: bool) -> Vec<Buf> {
        let mut v = vec![Buf::ro(self.hdr, HEADER_SIZE as u32)];
        if self.data_len > 0 {
            v.push(Buf {
                addr: self.data,
                len: self.data_len,
                write: device_writes_data,
            });
        }
        v.push(Buf::wo(self.status, 1));
        v
    }

    pub fn status(&self, fe: &TestFrontend) -> u8 {
        fe.read(self.status, 1)[0]
    }
}

/// Submits one request and waits for it; returns (used element, status byte).
pub fn run(fe: &mut TestFrontend, q: u16, req: &BlkReq, device_writes: bool) -> (Used, u8) {
    fe.submit(q, &req.chain(device_writes));
    let used = fe.wait(q, 1).expect("completion");
    (used[0], req.status(fe))
}

pub fn read(fe: &mut TestFrontend, sector: u64, len: u32) -> (Vec<u8>, u8) {
    let r = blk_req(fe, req_type::IN, sector, len);
    let (used, st) = run(fe, 0, &r, true);
    assert_eq!(used.len, if st == 0 { len + 1 } else { 1 });
    (fe.read(r.data, len as usize), st)
}

pub fn write(fe: &mut TestFrontend, sector: u64, data: &[u8]) -> u8 {
    let r = blk_req(fe, req_type::OUT, sector, data.len() as u32);
    fe.write(r.data, data);
    run(fe, 0, &r, false).1
}

/// Whether the tests run as root (mounting and freezing file systems needs it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

// Not every test binary that includes this module freezes a file system.
#[allow(unused_imports)]
pub use vhost_tests::freeze::FreezableFs;

/// Writes discard / write-zeroes segments `(sector, sectors, flags)` into guest memory.
pub fn segments(fe: &mut TestFrontend, segs: &[(u64, u32, u32)]) -> u64 {
    let at = fe.alloc(16 * segs.len() as u64);
    let mut raw = Vec::new();
    for &(sector, num, flags) in segs {
        raw.extend_from_slice(&sector.to_le_bytes());
        raw.extend_from_slice(&num.to_le_bytes());
        raw.extend_from_slice(&flags.to_le_bytes());
    }
    fe.write(at, &raw);
    at
}

/// A discard or write-zeroes request with `segs` on queue 0; returns its status.
pub fn range_request(fe: &mut TestFrontend, type_: u32, segs: &[(u64, u32, u32)]) -> u8 {
    let r = blk_req(fe, type_, 0, 0);
    let payload = segments(fe, segs);
    let chain = vec![
        Buf::ro(r.hdr, 16),
        Buf::ro(payload, 16 * segs.len() as u32),
        Buf::wo(r.status, 1),
    ];
    fe.submit(0, &chain);
    fe.wait(0, 1).expect("completion");
    r.status(fe)
}
