# Shared settings for the guest test harness. Sourced by the other scripts in
# this directory; not meant to be run on its own. Everything can be overridden
# from the environment.

# Directory holding these scripts (works when sourced from a sibling script).
HARNESS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Work directory: unpacked guest kernel, built initramfs, per-test run
# directories (disk images, sockets, logs). Must be on a filesystem with
# O_DIRECT support (ext4/xfs; not tmpfs before Linux 6.6).
GUEST_WORK="${VHOST_GUEST_WORK:-${GUEST_WORK:-/var/tmp/vhost-guest}}"

# Host distribution codename (bookworm, trixie, ...).
HOST_CODENAME="$( . /etc/os-release 2>/dev/null; echo "${VERSION_CODENAME:-unknown}")"

# Debian suite the guest kernel comes from:
#   bookworm-backports  linux-image-amd64 6.12.x (default on bookworm hosts):
#                       virtio/virtio_pci built in, boots faster under TCG
#   default             whatever the host's default apt candidate is
#                       (6.1.x on bookworm; default on non-bookworm hosts)
if [ "$HOST_CODENAME" = bookworm ]; then
    GUEST_KERNEL_SUITE="${GUEST_KERNEL_SUITE:-bookworm-backports}"
else
    GUEST_KERNEL_SUITE="${GUEST_KERNEL_SUITE:-default}"
fi

# Kernel modules put into the initramfs and loaded by /init (dependencies are
# added automatically).
GUEST_MODULES="${GUEST_MODULES:-virtio_pci virtio_blk virtio_net virtio_console}"

# Dynamically linked host binaries copied into the initramfs with every
# shared library ldd lists. blkdiscard/blockdev come from util-linux
# (busybox's blkdiscard has no -z).
GUEST_BINARIES="${GUEST_BINARIES:-fio iperf3 blkdiscard blockdev}"

# busybox applets the guest scripts rely on (checked by build-initramfs.sh).
GUEST_APPLETS="${GUEST_APPLETS:-sh dd sha256sum head cut tr wc ls cat sync taskset insmod poweroff mount cmp od seq grep sed awk sleep}"

QEMU="${QEMU:-qemu-system-x86_64}"
QSD="${QSD:-qemu-storage-daemon}"

KERNEL_DIR="$GUEST_WORK/kernel-$GUEST_KERNEL_SUITE"   # unpacked .deb
INITRAMFS="$GUEST_WORK/initramfs-$GUEST_KERNEL_SUITE.cpio.gz"

die() { echo "error: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# Serialise setup/build steps between concurrent test processes.
lock_work() {
    mkdir -p "$GUEST_WORK"
    exec 9>"$GUEST_WORK/.lock"
    flock -w 600 9 || die "timed out waiting for $GUEST_WORK/.lock"
}

# Kernel version (e.g. 6.12.43+deb12-amd64) of the unpacked guest kernel.
kernel_version() {
    local d
    d=$(ls -1 "$KERNEL_DIR/lib/modules" 2>/dev/null | head -n1)
    [ -n "$d" ] || die "no kernel in $KERNEL_DIR; run setup.sh first"
    echo "$d"
}

kernel_image() { echo "$KERNEL_DIR/boot/vmlinuz-$(kernel_version)"; }

# QEMU accelerator: $GUEST_ACCEL if kvm or tcg; for auto (default) kvm when
# /dev/kvm is usable and the host KVM is not PVM (module kvm_pvm), else tcg.
# PVM only runs PVM-enabled guest kernels; a stock Debian kernel dies in
# KVM's instruction emulator there.
resolve_accel() {
    local a=${GUEST_ACCEL:-auto}
    if [ "$a" = auto ]; then
        if [ -w /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ]; then a=kvm; else a=tcg; fi
    fi
    echo "$a"
}
