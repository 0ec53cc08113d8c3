# Guest side of the net crash test: configure the NIC, reach the host end of the tap, say
# phase=up, then wait while the host SIGKILLs and restarts the backend (and pings us after
# each restart). The host ends the test by adding STOP_IP to its end of the tap: once that
# answers, report our interface counters and exit.
#   GUEST_IP (CIDR), HOST_IP, STOP_IP, MAX_WAIT (seconds, default 600).
set -u
ifc=$(ls /sys/class/net | grep -v '^lo$' | head -n1)
[ -n "$ifc" ] || { echo "no network interface"; exit 2; }
ip addr add "$GUEST_IP" dev "$ifc"
ip link set "$ifc" up
ok=0
for i in $(seq 1 30); do
    if ping -c 1 -W 1 "$HOST_IP" >/dev/null 2>&1; then ok=1; break; fi
done
[ $ok = 1 ] || { echo "FAIL: host $HOST_IP not reachable"; exit 3; }
# Background traffic through the kills (busybox ping: -i in seconds).
ping -q -i 0.2 "$HOST_IP" > /tmp/ping.log 2>&1 &
ping_pid=$!
echo "@@RESULT phase=up ifc=$ifc"
start=$(cut -d. -f1 /proc/uptime)
until ping -c 1 -W 1 "$STOP_IP" >/dev/null 2>&1; do
    now=$(cut -d. -f1 /proc/uptime)
    [ $((now - start)) -lt "${MAX_WAIT:-600}" ] || { echo "FAIL: no stop signal"; exit 4; }
    sleep 1
done
kill -INT $ping_pid; sleep 1; grep -E 'transmitted|received' /tmp/ping.log
# Traffic still flows both ways after the last restart.
ping -c 3 -W 2 "$HOST_IP" || { echo "FAIL: ping after the kills"; exit 5; }
echo "@@RESULT final_ping=ok"
echo "@@RESULT rx_errors=$(cat /sys/class/net/$ifc/statistics/rx_errors) tx_errors=$(cat /sys/class/net/$ifc/statistics/tx_errors)"
cat /proc/net/dev
exit 0
