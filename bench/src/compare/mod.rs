//! `bench compare ...`: every contender side by side in one run, alternating, with
//! repetitions, reduced to medians and spreads ([`report`]) and drawn ([`chart`]).
//!
//! One module a comparison ([`blk`], [`guest_blk`], [`net`], [`serial`], [`idle`],
//! [`migrate`], and [`all`] for every one of them in one run); here what they share: the
//! error type, stopping a child, waiting for a socket, filling an image. [`halt_poll`]
//! describes the machine's idle setting for every header and sets it for a run.

pub mod all;
pub mod blk;
pub mod chart;
pub mod guest_blk;
pub mod halt_poll;
pub mod idle;
pub mod migrate;
pub mod net;
pub mod report;
pub mod serial;

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use crate::load::blk::LoadError;

/// Errors of a comparison run.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// A program could not be started or failed.
    #[error("{0}")]
    Run(String),
    /// The load generator failed.
    #[error("load generator: {0}")]
    Load(#[from] LoadError),
    /// File I/O.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// `--guest-halt-poll-ns` could not be applied.
    #[error(transparent)]
    HaltPoll(#[from] halt_poll::HaltPollError),
}

/// Stops a child of ours: SIGTERM (a clean exit), SIGKILL if it is still there after
/// `grace`; reaped either way.
pub fn terminate(child: &mut Child, grace: std::time::Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: kill(2) on a process we started and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits for a backend's socket file to appear.
pub fn wait_socket(p: &Path) -> Result<(), CompareError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.exists() {
        if Instant::now() > deadline {
            return Err(CompareError::Run(format!("{} never appeared", p.display())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    Ok(())
}

/// Fills `path` with `size` bytes of xorshift data: reads of an unwritten (sparse) image
/// would cost the backends nothing and measure only the page cache's zero page.
pub(crate) fn fill_random(path: &Path, size: u64) -> Result<(), CompareError> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let mut x: u64 = 0x243f_6a88_85a3_08d3;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for chunk in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(())
}
