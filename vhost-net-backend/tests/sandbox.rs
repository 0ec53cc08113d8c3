//! `--sandbox`: a forbidden system call ends the real program with a clear message, and
//! `--sandbox none` lets it through. (Every other test that starts the program runs it
//! under the default sandbox.) Each test makes its tap in its own network namespace.

mod common;

use std::process::Command;

use vhost_tests::sandbox::{selftest_is_killed, selftest_passes_without_sandbox};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-net-backend");

fn backend(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["--tap", "sbx0"])
        .arg("--socket-path")
        .arg(dir.join("net.sock"));
    cmd
}

#[test]
fn a_forbidden_call_ends_the_process_with_a_clear_message() {
    if !common::enter_netns("a_forbidden_call_ends_the_process_with_a_clear_message") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    selftest_is_killed(backend(dir.path()));
}

#[test]
fn sandbox_none_lets_the_forbidden_call_through() {
    if !common::enter_netns("sandbox_none_lets_the_forbidden_call_through") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    selftest_passes_without_sandbox(backend(dir.path()), &dir.path().join("net.sock"));
}
