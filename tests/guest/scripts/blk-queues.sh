# Multi-queue check: report the number of blk-mq hardware queues, then do a
# pattern round trip from every online CPU (taskset), so that every queue
# mapped to an online CPU carries I/O.
# Env: PAT_OFF (base offset), PAT_LEN (per-CPU length; CPU n uses
# PAT_OFF + n*PAT_LEN). Results: per CPU cpuN_written_sha256 / cpuN_readback_sha256.
. /test/lib.sh
set -u
blk_info
ncpu=$(nproc)
cpu=0; rc=0
while [ $cpu -lt "$ncpu" ]; do
    off=$(( PAT_OFF + cpu * PAT_LEN ))
    random_file /tmp/pat$cpu "$PAT_LEN"
    w=$(file_sha /tmp/pat$cpu)
    taskset -c $cpu dd if=/tmp/pat$cpu of="$DEV" bs=65536 seek=$(( off / 65536 )) oflag=direct conv=fsync 2>/dev/null \
        || fail "write from cpu $cpu failed" 3
    drop_caches
    taskset -c $cpu dd if="$DEV" of=/tmp/back$cpu bs=65536 skip=$(( off / 65536 )) count=$(( PAT_LEN / 65536 )) iflag=direct 2>/dev/null \
        || fail "read from cpu $cpu failed" 3
    r=$(file_sha /tmp/back$cpu)
    result cpu${cpu}_written_sha256=$w cpu${cpu}_readback_sha256=$r
    [ "$w" = "$r" ] || { echo "FAIL: cpu $cpu pattern mismatch"; rc=4; }
    rm -f /tmp/pat$cpu /tmp/back$cpu
    cpu=$(( cpu + 1 ))
done
result cpus_checked=$ncpu
exit $rc
