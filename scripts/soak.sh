#!/usr/bin/env bash
# scripts/soak.sh [MINUTES]: soak the three backends (default 10 minutes).
#
# Builds the release binaries, starts vhost-blk-backend (a fresh 256 MiB image under
# /var/tmp), vhost-net-backend (a persistent tap in a network namespace of its own; needs
# root, else net is SKIPPED) and serial-backend (a console and a named port on unix
# sockets), and drives each with the load generator (`bench load blk|net|serial`) in
# rounds of a few seconds, all three at once, until the time is up:
#   - every round is a new vhost-user connection and ends in a disconnect;
#   - blk rounds mix randrw, randwrite --verify and read, bs 4k/16k/128k, QD 1/16/32,
#     1 or 2 queues, on the lower half of the disk; "state" rounds (randwrite/randrw
#     --verify --verify-state) on the upper half carry what they wrote from round to round;
#   - net rounds: --mode both/tx/rx, 64, 1500 or random-size frames, --verify; an error if
#     a frame was lost, bad or reordered, or a TX frame did not arrive at the tap;
#   - serial rounds: both directions through the named port, every byte checked;
#   - about 15 % of rounds are killed mid-run (SIGKILL of bench: an abrupt frontend
#     disconnect); about 8 % SIGKILL the backend under load and start it again on the same
#     socket, then a check round must pass (blk: a state round, which first reads back and
#     checks every block the earlier state rounds wrote: completed writes survived).
# After each round (bench gone, 0.3 s to settle) the backend's RSS (VmRSS) and open fds
# are sampled (between rounds, not during one: a connection maps the guest memory and
# holds per-queue eventfds, 128 of them for serial); every SOAK_SAMPLE seconds (default
# 30) a table row shows the latest ones, the rounds so far and the errors so far.
# Errors: a round that failed (other than one killed on purpose), a backend that died by
# itself or did not exit 0 on SIGTERM at the end, and backend log lines at WARN or ERROR
# level other than the expected "frontend connection ended" of a killed round (counted
# separately). At the end: a final read-back of every state block, SIGTERM to the
# backends, and a summary with first/last/max RSS and fds per backend. Leak check, per backend process (a restarted
# backend has its own baseline): the sample after its 3rd round (the first after a clean
# round from then on) is the baseline; its fd count after its last clean round must not
# exceed the baseline's (after a killed round serial-backend keeps the port's host client
# until the next session), and its RSS must never exceed the baseline by more than
# 20 % + 4 MiB.
#
# Exit status: 0 if no errors and no growth, 1 otherwise, 2 on a usage or set-up failure.
# Logs (backends' logs per process, bench output, events, samples) in /var/tmp/vhost-soak/
# (SOAK_DIR); the previous run's are replaced. Everything started is stopped, and the
# namespace and the image removed, on exit (also on Ctrl-C).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
repo=$PWD
minutes=${1:-10}
if ! [[ $minutes =~ ^[0-9]+$ ]] || ((minutes < 1)); then
    echo "usage: $0 [MINUTES]   (whole minutes, default 10)" >&2
    exit 2
fi
sample_every=${SOAK_SAMPLE:-30}
out=${SOAK_DIR:-/var/tmp/vhost-soak}
bin=$repo/target/release
warm_rounds=3

say() { printf '%s\n' "$*" | tee -a "$out/soak.log"; }

# --- logs -------------------------------------------------------------------------------
if [[ -e $out && ! -e $out/.vhost-soak ]] && [[ -n $(ls -A "$out" 2>/dev/null) ]]; then
    echo "$out exists and is not a soak log directory; set SOAK_DIR" >&2
    exit 2
fi
rm -rf "$out"
mkdir -p "$out/state" "$out/samples" || exit 2
touch "$out/.vhost-soak" "$out/events"
state=$out/state

# --- build ------------------------------------------------------------------------------
echo "soak: building release binaries (cargo build --release)"
if ! cargo build --release --locked -p vhost-blk-backend -p vhost-net-backend \
    -p serial-backend -p bench >"$out/build.log" 2>&1; then
    tail -n 30 "$out/build.log"
    echo "soak: build failed (log: $out/build.log)" >&2
    exit 2
