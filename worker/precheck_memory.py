"""The hugepage pre-check: a guest backed by hugepages needs that many free pages of that
size on the destination, or QEMU cannot allocate its memory there and the migration fails
after the destination QEMU was started.

`hugepage_need` reads the guest's XML (pure); the destination asks its own libvirtd for its
free pages (virNodeGetFreePages, per NUMA cell, summed) and its default page size from its
own /proc/meminfo (what libvirt uses when <hugepages> names no size).
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from worker.libvirt_host import Connection

MEMINFO = Path("/proc/meminfo")
# libvirt's memory units, in KiB (the scaled-integer units of domain XML).
_UNIT_KIB = {
    "b": 1 / 1024,
    "bytes": 1 / 1024,
    "k": 1,
    "kib": 1,
    "kb": 1000 / 1024,
    "m": 1024,
    "mib": 1024,
    "mb": 1000**2 / 1024,
    "g": 1024**2,
    "gib": 1024**2,
    "gb": 1000**3 / 1024,
    "t": 1024**3,
    "tib": 1024**3,
    "tb": 1000**4 / 1024,
}


@dataclass(frozen=True)
class HugepageNeed:
    """Pages of one size the guest's memory takes (`page_kib` None: the host's default)."""

    page_kib: int | None
    pages: int | None  # None while the size is the host's default (known only there)
    memory_kib: int


def _kib(value: str | None, unit: str | None, default: str = "KiB") -> int:
    scale = _UNIT_KIB.get((unit or default).lower())
    if value is None or scale is None:
        raise ValueError(f"unreadable size {value!r} {unit!r}")
    return math.ceil(int(value) * scale)


def _cells(root: ET.Element) -> dict[str, int]:
    return {
        cell.get("id", str(i)): _kib(cell.get("memory"), cell.get("unit"))
        for i, cell in enumerate(root.findall("cpu/numa/cell"))
    }


def _nodes(nodeset: str) -> set[str]:
    ids: set[str] = set()
    for part in nodeset.split(","):
        lo, _, hi = part.strip().partition("-")
        if re.fullmatch(r"\d+", lo) and (not hi or re.fullmatch(r"\d+", hi)):
            ids.update(str(i) for i in range(int(lo), int(hi or lo) + 1))
    return ids


def hugepage_needs(domain_xml: str) -> list[HugepageNeed]:
    """What a hugepage-backed guest takes, per page size (empty: not hugepage-backed).

    A <page> without nodeset covers all memory; one with a nodeset covers those guest NUMA
    cells' memory. No <page> at all: all memory in the host's default size.
    """
    root = ET.fromstring(domain_xml)
    hugepages = root.find("memoryBacking/hugepages")
    if hugepages is None:
        return []
    memory = root.find("memory")
    if memory is None:
        raise ValueError("the domain has no <memory>")
    total = _kib(memory.text, memory.get("unit"))
    pages = hugepages.findall("page")
    if not pages:
        return [HugepageNeed(None, None, total)]
    cells = _cells(root)
    by_size: dict[int, int] = {}
    for page in pages:
        size = _kib(page.get("size"), page.get("unit"))
        nodeset = page.get("nodeset")
        kib = total if nodeset is None else sum(cells.get(n, 0) for n in _nodes(nodeset))
        by_size[size] = by_size.get(size, 0) + kib
    return [HugepageNeed(s, math.ceil(k / s), k) for s, k in sorted(by_size.items())]


def resolved(need: HugepageNeed, default_page_kib: int) -> HugepageNeed:
    """`need` with the host's default page size filled in where the guest named none."""
    if need.page_kib is not None:
        return need
    pages = math.ceil(need.memory_kib / default_page_kib)
    return HugepageNeed(default_page_kib, pages, need.memory_kib)


def hugepage_refusal(need: HugepageNeed, free_pages: int, host: str) -> str | None:
    """Why `host` cannot back the guest's memory with its free hugepages, or None."""
    if need.pages is None or need.page_kib is None or free_pages >= need.pages:
        return None
    return (
        f"{host} has {free_pages} free {need.page_kib} KiB hugepages, the guest needs {need.pages}"
    )


def default_page_kib(meminfo: str) -> int:
    """The host's default hugepage size (Hugepagesize in /proc/meminfo); 2048 if absent."""
    found = re.search(r"^Hugepagesize:\s+(\d+) kB", meminfo, re.MULTILINE)
    return int(found.group(1)) if found else 2048


def free_pages(conn: Connection, page_kib: int) -> int:
    """Free pages of `page_kib` on every NUMA cell of the host, summed (libvirt's count)."""
    cells = conn.getInfo()[4] or 1
    found = conn.getFreePages([page_kib], 0, cells, 0) or {}
    return sum(int(per.get(page_kib, 0)) for per in found.values())


def hugepage_refusals(conn: Connection, domain_xml: str, host: str) -> str | None:
    """The hugepage check on this host (`conn` its own libvirtd)."""
    needs = hugepage_needs(domain_xml)
    if not needs:
        return None
    default = default_page_kib(MEMINFO.read_text())
    reasons = []
    for need in (resolved(n, default) for n in needs):
        size = need.page_kib or default
        reason = hugepage_refusal(need, free_pages(conn, size), host)
        if reason:
            reasons.append(reason)
    return "; ".join(reasons) or None
