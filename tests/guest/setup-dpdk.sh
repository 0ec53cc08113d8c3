#!/usr/bin/env bash
# Idempotent: DPDK's testpmd, the second real vhost-user frontend for the net tests.
# Debian ships testpmd in dpdk-dev, which drags in a whole toolchain (~230 packages); we
# install only the runtime libraries (package dpdk) and unpack dpdk-dev's binaries into the
# harness work directory. Prints the path of dpdk-testpmd.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[ "$(id -u)" = 0 ] || die "run as root"
export DEBIAN_FRONTEND=noninteractive

dir="$GUEST_WORK/dpdk-dev"
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }
# dpdk: the runtime with virtio-user (the net tests' frontend); the vhost and tap PMDs are
# `bench compare net`'s contender (testpmd as a vhost-user backend forwarding to a tap).
pkgs=(dpdk librte-net-vhost23 librte-net-tap23)
missing=()
for p in "${pkgs[@]}"; do installed "$p" || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing the DPDK runtime (${missing[*]})"
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
        || { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; }
fi
want=$(dpkg-query -W -f='${Version}' dpdk)
if [ "$(cat "$dir/.version" 2>/dev/null)" != "$want" ]; then
    log "unpacking dpdk-dev $want (testpmd) into $dir"
    tmp=$(mktemp -d)
    chown _apt "$tmp" 2>/dev/null || true
    (cd "$tmp" && apt-get download -q "dpdk-dev=$want" >&2)
    rm -rf "$dir"; mkdir -p "$dir"
    dpkg-deb -x "$tmp"/dpdk-dev_*.deb "$dir"
    rm -rf "$tmp"
    echo "$want" > "$dir/.version"
fi
[ -x "$dir/usr/bin/dpdk-testpmd" ] || die "no dpdk-testpmd in $dir"
echo "$dir/usr/bin/dpdk-testpmd"
