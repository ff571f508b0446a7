"""What this host sees of a disk's storage: its file system type, the object at a path and
the free space where images are made (for worker/precheck_storage.py's rules).

The worker runs in the host's own mount namespace, so /proc/self/mountinfo and the paths
are the host's view, as QEMU started by this host's libvirtd would see them.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

from worker.guest_disks import GuestDisk
from worker.precheck_storage import PathView, Room
from worker.storage import QEMU_IMG_TIMEOUT_S

MOUNTINFO = Path("/proc/self/mountinfo")


def fs_type_of(path: str, mountinfo: str) -> str:
    """The type of the file system `path` lies on, by the longest matching mount point
    (mountinfo: mount point is field 5, the type follows the ' - ' separator)."""
    best, kind = "", ""
    for line in mountinfo.splitlines():
        head, _, tail = line.partition(" - ")
        fields = head.split()
        if len(fields) < 5 or not tail:
            continue
        point = fields[4].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, tail.split()[0]
    return kind


def fs_type(path: str) -> str:
    """`fs_type_of` over this host's mounts."""
    return fs_type_of(os.path.realpath(path), MOUNTINFO.read_text())


def path_view(disk: GuestDisk) -> PathView:
    """What is at the disk's path here, and its virtual size (qemu-img for a file image)."""
    try:
        st = os.stat(disk.path)
    except OSError:
        return PathView(None)
    if stat.S_ISBLK(st.st_mode):
        try:
            with open(disk.path, "rb") as dev:
                return PathView("block", dev.seek(0, os.SEEK_END))
        except OSError as exc:
            return PathView("block", problem=exc.strerror)
    if not stat.S_ISREG(st.st_mode):
        return PathView("other")
    if disk.format == "raw":
        return PathView("file", st.st_size)
    # -U: the image is open by the guest's QEMU on the source; -f: never probe the format.
    result = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", "-f", disk.format, "--", disk.path],
        capture_output=True,
        text=True,
        timeout=QEMU_IMG_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["qemu-img info failed"])[-1]
        return PathView("file", problem=last)
    return PathView("file", int(json.loads(result.stdout)["virtual-size"]))


def _existing(path: Path) -> Path:
    """The nearest existing directory at or above `path` (where an image would be made)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def rooms(targets: list[tuple[str, int]]) -> list[Room]:
    """Free space per file system for images of these (path, capacity) about to be made."""
    by_fs: dict[int, Room] = {}
    for path, capacity in targets:
        where = _existing(Path(path).parent)
        dev = os.stat(where).st_dev
        if dev not in by_fs:
            vfs = os.statvfs(where)
            by_fs[dev] = Room(str(where), vfs.f_bavail * vfs.f_frsize, 0)
        room = by_fs[dev]
        by_fs[dev] = Room(room.where, room.free, room.need + capacity)
    return list(by_fs.values())
