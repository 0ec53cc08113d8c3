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
exit 0
