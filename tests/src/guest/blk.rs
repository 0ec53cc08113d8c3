//! The vhost-user-blk backends the guest tests drive: ours or qemu-storage-daemon.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::env::{find_in_path, is_executable, locate_binary};

/// Options of a vhost-user-blk backend, mirroring `vhost-blk-backend`'s CLI.
#[derive(Debug, Clone, Default)]
pub struct BlkOpts {
    pub read_only: bool,
    pub num_queues: Option<u16>,
    pub queue_size: Option<u16>,
    pub serial: Option<String>,
    /// `none` or `writeback`.
    pub cache: Option<String>,
    /// 512 or 4096.
    pub block_size: Option<u32>,
}

/// Which vhost-user-blk backend implementation the tests drive.
#[derive(Debug, Clone)]
pub enum BlkBackend {
    /// The project's `vhost-blk-backend` binary.
    VhostBlk(PathBuf),
    /// `qemu-storage-daemon` (reference implementation; for validating the
    /// harness itself).
    Qsd(PathBuf),
}

impl BlkBackend {
    /// `VHOST_GUEST_BLK_IMPL=qsd` selects qemu-storage-daemon (`$QSD` or from
    /// PATH); otherwise `vhost-blk-backend` located by
    /// [`BlkBackend::locate_vhost_blk_backend`].
    pub fn from_env() -> Result<BlkBackend, String> {
        match std::env::var("VHOST_GUEST_BLK_IMPL").as_deref() {
            Ok("qsd") | Ok("qemu-storage-daemon") => {
                let qsd = std::env::var_os("QSD")
                    .map(PathBuf::from)
                    .or_else(|| find_in_path("qemu-storage-daemon"))
                    .unwrap_or_else(|| PathBuf::from("qemu-storage-daemon"));
                if is_executable(&qsd) {
                    Ok(BlkBackend::Qsd(qsd))
                } else {
                    Err(format!(
                        "qemu-storage-daemon not found at {}",
                        qsd.display()
                    ))
                }
            }
            Ok("") | Ok("vhost-blk-backend") | Err(_) => {
                Self::locate_vhost_blk_backend().map(BlkBackend::VhostBlk)
            }
            Ok(other) => Err(format!(
                "VHOST_GUEST_BLK_IMPL={other:?}: want vhost-blk-backend or qsd"
            )),
        }
    }

    /// `$VHOST_BLK_BACKEND`, else the newest existing
    /// `{<target dir of this test binary>,$CARGO_TARGET_DIR,<workspace>/target}/{release,debug}/vhost-blk-backend`.
    pub fn locate_vhost_blk_backend() -> Result<PathBuf, String> {
        locate_binary("vhost-blk-backend", "VHOST_BLK_BACKEND")
    }

    pub fn name(&self) -> &'static str {
        match self {
            BlkBackend::VhostBlk(_) => "vhost-blk-backend",
            BlkBackend::Qsd(_) => "qemu-storage-daemon",
        }
    }

    /// Whether `BlkOpts::serial` reaches the guest.
    pub fn supports_serial(&self) -> bool {
        matches!(self, BlkBackend::VhostBlk(_))
    }

    /// The command serving `image` on `socket` (a stale socket file is
    /// removed first).
    pub fn command(&self, socket: &Path, image: &Path, o: &BlkOpts) -> Command {
        let _ = fs::remove_file(socket);
        match self {
            BlkBackend::VhostBlk(bin) => {
                let mut c = Command::new(bin);
                c.arg("--socket-path").arg(socket);
                c.arg("--blk-file").arg(image);
                if o.read_only {
                    c.arg("--read-only");
                }
                if let Some(n) = o.num_queues {
                    c.arg("--num-queues").arg(n.to_string());
                }
                if let Some(n) = o.queue_size {
                    c.arg("--queue-size").arg(n.to_string());
                }
                if let Some(s) = &o.serial {
                    c.arg("--serial").arg(s);
                }
                if let Some(m) = &o.cache {
                    c.arg("--cache").arg(m);
                }
                if let Some(b) = o.block_size {
                    c.arg("--block-size").arg(b.to_string());
                }
                c
            }
            BlkBackend::Qsd(bin) => {
                let img = image.to_string_lossy();
                let sock = socket.to_string_lossy();
                assert!(!img.contains(',') && !sock.contains(','), "',' in path");
                let direct = if o.cache.as_deref() == Some("writeback") {
                    "off"
                } else {
                    "on"
                };
                let ro = if o.read_only { "on" } else { "off" };
                let mut export = format!(
                    "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},\
                     writable={},num-queues={}",
                    if o.read_only { "off" } else { "on" },
                    o.num_queues.unwrap_or(1)
                );
                if let Some(b) = o.block_size {
                    let _ = write!(export, ",logical-block-size={b}");
                }
                let mut c = Command::new(bin);
                c.arg("--blockdev").arg(format!(
                    "driver=file,node-name=f0,filename={img},cache.direct={direct},\
                     aio=threads,discard=unmap,read-only={ro}"
                ));
                c.arg("--export").arg(export);
                c
            }
        }
    }
}
