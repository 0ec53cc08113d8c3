# Guest test for serial-backend (virtio-console MULTIPORT over vhost-user):
# two consoles (/dev/hvc0, /dev/hvc1), named ports org.test.p1..p3 and the
# hostinfo port. Each named port: the guest writes PORT_BYTES random bytes and
# closes (the host reads to EOF), then reads PORT_BYTES the host sends.
# Results: sha256 of every stream, the hostinfo document's hostname.
. /test/lib.sh
N=${PORT_BYTES:-4194304}
NAMES="org.test.p1 org.test.p2 org.test.p3"

for i in $(seq 100); do
    [ -c /dev/hvc1 ] && [ "$(ls /sys/class/virtio-ports 2>/dev/null | wc -l)" -ge 6 ] && break
    sleep 0.1
done
# udev would make /dev/virtio-ports/NAME; busybox has no udev, so do it here.
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
    n=$(cat "$p/name" 2>/dev/null)
    echo "$(basename $p): name=$n"
    [ -n "$n" ] && ln -sf "/dev/$(basename $p)" "/dev/virtio-ports/$n"
done
ls -l /dev/hvc0 /dev/hvc1 /dev/virtio-ports/
result hvc0=$([ -c /dev/hvc0 ] && echo yes || echo no) hvc1=$([ -c /dev/hvc1 ] && echo yes || echo no) \
    nports=$(ls /sys/class/virtio-ports | wc -l)

echo "hello from hvc0" > /dev/hvc0 || fail "write hvc0"
echo "hello from hvc1" > /dev/hvc1 || fail "write hvc1"

cat /dev/virtio-ports/org.hostinfo.0 > /tmp/hostinfo.json || fail "read hostinfo"
cat /tmp/hostinfo.json
host=$(sed -n 's/.*"hostname": "\([^"]*\)".*/\1/p' /tmp/hostinfo.json)
result hostinfo_hostname=$host hostinfo_bytes=$(wc -c < /tmp/hostinfo.json)

i=0
for n in $NAMES; do
    i=$((i + 1))
    head -c "$N" /dev/urandom > /tmp/out.$i
    result tx_sha_$i=$(file_sha /tmp/out.$i)
done
t0=$(cut -d' ' -f1 /proc/uptime)
i=0
for n in $NAMES; do
    i=$((i + 1))
    cat /tmp/out.$i > /dev/virtio-ports/$n &
done
wait
t1=$(cut -d' ' -f1 /proc/uptime)
i=0
for n in $NAMES; do
    i=$((i + 1))
    head -c "$N" /dev/virtio-ports/$n > /tmp/in.$i &
done
wait
t2=$(cut -d' ' -f1 /proc/uptime)
i=0
for n in $NAMES; do
    i=$((i + 1))
    result rx_sha_$i=$(file_sha /tmp/in.$i) rx_bytes_$i=$(wc -c < /tmp/in.$i)
done
result tx_secs=$(awk "BEGIN{print $t1 - $t0}") rx_secs=$(awk "BEGIN{print $t2 - $t1}")
exit 0
