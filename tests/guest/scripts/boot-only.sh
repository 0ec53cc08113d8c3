# Minimal guest script: prove the guest boots, print what it sees, exit 0.
echo "kernel: $(uname -r)"
echo "uptime: $(cut -d' ' -f1 /proc/uptime)s"
ls /sys/bus/virtio/devices/ 2>/dev/null
for b in fio blkdiscard blockdev sha256sum dd taskset; do echo "$b: $(command -v $b)"; done
echo "@@RESULT booted=1 kernel=$(uname -r) nproc=$(nproc)"
echo "@@RESULT quoted=$X"
exit 0
