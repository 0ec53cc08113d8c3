//! Man pages of the three backend programs, rendered with clap_mangen from the same clap
//! definitions the programs parse (`<crate>::cli::Args`), so a page cannot miss a flag or
//! say something `--help` does not. One page per program (`vhost-blk-backend.1`) and one
//! per subcommand (`vhost-blk-backend-migrate.1`, `vhost-blk-backend-stats.1`, ...), each
//! program's page with a FILES section naming what its Debian package installs.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_mangen::roff::{bold, roman, Roff};
use clap_mangen::Man;

/// A backend program and where its package puts things.
pub struct Program {
    /// The program (and package, and man page) name.
    pub name: &'static str,
    /// The directory under /etc/vhost-dataplane/ of its instance configurations, and the
    /// name of its vhost-user socket in /run/vhost-dataplane/INSTANCE/.
    pub short: &'static str,
    /// Its clap command line.
    pub command: fn() -> clap::Command,
}

/// The three backends.
pub const PROGRAMS: [Program; 3] = [
    Program {
        name: "vhost-blk-backend",
        short: "blk",
        command: vhost_blk_backend::cli::Args::command,
    },
    Program {
        name: "vhost-net-backend",
        short: "net",
        command: vhost_net_backend::cli::Args::command,
    },
    Program {
        name: "serial-backend",
        short: "serial",
        command: serial_backend::cli::Args::command,
    },
];

/// Writes every page of every program into `out` (created if missing); returns the files
/// written, main pages first.
pub fn render_all(out: &Path) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(out)?;
    let mut written = Vec::new();
    for p in &PROGRAMS {
        written.extend(render_program(p, out)?);
    }
    Ok(written)
}

/// The program's page (with its FILES section) and one page per visible subcommand.
fn render_program(p: &Program, out: &Path) -> io::Result<Vec<PathBuf>> {
    let mut cmd = (p.command)().disable_help_subcommand(true);
    // Names the subcommand pages "<program>-<subcommand>" and their synopses alike.
    cmd.build();
    let main = out.join(format!("{}.1", p.name));
    let mut f = File::create(&main)?;
    Man::new(cmd.clone()).render(&mut f)?;
    f.write_all(files_section(p).as_bytes())?;
    f.flush()?;
    let mut written = vec![main];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        written.push(Man::new(sub.clone()).generate_to(out)?);
    }
    Ok(written)
}

/// FILES: the units, the instance configuration and the capability file.
fn files_section(p: &Program) -> String {
    let (name, short) = (p.name, p.short);
    let mut r = Roff::new();
    r.control("SH", ["FILES"]);
    let mut entry = |path: String, text: String| {
        r.control("TP", []);
        r.text([bold(path)]);
        r.text([roman(text)]);
    };
    entry(
        format!("/usr/lib/systemd/system/{name}@.socket"),
        format!(
            "Listens on /run/vhost-dataplane/INSTANCE/{short}.sock for the VMM and starts \
             {name}@INSTANCE.service on the first connection, handing it the socket as fd 3 \
             (--fd 3). INSTANCE is the VM's name."
        ),
    );
    entry(
        format!("/usr/lib/systemd/system/{name}@.service"),
        format!(
            "Runs {name} --fd 3 $ARGS as the vhost-dataplane user, restarted whenever it \
             exits (Restart=always: the VMM reconnects and in-flight requests are \
             resubmitted)."
        ),
    );
    entry(
        format!("/etc/vhost-dataplane/{short}/INSTANCE.conf"),
        format!(
            "The instance's command line: ARGS=\"...\" (an EnvironmentFile; arguments split \
             at white space). Example: /etc/vhost-dataplane/{short}/example.conf.sample."
        ),
    );
    entry(
        format!("/usr/share/qemu/vhost-user/50-{name}.json"),
        "The vhost-user capability file QEMU and libvirt read to discover the program.".to_string(),
    );
    r.to_roff()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What roff makes of a flag: every hyphen escaped.
    fn roff_flag(long: &str) -> String {
        format!("--{long}").replace('-', "\\-")
    }

    #[test]
    fn every_page_names_every_visible_flag_of_its_command() {
        let dir = tempfile::tempdir().unwrap();
        let written = render_all(dir.path()).unwrap();
        for p in &PROGRAMS {
            let cmd = (p.command)();
            let page = fs::read_to_string(dir.path().join(format!("{}.1", p.name))).unwrap();
            assert!(page.starts_with(".ie"), "{}: not roff", p.name);
            assert!(page.contains(&format!(".TH {} 1", p.name)), "{}", p.name);
            let flags: Vec<&str> = cmd
                .get_arguments()
                .filter(|a| !a.is_hide_set())
                .filter_map(|a| a.get_long())
                .collect();
            assert!(flags.contains(&"fd") && flags.contains(&"control-socket"));
            for long in flags {
                assert!(
                    page.contains(&roff_flag(long)),
                    "{}.1 lacks --{long}",
                    p.name
                );
            }
            assert!(
                !page.contains(&roff_flag("sandbox-selftest")),
                "{}.1 shows a hidden flag",
                p.name
            );
            for sub in cmd.get_subcommands() {
                let file = dir.path().join(format!("{}-{}.1", p.name, sub.get_name()));
                assert!(written.contains(&file), "no page {}", file.display());
                let text = fs::read_to_string(&file).unwrap();
                assert!(text.contains(&roff_flag("control-socket")), "{text}");
            }
            assert!(page.contains(".SH FILES"), "{}", p.name);
            assert!(
                page.contains(&format!("/etc/vhost\\-dataplane/{}/INSTANCE.conf", p.short)),
                "{}",
                p.name
            );
        }
        assert!(written.contains(&dir.path().join("vhost-blk-backend-migrate.1")));
        assert!(written.contains(&dir.path().join("serial-backend-stats.1")));
    }
}
