//! An in-process vhost-net backend on a tap inside a network namespace of its own, plus
//! packet-socket helpers to see and inject frames on the host side of the tap.
#![allow(dead_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_net_backend::spec::{features, NetHdr, HDR_LEN};
use vhost_net_backend::{NetDevice, NetOptions, NetShared, Tap, TapSpec};
use vhost_tests::frontend::{Buf, FrontendOptions, TestFrontend, Used};
use vhost_tests::in_process::InProcessServer;
use vhost_user_device::{QueueStats, ServerError};

pub const TAP: &str = "vnt0";
pub const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// An EtherType from the local experimental range: nothing in the kernel answers it.
pub const ETHERTYPE: u16 = 0x88b5;

/// Moves this thread into a fresh network namespace (threads it spawns follow), so taps
/// and packet sockets are private to the test and vanish with it. Returns false (after a
/// loud SKIPPED) when that is not possible (not root).
pub fn enter_netns(test: &str) -> bool {
    let _ = env_logger::builder().is_test(true).try_init();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        vhost_tests::guest::report_skip(test, "needs root (network namespace and tap)");
        return false;
    }
    // SAFETY: unshare affects only this thread's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        vhost_tests::guest::report_skip(
            test,
            &format!(
                "cannot create a network namespace: {}",
                io::Error::last_os_error()
            ),
        );
        return false;
    }
    // No IPv6 autoconfiguration chatter on the tap.
    for k in ["all", "default"] {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{k}/disable_ipv6"), "1");
    }
    true
}

pub struct Config {
    pub pairs: u16,
    pub queue_size: u16,
    pub mrg_rxbuf: bool,
    pub mtu: Option<u16>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            pairs: 1,
            queue_size: 128,
            mrg_rxbuf: true,
            mtu: None,
        }
    }
}

pub struct TestBackend {
    // First, so that it is dropped (the server stopped) before the directory goes.
    server: InProcessServer,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub shared: Arc<NetShared>,
    pub stats: Vec<Arc<QueueStats>>,
    pub cfg: Config,
}

impl TestBackend {
    /// Creates the tap (in the current namespace), brings it up, starts the server.
    pub fn start(cfg: Config) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("net.sock");
        let tap = Tap::open(&TapSpec::Tap(TAP.into()), cfg.pairs).expect("open tap");
        set_link(TAP, 9000, HOST_MAC);
        let device = NetDevice::new(
            tap,
            NetOptions {
                pairs: cfg.pairs,
                queue_size: cfg.queue_size,
                mac: GUEST_MAC,
                mtu: cfg.mtu,
                mrg_rxbuf: cfg.mrg_rxbuf,
            },
        );
        let shared = device.shared().clone();
        let server = InProcessServer::start(device, &socket);
        Self {
            stats: server.stats().to_vec(),
            server,
            dir,
            socket,
            shared,
            cfg,
        }
    }

    pub fn connect(&self) -> TestFrontend {
        TestFrontend::connect(
            &self.socket,
            FrontendOptions {
                num_queues: 2 * self.cfg.pairs + 1,
                queue_size: self.cfg.queue_size,
                event_idx: true,
                ..Default::default()
            },
        )
        .expect("connect")
    }

    pub fn drops(&self, q: u16, why: vhost_net_backend::stats::DropReason) -> u64 {
        self.shared.stats.queue(q).map_or(0, |c| c.drops(why))
    }

    pub fn packets(&self, q: u16) -> u64 {
        self.shared
            .stats
            .queue(q)
            .map_or(0, |c| c.packets.load(std::sync::atomic::Ordering::Relaxed))
    }

    pub fn stop(self) -> Result<(), ServerError> {
        self.server.stop()
    }
}

#[repr(C)]
struct IfReqInt {
    name: [u8; 16],
    val: libc::c_int,
    _pad: [u8; 20],
}

#[repr(C)]
struct IfReqHw {
    name: [u8; 16],
    family: libc::sa_family_t,
    data: [u8; 14],
    _pad: [u8; 8],
}

fn ifname(name: &str) -> [u8; 16] {
    let mut n = [0u8; 16];
    n[..name.len()].copy_from_slice(name.as_bytes());
    n
}

