# Live migration of the whole VM with its own disk (tests/tests/guest_block_migrate.rs):
# the host moves this guest to another QEMU on another vhost-blk-backend and image (and
# back) while we keep writing and verifying the disk, and, with a NIC, keep a TCP stream
# open to a peer.
#
# A worker loops over passes; each pass first checks that the host's data is intact and
# that the writer's region holds what the passes before wrote (maybe on the other side of
# a switch-over), then writes one half of the region anew (the halves take turns) and
# reads the whole region back. A pass overwrites only half, so a write lost in a
# switch-over (one the migration did not carry) is still there to see in the next check,
# wherever the switch-over fell.
#
# The host steers us with lines on the console (our stdin):
#   final   one more pass over the whole region, then K_COUNT distinct 4 KiB blocks written once; from then
#           on only reads (the disk no longer changes): the blocks changed since the last
#           migration are exactly the region and those blocks
#   finish  stop after the current pass, report, exit
# Env: W_OFF, W_BLOCKS (the writer's region, 4 KiB blocks, initially zero); STATIC_OFF,
#      STATIC_LEN, STATIC_SHA (data the host wrote before the boot); K_OFF, K_COUNT,
#      K_STRIDE (the blocks of `final`, K_STRIDE blocks apart); GUEST_IP, PORT (optional:
#      serve a TCP stream, a line every 100 ms, and keep what the peer sends).
# Results: pass=N errors=N after every pass; final_pass, w_sha, k_sha after `final`;
#      then passes, rounds, errors, net_rx_bytes, net_rx_sha, net_tx_lines.
. /test/lib.sh
set -u
need_dev
BS=4096
W_LEN=$((W_BLOCKS * BS))
: > /tmp/errors
echo write > /tmp/mode

err() { echo "FAIL: $*"; echo "$*" >> /tmp/errors; }

# check OFF LEN SHA WHAT
check() {
    got=$(dev_sha "$1" "$2") || { err "$4: read failed"; return; }
    [ "$got" = "$3" ] || err "$4: sha $got, want $3"
}

# The K blocks, concatenated in order, into FILE.
read_k() {
    : > "$1"
    i=0
    while [ $i -lt "$K_COUNT" ]; do
        dd if="$DEV" bs=$BS skip=$((K_OFF / BS + i * K_STRIDE)) count=1 iflag=direct \
            2>/dev/null >> "$1" || return 1
        i=$((i + 1))
    done
}

write_k() {
    head -c $((K_COUNT * BS)) /dev/urandom > /tmp/k.bin
    i=0
    while [ $i -lt "$K_COUNT" ]; do
        dd if=/tmp/k.bin of="$DEV" bs=$BS skip=$i seek=$((K_OFF / BS + i * K_STRIDE)) count=1 \
            oflag=direct conv=notrunc 2>/dev/null || err "writing block $i of $K_COUNT failed"
        i=$((i + 1))
    done
    file_sha /tmp/k.bin
}

worker() {
    pass=0
    rounds=0
    half=$((W_LEN / 2))
    head -c $W_LEN /dev/zero > /tmp/w.cur   # what the region must hold
    want_w=$(file_sha /tmp/w.cur)
    want_k=
    while :; do
        mode=$(cat /tmp/mode)
        [ "$mode" = stop ] && break
        check "$STATIC_OFF" "$STATIC_LEN" "$STATIC_SHA" "host data"
        check "$W_OFF" $W_LEN "$want_w" "region after pass $pass"
        case $mode in
        write | final)
            pass=$((pass + 1))
            if [ "$mode" = final ]; then off=0 len=$W_LEN; else off=$(((pass % 2) * half)) len=$half; fi
            head -c $len /dev/urandom > /tmp/w.new
            dd if=/tmp/w.new of=/tmp/w.cur bs=$BS seek=$((off / BS)) conv=notrunc 2>/dev/null
            want_w=$(file_sha /tmp/w.cur)
            dev_write /tmp/w.new $((W_OFF + off)) || err "pass $pass: write failed"
            check "$W_OFF" $W_LEN "$want_w" "pass $pass read back"
            if [ "$mode" = final ]; then
                want_k=$(write_k)
                read_k /tmp/k.rd || err "reading the K blocks failed"
                [ "$(file_sha /tmp/k.rd)" = "$want_k" ] || err "K blocks read back differ"
                echo read > /tmp/mode
                result final_pass=$pass w_sha=$want_w k_sha=$want_k
            fi
            ;;
        read)
            rounds=$((rounds + 1))
            read_k /tmp/k.rd || err "reading the K blocks failed"
            [ "$(file_sha /tmp/k.rd)" = "$want_k" ] || err "round $rounds: K blocks differ"
            ;;
        esac
        result pass=$pass rounds=$rounds errors=$(wc -l < /tmp/errors)
    done
    result passes=$pass rounds=$rounds
}

worker &
worker_pid=$!

nc_pid=
if [ -n "${GUEST_IP:-}" ]; then
    ifc=$(ls /sys/class/net | grep -v '^lo$' | head -n1)
    [ -n "$ifc" ] || fail "no network interface" 2
    ip addr add "$GUEST_IP" dev "$ifc"
    ip link set "$ifc" up
    # A line every 100 ms to the peer, what it sends into /tmp/net_rx; nc ends when the
    # peer closes the connection.
    (
        i=0
        while [ ! -f /tmp/net_stop ]; do
            echo "seq $i"
            i=$((i + 1))
            sleep 0.1
        done
    ) | nc -l -p "${PORT:-5001}" > /tmp/net_rx &
    nc_pid=$!
    result net=listening ifc=$ifc
fi

result phase=running
while read -r cmd; do
    case $cmd in
    final) echo final > /tmp/mode ;;
    finish) break ;;
    esac
done
echo stop > /tmp/mode
wait $worker_pid
if [ -n "$nc_pid" ]; then
    # The peer closed its end before `finish`: nc has ended or ends now.
    wait $nc_pid
    touch /tmp/net_stop
    result net_rx_bytes=$(wc -c < /tmp/net_rx) net_rx_sha=$(file_sha /tmp/net_rx)
fi
errors=$(wc -l < /tmp/errors)
result errors=$errors
[ "$errors" = 0 ] || fail "$errors verification errors: $(head -n 3 /tmp/errors | tr '\n' ';')" 5
exit 0
