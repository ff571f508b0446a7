"""What the lab needs on this machine: root, and the programs of the Debian packages below."""

from __future__ import annotations

import os
import shutil

from lab.proc import LabError

REQUIRED_COMMANDS = {
    "ip": "iproute2",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "libvirtd": "libvirt-daemon libvirt-daemon-driver-qemu",
    "virsh": "libvirt-clients",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "redis-server": "redis-server",
    "redis-sentinel": "redis-sentinel",
    "as": "binutils",
    "ld": "binutils",
    # The Linux guests (lab/linux_guest.py): Debian's packages fetched and unpacked, the disk.
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "findmnt": "util-linux",
    # The shared storage the Linux guests' disks live on (lab/shared_storage.py).
    "glusterd": "glusterfs-server",
    "gluster": "glusterfs-server",
    "glusterfs": "glusterfs-client",
}


def check_prerequisites() -> None:
    """Refuse early, with the fix, when not root or a needed program is missing."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, mounts, libvirtd): run as root")
    missing = {cmd: pkg for cmd, pkg in REQUIRED_COMMANDS.items() if shutil.which(cmd) is None}
    if missing:
        pkgs = " ".join(sorted(set(missing.values())))
        raise LabError(
            f"missing {', '.join(sorted(missing))}: run `make deps` "
            f"(or apt-get install --no-install-recommends {pkgs})"
        )