fi

backends=(blk serial)
ns=
if [[ $(id -u) -eq 0 ]]; then
    backends=(blk net serial)
    ns=vsoak-$$
else
    echo "#######################################################################"
    echo "## soak: net SKIPPED: not root (the tap lives in a network namespace) ##"
    echo "#######################################################################"
fi

imgdir=$(mktemp -d /var/tmp/vhost-soak-img.XXXXXX) || exit 2
img=$imgdir/disk.img
tap=vsoak0

# --- clean-up ---------------------------------------------------------------------------
# shellcheck disable=SC2317  # the clean-up functions run from the trap
# Kills `pid` only if it is still the program we started (`name` in its command line).
kill_ours() {
    local sig=$1 pid=$2 name=$3
    [[ -n $pid && -r /proc/$pid/cmdline ]] || return 0
    if tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$name"; then
        kill "-$sig" "$pid" 2>/dev/null
    fi
}

driver_pids=()
# shellcheck disable=SC2317
cleanup() {
    trap - EXIT INT TERM
    touch "$state/stop" 2>/dev/null
    local p b
    for p in "${driver_pids[@]}"; do
        kill -TERM "$p" 2>/dev/null
    done
    for b in blk net serial; do
        kill_ours KILL "$(cat "$state/$b.bench.pid" 2>/dev/null)" "bench"
        kill_ours KILL "$(cat "$state/$b.pid" 2>/dev/null)" "-backend"
    done
    wait 2>/dev/null
    [[ -n $ns ]] && ip netns del "$ns" 2>/dev/null
    rm -rf "$imgdir"
}
trap cleanup EXIT
trap 'echo "soak: interrupted"; exit 1' INT TERM

truncate -s 256M "$img" || exit 2
if [[ -n $ns ]]; then
    ip netns add "$ns" || exit 2
    ip netns exec "$ns" ip link set lo up
    for k in all default; do
        ip netns exec "$ns" sysctl -qw "net.ipv6.conf.$k.disable_ipv6=1"
    done
    # Persistent, so it outlives a killed backend; the backend attaches to it.
    ip netns exec "$ns" ip tuntap add "$tap" mode tap multi_queue vnet_hdr || exit 2
    ip netns exec "$ns" ip link set "$tap" up || exit 2
fi

# --- one backend ------------------------------------------------------------------------
event() { printf '%s %s %s %s\n' "$(date +%s)" "$1" "$2" "${3:-}" >>"$out/events"; }

# Starts backend $1 (incarnation number in $state/$1.inc); waits for its socket.
start_backend() {
    local b=$1 inc sock=$out/$1.sock
    inc=$(($(cat "$state/$b.inc" 2>/dev/null || echo 0) + 1))
    echo "$inc" >"$state/$b.inc"
    rm -f "$sock"
    local log=$out/$b.$inc.log
    case $b in
    blk)
        "$bin/vhost-blk-backend" --socket-path "$sock" --blk-file "$img" --num-queues 2 \
            >"$log" 2>&1 &
        ;;
    net)
        ip netns exec "$ns" "$bin/vhost-net-backend" --socket-path "$sock" --tap "$tap" \
            >"$log" 2>&1 &
        ;;
    serial)
        "$bin/serial-backend" --socket-path "$sock" \
            --console socket="$out/serial-console.sock" \
            --port name=org.soak.data,socket="$out/serial-data.sock" --hostinfo \
            >"$log" 2>&1 &
        ;;
    esac
    local pid=$!
    echo "$pid" >"$state/$b.pid"
    local i
    for ((i = 0; i < 200; i++)); do
        [[ -S $sock ]] && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    event "$b" error "backend did not start (log $log)"
    return 1
}

backend_pid() { cat "$state/$1.pid" 2>/dev/null; }

