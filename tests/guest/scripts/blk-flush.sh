# Flush: buffered (page cache) writes made durable by the guest, then a
# "@@RESULT flushed=1" marker; the host may kill the backend when it sees it,
# so the guest waits FLUSH_WAIT seconds (default 0) before exiting.
#   range A at A_OFF: dd conv=fsync   (fsync on the block device -> FLUSH)
#   range B at B_OFF: dd, then sync   (global sync -> writeback + FLUSH)
# Env: A_OFF, B_OFF, LEN. Results: a_sha256, b_sha256, flushed=1.
. /test/lib.sh
set -u
blk_info
random_file /tmp/a "$LEN"
random_file /tmp/b "$LEN"
result a_sha256=$(file_sha /tmp/a) b_sha256=$(file_sha /tmp/b)
dd if=/tmp/a of="$DEV" bs=65536 seek=$(( A_OFF / 65536 )) conv=fsync 2>/dev/null || fail "write A failed" 3
dd if=/tmp/b of="$DEV" bs=65536 seek=$(( B_OFF / 65536 )) 2>/dev/null || fail "write B failed" 3
sync
result flushed=1
sleep "${FLUSH_WAIT:-0}"
exit 0
