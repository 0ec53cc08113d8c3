# Throughput of one virtio-serial port named $PORT_NAME, both directions through one
# open file descriptor (the host side is tests/src/console_bench.rs, which times both):
#   1. guest → host: BENCH_MIB MiB from /dev/zero in 64 KiB writes;
#   2. host → guest: read BENCH_MIB MiB (full 64 KiB blocks), then send "@@BENCH-DONE".
# Results (guest clock, for reference): tx_secs, rx_secs.
. /test/lib.sh
for i in $(seq 100); do
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat $p/name 2>/dev/null)" = "$PORT_NAME" ] && dev=/dev/$(basename $p)
    done
    [ -n "$dev" ] && [ -c "$dev" ] && break
    sleep 0.1
done
[ -n "$dev" ] || fail "no port $PORT_NAME"
blocks=$((BENCH_MIB * 16))
exec 3<>"$dev" || fail "cannot open $dev"
t0=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/zero bs=65536 count=$blocks >&3 2>/tmp/dd.err || { cat /tmp/dd.err; fail "dd to the port"; }
t1=$(cut -d' ' -f1 /proc/uptime)
dd bs=65536 count=$blocks iflag=fullblock of=/dev/null <&3 2>/tmp/dd.err || { cat /tmp/dd.err; fail "dd from the port"; }
t2=$(cut -d' ' -f1 /proc/uptime)
grep -q "^$blocks+0 records in" /tmp/dd.err || { cat /tmp/dd.err; fail "short read from the port"; }
echo "@@BENCH-DONE" >&3
result tx_secs=$(awk "BEGIN{print $t1 - $t0}") rx_secs=$(awk "BEGIN{print $t2 - $t1}")
exec 3>&-
exit 0
