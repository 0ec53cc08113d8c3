//! What to boot: a guest script plus files, environment and QEMU arguments.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::env::guest_script;

/// Default wall-clock limit for one guest boot (TCG on a loaded 2-core host).
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// What to boot: a guest script plus files, environment and QEMU arguments.
#[derive(Debug, Clone)]
pub struct GuestBoot {
    pub script: PathBuf,
    pub files: Vec<PathBuf>,
    pub env: Vec<(String, String)>,
    pub qemu_args: Vec<String>,
    pub timeout: Duration,
    pub mem_mib: u32,
    pub cpus: u32,
    pub append: String,
}

impl GuestBoot {
    /// `script` is a name in `tests/guest/scripts/` or a path. The guest runs
    /// it as `/test/run.sh`; `scripts/lib.sh` is always copied to `/test/lib.sh`.
    pub fn new(script: impl AsRef<Path>) -> GuestBoot {
        let s = script.as_ref();
        let script = if s.components().count() == 1 {
            guest_script(&s.to_string_lossy())
        } else {
            s.to_path_buf()
        };
        GuestBoot {
            script,
            files: vec![guest_script("lib.sh")],
            env: Vec::new(),
            qemu_args: Vec::new(),
            timeout: DEFAULT_BOOT_TIMEOUT,
            mem_mib: 512,
            cpus: 1,
            append: String::new(),
        }
    }

    /// Variable exported to the guest script.
    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Extra file copied into the guest's `/test/` (by file name).
    pub fn file(mut self, path: impl Into<PathBuf>) -> Self {
        self.files.push(path.into());
        self
    }

    pub fn qemu_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.qemu_args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }

    pub fn mem_mib(mut self, n: u32) -> Self {
        self.mem_mib = n;
        self
    }

    /// Extra kernel command line.
    pub fn append(mut self, s: &str) -> Self {
        self.append = s.to_string();
        self
    }
}
