#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/) for SECONDS each (default 60) and prints, per
# target, the executions and any crash. Exits non-zero if a target crashed, timed out or
# ran out of memory. Not part of scripts/test.sh (it needs a nightly toolchain and
# minutes per target); see fuzz/README.md.
#
#   scripts/fuzz.sh [SECONDS]
#   FUZZ_TARGETS="blk_request chain_ring" scripts/fuzz.sh 30
#
# New inputs the fuzzer finds go to fuzz/target/fuzz-corpus/<target> (not committed);
# the seeds in fuzz/corpus/<target> are only read; fuzz/dict/<target>.dict, if there,
# is passed as a libFuzzer dictionary. Crash inputs go to
# fuzz/artifacts/<target>/; logs to fuzz/target/fuzz-logs/<target>.log.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"

secs="${1:-60}"
toolchain="${FUZZ_TOOLCHAIN:-nightly}"

if ! cargo "+$toolchain" --version >/dev/null 2>&1; then
    echo "error: the $toolchain toolchain is missing (rustup toolchain install $toolchain)" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

cargo "+$toolchain" fuzz build -O
targets="${FUZZ_TARGETS:-$(cargo "+$toolchain" fuzz list)}"
mkdir -p target/fuzz-logs
status=0
summary=()
for t in $targets; do
    mkdir -p "target/fuzz-corpus/$t" "corpus/$t"
    log="target/fuzz-logs/$t.log"
    echo "== $t: ${secs}s" >&2
    rc=0
    dict=()
    if [ -f "dict/$t.dict" ]; then
        dict=(-dict="dict/$t.dict")
    fi
    cargo "+$toolchain" fuzz run -O "$t" "target/fuzz-corpus/$t" "corpus/$t" -- \
        "${dict[@]}" -max_total_time="$secs" -print_final_stats=1 -timeout=20 -rss_limit_mb=4096 \
        >"$log" 2>&1 || rc=$?
    execs=$(awk '/^stat::number_of_executed_units:/ {print $2}' "$log" | tail -1)
    crash=$(grep -E '^(artifact_prefix|Test unit written to|==[0-9]+==ERROR|SUMMARY:|thread .* panicked)' "$log" | grep -v '^artifact_prefix' | head -3 || true)
    if [ "$rc" != 0 ] || [ -n "$crash" ]; then
        status=1
        summary+=("$t: FAILED (exit $rc) after ${execs:-?} executions")
        echo "$crash" | sed 's/^/    /' >&2
        grep -E '^Test unit written to' "$log" | sed 's/^/    /' >&2 || true
    else
        summary+=("$t: ok, ${execs:-?} executions in ${secs}s")
    fi
done
echo
printf '%s\n' "${summary[@]}"
if [ "$status" != 0 ]; then
    echo "reproduce: cd fuzz && cargo +$toolchain fuzz run -O <target> artifacts/<target>/<crash file>"
fi
exit "$status"
