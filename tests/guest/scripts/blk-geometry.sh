# Geometry: blk_info reports size/block sizes/queues/serial; then a 64 KiB
# round trip at the very end of the device (TAIL_LEN bytes before the end)
# and a read past the end, which must return no data.
# Results: tail_written_sha256, tail_readback_sha256, past_end_bytes.
. /test/lib.sh
set -u
blk_info
size=$($BLOCKDEV --getsize64 "$DEV")
result dev_size_bytes=$size
len=${TAIL_LEN:-65536}
off=$(( size - len ))
random_file /tmp/tail "$len"
w=$(file_sha /tmp/tail)
dev_write /tmp/tail "$off" conv=fsync || fail "tail write failed" 3
drop_caches
r=$(dev_sha "$off" "$len") || fail "tail read failed" 3
result tail_written_sha256=$w tail_readback_sha256=$r
[ "$w" = "$r" ] || fail "tail mismatch" 4
dd if="$DEV" of=/tmp/past bs=4096 skip=$(( size / 4096 )) count=1 iflag=direct 2>/dev/null
result past_end_bytes=$(wc -c < /tmp/past)
exit 0
