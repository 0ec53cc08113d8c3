//! Checks on file descriptors the frontend sends, before we map or poll them.
//!
//! A frontend bug (or a hostile VMM) can send any descriptor. Mapping a file shorter than
//! the range we map succeeds, and the first access past its end raises SIGBUS, which kills
//! the whole backend; polling something that is not an eventfd fails (a regular file cannot
//! be added to epoll: the worker dies) or blocks a worker (a blocking pipe). So every
//! descriptor is checked when it arrives and refused with an error reply instead.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;

/// Errors of [`check_covers`] and [`check_eventfd`].
#[derive(Debug, thiserror::Error)]
pub enum FdCheckError {
    /// fstat of the descriptor failed.
    #[error("cannot stat the {what} descriptor: {source}")]
    Stat {
        /// What the descriptor was sent for.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file ends before the range the frontend asked us to map.
    #[error(
        "the {what} file is {len} bytes long, but the frontend asked to map {size} bytes at \
         offset {offset}; accessing the missing part would crash the backend (SIGBUS), so the \
         request is refused: the frontend must size the file before sending it"
    )]
    TooShort {
        /// What the descriptor was sent for.
        what: &'static str,
        /// The file's length.
        len: u64,
        /// The requested mmap offset.
        offset: u64,
        /// The requested size.
        size: u64,
    },
    /// The descriptor is not an eventfd.
    #[error(
        "the {what} descriptor is {kind}, not an eventfd; the backend only polls and signals \
         eventfds (a regular file cannot be polled, a pipe can block a worker)"
    )]
    NotEventFd {
        /// What the descriptor was sent for.
        what: &'static str,
        /// What it is instead (the /proc/self/fd link target).
        kind: String,
    },
    /// /proc/self/fd could not be read to tell what the descriptor is.
    #[error(
        "cannot tell whether the {what} descriptor is an eventfd: reading /proc/self/fd failed \
         ({source}); the backend needs /proc mounted"
    )]
    Proc {
        /// What the descriptor was sent for.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Refuses `file` if it is a regular file (memfds are) shorter than `offset + size`.
///
/// Other kinds of files (a DAX character device, say) have no meaningful length to check
/// and are left to mmap, which refuses what the driver cannot map.
pub fn check_covers(
    file: &File,
    offset: u64,
    size: u64,
    what: &'static str,
) -> Result<(), FdCheckError> {
    let meta = file
        .metadata()
        .map_err(|source| FdCheckError::Stat { what, source })?;
    if !meta.file_type().is_file() {
        return Ok(());
    }
    let len = meta.len();
    if offset.checked_add(size).is_none_or(|end| end > len) {
        return Err(FdCheckError::TooShort {
            what,
            len,
            offset,
            size,
        });
    }
    Ok(())
}

/// Refuses `file` unless it is an eventfd.
///
/// The kernel names the inode of every eventfd `anon_inode:[eventfd]`; there is no
/// fstat-only way to tell an eventfd from other anonymous inodes (signalfd, timerfd, ...).
pub fn check_eventfd(file: &File, what: &'static str) -> Result<(), FdCheckError> {
    let link = format!("/proc/self/fd/{}", file.as_raw_fd());
    let target = std::fs::read_link(&link).map_err(|source| FdCheckError::Proc { what, source })?;
    if target.as_os_str() == "anon_inode:[eventfd]" {
        return Ok(());
    }
    let kind = match file.metadata() {
        Ok(m) if m.file_type().is_file() => "a regular file".to_string(),
        Ok(m) if m.file_type().is_fifo() => "a pipe".to_string(),
        Ok(m) if m.file_type().is_socket() => "a socket".to_string(),
        _ => target.display().to_string(),
    };
    Err(FdCheckError::NotEventFd { what, kind })
}

/// An integer socket option of `fd` (SO_TYPE, SO_ACCEPTCONN, ...); an error for a file
/// descriptor that is not a socket.
pub fn socket_int_option(
    fd: std::os::fd::RawFd,
    option: libc::c_int,
) -> std::io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid out pointers of the right size; a bad fd or option gives an error.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use vmm_sys_util::eventfd::EventFd;

    fn memfd(len: u64) -> File {
        // SAFETY: valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"fd-check-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh descriptor we own.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn covers_checks_offset_plus_size_against_the_length() {
        let f = memfd(8192);
        check_covers(&f, 0, 8192, "test").unwrap();
        check_covers(&f, 4096, 4096, "test").unwrap();
        for (offset, size) in [(0, 8193), (4096, 4097), (8192, 1), (u64::MAX, 2)] {
            assert!(
                matches!(
                    check_covers(&f, offset, size, "test"),
                    Err(FdCheckError::TooShort { .. })
                ),
                "offset {offset} size {size}"
            );
        }
    }

    #[test]
    fn eventfd_check_accepts_only_eventfds() {
        let efd = EventFd::new(0).unwrap();
        // SAFETY: dup of a valid descriptor; the result is checked.
        let dup = unsafe { libc::dup(efd.as_raw_fd()) };
        assert!(dup >= 0);
        // SAFETY: dup is a fresh descriptor we own.
        let f = unsafe { File::from_raw_fd(dup) };
        check_eventfd(&f, "kick").unwrap();
        let err = check_eventfd(&memfd(8), "kick").unwrap_err();
        assert!(err.to_string().contains("a regular file"), "{err}");
        let mut fds = [0; 2];
        // SAFETY: valid array of two ints.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors are fresh and ours.
        let (r, _w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        let err = check_eventfd(&r, "kick").unwrap_err();
        assert!(err.to_string().contains("a pipe"), "{err}");
    }
}
