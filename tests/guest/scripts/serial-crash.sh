# Guest side of the serial crash test (tests/tests/guest_crash.rs): a stream of
# sequence-numbered records on the named port $PORT_NAME while the host SIGKILLs and
# restarts serial-backend, then the console both ways.
#   1. Records "seq NNNNNNNN <padding>\n", 64 bytes each, one write(2) each (dd bs=64),
#      numbered from 0, until the host sends "stop" on the same port (a reader in the
#      background) or MAX_SECS pass. awk checks for the stop every 1000 records.
#   2. result records=N (what dd wrote: records 0..N-1), stop_via=port|timeout.
#   3. "hvc0-hello-N" on /dev/hvc0; the host answers "hvc0-reply" on the console, which
#      we read back (result console_in=...).
#   PORT_NAME, MAX_SECS (default 300).
. /test/lib.sh
for i in $(seq 100); do
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat $p/name 2>/dev/null)" = "$PORT_NAME" ] && dev=/dev/$(basename $p)
    done
    [ -n "$dev" ] && [ -c "$dev" ] && [ -c /dev/hvc0 ] && break
    sleep 0.1
done
[ -n "$dev" ] && [ -c "$dev" ] || fail "no port $PORT_NAME"
[ -c /dev/hvc0 ] || fail "no /dev/hvc0"
exec 3<>"$dev" || fail "cannot open $dev"
rm -f /tmp/stop
# The stop signal: the first line the host sends on the port. A read returns end of file
# while no host client is connected (the backend is down): try again.
(
    while :; do
        if read -r line <&3 && [ "$line" = stop ]; then
            echo port > /tmp/stop
            exit 0
        fi
        sleep 0.05
    done
) &
reader=$!
(
    sleep "${MAX_SECS:-300}"
    [ -e /tmp/stop ] || echo timeout > /tmp/stop
) &
timer=$!
echo "@@RESULT phase=writing dev=$dev"
awk 'BEGIN {
    pad = sprintf("%50s", ""); gsub(/ /, "x", pad)
    for (i = 0; ; i++) {
        if (i % 1000 == 0) {
            if ((getline s < "/tmp/stop") > 0) exit
            close("/tmp/stop")
        }
        printf "seq %08d %s\n", i, pad
    }
}' | dd bs=64 iflag=fullblock >&3 2>/tmp/dd.err || { cat /tmp/dd.err; fail "dd to the port"; }
cat /tmp/dd.err
n=$(sed -n 's/^\([0-9]*\)+0 records out.*/\1/p' /tmp/dd.err)
[ -n "$n" ] || fail "no record count from dd"
kill $reader $timer 2>/dev/null
result records=$n stop_via=$(cat /tmp/stop)
exec 3>&-

# The console after the restarts: out, then in (no echo, whole lines).
exec 4<>/dev/hvc0 || fail "cannot open /dev/hvc0"
stty -echo <&4
echo "hvc0-hello-$n" >&4 || fail "write hvc0"
line=$(timeout 20 head -n 1 <&4)
exec 4>&-
result console_in=${line:-none}
exit 0
