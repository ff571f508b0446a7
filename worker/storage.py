"""Local disks for `--copy-storage`: what the source has, and its targets on the destination.

libvirt copies non-shared disks over NBD, but the destination images must already exist with
the right format and size (or live in a pool); drover's prepare phase makes them, and a failed
job removes exactly what it made.

What to make is read by the destination's worker from the source's libvirtd (the domain's
XML), never from the job record; a target is made only under the host's `storage_dirs`, and
only after it is written in the worker's ledger (worker/ledger.py), which is all a rollback
ever removes.
"""

from __future__ import annotations

import os
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from jobs.record import DiskFacts
from worker.ledger import Ledger
from worker.libvirt_host import Domain

QEMU_IMG_TIMEOUT_S = 60.0
# qemu-img formats a target may be created in (anything else: refused, never passed on).
IMAGE_FORMATS = frozenset({"raw", "qcow2"})
_PLAIN_PATH = re.compile(r"^/[A-Za-z0-9._+@:/-]{1,4000}\Z")


class StorageError(Exception):
    pass


def local_disks(dom: Domain, chosen: tuple[str, ...] | None = None) -> list[DiskFacts]:
    """The domain's writable file-backed disks: the ones a storage copy has to move (only
    those whose target `chosen` names, with --migrate-disks)."""
    root = ET.fromstring(dom.XMLDesc(0))
    disks = []
    for disk in root.findall("./devices/disk"):
        source = disk.find("source")
        if disk.get("type") != "file" or disk.get("device") != "disk" or source is None:
            continue
        target = disk.find("target")
        if chosen is not None and (target is None or target.get("dev") not in chosen):
            continue
        if disk.find("readonly") is not None or disk.find("shareable") is not None:
            continue
        path = source.get("file")
        if not path:
            continue
        driver = disk.find("driver")
        fmt = driver.get("type", "raw") if driver is not None else "raw"
        capacity = int(dom.blockInfo(path)[0])
        disks.append(DiskFacts(path=path, format=fmt, capacity=capacity))
    return disks


def confined(path: str, dirs: list[str]) -> Path:
    """`path` if it lies in one of `dirs` (symbolic links resolved); else StorageError."""
    if not _PLAIN_PATH.match(path) or ".." in path.split("/"):
        raise StorageError(f"{path!r} is not a plain absolute path")
    target = Path(path)
    parent = Path(os.path.realpath(target.parent))
    for allowed in dirs:
        root = Path(os.path.realpath(allowed))
        if parent == root or root in parent.parents:
            return parent / target.name
    shown = ", ".join(dirs) or "none"
    raise StorageError(f"{path} is outside this host's storage directories ({shown})")


def create_targets(
    disks: list[DiskFacts], dirs: list[str], ledger: Ledger, job_id: str
) -> list[str]:
    """Create an empty image for each disk, only under `dirs`; never touch an existing path.

    Each path goes into the ledger before qemu-img runs, so a crash half-way still leaves a
    record of what may have been made.
    """
    created: list[str] = []
    try:
        for disk in disks:
            if disk.format not in IMAGE_FORMATS:
                raise StorageError(f"{disk.path}: format {disk.format!r} is not supported")
            target = confined(disk.path, dirs)
            if target.exists() or target.is_symlink():
                raise StorageError(f"{disk.path} already exists; refusing to overwrite it")
            target.parent.mkdir(parents=True, exist_ok=True)
            ledger.record_image(job_id, str(target))
            result = subprocess.run(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    disk.format,
                    "--",
                    str(target),
                    str(disk.capacity),
                ],
                capture_output=True,
                text=True,
                timeout=QEMU_IMG_TIMEOUT_S,
                check=False,
            )
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or ["qemu-img failed"])[-1]
                raise StorageError(f"cannot create {disk.path}: {last}")
            created.append(str(target))
    except BaseException:
        remove_own(ledger, job_id, dirs, set())  # just made here: no domain names them yet
        raise
    return created


def disk_sources(domain_xml: str) -> set[str]:
    """Every file or block device a domain's XML names for its disks, backing chains
    included (`<backingStore>`), symbolic links resolved: what that domain may be using."""
    used = set()
    for disk in ET.fromstring(domain_xml).findall("./devices/disk"):
        for source in disk.iter("source"):
            for attr in ("file", "dev"):
                if path := source.get(attr):
                    used.add(os.path.realpath(path))
    return used


def remove_own(
    ledger: Ledger, job_id: str, dirs: list[str], in_use: set[str]
) -> tuple[list[str], list[str]]:
    """Remove the images this worker recorded for `job_id` (still under `dirs`), except those
    a domain on this host names (`in_use`, from `disk_sources`): the paths removed, and the
    paths kept because a domain uses them.

    The ledger says which images this worker made; only libvirt says whether a guest runs
    on one now (the job's guest arrived, whatever its job record claims): such an image
    is never removed."""
    removed, kept = [], []
    for path in ledger.images(job_id):
        try:
            target = confined(path, dirs)
        except StorageError:
            continue  # the registry no longer allows that directory: leave it to the operator
        if os.path.realpath(target) in in_use:
            kept.append(path)
            continue
        target.unlink(missing_ok=True)
        removed.append(path)
    ledger.forget_images(job_id)
    return removed, kept
