#!/bin/sh
# Append the next sequence number (and the guest's clock) to /data/seq.log and sync, every
# 100 ms, until /run/writer.stop exists. Continuity is checked by reading the log back.
echo $$ > /run/writer.pid
last=$(tail -n 1 /data/seq.log 2>/dev/null | cut -d' ' -f1)
n=${last:-0}
while [ ! -e /run/writer.stop ]; do
    n=$((n + 1))
    now=$(date +%s)
    if echo "$n $now" >> /data/seq.log && sync; then
        # Whole or not at all: the agent may read it at any moment (a rename is atomic).
        echo "$n $now" > /run/last_write.new && mv /run/last_write.new /run/last_write
    else
        echo "$n $now write failed" >> /run/write_errors
        n=$((n - 1))
    fi
    usleep 100000
done
rm -f /run/writer.pid
