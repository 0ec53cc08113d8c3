//! Opening the host side: a tap (attached or created, multi-queue, vnet header) or a
//! macvtap's `/dev/tapN`, one non-blocking fd per queue pair.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use crate::spec::{tun, HDR_LEN};

/// Errors opening or configuring the tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// /dev/net/tun or /dev/tapN could not be opened.
    #[error("cannot open {path}: {source} (run as root or with CAP_NET_ADMIN; is the tun module loaded?)")]
    Open {
        /// Device path.
        path: String,
        /// OS error.
        source: io::Error,
    },
    /// TUNSETIFF failed.
    #[error(
        "cannot attach to tap {name}: {source} (an existing tap must be multi-queue with a vnet \
         header and owned by this user: `ip tuntap add {name} mode tap multi_queue vnet_hdr`)"
    )]
    Attach {
        /// Interface name.
        name: String,
        /// OS error.
        source: io::Error,
    },
    /// The interface name is too long or contains a NUL.
    #[error("interface name {0:?} is not a valid interface name (1-15 bytes)")]
    BadName(String),
    /// A macvtap interface was not found.
    #[error("macvtap {name}: cannot read {path}: {source} (does the interface exist and is it a macvtap?)")]
    Macvtap {
        /// Interface name.
        name: String,
        /// sysfs path.
        path: String,
        /// OS error.
        source: io::Error,
    },
    /// A tap ioctl failed.
    #[error("{what} on {name} failed: {source}")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// Interface name.
        name: String,
        /// OS error.
        source: io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: libc::c_short) -> Result<Self, TapError> {
        let bytes = name.as_bytes();
        if bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(TapError::BadName(name.into()));
        }
        let mut r = Self {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        r.name[..bytes.len()].copy_from_slice(bytes);
        Ok(r)
    }

    fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// What to open.
#[derive(Clone, Debug)]
pub enum TapSpec {
    /// A tap interface by name (created if missing; an empty name lets the kernel pick).
    Tap(String),
    /// A macvtap interface by name (its /dev/tapN).
    Macvtap(String),
}

/// One queue of the tap.
#[derive(Debug)]
pub struct TapQueue {
    file: File,
}

