#!/usr/bin/env bash
# Boot the test guest with a guest script, capture the serial console, enforce
# a timeout and exit with the guest script's exit status. (The Rust tests in
# tests/tests/guest_*.rs boot guests themselves through tests/src/guest.rs;
# this script is for running guest scripts by hand.)
#
# Usage: run-guest.sh [options] GUEST_SCRIPT [-- EXTRA_QEMU_ARGS...]
#   -t SECONDS  wall-clock limit for QEMU (default 300); on expiry exit 124
#   -o FILE     console log file (default $GUEST_WORK/logs/NAME-TIME.log)
#   -e KEY=VAL  variable exported to the guest script (repeatable)
#   -a FILE     extra file copied into the guest's /test/ (repeatable)
#   -m SIZE     guest RAM in MiB, also the size of the shared memfd (512)
#   -c CPUS     guest vCPUs (default 1; maxcpus is at least 2)
#   -q          quiet: do not echo the console to stdout, only to the log
#
# Example (vhost-user-blk, the backend listens first):
#   target/debug/vhost-blk-backend --socket-path /tmp/b.sock --blk-file disk.img &
#   tests/guest/run-guest.sh -e PAT_OFF=$((64<<20)) tests/guest/scripts/blk-pattern.sh -- \
#       -chardev socket,id=c0,path=/tmp/b.sock -device vhost-user-blk-pci,chardev=c0,num-queues=1
#
# The guest script runs as root under busybox sh in /test, with the virtio
# modules loaded and fio/iperf3/blkdiscard on PATH. Its exit status comes back
# through a "@@GUEST-EXIT@@ <n>" console line (the guest then powers off).
# Exit status: the script's; 124 on timeout; 125 if QEMU ended without a
# guest status (crash, kernel panic, bad QEMU args).
#
# Environment (see also common.sh): GUEST_ACCEL auto|kvm|tcg, GUEST_MACHINE
# (q35), GUEST_APPEND (extra kernel cmdline), GUEST_VERBOSE=1 (no "quiet").
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,30p' "$0"; exit 125; }
timeout_s=300 log="" mem=512 cpus=1 quiet=0
envs=() files=()
while getopts "t:o:e:a:m:c:q" opt; do
    case $opt in
        t) timeout_s=$OPTARG ;;  o) log=$OPTARG ;;  e) envs+=("$OPTARG") ;;
        a) files+=("$OPTARG") ;; m) mem=${OPTARG%M} ;; c) cpus=$OPTARG ;;
        q) quiet=1 ;;            *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || usage
script=$1; shift
[ "${1:-}" = "--" ] && shift
extra_qemu=("$@")
[ -f "$script" ] || die "no such guest script: $script"
[ -f "$INITRAMFS" ] || die "no initramfs at $INITRAMFS; run setup.sh and build-initramfs.sh"
kernel=$(kernel_image)

accel=$(resolve_accel)
case $accel in
    kvm) accel_args=(-enable-kvm -cpu host) ;;
    tcg) accel_args=(-accel tcg -cpu max) ;;
    *)   die "GUEST_ACCEL must be auto, kvm or tcg" ;;
esac

# --- per-run initrd = base initramfs + gzip'd cpio holding /test ------------------
run_dir=$(mktemp -d "${TMPDIR:-/tmp}/run-guest.XXXXXX")
trap 'rm -rf "$run_dir"' EXIT
mkdir -p "$run_dir/root/test"
install -m 755 "$script" "$run_dir/root/test/run.sh"
# scripts/lib.sh (helpers for the blk scripts) is always there as /test/lib.sh.
cp "$HARNESS_DIR/scripts/lib.sh" "$run_dir/root/test/"
for f in ${files[@]+"${files[@]}"}; do cp -L "$f" "$run_dir/root/test/"; done
# busybox sh sources this with set -a: single-quote every value.
for kv in ${envs[@]+"${envs[@]}"}; do
    v=${kv#*=}; printf "%s='%s'\n" "${kv%%=*}" "${v//\'/\'\\\'\'}"
done > "$run_dir/root/test/env"
# The kernel unpacks concatenated archives in order.
(cd "$run_dir/root" && find . | cpio -o -H newc -R 0:0 --quiet) | gzip -1 > "$run_dir/test.cpio.gz"
cat "$INITRAMFS" "$run_dir/test.cpio.gz" > "$run_dir/initrd"

append="console=ttyS0 panic=-1 mitigations=off"
[ "${GUEST_VERBOSE:-0}" = 1 ] || append+=" quiet"
append+=" ${GUEST_APPEND:-}"

if [ -z "$log" ]; then
    mkdir -p "$GUEST_WORK/logs"
    log="$GUEST_WORK/logs/$(basename "$script" .sh)-$(date +%Y%m%d-%H%M%S).log"
fi
maxcpus=$cpus; [ "$maxcpus" -ge 2 ] || maxcpus=2

# -nodefaults: no default NIC/VGA/monitor; the serial port is the only stdio
# user. memory-backend-memfd,share=on lets vhost-user backends map guest RAM.
# maxcpus>=2: with plain -smp 1 under TCG a guest can miss a completion
# interrupt and hang.
qemu_cmd=("$QEMU" "${accel_args[@]}"
    -machine "${GUEST_MACHINE:-q35}" -m "${mem}M" -smp "$cpus,maxcpus=$maxcpus"
    -object "memory-backend-memfd,id=mem,size=${mem}M,share=on" -numa node,memdev=mem
    -nodefaults -no-user-config -nographic -serial stdio -no-reboot
    -kernel "$kernel" -initrd "$run_dir/initrd" -append "$append"
    ${extra_qemu[@]+"${extra_qemu[@]}"})
log "accel=$accel timeout=${timeout_s}s log=$log"
log "qemu: ${qemu_cmd[*]}"
start=$(date +%s%N)
set +e
if [ $quiet = 1 ]; then
    timeout -k 5 "$timeout_s" "${qemu_cmd[@]}" </dev/null >"$log" 2>&1
    qrc=$?
else
    timeout -k 5 "$timeout_s" "${qemu_cmd[@]}" </dev/null 2>&1 | tee "$log"
    qrc=${PIPESTATUS[0]}
fi
set -e
ms=$(( ($(date +%s%N) - start) / 1000000 )); wall=$((ms / 1000)).$(printf %03d $((ms % 1000)))

status=$(tr -d '\r' < "$log" | sed -n 's/^@@GUEST-EXIT@@ \([0-9]*\).*/\1/p' | tail -n1)
if [ $qrc = 124 ] || [ $qrc = 137 ]; then
    rc=124; log "TIMEOUT after ${timeout_s}s"
elif [ -n "$status" ]; then
    rc=$status
else
    rc=125; log "QEMU exited ($qrc) without a guest exit status"
fi
if grep 'falling back on userspace virtio' "$log" >/dev/null; then
    log "QEMU fell back on userspace virtio (vhost-user setup failed)"; [ "$rc" != 0 ] || rc=126
fi
log "guest exit status=$rc qemu rc=$qrc wall=${wall}s"
exit "$rc"
