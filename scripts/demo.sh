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
# QEMU 11 (trixie chroot): the console needs vhost-user-test-device-pci (QEMU >= 10.2).
qemu11="${GUEST_WORK:-/var/tmp/vhost-guest}/qemu-trixie/qemu-system-x86_64"
tests/guest/setup-qemu-trixie.sh || echo "QEMU 11 set-up failed; the console is left out"
say "2/4 build (cargo build --release)"
cargo build --release --locked -p vhost-blk-backend -p vhost-net-backend -p serial-backend

# Under the guest work dir: QEMU 11 runs in a chroot that sees /tmp and that directory.
guest_work="${GUEST_WORK:-/var/tmp/vhost-guest}"
mkdir -p "$guest_work"
work=$(mktemp -d "$guest_work/demo.XXXXXX")
ns="vhost-demo-$$"
pids=()
cleanup() {
    # Stopping is best effort and must not change the demo's exit status.
    set +e
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
    rm -f "$work/disk.img"
}
trap cleanup EXIT
wait_socket() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; return 1; }

say "3/4 start the backends"
truncate -s 256M "$work/disk.img"
target/release/vhost-blk-backend --socket-path "$work/blk.sock" --blk-file "$work/disk.img" \
    --num-queues 1 --serial demo-disk-0001 2> "$work/vhost-blk-backend.log" &
pids+=($!)
wait_socket "$work/blk.sock" || { cat "$work/vhost-blk-backend.log"; exit 1; }
echo "vhost-blk-backend: socket $work/blk.sock, image $work/disk.img (256 MiB)"
qemu_args=(-chardev socket,id=blk0,path="$work/blk.sock"
           -device vhost-user-blk-pci,chardev=blk0,num-queues=1)
guest_env=()

# Network: the backend and its tap live in a private namespace with an iperf3 server.
ip netns add "$ns"
ip netns exec "$ns" ip link set lo up
ip netns exec "$ns" target/release/vhost-net-backend --socket-path "$work/net.sock" \
    --tap dtap0 --num-queue-pairs 1 2> "$work/vhost-net-backend.log" &
pids+=($!)
if wait_socket "$work/net.sock"; then
    ip netns exec "$ns" ip addr add 169.254.88.1/30 dev dtap0
    ip netns exec "$ns" ip link set dtap0 up
    ip netns exec "$ns" iperf3 -s > "$work/iperf3.log" 2>&1 &
    pids+=($!)
    echo "vhost-net-backend: socket $work/net.sock, tap dtap0 in namespace $ns (169.254.88.1)"
    qemu_args+=(-chardev socket,id=net0,path="$work/net.sock"
                -netdev vhost-user,id=n0,chardev=net0
                -device virtio-net-pci,netdev=n0,romfile=)
    guest_env+=(-e HOST_IP=169.254.88.1 -e GUEST_IP=169.254.88.2/30)
else
    echo "vhost-net-backend did not start; network left out:"; cat "$work/vhost-net-backend.log"
fi

# Console: two ports besides the console, one of them hostinfo.
qemu=qemu-system-x86_64
if [ -x "$qemu11" ]; then
    target/release/serial-backend --socket-path "$work/console.sock" \
        --console socket="$work/console0.sock" \
        --port name=org.demo.log,file="$work/guest-log.txt" --hostinfo --max-ports 3 \
        2> "$work/serial-backend.log" &
    pids+=($!)
    wait_socket "$work/console.sock" || { cat "$work/serial-backend.log"; exit 1; }
    echo "serial-backend:    socket $work/console.sock, console on $work/console0.sock,"
    echo "                   port org.demo.log -> $work/guest-log.txt, hostinfo port"
    qemu_args+=(-chardev socket,id=vc,path="$work/console.sock"
                -device vhost-user-test-device-pci,chardev=vc,virtio-id=3,num_vqs=8,config_size=12)
    qemu=$qemu11
else
    echo "serial-backend:    left out (needs QEMU >= 10.2, see tests/guest/setup-qemu-trixie.sh)"
fi

say "4/4 boot a guest with the devices attached"
console="$work/console.log"
set +e
QEMU=$qemu tests/guest/run-guest.sh -q -t 300 -o "$console" "${guest_env[@]}" \
    -a tests/guest/scripts/lib.sh tests/guest/scripts/demo.sh -- "${qemu_args[@]}"
rc=$?
set -e

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
    "discarded range reads zero" "$( [ "$(val discard_reads_zero)" = 1 ] && echo yes || echo no)" \
    "network: ping of the host" "$(val net_ping)" \
    "network: iperf3 guest->host" "$(val net_iperf_tx_mbps) Mbit/s (TCG guest)" \
    "network: iperf3 host->guest" "$(val net_iperf_rx_mbps) Mbit/s" \
    "console: /dev/hvc0" "$(val console_hvc0)" \
    "console: named ports" "$(val console_ports)" \
    "console: hostinfo hostname / CPUs" "$(val hostinfo_hostname) / $(val hostinfo_cpus) (host: $(hostname) / $(nproc))" \
    "console: guest wrote to org.demo.log" "$(cat "$work/guest-log.txt" 2>/dev/null | head -n1)"
host_sha=$(dd if="$work/disk.img" bs=1M skip=8 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)
printf '  %-36s %s\n' "same range in the image on the host" "${host_sha:0:16}..."
ok=1
[ "$rc" = 0 ] && [ "$host_sha" = "$(val pattern_written_sha256)" ] || ok=0
if [ ${#guest_env[@]} -gt 0 ] && [ "$(val net_ping)" != ok ]; then ok=0; fi
if [ "$qemu" = "$qemu11" ] && [ "$(val hostinfo_hostname)" != "$(hostname)" ]; then ok=0; fi
if [ $ok = 1 ]; then
    say "demo OK: disk, network and console all worked through the vhost-user backends"
    echo "(logs: $work)"
else
    say "demo FAILED (logs: $work; console: $console)"
    tail -n 30 "$console"
    exit 1
fi
