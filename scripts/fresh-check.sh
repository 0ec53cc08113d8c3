#!/usr/bin/env bash
# Proves the README's two commands on a clean system. A developer's own machine (and CI,
# which runs on it) hides install steps that are missing from the scripts: whatever was
# installed by hand is still there. This runs them where nothing was ever installed:
#
#   1. a minimal Debian bookworm root (debootstrap --variant=minbase), built once and kept
#      as a pristine copy under $FRESH_CACHE (default /var/tmp/vhost-fresh/base);
#   2. a fresh copy of it for this run, with only the Rust toolchain (rustup's, read-only),
#      /dev, /proc, /sys, a fresh /run and /tmp, and DNS bound in; nothing else of the host;
#   3. a clone of the current commit (HEAD: commit first) at /src in it;
#   4. scripts/demo.sh, then scripts/test.sh with VHOST_GUEST_REQUIRE=1 (as .ci/run does),
#      each as root in that root, in private mount and PID namespaces (every process and
#      mount of the run ends with it).
#
# Closes with "fresh-check: demo PASSED|FAILED, test PASSED|FAILED (...)" and exits 0 only
# if both passed. Logs: $FRESH_CACHE/last/{demo,test}.log. Takes about 35 minutes (apt,
# a guest kernel, a trixie chroot with QEMU 11, DPDK and two cargo builds, all from scratch).
#
# Usage: scripts/fresh-check.sh [--only demo|test] [--keep] [--rebuild-base]
#   --only X         run one of the two commands
#   --keep           keep the run's root (default: deleted; it holds a few GiB of builds)
#   --rebuild-base   debootstrap the pristine base again (it is otherwise reused)
# Needs root, debootstrap (installed if missing) and rustup's toolchain in $RUSTUP_HOME
# (default ~/.rustup) with cargo in $CARGO_HOME/bin (default ~/.cargo/bin).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
src=$PWD
[ "$(id -u)" = 0 ] || { echo "fresh-check: run as root (debootstrap, chroot, mounts)" >&2; exit 1; }

only="" keep=0 rebuild=0
while [ $# -gt 0 ]; do
    case "$1" in
        --only) only=${2:?--only needs demo or test}; shift 2 ;;
        --keep) keep=1; shift ;;
        --rebuild-base) rebuild=1; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "fresh-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$only" in "" | demo | test) ;; *) echo "fresh-check: --only demo|test" >&2; exit 2 ;; esac

cache=${FRESH_CACHE:-/var/tmp/vhost-fresh}
base=$cache/base
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_bin=${CARGO_HOME:-$HOME/.cargo}/bin
toolchain=$(rustup show active-toolchain 2>/dev/null | awk '{print $1; exit}')
[ -x "$cargo_bin/cargo" ] || { echo "fresh-check: no cargo in $cargo_bin" >&2; exit 1; }
[ -n "$toolchain" ] || { echo "fresh-check: rustup knows no active toolchain" >&2; exit 1; }
mirror=http://deb.debian.org/debian
log() { echo "[$(date +%H:%M:%S)] fresh-check: $*" >&2; }

commit=$(git rev-parse HEAD)
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    log "warning: uncommitted changes are NOT part of the check (it clones HEAD ${commit:0:7})"
fi

