# Guest test: configure the first NIC, ping the host end of the tap (retrying while the
# host side comes up), then iperf3 against the server on the host end: guest->host, then
# host->guest (-R). Env: GUEST_IP (CIDR), HOST_IP, IPERF_TIME (default 3).
set -u
ifc=$(ls /sys/class/net | grep -v '^lo$' | head -n1)
[ -n "$ifc" ] || { echo "no network interface"; exit 2; }
echo "@@RESULT ifc=$ifc"
echo "@@RESULT queues=$(ls -d /sys/class/net/$ifc/queues/rx-* | wc -l)"
ip addr add "$GUEST_IP" dev "$ifc"
ip link set "$ifc" up
ok=0
for i in $(seq 1 30); do
    if ping -c 1 -W 1 "$HOST_IP" >/dev/null 2>&1; then ok=1; break; fi
done
[ $ok = 1 ] || { echo "FAIL: host $HOST_IP not reachable"; exit 3; }
ping -c 3 -W 2 "$HOST_IP" || { echo "FAIL: ping"; exit 3; }
echo "@@RESULT ping=ok"
t=${IPERF_TIME:-3}
rc=0
for dir in tx rx; do
    flag=""; [ $dir = rx ] && flag=-R
    iperf3 -c "$HOST_IP" -t "$t" $flag -f m > /tmp/iperf.out 2>&1 || rc=4
    cat /tmp/iperf.out
    mbps=$(grep 'receiver' /tmp/iperf.out | tail -n1 | awk '{for(i=1;i<=NF;i++) if($i=="Mbits/sec") print $(i-1)}')
    echo "@@RESULT iperf_${dir}_mbps=${mbps:-0}"
done
cat /proc/net/dev
exit $rc
