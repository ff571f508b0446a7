#!/bin/sh
# PID 1 of the lab's Linux guest (lab/linux_guest.py builds the initramfs around it).
# Network from the kernel command line (drover.ip=ADDR/PREFIX), the virtio disk at /data,
# a writer that appends a sequence number to /data/seq.log and syncs every 100 ms, and the
# agent (busybox httpd + CGI on port 80) that root asks about it (lab/guest_probe.py).
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mkdir -p /proc /sys /dev /tmp /data /run
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o size=96m tmp /tmp
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci \
         virtio_blk failover net_failover virtio_net; do
    insmod /lib/modules/$m.ko 2>&1 | grep -v "File exists" > /dev/console
done
ip=""
for word in $(cat /proc/cmdline); do
    case "$word" in drover.ip=*) ip="${word#drover.ip=}" ;; esac
done
ip link set lo up
n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 100 ]; do usleep 50000; n=$((n + 1)); done
ip addr add "$ip" dev eth0
ip link set eth0 up
n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do usleep 50000; n=$((n + 1)); done
mount -t ext4 /dev/vda /data || echo "mount /dev/vda failed" >> /run/write_errors
echo "drover-linux-guest up ip=$ip" > /dev/console
/bin/writer.sh &
httpd -p 80 -h /www
# PID 1 must not exit; reap orphans while waiting.
while true; do sleep 3600; done