# 1. the pristine base, built once -------------------------------------------------------
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock -n 9 || { echo "fresh-check: another run holds $cache/.lock" >&2; exit 1; }
if [ $rebuild = 1 ] || [ ! -f "$base/.complete" ]; then
    if ! command -v debootstrap >/dev/null; then
        apt-get install -y -q --no-install-recommends debootstrap \
            || { apt-get update -q && apt-get install -y -q --no-install-recommends debootstrap; }
    fi
    log "debootstrap --variant=minbase bookworm into $base (once; a few minutes)"
    rm -rf "$base"
    debootstrap --variant=minbase bookworm "$base" "$mirror" > "$cache/debootstrap.log" 2>&1 \
        || { tail -n 20 "$cache/debootstrap.log" >&2; echo "fresh-check: debootstrap failed" >&2; exit 1; }
    # What a Debian bookworm machine's apt reads: the release, its updates and security.
    cat > "$base/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
    rm -rf "$base"/var/cache/apt/archives/*.deb "$base"/var/lib/apt/lists/*
    touch "$base/.complete"
fi

# 2. this run's root: a fresh copy of the base --------------------------------------------
run=$cache/run
# Mounts live in the run's private namespace and end with it; never delete through one.
if grep -q " $run/" /proc/self/mounts; then
    echo "fresh-check: something is still mounted under $run; unmount it first" >&2; exit 1
fi
rm -rf "$run" "$cache/last"
mkdir -p "$cache/last"
log "copying the pristine base to $run"
cp -a "$base" "$run"
# The machine's network, not the project's set-up: its DNS, and the certificate
# authorities it trusts locally (a TLS-inspecting egress proxy's CA, for instance), which
# ca-certificates adds to the bundle when the set-up installs it, and a copy of the bundle
# until then.
cp -L /etc/resolv.conf "$run/etc/resolv.conf"
if [ -d /usr/local/share/ca-certificates ]; then
    mkdir -p "$run/usr/local/share/ca-certificates"
    cp -a /usr/local/share/ca-certificates/. "$run/usr/local/share/ca-certificates/"
fi
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    mkdir -p "$run/etc/ssl/certs"
    cp -L /etc/ssl/certs/ca-certificates.crt "$run/etc/ssl/certs/ca-certificates.crt"
fi
mkdir -p "$run/src" "$run/root/.rustup" "$run/root/.cargo/bin"
# 3. the code: a clone of the current commit, as a new user would have it.
git clone -q --no-hardlinks "$src" "$run/src"
git -C "$run/src" checkout -q "$commit"
log "cloned ${commit:0:7} to /src"

# 4. one command in the root, in private mount and PID namespaces --------------------------
in_root() { # NAME COMMAND...
    local name=$1; shift
    unshare --mount --pid --fork --propagation private bash -c '
        set -e
        R=$1 RUSTUP=$2 CARGOBIN=$3; shift 3
        # The root a mount point of its own, as / is on a machine (unshare -m inside
        # changes the propagation of / and fails where / is a plain directory).
        mount --bind "$R" "$R"
        mount -t proc proc "$R/proc"
        mount --rbind /dev "$R/dev"
        mount --rbind /sys "$R/sys"
        mount -t tmpfs -o mode=755 tmpfs "$R/run"
        mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
        mount --bind "$RUSTUP" "$R/root/.rustup" && mount -o remount,bind,ro "$R/root/.rustup"
        mount --bind "$CARGOBIN" "$R/root/.cargo/bin" && mount -o remount,bind,ro "$R/root/.cargo/bin"
        exec chroot "$R" /usr/bin/env -i HOME=/root USER=root LANG=C.UTF-8 TERM=dumb \
            PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            RUSTUP_HOME=/root/.rustup RUSTUP_TOOLCHAIN="$TOOLCHAIN" CARGO_HOME=/root/.cargo \
            CI=true "$@"' \
        sh "$run" "$rustup_home" "$cargo_bin" "$@" < /dev/null > "$cache/last/$name.log" 2>&1
}
export TOOLCHAIN=$toolchain

results=() ok=1 t0=$SECONDS
for cmd in demo test; do
    [ -z "$only" ] || [ "$only" = "$cmd" ] || continue
    log "running scripts/$cmd.sh in the fresh root (log: $cache/last/$cmd.log)"
    t=$SECONDS
    if [ $cmd = demo ]; then
        in_root demo bash -c 'cd /src && scripts/demo.sh' && rc=0 || rc=$?
    else
        in_root test bash -c 'cd /src && VHOST_GUEST_REQUIRE=1 scripts/test.sh' && rc=0 || rc=$?
    fi
    m=$(( (SECONDS - t) / 60 )) s=$(( (SECONDS - t) % 60 ))
    if [ $rc = 0 ]; then verdict=PASSED; else verdict=FAILED ok=0; fi
    extra=$(grep -E '^summary: ' "$cache/last/$cmd.log" | tail -n1 || true)
    results+=("$cmd $verdict in ${m}m${s}s${extra:+ ($extra)}")
    [ $rc = 0 ] || tail -n 25 "$cache/last/$cmd.log" >&2
done

if [ $keep = 1 ]; then log "kept the run's root at $run"; else rm -rf "$run"; fi
total=$(( (SECONDS - t0) / 60 ))
line=""
for r in "${results[@]}"; do line+="${line:+; }$r"; done
echo "fresh-check: $line; commit ${commit:0:7}, ${total} min in all"
[ $ok = 1 ]
