//! `bench compare serial`: MB/s through one virtio-console port in a real guest, guest →
//! host and host → guest, serial-backend (vhost-user on QEMU 11's
//! `vhost-user-test-device-pci`) against QEMU's own virtio-serial with a socket chardev.
//!
//! Same guest (kernel, initramfs, script), same QEMU binary, one boot per contender and
//! repetition, contenders alternating (with a rotated start) so slow drifts of the machine
//! hit both alike. The measurement itself is `vhost_tests::console_bench`, shared with the
//! ignored `guest_console_bench` test, so the test and the table cannot disagree on method.

use std::path::PathBuf;

use clap::Args;
use vhost_tests::console_bench::{console_guest, console_throughput, ConsoleImpl};
use vhost_tests::guest::{locate_sibling_binary, Accel};

use crate::compare::report::{self, machine, Row, Section};
use crate::compare::CompareError;

/// Options of `bench compare serial`.
#[derive(Args, Debug)]
pub struct CompareSerialArgs {
    /// MiB moved in each direction per boot.
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// Repetitions (boots) per contender.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Where to write serial.md and serial.json.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

/// Runs the comparison and returns the section (also written to `<out>/serial.{md,json}`).
pub fn compare_serial(a: &CompareSerialArgs) -> Result<Section, CompareError> {
    let run = |e: &dyn std::fmt::Display| CompareError::Run(e.to_string());
    let bin = locate_sibling_binary("serial-backend", "SERIAL_BACKEND").map_err(|e| run(&e))?;
    let mut t = console_guest("bench_compare_serial").map_err(|e| run(&e))?;
    let accel = match t.env.accel {
        Accel::Tcg => "TCG",
        Accel::Kvm => "KVM",
    };
    let qemu = crate::compare::report::program_version(&t.env.qemu)
        .unwrap_or_else(|| "QEMU (version unknown)".into());
    // samples[direction][contender]
    let mut samples = vec![vec![Vec::new(); ConsoleImpl::ALL.len()]; 2];
    let n = ConsoleImpl::ALL.len();
    for rep in 0..a.reps {
        // Rotated start (ours first, then QEMU's first, ...), so a position effect does
        // not always favour the same contender.
        for k in 0..n {
            let i = (rep + k) % n;
            let which = ConsoleImpl::ALL[i];
            eprintln!("serial: {} (rep {}/{})", which.name(), rep + 1, a.reps);
            let r = console_throughput(&mut t, which, &bin, a.mib).map_err(|e| run(&e))?;
            samples[0][i].push(r.guest_to_host_mbs);
            samples[1][i].push(r.host_to_guest_mbs);
        }
    }
    drop(t);
    let mut samples = samples.into_iter();
    let rows = ["guest → host", "host → guest"]
        .into_iter()
        .map(|dir| Row {
            case: format!("one port, {dir}"),
            metric: report::MB_S,
            samples: samples.next().unwrap_or_default(),
        })
        .collect();
    let section = Section {
        name: "serial".into(),
        title: "Console: one virtio-console port in a guest".into(),
        description: format!(
            "Machine: {}. Guest: 1 vCPU ({accel}), 512 MiB, Debian kernel, busybox; {qemu} for both. {} MiB each way per boot, one boot per contender and repetition, {} repetitions, contenders alternating with a rotated start; median (±spread = (max-min)/median). Command: `bench compare serial --mib {} --reps {}`.",
            machine(),
            a.mib,
            a.reps,
            a.mib,
            a.reps,
        ),
        contenders: ConsoleImpl::ALL
            .iter()
            .map(|c| c.name().to_string())
            .collect(),
        ratios: true,
        rows,
        notes: vec![
            "Ours: serial-backend with one named port on a unix socket, attached as `vhost-user-test-device-pci,virtio-id=3` (QEMU >= 10.2 has no dedicated vhost-user console device). QEMU's: `virtio-serial-pci` + `virtserialport` on `-chardev socket,server=on`. The guest sees the same named port either way.".into(),
            "Guest → host: the guest `dd`s zeros in 64 KiB writes, the host times its reads from the first byte to the last. Host → guest: the host writes, the guest reads everything (`dd iflag=fullblock`) and answers with one line; the host times from its first write to that line. Both on the host clock.".into(),
            format!("{accel} guest: the emulated CPU copying through the guest's virtio_console driver bounds both contenders; the numbers compare the devices under the same bound, not their ceilings."),
        ],
    };
    section.write(&a.out)?;
    Ok(section)
}
