# fio random writes in passes while the host SIGKILLs and restarts the backend. Every
# 4 KiB block written in pass N holds fio's verify pattern `%o"<TAG>N"` (its own offset,
# little-endian, then the tag and pass number, repeated), so a block that missed a write
# (lost) or was overwritten again by an older, resubmitted request (doubled) holds another
# pass's stamp and fails verification. Each pass: randwrite over the whole region (each
# block once), then read back and verify. Passes go on until the host writes STOPCRASH into
# block MARK_BLK (after its last kill), or MAX_PASSES. Then one more read-only verify.
#   FIO_OFF, FIO_SIZE: the region (bytes); FIO_IODEPTH (16); MARK_BLK (4 KiB block index);
#   MAX_PASSES (200); TAG (P).
# Results: phase=io (start), pass_done=N per pass, passes, last_pattern, final_verify_rc,
#   io_errors (kernel log lines with "I/O error" or blk_update_request errors).
. /test/lib.sh
set -u
need_dev
OFF=${FIO_OFF:-16777216}
SIZE=${FIO_SIZE:-16777216}
MARK=${MARK_BLK:-8}
MAX=${MAX_PASSES:-200}
TAG=${TAG:-P}

marker() { dd if=$DEV bs=4096 skip=$MARK count=1 iflag=direct 2>/dev/null | head -c 9; }

# run_fio PASS EXTRA...: one fio run over the region with pass PASS's pattern.
run_fio() {
    p=$1; shift
    pat=$(printf '%s%06d' "$TAG" "$p")
    fio --name=crash --filename="$DEV" --offset="$OFF" --size="$SIZE" \
        --rw=randwrite --bs=4k --iodepth="${FIO_IODEPTH:-16}" --ioengine=io_uring --direct=1 \
        --verify=pattern --verify_pattern="%o\"$pat\"" --do_verify=1 --verify_fatal=1 \
        --verify_dump=0 --output-format=terse "$@" > /tmp/fio.out 2>&1
    rc=$?
    t=$(grep '^3;' /tmp/fio.out | tail -n1)
    err=$(echo "$t" | cut -d';' -f5)
    if [ $rc != 0 ] || [ "$err" != 0 ]; then
        grep -v '^3;' /tmp/fio.out | tail -n 20
        result fio_rc=$rc fio_errors=${err:-missing} failed_pass=$p
        return 1
    fi
    return 0
}

io_errors() { dmesg | grep -c -e 'I/O error' -e 'blk_update_request' -e 'critical target error'; }

result phase=io
start=$(cut -d' ' -f1 /proc/uptime)
pass=1
while :; do
    run_fio $pass || { result io_errors=$(io_errors); fail "fio pass $pass failed" 5; }
    result pass_done=$pass
    [ "$(marker)" = STOPCRASH ] && break
    [ $pass -lt $MAX ] || fail "no stop marker after $pass passes" 3
    pass=$((pass + 1))
done
end=$(cut -d' ' -f1 /proc/uptime)
result phase=verify passes=$pass last_pattern=$(printf '%s%06d' "$TAG" "$pass") io_seconds=$start..$end
# Everything the last pass wrote, read back once more (nothing written).
run_fio $pass --verify_only
vrc=$?
result final_verify_rc=$vrc io_errors=$(io_errors)
dmesg | grep -i -e error -e virtio_blk | tail -n 20
[ $vrc = 0 ] || fail "final verify failed" 6
exit 0
