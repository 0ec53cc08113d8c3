# Live migration with vhost-blk-backend attached. The host migrates this guest to a second
# QEMU while we keep reading the disk (buffered, so the backend writes straight into page
# cache pages: memory the VMM only knows is dirty through the backend's dirty log). The
# host signals the end of the migration by writing "MIGRATED" into block MARK_BLK of the
# image; then, on the destination, the chunks still cached must match the image.
#   CHUNKS, CHUNK_BASE_MIB: 1 MiB chunks to read; /test/chunks.sha: their sha256, in order.
. /test/lib.sh
set -u
need_dev
N=${CHUNKS:-32}
BASE=${CHUNK_BASE_MIB:-16}
MARK=${MARK_BLK:-0}

marker() { dd if=$DEV bs=4096 skip=$MARK count=1 iflag=direct 2>/dev/null | head -c 8; }

echo 3 > /proc/sys/vm/drop_caches
result phase=migrate
passes=0
while [ "$(marker)" != MIGRATED ]; do
    echo 1 > /proc/sys/vm/drop_caches
    i=0
    while [ $i -lt $N ]; do
        dd if=$DEV of=/dev/null bs=1M skip=$((BASE + i)) count=1 2>/dev/null
        i=$((i + 1))
    done
    passes=$((passes + 1))
    [ $passes -lt 400 ] || fail "no migration marker after $passes passes" 3
done
result passes=$passes

# Verify from the page cache (no I/O): what the backend wrote before and during the
# migration must have reached this (destination) guest's RAM.
bad=0
i=0
while [ $i -lt $N ]; do
    got=$(dd if=$DEV bs=1M skip=$((BASE + i)) count=1 2>/dev/null | sha256sum | cut -d' ' -f1)
    want=$(sed -n "$((i + 1))p" /test/chunks.sha)
    [ "$got" = "$want" ] || { bad=$((bad + 1)); echo "chunk $i: $got != $want"; }
    i=$((i + 1))
done
result chunk_mismatches=$bad

# The destination backend serves writes too.
random_file /tmp/post $((4 << 20))
result post_write_sha256=$(file_sha /tmp/post)
dev_write /tmp/post $((4 << 20)) conv=fsync || fail "write after migration failed" 4
[ $bad = 0 ] || fail "$bad chunks differ after migration" 5
exit 0
