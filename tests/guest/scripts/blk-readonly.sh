# Read-only device: the guest must see it read-only, reads must work, and
# every kind of write must fail.
# Env: READ_OFF, READ_LEN. Results: getro, read_sha256, write_rc,
# write_buffered_rc, zeroout_rc, discard_rc (all write rcs must be != 0).
. /test/lib.sh
set -u
blk_info
ro=$($BLOCKDEV --getro "$DEV")
result getro=$ro
r=$(dev_sha "$READ_OFF" "$READ_LEN") || fail "read failed" 3
result read_sha256=$r
head -c 65536 /dev/urandom > /tmp/junk
dd if=/tmp/junk of="$DEV" bs=4096 seek=0 oflag=direct 2>/tmp/err; w1=$?; cat /tmp/err
dd if=/tmp/junk of="$DEV" bs=4096 seek=16 conv=fsync 2>/tmp/err; w2=$?; cat /tmp/err
$BLKDISCARD -z -o 0 -l 65536 "$DEV" 2>&1; w3=$?
$BLKDISCARD -o 0 -l 65536 "$DEV" 2>&1; w4=$?
result write_rc=$w1 write_buffered_rc=$w2 zeroout_rc=$w3 discard_rc=$w4
[ "$ro" = 1 ] || fail "blockdev --getro says $ro" 6
[ $w1 != 0 ] && [ $w2 != 0 ] && [ $w3 != 0 ] && [ $w4 != 0 ] || fail "a write succeeded on a read-only device" 6
exit 0
