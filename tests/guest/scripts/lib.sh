# Helpers for the guest-side block test scripts. Copied into every guest's
# /test/ by the harness; scripts start with `. /test/lib.sh`. busybox sh.
#
# Conventions: results go to the console as "@@RESULT key=value" lines (the
# host parses them; values contain no spaces); a failed check prints "FAIL:"
# and exits non-zero. Offsets and lengths are in bytes and must be multiples
# of 4096 (O_DIRECT).

DEV=${BLK_DEV:-/dev/vda}
DEVNAME=${DEV##*/}
SYSB=/sys/block/$DEVNAME
# busybox sh runs its own applets in preference to $PATH, so the util-linux
# tools (blkdiscard -z, blockdev) are called by absolute path.
BLKDISCARD=/usr/bin/blkdiscard
BLOCKDEV=/usr/bin/blockdev

result() { echo "@@RESULT $*"; }
fail() { echo "FAIL: $1"; exit "${2:-1}"; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

need_dev() {
    [ -b "$DEV" ] || { echo "no block device $DEV; have: $(ls /sys/block)"; exit 2; }
}

# bs_for OFF LEN: 64 KiB when both are multiples of it, else 4 KiB.
bs_for() {
    if [ $(( $1 % 65536 )) = 0 ] && [ $(( $2 % 65536 )) = 0 ]; then echo 65536; else echo 4096; fi
}

# random_file PATH LEN
random_file() { head -c "$2" /dev/urandom > "$1" || fail "cannot create $1"; }

file_sha() { sha256sum < "$1" | cut -d' ' -f1; }
zeros_sha() { head -c "$1" /dev/zero | sha256sum | cut -d' ' -f1; }

# file_slice FILE OFF LEN OUT: copy LEN bytes of FILE at OFF into OUT.
file_slice() {
    bs=$(bs_for "$2" "$3")
    dd if="$1" of="$4" bs="$bs" skip=$(( $2 / bs )) count=$(( $3 / bs )) 2>/dev/null
}

# dev_write FILE OFF [extra dd args]: write FILE to $DEV at OFF (O_DIRECT).
dev_write() {
    f=$1; off=$2; shift 2
    len=$(wc -c < "$f"); bs=$(bs_for "$off" "$len")
    dd if="$f" of="$DEV" bs="$bs" seek=$(( off / bs )) oflag=direct "$@" 2>/tmp/dd.err \
        || { cat /tmp/dd.err; return 1; }
}

# dev_read OFF LEN OUT: read LEN bytes of $DEV at OFF into OUT (O_DIRECT);
# fails unless exactly LEN bytes arrive.
dev_read() {
    bs=$(bs_for "$1" "$2")
    dd if="$DEV" of="$3" bs="$bs" skip=$(( $1 / bs )) count=$(( $2 / bs )) iflag=direct 2>/tmp/dd.err \
        || { cat /tmp/dd.err; return 1; }
    got=$(wc -c < "$3")
    [ "$got" = "$2" ] || { echo "short read: $got of $2 bytes at $1"; return 1; }
}

# dev_sha OFF LEN: sha256 of a device range (O_DIRECT), empty on error.
dev_sha() {
    dev_read "$1" "$2" /tmp/dev_sha.bin >&2 || return 1
    file_sha /tmp/dev_sha.bin
    rm -f /tmp/dev_sha.bin
}

# blk_info: what the guest sees, as results (prefix "dev_").
blk_info() {
    need_dev
    nq=$(ls "$SYSB/mq" | wc -l)
    result dev_size_sectors=$(cat $SYSB/size) dev_logical_block_size=$(cat $SYSB/queue/logical_block_size) \
        dev_physical_block_size=$(cat $SYSB/queue/physical_block_size) dev_nr_queues=$nq \
        dev_ro=$(cat $SYSB/ro) dev_nproc=$(nproc)
    result dev_write_cache=$(tr ' ' _ < $SYSB/queue/write_cache) \
        dev_discard_max_bytes=$(cat $SYSB/queue/discard_max_bytes) \
        dev_discard_granularity=$(cat $SYSB/queue/discard_granularity) \
        dev_write_zeroes_max_bytes=$(cat $SYSB/queue/write_zeroes_max_bytes)
    serial=$(cat $SYSB/serial 2>/dev/null | tr -c 'A-Za-z0-9._:-' _)
    result dev_serial=$serial
    for d in /sys/bus/virtio/devices/*; do
        [ "$(cat $d/device)" = 0x0002 ] && result dev_virtio_features=$(cat $d/features)
    done
    for q in "$SYSB"/mq/*; do
        echo "mq $(basename $q): cpu_list=$(cat $q/cpu_list)"
    done
}
