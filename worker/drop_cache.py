"""Whether a running guest's QEMU can drop its page cache on arrival, as this host's libvirt
recorded it: the `migration-file-drop-cache` flag in the domain's status XML.

libvirt's own disk-safety test (qemuMigrationSrcIsSafe) asks the capabilities of the QEMU
process that runs the guest (its private qemuCaps), which libvirtd keeps in the domain's
status file /run/libvirt/qemu/NAME.xml (`<domstatus>`, `<qemuCaps><flag name=.../>`) and
reloads from there when it restarts. drover reads that same record, read-only, on the source
worker (it runs in the host's mount namespace, so the path is the host's). Not the per-emulator
capabilities cache (/var/cache/libvirt/qemu/capabilities): that says what a QEMU started now
would get, which differs from the running process's after a QEMU upgrade or a cache refresh.

When the record cannot be read (missing, unreadable, no `<qemuCaps>`) the answer is unknown,
with the reason: the rule then refuses (libvirt may well refuse too) and says why, and
`--unsafe` (VIR_MIGRATE_UNSAFE, which makes libvirt skip the test) is the way through. Refusing
on doubt keeps a guest whose cache could be stale on arrival from being moved silently.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from worker.precheck_storage import DropCache

STATUS_DIR = Path("/run/libvirt/qemu")
FLAG = "migration-file-drop-cache"


def drop_cache_in(status_xml: str) -> DropCache:
    """The flag as a domain status XML records it."""
    try:
        root = ET.fromstring(status_xml)
    except ET.ParseError as exc:
        return DropCache(None, f"status XML does not parse: {exc}")
    caps = root.find("qemuCaps")
    if caps is None:
        return DropCache(None, "status XML has no <qemuCaps>")
    return DropCache(any(f.get("name") == FLAG for f in caps.findall("flag")))


def drop_cache_of(name: str, status_dir: Path = STATUS_DIR) -> DropCache:
    """The flag for the running domain `name` on this host (its libvirtd's status file)."""
    path = status_dir / f"{name}.xml"
    if "/" in name or name in ("", ".", ".."):
        return DropCache(None, f"no status file for a domain named {name!r}")
    try:
        text = path.read_text()
    except OSError as exc:
        return DropCache(None, f"cannot read libvirt's status {path}: {exc.strerror}")
    return drop_cache_in(text)
