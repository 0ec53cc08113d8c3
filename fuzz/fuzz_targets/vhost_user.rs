//! A sequence of vhost-user frontend messages against the layer's protocol handler, served
//! by the real server code for a real device (virtio-blk on a 1 MiB temp image), over a
//! socketpair. Messages may carry a memfd (guest memory whose first bytes come from the
//! input, so rings started on it are processed) and/or an eventfd.
//!
//! Input: guest memory length u16 and bytes, then up to 64 messages, each: request code
//! u8, control u8 (bits 0-1: no fd, a memfd, an eventfd, both; bit 2: NEED_REPLY; bit 3:
//! raw flags u32 follow; bit 4: a declared size u8 follows, instead of the true one),
//! payload length u8, payload.
#![no_main]

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use vhost_blk_backend::BlkDevice;
use vhost_fuzz::Reader;
use vhost_user_device::{Server, Shutdown};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Size of the guest memory memfd.
const MEMFD_SIZE: usize = 64 * 1024;
const MAX_MESSAGES: usize = 64;

fn server() -> &'static Server<BlkDevice> {
    static SERVER: OnceLock<Server<BlkDevice>> = OnceLock::new();
    SERVER.get_or_init(|| {
        let device = vhost_fuzz::blk_device("blk", 2);
        Server::new(Arc::new(device), Shutdown::new().expect("shutdown"))
    })
}

fn memfd(contents: &[u8]) -> OwnedFd {
    // SAFETY: a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"vhost-fuzz-mem".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = std::fs::File::from(fd);
    file.set_len(MEMFD_SIZE as u64).expect("memfd size");
    file.write_all(contents).expect("memfd contents");
    file.into()
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let mem_len = usize::from(r.u16()).min(MEMFD_SIZE);
    let contents = r.bytes(mem_len);

    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    for _ in 0..MAX_MESSAGES {
        if r.is_empty() {
            break;
        }
        let code = u32::from(r.u8() % 48);
        let ctl = r.u8();
        let mut flags = 0x1 | if ctl & 4 != 0 { 0x8 } else { 0 };
        if ctl & 8 != 0 {
            flags = r.u32();
        }
        let declared = (ctl & 16 != 0).then(|| u32::from(r.u8()));
        let len = usize::from(r.u8());
        let payload = r.bytes(len);
        let size = declared.unwrap_or(payload.len() as u32);
        let mut msg = Vec::with_capacity(12 + payload.len());
        msg.extend_from_slice(&code.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&size.to_le_bytes());
        msg.extend_from_slice(payload);
        let mut owned: Vec<OwnedFd> = Vec::new();
        if ctl & 1 != 0 {
            owned.push(memfd(contents));
        }
        if ctl & 2 != 0 {
            let efd = EventFd::new(EFD_NONBLOCK).expect("eventfd");
            // SAFETY: dup of a valid fd; the new fd is owned here.
            let dup = unsafe { libc::dup(efd.as_raw_fd()) };
            assert!(dup >= 0);
            // SAFETY: the fd was just created by dup.
            owned.push(unsafe { OwnedFd::from_raw_fd(dup) });
        }
        let fds: Vec<RawFd> = owned.iter().map(|f| f.as_raw_fd()).collect();
        // All of it fits the socket buffer (64 messages of at most 267 bytes).
        if ours.send_with_fds(&[&msg[..]], &fds).is_err() {
            break;
        }
    }
    ours.shutdown(std::net::Shutdown::Write)
        .expect("shutdown write");
    let mut reader = ours.try_clone().expect("clone");
    let drain = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = reader.read_to_end(&mut sink);
    });
    let _ = server().serve_connection(theirs);
    let _ = ours.shutdown(std::net::Shutdown::Both);
    drain.join().expect("drain thread");
});
