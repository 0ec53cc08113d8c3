# fio random writes with crc32c verification headers, then read + verify.
# Env: FIO_OFF (default 32M), FIO_SIZE (32M), FIO_BS (4k), FIO_IODEPTH (16),
#      FIO_ENGINE (io_uring), FIO_RW (randwrite).
# Results: fio_rc, fio_errors (terse field 5), fio_write_ios / fio_read_ios.
. /test/lib.sh
set -u
blk_info
fio --name=verify --filename="$DEV" --offset="${FIO_OFF:-32M}" --size="${FIO_SIZE:-32M}" \
    --rw="${FIO_RW:-randwrite}" --bs="${FIO_BS:-4k}" --iodepth="${FIO_IODEPTH:-16}" \
    --ioengine="${FIO_ENGINE:-io_uring}" --direct=1 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_dump=0 \
    --output-format=terse,normal > /tmp/fio.out 2>&1
rc=$?
grep -v '^3;' /tmp/fio.out
# terse v3: 5 = error, 6 = read io (KiB), 47 = write io (KiB)
t=$(grep '^3;' /tmp/fio.out | tail -n1)
err=$(echo "$t" | cut -d';' -f5)
result fio_rc=$rc fio_errors=${err:-missing} fio_read_kib=$(echo "$t" | cut -d';' -f6) \
    fio_write_kib=$(echo "$t" | cut -d';' -f47)
[ $rc = 0 ] || fail "fio exited $rc" 5
[ "$err" = 0 ] || fail "fio reported error $err" 5
exit 0
