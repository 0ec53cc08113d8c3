//! File systems tests can freeze (`fsfreeze`): writes to them wait in the kernel until
//! thawed, the one way to keep I/O in flight on purpose. Needs root (mkfs, losetup, mount).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `cmd args...`, panicking with its stderr if it fails (test set-up only).
pub fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect("run");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An ext4 file system on a loop device, mounted on a temporary directory; thawed,
/// unmounted and detached on drop (even when the test fails while it is frozen).
pub struct FreezableFs {
    dir: tempfile::TempDir,
    mnt: PathBuf,
    dev: String,
    frozen: bool,
}

impl Default for FreezableFs {
    fn default() -> Self {
        Self::new()
    }
}

impl FreezableFs {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let backing = dir.path().join("fs.img");
        std::fs::File::create(&backing)
            .and_then(|f| f.set_len(64 << 20))
            .expect("backing file");
        sh("mkfs.ext4", &["-q", "-F", backing.to_str().expect("path")]);
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&backing)
            .output()
            .expect("losetup");
        assert!(out.status.success(), "losetup failed");
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mount point");
        sh("mount", &[&dev, mnt.to_str().expect("path")]);
        Self {
            dir,
            mnt,
            dev,
            frozen: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.mnt
    }

    pub fn freeze(&mut self) {
        sh("fsfreeze", &["--freeze", self.mnt.to_str().expect("path")]);
        self.frozen = true;
    }

    pub fn thaw(&mut self) {
        if self.frozen {
            sh(
                "fsfreeze",
                &["--unfreeze", self.mnt.to_str().expect("path")],
            );
            self.frozen = false;
        }
    }
}

impl Drop for FreezableFs {
    fn drop(&mut self) {
        if self.frozen {
            let _ = Command::new("fsfreeze")
                .arg("--unfreeze")
                .arg(&self.mnt)
                .status();
        }
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        let _ = &self.dir;
    }
}
