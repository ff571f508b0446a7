"""Local disks for `--copy-storage`: what the source has, and its targets on the destination.

libvirt copies non-shared disks over NBD, but the destination images must already exist with
the right format and size (or live in a pool); drover's prepare phase makes them, and a failed
job removes exactly what it made.
"""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import libvirt

QEMU_IMG_TIMEOUT_S = 60.0


class StorageError(Exception):
    pass


@dataclass(frozen=True)
class Disk:
    path: str
    format: str
    capacity: int  # bytes

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def local_disks(dom: libvirt.virDomain) -> list[Disk]:
    """The domain's writable file-backed disks: the ones a storage copy has to move."""
    root = ET.fromstring(dom.XMLDesc(0))
    disks = []
    for disk in root.findall("./devices/disk"):
        source = disk.find("source")
        if disk.get("type") != "file" or disk.get("device") != "disk" or source is None:
            continue
        if disk.find("readonly") is not None or disk.find("shareable") is not None:
            continue
        path = source.get("file")
        if not path:
            continue
        driver = disk.find("driver")
        fmt = driver.get("type", "raw") if driver is not None else "raw"
        capacity = int(dom.blockInfo(path)[0])
        disks.append(Disk(path=path, format=fmt, capacity=capacity))
    return disks


def create_targets(disks: list[Disk]) -> list[str]:
    """Create an empty image for each disk; refuse to touch a path that already exists."""
    created: list[str] = []
    try:
        for disk in disks:
            target = Path(disk.path)
            if target.exists():
                raise StorageError(f"{disk.path} already exists; refusing to overwrite it")
            target.parent.mkdir(parents=True, exist_ok=True)
            result = subprocess.run(
                ["qemu-img", "create", "-q", "-f", disk.format, disk.path, str(disk.capacity)],
                capture_output=True,
                text=True,
                timeout=QEMU_IMG_TIMEOUT_S,
                check=False,
            )
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or ["qemu-img failed"])[-1]
                raise StorageError(f"cannot create {disk.path}: {last}")
            created.append(disk.path)
    except BaseException:
        remove_targets(created)
        raise
    return created


def remove_targets(paths: list[str]) -> None:
    for path in paths:
        Path(path).unlink(missing_ok=True)
