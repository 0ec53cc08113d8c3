# Guest side of tests/tests/guest_libvirt.rs: a guest libvirt started from
# deploy/libvirt/*.xml checks each vhost-user device it was given.
#  * disk (always): size, serial, queues; reads the range the host filled before boot
#    (READ_OFF/READ_LEN) and reports its sha256; writes WRITE_LEN random bytes at
#    WRITE_OFF with O_DIRECT, reads them back, reports both hashes (the host compares
#    them with the image file).
#  * NIC (always): GUEST_IP on the first interface, pings HOST_IP (the tap's end in the
#    backend's namespace), reports its queue count and MAC.
#  * console (CONSOLE_PORT set): writes a line to /dev/hvc0; on the named port
#    CONSOLE_PORT it writes PORT_BYTES random bytes and closes (the host reads to EOF),
#    then reads PORT_BYTES the host sends back; reports both hashes.
. /test/lib.sh
set -u
need_dev

echo "== disk =="
result blk_size_bytes=$(( $(cat $SYSB/size) * 512 )) blk_queues=$(ls $SYSB/mq | wc -l)
result blk_serial=$(cat $SYSB/serial 2>/dev/null | tr -c 'A-Za-z0-9._:-' _)
r=$(dev_sha "$READ_OFF" "$READ_LEN") || fail "read of the host's pattern failed" 3
result blk_host_pattern_sha256=$r
random_file /tmp/pat "$WRITE_LEN"
w=$(file_sha /tmp/pat)
dev_write /tmp/pat "$WRITE_OFF" conv=fsync || fail "write failed" 3
rm -f /tmp/pat
drop_caches
r=$(dev_sha "$WRITE_OFF" "$WRITE_LEN") || fail "read back failed" 3
result blk_written_sha256=$w blk_readback_sha256=$r
[ "$w" = "$r" ] || fail "disk read back differs from what was written" 4

echo "== NIC =="
ifc=$(ls /sys/class/net | grep -v '^lo$' | head -n1)
[ -n "$ifc" ] || fail "no network interface" 5
result net_mac=$(cat /sys/class/net/$ifc/address) net_queues=$(ls -d /sys/class/net/$ifc/queues/rx-* | wc -l)
ip addr add "$GUEST_IP" dev "$ifc" && ip link set "$ifc" up || fail "cannot configure $ifc" 5
ok=0
for i in $(seq 1 30); do
    if ping -c 1 -W 1 "$HOST_IP" >/dev/null 2>&1; then ok=1; break; fi
done
[ $ok = 1 ] || fail "$HOST_IP not reachable" 5
ping -c 3 -W 2 "$HOST_IP" || fail "ping $HOST_IP" 5
result net_ping=ok

if [ -n "${CONSOLE_PORT:-}" ]; then
    echo "== console =="
    for i in $(seq 100); do
        [ -c /dev/hvc0 ] && [ "$(ls /sys/class/virtio-ports 2>/dev/null | wc -l)" -ge 2 ] && break
        sleep 0.1
    done
    # No udev in this guest: make /dev/virtio-ports/NAME by hand.
    mkdir -p /dev/virtio-ports
    for p in /sys/class/virtio-ports/*; do
        n=$(cat "$p/name" 2>/dev/null)
        [ -n "$n" ] && ln -sf "/dev/$(basename $p)" "/dev/virtio-ports/$n"
    done
    result console_hvc0=$([ -c /dev/hvc0 ] && echo yes || echo no) \
        console_ports=$(ls /sys/class/virtio-ports | wc -l)
    echo "hello from hvc0 under libvirt" > /dev/hvc0 || fail "write hvc0" 6
    port=/dev/virtio-ports/$CONSOLE_PORT
    [ -c "$port" ] || fail "no port $CONSOLE_PORT" 6
    head -c "$PORT_BYTES" /dev/urandom > /tmp/out
    result console_tx_sha256=$(file_sha /tmp/out)
    cat /tmp/out > "$port" || fail "write $port" 6
    head -c "$PORT_BYTES" "$port" > /tmp/in || fail "read $port" 6
    result console_rx_sha256=$(file_sha /tmp/in) console_rx_bytes=$(wc -c < /tmp/in)
fi
exit 0
