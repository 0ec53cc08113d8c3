//! QEMU guest harness: boots a small Debian-kernel busybox guest with
//! vhost-user devices attached, runs a guest-side shell script in it and
//! collects its results.
//!
//! The shell side lives in `tests/guest/` (next to this crate's manifest):
//! `setup.sh` installs QEMU and friends and unpacks a guest kernel,
//! `build-initramfs.sh` builds the (cached) base initramfs, and
//! `scripts/*.sh` are the guest-side test scripts. They print
//! `@@RESULT key=value` lines, which end up in [`GuestOutcome::results`].
//!
//! Typical use from an integration test:
//!
//! ```no_run
//! use vhost_tests::guest::{BlkBackend, BlkOpts, GuestBoot, GuestTest};
//! let Some(mut t) = GuestTest::start("my_test") else { return }; // loud skip
//! let img = t.create_image("disk.img", 64 << 20).unwrap();
//! let sock = t.path("blk.sock");
//! let blk = BlkBackend::from_env().unwrap();
//! let mut be = t.spawn_backend("backend", blk.command(&sock, &img, &BlkOpts::default())).unwrap();
//! be.wait_for_socket(&sock, std::time::Duration::from_secs(10)).unwrap();
//! let out = t.boot(&GuestBoot::new("boot-only.sh").qemu_args(vhost_user_blk_args(&sock, 1)));
//! out.assert_success();
//! # use vhost_tests::guest::vhost_user_blk_args;
//! ```
//!
//! Environment knobs:
//! * `VHOST_GUEST_WORK`: work directory (default `/var/tmp/vhost-guest`);
//!   must support O_DIRECT (not tmpfs).
//! * `VHOST_GUEST_SKIP=1`: skip every guest test (loudly).
//! * `VHOST_GUEST_REQUIRE=1`: a skip becomes a test failure (for CI).
//! * `VHOST_GUEST_KEEP=1`: keep disk images of passing tests.
//! * `GUEST_ACCEL=auto|kvm|tcg`, `GUEST_KERNEL_SUITE`, `QEMU`, `QSD`,
//!   `GUEST_VERBOSE=1` (full kernel log on the console): see
//!   `tests/guest/common.sh`.
//! * `VHOST_GUEST_BLK_IMPL=vhost-blk-backend|qsd`, `VHOST_BLK_BACKEND=PATH`:
//!   see [`BlkBackend::from_env`].
//!
//! The harness's parts, one job each (everything public is re-exported here, so
//! `vhost_tests::guest::X` names them all):
//! * [`env`](mod@env): what the machine has (QEMU, kernel, initramfs, the project's binaries);
//! * [`skip`]: a test that cannot run says so loudly and is counted;
//! * [`session`]: one guest test's directory, locks and boots ([`GuestTest`]);
//! * [`boot`]: what to boot ([`GuestBoot`]); [`qemu`]: its QEMU command line;
//! * [`initramfs`]: the per-boot initrd carrying the guest script;
//! * [`console`] and [`outcome`]: what the guest printed, and the verdict;
//! * [`process`] and [`backend`]: child processes, backends and their sockets;
//!   [`blk`]: the vhost-user-blk backends the tests drive;
//! * [`image`]: disk image contents (hashes, random fill).

pub mod backend;
pub mod blk;
pub mod boot;
pub mod console;
pub mod env;
pub mod image;
pub mod initramfs;
pub mod outcome;
pub mod process;
pub mod qemu;
pub mod session;
pub mod skip;

pub use backend::{socket_listening, spawn_backend_in, still_running, Backend};
pub use blk::{BlkBackend, BlkOpts};
pub use boot::{GuestBoot, DEFAULT_BOOT_TIMEOUT};
pub(crate) use console::LineReader;
pub use console::{parse_console, EXIT_PREFIX, RESULT_PREFIX};
pub use env::{
    ensure_setup, guest_script, harness_dir, is_executable, locate_binary, locate_sibling_binary,
    work_dir, workspace_dir, Accel, GuestEnv,
};
pub use image::{file_range_is_zero, sha256_file, sha256_file_range, sha256_zeros, write_random};
pub use outcome::{GuestOutcome, VHOST_FALLBACK};
pub use process::{command_line, proc_fd_count, proc_fd_targets, proc_rss_kib, ChildGuard};
pub use qemu::{vhost_user_blk_args, vhost_user_blk_reconnect_args};
pub use session::{GuestStartError, GuestTest};
pub use skip::{report_skip, tail_file};
