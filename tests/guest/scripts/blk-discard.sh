# Discard and write-zeroes. Writes PAT_LEN (>= 24 MiB) random bytes at PAT_OFF,
# then (offsets relative to PAT_OFF):
#   blkdiscard    [ 4M,  8M)   -> must read back as zeros
#   blkdiscard -z [12M, 16M)   -> must read back as zeros
#   [0,4M) [8M,12M) [16M,PAT_LEN) untouched -> must still hold the pattern
# Results: keep0/keep1/keep2_sha256 (expected pattern slices), zeros_sha256,
# discard_sha256, zeroout_sha256.
. /test/lib.sh
set -u
blk_info
M=1048576
[ "$(cat $SYSB/queue/discard_max_bytes)" != 0 ] || fail "device does not support discard" 6
[ "$(cat $SYSB/queue/write_zeroes_max_bytes)" != 0 ] || fail "device does not support write zeroes" 6

random_file /tmp/pat "$PAT_LEN"
dev_write /tmp/pat "$PAT_OFF" conv=fsync || fail "pattern write failed" 3

$BLKDISCARD -v -o $(( PAT_OFF + 4 * M )) -l $(( 4 * M )) "$DEV" || fail "blkdiscard failed" 7
$BLKDISCARD -v -z -o $(( PAT_OFF + 12 * M )) -l $(( 4 * M )) "$DEV" || fail "blkdiscard -z failed" 7
drop_caches

z=$(zeros_sha $(( 4 * M )))
result zeros_sha256=$z
rc=0
d=$(dev_sha $(( PAT_OFF + 4 * M )) $(( 4 * M ))) || fail "read failed" 3
result discard_sha256=$d
[ "$d" = "$z" ] || { echo "FAIL: discarded range does not read as zeros"; rc=4; }
d=$(dev_sha $(( PAT_OFF + 12 * M )) $(( 4 * M ))) || fail "read failed" 3
result zeroout_sha256=$d
[ "$d" = "$z" ] || { echo "FAIL: write-zeroes range does not read as zeros"; rc=4; }

i=0
for r in "0 $(( 4 * M ))" "$(( 8 * M )) $(( 4 * M ))" "$(( 16 * M )) $(( PAT_LEN - 16 * M ))"; do
    set -- $r
    file_slice /tmp/pat "$1" "$2" /tmp/slice
    want=$(file_sha /tmp/slice)
    got=$(dev_sha $(( PAT_OFF + $1 )) "$2") || fail "read failed" 3
    result keep${i}_sha256=$want
    [ "$got" = "$want" ] || { echo "FAIL: untouched range $i changed"; rc=4; }
    i=$(( i + 1 ))
done
exit $rc
