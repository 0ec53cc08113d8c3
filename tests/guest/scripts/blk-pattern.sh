# Data round trip on /dev/vda:
#   PAT_OFF, PAT_LEN (bytes): write LEN random bytes at OFF with O_DIRECT dd
#     (conv=fsync), drop caches, read back with O_DIRECT, compare sha256.
#     Skipped when PAT_LEN is empty or 0.
#   CHECK_OFF, CHECK_LEN, CHECK_SHA: optional; the device range must hash to
#     CHECK_SHA (data written earlier, e.g. by a previous boot).
# Results: written_sha256, readback_sha256, check_sha256.
. /test/lib.sh
set -u
blk_info

if [ -n "${CHECK_SHA:-}" ]; then
    got=$(dev_sha "$CHECK_OFF" "$CHECK_LEN") || fail "reading check range failed" 3
    result check_sha256=$got
    [ "$got" = "$CHECK_SHA" ] || fail "check range $CHECK_OFF+$CHECK_LEN: $got != expected $CHECK_SHA" 4
fi

if [ "${PAT_LEN:-0}" != 0 ]; then
    random_file /tmp/pat "$PAT_LEN"
    w=$(file_sha /tmp/pat)
    result written_sha256=$w
    dev_write /tmp/pat "$PAT_OFF" conv=fsync || fail "dd write failed" 3
    rm -f /tmp/pat
    drop_caches
    r=$(dev_sha "$PAT_OFF" "$PAT_LEN") || fail "dd read failed" 3
    result readback_sha256=$r
    [ "$w" = "$r" ] || fail "pattern mismatch: wrote $w read $r" 4
fi
exit 0