/// Sets MTU and MAC of `name` and brings it up.
pub fn set_link(name: &str, mtu: i32, mac: [u8; 6]) {
    // SAFETY: plain socket creation; checked below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(s >= 0, "socket: {}", io::Error::last_os_error());
    // SAFETY: we own the fresh fd.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    let mut m = IfReqInt {
        name: ifname(name),
        val: mtu,
        _pad: [0; 20],
    };
    // SAFETY: valid ifreq for SIOCSIFMTU.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFMTU, &mut m) };
    assert_eq!(rc, 0, "SIOCSIFMTU: {}", io::Error::last_os_error());
    let mut hw = IfReqHw {
        name: ifname(name),
        family: libc::ARPHRD_ETHER,
        data: [0; 14],
        _pad: [0; 8],
    };
    hw.data[..6].copy_from_slice(&mac);
    // SAFETY: valid ifreq for SIOCSIFHWADDR.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFHWADDR, &mut hw) };
    assert_eq!(rc, 0, "SIOCSIFHWADDR: {}", io::Error::last_os_error());
    let mut f = IfReqInt {
        name: ifname(name),
        val: 0,
        _pad: [0; 20],
    };
    // SAFETY: valid ifreq for SIOCGIFFLAGS / SIOCSIFFLAGS.
    unsafe {
        assert_eq!(libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut f), 0);
        f.val |= libc::IFF_UP;
        assert_eq!(
            libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &mut f),
            0,
            "SIOCSIFFLAGS: {}",
            io::Error::last_os_error()
        );
    }
}

/// A raw packet socket on the tap, optionally with virtio-net headers (PACKET_VNET_HDR).
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
    vnet: bool,
}

impl PacketSocket {
    pub fn open(name: &str, vnet: bool) -> Self {
        let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
        // SAFETY: plain socket creation; checked below.
        let s =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
        assert!(s >= 0, "packet socket: {}", io::Error::last_os_error());
        // SAFETY: we own the fresh fd.
        let fd = unsafe { OwnedFd::from_raw_fd(s) };
        let cname = std::ffi::CString::new(name).expect("name");
        // SAFETY: valid C string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) } as i32;
        assert!(ifindex > 0, "no interface {name}");
        if vnet {
            let one: libc::c_int = 1;
            // SAFETY: valid option value pointer and length.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_VNET_HDR,
                    (&one as *const libc::c_int).cast(),
                    4,
                )
            };
            assert_eq!(rc, 0, "PACKET_VNET_HDR: {}", io::Error::last_os_error());
        }
        // SAFETY: zeroed sockaddr_ll is valid; fields set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto as u16;
        sll.sll_ifindex = ifindex;
        // SAFETY: valid sockaddr_ll of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());
        Self { fd, ifindex, vnet }
    }

    /// Sets the receive buffer (SO_RCVBUFFORCE; root), for bursts.
    pub fn set_rcvbuf(&self, bytes: i32) {
        // SAFETY: valid option value pointer and length.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&bytes as *const i32).cast(),
                4,
            )
        };
        assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", io::Error::last_os_error());
    }

    /// Sends `frame` out of the tap (towards the backend), with `hdr` if vnet.
    pub fn send(&self, hdr: Option<NetHdr>, frame: &[u8]) -> io::Result<()> {
        let mut buf = Vec::new();
        if self.vnet {
            buf.extend_from_slice(&hdr.unwrap_or_default().to_bytes()[..10]);
        }
        buf.extend_from_slice(frame);
        // SAFETY: valid buffer.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives frames that came *in* on the tap (written by the backend) until one
    /// satisfies `pred`; returns (vnet header if any, frame).
    pub fn recv_matching(
        &self,
        timeout: Duration,
        pred: impl Fn(&[u8]) -> bool,
    ) -> Option<(Option<NetHdr>, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 70000];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) } <= 0 {
                continue;
            }
            // SAFETY: zeroed sockaddr_ll is valid as an out parameter.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut sl = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: valid buffer and address out parameters.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut sll as *mut libc::sockaddr_ll).cast(),
                    &mut sl,
                )
            };
            if n <= 0 || sll.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let n = n as usize;
            let (hdr, frame) = if self.vnet {
                if n < 10 {
                    continue;
                }
                let mut h = [0u8; HDR_LEN];
                h[..10].copy_from_slice(&buf[..10]);
                (Some(NetHdr::parse(&h)), buf[10..n].to_vec())
            } else {
                (None, buf[..n].to_vec())
            };
            if pred(&frame) {
                return Some((hdr, frame));
            }
        }
    }
}

