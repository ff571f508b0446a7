"""Which of a domain's disks `--copy-storage` would move, from its XML alone.

The same choice as worker/storage.py's `local_disks` (writable, file-backed, not shareable),
less the disks on shared storage (a file system libvirt counts as shared: every host sees the
image already, and copying it would copy it onto itself), without asking libvirt for each
image's size: the evacuation planner counts them for every
guest on the host, inactive ones included, and a missing image must not stop the plan (the
child's own preflight and prepare judge the images themselves).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable

from worker.precheck_storage import SHARED_FS_TYPES
from worker.storage_view import fs_type as host_fs_type


def local_disk_paths(domain_xml: str, fs_type: Callable[[str], str] = host_fs_type) -> list[str]:
    """The paths of the domain's writable file-backed disks that are not on shared storage
    (`fs_type`: the mount type of a path as this host sees it)."""
    paths = []
    for disk in ET.fromstring(domain_xml).findall("./devices/disk"):
        source = disk.find("source")
        if disk.get("type") != "file" or disk.get("device") != "disk" or source is None:
            continue
        if disk.find("readonly") is not None or disk.find("shareable") is not None:
            continue
        path = source.get("file")
        if path and fs_type(path) not in SHARED_FS_TYPES:
            paths.append(path)
    return paths
