"""A guest's disks as its live domain XML describes them: what the storage pre-checks read.

Pure parsing (no libvirt call), so the rules in worker/precheck_storage.py are tested over
real XML without a host. Only disks with a source on the host's file system are listed
(`type='file'` and `type='block'`); network disks (rbd, iscsi, nbd...) are shared by nature
and empty drives (a CD-ROM without media) have nothing to move.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass


@dataclass(frozen=True)
class GuestDisk:
    """One disk of the domain: its target (vda), where it lives and how QEMU opens it."""

    target: str
    kind: str  # file | block
    device: str  # disk | cdrom | floppy | lun
    path: str
    format: str  # the driver type, raw when unset
    cache: str  # the driver's cache mode; "default" when unset (writeback in QEMU)
    readonly: bool
    shareable: bool

    @property
    def writable(self) -> bool:
        return not self.readonly


def guest_disks(domain_xml: str) -> list[GuestDisk]:
    """The domain's file and block disks that have a source, in XML order."""
    root = ET.fromstring(domain_xml)
    disks = []
    for disk in root.findall("./devices/disk"):
        kind = disk.get("type", "")
        source = disk.find("source")
        target = disk.find("target")
        if kind not in ("file", "block") or source is None or target is None:
            continue
        path = source.get("file" if kind == "file" else "dev")
        if not path:
            continue
        driver = disk.find("driver")
        disks.append(
            GuestDisk(
                target=target.get("dev", ""),
                kind=kind,
                device=disk.get("device", "disk"),
                path=path,
                format=(driver.get("type") if driver is not None else None) or "raw",
                cache=(driver.get("cache") if driver is not None else None) or "default",
                readonly=disk.find("readonly") is not None,
                shareable=disk.find("shareable") is not None,
            )
        )
    return disks


def copied(disk: GuestDisk, copy_storage: bool, chosen: tuple[str, ...] | None) -> bool:
    """Whether a storage copy moves this disk, as libvirt picks them: with --copy-storage,
    every writable, non-shareable disk, or only the ones --migrate-disks names."""
    if not copy_storage:
        return False
    if chosen is not None:
        return disk.target in chosen
    return disk.writable and not disk.shareable and disk.device == "disk"
