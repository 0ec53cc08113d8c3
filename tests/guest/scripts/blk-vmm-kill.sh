# One life of a guest that the host SIGKILLs (QEMU itself) while it does I/O. Stamps block
# STAMP_BASE+ITER with "ITER<n>", reads it back, checks the stamp the previous guest left
# (ITER-1; survived its QEMU's SIGKILL), prints phase=load and then runs fio random
# read/write until it is killed.
#   ITER (1..), STAMP_BASE (4 KiB block index), FIO_OFF, FIO_SIZE.
# Results: rw_ok=1 iter=N prev_ok=1|skip, phase=load.
. /test/lib.sh
set -u
need_dev
I=${ITER:?}
B=${STAMP_BASE:-16}
stamp() { printf 'ITER%06d' "$1"; }
rd() { dd if=$DEV bs=4096 skip=$(($B + $1)) count=1 iflag=direct 2>/dev/null | head -c 10; }
stamp "$I" | dd of=$DEV bs=4096 seek=$(($B + I)) conv=sync oflag=direct 2>/tmp/dd.err \
    || { cat /tmp/dd.err; fail "stamp write failed" 3; }
[ "$(rd "$I")" = "$(stamp "$I")" ] || fail "stamp read back: $(rd "$I")" 4
prev=skip
if [ "$I" -gt 1 ]; then
    [ "$(rd $((I - 1)))" = "$(stamp $((I - 1)))" ] || fail "previous stamp: $(rd $((I - 1)))" 5
    prev=1
fi
result rw_ok=1 iter=$I prev_ok=$prev
result phase=load
fio --name=load --filename="$DEV" --offset="${FIO_OFF:-16M}" --size="${FIO_SIZE:-8M}" \
    --rw=randrw --bs=4k --iodepth=16 --ioengine=io_uring --direct=1 \
    --time_based --runtime=120 --output-format=terse > /tmp/fio.out 2>&1
cat /tmp/fio.out
fail "fio ended; the host should have killed this guest" 6
