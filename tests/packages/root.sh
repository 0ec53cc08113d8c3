#!/usr/bin/env bash
# Prepares (once, then cached) the Debian bookworm roots the package tests
# (tests/tests/packages.rs) install the .debs into, and prints the path of the one asked
# for:
#
#   root.sh clean   a minbase root (debootstrap --variant=minbase) with apt's lists and
#                   man-db, and the .debs of systemd (what our packages depend on) in apt's
#                   cache but not installed: `apt-get install ./PKG.deb` then resolves the
#                   dependencies as on a clean machine, without the network
#   root.sh boot    the clean root with systemd and systemd-sysv installed, for
#                   systemd-nspawn --boot (the test boots it with --volatile=overlay, so it
#                   stays as it is)
#
# The minbase root comes from scripts/fresh-check.sh's cache ($FRESH_CACHE/base, default
# /var/tmp/vhost-fresh/base) when it is complete, else from debootstrap into the work
# directory (installed if missing). The roots live in $VHOST_PACKAGES_WORK (default
# /var/tmp/vhost-packages) as root-<kind>-<key>, the key a hash of this script and of the
# base root's identity: a changed recipe or base makes new roots (older ones are deleted).
# First run: a minute or two (apt downloads; debootstrap adds a few minutes); then instant.
# Needs root and the Debian archive (first run only).
#
# Usage: root.sh clean|boot
set -euo pipefail

kind=${1:-}
case "$kind" in clean | boot) ;; *) echo "usage: root.sh clean|boot" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "root.sh: needs root (debootstrap, chroot)" >&2; exit 1; }

work=${VHOST_PACKAGES_WORK:-/var/tmp/vhost-packages}
fresh_base=${FRESH_CACHE:-/var/tmp/vhost-fresh}/base
mirror=http://deb.debian.org/debian
log() { echo "[$(date +%H:%M:%S)] root.sh: $*" >&2; }

mkdir -p "$work"
exec 9>"$work/.lock"
flock -w 900 9 || { echo "root.sh: timed out waiting for $work/.lock" >&2; exit 1; }

# The minbase root: fresh-check's, or our own.
if [ -f "$fresh_base/.complete" ]; then
    base=$fresh_base
else
    base=$work/base
    if [ ! -f "$base/.complete" ]; then
        if ! command -v debootstrap >/dev/null; then
            apt-get install -y -q --no-install-recommends debootstrap \
                || { apt-get update -q && apt-get install -y -q --no-install-recommends debootstrap; }
        fi
        log "debootstrap --variant=minbase bookworm into $base (once; a few minutes)"
        rm -rf "$base"
        debootstrap --variant=minbase bookworm "$base" "$mirror" > "$work/debootstrap.log" 2>&1 \
            || { tail -n 20 "$work/debootstrap.log" >&2; echo "root.sh: debootstrap failed" >&2; exit 1; }
        cat > "$base/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
        rm -rf "$base"/var/cache/apt/archives/*.deb "$base"/var/lib/apt/lists/*
        touch "$base/.complete"
    fi
fi

key=$( { sha256sum < "$0"; echo "$base"; stat -c %Y "$base/.complete"; } | sha256sum | cut -c1-16)
clean=$work/root-clean-$key
boot=$work/root-boot-$key

# Runs a command in ROOT as root, with /proc, /dev, a fresh /run and /tmp and the host's
# DNS, in private mount and PID namespaces (nothing outlives it).
in_root() { # ROOT COMMAND...
    local r=$1; shift
    cp -L /etc/resolv.conf "$r/etc/resolv.conf"
    unshare --mount --pid --fork --propagation private bash -c '
        set -e
        R=$1; shift
        mount --bind "$R" "$R"
        mount -t proc proc "$R/proc"
        mount --rbind /dev "$R/dev"
        mount -t tmpfs -o mode=755 tmpfs "$R/run"
        mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
        exec chroot "$R" /usr/bin/env -i HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
            PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"' sh "$r" "$@"
}
APT=(apt-get -q -y -o DPkg::Lock::Timeout=120 --no-install-recommends)

if [ ! -f "$clean/.complete" ]; then
    log "preparing $clean (apt lists, man-db, systemd's .debs in apt's cache)"
    rm -rf "$clean.tmp"
    cp -a "$base" "$clean.tmp"
    rm -f "$clean.tmp/.complete"
    in_root "$clean.tmp" "${APT[@]}" update > "$work/prepare-clean.log" 2>&1
    in_root "$clean.tmp" "${APT[@]}" install man-db >> "$work/prepare-clean.log" 2>&1
    in_root "$clean.tmp" "${APT[@]}" install --download-only systemd >> "$work/prepare-clean.log" 2>&1 \
        || { tail -n 20 "$work/prepare-clean.log" >&2; exit 1; }
    mv "$clean.tmp" "$clean"
    touch "$clean/.complete"
fi

if [ "$kind" = boot ] && [ ! -f "$boot/.complete" ]; then
    log "preparing $boot (systemd, systemd-sysv)"
    rm -rf "$boot.tmp"
    cp -a "$clean" "$boot.tmp"
    rm -f "$boot.tmp/.complete"
    in_root "$boot.tmp" "${APT[@]}" install systemd systemd-sysv > "$work/prepare-boot.log" 2>&1 \
        || { tail -n 20 "$work/prepare-boot.log" >&2; exit 1; }
    # A container of its own: no getty on the console, no leftover machine id.
    in_root "$boot.tmp" systemctl mask console-getty.service getty.target >> "$work/prepare-boot.log" 2>&1
    : > "$boot.tmp/etc/machine-id"
    mv "$boot.tmp" "$boot"
    touch "$boot/.complete"
fi

# Roots of other keys are from an older recipe or base.
for old in "$work"/root-clean-* "$work"/root-boot-*; do
    case "$old" in "$clean" | "$boot") ;; *) [ -e "$old" ] && rm -rf "$old" ;; esac
done

if [ "$kind" = clean ]; then echo "$clean"; else echo "$boot"; fi
