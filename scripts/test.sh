#!/usr/bin/env bash
# Sets up what the tests need (idempotent: apt packages, a guest kernel and initramfs for
# the QEMU tests) and runs the whole suite: format, lints, unit tests, frontend-harness
# tests and real-guest tests.
#
# Guest tests need root (QEMU, taps, namespaces). Without root they print "SKIPPED" and
# are counted as skipped; with VHOST_GUEST_REQUIRE=1 (set under CI) a skip is a failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" = 0 ]; then
    tests/guest/setup.sh
    tests/guest/build-initramfs.sh
else
    echo "SKIPPED: guest set-up needs root; guest tests will report SKIPPED" >&2
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Guest tests start the backend binaries, so build everything first.
cargo build --workspace --all-targets --locked
cargo test --workspace --locked -- --test-threads=2
