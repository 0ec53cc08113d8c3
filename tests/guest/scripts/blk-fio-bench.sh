# fio cases one after another on $DEV in one boot, for `bench compare guest-blk`.
# Env: FIO_CASES: space-separated NAME:RW:BS:IODEPTH (e.g. "rr32:randread:4k:32");
#      FIO_RUNTIME, FIO_RAMP: seconds measured and warmed up per case.
# Results per case: <NAME>_iops, <NAME>_kibs (KiB/s), <NAME>_errors (terse field 5),
# <NAME>_ios (I/Os completed, ramp included), <NAME>_irqs (the disk's interrupts meanwhile).
. /test/lib.sh
set -u
blk_info
# Interrupts of the virtio device behind $DEV (all its vectors, all CPUs).
vdev=$(basename "$(readlink -f $SYSB/device)")
irqs() {
    awk -v d="$vdev" 'NR == 1 { ncpu = NF } $NF ~ "^" d "-" { for (i = 2; i <= ncpu + 1; i++) n += $i }
        END { print n + 0 }' /proc/interrupts
}
# Completed I/Os of $DEV (reads + writes, /sys/block/<dev>/stat fields 1 and 5).
ios() { awk '{ print $1 + $5 }' $SYSB/stat; }
for c in $FIO_CASES; do
    set -- $(echo "$c" | tr ':' ' ')
    name=$1 rw=$2 bs=$3 qd=$4
    i0=$(irqs) n0=$(ios)
    fio --name="$name" --filename="$DEV" --direct=1 --ioengine=io_uring --rw="$rw" \
        --bs="$bs" --iodepth="$qd" --time_based --runtime="$FIO_RUNTIME" \
        --ramp_time="$FIO_RAMP" --norandommap --randrepeat=0 \
        --output-format=terse --terse-version=3 > /tmp/fio.out 2>&1
    rc=$?
    i1=$(irqs) n1=$(ios)
    t=$(grep '^3;' /tmp/fio.out | tail -n1)
    [ $rc = 0 ] && [ -n "$t" ] || { cat /tmp/fio.out; fail "fio $name exited $rc" 5; }
    # terse v3: 5 error; read 7 KiB/s, 8 IOPS; write 48 KiB/s, 49 IOPS
    case $rw in
        *write) kibs=$(echo "$t" | cut -d';' -f48) iops=$(echo "$t" | cut -d';' -f49) ;;
        *) kibs=$(echo "$t" | cut -d';' -f7) iops=$(echo "$t" | cut -d';' -f8) ;;
    esac
    err=$(echo "$t" | cut -d';' -f5)
    result ${name}_iops=$iops ${name}_kibs=$kibs ${name}_errors=$err \
        ${name}_ios=$((n1 - n0)) ${name}_irqs=$((i1 - i0))
    [ "$err" = 0 ] || fail "fio $name reported error $err" 5
done
exit 0
