#!/usr/bin/env bash
# Print the harness's resolved settings as key=value lines (read by
# tests/src/guest/env.rs after setup.sh and build-initramfs.sh have run).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
echo "work=$GUEST_WORK"
echo "kernel=$(kernel_image)"
echo "initramfs=$INITRAMFS"
echo "accel=$(resolve_accel)"
echo "qemu=$(command -v "$QEMU" || echo "$QEMU")"
echo "qsd=$(command -v "$QSD" || echo "$QSD")"
