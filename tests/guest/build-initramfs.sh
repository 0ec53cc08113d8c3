#!/usr/bin/env bash
# Build the base guest initramfs: static busybox, the guest kernel modules in
# $GUEST_MODULES (plus dependencies, in load order), the binaries in
# $GUEST_BINARIES (fio, iperf3, util-linux blkdiscard/blockdev) with every
# shared library ldd reports, and /init. Test scripts are NOT in here: each
# boot appends a small cpio holding /test.
#
# Cached: the image is rebuilt only when its inputs change (this script,
# common.sh, kernel package, module/binary lists, the host binaries and their
# libraries). The fingerprint is stored in $INITRAMFS.inputs.
#
# Usage: build-initramfs.sh [--force]        (needs root for mknod, and setup.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

force=0; [ "${1:-}" = --force ] && force=1
[ -f "$KERNEL_DIR/.pkg" ] || die "no guest kernel in $KERNEL_DIR; run setup.sh first"
kver=$(kernel_version)

lib_paths() {   # shared libraries of $1, as ldd resolves them
    ldd "$1" | awk '/=> \//{print $3} /^[[:space:]]*\/[^ ]+ \(/{print $1}'
}

fingerprint() {
    {
        cat "$HARNESS_DIR/build-initramfs.sh" "$HARNESS_DIR/common.sh"
        echo "pkg=$(cat "$KERNEL_DIR/.pkg") kver=$kver"
        echo "modules=$GUEST_MODULES binaries=$GUEST_BINARIES applets=$GUEST_APPLETS"
        sha256sum "$(command -v busybox)"
        for b in $GUEST_BINARIES; do
            p=$(command -v "$b") || { echo "missing $b"; continue; }
            sha256sum "$p"
            lib_paths "$p" | while read -r lib; do stat -L -c '%n %s %Y' "$lib"; done
        done
    } | sha256sum | cut -d' ' -f1
}

lock_work
fp=$(fingerprint)
if [ $force = 0 ] && [ -f "$INITRAMFS" ] && [ "$(cat "$INITRAMFS.inputs" 2>/dev/null)" = "$fp" ]; then
    log "initramfs up to date: $INITRAMFS"
    exit 0
fi
[ "$(id -u)" = 0 ] || die "building the initramfs needs root (mknod)"
log "building initramfs $INITRAMFS"

root="$GUEST_WORK/initramfs-root"
rm -rf "$root"
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,run,root,usr/bin,usr/sbin,lib/modules,lib64}

# --- busybox (static) ----------------------------------------------------------
# Applet symlinks are created at boot by `busybox --install -s` in /init.
bb=$(command -v busybox) || die "busybox not found (apt-get install busybox-static)"
# ldd (always there, unlike `file`) exits 1 for a static binary: no pipe, or pipefail
# turns that into a failure.
case "$(ldd "$bb" 2>&1 || true)" in
    *'not a dynamic executable'* | *'statically linked'*) ;;
    *) die "$bb is not static; install busybox-static" ;;
esac
applets=" $("$bb" --list | tr '\n' ' ') "
for a in $GUEST_APPLETS; do
    case "$applets" in *" $a "*) ;; *) die "busybox has no '$a' applet" ;; esac
done
cp "$bb" "$root/bin/busybox"

# /dev/console must exist in the initramfs, or the kernel starts /init with
# no stdin/stdout ("Warning: unable to open an initial console").
mknod -m 600 "$root/dev/console" c 5 1
mknod -m 666 "$root/dev/null" c 1 3

# --- kernel modules ----------------------------------------------------------------
# The Debian package ships no modules.dep (its postinst runs depmod); make it.
[ -f "$KERNEL_DIR/lib/modules/$kver/modules.dep" ] || depmod -b "$KERNEL_DIR" "$kver"
: > "$root/etc/modules.list"
for m in $GUEST_MODULES; do
    # "insmod /path/x.ko[.xz]" per dependency then the module itself, in load
    # order; "builtin x" for built-in ones (skipped).
    modprobe -d "$KERNEL_DIR" -S "$kver" --show-depends "$m" | while read -r kind path _; do
        [ "$kind" = insmod ] || continue
        name=$(basename "$path"); name=${name%.xz}; name=${name%.zst}; name=${name%.ko}
        grep -qx "$name" "$root/etc/modules.list" && continue
        # busybox insmod loads plain .ko only.
        case "$path" in
            *.xz)  xz -dc "$path"    > "$root/lib/modules/$name.ko" ;;
            *.zst) zstd -qdc "$path" > "$root/lib/modules/$name.ko" ;;
            *)     cp "$path" "$root/lib/modules/$name.ko" ;;
        esac
        echo "$name" >> "$root/etc/modules.list"
    done
done

# --- dynamic binaries + shared libs ---------------------------------------------------
# /usr/bin comes before /bin (busybox applets) in the guest's PATH, so the
# util-linux blkdiscard/blockdev win over busybox's.
for b in $GUEST_BINARIES; do
    p=$(command -v "$b") || die "$b not found on host (run setup.sh)"
    install -D -m 755 "$p" "$root/usr/bin/$b"
    lib_paths "$p" | while read -r lib; do
        [ -e "$root$lib" ] || install -D -m 755 "$(readlink -f "$lib")" "$root$lib"
    done
done

# --- /init ------------------------------------------------------------------------------
cat > "$root/init" <<'INIT'
#!/bin/busybox sh
# Guest PID 1. Mounts the basics, loads modules, runs /test/run.sh (appended
# per boot), prints "@@GUEST-EXIT@@ <status>" and powers off.
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
echo "@@ init: started at uptime $(cut -d' ' -f1 /proc/uptime)s"
while read -r m; do
    insmod "/lib/modules/$m.ko" || echo "@@ init: insmod $m failed"
done < /etc/modules.list
ip link set lo up
# Device nodes (/dev/vda, ...) come from devtmpfs; virtio probing is
# synchronous within insmod, so they exist by now.
[ -f /test/env ] && { set -a; . /test/env; set +a; }
echo "@@ init: running test at uptime $(cut -d' ' -f1 /proc/uptime)s"
if [ -f /test/run.sh ]; then
    cd /test && sh /test/run.sh; rc=$?
else
    echo "@@ init: no /test/run.sh"; rc=127
fi
cd /
echo "@@GUEST-EXIT@@ $rc uptime=$(cut -d' ' -f1 /proc/uptime)"
sync
poweroff -f
# If ACPI power-off did not stop QEMU, try sysrq, then panic (-no-reboot
# with panic=-1 makes QEMU exit).
echo o > /proc/sysrq-trigger
sleep 5
exit $rc
INIT
chmod 755 "$root/init"

# --- pack ------------------------------------------------------------------------------
# newc, owned by root. gzip -1: quick to make; fio drags in ~70 MiB of libs.
mkdir -p "$(dirname "$INITRAMFS")"
(cd "$root" && find . -print0 | LC_ALL=C sort -z \
    | cpio --null -o -H newc -R 0:0 --quiet) | gzip -1 > "$INITRAMFS.tmp"
mv "$INITRAMFS.tmp" "$INITRAMFS"
echo "$fp" > "$INITRAMFS.inputs"
mods=$(tr '\n' ' ' < "$root/etc/modules.list")
rm -rf "$root"
log "initramfs: $INITRAMFS ($(du -h "$INITRAMFS" | cut -f1); modules: $mods)"
