//! Test harnesses for the project's vhost-user backends.
//!
//! - [`frontend`]: a vhost-user frontend and guest driver in one, driving a backend over
//!   its socket without a VM (memfd guest RAM, hand-built split rings);
//! - [`in_process`]: a device served by the layer inside the test process (the backends'
//!   frontend tests);
//! - [`guest`]: boots a real QEMU guest with backends attached and runs a script in it;
//! - [`console_bench`]: one console port's throughput in a guest, ours vs QEMU's (shared by
//!   a test and `bench compare serial`);
//! - [`records`]: sequence-numbered records through a console port whose backend is
//!   killed and restarted, checked on the host side (the serial crash tests);
//! - [`sandbox`]: the `--sandbox` checks every backend program shares;
//! - [`control`]: the `stats` subcommand and its table, for the control socket tests;
//! - [`net_peer`]: the test as a guest's network peer (a line stream and a ping, stamped);
//! - [`vm`]: a QEMU steered through its console and QMP (live migration runs several);
//! - [`blk_migration`]: TLS credentials, a cuttable relay and the `migrate` subcommands
//!   for the block migration tests;
//! - [`libvirt`]: a `virsh` session on libvirt's embedded QEMU driver, and the example
//!   domain XMLs of `deploy/libvirt/` filled in with a test's paths;
//! - [`packages`]: the Debian packages built, installed in a clean root and booted under
//!   systemd-nspawn.

pub mod blk_migration;
pub mod capabilities;
pub mod console_bench;
pub mod control;
pub mod freeze;
pub mod frontend;
pub mod frontend_packed;
pub mod guest;
pub mod guest_console;
pub mod guest_net;
pub mod in_process;
pub mod kill_plan;
pub mod libvirt;
pub mod net_peer;
pub mod packages;
pub mod records;
pub mod sandbox;
pub mod vm;
