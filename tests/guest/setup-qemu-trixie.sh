#!/usr/bin/env bash
# Idempotent (about 1 s when done; a few minutes on a fresh machine): a newer QEMU (11.x from trixie-backports) in a Debian trixie
# chroot, for what QEMU 10.0 (bookworm-backports) cannot do:
#   * vhost-user-test-device-pci (QEMU >= 10.2), the user-creatable generic
#     vhost-user device, needed to attach a vhost-user virtio-console
#     backend: QEMU has no dedicated vhost-user console device, and 10.0's
#     vhost-user-device-pci is not user-creatable ("Parameter 'driver'
#     expects a pluggable device type").
#
# Trixie's packages need glibc 2.41, so they cannot be installed on bookworm;
# debootstrap puts a minimal trixie under $GUEST_WORK/qemu-trixie/root and a
# wrapper script $GUEST_WORK/qemu-trixie/qemu-system-x86_64 runs QEMU in it.
# The wrapper makes private bind mounts (unshare -m, gone when QEMU exits) of
# /proc /sys /dev /tmp and $GUEST_WORK at the same paths, so kernel, initrd,
# disk images and vhost-user sockets are reachable under the same names.
#
# Used by the console guest tests (tests/tests/guest_console.rs), which look for
# the wrapper at $GUEST_WORK/qemu-trixie/qemu-system-x86_64 (or $QEMU_CONSOLE).
#
# Usage: setup-qemu-trixie.sh   (as root; env: VHOST_GUEST_WORK/GUEST_WORK)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[ "$(id -u)" = 0 ] || die "run as root"
export DEBIAN_FRONTEND=noninteractive

dir="$GUEST_WORK/qemu-trixie" root="$GUEST_WORK/qemu-trixie/root"
mirror=http://deb.debian.org/debian
lock_work

# Fast path: everything is in place.
if [ -x "$dir/qemu-system-x86_64" ] && [ -f "$dir/.complete" ] \
    && chroot "$root" qemu-system-x86_64 --version 2>/dev/null | grep 'version 1[1-9]' >/dev/null; then
    exit 0
fi

APT=(apt-get -q -o DPkg::Lock::Timeout=300)
if ! command -v debootstrap >/dev/null; then
    "${APT[@]}" install -y --no-install-recommends debootstrap \
        || { "${APT[@]}" update && "${APT[@]}" install -y --no-install-recommends debootstrap; } \
        || die "cannot install debootstrap"
fi

if [ ! -x "$root/usr/bin/apt-get" ]; then
    log "debootstrap trixie into $root"
    rm -rf "$root"; mkdir -p "$dir"
    debootstrap --variant=minbase trixie "$root" "$mirror" > "$dir/debootstrap.log" 2>&1 \
        || die "debootstrap failed, see $dir/debootstrap.log"
fi
echo "deb $mirror trixie-backports main" > "$root/etc/apt/sources.list.d/trixie-backports.list"
if ! chroot "$root" qemu-system-x86_64 --version 2>/dev/null | grep 'version 1[1-9]' >/dev/null; then
    log "installing qemu-system-x86 from trixie-backports in the chroot"
    unshare -m sh -c "mount -t proc proc '$root/proc' &&
        chroot '$root' apt-get update -q &&
        chroot '$root' apt-get install -y -q --no-install-recommends -t trixie-backports qemu-system-x86"
fi

cat > "$dir/qemu-system-x86_64" <<EOF
#!/bin/sh
# Runs trixie's QEMU from $root with this host's /proc /sys /dev /tmp and
# $GUEST_WORK visible at the same paths (private mounts, dropped on exit).
R='$root'
W='$GUEST_WORK'
exec unshare -m --propagation private sh -c '
    R=\$1 W=\$2; shift 2
    mount --bind /proc "\$R/proc" && mount --rbind /dev "\$R/dev" &&
    mount --rbind /sys "\$R/sys" && mount --bind /tmp "\$R/tmp" || exit 125
    mkdir -p "\$R\$W" && mount --bind "\$W" "\$R\$W" || exit 125
    exec chroot "\$R" qemu-system-x86_64 "\$@"' sh "\$R" "\$W" "\$@"
EOF
chmod 755 "$dir/qemu-system-x86_64"
log "$("$dir/qemu-system-x86_64" --version | head -n1)"
touch "$dir/.complete"
log "use: QEMU=$dir/qemu-system-x86_64"
