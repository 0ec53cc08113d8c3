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
lines() { if [ -f "$1" ]; then wc -l < "$1"; else echo 0; fi; }
before=$(lines "$skips")
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# --no-fail-fast: a failing test binary must not stop the ones after it from running.
cargo test --workspace --locked --no-fail-fast -- --test-threads=2 2>&1 | tee "$log" || status=$?
after=$(lines "$skips")
skipped=$((after - before))
# Every binary announces "running N tests" and, if it finishes, "test result: ..."; tests
# of a binary that crashed or hung up before its result line did not run to a verdict and
# count as failed ("did not finish").
read -r planned passed failed ignored started results failed_results failed_targets < <(awk '
    /^running [0-9]+ tests?$/ {n += $2; b += 1}
    /^test result:/ {p += $4; f += $6; i += $8; r += 1}
    /^test result: FAILED/ {fr += 1}
    /^error: (test|doctest) failed, to rerun/ {ft += 1}
    END {print n + 0, p + 0, f + 0, i + 0, b + 0, r + 0, fr + 0, ft + 0}' "$log")
unfinished=$((planned - passed - failed - ignored))
[ "$unfinished" -ge 0 ] || unfinished=0
# A target that failed without running a test (a doc-test or test build that failed)
# has neither a result line nor a crashed binary's "running" line: one failure each.
crashed=$((started - results))
unbuilt=$((failed_targets - failed_results - crashed))
[ "$unbuilt" -ge 0 ] || unbuilt=0
if [ "$skipped" -gt 0 ]; then
    sed -n "$((before + 1)),\$p" "$skips" >&2
fi
[ "$ignored" = 0 ] || echo "note: $ignored ignored (manual benchmarks, #[ignore]; not counted below)"
if [ "$unfinished" -gt 0 ]; then
    echo "error: $unfinished tests did not finish (their test binary crashed): counted as failed"
    [ "$status" != 0 ] || status=1
fi
if [ "$unbuilt" -gt 0 ]; then
    echo "error: $unbuilt test targets failed before running any test (see above): counted as failed"
    [ "$status" != 0 ] || status=1
fi
echo "summary: $((passed - skipped)) passed, $((failed + unfinished + unbuilt)) failed, $skipped skipped"
exit "$status"
