#!/bin/sh
# The guest's agent (busybox httpd CGI): /cgi-bin/agent?status|memwriter-start|memwriter-stop|fsck
# Every answer is one JSON object.
echo "Content-Type: application/json"
echo ""
status() {
    set -- $(cat /run/last_write 2>/dev/null)
    errors=$(wc -l < /run/write_errors 2>/dev/null || echo 0)
    lines=$(wc -l < /data/seq.log 2>/dev/null || echo 0)
    # Continuity: every line's number is the one before plus one, from 1.
    gaps=$(awk 'BEGIN{p=0;g=0} {if ($1 != p + 1) g++; p=$1} END{print g}' /data/seq.log 2>/dev/null)
    mw=false; [ -e /run/memwriter.pid ] && mw=true
    wr=false; [ -e /run/writer.pid ] && wr=true
    printf '{"counter": %s, "last_write": %s, "lines": %s, "gaps": %s, "write_errors": %s, ' \
        "${1:-0}" "${2:-0}" "$lines" "${gaps:-0}" "$errors"
    printf '"boot_id": "%s", "uptime": %s, "memwriter": %s, "writer": %s}\n' \
        "$(cat /proc/sys/kernel/random/boot_id)" "$(cut -d' ' -f1 /proc/uptime)" "$mw" "$wr"
}
case "$QUERY_STRING" in
status) status ;;
memwriter-start)
    if [ ! -e /run/memwriter.pid ]; then
        dd if=/dev/urandom of=/tmp/mw.src bs=1M count=32 2>/dev/null
        setsid sh -c 'echo $$ > /run/memwriter.pid; while [ -e /run/memwriter.pid ]; do cp /tmp/mw.src /tmp/mw.dst; usleep 100000; done' \
            </dev/null >/dev/null 2>&1 &
    fi
    status ;;
memwriter-stop)
    kill "$(cat /run/memwriter.pid 2>/dev/null)" 2>/dev/null
    rm -f /run/memwriter.pid /tmp/mw.src /tmp/mw.dst
    status ;;
fsck)
    # Stop the writer, remount read-only, check, then let the writer carry on.
    touch /run/writer.stop
    n=0; while [ -e /run/writer.pid ] && [ $n -lt 50 ]; do usleep 100000; n=$((n + 1)); done
    sync
    mount -o remount,ro /data
    out=$(e2fsck -fn /dev/vda 2>&1); rc=$?
    mount -o remount,rw /data
    rm -f /run/writer.stop
    setsid /bin/writer.sh </dev/null >/dev/null 2>&1 &
    printf '{"fsck_rc": %s, "fsck_output": "%s"}\n' "$rc" "$(echo "$out" | tr -d '"\\' | tr '\n' '|')" ;;
*) echo '{"error": "unknown request"}' ;;
esac
