# Guest→host throughput of one virtio-serial port named $PORT_NAME:
# BENCH_MIB MiB from /dev/zero in 64 KiB writes; the host times the receive.
. /test/lib.sh
for i in $(seq 100); do
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat $p/name 2>/dev/null)" = "$PORT_NAME" ] && dev=/dev/$(basename $p)
    done
    [ -n "$dev" ] && [ -c "$dev" ] && break
    sleep 0.1
done
[ -n "$dev" ] || fail "no port $PORT_NAME"
t0=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/zero of="$dev" bs=65536 count=$((BENCH_MIB * 16)) 2>/dev/null || fail "dd"
t1=$(cut -d' ' -f1 /proc/uptime)
result guest_secs=$(awk "BEGIN{print $t1 - $t0}")
exit 0
