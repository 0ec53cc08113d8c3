#!/usr/bin/env bash
# Idempotent: DPDK's testpmd, the second real vhost-user frontend for the net tests.
# Debian ships testpmd in dpdk-dev, which drags in a whole toolchain (~230 packages); we
# unpack dpdk-dev's binaries into the harness work directory and install only the runtime
# libraries they link against: every library package dpdk-dev depends on (the package
# `dpdk` alone, without its Recommends, leaves out librte_cmdline, librte_pdump, libpcap
# and about 30 more), and the drivers testpmd loads as plugins at run time (ldd cannot see
# those). Prints the path of dpdk-testpmd; fails, naming them, if any library it needs is
# still missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[ "$(id -u)" = 0 ] || die "run as root"
export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -q -o DPkg::Lock::Timeout=300)
lock_work

dir="$GUEST_WORK/dpdk-dev"
testpmd="$dir/usr/bin/dpdk-testpmd"
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }
missing_libs() { ldd "$testpmd" 2>/dev/null | awk '/not found/ {print $1}'; }

# Plugins (dlopen'ed from dpdk/pmds-*): virtio-user is the net tests' frontend, the vhost
# and tap drivers are `bench compare net`'s contender (testpmd as a vhost-user backend
# forwarding to a tap), the ring mempool holds every mbuf.
plugins=(librte-net-virtio23 librte-net-vhost23 librte-net-tap23 librte-mempool-ring23)
plugins_installed() { local p; for p in "${plugins[@]}"; do installed "$p" || return 1; done; }

# Fast path: testpmd unpacked for the installed dpdk and every library resolves.
if installed dpdk && plugins_installed && [ -x "$testpmd" ] \
    && [ "$(cat "$dir/.version" 2>/dev/null)" = "$(dpkg-query -W -f='${Version}' dpdk)" ] \
    && [ -z "$(missing_libs)" ]; then
    echo "$testpmd"
    exit 0
fi

apt_install() {
    "${APT[@]}" install -y --no-install-recommends "$@" >&2 \
        || { "${APT[@]}" update >&2 && "${APT[@]}" install -y --no-install-recommends "$@" >&2; }
}
installed dpdk && plugins_installed \
    || { log "installing the DPDK runtime and drivers"; apt_install dpdk "${plugins[@]}"; }
want=$(dpkg-query -W -f='${Version}' dpdk)

# dpdk-dev's library dependencies at the installed version (not the -dev packages, not
# the Python it needs only for its scripts).
deps=$(apt-cache show "dpdk-dev=$want" 2>/dev/null | sed -n 's/^Depends: //p' | head -n1) \
    || true
[ -n "$deps" ] || { "${APT[@]}" update >&2; deps=$(apt-cache show "dpdk-dev=$want" | sed -n 's/^Depends: //p' | head -n1); }
[ -n "$deps" ] || die "apt knows no dpdk-dev $want (the version of the installed dpdk)"
libs=()
for d in $(echo "$deps" | tr ',' '\n' | sed 's/([^)]*)//; s/|.*//' | tr -d ' '); do
    case "$d" in *-dev | python3* | "") ;; *) installed "$d" || libs+=("$d") ;; esac
done
if [ "${#libs[@]}" -gt 0 ]; then
    log "installing ${#libs[@]} runtime libraries testpmd links against"
    apt_install "${libs[@]}"
fi

if [ "$(cat "$dir/.version" 2>/dev/null)" != "$want" ] || [ ! -x "$testpmd" ]; then
    log "unpacking dpdk-dev $want (testpmd) into $dir"
    tmp=$(mktemp -d)
    chown _apt "$tmp" 2>/dev/null || true
    (cd "$tmp" && "${APT[@]}" download "dpdk-dev=$want" >&2)
    rm -rf "$dir"; mkdir -p "$dir"
    dpkg-deb -x "$tmp"/dpdk-dev_*.deb "$dir"
    rm -rf "$tmp"
    echo "$want" > "$dir/.version"
fi
[ -x "$testpmd" ] || die "no dpdk-testpmd in $dir"
missing=$(missing_libs)
[ -z "$missing" ] || die "dpdk-testpmd still misses libraries: $(echo $missing)"
echo "$testpmd"
