//! The QEMU command line of a guest boot, and the arguments attaching our devices.

use std::path::Path;
use std::process::Command;

use super::boot::GuestBoot;
use super::env::{env_flag, Accel};
use super::process::set_pdeathsig;
use super::session::GuestTest;

impl Accel {
    fn qemu_args(self) -> &'static [&'static str] {
        match self {
            Accel::Kvm => &["-enable-kvm", "-cpu", "host"],
            Accel::Tcg => &["-accel", "tcg", "-cpu", "max"],
        }
    }
}

impl GuestTest {
    /// The QEMU command line for `boot` with `initrd` (accelerator, machine, shared
    /// memfd RAM, kernel, console on stdio, the boot's extra arguments); stdio is left
    /// to the caller. Used by [`GuestTest::boot_with`] and by tests that run QEMU
    /// themselves (live migration needs two).
    pub fn qemu_command(&self, boot: &GuestBoot, initrd: &Path) -> Command {
        let mem = format!("{}M", boot.mem_mib);
        let mut cmd = Command::new(&self.env.qemu);
        cmd.args(self.env.accel.qemu_args())
            .args(["-machine", "q35", "-m", &mem])
            // maxcpus >= 2: with a plain -smp 1 a TCG guest can miss a
            // completion interrupt and hang.
            .arg("-smp")
            .arg(format!("{},maxcpus={}", boot.cpus, boot.cpus.max(2)))
            .arg("-object")
            .arg(format!("memory-backend-memfd,id=mem,size={mem},share=on"))
            .args(["-numa", "node,memdev=mem"])
            .args(["-nodefaults", "-no-user-config", "-nographic"])
            .args(["-serial", "stdio", "-no-reboot"])
            .arg("-kernel")
            .arg(&self.env.kernel)
            .arg("-initrd")
            .arg(initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 mitigations=off {} {}",
                // GUEST_VERBOSE=1: the whole kernel log on the console.
                if env_flag("GUEST_VERBOSE") {
                    ""
                } else {
                    "quiet"
                },
                boot.append
            ))
            .args(&boot.qemu_args);
        set_pdeathsig(&mut cmd);
        cmd
    }
}

/// QEMU arguments attaching a vhost-user-blk device (QEMU is the client, the
/// backend must already listen on `socket`).
pub fn vhost_user_blk_args(socket: &Path, num_queues: u16) -> Vec<String> {
    let s = socket.to_string_lossy();
    assert!(
        !s.contains(','),
        "socket path must not contain ',': {s} (QEMU option syntax)"
    );
    vec![
        "-chardev".into(),
        format!("socket,id=blk0,path={s}"),
        "-device".into(),
        format!("vhost-user-blk-pci,chardev=blk0,num-queues={num_queues}"),
    ]
}

/// [`vhost_user_blk_args`] with `reconnect-ms` on the chardev: QEMU reconnects to a
/// restarted backend (and hands it the inflight region it kept) instead of losing the disk.
pub fn vhost_user_blk_reconnect_args(
    socket: &Path,
    num_queues: u16,
    reconnect_ms: u32,
) -> Vec<String> {
    let mut a = vhost_user_blk_args(socket, num_queues);
    a[1].push_str(&format!(",reconnect-ms={reconnect_ms}"));
    a
}
