# Minimal guest script: prove the guest boots, print what it sees, exit 0.
echo "kernel: $(uname -r)"
echo "uptime: $(cut -d' ' -f1 /proc/uptime)s"
ls /sys/bus/virtio/devices/ 2>/dev/null
echo "@@RESULT booted=1 kernel=$(uname -r) nproc=$(nproc)"
exit 0