impl std::os::fd::AsFd for TapQueue {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl TapQueue {
    /// The fd.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Attaches (`true`) or detaches the queue from the interface, so the kernel steers
    /// frames only to queues a driver reads.
    pub fn set_attached(&self, on: bool) -> io::Result<()> {
        let flags = if on {
            tun::IFF_ATTACH_QUEUE
        } else {
            tun::IFF_DETACH_QUEUE
        };
        let mut req = IfReq::new("", flags).map_err(|e| io::Error::other(e.to_string()))?;
        ioctl_ptr(self.fd(), tun::TUNSETQUEUE, &mut req)
    }
}

fn ioctl_ptr<T>(fd: RawFd, req: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` points to a live, correctly laid out argument for `req`.
    let rc = unsafe { libc::ioctl(fd, req as _, arg as *mut T) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ioctl_val(fd: RawFd, req: libc::c_ulong, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: these tap ioctls take an integer argument by value.
    let rc = unsafe { libc::ioctl(fd, req as _, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The host side: the interface name and one queue per queue pair.
#[derive(Debug)]
pub struct Tap {
    /// Interface name (as the kernel reports it).
    pub name: String,
    /// Queues, one per queue pair.
    pub queues: Vec<TapQueue>,
    /// The interface's MAC (macvtap) if known.
    pub mac: Option<[u8; 6]>,
}

fn open_dev(path: &str) -> Result<File, TapError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| TapError::Open {
            path: path.into(),
            source,
        })
}

impl Tap {
    /// Opens `queues` queues of the interface `spec` names.
    pub fn open(spec: &TapSpec, queues: u16) -> Result<Self, TapError> {
        let tap = match spec {
            TapSpec::Tap(name) => Self::open_tap(name, queues)?,
            TapSpec::Macvtap(name) => Self::open_macvtap(name, queues)?,
        };
        let name = tap.name.clone();
        let ioctl_err = |what, source| TapError::Ioctl {
            what,
            name: name.clone(),
            source,
        };
        for q in &tap.queues {
            let mut sz: libc::c_int = HDR_LEN as libc::c_int;
            ioctl_ptr(q.fd(), tun::TUNSETVNETHDRSZ, &mut sz)
                .map_err(|e| ioctl_err("TUNSETVNETHDRSZ", e))?;
        }
        // No offloads until a driver acks them.
        tap.set_offload(0)
            .map_err(|e| ioctl_err("TUNSETOFFLOAD", e))?;
        Ok(tap)
    }

    fn open_tap(name: &str, queues: u16) -> Result<Self, TapError> {
        let flags = tun::IFF_TAP | tun::IFF_NO_PI | tun::IFF_VNET_HDR | tun::IFF_MULTI_QUEUE;
        let mut actual = name.to_string();
        let mut out = Vec::new();
        for _ in 0..queues {
            let file = open_dev("/dev/net/tun")?;
            let mut req = IfReq::new(&actual, flags)?;
            ioctl_ptr(file.as_raw_fd(), tun::TUNSETIFF, &mut req).map_err(|source| {
                TapError::Attach {
                    name: actual.clone(),
                    source,
                }
            })?;
            actual = req.name();
            out.push(TapQueue { file });
        }
        Ok(Self {
            name: actual,
            queues: out,
            mac: None,
        })
    }

    fn open_macvtap(name: &str, queues: u16) -> Result<Self, TapError> {
        if name.is_empty() || name.contains('/') || name.len() >= libc::IFNAMSIZ {
            return Err(TapError::BadName(name.into()));
        }
        let sys = PathBuf::from("/sys/class/net").join(name);
        let read = |file: &str| {
            let path = sys.join(file);
            std::fs::read_to_string(&path).map_err(|source| TapError::Macvtap {
                name: name.into(),
                path: path.display().to_string(),
                source,
            })
        };
        let ifindex = read("ifindex")?.trim().to_string();
        let mac = parse_mac(read("address")?.trim());
        let dev = format!("/dev/tap{ifindex}");
        let numbers = read(&format!("macvtap/tap{ifindex}/dev"))
            .ok()
            .and_then(|s| parse_dev_numbers(s.trim()));
        let files = open_macvtap_queues(&dev, numbers, queues)?;
        let flags = tun::IFF_TAP | tun::IFF_NO_PI | tun::IFF_VNET_HDR | tun::IFF_MULTI_QUEUE;
        let mut out = Vec::new();
        for file in files {
            let mut req = IfReq::new("", flags)?;
            ioctl_ptr(file.as_raw_fd(), tun::TUNSETIFF, &mut req).map_err(|source| {
                TapError::Ioctl {
                    what: "TUNSETIFF (vnet header)",
                    name: name.into(),
                    source,
                }
            })?;
            out.push(TapQueue { file });
        }
        Ok(Self {
            name: name.into(),
            queues: out,
            mac,
        })
    }

    /// Sets the vnet header size of every queue (macvtap keeps it per queue): the
    /// virtio-net header size the driver negotiated, which frames carry both ways.
    pub fn set_vnet_hdr_len(&self, len: usize) -> io::Result<()> {
        for q in &self.queues {
            let mut sz = libc::c_int::try_from(len).map_err(io::Error::other)?;
            ioctl_ptr(q.fd(), tun::TUNSETVNETHDRSZ, &mut sz)?;
        }
        Ok(())
    }

    /// Sets the offloads the tap may hand us (TUN_F_*), from the driver's features.
    pub fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        match self.queues.first() {
            Some(q) => ioctl_val(q.fd(), tun::TUNSETOFFLOAD, libc::c_ulong::from(flags)),
            None => Ok(()),
        }
    }
}

/// Parses a sysfs `dev` file ("MAJOR:MINOR").
fn parse_dev_numbers(s: &str) -> Option<(u32, u32)> {
    let (maj, min) = s.split_once(':')?;
    Some((maj.parse().ok()?, min.parse().ok()?))
}

/// The device number `meta` describes, if it is a character device.
fn char_dev_of(meta: &std::fs::Metadata) -> Option<libc::dev_t> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    meta.file_type().is_char_device().then(|| meta.rdev())
}

/// Opens `queues` fds of a macvtap whose sysfs device numbers are `numbers`.
///
/// `/dev/tapN` (N = the ifindex) is what udev or devtmpfs creates, but it is only right
/// when it exists and carries the macvtap's device numbers: without udev and devtmpfs
/// there is no node at all, and ifindexes are per network namespace while /dev is not,
/// so a macvtap in another namespace can own the name (or a stale node remain). Then a
/// private node with the right numbers is made (in /dev, else the temp dir), opened and
/// unlinked at once.
fn open_macvtap_queues(
    dev: &str,
    numbers: Option<(u32, u32)>,
    queues: u16,
) -> Result<Vec<File>, TapError> {
    let open_all = |path: &str| -> Result<Vec<File>, TapError> {
        (0..queues).map(|_| open_dev(path)).collect()
    };
    let Some((maj, min)) = numbers else {
        // No device numbers in sysfs (should not happen): trust the name.
        return open_all(dev);
    };
    let want = libc::makedev(maj, min);
    let matches = |f: &File| f.metadata().ok().as_ref().and_then(char_dev_of) == Some(want);
    if std::fs::metadata(dev).ok().as_ref().and_then(char_dev_of) == Some(want) {
        let files = open_all(dev)?;
        if files.iter().all(matches) {
            return Ok(files);
        }
    }
    log::info!("{dev} missing or not the macvtap's device {maj}:{min}; using a private node");
    let mut last = None;
    for dir in [PathBuf::from("/dev"), std::env::temp_dir()] {
        let node = dir.join(format!(
            ".vhost-net-backend-{}-{maj}-{min}",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&node);
        let c = std::ffi::CString::new(node.as_os_str().as_encoded_bytes())
            .map_err(|e| TapError::BadName(e.to_string()))?;
        // SAFETY: valid C string; mknod creates a file and touches no memory of ours.
        if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, want) } != 0 {
            last = Some(TapError::Open {
                path: node.display().to_string(),
                source: io::Error::last_os_error(),
            });
            continue;
        }
        let files = open_all(&node.to_string_lossy());
        let _ = std::fs::remove_file(&node);
        match files {
            Ok(f) if f.iter().all(matches) => return Ok(f),
            Ok(_) => {}
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| TapError::Open {
        path: dev.into(),
        source: io::Error::other(format!("cannot create a node for device {maj}:{min}")),
    }))
}

/// Parses "aa:bb:cc:dd:ee:ff".
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:54:00:12:34:5f"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x5f])
        );
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("52:54:00:12:34:56:78"), None);
        assert_eq!(parse_mac("zz:54:00:12:34:56"), None);
    }

    #[test]
    fn dev_numbers() {
        assert_eq!(parse_dev_numbers("246:1"), Some((246, 1)));
        assert_eq!(parse_dev_numbers("246"), None);
        assert_eq!(parse_dev_numbers("a:1"), None);
    }

    #[test]
    fn names() {
        assert!(IfReq::new("a-very-long-interface-name", 0).is_err());
        assert_eq!(
            IfReq::new("tap0", 0).map(|r| r.name()).ok(),
            Some("tap0".into())
        );
    }
}