# Appends "epoch incarnation pid rss_kib fds rounds clean" to samples/$1.tsv: the fd count
# is read until two readings 0.2 s apart agree (a disconnect may still be being torn
# down). clean ($3) is 0 after a killed round: serial-backend, for one, keeps the port's
# host client until the next guest opens the port (it reads host input only then), so it
# has one fd more until the next round.
idle_sample() {
    local b=$1 rounds=$2 clean=$3 pid rss fds prev=-1 i
    pid=$(backend_pid "$b")
    sleep 0.3
    for ((i = 0; i < 10; i++)); do
        # shellcheck disable=SC2012  # fd names are numbers
        fds=$(ls "/proc/$pid/fd" 2>/dev/null | wc -l)
        [[ $fds == "$prev" ]] && break
        prev=$fds
        sleep 0.2
    done
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null)
    [[ -n $rss ]] || return 0
    echo "$(date +%s) $(cat "$state/$b.inc") $pid $rss $fds $rounds $clean" >>"$out/samples/$b.tsv"
}

# Random choices.
pick() { local a=("$@"); echo "${a[RANDOM % ${#a[@]}]}"; }
secs() { echo "$((RANDOM % ($2 - $1 + 1) + $1))"; }
# A random time in tenths of a second between $1 and $2 seconds (whole numbers).
between() { local t=$((RANDOM % (($2 - $1) * 10) + $1 * 10)); echo "$((t / 10)).$((t % 10))"; }

# The arguments of a round of backend $1; $2 = normal|state|check, $3 = seconds.
round_args() {
    local b=$1 kind=$2 rt=$3s
    case $b in
    blk)
        local common=(--socket "$out/blk.sock" --runtime "$rt")
        if [[ $kind != normal ]]; then
            echo "${common[@]}" --rw "$(pick randwrite randrw)" --bs 4k --iodepth 16 \
                --verify --verify-state "$state/blk.verify" --offset 128M --size 128M
            return
        fi
        case $((RANDOM % 4)) in
        0) echo "${common[@]}" --rw randrw --bs "$(pick 4k 16k 128k)" ;;
        1) echo "${common[@]}" --rw randwrite --verify --bs "$(pick 4k 16k)" ;;
        2) echo "${common[@]}" --rw read --bs "$(pick 4k 128k)" ;;
        3) echo "${common[@]}" --rw randrw --verify --bs 4k ;;
        esac | sed "s/\$/ --size 128M --iodepth $(pick 1 16 32) --queues $(pick 1 2)/"
        ;;
    net)
        echo --socket "$out/net.sock" --tap "$tap" --netns "$ns" --verify --runtime "$rt" \
            --mode "$(pick both both tx rx)" --frame-size "$(pick 64 1500 "$((RANDOM % 1400 + 60))")"
        ;;
    serial)
        echo --socket "$out/serial.sock" --port-socket "$out/serial-data.sock" \
            --port-name org.soak.data --runtime "$rt" --chunk "$(pick 1k 16k 64k)"
        ;;
    esac
}

# Judges a finished round's output ($2) of backend $1: prints why it is bad, if it is.
round_problem() {
    local b=$1 f=$2
    [[ $b == net ]] || return 0
    # "N lost (N stalls), N bad, N reordered" and "N completed, N arrived at the tap".
    awk '
        /RX / { for (i = 1; i <= NF; i++) {
                    if ($(i+1) ~ /^lost/ && $i > 0) p = p " " $i " lost";
                    if ($(i+1) ~ /^bad/ && $i > 0) p = p " " $i " bad";
                    if ($(i+1) ~ /^reordered/ && $i > 0) p = p " " $i " reordered" } }
        /TX / { for (i = 1; i <= NF; i++) {
                    if ($(i+1) ~ /^completed/) c = $i + 0;
                    if ($(i+1) == "arrived") a = $i + 0 }
                if (c != a) p = p " TX " c " completed, " a " at the tap" }
        END { if (p != "") print substr(p, 2) }' "$f"
}

# Runs one bench round of backend $1 in the background; sets bench_pid.
start_round() {
    local b=$1 args=$2 n=$3
    printf '=== round %s: bench load %s %s\n' "$n" "$b" "$args" >>"$out/bench-$b.log"
    # shellcheck disable=SC2086  # args is a word list built above
    "$bin/bench" load "$b" $args >"$state/$b.round" 2>&1 &
    bench_pid=$!
    echo "$bench_pid" >"$state/$b.bench.pid"
}

