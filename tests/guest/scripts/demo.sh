# The demo's guest side: show what the guest sees of the vhost-user disk and use it.
# Results: disk facts, a pattern written and read back, fio IOPS, discard check.
. /test/lib.sh
set -u
need_dev
echo "== the guest's view of /dev/vda (vhost-blk-backend) =="
result size_bytes=$(( $(cat $SYSB/size) * 512 ))
result logical_block_size=$(cat $SYSB/queue/logical_block_size)
result queues=$(ls $SYSB/mq | wc -l)
result write_cache=$(cat $SYSB/queue/write_cache | tr ' ' _)
result serial=$(cat $SYSB/serial 2>/dev/null || echo none)
result discard_max_bytes=$(cat $SYSB/queue/discard_max_bytes)

echo "== write 16 MiB of random data with O_DIRECT, read it back =="
random_file /tmp/pat $((16 << 20))
w=$(file_sha /tmp/pat)
dev_write /tmp/pat $((8 << 20)) conv=fsync || fail "write failed" 3
rm -f /tmp/pat
drop_caches
r=$(dev_sha $((8 << 20)) $((16 << 20))) || fail "read failed" 3
result pattern_written_sha256=$w
result pattern_readback_sha256=$r
[ "$w" = "$r" ] || fail "read back differs" 4

echo "== fio 4k random reads, QD 32, 3 s (TCG-bound in this guest) =="
fio --name=demo --filename=$DEV --direct=1 --ioengine=io_uring --rw=randread --bs=4k \
    --iodepth=32 --runtime=3 --time_based --size=$((32 << 20)) --offset=$((64 << 20)) \
    --output-format=terse --terse-version=3 > /tmp/fio.out 2>&1 || fail "fio failed" 5
result fio_randread_iops=$(cut -d';' -f8 /tmp/fio.out)

echo "== discard 1 MiB, read back zeroes =="
$BLKDISCARD -o $((40 << 20)) -l $((1 << 20)) $DEV || fail "blkdiscard failed" 6
drop_caches
z=$(dev_sha $((40 << 20)) $((1 << 20)))
[ "$z" = "$(zeros_sha $((1 << 20)))" ] || fail "discarded range not zero" 7
result discard_reads_zero=1

if [ -n "${HOST_IP:-}" ]; then
    echo "== network: vhost-net-backend, tap in a private namespace on the host =="
    ifc=$(ls /sys/class/net | grep -v '^lo$' | head -n1)
    ip addr add "$GUEST_IP" dev "$ifc" && ip link set "$ifc" up
    ok=0
    for i in $(seq 1 30); do
        if ping -c 1 -W 1 "$HOST_IP" >/dev/null 2>&1; then ok=1; break; fi
    done
    result net_ping=$([ $ok = 1 ] && echo ok || echo failed)
    if [ $ok = 1 ]; then
        for dir in tx rx; do
            flag=""; [ $dir = rx ] && flag=-R
            iperf3 -c "$HOST_IP" -t 2 $flag -f m > /tmp/iperf.out 2>&1
            mbps=$(grep receiver /tmp/iperf.out | tail -n1 | awk '{for(i=1;i<=NF;i++) if($i=="Mbits/sec") print $(i-1)}')
            result net_iperf_${dir}_mbps=${mbps:-0}
        done
    fi
fi

if [ -d /sys/class/virtio-ports ]; then
    echo "== console: serial-backend (consoles, named ports, hostinfo) =="
    for i in $(seq 100); do
        [ "$(ls /sys/class/virtio-ports 2>/dev/null | wc -l)" -ge 3 ] && break
        sleep 0.1
    done
    mkdir -p /dev/virtio-ports
    for p in /sys/class/virtio-ports/*; do
        n=$(cat "$p/name" 2>/dev/null)
        [ -n "$n" ] && ln -sf "/dev/$(basename $p)" "/dev/virtio-ports/$n"
    done
    result console_ports=$(ls /dev/virtio-ports | tr '\n' ',' | sed 's/,$//')
    result console_hvc0=$([ -c /dev/hvc0 ] && echo yes || echo no)
    echo "hello from the guest console" > /dev/hvc0
    echo "hello from the guest, $(uname -r)" > /dev/virtio-ports/org.demo.log
    cat /dev/virtio-ports/org.hostinfo.0 > /tmp/hostinfo.json
    result hostinfo_hostname=$(sed -n 's/.*"hostname": "\([^"]*\)".*/\1/p' /tmp/hostinfo.json)
    result hostinfo_cpus=$(sed -n 's/.*"cpu_count": \([0-9]*\).*/\1/p' /tmp/hostinfo.json)
fi
exit 0
