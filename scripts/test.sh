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
    # QEMU 11 in a trixie chroot: the only user-creatable vhost-user device for the console
    # (first run: a few minutes; afterwards about a second).
    tests/guest/setup-qemu-trixie.sh
    # DPDK's testpmd: a second real vhost-user frontend for the net backend.
    DPDK_TESTPMD=$(tests/guest/setup-dpdk.sh)
    export DPDK_TESTPMD
else
    echo "SKIPPED: guest set-up needs root; guest tests will report SKIPPED" >&2
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Guest tests start the backend binaries, so build everything first.
cargo build --workspace --all-targets --locked
# Guest tests that cannot run report "SKIPPED" and append a line to SKIPPED.txt; cargo
# counts them as passed, so the closing summary moves them to the skipped column.
skips="${VHOST_GUEST_WORK:-/var/tmp/vhost-guest}/SKIPPED.txt"
before=$(cat "$skips" 2>/dev/null | wc -l)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked -- --test-threads=2 2>&1 | tee "$log" || status=$?
after=$(cat "$skips" 2>/dev/null | wc -l)
skipped=$((after - before))
read -r passed failed < <(awk '/^test result:/ {p += $4; f += $6} END {print p + 0, f + 0}' "$log")
if [ "$skipped" -gt 0 ]; then
    sed -n "$((before + 1)),\$p" "$skips" >&2
fi
echo "summary: $((passed - skipped)) passed, $failed failed, $skipped skipped"
exit "$status"
