#!/usr/bin/env bash
# Idempotent host setup for the guest tests (Debian, run as root). Cheap when
# everything is in place (no apt-get update, no downloads).
#
#  * bookworm hosts: adds the bookworm-backports apt source if no source
#    mentions it, and installs QEMU 10.x (qemu-system-x86, qemu-utils with
#    qemu-storage-daemon) from it; other hosts: QEMU from the default suite
#  * installs libvirt's virsh and QEMU driver (libvirt-clients,
#    libvirt-daemon-driver-qemu; from bookworm-backports on bookworm hosts)
#  * installs busybox-static, fio, iperf3, cpio, kmod, util-linux, zstd, xz-utils,
#    fonts-dejavu-core (the font of the bench charts, read at run time), and gcc,
#    libc6-dev, ca-certificates, iproute2, procps (building and running the tests), and
#    for the package tests (tests/tests/packages.rs) binutils (objcopy: cargo-deb's
#    debug symbols), debootstrap (a clean bookworm root) and systemd-container
#    (systemd-nspawn boots it); scripts/package.sh installs cargo-deb itself
#  * downloads the guest kernel package (the current dependency of
#    linux-image-amd64 in $GUEST_KERNEL_SUITE) and unpacks it into
#    $GUEST_WORK/kernel-<suite> (it is NOT installed on the host)
#
# Usage: setup.sh      (env: VHOST_GUEST_WORK/GUEST_WORK, GUEST_KERNEL_SUITE)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[ "$(id -u)" = 0 ] || die "setup.sh must run as root (apt-get)"
command -v apt-get >/dev/null || die "apt-get not found: setup.sh supports Debian hosts only"
export DEBIAN_FRONTEND=noninteractive
lock_work
APT=(apt-get -q -o DPkg::Lock::Timeout=300)

updated=0
apt_update() { [ $updated = 1 ] && return; log "apt-get update"; "${APT[@]}" update; updated=1; }

installed_version() {
    dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null | awk '$3=="installed"{print $4}'
}

# 1. bookworm-backports apt source (bookworm hosts only) -------------------------
qemu_target=()
if [ "$HOST_CODENAME" = bookworm ]; then
    qemu_target=(-t bookworm-backports)
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        log "adding bookworm-backports apt source"
        echo 'deb http://deb.debian.org/debian bookworm-backports main' \
            > /etc/apt/sources.list.d/bookworm-backports.list
        apt_update
    fi
fi

# 2. packages ------------------------------------------------------------------
need_qemu=0
for p in qemu-system-x86 qemu-utils; do
    case "$(installed_version $p)" in 1:1[0-9].*) ;; *) need_qemu=1 ;; esac
done
if [ $need_qemu = 1 ]; then
    # Lists may predate the backports source (or be missing): refresh if apt
    # does not know a 10.x candidate.
    apt-cache madison qemu-system-x86 2>/dev/null | grep ' 1:1[0-9]\.' >/dev/null || apt_update
    log "installing QEMU ${qemu_target[*]}"
    # --no-install-recommends: no GUI/spice/opengl modules, no OVMF.
    "${APT[@]}" install -y --no-install-recommends "${qemu_target[@]}" qemu-system-x86 qemu-utils
fi

# Besides the guest's tools: what building and running the tests needs on a bare Debian
# (the linker and C library for cargo, CA certificates for crates.io, ip/ss for the network
# tests, ps/pgrep), present on most machines and missing from a minimal one; and what the
# package tests need on the host (objcopy, debootstrap, systemd-nspawn).
missing=()
for p in busybox-static fio iperf3 cpio kmod util-linux zstd xz-utils fonts-dejavu-core \
    gcc libc6-dev ca-certificates iproute2 procps binutils debootstrap systemd-container; do
    [ -n "$(installed_version $p)" ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-cache show "${missing[@]}" >/dev/null 2>&1 || apt_update
    log "installing ${missing[*]}"
    "${APT[@]}" install -y --no-install-recommends "${missing[@]}"
fi

# libvirt for tests/tests/guest_libvirt.rs: virsh and the QEMU driver module, which the
# test loads into virsh itself (qemu:///embed) -- no daemon, no systemd units needed.
# bookworm: 11.x from backports; `pkg/suite` takes only these two (and the libvirt
# libraries their versioned dependencies name) from there, not systemd & co.
libvirt_pkgs=()
for p in libvirt-clients libvirt-daemon-driver-qemu; do
    [ -n "$(installed_version $p)" ] && continue
    if [ "$HOST_CODENAME" = bookworm ]; then libvirt_pkgs+=("$p/bookworm-backports"); else libvirt_pkgs+=("$p"); fi
done
if [ ${#libvirt_pkgs[@]} -gt 0 ]; then
    if [ "$HOST_CODENAME" = bookworm ]; then
        apt-cache madison libvirt-clients 2>/dev/null | grep bookworm-backports >/dev/null || apt_update
    else
        apt-cache show libvirt-clients >/dev/null 2>&1 || apt_update
    fi
    log "installing ${libvirt_pkgs[*]}"
    "${APT[@]}" install -y --no-install-recommends "${libvirt_pkgs[@]}"
fi

# 3. guest kernel (downloaded + unpacked, not installed) -------------------------
target=(); [ "$GUEST_KERNEL_SUITE" = default ] || target=(-t "$GUEST_KERNEL_SUITE")
resolve_kernel_pkg() {
    apt-cache depends "${target[@]}" linux-image-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/{print $2; exit}'
}
pkg=$(resolve_kernel_pkg)
[ -n "$pkg" ] || { apt_update; pkg=$(resolve_kernel_pkg); }
[ -n "$pkg" ] || die "cannot resolve linux-image-amd64 in $GUEST_KERNEL_SUITE"
if [ -f "$KERNEL_DIR/.pkg" ] && [ "$(cat "$KERNEL_DIR/.pkg")" = "$pkg" ]; then
    log "guest kernel $pkg already unpacked in $KERNEL_DIR"
else
    log "downloading guest kernel $pkg"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    chown _apt "$tmp" 2>/dev/null || true   # lets apt download sandboxed
    if ! (cd "$tmp" && "${APT[@]}" download "$pkg"); then
        apt_update   # stale lists: the pool file may be gone
        (cd "$tmp" && "${APT[@]}" download "$pkg")
    fi
    # Unpack next to the final place and rename, so an interrupted run never
    # leaves a half-unpacked kernel that looks complete.
    rm -rf "$KERNEL_DIR.tmp"; mkdir -p "$KERNEL_DIR.tmp"
    dpkg-deb -x "$tmp"/*.deb "$KERNEL_DIR.tmp"
    rm -rf "$KERNEL_DIR"; mv "$KERNEL_DIR.tmp" "$KERNEL_DIR"
    echo "$pkg" > "$KERNEL_DIR/.pkg"
fi

log "QEMU:   $($QEMU --version | head -n1)"
log "QSD:    $($QSD --version | head -n1)"
log "kernel: $(kernel_image)"
