//! The per-boot initrd: the cached base initramfs with the test's script, environment
//! and files appended as a second cpio archive.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use super::boot::GuestBoot;

/// Per-boot initrd: the base initramfs (gzip'd cpio), zero padding to a
/// 4-byte boundary, then an uncompressed newc cpio holding `/test/run.sh`,
/// `/test/env` and the extra files. The kernel unpacks concatenated
/// archives in order.
pub(super) fn build_initrd(base: &Path, boot: &GuestBoot, out: &Path) -> io::Result<()> {
    let mut w = io::BufWriter::new(File::create(out)?);
    let mut b = File::open(base)?;
    let len = io::copy(&mut b, &mut w)?;
    w.write_all(&vec![0u8; ((4 - len % 4) % 4) as usize])?;

    let mut cpio = CpioWriter::default();
    cpio.entry("test", 0o040755, &[]);
    cpio.entry("test/run.sh", 0o100755, &fs::read(&boot.script)?);
    let mut env = String::new();
    for (k, v) in &boot.env {
        assert!(
            !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad guest env name {k:?}"
        );
        // busybox sh sources this with `set -a`: single-quote the value.
        let _ = writeln!(env, "{k}='{}'", v.replace('\'', r"'\''"));
    }
    cpio.entry("test/env", 0o100644, env.as_bytes());
    for f in &boot.files {
        let name = f
            .file_name()
            .ok_or_else(|| io::Error::other(format!("no file name: {}", f.display())))?;
        let data =
            fs::read(f).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", f.display())))?;
        cpio.entry(&format!("test/{}", name.to_string_lossy()), 0o100755, &data);
    }
    w.write_all(&cpio.finish())?;
    w.flush()
}

/// Minimal newc ("070701") cpio archive writer.
#[derive(Default)]
struct CpioWriter {
    buf: Vec<u8>,
    ino: u32,
}

impl CpioWriter {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,                                               // uid
            0,                                               // gid
            if mode & 0o170000 == 0o040000 { 2 } else { 1 }, // nlink
            0,                                               // mtime
            u32::try_from(data.len()).expect("cpio file too large"),
            0, // devmajor
            0, // devminor
            0, // rdevmajor
            0, // rdevminor
            u32::try_from(name.len() + 1).expect("name too long"),
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.buf
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn cpio_is_aligned() {
        let mut c = CpioWriter::default();
        c.entry("test", 0o040755, &[]);
        c.entry("test/x", 0o100644, b"abc");
        let b = c.finish();
        assert_eq!(b.len() % 4, 0);
        assert!(b.starts_with(b"070701"));
        assert!(b.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