/// A packet socket on `ifname` in the named network namespace (`ip netns`), opened from
/// a short-lived thread that joins it (the socket stays in that namespace).
pub fn packet_socket_in_netns(netns: &str, ifname: &str, vnet: bool) -> PacketSocket {
    let ns_file = PathBuf::from("/run/netns").join(netns);
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = std::fs::File::open(&ns_file).expect("open netns");
            // SAFETY: a valid namespace fd; affects only this short-lived thread.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
            PacketSocket::open(ifname, vnet)
        })
        .join()
        .expect("netns thread")
    })
}

/// An Ethernet frame of our test EtherType with `len` bytes of payload starting with `tag`.
pub fn test_frame(dst: [u8; 6], src: [u8; 6], tag: u32, len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&tag.to_le_bytes());
    for i in 4..len {
        f.push((i as u32).wrapping_mul(31).wrapping_add(tag) as u8);
    }
    f
}

/// Whether `frame` is a test frame with `tag`.
pub fn has_tag(frame: &[u8], tag: u32) -> bool {
    frame.len() >= 18
        && frame[12..14] == ETHERTYPE.to_be_bytes()
        && frame[14..18] == tag.to_le_bytes()
}

/// Puts one TX frame (header + frame, split into two descriptors) on queue 2*pair+1.
pub fn send_tx(fe: &mut TestFrontend, pair: u16, hdr: NetHdr, frame: &[u8]) -> u16 {
    let h = fe.alloc(HDR_LEN as u64);
    fe.write(h, &hdr.to_bytes());
    let d = fe.alloc(frame.len() as u64);
    fe.write(d, frame);
    fe.submit(
        2 * pair + 1,
        &[Buf::ro(h, HDR_LEN as u32), Buf::ro(d, frame.len() as u32)],
    )
}

/// Posts `n` RX buffers of `size` bytes on queue 2*pair; returns (head, gpa) pairs.
pub fn post_rx(fe: &mut TestFrontend, pair: u16, n: usize, size: u32) -> Vec<(u16, u64)> {
    let q = 2 * pair;
    let mut out = Vec::new();
    for _ in 0..n {
        let a = fe.alloc(u64::from(size));
        let dq = &mut fe.queues[usize::from(q)];
        let head = dq.add_chain(&fe.mem, &[Buf::wo(a, size)]);
        dq.publish(&fe.mem, head);
        out.push((head, a));
    }
    fe.queues[usize::from(q)].notify();
    out
}

/// Waits for a received frame: its used elements (num_buffers of them), the header and
/// the frame reassembled from the buffers in `bufs` (head → gpa).
pub fn recv_rx(
    fe: &mut TestFrontend,
    pair: u16,
    bufs: &[(u16, u64)],
    pending: &mut Vec<Used>,
) -> (Vec<Used>, NetHdr, Vec<u8>) {
    let q = 2 * pair;
    let gpa_of = |id: u32| {
        bufs.iter()
            .find(|(h, _)| u32::from(*h) == id)
            .map(|(_, a)| *a)
            .expect("used id is one of our buffers")
    };
    if pending.is_empty() {
        pending.extend(fe.wait(q, 1).expect("rx frame"));
    }
    let first = pending.remove(0);
    let mut h = [0u8; HDR_LEN];
    h.copy_from_slice(&fe.read(gpa_of(first.id), HDR_LEN));
    let hdr = NetHdr::parse(&h);
    let mut used = vec![first];
    let mut data = fe.read(
        gpa_of(first.id) + HDR_LEN as u64,
        first.len as usize - HDR_LEN,
    );
    let n = usize::from(hdr.num_buffers.max(1));
    if pending.len() < n - 1 {
        // The backend publishes a frame's buffers with one used-index update.
        let more = fe.queues[usize::from(q)].take_used(&fe.mem);
        pending.extend(more);
    }
    assert!(
        pending.len() >= n - 1,
        "num_buffers {n} but only {} more used elements visible together",
        pending.len()
    );
    for u in pending.drain(..n - 1) {
        data.extend(fe.read(gpa_of(u.id), u.len as usize));
        used.push(u);
    }
    (used, hdr, data)
}

/// Whether the driver acked all of `f`.
pub fn acked(fe: &TestFrontend, f: u64) -> bool {
    fe.features & f == f
}

pub const GSO_FEATURES: u64 = features::GUEST_CSUM | features::GUEST_TSO4;
