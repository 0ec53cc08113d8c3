#!/usr/bin/env bash
# The demo: installs what it needs (apt: QEMU 10 from bookworm-backports, fio, a guest
# kernel; idempotent), builds the backends, starts them on a fresh disk image, boots a
# Linux guest that uses them, and prints what the guest saw and did.
#
# Needs root (QEMU, apt). Runs under KVM where it works, TCG elsewhere.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
[ "$(id -u)" = 0 ] || { echo "demo: run as root (it installs QEMU and boots a VM)" >&2; exit 1; }

say() { printf '\n\033[1m%s\033[0m\n' "$*"; }
say "1/4 set-up (apt packages, guest kernel, initramfs; cached after the first run)"
tests/guest/setup.sh
tests/guest/build-initramfs.sh
say "2/4 build (cargo build --release)"
cargo build --release --locked -p vhost-blk-backend

work=$(mktemp -d /var/tmp/vhost-demo.XXXXXX)
backend_pid=""
cleanup() {
    [ -n "$backend_pid" ] && kill "$backend_pid" 2>/dev/null && wait "$backend_pid" 2>/dev/null
    rm -f "$work/disk.img"
}
trap cleanup EXIT

say "3/4 start the backends"
truncate -s 256M "$work/disk.img"
target/release/vhost-blk-backend --socket-path "$work/blk.sock" --blk-file "$work/disk.img" \
    --num-queues 1 --serial demo-disk-0001 2> "$work/vhost-blk-backend.log" &
backend_pid=$!
for _ in $(seq 100); do [ -S "$work/blk.sock" ] && break; sleep 0.05; done
[ -S "$work/blk.sock" ] || { cat "$work/vhost-blk-backend.log"; exit 1; }
echo "vhost-blk-backend: pid $backend_pid, socket $work/blk.sock, image $work/disk.img (256 MiB)"
echo "vhost-net-backend: not built yet (issue: vhost-net-backend); left out"
echo "serial-backend:    not built yet (issue: serial-backend); left out"

say "4/4 boot a guest with the devices attached"
console="$work/console.log"
set +e
tests/guest/run-guest.sh -q -t 300 -o "$console" \
    -a tests/guest/scripts/lib.sh tests/guest/scripts/demo.sh -- \
    -chardev socket,id=blk0,path="$work/blk.sock" \
    -device vhost-user-blk-pci,chardev=blk0,num-queues=1
rc=$?
set -e
kill "$backend_pid"; wait "$backend_pid" 2>/dev/null || true; backend_pid=""

say "Report"
val() { tr -d "\r" < "$console" | sed -n "s/.*@@RESULT $1=\([^ ]*\).*/\1/p" | tail -n1; }
printf '  %-36s %s\n' \
    "guest exit status" "$rc" \
    "disk size seen by the guest" "$(val size_bytes) bytes" \
    "logical block size / queues" "$(val logical_block_size) / $(val queues)" \
    "serial (GET_ID)" "$(val serial)" \
    "write cache" "$(val write_cache)" \
    "16 MiB pattern written (sha256)" "$(val pattern_written_sha256 | cut -c1-16)..." \
    "read back in the guest (sha256)" "$(val pattern_readback_sha256 | cut -c1-16)..." \
    "fio 4k randread QD32 (TCG guest)" "$(val fio_randread_iops) IOPS" \
    "discarded range reads zero" "$( [ "$(val discard_reads_zero)" = 1 ] && echo yes || echo no)"
host_sha=$(dd if="$work/disk.img" bs=1M skip=8 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)
printf '  %-36s %s\n' "same range in the image on the host" "${host_sha:0:16}..."
if [ "$rc" = 0 ] && [ "$host_sha" = "$(val pattern_written_sha256)" ]; then
    say "demo OK: the guest's data went through vhost-blk-backend into the image and back"
    echo "(logs: $work)"
else
    say "demo FAILED (logs: $work; console: $console)"
    tail -n 30 "$console"
    exit 1
fi
