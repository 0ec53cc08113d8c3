# Guest test: two guests on one bridge. Configures the first NIC, pings the peer
# (retrying while it boots), then moves a random payload over TCP with busybox nc.
# Env: GUEST_IP (CIDR), PEER_IP, ROLE (send: connect and send PAYLOAD_KIB KiB;
# recv: listen on PORT and report what arrived), PORT (default 5001).
set -u
ifc=$(ls /sys/class/net | grep -v '^lo$' | head -n1)
[ -n "$ifc" ] || { echo "no network interface"; exit 2; }
echo "@@RESULT ifc=$ifc mac=$(cat /sys/class/net/$ifc/address) features=$(cat /sys/class/net/$ifc/device/features 2>/dev/null)"
ip addr add "$GUEST_IP" dev "$ifc"
ip link set "$ifc" up
port=${PORT:-5001}
ping_peer() {
    ok=0
    for i in $(seq 1 60); do
        if ping -c 1 -W 1 "$PEER_IP" >/dev/null 2>&1; then ok=1; break; fi
    done
    [ $ok = 1 ] || { echo "FAIL: peer $PEER_IP not reachable"; exit 3; }
    ping -c 3 -W 2 "$PEER_IP" || { echo "FAIL: ping"; exit 3; }
    echo "@@RESULT ping=ok"
}
case "$ROLE" in
recv)
    # Listen first (the sender retries), then check the reverse path with a ping. nc's
    # stdin must not hit EOF (nc would shut down its side and the sender stop early):
    # it reads a fifo we hold open.
    mkfifo /tmp/ncin
    timeout 90 nc -l -p "$port" < /tmp/ncin > /tmp/recv &
    nc_pid=$!
    exec 3> /tmp/ncin
    ping_peer
    wait $nc_pid || { echo "FAIL: nc -l"; exit 4; }
    echo "@@RESULT recv_bytes=$(wc -c < /tmp/recv) recv_sha=$(sha256sum < /tmp/recv | cut -d' ' -f1)"
    ;;
send)
    ping_peer
    head -c $(( ${PAYLOAD_KIB:-1024} * 1024 )) /dev/urandom > /tmp/payload
    echo "@@RESULT sent_bytes=$(wc -c < /tmp/payload) sent_sha=$(sha256sum < /tmp/payload | cut -d' ' -f1)"
    sent=0
    for i in $(seq 1 30); do
        if nc -w 2 "$PEER_IP" "$port" < /tmp/payload; then sent=1; break; fi
        sleep 1
    done
    [ $sent = 1 ] || { echo "FAIL: cannot send to $PEER_IP:$port"; exit 4; }
    echo "@@RESULT sent=ok"
    ;;
*)
    echo "FAIL: ROLE must be send or recv"; exit 2 ;;
esac
cat /proc/net/dev
exit 0
