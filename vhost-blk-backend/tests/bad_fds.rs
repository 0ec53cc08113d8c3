//! A frontend that sends unusable file descriptors: files too short for the range it asks
//! us to map, and kick/call descriptors that are not eventfds. Each is refused with an error
//! the frontend sees; the backend never crashes (SIGBUS, a dead worker) and keeps serving.

mod common;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use common::*;
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo};
use vhost_blk_backend::spec::status;
use vhost_tests::frontend::{FrontendOptions, TestFrontend};
use vhost_user_device::inflight::InflightRegion;

fn memfd(len: u64) -> File {
    // SAFETY: valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"bad-fds-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fd is a fresh descriptor we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

/// The connection still serves a normal read.
fn still_serving(fe: &mut TestFrontend) {
    let (data, st) = read(fe, 1, 512);
    assert_eq!((st, data), (status::OK, pattern_range(512, 512)));
}

/// A new connection is accepted and served (the previous one must be dropped first).
fn new_connection_serves(b: &TestBackend) {
    let mut fe = TestFrontend::connect(b.socket(), FrontendOptions::default())
        .expect("backend accepts a new connection");
    still_serving(&mut fe);
}

#[test]
fn short_memfd_in_set_mem_table_is_refused() {
    let b = TestBackend::start(BackendConfig::default());
    {
        let mut fe = TestFrontend::connect(b.socket(), FrontendOptions::default()).unwrap();
        let short = memfd(1 << 20);
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: 2 << 20,
            userspace_addr: 0x7f00_0000_0000,
            mmap_offset: 0,
            mmap_handle: short.as_raw_fd(),
        };
        assert!(
            fe.fe.set_mem_table(&[region]).is_err(),
            "SET_MEM_TABLE with a 1 MiB file for a 2 MiB region was accepted"
        );
        // The old table stands.
        still_serving(&mut fe);
    }
    new_connection_serves(&b);
}

#[test]
fn short_memfd_in_add_mem_reg_is_refused() {
    let b = TestBackend::start(BackendConfig::default());
    {
        let mut fe = TestFrontend::connect(b.socket(), FrontendOptions::default()).unwrap();
        // Long enough for the size, not for offset + size.
        let short = memfd(2 << 20);
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 64 << 20,
            memory_size: 2 << 20,
            userspace_addr: 0x7f00_0000_0000,
            mmap_offset: 1 << 20,
            mmap_handle: short.as_raw_fd(),
        };
        assert!(
            fe.fe.add_mem_region(&region).is_err(),
            "ADD_MEM_REG past the end of its file was accepted"
        );
        still_serving(&mut fe);
    }
    new_connection_serves(&b);
}

#[test]
fn short_memfd_in_set_inflight_fd_is_refused() {
    let b = TestBackend::start(BackendConfig::default());
    {
        let opts = FrontendOptions::default();
        let mut fe = TestFrontend::handshake(b.socket(), &opts).unwrap();
        let need = InflightRegion::total_size(1, 128);
        let short = memfd(need - 64);
        let info = VhostUserInflight::new(need, 0, 1, 128);
        assert!(
            fe.set_inflight(short, info).is_err(),
            "SET_INFLIGHT_FD with a file shorter than the region was accepted"
        );
        fe.add_queue(0).unwrap();
        fe.start_queue(0).unwrap();
        still_serving(&mut fe);
    }
    new_connection_serves(&b);
}

#[test]
fn misaligned_inflight_offset_is_refused() {
    let b = TestBackend::start(BackendConfig::default());
    {
        let opts = FrontendOptions::default();
        let mut fe = TestFrontend::handshake(b.socket(), &opts).unwrap();
        let need = InflightRegion::total_size(1, 128);
        // Long enough: only the alignment of the offset is wrong.
        let file = memfd(need + 4096);
        let info = VhostUserInflight::new(need, 4, 1, 128);
        assert!(
            fe.set_inflight(file, info).is_err(),
            "SET_INFLIGHT_FD at offset 4 was accepted"
        );
        fe.add_queue(0).unwrap();
        fe.start_queue(0).unwrap();
        still_serving(&mut fe);
    }
    new_connection_serves(&b);
}

#[test]
fn short_memfd_in_set_log_base_ends_the_connection() {
    let b = TestBackend::start(BackendConfig::default());
    {
        let fe = TestFrontend::connect(b.socket(), FrontendOptions::default()).unwrap();
        let short = memfd(4096);
        // SET_LOG_BASE has no error reply in the protocol (the frontend waits for the log
        // message back): the backend refuses by closing the connection.
        let res = fe.fe.set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: 64 << 10,
                mmap_offset: 0,
                mmap_handle: short.as_raw_fd(),
            }),
        );
        assert!(
            res.is_err(),
            "SET_LOG_BASE with a 4 KiB file for a 64 KiB log was accepted"
        );
    }
    new_connection_serves(&b);
}

/// What the frontend sends as a kick or call descriptor instead of an eventfd.
enum NotEventFd {
    RegularFile,
    Pipe,
}

/// A descriptor of the given kind wrapped as an `EventFd` (the harness's frontend sends
/// whatever descriptor an `EventFd` holds), plus the pipe's other end, kept open.
fn bogus_eventfd(kind: NotEventFd) -> (vmm_sys_util::eventfd::EventFd, Option<File>) {
    use std::os::fd::IntoRawFd;
    let (fd, other) = match kind {
        NotEventFd::RegularFile => {
            let f = tempfile::tempfile().unwrap();
            std::io::Write::write_all(&mut &f, &[1u8; 64]).unwrap();
            (f.into_raw_fd(), None)
        }
        NotEventFd::Pipe => {
            let mut fds = [0; 2];
            // SAFETY: valid array of two ints; the result is checked. The pipe is
            // blocking, as a careless frontend's would be.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            // SAFETY: fds[1] is a fresh descriptor we own.
            let w = unsafe { File::from_raw_fd(fds[1]) };
            // Readable, so a backend polling it would try to read it.
            std::io::Write::write_all(&mut &w, &[1u8; 3]).unwrap();
            (fds[0], Some(w))
        }
    };
    // SAFETY: fd is a fresh descriptor we own; EventFd only wraps it (and closes it).
    (
        unsafe { vmm_sys_util::eventfd::EventFd::from_raw_fd(fd) },
        other,
    )
}

fn bad_kick_or_call_is_refused(kind: NotEventFd, kick: bool) {
    let b = TestBackend::start(BackendConfig::default());
    {
        let mut fe = TestFrontend::connect(b.socket(), FrontendOptions::default()).unwrap();
        let (bogus, _other) = bogus_eventfd(kind);
        let res = if kick {
            fe.fe.set_vring_kick(0, &bogus)
        } else {
            fe.fe.set_vring_call(0, &bogus)
        };
        assert!(
            res.is_err(),
            "a descriptor that is not an eventfd was accepted as {}",
            if kick { "kick" } else { "call" }
        );
        // The ring keeps running on its old kick and call.
        still_serving(&mut fe);
    }
    new_connection_serves(&b);
}

#[test]
fn regular_file_as_kick_is_refused() {
    bad_kick_or_call_is_refused(NotEventFd::RegularFile, true);
}

#[test]
fn pipe_as_kick_is_refused() {
    bad_kick_or_call_is_refused(NotEventFd::Pipe, true);
}

#[test]
fn regular_file_as_call_is_refused() {
    bad_kick_or_call_is_refused(NotEventFd::RegularFile, false);
}

#[test]
fn pipe_as_call_is_refused() {
    bad_kick_or_call_is_refused(NotEventFd::Pipe, false);
}