# Waits for the round (at most $2 seconds, then it is killed and counted as hung); sets
# round_status.
finish_round() {
    local b=$1 limit=$2 t0=$SECONDS
    while kill -0 "$bench_pid" 2>/dev/null; do
        if ((SECONDS - t0 > limit)); then
            kill -KILL "$bench_pid" 2>/dev/null
            echo "bench: soak: round hung for ${limit}s, killed" >>"$state/$b.round"
            break
        fi
        sleep 0.1
    done
    wait "$bench_pid" 2>/dev/null # (no "Killed" line from bash)
    round_status=$?
    cat "$state/$b.round" >>"$out/bench-$b.log"
}

# One backend's rounds until $state/stop exists, then its final check and shutdown.
drive() {
    local b=$1 n=0 inc_rounds=0 kind r why clean
    start_backend "$b" || return
    while [[ ! -e $state/stop ]]; do
        if ! kill -0 "$(backend_pid "$b")" 2>/dev/null; then
            event "$b" error "backend died by itself (log $out/$b.$(cat "$state/$b.inc").log)"
            start_backend "$b" || return
            inc_rounds=0
        fi
        n=$((n + 1))
        r=$((RANDOM % 100))
        kind=normal
        clean=1
        [[ $b == blk ]] && ((r % 3 == 0)) && kind=state
        if ((r < 15)); then
            # Abrupt frontend disconnect: SIGKILL bench mid-run (it connects in well
            # under 0.3 s and runs for 5).
            [[ $kind == state ]] && kind=normal
            start_round "$b" "$(round_args "$b" "$kind" 5)" "$n"
            sleep "$(between 0 4)"
            kill -KILL "$bench_pid" 2>/dev/null
            finish_round "$b" 30
            event "$b" kill "round $n"
            clean=0
        elif ((r < 23)) && ((inc_rounds >= warm_rounds)); then
            # Backend SIGKILLed under load and started again; a check round must pass.
            start_round "$b" "$(round_args "$b" "$([[ $b == blk ]] && echo state || echo normal)" 5)" "$n"
            sleep "$(between 1 4)"
            kill -KILL "$(backend_pid "$b")" 2>/dev/null
            wait "$(backend_pid "$b")" 2>/dev/null
            finish_round "$b" 30
            event "$b" restart "round $n (bench: $(tail -n 1 "$state/$b.round"))"
            start_backend "$b" || return
            inc_rounds=0
            n=$((n + 1))
            start_round "$b" "$(round_args "$b" check "$(secs 1 3)")" "$n"
            finish_round "$b" 60
            why=$(round_problem "$b" "$state/$b.round")
            if ((round_status != 0)) || [[ -n $why ]]; then
                event "$b" error "check round $n after the restart: ${why:-$(tail -n 1 "$state/$b.round")}"
            else
                event "$b" round "$n check after restart: $(grep -o '[0-9]* blocks carried over' "$state/$b.round")"
            fi
        else
            start_round "$b" "$(round_args "$b" "$kind" "$(secs 1 4)")" "$n"
            finish_round "$b" 60
            why=$(round_problem "$b" "$state/$b.round")
            if ((round_status != 0)) || [[ -n $why ]]; then
                event "$b" error "round $n: ${why:-$(tail -n 1 "$state/$b.round")}"
            else
                event "$b" round "$n"
            fi
        fi
        inc_rounds=$((inc_rounds + 1))
        idle_sample "$b" "$n" "$clean"
        sleep "$(between 0 2)"
    done
    if [[ $b == blk ]]; then
        # Every block the state rounds wrote, read back and checked once more.
        n=$((n + 1))
        start_round blk "--socket $out/blk.sock --rw read --bs 4k --iodepth 16 --verify \
--verify-state $state/blk.verify --offset 128M --size 128M --runtime 500ms" "$n (final verify)"
        finish_round blk 120
        if ((round_status != 0)); then
            event blk error "final verify: $(tail -n 1 "$state/blk.round")"
        else
            event blk final-verify "$(grep -o '[0-9]* blocks carried over' "$state/blk.round")"
        fi
    fi
    sleep 1
    idle_sample "$b" "$n" 1
    local pid
    pid=$(backend_pid "$b")
    kill -TERM "$pid" 2>/dev/null
    local i
    for ((i = 0; i < 150; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        event "$b" error "still running 15 s after SIGTERM; killed"
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        return
    fi
    wait "$pid" 2>/dev/null
    local st=$?
    if ((st != 0)); then
        event "$b" error "exit status $st on SIGTERM"
    else
        event "$b" exit 0
    fi
}

# --- counters ---------------------------------------------------------------------------
count_events() { awk -v b="$1" -v t="$2" '($2 == b || b == "") && $3 == t' "$out/events" | wc -l; }
# Rounds so far: completed, killed, the ones a backend restart cut, failed.
count_rounds() { # [backend]
    awk -v b="${1:-}" '($2 == b || b == "") && ($3 == "round" || $3 == "kill" ||
        $3 == "restart" || ($3 == "error" && ($4 == "round" || $4 == "check" || $4 == "final")))' \
        "$out/events" | wc -l
}

# Backend log lines at WARN/ERROR: "unexpected" or "expected" (a killed frontend's
# connection ending mid-message).
expected_re='frontend connection ended'
log_lines() {
    local kind=$1 f
    local files=("$out"/*.[0-9]*.log)
    [[ -e ${files[0]} ]] || { echo 0; return; }
    if [[ $kind == expected ]]; then
        cat "${files[@]}" | grep -E '^\[[^ ]+ +(WARN|ERROR)' | grep -cE "$expected_re"
    else
        cat "${files[@]}" | grep -E '^\[[^ ]+ +(WARN|ERROR)' | grep -vcE "$expected_re"
    fi
}

latest() { # "rss fds #inc" of backend $1
    local f=$out/samples/$1.tsv
    if [[ -s $f ]]; then tail -n 1 "$f" | awk '{printf "%9d %4d #%-2s", $4, $5, $2}'; else printf '%9s %4s %3s' - - ''; fi
}

row() {
    local t=$1 b rounds errors
    rounds=$(count_rounds)
    errors=$(($(count_events "" error) + $(log_lines unexpected)))
    printf '%5s |' "$t" | tee -a "$out/soak.log"
    for b in "${backends[@]}"; do
        printf ' %s |' "$(latest "$b")" | tee -a "$out/soak.log"
    done
    printf ' %6d %5d %8d | %6d %8d\n' "$rounds" "$(count_events "" kill)" \
        "$(count_events "" restart)" "$errors" "$(log_lines expected)" | tee -a "$out/soak.log"
}

# --- run --------------------------------------------------------------------------------
say "soak: ${backends[*]} for $minutes min, a row every ${sample_every}s, logs in $out"
for b in "${backends[@]}"; do
    # Its stderr (bash's notes on killed jobs, anything unexpected) to a log of its own.
    drive "$b" 2>"$out/driver-$b.log" &
    driver_pids+=($!)
done

hdr=$(printf '%5s |' time)
for b in "${backends[@]}"; do hdr+=$(printf ' %-6s RSS KiB  fds inc |' "$b"); done
hdr+=$(printf ' %6s %5s %8s | %6s %8s' rounds kills restarts errors expected)
say "$hdr"
say "      (RSS and fds: after the backend's latest round, idle; inc: process number, new after a restart; expected: WARN lines of killed connections)"
start=$SECONDS
end=$((start + minutes * 60))
next=$((start + sample_every))
while ((SECONDS < end)); do
    sleep 1
    if ((SECONDS >= next)); then
        t=$((SECONDS - start))
        row "$(printf '%d:%02d' $((t / 60)) $((t % 60)))"
        next=$((next + sample_every))
    fi
done
touch "$state/stop"
say "soak: time is up; finishing the rounds in progress, final verify, SIGTERM"
for i in "${!driver_pids[@]}"; do
    p=${driver_pids[i]}
    for ((j = 0; j < 1200; j++)); do
        kill -0 "$p" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$p" 2>/dev/null; then
        b=${backends[i]}
        say "soak: the $b driver did not finish in 120 s; stopping it"
        event "$b" error "driver hung at the end (see $out/driver-$b.log)"
        kill -TERM "$p" 2>/dev/null
        kill_ours KILL "$(cat "$state/$b.bench.pid" 2>/dev/null)" "bench"
        kill_ours KILL "$(cat "$state/$b.pid" 2>/dev/null)" "-backend"
    fi
done
wait "${driver_pids[@]}" 2>/dev/null
driver_pids=()
t=$((SECONDS - start))
row "$(printf '%d:%02d' $((t / 60)) $((t % 60)))"

# --- summary ----------------------------------------------------------------------------
say ""
say "summary (idle samples after each round; per process: baseline = after its round $warm_rounds; fds compared after clean rounds)"
say "$(printf '%-7s %6s %5s %5s %8s | %-23s | %-14s | %s' backend rounds kills procs restarts 'RSS KiB first/last/max' 'fds first/last/max' 'per process: baseline RSS/fds -> max RSS, last fds')"
growth=0
for b in "${backends[@]}"; do
    f=$out/samples/$b.tsv
    [[ -s $f ]] || { say "$b: no samples"; growth=1; continue; }
    line=$(awk '
        NR == 1 { fr = $4; ff = $5 }
        { lr = $4; lf = $5; if ($4 > mr) mr = $4; if ($5 > mf) mf = $5 }
        END { printf "%9d/%6d/%6d | %4d/%4d/%4d", fr, lr, mr, ff, lf, mf }' "$f")
    # Baseline: the first sample after a clean round from the process's round $warm_rounds
    # on; fds compared between samples after clean rounds, RSS over all samples.
    verdicts=$(awk -v warm="$warm_rounds" '
        { k = $2; n[k]++; if (!(k in order)) { order[k] = ++nk; key[nk] = k }
          if (n[k] >= warm && $7 == 1 && !(k in br)) { br[k] = $4; bf[k] = $5; mx[k] = $4 }
          if (k in br) { if ($4 > mx[k]) mx[k] = $4; if ($7 == 1) lf[k] = $5 } }
        END {
          for (i = 1; i <= nk; i++) {
            k = key[i]
            if (!(k in br)) { printf "#%s: %d samples, too few; ", k, n[k]; continue }
            bad = ""
            if (lf[k] > bf[k]) bad = bad " FDS GREW"
            if (mx[k] > br[k] * 1.2 + 4096) bad = bad " RSS GREW"
            printf "#%s: %d/%d -> %d, %d%s; ", k, br[k], bf[k], mx[k], lf[k], bad
          } }' "$f")
    say "$(printf '%-7s %6d %5d %5s %8d | %s | %s' "$b" "$(count_rounds "$b")" "$(count_events "$b" kill)" \
        "$(cat "$state/$b.inc")" "$(count_events "$b" restart)" "$line" "${verdicts%; }")"
    [[ $verdicts == *GREW* ]] && growth=1
done
rounds=$(($(count_rounds) + $(count_events "" final-verify)))
errors=$(count_events "" error)
unexpected=$(log_lines unexpected)
say ""
say "rounds $rounds (each ended in a disconnect), of them killed mid-run $(count_events "" kill);" \
    "backend restarts (SIGKILL under load) $(count_events "" restart);" \
    "blk final verify: $(awk '$3 == "final-verify" {$1=$2=$3=""; print substr($0, 4)}' "$out/events" || true)"
say "errors: $errors failed rounds/backend events, $unexpected unexpected WARN/ERROR log lines" \
    "($(log_lines expected) expected 'frontend connection ended' lines)"
if ((errors > 0)); then
    say "errors:"
    awk '$3 == "error"' "$out/events" | tee -a "$out/soak.log"
fi
if ((unexpected > 0)); then
    say "unexpected log lines (first 10):"
    grep -E '^\[[^ ]+ +(WARN|ERROR)' "$out"/*.[0-9]*.log | grep -vE "$expected_re" | head -n 10 | tee -a "$out/soak.log"
fi
if [[ -z $ns ]]; then
    say "net SKIPPED (not root)"
fi
if ((errors + unexpected > 0 || growth)); then
    say "soak FAILED (logs: $out)"
    exit 1
fi
say "soak PASSED: no errors, fds and RSS flat (logs: $out)"
exit 0
